"""A fault-injecting HTTP proxy for end-to-end tests: put it in front of the fake WeCom (point `WECOM_API_BASE` at
`proxy.url`) and choose what the next requests get instead of the real answer.

    with FaultProxy(stack.fake_url, path_prefix="/cgi-bin/") as proxy:
        proxy.inject(ODD_ANSWERS["errcode_list"])        # the next send gets {"errcode":[45009]}
        proxy.inject(Fault.slow(0.05), count=3)          # the three after it drip their answer, a byte per 50 ms
        proxy.inject(Fault.reset())                      # then one connection reset (RST), one that hangs, ...

Requests whose path does not start with `path_prefix` (and requests with no fault queued) are forwarded as they are.
The proxy runs on 127.0.0.1 (a free port) in a thread with its own event loop, so blocking tests can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.server
import json
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal
from urllib.parse import urlsplit

FaultKind = Literal["answer", "slow", "reset", "hang"]


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    status: int = 200
    body: bytes | None = None  # answer: the body; slow: drip this instead of the upstream's answer
    headers: tuple[tuple[str, str], ...] = ()
    interval: float = 0.0  # slow: seconds between bytes of the body

    @classmethod
    def answer(cls, body: bytes | str | Any, status: int = 200, headers: dict[str, str] | None = None) -> Fault:
        """Answer with this instead of forwarding: bytes as they are, str as UTF-8, anything else as JSON."""
        if isinstance(body, str):
            body = body.encode()
        elif not isinstance(body, bytes):
            body = json.dumps(body).encode()
        merged = {"content-type": "application/json", **(headers or {})}
        return cls("answer", status=status, body=body, headers=tuple(merged.items()))

    @classmethod
    def slow(cls, interval: float, body: bytes | None = None) -> Fault:
        """Forward (or answer `body`), sending the headers at once and then the body one byte every `interval`."""
        return cls("slow", body=body, interval=interval)

    @classmethod
    def reset(cls) -> Fault:
        """Read the request, then reset the connection (TCP RST); the upstream never sees it."""
        return cls("reset")

    @classmethod
    def hang(cls) -> Fault:
        """Read the request and never answer, until `release()` or `stop()` closes the connection."""
        return cls("hang")


def _gzip_garbage() -> bytes:
    whole = gzip.compress(b'{"errcode": 0, "errmsg": "ok"}')
    return whole[:12] + b"\x00garbage\xff" * 4  # a gzip header, then nonsense


# Answers WeCom (or something between us and WeCom) has been seen to give, or could.
ODD_ANSWERS: dict[str, Fault] = {
    "errcode_list": Fault.answer({"errcode": [45009], "errmsg": "api freq out of limit"}),
    "errcode_string": Fault.answer({"errcode": "busy", "errmsg": "busy"}),
    "errcode_float": Fault.answer({"errcode": 1e300, "errmsg": "?"}),
    "not_an_object": Fault.answer([0]),
    "not_json": Fault.answer(b"<html>502 Bad Gateway</html>", headers={"content-type": "text/html"}),
    "gzip_garbage": Fault.answer(_gzip_garbage(), headers={"content-encoding": "gzip"}),
    "http_500": Fault.answer(b"oops", status=500, headers={"content-type": "text/plain"}),
}


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    fault: FaultKind | None  # None: forwarded as it was


@dataclass
class FaultProxy:
    upstream: str
    path_prefix: str = "/"
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        target = urlsplit(self.upstream)
        self._host = target.hostname or "127.0.0.1"
        self._upstream_port = target.port or 80
        self._faults: deque[Fault] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True, name="fault-proxy")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._released: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- control, from any thread ---

    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, fault: Fault, count: int = 1) -> None:
        """The next `count` requests under `path_prefix` get `fault` (after any faults queued before)."""
        with self._lock:
            self._faults.extend([fault] * count)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._faults)

    def release(self) -> None:
        """Close every hanging connection (their clients see the connection drop) and hang no more until `hang()`
        is injected again."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._release_now)

    def wait_seen(self, kind: FaultKind | None, count: int = 1, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for s in self.seen if s.fault == kind) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fault proxy saw no {count} x {kind}: {self.seen}")
            time.sleep(0.01)

    # --- the proxy, on its own loop ---

    def _release_now(self) -> None:
        assert self._released is not None
        self._released.set()
        self._released = asyncio.Event()

    def _take(self, path: str) -> Fault | None:
        if not path.startswith(self.path_prefix):
            return None
        with self._lock:
            return self._faults.popleft() if self._faults else None

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._released = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stopping.wait()
            self._released.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, _, header_block = head.decode("latin-1").partition("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = [line.split(":", 1) for line in header_block.strip().split("\r\n") if ":" in line]
            length = next((int(v) for k, v in headers if k.strip().lower() == "content-length"), 0)
            body = await reader.readexactly(length)
            fault = self._take(path)
            self.seen.append(Seen(method, path, fault.kind if fault else None))
            if fault is None:
                writer.write(await self._forward(method, path, headers, body))
            elif fault.kind == "answer":
                writer.write(_response(fault.status, fault.body or b"", fault.headers))
            elif fault.kind == "slow":
                response = (
                    _response(200, fault.body, (("content-type", "application/json"),))
                    if fault.body is not None
                    else await self._forward(method, path, headers, body)
                )
                start, _, rest = response.partition(b"\r\n\r\n")
                writer.write(start + b"\r\n\r\n")
                for i in range(len(rest)):
                    await writer.drain()
                    await asyncio.sleep(fault.interval)
                    writer.write(rest[i : i + 1])
            elif fault.kind == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            elif fault.kind == "hang":
                assert self._released is not None
                await self._released.wait()
                writer.transport.abort()
                return
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass  # the client went away or sent something that is not HTTP/1.1 with a Content-Length
        finally:
            with contextlib.suppress(ConnectionError, OSError):
                writer.close()

    async def _forward(self, method: str, path: str, headers: list[list[str]], body: bytes) -> bytes:
        """The upstream's whole answer (one request per connection)."""
        up_reader, up_writer = await asyncio.open_connection(self._host, self._upstream_port)
        try:
            kept = [(k, v.strip()) for k, v in headers if k.strip().lower() not in ("connection", "keep-alive")]
            head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in kept)
            up_writer.write(head.encode("latin-1") + b"Connection: close\r\n\r\n" + body)
            await up_writer.drain()
            return await up_reader.read()
        finally:
            up_writer.close()


def _response(status: int, body: bytes, headers: tuple[tuple[str, str], ...]) -> bytes:
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@contextlib.contextmanager
def redirecting_server(location: str = "https://127.0.0.1:1/ws") -> Iterator[str]:
    """A server on 127.0.0.1 answering every request with a 302 to `location`, as a reverse proxy sending ws:// on to
    https:// does; no WebSocket client can follow that. Yields its ws:// URL."""

    class Redirect(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # websockets refuses an HTTP/1.0 answer before it looks at the status

        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True, name="redirecting-server").start()
    try:
        yield f"ws://127.0.0.1:{server.server_address[1]}/ws"
    finally:
        server.shutdown()
        server.server_close()
