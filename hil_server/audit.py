"""The audit trail: an append-only record of every decision and refusal, kept for HIL_AUDIT_RETENTION.

One `AuditEvent` per step: a question asked (by which token, to which chat, with which responders), each reply or
click taken (who, when, via), the decision, refused attempts (not a responder, another chat, a reply that decided
nothing), timeouts, the agent giving up (cancelled), failed sends and questions a restart interrupted.

Rows are written by the repository (`audit=` of each operation, as `to_item()` rows) in the same transaction as the
question change they record, so nothing acknowledged lacks its row; reading and purging are repository operations
too (`HilService.audit_rows`, the sweeper's purge), so the trail moves with the store. Rows carry the question's
`owner` (the API token's name): `GET /api/audit` shows a token only its own rows, as `/api/poll` shows it only its
own questions.

`RecentEvents` (/status) stays separate on purpose: it is a bounded, in-memory view for people watching the
service, worded for them; this is the durable record, written at the same call sites.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, computed_field

from hil_protocol.callback import IncomingMessage

from .models import Session
from .repository.base import AuditItem, AuditRow

# rows one audit query returns at most
AUDIT_LIMIT_MAX = 100_000

AuditKind = Literal[
    "asked",  # a question was stored and is being sent
    "send_failed",  # WeCom (or the relay) would not take it
    "reply",  # a person's reply or click was taken on the question
    "decided",  # the question is answered: the reply above decided it (an approval: enough approvals, or a refusal)
    "refused",  # a person's message about the question was not taken (not a responder, another chat, undecided)
    "timeout",  # its deadline passed
    "cancelled",  # the agent stopped waiting
    "reopened",  # the agent waits again on a question that had timed out
    "interrupted",  # the server restarted while sending it
]

TEXT_LIMIT = 500


class AuditEvent(BaseModel):
    seq: int | None = None  # assigned by the store, in the order rows were written
    at: float  # seconds since the epoch
    kind: AuditKind
    session_id: str | None = None
    short_id: str | None = None
    owner: str | None = None  # the API token's name (tokens off: None)
    chat_id: str | None = None  # where it happened: the question's chat, or the chat a message came from
    userid: str | None = None  # the person, for replies, clicks and refusals
    name: str | None = None
    via: str | None = None  # text | button (a person), agent, server
    detail: dict[str, Any] = Field(default_factory=dict)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def time(self) -> str:
        """`at` for people: ISO 8601 in UTC."""
        return datetime.fromtimestamp(self.at, UTC).isoformat(timespec="milliseconds")


def question_event(kind: AuditKind, session: Session, at: float, *, via: str = "server", **detail: Any) -> AuditEvent:
    """A step of the question itself (asked, timeout, cancelled, failed...)."""
    return AuditEvent(
        at=at,
        kind=kind,
        session_id=session.session_id,
        short_id=session.short_id,
        owner=session.owner,
        chat_id=session.chat_id,
        via=via,
        detail={k: v for k, v in detail.items() if v is not None},
    )


def asked(session: Session, at: float) -> AuditEvent:
    return question_event(
        "asked",
        session,
        at,
        via="agent",
        project_name=session.project_name,
        responders=session.responders,
        approvals_required=session.approvals_required,
        options=session.options,
        allow_text=session.allow_text,
        deadline=session.deadline,
        text=session.message[:TEXT_LIMIT],
    )


def person_event(kind: AuditKind, session: Session, msg: IncomingMessage, at: float, **detail: Any) -> AuditEvent:
    """What a person did about a question: a reply or click taken, or refused."""
    return AuditEvent(
        at=at,
        kind=kind,
        session_id=session.session_id,
        short_id=session.short_id,
        owner=session.owner,
        chat_id=msg.chat_id,
        userid=msg.from_user.userid or None,
        name=msg.from_user.name or None,
        via="button" if msg.card is not None else "text",
        detail={
            "msgid": msg.msgid,
            "text": msg.answer[:TEXT_LIMIT],
            "received_at": msg.received_at,
            **{k: v for k, v in detail.items() if v is not None},
        },
    )


def to_item(event: AuditEvent) -> AuditItem:
    """The repository's row for an event (`at` is the operation's time, given with it)."""
    data = {"name": event.name, "via": event.via, "detail": event.detail}
    return AuditItem(
        kind=event.kind,
        question_id=event.session_id,
        short_id=event.short_id,
        chat_id=event.chat_id,
        owner=event.owner,
        actor=event.userid,
        data={k: v for k, v in data.items() if v is not None},
    )


def from_row(row: AuditRow) -> AuditEvent:
    return AuditEvent(
        seq=row.id,
        at=row.at,
        kind=row.kind,  # type: ignore[arg-type]
        session_id=row.question_id,
        short_id=row.short_id,
        owner=row.owner,
        chat_id=row.chat_id,
        userid=row.actor,
        name=row.data.get("name"),
        via=row.data.get("via"),
        detail=row.data.get("detail") or {},
    )


def parse_since(raw: str | None) -> float | None:
    """`since` as the API and the CLI take it: seconds since the epoch, or an ISO 8601 date/time (UTC when it names
    no zone). Raises ValueError with a sentence for anything else."""
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            raise ValueError(
                "since: give seconds since the epoch or an ISO 8601 time such as 2026-01-31T08:00:00+08:00"
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    if not math.isfinite(value) or value < 0:
        raise ValueError("since: seconds since the epoch must be a finite number, 0 or more")
    return value


def json_lines(events: list[AuditEvent]) -> str:
    return "".join(event.model_dump_json() + "\n" for event in events)


__all__ = [
    "AUDIT_LIMIT_MAX",
    "AuditEvent",
    "AuditKind",
    "asked",
    "from_row",
    "json_lines",
    "parse_since",
    "person_event",
    "question_event",
    "to_item",
]
