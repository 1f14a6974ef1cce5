"""`hil-mcp gate`, `hil-mcp notify` and `hil-mcp setup claude-code`: the commands Claude Code's hooks run, and the
one that wires them into Claude Code's settings. `mcp_server.__main__` hands these subcommands here."""

from __future__ import annotations

import argparse
import sys
import time


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service-url", help="HIL Server URL (env SERVICE_URL; default http://localhost:8081)")
    parser.add_argument("--api-token", help="API token for the HIL Server (env HIL_API_TOKEN)")


def _connection(args: argparse.Namespace) -> tuple[str, str | None]:
    """(service URL, token) from flags > environment > .env > defaults; raises ValueError."""
    from pydantic import ValidationError

    from hil_protocol.validation import problems

    from .config import McpSettings

    overrides = {k: v for k in ("service_url", "api_token") if (v := getattr(args, k, None)) is not None}
    try:
        settings = McpSettings(**overrides)
    except ValidationError as exc:
        raise ValueError(f"invalid configuration: {problems(exc.errors())}") from None
    token = settings.api_token.get_secret_value() if settings.api_token else None
    return settings.service_url, token


def main(argv: list[str]) -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(prog="hil-mcp", description="Claude Code hooks and setup for hil-mcp.")
    commands = parser.add_subparsers(dest="command", required=True)
    gate = commands.add_parser(
        "gate", help="Claude Code PreToolUse/PermissionRequest hook: ask a person in WeCom before a risky call"
    )
    _connection_flags(gate)
    notify = commands.add_parser("notify", help="Claude Code Notification/Stop hook: a notice in the chat")
    _connection_flags(notify)
    setup = commands.add_parser("setup", help="wire the gate into Claude Code's settings")
    setup.add_argument("target", choices=["claude-code"])
    where = setup.add_mutually_exclusive_group()
    where.add_argument("--project", metavar="DIR", help="this project's settings (default: the current folder)")
    where.add_argument("--user", action="store_true", help="your user settings (~/.claude/settings.json)")
    setup.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    setup.add_argument("--service-url", help="HIL Server URL to put in the hook and MCP server commands")
    args = parser.parse_args(argv)

    if args.command == "setup":
        from .gate_setup import run_setup

        return run_setup(args.project, user=args.user, dry_run=args.dry_run, service_url=args.service_url)

    raw = sys.stdin.buffer.read(_stdin_limit() + 1)
    _logging(args)

    def connection() -> tuple[str, str | None]:
        return _connection(args)

    if args.command == "notify":
        from .gate_notify import notify_main

        try:
            notify_main(raw, connection)
        except ValueError as exc:
            print(f"hil-mcp notify: {exc}", file=sys.stderr)
        return 0

    try:
        from .gate import gate_main

        return _emit(*gate_main(raw, connection, started))
    except Exception as exc:  # noqa: BLE001  # the last guard: a crashing gate must block (exit 2), not let it pass
        print(f"hil-mcp gate: blocked: the gate failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2


def _stdin_limit() -> int:
    from .gate import STDIN_MAX_BYTES

    return STDIN_MAX_BYTES


def _emit(code: int, stdout: str) -> int:
    if stdout:
        sys.stdout.write(stdout + "\n")
        sys.stdout.flush()
    return code


def _logging(args: argparse.Namespace) -> None:
    import os

    from hil_protocol.logs import setup_logging

    # Before the settings are read (most calls never read them): the level and the tokens to redact from the
    # environment and the flag.
    secrets = [t for t in (getattr(args, "api_token", None), os.environ.get("HIL_API_TOKEN")) if t]
    setup_logging(os.environ.get("HIL_LOG_LEVEL") or "WARNING", "text", secrets)


__all__ = ["main"]
