"""A fake Anthropic Messages API on 127.0.0.1 for running the real Claude Code (`claude -p`) offline.

Claude Code calls `POST /v1/messages?beta=true` with `"stream": true` and reads the SSE event sequence. The fake
plays a scripted model: for a conversation that has seen k tool results, it answers with the (k+1)-th scripted Bash
call, and once the script is done with a final text. It records every tool_result it receives, so a test sees what
Claude Code did with each call (ran it, or refused it and why). Requests without tools (titles, summaries) get a
short text.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FINAL_TEXT = "All done."


@dataclass
class ToolResult:
    tool_use_id: str
    content: str
    is_error: bool


@dataclass
class FakeAnthropic:
    """`with FakeAnthropic() as api:` serves on `api.url`; set `api.script` (Bash commands) before each run."""

    script: list[str] = field(default_factory=list)
    results: list[ToolResult] = field(default_factory=list)
    requests: int = 0
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self, *script: str) -> None:
        with self._lock:
            self.script = list(script)
            self.results = []

    def __enter__(self) -> FakeAnthropic:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                self.do_HEAD()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.startswith("/v1/messages"):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                events = fake.answer(body)
                payload = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def answer(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            self.requests += 1
            seen = [block for block in _blocks(body.get("messages", [])) if block.get("type") == "tool_result"]
            tools = {t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)}
            if "Bash" not in tools:
                return _text_events("ok")
            if seen:
                last = seen[-1]
                self.results.append(ToolResult(last.get("tool_use_id", ""), _content(last), bool(last.get("is_error"))))
            if len(seen) < len(self.script):
                return _tool_events("Bash", {"command": self.script[len(seen)], "description": "scripted"})
            return _text_events(FINAL_TEXT)


def _blocks(messages: list[Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            found += [b for b in content if isinstance(b, dict)]
    return found


def _content(block: dict[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content or "")


def _start(stop_reason: str) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": f"msg_{uuid.uuid4().hex[:12]}",
            "type": "message",
            "role": "assistant",
            "model": "claude-fake",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1},
        },
    }


def _end(stop_reason: str) -> list[dict[str, Any]]:
    return [
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": 5},
        },
        {"type": "message_stop"},
    ]


def _text_events(text: str) -> list[dict[str, Any]]:
    return [
        _start("end_turn"),
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        *_end("end_turn"),
    ]


def _tool_events(name: str, tool_input: dict[str, Any]) -> list[dict[str, Any]]:
    block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:20]}", "name": name, "input": {}}
    return [
        _start("tool_use"),
        {"type": "content_block_start", "index": 0, "content_block": block},
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": json.dumps(tool_input)},
        },
        *_end("tool_use"),
    ]


__all__ = ["FINAL_TEXT", "FakeAnthropic", "ToolResult"]
