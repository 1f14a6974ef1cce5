"""HTTP pieces the HIL Server and the worker share: the robot-callback endpoint and a request body limit."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .callback import CallbackError, parse_callback

logger = logging.getLogger(__name__)

CALLBACK_MAX_BYTES = 1024 * 1024


def wecom_ok() -> JSONResponse:
    return JSONResponse({"errcode": 0, "errmsg": "ok"})


def wecom_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"errcode": status, "errmsg": message, "error": message}, status_code=status)


class CallbackIntake:
    """Reads a robot callback request: checks the auth header, answers WeCom's URL verification, decrypts WeCom's
    encrypted form, and returns the callback as a dict in fly-pigeon's JSON shape."""

    def __init__(
        self,
        auth_key: str | None = None,
        auth_value: str | None = None,
        callback_token: str | None = None,
        callback_aes_key: str | None = None,
    ) -> None:
        self.auth_key = auth_key or None
        self.auth_value = auth_value or ""
        self.crypto = None
        if callback_token and callback_aes_key:
            from .wecom_crypto import WeComCrypto

            self.crypto = WeComCrypto(callback_token, callback_aes_key)

    def authorized(self, request: Request) -> bool:
        if not self.auth_key:
            return True
        given = request.headers.get(self.auth_key, "")
        return hmac.compare_digest(given.encode(), self.auth_value.encode())

    def verify_url(self, request: Request) -> Response:
        from .wecom_crypto import WeComCryptoError

        if self.crypto is None:
            return wecom_error(400, "URL verification needs WECOM_CALLBACK_TOKEN and WECOM_CALLBACK_AES_KEY")
        q = request.query_params
        try:
            plain = self.crypto.verify_url(
                q.get("msg_signature", ""), q.get("timestamp", ""), q.get("nonce", ""), q.get("echostr", "")
            )
        except WeComCryptoError as exc:
            logger.warning("callback URL verification refused: %s", type(exc).__name__)
            return wecom_error(403, "signature or echostr invalid")
        return PlainTextResponse(plain)

    async def read(self, request: Request) -> dict[str, Any] | Response:
        """The callback dict, or the error response to send back."""
        if not self.authorized(request):
            logger.warning("callback refused: missing or wrong %s header", self.auth_key)
            return wecom_error(401, f"missing or wrong {self.auth_key} header (CALLBACK_AUTH_KEY/CALLBACK_AUTH_VALUE)")
        body = await request.body()
        if len(body) > CALLBACK_MAX_BYTES:
            return wecom_error(413, "callback body too large")
        if "msg_signature" in request.query_params:
            return self._decrypt(request, body)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return wecom_error(400, "callback body is not JSON (for WeCom's encrypted XML, configure the callback "
                               "token and AES key)")
        try:
            parse_callback(data)
        except CallbackError as exc:
            return wecom_error(400, str(exc))
        return data

    def _decrypt(self, request: Request, body: bytes) -> dict[str, Any] | Response:
        from .wecom_crypto import WeComCryptoError, WeComSignatureError
        from .wecom_xml import CallbackPayloadError, parse_callback_payload

        if self.crypto is None:
            return wecom_error(400, "encrypted callback, but WECOM_CALLBACK_TOKEN / WECOM_CALLBACK_AES_KEY are not set")
        q = request.query_params
        try:
            payload = self.crypto.decrypt_callback(
                q.get("msg_signature", ""), q.get("timestamp", ""), q.get("nonce", ""), body
            )
            data = parse_callback_payload(payload)
            parse_callback(data)
        except WeComSignatureError:
            return wecom_error(403, "bad msg_signature")
        except (WeComCryptoError, CallbackPayloadError, CallbackError) as exc:
            return wecom_error(400, f"cannot read encrypted callback: {exc}")
        return data


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413, whether or not Content-Length is given."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(send)
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
