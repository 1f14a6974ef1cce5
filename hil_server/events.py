"""The recent outcomes /status shows: what happened to which question, and who answered."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .models import Session


@dataclass(frozen=True)
class Event:
    session_id: str
    short_id: str
    project: str | None
    outcome: str
    at: float
    by: str | None = None  # who answered: "name (userid)"
    chat_id: str | None = None


class RecentEvents:
    def __init__(self, size: int = 50, clock: Callable[[], float] = time.time) -> None:
        self._events: deque[Event] = deque(maxlen=size)
        self._clock = clock

    def add(self, session: Session, outcome: str, *, by: str | None = None, chat_id: str | None = None) -> None:
        self._events.appendleft(
            Event(session.session_id, session.short_id, session.project_name, outcome, self._clock(), by, chat_id)
        )

    def __iter__(self) -> Iterator[Event]:
        return iter(list(self._events))
