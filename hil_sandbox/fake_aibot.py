"""The fake WeCom's AI bot (智能机器人), long-connection mode: the WebSocket a bot connects to, and people who write.

A bot connects to the fake's ``WS /`` as it would to ``wss://openws.work.weixin.qq.com``, subscribes with its bot_id
and secret, pings, receives people's messages and events as JSON frames, and answers or sends on the same socket.
Tests drive the people through the typed API on :class:`AibotHub` (``FakeWeCom.aibot``) or the control routes under
``/_fake/aibot/`` (see :func:`add_aibot_routes`). Written from WeCom's behaviour, not from our client.

Protocol facts relied on, and where they come from. Sources:
[SDK-PY] PyPI ``wecom-aibot-python-sdk`` 1.0.2 (``aibot/ws.py``, ``client.py``, ``types.py``, ``crypto_utils.py``,
``message_handler.py``); [SDK-NODE] ``github:WecomTeam/aibot-node-sdk`` (``src/ws.ts``, ``src/types/*.ts``);
[PLUGIN] ``github:WecomTeam/wecom-openclaw-plugin`` (``src/message-parser.ts``, ``src/message-sender.ts``,
``src/monitor.ts``), WeCom's own consumer of this protocol; [DOC-WS] developer.work.weixin.qq.com document 101463
(智能机器人长连接: table of contents and overview only were readable); [DOC-MSG] 100719 (接收消息);
[DOC-EVT] 101027 (接收事件); [DOC-REPLY] 101031 (被动回复消息); [WEKNORA] github Tencent/WeKnora pull request 883;
[FIELD] a public project's changelog reporting what the real endpoint answered to fake credentials.

- Frames are JSON text ``{"cmd", "headers": {"req_id"}, "body"}``; WeCom's answer to a frame has no cmd:
  ``{"headers": {"req_id": <the frame's>}, "errcode", "errmsg"}``. [SDK-PY ws.py _handle_frame, SDK-NODE api.ts]
- The SDK tells answers apart by req_id prefix: ``aibot_subscribe…`` is the auth answer, ``ping…`` a heartbeat answer,
  anything else is matched to a pending reply by its exact req_id. [SDK-PY ws.py]
- Subscribe: ``{"cmd": "aibot_subscribe", "body": {"bot_id", "secret"}}`` -> errcode 0. Wrong credentials:
  errcode 853000 "invalid bot_id or secret". [FIELD] That the fake then closes the socket (code 1000) is a guess;
  the Node SDK closes it itself on an auth error, the Python SDK 1.0.2 does not. [SDK-NODE ws.ts]
- Heartbeat: ``{"cmd": "ping", "headers": {"req_id"}}`` (no body) every 30 s, answered with errcode 0; the SDK gives
  the link up after 2 unanswered pings. [SDK-PY ws.py _send_heartbeat]
- One connection per bot: when a new connection subscribes, the old one receives
  ``{"cmd": "aibot_event_callback", "body": {…, "msgtype": "event", "event": {"eventtype": "disconnected_event"}}}``
  and is closed by the server. [SDK-NODE ws.ts handleFrame, types/event.ts] The Python SDK 1.0.2 knows no such
  event: it emits ``event.disconnected_event`` (it needs ``body.msgtype``), then sees the close and reconnects.
  [SDK-PY message_handler.py] The body's other fields (msgid, create_time, aibotid) and close code 1000: guesses.
- Message callback: ``cmd: aibot_msg_callback``, body ``{msgid, aibotid, chatid, chattype, from: {userid}, msgtype,
  …}``. [DOC-MSG, SDK-NODE types/message.ts] chatid is sent in group chats only ("仅群聊类型时返回"
  [SDK-NODE]; DOC-EVT's example shows it in a single chat too: the fake leaves it out, the stricter reading).
  ``from`` has no name. create_time on messages: [SDK-NODE] (optional there). No response_url in long-connection
  mode: a guess (it is the webhook mode's way to answer).
- In a group the text starts with the mention: ``"@RobotA hello robot"``. [DOC-MSG example] The number of spaces after
  the name varies (1 or 2) [WEKNORA]; the fake writes one.
- Types: text ``{content}``; image ``{url, aeskey}`` and voice ``{content}`` (the transcript) and file
  ``{url, aeskey}`` only in single chats; mixed ``{msg_item: [{msgtype: text|image, …}]}`` and quotes in groups
  (with the @) and single chats. [DOC-MSG overview, SDK-NODE types/message.ts, PLUGIN message-parser.ts]
- Quote: ``quote: {msgtype: text|image|mixed|voice|file, text: {content}, …}``. [SDK-NODE QuoteContent, PLUGIN] What
  WeCom puts there when the quoted message is the bot's markdown or card is not documented: the fake sends
  ``msgtype: text`` with the markdown source (a card: its main title) — a guess.
- Media: ``url`` valid about 5 minutes, AES-256-CBC with the per-URL ``aeskey`` (base64, padding may be missing),
  IV = first 16 bytes of the key, PKCS#7 padding up to 32 bytes; the file name comes from Content-Disposition.
  [SDK-PY crypto_utils.py, api.py; SDK-NODE types/message.ts] The fake's keys are 43 characters (no "="), like an
  EncodingAESKey: a guess the SDK's padding repair points to.
- Event callback: ``cmd: aibot_event_callback``, body ``{msgid, create_time, aibotid, chatid, chattype,
  from: {userid}, msgtype: "event", event: {eventtype, <eventtype>: {…}}}``. [DOC-EVT] ``enter_chat`` (single chat,
  no struct), ``template_card_event: {card_type, event_key, task_id, selected_items: {selected_item:
  [{question_key, option_ids: {option_id: […]}}]}}`` [DOC-EVT, PLUGIN], ``feedback_event: {id, type, content}``
  (type 1 like, 2 dislike, 3 cancel: from a third-party client, unconfirmed).
- Replies reuse the callback's req_id: ``aibot_respond_msg`` (msgtype stream | template_card |
  stream_with_template_card) for messages [DOC-REPLY, SDK-PY client.py]; ``aibot_respond_welcome_msg`` (text or
  template_card) only for enter_chat, within 5 s; ``aibot_respond_update_msg`` ``{response_type:
  "update_template_card", userids?, template_card}`` only for template_card_event, within 5 s, same task_id.
  [SDK-PY client.py docstrings, DOC-REPLY] An event's req_id given to aibot_respond_msg -> 846605 "invalid req_id".
  [PLUGIN message-sender.ts] A late welcome/update also gets 846605: a guess (the code for it is not published).
  A stream cannot be updated 6 minutes after the message: 846608. [PLUGIN message-sender.ts]
- Proactive: ``aibot_send_msg`` body ``{chatid, msgtype: markdown|template_card, …}``; chatid = group chat id or the
  userid for a single chat. [SDK-PY client.py send_message] Stream content ≤ 20480 bytes [SDK-NODE api.ts]; the
  markdown limit is not in any source read: the fake uses the same 20480 (config knob). 93006 "invalid chatid".
  [PLUGIN monitor.ts]
- Template cards: card_type text_notice | news_notice | button_interaction | vote_interaction |
  multiple_interaction; task_id unique per bot, only digits, letters and ``_-@``, ≤ 128 bytes; button_list ≤ 6,
  button ``{text, style (1-4, a wrong one means 1), key (≤ 1024 bytes, no repeats)}``; checkbox ≤ 20 options;
  select_list ≤ 3 with ≤ 10 options each. [SDK-NODE api.ts] Requiring task_id on interactive cards and at least one
  button on button_interaction: the app API's rule, assumed here. An update may change card_type (e.g. to a
  text_notice without buttons): a guess.
- Uploads (22.5): ``aibot_upload_media_init`` body ``{type: image|file|voice|video, filename, total_size,
  total_chunks, md5?}`` answered with ``body: {upload_id}``; ``aibot_upload_media_chunk`` ``{upload_id, chunk_index,
  base64_data}`` (≤ 512 KB before base64 each, ≤ 100 chunks, so about 50 MB per upload); ``aibot_upload_media_finish``
  ``{upload_id}`` answered with ``body: {type, media_id, created_at}``; media_id valid 3 days. The answer to an
  upload frame is the usual ``{headers, errcode, errmsg}`` plus ``body``. [SDK-NODE client.ts uploadMedia, api.ts
  UploadMedia*] chunk_index: the Node SDK's client sends 0-based indexes while its api.ts comment says "从 1 开始";
  the fake takes what the client sends (0-based). The Python SDK 1.0.2 has no upload method: its generic
  ``WsConnectionManager.send_reply(req_id, body, cmd)`` sends the same frames (tests/test_fake_aibot.py uses it).
  Size per type: image 10 MB (JPG/PNG), voice 2 MB, video 10 MB, file 20 MB, all more than 5 bytes [DOC-MEDIA:
  developer.work.weixin.qq.com 96484 上传临时素材; SDK-NODE api.ts ReplyMsgItem "最大不能超过10M"] — so the AI bot
  takes images up to 10 MB where the robot webhook takes 2 MB. Then ``aibot_send_msg`` ``{chatid, msgtype: image,
  image: {media_id}}`` (also file / voice / video) [SDK-NODE client.ts sendMediaMessage, api.ts SendMediaMsgBody].
  A media_id unknown, expired, of another bot or of another type: 40007 (the webhook's "invalid media_id", a guess).
- Vote cards (22.4): ``vote_interaction`` with ``checkbox {question_key, mode: 0 single | 1 several, option_list:
  [{id (≤ 128 bytes), text, is_checked?}] (1-20)}`` and ``submit_button {text, key}`` [SDK-NODE api.ts
  TemplateCardCheckbox, TemplateCardSubmitButton]; the submit arrives as template_card_event with ``event_key`` = the
  submit key and the ticks in ``selected_items`` (above) [DOC-EVT, PLUGIN].
- Pace (22.6): with ``rate_limit`` / ``rate_window`` set, every message frame of a bot (send, reply, welcome, update;
  not uploads) counts, and one past the limit is answered 45009 "api freq out of limit" — the robot webhook's code
  for the same limit (WeCom's global error code list, WECOM.md); which code the AI bot answers is not published.
  The limits themselves (about 30/min, 1000/h) come from secondary sources only.
- Errcodes without a source, chosen by the fake: 40058 "invalid Request Parameter" (WeCom's general bad-parameter code,
  seen on the bot's credential check) for every malformed body, unknown cmd, a frame without req_id, a reused
  task_id; 40008 unknown msgtype; 44004 empty content; 40007 media_id. A frame before
  subscribe is answered 40058 and the socket closed (1008); a frame that is not a JSON object (or nests deeper than
  32, see parse_wire_json) closes it (1007), a frame over the size limit too (1009). Close codes are guesses.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
import secrets
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar
from urllib.parse import quote as url_quote
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.websockets import WebSocketDisconnect

from hil_sandbox.fake_wecom import (
    AIBOT_ERRMSGS,
    ATTACH_MAX_BYTES,
    DEFAULT_PUBLIC_URL,
    ERR_BAD_REQUEST,
    ERR_EMPTY_CONTENT,
    ERR_INVALID_CHATID,
    ERR_INVALID_CREDENTIALS,
    ERR_INVALID_MEDIA_ID,
    ERR_INVALID_MSGTYPE,
    ERR_INVALID_REQ_ID,
    ERR_STREAM_EXPIRED,
    MEDIA_MAX_BYTES,
    ChatType,
    ImageStore,
    PollTimeout,
    Rejected,
    SentMessage,
    errmsg_for,
    image_mime,
    long_poll,
    parse_wire_json,
)

if TYPE_CHECKING:
    from hil_sandbox.fake_wecom import FakeWeCom

# Where the fake serves the images people attach (fake_wecom's GET /_fake/images/{id}).
IMAGES_PATH = "/_fake/images/"
log = logging.getLogger(__name__)

# The events a bot answers with a frame of their own within the reply window (a welcome, a card update): what the
# fake says when the answered callback is of another kind, and when the answer comes too late.
EVENT_ANSWERS = {
    "enter_chat": (
        "a welcome answers an enter_chat event only",
        "the welcome came {age:.1f}s after enter_chat, {window:g}s allowed",
    ),
    "template_card_event": (
        "a card update answers a template_card_event only",
        "the update came {age:.1f}s after the click, {window:g}s allowed",
    ),
}
# The long connection's commands besides those that put something in a chat (AibotHub's message table).
CMD_SUBSCRIBE = "aibot_subscribe"
CMD_PING = "ping"
CMD_MSG_CALLBACK = "aibot_msg_callback"
CMD_EVENT_CALLBACK = "aibot_event_callback"
CMD_UPLOAD_INIT = "aibot_upload_media_init"
CMD_UPLOAD_CHUNK = "aibot_upload_media_chunk"
CMD_UPLOAD_FINISH = "aibot_upload_media_finish"
UPLOAD_CMDS = frozenset({CMD_UPLOAD_INIT, CMD_UPLOAD_CHUNK, CMD_UPLOAD_FINISH})
# Uploads: chunks of at most 512 KB before base64, at most 100 of them [SDK-NODE client.ts uploadMedia]; sizes per
# type as WeCom's temporary media take them (image 10 MB, voice 2 MB, video 10 MB, file 20 MB, all > 5 bytes)
# [DOC-MEDIA]; a media_id lives 3 days [SDK-NODE api.ts UploadMediaFinishResult].
UPLOAD_CHUNK_MAX_BYTES = 512 * 1024
UPLOAD_MAX_CHUNKS = 100
MEDIA_MIN_UPLOAD = 6
UPLOAD_LIMITS = {
    "image": 10 * 1024 * 1024,
    "voice": 2 * 1024 * 1024,
    "video": 10 * 1024 * 1024,
    "file": 20 * 1024 * 1024,
}
UPLOADED_MEDIA_TTL = 3 * 24 * 3600.0
UPLOAD_IDLE_SECONDS = 600.0  # an upload never finished is forgotten (a guess)
UPLOADS_PER_BOT = 50  # uploads in progress at once (a guess: the fake's own bound)

CLOSE_NORMAL = 1000
CLOSE_NOT_JSON = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009

INTERACTIVE_CARDS = frozenset({"button_interaction", "vote_interaction", "multiple_interaction"})
TASK_ID_PATTERN = re.compile(r"^[0-9A-Za-z_\-@]+$")
TASK_ID_MAX_BYTES = 128
BUTTON_KEY_MAX_BYTES = 1024
OPTION_ID_MAX_BYTES = 128
CHATID_MAX_BYTES = 256
STREAM_MAX_BYTES = 20480
# Records kept for tests and the chat page; the oldest go first.
FRAME_LOG_SIZE = 2000
EVENT_LOG_SIZE = 5000
PENDING_SIZE = 2000
RAW_FRAME_LOG_CHARS = 2000

MsgType = Literal["text", "image", "mixed", "voice", "file"]
EventType = Literal["enter_chat", "feedback_event"]
T = TypeVar("T")


def _bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def _explain(exc: ValidationError) -> str:
    """A pydantic error as one line: where and what, for an errmsg."""
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def encrypt_media(data: bytes) -> tuple[bytes, str]:
    """Encrypt media as WeCom does for the AI bot: a fresh AES-256 key per URL, IV = its first 16 bytes, PKCS#7 to 32.

    Returns the ciphertext and the key as base64 without padding (what the callback's ``aeskey`` carries).
    """
    key = secrets.token_bytes(32)
    pad = 32 - len(data) % 32
    encryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    ciphertext = encryptor.update(data + bytes([pad]) * pad) + encryptor.finalize()
    return ciphertext, base64.b64encode(key).decode("ascii").rstrip("=")


# ----- what the bot sends (validated as WeCom would) -----


class _Wire(BaseModel):
    """A frame part from the bot: JSON types exactly (no "1" for 1), unknown fields kept."""

    model_config = ConfigDict(strict=True, extra="allow")


class FrameHeaders(_Wire):
    req_id: str = Field(min_length=1, max_length=256)


class InboundFrame(_Wire):
    cmd: str = Field(min_length=1, max_length=64)
    headers: FrameHeaders
    body: Any = None


class SubscribeBody(_Wire):
    bot_id: str = Field(min_length=1, max_length=128)
    secret: str = Field(min_length=1, max_length=256)


def _at_most_bytes(limit: int) -> AfterValidator:
    """WeCom counts lengths in UTF-8 bytes, not characters."""

    def check(text: str) -> str:
        if _bytes(text) > limit:
            raise ValueError(f"{_bytes(text)} bytes, at most {limit} allowed")
        return text

    return AfterValidator(check)


ButtonKey = Annotated[str, Field(min_length=1), _at_most_bytes(BUTTON_KEY_MAX_BYTES)]
OptionId = Annotated[str, Field(min_length=1), _at_most_bytes(OPTION_ID_MAX_BYTES)]


class CardButton(_Wire):
    text: str = Field(min_length=1)
    style: int | None = None  # 1-4; WeCom falls back to 1 for a wrong one, so any int passes
    key: ButtonKey


class CardOption(_Wire):
    id: OptionId
    text: str


class CardCheckbox(_Wire):
    question_key: ButtonKey
    option_list: list[CardOption] = Field(min_length=1, max_length=20)


class CardSelection(_Wire):
    question_key: ButtonKey
    option_list: list[CardOption] = Field(min_length=1, max_length=10)


class CardSubmitButton(_Wire):
    text: str = Field(min_length=1)
    key: ButtonKey


class TemplateCard(_Wire):
    """The basics of a template card WeCom checks; the display fields pass through as sent."""

    card_type: Literal["text_notice", "news_notice", "button_interaction", "vote_interaction", "multiple_interaction"]
    task_id: Annotated[str, _at_most_bytes(TASK_ID_MAX_BYTES)] | None = None
    button_list: list[CardButton] | None = Field(default=None, max_length=6)
    checkbox: CardCheckbox | None = None
    select_list: list[CardSelection] | None = Field(default=None, min_length=1, max_length=3)
    submit_button: CardSubmitButton | None = None

    @field_validator("task_id")
    @classmethod
    def _task_id(cls, task_id: str | None) -> str | None:
        if task_id is not None and not TASK_ID_PATTERN.match(task_id):
            raise ValueError("task_id may hold only digits, letters and _-@")
        return task_id

    @model_validator(mode="after")
    def _per_type(self) -> TemplateCard:
        kind = self.card_type
        if kind in INTERACTIVE_CARDS and not self.task_id:
            raise ValueError(f"a {kind} card needs a task_id")
        if kind == "button_interaction":
            if not self.button_list:
                raise ValueError("a button_interaction card needs button_list with 1 to 6 buttons")
            keys = [button.key for button in self.button_list]
            if len(set(keys)) != len(keys):
                raise ValueError("button keys must not repeat")
        if kind == "vote_interaction" and (self.checkbox is None or self.submit_button is None):
            raise ValueError("a vote_interaction card needs checkbox and submit_button")
        if kind == "multiple_interaction" and (not self.select_list or self.submit_button is None):
            raise ValueError("a multiple_interaction card needs select_list and submit_button")
        return self

    def button_text(self, key: str) -> str | None:
        """The text people see on the button that sends `key`."""
        for button in self.button_list or []:
            if button.key == key:
                return button.text
        if self.submit_button is not None and self.submit_button.key == key:
            return self.submit_button.text
        return None

    def event_keys(self) -> list[str]:
        """The keys a click on this card can send back."""
        if self.card_type == "button_interaction":
            return [button.key for button in self.button_list or []]
        if self.submit_button is not None and self.card_type in INTERACTIVE_CARDS:
            return [self.submit_button.key]
        return []


class ContentPart(_Wire):
    content: str


class StreamPart(_Wire):
    id: str = Field(min_length=1, max_length=256)
    finish: bool = False
    content: str = ""
    msg_item: list[Any] | None = Field(default=None, max_length=10)


class UploadInit(_Wire):
    type: Literal["image", "file", "voice", "video"]
    filename: str = Field(min_length=1, max_length=256)
    total_size: int
    total_chunks: int
    md5: str | None = Field(default=None, pattern="^[0-9a-fA-F]{32}$")


class UploadChunk(_Wire):
    upload_id: str = Field(min_length=1, max_length=128)
    chunk_index: int
    base64_data: str = Field(min_length=1)


class SendBody(_Wire):
    chatid: str
    msgtype: str


class ReplyBody(_Wire):
    msgtype: str


class UpdateBody(_Wire):
    response_type: Literal["update_template_card"]
    userids: list[str] | None = None
    template_card: dict[str, Any]


# ----- records the fake keeps -----


class AibotFrame(BaseModel):
    """One frame on a long connection, as the fake received or sent it (a subscribe's secret is masked)."""

    seq: int
    ts: float
    direction: Literal["in", "out"]
    link_id: int
    bot_id: str | None
    size: int
    frame: Any  # the parsed JSON, or the raw text (cut short) when it was not JSON


class AibotEvent(BaseModel):
    """What the chat page follows: a frame pushed to a bot for a person (push), or a bot message changed (update)."""

    seq: int
    ts: float
    kind: Literal["push", "update"]
    bot_id: str
    # push
    cmd: str | None = None
    req_id: str | None = None
    msgid: str | None = None
    chat_id: str | None = None
    chat_type: ChatType | None = None
    userid: str | None = None
    name: str | None = None
    frame: dict[str, Any] | None = None
    image_ids: list[str] = Field(default_factory=list)  # GET /_fake/images/{id}: the pictures in plain
    file_name: str | None = None
    button_text: str | None = None  # a click: the text on the button, as the person saw it
    # update
    message_seq: int | None = None
    card: dict[str, Any] | None = None
    content: str | None = None
    finished: bool | None = None


class CardUpdate(BaseModel):
    ts: float
    req_id: str
    userids: list[str] | None
    card: dict[str, Any]


class CardState(BaseModel):
    """A template card a bot sent, as people see it now (``card``) and every update that brought it there."""

    bot_id: str
    task_id: str
    message_seq: int
    chat_id: str
    card: dict[str, Any]
    updates: list[CardUpdate] = Field(default_factory=list)


class BotStatus(BaseModel):
    bot_id: str
    connected: bool
    link_id: int | None = None
    remote: str | None = None
    subscribed_at: float | None = None
    last_ping_at: float | None = None
    pings: int = 0
    takeovers: int = 0  # times a connection of this bot was kicked by another (or by /_fake/aibot/kick)


class AibotError(Exception):
    """A request to play a person that cannot happen; status_code is what the control API answers."""

    status_code = 422


class AibotNotConnectedError(AibotError):
    status_code = 409


class AibotNotFoundError(AibotError):
    status_code = 404


class AibotConflictError(AibotError):
    status_code = 409


@dataclass
class _Link:
    id: int
    websocket: WebSocket
    loop: asyncio.AbstractEventLoop
    send_lock: asyncio.Lock
    remote: str | None
    last_heard: float  # fake clock: subscribe or last ping, for the idle timeout
    bot_id: str | None = None
    subscribed_at: float | None = None
    last_ping_at: float | None = None
    pings: int = 0
    closed: bool = False


@dataclass
class _Pending:
    """A callback pushed to a bot (kept under its req_id, the bot's ticket to answer it, for a while)."""

    bot_id: str
    link_id: int
    cmd: str
    kind: str  # msgtype, or the eventtype for events
    msgid: str
    chat_id: str
    task_id: str | None
    pushed_at: float  # fake clock
    welcomed: bool = False


@dataclass
class _Media:
    blob_id: str
    filename: str | None
    expires_at: float  # fake clock


@dataclass
class _Upload:
    """An upload in progress (aibot_upload_media_init … finish)."""

    bot_id: str
    kind: str
    filename: str
    total_size: int
    total_chunks: int
    md5: str | None
    chunks: dict[int, bytes]
    started_at: float  # fake clock


@dataclass
class _Uploaded:
    bot_id: str
    kind: str
    filename: str
    image_id: str  # the bytes in the FakeWeCom's image store
    md5: str
    size: int
    expires_at: float  # fake clock


@dataclass
class _Failure:
    errcode: int
    cmd: str | None


@dataclass
class _Card:
    state: CardState
    model: TemplateCard


@dataclass
class _Outgoing:
    """What a bot's message frame put in a chat, before it is recorded."""

    fields: dict[str, Any]
    card: TemplateCard | None = None


class AibotHub:
    """The AI-bot side of the fake WeCom: links, bots, the people who write to them, and what the bots sent.

    State sits under the FakeWeCom's lock. Links live on the app's event loop; pushes from another loop or thread are
    handed to it, so the typed API works from TestClient tests and from tests sharing the server's loop alike.
    """

    def __init__(self, fake: FakeWeCom) -> None:
        self._fake = fake
        self._lock = fake._lock
        self._clock = fake._clock
        self._link_ids = 0
        self.links: dict[int, _Link] = {}
        self._holders: dict[str, int] = {}  # bot_id -> link id
        self._takeovers: dict[str, int] = {}
        # The frames that put something in a chat (WECOM.md), and what makes the message for each: sending to a
        # chat, or one of the three answers to a callback the fake pushed. Injected failures without a cmd hit these.
        self._message_frames: dict[str, Callable[[_Link, str, dict[str, Any]], SentMessage]] = {
            "aibot_send_msg": self._send_msg,
            "aibot_respond_msg": self._respond_reply,
            "aibot_respond_welcome_msg": self._welcome_reply,
            "aibot_respond_update_msg": self._update_reply,
        }
        self._clear()

    def _clear(self) -> None:
        self.frames: deque[AibotFrame] = deque(maxlen=FRAME_LOG_SIZE)
        self.events: deque[AibotEvent] = deque(maxlen=EVENT_LOG_SIZE)
        self._frame_seq = 0
        self._event_seq = 0
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._cards: dict[tuple[str, str], _Card] = {}
        self._streams: dict[tuple[str, str], int] = {}  # (bot_id, stream id) -> message seq
        self._media: dict[str, _Media] = {}
        self._blobs = ImageStore()
        self._failures: deque[_Failure] = deque()
        self._chat_types: dict[str, ChatType] = {}
        self._uploads: dict[str, _Upload] = {}  # upload_id -> an upload in progress
        self._uploaded: dict[str, _Uploaded] = {}  # media_id -> what a bot uploaded

    def reset(self) -> None:
        """Forget frames, events, cards, media, pending callbacks and failures; links stay connected."""
        with self._lock:
            self._clear()

    # ----- test controls -----

    def fail_next(self, *errcodes: int, cmd: str | None = None) -> None:
        """Answer the next frames of ``cmd`` (default: any message frame) with these errcodes, in order."""
        with self._lock:
            self._failures.extend(_Failure(errcode, cmd) for errcode in errcodes)

    @property
    def pending_failures(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"errcode": f.errcode, "cmd": f.cmd} for f in self._failures]

    def status(self) -> list[BotStatus]:
        """Every configured bot (and any other that holds a link), connected or not."""
        with self._lock:
            bot_ids = sorted(set(self._fake.config.aibots) | set(self._holders))
            result = []
            for bot_id in bot_ids:
                link = self.links.get(self._holders.get(bot_id, -1))
                status = BotStatus(bot_id=bot_id, connected=link is not None, takeovers=self._takeovers.get(bot_id, 0))
                if link is not None:
                    status.link_id, status.remote, status.pings = link.id, link.remote, link.pings
                    status.subscribed_at, status.last_ping_at = link.subscribed_at, link.last_ping_at
                result.append(status)
            return result

    def is_connected(self, bot_id: str | None = None) -> bool:
        with self._lock:
            return self._holders.get(self._bot(bot_id)) in self.links

    async def wait_connected(self, bot_id: str | None = None, timeout: float = 10, *, connected: bool = True) -> None:
        """Wait until the bot holds a subscribed link (or, with connected=False, holds none)."""
        bot = self._bot(bot_id)
        try:
            await self._fake._wait_for(lambda: [1] if self.is_connected(bot) == connected else [], 1, timeout)
        except TimeoutError:
            state = "connect" if connected else "disconnect"
            raise TimeoutError(f"waited {timeout}s for AI bot {bot!r} to {state}") from None

    def get_frames(self, since_seq: int = 0) -> list[AibotFrame]:
        with self._lock:
            return [f for f in self.frames if f.seq > since_seq]

    def get_events(self, since_seq: int = 0) -> list[AibotEvent]:
        with self._lock:
            return [e for e in self.events if e.seq > since_seq]

    async def wait_for_frames(self, n: int, timeout: float = 10, *, since_seq: int = 0) -> list[AibotFrame]:
        return await self._fake._wait_for(lambda: self.get_frames(since_seq), n, timeout)

    async def wait_for_events(self, n: int, timeout: float = 10, *, since_seq: int = 0) -> list[AibotEvent]:
        return await self._fake._wait_for(lambda: self.get_events(since_seq), n, timeout)

    def card(self, task_id: str, bot_id: str | None = None) -> CardState:
        """The card with this task_id as people see it now, with its updates."""
        with self._lock:
            found = self._cards.get((self._bot(bot_id), task_id))
            if found is None:
                raise AibotNotFoundError(f"no template card with task_id {task_id!r} was sent by this bot")
            return found.state.model_copy(deep=True)

    def media(self, media_id: str) -> tuple[bytes, str | None] | None:
        """The encrypted bytes behind a media URL and the file name, while the URL is valid."""
        with self._lock:
            found = self._media.get(media_id)
            if found is None or found.expires_at <= self._clock():
                self._media.pop(media_id, None)
                return None
            data = self._blobs.get(found.blob_id)
            return (data, found.filename) if data is not None else None

    def _bot(self, bot_id: str | None) -> str:
        """The bot a control call means: the one named, or the only one configured."""
        if bot_id:
            return bot_id
        with self._lock:
            configured = sorted(self._fake.config.aibots)
        if len(configured) == 1:
            return configured[0]
        if not configured:
            raise AibotError(
                "no AI bot is configured: set FakeWeComConfig.aibots, --aibot-id/--aibot-secret or POST "
                '/_fake/config {"aibots": {"BOT_ID": "SECRET"}}'
            )
        raise AibotError(f"several AI bots are configured ({', '.join(configured)}): name one with bot_id")

    # ----- the long connection -----

    async def serve(self, websocket: WebSocket) -> None:
        """One long connection, from accept to close."""
        await websocket.accept()
        client = websocket.client
        with self._lock:
            self._link_ids += 1
            link = _Link(
                id=self._link_ids,
                websocket=websocket,
                loop=asyncio.get_running_loop(),
                send_lock=asyncio.Lock(),
                remote=f"{client.host}:{client.port}" if client else None,
                last_heard=self._clock(),
            )
            self.links[link.id] = link
        log.info("aibot link opened link_id=%d remote=%s", link.id, link.remote)
        try:
            while not link.closed:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw: str | bytes | None = message.get("text")
                if raw is None:
                    raw = message.get("bytes") or b""
                await self._on_raw(link, raw)
        except WebSocketDisconnect:
            pass
        finally:
            with self._lock:
                self.links.pop(link.id, None)
                held = link.bot_id is not None and self._holders.get(link.bot_id) == link.id
                if held:
                    del self._holders[link.bot_id]  # type: ignore[arg-type]  # held implies bot_id
                self._fake._notify()
            link.closed = True
            log.info("aibot link closed link_id=%d bot_id=%s held=%s", link.id, link.bot_id, held)

    async def _on_raw(self, link: _Link, raw: str | bytes) -> None:
        limit = self._fake.config.aibot_max_frame_bytes
        size = len(raw.encode("utf-8")) if isinstance(raw, str) else len(raw)
        if size > limit:
            self._log_frame("in", link, f"<{size} bytes>", size)
            await self._close(link, CLOSE_TOO_BIG, f"frame of {size} bytes, at most {limit} allowed")
            return
        try:
            data = parse_wire_json(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
            self._log_frame("in", link, text[:RAW_FRAME_LOG_CHARS], size)
            await self._close(link, CLOSE_NOT_JSON, "frame is not a JSON object (of sane depth)")
            return
        self._log_frame("in", link, data, size)
        try:
            frame = InboundFrame.model_validate(data)
        except ValidationError as exc:
            headers = data.get("headers")
            req_id = headers.get("req_id") if isinstance(headers, dict) else None
            await self._answer(link, req_id if isinstance(req_id, str) else "", ERR_BAD_REQUEST, _explain(exc))
            return
        if frame.cmd == CMD_SUBSCRIBE:
            await self._subscribe(link, frame)
        elif link.bot_id is None:
            await self._answer(link, frame.headers.req_id, ERR_BAD_REQUEST, "send aibot_subscribe first")
            await self._close(link, CLOSE_POLICY, "not subscribed")
        elif frame.cmd == CMD_PING:
            await self._ping(link, frame)
        elif frame.cmd in self._message_frames:
            await self._message_frame(link, frame, self._message_frames[frame.cmd])
        elif frame.cmd in UPLOAD_CMDS:
            await self._upload_frame(link, frame)
        else:
            await self._answer(link, frame.headers.req_id, ERR_BAD_REQUEST, f"unknown cmd {frame.cmd!r}")

    async def _subscribe(self, link: _Link, frame: InboundFrame) -> None:
        req_id = frame.headers.req_id
        injected = self._take_failure(CMD_SUBSCRIBE)
        if injected is not None:
            await self._answer(link, req_id, injected)
            await self._close(link, CLOSE_NORMAL, "subscribe failed")
            return
        try:
            body = SubscribeBody.model_validate(frame.body)
        except ValidationError as exc:
            await self._answer(link, req_id, ERR_BAD_REQUEST, _explain(exc))
            await self._close(link, CLOSE_NORMAL, "subscribe failed")
            return
        evicted: _Link | None = None
        with self._lock:
            secret = self._fake.config.aibots.get(body.bot_id)
            valid = secret is not None and secrets.compare_digest(secret.encode(), body.secret.encode())
            if valid and link.bot_id not in (None, body.bot_id):
                other = link.bot_id
            else:
                other = None
            if valid and other is None:
                old = self._holders.get(body.bot_id)
                if old is not None and old != link.id:
                    evicted = self.links.get(old)
                    self._takeovers[body.bot_id] = self._takeovers.get(body.bot_id, 0) + 1
                self._holders[body.bot_id] = link.id
                link.bot_id = body.bot_id
                link.subscribed_at = time.time()
                link.last_heard = self._clock()
        if not valid:
            log.info("aibot subscribe refused link_id=%d bot_id=%s", link.id, body.bot_id)
            await self._answer(link, req_id, ERR_INVALID_CREDENTIALS, "check the bot_id and secret of the AI bot")
            await self._close(link, CLOSE_NORMAL, "authentication failed")
            return
        if other is not None:
            await self._answer(link, req_id, ERR_BAD_REQUEST, f"this connection is subscribed to bot {other!r}")
            return
        if evicted is not None:
            log.info("aibot takeover bot_id=%s old_link=%d new_link=%d", body.bot_id, evicted.id, link.id)
            await self._evict(evicted, body.bot_id)
        await self._answer(link, req_id, 0)
        with self._lock:
            self._fake._notify()
        log.info("aibot subscribed link_id=%d bot_id=%s", link.id, body.bot_id)

    async def _ping(self, link: _Link, frame: InboundFrame) -> None:
        with self._lock:
            link.pings += 1
            link.last_heard = self._clock()
            link.last_ping_at = time.time()
        injected = self._take_failure(CMD_PING)
        if injected is not None:
            await self._answer(link, frame.headers.req_id, injected)
        elif self._fake.config.aibot_answer_pings:
            await self._answer(link, frame.headers.req_id, 0)

    async def _message_frame(
        self, link: _Link, frame: InboundFrame, make: Callable[[_Link, str, dict[str, Any]], SentMessage]
    ) -> None:
        """aibot_send_msg and the three replies: check, `make` the message (under the lock), record, answer."""
        bot_id = link.bot_id
        assert bot_id is not None  # only subscribed links get here
        req_id = frame.headers.req_id
        body = frame.body if isinstance(frame.body, dict) else {}
        raw_chatid = body.get("chatid")
        chatid = raw_chatid if isinstance(raw_chatid, str) else None
        raw_msgtype = body.get("msgtype")
        msgtype = raw_msgtype if isinstance(raw_msgtype, str) else None
        injected = self._take_failure(frame.cmd)
        pace = f"aibot:{bot_id}"
        try:
            if injected is not None:
                raise Rejected(injected)
            if not isinstance(frame.body, dict):
                raise Rejected(ERR_BAD_REQUEST, "body must be a JSON object")
            with self._lock:
                self._fake._check_rate(pace)  # every message frame counts against the bot's pace
                message = make(link, req_id, frame.body)
                self._fake._window(pace).append(self._clock())
        except Rejected as rejected:
            errmsg = self._errmsg(rejected.errcode, rejected.detail)
            with self._lock:
                self._fake.record_attempt(bot_id, chatid, msgtype, rejected.errcode, errmsg, injected is not None, None)
            log.info(
                "aibot frame refused cmd=%s bot_id=%s req_id=%s errcode=%d detail=%s",
                frame.cmd,
                bot_id,
                req_id,
                rejected.errcode,
                rejected.detail,
            )
            await self._answer(link, req_id, rejected.errcode, rejected.detail)
            return
        with self._lock:
            self._fake.record_attempt(bot_id, message.chatid, message.msgtype, 0, "ok", False, message.seq)
        log.info(
            "aibot frame accepted cmd=%s bot_id=%s seq=%d chat_id=%s", frame.cmd, bot_id, message.seq, message.chatid
        )
        await self._answer(link, req_id, 0)

    # Under the lock from here to _record: nothing awaits.

    def _send_msg(self, link: _Link, req_id: str, body: dict[str, Any]) -> SentMessage:
        bot_id = link.bot_id
        assert bot_id is not None  # only subscribed links send
        if "chatid" not in body:
            raise Rejected(ERR_BAD_REQUEST, "chatid is required: the group chat id, or the userid for a single chat")
        try:
            send = SendBody.model_validate(body)
        except ValidationError as exc:
            raise Rejected(ERR_BAD_REQUEST, _explain(exc)) from exc
        if not send.chatid or _bytes(send.chatid) > CHATID_MAX_BYTES:
            raise Rejected(ERR_INVALID_CHATID, "chatid must be a non-empty id of at most 256 bytes")
        if send.msgtype == "markdown":
            content = self._content(body, "markdown", self._fake.config.aibot_markdown_max_bytes)
            outgoing = _Outgoing({"msgtype": "markdown", "content": content})
        elif send.msgtype == "template_card":
            outgoing = self._card_outgoing(bot_id, body)
        elif send.msgtype in UPLOAD_LIMITS:
            outgoing = self._media_outgoing(bot_id, send.msgtype, body)
        else:
            raise Rejected(ERR_INVALID_MSGTYPE, f"msgtype {send.msgtype!r}: use markdown or template_card")
        return self._record(bot_id, send.chatid, outgoing, reply_to=None)

    def _media_outgoing(self, bot_id: str, kind: str, body: Mapping[str, Any]) -> _Outgoing:
        part = body.get(kind)
        media_id = part.get("media_id") if isinstance(part, dict) else None
        if not isinstance(media_id, str) or not media_id:
            raise Rejected(ERR_BAD_REQUEST, f"{kind}.media_id is required (upload first: aibot_upload_media_*)")
        found = self._uploaded.get(media_id)
        if found is not None and found.expires_at <= self._clock():
            del self._uploaded[media_id]
            found = None
        if found is None or found.bot_id != bot_id:
            raise Rejected(ERR_INVALID_MEDIA_ID, "media_id unknown, expired, or uploaded by another bot")
        if found.kind != kind:
            raise Rejected(ERR_INVALID_MEDIA_ID, f"media_id is a {found.kind}, not a {kind}")
        fields: dict[str, Any] = {"msgtype": kind, "media_id": media_id, "file_name": found.filename}
        fields |= {"image_id": found.image_id, "image_md5": found.md5, "image_size": found.size}
        return _Outgoing(fields)

    # ----- uploads (aibot_upload_media_init, _chunk, _finish) -----

    async def _upload_frame(self, link: _Link, frame: InboundFrame) -> None:
        bot_id = link.bot_id
        assert bot_id is not None  # only subscribed links get here
        req_id = frame.headers.req_id
        injected = self._take_failure(frame.cmd)
        body = frame.body if isinstance(frame.body, dict) else None
        try:
            if injected is not None:
                raise Rejected(injected)
            if body is None:
                raise Rejected(ERR_BAD_REQUEST, "body must be a JSON object")
            with self._lock:
                if frame.cmd == CMD_UPLOAD_INIT:
                    answer = self._upload_init(bot_id, body)
                elif frame.cmd == CMD_UPLOAD_CHUNK:
                    answer = self._upload_chunk(bot_id, body)
                else:
                    answer = self._upload_finish(bot_id, body)
        except Rejected as rejected:
            log.info("aibot upload refused cmd=%s bot_id=%s errcode=%d %s", frame.cmd, bot_id, rejected.errcode,
                     rejected.detail)  # fmt: skip
            await self._answer(link, req_id, rejected.errcode, rejected.detail)
            return
        await self._answer(link, req_id, 0, body=answer)

    def _upload_init(self, bot_id: str, body: dict[str, Any]) -> dict[str, Any] | None:
        try:
            init = UploadInit.model_validate(body)
        except ValidationError as exc:
            raise Rejected(ERR_BAD_REQUEST, _explain(exc)) from exc
        limit = UPLOAD_LIMITS[init.type]
        if not MEDIA_MIN_UPLOAD <= init.total_size <= limit:
            raise Rejected(ERR_BAD_REQUEST, f"a {init.type} is {MEDIA_MIN_UPLOAD} to {limit} bytes")
        needed = -(-init.total_size // UPLOAD_CHUNK_MAX_BYTES)
        if not needed <= init.total_chunks <= UPLOAD_MAX_CHUNKS:
            raise Rejected(ERR_BAD_REQUEST, f"total_chunks must be {needed} to {UPLOAD_MAX_CHUNKS} for this size")
        self._expire_uploads()
        if sum(1 for u in self._uploads.values() if u.bot_id == bot_id) >= UPLOADS_PER_BOT:
            raise Rejected(ERR_BAD_REQUEST, f"at most {UPLOADS_PER_BOT} uploads in progress per bot")
        upload_id = uuid.uuid4().hex
        self._uploads[upload_id] = _Upload(
            bot_id, init.type, init.filename, init.total_size, init.total_chunks, init.md5, {}, self._clock()
        )
        return {"upload_id": upload_id}

    def _upload_of(self, bot_id: str, upload_id: Any) -> _Upload:
        found = self._uploads.get(upload_id) if isinstance(upload_id, str) else None
        if found is None or found.bot_id != bot_id:
            raise Rejected(ERR_BAD_REQUEST, "upload_id unknown, expired or of another bot")
        return found

    def _upload_chunk(self, bot_id: str, body: dict[str, Any]) -> None:
        try:
            chunk = UploadChunk.model_validate(body)
        except ValidationError as exc:
            raise Rejected(ERR_BAD_REQUEST, _explain(exc)) from exc
        upload = self._upload_of(bot_id, chunk.upload_id)
        if not 0 <= chunk.chunk_index < upload.total_chunks:
            raise Rejected(ERR_BAD_REQUEST, f"chunk_index must be 0 to {upload.total_chunks - 1}")
        try:
            data = base64.b64decode(chunk.base64_data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Rejected(ERR_BAD_REQUEST, "base64_data is not base64") from exc
        if not data or len(data) > UPLOAD_CHUNK_MAX_BYTES:
            raise Rejected(ERR_BAD_REQUEST, f"a chunk is 1 to {UPLOAD_CHUNK_MAX_BYTES} bytes before base64")
        upload.chunks[chunk.chunk_index] = data
        return None

    def _upload_finish(self, bot_id: str, body: dict[str, Any]) -> dict[str, Any]:
        upload = self._upload_of(bot_id, body.get("upload_id"))
        missing = [i for i in range(upload.total_chunks) if i not in upload.chunks]
        del self._uploads[body["upload_id"]]
        if missing:
            raise Rejected(ERR_BAD_REQUEST, f"chunks missing: {missing[:10]}")
        data = b"".join(upload.chunks[i] for i in range(upload.total_chunks))
        digest = hashlib.md5(data).hexdigest()
        if len(data) != upload.total_size:
            raise Rejected(ERR_BAD_REQUEST, f"{len(data)} bytes arrived, total_size said {upload.total_size}")
        if upload.md5 is not None and upload.md5.lower() != digest:
            raise Rejected(ERR_BAD_REQUEST, "md5 does not match the bytes uploaded")
        if upload.kind == "image" and image_mime(data) is None:
            raise Rejected(ERR_INVALID_MEDIA_ID, "an image must be JPG or PNG")
        media_id = "aibot-media-" + secrets.token_urlsafe(24)
        image_id = self._fake.images.add(data)
        expires = self._clock() + UPLOADED_MEDIA_TTL
        self._uploaded[media_id] = _Uploaded(bot_id, upload.kind, upload.filename, image_id, digest, len(data), expires)
        return {"type": upload.kind, "media_id": media_id, "created_at": str(int(time.time()))}

    def _expire_uploads(self) -> None:
        horizon = self._clock() - UPLOAD_IDLE_SECONDS
        for upload_id, upload in list(self._uploads.items()):
            if upload.started_at < horizon:
                del self._uploads[upload_id]

    def uploaded(self, media_id: str) -> bytes | None:
        """The bytes a bot uploaded under `media_id` (tests compare them with what the agent sent)."""
        with self._lock:
            found = self._uploaded.get(media_id)
            return None if found is None else self._fake.images.get(found.image_id)

    def _answering(self, link: _Link, req_id: str) -> tuple[_Pending, float]:
        """The callback this connection was pushed with `req_id`, and its age in seconds."""
        pending = self._pending.get(req_id)
        if pending is None or pending.link_id != link.id:
            raise Rejected(ERR_INVALID_REQ_ID, "req_id is not a callback this connection received")
        return pending, self._clock() - pending.pushed_at

    def _answering_event(self, link: _Link, req_id: str, kind: str) -> _Pending:
        """The `kind` event this connection was pushed with `req_id`, answered within the reply window."""
        pending, age = self._answering(link, req_id)
        window = self._fake.config.aibot_reply_window
        wrong_kind, late = EVENT_ANSWERS[kind]
        if pending.kind != kind:
            raise Rejected(ERR_INVALID_REQ_ID, wrong_kind)
        if age > window:
            raise Rejected(ERR_INVALID_REQ_ID, late.format(age=age, window=window))
        return pending

    def _welcome_reply(self, link: _Link, req_id: str, body: dict[str, Any]) -> SentMessage:
        pending = self._answering_event(link, req_id, "enter_chat")
        if pending.welcomed:
            raise Rejected(ERR_INVALID_REQ_ID, "this enter_chat was already welcomed")
        outgoing = self._welcome(pending.bot_id, body)
        pending.welcomed = True
        return self._record(pending.bot_id, pending.chat_id, outgoing, reply_to=pending.msgid)

    def _update_reply(self, link: _Link, req_id: str, body: dict[str, Any]) -> SentMessage:
        return self._update_card(self._answering_event(link, req_id, "template_card_event"), req_id, body)

    def _respond_reply(self, link: _Link, req_id: str, body: dict[str, Any]) -> SentMessage:
        pending, age = self._answering(link, req_id)
        if pending.cmd != CMD_MSG_CALLBACK:
            raise Rejected(ERR_INVALID_REQ_ID, "an event cannot be answered with aibot_respond_msg: use aibot_send_msg")
        if age > self._fake.config.aibot_stream_window:
            raise Rejected(ERR_STREAM_EXPIRED, "the message is too old to answer")
        return self._respond(pending, body)

    def _welcome(self, bot_id: str, body: dict[str, Any]) -> _Outgoing:
        reply = self._reply_body(body)
        if reply.msgtype == "text":
            return _Outgoing({"msgtype": "text", "content": self._content(body, "text", STREAM_MAX_BYTES)})
        if reply.msgtype == "template_card":
            return self._card_outgoing(bot_id, body)
        raise Rejected(ERR_INVALID_MSGTYPE, f"a welcome is text or template_card, not {reply.msgtype!r}")

    def _respond(self, pending: _Pending, body: dict[str, Any]) -> SentMessage:
        reply = self._reply_body(body)
        if reply.msgtype == "template_card":
            return self._record(
                pending.bot_id, pending.chat_id, self._card_outgoing(pending.bot_id, body), pending.msgid
            )
        if reply.msgtype not in ("stream", "stream_with_template_card"):
            raise Rejected(
                ERR_INVALID_MSGTYPE,
                f"msgtype {reply.msgtype!r}: use stream, template_card or stream_with_template_card",
            )
        try:
            stream = StreamPart.model_validate(body.get("stream"))
        except ValidationError as exc:
            raise Rejected(ERR_BAD_REQUEST, f"stream: {_explain(exc)}") from exc
        if _bytes(stream.content) > STREAM_MAX_BYTES:
            raise Rejected(ERR_BAD_REQUEST, f"stream.content is longer than {STREAM_MAX_BYTES} bytes")
        card = None
        if reply.msgtype == "stream_with_template_card" and body.get("template_card") is not None:
            card = self._card_outgoing(pending.bot_id, body)  # checked before anything is recorded
        key = (pending.bot_id, stream.id)
        seq = self._streams.get(key)
        if seq is None:
            message = self._record(
                pending.bot_id,
                pending.chat_id,
                _Outgoing(
                    {"msgtype": "stream", "content": stream.content, "stream_id": stream.id, "finished": stream.finish}
                ),
                pending.msgid,
            )
            self._streams[key] = message.seq
        else:
            message = self._fake.messages[seq - 1]
            if message.finished:
                raise Rejected(ERR_BAD_REQUEST, f"stream {stream.id!r} is finished")
            message.content, message.finished = stream.content, stream.finish
            self._add_event(
                kind="update",
                bot_id=pending.bot_id,
                message_seq=seq,
                content=stream.content,
                finished=stream.finish,
                chat_id=message.chatid,
            )
        if card is not None:
            self._record(pending.bot_id, pending.chat_id, card, pending.msgid)
        return message

    def _update_card(self, pending: _Pending, req_id: str, body: dict[str, Any]) -> SentMessage:
        try:
            update = UpdateBody.model_validate(body)
            card = TemplateCard.model_validate(update.template_card)
        except ValidationError as exc:
            raise Rejected(ERR_BAD_REQUEST, _explain(exc)) from exc
        if card.task_id != pending.task_id:
            raise Rejected(ERR_BAD_REQUEST, f"template_card.task_id must be the clicked card's {pending.task_id!r}")
        found = self._cards[(pending.bot_id, card.task_id)]  # a click is only pushed for a known card
        found.model = card
        found.state.card = update.template_card
        found.state.updates.append(
            CardUpdate(ts=time.time(), req_id=req_id, userids=update.userids, card=update.template_card)
        )
        message = self._fake.messages[found.state.message_seq - 1]
        message.card = update.template_card
        self._add_event(
            kind="update",
            bot_id=pending.bot_id,
            message_seq=message.seq,
            card=update.template_card,
            chat_id=message.chatid,
        )
        return message

    @staticmethod
    def _reply_body(body: dict[str, Any]) -> ReplyBody:
        try:
            return ReplyBody.model_validate(body)
        except ValidationError as exc:
            raise Rejected(ERR_BAD_REQUEST, _explain(exc)) from exc

    @staticmethod
    def _content(body: Mapping[str, Any], part: str, max_bytes: int) -> str:
        try:
            content = ContentPart.model_validate(body.get(part)).content
        except ValidationError as exc:
            raise Rejected(ERR_BAD_REQUEST, f"{part}: {_explain(exc)}") from exc
        if not content:
            raise Rejected(ERR_EMPTY_CONTENT, f"{part}.content is empty")
        if _bytes(content) > max_bytes:
            raise Rejected(ERR_BAD_REQUEST, f"{part}.content is {_bytes(content)} bytes, at most {max_bytes} allowed")
        return content

    def _card_outgoing(self, bot_id: str, body: Mapping[str, Any]) -> _Outgoing:
        raw = body.get("template_card")
        try:
            card = TemplateCard.model_validate(raw)
        except ValidationError as exc:
            raise Rejected(ERR_BAD_REQUEST, f"template_card: {_explain(exc)}") from exc
        if card.task_id is not None and (bot_id, card.task_id) in self._cards:
            raise Rejected(ERR_BAD_REQUEST, f"task_id {card.task_id!r} was already used by this bot")
        assert isinstance(raw, dict)  # TemplateCard validated it
        return _Outgoing({"msgtype": "template_card", "card": raw, "task_id": card.task_id}, card)

    def _record(self, bot_id: str, chat_id: str, outgoing: _Outgoing, reply_to: str | None) -> SentMessage:
        message = self._fake.record_message(
            bot_id, source="aibot", chatid=chat_id, reply_to=reply_to, **outgoing.fields
        )
        if outgoing.card is not None and outgoing.card.task_id is not None:
            state = CardState(
                bot_id=bot_id,
                task_id=outgoing.card.task_id,
                message_seq=message.seq,
                chat_id=chat_id,
                card=outgoing.fields["card"],
            )
            self._cards[(bot_id, outgoing.card.task_id)] = _Card(state, outgoing.card)
        return message

    def _errmsg(self, errcode: int, detail: str = "") -> str:
        return errmsg_for(errcode, detail, errmsgs=AIBOT_ERRMSGS)

    def _take_failure(self, cmd: str) -> int | None:
        with self._lock:
            for failure in self._failures:
                if failure.cmd == cmd or (failure.cmd is None and cmd in self._message_frames):
                    self._failures.remove(failure)
                    return failure.errcode
        return None

    # ----- writing to links -----

    async def _answer(
        self, link: _Link, req_id: str, errcode: int, detail: str = "", body: dict[str, Any] | None = None
    ) -> None:
        errmsg = "ok" if errcode == 0 else self._errmsg(errcode, detail)
        frame: dict[str, Any] = {"headers": {"req_id": req_id}, "errcode": errcode, "errmsg": errmsg}
        if body is not None:
            frame["body"] = body
        await self._send(link, frame)

    async def _send(self, link: _Link, frame: dict[str, Any]) -> bool:
        text = json.dumps(frame, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate the bot sent (in a req_id, say) comes back escaped
            text = json.dumps(frame)

        async def write() -> bool:
            async with link.send_lock:
                if link.closed:
                    return False
                try:
                    await link.websocket.send_text(text)
                except (WebSocketDisconnect, RuntimeError):
                    link.closed = True
                    return False
                return True

        sent = await self._on_link_loop(link, write())
        if sent:
            self._log_frame("out", link, frame, _bytes(text))
        return sent

    async def _close(self, link: _Link, code: int, reason: str = "") -> None:
        async def close() -> None:
            async with link.send_lock:
                if link.closed:
                    return
                link.closed = True
                try:
                    await link.websocket.close(code, reason)
                except (WebSocketDisconnect, RuntimeError):
                    pass

        await self._on_link_loop(link, close())
        log.info("aibot link closing link_id=%d code=%d reason=%s", link.id, code, reason)

    @staticmethod
    async def _on_link_loop(link: _Link, work: Coroutine[Any, Any, T]) -> T | None:
        """Run link I/O on the loop that serves the link, from whatever loop the caller is on."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is link.loop:
            return await work
        if link.loop.is_closed():
            work.close()
            return None
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, link.loop))

    async def _evict(self, link: _Link, bot_id: str) -> None:
        """What WeCom does to the old connection when another takes its bot: disconnected_event, then close."""
        body = {
            "msgid": uuid.uuid4().hex,
            "create_time": int(time.time()),
            "aibotid": bot_id,
            "msgtype": "event",
            "event": {"eventtype": "disconnected_event"},
        }
        await self._send(link, {"cmd": CMD_EVENT_CALLBACK, "headers": {"req_id": self._req_id()}, "body": body})
        await self._close(link, CLOSE_NORMAL, "another connection subscribed this bot")

    async def kick(self, bot_id: str | None = None) -> bool:
        """Play another connection taking the bot over: its link gets disconnected_event and is closed."""
        bot = self._bot(bot_id)
        with self._lock:
            link = self.links.get(self._holders.pop(bot, -1))
            if link is not None:
                self._takeovers[bot] = self._takeovers.get(bot, 0) + 1
        if link is None:
            return False
        await self._evict(link, bot)
        return True

    async def drop(self, bot_id: str | None = None, code: int = 1011) -> bool:
        """Close the bot's link without a word (default 1011, as a crashing server would)."""
        bot = self._bot(bot_id)
        with self._lock:
            link = self.links.get(self._holders.get(bot, -1))
        if link is None:
            return False
        await self._close(link, code, "")
        return True

    async def close_all(self) -> None:
        """Close every link (the app is shutting down: a bot should reconnect, not wait)."""
        with self._lock:
            links = list(self.links.values())
        for link in links:
            await self._close(link, 1001, "server shutting down")

    async def run(self) -> None:
        """Background duty, owned by the app's lifespan: close idle links, forget expired media and callbacks."""
        while True:
            idle = self._fake.config.aibot_idle_timeout
            await asyncio.sleep(min(0.5, idle / 4) if idle else 0.5)
            now = self._clock()
            with self._lock:
                stale = [link for link in self.links.values() if idle and now - link.last_heard > idle]
                for media_id, media in list(self._media.items()):
                    if media.expires_at <= now:
                        del self._media[media_id]
                horizon = now - max(self._fake.config.aibot_stream_window, self._fake.config.aibot_reply_window)
                while self._pending and next(iter(self._pending.values())).pushed_at < horizon:
                    self._pending.popitem(last=False)
            for link in stale:
                await self._close(link, CLOSE_NORMAL, f"no heartbeat for {idle:g}s")

    # ----- logs -----

    def _log_frame(self, direction: Literal["in", "out"], link: _Link, frame: Any, size: int) -> None:
        if isinstance(frame, dict) and frame.get("cmd") == CMD_SUBSCRIBE and isinstance(frame.get("body"), dict):
            frame = {**frame, "body": {**frame["body"], "secret": "***"}}  # never keep a credential
        with self._lock:
            self._frame_seq += 1
            self.frames.append(
                AibotFrame(
                    seq=self._frame_seq,
                    ts=time.time(),
                    direction=direction,
                    link_id=link.id,
                    bot_id=link.bot_id,
                    size=size,
                    frame=frame,
                )
            )
            self._fake._notify()

    def _add_event(self, **fields: Any) -> AibotEvent:
        with self._lock:
            self._event_seq += 1
            event = AibotEvent(seq=self._event_seq, ts=fields.pop("ts", None) or time.time(), **fields)
            self.events.append(event)
            self._fake._notify()
            return event

    # ----- people -----

    @staticmethod
    def _req_id() -> str:
        return f"{int(time.time() * 1000)}_{secrets.token_hex(8)}"

    def _image_media(self, data: bytes, base_url: str, image_id: str | None) -> tuple[dict[str, str], str]:
        """An image kept twice: plain for the chat page (image_id), encrypted behind a media URL for the bot."""
        if image_mime(data) is None:
            raise AibotError("an image must be PNG or JPEG")
        if len(data) > ATTACH_MAX_BYTES:
            raise AibotError(f"image is {len(data)} bytes, at most {ATTACH_MAX_BYTES} allowed")
        if image_id is None:
            image_id = self._fake.add_image(data)
        return self._media_part(data, None, "image", base_url), image_id

    def _media_part(self, data: bytes, filename: str | None, kind: str, base_url: str) -> dict[str, str]:
        ciphertext, aeskey = encrypt_media(data)
        media_id = f"{kind}-{uuid.uuid4().hex}"
        with self._lock:
            blob_id = self._blobs.add(ciphertext)
            self._media[media_id] = _Media(blob_id, filename, self._clock() + self._fake.config.aibot_media_ttl)
        return {"url": f"{base_url.rstrip('/')}/_fake/aibot/media/{media_id}", "aeskey": aeskey}

    def _base_url(self, base_url: str | None) -> str:
        return base_url or self._fake.config.public_url or DEFAULT_PUBLIC_URL

    def _quote(self, quote_seq: int | None, quote_text: str | None, quote: Mapping[str, Any] | None) -> dict | None:
        given = [q for q in (quote_seq, quote_text, quote) if q is not None]
        if len(given) > 1:
            raise AibotError("give one of quote_seq, quote_text or quote")
        if quote is not None:
            if not isinstance(quote.get("msgtype"), str):
                raise AibotError("a raw quote needs a msgtype")
            return dict(quote)
        if quote_text is not None:
            return {"msgtype": "text", "text": {"content": quote_text}}
        if quote_seq is None:
            return None
        with self._lock:
            if not 1 <= quote_seq <= len(self._fake.messages):
                raise AibotNotFoundError(f"no message with seq {quote_seq} to quote")
            message = self._fake.messages[quote_seq - 1]
        if message.msgtype == "template_card":
            title = (message.card or {}).get("main_title") or {}
            text = (title.get("title") or "") if isinstance(title, dict) else ""
            return {"msgtype": "text", "text": {"content": text}}
        if message.content is None:
            raise AibotError(f"message {quote_seq} ({message.msgtype}) has no text to quote: use quote")
        return {"msgtype": "text", "text": {"content": message.content}}

    def _chat(self, userid: str, chat_id: str | None, chat_type: ChatType) -> str:
        if chat_type == "single":
            if chat_id not in (None, userid):
                raise AibotError("in a single chat the chat is the person: leave chat_id out or set it to the userid")
            return userid
        if not chat_id:
            raise AibotError("a group message needs chat_id")
        return chat_id

    def _base_body(self, bot_id: str, userid: str, chat_id: str, chat_type: ChatType, msgid: str | None) -> dict:
        body: dict[str, Any] = {"msgid": msgid or uuid.uuid4().hex, "create_time": int(time.time()), "aibotid": bot_id}
        if chat_type == "group":
            body["chatid"] = chat_id
        body["chattype"] = chat_type
        body["from"] = {"userid": userid}
        return body

    @staticmethod
    def _infer_kind(
        text: str | None,
        images: Sequence[bytes],
        voice: str | None,
        file: tuple[str, bytes] | None,
        chat_type: ChatType,
        quoted: dict[str, Any] | None,
    ) -> MsgType:
        if voice is not None:
            return "voice"
        if file is not None:
            return "file"
        if images:
            alone = chat_type == "single" and len(images) == 1 and not text and quoted is None
            return "image" if alone else "mixed"
        return "text"

    async def push_message(
        self,
        *,
        userid: str,
        text: str | None = None,
        chat_id: str | None = None,
        chat_type: ChatType = "group",
        name: str | None = None,
        msgtype: MsgType | None = None,
        quote_seq: int | None = None,
        quote_text: str | None = None,
        quote: Mapping[str, Any] | None = None,
        images: Sequence[bytes] = (),
        image_ids: Sequence[str] = (),
        voice: str | None = None,
        file: tuple[str, bytes] | None = None,
        at_robot: bool = True,
        msgid: str | None = None,
        bot_id: str | None = None,
        base_url: str | None = None,
    ) -> AibotEvent:
        """A person writes to the bot: an ``aibot_msg_callback`` on the bot's link. Returns the push (req_id, msgid).

        msgtype is inferred: voice, file, images (one in a single chat without text: image; else mixed), text. In a
        group the text starts with ``@<robot_name> `` unless at_robot is False. A quote is one of ``quote_seq`` (a
        message in the log), ``quote_text``, or ``quote`` (the raw structure, for odd cases). ``image_ids`` name images
        already in the fake (POST /_fake/images); they come before ``images``.
        AibotError (422/404/409 in the control API) when WeCom could not deliver such a message.
        """
        bot = self._bot(bot_id)
        chat = self._chat(userid, chat_id, chat_type)
        stored = [(image_id, self._fake.get_image(image_id)) for image_id in image_ids]
        if any(data is None for _, data in stored):
            raise AibotNotFoundError("an image_id is unknown (attach images with POST /_fake/images first)")
        pictures = [(image_id, data) for image_id, data in stored if data is not None]
        pictures += [(None, data) for data in images]
        images = [data for _, data in pictures]
        quoted = self._quote(quote_seq, quote_text, quote)
        mention = f"@{self._fake.config.robot_name}" if at_robot and chat_type == "group" else ""
        kind = msgtype or self._infer_kind(text, images, voice, file, chat_type, quoted)
        if kind in ("image", "voice", "file") and chat_type != "single":
            raise AibotError(f"WeCom delivers {kind} messages from single chats only; use mixed in a group")
        if kind == "image" and (len(images) != 1 or text):
            raise AibotError("an image message holds exactly one image and no text")
        if kind == "mixed" and not images:
            raise AibotError("a mixed message needs at least one image")
        if kind == "text" and not text and not (mention and quoted):
            raise AibotError("a text message needs text (in a group, a quote with the bot's @mention will do)")
        if kind == "voice" and not voice:
            raise AibotError("a voice message needs its transcript (voice)")
        if kind == "file" and (file is None or not file[0]):
            raise AibotError("a file message needs a file name and bytes")
        if file is not None and len(file[1]) > MEDIA_MAX_BYTES:
            raise AibotError(f"file is {len(file[1])} bytes, at most {MEDIA_MAX_BYTES} allowed")
        base = self._base_url(base_url)
        body = self._base_body(bot, userid, chat, chat_type, msgid)
        body["msgtype"] = kind
        content = " ".join(part for part in (mention, text or "") if part)
        kept_ids: list[str] = []
        file_name = None
        if kind == "text":
            body["text"] = {"content": content}
        elif kind == "voice":
            body["voice"] = {"content": voice}
        elif kind == "file":
            assert file is not None  # checked above
            file_name = file[0]
            body["file"] = self._media_part(file[1], file_name, "file", base)
        else:
            parts = []
            for known_id, data in pictures:
                part, kept_id = self._image_media(data, base, known_id)
                parts.append(part)
                kept_ids.append(kept_id)
            if kind == "image":
                body["image"] = parts[0]
            else:
                items: list[dict[str, Any]] = [{"msgtype": "text", "text": {"content": content}}] if content else []
                items += [{"msgtype": "image", "image": part} for part in parts]
                body["mixed"] = {"msg_item": items}
        if quoted is not None:
            body["quote"] = quoted
        return await self._push(
            bot, CMD_MSG_CALLBACK, kind, body, chat, chat_type, userid, name, image_ids=kept_ids, file_name=file_name
        )

    async def reply_as_person(
        self,
        *,
        chat_id: str,
        text: str | None,
        quote: str | None,
        image_url: str | None,
        chat_type: ChatType,
        userid: str,
        name: str | None,
        msgid: str | None,
        at_robot: bool,
        base_url: str | None = None,
    ) -> AibotEvent:
        """POST /_fake/reply when the fake has an AI bot and no callback URL (the sandbox's --aibot): the same person's
        message, but over the bot's long connection, as the chat page sends it. ``quote`` is the quoted text (its
        header names the question); ``image_url`` one of the fake's own images (POST /_fake/images)."""
        image_ids = []
        if image_url is not None:
            path = urlsplit(image_url).path
            if not path.startswith(IMAGES_PATH) or len(path) == len(IMAGES_PATH):
                raise AibotError(f"over the AI bot an image_url must be one of the fake's {IMAGES_PATH}<id> URLs")
            image_ids.append(path.removeprefix(IMAGES_PATH))
        return await self.push_message(
            userid=userid,
            name=name,
            text=text,
            chat_id=chat_id,
            chat_type=chat_type,
            quote_text=quote,
            image_ids=image_ids,
            at_robot=at_robot,
            msgid=msgid,
            base_url=base_url,
        )

    async def push_event(
        self,
        *,
        userid: str,
        eventtype: EventType,
        chat_id: str | None = None,
        chat_type: ChatType = "single",
        name: str | None = None,
        feedback: Mapping[str, Any] | None = None,
        bot_id: str | None = None,
    ) -> AibotEvent:
        """An event from a person: enter_chat (a single chat opened) or feedback_event (``feedback``: id, type, …)."""
        bot = self._bot(bot_id)
        if eventtype == "enter_chat" and chat_type != "single":
            raise AibotError("enter_chat happens in single chats only")
        chat = self._chat(userid, chat_id, chat_type)
        body = self._base_body(bot, userid, chat, chat_type, None)
        body["msgtype"] = "event"
        event: dict[str, Any] = {"eventtype": eventtype}
        if eventtype == "feedback_event":
            event["feedback_event"] = dict(feedback or {"id": uuid.uuid4().hex, "type": 1})
        body["event"] = event
        return await self._push(bot, CMD_EVENT_CALLBACK, eventtype, body, chat, chat_type, userid, name)

    async def click(
        self,
        *,
        userid: str,
        task_id: str | None = None,
        event_key: str | None = None,
        button: str | None = None,
        chat_id: str | None = None,
        selected_items: Sequence[Mapping[str, Any]] | None = None,
        name: str | None = None,
        chat_type: ChatType | None = None,
        bot_id: str | None = None,
    ) -> AibotEvent:
        """A person clicks a card's button (or submits a vote/multiple card): a template_card_event on the link.

        The card is looked up by task_id among the cards the bot sent, as people see it now: a button an update took
        away cannot be clicked (AibotConflictError). ``selected_items``: ``[{"question_key", "option_ids": [...]}]``.
        As a person sees it: ``button`` (its text) instead of ``event_key``, and ``chat_id`` instead of ``task_id``
        for the newest card in that chat that shows the button.
        """
        if (event_key is None) == (button is None):
            raise AibotError("name the button: event_key (its key) or button (its text), one of them")
        bot = self._bot(bot_id)
        with self._lock:
            if task_id is None:
                if chat_id is None:
                    raise AibotError("name the card: task_id, or chat_id for the newest card there")
                task_id = self._newest_card_showing(bot, chat_id, event_key, button)
            found = self._cards.get((bot, task_id))
            if found is None:
                raise AibotNotFoundError(f"no template card with task_id {task_id!r} was sent by bot {bot!r}")
            keys = found.model.event_keys()
            if event_key is None:
                event_key = next((k for k in keys if found.model.button_text(k) == button), None)
                if event_key is None:
                    shown = "、".join(filter(None, (found.model.button_text(k) for k in keys))) or "none"
                    raise AibotConflictError(f"the card shows no button {button!r} (buttons now: {shown})")
            button_text = found.model.button_text(event_key)
            chat = found.state.chat_id
            card_type = found.model.card_type
            kind = chat_type or self._chat_types.get(chat, "group")
        if event_key not in keys:
            shown = ", ".join(keys) if keys else "none"
            raise AibotConflictError(f"the card shows no button {event_key!r} (keys now: {shown})")
        body = self._base_body(bot, userid, chat, kind, None)
        body["msgtype"] = "event"
        event: dict[str, Any] = {"card_type": card_type, "event_key": event_key, "task_id": task_id}
        if selected_items:
            event["selected_items"] = {
                "selected_item": [
                    {"question_key": item["question_key"], "option_ids": {"option_id": list(item["option_ids"])}}
                    for item in selected_items
                ]
            }
        body["event"] = {"eventtype": "template_card_event", "template_card_event": event}
        return await self._push(
            bot,
            CMD_EVENT_CALLBACK,
            "template_card_event",
            body,
            chat,
            kind,
            userid,
            name,
            task_id=task_id,
            button_text=button_text,
        )

    def _newest_card_showing(self, bot: str, chat_id: str, event_key: str | None, button: str | None) -> str:
        """The task_id of the newest card `bot` sent to `chat_id` that shows this button now (under the lock)."""
        for (owner, task_id), card in reversed(self._cards.items()):
            if owner != bot or card.state.chat_id != chat_id:
                continue
            keys = card.model.event_keys()
            if (event_key in keys) if event_key is not None else any(card.model.button_text(k) == button for k in keys):
                return task_id
        shown = repr(event_key if event_key is not None else button)
        raise AibotNotFoundError(f"no card from bot {bot!r} in chat {chat_id!r} shows a button {shown} now")

    async def _push(
        self,
        bot_id: str,
        cmd: str,
        kind: str,
        body: dict[str, Any],
        chat_id: str,
        chat_type: ChatType,
        userid: str,
        name: str | None,
        *,
        image_ids: Sequence[str] = (),
        file_name: str | None = None,
        task_id: str | None = None,
        button_text: str | None = None,
    ) -> AibotEvent:
        req_id = self._req_id()
        frame = {"cmd": cmd, "headers": {"req_id": req_id}, "body": body}
        ts = time.time()
        with self._lock:
            link = self.links.get(self._holders.get(bot_id, -1))
            if link is None:
                raise AibotNotConnectedError(f"AI bot {bot_id!r} has no connection: nothing would receive the message")
            self._pending[req_id] = _Pending(bot_id, link.id, cmd, kind, body["msgid"], chat_id, task_id, self._clock())
            while len(self._pending) > PENDING_SIZE:
                self._pending.popitem(last=False)
            self._chat_types[chat_id] = chat_type
        if not await self._send(link, frame):
            with self._lock:
                self._pending.pop(req_id, None)
            raise AibotNotConnectedError(f"AI bot {bot_id!r}'s connection closed before the message went out")
        log.info(
            "aibot push cmd=%s kind=%s bot_id=%s chat_id=%s userid=%s req_id=%s",
            cmd,
            kind,
            bot_id,
            chat_id,
            userid,
            req_id,
        )
        return self._add_event(
            kind="push",
            ts=ts,
            bot_id=bot_id,
            cmd=cmd,
            req_id=req_id,
            msgid=body["msgid"],
            chat_id=chat_id,
            chat_type=chat_type,
            userid=userid,
            name=name,
            frame=frame,
            image_ids=list(image_ids),
            file_name=file_name,
            button_text=button_text,
        )


# ----- the control API -----


class _Person(BaseModel):
    """Who does something in a control request: the person, and the bot (left out when only one is configured)."""

    model_config = ConfigDict(extra="forbid")
    bot_id: str | None = None
    userid: str = Field(default="zhangsan", min_length=1, max_length=64)
    name: str | None = Field(default=None, max_length=64)


class PersonMessage(_Person):
    """POST /_fake/aibot/message: a person writes to the bot. Fields are AibotHub.push_message's keywords, with images
    as ``image_ids`` (from POST /_fake/images) or ``image_base64``, and a file as ``file_name`` + ``file_base64``."""

    chat_id: str | None = Field(default=None, min_length=1, max_length=CHATID_MAX_BYTES)
    chat_type: ChatType = "group"
    msgtype: MsgType | None = None
    text: str | None = Field(default=None, max_length=20000)
    quote_seq: int | None = Field(default=None, ge=1)
    quote_text: str | None = Field(default=None, max_length=20000)
    quote: dict[str, Any] | None = None
    image_ids: list[str] = Field(default_factory=list, max_length=9)  # from POST /_fake/images
    image_base64: list[str] = Field(default_factory=list, max_length=9)
    voice: str | None = Field(default=None, max_length=20000)
    file_name: str | None = Field(default=None, min_length=1, max_length=255)
    file_base64: str | None = None
    at_robot: bool = True
    msgid: str | None = Field(default=None, min_length=1, max_length=128)


class PersonEvent(_Person):
    """POST /_fake/aibot/event: AibotHub.push_event's keywords."""

    eventtype: EventType
    chat_id: str | None = Field(default=None, min_length=1, max_length=CHATID_MAX_BYTES)
    chat_type: ChatType = "single"
    feedback: dict[str, Any] | None = None


class SelectedItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question_key: str = Field(min_length=1)
    option_ids: list[str] = Field(min_length=1, max_length=20)


class CardClick(_Person):
    """POST /_fake/aibot/click: AibotHub.click's keywords (task_id or chat_id; event_key or button)."""

    task_id: str | None = Field(default=None, min_length=1, max_length=TASK_ID_MAX_BYTES)
    event_key: str | None = Field(default=None, min_length=1, max_length=BUTTON_KEY_MAX_BYTES)
    button: str | None = Field(default=None, min_length=1, max_length=BUTTON_KEY_MAX_BYTES)
    chat_id: str | None = Field(default=None, min_length=1, max_length=CHATID_MAX_BYTES)
    selected_items: list[SelectedItem] | None = Field(default=None, max_length=3)
    chat_type: ChatType | None = None


class LinkAction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bot_id: str | None = None
    code: int = Field(default=1011, ge=1000, le=4999)


class AibotFailRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    errcodes: list[int] = Field(min_length=1)
    cmd: str | None = None


def _decode(data: str, what: str) -> bytes:
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AibotError(f"{what} is not valid base64") from exc


def add_aibot_routes(app: FastAPI, fake: FakeWeCom) -> None:
    """The long connection (``WS /``) and its control API.

    ``POST /_fake/aibot/message`` (PersonMessage), ``/event`` (PersonEvent), ``/click`` (CardClick) push frames and
    answer the AibotEvent pushed (``req_id``, ``msgid``, ``frame``); 409 when the bot has no link. ``POST /kick`` and
    ``/drop`` (LinkAction) end the bot's link; ``POST /fail`` (AibotFailRequest) injects errcodes. ``GET /status``
    (``?bot_id=&wait=connected|disconnected&timeout=``), ``/events`` and ``/frames`` (``?since_seq=&wait=N&timeout=``,
    long polls), ``/cards/{task_id}`` (CardState), ``/media/{id}`` (the encrypted bytes a callback's URL names).
    """
    hub = fake.aibot

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        # An AibotError (a request to play a person that cannot happen): every control route answers it this way.
        return JSONResponse({"detail": str(exc)}, status_code=getattr(exc, "status_code", 422))

    app.add_exception_handler(AibotError, refused)

    @app.websocket("/")
    async def long_connection(websocket: WebSocket) -> None:
        await hub.serve(websocket)

    @app.post("/_fake/aibot/message", response_model=None)
    async def control_message(body: PersonMessage, request: Request) -> AibotEvent:
        images = [_decode(data, "image_base64") for data in body.image_base64]
        file = None
        if body.file_base64 is not None or body.file_name is not None:
            if body.file_base64 is None or body.file_name is None:
                raise AibotError("a file needs both file_name and file_base64")
            file = (body.file_name, _decode(body.file_base64, "file_base64"))
        # The body's fields are push_message's keywords, but for the encoded file and images decoded here.
        fields = body.model_dump(exclude={"image_base64", "file_name", "file_base64"})
        base_url = fake.config.public_url or str(request.base_url)
        return await hub.push_message(**fields, images=images, file=file, base_url=base_url)

    @app.post("/_fake/aibot/event", response_model=None)
    async def control_event(body: PersonEvent) -> AibotEvent:
        return await hub.push_event(**body.model_dump())

    @app.post("/_fake/aibot/click", response_model=None)
    async def control_click(body: CardClick) -> AibotEvent:
        return await hub.click(**body.model_dump())

    @app.post("/_fake/aibot/kick", response_model=None)
    async def control_kick(body: LinkAction) -> dict[str, Any]:
        return {"kicked": await hub.kick(body.bot_id)}

    @app.post("/_fake/aibot/drop", response_model=None)
    async def control_drop(body: LinkAction) -> dict[str, Any]:
        return {"dropped": await hub.drop(body.bot_id, body.code)}

    @app.post("/_fake/aibot/fail")
    async def control_fail(body: AibotFailRequest) -> dict[str, Any]:
        hub.fail_next(*body.errcodes, cmd=body.cmd)
        return {"pending": hub.pending_failures}

    @app.get("/_fake/aibot/status", response_model=None)
    async def control_status(
        bot_id: str | None = None,
        wait: Literal["connected", "disconnected"] | None = None,
        wait_timeout: PollTimeout = 10.0,
    ) -> dict[str, Any]:
        timed_out = False
        if wait is not None:
            try:
                await hub.wait_connected(bot_id, wait_timeout, connected=wait == "connected")
            except TimeoutError:
                timed_out = True
        return {"bots": [s.model_dump() for s in hub.status()], "timed_out": timed_out}

    @app.get("/_fake/aibot/events")
    async def control_events(since_seq: int = 0, wait: int = 0, wait_timeout: PollTimeout = 10.0) -> dict[str, Any]:
        timed_out = await long_poll(wait, lambda: hub.wait_for_events(wait, wait_timeout, since_seq=since_seq))
        return {"events": [e.model_dump() for e in hub.get_events(since_seq)], "timed_out": timed_out}

    @app.get("/_fake/aibot/frames")
    async def control_frames(since_seq: int = 0, wait: int = 0, wait_timeout: PollTimeout = 10.0) -> dict[str, Any]:
        timed_out = await long_poll(wait, lambda: hub.wait_for_frames(wait, wait_timeout, since_seq=since_seq))
        return {"frames": [f.model_dump() for f in hub.get_frames(since_seq)], "timed_out": timed_out}

    @app.get("/_fake/aibot/cards/{task_id}", response_model=None)
    async def control_card(task_id: str, bot_id: str | None = None) -> CardState:
        return hub.card(task_id, bot_id)

    @app.get("/_fake/aibot/media/{media_id}", response_model=None)
    async def control_media(media_id: str) -> Response:
        found = hub.media(media_id)
        if found is None:
            return JSONResponse({"detail": "unknown or expired media URL (they live a few minutes)"}, status_code=404)
        data, filename = found
        headers = {"Cache-Control": "no-store"}
        if filename:
            headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{url_quote(filename, safe='')}"
        return Response(data, media_type="application/octet-stream", headers=headers)
