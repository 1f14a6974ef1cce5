"""A tool call as the person in the chat reads it: the folder, the tool and its input — the Bash command in full,
for Write/Edit the file and the change as a diff, for MCP tools the server, tool and arguments.

Nothing is cut silently: input longer than what one question may carry (the server splits a question into
following messages up to its 20 KB limit) is cut with a line saying so, and the person decides knowing it."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from hil_protocol.messages import utf8_len

from .gate_policy import inside

# The server takes 20 KB per question (hil_server.models.MESSAGE_MAX_BYTES); the header, the rules, the options and
# the 本会话都允许 line need the rest (QUESTION_MAX_BYTES leaves room for the server's header and numbered options).
BODY_MAX_BYTES = 16 * 1024
QUESTION_MAX_BYTES = 19 * 1024
FILE_READ_MAX_BYTES = 512 * 1024


def render_input(
    tool_name: str, tool_input: dict[str, Any], cwd: str, *, local_files: bool, limit: int = BODY_MAX_BYTES
) -> str:
    """The call's input for a person, at most `limit` bytes (with a note when cut)."""
    if tool_name == "Bash":
        body = _bash(tool_input)
    elif tool_name in ("Write", "Edit", "MultiEdit", "NotebookEdit"):
        body = _file_change(tool_name, tool_input, cwd, local_files)
    elif tool_name.startswith("mcp__"):
        server, _, tool = tool_name.removeprefix("mcp__").partition("__")
        body = f"MCP 服务：{server}\n工具：{tool or '?'}\n参数：\n{_json(tool_input)}"
    else:
        body = f"参数：\n{_json(tool_input)}"
    return fit(body, limit)


def fit(text: str, limit: int) -> str:
    """`text`, or its first part with a line saying how much was left out."""
    size = utf8_len(text)
    if size <= limit:
        return text
    kept = text.encode("utf-8")[: limit - 200].decode("utf-8", "ignore")
    return f"{kept}\n……（内容过长：共 {size} 字节，以上只显示了前 {utf8_len(kept)} 字节，其余未显示）"


def _bash(tool_input: dict[str, Any]) -> str:
    command = tool_input.get("command")
    lines = ["命令：", command if isinstance(command, str) else _json(command)]
    description = tool_input.get("description")
    if isinstance(description, str) and description.strip():
        lines.append(f"说明（由 Agent 提供）：{description.strip()}")
    if tool_input.get("run_in_background") is True:
        lines.append("（在后台运行）")
    return "\n".join(lines)


def _file_change(tool_name: str, tool_input: dict[str, Any], cwd: str, local_files: bool) -> str:
    key = "notebook_path" if tool_name == "NotebookEdit" else "file_path"
    path = tool_input.get(key)
    lines = [f"文件：{path if isinstance(path, str) else _json(path)}"]
    if tool_name == "Write":
        content = tool_input.get("content")
        old = _current(path, cwd) if local_files else None
        new = content if isinstance(content, str) else _json(content)
        lines.append("改动：" if old is not None else "新文件内容：")
        lines.append(_diff(old, new, path) if old is not None else new)
    elif tool_name == "Edit":
        lines.append("改动" + ("（全部替换）：" if tool_input.get("replace_all") is True else "："))
        lines.append(_diff(_text(tool_input.get("old_string")), _text(tool_input.get("new_string")), path))
    elif tool_name == "MultiEdit":
        edits = tool_input.get("edits")
        for number, edit in enumerate(edits if isinstance(edits, list) else [], start=1):
            edit = edit if isinstance(edit, dict) else {}
            lines.append(f"改动 {number}：")
            lines.append(_diff(_text(edit.get("old_string")), _text(edit.get("new_string")), path))
    else:
        rest = {k: v for k, v in tool_input.items() if k != key}
        lines.append(f"改动：\n{_json(rest)}")
    return "\n".join(lines)


def _current(path: Any, cwd: str) -> str | None:
    """The file as it is now, for the diff (None: new, unreadable, or too large to diff)."""
    # Only project files, and not those that hold secrets: the diff goes to a chat.
    if not isinstance(path, str) or not inside(path, cwd) or _secret(Path(path).name):
        return None
    target = Path(cwd, path).expanduser()
    try:
        if not target.is_file() or target.stat().st_size > FILE_READ_MAX_BYTES:
            return None
        return target.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _secret(name: str) -> bool:
    return name.startswith((".env", "id_")) or name.endswith((".pem", ".key", ".p12")) or "secret" in name.lower()


def _diff(old: str, new: str, path: Any) -> str:
    name = path if isinstance(path, str) else "file"
    lines = difflib.unified_diff(old.splitlines(), new.splitlines(), f"a/{name}", f"b/{name}", n=2, lineterm="")
    return "\n".join(lines) or "（没有改动）"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else _json(value)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2, default=str)


__all__ = ["BODY_MAX_BYTES", "QUESTION_MAX_BYTES", "fit", "render_input"]
