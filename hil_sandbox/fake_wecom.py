"""A fake WeCom robot API: the webhook send and upload endpoints, and people who answer through robot callbacks.

Written from the WeCom facts in the project notes, not from our client code, so end-to-end tests do not check our code
against itself. Like WeCom, the robot routes always answer HTTP 200 and put the outcome in ``errcode``.

Error codes where WeCom's documentation does not say which one the webhook returns (our choice, WeCom global codes):

- 47001 "data format error": body is not JSON, or not a JSON object.
- 40035 "invalid parameter": a field has the wrong type, image base64/md5 missing or not decodable, bad ``chatid``,
  bad ``news.articles``, file ``media_id`` missing, upload part without a filename.
- 44004 "empty content": text/markdown content missing or empty.
- 301019 "media file md5 mismatch": image md5 differs from the md5 of the decoded bytes.
- 40009 "invalid image size": decoded image larger than 2 MB.
- 40005 "invalid file type": image is neither PNG nor JPEG.
- 40007 "invalid media_id": file ``media_id`` unknown, expired, or uploaded with another robot's key.
- 40004 "invalid media type": upload ``type`` other than ``file``.
- 44001 "empty media data": upload without a ``media`` part.
- 40006 "invalid file size": upload smaller than 5 B or larger than 20 MB.

Control API for tests and the sandbox lives under ``/_fake/``; see :func:`create_fake_wecom_app`. ``GET /`` is the
sandbox's web chat, where a person reads what the robot sent and answers (``static/chat.html``). ``WS /`` is the AI
bot's long connection (``hil_sandbox.fake_aibot``); its messages go into the same message log.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import importlib.resources
import json
import logging
import math
import secrets
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypedDict, TypeVar, Unpack

import httpx
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

DEFAULT_BOT_KEY = "test-bot-key"
DEFAULT_PUBLIC_URL = "http://127.0.0.1:8090"
DEFAULT_PORT = 8090

TEXT_MAX_BYTES = 2048
MARKDOWN_MAX_BYTES = 4096
IMAGE_MAX_BYTES = 2 * 1024 * 1024
MEDIA_MIN_BYTES = 5
MEDIA_MAX_BYTES = 20 * 1024 * 1024
MEDIA_TTL_SECONDS = 3 * 24 * 3600.0
MAX_CHAT_IDS = 100
MAX_NEWS_ARTICLES = 8
# Images kept for the chat page (robot sends and images people attach); the oldest go first past either bound.
IMAGE_STORE_MAX_BYTES = 64 * 1024 * 1024
IMAGE_STORE_MAX_COUNT = 500
# An image a person attaches in the chat page; real chats take photos larger than a robot may send.
ATTACH_MAX_BYTES = 10 * 1024 * 1024
# WeCom gives a callback 5 s before it retries; waiting longer would hide a slow receiver.
CALLBACK_TIMEOUT_SECONDS = 5.0
# AI bot (sources in fake_aibot's docstring): welcome/card update within 5 s, stream updates for 6 min, media URLs
# about 5 min; the markdown limit is a guess (the stream's 20480 bytes); frames above 1 MiB are closed with 1009.
AIBOT_REPLY_WINDOW_SECONDS = 5.0
AIBOT_STREAM_WINDOW_SECONDS = 360.0
AIBOT_MEDIA_TTL_SECONDS = 300.0
AIBOT_MARKDOWN_MAX_BYTES = 20480
AIBOT_MAX_FRAME_BYTES = 1024 * 1024

# Deeper than any real body (the deepest, news, is 4): the fake refuses it rather than recursing on it.
MAX_JSON_DEPTH = 32

MSGTYPES = frozenset({"text", "markdown", "markdown_v2", "image", "file", "news"})
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"

OK = 0
ERR_INVALID_WEBHOOK_URL = 93000
ERR_FREQ_OUT_OF_LIMIT = 45009
ERR_CONTENT_TOO_LONG = 40058
ERR_INVALID_MSGTYPE = 40008
ERR_EMPTY_CONTENT = 44004
ERR_INVALID_PARAMETER = 40035
ERR_DATA_FORMAT = 47001
ERR_MD5_MISMATCH = 301019
ERR_INVALID_IMAGE_SIZE = 40009
ERR_INVALID_FILE_TYPE = 40005
ERR_INVALID_MEDIA_ID = 40007
ERR_INVALID_MEDIA_TYPE = 40004
ERR_EMPTY_MEDIA = 44001
ERR_INVALID_FILE_SIZE = 40006
ERR_ROBOT_NOT_ALLOWED = 93005
# The AI bot's long connection (fake_aibot) answers with these as well as some of the above.
ERR_INVALID_CREDENTIALS = 853000
ERR_INVALID_REQ_ID = 846605
ERR_STREAM_EXPIRED = 846608
ERR_INVALID_CHATID = 93006
ERR_BAD_REQUEST = 40058  # the webhook's "content too long" code, which the AI bot answers to any bad request

ERRMSGS: dict[int, str] = {
    ERR_INVALID_WEBHOOK_URL: "invalid webhook url",
    ERR_FREQ_OUT_OF_LIMIT: "api freq out of limit",
    ERR_CONTENT_TOO_LONG: "content exceed max length",
    ERR_INVALID_MSGTYPE: "invalid message type",
    ERR_EMPTY_CONTENT: "empty content",
    ERR_INVALID_PARAMETER: "invalid parameter",
    ERR_DATA_FORMAT: "data format error",
    ERR_MD5_MISMATCH: "media file md5 mismatch",
    ERR_INVALID_IMAGE_SIZE: "invalid image size",
    ERR_INVALID_FILE_TYPE: "invalid file type",
    ERR_INVALID_MEDIA_ID: "invalid media_id",
    ERR_INVALID_MEDIA_TYPE: "invalid media type",
    ERR_EMPTY_MEDIA: "empty media data",
    ERR_INVALID_FILE_SIZE: "invalid file size",
    ERR_ROBOT_NOT_ALLOWED: "robot not allowed to send to this user",
}
# The AI bot's words: for its own codes, and for the ones it shares with the webhook the webhook's.
AIBOT_SHARED_ERRCODES = (ERR_INVALID_MSGTYPE, ERR_EMPTY_CONTENT, ERR_INVALID_MEDIA_ID, ERR_FREQ_OUT_OF_LIMIT)
AIBOT_ERRMSGS: dict[int, str] = {
    ERR_INVALID_CREDENTIALS: "invalid bot_id or secret",
    ERR_INVALID_REQ_ID: "invalid req_id",
    ERR_STREAM_EXPIRED: "stream message update expired",
    ERR_INVALID_CHATID: "invalid chatid",
    ERR_BAD_REQUEST: "invalid Request Parameter",
} | {code: ERRMSGS[code] for code in AIBOT_SHARED_ERRCODES}

ChatType = Literal["group", "single"]
CallbackMsgType = Literal["text", "image", "mixed", "event"]


class CallbackParts(TypedDict, total=False):
    """What a person's message is made of besides its chat and text: FakeWeCom.build_callback's keywords."""

    quote: str | None
    quote_sender: str
    image_url: str | None
    chat_type: ChatType
    from_user: Mapping[str, str] | None
    msgid: str | None
    msgtype: CallbackMsgType | None
    event_type: str | None
    at_robot: bool


T = TypeVar("T")


def errmsg_for(errcode: int, detail: str = "", *, errmsgs: Mapping[int, str] = ERRMSGS) -> str:
    """WeCom-style errmsg: the short text, then a hint and a link, as the real API writes it."""
    text = errmsgs.get(errcode, "injected failure")
    if detail:
        text = f"{text}: {detail}"
    hint = f"[{int(time.time())}_fake_{secrets.token_hex(4)}]"
    return f"{text}, hint: {hint}, more info at https://open.work.weixin.qq.com/devtool/query?e={errcode}"


def parse_wire_json(raw: bytes | str) -> Any:
    """JSON from the wire, read as a strict server would; ValueError for anything else.

    Numbers must be finite (no NaN, Infinity, 1e999), nesting stays within MAX_JSON_DEPTH, and lone surrogates in
    strings become U+FFFD (as Go's decoder does), so whatever is stored can be served back as UTF-8.
    """
    try:
        value = json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError as exc:
        raise ValueError("JSON nests too deep") from exc
    if _too_deep(value):
        raise ValueError(f"JSON nests deeper than {MAX_JSON_DEPTH}")
    return _scrub(value)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    level: list[Any] = [value]
    for _ in range(limit):
        level = [
            child
            for node in level
            if isinstance(node, (dict, list))
            for child in (node.values() if isinstance(node, dict) else node)
        ]
        if not level:
            return False
    return True


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    if isinstance(value, dict):
        return {_scrub(key): _scrub(item) for key, item in value.items()}
    return value


def format_quote_reply(quote: str, answer: str, sender: str = "", robot_name: str | None = None) -> str:
    """Text content of a quote-reply exactly as WeCom delivers it.

    U+201C, ``{sender}`` + U+FF1A + newline (left out when sender is empty), the quote, U+201D, newline, ``------``,
    newline, then ``@{robot_name} {answer}`` (just the answer when robot_name is None, as in single chats).
    """
    head = f"{sender}\uff1a\n" if sender else ""
    tail = f"@{robot_name} {answer}" if robot_name else answer
    return f"\u201c{head}{quote}\u201d\n------\n{tail}"


# WeCom tries a callback 3 times in all before giving up (WECOM.md).
WECOM_CALLBACK_ATTEMPTS = 3


@dataclass
class FakeWeComConfig:
    """Settings of the fake; tests build one directly, the CLI from flags, /_fake/config changes it at run time."""

    bot_keys: set[str] = field(default_factory=lambda: {DEFAULT_BOT_KEY})
    callback_url: str | None = None
    callback_headers: dict[str, str] = field(default_factory=dict)
    rate_limit: int | None = None
    rate_window: float = 60.0
    robot_name: str = "HIL助手"
    # Base of the webhook_url put into callbacks; None means "the URL the request came in on" (or DEFAULT_PUBLIC_URL).
    public_url: str | None = None
    media_ttl: float = MEDIA_TTL_SECONDS
    # The AI bot's long connection (fake_aibot): bot_id -> secret; an empty map refuses every subscribe.
    aibots: dict[str, str] = field(default_factory=dict)
    aibot_answer_pings: bool = True  # False: pings go unanswered, a half-dead link
    aibot_idle_timeout: float | None = None  # close links that have not pinged (or subscribed) for this long
    aibot_reply_window: float = AIBOT_REPLY_WINDOW_SECONDS  # welcome and card update after enter_chat / a click
    aibot_stream_window: float = AIBOT_STREAM_WINDOW_SECONDS  # aibot_respond_msg after the person's message
    aibot_media_ttl: float = AIBOT_MEDIA_TTL_SECONDS  # how long a callback's media URL works
    aibot_markdown_max_bytes: int = AIBOT_MARKDOWN_MAX_BYTES
    aibot_max_frame_bytes: int = AIBOT_MAX_FRAME_BYTES
    # The HIL Server the sandbox runs beside (its /status.json), so the chat page can mark answered questions.
    hil_server_url: str | None = None
    # How often a long poll of /_fake/hil-status reads the server's /status.json (it has no push of its own).
    hil_status_interval: float = 1.0


class SentMessage(BaseModel):
    """One accepted send: a robot webhook send, or a message an AI bot put in a chat (source "aibot")."""

    seq: int
    key: str  # the robot key of a webhook send; the bot_id of an AI-bot message
    chatid: str | None = None
    msgtype: str
    content: str | None = None  # text/markdown content; news: article titles, one per line; image/file: None
    mentioned_list: list[str] = Field(default_factory=list)
    mentioned_mobile_list: list[str] = Field(default_factory=list)
    image_md5: str | None = None
    image_size: int | None = None
    image_id: str | None = None  # the bytes at GET /_fake/images/{image_id} while the image store keeps them
    media_id: str | None = None
    file_name: str | None = None
    ts: float
    source: Literal["webhook", "aibot"] = "webhook"
    card: dict[str, Any] | None = None  # template_card as people see it now: a card update replaces it
    task_id: str | None = None
    stream_id: str | None = None
    finished: bool | None = None  # stream: whether the bot said finish
    reply_to: str | None = None  # AI bot answers: msgid of the person's message or event they answer


class SendAttempt(BaseModel):
    """Every send attempt, accepted or not, with what the fake answered."""

    seq: int
    key: str | None
    chatid: str | None = None
    msgtype: str | None = None
    errcode: int
    errmsg: str
    injected: bool = False
    message_seq: int | None = None
    ts: float


class UploadedMedia(BaseModel):
    media_id: str
    key: str
    filename: str
    size: int
    md5: str
    created_at: float
    expires_at: float  # on the fake's clock, not wall time


def image_mime(data: bytes) -> str | None:
    if data.startswith(PNG_MAGIC):
        return "image/png"
    if data.startswith(JPEG_MAGIC):
        return "image/jpeg"
    return None


class ImageStore:
    """Image bytes by id, bounded in count and total size: the chat page shows them, nothing needs them forever."""

    def __init__(self, max_bytes: int = IMAGE_STORE_MAX_BYTES, max_count: int = IMAGE_STORE_MAX_COUNT) -> None:
        self.max_bytes = max_bytes
        self.max_count = max_count
        self._images: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0

    def add(self, data: bytes) -> str:
        image_id = uuid.uuid4().hex
        self._images[image_id] = data
        self._size += len(data)
        while self._images and (self._size > self.max_bytes or len(self._images) > self.max_count):
            _, old = self._images.popitem(last=False)
            self._size -= len(old)
        return image_id

    def get(self, image_id: str) -> bytes | None:
        return self._images.get(image_id)

    def __len__(self) -> int:
        return len(self._images)


class CallbackNotConfiguredError(RuntimeError):
    """A reply was asked for but no callback_url is set."""


class Rejected(Exception):
    """A request WeCom refuses: the errcode it answers and a detail for the errmsg."""

    def __init__(self, errcode: int, detail: str = "") -> None:
        super().__init__(errcode, detail)
        self.errcode = errcode
        self.detail = detail


def _resolve_msgtype(
    msgtype: str | None, text: str | None, quote: str | None, image_url: str | None, event_type: str | None
) -> str:
    """The callback msgtype to build, inferred when not given; ValueError when the parts do not fit it."""
    has_text = text is not None or quote is not None
    if msgtype is None:
        if event_type is not None:
            msgtype = "event"
        elif image_url is not None:
            msgtype = "mixed" if has_text else "image"
        else:
            msgtype = "text"
    if msgtype == "text" and not has_text:
        raise ValueError("a text callback needs text or quote")
    if msgtype == "image" and image_url is None:
        raise ValueError("an image callback needs image_url")
    if msgtype == "mixed" and (image_url is None or not has_text):
        raise ValueError("a mixed callback needs text (or quote) and image_url")
    if msgtype == "event" and not event_type:
        raise ValueError("an event callback needs event_type (add_to_chat, delete_from_chat, enter_chat)")
    if msgtype not in ("text", "image", "mixed", "event"):
        raise ValueError(f"unsupported callback msgtype {msgtype!r}: use text, image, mixed or event")
    return msgtype


def _chat_matches(message_chatid: str | None, chat_id: str | None) -> bool:
    if chat_id is None:
        return True
    # A send may name up to 100 chats joined by "|"; it reached each of them.
    return message_chatid is not None and chat_id in message_chatid.split("|")


def _str_list(section: Mapping[str, Any], name: str) -> list[str]:
    value = section.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise Rejected(ERR_INVALID_PARAMETER, f"{name} must be a list of strings")
    return value


def _content(payload: Mapping[str, Any], msgtype: str, max_bytes: int) -> str:
    section = payload.get(msgtype)
    if section is None:
        raise Rejected(ERR_EMPTY_CONTENT, f"{msgtype}.content is missing")
    if not isinstance(section, dict):
        raise Rejected(ERR_INVALID_PARAMETER, f"{msgtype} must be an object")
    content = section.get("content")
    if content is None or content == "":
        raise Rejected(ERR_EMPTY_CONTENT, f"{msgtype}.content is empty")
    if not isinstance(content, str):
        raise Rejected(ERR_INVALID_PARAMETER, f"{msgtype}.content must be a string")
    size = len(content.encode("utf-8"))
    if size > max_bytes:
        raise Rejected(ERR_CONTENT_TOO_LONG, f"{msgtype}.content is {size} bytes, at most {max_bytes} allowed")
    return content


def _section(payload: Mapping[str, Any], msgtype: str) -> dict[str, Any]:
    section = payload.get(msgtype)
    if not isinstance(section, dict):
        raise Rejected(ERR_INVALID_PARAMETER, f"{msgtype} must be an object")
    return section


class FakeWeCom:
    """State of the fake WeCom: recorded sends, injected failures, rate windows, uploaded media.

    Route handlers and in-process tests share one instance (``app.state.fake``). State is guarded by a thread lock
    because TestClient runs the app on another thread's event loop while the test reads it.
    """

    def __init__(
        self,
        config: FakeWeComConfig | None = None,
        *,
        http_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or FakeWeComConfig()
        self.http_client = http_client  # for callback POSTs; the app's lifespan sets one when none is given
        self._clock = clock
        self._lock = threading.RLock()
        # Waiters may sit on other event loops (a test loop vs. TestClient's portal loop), hence loop + Event pairs.
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._clear()
        from hil_sandbox.fake_aibot import AibotHub  # fake_aibot builds on this module

        self.aibot = AibotHub(self)

    def _clear(self) -> None:
        self.messages: list[SentMessage] = []
        self.attempts: list[SendAttempt] = []
        self.callbacks: list[dict[str, Any]] = []
        self.media: dict[str, UploadedMedia] = {}
        self.images = ImageStore()
        self._failures: deque[int] = deque()
        self._windows: dict[str, deque[float]] = {}

    # ----- test controls -----

    def reset(self) -> None:
        """Forget messages, attempts, callbacks, media, images, pending failures, rate windows; keep the config.

        AI-bot records go too (frames, events, cards); connected bots stay connected.
        """
        with self._lock:
            self._clear()
            self.aibot.reset()

    def fail_next(self, *errcodes: int) -> None:
        """Answer the next ``len(errcodes)`` sends with these errcodes (after the key check), in order."""
        with self._lock:
            self._failures.extend(errcodes)

    @property
    def pending_failures(self) -> list[int]:
        with self._lock:
            return list(self._failures)

    def update_config(self, **changes: Any) -> None:
        """Change config fields at run time (unknown names raise AttributeError)."""
        with self._lock:
            for name, value in changes.items():
                if not hasattr(self.config, name):
                    raise AttributeError(f"FakeWeComConfig has no field {name!r}")
                setattr(self.config, name, value)

    def get_messages(self, chat_id: str | None = None, since_seq: int = 0) -> list[SentMessage]:
        """Accepted sends with seq > since_seq, optionally only those that reached chat_id."""
        with self._lock:
            return [m for m in self.messages if m.seq > since_seq and _chat_matches(m.chatid, chat_id)]

    def get_attempts(self) -> list[SendAttempt]:
        with self._lock:
            return list(self.attempts)

    def get_callbacks(self, since_seq: int = 0) -> list[dict[str, Any]]:
        """Callbacks sent by reply() with seq > since_seq, each ``{"seq", "ts", "callback", "responses"}``.

        ``ts`` is when the person wrote (before the POST), so it sorts before whatever the robot said in answer.
        """
        with self._lock:
            return [c for c in self.callbacks if c["seq"] > since_seq]

    def add_image(self, data: bytes) -> str:
        """Keep image bytes for GET /_fake/images/{id} (bounded; the oldest are forgotten first)."""
        with self._lock:
            return self.images.add(data)

    def get_image(self, image_id: str) -> bytes | None:
        with self._lock:
            return self.images.get(image_id)

    async def _wait_for(self, select: Callable[[], list[T]], n: int, timeout: float) -> list[T]:
        """Wait until select() (called under the lock) returns at least n items; TimeoutError otherwise."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                event = asyncio.Event()
                with self._lock:
                    found = select()
                    if len(found) >= n:
                        return found
                    # Registered under the lock that sends and replies notify under, so nothing slips in between.
                    self._waiters.append((loop, event))
                try:
                    await event.wait()
                finally:
                    with self._lock:
                        self._waiters.remove((loop, event))

    async def wait_for_messages(
        self,
        n: int,
        chat_id: str | None = None,
        timeout: float = 10,
        *,
        since_seq: int = 0,
    ) -> list[SentMessage]:
        """Wait until at least n accepted sends match (see get_messages) and return them; TimeoutError otherwise."""
        try:
            return await self._wait_for(lambda: self.get_messages(chat_id, since_seq), n, timeout)
        except TimeoutError:
            found = self.get_messages(chat_id, since_seq)
            raise TimeoutError(
                f"waited {timeout}s for {n} message(s) to chat {chat_id!r} after seq {since_seq}, "
                f"got {len(found)}: {[m.content for m in found]}"
            ) from None

    async def wait_for_callbacks(
        self,
        n: int,
        timeout: float = 10,
        *,
        since_seq: int = 0,
    ) -> list[dict[str, Any]]:
        """Wait until at least n callbacks with seq > since_seq were sent and return them; TimeoutError otherwise."""
        try:
            return await self._wait_for(lambda: self.get_callbacks(since_seq), n, timeout)
        except TimeoutError:
            raise TimeoutError(f"waited {timeout}s for {n} callback(s) after seq {since_seq}") from None

    def _notify(self) -> None:
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, event in self._waiters:
            if loop is current:
                event.set()
            elif not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(event.set)
                except RuntimeError:  # the loop closed after the check; its waiter is gone anyway
                    pass

    # ----- the webhook -----

    def handle_send(self, key: str | None, body: bytes | str | Mapping[str, Any]) -> dict[str, Any]:
        """One ``/cgi-bin/webhook/send`` call: check, record, and return WeCom's JSON answer."""
        chatid: str | None = None
        msgtype: str | None = None
        injected = False
        with self._lock:
            try:
                if not key or key not in self.config.bot_keys:
                    raise Rejected(ERR_INVALID_WEBHOOK_URL, "check the key in the webhook url")
                payload = self._parse_json(body)
                raw_chatid, raw_msgtype = payload.get("chatid"), payload.get("msgtype")
                chatid = raw_chatid if isinstance(raw_chatid, str) else None
                msgtype = raw_msgtype if isinstance(raw_msgtype, str) else None
                if self._failures:
                    injected = True
                    raise Rejected(self._failures.popleft())
                self._check_rate(key)
                fields = self._validate(payload, key)
                image = fields.pop("image_data", None)
            except Rejected as rejected:
                errmsg = errmsg_for(rejected.errcode, rejected.detail)
                self.record_attempt(key, chatid, msgtype, rejected.errcode, errmsg, injected, None)
                log.info(
                    "send rejected errcode=%d chat_id=%s msgtype=%s injected=%s detail=%s",
                    rejected.errcode,
                    chatid,
                    msgtype,
                    injected,
                    rejected.detail,
                )
                return {"errcode": rejected.errcode, "errmsg": errmsg}
            assert key is not None  # checked first thing above
            if image is not None:
                fields["image_id"] = self.images.add(image)
            message = self.record_message(key, **fields)
            self._window(key).append(self._clock())
            self.record_attempt(key, message.chatid, message.msgtype, OK, "ok", False, message.seq)
        log.info("send accepted seq=%d chat_id=%s msgtype=%s", message.seq, message.chatid, message.msgtype)
        return {"errcode": OK, "errmsg": "ok"}

    def record_message(self, key: str, **fields: Any) -> SentMessage:
        """Append an accepted message (webhook send or AI-bot frame) to the log and wake whoever waits for it."""
        with self._lock:
            message = SentMessage(seq=len(self.messages) + 1, key=key, ts=time.time(), **fields)
            self.messages.append(message)
            self._notify()
        return message

    def record_attempt(
        self,
        key: str | None,
        chatid: str | None,
        msgtype: str | None,
        errcode: int,
        errmsg: str,
        injected: bool,
        message_seq: int | None,
    ) -> None:
        """Log a send attempt, accepted or not (AI-bot frames log the bot_id as key)."""
        with self._lock:
            self.attempts.append(
                SendAttempt(
                    seq=len(self.attempts) + 1,
                    key=key,
                    chatid=chatid,
                    msgtype=msgtype,
                    errcode=errcode,
                    errmsg=errmsg,
                    injected=injected,
                    message_seq=message_seq,
                    ts=time.time(),
                )
            )

    @staticmethod
    def _parse_json(body: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
        if isinstance(body, Mapping):
            return body
        try:
            payload = parse_wire_json(body)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            raise Rejected(ERR_DATA_FORMAT, f"body is not JSON ({exc})") from exc
        if not isinstance(payload, dict):
            raise Rejected(ERR_DATA_FORMAT, "body must be a JSON object")
        return payload

    def _window(self, key: str) -> deque[float]:
        """Accepted-send times of this key within the rate window (pruned here, so it never grows unbounded)."""
        window = self._windows.setdefault(key, deque())
        horizon = self._clock() - self.config.rate_window
        while window and window[0] <= horizon:
            window.popleft()
        return window

    def _check_rate(self, key: str) -> None:
        limit = self.config.rate_limit
        if limit is None:
            return
        window = self._window(key)
        if len(window) >= limit:
            raise Rejected(ERR_FREQ_OUT_OF_LIMIT, f"at most {limit} messages per {self.config.rate_window:g}s")

    def _validate(self, payload: Mapping[str, Any], key: str) -> dict[str, Any]:
        """SentMessage fields for a valid send body, or Rejected."""
        msgtype = payload.get("msgtype")
        if msgtype not in MSGTYPES:
            raise Rejected(ERR_INVALID_MSGTYPE, f"msgtype {msgtype!r} is not one of {sorted(MSGTYPES)}")
        fields: dict[str, Any] = {"msgtype": msgtype, "chatid": self._chatid(payload)}
        if msgtype == "text":
            fields["content"] = _content(payload, "text", TEXT_MAX_BYTES)
            fields["mentioned_list"] = _str_list(payload["text"], "mentioned_list")
            fields["mentioned_mobile_list"] = _str_list(payload["text"], "mentioned_mobile_list")
        elif msgtype in ("markdown", "markdown_v2"):
            fields["content"] = _content(payload, msgtype, MARKDOWN_MAX_BYTES)
        elif msgtype == "image":
            fields.update(self._image(_section(payload, "image")))
        elif msgtype == "file":
            fields.update(self._file(_section(payload, "file"), key))
        else:
            fields["content"] = self._news(_section(payload, "news"))
        return fields

    @staticmethod
    def _chatid(payload: Mapping[str, Any]) -> str | None:
        chatid = payload.get("chatid")
        if chatid is None:
            return None  # WeCom sends to every group the robot is in
        if not isinstance(chatid, str) or not chatid:
            raise Rejected(ERR_INVALID_PARAMETER, "chatid must be a non-empty string")
        if len(chatid.split("|")) > MAX_CHAT_IDS:
            raise Rejected(ERR_INVALID_PARAMETER, f"chatid names more than {MAX_CHAT_IDS} chats")
        return chatid

    @staticmethod
    def _image(section: Mapping[str, Any]) -> dict[str, Any]:
        b64, md5 = section.get("base64"), section.get("md5")
        if not isinstance(b64, str) or not b64 or not isinstance(md5, str) or not md5:
            raise Rejected(ERR_INVALID_PARAMETER, "image needs base64 and md5 strings")
        try:
            # Line breaks (as base64.encodebytes writes) are tolerated; any other stray character is not.
            data = base64.b64decode("".join(b64.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Rejected(ERR_INVALID_PARAMETER, "image.base64 is not valid base64") from exc
        actual = hashlib.md5(data).hexdigest()
        if md5.lower() != actual:
            raise Rejected(ERR_MD5_MISMATCH, f"md5 of the decoded image is {actual}")
        if len(data) > IMAGE_MAX_BYTES:
            raise Rejected(ERR_INVALID_IMAGE_SIZE, f"image is {len(data)} bytes, at most {IMAGE_MAX_BYTES} allowed")
        if image_mime(data) is None:
            raise Rejected(ERR_INVALID_FILE_TYPE, "image must be PNG or JPEG")
        # image_data is kept only if the send is accepted (handle_send takes it out of the fields).
        return {"image_md5": actual, "image_size": len(data), "image_data": data}

    def _file(self, section: Mapping[str, Any], key: str) -> dict[str, Any]:
        media_id = section.get("media_id")
        if not isinstance(media_id, str) or not media_id:
            raise Rejected(ERR_INVALID_PARAMETER, "file.media_id must be a non-empty string")
        media = self.media.get(media_id)
        # A media_id lives 3 days and belongs to the robot that uploaded it.
        if media is None or media.key != key or media.expires_at <= self._clock():
            raise Rejected(ERR_INVALID_MEDIA_ID, "unknown or expired media_id, or uploaded by another robot")
        return {"media_id": media_id, "file_name": media.filename}

    @staticmethod
    def _news(section: Mapping[str, Any]) -> str:
        articles = section.get("articles")
        if not isinstance(articles, list) or not 1 <= len(articles) <= MAX_NEWS_ARTICLES:
            raise Rejected(ERR_INVALID_PARAMETER, f"news.articles must hold 1 to {MAX_NEWS_ARTICLES} articles")
        titles = []
        for article in articles:
            if not isinstance(article, dict) or not all(
                isinstance(article.get(name), str) and article.get(name) for name in ("title", "url")
            ):
                raise Rejected(ERR_INVALID_PARAMETER, "each news article needs a title and a url")
            titles.append(article["title"])
        return "\n".join(titles)

    # ----- media upload -----

    def handle_upload(
        self, key: str | None, media_type: str | None, filename: str | None, data: bytes | None
    ) -> dict[str, Any]:
        """One ``/cgi-bin/webhook/upload_media`` call; the media_id is usable by this key only."""
        with self._lock:
            try:
                if not key or key not in self.config.bot_keys:
                    raise Rejected(ERR_INVALID_WEBHOOK_URL, "check the key in the webhook url")
                if media_type != "file":
                    raise Rejected(ERR_INVALID_MEDIA_TYPE, f"type {media_type!r} is not supported, use type=file")
                if data is None:
                    raise Rejected(ERR_EMPTY_MEDIA, "multipart field 'media' is missing")
                if not filename:
                    raise Rejected(ERR_INVALID_PARAMETER, "the 'media' part needs a filename")
                if not MEDIA_MIN_BYTES <= len(data) <= MEDIA_MAX_BYTES:
                    raise Rejected(
                        ERR_INVALID_FILE_SIZE,
                        f"file is {len(data)} bytes, allowed {MEDIA_MIN_BYTES} to {MEDIA_MAX_BYTES}",
                    )
            except Rejected as rejected:
                log.info("upload rejected errcode=%d detail=%s", rejected.errcode, rejected.detail)
                return {"errcode": rejected.errcode, "errmsg": errmsg_for(rejected.errcode, rejected.detail)}
            now = time.time()
            media = UploadedMedia(
                media_id=f"fake-media-{uuid.uuid4().hex}",
                key=key,
                filename=filename,
                size=len(data),
                md5=hashlib.md5(data).hexdigest(),
                created_at=now,
                expires_at=self._clock() + self.config.media_ttl,
            )
            self.media[media.media_id] = media
        log.info("upload accepted media_id=%s size=%d", media.media_id, media.size)
        return {
            "errcode": OK,
            "errmsg": "ok",
            "type": "file",
            "media_id": media.media_id,
            "created_at": str(int(now)),
        }

    # ----- people replying -----

    def build_callback(
        self,
        chat_id: str,
        text: str | None = None,
        *,
        quote: str | None = None,
        quote_sender: str = "",
        image_url: str | None = None,
        chat_type: ChatType = "group",
        from_user: Mapping[str, str] | None = None,
        msgid: str | None = None,
        msgtype: CallbackMsgType | None = None,
        event_type: str | None = None,
        at_robot: bool = True,
        base_url: str | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """The fly-pigeon JSON WeCom's relay would POST when a person writes to the robot.

        msgtype is inferred when None: event_type -> event, image_url with text -> mixed, image_url -> image, else text.
        A quote makes the text a quote-reply (see format_quote_reply). ValueError when the parts don't fit msgtype.
        """
        resolved = _resolve_msgtype(msgtype, text, quote, image_url, event_type)
        config = self.config
        base = (base_url or config.public_url or DEFAULT_PUBLIC_URL).rstrip("/")
        bot_key = key or min(config.bot_keys, default=DEFAULT_BOT_KEY)
        sender = {"userid": "zhangsan", "name": "张三", "alias": "zhangsan", **(from_user or {})}
        callback: dict[str, Any] = {
            "webhook_url": f"{base}/cgi-bin/webhook/send?key={bot_key}",
            "msgid": msgid or uuid.uuid4().hex,
            "chatid": chat_id,
            "chattype": chat_type,
            "msgtype": resolved,
            "from": sender,
        }
        if resolved in ("text", "mixed"):
            # Only group messages carry the robot mention; a single chat is already addressed to the robot.
            robot = config.robot_name if at_robot and chat_type == "group" else None
            if quote is not None:
                content = format_quote_reply(quote, text or "", quote_sender, robot)
            else:
                content = f"@{robot} {text}" if robot else (text or "")
            if resolved == "text":
                callback["text"] = {"content": content}
            else:
                callback["mixed_message"] = {
                    "msg_item": [
                        {"msg_type": "text", "text": {"content": content}},
                        {"msg_type": "image", "image": {"image_url": image_url}},
                    ]
                }
        elif resolved == "image":
            callback["image"] = {"image_url": image_url}
        else:
            callback["event"] = {"event_type": event_type}
        return callback

    async def reply(
        self,
        chat_id: str,
        text: str | None = None,
        *,
        repeat: int = 1,
        base_url: str | None = None,
        wecom_retries: bool = False,
        retry_interval: float = 5.0,
        **parts: Unpack[CallbackParts],
    ) -> dict[str, Any]:
        """Play a person: build a callback (``parts`` as build_callback takes them) and POST it ``repeat`` times
        (same msgid, like WeCom's retries).

        With ``wecom_retries`` it behaves like WeCom itself: up to 3 attempts in all, ``retry_interval`` apart,
        stopping at the first HTTP 200 (WeCom counts nothing else as delivered).

        Returns ``{"seq", "ts", "callback": <json sent>, "responses": [{"status_code", "body", "error"}]}``.
        """
        with self._lock:
            url = self.config.callback_url
            headers = dict(self.config.callback_headers)
        if not url:
            raise CallbackNotConfiguredError(
                "no callback_url is configured: set FakeWeComConfig.callback_url, pass --callback-url, "
                'or POST /_fake/config {"callback_url": "..."}'
            )
        if self.http_client is None:
            raise RuntimeError("FakeWeCom has no HTTP client: run the app's lifespan or pass http_client=")
        if repeat < 1:
            raise ValueError("repeat must be at least 1")
        callback = self.build_callback(chat_id, text, base_url=base_url, **parts)
        written_at = time.time()
        # Sequential on purpose: WeCom retries after the previous attempt, it does not send copies at once.
        if wecom_retries:
            responses = []
            for attempt in range(WECOM_CALLBACK_ATTEMPTS):
                if attempt:
                    await asyncio.sleep(retry_interval)
                responses.append(await self._post_callback(self.http_client, url, headers, callback))
                if responses[-1]["status_code"] == 200:
                    break
        else:
            responses = [await self._post_callback(self.http_client, url, headers, callback) for _ in range(repeat)]
        with self._lock:
            record = {"seq": len(self.callbacks) + 1, "ts": written_at, "callback": callback, "responses": responses}
            self.callbacks.append(record)
            self._notify()
        return record

    @staticmethod
    async def _post_callback(
        client: httpx.AsyncClient, url: str, headers: Mapping[str, str], callback: Mapping[str, Any]
    ) -> dict[str, Any]:
        try:
            response = await client.post(url, json=callback, headers=headers, timeout=CALLBACK_TIMEOUT_SECONDS)
        except httpx.HTTPError as exc:
            log.warning("callback failed msgid=%s chat_id=%s error=%r", callback["msgid"], callback["chatid"], exc)
            return {"status_code": None, "body": None, "error": f"{type(exc).__name__}: {exc}"}
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        log.info(
            "callback posted msgid=%s chat_id=%s status=%d", callback["msgid"], callback["chatid"], response.status_code
        )
        return {"status_code": response.status_code, "body": body, "error": None}


# ----- control API models -----


class FailRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    errcodes: list[int] = Field(min_length=1)


class ConfigUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate_limit: int | None = Field(default=None, ge=1)
    rate_window: float = Field(default=60.0, gt=0)
    callback_url: str | None = None
    callback_headers: dict[str, str] = Field(default_factory=dict)
    robot_name: str = Field(default="HIL助手", min_length=1)
    public_url: str | None = None
    bot_keys: list[str] = Field(default_factory=list, min_length=1)
    aibots: dict[Annotated[str, Field(min_length=1, max_length=128)], Annotated[str, Field(min_length=1)]] = Field(
        default_factory=dict
    )
    aibot_answer_pings: bool = True
    aibot_idle_timeout: float | None = Field(default=None, gt=0)
    aibot_reply_window: float = Field(default=AIBOT_REPLY_WINDOW_SECONDS, ge=0)
    aibot_stream_window: float = Field(default=AIBOT_STREAM_WINDOW_SECONDS, ge=0)
    aibot_media_ttl: float = Field(default=AIBOT_MEDIA_TTL_SECONDS, gt=0)
    aibot_markdown_max_bytes: int = Field(default=AIBOT_MARKDOWN_MAX_BYTES, ge=1)
    aibot_max_frame_bytes: int = Field(default=AIBOT_MAX_FRAME_BYTES, ge=1024)
    hil_server_url: str | None = None


class FromUser(BaseModel):
    userid: str = "zhangsan"
    name: str = "张三"
    alias: str = "zhangsan"


class ReplyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chat_id: str = Field(min_length=1)
    text: str | None = None
    quote: str | None = None
    quote_sender: str = ""
    image_url: str | None = None
    chat_type: ChatType = "group"
    from_user: FromUser | None = None
    msgid: str | None = None
    msgtype: CallbackMsgType | None = None
    event_type: str | None = None
    at_robot: bool = True
    repeat: int = Field(default=1, ge=1, le=10)
    wecom_retries: bool = False
    retry_interval: float = Field(default=5.0, gt=0, le=30)

    @model_validator(mode="after")
    def _parts_fit(self) -> ReplyRequest:
        _resolve_msgtype(self.msgtype, self.text, self.quote, self.image_url, self.event_type)
        return self


# ?timeout= of the long-poll routes: how long wait=N may hold the request.
PollTimeout = Annotated[float, Query(alias="timeout", ge=0, le=60)]


async def long_poll(wait: int, waiting: Callable[[], Awaitable[object]]) -> bool:
    """A control route's ``wait=N``: run the wait when N > 0; True when it timed out (the route answers anyway)."""
    if wait <= 0:
        return False
    try:
        await waiting()
    except TimeoutError:
        return True
    return False


def _config_view(config: FakeWeComConfig) -> dict[str, Any]:
    # Keys and header values are credentials in real deployments; show only that they exist.
    return {
        "bot_key_count": len(config.bot_keys),
        "callback_url": config.callback_url,
        "callback_header_names": sorted(config.callback_headers),
        "rate_limit": config.rate_limit,
        "rate_window": config.rate_window,
        "robot_name": config.robot_name,
        "public_url": config.public_url,
        # Secrets stay hidden; the chat page reads aibot_ids to offer the AI-bot mode.
        "aibot_ids": sorted(config.aibots),
        "aibot_answer_pings": config.aibot_answer_pings,
        "aibot_idle_timeout": config.aibot_idle_timeout,
        "aibot_reply_window": config.aibot_reply_window,
        "aibot_stream_window": config.aibot_stream_window,
        "aibot_media_ttl": config.aibot_media_ttl,
        "aibot_markdown_max_bytes": config.aibot_markdown_max_bytes,
        "aibot_max_frame_bytes": config.aibot_max_frame_bytes,
        "hil_server_url": config.hil_server_url,
    }


def create_fake_wecom_app(
    config: FakeWeComConfig | None = None, *, http_client: httpx.AsyncClient | None = None
) -> FastAPI:
    """Build the fake WeCom app; ``app.state.fake`` is its FakeWeCom.

    Without http_client the lifespan creates one shared AsyncClient for callback POSTs (tests may inject one with an
    ASGI or mock transport instead). The lifespan also runs the AI bot's housekeeping (idle links, expired media) and
    closes its links on shutdown.

    Routes: ``POST /cgi-bin/webhook/send``, ``POST /cgi-bin/webhook/upload_media``, the chat page ``GET /``, and the
    control API ``GET /_fake/messages?chat_id=&since_seq=&wait=&timeout=``,
    ``GET /_fake/callbacks?since_seq=&wait=&timeout=``, ``GET /_fake/attempts``, ``GET|POST /_fake/config``,
    ``POST /_fake/fail``, ``POST /_fake/reset``, ``POST /_fake/reply``, ``POST /_fake/images`` (multipart ``file``
    -> ``{"url"}``), ``GET /_fake/images/{id}`` (attached images and images the robot sent) and
    ``GET /_fake/hil-status?since=&wait=&timeout=`` (the HIL Server's outcomes, for the chat page). The AI bot's long
    connection is ``WS /`` with its control API under ``/_fake/aibot/`` (see ``fake_aibot.add_aibot_routes``); with an
    AI bot and no callback URL, ``POST /_fake/reply`` speaks over that connection.
    """
    from hil_sandbox.fake_aibot import add_aibot_routes  # fake_aibot builds on this module

    fake = FakeWeCom(config, http_client=http_client)
    chat_page = importlib.resources.files(__package__).joinpath("static", "chat.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = fake.http_client is None
        if owned:
            fake.http_client = httpx.AsyncClient(timeout=CALLBACK_TIMEOUT_SECONDS)
        try:
            async with asyncio.TaskGroup() as tasks:
                housekeeping = tasks.create_task(fake.aibot.run(), name="fake-aibot-housekeeping")
                try:
                    yield
                finally:
                    housekeeping.cancel()
                    await fake.aibot.close_all()
        finally:
            if owned and fake.http_client is not None:
                await fake.http_client.aclose()
                fake.http_client = None

    app = FastAPI(title="fake WeCom", lifespan=lifespan)
    app.state.fake = fake
    add_aibot_routes(app, fake)

    @app.post("/cgi-bin/webhook/send")
    async def webhook_send(request: Request, key: str | None = None) -> dict[str, Any]:
        return fake.handle_send(key, await request.body())

    @app.post("/cgi-bin/webhook/upload_media")
    async def webhook_upload(
        request: Request, key: str | None = None, media_type: Annotated[str | None, Query(alias="type")] = None
    ) -> dict[str, Any]:
        if not key or key not in fake.config.bot_keys:
            # Answer before reading a possibly 20 MB body that would be thrown away.
            return fake.handle_upload(key, media_type, None, None)
        try:
            async with request.form() as form:
                media = form.get("media")
                if media is None:
                    return fake.handle_upload(key, media_type, None, None)
                if isinstance(media, UploadFile):
                    return fake.handle_upload(key, media_type, media.filename, await media.read())
                return fake.handle_upload(key, media_type, None, media.encode())
        except StarletteHTTPException as exc:  # malformed multipart: WeCom still answers 200 with an errcode
            return {"errcode": ERR_DATA_FORMAT, "errmsg": errmsg_for(ERR_DATA_FORMAT, str(exc.detail))}

    @app.get("/_fake/messages")
    async def control_messages(
        chat_id: str | None = None,
        since_seq: int = 0,
        wait: int = 0,
        wait_timeout: PollTimeout = 10.0,
    ) -> dict[str, Any]:
        """Accepted sends; with wait=N, first wait up to timeout seconds for N of them (a long poll)."""
        timed_out = await long_poll(
            wait, lambda: fake.wait_for_messages(wait, chat_id, wait_timeout, since_seq=since_seq)
        )
        messages = fake.get_messages(chat_id, since_seq)
        return {"messages": [m.model_dump(mode="json") for m in messages], "timed_out": timed_out}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(chat_page, headers={"Cache-Control": "no-store"})

    @app.get("/_fake/callbacks")
    async def control_callbacks(
        since_seq: int = 0,
        wait: int = 0,
        wait_timeout: PollTimeout = 10.0,
    ) -> dict[str, Any]:
        """Callbacks people sent; with wait=N, first wait up to timeout seconds for N of them (a long poll)."""
        timed_out = await long_poll(wait, lambda: fake.wait_for_callbacks(wait, wait_timeout, since_seq=since_seq))
        return {"callbacks": fake.get_callbacks(since_seq), "timed_out": timed_out}

    @app.post("/_fake/images", status_code=201, response_model=None)
    async def control_attach_image(request: Request) -> dict[str, Any] | JSONResponse:
        """Keep an image a person attaches and answer its URL, to pass as image_url to /_fake/reply."""
        try:
            async with request.form(max_files=1) as form:
                upload = form.get("file")
                data = await upload.read() if isinstance(upload, UploadFile) else None
        except StarletteHTTPException as exc:
            return JSONResponse({"detail": f"malformed multipart body: {exc.detail}"}, status_code=400)
        if data is None:
            return JSONResponse({"detail": "send the image as multipart field 'file'"}, status_code=400)
        if len(data) > ATTACH_MAX_BYTES:
            return JSONResponse(
                {"detail": f"image is {len(data)} bytes, at most {ATTACH_MAX_BYTES} allowed"}, status_code=413
            )
        if image_mime(data) is None:
            return JSONResponse({"detail": "only PNG and JPEG images can be attached"}, status_code=415)
        image_id = fake.add_image(data)
        base = (fake.config.public_url or str(request.base_url)).rstrip("/")
        log.info("image attached image_id=%s size=%d", image_id, len(data))
        return {"url": f"{base}/_fake/images/{image_id}", "image_id": image_id}

    @app.get("/_fake/images/{image_id}", response_model=None)
    async def control_image(image_id: str) -> Response:
        data = fake.get_image(image_id)
        if data is None:
            return JSONResponse(
                {"detail": f"no image {image_id!r}: unknown, or forgotten to stay in memory bounds"}, status_code=404
            )
        # An id names one immutable image, so the browser may keep it.
        return Response(data, media_type=image_mime(data), headers={"Cache-Control": "max-age=86400, immutable"})

    @app.get("/_fake/attempts")
    async def control_attempts() -> dict[str, Any]:
        return {"attempts": [a.model_dump(mode="json") for a in fake.get_attempts()]}

    @app.post("/_fake/fail")
    async def control_fail(request: FailRequest) -> dict[str, Any]:
        fake.fail_next(*request.errcodes)
        return {"pending": fake.pending_failures}

    @app.get("/_fake/config")
    async def control_get_config() -> dict[str, Any]:
        return _config_view(fake.config)

    @app.get("/_fake/hil-status", response_model=None)
    async def control_hil_status(
        since: str = "", wait: int = 0, wait_timeout: PollTimeout = 10.0
    ) -> dict[str, Any] | JSONResponse:
        """The HIL Server's /status.json, fetched for the chat page (same origin), which marks questions with what
        became of them. With wait=1 a long poll: answers once the outcomes differ from `since` (the `fingerprint`
        of an earlier answer) or the timeout passes, so a page that watches sends no request while nothing happens."""
        url = fake.config.hil_server_url
        if not url or fake.http_client is None:
            return JSONResponse({"error": "no HIL Server configured (--hil-server-url)"}, status_code=404)
        deadline = time.monotonic() + wait_timeout
        while True:
            try:
                response = await fake.http_client.get(f"{url.rstrip('/')}/status.json", timeout=2)
                body = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                return JSONResponse({"error": f"HIL Server not reachable: {type(exc).__name__}"}, status_code=502)
            if response.status_code != 200 or not isinstance(body, dict):
                return JSONResponse({"error": f"HIL Server answered HTTP {response.status_code}"}, status_code=502)
            body["fingerprint"] = _status_fingerprint(body)
            if wait <= 0 or body["fingerprint"] != since or time.monotonic() >= deadline:
                return body
            await asyncio.sleep(min(fake.config.hil_status_interval, max(0.0, deadline - time.monotonic())))

    @app.post("/_fake/config")
    async def control_config(update: ConfigUpdate) -> dict[str, Any]:
        changes = update.model_dump(include=update.model_fields_set)
        if "bot_keys" in changes:
            changes["bot_keys"] = set(changes["bot_keys"])
        fake.update_config(**changes)
        log.info("config changed fields=%s", sorted(changes))
        return _config_view(fake.config)

    @app.post("/_fake/reset")
    async def control_reset() -> dict[str, Any]:
        fake.reset()
        return {"ok": True}

    @app.post("/_fake/reply", response_model=None)
    async def control_reply(body: ReplyRequest, request: Request) -> dict[str, Any] | JSONResponse:
        base_url = fake.config.public_url or str(request.base_url)
        if fake.config.callback_url is None and fake.config.aibots:
            # An AI bot and no callback (the sandbox's --aibot): the person speaks over the bot's long connection.
            return await reply_over_aibot(body, base_url)
        try:
            return await fake.reply(**body.model_dump(), base_url=base_url)
        except CallbackNotConfiguredError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=409)

    async def reply_over_aibot(body: ReplyRequest, base_url: str) -> dict[str, Any] | JSONResponse:
        robot_only = {"repeat": body.repeat > 1, "wecom_retries": body.wecom_retries, "event_type": body.event_type}
        if any(robot_only.values()) or body.msgtype not in (None, "text", "mixed", "image"):
            unsupported = [name for name, given in robot_only.items() if given] or [f"msgtype={body.msgtype}"]
            detail = (
                f"{', '.join(unsupported)}: robot callbacks only; over the AI bot's long connection use "
                "/_fake/aibot/message, /_fake/aibot/event or /_fake/aibot/click"
            )
            return JSONResponse({"detail": detail}, status_code=422)
        person = body.from_user or FromUser()
        pushed = await fake.aibot.reply_as_person(
            chat_id=body.chat_id,
            text=body.text,
            quote=body.quote,
            image_url=body.image_url,
            chat_type=body.chat_type,
            userid=person.userid,
            name=person.name,
            msgid=body.msgid,
            at_robot=body.at_robot,
            base_url=base_url,
        )
        return {"via": "aibot", **pushed.model_dump()}

    return app


def _status_fingerprint(status: Mapping[str, Any]) -> str:
    """What the chat page shows of a /status.json (outcomes, who, approvals so far), without the ages that change
    every second."""
    recent = [(e.get("short_id"), e.get("outcome"), e.get("by"), e.get("at")) for e in status.get("recent") or []]
    waiting = [(w.get("short_id"), w.get("approvals")) for w in status.get("waiting") or []]
    text = json.dumps([recent, waiting], ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _parse_header(raw: str) -> tuple[str, str]:
    name, sep, value = raw.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {raw!r}")
    return name.strip(), value.strip()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the fake WeCom with uvicorn: ``python -m hil_sandbox.fake_wecom --port 8090 --callback-url URL``."""
    parser = argparse.ArgumentParser(prog="python -m hil_sandbox.fake_wecom", description="Fake WeCom robot API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--callback-url", help="where simulated people's messages are POSTed (fly-pigeon JSON)")
    parser.add_argument(
        "--callback-header",
        action="append",
        type=_parse_header,
        default=[],
        metavar="'NAME: VALUE'",
        help="extra header for callback POSTs (repeatable)",
    )
    parser.add_argument(
        "--bot-key", action="append", default=[], help=f"accepted robot key (repeatable; default {DEFAULT_BOT_KEY})"
    )
    parser.add_argument("--rate-limit", type=int, help="accepted sends per key per window (default: unlimited)")
    parser.add_argument("--rate-window", type=float, default=60.0, help="rate window in seconds")
    parser.add_argument("--robot-name", default=FakeWeComConfig.robot_name)
    parser.add_argument("--public-url", help="base URL put into callbacks' webhook_url (default: the request's)")
    parser.add_argument("--aibot-id", action="append", default=[], help="AI bot id accepted on WS / (repeatable)")
    parser.add_argument(
        "--aibot-secret", action="append", default=[], help="secret of the --aibot-id at the same position"
    )
    parser.add_argument("--aibot-idle-timeout", type=float, help="close AI-bot links silent for this many seconds")
    parser.add_argument(
        "--aibot-reply-window", type=float, default=AIBOT_REPLY_WINDOW_SECONDS, help="welcome / card update window"
    )
    parser.add_argument("--hil-server-url", help="the HIL Server beside it, so the chat page marks answered questions")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if len(args.aibot_id) != len(args.aibot_secret):
        parser.error("give one --aibot-secret for each --aibot-id")

    config = FakeWeComConfig(
        bot_keys=set(args.bot_key) or {DEFAULT_BOT_KEY},
        callback_url=args.callback_url,
        callback_headers=dict(args.callback_header),
        rate_limit=args.rate_limit,
        rate_window=args.rate_window,
        robot_name=args.robot_name,
        public_url=args.public_url,
        aibots=dict(zip(args.aibot_id, args.aibot_secret, strict=True)),
        aibot_idle_timeout=args.aibot_idle_timeout,
        aibot_reply_window=args.aibot_reply_window,
        hil_server_url=args.hil_server_url,
    )
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")

    import uvicorn  # only the CLI needs it; tests build the app without a server

    # Long polls (the chat page keeps two open) would otherwise hold a shutdown for up to their timeout.
    uvicorn.run(
        create_fake_wecom_app(config),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: fake_aibot imports hil_sandbox.fake_wecom, and one
    # copy of the classes keeps the message log and the AI-bot hub speaking the same types.
    from hil_sandbox.fake_wecom import main as module_main

    module_main()
