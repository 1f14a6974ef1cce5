"""The robot-callback endpoint the HIL Server and the worker share: auth, URL verification, decryption, parsing."""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .callback import CallbackError, IncomingMessage, parse_callback
from .http_errors import error_response

logger = logging.getLogger(__name__)

CALLBACK_MAX_BYTES = 1024 * 1024


def wecom_ok() -> JSONResponse:
    return JSONResponse({"errcode": 0, "errmsg": "ok"})


def wecom_error(status: int, message: str) -> JSONResponse:
    # WeCom and fly-pigeon read errcode/errmsg; people and our clients read error/message.
    return error_response(status, message, errcode=status, errmsg=message)


class NotStored(Exception):
    """Raised by a callback's `accept` when it could not make the callback durable: the robot gets a 503 and sends it
    again, instead of a 200 for something that would be lost."""


@dataclass(frozen=True)
class Accepted:
    """A readable robot callback: the body in fly-pigeon's JSON shape (what the worker spools and relays) and the
    message parsed from it (what the server matches), so it is parsed once."""

    data: dict[str, Any]
    message: IncomingMessage


class CallbackIntake:
    """Reads a robot callback request and decides whether it is authentic:

    - a signed request (`msg_signature` in the URL: WeCom's encrypted callback) is authenticated by its signature
      alone, and refused when its timestamp is further than `max_age` seconds from now (a captured callback cannot
      be replayed later; within the window the msgid memory drops it);
    - unsigned JSON (fly-pigeon) must carry the CALLBACK_AUTH header when one is configured; with WeCom signing
      configured and no header rule, unsigned JSON is refused, since that URL is public.

    It also answers WeCom's URL verification, and returns the callback as a dict in fly-pigeon's JSON shape."""

    def __init__(
        self,
        auth_key: str | None = None,
        auth_value: str | None = None,
        callback_token: str | None = None,
        callback_aes_key: str | None = None,
        *,
        max_age: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.auth_key = auth_key or None
        self.auth_value = auth_value or ""
        self.max_age = max_age
        self._clock = clock
        self.crypto = None
        if callback_token and callback_aes_key:
            from .wecom_crypto import WeComCrypto

            self.crypto = WeComCrypto(callback_token, callback_aes_key)

    @property
    def authenticated(self) -> bool:
        """Whether callbacks are checked at all (a header rule or WeCom signing)."""
        return bool(self.auth_key or self.crypto)

    def _header_ok(self, request: Request) -> bool:
        given = request.headers.get(self.auth_key or "", "")
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.auth_value.encode())

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
        """The callback (authenticated, validated, parsed once), or the error response to send back."""
        signed = "msg_signature" in request.query_params
        if not signed:
            refused = self._refuse_unsigned(request)
            if refused is not None:
                return refused
        body = await request.body()
        if len(body) > CALLBACK_MAX_BYTES:
            return wecom_error(413, "callback body too large")
        if signed:
            return self._decrypt(request, body)
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

    def _refuse_unsigned(self, request: Request) -> Response | None:
        if self.auth_key:
            if self._header_ok(request):
                return None
            logger.warning("callback refused: missing or wrong %s header", self.auth_key)
            return wecom_error(401, f"missing or wrong {self.auth_key} header (CALLBACK_AUTH_KEY/CALLBACK_AUTH_VALUE)")
        if self.crypto is not None:
            logger.warning("callback refused: unsigned JSON where only WeCom's signed callbacks are accepted")
            return wecom_error(
                403,
                "this endpoint takes WeCom's signed (encrypted) callbacks only; to also accept fly-pigeon JSON, "
                "set CALLBACK_AUTH_KEY/CALLBACK_AUTH_VALUE and send that header",
            )
        return None

    def _decrypt(self, request: Request, body: bytes) -> Accepted | Response:
        from .wecom_crypto import WeComCryptoError, WeComSignatureError
        from .wecom_xml import CallbackPayloadError, parse_callback_payload

        if self.crypto is None:
            return wecom_error(400, "encrypted callback, but WECOM_CALLBACK_TOKEN / WECOM_CALLBACK_AES_KEY are not set")
        q = request.query_params
        timestamp = q.get("timestamp", "")
        stale = self._stale(timestamp)
        if stale:
            logger.warning("signed callback refused: %s", stale)
            return wecom_error(403, stale)
        signature = q.get("msg_signature", "")
        try:
            payload = self.crypto.decrypt_callback(signature, timestamp, q.get("nonce", ""), body)
            data = parse_callback_payload(payload)
            if not data.get("msgid"):
                # Without WeCom's msgid a retry could not be told from a new message: the signature stands in.
                data["msgid"] = f"sig-{signature[:64]}"
            accepted = Accepted(data, parse_callback(data))
        except WeComSignatureError:
            logger.warning("signed callback refused: bad msg_signature")
            return wecom_error(403, "bad msg_signature")
        except (WeComCryptoError, CallbackPayloadError, CallbackError) as exc:
            return wecom_error(400, f"cannot read encrypted callback: {exc}")
        return accepted

    def _stale(self, timestamp: str) -> str | None:
        """Why a signed request's timestamp is refused, or None when it is fresh."""
        if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
            return "signed callback without a valid timestamp"
        age = self._clock() - int(timestamp)
        if abs(age) > self.max_age:
            return (
                f"signed callback timestamp is {abs(age):.0f}s {'old' if age > 0 else 'in the future'}; "
                f"callbacks older than {self.max_age:.0f}s are refused as replays (check the clock of this host)"
            )
        return None


def callback_router(
    path: str, intake: CallbackIntake, accept: Callable[[Request, Accepted], Awaitable[None]], summary: str
) -> APIRouter:
    """GET (WeCom URL verification) and POST (the callback) on `path`. `accept` stores the callback durably; the
    robot gets its 200 only after it returns, so nothing acknowledged to WeCom can be lost. When it raises
    `NotStored` the robot gets a 503 and retries."""
    router = APIRouter()

    @router.get(path, include_in_schema=False)
    async def verify(request: Request) -> Response:
        return intake.verify_url(request)

    @router.post(path, summary=summary, responses=CALLBACK_RESPONSES)
    async def receive(request: Request) -> Response:
        accepted = await intake.read(request)
        if isinstance(accepted, Response):
            return accepted
        try:
            await accept(request, accepted)
        except NotStored as exc:
            logger.error("callback msgid=%s not stored: %s", accepted.message.msgid, exc)
            return wecom_error(503, f"callback not stored ({exc}); send it again later")
        return wecom_ok()

    return router


CALLBACK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": '`{"errcode": 0, "errmsg": "ok"}`: stored'},
    400: {"description": "not a robot callback"},
    401: {"description": "missing or wrong CALLBACK_AUTH_KEY header"},
    403: {"description": "bad WeCom signature, or unsigned where signed callbacks are required"},
    413: {"description": "body too large"},
    503: {"description": "could not be stored now; send it again"},
}
