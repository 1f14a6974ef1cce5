"""The repository's schema, as numbered migrations per backend, applied by a small runner in each backend.

Why not Alembic: there is no ORM and no model metadata to autogenerate from; the two backends are hand-written SQL
that differ where it matters (REAL vs double precision, AUTOINCREMENT vs identity, SKIP LOCKED), and a migration is
a few statements. So each backend has a list here: migration N is `MIGRATIONS[N-1]`, applied in one transaction
together with the row `schema_version(version=N)` that records it (PostgreSQL holds an advisory lock meanwhile, so
replicas starting together migrate once). A database whose version is newer than the list refuses to open
(SchemaTooNew). Applied migrations are never edited: a change is a new entry.

The partial unique index on open short ids spells out `lifecycle.OPEN` (tests/test_repository.py checks they agree;
when OPEN changes, a new migration rebuilds the index).
"""

from __future__ import annotations

from .base import COLUMNS

SQLITE: list[str] = [
    # 1: questions with their timers, answers as rows, msgids, outbox, audit
    """
    CREATE TABLE questions (
        id TEXT PRIMARY KEY,
        short_id TEXT NOT NULL,
        chat_id TEXT,
        owner TEXT,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        deadline REAL NOT NULL,
        closed_at REAL,
        error TEXT,
        next_remind_at REAL,
        reminders_sent INTEGER NOT NULL DEFAULT 0,
        escalate_at REAL,
        data TEXT NOT NULL
    );
    CREATE UNIQUE INDEX questions_open_short_id ON questions (short_id) WHERE status IN ('sending', 'waiting');
    CREATE INDEX questions_short_id ON questions (short_id, created_at);
    CREATE INDEX questions_status_chat ON questions (status, chat_id, created_at);
    CREATE INDEX questions_owner ON questions (owner, created_at);
    CREATE INDEX questions_deadline ON questions (deadline) WHERE status = 'waiting';
    CREATE INDEX questions_remind ON questions (next_remind_at) WHERE next_remind_at IS NOT NULL;
    CREATE INDEX questions_escalate ON questions (escalate_at) WHERE escalate_at IS NOT NULL;
    CREATE INDEX questions_closed ON questions (closed_at);
    CREATE TABLE answers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        question_id TEXT NOT NULL REFERENCES questions (id) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('reply', 'refused')),
        msgid TEXT,
        at REAL NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX answers_question ON answers (question_id, id);
    CREATE TABLE seen_msgids (msgid TEXT PRIMARY KEY, seen_at REAL NOT NULL);
    CREATE INDEX seen_msgids_at ON seen_msgids (seen_at);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        chat_key TEXT NOT NULL,
        chat_id TEXT,
        question_id TEXT,
        state TEXT NOT NULL DEFAULT 'pending',
        created_at REAL NOT NULL,
        available_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        holder TEXT,
        lease_until REAL,
        error TEXT,
        finished_at REAL
    );
    CREATE INDEX outbox_ready ON outbox (state, available_at, id);
    CREATE INDEX outbox_chat ON outbox (chat_key, id) WHERE state IN ('pending', 'claimed');
    CREATE INDEX outbox_question ON outbox (question_id);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        question_id TEXT,
        short_id TEXT,
        chat_id TEXT,
        owner TEXT,
        actor TEXT,
        data TEXT NOT NULL
    );
    CREATE INDEX audit_at ON audit (at);
    CREATE INDEX audit_chat ON audit (chat_id, at);
    CREATE INDEX audit_owner ON audit (owner, at);
    """,
]

POSTGRES: list[str] = [
    # 1: as SQLite's 1
    """
    CREATE TABLE questions (
        id text PRIMARY KEY,
        short_id text NOT NULL,
        chat_id text,
        owner text,
        status text NOT NULL,
        created_at double precision NOT NULL,
        deadline double precision NOT NULL,
        closed_at double precision,
        error text,
        next_remind_at double precision,
        reminders_sent integer NOT NULL DEFAULT 0,
        escalate_at double precision,
        data text NOT NULL
    );
    CREATE UNIQUE INDEX questions_open_short_id ON questions (short_id) WHERE status IN ('sending', 'waiting');
    CREATE INDEX questions_short_id ON questions (short_id, created_at);
    CREATE INDEX questions_status_chat ON questions (status, chat_id, created_at);
    CREATE INDEX questions_owner ON questions (owner, created_at);
    CREATE INDEX questions_deadline ON questions (deadline) WHERE status = 'waiting';
    CREATE INDEX questions_remind ON questions (next_remind_at) WHERE next_remind_at IS NOT NULL;
    CREATE INDEX questions_escalate ON questions (escalate_at) WHERE escalate_at IS NOT NULL;
    CREATE INDEX questions_closed ON questions (closed_at);
    CREATE TABLE answers (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        question_id text NOT NULL REFERENCES questions (id) ON DELETE CASCADE,
        kind text NOT NULL CHECK (kind IN ('reply', 'refused')),
        msgid text,
        at double precision NOT NULL,
        data text NOT NULL
    );
    CREATE INDEX answers_question ON answers (question_id, id);
    CREATE TABLE seen_msgids (msgid text PRIMARY KEY, seen_at double precision NOT NULL);
    CREATE INDEX seen_msgids_at ON seen_msgids (seen_at);
    CREATE TABLE outbox (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        kind text NOT NULL,
        payload text NOT NULL,
        chat_key text NOT NULL,
        chat_id text,
        question_id text,
        state text NOT NULL DEFAULT 'pending',
        created_at double precision NOT NULL,
        available_at double precision NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        holder text,
        lease_until double precision,
        error text,
        finished_at double precision
    );
    CREATE INDEX outbox_ready ON outbox (state, available_at, id);
    CREATE INDEX outbox_chat ON outbox (chat_key, id) WHERE state IN ('pending', 'claimed');
    CREATE INDEX outbox_question ON outbox (question_id);
    CREATE TABLE audit (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at double precision NOT NULL,
        kind text NOT NULL,
        question_id text,
        short_id text,
        chat_id text,
        owner text,
        actor text,
        data text NOT NULL
    );
    CREATE INDEX audit_at ON audit (at);
    CREATE INDEX audit_chat ON audit (chat_id, at);
    CREATE INDEX audit_owner ON audit (owner, at);
    """,
]

# The literal the migrations above spell out for lifecycle.OPEN (checked by the tests).
OPEN_STATUSES_IN_INDEX = ("sending", "waiting")

# Every table of the data, in the order a copy inserts them (a row's references come first), with its columns:
# what `export_tables` / `import_tables` move (the upgrade from the old store, `hil-server store migrate`).
TABLES: dict[str, tuple[str, ...]] = {
    "questions": (*COLUMNS, "data"),
    "answers": ("id", "question_id", "kind", "msgid", "at", "data"),
    "seen_msgids": ("msgid", "seen_at"),
    "outbox": (
        "id",
        "kind",
        "payload",
        "chat_key",
        "chat_id",
        "question_id",
        "state",
        "created_at",
        "available_at",
        "attempts",
        "holder",
        "lease_until",
        "error",
        "finished_at",
    ),
    "audit": ("id", "at", "kind", "question_id", "short_id", "chat_id", "owner", "actor", "data"),
}
# The order an export lists each table's rows in (the same on both backends).
EXPORT_ORDER = {
    "questions": "created_at, id",
    "answers": "id",
    "seen_msgids": "seen_at, msgid",
    "outbox": "id",
    "audit": "id",
}
# The tables whose `id` the database assigns (a copy keeps them, and moves the counter past them).
SERIAL_TABLES = ("answers", "outbox", "audit")
