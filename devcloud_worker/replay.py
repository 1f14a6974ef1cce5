"""Replaying the spool over one link to the HIL Server: in order, with flow control, until the spool is empty.

With a server that acknowledges callbacks (`hello` with `callback_ack`), at most `window` callbacks are in flight
unacknowledged; each ack frees room, and the row is deleted only then. A callback still unacknowledged after
`ack_timeout` is sent again (the server drops duplicates by msgid). When the link drops, the oldest callback in
flight is blamed for it — the server handles callbacks in order, so that is the one it was working on; a callback
blamed `max_attempts` times is set aside (spool table `dead`) so that it cannot block the queue forever. A row that
cannot be read back is set aside at once.

With a seed server (no hello), a callback is deleted once it is written to the socket, as the seed worker did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from hil_protocol.relay_frames import Callback, CallbackData, dump_frame

from .metrics import WorkerMetrics
from .spool import Spool, Spooled, SpoolError

logger = logging.getLogger(__name__)


class Replayer:
    def __init__(
        self,
        spool: Spool,
        send_text: Callable[[str], Awaitable[None]],
        wake: asyncio.Event,
        metrics: WorkerMetrics,
        *,
        acks: bool,
        window: int = 100,
        ack_timeout: float = 30.0,
        max_attempts: int = 10,
        retry_delay: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._spool = spool
        self._send_text = send_text
        self._wake = wake
        self._metrics = metrics
        self.acks = acks
        self._window = window
        self._ack_timeout = ack_timeout
        self._max_attempts = max_attempts
        self._retry_delay = retry_delay
        self._clock = clock
        self._cursor = 0  # where reading the spool goes on: rewound to send overdue callbacks again
        # The highest spool id ever sent on this link: every row at or below it that is sent again is a resend.
        self._sent = 0
        self._in_flight: dict[int, float] = {}  # spool id -> when it was (last) sent
        self._done: set[int] = set()  # acknowledged (or, for a seed server, written), not yet deleted

    def oldest_in_flight(self) -> int | None:
        return min(self._in_flight, default=None)

    def acked(self, frame_id: str) -> None:
        """The server has the callback with this id. Called from the link's reader: no waiting here."""
        try:
            spool_id = int(frame_id)
        except ValueError:
            logger.warning("callback_ack for an id this worker never sent: %r", frame_id[:40])
            return
        if self._in_flight.pop(spool_id, None) is None:
            logger.info("callback_ack for id %d, which is not in flight on this link (already acknowledged?)", spool_id)
            return
        self._done.add(spool_id)
        self._metrics.acked.inc()
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                busy = await self._step()
            except SpoolError as exc:
                # The disk, not the link: /health reports the spool; keep the link for sends and try again.
                logger.error("spool replay paused for %.1fs: %s", self._retry_delay, exc)
                await asyncio.sleep(self._retry_delay)
                continue
            if not busy:
                await self._idle()

    async def _step(self) -> bool:
        """Delete what was acknowledged, send what there is room for; whether there may be more to send now."""
        self._wake.clear()
        await self._flush()
        self._requeue_overdue()
        room = self._window - len(self._in_flight)
        if room <= 0:
            return False
        rows = await self._spool.after(self._cursor, room)
        for row in rows:
            self._cursor = row.id
            if row.id not in self._in_flight and row.id not in self._done:
                await self._deliver(row)
        # With a seed server the rows just written are deleted on the next step, without waiting for a wake-up.
        return len(rows) == room or bool(self._done)

    async def _deliver(self, row: Spooled) -> None:
        if row.data is None:
            await self._bury(row, "the stored callback cannot be read back as a JSON object")
            return
        if row.attempts >= self._max_attempts:
            await self._bury(row, f"the link dropped {row.attempts} times while this callback was unacknowledged")
            return
        frame = Callback(data=CallbackData(callback_data=row.data), id=str(row.id) if self.acks else None)
        try:
            text = dump_frame(frame)
        except ValueError as exc:  # the spool stores only encodable JSON; a row written by hand might not be
            await self._bury(row, f"cannot be encoded as a frame: {type(exc).__name__}")
            return
        await self._send_text(text)
        self._metrics.relayed.labels("resent" if row.id <= self._sent else "first").inc()
        self._sent = max(self._sent, row.id)
        if self.acks:
            self._in_flight[row.id] = self._clock()
        else:
            self._done.add(row.id)

    def _requeue_overdue(self) -> None:
        """Unacknowledged past the timeout: take them out of flight and rewind, so they are sent again in order."""
        if not self.acks or not self._in_flight:
            return
        now = self._clock()
        overdue = [spool_id for spool_id, sent in self._in_flight.items() if now - sent >= self._ack_timeout]
        if not overdue:
            return
        logger.warning(
            "%d callbacks unacknowledged after %.0fs; sending them again (ids %d..%d)",
            len(overdue),
            self._ack_timeout,
            min(overdue),
            max(overdue),
        )
        for spool_id in overdue:
            del self._in_flight[spool_id]
        self._cursor = min(self._cursor, min(overdue) - 1)

    async def _flush(self) -> None:
        if not self._done:
            return
        done = sorted(self._done)
        await self._spool.remove(done)
        self._done.difference_update(done)

    async def _idle(self) -> None:
        timeout = None
        if self.acks and self._in_flight:
            oldest = min(self._in_flight.values())
            timeout = max(0.0, oldest + self._ack_timeout - self._clock())
        # Not wait_for: on Python 3.11 it swallows a cancellation that meets the wake-up (a shutdown that hangs).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _bury(self, row: Spooled, reason: str) -> None:
        msgid = row.data.get("msgid") if row.data else None
        logger.error("callback id=%d msgid=%s set aside in the spool's dead table: %s", row.id, msgid, reason)
        await self._spool.bury(row.id, reason)
