"""A tiny HTTP/1.1 server on 127.0.0.1 for tests where timing and bytes on the wire matter: bodies dripped a byte at
a time, answers that never come, lying Content-Length headers, TLS with a certificate for chosen host names."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import throwaway_tls


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drip: float | None = None  # send the body one byte at a time, this many seconds apart
    hang: bool = False  # never answer
    length: bool = True  # send Content-Length (else the body ends when the connection closes)


Handler = Callable[[Seen], Reply]


class TinyHTTP:
    """`async with TinyHTTP(handler) as server:` serves `handler`'s replies on `server.port` until the block ends."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.seen: list[Seen] = []
        self.port = 0
        self._ssl = ssl_context
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TinyHTTP:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            seen = await _read_request(reader)
            if seen is None:
                return
            self.seen.append(seen)
            reply = self.handler(seen)
            if reply.hang:
                await asyncio.Event().wait()
            head = [f"HTTP/1.1 {reply.status} X", "Connection: close"]
            head += [f"{name}: {value}" for name, value in reply.headers.items()]
            if reply.length and "content-length" not in {name.lower() for name in reply.headers}:
                head.append(f"Content-Length: {len(reply.body)}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            if reply.drip is None:
                writer.write(reply.body)
                await writer.drain()
            else:
                for index in range(len(reply.body)):
                    writer.write(reply.body[index : index + 1])
                    await writer.drain()
                    await asyncio.sleep(reply.drip)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the client went away: what several tests are about
        except asyncio.CancelledError:
            pass  # the server is closing (__aexit__); asyncio's streams would log a cancelled handler as an error
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.CancelledError):
                await writer.wait_closed()

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.port}"


async def _read_request(reader: asyncio.StreamReader) -> Seen | None:
    line = await reader.readline()
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Seen(method, path, headers, body)


def tls_contexts(tmp: Path, *names: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A certificate for `names` (DNS names or IP addresses): (server context, client context that trusts only its
    CA and checks host names)."""
    files = throwaway_tls(tmp, *names)
    return files.server_context(), files.client_context()
