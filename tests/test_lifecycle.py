"""The question lifecycle (hil_server/lifecycle.py): pure, so every rule is checked directly."""

from __future__ import annotations

import pytest

from hil_server import lifecycle
from hil_server.lifecycle import AWAITABLE, CLOSED, FINAL, MATCHABLE, OPEN, Status, Timer, Timers


def test_open_and_closed_partition_the_statuses() -> None:
    assert OPEN == {Status.SENDING, Status.WAITING}
    assert OPEN | CLOSED == set(Status) and not OPEN & CLOSED
    assert MATCHABLE <= OPEN and FINAL <= CLOSED
    assert AWAITABLE == OPEN | {Status.TIMEOUT}
    assert lifecycle.is_open("waiting") and not lifecycle.is_open("timeout")


@pytest.mark.parametrize(
    ("current", "target"),
    [
        ("sending", "waiting"),
        ("sending", "replied"),  # a quote-reply before the last part was sent
        ("sending", "failed"),
        ("sending", "timeout"),
        ("waiting", "replied"),
        ("waiting", "timeout"),
        ("waiting", "cancelled"),
        ("timeout", "waiting"),  # the agent waits again
    ],
)
def test_allowed(current: str, target: str) -> None:
    assert lifecycle.allowed(current, target)
    lifecycle.check(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        ("waiting", "sending"),
        ("waiting", "waiting"),
        ("replied", "waiting"),
        ("replied", "timeout"),
        ("failed", "waiting"),
        ("cancelled", "replied"),
        ("timeout", "replied"),
        ("timeout", "failed"),
    ],
)
def test_refused(current: str, target: str) -> None:
    assert not lifecycle.allowed(current, target)
    with pytest.raises(lifecycle.InvalidTransition, match=f"{current} cannot become {target}"):
        lifecycle.check(current, target)


def test_final_statuses_go_nowhere() -> None:
    for status in FINAL:
        assert not any(lifecycle.allowed(status, t) for t in Status)


def test_sources_are_the_guard_of_each_target() -> None:
    for target in Status:
        assert lifecycle.sources(target) == {s for s in Status if lifecycle.allowed(s, target)}
    assert lifecycle.sources("replied") == OPEN
    assert lifecycle.sources("waiting") == {Status.SENDING, Status.TIMEOUT}
    assert lifecycle.sources("sending") == set()


def test_unknown_status_is_an_error() -> None:
    with pytest.raises(ValueError):
        lifecycle.allowed("open", "replied")


def test_timers_fire_only_while_waiting() -> None:
    timers = Timers(deadline=100.0, next_remind_at=50.0, escalate_at=80.0)
    assert lifecycle.due("waiting", timers, now=10.0) == []
    assert lifecycle.due("waiting", timers, now=60.0) == [Timer.REMIND]
    assert lifecycle.due("waiting", timers, now=90.0) == [Timer.REMIND, Timer.ESCALATE]
    # past the deadline a question times out; it is not reminded too
    assert lifecycle.due("waiting", timers, now=100.0) == [Timer.DEADLINE]
    assert lifecycle.due("sending", timers, now=1000.0) == []
    assert lifecycle.due("replied", timers, now=1000.0) == []
    assert lifecycle.due("waiting", Timers(deadline=100.0), now=99.0) == []


def test_timer_values_are_column_names() -> None:
    assert [t.value for t in Timer] == ["deadline", "next_remind_at", "escalate_at"]
    timers = Timers(deadline=1.0, next_remind_at=2.0, reminders_sent=1, escalate_at=3.0)
    assert [timers.at(t) for t in Timer] == [1.0, 2.0, 3.0]


def test_reopened_deadline() -> None:
    assert lifecycle.reopened_deadline(deadline=100.0, now=200.0, wait=30.0, grace=5.0) == 235.0
    assert lifecycle.reopened_deadline(deadline=1000.0, now=200.0, wait=30.0, grace=5.0) == 1000.0
