"""Wake-ups: who waits on a question (a held poll, a `/mcp` call, hil-mcp's long poll) is woken when it changes.

One interface, two backends (the shape of encode/broadcaster's memory and postgres backends):
- `LocalNotifier`: in-process, for SQLite (one process holds the database). The SQLite repository calls `wake(key)`
  after each commit.
- `PgNotifier`: PostgreSQL LISTEN on its own autocommit connection outside the pool (a pooled connection goes back
  and its LISTEN with it). The repository sends the NOTIFY inside the transaction of the change, so a waiter hears of
  a change when, and only when, it is committed, whichever replica made it. `notifies()` is read with a timeout, and
  when it is quiet a liveness query proves the connection alive; a lost connection is reconnected with backoff and
  every waiter is woken then, since notifications sent meanwhile are lost (as procrastinate's psycopg connector does).

A wake-up is a hint, never the truth: the waiter reads the question again. Subscribe first, then read, then wait —
a change between the read and the wait still wakes it. A waiter should also re-read every few seconds while it
holds, so a notification lost anyway costs a few seconds, never an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger(__name__)


class Subscription:
    """Interest in one key, registered from `subscribe()` until its block ends."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._event = asyncio.Event()

    def _wake(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """True when woken (since the last wait returned, or since subscribing), False when `timeout` passed."""
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            return False
        self._event.clear()
        return True


class Notifier(Protocol):
    async def publish(self, key: str) -> None:
        """Wake every waiter of `key`, in every process that shares the backend."""
        ...

    def subscribe(self, key: str) -> contextlib.AbstractAsyncContextManager[Subscription]: ...

    async def wait(self, key: str, timeout: float) -> bool:
        """Subscribe and wait once: True when woken, False after `timeout`."""
        ...

    async def close(self) -> None: ...


class _Waiters:
    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = {}

    @contextlib.asynccontextmanager
    async def subscribe(self, key: str) -> AsyncIterator[Subscription]:
        sub = Subscription(key)
        self._subs.setdefault(key, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self._subs.get(key)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[key]

    async def wait(self, key: str, timeout: float) -> bool:
        async with self.subscribe(key) as sub:
            return await sub.wait(timeout)

    def wake(self, key: str) -> None:
        for sub in self._subs.get(key, ()):
            sub._wake()

    def wake_all(self) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub._wake()

    @property
    def waiting(self) -> int:
        return sum(len(s) for s in self._subs.values())


class LocalNotifier(_Waiters):
    """In-process: publish wakes this process's waiters."""

    async def publish(self, key: str) -> None:
        self.wake(key)

    async def close(self) -> None:
        self.wake_all()


class PgNotifier(_Waiters):
    """LISTEN/NOTIFY on `channel`. Start it with `await PgNotifier(url, channel).start()` (in the lifespan); its
    listening task runs until `close()`. `idle`: how long `notifies()` is read before a liveness query;
    `backoff_min`/`backoff_max`: reconnect delays (tests pass milliseconds)."""

    def __init__(
        self,
        url: str,
        channel: str,
        *,
        idle: float = 5.0,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        connect_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        self.url = url
        self.channel = channel
        self.idle = idle
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.backend_pid: int | None = None  # of the LISTEN connection, while connected
        self.connections = 0  # how many times it has (re)connected
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pub: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._pub_lock = asyncio.Lock()

    async def start(self, wait: float | None = None) -> PgNotifier:
        """Start listening; with `wait`, return once the first LISTEN is in place (or `wait` passed)."""
        self._task = asyncio.create_task(self._listen(), name=f"hil-notifier-{self.channel}")
        if wait:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._connected.wait()
        return self

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            return False
        return True

    async def _listen(self) -> None:
        # psycopg is imported where PostgreSQL is used: an embedded (SQLite) server never loads it.
        import psycopg
        from psycopg import sql

        delay = self.backoff_min
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=max(2, int(self.connect_timeout))
                )
                async with conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    self.backend_pid = conn.info.backend_pid
                    self.connections += 1
                    self._connected.set()
                    delay = self.backoff_min
                    # Whatever was published while no LISTEN was in place is lost: every waiter reads again.
                    self.wake_all()
                    logger.info("notifier listening channel=%s pid=%s", self.channel, self.backend_pid)
                    while True:
                        async for notify in conn.notifies(timeout=self.idle):
                            self.wake(notify.payload)
                        await conn.execute("SELECT 1")  # quiet for `idle`: prove the connection is alive
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self._connected.clear()
                self.backend_pid = None
                logger.warning("notifier connection lost channel=%s, retrying in %.1fs: %s", self.channel, delay, exc)
                self.wake_all()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)

    async def publish(self, key: str) -> None:
        """NOTIFY outside a change (the repository notifies inside its transactions; this is for everything else).
        Best effort: a database that is down loses the wake-up, and waiters' re-reads cover it."""
        import psycopg

        async with self._pub_lock:
            for _ in range(2):  # one retry on a fresh connection: the last one may have been dropped while idle
                try:
                    if self._pub is None or self._pub.closed:
                        self._pub = await psycopg.AsyncConnection.connect(
                            self.url, autocommit=True, connect_timeout=max(2, int(self.connect_timeout))
                        )
                    await self._pub.execute("SELECT pg_notify(%s, %s)", [self.channel, key])
                    return
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    logger.warning("notify failed channel=%s key=%s: %s", self.channel, key, exc)
                    if self._pub is not None:
                        await self._pub.close()
                    self._pub = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._pub is not None:
            await self._pub.close()
            self._pub = None
        self._connected.clear()
        self.wake_all()


__all__ = ["LocalNotifier", "Notifier", "PgNotifier", "Subscription"]
