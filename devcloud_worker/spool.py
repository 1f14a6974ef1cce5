"""The worker's callback spool: every accepted callback is written here before the robot gets its 200, and
removed only when the HIL Server has it, so a reply that arrives while the link is down is not lost."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


class Spool:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # One thread owns the connection: sqlite3 objects must stay on one thread, and the loop must not block.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-spool")
        self._conn: sqlite3.Connection | None = None
        self._executor.submit(self._open).result()

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT, data TEXT NOT NULL,"
            " created_at REAL NOT NULL)"
        )
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '1')")
        self._conn = conn

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def add(self, data: dict[str, Any]) -> int:
        def add() -> int:
            assert self._conn is not None
            cur = self._conn.execute(
                "INSERT INTO spool (data, created_at) VALUES (?, ?)",
                (json.dumps(data, ensure_ascii=False), time.time()),
            )
            return int(cur.lastrowid or 0)

        return await self._run(add)

    async def pending(self, limit: int = 500) -> list[tuple[int, dict[str, Any]]]:
        def pending() -> list[tuple[int, dict[str, Any]]]:
            assert self._conn is not None
            rows = self._conn.execute("SELECT id, data FROM spool ORDER BY id LIMIT ?", (limit,)).fetchall()
            return [(row_id, json.loads(data)) for row_id, data in rows]

        return await self._run(pending)

    async def remove(self, spool_id: int) -> None:
        def remove() -> None:
            assert self._conn is not None
            self._conn.execute("DELETE FROM spool WHERE id = ?", (spool_id,))

        await self._run(remove)

    async def count(self) -> int:
        def count() -> int:
            assert self._conn is not None
            return int(self._conn.execute("SELECT COUNT(*) FROM spool").fetchone()[0])

        return await self._run(count)

    def close(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()

        self._executor.submit(close).result()
        self._executor.shutdown()
