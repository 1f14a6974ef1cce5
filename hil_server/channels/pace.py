"""WeCom's pace for one AI bot: every message frame waits for a slot within the bot's rate limits.

WeCom refuses a bot's messages past its limits (errcode 45009, "api freq out of limit"); secondary sources put them at
about 30 a minute and 1000 an hour, so both are settings. Frames wait here in order, urgent ones first: a card update
must reach WeCom within 5 s of the click it answers, so it never queues behind a burst of questions. A frame that
would have to wait past its deadline is refused at once (`PaceExceeded`) instead of going out too late.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class PaceExceeded(Exception):
    """No slot before the frame's deadline. `wait` is how long the frame would have had to wait (seconds)."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"would wait {wait:.1f}s")
        self.wait = wait


@dataclass(order=True)
class _Waiter:
    urgency: int  # 0 urgent, 1 ordinary
    seq: int
    wake: asyncio.Event = field(compare=False, default_factory=asyncio.Event)


class Pacer:
    """Slots for one bot's frames: at most `count` in any `window` seconds, for each (count, window) limit."""

    def __init__(self, limits: list[tuple[int, float]], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = [(count, window) for count, window in limits if count > 0 and window > 0]
        self._clock = clock
        self._longest = max((window for _, window in self.limits), default=0.0)
        self._sent: deque[float] = deque()
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()

    @property
    def depth(self) -> int:
        """Frames waiting for a slot now."""
        return len(self._queue)

    def _wait(self) -> float:
        """Seconds until a frame may go out (0: now)."""
        now = self._clock()
        while self._sent and self._sent[0] <= now - self._longest:
            self._sent.popleft()
        wait = 0.0
        for count, window in self.limits:
            inside = [t for t in self._sent if t > now - window]
            if len(inside) >= count:
                wait = max(wait, inside[-count] + window - now)
        return wait

    async def slot(self, *, urgent: bool = False, deadline: float | None = None) -> None:
        """Wait for this frame's turn and slot (`deadline` on this pacer's clock); PaceExceeded past it."""
        if not self.limits:
            return
        me = _Waiter(0 if urgent else 1, next(self._seq))
        heapq.heappush(self._queue, me)
        try:
            while True:
                if self._queue[0] is me:
                    wait = self._wait()
                    if wait <= 0:
                        heapq.heappop(self._queue)
                        self._sent.append(self._clock())
                        return
                    if deadline is not None and self._clock() + wait > deadline:
                        raise PaceExceeded(wait)
                else:
                    # Behind others: wait to be first, or until the deadline.
                    wait = None if deadline is None else deadline - self._clock()
                    if wait is not None and wait <= 0:
                        raise PaceExceeded(self._estimate())
                me.wake.clear()
                try:
                    async with asyncio.timeout(wait):
                        await me.wake.wait()
                except TimeoutError:
                    if self._queue[0] is not me and deadline is not None and self._clock() >= deadline:
                        raise PaceExceeded(self._estimate()) from None
        finally:
            if me in self._queue:
                self._queue.remove(me)
                heapq.heapify(self._queue)
            if self._queue:
                self._queue[0].wake.set()  # the next one looks at its turn (or at a new, more urgent head)

    def _estimate(self) -> float:
        """A rough wait for a frame joining the queue now: the queue's length at the tightest limit's rate."""
        if not self.limits:
            return 0.0
        rate = min(count / window for count, window in self.limits)
        return (len(self._queue) + 1) / rate
