"""`hil-server` / `python -m hil_server`: run the HIL Server. Flags override the environment and `.env`."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hil_protocol.cli import data_dir_lock, exit_without_server_extra, fail, load_settings, serve
from hil_protocol.logs import setup_logging

from . import __version__

if TYPE_CHECKING:
    from .config import ServerSettings

PROG = "hil-server"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="HIL Server: holds the agent's questions, sends them to WeCom (企业微信) and matches the answers. "
        "Settings come from the environment and .env (see deploy/hil.env.example); these flags override them.",
    )
    parser.add_argument("--host", help="listen address (HIL_HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="listen port (HIL_PORT, default 8081)")
    parser.add_argument("--data-dir", help="where the session store lives (HIL_DATA_DIR, default ./data)")
    parser.add_argument(
        "--mode", choices=["auto", "relay", "direct"], help="auto: direct when BOT_KEY is set (HIL_MODE)"
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The flags over the environment, `.env` and the defaults; a bad value exits with one line."""
    try:
        from .config import ServerSettings
    except ModuleNotFoundError as exc:
        exit_without_server_extra(PROG, exc)
    overrides = {"hil_host": args.host, "hil_port": args.port, "hil_data_dir": args.data_dir, "hil_mode": args.mode}
    return load_settings(ServerSettings, PROG, overrides)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_from_args(args)
    try:
        from .app import create_app
    except ModuleNotFoundError as exc:
        exit_without_server_extra(PROG, exc)
    setup_logging(settings.hil_log_level, settings.hil_log_format, settings.secrets())
    lock = (
        data_dir_lock(settings.hil_data_dir, "hil-server", PROG)
        if settings.hil_store == "sqlite"
        else contextlib.nullcontext()
    )
    try:
        app = create_app(settings)
    except ValueError as exc:  # settings that cannot work together: one line that says which
        fail(PROG, f"invalid configuration: {exc}", 2)
    with lock:
        serve(
            app,
            host=settings.hil_host,
            port=settings.hil_port,
            prog=PROG,
            flag="--port / HIL_PORT",
            ws_max_size=4 * 1024 * 1024,
        )
