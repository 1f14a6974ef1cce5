"""`hil-server` / `python -m hil_server`: run the HIL Server. Flags override the environment and `.env`."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hil_protocol.cli import console_parser, fail, load_settings, run_process
from hil_protocol.settings import secret_value

from . import __version__
from .config import ServerSettings  # settings need only the base install: --help and bad values work without the extra
from .repository.errors import Conflict, RepositoryError

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
    commands = parser.add_subparsers(dest="command", metavar="{audit,store}", help="without a command: run the server")
    audit = commands.add_parser("audit", help="the audit trail of questions, answers and decisions")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="{export}")
    export = audit_commands.add_parser(
        "export",
        help="print the audit trail as JSON lines, oldest first (reads the store in HIL_DATA_DIR; "
        "safe while the server runs)",
    )
    # SUPPRESS: an unset flag here must not overwrite the same flag given before the command
    export.add_argument("--data-dir", default=argparse.SUPPRESS, help="the server's HIL_DATA_DIR (default ./data)")
    export.add_argument("--since", help="only events at or after this time: epoch seconds or ISO 8601")
    export.add_argument("--chat-id", help="only events in this chat")
    export.add_argument("--limit", type=int, default=100_000, help="at most this many events (default 100000)")
    store = commands.add_parser("store", help="the server's database")
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="{migrate}")
    migrate = store_commands.add_parser(
        "migrate",
        help="copy every question, reply, msgid, audit row and outbox row from one store to another (stop the "
        "server first), then compare the counts",
    )
    migrate.add_argument(
        "--from", dest="source", required=True, help="sqlite:///path/to/hil.db (or a postgresql:// URL)"
    )
    migrate.add_argument("--to", dest="target", required=True, help="postgresql://user:password@host:port/dbname")
    migrate.add_argument("--force", action="store_true", help="replace what the target holds (default: refuse)")
    return parser.parse_args(argv)


def migrate_store(args: argparse.Namespace) -> None:
    """`hil-server store migrate`: the whole store, in one transaction on the target, counts verified after."""
    from .repository import open_repository

    if args.source.startswith("sqlite:///") and not Path(args.source.removeprefix("sqlite:///")).is_file():
        fail(PROG, f"no store at {args.source.removeprefix('sqlite:///')}: give --from sqlite:///path/to/hil.db")

    async def copy() -> dict[str, int]:
        source = await open_repository(args.source)
        try:
            target = await open_repository(args.target)
            try:
                tables = await source.export_tables()  # type: ignore[attr-defined]
                copied = await target.import_tables(tables, force=args.force)  # type: ignore[attr-defined]
                counts = await target.table_counts()  # type: ignore[attr-defined]
            finally:
                await target.close()
        finally:
            await source.close()
        if counts != copied:
            raise RepositoryError(f"the target holds {counts} after copying {copied}")
        return counts

    try:
        counts = asyncio.run(copy())
    except Conflict as exc:
        fail(PROG, f"{exc}: copy into an empty database, or add --force to replace what it holds")
    except (RepositoryError, OSError, ValueError) as exc:
        fail(PROG, f"cannot migrate the store: {exc}")
    print(" ".join(f"{table}={n}" for table, n in counts.items()))


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The flags over the environment, `.env` and the defaults; a bad value exits with one line."""
    overrides = {"hil_host": args.host, "hil_port": args.port, "hil_data_dir": args.data_dir, "hil_mode": args.mode}
    return load_settings(ServerSettings, PROG, overrides)


def export_audit(args: argparse.Namespace, settings: ServerSettings) -> None:
    """`hil-server audit export`: the operator's view of the whole trail (every token's rows)."""
    from .audit import AUDIT_LIMIT_MAX, from_row, json_lines, parse_since
    from .repository import open_repository
    from .store import REPOSITORY_FILE, STORE_FILE, SqlitePersistence

    try:
        since = parse_since(args.since)
    except ValueError as exc:
        fail(PROG, str(exc), 2)
    if not 1 <= args.limit <= AUDIT_LIMIT_MAX:
        fail(PROG, f"--limit: give 1 to {AUDIT_LIMIT_MAX}", 2)
    url = secret_value(settings.hil_database_url)
    if not url and settings.hil_store != "sqlite":
        fail(PROG, "HIL_STORE=memory keeps no audit trail on disk: nothing to export")
    path = Path(settings.hil_data_dir) / REPOSITORY_FILE
    old = Path(settings.hil_data_dir) / STORE_FILE
    if not url and not path.is_file() and not old.is_file():
        fail(PROG, f"no session store at {path}: point --data-dir (HIL_DATA_DIR) at the server's data directory")

    async def read() -> str:
        if url or path.is_file():
            repo = await open_repository(url or str(path))
            try:
                rows = await repo.audit(since=since, chat_id=args.chat_id, limit=args.limit)
            finally:
                await repo.close()
            return json_lines([from_row(row) for row in rows])
        # a data directory the old store wrote, not yet upgraded (an older server runs on it): read, change nothing
        persistence = await SqlitePersistence.open(old, migrate=False)
        try:
            return json_lines(await persistence.audit_rows(since, args.chat_id, None, args.limit))
        finally:
            await persistence.close()

    where = "the database" if url else (path if path.is_file() else old)
    try:
        sys.stdout.write(asyncio.run(read()))
    except (sqlite3.Error, OSError, RuntimeError, ValueError, RepositoryError) as exc:
        fail(PROG, f"cannot read the audit trail from {where}: {exc}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_from_args(args)
    if args.command == "audit":
        export_audit(args, settings)
        return
    if args.command == "store":
        migrate_store(args)
        return

    def build() -> Any:
        from .app import create_app

        return create_app(settings)

    run_process(
        PROG,
        settings,
        build,
        # one writer per SQLite data directory; PostgreSQL takes several servers
        lock="hil-server" if settings.hil_store == "sqlite" and not secret_value(settings.hil_database_url) else None,
        data_dir=settings.hil_data_dir,
        host=settings.hil_host,
        port=settings.hil_port,
        flag="--port / HIL_PORT",
        ws_max_size=4 * 1024 * 1024,
    )
