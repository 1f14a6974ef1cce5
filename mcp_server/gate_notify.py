"""`hil-mcp notify`: Claude Code's Notification hook (the agent waits for the person) and Stop hook (the task is
done) as a notice in the chat. Off unless the policy turns the kind on (`[notify] notification = true`,
`stop = true`); at most one notice of a kind per `interval` seconds, remembered in a small file under the user's
cache folder. It never blocks Claude Code: whatever happens, it exits 0 and prints nothing."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from .backend import BackendError, Outgoing
from .gate_policy import PolicyError, load_policy

logger = logging.getLogger("mcp_server.gate")

STDIN_MAX_BYTES = 256 * 1024
STOP_LINES = 5
STOP_CHARS = 600


def state_file() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "hil" / "notify-state.json"


def take_turn(kind: str, interval: float, path: Path, now: float) -> bool:
    """Whether a notice of `kind` may go out now; if so, the time is recorded."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        state = {}
    if not isinstance(state, dict):
        state = {}
    last = state.get(kind)
    if isinstance(last, (int, float)) and 0 <= now - last < interval:
        return False
    state[kind] = now
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(state))
        temporary.replace(path)
    except OSError as exc:
        logger.warning("cannot record the notice in %s: %s", path, exc)
    return True


def notice_text(event: dict[str, Any]) -> tuple[str, str] | None:
    """(kind, text) for a hook event, or None when it is not one we tell about."""
    name = event.get("hook_event_name")
    cwd = event.get("cwd") if isinstance(event.get("cwd"), str) else ""
    if name == "Notification":
        message = event.get("message") if isinstance(event.get("message"), str) else ""
        title = event.get("title") if isinstance(event.get("title"), str) else ""
        return "notification", f"【Claude Code 在等你】{title or '需要你处理'}\n{message[:STOP_CHARS]}\n目录：{cwd}"
    if name == "Stop":
        if event.get("stop_hook_active") is True:
            return None  # Claude Code continues because of a stop hook: not finished yet
        last = event.get("last_assistant_message")
        lines = (last if isinstance(last, str) else "").strip().splitlines()[:STOP_LINES]
        summary = "\n".join(lines)[:STOP_CHARS] or "（没有消息）"
        return "stop", f"【Claude Code 已完成】目录：{cwd}\n{summary}"
    return None


def notify_main(raw: bytes, connection: Callable[[], tuple[str, str | None]]) -> None:
    """Send the notice for the hook event in `raw`, if the policy turns it on. Raises ValueError when the
    connection settings cannot be read."""
    try:
        event = json.loads(raw[:STDIN_MAX_BYTES].decode("utf-8")) if len(raw) <= STDIN_MAX_BYTES else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        event = None
    if not isinstance(event, dict):
        logger.warning("notify: the hook input is not a JSON object; nothing sent")
        return
    found = notice_text(event)
    if found is None:
        return
    kind, text = found
    try:
        policy = load_policy(event["cwd"] if isinstance(event.get("cwd"), str) else None)
    except PolicyError as exc:
        logger.warning("notify: %s; nothing sent", exc)
        return
    if not getattr(policy.notify, kind) or not take_turn(kind, policy.notify.interval, state_file(), time.time()):
        return
    outgoing = Outgoing(message=text, chat_id=policy.chat_id, project_name=policy.project_name, wait_reply=False)
    service_url, token = connection()
    try:
        anyio.run(_send, outgoing, service_url, token)
    except BackendError as exc:
        logger.warning("notify: not sent: %s", exc)


async def _send(outgoing: Outgoing, service_url: str, token: str | None) -> None:
    import httpx

    from .client import HilClient

    async with httpx.AsyncClient(timeout=httpx.Timeout(8.0, connect=3.0)) as http:
        sent = await HilClient(http, service_url, token).send(outgoing)
    if not sent.success:
        logger.warning("notify: not delivered: %s", sent.error or sent.message)


__all__ = ["notice_text", "notify_main", "state_file", "take_turn"]
