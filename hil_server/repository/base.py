"""What the service does with questions, as operations that are atomic in the database (the shape of httpx's
`_transports/base.py`: one interface, backends beside it).

Every write is one transaction. Operations that change a question take `outbox=` and `audit=` rows, written in the
same transaction, so a change and what the robot must say about it (and the record of it) land together or not at
all. A conditional change (`transition`, the close in `record_reply`) says whether it won: the guard is the
lifecycle's (`lifecycle.sources(target)`), evaluated by the database, so two processes racing cannot both win.
Replies are rows, never a rewritten whole-question blob: two approvers, or a reply racing the sweeper, cannot lose
each other's writes. After a change commits the repository rings its notifier with the question's id (PostgreSQL:
`pg_notify` inside the transaction), and `outbox_key(id)` when an outbox row is done, failed or abandoned.

Times are epoch seconds passed in by the caller (`now=`), so the service's clock decides and tests need no sleeps.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import Field

from ..lifecycle import Status, Timer, Timers
from ..models import Refused, Reply, Session

# How many short ids `create_question` tries before it gives up with ShortIdExhausted (8 hex characters: a
# collision among open questions is rare; twenty in a row means the generator is broken).
SHORT_ID_ATTEMPTS = 20
# The notifier key for the drainers: a new outbox row is there to claim.
OUTBOX_KEY = "outbox"


def outbox_key(outbox_id: int) -> str:
    """The notifier key rung when an outbox row is done, failed or abandoned (`/api/send` waits on its question's)."""
    return f"outbox:{outbox_id}"


class StoredQuestion(Session):
    """A question as the repository holds it: a `Session` (what the service, matching and hints read) whose status
    is the lifecycle's, with its timers."""

    status: Status = Status.WAITING  # type: ignore[assignment]
    next_remind_at: float | None = None
    reminders_sent: int = 0
    escalate_at: float | None = None
    answers: int = Field(default=0, exclude=True)  # replies + refused rows, for callers that count

    @property
    def timers(self) -> Timers:
        return Timers(self.deadline, self.next_remind_at, self.reminders_sent, self.escalate_at)


# Columns of the questions table besides `data` (the rest of the question, JSON, written once at creation).
COLUMNS = (
    "id",
    "short_id",
    "chat_id",
    "owner",
    "status",
    "created_at",
    "deadline",
    "closed_at",
    "error",
    "next_remind_at",
    "reminders_sent",
    "escalate_at",
)
_FIELD_OF = {"id": "session_id"}
_NOT_IN_DATA = {_FIELD_OF.get(c, c) for c in COLUMNS} | {"replies", "refused", "answers"}


def question_row(question: Session) -> dict[str, Any]:
    """The columns (and `data`) to insert for a new question."""
    stored = question if isinstance(question, StoredQuestion) else StoredQuestion.model_validate(question.model_dump())
    values = stored.model_dump(mode="json")
    row = {c: values[_FIELD_OF.get(c, c)] for c in COLUMNS}
    row["data"] = json.dumps({k: v for k, v in values.items() if k not in _NOT_IN_DATA}, ensure_ascii=False)
    return row


def question_from(row: Mapping[str, Any], answers: Sequence[tuple[str, str]] = ()) -> StoredQuestion:
    """A question from its row and its answer rows (kind, data JSON), oldest first."""
    values: dict[str, Any] = json.loads(row["data"])
    values.update({_FIELD_OF.get(c, c): row[c] for c in COLUMNS})
    values["replies"] = [json.loads(data) for kind, data in answers if kind == "reply"]
    values["refused"] = [json.loads(data) for kind, data in answers if kind == "refused"]
    values["answers"] = len(answers)
    return StoredQuestion.model_validate(values)


def answer_data(answer: Reply | Refused) -> str:
    return answer.model_dump_json()


def with_unclear(data: str, reply: Reply, keep: int) -> str:
    """A question's `data` JSON with `reply` added to its undecided replies (the newest `keep`)."""
    values = json.loads(data)
    values["unclear"] = [*values.get("unclear", []), json.loads(reply.model_dump_json())][-keep:]
    return json.dumps(values, ensure_ascii=False)


def with_answer(question: StoredQuestion, kind: str, answer: Reply | Refused) -> StoredQuestion:
    """`question` as it is once `answer` is added (what a re-read would give, without one)."""
    if kind == "reply":
        update: dict[str, Any] = {"replies": [*question.replies, answer]}
    else:
        update = {"refused": [*question.refused, answer]}
    return question.model_copy(update={**update, "answers": question.answers + 1})


@dataclass(frozen=True)
class OutboxItem:
    """Something the robot must say (a question, a notice, a hint, a card update), as the channel will send it.
    Rows of one chat are claimed in order: a row waits while an older one of its chat is pending or claimed."""

    kind: str
    payload: Mapping[str, Any]
    chat_id: str | None = None
    question_id: str | None = None
    available_at: float | None = None  # not before (pacing, retries); None: now


OutboxState = Literal["pending", "claimed", "done", "failed", "abandoned"]


@dataclass(frozen=True)
class OutboxRow:
    id: int
    kind: str
    payload: dict[str, Any]
    chat_id: str | None
    question_id: str | None
    state: OutboxState
    created_at: float
    available_at: float
    attempts: int
    holder: str | None
    lease_until: float | None
    error: str | None


@dataclass(frozen=True)
class AuditItem:
    """One line of the audit trail: who did what to which question, where."""

    kind: str
    question_id: str | None = None
    short_id: str | None = None
    chat_id: str | None = None
    owner: str | None = None
    actor: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


def audit_about(item: AuditItem, question: Session) -> AuditItem:
    """`item`, naming `question` where it names nothing else."""
    return dataclasses.replace(
        item,
        question_id=item.question_id or question.session_id,
        short_id=item.short_id or question.short_id,
        chat_id=item.chat_id or question.chat_id,
        owner=item.owner or question.owner,
    )


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: float
    kind: str
    question_id: str | None
    short_id: str | None
    chat_id: str | None
    owner: str | None
    actor: str | None
    data: dict[str, Any]


@dataclass(frozen=True)
class ReplyResult:
    """What `record_reply` / `record_refused` did. `new` is False for a msgid already recorded (nothing was written;
    `question` is None then). `closed`: this reply closed the question (it won the race to close it)."""

    new: bool
    closed: bool = False
    question: StoredQuestion | None = None


@dataclass(frozen=True)
class Purged:
    questions: int = 0
    msgids: int = 0
    outbox: int = 0
    audit: int = 0


# Decides, inside the reply's transaction and with every reply recorded so far, whether the question is answered
# (e.g. `approvals.answered`). Pure and quick: it runs while the question's row is locked (SQLite: in the writer).
CloseRule = Callable[[StoredQuestion], bool]


class Repository(Protocol):
    # --- life ---
    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise RepositoryUnavailable unless a write would succeed now."""
        ...

    # --- questions ---
    async def create_question(
        self, question: Session, *, outbox: Sequence[OutboxItem] = (), audit: Sequence[AuditItem] = ()
    ) -> StoredQuestion:
        """Store a new question with a short id unique among open questions (the database's partial unique index;
        the repository's generator picks it, `question.short_id` is ignored). `outbox` rows may name the question
        as `question_id=None`: they get the new question's id. Raises ShortIdExhausted, Conflict (same id)."""
        ...

    async def get(self, question_id: str) -> StoredQuestion | None: ...

    async def find(self, ref: str) -> StoredQuestion | None:
        """By question id, or by short id: the open question holding it, else the newest that held it."""
        ...

    async def transition(
        self,
        question_id: str,
        target: Status,
        *,
        now: float,
        error: str | None = None,
        deadline: float | None = None,
        outbox: Sequence[OutboxItem] = (),
        audit: Sequence[AuditItem] = (),
    ) -> StoredQuestion | None:
        """Move the question to `target` if the lifecycle allows it from its current status (a conditional update).
        Returns the question as changed, or None when it lost (or does not exist): then nothing was written, not
        the outbox rows or audit rows either. Closing sets closed_at=now; reopening clears it; `deadline` replaces
        the deadline. Raises Conflict when reopening finds its short id held by another open question."""
        ...

    async def record_reply(
        self,
        question_id: str,
        reply: Reply,
        *,
        now: float,
        close: CloseRule | None = None,
        outbox: Sequence[OutboxItem] = (),
        audit: Sequence[AuditItem] = (),
        closing_audit: Callable[[StoredQuestion], Sequence[AuditItem]] | None = None,
    ) -> ReplyResult:
        """Add a reply (kept whatever the status: a late answer too) and record its msgid, in one transaction. A msgid
        recorded before: nothing happens (`new=False`). With `close`, the question becomes `replied` when it is open
        and `close(question with this reply)` says so; then `closing_audit(question)` rows are written too (the record
        of the decision, with every reply the close rule saw). Raises NotFound."""
        ...

    async def record_refused(
        self,
        question_id: str,
        refused: Refused,
        *,
        now: float,
        msgid: str | None = None,
        outbox: Sequence[OutboxItem] = (),
        audit: Sequence[AuditItem] = (),
    ) -> ReplyResult:
        """Keep an answer that was not taken (not a responder), with its msgid; a duplicate msgid does nothing."""
        ...

    async def record_unclear(
        self, question_id: str, reply: Reply, *, now: float, keep: int, audit: Sequence[AuditItem] = ()
    ) -> ReplyResult:
        """Keep a reply that decided nothing on the question (`Session.unclear`, the newest `keep`), with its msgid,
        whatever the question's status; a duplicate msgid does nothing. Raises NotFound."""
        ...

    async def record_msgid(
        self, msgid: str, *, now: float, outbox: Sequence[OutboxItem] = (), audit: Sequence[AuditItem] = ()
    ) -> bool:
        """Remember a msgid that answered nothing (a hint's cause); False (and nothing written) when already seen."""
        ...

    async def set_timers(
        self,
        question_id: str,
        *,
        now: float,
        next_remind_at: float | None = None,
        reminders_sent: int | None = None,
        escalate_at: float | None = None,
        outbox: Sequence[OutboxItem] = (),
        audit: Sequence[AuditItem] = (),
    ) -> bool:
        """Set the reminder / escalation timers of a question that still waits (timers run only then)."""
        ...

    async def open_in_chat(self, chat_id: str | None) -> list[StoredQuestion]:
        """Questions a plain reply in this chat may answer (lifecycle.MATCHABLE), oldest first; a question sent
        without a chat id belongs to every chat."""
        ...

    async def due(self, now: float, timer: Timer = Timer.DEADLINE, limit: int = 100) -> list[StoredQuestion]:
        """Questions whose `timer` has fired (lifecycle.TIMED statuses only), earliest first."""
        ...

    async def newest_open(self, owner: str | None) -> StoredQuestion | None:
        """The newest question of `owner` (None: no owner) an agent may still wait for (lifecycle.AWAITABLE)."""
        ...

    async def questions(self, *, statuses: Sequence[Status] | None = None, limit: int = 200) -> list[StoredQuestion]:
        """Newest first (the status page)."""
        ...

    async def counts(self) -> dict[Status, int]: ...

    async def purge(
        self,
        *,
        closed_before: float,
        msgids_before: float,
        outbox_before: float | None = None,
        audit_before: float | None = None,
    ) -> Purged:
        """Delete closed questions (with their replies) closed before `closed_before`, msgids seen before
        `msgids_before`, finished outbox rows before `outbox_before`, audit rows before `audit_before`."""
        ...

    # --- outbox ---
    async def enqueue(self, items: Sequence[OutboxItem], *, now: float) -> list[int]: ...

    async def claim_outbox(
        self, holder: str, *, now: float, lease: float, limit: int = 1, kinds: Sequence[str] | None = None
    ) -> list[OutboxRow]:
        """Claim up to `limit` available rows for `holder` until `now + lease`, oldest first, one per chat at a time
        (a row waits while an older row of its chat is pending or claimed). Two claimers never get the same row."""
        ...

    async def extend_claim(self, outbox_id: int, holder: str, *, now: float, lease: float) -> bool: ...

    async def complete_outbox(
        self, outbox_id: int, holder: str, *, now: float, audit: Sequence[AuditItem] = ()
    ) -> bool:
        """Mark a claimed row done; False when `holder` no longer holds it (its lease was abandoned)."""
        ...

    async def fail_outbox(
        self, outbox_id: int, holder: str, *, now: float, error: str, retry_at: float | None = None
    ) -> bool:
        """A claimed row could not be sent: pending again from `retry_at`, or failed for good when None."""
        ...

    async def expired_claims(self, now: float, limit: int = 100) -> list[OutboxRow]:
        """Claimed rows whose lease ran out: their holder died or hung; the send may or may not have happened."""
        ...

    async def abandon_claim(
        self,
        outbox_id: int,
        *,
        now: float,
        error: str,
        outbox: Sequence[OutboxItem] = (),
        audit: Sequence[AuditItem] = (),
    ) -> bool:
        """Resolve an expired claim as `abandoned` (never sent again), if it still is one: only one resolver wins."""
        ...

    async def get_outbox(self, outbox_id: int) -> OutboxRow | None: ...

    # --- audit ---
    async def append_audit(self, items: Sequence[AuditItem], *, now: float) -> None: ...

    async def audit(
        self,
        *,
        since: float | None = None,
        chat_id: str | None = None,
        owner: str | None = None,
        question_id: str | None = None,
        limit: int = 1000,
    ) -> list[AuditRow]:
        """Audit rows at or after `since`, oldest first, filtered by chat, owner or question."""
        ...


__all__ = [
    "OUTBOX_KEY",
    "SHORT_ID_ATTEMPTS",
    "AuditItem",
    "AuditRow",
    "CloseRule",
    "OutboxItem",
    "OutboxRow",
    "Purged",
    "ReplyResult",
    "Repository",
    "StoredQuestion",
    "outbox_key",
]
