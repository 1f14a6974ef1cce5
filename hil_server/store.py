"""Where sessions live: `open_server_store()` opens the server's store (the repository, `repository/`, with its
notifier), upgrading a data directory the old store wrote.

The rest of this module is the old store, kept to read (and upgrade) what it wrote: the file `hil-server.sqlite3`
(schema v1 or v2: whole-session JSON rows, msgids, audit). At the first start on such a directory its content is
copied into the repository (`hil.db`) in one transaction and the old file is renamed `hil-server.sqlite3.migrated`
(kept as a backup); a start that died in between finds the repository filled and only renames.

The old store:

`SessionStore` keeps the working set in memory (every read is a dict lookup, so matching never waits on disk) and
hands each change to a `Persistence`, awaiting it: when `save()` returns, the change is durable. Mutations of the
in-memory state happen synchronously at the start of `save()`, before its first await, so a caller that checks
and then saves without awaiting in between (duplicate msgids, matching) cannot race another task.

When a write fails (a full or failing disk) the store stops: memory may hold what never reached the disk, so every
later write is refused with `StoreUnavailable` (callbacks answer 503 and are sent again; /health says degraded)
until `recover()` finds the disk writable again and reloads memory from it. Nothing is acknowledged that is not
durable, and nothing durable is forgotten.

The audit trail (`audit.AuditEvent`) lives here too: appended with the session change it records (one
transaction), read with `audit_rows()`, purged with `purge_audit()`; without a persistence it is kept in memory.

`SqlitePersistence` is the embedded default; a networked store can implement `Persistence` (or replace
`SessionStore`) without touching the handlers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import queue
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from hil_protocol.settings import secret_value

from .audit import AUDIT_LIMIT_MAX, AuditEvent, to_item
from .config import ServerSettings
from .models import Session
from .notifier import Notifier
from .repository import Repository, is_postgres_url, open_with_notifier
from .repository.base import answer_data, question_row
from .repository.errors import RepositoryUnavailable

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# the old store's file in HIL_DATA_DIR (read once, to upgrade)
STORE_FILE = "hil-server.sqlite3"
# the repository's file in HIL_DATA_DIR (SQLite)
REPOSITORY_FILE = "hil.db"

Snapshot = tuple[list[Session], dict[str, float]]


# The store cannot make changes durable now; `str()` says why (one exception for both stores).
StoreUnavailable = RepositoryUnavailable


class Persistence(Protocol):
    async def load(self) -> Snapshot: ...

    async def write(
        self,
        sessions: Iterable[Session] = (),
        msgids: Iterable[tuple[str, float]] = (),
        delete: Iterable[str] = (),
        audit: Iterable[AuditEvent] = (),
    ) -> None: ...

    async def purge_msgids(self, before: float) -> None: ...

    async def audit_rows(
        self, since: float | None, chat_id: str | None, owner: str | None, limit: int
    ) -> list[AuditEvent]:
        """Audit rows in the order they were written, oldest first; `owner` None: every owner."""
        ...

    async def purge_audit(self, before: float) -> int:
        """Drop the audit rows older than `before`; returns how many."""
        ...

    async def probe(self) -> None:
        """Raise unless a write would succeed now."""
        ...

    async def close(self) -> None: ...


class SessionStore:
    def __init__(self, persistence: Persistence | None = None, clock: Callable[[], float] = time.time) -> None:
        self._persistence = persistence
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._by_short: dict[str, str] = {}
        self._waiting_by_chat: dict[str | None, dict[str, None]] = {}  # insertion-ordered sets
        self._msgids: dict[str, float] = {}
        # only without a persistence (the newest rows, bounded); with one the trail lives on disk
        self._audit: deque[AuditEvent] = deque(maxlen=AUDIT_LIMIT_MAX)
        self._audit_seq = 0
        self.broken: str | None = None  # why writes are refused, while they are

    @classmethod
    async def open(cls, persistence: Persistence | None = None) -> SessionStore:
        store = cls(persistence)
        if persistence is not None:
            store._replace(await persistence.load())
        return store

    # --- reads (memory) ---
    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def get_by_short_id(self, short_id: str) -> Session | None:
        session_id = self._by_short.get(short_id)
        return self._sessions.get(session_id) if session_id else None

    def find(self, session_id_or_short: str) -> Session | None:
        return self.get(session_id_or_short) or self.get_by_short_id(session_id_or_short)

    def waiting_in_chat(self, chat_id: str) -> list[Session]:
        """Sessions waiting in this chat, oldest first; sessions sent without a chat id wait in every chat."""
        ids = list(self._waiting_by_chat.get(chat_id, {})) + list(self._waiting_by_chat.get(None, {}))
        found = [self._sessions[i] for i in ids if i in self._sessions]
        return sorted(found, key=lambda s: s.created_at)

    def waiting(self) -> list[Session]:
        return [self._sessions[i] for ids in self._waiting_by_chat.values() for i in ids if i in self._sessions]

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def seen_msgid(self, msgid: str) -> bool:
        return msgid in self._msgids

    def short_id_taken(self, short_id: str) -> bool:
        return short_id in self._by_short

    def __len__(self) -> int:
        return len(self._sessions)

    # --- writes: memory now, durable when awaited ---
    async def save(self, *sessions: Session, msgid: str | None = None, audit: Iterable[AuditEvent] = ()) -> None:
        """Make the sessions, the msgid and the audit rows that record the change durable, in one transaction."""
        self._check_writable()
        now = self._clock()
        for session in sessions:
            self._index(session)
        if msgid:
            self._msgids[msgid] = now
        audit = list(audit)
        if self._persistence is None:
            for event in audit:
                self._audit_seq += 1
                self._audit.append(event.model_copy(update={"seq": self._audit_seq}))
        await self._write(sessions, [(msgid, now)] if msgid else (), audit=audit)

    async def append_audit(self, *events: AuditEvent) -> None:
        """Audit rows that record no session change (a send that failed before any session existed)."""
        await self.save(audit=events)

    async def audit_rows(
        self, since: float | None = None, chat_id: str | None = None, owner: str | None = None, limit: int = 10_000
    ) -> list[AuditEvent]:
        """The audit trail, oldest first: rows at or after `since`, in `chat_id`, of `owner` (None: anyone's)."""
        limit = max(1, min(limit, AUDIT_LIMIT_MAX))
        if self._persistence is not None:
            try:
                return await self._persistence.audit_rows(since, chat_id, owner, limit)
            except (sqlite3.Error, OSError, ValueError) as exc:
                raise StoreUnavailable(f"the audit trail cannot be read ({type(exc).__name__}: {exc})") from exc
        rows = (
            e
            for e in self._audit
            if (since is None or e.at >= since)
            and (chat_id is None or e.chat_id == chat_id)
            and (owner is None or e.owner == owner)
        )
        return list(itertools.islice(rows, limit))

    async def purge_audit(self, before: float) -> int:
        """Forget audit rows older than `before` (HIL_AUDIT_RETENTION); returns how many."""
        self._check_writable()
        if self._persistence is None:
            kept = deque((e for e in self._audit if e.at >= before), maxlen=AUDIT_LIMIT_MAX)
            dropped, self._audit = len(self._audit) - len(kept), kept
            return dropped
        try:
            return await self._persistence.purge_audit(before)
        except (sqlite3.Error, OSError, ValueError) as exc:
            self._break(exc)
            raise StoreUnavailable(self.broken) from exc

    async def delete(self, session_ids: Iterable[str]) -> None:
        self._check_writable()
        ids = [i for i in session_ids if i in self._sessions]
        for session_id in ids:
            session = self._sessions.pop(session_id)
            self._by_short.pop(session.short_id, None)
            self._unwait(session)
        if ids:
            await self._write(delete=ids)

    async def forget_msgids(self, before: float) -> None:
        """Forget the msgids seen before `before`. They are kept in the order they were seen, so a sweep (every few
        seconds, over a day of msgids) walks only those it drops, and the disk is touched only when there are some."""
        self._check_writable()
        stale = list(itertools.takewhile(lambda msgid: self._msgids[msgid] < before, self._msgids))
        if not stale:
            return
        for msgid in stale:
            del self._msgids[msgid]
        if self._persistence is not None:
            try:
                await self._persistence.purge_msgids(before)
            except (sqlite3.Error, OSError, ValueError) as exc:
                self._break(exc)

    async def recover(self) -> bool:
        """When broken: if the disk takes writes again, reload memory from it and take writes again."""
        if self.broken is None or self._persistence is None:
            return True
        try:
            await self._persistence.probe()
            snapshot = await self._persistence.load()
        except (sqlite3.Error, OSError, ValueError) as exc:
            logger.warning("store still unavailable: %s", exc)
            return False
        self._replace(snapshot)
        logger.warning("store writable again; reloaded %d sessions from disk", len(self._sessions))
        self.broken = None
        return True

    async def run_recovery(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.broken is not None:
                await self.recover()

    async def close(self) -> None:
        if self._persistence is not None:
            await self._persistence.close()

    def _check_writable(self) -> None:
        if self.broken is not None:
            raise StoreUnavailable(self.broken)

    async def _write(
        self,
        sessions: Iterable[Session] = (),
        msgids: Iterable[tuple[str, float]] = (),
        delete: Iterable[str] = (),
        audit: Iterable[AuditEvent] = (),
    ) -> None:
        if self._persistence is None:
            return
        try:
            await self._persistence.write(sessions, msgids, delete, audit=audit)
        except (sqlite3.Error, OSError, ValueError) as exc:
            self._break(exc)
            raise StoreUnavailable(self.broken) from exc

    def _break(self, exc: Exception) -> None:
        if self.broken is None:
            logger.error("store write failed, refusing writes until the disk takes them again: %s", exc)
        self.broken = f"the session store cannot write ({type(exc).__name__}: {exc})"[:300]

    def _replace(self, snapshot: Snapshot) -> None:
        sessions, msgids = snapshot
        self._sessions, self._by_short, self._waiting_by_chat = {}, {}, {}
        for session in sessions:
            self._index(session)
        self._msgids = dict(msgids)

    def _index(self, session: Session) -> None:
        old = self._sessions.get(session.session_id)
        if old is not None:
            self._unwait(old)
        self._sessions[session.session_id] = session
        self._by_short[session.short_id] = session.session_id
        if session.status == "waiting":
            self._waiting_by_chat.setdefault(session.chat_id, {})[session.session_id] = None

    def _unwait(self, session: Session) -> None:
        chat = self._waiting_by_chat.get(session.chat_id)
        if chat is not None:
            chat.pop(session.session_id, None)
            if not chat:
                del self._waiting_by_chat[session.chat_id]


class SqlitePersistence:
    """SQLite in WAL mode, used by one thread that commits whatever writes are queued in one transaction (group
    commit), so many concurrent saves cost one commit and the event loop never touches the disk. Open it with
    `await SqlitePersistence.open(path)`."""

    def __init__(self, path: Path, migrate: bool = True) -> None:
        # Blocking: call through open(), which runs this in a thread.
        if migrate:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._queue: queue.Queue[tuple[str, Any, asyncio.Future[Any], asyncio.AbstractEventLoop] | None] = queue.Queue()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            if migrate:
                self._migrate()
            else:
                self._check_version()
        except BaseException:
            self._conn.close()
            raise
        self._thread = threading.Thread(target=self._run, name="hil-sqlite-writer", daemon=True)
        self._thread.start()

    @classmethod
    async def open(cls, path: Path, *, migrate: bool = True) -> SqlitePersistence:
        """`migrate=False`: a reader beside the running server (`hil-server audit export`): it changes nothing on disk
        and refuses a store of another schema version."""
        return await asyncio.to_thread(cls, path, migrate)

    def _check_version(self) -> None:
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.OperationalError:  # no meta table: not a store this server wrote
            row = None
        version = int(row[0]) if row else 0
        if version != SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}, this hil-server reads {SCHEMA_VERSION}; "
                "start this hil-server once on it to upgrade it (or use the hil-server that wrote it)"
            )

    def _migrate(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); only a power loss may drop the last commits.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}, newer than this hil-server ({SCHEMA_VERSION}); upgrade"
            )
        if version < 1:
            conn.executescript(
                """
                BEGIN;
                CREATE TABLE sessions (
                    session_id TEXT PRIMARY KEY,
                    short_id TEXT NOT NULL,
                    chat_id TEXT,
                    status TEXT NOT NULL,
                    created_at REAL NOT NULL,
                    data TEXT NOT NULL
                );
                CREATE INDEX sessions_short_id ON sessions (short_id);
                CREATE INDEX sessions_status_chat ON sessions (status, chat_id);
                CREATE TABLE msgids (msgid TEXT PRIMARY KEY, seen_at REAL NOT NULL);
                INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', '1');
                COMMIT;
                """
            )
        if version < 2:
            # 2: the audit trail. Append-only; seq is the order rows were written (AUTOINCREMENT: never reused,
            # even after a purge, so an exporter can resume after the last seq it saw).
            conn.executescript(
                """
                BEGIN;
                CREATE TABLE audit (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT,
                    at REAL NOT NULL,
                    kind TEXT NOT NULL,
                    owner TEXT,
                    chat_id TEXT,
                    session_id TEXT,
                    data TEXT NOT NULL
                );
                CREATE INDEX audit_at ON audit (at);
                INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', '2');
                COMMIT;
                """
            )

    async def load(self) -> Snapshot:
        return await self._submit("load", None)

    async def write(
        self,
        sessions: Iterable[Session] = (),
        msgids: Iterable[tuple[str, float]] = (),
        delete: Iterable[str] = (),
        audit: Iterable[AuditEvent] = (),
    ) -> None:
        rows = [(s.session_id, s.short_id, s.chat_id, s.status, s.created_at, s.model_dump_json()) for s in sessions]
        audit_rows = [
            (e.at, e.kind, e.owner, e.chat_id, e.session_id, e.model_dump_json(exclude={"seq", "time"})) for e in audit
        ]
        await self._submit("write", (rows, list(msgids), list(delete), audit_rows))

    async def audit_rows(
        self, since: float | None, chat_id: str | None, owner: str | None, limit: int
    ) -> list[AuditEvent]:
        return await self._submit("audit", (since, chat_id, owner, limit))

    async def purge_audit(self, before: float) -> int:
        return await self._submit("purge_audit", (before,))

    async def purge_msgids(self, before: float) -> None:
        await self._submit("purge", (before,))

    async def probe(self) -> None:
        await self._submit("probe", None)

    async def close(self) -> None:
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, 10)
        await asyncio.to_thread(self._conn.close)

    async def _submit(self, op: str, args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put((op, args, future, loop))
        return await future

    # --- the writer thread ---
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._process(batch)
                    return
                batch.append(nxt)
            self._process(batch)

    def _process(self, batch: list[tuple[str, Any, asyncio.Future[Any], asyncio.AbstractEventLoop]]) -> None:
        # Consecutive writes share one transaction; loads and probes run on their own, in queue order.
        group: list[tuple[str, Any, asyncio.Future[Any], asyncio.AbstractEventLoop]] = []
        for item in batch:
            if item[0] in ("write", "purge", "purge_audit"):
                group.append(item)
                continue
            self._commit(group)
            group = []
            op, args, future, loop = item
            try:
                result = self._load() if op == "load" else self._audit(*args) if op == "audit" else self._probe()
            except (sqlite3.Error, OSError, ValueError) as exc:
                logger.error("sqlite %s failed: %s", op, exc)
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)
        self._commit(group)

    def _load(self) -> Snapshot:
        sessions: list[Session] = []
        for (data,) in self._conn.execute("SELECT data FROM sessions ORDER BY created_at"):
            try:
                sessions.append(Session.model_validate_json(data))
            except ValueError:
                logger.warning("skipping an unreadable session row in %s", self.path)
        msgids = dict(self._conn.execute("SELECT msgid, seen_at FROM msgids ORDER BY seen_at").fetchall())
        return sessions, msgids

    def _audit(self, since: float | None, chat_id: str | None, owner: str | None, limit: int) -> list[AuditEvent]:
        query = "SELECT seq, data FROM audit WHERE at >= ?"
        params: list[Any] = [since if since is not None else float("-inf")]
        if chat_id is not None:
            query += " AND chat_id = ?"
            params.append(chat_id)
        if owner is not None:
            query += " AND owner = ?"
            params.append(owner)
        query += " ORDER BY seq LIMIT ?"
        params.append(limit)
        events: list[AuditEvent] = []
        for seq, data in self._conn.execute(query, params):
            try:
                events.append(AuditEvent.model_validate_json(data).model_copy(update={"seq": seq}))
            except ValueError:
                logger.warning("skipping an unreadable audit row seq=%d in %s", seq, self.path)
        return events

    def _probe(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?)", (str(time.time()),))
            self._conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _commit(self, group: list[tuple[str, Any, asyncio.Future[Any], asyncio.AbstractEventLoop]]) -> None:
        if not group:
            return
        error: Exception | None = None
        results: list[Any] = []
        try:
            self._conn.execute("BEGIN")
            for op, args, _, _ in group:
                result = None
                if op == "write":
                    rows, msgids, delete, audit = args
                    self._conn.executemany(
                        "INSERT OR REPLACE INTO sessions (session_id, short_id, chat_id, status, created_at, data)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    self._conn.executemany("INSERT OR IGNORE INTO msgids (msgid, seen_at) VALUES (?, ?)", msgids)
                    self._conn.executemany("DELETE FROM sessions WHERE session_id = ?", [(i,) for i in delete])
                    self._conn.executemany(
                        "INSERT INTO audit (at, kind, owner, chat_id, session_id, data) VALUES (?, ?, ?, ?, ?, ?)",
                        audit,
                    )
                elif op == "purge":
                    self._conn.execute("DELETE FROM msgids WHERE seen_at < ?", args)
                elif op == "purge_audit":
                    result = self._conn.execute("DELETE FROM audit WHERE at < ?", args).rowcount
                results.append(result)
            self._conn.execute("COMMIT")
        except (sqlite3.Error, ValueError) as exc:  # ValueError: e.g. UnicodeEncodeError from a lone surrogate
            # Failing the group's futures, never the thread: a dead writer would leave every later save hanging.
            error = exc
            logger.error("sqlite write failed: %s", exc)
            self._rollback()
        for index, (_, _, future, loop) in enumerate(group):
            result = results[index] if error is None else None
            loop.call_soon_threadsafe(_settle, future, result, error)

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _settle(future: asyncio.Future[Any], result: Any, error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


# --- the server's store ----------------------------------------------------------------------------------------


class ServerStore:
    """The repository and notifier one lifespan opens; `close()` closes both (and removes a memory store's file)."""

    def __init__(self, repo: Repository, notifier: Notifier, name: str, scratch: Path | None = None) -> None:
        self.repo = repo
        self.notifier = notifier
        self.name = name
        self._scratch = scratch

    async def get_question(self, session_id: str) -> Session | None:
        return await self.repo.get(session_id)

    async def close(self) -> None:
        await self.notifier.close()
        await self.repo.close()
        if self._scratch is not None:
            await asyncio.to_thread(shutil.rmtree, self._scratch, True)


async def open_server_store(settings: ServerSettings) -> ServerStore:
    """PostgreSQL with HIL_DATABASE_URL; else SQLite in HIL_DATA_DIR (upgrading the old store's file there), or a
    scratch SQLite file with HIL_STORE=memory (nothing kept after the process)."""
    url = secret_value(settings.hil_database_url)
    if url:
        if not is_postgres_url(url):
            raise ValueError("HIL_DATABASE_URL: give postgresql://user:password@host:port/dbname")
        repo, notifier = await open_with_notifier(url)
        return ServerStore(repo, notifier, "postgresql")
    if settings.hil_store == "memory":
        scratch = Path(tempfile.mkdtemp(prefix="hil-memory-store-"))
        repo, notifier = await open_with_notifier(str(scratch / REPOSITORY_FILE))
        return ServerStore(repo, notifier, "memory", scratch)
    data_dir = Path(settings.hil_data_dir)
    repo, notifier = await open_with_notifier(str(data_dir / REPOSITORY_FILE))
    try:
        await upgrade_old_store(data_dir / STORE_FILE, repo)
    except BaseException:
        await notifier.close()
        await repo.close()
        raise
    return ServerStore(repo, notifier, "sqlite")


async def upgrade_old_store(path: Path, repo: Repository) -> dict[str, int] | None:
    """Copy the old store at `path` (schema v1 or v2) into an empty repository, then rename it `*.migrated`.
    None when there is no old store."""
    if not await asyncio.to_thread(path.is_file):
        return None
    counts = await repo.table_counts()  # type: ignore[attr-defined]
    copied = None
    if not any(counts.values()):
        old = await SqlitePersistence.open(path)  # upgrades v1 to v2 first (the audit table)
        try:
            sessions, msgids = await old.load()
            events = await old.audit_rows(None, None, None, 1_000_000_000)
        finally:
            await old.close()
        copied = await repo.import_tables(old_store_tables(sessions, msgids, events))  # type: ignore[attr-defined]
        logger.warning("copied the old store %s into the repository: %s", path, copied)
    moved = path.with_name(path.name + ".migrated")
    for suffix in ("", "-wal", "-shm"):
        part = path.with_name(path.name + suffix)
        if part.exists():
            part.rename(moved.with_name(moved.name + suffix))
    logger.warning("the old store is kept as %s (a backup; remove it when you no longer need it)", moved)
    return copied


def old_store_tables(
    sessions: list[Session], msgids: dict[str, float], events: list[AuditEvent]
) -> dict[str, list[dict[str, Any]]]:
    """The repository's rows for what the old store held."""
    questions, answers = [], []
    open_short_ids: set[str] = set()
    for session in sorted(sessions, key=lambda s: s.created_at, reverse=True):
        row = question_row(session)
        if row["status"] in ("sending", "waiting"):
            if row["short_id"] in open_short_ids:  # two open questions cannot share a short id any more
                row["status"], row["closed_at"], row["error"] = "failed", session.created_at, "duplicate short id"
            open_short_ids.add(row["short_id"])
        questions.append(row)
        for reply in session.replies:
            answers.append(
                {"question_id": session.session_id, "kind": "reply", "msgid": reply.msgid, "at": reply.timestamp}
                | {"data": answer_data(reply)}
            )
        for refused in session.refused:
            answers.append(
                {"question_id": session.session_id, "kind": "refused", "msgid": None, "at": refused.at}
                | {"data": answer_data(refused)}
            )
    audit = []
    for event in events:
        item = to_item(event)
        audit.append(
            {
                "id": event.seq,
                "at": event.at,
                "kind": item.kind,
                "question_id": item.question_id,
                "short_id": item.short_id,
                "chat_id": item.chat_id,
                "owner": item.owner,
                "actor": item.actor,
                "data": json.dumps(dict(item.data), ensure_ascii=False),
            }
        )
    return {
        "questions": questions[::-1],
        "answers": answers,
        "seen_msgids": [{"msgid": m, "seen_at": at} for m, at in msgids.items()],
        "audit": audit,
    }
