"""What the console scripts share: one-line errors instead of tracebacks (a missing extra, bad settings, a port in
use, a data directory that cannot be used), settings with flag overrides, and binding before serving.

Imports nothing beyond the standard library and pydantic at module level, so `--help` and the missing-extra
message work on a plain `pip install hil-mcp`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from pydantic import ValidationError

from .validation import dotted, problems

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

    from .settings import CommonSettings

    S = TypeVar("S", bound=BaseSettings)
else:
    S = TypeVar("S")

logger = logging.getLogger(__name__)

# Top-level modules that come with the `server` extra, not with a plain `pip install hil-mcp`.
SERVER_MODULES = frozenset({"fastapi", "websockets", "cryptography", "multipart", "prometheus_client"})


def console_parser(prog: str, version: str, description: str) -> argparse.ArgumentParser:
    """A console script's argument parser: `--help` with `description`, and `--version` printing "prog version"."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {version}")
    return parser


def fail(prog: str, message: str, code: int = 1) -> NoReturn:
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(code)


def exit_without_server_extra(prog: str, exc: ModuleNotFoundError) -> NoReturn:
    """Call from `except ModuleNotFoundError` around a server-side import."""
    if (exc.name or "").split(".")[0] not in SERVER_MODULES:
        raise exc
    fail(
        prog,
        f"{exc.name} is not installed; the HIL Server, the worker and the sandbox need the server extra: "
        "pip install 'hil-mcp[server]'",
    )


def load_settings(cls: type[S], prog: str, overrides: dict[str, Any]) -> S:
    """Settings from flags (`overrides`, None values left out), then the environment, `.env` and defaults.
    A bad value, or a `.env` that cannot be read, is one line that names it."""
    from pydantic_settings import SettingsError

    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        found = problems(exc.errors(), where=lambda loc: dotted(loc).upper(), default="settings")
        fail(prog, f"invalid configuration: {found} (fix it in the environment, .env or the flag)", 2)
    except UnicodeDecodeError as exc:
        fail(prog, f"cannot read .env in {Path.cwd()}: it is not UTF-8 text ({exc.reason} at byte {exc.start})", 2)
    except OSError as exc:
        fail(prog, f"cannot read {exc.filename or '.env'}: {exc.strerror or exc}", 2)
    except SettingsError as exc:
        fail(prog, f"invalid configuration: {exc}", 2)


def bind(host: str, port: int, prog: str, flag: str) -> socket.socket:
    """A listening socket on host:port, or one line that names the port and the flag to change it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio turns Nagle off (TCP_NODELAY) only on accepted sockets whose proto
    # says TCP. With proto 0 every keep-alive response whose body follows its headers waited ~40 ms for the
    # client's delayed ACK (bench P1: 8 -> 49 ms; /mcp M1 the same).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            fail(prog, f"port {port} on {host} is already in use; stop what uses it, or choose another with {flag}")
        fail(prog, f"cannot listen on {host}:{port} ({exc.strerror or exc}); check the address given with {flag}")
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def data_dir_lock(directory: Path, name: str, prog: str, setting: str | None = None) -> Iterator[None]:
    """Hold this process's exclusive lock on its data directory, or exit with one line naming the holder.
    `setting`: how this program chooses its directory, when not HIL_DATA_DIR (or --data-dir)."""
    from .datadir import DataDirError, DataDirLock

    lock = DataDirLock(directory, name) if setting is None else DataDirLock(directory, name, setting)
    try:
        lock.acquire()
    except DataDirError as exc:
        fail(prog, str(exc))
    try:
        yield
    finally:
        lock.release()


def serve(app: Any, *, host: str, port: int, prog: str, flag: str, **options: Any) -> None:
    """Run an ASGI app with uvicorn on a socket bound first (so a taken port is one line, not a traceback).
    A startup failure exits non-zero."""
    import uvicorn

    sock = bind(host, port, prog, flag)
    config = uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=5, **options)
    server = uvicorn.Server(config)
    logger.info("%s listening on %s:%d", prog, host, sock.getsockname()[1])
    server.run(sockets=[sock])
    if not server.started:
        raise SystemExit(1)


def run_process(
    prog: str,
    settings: CommonSettings,
    build: Callable[[], Any],
    *,
    lock: str | None,
    data_dir: Path,
    host: str,
    port: int,
    flag: str,
    **options: Any,
) -> None:
    """What every process's main does once its settings are loaded: log, build the app (`build` imports the server
    extra, so a missing one is one line), hold the data-dir lock named `lock` (None: no lock), bind and serve."""
    from .logs import setup_logging

    setup_logging(settings.hil_log_level, settings.hil_log_format, settings.secrets())
    try:
        app = build()
    except ModuleNotFoundError as exc:
        exit_without_server_extra(prog, exc)
    except ValueError as exc:  # settings that cannot work together: one line that says which
        fail(prog, f"invalid configuration: {exc}", 2)
    with data_dir_lock(data_dir, lock, prog) if lock else contextlib.nullcontext():
        serve(app, host=host, port=port, prog=prog, flag=flag, **options)
