"""Whether the worker can do its job, for `/health` — and the watchdog that stops the process when it cannot be kept
alive (systemd or docker then restart it), and tells when a failing spool can be written again."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from hil_protocol.supervise import Supervisor
from hil_protocol.wecom_robot import KeyHealth

from .link import RelayClient
from .spool import Spool

logger = logging.getLogger(__name__)

# Crashes of one background task are counted over this window: the supervisor's `stable_after`.
CRASH_WINDOW = 60.0


@dataclasses.dataclass(kw_only=True, eq=False)
class Health:
    """What /health reports, and the watchdog (`run`) that stops the worker when a task keeps crashing."""

    client: RelayClient
    spool: Spool
    supervisor: Supervisor
    key: KeyHealth  # whether WeCom takes BOT_KEY
    link_down_grace: float  # seconds the link may be down before /health says so
    max_crashes: int  # crashes of one task within CRASH_WINDOW that stop the process
    on_fatal: Callable[[str], None] | None = None
    interval: float = 1.0
    fatal: str | None = dataclasses.field(default=None, init=False)

    def problems(self) -> list[str]:
        """Why the worker cannot do its job now; empty when it can."""
        found = list(self.supervisor.problems())
        if self.fatal:
            found.append(self.fatal)
        key = self.key.problem()
        if key is not None:
            found.append(key)
        if self.spool.error is not None:
            found.append(f"callback spool cannot be written ({self.spool.error}); callbacks are refused with 503")
        down = self.client.down_for()
        if not self.client.connected and down > self.link_down_grace:
            why = self.client.last_error or "connecting"
            found.append(f"link to HIL Server down for {down:.0f}s ({why})")
        return found

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.spool.error is not None and await self.spool.probe():
                logger.warning("callback spool can be written again")
            self._check_crashes()

    def _check_crashes(self) -> None:
        if self.fatal is not None:
            return
        for state in self.supervisor.tasks.values():
            crashes = self.supervisor.recent_crashes(state)
            if crashes >= self.max_crashes:
                self.fatal = (
                    f"background task {state.name} crashed {crashes} times within {CRASH_WINDOW:.0f}s "
                    f"(last: {state.last_error})"
                )
                logger.critical("%s; the worker cannot be kept alive and stops", self.fatal)
                if self.on_fatal is not None:
                    self.on_fatal(self.fatal)
                return
