"""The WeCom AI bot (智能机器人) long connection, as data: its frames, what a person's callback means for matching,
and the encrypted media a callback points to.

Every frame is JSON `{"cmd", "headers": {"req_id"}, "body"}`; WeCom's answer to a frame we sent has no cmd and
carries `errcode`/`errmsg` under our req_id. A person's message arrives as `aibot_msg_callback`, an event (a single
chat opened, a card's button clicked, another connection taking the bot over) as `aibot_event_callback`. The
protocol facts and their sources are listed in `hil_sandbox/fake_aibot.py`; WECOM.md has the summary.

Nothing here does I/O but `fetch_media`; the connection itself is the HIL Server's (`hil_server.channels.aibot`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .api_models import Person
from .callback import CallbackError, CardClick, IncomingMessage
from .images import image_kind, read_capped
from .messages import HEADER_RE, parse_reply_text
from .wecom_robot import ERR_NETWORK, WeComError

CMD_SUBSCRIBE = "aibot_subscribe"
CMD_PING = "ping"
CMD_SEND = "aibot_send_msg"
CMD_RESPOND = "aibot_respond_msg"
CMD_WELCOME = "aibot_respond_welcome_msg"
CMD_UPDATE = "aibot_respond_update_msg"
CMD_UPLOAD_INIT = "aibot_upload_media_init"
CMD_UPLOAD_CHUNK = "aibot_upload_media_chunk"
CMD_UPLOAD_FINISH = "aibot_upload_media_finish"
CMD_MSG_CALLBACK = "aibot_msg_callback"
CMD_EVENT_CALLBACK = "aibot_event_callback"

EVENT_ENTER_CHAT = "enter_chat"
EVENT_CARD = "template_card_event"
EVENT_DISCONNECTED = "disconnected_event"

ERR_INVALID_CREDENTIALS = 853000
ERR_INVALID_REQ_ID = 846605  # an answer to a callback that is too old, or not one that kind of answer fits
ERR_STREAM_EXPIRED = 846608
# ours, shared with the robot webhook's codes: the frame never reached WeCom, or its answer never came back;
# a question the AI bot cannot carry (images) fails with wecom_robot.ERR_UNSUPPORTED
ERR_NO_LINK = ERR_NETWORK

# A frame we read: WeCom's are a few KB (media come as URLs), so this is generous; larger ones are refused as frames,
# and the link stays up.
FRAME_MAX_BYTES = 1024 * 1024
REQ_ID_MAX_CHARS = 256
# Button keys and task ids, as WeCom limits them.
TASK_ID_MAX_BYTES = 128
MEDIA_BLOCK_BYTES = 32  # WeCom pads media to 32-byte blocks (PKCS#7), like its callbacks

FILE_ANSWER = "[文件] 对方发送了一个文件（文件内容不会转交给 AI）"


class FrameError(ValueError):
    """Text on the link that is not a frame we can read (bad JSON, too large, no req_id)."""


class AibotError(WeComError):
    """A frame we sent was not taken: WeCom answered an errcode, or the link could not carry it. `str()` is a
    sentence for a person; `errcode` is WeCom's, or one of ours (negative)."""

    def describe(self) -> str:
        if self.errcode < 0:
            return f"{self.errmsg}。{self.hint}" if self.hint else self.errmsg
        text = f"企业微信拒绝了智能机器人的消息（errcode {self.errcode}: {self.errmsg}）"
        return f"{text}。{self.hint}" if self.hint else text


def error_for(errcode: int, errmsg: str) -> AibotError:
    """WeCom's answer errcode -> a typed error with words a person can act on."""
    hints = {
        ERR_INVALID_CREDENTIALS: "请检查 WECOM_AIBOT_ID 和 WECOM_AIBOT_SECRET（管理后台 → 智能机器人 → API 模式）",
        ERR_INVALID_REQ_ID: "回复的时机已过（欢迎语和卡片更新须在 5 秒内）或不是对应的回调",
        93006: "chat_id 无效：群聊请用 chat_id 提示里的 chatid，单聊请用对方的 userid",
        45009: "发送过于频繁，超过了企业微信对智能机器人的频率限制，请稍后再试",
        40058: "消息格式或长度不被企业微信接受",
    }
    return AibotError(errcode, errmsg, hints.get(errcode, ""))


# --- frames -------------------------------------------------------------------------------------------------------


class _Wire(BaseModel):
    # WeCom adds fields over time; keep what we do not know instead of refusing the frame.
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class FrameHeaders(_Wire):
    req_id: str = Field(min_length=1, max_length=REQ_ID_MAX_CHARS)


class Frame(_Wire):
    """One frame on the link. Without `cmd` it is WeCom's answer to the frame we sent under `headers.req_id`."""

    cmd: str | None = Field(default=None, max_length=64)
    headers: FrameHeaders
    body: Any = None
    errcode: int | None = None
    errmsg: str = ""

    @property
    def req_id(self) -> str:
        return self.headers.req_id

    @property
    def is_answer(self) -> bool:
        return self.cmd is None


def parse_frame(raw: str | bytes) -> Frame:
    """One text from the link -> Frame; FrameError for anything else (it never ends the link)."""
    size = len(raw.encode("utf-8", "surrogatepass")) if isinstance(raw, str) else len(raw)
    if size > FRAME_MAX_BYTES:
        raise FrameError(f"frame of {size} bytes, larger than {FRAME_MAX_BYTES}")
    try:
        # pydantic's JSON parser refuses lone surrogates and nesting past its recursion limit.
        return Frame.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in error["loc"]) or "frame"
        raise FrameError(f"not an AI-bot frame: {where}: {error['msg']}") from None


def new_req_id(cmd: str) -> str:
    """A req_id for a frame we send. WeCom's SDKs prefix it with the cmd; answers are matched by the whole id."""
    return f"{cmd}_{uuid.uuid4().hex}"


def dump_frame(cmd: str, req_id: str, body: dict[str, Any] | None = None) -> str:
    frame: dict[str, Any] = {"cmd": cmd, "headers": {"req_id": req_id}}
    if body is not None:
        frame["body"] = body
    return json.dumps(frame, ensure_ascii=False)


# --- callbacks ----------------------------------------------------------------------------------------------------


class AibotText(_Wire):
    content: str = ""


class AibotMedia(_Wire):
    """An image or file: a URL valid for a few minutes, and the per-message AES key that decrypts what it serves."""

    url: str = Field(default="", max_length=4096)
    aeskey: str = Field(default="", max_length=128)


class _Parts(_Wire):
    # What a message holds: a callback and each item of a mixed message carry their text and image alike.
    text: AibotText | None = None
    image: AibotMedia | None = None


class AibotMixedItem(_Parts):
    msgtype: str = ""


class AibotMixed(_Wire):
    msg_item: list[AibotMixedItem] = Field(default_factory=list, max_length=50)


class AibotQuote(_Wire):
    """The message a person quoted (引用): for the bot's own question, its markdown (or a card's title)."""

    msgtype: str = ""
    text: AibotText | None = None
    mixed: AibotMixed | None = None
    voice: AibotText | None = None


class AibotUser(_Wire):
    userid: str = Field(min_length=1, max_length=128)


class AibotOptionIds(_Wire):
    option_id: list[str] = Field(default_factory=list, max_length=20)


class AibotSelectedItem(_Wire):
    question_key: str = Field(default="", max_length=1024)
    option_ids: AibotOptionIds = Field(default_factory=AibotOptionIds)


class AibotSelectedItems(_Wire):
    selected_item: list[AibotSelectedItem] = Field(default_factory=list, max_length=3)


class AibotCardEvent(_Wire):
    """A click: `event_key` is the button's key (a vote card's submit key); a vote card's ticks are in
    `selected_items.selected_item[].option_ids.option_id[]` (the sources are in hil_sandbox/fake_aibot.py)."""

    task_id: str = Field(min_length=1, max_length=TASK_ID_MAX_BYTES)
    event_key: str = Field(default="", max_length=1024)
    card_type: str | None = None
    selected_items: AibotSelectedItems | None = None

    def selected(self) -> list[str] | None:
        """The option ids ticked on a vote card, or None for a click on a button."""
        if self.selected_items is None:
            return None
        return [option for item in self.selected_items.selected_item for option in item.option_ids.option_id]


class AibotEventPart(_Wire):
    eventtype: str = Field(min_length=1, max_length=64)
    template_card_event: AibotCardEvent | None = None


class CallbackBody(_Parts):
    """What `aibot_msg_callback` and `aibot_event_callback` carry. `chatid` is sent for group chats only: in a
    single chat the chat is the person, and messages to it go to their userid."""

    msgid: str = Field(min_length=1, max_length=256)
    aibotid: str | None = None
    chatid: str | None = Field(default=None, max_length=256)
    chattype: Literal["single", "group"] = "single"
    from_: AibotUser = Field(alias="from")
    msgtype: str = Field(min_length=1, max_length=32)
    mixed: AibotMixed | None = None
    voice: AibotText | None = None
    file: AibotMedia | None = None
    quote: AibotQuote | None = None
    event: AibotEventPart | None = None


@dataclass(frozen=True)
class MediaRef:
    url: str
    aeskey: str


@dataclass(frozen=True)
class Inbound:
    """A callback read for matching. `images` still have to be downloaded and decrypted (`fetch_media`) and added
    to `message.image_urls` as data URLs."""

    message: IncomingMessage
    images: list[MediaRef] = field(default_factory=list)
    kind: str = ""  # msgtype of a message, eventtype of an event: how a notice may answer it


def is_takeover(frame: Frame) -> bool:
    """WeCom's word that another connection subscribed this bot: ours is about to be closed."""
    if frame.cmd != CMD_EVENT_CALLBACK or not isinstance(frame.body, dict):
        return False
    event = frame.body.get("event")
    return isinstance(event, dict) and event.get("eventtype") == EVENT_DISCONNECTED


def read_callback(frame: Frame, bot_id: str) -> Inbound | None:
    """A callback frame -> what the person sent or did, for matching; None for a callback with nothing to match
    (feedback on an answer, an event we do not use). Raises CallbackError for a body we cannot read, or one
    addressed to another bot."""
    if frame.cmd not in (CMD_MSG_CALLBACK, CMD_EVENT_CALLBACK):
        raise CallbackError(f"not a callback: cmd {frame.cmd!r}")
    if not isinstance(frame.body, dict):
        raise CallbackError("callback body must be a JSON object")
    try:
        body = CallbackBody.model_validate(frame.body)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in err["loc"]) for err in exc.errors(include_url=False))
        raise CallbackError(f"not an AI-bot callback: missing or invalid {fields}") from None
    if body.aibotid is not None and body.aibotid != bot_id:
        raise CallbackError(f"callback for another AI bot ({body.aibotid!r}), not ours")
    if body.chattype == "group":
        if not body.chatid:
            raise CallbackError("a group callback without chatid")
        chat_id = body.chatid
    else:
        chat_id = body.from_.userid
    base: dict[str, Any] = {
        "msgid": body.msgid,
        "chat_id": chat_id,
        "chat_type": body.chattype,
        "from_user": Person(userid=body.from_.userid),
        "reply_to": frame.req_id,
    }
    if frame.cmd == CMD_EVENT_CALLBACK:
        return _event(body, base)
    return _message(body, base)


def _event(body: CallbackBody, base: dict[str, Any]) -> Inbound | None:
    event = body.event
    if event is None:
        raise CallbackError("an event callback without event")
    if event.eventtype == EVENT_CARD:
        card = event.template_card_event
        if card is None:
            raise CallbackError("template_card_event without its task_id and event_key")
        click = CardClick(task_id=card.task_id, key=card.event_key, selected=card.selected())
        message = IncomingMessage(**base, msg_type="event", event_type=EVENT_CARD, card=click)
        return Inbound(message, kind=EVENT_CARD)
    if event.eventtype == EVENT_ENTER_CHAT:
        message = IncomingMessage(**base, msg_type="event", event_type=EVENT_ENTER_CHAT)
        return Inbound(message, kind=EVENT_ENTER_CHAT)
    return None  # feedback_event and events added later: nothing to answer or match


def _message(body: CallbackBody, base: dict[str, Any]) -> Inbound:
    group = body.chattype == "group"
    quoted = _quoted_short_id(body.quote)
    kind = body.msgtype.lower()
    if kind == "text":
        answer, inline = _answer(body.text.content if body.text else "", group)
        return _inbound(base, "text", answer, quoted or inline, [], kind)
    if kind == "voice":  # WeCom's transcript
        return _inbound(base, "text", (body.voice.content if body.voice else "").strip(), quoted, [], kind)
    if kind == "file":
        return _inbound(base, "text", FILE_ANSWER, quoted, [], kind)
    if kind == "image":
        images = [MediaRef(body.image.url, body.image.aeskey)] if body.image and body.image.url else []
        return _inbound(base, "image", "", quoted, images, kind)
    if kind == "mixed":
        texts: list[str] = []
        images = []
        for item in body.mixed.msg_item if body.mixed else []:
            if item.msgtype == "text" and item.text is not None:
                if texts:
                    texts.append(item.text.content.strip())
                else:  # the first text carries the @mention (and, from older clients, an inline quote)
                    answer, inline = _answer(item.text.content, group)
                    quoted = quoted or inline
                    texts.append(answer)
            elif item.msgtype == "image" and item.image is not None and item.image.url:
                images.append(MediaRef(item.image.url, item.image.aeskey))
        return _inbound(base, "mixed", "\n".join(t for t in texts if t), quoted, images, kind)
    message = IncomingMessage(**base, msg_type="other")  # a type WeCom added later: not an answer
    return Inbound(message, kind=kind)


def _inbound(
    base: dict[str, Any], msg_type: str, answer: str, quoted: str | None, images: list[MediaRef], kind: str
) -> Inbound:
    message = IncomingMessage(**base, msg_type=msg_type, answer=answer, quoted_short_id=quoted)  # type: ignore[arg-type]
    return Inbound(message, images, kind)


def _answer(content: str, group: bool) -> tuple[str, str | None]:
    """The person's words and, if they used the text quote format, the quoted short id. Only a group message
    starts with the bot's @mention; in a single chat a leading @word is the person's."""
    parsed = parse_reply_text(content)
    if group or parsed.quoted_short_id is not None:
        return parsed.answer, parsed.quoted_short_id
    return content.strip(), None


def quoted_text(quote: AibotQuote | None) -> str:
    if quote is None:
        return ""
    if quote.text is not None:
        return quote.text.content
    if quote.mixed is not None:
        first = next((item.text for item in quote.mixed.msg_item if item.text is not None), None)
        return first.content if first else ""
    if quote.voice is not None:
        return quote.voice.content
    return ""


def _quoted_short_id(quote: AibotQuote | None) -> str | None:
    """The question a quote names: the `[#short_id project]` header that starts each part of a question (and is
    a card's title). Only the first line counts, so a person's message that mentions a header is not a quote."""
    first_line = quoted_text(quote).lstrip().split("\n", 1)[0]
    match = HEADER_RE.search(first_line)
    return match.group("short_id") if match else None


# --- media ----------------------------------------------------------------------------------------------------------


class MediaError(ValueError):
    """An image or file a person sent that we could not get: the URL failed, it was too large, or it would not
    decrypt. `str()` is a sentence for the person's answer."""


def decode_aeskey(aeskey: str) -> bytes:
    """A callback's `aeskey`: base64 of 32 bytes, its padding possibly left off."""
    text = aeskey.strip()
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError("图片的解密密钥无效") from exc
    if len(key) != 32:
        raise MediaError("图片的解密密钥长度不对")
    return key


def decrypt_media(data: bytes, aeskey: str) -> bytes:
    """AES-256-CBC, IV = the key's first 16 bytes, PKCS#7 padding to 32-byte blocks: as WeCom encrypts media."""
    key = decode_aeskey(aeskey)
    if not data or len(data) % 16:
        raise MediaError("下载的图片数据不完整（长度不是 AES 块的整数倍）")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
    padded = decryptor.update(data) + decryptor.finalize()
    unpadder = padding.PKCS7(MEDIA_BLOCK_BYTES * 8).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as exc:
        raise MediaError("图片解密失败（密钥与数据不符，或数据被改动）") from exc


async def fetch_media(http: httpx.AsyncClient, ref: MediaRef, *, max_bytes: int, timeout: float) -> bytes:
    """Download a callback's media URL and decrypt it, within `timeout` seconds and `max_bytes` of ciphertext."""
    if not ref.url.startswith(("https://", "http://")):
        raise MediaError("图片地址不是 http(s) URL")
    try:
        async with (
            asyncio.timeout(timeout),
            http.stream("GET", ref.url, headers={"Accept-Encoding": "identity"}) as resp,
        ):
            if resp.status_code != 200:
                raise MediaError(f"下载图片失败：HTTP {resp.status_code}（链接只在几分钟内有效）")
            limit = f" {max_bytes / 1024 / 1024:.0f} MB "
            data = await read_capped(resp.aiter_raw(), resp.headers.get("content-length"), max_bytes, limit, MediaError)
    except TimeoutError as exc:
        raise MediaError(f"下载图片超时（{timeout:.3g} 秒）") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL is no HTTPError: a control character in the URL
        raise MediaError(f"下载图片失败（{type(exc).__name__}）") from exc
    return decrypt_media(data, ref.aeskey)


def image_data_url(data: bytes) -> str:
    """A decrypted image as a data URL; MediaError when it is not a picture we can name."""
    mime = {"png": "image/png", "jpg": "image/jpeg"}.get(image_kind(data) or "")
    if mime is None and data[:6] in (b"GIF87a", b"GIF89a"):
        mime = "image/gif"
    if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is None:
        raise MediaError("收到的图片格式无法识别")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
