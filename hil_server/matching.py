"""Which question a person's message answers, decided without side effects: `decide()` reads the store and returns a
`Decision`; the service applies it (one write, one place).

Rules, in order:
1. A msgid already handled is a duplicate (WeCom's retries, a worker's replay).
2. Events and empty messages are not answers (a greeting with the chat id, or a hint).
3. A quote-reply names its question by the short id in the quoted header. It answers that question only in the
   question's own conversation; quoted in another chat it is not an answer, and that chat is told so.
4. A plain reply answers the only question waiting in its chat; with several waiting, the chat gets a list and is
   asked to quote; with none, the chat gets its chat id.

A question sent without a chat_id went to the robot's default delivery (its group chats), so it belongs to every
group chat of the robot and to no single chat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hil_protocol.callback import IncomingMessage
from hil_protocol.outbound import Notice

from . import hints
from .models import Session
from .store import SessionStore

Outcome = Literal[
    "matched_quote",
    "matched_only",
    "late",
    "duplicate",
    "hint_several",
    "hint_chat_id",
    "hint_unknown_quote",
    "hint_other_chat",
    "hint_empty",
    "event",
    "ignored",
]
MatchedBy = Literal["quote", "only_waiting", "late"]

OPEN_STATUSES = ("sending", "waiting")


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    session: Session | None = None  # the question the message answers
    matched_by: MatchedBy | None = None
    notice: Notice | None = None  # what the robot says in the chat about it


def in_conversation(session: Session, msg: IncomingMessage) -> bool:
    """Whether `msg` was sent where `session` was asked."""
    if session.chat_id is None:
        return msg.chat_type == "group"
    return session.chat_id == msg.chat_id


def decide(msg: IncomingMessage, store: SessionStore) -> Decision:
    if msg.msgid and store.seen_msgid(msg.msgid):
        return Decision("duplicate")
    if msg.is_event:
        if msg.event_type in ("enter_chat", "add_to_chat"):
            return Decision("event", notice=_notice(msg, hints.chat_id_hint(msg.chat_id, msg.chat_type), "event"))
        return Decision("event")
    if not msg.answer and not msg.image_urls:
        return Decision("hint_empty", notice=_notice(msg, hints.empty_answer(), "empty", markdown=False))

    if msg.quoted_short_id:
        session = store.get_by_short_id(msg.quoted_short_id)
        if session is None:
            text = hints.unknown_quote(msg.quoted_short_id)
            return Decision("hint_unknown_quote", notice=_notice(msg, text, "unknown_quote", markdown=False))
        if not in_conversation(session, msg):
            text = hints.other_chat(session.short_id)
            return Decision("hint_other_chat", notice=_notice(msg, text, "other_chat", markdown=False))
        if session.status in ("timeout", "failed"):
            text = hints.late_answer(session)
            return Decision("late", session, "late", _notice(msg, text, "late", markdown=False))
        return Decision("matched_quote", session, "quote")

    waiting = [s for s in store.waiting_in_chat(msg.chat_id) if in_conversation(s, msg)]
    if len(waiting) == 1:
        return Decision("matched_only", waiting[0], "only_waiting")
    if waiting:
        return Decision("hint_several", notice=_notice(msg, hints.several_waiting(waiting), "several"))
    return Decision("hint_chat_id", notice=_notice(msg, hints.chat_id_hint(msg.chat_id, msg.chat_type), "chat_id"))


def _notice(msg: IncomingMessage, text: str, kind: str, *, markdown: bool = True) -> Notice:
    return Notice(chat_id=msg.chat_id, text=text, markdown=markdown, kind=kind, reply_to=msg.reply_to)
