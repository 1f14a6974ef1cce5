"""Sessions, replies and the HTTP API's request/response bodies."""

from __future__ import annotations

import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hil_protocol.messages import SESSION_REF_RE, utf8_len

# A message splits into parts of ~2 KB; 20 KB keeps a question within ~10 parts.
MESSAGE_MAX_BYTES = 20 * 1024
PROJECT_MAX_CHARS = 64
MAX_IMAGES = 5
TIMEOUT_MAX = 7 * 24 * 3600
CHAT_ID_RE = re.compile(r"[A-Za-z0-9_@.:=+/-]{1,128}")  # fullmatch only

# `sending` until the channel accepted the question (a person may not have seen it yet); polls show it as waiting.
SessionStatus = Literal["sending", "waiting", "replied", "timeout", "failed"]


def is_session_ref(value: str) -> bool:
    """A session_id (32 hex) or short id (8 hex), lowercase, nothing else (no trailing newline)."""
    return SESSION_REF_RE.fullmatch(value) is not None


class UserInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    userid: str = ""
    name: str = ""
    alias: str = ""


class Reply(BaseModel):
    msg_type: Literal["text", "image", "mixed"]
    content: str = ""
    image_url: str | None = None
    images: list[str] = Field(default_factory=list)
    from_user: UserInfo = Field(default_factory=UserInfo)
    timestamp: float = Field(default_factory=time.time)
    msgid: str | None = None
    matched_by: Literal["quote", "only_waiting", "late"] = "quote"
    # where the answer was given (always the question's own chat; recorded for questions sent without a chat_id)
    chat_id: str | None = None
    chat_type: str | None = None


class Session(BaseModel):
    session_id: str
    short_id: str
    chat_id: str | None = None
    chat_type: str = "group"
    project_name: str | None = None
    message: str
    status: SessionStatus = "waiting"
    created_at: float = Field(default_factory=time.time)
    deadline: float
    closed_at: float | None = None
    replies: list[Reply] = Field(default_factory=list)
    error: str | None = None
    owner: str | None = None  # the API token's name that created it, when tokens are configured


def _check_chat_id(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if not CHAT_ID_RE.fullmatch(value):
        raise ValueError("chat_id must be 1-128 letters, digits or _@.:=+/- (as WeCom shows it in the chat-id hint)")
    return value


class SendRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message: str = Field(description="The question. At most 20 KB of UTF-8 (about 10 WeCom messages).")
    chat_id: str | None = None
    chat_type: Literal["group", "single"] = "group"
    images: list[str] = Field(default_factory=list, description="data URLs or http(s) URLs of JPG/PNG images")
    mention_list: list[str] | None = None
    project_name: str | None = None
    timeout: float | None = Field(default=None, description="seconds the session waits for a reply")
    wait_reply: bool = True

    @field_validator("message")
    @classmethod
    def _message(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("message is empty")
        if utf8_len(value) > MESSAGE_MAX_BYTES:
            raise ValueError(f"message is {utf8_len(value)} bytes; the limit is {MESSAGE_MAX_BYTES} bytes (UTF-8)")
        return value

    @field_validator("chat_id")
    @classmethod
    def _chat_id(cls, value: str | None) -> str | None:
        return _check_chat_id(value)

    @field_validator("project_name")
    @classmethod
    def _project(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if len(value) > PROJECT_MAX_CHARS:
            raise ValueError(f"project_name is longer than {PROJECT_MAX_CHARS} characters")
        if any(ch in value for ch in "[]\n\r\t") or not value.isprintable():
            raise ValueError("project_name may not contain brackets, line breaks or control characters")
        return value or None

    @field_validator("images")
    @classmethod
    def _images(cls, value: list[str]) -> list[str]:
        if len(value) > MAX_IMAGES:
            raise ValueError(f"at most {MAX_IMAGES} images per message")
        for src in value:
            if not src.startswith(("data:image/", "http://", "https://")):
                raise ValueError("each image must be a data:image/... URL or an http(s) URL")
            if len(src) > 3 * 1024 * 1024:
                raise ValueError("an image is larger than WeCom's 2 MB limit")
        return value

    @field_validator("mention_list")
    @classmethod
    def _mentions(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(value) > 50 or any(len(m) > 64 or not m for m in value)):
            raise ValueError("mention_list takes at most 50 userids of at most 64 characters")
        for mention in value or []:
            try:
                mention.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("mention_list holds text that is not valid Unicode (a lone surrogate)") from None
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float | None) -> float | None:
        if value is not None and not (1 <= value <= TIMEOUT_MAX):
            raise ValueError(f"timeout must be between 1 and {TIMEOUT_MAX} seconds")
        return value


class SendResponse(BaseModel):
    success: bool
    session_id: str | None = None
    short_id: str | None = None
    message: str
    error: str | None = None
    errcode: int | None = None


class PollResponse(BaseModel):
    session_id: str
    status: Literal["waiting", "replied", "timeout", "failed", "not_found"]
    has_reply: bool
    replies: list[Reply] = Field(default_factory=list)
    message: str
    short_id: str | None = None
