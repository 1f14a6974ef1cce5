"""The /mcp sessions of the 2025 protocol (initialize → `Mcp-Session-Id`), counted per API token, so that one token
cannot fill the server with sessions and lock every other token out.

- Per token, at most `per_token` sessions: once one more is open, that token's least recently used session (one
  with no call in flight first) is closed. A token only ever evicts its own sessions, and only when a session was
  really opened (not for a probe or a refused request).
- In all, at most `total`: past it a new session is refused with 503 and a sentence saying why (unless the token
  is at its own cap: it gives up its own oldest instead), and `/health` is 503 (degraded) while it lasts. Idle
  sessions close by themselves (the SDK's `session_idle_timeout`), so it recovers without anyone acting.

The MCP SDK (2.3) keeps its sessions in `StreamableHTTPSessionManager._server_instances` and has no public way to
count or close one; `_live` and `_close` are the only two places that reach in (tests/test_mcp_http.py fails loudly
on an SDK that changes them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    owner: str | None
    last_used: float
    in_flight: int = 0


class SessionBook:
    def __init__(self, per_token: int, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_token = per_token
        self.total = total
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._manager: StreamableHTTPSessionManager | None = None

    def bind(self, manager: StreamableHTTPSessionManager | None) -> None:
        self._manager = manager
        self._entries.clear()

    def _live(self) -> dict[str, Any]:
        return self._manager._server_instances if self._manager is not None else {}  # the SDK reached into: see above

    async def _close(self, session_id: str) -> None:
        live = self._live()
        transport = live.get(session_id)
        if self._manager is not None and transport is not None:
            await self._manager._discard_session(session_id, transport)  # the SDK reached into: see above

    def open_count(self) -> int:
        live = self._live()
        for session_id in [s for s in self._entries if s not in live]:
            del self._entries[session_id]  # ended: deleted by its client, idle, or crashed
        return len(live)

    def refusal(self, owner: str | None) -> str | None:
        """Why `owner` may not open a session now (for a 503), or None."""
        if self.open_count() < self.total:
            return None
        if sum(entry.owner == owner for entry in self._entries.values()) >= self.per_token:
            return None  # at its own cap: opening closes its own oldest, the total does not grow
        return self.full()

    def full(self) -> str:
        return (
            f"/mcp is full: {self.total} MCP sessions are open (HIL_MCP_MAX_SESSIONS); idle sessions close after "
            "HIL_MCP_SESSION_IDLE seconds, try again later"
        )

    async def opened(self, owner: str | None, session_id: str) -> None:
        """A session of `owner` was opened: past its cap, its least recently used others are closed."""
        self.open_count()
        self._entries[session_id] = _Entry(owner, self._clock())
        others = sorted(
            (entry.in_flight > 0, entry.last_used, other)
            for other, entry in self._entries.items()
            if entry.owner == owner and other != session_id
        )
        for _, _, other in others[: max(0, len(others) + 1 - self.per_token)]:
            logger.info("/mcp: closing the least recently used session of a token at its cap of %d", self.per_token)
            self._entries.pop(other, None)
            await self._close(other)

    @contextmanager
    def using(self, session_id: str | None) -> Iterator[None]:
        """One request on a session: it is used now, and not the first to close while the request runs."""
        entry = self._entries.get(session_id) if session_id else None
        if entry is None:
            yield
            return
        entry.last_used = self._clock()
        entry.in_flight += 1
        try:
            yield
        finally:
            entry.in_flight -= 1
            entry.last_used = self._clock()

    def problems(self) -> list[str]:
        return [self.full()] if self.open_count() >= self.total else []


__all__ = ["SessionBook"]
