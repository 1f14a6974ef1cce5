"""Channels: how the HIL Server reaches people in WeCom, and hears them.

Three channels implement `Channel`: the group robot's webhook (`webhook`, direct mode), DevCloud Workers over the
relay WebSocket (`relay`) and the AI bot's long connection (`aibot`). The service speaks only the domain types of
`hil_protocol.outbound`; what each channel puts on its wire is its own business. What people send comes back from
every channel as the same `IncomingMessage`, handed to the service's inbox.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hil_protocol.callback import IncomingMessage
from hil_protocol.outbound import CardUpdate, Notice, Question, SendReceipt

# Where a channel hands what people send; it returns once the message is durably handled.
Inbox = Callable[[IncomingMessage], Awaitable[object]]


class ChannelError(Exception):
    """The message did not reach WeCom. `str()` is a sentence for a person; `errcode` is WeCom's, when it said."""

    def __init__(self, message: str, errcode: int | None = None) -> None:
        super().__init__(message)
        self.errcode = errcode


@dataclass(frozen=True)
class ChannelHealth:
    """Whether the channel can do its job now. `fields` go into /health as they are (the seed's relay fields)."""

    ok: bool = True
    reason: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


class Channel(Protocol):
    name: str

    async def send_question(self, question: Question) -> SendReceipt:
        """Post a question (all its parts and images). Raises ChannelError when it could not."""
        ...

    async def send_notice(self, notice: Notice) -> None:
        """Post a hint or notice. Raises ChannelError when it could not."""
        ...

    async def update_card(self, update: CardUpdate) -> None:
        """Replace a question's card after a click (channels without cards do nothing)."""
        ...

    async def run(self, inbox: Inbox) -> None:
        """The channel's background work (heartbeats, a long connection), for the lifespan's task group. Returns
        only when cancelled; messages people send go to `inbox`."""
        ...

    def health(self) -> ChannelHealth: ...


__all__ = ["Channel", "ChannelError", "ChannelHealth", "Inbox"]
