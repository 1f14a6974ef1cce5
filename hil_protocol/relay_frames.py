"""Frames on the relay WebSocket between the HIL Server and the DevCloud Worker (JSON text frames).

The seed's frames are kept as they are, so a seed worker or server on the other end still works. New frames
(`hello`, `callback_ack`, `worker_status`) are only sent to a peer that announced it understands them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .outbound import Notice, Question

# Features a peer may announce in `hello`.
FEATURE_CALLBACK_ACK = "callback_ack"
FEATURE_WORKER_STATUS = "worker_status"


class _Frame(BaseModel):
    model_config = ConfigDict(extra="allow")


class Ping(_Frame):
    type: Literal["ping"] = "ping"


class Pong(_Frame):
    type: Literal["pong"] = "pong"


class Hello(_Frame):
    """Server -> worker right after the link opens: what this server understands (new)."""

    type: Literal["hello"] = "hello"
    features: list[str] = Field(default_factory=list)


class Request(_Frame):
    type: Literal["request"] = "request"
    id: str
    action: str
    payload: dict[str, Any] = Field(default_factory=dict)


class Response(_Frame):
    type: Literal["response"] = "response"
    id: str
    success: bool
    data: dict[str, Any] | None = None
    error: str | None = None
    errcode: int | None = None


class CallbackData(_Frame):
    callback_data: dict[str, Any]


class Callback(_Frame):
    """Worker -> server: a robot callback. `id` is new: the worker's spool id, acknowledged by `callback_ack`."""

    type: Literal["callback"] = "callback"
    event: str = "wecom_callback"
    data: CallbackData
    id: str | None = None


class CallbackAck(_Frame):
    """Server -> worker: the callback with this id is stored; the worker may drop it from its spool (new)."""

    type: Literal["callback_ack"] = "callback_ack"
    id: str


class WorkerStatus(_Frame):
    """Worker -> server, after a hello listing `worker_status` and whenever it changes: whether WeCom takes the
    worker's BOT_KEY (`bot_key_refused`: why not, or None), so the server's /health can say so (new)."""

    type: Literal["worker_status"] = "worker_status"
    bot_key_refused: str | None = None


Frame = Annotated[
    Ping | Pong | Hello | Request | Response | Callback | CallbackAck | WorkerStatus, Field(discriminator="type")
]
_frame_adapter: TypeAdapter[Frame] = TypeAdapter(Frame)


class FrameError(ValueError):
    pass


def parse_frame(text: str | bytes) -> Frame:
    """Parse one frame. Raises FrameError for malformed JSON, an unknown type or missing fields."""
    try:
        return _frame_adapter.validate_json(text)
    except ValidationError as exc:
        raise FrameError(f"bad relay frame: {exc.errors()[0]['msg']}") from exc


def dump_frame(frame: _Frame) -> str:
    return frame.model_dump_json(exclude_none=True)


# Request payloads (actions).
ACTION_SEND_MESSAGE = "send_message"
ACTION_SEND_HINT = "send_hint"
ACTION_UPLOAD_IMAGE = "upload_image"


class SendMessagePayload(BaseModel):
    """`send_message`: a question (or a plain message) on the wire. Seed workers read exactly these fields."""

    model_config = ConfigDict(extra="ignore")

    short_id: str | None = None
    message: str
    chat_id: str | None = None
    chat_type: str = "group"
    images: list[str] = Field(default_factory=list)
    project_name: str | None = None
    mention_list: list[str] | None = None

    # The payload's fields are the Question's of the same names; a question without mentions sends none (no []).

    @classmethod
    def of(cls, question: Question) -> SendMessagePayload:
        payload = cls.model_validate(question, from_attributes=True)
        payload.mention_list = payload.mention_list or None
        return payload

    def question(self) -> Question:
        fields = self.model_dump(exclude={"images", "mention_list"})
        return Question(**fields, images=tuple(self.images), mention_list=tuple(self.mention_list or ()))


class SendHintPayload(BaseModel):
    """`send_hint`: a notice on the wire."""

    model_config = ConfigDict(extra="ignore")

    chat_id: str | None = None
    message: str
    msg_type: Literal["markdown", "text"] = "markdown"

    @classmethod
    def of(cls, notice: Notice) -> SendHintPayload:
        return cls(chat_id=notice.chat_id, message=notice.text, msg_type="markdown" if notice.markdown else "text")

    def notice(self) -> Notice:
        return Notice(chat_id=self.chat_id, text=self.message, markdown=self.msg_type == "markdown")


class UploadImagePayload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str = Field(description="data URL, http(s) URL or bare base64")
    filename: str = "image.png"
