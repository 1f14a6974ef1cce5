"""Request limits the HIL Server and the worker share, as pure ASGI middleware: a body larger than `max_bytes` is
refused with 413 (whether or not Content-Length says so), and a body that has not arrived within `body_timeout`
seconds of the request is answered with 408 and the connection closed, so clients dripping bodies byte by byte
cannot hold the server's requests open."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .http_errors import send_error


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


class RequestLimits:
    def __init__(self, app: ASGIApp, *, max_bytes: int, body_timeout: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length: int | None = None
        chunked = False
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    chunked = True  # unknown length: count what arrives
            elif name == b"transfer-encoding":
                chunked = True
        if length is not None and length > self.max_bytes:
            await self._reject(send, _TooLarge())
            return
        if not chunked and not length and scope.get("http_version") in ("1.0", "1.1"):
            # No body: nothing to count or wait for. Long-polls take this path, so they pay for no wrapper (bench P3).
            await self.app(scope, receive, send)
            return
        await self._limited(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        received = 0
        body_done = False
        refused: Exception | None = None
        started = False
        replaced = False

        async def limited_receive() -> Message:
            nonlocal received, body_done, refused
            if body_done:
                return await receive()  # only http.disconnect is left: no deadline on that
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    message = await receive()
            except TimeoutError:
                refused = _TooSlow()
                raise refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = _TooLarge()
                    raise refused
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started, replaced
            if refused is not None and (replaced or not started):
                # The app caught our exception and answered on its own (FastAPI: 400 "error parsing the body"):
                # send the 413/408 instead and drop the app's response.
                if not replaced:
                    replaced = started = True
                    await self._reject(send, refused)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (_TooLarge, _TooSlow) as exc:
            if not started:
                await self._reject(send, exc)

    async def _reject(self, send: Send, reason: Exception) -> None:
        if isinstance(reason, _TooSlow):
            # "connection: close" makes the server drop the connection with the unread rest of the body.
            await send_error(
                send,
                408,
                f"request body did not arrive within {self.body_timeout:.0f} seconds",
                errcode=408,
                headers=[(b"connection", b"close")],
            )
        else:
            await send_error(send, 413, f"request body larger than {self.max_bytes} bytes", errcode=413)
