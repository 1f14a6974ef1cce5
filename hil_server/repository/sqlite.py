"""The embedded repository: SQLite in WAL mode.

One writer thread owns the writing connection and runs whatever operations are queued in one transaction (group
commit, as `store.SqlitePersistence` does): each operation runs inside its own SAVEPOINT, so one that fails (a
duplicate, a lost race, a bug) is rolled back alone while the others commit; many concurrent writes cost one commit,
and the event loop never touches the disk. Every operation is a read-modify-write run by that one thread, so it is
serialized with every other write: the conditional updates cannot interleave. Reads use a second connection in
a reader thread; WAL lets them run while the writer commits, and they see every write whose call has returned.
After a commit the repository calls `notify(key)` on the event loop for each question (or outbox row) it changed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hil_protocol.messages import new_short_id

from ..lifecycle import AWAITABLE, CLOSED, MATCHABLE, OPEN, TIMED, Status, Timer, sources
from ..models import Refused, Reply, Session
from . import schema
from .base import (
    OUTBOX_KEY,
    SHORT_ID_ATTEMPTS,
    AuditItem,
    AuditRow,
    CloseRule,
    OutboxItem,
    OutboxRow,
    Purged,
    ReplyResult,
    StoredQuestion,
    answer_data,
    audit_about,
    outbox_key,
    question_from,
    question_row,
    with_answer,
    with_unclear,
)
from .errors import Conflict, NotFound, RepositoryError, RepositoryUnavailable, SchemaTooNew, ShortIdExhausted

logger = logging.getLogger(__name__)

T = TypeVar("T")
READER_THREADS = 3
_Item = tuple[Callable[["_Tx"], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]


class _Tx:
    """One operation's view of the writer's transaction: its connection, and the keys to ring after the commit."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.keys: list[str] = []

    def notify(self, key: str) -> None:
        self.keys.append(key)


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" for _ in values)


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(f"the database refused the change: {exc}")
    if isinstance(exc, sqlite3.Error):
        # disk full or failing, read-only, locked past the timeout, a corrupt file: nothing of it was applied
        return RepositoryUnavailable(f"the SQLite database cannot write ({type(exc).__name__}: {exc})"[:300])
    return exc


class SqliteRepository:
    """Open it with `await SqliteRepository.open(path)`."""

    def __init__(
        self,
        path: Path,
        *,
        notify: Callable[[str], None] | None = None,
        short_ids: Callable[[], str] = new_short_id,
    ) -> None:
        # Blocking: call through open(), which runs this in a thread.
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._notify = notify
        self._short_ids = short_ids
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._conn = self._connect()
        try:
            self._migrate()
        except BaseException:
            self._conn.close()
            raise
        self._closed = False
        # Readers: a few threads, each with its own connection (SQLite runs a query without the GIL, and WAL lets
        # them read while the writer commits), so one callback's read does not queue behind another's.
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=READER_THREADS, thread_name_prefix="hil-sqlite-reader"
        )
        self._thread = threading.Thread(target=self._run, name="hil-sqlite-writer", daemon=True)
        self._thread.start()

    @classmethod
    async def open(
        cls, path: Path, *, notify: Callable[[str], None] | None = None, short_ids: Callable[[], str] = new_short_id
    ) -> SqliteRepository:
        try:
            return await asyncio.to_thread(cls, path, notify=notify, short_ids=short_ids)
        except sqlite3.Error as exc:
            raise RepositoryUnavailable(f"cannot open the SQLite database {path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5.0)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); only a power loss may drop the last commits.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _migrate(self) -> None:
        conn = self._conn
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at REAL)")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
            if version > len(schema.SQLITE):
                raise SchemaTooNew(
                    f"{self.path} has schema version {version}, newer than this hil-server ({len(schema.SQLITE)}); "
                    "upgrade hil-server"
                )
            for number in range(version + 1, len(schema.SQLITE) + 1):
                for statement in schema.SQLITE[number - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (number, time.time()))
                logger.info("sqlite schema migrated to version %d (%s)", number, self.path)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join, 10)
        await asyncio.to_thread(self._conn.close)
        self._reader.shutdown(wait=True)
        for conn in self._reader_conns:
            await asyncio.to_thread(conn.close)

    async def ping(self) -> None:
        def probe(tx: _Tx) -> None:
            tx.conn.execute(
                "INSERT OR REPLACE INTO schema_version (version, applied_at) SELECT max(version), ? "
                "FROM schema_version",
                (time.time(),),
            )

        await self._write(probe)

    # --- plumbing ----------------------------------------------------------------------------------------------

    async def _write(self, fn: Callable[[_Tx], T]) -> T:
        if self._closed:  # the writer has stopped: a queued operation would wait forever
            raise RepositoryUnavailable("the SQLite repository is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, future, loop))
        return await future

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
            if conn is None:
                conn = self._reader_local.conn = self._connect()
                self._reader_conns.append(conn)
            try:
                return fn(conn)
            except sqlite3.Error as exc:
                raise _translate(exc) from exc

        return await asyncio.get_running_loop().run_in_executor(self._reader, run)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._process(batch)
            if stop:
                return

    def _process(self, batch: list[_Item]) -> None:
        conn = self._conn
        done: list[tuple[_Item, Any, BaseException | None, list[str]]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            error = _translate(exc)
            for item in batch:
                self._settle(item, None, error)
            return
        for item in batch:
            tx = _Tx(conn)
            try:
                conn.execute("SAVEPOINT op")
                result = item[0](tx)
                conn.execute("RELEASE op")
            # Whatever one operation raises (a duplicate, a lost race, a bug in a close rule) is handed to its caller
            # and undoes that operation alone; the batch's other operations still commit.
            except Exception as exc:  # noqa: BLE001
                try:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                except sqlite3.Error:
                    pass
                done.append((item, None, _translate(exc), []))
            else:
                done.append((item, result, None, tx.keys))
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            logger.error("sqlite commit failed: %s", exc)
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            error = _translate(exc)
            done = [(item, None, error if err is None else err, []) for item, _, err, _ in done]
        # One wake-up of each event loop per batch, not one per operation.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        keys_by_loop: dict[asyncio.AbstractEventLoop, list[str]] = {}
        for (_, future, loop), result, err, keys in done:
            by_loop.setdefault(loop, []).append((future, result, err))
            keys_by_loop.setdefault(loop, []).extend(keys)
        for loop, settled in by_loop.items():
            loop.call_soon_threadsafe(self._deliver, settled, keys_by_loop[loop])

    def _deliver(self, settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]], keys: list[str]) -> None:
        if self._notify is not None:
            for key in dict.fromkeys(keys):
                self._notify(key)
        for future, result, error in settled:
            _set(future, result, error)

    @staticmethod
    def _settle(item: _Item, result: Any, error: BaseException | None) -> None:
        _, future, loop = item
        loop.call_soon_threadsafe(_set, future, result, error)

    # --- copying the whole store (the upgrade from the old store, `hil-server store migrate`) -----------------

    async def table_counts(self) -> dict[str, int]:
        def read(conn: sqlite3.Connection) -> dict[str, int]:
            return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in schema.TABLES}

        return await self._read(read)

    async def export_tables(self) -> dict[str, list[dict[str, Any]]]:
        """Every row of every table (`schema.TABLES`), in insertion order."""

        def read(conn: sqlite3.Connection) -> dict[str, list[dict[str, Any]]]:
            return {
                t: [
                    dict(r)
                    for r in conn.execute(f"SELECT {', '.join(cols)} FROM {t} ORDER BY {schema.EXPORT_ORDER[t]}")
                ]
                for t, cols in schema.TABLES.items()
            }

        return await self._read(read)

    async def import_tables(self, tables: dict[str, list[dict[str, Any]]], *, force: bool = False) -> dict[str, int]:
        """Insert these rows (columns of `schema.TABLES`; `id` may be left out) in one transaction. Raises Conflict
        when the repository holds any row, unless `force` (then everything it held is deleted first)."""

        def op(tx: _Tx) -> dict[str, int]:
            held = {t for t in schema.TABLES if tx.conn.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone()}
            if held and not force:
                raise Conflict(f"the target is not empty (it holds {', '.join(sorted(held))})")
            for table in reversed(schema.TABLES):
                tx.conn.execute(f"DELETE FROM {table}")
            counts = {}
            for table, allowed in schema.TABLES.items():
                rows = tables.get(table, [])
                for row in rows:
                    cols = [c for c in allowed if c in row]
                    tx.conn.execute(
                        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({_marks(cols)})", [row[c] for c in cols]
                    )
                counts[table] = len(rows)
            return counts

        return await self._write(op)

    # --- questions ---------------------------------------------------------------------------------------------

    async def create_question(
        self, question: Session, *, outbox: Sequence[OutboxItem] = (), audit: Sequence[AuditItem] = ()
    ) -> StoredQuestion:
        row = question_row(question)
        columns = list(row)
        insert = (
            f"INSERT INTO questions ({', '.join(columns)}) VALUES ({_marks(columns)}) "
            f"ON CONFLICT (short_id) WHERE status IN {schema.OPEN_STATUSES_IN_INDEX!r} DO NOTHING"
        )

        def op(tx: _Tx) -> StoredQuestion:
            for _ in range(SHORT_ID_ATTEMPTS):
                row["short_id"] = self._short_ids()
                if tx.conn.execute(insert, [row[c] for c in columns]).rowcount == 1:
                    break
            else:
                raise ShortIdExhausted(f"no free short id after {SHORT_ID_ATTEMPTS} attempts")
            _enqueue(tx, outbox, question.created_at, default_question=row["id"])
            created = _load(tx.conn, row["id"])
            _audit(tx, audit, question.created_at, created)
            tx.notify(row["id"])
            return created

        return await self._write(op)

    async def get(self, question_id: str) -> StoredQuestion | None:
        return await self._read(lambda conn: _get(conn, question_id))

    async def find(self, ref: str) -> StoredQuestion | None:
        def read(conn: sqlite3.Connection) -> StoredQuestion | None:
            found = _get(conn, ref)
            if found is not None:
                return found
            open_ = list(OPEN)
            rows = conn.execute(
                f"SELECT * FROM questions WHERE short_id = ? ORDER BY status IN ({_marks(open_)}) DESC, "
                "created_at DESC LIMIT 1",
                [ref, *open_],
            ).fetchall()
            return _with_answers(conn, rows)[0] if rows else None

        return await self._read(read)

    async def transition(
        self,
        question_id: str,
        target: Status,
        *,
        now: float,
        error: str | None = None,
        deadline: float | None = None,
        outbox: Sequence[OutboxItem] = (),
        audit: Sequence[AuditItem] = (),
    ) -> StoredQuestion | None:
        target = Status(target)
        guard = list(sources(target))

        def op(tx: _Tx) -> StoredQuestion | None:
            changed = tx.conn.execute(
                "UPDATE questions SET status = ?, closed_at = ?, error = coalesce(?, error), "
                f"deadline = coalesce(?, deadline) WHERE id = ? AND status IN ({_marks(guard)})",
                [target.value, now if target in CLOSED else None, error, deadline, question_id, *guard],
            ).rowcount
            if not changed:
                return None
            _enqueue(tx, outbox, now, default_question=question_id)
            changed_question = _load(tx.conn, question_id)
            _audit(tx, audit, now, changed_question)
            tx.notify(question_id)
            return changed_question

        return await self._write(op)

    async def record_reply(
        self,
        question_id: str,
        reply: Reply,
        *,
        now: float,
        close: CloseRule | None = None,
        outbox: Sequence[OutboxItem] = (),
        audit: Sequence[AuditItem] = (),
        closing_audit: Callable[[StoredQuestion], Sequence[AuditItem]] | None = None,
    ) -> ReplyResult:
        return await self._write(
            lambda tx: _record(tx, question_id, "reply", reply, reply.msgid, now, close, outbox, audit, closing_audit)
        )

    async def record_refused(
        self,
        question_id: str,
        refused: Refused,
        *,
        now: float,
        msgid: str | None = None,
        outbox: Sequence[OutboxItem] = (),
        audit: Sequence[AuditItem] = (),
    ) -> ReplyResult:
        return await self._write(
            lambda tx: _record(tx, question_id, "refused", refused, msgid, now, None, outbox, audit)
        )

    async def record_unclear(
        self, question_id: str, reply: Reply, *, now: float, keep: int, audit: Sequence[AuditItem] = ()
    ) -> ReplyResult:
        def op(tx: _Tx) -> ReplyResult:
            if not _seen(tx, reply.msgid, now):
                return ReplyResult(new=False)
            row = tx.conn.execute("SELECT data FROM questions WHERE id = ?", [question_id]).fetchone()
            if row is None:
                raise NotFound(f"no question {question_id}")
            tx.conn.execute(
                "UPDATE questions SET data = ? WHERE id = ?", [with_unclear(row["data"], reply, keep), question_id]
            )
            question = _load(tx.conn, question_id)
            _audit(tx, audit, now, question)
            tx.notify(question_id)
            return ReplyResult(new=True, question=question)

        return await self._write(op)

    async def record_msgid(
        self, msgid: str, *, now: float, outbox: Sequence[OutboxItem] = (), audit: Sequence[AuditItem] = ()
    ) -> bool:
        def op(tx: _Tx) -> bool:
            if not _seen(tx, msgid, now):
                return False
            _enqueue(tx, outbox, now)
            _audit(tx, audit, now)
            return True

        return await self._write(op)

    async def set_timers(
        self,
        question_id: str,
        *,
        now: float,
        next_remind_at: float | None = None,
        reminders_sent: int | None = None,
        escalate_at: float | None = None,
        outbox: Sequence[OutboxItem] = (),
        audit: Sequence[AuditItem] = (),
    ) -> bool:
        timed = list(TIMED)

        def op(tx: _Tx) -> bool:
            changed = tx.conn.execute(
                "UPDATE questions SET next_remind_at = ?, reminders_sent = coalesce(?, reminders_sent), "
                f"escalate_at = ? WHERE id = ? AND status IN ({_marks(timed)})",
                [next_remind_at, reminders_sent, escalate_at, question_id, *timed],
            ).rowcount
            if not changed:
                return False
            _enqueue(tx, outbox, now, default_question=question_id)
            _audit(tx, audit, now)
            return True

        return await self._write(op)

    async def open_in_chat(self, chat_id: str | None) -> list[StoredQuestion]:
        statuses = list(MATCHABLE)
        return await self._read(
            lambda conn: _with_answers(
                conn,
                conn.execute(
                    f"SELECT * FROM questions WHERE status IN ({_marks(statuses)}) "
                    "AND (chat_id = ? OR chat_id IS NULL) ORDER BY created_at",
                    [*statuses, chat_id],
                ).fetchall(),
            )
        )

    async def due(self, now: float, timer: Timer = Timer.DEADLINE, limit: int = 100) -> list[StoredQuestion]:
        column = Timer(timer).value  # a column name from the enum, never from a caller's string
        timed = list(TIMED)
        return await self._read(
            lambda conn: _with_answers(
                conn,
                conn.execute(
                    f"SELECT * FROM questions WHERE status IN ({_marks(timed)}) AND {column} <= ? "
                    f"ORDER BY {column} LIMIT ?",
                    [*timed, now, limit],
                ).fetchall(),
            )
        )

    async def newest_open(self, owner: str | None) -> StoredQuestion | None:
        statuses = list(AWAITABLE)

        def read(conn: sqlite3.Connection) -> StoredQuestion | None:
            rows = conn.execute(
                f"SELECT * FROM questions WHERE owner IS ? AND status IN ({_marks(statuses)}) "
                "ORDER BY created_at DESC LIMIT 1",
                [owner, *statuses],
            ).fetchall()
            return _with_answers(conn, rows)[0] if rows else None

        return await self._read(read)

    async def questions(self, *, statuses: Sequence[Status] | None = None, limit: int = 200) -> list[StoredQuestion]:
        def read(conn: sqlite3.Connection) -> list[StoredQuestion]:
            if statuses is None:
                rows = conn.execute("SELECT * FROM questions ORDER BY created_at DESC LIMIT ?", [limit]).fetchall()
            else:
                wanted = [Status(s).value for s in statuses]
                rows = conn.execute(
                    f"SELECT * FROM questions WHERE status IN ({_marks(wanted)}) ORDER BY created_at DESC LIMIT ?",
                    [*wanted, limit],
                ).fetchall()
            return _with_answers(conn, rows)

        return await self._read(read)

    async def counts(self) -> dict[Status, int]:
        rows = await self._read(
            lambda conn: conn.execute("SELECT status, count(*) FROM questions GROUP BY status").fetchall()
        )
        return {Status(status): n for status, n in rows}

    async def purge(
        self,
        *,
        closed_before: float,
        msgids_before: float,
        outbox_before: float | None = None,
        audit_before: float | None = None,
    ) -> Purged:
        closed = list(CLOSED)

        def op(tx: _Tx) -> Purged:
            c = tx.conn
            questions = c.execute(
                f"DELETE FROM questions WHERE status IN ({_marks(closed)}) AND coalesce(closed_at, created_at) < ?",
                [*closed, closed_before],
            ).rowcount
            msgids = c.execute("DELETE FROM seen_msgids WHERE seen_at < ?", [msgids_before]).rowcount
            outbox = 0
            if outbox_before is not None:
                outbox = c.execute(
                    "DELETE FROM outbox WHERE state IN ('done', 'failed', 'abandoned') AND finished_at < ?",
                    [outbox_before],
                ).rowcount
            audit = 0
            if audit_before is not None:
                audit = c.execute("DELETE FROM audit WHERE at < ?", [audit_before]).rowcount
            return Purged(questions, msgids, outbox, audit)

        return await self._write(op)

    # --- outbox ------------------------------------------------------------------------------------------------

    async def enqueue(self, items: Sequence[OutboxItem], *, now: float) -> list[int]:
        return await self._write(lambda tx: _enqueue(tx, items, now))

    async def claim_outbox(
        self, holder: str, *, now: float, lease: float, limit: int = 1, kinds: Sequence[str] | None = None
    ) -> list[OutboxRow]:
        kind_filter = f"AND o.kind IN ({_marks(kinds)})" if kinds else ""

        def op(tx: _Tx) -> list[OutboxRow]:
            rows = tx.conn.execute(
                "UPDATE outbox SET state = 'claimed', holder = ?, lease_until = ?, attempts = attempts + 1 "
                "WHERE id IN (SELECT o.id FROM outbox o WHERE o.state = 'pending' AND o.available_at <= ? "
                f"{kind_filter} AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.chat_key = o.chat_key "
                "AND p.id < o.id AND p.state IN ('pending', 'claimed')) ORDER BY o.id LIMIT ?) RETURNING *",
                [holder, now + lease, now, *(kinds or ()), limit],
            ).fetchall()
            return sorted((_outbox_row(r) for r in rows), key=lambda r: r.id)

        return await self._write(op)

    async def extend_claim(self, outbox_id: int, holder: str, *, now: float, lease: float) -> bool:
        return await self._write(
            lambda tx: (
                tx.conn.execute(
                    "UPDATE outbox SET lease_until = ? WHERE id = ? AND state = 'claimed' AND holder = ?",
                    [now + lease, outbox_id, holder],
                ).rowcount
                == 1
            )
        )

    async def complete_outbox(
        self, outbox_id: int, holder: str, *, now: float, audit: Sequence[AuditItem] = ()
    ) -> bool:
        def op(tx: _Tx) -> bool:
            changed = tx.conn.execute(
                "UPDATE outbox SET state = 'done', finished_at = ?, lease_until = NULL "
                "WHERE id = ? AND state = 'claimed' AND holder = ?",
                [now, outbox_id, holder],
            ).rowcount
            if changed:
                _audit(tx, audit, now)
                tx.notify(outbox_key(outbox_id))
                tx.notify(OUTBOX_KEY)  # the next row of its chat may be claimed now
            return changed == 1

        return await self._write(op)

    async def fail_outbox(
        self, outbox_id: int, holder: str, *, now: float, error: str, retry_at: float | None = None
    ) -> bool:
        def op(tx: _Tx) -> bool:
            if retry_at is None:
                sql = "state = 'failed', finished_at = ?, lease_until = NULL, error = ?"
                args: list[Any] = [now, error]
            else:
                sql = "state = 'pending', available_at = ?, holder = NULL, lease_until = NULL, error = ?"
                args = [retry_at, error]
            changed = tx.conn.execute(
                f"UPDATE outbox SET {sql} WHERE id = ? AND state = 'claimed' AND holder = ?",
                [*args, outbox_id, holder],
            ).rowcount
            if changed:
                tx.notify(outbox_key(outbox_id) if retry_at is None else OUTBOX_KEY)
                if retry_at is None:
                    tx.notify(OUTBOX_KEY)
            return changed == 1

        return await self._write(op)

    async def expired_claims(self, now: float, limit: int = 100) -> list[OutboxRow]:
        rows = await self._read(
            lambda conn: conn.execute(
                "SELECT * FROM outbox WHERE state = 'claimed' AND lease_until < ? ORDER BY id LIMIT ?", [now, limit]
            ).fetchall()
        )
        return [_outbox_row(r) for r in rows]

    async def abandon_claim(
        self,
        outbox_id: int,
        *,
        now: float,
        error: str,
        outbox: Sequence[OutboxItem] = (),
        audit: Sequence[AuditItem] = (),
    ) -> bool:
        def op(tx: _Tx) -> bool:
            won = tx.conn.execute(
                "UPDATE outbox SET state = 'abandoned', finished_at = ?, error = ? "
                "WHERE id = ? AND state = 'claimed' AND lease_until < ? RETURNING question_id",
                [now, error, outbox_id, now],
            ).fetchall()
            if not won:
                return False
            _enqueue(tx, outbox, now, default_question=won[0]["question_id"])
            _audit(tx, audit, now)
            tx.notify(outbox_key(outbox_id))
            tx.notify(OUTBOX_KEY)
            return True

        return await self._write(op)

    async def get_outbox(self, outbox_id: int) -> OutboxRow | None:
        rows = await self._read(lambda conn: conn.execute("SELECT * FROM outbox WHERE id = ?", [outbox_id]).fetchall())
        return _outbox_row(rows[0]) if rows else None

    # --- audit -------------------------------------------------------------------------------------------------

    async def append_audit(self, items: Sequence[AuditItem], *, now: float) -> None:
        await self._write(lambda tx: _audit(tx, items, now))

    async def audit(
        self,
        *,
        since: float | None = None,
        chat_id: str | None = None,
        owner: str | None = None,
        question_id: str | None = None,
        limit: int = 1000,
    ) -> list[AuditRow]:
        where, args = ["1 = 1"], []
        for column, value in (("chat_id", chat_id), ("owner", owner), ("question_id", question_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("at >= ?")
            args.append(since)
        rows = await self._read(
            lambda conn: conn.execute(
                f"SELECT * FROM audit WHERE {' AND '.join(where)} ORDER BY id LIMIT ?", [*args, limit]
            ).fetchall()
        )
        return [_audit_row(r) for r in rows]


# --- the operations' SQL, run in the writer (or reader) thread ------------------------------------------------


def _set(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _get(conn: sqlite3.Connection, question_id: str) -> StoredQuestion | None:
    rows = conn.execute("SELECT * FROM questions WHERE id = ?", [question_id]).fetchall()
    return _with_answers(conn, rows)[0] if rows else None


def _load(conn: sqlite3.Connection, question_id: str) -> StoredQuestion:
    found = _get(conn, question_id)
    if found is None:
        raise NotFound(f"no question {question_id}")
    return found


def _with_answers(conn: sqlite3.Connection, rows: list[sqlite3.Row]) -> list[StoredQuestion]:
    if not rows:
        return []
    ids = [r["id"] for r in rows]
    answers: dict[str, list[tuple[str, str]]] = {}
    for chunk in range(0, len(ids), 500):
        part = ids[chunk : chunk + 500]
        for qid, kind, data in conn.execute(
            f"SELECT question_id, kind, data FROM answers WHERE question_id IN ({_marks(part)}) ORDER BY id", part
        ):
            answers.setdefault(qid, []).append((kind, data))
    return [question_from(r, answers.get(r["id"], ())) for r in rows]


def _seen(tx: _Tx, msgid: str | None, now: float) -> bool:
    """Record a msgid; False when it was recorded before (the unique key decides, not a read)."""
    if not msgid:
        return True
    return (
        tx.conn.execute(
            "INSERT INTO seen_msgids (msgid, seen_at) VALUES (?, ?) ON CONFLICT (msgid) DO NOTHING", [msgid, now]
        ).rowcount
        == 1
    )


def _record(
    tx: _Tx,
    question_id: str,
    kind: str,
    answer: Reply | Refused,
    msgid: str | None,
    now: float,
    close: CloseRule | None,
    outbox: Sequence[OutboxItem],
    audit: Sequence[AuditItem],
    closing_audit: Callable[[StoredQuestion], Sequence[AuditItem]] | None = None,
) -> ReplyResult:
    if not _seen(tx, msgid, now):
        return ReplyResult(new=False)
    question = _load(tx.conn, question_id)
    tx.conn.execute(
        "INSERT INTO answers (question_id, kind, msgid, at, data) VALUES (?, ?, ?, ?, ?)",
        [question_id, kind, msgid, now, answer_data(answer)],
    )
    question = with_answer(question, kind, answer)
    closed = False
    if close is not None and question.status in sources(Status.REPLIED) and close(question):
        tx.conn.execute(
            "UPDATE questions SET status = ?, closed_at = ? WHERE id = ?", [Status.REPLIED.value, now, question_id]
        )
        question = question.model_copy(update={"status": Status.REPLIED, "closed_at": now})
        closed = True
        if closing_audit is not None:  # the record of the decision, in the transaction that made it
            audit = [*audit, *closing_audit(question)]
    _enqueue(tx, outbox, now, default_question=question_id)
    _audit(tx, audit, now, question)
    tx.notify(question_id)
    return ReplyResult(new=True, closed=closed, question=question)


def _enqueue(tx: _Tx, items: Sequence[OutboxItem], now: float, default_question: str | None = None) -> list[int]:
    ids = []
    for item in items:
        (outbox_id,) = tx.conn.execute(
            "INSERT INTO outbox (kind, payload, chat_key, chat_id, question_id, created_at, available_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            [
                item.kind,
                json.dumps(dict(item.payload), ensure_ascii=False),
                item.chat_id or "",
                item.chat_id,
                item.question_id or default_question,
                now,
                now if item.available_at is None else item.available_at,
            ],
        ).fetchone()
        ids.append(outbox_id)
    if ids:
        tx.notify(OUTBOX_KEY)
    return ids


def _audit(tx: _Tx, items: Sequence[AuditItem], now: float, question: StoredQuestion | None = None) -> None:
    """Audit rows about a question name it (id, short id, chat, owner) unless they say otherwise."""
    for item in items:
        if question is not None:
            item = audit_about(item, question)
        tx.conn.execute(
            "INSERT INTO audit (at, kind, question_id, short_id, chat_id, owner, actor, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                now,
                item.kind,
                item.question_id,
                item.short_id,
                item.chat_id,
                item.owner,
                item.actor,
                json.dumps(dict(item.data), ensure_ascii=False),
            ],
        )


def _outbox_row(r: sqlite3.Row) -> OutboxRow:
    return OutboxRow(
        id=r["id"],
        kind=r["kind"],
        payload=json.loads(r["payload"]),
        chat_id=r["chat_id"],
        question_id=r["question_id"],
        state=r["state"],
        created_at=r["created_at"],
        available_at=r["available_at"],
        attempts=r["attempts"],
        holder=r["holder"],
        lease_until=r["lease_until"],
        error=r["error"],
    )


def _audit_row(r: sqlite3.Row) -> AuditRow:
    return AuditRow(
        id=r["id"],
        at=r["at"],
        kind=r["kind"],
        question_id=r["question_id"],
        short_id=r["short_id"],
        chat_id=r["chat_id"],
        owner=r["owner"],
        actor=r["actor"],
        data=json.loads(r["data"]),
    )


__all__ = ["RepositoryError", "SqliteRepository"]
