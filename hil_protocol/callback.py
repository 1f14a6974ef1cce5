"""The robot callback: fly-pigeon JSON (and WeCom's decrypted payload in the same shape) -> one incoming message."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .api_models import Person
from .messages import parse_reply_text


class CallbackError(ValueError):
    """The body is not a robot callback we can read."""


class _Loose(BaseModel):
    # Callbacks carry fields we don't use (and WeCom adds new ones); keep them instead of refusing the message.
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class CallbackText(_Loose):
    content: str = ""


class CallbackImage(_Loose):
    image_url: str = ""


class _Parts(_Loose):
    # What a message holds: a callback and each item of a mixed message carry their text and image alike.
    text: CallbackText | None = None
    image: CallbackImage | None = None


class CallbackMsgItem(_Parts):
    msg_type: str = Field(default="text", alias="msg_type")


class CallbackMixed(_Loose):
    msg_item: list[CallbackMsgItem] = Field(default_factory=list)


class CallbackEvent(_Loose):
    event_type: str = ""


class RobotCallback(_Parts):
    """The robot callback body as fly-pigeon's relay POSTs it (snake_case JSON names)."""

    msgid: str | None = None
    chatid: str = Field(min_length=1, max_length=256)
    chattype: str = "group"
    msgtype: str = Field(min_length=1, max_length=32)
    from_: Person = Field(default_factory=Person, alias="from")
    webhook_url: str | None = None
    get_chat_info_url: str | None = None
    mixed_message: CallbackMixed | None = None
    event: CallbackEvent | None = None


class CardClick(BaseModel):
    """A button pressed on a card the bot sent (the AI bot's template_card_event)."""

    task_id: str
    key: str
    # a vote / multiple card's submit: the option ids ticked (a button card: None)
    selected: list[str] | None = None


class IncomingMessage(BaseModel):
    """What a person sent to the robot, ready for matching."""

    msgid: str | None
    chat_id: str
    chat_type: str
    msg_type: Literal["text", "image", "mixed", "event", "other"]
    answer: str = ""
    image_urls: list[str] = Field(default_factory=list)
    quoted_short_id: str | None = None
    from_user: Person = Field(default_factory=Person)
    event_type: str | None = None
    received_at: float = Field(default_factory=time.time)
    # the channel's reference to this message, for answering it (the AI bot replies to a callback's req_id)
    reply_to: str | None = None
    card: CardClick | None = None

    @property
    def is_event(self) -> bool:
        return self.msg_type in ("event", "other")


def parse_callback(data: Any) -> IncomingMessage:
    """Validate a robot callback (a dict from JSON) and take the quote-reply apart. Raises CallbackError."""
    if not isinstance(data, dict):
        raise CallbackError("callback body must be a JSON object")
    _check_text(data)
    try:
        cb = RobotCallback.model_validate(data)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in err["loc"]) for err in exc.errors())
        raise CallbackError(f"not a robot callback: missing or invalid {fields}") from exc
    return to_incoming(cb)


def _check_text(data: dict[str, Any]) -> None:
    # JSON's "\ud800" escapes decode to lone surrogates, which no UTF-8 store, log or WeCom request can carry;
    # refused here so every path (direct, encrypted, relayed by a worker) stops them before the session store.
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise CallbackError("callback contains text that is not valid Unicode (a lone surrogate)") from None
    except (RecursionError, ValueError, TypeError):
        raise CallbackError("callback is nested too deeply or holds values JSON cannot carry") from None


def to_incoming(cb: RobotCallback) -> IncomingMessage:
    base: dict[str, Any] = {"msgid": cb.msgid, "chat_id": cb.chatid, "chat_type": cb.chattype, "from_user": cb.from_}
    msgtype = cb.msgtype.lower()
    if msgtype == "text":
        parsed = parse_reply_text(cb.text.content if cb.text else "")
        return IncomingMessage(**base, msg_type="text", answer=parsed.answer, quoted_short_id=parsed.quoted_short_id)
    if msgtype == "image":
        urls = [cb.image.image_url] if cb.image and cb.image.image_url else []
        return IncomingMessage(**base, msg_type="image", image_urls=urls)
    if msgtype == "mixed":
        texts: list[str] = []
        urls = []
        quoted: str | None = None
        for item in cb.mixed_message.msg_item if cb.mixed_message else []:
            if item.msg_type == "text" and item.text is not None:
                if not texts:
                    # The quote, if any, is in the first text item.
                    parsed = parse_reply_text(item.text.content)
                    quoted = parsed.quoted_short_id
                    texts.append(parsed.answer)
                else:
                    texts.append(item.text.content.strip())
            elif item.msg_type == "image" and item.image is not None and item.image.image_url:
                urls.append(item.image.image_url)
        return IncomingMessage(
            **base, msg_type="mixed", answer="\n".join(t for t in texts if t), image_urls=urls, quoted_short_id=quoted
        )
    if msgtype == "event":
        return IncomingMessage(**base, msg_type="event", event_type=cb.event.event_type if cb.event else None)
    return IncomingMessage(**base, msg_type="other")
