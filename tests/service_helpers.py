"""A HilService on a real repository for unit tests: SQLite in a scratch directory (removed when the tests end)."""

from __future__ import annotations

import asyncio
import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hil_server.channels import Channel
from hil_server.notifier import Notifier
from hil_server.repository import Repository, open_with_notifier
from hil_server.service import HilService
from tests.pg_backend import fresh_database_url, on_postgres

_ROOT = Path(tempfile.mkdtemp(prefix="hil-test-repos-"))
atexit.register(shutil.rmtree, _ROOT, True)


# HIL_TEST_BACKEND=postgres: the database standing in for each SQLite path (a reopen finds the same one)
_DATABASES: dict[Path, str] = {}
_OPENED: list[tuple[Repository, Notifier]] = []


async def open_repo(path: Path | None = None) -> tuple[Repository, Notifier]:
    """The repository at `path` (a new scratch one when None) and its notifier; with HIL_TEST_BACKEND=postgres, a
    fresh database on the test cluster in its place."""
    if path is None:
        path = Path(tempfile.mkdtemp(dir=_ROOT)) / "hil.db"
    if on_postgres():
        if path not in _DATABASES:
            _DATABASES[path] = await asyncio.to_thread(fresh_database_url)
        opened = await open_with_notifier(_DATABASES[path])
    else:
        opened = await open_with_notifier(str(path))
    _OPENED.append(opened)
    return opened


async def close_opened() -> None:
    """Close what open_repo opened and the test left open (closing twice is harmless)."""
    while _OPENED:
        repo, notifier = _OPENED.pop()
        await notifier.close()
        await repo.close()


async def new_service(channel: Channel | Any, path: Path | None = None, **kw: Any) -> HilService:
    repo, notifier = await open_repo(path)
    return HilService(repo, channel, notifier=notifier, **kw)


async def close_service(service: HilService) -> None:
    await service.notifier.close()
    await service.repo.close()
