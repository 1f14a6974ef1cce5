"""Sessions, replies and the HTTP API's request/response bodies (the shapes inside them, shared with hil-mcp, are in
hil_protocol.api_models)."""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

from hil_protocol.api_models import Approval, Choice, Person, PollStatus
from hil_protocol.images import check_image_source
from hil_protocol.messages import SESSION_REF_RE, utf8_len

from .choices import check_options

# A message splits into parts of ~2 KB; 20 KB keeps a question within ~10 parts.
MESSAGE_MAX_BYTES = 20 * 1024
PROJECT_MAX_CHARS = 64
MAX_IMAGES = 5
TIMEOUT_MAX = 7 * 24 * 3600
UNCLEAR_KEPT = 20
CHAT_ID_RE = re.compile(r"[A-Za-z0-9_@.:=+/-]{1,128}")  # fullmatch only
USERID_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")

# `sending` until the channel accepted the question (a person may not have seen it yet); polls show it as waiting.
SessionStatus = Literal["sending", "waiting", "replied", "timeout", "failed"]


def is_session_ref(value: str) -> bool:
    """A session_id (32 hex) or short id (8 hex), lowercase, nothing else (no trailing newline)."""
    return SESSION_REF_RE.fullmatch(value) is not None


class Reply(BaseModel):
    msg_type: Literal["text", "image", "mixed"]
    content: str = ""
    images: list[str] = Field(default_factory=list)
    from_user: Person = Field(default_factory=Person)
    timestamp: float = Field(default_factory=time.time)
    msgid: str | None = None
    matched_by: Literal["quote", "only_waiting", "late", "button"] = "quote"
    # where the answer was given (always the question's own chat; recorded for questions sent without a chat_id)
    chat_id: str | None = None
    chat_type: str | None = None
    # for a question with options: what they chose
    choice: Choice | None = None
    # a pick-several question: every option chosen (`choice` is the first); else [choice] or []
    choices: list[Choice] = Field(default_factory=list)
    via: Literal["text", "button"] = "text"

    # Derived, on the wire for clients (computed fields are dumped, and ignored when a stored session is read back).
    @computed_field  # type: ignore[prop-decorator]
    @property
    def image_url(self) -> str | None:
        """The first image (the seed's field; `images` has them all)."""
        return self.images[0] if self.images else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def answered_by(self) -> str:
        """Who answered: the WeCom userid, as `responders` names people."""
        return self.from_user.userid


class Refused(BaseModel):
    """An answer that was not taken: from someone not among the question's responders."""

    userid: str
    name: str = ""
    at: float
    text: str = ""


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
    # the /mcp session (Mcp-Session-Id) it was asked in: wait_for_reply() without an id stays in that lane
    mcp_session: str | None = None
    # an approval is a question with the options 批准 / 拒绝 that takes no free text
    options: list[str] = Field(default_factory=list)
    allow_text: bool = True
    multi_select: bool = False
    responders: list[str] = Field(default_factory=list)
    approvals_required: int = 0
    refused: list[Refused] = Field(default_factory=list)
    # replies to a question that takes no free text which decided nothing ("好的，先不要"): kept for the agent and
    # the record, never counted as an answer (newest UNCLEAR_KEPT)
    unclear: list[Reply] = Field(default_factory=list)


def distinct_responders(userids: Iterable[str]) -> list[str]:
    """Userids without blanks and repeats; WeCom userids ignore case, so "LISI" repeats "lisi" (the first kept)."""
    seen: dict[str, str] = {}
    for userid in userids:
        userid = userid.strip()
        if userid:
            seen.setdefault(userid.casefold(), userid)
    return list(seen.values())


def check_approvers(required: int, responders: list[str] | tuple[str, ...], who: str = "responders") -> None:
    """An approval needing more approvers than there are people who may answer can only be rejected or time out.
    No responders: anyone in the chat may answer, so any number is possible."""
    if responders and required > len(responders):
        raise ValueError(
            f"approvals_required is {required} but {who} name only {len(responders)} distinct "
            f"{'person' if len(responders) == 1 else 'people'}: ask for at most {len(responders)} approvals "
            "or name more responders"
        )


# Invisible characters a project name may keep: they join emoji ("👨‍💻") and shape scripts. Every other format
# character (bidi overrides such as U+202E, zero-width spaces, tag characters) could make the header in the chat say
# something other than what it is, so it is refused.
_JOINERS = frozenset("\u200c\u200d")
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def project_name_problem(value: str) -> str | None:
    """Why `value` cannot be a project name (the first character refused, named exactly), or None. Any printable
    text is fine except `[` and `]` (they end the `[#id project]` header) and line breaks."""
    for ch in value:
        code = f"U+{ord(ch):04X}"
        if ch in "[]":
            return f"project_name may not contain {ch!r} ({code}): brackets end the [#id project] header"
        if ch in _LINE_BREAKS:
            return f"project_name may not contain a line break ({code})"
        category = unicodedata.category(ch)
        if ch in _JOINERS or category[0] != "C":
            continue
        name = unicodedata.name(ch, "")
        kind = {"Cc": "a control character", "Cf": "an invisible format character"}.get(
            category, "an unassigned or private-use code point"
        )
        return f"project_name may not contain {code}{' ' + name if name else ''} ({kind})"
    return None


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
    options: list[str] | None = Field(
        default=None, description="1–20 short labels the person picks from (buttons on the AI bot, numbers in text)"
    )
    allow_text: bool = Field(default=True, description="with options: whether a free-text answer is still taken")
    multi_select: bool = Field(
        default=False, description="with options: the person may pick several (a vote card, or 回复 1 3)"
    )
    responders: list[str] | None = Field(
        default=None, description="WeCom userids allowed to answer (empty: anyone in the chat; HIL_DEFAULT_RESPONDERS)"
    )
    approvals_required: int | None = Field(
        default=None,
        ge=1,
        le=10,
        description="makes this an approval (批准/拒绝): how many different responders must approve; one 拒绝 decides",
    )

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
        problem = project_name_problem(value)
        if problem:
            raise ValueError(problem)
        return value or None

    @field_validator("images")
    @classmethod
    def _images(cls, value: list[str]) -> list[str]:
        # Everything the sender would refuse about a source is refused here, before anything is stored or sent.
        if len(value) > MAX_IMAGES:
            raise ValueError(f"at most {MAX_IMAGES} images per message")
        return [check_image_source(src) for src in value]

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

    @field_validator("options")
    @classmethod
    def _options(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_options(value)

    @field_validator("responders")
    @classmethod
    def _responders(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        cleaned = distinct_responders(value)
        if len(cleaned) > 50 or any(not USERID_RE.fullmatch(v) for v in cleaned):
            raise ValueError("responders takes at most 50 WeCom userids (letters, digits, _ - . @)")
        return cleaned

    @model_validator(mode="after")
    def _approval(self) -> SendRequest:
        if self.approvals_required is not None:
            if self.options:
                raise ValueError("an approval has its own options (批准 / 拒绝): leave options out")
            check_approvers(self.approvals_required, self.responders or [])
        if self.multi_select and not self.options:
            raise ValueError("multi_select needs options: the labels the person picks several of")
        return self

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
    status: PollStatus
    has_reply: bool
    replies: list[Reply] = Field(default_factory=list)
    message: str
    short_id: str | None = None
    choice: Choice | None = None  # with options: what the deciding reply chose
    choices: list[Choice] = Field(default_factory=list)  # pick-several: every option the deciding reply chose
    approval: Approval | None = None  # for an approval: where it stands
    unclear: list[Reply] = Field(default_factory=list)  # replies that decided nothing (not answers)
