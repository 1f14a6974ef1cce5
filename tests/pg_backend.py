"""The whole server on PostgreSQL: with HIL_TEST_BACKEND=postgres every server process tests/procs.py starts gets
HIL_DATABASE_URL of a fresh schema on the test cluster (tests/conftest_pg.py), and unit tests' services
(tests/service_helpers.py) run on one too."""

from __future__ import annotations

import os
import uuid
from urllib.parse import quote

BACKEND_ENV = "HIL_TEST_BACKEND"
# where the session's cluster is announced to helpers that are not fixtures (procs.Stack, service_helpers)
MAINTENANCE_URL_ENV = "HIL_TEST_PG_MAINTENANCE_URL"


def on_postgres() -> bool:
    return os.environ.get(BACKEND_ENV, "sqlite") == "postgres"


def fresh_database_url(maintenance_url: str | None = None) -> str:
    """A new empty schema on the test cluster, as a URL whose search_path is that schema (left for the cluster's
    teardown: a server process may still hold it when the test ends)."""
    import psycopg

    base = maintenance_url or os.environ[MAINTENANCE_URL_ENV]
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    joiner = "&" if "?" in base else "?"
    return f"{base}{joiner}options={quote(f'-c search_path={schema}')}"
