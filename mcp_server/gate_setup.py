"""`hil-mcp setup claude-code [--project DIR | --user] [--dry-run]`: merge the gate into Claude Code's settings.

Project: hooks in DIR/.claude/settings.json, the MCP server in DIR/.mcp.json, a starter policy in DIR/.hil/gate.toml.
User: hooks in ~/.claude/settings.json, the MCP server in ~/.claude.json, the policy in ~/.config/hil/gate.toml.
Hooks and servers already there are kept; ours are found by their command and updated in place, so running it again
changes nothing. Every change is printed (as a diff); `--dry-run` prints it and writes nothing.
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from .gate_policy import PROJECT_POLICY, Policy, PolicyError, load_policy, parse_policy

SERVER_NAME = "hil"
# The hook must outlive the gate's own wait, or Claude Code would give up first and let the call through.
HOOK_MARGIN = 30
NOTIFY_TIMEOUT = 15

STARTER_POLICY = """\
# hil-mcp gate policy: which Claude Code tool calls need a person in WeCom (企业微信).
# Reference: README, section "Gate Claude Code".

# chat_id = "wrkSFfCgAAxxxx"        # the chat to ask in (default: the server's / the API token's chat)
# project_name = "my-project"       # shown in the question's header
# responders = ["zhangsan"]         # who may decide (default: anyone in the chat)
approvals_required = 1              # 2+: that many different people must approve (no 本会话都允许 then)
wait = 300                          # seconds to wait for a decision; the hook's timeout is set longer
on_timeout = "deny"                 # or "ask": fall back to Claude Code's own prompt

[tools]
# ask = ["WebFetch", "mcp__github__*"]   # tools that always need a person
# never = ["Read", "Grep", "Glob", "LS"] # tools never asked about (this replaces the built-in list)

[bash]
defaults = true                     # git push, rm -r, kubectl, terraform apply, psql, … (see README)
# ask = ["npm publish", "python3"]  # more command patterns: program, then words that must follow
pipe_to_shell = true                # curl … | sh

[files]
outside_project = true              # Write/Edit outside the project folder need a person

[notify]
notification = false                # a notice when Claude Code waits for you
stop = false                        # a notice when a task is finished
interval = 60                       # at most one notice of a kind per this many seconds
"""


def hil_command(service_url: str | None, sub: str | None = None) -> list[str]:
    """How Claude Code starts hil-mcp (`sub`: a subcommand): the console script when it is on PATH, else this
    Python."""
    found = shutil.which("hil-mcp")
    base = [found] if found else [sys.executable, "-m", "mcp_server"]
    return [*base, *([sub] if sub else []), *(["--service-url", service_url] if service_url else [])]


def _is_ours(hook: Any, sub: str) -> bool:
    command = hook.get("command") if isinstance(hook, dict) else None
    return isinstance(command, str) and (f"hil-mcp {sub}" in command or f"mcp_server {sub}" in command)


def merge_hook(settings: dict[str, Any], event: str, matcher: str | None, command: str, timeout: int, sub: str) -> None:
    hooks = settings.setdefault("hooks", {})
    groups = hooks.setdefault(event, [])
    entry = {"type": "command", "command": command, "timeout": timeout}
    for group in groups:
        inner = group.get("hooks") if isinstance(group, dict) else None
        for index, hook in enumerate(inner if isinstance(inner, list) else []):
            if _is_ours(hook, sub):
                inner[index] = entry
                if matcher is not None:
                    group["matcher"] = matcher
                return
    group: dict[str, Any] = {"hooks": [entry]}
    if matcher is not None:
        group = {"matcher": matcher, **group}
    groups.append(group)


def plan(project: Path | None, home: Path, service_url: str | None) -> list[tuple[Path, str, str]]:
    """(file, text before ('' when new), text after) for every file setup touches."""
    if project is not None:
        settings_path = project / ".claude" / "settings.json"
        servers_path = project / ".mcp.json"
        policy_path = project / PROJECT_POLICY
    else:
        settings_path = home / ".claude" / "settings.json"
        servers_path = home / ".claude.json"
        config = os.environ.get("XDG_CONFIG_HOME") or str(home / ".config")
        policy_path = Path(config) / "hil" / "gate.toml"
    policy_before = _read(policy_path)
    try:
        policy = parse_policy(policy_before.encode(), str(policy_path)) if policy_before else Policy()
    except PolicyError:
        policy = Policy()  # the gate will refuse it with the reason; the hook timeout still needs a value
    if project is not None and not policy_before:
        try:
            policy = load_policy(None, home)
        except PolicyError:
            policy = Policy()
    gate, notify = (" ".join(shlex.quote(word) for word in hil_command(service_url, sub)) for sub in ("gate", "notify"))
    settings_before = _read(settings_path)
    settings = _json(settings_before, settings_path)
    # PreToolUse fires in every mode, before Claude Code's own prompt; the gate also answers PermissionRequest, but
    # wired to both it would ask the person twice when it hands a call back to the prompt (on_timeout = "ask").
    merge_hook(settings, "PreToolUse", "*", gate, int(policy.wait) + HOOK_MARGIN, "gate")
    merge_hook(settings, "Notification", None, notify, NOTIFY_TIMEOUT, "notify")
    merge_hook(settings, "Stop", None, notify, NOTIFY_TIMEOUT, "notify")
    servers_before = _read(servers_path)
    servers = _json(servers_before, servers_path)
    command = hil_command(service_url)
    servers.setdefault("mcpServers", {})[SERVER_NAME] = {"type": "stdio", "command": command[0], "args": command[1:]}
    return [
        (settings_path, settings_before, _dump(settings)),
        (servers_path, servers_before, _dump(servers)),
        (policy_path, policy_before, policy_before or STARTER_POLICY),
    ]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def _json(text: str, path: Path) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SetupError(f"{path} is not valid JSON ({exc}); fix it first, nothing was changed") from None
    if not isinstance(value, dict):
        raise SetupError(f"{path} does not hold a JSON object; fix it first, nothing was changed")
    return value


def _dump(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2) + "\n"


class SetupError(Exception):
    pass


def run_setup(project: str | None, *, user: bool, dry_run: bool, service_url: str | None) -> int:
    home = Path.home()
    try:
        changes = plan(None if user else Path(project or ".").resolve(), home, service_url)
    except SetupError as exc:
        print(f"hil-mcp setup: {exc}", file=sys.stderr)
        return 1
    changed = False
    for path, before, after in changes:
        if before == after:
            print(f"unchanged: {path}")
            continue
        changed = True
        print(
            f"{'would update' if dry_run else 'updated'}: {path}"
            if before
            else f"{'would create' if dry_run else 'created'}: {path}"
        )
        diff = difflib.unified_diff(before.splitlines(), after.splitlines(), str(path), str(path), lineterm="")
        print("\n".join(list(diff)[2:]))
        if not dry_run:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(path.name + ".hil-tmp")
            temporary.write_text(after, encoding="utf-8")
            temporary.replace(path)
    if changed and not dry_run:
        print(
            "Next: start the HIL Server, set HIL_API_TOKEN (and SERVICE_URL) in Claude Code's environment, edit the "
            "policy, and approve the 'hil' MCP server when Claude Code asks."
        )
    return 0


__all__ = ["STARTER_POLICY", "merge_hook", "plan", "run_setup"]
