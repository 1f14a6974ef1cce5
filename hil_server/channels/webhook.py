"""Direct mode: the HIL Server posts through the group robot's webhook itself. What people send arrives on the robot
callback (`POST /api/callback`), outside this channel."""

from __future__ import annotations

import dataclasses

from hil_protocol.images import ImageError
from hil_protocol.outbound import CardUpdate, Notice, Question, SendReceipt
from hil_protocol.wecom_robot import RobotSender, WeComError

from ..choices import as_text
from . import ChannelError, ChannelHealth, Inbox


class WebhookChannel:
    name = "webhook"

    def __init__(self, sender: RobotSender) -> None:
        self.sender = sender

    async def send_question(self, question: Question) -> SendReceipt:
        try:
            return await self.sender.send_question(dataclasses.replace(question, message=as_text(question)))
        except WeComError as exc:
            raise ChannelError(str(exc), exc.errcode) from exc
        except ImageError as exc:
            raise ChannelError(str(exc)) from exc

    async def send_notice(self, notice: Notice) -> None:
        try:
            await self.sender.send_notice(notice)
        except WeComError as exc:
            raise ChannelError(str(exc), exc.errcode) from exc

    async def update_card(self, update: CardUpdate) -> None:
        pass  # no cards in a text chat: the question's options are numbered lines

    async def run(self, inbox: Inbox) -> None:
        # The callback route feeds the inbox; what runs here is the check of a key WeCom refused.
        await self.sender.watch_key()

    def health(self) -> ChannelHealth:
        problem = self.sender.key.problem()
        if problem is None:
            return ChannelHealth()
        return ChannelHealth(ok=False, reason=problem, fields={"bot_key_ok": False})
