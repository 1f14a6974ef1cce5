"""The robot-callback endpoint the HIL Server and the worker share: auth, URL verification, decryption, parsing."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .callback import CallbackError, IncomingMessage, parse_callback

logger = logging.getLogger(__name__)

CALLBACK_MAX_BYTES = 1024 * 1024


def wecom_ok() -> JSONResponse:
    return JSONResponse({"errcode": 0, "errmsg": "ok"})


def wecom_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"errcode": status, "errmsg": message, "error": message}, status_code=status)


@dataclass(frozen=True)
class Accepted:
    """A readable robot callback: the body in fly-pigeon's JSON shape (what the worker spools and relays) and the
    message parsed from it (what the server matches), so it is parsed once."""

    data: dict[str, Any]
    message: IncomingMessage


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

    async def read(self, request: Request) -> Accepted | Response:
        """The callback (validated, parsed once), or the error response to send back."""
        if not self.authorized(request):
            logger.warning("callback refused: missing or wrong %s header", self.auth_key)
            return wecom_error(401, f"missing or wrong {self.auth_key} header (CALLBACK_AUTH_KEY/CALLBACK_AUTH_VALUE)")
        body = await request.body()
        if len(body) > CALLBACK_MAX_BYTES:
            return wecom_error(413, "callback body too large")
        if "msg_signature" in request.query_params:
            return self._decrypt(request, body)
        if self.crypto is not None and not self.auth_key:
            # WeCom's encrypted callback needs a public URL; unsigned JSON there would let anyone forge answers.
            return wecom_error(
                403,
                "this endpoint takes WeCom's signed (encrypted) callbacks only; to also accept fly-pigeon JSON, "
                "set CALLBACK_AUTH_KEY/CALLBACK_AUTH_VALUE and send that header",
            )
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested arrays/objects
            return wecom_error(
                400, "callback body is not JSON (for WeCom's encrypted XML, configure the callback token and AES key)"
            )
        try:
            return Accepted(data, parse_callback(data))
        except CallbackError as exc:
            return wecom_error(400, str(exc))

    def _decrypt(self, request: Request, body: bytes) -> Accepted | Response:
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
            accepted = Accepted(data, parse_callback(data))
        except WeComSignatureError:
            return wecom_error(403, "bad msg_signature")
        except (WeComCryptoError, CallbackPayloadError, CallbackError) as exc:
            return wecom_error(400, f"cannot read encrypted callback: {exc}")
        return accepted


def callback_router(
    path: str, intake: CallbackIntake, accept: Callable[[Request, Accepted], Awaitable[None]], summary: str
) -> APIRouter:
    """GET (WeCom URL verification) and POST (the callback) on `path`. `accept` stores the callback durably; the
    robot gets its 200 only after it returns, so nothing acknowledged to WeCom can be lost."""
    router = APIRouter()

    @router.get(path, include_in_schema=False)
    async def verify(request: Request) -> Response:
        return intake.verify_url(request)

    @router.post(path, summary=summary, responses=CALLBACK_RESPONSES)
    async def receive(request: Request) -> Response:
        accepted = await intake.read(request)
        if isinstance(accepted, Response):
            return accepted
        await accept(request, accepted)
        return wecom_ok()

    return router


CALLBACK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": '`{"errcode": 0, "errmsg": "ok"}`: stored'},
    400: {"description": "not a robot callback"},
    401: {"description": "missing or wrong CALLBACK_AUTH_KEY header"},
    403: {"description": "bad WeCom signature, or unsigned where signed callbacks are required"},
    413: {"description": "body too large"},
}
