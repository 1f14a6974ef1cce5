"""The heart of the HIL Server: create questions, hand what people send to the matching rules, answer polls.

A question is `sending` until its channel accepted it, then `waiting` until a person answers (`replied`), the agent
stops waiting or its deadline passes (`timeout`), or it could not be delivered (`failed`). A question that is
`sending` when the server dies is resolved at the next start (`failed`, with a notice in the chat), so no question
waits that no person was shown.

The repository is the truth: the service holds no session across an await as its truth. A message is matched on
what `_view()` reads for it (the question a click or a quote names, the questions waiting in its chat), and the
outcome is one repository operation whose conditional write says whether it won: a msgid recorded before means
nothing happens ("duplicate"), a reply closes its question only if it is still open. Held polls wake through the
notifier and re-read every `recheck` seconds. While the database cannot take writes (`broken`), callbacks and polls
are refused with StoreUnavailable (503) until a ping succeeds (`run_recovery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from hil_protocol.callback import IncomingMessage
from hil_protocol.messages import new_short_id
from hil_protocol.outbound import CardUpdate, Notice, Question

from . import audit, hints
from .approvals import answered, tally
from .channels import Channel, ChannelError
from .choices import APPROVAL_OPTIONS, Pick
from .errors import InvalidRequest
from .events import RecentEvents
from .lifecycle import AWAITABLE, Status, Timer, reopened_deadline
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
from .notifier import LocalNotifier, Notifier
from .repository import AuditItem, Conflict, Repository, RepositoryUnavailable, StoredQuestion

# The service's one "the database cannot take it now" (callbacks 503, /health degraded).
StoreUnavailable = RepositoryUnavailable
T = TypeVar("T")

logger = logging.getLogger(__name__)

POLL_WAIT_MAX = 60.0
# A question the agent waits on again (wait_for_reply after a timeout) stays open this long past the held poll,
# so the next poll of the same wait finds it still waiting.
REOPEN_GRACE = 5.0
# The audit trail is purged of rows past HIL_AUDIT_RETENTION at most this often (seconds).
AUDIT_PURGE_INTERVAL = 3600.0
# A held poll re-reads its question this often (seconds) even when no wake-up came: a lost one costs this, no more.
WAIT_RECHECK = 2.0
# Questions one listing reads at most (open questions of a lane, the status page), and timeouts one sweep step takes.
LIST_LIMIT = 10_000
SWEEP_BATCH = 500


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
    """The service on a `Repository` (the truth: every read goes to it, every change is one of its atomic
    operations) and a `Notifier` that rings when a question changes (held polls wake on it, and re-read every
    `recheck` seconds so a lost ring costs seconds, never an answer)."""

    def __init__(
        self,
        repo: Repository,
        channel: Channel,
        *,
        notifier: Notifier | None = None,
        metrics: ServiceMetrics | None = None,
        events: RecentEvents | None = None,
        default_timeout: float = 1200.0,
        retention: float = 24 * 3600.0,
        msgid_memory: float = 300.0,
        default_chat_id: str | None = None,
        default_responders: tuple[str, ...] = (),
        clock: Callable[[], float] = time.time,
        audit_retention: float = 180 * 86400.0,
        recheck: float = WAIT_RECHECK,
    ) -> None:
        self.audit_retention = audit_retention
        self._audit_purged_at = -math.inf
        self.repo = repo
        self.notifier: Notifier = notifier or LocalNotifier()
        self.channel = channel
        self.metrics: ServiceMetrics = metrics or NoMetrics()
        self.events = events or RecentEvents(clock=clock)
        self.default_timeout = default_timeout
        self.retention = retention
        # msgids are remembered at least as long as a signed callback may be replayed, whatever the retention
        self.msgid_memory = max(retention, msgid_memory)
        self.default_chat_id = default_chat_id
        self.default_responders = tuple(distinct_responders(default_responders))
        self.recheck = recheck
        self._clock = clock
        self._notices: asyncio.Queue[Notice | CardUpdate] = asyncio.Queue(maxsize=1000)
        self.broken: str | None = None  # why the database takes no writes, while it does not (/health, 503s)
        self.waiting_count = 0  # questions waiting, as of the last count (the metrics gauge)

    # --- the repository, with its outages noticed ---------------------------------------------------------------

    async def _db(self, operation: Awaitable[T]) -> T:
        """Await a repository operation; when the database cannot take it, say so (/health) until it recovers."""
        try:
            return await operation
        except RepositoryUnavailable as exc:
            if self.broken is None:
                logger.error("the database cannot take writes, refusing them until it does again: %s", exc)
            self.broken = str(exc)[:300] or type(exc).__name__
            raise

    def _check_writable(self) -> None:
        if self.broken is not None:
            raise StoreUnavailable(self.broken)

    async def recover(self) -> bool:
        """When broken: take writes again once the database does."""
        if self.broken is None:
            return True
        try:
            await self.repo.ping()
        except RepositoryUnavailable as exc:
            logger.warning("store still unavailable: %s", exc)
            return False
        logger.warning("the database takes writes again")
        self.broken = None
        return True

    async def run_recovery(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.broken is not None:
                await self.recover()

    async def find(self, ref: str) -> Session | None:
        """A question by its session id or its short id (the open one holding it, else the newest)."""
        if not ref:
            return None
        return await self._db(self.repo.find(ref))

    async def get(self, session_id: str) -> Session | None:
        return await self._db(self.repo.get(session_id))

    async def waiting(self) -> list[Session]:
        """Questions waiting for a person, oldest first (the status page)."""
        found = await self._db(self.repo.questions(statuses=[Status.WAITING], limit=LIST_LIMIT))
        return sorted(found, key=lambda s: s.created_at)

    async def audit_rows(
        self, since: float | None = None, chat_id: str | None = None, owner: str | None = None, limit: int = 10_000
    ) -> list[audit.AuditEvent]:
        """The audit trail, oldest first: rows at or after `since`, in `chat_id`, of `owner` (None: anyone's)."""
        limit = max(1, min(limit, audit.AUDIT_LIMIT_MAX))
        rows = await self._db(self.repo.audit(since=since, chat_id=chat_id, owner=owner, limit=limit))
        return [audit.from_row(row) for row in rows]

    async def _audit(self, *events: audit.AuditEvent) -> None:
        await self._db(self.repo.append_audit([audit.to_item(e) for e in events], now=self._clock()))

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
                await self._audit(
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

        self._check_writable()
        now = self._clock()
        draft = Session(
            session_id=uuid.uuid4().hex,
            short_id=new_short_id(),  # the repository picks one free among open questions
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
        asked = dataclasses.replace(audit.to_item(audit.asked(draft, now)), short_id=None)
        session: Session = await self._db(self.repo.create_question(draft, audit=[asked]))
        short_id = session.short_id
        try:
            await self.channel.send_question(
                dataclasses.replace(
                    question, short_id=short_id, card_id=session.session_id, expires_at=session.deadline
                )
            )
        except ChannelError as exc:
            await self._close(session, Status.FAILED, error=str(exc))
            logger.warning("send failed session_id=%s short_id=%s: %s", session.session_id, short_id, exc)
            return SendResponse(
                success=False,
                session_id=session.session_id,
                short_id=short_id,
                message=f"发送失败：{exc}",
                error=str(exc),
                errcode=exc.errcode,
            )
        # Only a question still `sending` becomes `waiting`: a fast quote-reply may have answered it already.
        await self._db(self.repo.transition(session.session_id, Status.WAITING, now=self._clock()))
        logger.info("question sent session_id=%s short_id=%s chat_id=%s", session.session_id, short_id, chat_id)
        return SendResponse(
            success=True, session_id=session.session_id, short_id=short_id, message="消息已发送，等待回复"
        )

    async def poll(self, session: Session, wait: float = 0.0) -> PollResponse:
        """The session's state; with `wait`, held until a reply arrives or `wait` seconds pass. Waiting again on a
        question that timed out opens it again for as long as the wait lasts, so plain replies match it too."""
        self._check_writable()
        self.metrics.poll(held=wait > 0)
        wait = max(0.0, min(wait, POLL_WAIT_MAX))
        if wait and not answered(session) and session.status in AWAITABLE:
            loop = asyncio.get_running_loop()
            until = loop.time() + wait
            # Subscribe, then read: a change between the read and the wait still rings.
            async with self.notifier.subscribe(session.session_id) as ring:
                if session.status == Status.TIMEOUT:  # the agent waits again on what had timed out (not on what
                    session = await self._reopen(session, wait) or session  # times out while this poll starts)
                session = await self.get(session.session_id) or session
                while not _settled(session) and (left := until - loop.time()) > 0:
                    await ring.wait(min(left, self.recheck))
                    session = await self.get(session.session_id) or session
        return self._poll_response(session)

    async def _reopen(self, session: Session, wait: float) -> Session | None:
        now = self._clock()
        row = audit.to_item(audit.question_event("reopened", session, now, via="agent"))
        try:
            reopened = await self._db(
                self.repo.transition(
                    session.session_id,
                    Status.WAITING,
                    now=now,
                    deadline=reopened_deadline(session.deadline, now, wait, REOPEN_GRACE),
                    audit=[row],
                )
            )
        except Conflict:  # its short id went to a newer open question: it stays timed out (quote-replies name it)
            return None
        if reopened is not None:
            logger.info("waiting again session_id=%s short_id=%s", session.session_id, session.short_id)
        return reopened

    def _poll_response(self, session: Session) -> PollResponse:
        approval = tally(session) if session.approvals_required else None
        status = "replied" if answered(session, approval) else str(session.status)
        messages = {
            "sending": "发送中，等待回复",
            "waiting": "等待回复中",
            "replied": "已收到回复",
            "timeout": "等待超时",
            "failed": f"发送失败：{session.error}",
            "cancelled": "已取消",
        }
        return PollResponse(
            session_id=session.session_id,
            short_id=session.short_id,
            # Clients know waiting|replied|timeout|failed: a question still being sent is waiting to them.
            status="waiting" if status == "sending" else "timeout" if status == "cancelled" else status,
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
            closed = await self._close(session, Status.TIMEOUT, kind="cancelled", outcome="stopped (agent)")
            if closed is not None:
                logger.info("agent stopped waiting session_id=%s short_id=%s", session.session_id, session.short_id)

    async def _close(
        self,
        session: Session,
        status: Status,
        error: str | None = None,
        kind: audit.AuditKind | None = None,
        *,
        outcome: str | None = None,
    ) -> Session | None:
        """Close the question if it is still open (the database decides); the closed question, or None (lost)."""
        now = self._clock()
        kind = kind or {Status.REPLIED: "decided", Status.TIMEOUT: "timeout", Status.FAILED: "send_failed"}[status]
        via = "agent" if kind == "cancelled" else "server"
        row = audit.to_item(audit.question_event(kind, session, now, via=via, error=error))
        closed = await self._db(self.repo.transition(session.session_id, status, now=now, error=error, audit=[row]))
        if closed is not None:
            self.events.add(closed, outcome or str(status))
        return closed

    # --- what people send --------------------------------------------------------------------------------------

    async def handle_message(self, msg: IncomingMessage) -> Outcome:
        """Match one message and make the outcome durable before returning. Raises StoreUnavailable."""
        self._check_writable()
        view = await self._view(msg)
        decision = decide(msg, view)
        outcome = await self._apply(decision, msg, view)
        self.metrics.callback(outcome, decision.matched_by if outcome == decision.outcome else None)
        if decision.session is None:  # a match logs its own line, with the session
            logger.info(
                "message msgid=%s chat_id=%s quoted=%s outcome=%s",
                msg.msgid,
                msg.chat_id,
                msg.quoted_short_id,
                outcome,
            )
        return outcome

    async def _view(self, msg: IncomingMessage) -> MatchView:
        """What `decide()` reads for this message, read from the repository. Duplicate msgids are not read here:
        the apply step's write finds them (a unique key), so two deliveries racing cannot both be taken."""
        if msg.card is not None:
            found = await self.get(msg.card.task_id)
            return MatchView(by_id={found.session_id: found} if found else {})
        if msg.is_event or (not msg.answer and not msg.image_urls):
            return MatchView()
        if msg.quoted_short_id:
            found = await self.find(msg.quoted_short_id)
            return MatchView(by_short={found.short_id: found} if found else {})
        return MatchView(open_in_chat=await self._db(self.repo.open_in_chat(msg.chat_id)))

    async def _apply(self, decision: Decision, msg: IncomingMessage, view: MatchView) -> Outcome:
        """Make the decision durable in one repository operation; "duplicate" when its msgid was recorded before
        (then nothing was written and nothing is said)."""
        if decision.outcome == "duplicate":
            return "duplicate"
        session = decision.session
        now = self._clock()
        if session is not None and decision.matched_by is not None:
            changed = await self._take(session, decision, msg)
        elif session is not None and decision.kept_by is not None:
            # Decided nothing ("好的，先不要"): kept for the agent to read, not an answer; the question keeps waiting.
            reply = _reply(msg, decision.kept_by)
            undecided = audit.to_item(audit.person_event("refused", session, msg, now, reason=decision.outcome))
            kept = await self._db(
                self.repo.record_unclear(session.session_id, reply, now=now, keep=UNCLEAR_KEPT, audit=[undecided])
            )
            if not kept.new:
                return "duplicate"
            changed = kept.question
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
            refused = Refused(userid=msg.from_user.userid, name=msg.from_user.name, at=now, text=msg.answer[:200])
            row = audit.to_item(audit.person_event("refused", session, msg, now, reason="not a responder"))
            result = await self._db(
                self.repo.record_refused(session.session_id, refused, now=now, msgid=msg.msgid, audit=[row])
            )
            if not result.new:
                return "duplicate"
            changed = result.question
            self.events.add(session, "refused (not a responder)", by=_who(msg), chat_id=msg.chat_id)
            logger.info(
                "answer refused session_id=%s short_id=%s userid=%s: not a responder",
                session.session_id,
                session.short_id,
                msg.from_user.userid,
            )
        else:
            changed = session
            rows = [audit.to_item(e) for e in self._not_taken(decision, msg, view)]
            if msg.msgid:
                if not await self._db(self.repo.record_msgid(msg.msgid, now=now, audit=rows)):
                    return "duplicate"
            elif rows:
                await self._db(self.repo.append_audit(rows, now=now))
        if session is not None and changed is None:  # a question's write found the msgid recorded before
            return "duplicate"
        if decision.notice is not None:
            self._notify(decision.notice)
        if changed is not None and msg.card is not None and msg.reply_to:
            # The clicked card now says what was decided (or why nothing was), within WeCom's window.
            title = hints.card_title(changed)
            self._notify(CardUpdate(changed.session_id, msg.reply_to, title, hints.card_result(changed)))
        return decision.outcome

    def _not_taken(self, decision: Decision, msg: IncomingMessage, view: MatchView) -> list[audit.AuditEvent]:
        """The audit row of a message about a question that was not taken as its answer: quoted in another chat,
        a reply that decides nothing, a click on a decided question. Messages about no question are not recorded."""
        session = decision.session
        if session is None and decision.outcome == "hint_other_chat" and msg.quoted_short_id:
            session = view.get_by_short_id(msg.quoted_short_id)
        if session is None:
            return []
        return [audit.person_event("refused", session, msg, self._clock(), reason=decision.outcome)]

    async def _take(self, session: Session, decision: Decision, msg: IncomingMessage) -> Session | None:
        """Record the reply; it closes the question if it decides it and the question is still open (one
        conditional write: a reply racing the sweeper or another approver cannot lose either). None: a duplicate."""
        pick = decision.pick
        now = self._clock()
        row = audit.person_event(
            "reply", session, msg, now, matched_by=decision.matched_by, choice=pick.label if pick else None
        )
        reply = _reply(msg, decision.matched_by or "quote", pick, decision.picks)

        def decided(question: StoredQuestion) -> list[AuditItem]:
            # run inside the reply's transaction, with every reply the close rule saw
            approval = tally(question) if question.approvals_required else None
            event = audit.question_event(
                "decided",
                question,
                now,
                choice=pick.label if pick else None,
                approved=approval.approved if approval else None,
                decided_by=approval.decided_by if approval else [msg.from_user.userid],
            )
            return [audit.to_item(event)]

        result = await self._db(
            self.repo.record_reply(
                session.session_id,
                reply,
                now=now,
                close=_decides,
                audit=[audit.to_item(row)],
                closing_audit=decided,
            )
        )
        if not result.new or result.question is None:
            return None
        taken = result.question
        label = f" choice={pick.label}" if pick else ""
        self.events.add(taken, f"replied ({decision.matched_by}){label}", by=_who(msg), chat_id=msg.chat_id)
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
        return taken

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
        sending = await self._db(self.repo.questions(statuses=[Status.SENDING], limit=LIST_LIMIT))
        for session in sending:
            error = "服务在发送这个问题时重启，问题可能没有完整发出；请重新提问"
            if await self._close(session, Status.FAILED, error=error, kind="interrupted") is None:
                continue
            notice = Notice(chat_id=session.chat_id, text=hints.abandoned(session), markdown=False, kind="abandoned")
            self._notify(notice)
            logger.warning(
                "question interrupted by a restart session_id=%s short_id=%s", session.session_id, session.short_id
            )

    async def sweep(self) -> None:
        if self.broken is not None:
            return  # nothing can be written; recovery says when it can again
        now = self._clock()
        while due := await self._db(self.repo.due(now, Timer.DEADLINE, limit=SWEEP_BATCH)):
            for session in due:
                if await self._close(session, Status.TIMEOUT) is not None:
                    logger.info("session timed out session_id=%s short_id=%s", session.session_id, session.short_id)
            if len(due) < SWEEP_BATCH:
                break
        audit_before = None
        if now - self._audit_purged_at >= AUDIT_PURGE_INTERVAL:
            self._audit_purged_at = now
            audit_before = now - self.audit_retention
        purged = await self._db(
            self.repo.purge(
                # closed at or before now - retention (the repository deletes strictly before its bound)
                closed_before=math.nextafter(now - self.retention, math.inf),
                msgids_before=now - self.msgid_memory,
                audit_before=audit_before,
            )
        )
        if purged.questions:
            logger.info("purged %d closed sessions", purged.questions)
        if purged.audit:
            logger.info("purged %d audit rows older than HIL_AUDIT_RETENTION", purged.audit)
        await self.count_waiting()

    async def count_waiting(self) -> int:
        """Count the questions waiting now (kept as `waiting_count` for the metrics gauge)."""
        with contextlib.suppress(StoreUnavailable):  # the database is down: the last count stands
            self.waiting_count = (await self._db(self.repo.counts())).get(Status.WAITING, 0)
        return self.waiting_count

    async def run_sweeper(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(StoreUnavailable):  # logged; recovery says when it can write again
                await self.sweep()

    # --- the agent's side ------------------------------------------------------------------------------------------

    async def open_questions(
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

        def in_lane(s: Session) -> bool:
            if mcp_session is not None or s.mcp_session is not None:
                return s.mcp_session == mcp_session
            return any_chat or (s.chat_id == (chat_id or self.default_chat_id) and s.project_name == project_name)

        awaitable = await self._db(self.repo.questions(statuses=sorted(AWAITABLE), limit=LIST_LIMIT))
        found = (s for s in awaitable if s.owner == owner and in_lane(s))
        return sorted(found, key=lambda s: s.created_at)


@dataclasses.dataclass
class MatchView:
    """What `matching.decide()` reads about one message, read from the repository just before."""

    by_id: dict[str, Session] = dataclasses.field(default_factory=dict)
    by_short: dict[str, Session] = dataclasses.field(default_factory=dict)
    open_in_chat: list[Session] = dataclasses.field(default_factory=list)

    def seen_msgid(self, msgid: str) -> bool:
        return False  # the apply step's write decides (a unique key)

    def get(self, session_id: str) -> Session | None:
        return self.by_id.get(session_id)

    def get_by_short_id(self, short_id: str) -> Session | None:
        return self.by_short.get(short_id)

    def waiting_in_chat(self, chat_id: str) -> list[Session]:
        return self.open_in_chat


def _settled(session: Session) -> bool:
    """Nothing more for a held poll to wait for: answered, or closed."""
    return answered(session) or session.status not in ("sending", "waiting")


def _decides(question: StoredQuestion) -> bool:
    """The close rule `record_reply` applies with every reply recorded so far (an approval: enough of them)."""
    return answered(question)


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


__all__ = ["HilService", "MatchView", "NoMetrics", "Outcome", "ServiceMetrics", "StoreUnavailable"]
