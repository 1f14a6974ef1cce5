"""Background tasks that keep running: a task that dies is logged with its traceback, counted and restarted with
backoff, and while it is down `problems()` says so, so /health can answer 503 instead of "healthy".

Use one `Supervisor` per process, started inside the lifespan's TaskGroup:

    async with asyncio.TaskGroup() as tasks:
        supervisor.start(tasks, "hints", service.run_hints)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class TaskState:
    name: str
    running: bool = False
    restarts: int = 0
    last_error: str | None = None
    crashes: list[float] = field(default_factory=list)  # monotonic times of recent crashes


class Supervisor:
    def __init__(
        self,
        *,
        min_delay: float = 0.5,
        max_delay: float = 30.0,
        stable_after: float = 60.0,
        flapping: int = 3,
        on_restart: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._min_delay = min_delay
        self._max_delay = max_delay
        self._stable_after = stable_after  # a run this long resets the backoff
        self._flapping = flapping  # this many crashes within `stable_after` = not healthy even while running
        self._on_restart = on_restart
        self._clock = clock
        self.tasks: dict[str, TaskState] = {}
        self._handles: list[asyncio.Task[None]] = []

    def start(self, group: asyncio.TaskGroup, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run `run()` in `group` until `cancel()`, restarting it whenever it raises or returns."""
        self.tasks[name] = TaskState(name)
        self._handles.append(group.create_task(self._keep(name, run), name=name))

    def cancel(self) -> None:
        """Stop every supervised task (at shutdown, so their TaskGroup can end)."""
        for handle in self._handles:
            handle.cancel()

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        state = self.tasks[name]
        delay = self._min_delay
        while True:
            started = self._clock()
            state.running = True
            try:
                await run()
            except Exception as exc:  # any error: this loop exists so that no single error stops the work
                if being_cancelled():
                    raise asyncio.CancelledError from exc
                logger.exception("background task %s crashed; restarting in %.1fs", name, delay)
                state.last_error = f"{type(exc).__name__}: {exc}"[:300]
            else:
                logger.error("background task %s returned; restarting in %.1fs", name, delay)
                state.last_error = "returned"
            state.running = False
            now = self._clock()
            state.crashes = [t for t in state.crashes if now - t < self._stable_after] + [now]
            if now - started >= self._stable_after:
                delay = self._min_delay
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_delay)
            state.restarts += 1
            if self._on_restart is not None:
                self._on_restart(name)

    def recent_crashes(self, state: TaskState) -> int:
        """How often the task crashed within the last `stable_after` seconds."""
        now = self._clock()
        return sum(1 for t in state.crashes if now - t < self._stable_after)

    def problems(self) -> list[str]:
        """Why the supervised work is not all healthy now: empty when it is."""
        found = []
        for state in self.tasks.values():
            if not state.running:
                found.append(f"background task {state.name} is down ({state.last_error})")
            elif self.recent_crashes(state) >= self._flapping:
                found.append(f"background task {state.name} keeps crashing ({state.last_error})")
        return found


def being_cancelled() -> bool:
    """Whether this task is being cancelled. On Python 3.11 a TaskGroup whose child fails in the same step as the
    cancellation raises the child's error instead, so the cancellation has to be read from the task."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
