"""What the gate (hil-mcp, on the agent's machine) and the HIL Server agree on for 本会话都允许 ("allow for the
rest of this Claude Code session"): the question's options, and the line in the question that says what the
allowance covers. The server records an allowance only for a question a person answered with ALLOW_SESSION whose
text carries that line, so a caller cannot widen what the person saw."""

from __future__ import annotations

import re

APPROVE_ONCE, DENY, ALLOW_SESSION = "批准", "拒绝", "本会话都允许"
GATE_OPTIONS = (APPROVE_ONCE, DENY, ALLOW_SESSION)
# Claude Code's session ids are UUIDs; anything of this shape is accepted (hooks from other tools may differ).
AGENT_SESSION_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
KEY_MAX_CHARS = 200
KEYS_MAX = 20


def allowance_line(agent_session: str, keys: list[str]) -> str:
    """The question's line naming what 本会话都允许 covers (the person reads it; the server checks it)."""
    return f"「{ALLOW_SESSION}」：会话 {agent_session} 内不再询问 {' ／ '.join(keys)}"


def check_keys(keys: list[str]) -> list[str]:
    """Validation of an allowance's keys: 1–20 printable one-line texts of at most 200 characters."""
    if not 1 <= len(keys) <= KEYS_MAX:
        raise ValueError(f"keys takes 1 to {KEYS_MAX} entries")
    for key in keys:
        if not key.strip() or len(key) > KEY_MAX_CHARS or not key.isprintable() or "／" in key:
            raise ValueError(f"each key is 1 to {KEY_MAX_CHARS} printable characters on one line")
    return keys


__all__ = ["AGENT_SESSION_RE", "ALLOW_SESSION", "GATE_OPTIONS", "allowance_line", "check_keys"]
