"""The store behind one interface (`Repository`), with SQLite and PostgreSQL as equal implementations.

`open_repository(url)` picks the backend by the URL: `postgresql://…` (or `postgres://…`) for PostgreSQL;
`sqlite:///relative.db` / `sqlite:////absolute.db` (as SQLAlchemy spells them) or a plain path for SQLite.
The PostgreSQL backend (psycopg) is imported only when used.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..notifier import LocalNotifier, Notifier, PgNotifier
from .base import (
    OUTBOX_KEY,
    AuditItem,
    AuditRow,
    CloseRule,
    OutboxItem,
    OutboxRow,
    Purged,
    ReplyResult,
    Repository,
    StoredQuestion,
    outbox_key,
)
from .errors import Conflict, NotFound, RepositoryError, RepositoryUnavailable, SchemaTooNew, ShortIdExhausted


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


async def open_repository(url: str, *, notify: Callable[[str], None] | None = None) -> Repository:
    """Open (and migrate) the repository at `url`. `notify` is SQLite's wake-up hook (a `LocalNotifier.wake`);
    PostgreSQL notifies through the database (listen with `notifier.PgNotifier(url, repo.channel)`)."""
    if is_postgres_url(url):
        from .postgres import PostgresRepository

        return await PostgresRepository.open(url)
    from .sqlite import SqliteRepository

    if any(key in url for key in ("host=", "dbname=", "user=")):
        # a libpq key=value string would otherwise become a SQLite file named after it
        raise ValueError("give PostgreSQL as a URL: postgresql://user:password@host:port/dbname")
    path = url.removeprefix("sqlite:///")
    return await SqliteRepository.open(Path(path), notify=notify)


async def open_with_notifier(url: str) -> tuple[Repository, Notifier]:
    """The repository at `url` and the notifier that hears its changes, wired together (what a lifespan opens;
    close the notifier, then the repository)."""
    if is_postgres_url(url):
        from .postgres import PostgresRepository

        repo = await PostgresRepository.open(url)
        notifier = await PgNotifier(url, repo.channel).start(wait=5.0)
        return repo, notifier
    local = LocalNotifier()
    return await open_repository(url, notify=local.wake), local


__all__ = [
    "OUTBOX_KEY",
    "AuditItem",
    "AuditRow",
    "CloseRule",
    "Conflict",
    "NotFound",
    "OutboxItem",
    "OutboxRow",
    "Purged",
    "ReplyResult",
    "Repository",
    "RepositoryError",
    "RepositoryUnavailable",
    "SchemaTooNew",
    "ShortIdExhausted",
    "StoredQuestion",
    "is_postgres_url",
    "open_repository",
    "open_with_notifier",
    "outbox_key",
]
