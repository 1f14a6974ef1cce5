"""A question's lifecycle, in one place and without I/O (the shape of python-websockets' `protocol.py`): its
statuses, which of them are open, which transitions are allowed, and the timers that drive it. The repositories
turn `sources(target)` into the `WHERE status IN (…)` of their conditional updates, so the rule that decides whether
a change wins is this module's, whichever database applies it.

    sending ──► waiting ──► replied
       │  ╲        │  ╲
       │   ╲       │   ► timeout ──► waiting   (the agent waits again: reopened)
       │    ► replied (a quote-reply that came back before the last part was sent)
       └──► failed / timeout / cancelled       waiting ──► failed / cancelled

`sending` until the channel accepted the question (a person may not have seen it yet; polls show it as waiting);
`waiting` until a person answers (`replied`), the deadline passes or the agent stops waiting (`timeout`), it could
not be delivered (`failed`), or it was withdrawn (`cancelled`). `replied`, `failed` and `cancelled` are final; a
timed-out question opens again when its agent waits on it again (a late answer is kept on it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.StrEnum):
    SENDING = "sending"
    WAITING = "waiting"
    REPLIED = "replied"
    TIMEOUT = "timeout"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Open: a person may still be asked. Only open questions hold their short id (the databases' partial unique index).
OPEN: frozenset[Status] = frozenset({Status.SENDING, Status.WAITING})
CLOSED: frozenset[Status] = frozenset(Status) - OPEN
FINAL: frozenset[Status] = frozenset({Status.REPLIED, Status.FAILED, Status.CANCELLED})
# A plain (unquoted) reply may answer only a question people were shown and that still waits.
MATCHABLE: frozenset[Status] = frozenset({Status.WAITING})
# What an agent may still wait for (wait_for_reply without an id): open, or timed out and so able to reopen.
AWAITABLE: frozenset[Status] = OPEN | {Status.TIMEOUT}

_TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.SENDING: frozenset({Status.WAITING, Status.REPLIED, Status.TIMEOUT, Status.FAILED, Status.CANCELLED}),
    Status.WAITING: frozenset({Status.REPLIED, Status.TIMEOUT, Status.FAILED, Status.CANCELLED}),
    Status.TIMEOUT: frozenset({Status.WAITING}),
    Status.REPLIED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
}


class InvalidTransition(ValueError):
    """A change of status the lifecycle does not allow."""


def allowed(current: Status | str, target: Status | str) -> bool:
    """Whether a question in `current` may move to `target`. Staying where it is is not a transition."""
    return Status(target) in _TRANSITIONS[Status(current)]


def check(current: Status | str, target: Status | str) -> None:
    if not allowed(current, target):
        raise InvalidTransition(f"a question that is {current} cannot become {target}")


def sources(target: Status | str) -> frozenset[Status]:
    """Every status from which `target` may be reached: the guard of a conditional update."""
    target = Status(target)
    return frozenset(s for s, targets in _TRANSITIONS.items() if target in targets)


def is_open(status: Status | str) -> bool:
    return Status(status) in OPEN


class Timer(enum.StrEnum):
    """The time-driven columns of a question; each value is its column's name in both databases."""

    DEADLINE = "deadline"
    REMIND = "next_remind_at"
    ESCALATE = "escalate_at"


# Timers run only while a question waits: one still being sent has no person to remind, and nothing times out
# before it was shown.
TIMED: frozenset[Status] = frozenset({Status.WAITING})


@dataclass(frozen=True)
class Timers:
    deadline: float
    next_remind_at: float | None = None
    reminders_sent: int = 0
    escalate_at: float | None = None

    def at(self, timer: Timer) -> float | None:
        return {Timer.DEADLINE: self.deadline, Timer.REMIND: self.next_remind_at, Timer.ESCALATE: self.escalate_at}[
            timer
        ]


def due(status: Status | str, timers: Timers, now: float) -> list[Timer]:
    """The timers that have fired for a question in `status`, deadline first (a question past its deadline is not
    reminded)."""
    if Status(status) not in TIMED:
        return []
    if timers.deadline <= now:
        return [Timer.DEADLINE]
    return [t for t in (Timer.REMIND, Timer.ESCALATE) if (at := timers.at(t)) is not None and at <= now]


def reopened_deadline(deadline: float, now: float, wait: float, grace: float) -> float:
    """A timed-out question the agent waits on again stays open for the wait plus a grace, so the next poll of the
    same wait still finds it waiting; a deadline further out is kept."""
    return max(deadline, now + wait + grace)


__all__ = [
    "AWAITABLE",
    "CLOSED",
    "FINAL",
    "MATCHABLE",
    "OPEN",
    "TIMED",
    "InvalidTransition",
    "Status",
    "Timer",
    "Timers",
    "allowed",
    "check",
    "due",
    "is_open",
    "reopened_deadline",
    "sources",
]
