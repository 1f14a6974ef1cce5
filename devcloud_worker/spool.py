"""The worker's callback spool: every accepted callback is written here before the robot gets its 200, and
removed only when the HIL Server has it, so a reply that arrives while the link is down is not lost.

One SQLite file (`worker-spool.sqlite3` in the data dir), used from one thread: sqlite3 objects must stay on the
thread that made them, and the event loop must not wait on the disk. Open it with `await Spool.open(path)`.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

SCHEMA_VERSION = 2
_CHUNK = 500  # ids per DELETE statement, well under SQLite's variable limit

T = TypeVar("T")


class SpoolError(Exception):
    """The spool could not be read or written (disk full, read-only file system, I/O error)."""


@dataclass(frozen=True)
class Spooled:
    """One spooled callback. `data` is None when the stored row cannot be read back as a JSON object."""

    id: int
    data: dict[str, Any] | None
    attempts: int


def encode(data: dict[str, Any]) -> str:
    """The callback as JSON text that can be stored and relayed as UTF-8. JSON escapes can smuggle in lone
    surrogates, which no UTF-8 encoder accepts; they are never part of a real message, so they become '?'."""
    text = json.dumps(data, ensure_ascii=False)
    return text.encode("utf-8", "replace").decode("utf-8")


class Spool:
    def __init__(self, path: Path, executor: ThreadPoolExecutor, conn: sqlite3.Connection, depth: int, dead: int):
        self.path = path
        self._executor = executor
        self._conn = conn
        # Counts kept here so /health and /metrics never touch the disk. Only the spool's thread changes them, right
        # after its write: a caller cancelled while waiting for the thread cannot leave them wrong.
        self.depth = depth  # rows waiting for the server
        self.dead = dead  # rows set aside (table `dead`)
        self.error: str | None = None  # why the last write failed; cleared by the next write that works

    @classmethod
    async def open(cls, path: Path) -> Spool:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-spool")
        try:
            conn, depth, dead = await asyncio.get_running_loop().run_in_executor(executor, _connect, path)
        except (sqlite3.Error, OSError) as exc:
            executor.shutdown(wait=False)
            raise SpoolError(f"cannot open the callback spool {path}: {exc}") from exc
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(path, executor, conn, depth, dead)

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, fn, self._conn)
        except (sqlite3.Error, OSError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            raise SpoolError(f"callback spool {self.path}: {exc}") from exc
        if write:
            self.error = None
        return result

    async def add(self, data: dict[str, Any]) -> int:
        """Store one callback durably; its id orders it among the others."""

        def add(conn: sqlite3.Connection) -> int:
            cur = conn.execute("INSERT INTO spool (data, created_at) VALUES (?, ?)", (encode(data), time.time()))
            self.depth += 1
            return int(cur.lastrowid or 0)

        return await self._run(add, write=True)

    async def after(self, cursor: int, limit: int) -> list[Spooled]:
        """Up to `limit` callbacks with an id above `cursor`, oldest first."""

        def after(conn: sqlite3.Connection) -> list[Spooled]:
            rows = conn.execute(
                "SELECT id, data, attempts FROM spool WHERE id > ? ORDER BY id LIMIT ?", (cursor, limit)
            ).fetchall()
            return [Spooled(row_id, _decode(text), attempts) for row_id, text, attempts in rows]

        return await self._run(after, write=False)

    async def remove(self, ids: Iterable[int]) -> None:
        """Drop callbacks the server has; one transaction for the lot."""
        wanted = list(ids)
        if not wanted:
            return

        def remove(conn: sqlite3.Connection) -> None:
            removed = 0
            with _transaction(conn):
                for start in range(0, len(wanted), _CHUNK):
                    chunk = wanted[start : start + _CHUNK]
                    marks = ",".join("?" * len(chunk))
                    removed += conn.execute(f"DELETE FROM spool WHERE id IN ({marks})", chunk).rowcount
            self.depth -= removed

        await self._run(remove, write=True)

    async def blame(self, spool_id: int) -> int:
        """Count one more lost delivery against a callback; returns its count."""

        def blame(conn: sqlite3.Connection) -> int:
            conn.execute("UPDATE spool SET attempts = attempts + 1 WHERE id = ?", (spool_id,))
            row = conn.execute("SELECT attempts FROM spool WHERE id = ?", (spool_id,)).fetchone()
            return int(row[0]) if row else 0

        return await self._run(blame, write=True)

    async def bury(self, spool_id: int, reason: str) -> None:
        """Set a callback aside in table `dead` (kept for a person to look at) so it no longer holds up the queue."""

        def bury(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute(
                    "INSERT OR REPLACE INTO dead (id, data, created_at, attempts, reason, dead_at)"
                    " SELECT id, data, created_at, attempts, ?, ? FROM spool WHERE id = ?",
                    (reason, time.time(), spool_id),
                )
                moved = conn.execute("DELETE FROM spool WHERE id = ?", (spool_id,)).rowcount
            self.depth -= moved
            self.dead += moved

        await self._run(bury, write=True)

    async def probe(self) -> bool:
        """Whether a write goes through now (it clears `error` when it does)."""

        def probe(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probed_at', ?)", (str(time.time()),))

        try:
            await self._run(probe, write=True)
        except SpoolError:
            return False
        return True

    async def close(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
        except sqlite3.Error:
            pass  # closing: nothing left to save
        finally:
            self._executor.shutdown(wait=False)


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit connection; ROLLBACK when the block raises."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self._conn.execute("COMMIT")
        elif self._conn.in_transaction:
            self._conn.execute("ROLLBACK")


def _decode(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _connect(path: Path) -> tuple[sqlite3.Connection, int, int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a callback WeCom got its 200 for survives a power cut too, not only a crash of this process.
        conn.execute("PRAGMA synchronous=FULL")
        with _transaction(conn):
            _migrate(conn)
        depth = int(conn.execute("SELECT COUNT(*) FROM spool").fetchone()[0])
        dead = int(conn.execute("SELECT COUNT(*) FROM dead").fetchone()[0])
    except BaseException:
        conn.close()
        raise
    return conn, depth, dead


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT, data TEXT NOT NULL,"
        " created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0)"
    )
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    version = int(row[0]) if row else SCHEMA_VERSION
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"schema version {version} is newer than this worker's ({SCHEMA_VERSION}); upgrade hil-mcp"
        )
    columns = {info[1] for info in conn.execute("PRAGMA table_info(spool)")}
    if "attempts" not in columns:  # version 1 (0.2)
        conn.execute("ALTER TABLE spool ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS dead (id INTEGER PRIMARY KEY, data TEXT NOT NULL, created_at REAL NOT NULL,"
        " attempts INTEGER NOT NULL, reason TEXT NOT NULL, dead_at REAL NOT NULL)"
    )
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
