"""How a message reaches WeCom: directly (direct mode) or through a connected worker (relay mode)."""

from __future__ import annotations

from typing import Any, Protocol

from hil_protocol.relay import SendHintPayload, SendMessagePayload
from hil_protocol.wecom import ImageError, RobotSender, WeComError


class DeliveryError(Exception):
    """The message did not reach WeCom. `str()` is a sentence for a person."""

    def __init__(self, message: str, errcode: int | None = None) -> None:
        super().__init__(message)
        self.errcode = errcode


class Delivery(Protocol):
    mode: str

    async def send_message(self, payload: SendMessagePayload) -> dict[str, Any]: ...

    async def send_hint(self, payload: SendHintPayload) -> None: ...


class DirectDelivery:
    mode = "direct"

    def __init__(self, sender: RobotSender) -> None:
        self.sender = sender

    async def send_message(self, payload: SendMessagePayload) -> dict[str, Any]:
        try:
            return await self.sender.deliver(payload)
        except WeComError as exc:
            raise DeliveryError(str(exc), exc.errcode) from exc
        except ImageError as exc:
            raise DeliveryError(str(exc)) from exc

    async def send_hint(self, payload: SendHintPayload) -> None:
        try:
            await self.sender.deliver_hint(payload)
        except WeComError as exc:
            raise DeliveryError(str(exc), exc.errcode) from exc
