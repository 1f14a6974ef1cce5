"""The networked repository: PostgreSQL through psycopg 3 (async) and a psycopg_pool `AsyncConnectionPool`.

Each write is one transaction on a pooled connection. Races are settled by the database, not by this process: a
conditional update re-checks its guard on the row version it wins (READ COMMITTED), `record_reply` locks the
question's row (`FOR UPDATE`) before it reads the replies it decides on, msgids and open short ids are unique keys,
and outbox rows are claimed with `FOR UPDATE SKIP LOCKED`. The keys of what changed are sent with `pg_notify`
inside the same transaction, so a listener hears of a change exactly when it is committed (notifier.PgNotifier).

Pooled connections are checked before use (`check_connection`), so one the server dropped (a restart, an idle
timeout, `pg_terminate_backend`) is replaced instead of failing the next operation; a connection lost during an
operation fails that operation with RepositoryUnavailable and the server rolls its transaction back.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

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
Conn = psycopg.AsyncConnection[dict[str, Any]]

DEFAULT_CHANNEL = "hil_changes"
# Replicas starting together migrate once: the first holds this advisory lock while the others wait.
_MIGRATION_LOCK = 0x68696C5F  # "hil_"
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.errors.ReadOnlySqlTransaction, PoolTimeout)


def _list(statuses: Any) -> list[str]:
    return [Status(s).value for s in statuses]


class _Tx:
    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.keys: list[str] = []

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> psycopg.AsyncCursor[dict[str, Any]]:
        return await self.conn.execute(sql, args)  # type: ignore[arg-type]

    def notify(self, key: str) -> None:
        self.keys.append(key)


class PostgresRepository:
    """Open it with `await PostgresRepository.open(url)`; `channel` is the NOTIFY channel (one per deployment)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Conn],
        *,
        channel: str = DEFAULT_CHANNEL,
        short_ids: Callable[[], str] = new_short_id,
        timeout: float = 5.0,
    ) -> None:
        self._pool = pool
        self.channel = channel
        self._short_ids = short_ids
        self._timeout = timeout

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        channel: str = DEFAULT_CHANNEL,
        short_ids: Callable[[], str] = new_short_id,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
    ) -> PostgresRepository:
        """Connect, migrate the schema, and return the repository. `timeout`: how long an operation waits for a
        connection (while the database is down, operations fail after it with RepositoryUnavailable)."""
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            open=False,
            timeout=timeout,
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": max(2, int(timeout))},
            check=AsyncConnectionPool.check_connection,
            name="hil",
        )
        try:
            await pool.open(wait=True, timeout=timeout)
        except _UNAVAILABLE as exc:
            await pool.close()
            raise RepositoryUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        repo = cls(pool, channel=channel, short_ids=short_ids, timeout=timeout)
        try:
            await repo._migrate()
        except BaseException:
            await pool.close()
            raise
        return repo

    async def _migrate(self) -> None:
        async def op(tx: _Tx) -> None:
            await tx.execute("SELECT pg_advisory_xact_lock(%s)", [_MIGRATION_LOCK])
            await tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, applied_at double precision)"
            )
            row = await (await tx.execute("SELECT coalesce(max(version), 0) AS v FROM schema_version")).fetchone()
            version = row["v"] if row else 0
            if version > len(schema.POSTGRES):
                raise SchemaTooNew(
                    f"the database has schema version {version}, newer than this hil-server "
                    f"({len(schema.POSTGRES)}); upgrade hil-server"
                )
            for number in range(version + 1, len(schema.POSTGRES) + 1):
                await tx.conn.execute(schema.POSTGRES[number - 1])  # several statements: no parameters
                await tx.execute("INSERT INTO schema_version VALUES (%s, %s)", [number, time.time()])
                logger.info("postgres schema migrated to version %d", number)

        await self._tx(op)

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> None:
        async def op(tx: _Tx) -> None:
            # a write, so a read-only or full database says so
            await tx.execute("UPDATE schema_version SET applied_at = applied_at WHERE version = 1")

        await self._tx(op)

    # --- plumbing ----------------------------------------------------------------------------------------------

    async def _tx(self, fn: Callable[[_Tx], Awaitable[T]], *, write: bool = True) -> T:
        """Run `fn` in a transaction (a read: one statement in autocommit, no BEGIN/COMMIT round trips), then send
        the keys it rang with `pg_notify` in the same transaction, so they are heard at its commit."""
        try:
            async with self._pool.connection(timeout=self._timeout) as conn:
                if not write:
                    return await fn(_Tx(conn))
                async with conn.transaction():
                    tx = _Tx(conn)
                    result = await fn(tx)
                    if tx.keys:
                        await conn.execute(
                            "SELECT pg_notify(%s, key) FROM unnest(%s::text[]) AS key",
                            [self.channel, list(dict.fromkeys(tx.keys))],
                        )
                return result
        except psycopg.errors.IntegrityError as exc:
            raise Conflict(f"the database refused the change: {exc}") from exc
        except _UNAVAILABLE as exc:
            raise RepositoryUnavailable(f"PostgreSQL is unavailable ({type(exc).__name__}: {exc})"[:300]) from exc
        except psycopg.Error as exc:
            raise RepositoryError(f"PostgreSQL refused an operation ({type(exc).__name__}: {exc})"[:300]) from exc

    async def _read(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        async def op(tx: _Tx) -> list[dict[str, Any]]:
            return await (await tx.execute(sql, args)).fetchall()

        return await self._tx(op, write=False)

    async def _questions(self, where: str, args: Sequence[Any] = ()) -> list[StoredQuestion]:
        """Questions with their answers: `where` follows `SELECT … FROM questions q`."""
        return await self._tx(lambda tx: _fetch_questions(tx, f"{_SELECT} {where}", args), write=False)

    # --- copying the whole store (`hil-server store migrate`) --------------------------------------------------

    async def table_counts(self) -> dict[str, int]:
        async def op(tx: _Tx) -> dict[str, int]:
            counts = {}
            for table in schema.TABLES:
                row = await (await tx.execute(f"SELECT count(*) AS n FROM {table}")).fetchone()
                counts[table] = row["n"] if row else 0
            return counts

        return await self._tx(op, write=False)

    async def export_tables(self) -> dict[str, list[dict[str, Any]]]:
        async def op(tx: _Tx) -> dict[str, list[dict[str, Any]]]:
            out = {}
            for table, cols in schema.TABLES.items():
                order = schema.EXPORT_ORDER[table]
                out[table] = await (
                    await tx.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY {order}")
                ).fetchall()
            return out

        return await self._tx(op, write=False)

    async def import_tables(self, tables: dict[str, list[dict[str, Any]]], *, force: bool = False) -> dict[str, int]:
        """As SqliteRepository.import_tables: one transaction; Conflict on a non-empty target unless `force`. Ids
        are kept, and each identity moves past the highest copied."""

        async def op(tx: _Tx) -> dict[str, int]:
            held = []
            for table in schema.TABLES:
                if await (await tx.execute(f"SELECT 1 FROM {table} LIMIT 1")).fetchone() is not None:
                    held.append(table)
            if held and not force:
                raise Conflict(f"the target is not empty (it holds {', '.join(sorted(held))})")
            await tx.execute(f"TRUNCATE {', '.join(schema.TABLES)}")
            counts = {}
            for table, allowed in schema.TABLES.items():
                rows = tables.get(table, [])
                for row in rows:
                    cols = [c for c in allowed if c in row]
                    overriding = " OVERRIDING SYSTEM VALUE" if "id" in cols and table in schema.SERIAL_TABLES else ""
                    marks = ", ".join("%s" for _ in cols)
                    await tx.execute(
                        f"INSERT INTO {table} ({', '.join(cols)}){overriding} VALUES ({marks})", [row[c] for c in cols]
                    )
                counts[table] = len(rows)
            for table in schema.SERIAL_TABLES:
                await tx.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), coalesce(max(id), 0) + 1, false) "
                    f"FROM {table}"
                )
            return counts

        return await self._tx(op)

    # --- questions ---------------------------------------------------------------------------------------------

    async def create_question(
        self, question: Session, *, outbox: Sequence[OutboxItem] = (), audit: Sequence[AuditItem] = ()
    ) -> StoredQuestion:
        row = question_row(question)
        columns = list(row)
        insert = (
            f"INSERT INTO questions ({', '.join(columns)}) VALUES ({', '.join('%s' for _ in columns)}) "
            f"ON CONFLICT (short_id) WHERE status IN {schema.OPEN_STATUSES_IN_INDEX!r} DO NOTHING"
        )

        async def op(tx: _Tx) -> StoredQuestion:
            for _ in range(SHORT_ID_ATTEMPTS):
                row["short_id"] = self._short_ids()
                if (await tx.execute(insert, [row[c] for c in columns])).rowcount == 1:
                    break
            else:
                raise ShortIdExhausted(f"no free short id after {SHORT_ID_ATTEMPTS} attempts")
            await _enqueue(tx, outbox, question.created_at, default_question=row["id"])
            created = await _load(tx, row["id"])
            await _audit(tx, audit, question.created_at, created)
            tx.notify(row["id"])
            return created

        return await self._tx(op)

    async def get(self, question_id: str) -> StoredQuestion | None:
        found = await self._questions("WHERE id = %s", [question_id])
        return found[0] if found else None

    async def find(self, ref: str) -> StoredQuestion | None:
        found = await self._questions(
            "WHERE id = %s OR short_id = %s ORDER BY id = %s DESC, status = ANY(%s) DESC, created_at DESC LIMIT 1",
            [ref, ref, ref, _list(OPEN)],
        )
        return found[0] if found else None

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

        async def op(tx: _Tx) -> StoredQuestion | None:
            changed = (
                await tx.execute(
                    "UPDATE questions SET status = %s, closed_at = %s, error = coalesce(%s, error), "
                    "deadline = coalesce(%s, deadline) WHERE id = %s AND status = ANY(%s)",
                    [
                        target.value,
                        now if target in CLOSED else None,
                        error,
                        deadline,
                        question_id,
                        _list(sources(target)),
                    ],
                )
            ).rowcount
            if not changed:
                return None
            await _enqueue(tx, outbox, now, default_question=question_id)
            changed_question = await _load(tx, question_id)
            await _audit(tx, audit, now, changed_question)
            tx.notify(question_id)
            return changed_question

        return await self._tx(op)

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
        return await self._tx(
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
        return await self._tx(lambda tx: _record(tx, question_id, "refused", refused, msgid, now, None, outbox, audit))

    async def record_unclear(
        self, question_id: str, reply: Reply, *, now: float, keep: int, audit: Sequence[AuditItem] = ()
    ) -> ReplyResult:
        async def op(tx: _Tx) -> ReplyResult:
            if not await _seen(tx, reply.msgid, now):
                return ReplyResult(new=False)
            cur = await tx.execute("SELECT data FROM questions WHERE id = %s FOR UPDATE", [question_id])
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"no question {question_id}")
            await tx.execute(
                "UPDATE questions SET data = %s WHERE id = %s", [with_unclear(row["data"], reply, keep), question_id]
            )
            (question,) = await _fetch_questions(tx, f"{_SELECT} WHERE id = %s", [question_id])
            await _audit(tx, audit, now, question)
            tx.notify(question_id)
            return ReplyResult(new=True, question=question)

        return await self._tx(op)

    async def record_msgid(
        self, msgid: str, *, now: float, outbox: Sequence[OutboxItem] = (), audit: Sequence[AuditItem] = ()
    ) -> bool:
        async def op(tx: _Tx) -> bool:
            if not await _seen(tx, msgid, now):
                return False
            await _enqueue(tx, outbox, now)
            await _audit(tx, audit, now)
            return True

        return await self._tx(op)

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
        async def op(tx: _Tx) -> bool:
            changed = (
                await tx.execute(
                    "UPDATE questions SET next_remind_at = %s, reminders_sent = coalesce(%s, reminders_sent), "
                    "escalate_at = %s WHERE id = %s AND status = ANY(%s)",
                    [next_remind_at, reminders_sent, escalate_at, question_id, _list(TIMED)],
                )
            ).rowcount
            if not changed:
                return False
            await _enqueue(tx, outbox, now, default_question=question_id)
            await _audit(tx, audit, now)
            return True

        return await self._tx(op)

    async def open_in_chat(self, chat_id: str | None) -> list[StoredQuestion]:
        return await self._questions(
            "WHERE status = ANY(%s) AND (chat_id = %s OR chat_id IS NULL) ORDER BY created_at",
            [_list(MATCHABLE), chat_id],
        )

    async def due(self, now: float, timer: Timer = Timer.DEADLINE, limit: int = 100) -> list[StoredQuestion]:
        column = Timer(timer).value  # a column name from the enum, never from a caller's string
        return await self._questions(
            f"WHERE status = ANY(%s) AND {column} <= %s ORDER BY {column} LIMIT %s",
            [_list(TIMED), now, limit],
        )

    async def newest_open(self, owner: str | None) -> StoredQuestion | None:
        found = await self._questions(
            "WHERE owner IS NOT DISTINCT FROM %s::text AND status = ANY(%s) ORDER BY created_at DESC LIMIT 1",
            [owner, _list(AWAITABLE)],
        )
        return found[0] if found else None

    async def questions(self, *, statuses: Sequence[Status] | None = None, limit: int = 200) -> list[StoredQuestion]:
        if statuses is None:
            return await self._questions("ORDER BY created_at DESC LIMIT %s", [limit])
        return await self._questions(
            "WHERE status = ANY(%s) ORDER BY created_at DESC LIMIT %s",
            [_list(statuses), limit],
        )

    async def counts(self) -> dict[Status, int]:
        rows = await self._read("SELECT status, count(*) AS n FROM questions GROUP BY status")
        return {Status(r["status"]): r["n"] for r in rows}

    async def purge(
        self,
        *,
        closed_before: float,
        msgids_before: float,
        outbox_before: float | None = None,
        audit_before: float | None = None,
    ) -> Purged:
        async def op(tx: _Tx) -> Purged:
            questions = (
                await tx.execute(
                    "DELETE FROM questions WHERE status = ANY(%s) AND coalesce(closed_at, created_at) < %s",
                    [_list(CLOSED), closed_before],
                )
            ).rowcount
            msgids = (await tx.execute("DELETE FROM seen_msgids WHERE seen_at < %s", [msgids_before])).rowcount
            outbox = 0
            if outbox_before is not None:
                outbox = (
                    await tx.execute(
                        "DELETE FROM outbox WHERE state IN ('done', 'failed', 'abandoned') AND finished_at < %s",
                        [outbox_before],
                    )
                ).rowcount
            audit = 0
            if audit_before is not None:
                audit = (await tx.execute("DELETE FROM audit WHERE at < %s", [audit_before])).rowcount
            return Purged(questions, msgids, outbox, audit)

        return await self._tx(op)

    # --- outbox ------------------------------------------------------------------------------------------------

    async def enqueue(self, items: Sequence[OutboxItem], *, now: float) -> list[int]:
        return await self._tx(lambda tx: _enqueue(tx, items, now))

    async def claim_outbox(
        self, holder: str, *, now: float, lease: float, limit: int = 1, kinds: Sequence[str] | None = None
    ) -> list[OutboxRow]:
        kind_filter = "AND o.kind = ANY(%s)" if kinds else ""
        args: list[Any] = [holder, now + lease, now, *([list(kinds)] if kinds else []), limit]

        async def op(tx: _Tx) -> list[OutboxRow]:
            rows = await (
                await tx.execute(
                    "UPDATE outbox SET state = 'claimed', holder = %s, lease_until = %s, attempts = attempts + 1 "
                    "WHERE id IN (SELECT o.id FROM outbox o WHERE o.state = 'pending' AND o.available_at <= %s "
                    f"{kind_filter} AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.chat_key = o.chat_key "
                    "AND p.id < o.id AND p.state IN ('pending', 'claimed')) ORDER BY o.id LIMIT %s "
                    "FOR UPDATE SKIP LOCKED) RETURNING *",
                    args,
                )
            ).fetchall()
            return sorted((_outbox_row(r) for r in rows), key=lambda r: r.id)

        return await self._tx(op)

    async def extend_claim(self, outbox_id: int, holder: str, *, now: float, lease: float) -> bool:
        async def op(tx: _Tx) -> bool:
            cur = await tx.execute(
                "UPDATE outbox SET lease_until = %s WHERE id = %s AND state = 'claimed' AND holder = %s",
                [now + lease, outbox_id, holder],
            )
            return cur.rowcount == 1

        return await self._tx(op)

    async def complete_outbox(
        self, outbox_id: int, holder: str, *, now: float, audit: Sequence[AuditItem] = ()
    ) -> bool:
        async def op(tx: _Tx) -> bool:
            cur = await tx.execute(
                "UPDATE outbox SET state = 'done', finished_at = %s, lease_until = NULL "
                "WHERE id = %s AND state = 'claimed' AND holder = %s",
                [now, outbox_id, holder],
            )
            if cur.rowcount != 1:
                return False
            await _audit(tx, audit, now)
            tx.notify(outbox_key(outbox_id))
            tx.notify(OUTBOX_KEY)  # the next row of its chat may be claimed now
            return True

        return await self._tx(op)

    async def fail_outbox(
        self, outbox_id: int, holder: str, *, now: float, error: str, retry_at: float | None = None
    ) -> bool:
        async def op(tx: _Tx) -> bool:
            if retry_at is None:
                sql = "state = 'failed', finished_at = %s, lease_until = NULL, error = %s"
                args: list[Any] = [now, error]
            else:
                sql = "state = 'pending', available_at = %s, holder = NULL, lease_until = NULL, error = %s"
                args = [retry_at, error]
            cur = await tx.execute(
                f"UPDATE outbox SET {sql} WHERE id = %s AND state = 'claimed' AND holder = %s",
                [*args, outbox_id, holder],
            )
            if cur.rowcount != 1:
                return False
            if retry_at is None:
                tx.notify(outbox_key(outbox_id))
            tx.notify(OUTBOX_KEY)
            return True

        return await self._tx(op)

    async def expired_claims(self, now: float, limit: int = 100) -> list[OutboxRow]:
        rows = await self._read(
            "SELECT * FROM outbox WHERE state = 'claimed' AND lease_until < %s ORDER BY id LIMIT %s", [now, limit]
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
        async def op(tx: _Tx) -> bool:
            cur = await tx.execute(
                "UPDATE outbox SET state = 'abandoned', finished_at = %s, error = %s "
                "WHERE id = %s AND state = 'claimed' AND lease_until < %s RETURNING question_id",
                [now, error, outbox_id, now],
            )
            won = await cur.fetchone()
            if won is None:
                return False
            await _enqueue(tx, outbox, now, default_question=won["question_id"])
            await _audit(tx, audit, now)
            tx.notify(outbox_key(outbox_id))
            tx.notify(OUTBOX_KEY)
            return True

        return await self._tx(op)

    async def get_outbox(self, outbox_id: int) -> OutboxRow | None:
        rows = await self._read("SELECT * FROM outbox WHERE id = %s", [outbox_id])
        return _outbox_row(rows[0]) if rows else None

    # --- audit -------------------------------------------------------------------------------------------------

    async def append_audit(self, items: Sequence[AuditItem], *, now: float) -> None:
        await self._tx(lambda tx: _audit(tx, items, now))

    async def audit(
        self,
        *,
        since: float | None = None,
        chat_id: str | None = None,
        owner: str | None = None,
        question_id: str | None = None,
        limit: int = 1000,
    ) -> list[AuditRow]:
        where, args = ["TRUE"], []
        for column, value in (("chat_id", chat_id), ("owner", owner), ("question_id", question_id)):
            if value is not None:
                where.append(f"{column} = %s")
                args.append(value)
        if since is not None:
            where.append("at >= %s")
            args.append(since)
        rows = await self._read(f"SELECT * FROM audit WHERE {' AND '.join(where)} ORDER BY id LIMIT %s", [*args, limit])
        return [_audit_row(r) for r in rows]


# --- the operations' SQL ----------------------------------------------------------------------------------------


# A question with its answers in one statement (one round trip, one snapshot).
_SELECT = (
    "SELECT q.*, (SELECT coalesce(json_agg(json_build_array(a.kind, a.data) ORDER BY a.id), '[]'::json) "
    "FROM answers a WHERE a.question_id = q.id) AS answer_rows FROM questions q"
)


async def _load(tx: _Tx, question_id: str) -> StoredQuestion:
    found = await _fetch_questions(tx, f"{_SELECT} WHERE id = %s", [question_id])
    if not found:
        raise NotFound(f"no question {question_id}")
    return found[0]


async def _fetch_questions(tx: _Tx, sql: str, args: Sequence[Any]) -> list[StoredQuestion]:
    rows = await (await tx.execute(sql, args)).fetchall()
    return [question_from(r, [(kind, data) for kind, data in r["answer_rows"]]) for r in rows]


async def _seen(tx: _Tx, msgid: str | None, now: float) -> bool:
    """Record a msgid; False when it was recorded before (the unique key decides, not a read: a concurrent insert of
    the same msgid waits for ours and then does nothing)."""
    if not msgid:
        return True
    cur = await tx.execute(
        "INSERT INTO seen_msgids (msgid, seen_at) VALUES (%s, %s) ON CONFLICT (msgid) DO NOTHING", [msgid, now]
    )
    return cur.rowcount == 1


async def _record(
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
    if not await _seen(tx, msgid, now):
        return ReplyResult(new=False)
    # The row lock serializes answers to one question. The read comes after it, in a statement of its own: in READ
    # COMMITTED each statement sees what was committed when it began, so the close rule below sees every reply
    # committed before the lock was granted (a SELECT … FOR UPDATE that waited would show its older snapshot).
    if await (await tx.execute("SELECT 1 FROM questions WHERE id = %s FOR UPDATE", [question_id])).fetchone() is None:
        raise NotFound(f"no question {question_id}")
    found = await _fetch_questions(tx, f"{_SELECT} WHERE id = %s", [question_id])
    await tx.execute(
        "INSERT INTO answers (question_id, kind, msgid, at, data) VALUES (%s, %s, %s, %s, %s)",
        [question_id, kind, msgid, now, answer_data(answer)],
    )
    question = with_answer(found[0], kind, answer)
    closed = False
    if close is not None and question.status in sources(Status.REPLIED) and close(question):
        await tx.execute(
            "UPDATE questions SET status = %s, closed_at = %s WHERE id = %s",
            [Status.REPLIED.value, now, question_id],
        )
        question = question.model_copy(update={"status": Status.REPLIED, "closed_at": now})
        closed = True
        if closing_audit is not None:  # the record of the decision, in the transaction that made it
            audit = [*audit, *closing_audit(question)]
    await _enqueue(tx, outbox, now, default_question=question_id)
    await _audit(tx, audit, now, question)
    tx.notify(question_id)
    return ReplyResult(new=True, closed=closed, question=question)


async def _enqueue(tx: _Tx, items: Sequence[OutboxItem], now: float, default_question: str | None = None) -> list[int]:
    ids = []
    for item in items:
        cur = await tx.execute(
            "INSERT INTO outbox (kind, payload, chat_key, chat_id, question_id, created_at, available_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
            [
                item.kind,
                json.dumps(dict(item.payload), ensure_ascii=False),
                item.chat_id or "",
                item.chat_id,
                item.question_id or default_question,
                now,
                now if item.available_at is None else item.available_at,
            ],
        )
        row = await cur.fetchone()
        assert row is not None
        ids.append(row["id"])
    if ids:
        tx.notify(OUTBOX_KEY)
    return ids


async def _audit(tx: _Tx, items: Sequence[AuditItem], now: float, question: StoredQuestion | None = None) -> None:
    """Audit rows about a question name it (id, short id, chat, owner) unless they say otherwise."""
    for item in items:
        if question is not None:
            item = audit_about(item, question)
        await tx.execute(
            "INSERT INTO audit (at, kind, question_id, short_id, chat_id, owner, actor, data) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
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


def _outbox_row(r: dict[str, Any]) -> OutboxRow:
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


def _audit_row(r: dict[str, Any]) -> AuditRow:
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


__all__ = ["DEFAULT_CHANNEL", "PostgresRepository"]
