"""Which question a person's message answers, and what it answers, decided without side effects: `decide()` reads
the store and returns a `Decision`; the service applies it (one write, one place).

Rules, in order:
1. A msgid already handled is a duplicate (WeCom's retries, a worker's replay).
2. A button click answers the question whose card it is. Other events and empty messages are not answers (a
   greeting with the chat id, or a hint).
3. A quote-reply names its question by the short id in the quoted header. It answers that question only in the
   question's own conversation; quoted in another chat it is not an answer, and that chat is told so.
4. A plain reply answers the only question waiting in its chat; with several waiting, the chat gets a list and is
   asked to quote; with none, the chat gets its chat id.
5. Once the question is known: someone not among its responders is not taken (told once per question; userids
   compare case-insensitively, as WeCom's do); a question with options takes an option (by number, label or button)
   or, when it allows text, free text; an approval takes a decision (批准 / 拒绝, with a comment after it). A text is
   read by `choices.read_reply` (a pick-several question: `choices.read_several`): when it does not decide (unclear,
   or names nothing) on a question that takes no free text, it is kept on the question (`Session.unclear`) without
   deciding anything, the chat is asked for a clear answer, and the question keeps waiting. With free text allowed,
   such a reply is a text answer (no choice) — except an unclear pick-several reply, which is always asked again.

A question sent without a chat_id went to the robot's default delivery (its group chats), so it belongs to every
group chat of the robot and to no single chat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from hil_protocol.callback import IncomingMessage
from hil_protocol.outbound import Notice

from . import hints
from .choices import Pick, Unclear, read_reply, read_several
from .models import Session

Outcome = Literal[
    "matched_quote",
    "matched_only",
    "matched_button",
    "late",
    "duplicate",
    "refused_responder",
    "hint_options",
    "hint_unclear",
    "hint_several",
    "hint_chat_id",
    "hint_unknown_quote",
    "hint_other_chat",
    "hint_empty",
    "event",
    "ignored",
]
MatchedBy = Literal["quote", "only_waiting", "late", "button"]


class MatchReads(Protocol):
    """What `decide()` reads: the service reads it from the repository before (`service.MatchView`)."""

    def seen_msgid(self, msgid: str) -> bool: ...

    def get(self, session_id: str) -> Session | None: ...

    def get_by_short_id(self, short_id: str) -> Session | None: ...

    def waiting_in_chat(self, chat_id: str) -> list[Session]: ...


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    session: Session | None = None  # the question the message is about
    matched_by: MatchedBy | None = None  # set when the message is taken as an answer
    pick: Pick | None = None  # the option (or decision) it chose
    notice: Notice | None = None  # what the robot says in the chat about it
    kept_by: MatchedBy | None = None  # set when the message is kept on the question without deciding (hint_*)
    picks: tuple[Pick, ...] = ()  # a pick-several question: every option chosen (`pick` is the first)


def in_conversation(session: Session, msg: IncomingMessage) -> bool:
    """Whether `msg` was sent where `session` was asked."""
    if session.chat_id is None:
        return msg.chat_type == "group"
    return session.chat_id == msg.chat_id


def decide(msg: IncomingMessage, store: MatchReads) -> Decision:
    if msg.msgid and store.seen_msgid(msg.msgid):
        return Decision("duplicate")
    if msg.card is not None:
        return _click(msg, store)
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
        return _answer(session, msg, "quote")

    waiting = [s for s in store.waiting_in_chat(msg.chat_id) if in_conversation(s, msg)]
    if len(waiting) == 1:
        return _answer(waiting[0], msg, "only_waiting")
    if waiting:
        return Decision("hint_several", notice=_notice(msg, hints.several_waiting(waiting), "several"))
    return Decision("hint_chat_id", notice=_notice(msg, hints.chat_id_hint(msg.chat_id, msg.chat_type), "chat_id"))


def _click(msg: IncomingMessage, store: MatchReads) -> Decision:
    assert msg.card is not None
    session = store.get(msg.card.task_id)
    if session is None or not in_conversation(session, msg):
        return Decision("ignored")  # a card we did not send, or long purged: nothing to answer
    options = session.options  # an approval's are 批准 / 拒绝
    if msg.card.selected is not None:  # a vote card's submit: the ticked option ids are the options' indexes
        ids = msg.card.selected
        if not ids or not all(i.isascii() and i.isdigit() and len(i) <= 2 and int(i) < len(options) for i in ids):
            return Decision("ignored", session)
        picks = tuple(Pick(i, options[i]) for i in sorted({int(i) for i in ids}))
        if len(picks) > 1 and not session.multi_select:
            return Decision("ignored", session)
        return _answer(session, msg, "button", picks[0], picks)
    key = msg.card.key
    if not (key.isascii() and key.isdigit() and len(key) <= 2) or not 0 <= int(key) < len(options):
        return Decision("ignored", session)
    return _answer(session, msg, "button", Pick(int(key), options[int(key)]))


def _answer(
    session: Session, msg: IncomingMessage, how: MatchedBy, pick: Pick | None = None, picks: tuple[Pick, ...] = ()
) -> Decision:
    """`msg` is about `session`: is it taken, and as what?"""
    userid = msg.from_user.userid.casefold()
    if session.responders and userid not in {r.casefold() for r in session.responders}:
        told = any(r.userid.casefold() == userid for r in session.refused)
        notice = None if told else _notice(msg, hints.not_a_responder(session), "not_responder", markdown=False)
        return Decision("refused_responder", session, notice=notice)
    if session.status in ("timeout", "failed"):
        late = _notice(msg, hints.late_answer(session), "late", markdown=False)
        if pick is None and session.multi_select:
            several = read_several(msg.answer, session.options)
            picks = tuple(several) if isinstance(several, list) else ()
            pick = picks[0] if picks else None
        elif pick is None:
            pick = _choose(session, msg)
        return Decision("late", session, "late", pick, late, picks=picks)
    if session.status == "replied" and session.options:
        # A typed question is decided once; later clicks and replies change nothing (the card says so).
        return Decision("ignored", session)
    if pick is None and session.options:
        reading = _read(session, msg)
        if isinstance(reading, list):  # pick-several: all the options named, never a part of them
            picks = tuple(reading)
            pick = picks[0]
        elif isinstance(reading, Pick):
            pick = reading
        elif not session.allow_text or (session.multi_select and isinstance(reading, Unclear)):
            # An approval takes no free text; a pick-several reply that names options unclearly ("1 5") is never
            # free text either, nor a part of what it names: kept, asked again, still waiting.
            if isinstance(reading, Unclear):
                notice = _notice(msg, hints.unclear(session), "unclear", markdown=False)
                return Decision("hint_unclear", session, notice=notice, kept_by=how)
            notice = _notice(msg, hints.pick_one(session), "options")
            return Decision("hint_options", session, notice=notice, kept_by=how)
    outcome: Outcome = {"quote": "matched_quote", "only_waiting": "matched_only", "button": "matched_button"}.get(
        how, "matched_quote"
    )  # type: ignore[assignment]
    return Decision(outcome, session, how, pick, picks=picks or ((pick,) if pick else ()))


def _choose(session: Session, msg: IncomingMessage) -> Pick | None:
    reading = read_reply(msg.answer, session.options, approval=bool(session.approvals_required))
    return reading if isinstance(reading, Pick) else None


def _read(session: Session, msg: IncomingMessage) -> list[Pick] | Pick | Unclear | None:
    if session.multi_select:
        return read_several(msg.answer, session.options)
    return read_reply(msg.answer, session.options, approval=bool(session.approvals_required))


def _notice(msg: IncomingMessage, text: str, kind: str, *, markdown: bool = True) -> Notice:
    return Notice(chat_id=msg.chat_id, text=text, markdown=markdown, kind=kind, reply_to=msg.reply_to)
