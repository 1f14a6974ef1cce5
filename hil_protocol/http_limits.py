"""Request limits the HIL Server and the worker share, as pure ASGI middleware."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413, whether or not Content-Length is given."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        bounded = scope.get("http_version") in ("1.0", "1.1")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big, bounded = False, False
                if too_big:
                    await self._reject(send)
                    return
            elif name == b"transfer-encoding":
                bounded = False
        if bounded:
            # HTTP/1.x without Transfer-Encoding: the server reads exactly Content-Length bytes (none without it),
            # already checked above, so there is nothing to count. Skipping the wrappers saves ~1 KB per open
            # long-poll and a coroutine hop per ASGI message (bench P3/P4).
            await self.app(scope, receive, send)
            return
        received = 0
        started = False
        too_large = False
        replaced = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started, replaced
            if too_large and (replaced or not started):
                # The app caught _TooLarge and answered on its own (FastAPI: 400 "error parsing the body"):
                # send the 413 instead and drop the app's response.
                if not replaced:
                    replaced = started = True
                    await self._reject(send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps(
            {"success": False, "error": f"request body larger than {self.max_bytes} bytes", "errcode": 413}
        ).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
