"""What the tools need from a HIL Server, whichever way they reach it: the `Backend` protocol, the models it speaks
and its one error type.

Two backends implement it: `client.HilClient` over the HIL Server's HTTP API (hil-mcp on stdio, on the agent's
machine) and `hil_server.mcp_endpoint.ServiceBackend`, which calls the service in-process (the server's `/mcp`)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from hil_protocol.api_models import Approval, Choice, Person, PollStatus
from hil_protocol.messages import SESSION_REF_RE


def session_ref(text: str) -> str:
    """The id in `text` ("1a2b3c4d", "#1a2b3c4d" or a 32-character session id). Raises ValueError otherwise."""
    ref = text.strip().removeprefix("#")
    if not SESSION_REF_RE.fullmatch(ref):
        raise ValueError(
            "session_id must be the session_id from an earlier result (32 lowercase hex characters) or the "
            "8-character id shown in the chat, e.g. #1a2b3c4d"
        )
    return ref


class BackendError(Exception):
    """The HIL Server could not be reached or refused the request; `str()` says what to do."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class Reply(BaseModel):
    """One message from the person. Fields the server adds later (who answered, a choice) pass through."""

    model_config = ConfigDict(extra="allow")
    msg_type: str = Field(default="text", description="text, image or mixed")
    content: str = ""
    image_url: str | None = None
    images: list[str] = Field(default_factory=list)
    from_user: Person = Field(default_factory=Person)
    timestamp: float | None = None


class Outgoing(BaseModel):
    """A question (`wait_reply`) or a notice, as `POST /api/send` takes it. None: left out (the server's default)."""

    message: str
    chat_id: str | None = None
    project_name: str | None = None
    images: list[str] = Field(default_factory=list)
    wait_reply: bool = True
    timeout: float | None = None
    options: list[str] | None = None
    allow_text: bool | None = None
    multi_select: bool | None = None
    responders: list[str] | None = None
    approvals_required: int | None = None


class Sent(BaseModel):
    model_config = ConfigDict(extra="ignore")
    success: bool
    session_id: str | None = None
    short_id: str | None = None
    message: str = ""
    error: str | None = None


class Polled(BaseModel):
    model_config = ConfigDict(extra="ignore")
    session_id: str
    status: PollStatus
    replies: list[Reply] = Field(default_factory=list)
    message: str = ""
    short_id: str | None = None
    choice: Choice | None = None
    choices: list[Choice] = Field(default_factory=list)
    approval: Approval | None = None


class QuestionRef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    session_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    short_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{8}$")
    project_name: str | None = None
    message: str | None = None


class Backend(Protocol):
    async def send(self, outgoing: Outgoing) -> Sent: ...

    async def poll(self, ref: str, wait: float) -> Polled:
        """The session's state; with `wait` > 0 held until a reply arrives or `wait` seconds pass."""
        ...

    async def mark_timeout(self, ref: str) -> None:
        """The agent stopped waiting: the question stays open and a later answer is kept."""
        ...

    async def upload_image(self, path: Path) -> str:
        """A local image file as something `Outgoing.images` takes (a data URL)."""
        ...

    async def open_questions(self) -> list[QuestionRef] | None:
        """The open questions of the caller's lane (waiting, or the agent stopped waiting), oldest first, as the
        server knows them; None when the backend keeps no lanes and the caller's own memory is the lane (stdio)."""
        ...


__all__ = [
    "SESSION_REF_RE",
    "Approval",
    "Backend",
    "BackendError",
    "Choice",
    "Outgoing",
    "Person",
    "Polled",
    "QuestionRef",
    "Reply",
    "Sent",
    "session_ref",
]
