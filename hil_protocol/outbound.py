"""What the HIL Server says in a chat, whichever channel carries it (the robot webhook, a DevCloud Worker, the AI
bot). Channels turn these into their own wire formats; the relay frames map to and from them at the socket."""

from __future__ import annotations

from dataclasses import dataclass

from .messages import format_header


@dataclass(frozen=True)
class Question:
    """A message for a person. With a `short_id` it is a question that waits for an answer and every part of it
    carries the `[#short_id project]` header; without one it is a plain message (`wait_reply=false`)."""

    message: str
    chat_id: str | None = None
    chat_type: str = "group"
    short_id: str | None = None
    project_name: str | None = None
    images: tuple[str, ...] = ()
    mention_list: tuple[str, ...] = ()

    @property
    def header(self) -> str:
        """What every part starts with: `[#short_id project]`, `[project]` for a plain message, or nothing."""
        if self.short_id:
            return format_header(self.short_id, self.project_name)
        return f"[{self.project_name}]" if self.project_name else ""


@dataclass(frozen=True)
class Notice:
    """Something the robot says on its own: a hint, a notice about a question. `kind` names it for metrics and
    logs; `reply_to` is the channel's reference to the message it answers (the AI bot replies to a callback)."""

    chat_id: str | None
    text: str
    markdown: bool = True
    kind: str = "notice"
    reply_to: str | None = None


@dataclass(frozen=True)
class SendReceipt:
    """What a channel did to deliver a question."""

    parts: int = 1
    images: int = 0
    retries: int = 0
