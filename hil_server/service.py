"""The heart of the HIL Server: create questions, hand what people send to the matching rules, answer polls.

A question is `sending` until its channel accepted it, then `waiting` until a person answers (`replied`), the agent
stops waiting or its deadline passes (`timeout`), or it could not be delivered (`failed`). A question that is
`sending` when the server dies is resolved at the next start (`failed`, with a notice in the chat), so no question
waits that no person was shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Literal, Protocol

from hil_protocol.callback import IncomingMessage
from hil_protocol.messages import new_short_id
from hil_protocol.outbound import CardUpdate, Notice, Question

from . import audit, hints
from .approvals import answered, tally
from .channels import Channel, ChannelError
from .choices import APPROVAL_OPTIONS, Pick
from .errors import InvalidRequest
from .events import RecentEvents
from .matching import Decision, MatchedBy, Outcome, decide
from .models import (
    UNCLEAR_KEPT,
    Choice,
    PollResponse,
    Refused,
    Reply,
    SendRequest,
    SendResponse,
    Session,
    check_approvers,
    distinct_responders,
)
from .store import SessionStore, StoreUnavailable

logger = logging.getLogger(__name__)

POLL_WAIT_MAX = 60.0
# A question the agent waits on again (wait_for_reply after a timeout) stays open this long past the held poll,
# so the next poll of the same wait finds it still waiting.
REOPEN_GRACE = 5.0
# The audit trail is purged of rows past HIL_AUDIT_RETENTION at most this often (seconds).
AUDIT_PURGE_INTERVAL = 3600.0


class ServiceMetrics(Protocol):
    """What the service reports (Prometheus in the app; nothing in tests)."""

    def callback(self, outcome: Outcome, matched_by: MatchedBy | None) -> None: ...

    def notice(self, kind: str, sent: bool) -> None: ...

    def poll(self, held: bool) -> None: ...


class NoMetrics:
    def callback(self, outcome: Outcome, matched_by: MatchedBy | None) -> None:
        pass

    def notice(self, kind: str, sent: bool) -> None:
        pass

    def poll(self, held: bool) -> None:
        pass


class HilService:
    def __init__(
        self,
        store: SessionStore,
        channel: Channel,
        *,
        metrics: ServiceMetrics | None = None,
        events: RecentEvents | None = None,
        default_timeout: float = 1200.0,
        retention: float = 24 * 3600.0,
        msgid_memory: float = 300.0,
        default_chat_id: str | None = None,
        default_responders: tuple[str, ...] = (),
        clock: Callable[[], float] = time.time,
        audit_retention: float = 180 * 86400.0,
    ) -> None:
        self.audit_retention = audit_retention
        self._audit_purged_at = -math.inf
        self.store = store
        self.channel = channel
        self.metrics: ServiceMetrics = metrics or NoMetrics()
        self.events = events or RecentEvents(clock=clock)
        self.default_timeout = default_timeout
        self.retention = retention
        # msgids are remembered at least as long as a signed callback may be replayed, whatever the retention
        self.msgid_memory = max(retention, msgid_memory)
        self.default_chat_id = default_chat_id
        self.default_responders = tuple(distinct_responders(default_responders))
        self._clock = clock
        self._waiters: dict[str, asyncio.Event] = {}
        self._notices: asyncio.Queue[Notice | CardUpdate] = asyncio.Queue(maxsize=1000)

    # --- questions ---------------------------------------------------------------------------------------------

    async def send(
        self, request: SendRequest, owner: str | None = None, mcp_session: str | None = None
    ) -> SendResponse:
        """Post a question (or, with wait_reply=false, a plain message). Raises StoreUnavailable, and InvalidRequest
        when the request only fails with this server's settings (more approvals than default responders)."""
        chat_id = request.chat_id or self.default_chat_id
        approval = request.approvals_required or 0
        responders = tuple(request.responders or self.default_responders)
        if approval and not request.responders:  # the request's own responders were checked by SendRequest
            try:
                check_approvers(approval, responders, who="the server's default responders (HIL_DEFAULT_RESPONDERS)")
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from exc
        question = Question(
            message=request.message,
            chat_id=chat_id,
            chat_type=request.chat_type,
            images=tuple(request.images),
            project_name=request.project_name,
            # The people who may answer are mentioned, so WeCom tells them.
            mention_list=tuple(dict.fromkeys([*(request.mention_list or ()), *responders])),
            options=APPROVAL_OPTIONS if approval else tuple(request.options or ()),
            allow_text=False if approval else request.allow_text,
            multi_select=request.multi_select and not approval,
            responders=responders,
            approvals_required=approval,
        )
        if not request.wait_reply:
            try:
                await self.channel.send_question(question)
            except ChannelError as exc:
                await self.store.append_audit(
                    audit.AuditEvent(
                        at=self._clock(),
                        kind="send_failed",
                        owner=owner,
                        chat_id=chat_id,
                        via="agent",
                        detail={"wait_reply": False, "error": str(exc), "errcode": exc.errcode},
                    )
                )
                return SendResponse(success=False, message=f"发送失败：{exc}", error=str(exc), errcode=exc.errcode)
            return SendResponse(success=True, message="消息已发送")

        now = self._clock()
        short_id = new_short_id()
        while self.store.short_id_taken(short_id):
            short_id = new_short_id()
        session = Session(
            session_id=uuid.uuid4().hex,
            short_id=short_id,
            chat_id=chat_id,
            chat_type=request.chat_type,
            project_name=request.project_name,
            message=request.message,
            status="sending",
            created_at=now,
            deadline=now + (request.timeout or self.default_timeout),
            owner=owner,
            mcp_session=mcp_session,
            options=list(question.options),
            allow_text=question.allow_text,
            multi_select=question.multi_select,
            responders=list(responders),
            approvals_required=approval,
        )
        # Stored before it is sent, so a quote-reply to its first part that comes back before the last part is
        # sent still finds it; `sending` keeps it out of plain-reply matching and hints until a person saw it.
        await self.store.save(session, audit=[audit.asked(session, now)])
        try:
            await self.channel.send_question(
                dataclasses.replace(
                    question, short_id=short_id, card_id=session.session_id, expires_at=session.deadline
                )
            )
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
        if session.status == "sending":  # a fast quote-reply may have answered it already
            session.status = "waiting"
            await self.store.save(session)
        logger.info("question sent session_id=%s short_id=%s chat_id=%s", session.session_id, short_id, chat_id)
        return SendResponse(
            success=True, session_id=session.session_id, short_id=short_id, message="消息已发送，等待回复"
        )

    async def poll(self, session: Session, wait: float = 0.0) -> PollResponse:
        """The session's state; with `wait`, held until a reply arrives or `wait` seconds pass. Waiting again on a
        question that timed out opens it again for as long as the wait lasts, so plain replies match it too."""
        if self.store.broken is not None:
            raise StoreUnavailable(self.store.broken)
        self.metrics.poll(held=wait > 0)
        wait = max(0.0, min(wait, POLL_WAIT_MAX))
        if wait and not answered(session) and session.status in ("sending", "waiting", "timeout"):
            if session.status == "timeout":
                await self._reopen(session, wait)
            event = self._waiters.setdefault(session.session_id, asyncio.Event())
            # asyncio.timeout, not wait_for: no extra task per held poll (10,000 open polls cost ~10 MB less).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await event.wait()
            session = self.store.get(session.session_id) or session
        return self._poll_response(session)

    async def _reopen(self, session: Session, wait: float) -> None:
        session.status = "waiting"
        session.deadline = max(session.deadline, self._clock() + wait + REOPEN_GRACE)
        session.closed_at = None
        await self.store.save(session, audit=[audit.question_event("reopened", session, self._clock(), via="agent")])
        logger.info("waiting again session_id=%s short_id=%s", session.session_id, session.short_id)

    def _poll_response(self, session: Session) -> PollResponse:
        approval = tally(session) if session.approvals_required else None
        status = "replied" if answered(session, approval) else session.status
        messages = {
            "sending": "发送中，等待回复",
            "waiting": "等待回复中",
            "replied": "已收到回复",
            "timeout": "等待超时",
            "failed": f"发送失败：{session.error}",
        }
        return PollResponse(
            session_id=session.session_id,
            short_id=session.short_id,
            # Clients know waiting|replied|timeout|failed: a question still being sent is waiting to them.
            status="waiting" if status == "sending" else status,
            has_reply=bool(session.replies),
            replies=session.replies,
            message=messages[status],
            choice=next((r.choice for r in session.replies if r.choice is not None), None),
            choices=next((r.choices for r in session.replies if r.choices), []),
            approval=approval,
            unclear=session.unclear,
        )

    async def mark_timeout(self, session: Session) -> None:
        if session.status in ("sending", "waiting"):
            # Recorded as "stopped", not "timeout": the agent gave up before the question's own deadline.
            await self._close(session, "timeout", kind="cancelled", outcome="stopped (agent)")
            logger.info("agent stopped waiting session_id=%s short_id=%s", session.session_id, session.short_id)

    async def _close(
        self,
        session: Session,
        status: Literal["replied", "timeout", "failed"],
        error: str | None = None,
        kind: audit.AuditKind | None = None,
        *,
        outcome: str | None = None,
    ) -> None:
        session.status = status
        session.closed_at = self._clock()
        if error:
            session.error = error
        kind = kind or {"replied": "decided", "timeout": "timeout", "failed": "send_failed"}[status]
        via = "agent" if kind == "cancelled" else "server"
        row = audit.question_event(kind, session, session.closed_at, via=via, error=error)
        await self.store.save(session, audit=[row])
        self.events.add(session, outcome or status)
        self._wake(session.session_id)

    def _wake(self, session_id: str) -> None:
        event = self._waiters.pop(session_id, None)
        if event is not None:
            event.set()

    # --- what people send --------------------------------------------------------------------------------------

    async def handle_message(self, msg: IncomingMessage) -> Outcome:
        """Match one message and make the outcome durable before returning. Raises StoreUnavailable."""
        if self.store.broken is not None:
            # Memory may hold what never reached the disk (a msgid marked seen): decide nothing until it is reloaded.
            raise StoreUnavailable(self.store.broken)
        decision = decide(msg, self.store)
        await self._apply(decision, msg)
        self.metrics.callback(decision.outcome, decision.matched_by)
        if decision.session is None:  # a match logs its own line, with the session
            logger.info(
                "message msgid=%s chat_id=%s quoted=%s outcome=%s",
                msg.msgid,
                msg.chat_id,
                msg.quoted_short_id,
                decision.outcome,
            )
        return decision.outcome

    async def _apply(self, decision: Decision, msg: IncomingMessage) -> None:
        # No await between decide() and store.save(): the duplicate check and the match are atomic.
        if decision.outcome == "duplicate":
            return
        session = decision.session
        if session is not None and decision.matched_by is not None:
            await self._take(session, decision, msg)
        elif session is not None and decision.kept_by is not None:
            # Decided nothing ("好的，先不要"): kept for the agent to read, not an answer; the question keeps waiting.
            session.unclear = [*session.unclear, _reply(msg, decision.kept_by)][-UNCLEAR_KEPT:]
            undecided = audit.person_event("refused", session, msg, self._clock(), reason=decision.outcome)
            await self.store.save(session, msgid=msg.msgid, audit=[undecided])
            self.events.add(session, f"not a decision ({decision.outcome})", by=_who(msg), chat_id=msg.chat_id)
            logger.info(
                "reply kept undecided session_id=%s short_id=%s msgid=%s userid=%s outcome=%s",
                session.session_id,
                session.short_id,
                msg.msgid,
                msg.from_user.userid,
                decision.outcome,
            )
        elif session is not None and decision.outcome == "refused_responder":
            session.refused.append(
                Refused(userid=msg.from_user.userid, name=msg.from_user.name, at=self._clock(), text=msg.answer[:200])
            )
            refusal = audit.person_event("refused", session, msg, self._clock(), reason="not a responder")
            await self.store.save(session, msgid=msg.msgid, audit=[refusal])
            self.events.add(session, "refused (not a responder)", by=_who(msg), chat_id=msg.chat_id)
            logger.info(
                "answer refused session_id=%s short_id=%s userid=%s: not a responder",
                session.session_id,
                session.short_id,
                msg.from_user.userid,
            )
        else:
            not_taken = self._not_taken(decision, msg)
            if msg.msgid or not_taken:
                await self.store.save(msgid=msg.msgid, audit=not_taken)
        if decision.notice is not None:
            self._notify(decision.notice)
        if session is not None and msg.card is not None and msg.reply_to:
            # The clicked card now says what was decided (or why nothing was), within WeCom's window.
            title = hints.card_title(session)
            self._notify(CardUpdate(session.session_id, msg.reply_to, title, hints.card_result(session)))

    def _not_taken(self, decision: Decision, msg: IncomingMessage) -> list[audit.AuditEvent]:
        """The audit row of a message about a question that was not taken as its answer: quoted in another chat,
        a reply that decides nothing, a click on a decided question. Messages about no question are not recorded."""
        session = decision.session
        if session is None and decision.outcome == "hint_other_chat" and msg.quoted_short_id:
            session = self.store.get_by_short_id(msg.quoted_short_id)
        if session is None:
            return []
        return [audit.person_event("refused", session, msg, self._clock(), reason=decision.outcome)]

    async def _take(self, session: Session, decision: Decision, msg: IncomingMessage) -> None:
        pick = decision.pick
        session.replies.append(_reply(msg, decision.matched_by or "quote", pick, decision.picks))
        decided = answered(session)
        now = self._clock()
        rows = [
            audit.person_event(
                "reply", session, msg, now, matched_by=decision.matched_by, choice=pick.label if pick else None
            )
        ]
        if decided and session.status in ("sending", "waiting"):
            session.status = "replied"
            session.closed_at = now
            approval = tally(session) if session.approvals_required else None
            rows.append(
                audit.question_event(
                    "decided",
                    session,
                    now,
                    choice=pick.label if pick else None,
                    approved=approval.approved if approval else None,
                    decided_by=approval.decided_by if approval else [msg.from_user.userid],
                )
            )
        await self.store.save(session, msgid=msg.msgid, audit=rows)
        label = f" choice={pick.label}" if pick else ""
        self.events.add(session, f"replied ({decision.matched_by}){label}", by=_who(msg), chat_id=msg.chat_id)
        if decided:
            self._wake(session.session_id)
        logger.info(
            "reply matched session_id=%s short_id=%s by=%s msgid=%s chat_id=%s userid=%s%s",
            session.session_id,
            session.short_id,
            decision.matched_by,
            msg.msgid,
            msg.chat_id,
            msg.from_user.userid,
            label,
        )

    # --- notices: sent by a background task so reading a callback (or a socket) never waits on WeCom ----------

    def _notify(self, notice: Notice | CardUpdate) -> None:
        try:
            self._notices.put_nowait(notice)
        except asyncio.QueueFull:
            logger.warning("notice queue full, dropping a notice: %s", type(notice).__name__)

    async def run_notices(self) -> None:
        while True:
            notice = await self._notices.get()
            kind = notice.kind if isinstance(notice, Notice) else "card_update"
            try:
                if isinstance(notice, Notice):
                    await self.channel.send_notice(notice)
                else:
                    await self.channel.update_card(notice)
                self.metrics.notice(kind, sent=True)
            except ChannelError as exc:
                self.metrics.notice(kind, sent=False)
                logger.warning("%s notice failed: %s", kind, exc)

    # --- housekeeping ------------------------------------------------------------------------------------------

    async def resolve_interrupted(self) -> None:
        """At start: questions the last run was still sending may never have reached the chat. They fail (the
        agent's poll says why) and the chat is told not to answer them."""
        for session in [s for s in self.store.all() if s.status == "sending"]:
            error = "服务在发送这个问题时重启，问题可能没有完整发出；请重新提问"
            await self._close(session, "failed", error=error, kind="interrupted")
            notice = Notice(chat_id=session.chat_id, text=hints.abandoned(session), markdown=False, kind="abandoned")
            self._notify(notice)
            logger.warning(
                "question interrupted by a restart session_id=%s short_id=%s", session.session_id, session.short_id
            )

    async def sweep(self) -> None:
        if self.store.broken is not None:
            return  # nothing can be written; recovery reloads the store first
        now = self._clock()
        for session in self.store.waiting():
            if session.deadline <= now:
                await self._close(session, "timeout")
                logger.info("session timed out session_id=%s short_id=%s", session.session_id, session.short_id)
        expired = [
            s.session_id
            for s in self.store.all()
            if s.status not in ("sending", "waiting") and (s.closed_at or s.created_at) + self.retention <= now
        ]
        if expired:
            await self.store.delete(expired)
            logger.info("purged %d closed sessions", len(expired))
        await self.store.forget_msgids(now - self.msgid_memory)
        if now - self._audit_purged_at >= AUDIT_PURGE_INTERVAL:
            self._audit_purged_at = now
            purged = await self.store.purge_audit(now - self.audit_retention)
            if purged:
                logger.info("purged %d audit rows older than HIL_AUDIT_RETENTION", purged)

    async def run_sweeper(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(StoreUnavailable):  # the store logged it; recovery reloads it
                await self.sweep()

    # --- the agent's side ------------------------------------------------------------------------------------------

    def open_questions(
        self,
        owner: str | None,
        *,
        mcp_session: str | None = None,
        chat_id: str | None = None,
        project_name: str | None = None,
        any_chat: bool = False,
    ) -> list[Session]:
        """The questions of one lane (oldest first) that the agent may still wait for: waiting, or timed out after
        the agent stopped waiting (a late answer is kept on it). What `wait_for_reply()` without an id may resume.

        A lane is one API token's (owner; None: tokens are off) questions asked in one /mcp session (`mcp_session`),
        or, outside /mcp sessions, those with this chat and project (`any_chat`: every chat and project)."""
        open_statuses = ("sending", "waiting", "timeout")

        def in_lane(s: Session) -> bool:
            if mcp_session is not None or s.mcp_session is not None:
                return s.mcp_session == mcp_session
            return any_chat or (s.chat_id == (chat_id or self.default_chat_id) and s.project_name == project_name)

        found = (s for s in self.store.all() if s.owner == owner and s.status in open_statuses and in_lane(s))
        return sorted(found, key=lambda s: s.created_at)


def _reply(
    msg: IncomingMessage, matched_by: MatchedBy, pick: Pick | None = None, picks: tuple[Pick, ...] = ()
) -> Reply:
    return Reply(
        msg_type="text" if msg.msg_type in ("text", "event") else msg.msg_type,  # type: ignore[arg-type]
        content=msg.answer,
        images=msg.image_urls,
        from_user=msg.from_user,
        timestamp=msg.received_at,
        msgid=msg.msgid,
        matched_by=matched_by,
        chat_id=msg.chat_id,
        chat_type=msg.chat_type,
        choice=Choice(index=pick.index, label=pick.label) if pick else None,
        choices=[Choice(index=p.index, label=p.label) for p in picks or ((pick,) if pick else ())],
        via="text" if msg.card is None else "button",  # a late click is a click too
    )


def _who(msg: IncomingMessage) -> str | None:
    user = msg.from_user
    if user.name and user.userid:
        return f"{user.name} ({user.userid})"
    return user.name or user.userid or None


__all__ = ["HilService", "NoMetrics", "Outcome", "ServiceMetrics"]
