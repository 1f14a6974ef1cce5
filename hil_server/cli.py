"""`hil-server` / `python -m hil_server`: run the HIL Server. Flags override the environment and `.env`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from hil_protocol.cli import console_parser, load_settings, run_process

from . import __version__
from .config import ServerSettings  # settings need only the base install: --help and bad values work without the extra

PROG = "hil-server"
DESCRIPTION = (
    "HIL Server: holds the agent's questions, sends them to WeCom (企业微信) and matches the answers. "
    "Settings come from the environment and .env (see deploy/hil.env.example); these flags override them."
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = console_parser(PROG, __version__, DESCRIPTION)
    parser.add_argument("--host", help="listen address (HIL_HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="listen port (HIL_PORT, default 8081)")
    parser.add_argument("--data-dir", help="where the session store lives (HIL_DATA_DIR, default ./data)")
    parser.add_argument(
        "--mode", choices=["auto", "relay", "direct"], help="auto: direct when BOT_KEY is set (HIL_MODE)"
    )
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The flags over the environment, `.env` and the defaults; a bad value exits with one line."""
    overrides = {"hil_host": args.host, "hil_port": args.port, "hil_data_dir": args.data_dir, "hil_mode": args.mode}
    return load_settings(ServerSettings, PROG, overrides)


def main(argv: Sequence[str] | None = None) -> None:
    settings = settings_from_args(parse_args(argv))

    def build() -> Any:
        from .app import create_app

        return create_app(settings)

    run_process(
        PROG,
        settings,
        build,
        lock="hil-server" if settings.hil_store == "sqlite" else None,
        data_dir=settings.hil_data_dir,
        host=settings.hil_host,
        port=settings.hil_port,
        flag="--port / HIL_PORT",
        ws_max_size=4 * 1024 * 1024,
    )
