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
    # A typed answer: the options a person picks from (buttons on the AI bot, numbered lines in text), whether free
    # text is still an answer, who may answer (WeCom userids; empty: anyone in the chat), and for an approval how
    # many different people must approve.
    options: tuple[str, ...] = ()
    allow_text: bool = True
    responders: tuple[str, ...] = ()
    approvals_required: int = 0
    # A stable id for the question's card (the AI bot's task_id; the session id), so a click finds its question.
    card_id: str | None = None
    # With options: the person may pick several (a vote card on the AI bot, "1 3" in text).
    multi_select: bool = False
    # When the question stops waiting (epoch seconds): a channel that queues must not deliver it later than this.
    expires_at: float | None = None

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
class CardUpdate:
    """Replace a question's card after a click (the AI bot allows it within 5 s of the click, answering it):
    `text` says what was decided and by whom; the buttons are gone."""

    card_id: str
    reply_to: str
    title: str
    text: str


@dataclass(frozen=True)
class SendReceipt:
    """What a channel did to deliver a question."""

    parts: int = 1
    images: int = 0
    retries: int = 0
