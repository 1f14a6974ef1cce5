"""`hil-mcp` / `python -m mcp_server`: the MCP server on stdio."""

from __future__ import annotations

import os
import sys
from typing import Any

from pydantic import ValidationError

from hil_protocol.cli import console_parser
from hil_protocol.logs import setup_logging
from hil_protocol.validation import problems

from . import __version__


def parse_args(argv: list[str] | None = None) -> dict[str, Any]:
    parser = console_parser(
        "hil-mcp",
        __version__,
        "Human-in-the-loop MCP server for WeCom (企业微信): ask a person, wait for the answer (stdio).",
    )
    parser.add_argument(
        "--service-url", help="HIL Server URL, with or without /api (env SERVICE_URL; default http://localhost:8081)"
    )
    parser.add_argument(
        "--mode", choices=["auto", "direct", "relay"], help="accepted for compatibility (env SERVICE_MODE)"
    )
    parser.add_argument("--chat-id", help="default WeCom chat id (env DEFAULT_CHAT_ID)")
    parser.add_argument("--project-name", help="project name shown in the message header (env DEFAULT_PROJECT_NAME)")
    parser.add_argument("--timeout", type=float, help="seconds to wait for a reply (env DEFAULT_TIMEOUT; default 1200)")
    parser.add_argument(
        "--poll-interval",
        type=float,
        help="seconds between polls against servers without long-poll (env POLL_INTERVAL; default 2)",
    )
    parser.add_argument("--api-token", help="API token for the HIL Server (env HIL_API_TOKEN)")
    parser.add_argument(
        "--max-call-seconds",
        type=float,
        help="longest single tool call; then it returns status waiting and wait_for_reply goes on "
        "(env HIL_MAX_CALL; default 50, under clients' 60 s cut; Claude Code waits the whole --timeout)",
    )
    args = parser.parse_args(argv)
    return {k: v for k, v in vars(args).items() if v is not None}


FLAGS = frozenset(
    {"service_url", "mode", "chat_id", "project_name", "timeout", "poll_interval", "api_token", "max_call_seconds"}
)


def setting_names(loc: tuple[Any, ...]) -> str:
    """How a person sets the field named in a validation error: its flag and environment variables."""
    from .config import McpSettings  # imported here: `hil-mcp gate` runs per tool call and needs no settings class

    field = str(loc[0]) if loc else ""
    info = McpSettings.model_fields.get(field)
    choices = getattr(getattr(info, "validation_alias", None), "choices", ())
    names = [c for c in choices if isinstance(c, str) and c.isupper()]
    if field in FLAGS:
        names.insert(0, "--" + field.replace("_", "-"))
    return " / ".join(names) or field or "settings"


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in ("gate", "notify", "setup"):  # Claude Code's hooks and their setup: gate_cli.py
        from .gate_cli import main as hooks_main

        raise SystemExit(hooks_main(words))
    from .config import McpSettings

    overrides = parse_args(argv)
    try:
        settings = McpSettings(**overrides)
    except ValidationError as exc:
        print(f"hil-mcp: invalid configuration: {problems(exc.errors(), where=setting_names)}", file=sys.stderr)
        raise SystemExit(2) from None
    secret = [settings.api_token.get_secret_value()] if settings.api_token else []
    # stdout is the MCP protocol: logs go to stderr only.
    setup_logging(settings.log_level, "text", secret)
    from .server import create_server

    try:
        create_server(settings).run("stdio")
    except* (BrokenPipeError, ConnectionResetError):
        # The MCP client went away while we were writing to it: nobody is left to read anything, so exit quietly
        # (and keep Python's final flush of stdout from reporting the same broken pipe).
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())


if __name__ == "__main__":
    main()
