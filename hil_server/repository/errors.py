"""The repository's exceptions, in one tree. The backends translate their drivers' errors (`sqlite3.Error`,
`psycopg.Error`, `psycopg_pool.PoolTimeout`) into these at their edge, so generic code never imports a driver."""

from __future__ import annotations


class RepositoryError(Exception):
    """Something the repository could not do; `str()` says what and, where it can, what to do."""


class RepositoryUnavailable(RepositoryError):
    """The database cannot take reads or writes now (down, restarting, connection lost, disk full, read-only).
    Nothing of the failed operation was applied; it may be tried again (callbacks answer 503, /health degraded)."""


class Conflict(RepositoryError):
    """The database refused the change because of what is already there (a unique constraint)."""


class ShortIdExhausted(Conflict):
    """Every short id tried for a new question was held by an open question."""


class NotFound(RepositoryError):
    """No such question (never created, or purged)."""


class SchemaTooNew(RepositoryError):
    """The database was migrated by a newer hil-server than this one."""


__all__ = ["Conflict", "NotFound", "RepositoryError", "RepositoryUnavailable", "SchemaTooNew", "ShortIdExhausted"]
