"""The heart of the HIL Server: create questions, match the person's messages to them, answer polls."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from hil_protocol.callback import CallbackError, IncomingMessage, parse_callback
from hil_protocol.messages import new_short_id
from hil_protocol.outbound import Notice, Question

from . import hints
from .channels import Channel, ChannelError
from .models import PollResponse, Reply, SendRequest, SendResponse, Session, UserInfo
from .store import SessionStore

logger = logging.getLogger(__name__)

Outcome = Literal[
    "matched_quote",
    "matched_only",
    "late",
    "duplicate",
    "hint_several",
    "hint_chat_id",
    "hint_unknown_quote",
    "hint_empty",
    "event",
    "ignored",
]

HintKind = Literal["several", "chat_id", "unknown_quote", "empty", "late", "event"]

POLL_WAIT_MAX = 60.0


class HilService:
    def __init__(
        self,
        store: SessionStore,
        channel: Channel,
        *,
        default_timeout: float = 1200.0,
        retention: float = 24 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.channel = channel
        self.default_timeout = default_timeout
        self.retention = retention
        self._clock = clock
        self._waiters: dict[str, asyncio.Event] = {}
        self._hints: asyncio.Queue[Notice] = asyncio.Queue(maxsize=1000)
        self.recent: deque[dict[str, Any]] = deque(maxlen=50)
        # Observer (metrics): ("callback", outcome), ("hint", kind, "sent"|"failed"); the API adds ("poll", kind).
        self.observe: Callable[..., None] = lambda event, *labels: None

    # --- questions ---------------------------------------------------------------------------------------------

    async def send(self, request: SendRequest, owner: str | None = None) -> SendResponse:
        question = Question(
            message=request.message,
            chat_id=request.chat_id,
            chat_type=request.chat_type,
            images=tuple(request.images),
            project_name=request.project_name,
            mention_list=tuple(request.mention_list or ()),
        )
        if not request.wait_reply:
            try:
                await self.channel.send_question(question)
            except ChannelError as exc:
                return SendResponse(success=False, message=f"发送失败：{exc}", error=str(exc), errcode=exc.errcode)
            return SendResponse(success=True, message="消息已发送")

        now = self._clock()
        short_id = new_short_id()
        while self.store.short_id_taken(short_id):
            short_id = new_short_id()
        session = Session(
            session_id=uuid.uuid4().hex,
            short_id=short_id,
            chat_id=request.chat_id,
            chat_type=request.chat_type,
            project_name=request.project_name,
            message=request.message,
            created_at=now,
            deadline=now + (request.timeout or self.default_timeout),
            owner=owner,
        )
        # Stored before it is sent, so a reply that comes back faster than WeCom's response still finds it.
        await self.store.save(session)
        try:
            await self.channel.send_question(dataclasses.replace(question, short_id=short_id))
        except ChannelError as exc:
            await self._close(session, "failed", error=str(exc))
            logger.warning("send failed session_id=%s short_id=%s: %s", session.session_id, short_id, exc)
            return SendResponse(
                success=False,
                session_id=session.session_id,
                short_id=short_id,
                message=f"发送失败：{exc}",
                error=str(exc),
                errcode=exc.errcode,
            )
        logger.info("question sent session_id=%s short_id=%s chat_id=%s", session.session_id, short_id, session.chat_id)
        return SendResponse(
            success=True, session_id=session.session_id, short_id=short_id, message="消息已发送，等待回复"
        )

    async def poll(self, session_id: str, wait: float = 0.0) -> PollResponse:
        session = self.store.find(session_id)
        if session is None:
            return PollResponse(
                session_id=session_id, status="not_found", has_reply=False, message="会话不存在或已过期"
            )
        wait = max(0.0, min(wait, POLL_WAIT_MAX))
        if wait and not session.replies and session.status in ("waiting", "timeout"):
            event = self._waiters.setdefault(session.session_id, asyncio.Event())
            # asyncio.timeout, not wait_for: no extra task per held poll (10,000 open polls cost ~10 MB less).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await event.wait()
            session = self.store.get(session.session_id) or session
        return self._poll_response(session)

    def _poll_response(self, session: Session) -> PollResponse:
        status = session.status
        if session.replies:
            status = "replied"
        messages = {
            "waiting": "等待回复中",
            "replied": "已收到回复",
            "timeout": "等待超时",
            "failed": f"发送失败：{session.error}",
        }
        return PollResponse(
            session_id=session.session_id,
            short_id=session.short_id,
            status=status,
            has_reply=bool(session.replies),
            replies=session.replies,
            message=messages[status],
        )

    async def mark_timeout(self, session_id: str) -> bool:
        session = self.store.find(session_id)
        if session is None:
            return False
        if session.status == "waiting":
            await self._close(session, "timeout")
            logger.info("agent stopped waiting session_id=%s short_id=%s", session.session_id, session.short_id)
        return True

    async def _close(self, session: Session, status: Literal["replied", "timeout", "failed"], error: str | None = None):
        session.status = status
        session.closed_at = self._clock()
        if error:
            session.error = error
        await self.store.save(session)
        self._record(session, status)
        self._wake(session.session_id)

    def _wake(self, session_id: str) -> None:
        event = self._waiters.pop(session_id, None)
        if event is not None:
            event.set()

    def _record(self, session: Session, outcome: str) -> None:
        self.recent.appendleft(
            {"short_id": session.short_id, "project": session.project_name, "outcome": outcome, "at": self._clock()}
        )

    # --- the person's messages ---------------------------------------------------------------------------------

    async def handle_callback(self, data: Any) -> Outcome:
        """A robot callback (fly-pigeon JSON shape). Raises CallbackError for a body that is not one."""
        return await self.handle_message(parse_callback(data))

    async def handle_message(self, msg: IncomingMessage) -> Outcome:
        outcome = await self._handle(msg)
        self.observe("callback", outcome)
        if outcome not in ("matched_quote", "matched_only", "late"):  # a match logs its own line, with the session
            logger.info(
                "callback msgid=%s chat_id=%s quoted=%s outcome=%s",
                msg.msgid,
                msg.chat_id,
                msg.quoted_short_id,
                outcome,
            )
        return outcome

    async def _handle(self, msg: IncomingMessage) -> Outcome:
        # From here until store.save() there is no await: the duplicate check and the match are atomic.
        if msg.msgid and self.store.seen_msgid(msg.msgid):
            return "duplicate"
        if msg.is_event:
            if msg.event_type in ("enter_chat", "add_to_chat"):
                self._hint(msg.chat_id, hints.chat_id_hint(msg.chat_id, msg.chat_type), kind="event")
            await self.store.save(msgid=msg.msgid)
            return "event"
        if not msg.answer and not msg.image_urls:
            self._hint(msg.chat_id, hints.empty_answer(), "text", kind="empty")
            await self.store.save(msgid=msg.msgid)
            return "hint_empty"

        if msg.quoted_short_id:
            session = self.store.get_by_short_id(msg.quoted_short_id)
            if session is None:
                self._hint(msg.chat_id, hints.unknown_quote(msg.quoted_short_id), "text", kind="unknown_quote")
                await self.store.save(msgid=msg.msgid)
                return "hint_unknown_quote"
            if session.status == "waiting":
                return await self._accept(session, msg, "quote")
            late = session.status in ("timeout", "failed")
            outcome = await self._accept(session, msg, "late" if late else "quote")
            if late:
                self._hint(msg.chat_id, hints.late_answer(session), "text", kind="late")
            return outcome

        waiting = self.store.waiting_in_chat(msg.chat_id)
        if len(waiting) == 1:
            return await self._accept(waiting[0], msg, "only_waiting")
        if waiting:
            self._hint(msg.chat_id, hints.several_waiting(waiting), kind="several")
            await self.store.save(msgid=msg.msgid)
            return "hint_several"
        self._hint(msg.chat_id, hints.chat_id_hint(msg.chat_id, msg.chat_type), kind="chat_id")
        await self.store.save(msgid=msg.msgid)
        return "hint_chat_id"

    async def _accept(self, session: Session, msg: IncomingMessage, how: Literal["quote", "only_waiting", "late"]):
        reply = Reply(
            msg_type="text" if msg.msg_type == "text" else msg.msg_type,  # type: ignore[arg-type]
            content=msg.answer,
            image_url=msg.image_urls[0] if msg.image_urls else None,
            images=msg.image_urls,
            from_user=UserInfo.model_validate(msg.from_user.model_dump()),
            timestamp=msg.received_at,
            msgid=msg.msgid,
            matched_by=how,
        )
        session.replies.append(reply)
        if session.status == "waiting":
            session.status = "replied"
            session.closed_at = self._clock()
        await self.store.save(session, msgid=msg.msgid)
        self._record(session, f"replied ({how})")
        self._wake(session.session_id)
        logger.info(
            "reply matched session_id=%s short_id=%s by=%s msgid=%s chat_id=%s",
            session.session_id,
            session.short_id,
            how,
            msg.msgid,
            msg.chat_id,
        )
        return {"quote": "matched_quote", "only_waiting": "matched_only", "late": "late"}[how]

    # --- hints: sent by a background task so reading a callback (or the worker's socket) never waits on WeCom ---

    def _hint(
        self, chat_id: str, text: str, msg_type: Literal["markdown", "text"] = "markdown", *, kind: HintKind
    ) -> None:
        try:
            self._hints.put_nowait(Notice(chat_id=chat_id, text=text, markdown=msg_type == "markdown", kind=kind))
        except asyncio.QueueFull:
            logger.warning("hint queue full, dropping a hint for chat_id=%s", chat_id)

    async def run_hints(self) -> None:
        while True:
            notice = await self._hints.get()
            try:
                await self.channel.send_notice(notice)
                self.observe("hint", notice.kind, "sent")
            except ChannelError as exc:
                self.observe("hint", notice.kind, "failed")
                logger.warning("hint to chat_id=%s failed: %s", notice.chat_id, exc)

    # --- housekeeping ------------------------------------------------------------------------------------------

    async def sweep(self) -> None:
        now = self._clock()
        for session in self.store.waiting():
            if session.deadline <= now:
                await self._close(session, "timeout")
                logger.info("session timed out session_id=%s short_id=%s", session.session_id, session.short_id)
        expired = [
            s.session_id
            for s in self.store.all()
            if s.status != "waiting" and (s.closed_at or s.created_at) + self.retention <= now
        ]
        if expired:
            await self.store.delete(expired)
            logger.info("purged %d closed sessions", len(expired))
        await self.store.forget_msgids(now - self.retention)

    async def run_sweeper(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except Exception:  # keep sweeping; one bad pass must not stop timeouts forever
                logger.exception("sweep failed")

    # --- the agent's side ------------------------------------------------------------------------------------------

    def newest_open(self, owner: str | None) -> Session | None:
        """The newest question of this API token (None: tokens are off) the agent may still wait for: waiting, or
        timed out after the agent stopped waiting (a late answer is kept on it). `wait_for_reply()` without an id."""
        candidates = (s for s in self.store.all() if s.owner == owner and s.status in ("waiting", "timeout"))
        return max(candidates, key=lambda s: s.created_at, default=None)


__all__ = ["CallbackError", "HilService", "HintKind", "Outcome"]
