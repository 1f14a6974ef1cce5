"""Whether the worker can do its job, for `/health` — and the watchdog that stops the process when it cannot be kept
alive (systemd or docker then restart it), and tells when a failing spool can be written again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from hil_protocol.supervise import Supervisor

from .link import RelayClient
from .spool import Spool

logger = logging.getLogger(__name__)

# Crashes of one background task are counted over this window (also the supervisor's "stable after").
CRASH_WINDOW = 60.0


class Health:
    def __init__(
        self,
        *,
        client: RelayClient,
        spool: Spool,
        supervisor: Supervisor,
        link_down_grace: float,
        max_crashes: int,
        on_fatal: Callable[[str], None] | None = None,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._spool = spool
        self._supervisor = supervisor
        self._grace = link_down_grace
        self._max_crashes = max_crashes
        self._on_fatal = on_fatal
        self._interval = interval
        self._clock = clock
        self.fatal: str | None = None

    def problems(self) -> list[str]:
        """Why the worker cannot do its job now; empty when it can."""
        found = list(self._supervisor.problems())
        if self.fatal:
            found.append(self.fatal)
        if self._spool.error is not None:
            found.append(f"callback spool cannot be written ({self._spool.error}); callbacks are refused with 503")
        down = self._client.down_for()
        if not self._client.connected and down > self._grace:
            why = self._client.last_error or "connecting"
            found.append(f"link to HIL Server down for {down:.0f}s ({why})")
        return found

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self._spool.error is not None and await self._spool.probe():
                logger.warning("callback spool can be written again")
            self._check_crashes()

    def _check_crashes(self) -> None:
        if self.fatal is not None:
            return
        now = self._clock()
        for state in self._supervisor.tasks.values():
            recent = [t for t in state.crashes if now - t < CRASH_WINDOW]
            if len(recent) >= self._max_crashes:
                self.fatal = (
                    f"background task {state.name} crashed {len(recent)} times within {CRASH_WINDOW:.0f}s "
                    f"(last: {state.last_error})"
                )
                logger.critical("%s; the worker cannot be kept alive and stops", self.fatal)
                if self._on_fatal is not None:
                    self._on_fatal(self.fatal)
                return
