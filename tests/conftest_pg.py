"""A throwaway PostgreSQL for the tests: `initdb` + `pg_ctl` in a temp dir on a free port, once per session (as the
`postgres` user, or one made for it, when the tests run as root: PostgreSQL refuses to run as root). With
HIL_TEST_DATABASE_URL set, that server is used instead (and the restart test skips). Without PostgreSQL the tests
that need it skip saying why, except under CI (env CI set), where they fail: CI installs it (.ci/run)."""

from __future__ import annotations

import contextlib
import glob
import inspect
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.helpers import free_port
from tests.pg_backend import MAINTENANCE_URL_ENV, on_postgres

PG_START_TIMEOUT = 60


@dataclass
class PgServer:
    url: str  # the maintenance database, as the superuser
    datadir: Path | None = None  # None: a server given by HIL_TEST_DATABASE_URL
    bindir: Path | None = None
    user: str | None = None
    port: int = 0
    options: str = ""  # the server's command-line settings (port, socket dir, no fsync)

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.bindir is not None and self.datadir is not None
        return _run(self.user, [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args], check=check)

    def _ours(self) -> None:
        if self.datadir is None:
            pytest.skip("HIL_TEST_DATABASE_URL names a server these tests may not stop or restart")

    def restart(self) -> None:
        self._ours()
        assert self.datadir is not None
        # -l: the server's output goes to a file, not to our pipes (which it would hold open, so run() never returns)
        self.pg_ctl("restart", "-m", "fast", "-w", "-t", str(PG_START_TIMEOUT), "-l", str(self.datadir.parent / "log"))

    def stop(self) -> None:
        self._ours()
        self.pg_ctl("stop", "-m", "fast", "-w", "-t", str(PG_START_TIMEOUT))

    def start(self) -> None:
        assert self.datadir is not None
        self.pg_ctl(
            "start", "-w", "-t", str(PG_START_TIMEOUT), "-l", str(self.datadir.parent / "log"), "-o", self.options
        )


def _bindir() -> Path | None:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    # Debian keeps them out of PATH, one directory per major version: take the newest.
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(candidates[-1]).parent if candidates else None


def _run(user: str | None, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, user=user, capture_output=True, text=True, timeout=PG_START_TIMEOUT + 30, check=False, cwd="/"
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def _unprivileged_user() -> str:
    for name in ("postgres", "hil-pg-test"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(["useradd", "--system", "--no-create-home", "hil-pg-test"], check=True, capture_output=True)
    return "hil-pg-test"


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is needed under CI: {why}")
    pytest.skip(f"no PostgreSQL: {why} (install the Debian package `postgresql`, or set HIL_TEST_DATABASE_URL)")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    given = os.environ.get("HIL_TEST_DATABASE_URL")
    if given:
        yield PgServer(url=given)
        return
    bindir = _bindir()
    if bindir is None:
        _unavailable("initdb/pg_ctl are neither on PATH nor under /usr/lib/postgresql/*/bin")
    assert bindir is not None
    user = _unprivileged_user() if os.geteuid() == 0 else None
    # Not under pytest's tmp dirs: those are private to root (0700), and the server runs as another user.
    root = Path(tempfile.mkdtemp(prefix="hil-pg-"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PgServer(url="", datadir=root / "data", bindir=bindir, user=user, port=free_port())
    try:
        init = _run(
            user,
            [
                str(bindir / "initdb"),
                "-D",
                str(server.datadir),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=False,
        )
        if init.returncode != 0:
            _unavailable(f"initdb failed: {init.stderr.strip()[-500:]}")
        server.options = (
            f"-p {server.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        started = server.pg_ctl(
            "start", "-w", "-t", str(PG_START_TIMEOUT), "-l", str(root / "log"), "-o", server.options, check=False
        )
        if started.returncode != 0:
            log = (root / "log").read_text(errors="replace")[-1500:] if (root / "log").exists() else ""
            _unavailable(f"pg_ctl start failed: {started.stderr.strip()[-500:]} {log}")
        server.url = f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        yield server
    finally:
        if (root / "data" / "postmaster.pid").exists():
            server.pg_ctl("stop", "-m", "immediate", "-w", check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh schema per test (cheaper than a database): the URL sets search_path to it."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        # a URL (not key=value): open_repository() tells the backend by the URL's scheme
        joiner = "&" if "?" in pg_server.url else "?"
        yield f"{pg_server.url}{joiner}options={quote(f'-c search_path={schema}')}"
    finally:
        with contextlib.suppress(psycopg.OperationalError), psycopg.connect(pg_server.url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


# --- the whole server on PostgreSQL: HIL_TEST_BACKEND=postgres (tests/pg_backend.py) --------------------------


@pytest.fixture(scope="session", autouse=True)
def _test_backend(request: pytest.FixtureRequest) -> Iterator[None]:
    if not on_postgres():
        yield
        return
    server: PgServer = request.getfixturevalue("pg_server")
    os.environ[MAINTENANCE_URL_ENV] = server.url
    try:
        yield
    finally:
        os.environ.pop(MAINTENANCE_URL_ENV, None)


@pytest.fixture
async def _close_test_repositories() -> AsyncIterator[None]:
    """Close the repositories unit tests opened (tests/service_helpers.py): on PostgreSQL each holds connections."""
    from tests import service_helpers

    yield
    await service_helpers.close_opened()


@pytest.fixture(autouse=True)
def _close_repositories_of_async_tests(request: pytest.FixtureRequest) -> None:
    # Only coroutine tests open them (service_helpers is async); a sync test may run its own loop in this thread
    # (Playwright's sync API), where an async fixture cannot run.
    if inspect.iscoroutinefunction(request.function):
        request.getfixturevalue("_close_test_repositories")
