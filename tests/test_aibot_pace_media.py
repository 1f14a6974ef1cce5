"""Issue 22.4-22.6 on the AI bot: pick-several answers (text and vote cards), images uploaded over the long
connection, and WeCom's pace (the pacer alone, then the channel against the fake AI bot with a rate limit)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from typing import Any, cast

import pytest

from hil_protocol.aibot import read_callback
from hil_protocol.callback import CallbackError, CardClick, IncomingMessage
from hil_protocol.outbound import Question
from hil_server import matching
from hil_server.channels import ChannelError
from hil_server.channels.aibot import ERR_PACE
from hil_server.channels.pace import PaceExceeded, Pacer
from hil_server.choices import Pick, Unclear, as_text, read_several
from hil_server.models import SendRequest, Session
from hil_server.store import SessionStore
from tests.helpers import png
from tests.test_aibot_channel import callback, channel_on, msg_body, question
from tests.test_fake_aibot import BOT, config, serve_fake

OPTIONS = ("合并", "回滚", "Rebase First", "部署")


# --- reading "1 3" -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "picked"),
    [
        ("1 3", [0, 2]),
        ("1,3", [0, 2]),
        ("1、3", [0, 2]),
        ("１，３", [0, 2]),
        ("1，3", [0, 2]),
        ("3 1 1", [0, 2]),
        ("合并 回滚", [0, 1]),
        ("rebase first, 4", [2, 3]),
        ("1和3", [0, 2]),
        ("2", [1]),
        ("Rebase First", [2]),
    ],
)
def test_several_numbers_or_labels_pick_several(text: str, picked: list[int]) -> None:
    assert read_several(text, OPTIONS) == [Pick(i, OPTIONS[i]) for i in picked]


@pytest.mark.parametrize("text", ["1 5", "0", "1 3 吗", "先合并吧", "1 3 都行但先别部署", "13", "1.3", "1 3x"])
def test_an_out_of_range_number_or_anything_ambiguous_is_unclear_never_a_partial_pick(text: str) -> None:
    assert isinstance(read_several(text, OPTIONS), Unclear)


@pytest.mark.parametrize("text", ["好的", "让我想想", "   "])
def test_a_reply_that_names_no_option_is_free_text(text: str) -> None:
    assert read_several(text, OPTIONS) is None


def test_the_text_form_says_how_to_pick_several() -> None:
    text = as_text(Question(message="发布哪些？", options=OPTIONS, multi_select=True, allow_text=False))
    assert "1. 合并" in text and "4. 部署" in text and "回复编号，可多选，如 1 3" in text


def test_multi_select_needs_options() -> None:
    with pytest.raises(ValueError, match="multi_select needs options"):
        SendRequest(message="选哪些？", multi_select=True)
    with pytest.raises(ValueError, match="multi_select needs options"):  # an approval has no options of its own
        SendRequest(message="删库？", multi_select=True, approvals_required=1)
    for odd in ("maybe", [1], {"a": 1}, 2):
        with pytest.raises(ValueError, match="multi_select"):
            SendRequest.model_validate({"message": "选哪些？", "options": list(OPTIONS), "multi_select": odd})
    assert SendRequest(message="选哪些？", options=list(OPTIONS), multi_select=True).multi_select


def test_a_forged_submit_with_too_many_ticks_is_not_read() -> None:
    ids = {"option_id": [str(i) for i in range(21)]}
    event = {"event_key": "submit", "task_id": "a" * 32, "selected_items": {"selected_item": [{"option_ids": ids}]}}
    body = {**msg_body("event"), "event": {"eventtype": "template_card_event", "template_card_event": event}}
    with pytest.raises(CallbackError):
        read_callback(callback(body, "aibot_event_callback"), BOT)


# --- deciding --------------------------------------------------------------------------------------------------------


def session(**changes: Any) -> Session:
    values: dict[str, Any] = {
        "session_id": "a" * 32,
        "short_id": "1a2b3c4d",
        "chat_id": "group-1",
        "message": "发布哪些？",
        "deadline": time.time() + 60,
        "options": list(OPTIONS),
        "allow_text": False,
        "multi_select": True,
    }
    return Session(**{**values, **changes})


class OneSession:
    """The store as matching reads it, holding one question (only what decide() asks for)."""

    def __init__(self, held: Session) -> None:
        self.held = held

    def seen_msgid(self, msgid: str) -> bool:
        return False

    def get(self, session_id: str) -> Session | None:
        return self.held if session_id == self.held.session_id else None

    def get_by_short_id(self, short_id: str) -> Session | None:
        return self.held if short_id == self.held.short_id else None

    def waiting_in_chat(self, chat_id: str | None) -> list[Session]:
        return [self.held] if self.held.chat_id == chat_id else []


def decide(msg: IncomingMessage, store: OneSession) -> matching.Decision:
    return matching.decide(msg, cast(SessionStore, store))


def text(answer: str, **changes: Any) -> IncomingMessage:
    fields: dict[str, Any] = {"msgid": "m-1", "chat_id": "group-1", "chat_type": "group", "msg_type": "text"}
    return IncomingMessage(**{**fields, "answer": answer, **changes})


def test_a_text_picks_several_and_an_unclear_one_is_kept_and_asked_again() -> None:
    store = OneSession(session())
    taken = decide(text("1,3"), store)
    assert (
        taken.outcome == "matched_only" and [p.index for p in taken.picks] == [0, 2] and taken.pick == Pick(0, "合并")
    )
    unclear = decide(text("1 5"), store)
    assert unclear.outcome == "hint_unclear" and unclear.picks == () and unclear.notice is not None
    # With free text allowed an unclear pick is still asked again; a reply naming no option is the text answer.
    free = OneSession(session(allow_text=True))
    assert decide(text("1 5"), free).outcome == "hint_unclear"
    said = decide(text("都不要，先等等"), free)
    assert said.outcome == "matched_only" and said.pick is None and said.picks == ()


def test_a_vote_card_submit_picks_what_was_ticked() -> None:
    store = OneSession(session())
    click = CardClick(task_id="a" * 32, key="submit", selected=["2", "0"])
    decided = decide(text("", msg_type="event", card=click), store)
    assert decided.outcome == "matched_button" and [p.label for p in decided.picks] == ["合并", "Rebase First"]
    for odd in ([], ["7"], ["x"], ["-1"]):
        bad = CardClick(task_id="a" * 32, key="submit", selected=odd)
        assert decide(text("", msg_type="event", card=bad), store).outcome == "ignored"
    # A single-pick vote card (more options than buttons) takes one tick, not two.
    single = OneSession(session(multi_select=False))
    two = CardClick(task_id="a" * 32, key="submit", selected=["0", "1"])
    assert decide(text("", msg_type="event", card=two), single).outcome == "ignored"
    one = CardClick(task_id="a" * 32, key="submit", selected=["1"])
    assert decide(text("", msg_type="event", card=one), single).pick == Pick(1, "回滚")


def test_the_click_event_carries_the_ticked_option_ids() -> None:
    event = {
        "card_type": "vote_interaction",
        "event_key": "submit",
        "task_id": "a" * 32,
        "selected_items": {"selected_item": [{"question_key": "choice", "option_ids": {"option_id": ["0", "2"]}}]},
    }
    body = {**msg_body("event"), "event": {"eventtype": "template_card_event", "template_card_event": event}}
    inbound = read_callback(callback(body, "aibot_event_callback"), BOT)
    assert inbound is not None and inbound.message.card is not None
    assert (inbound.message.card.key, inbound.message.card.selected) == ("submit", ["0", "2"])


# --- the pacer -------------------------------------------------------------------------------------------------------


async def test_the_pacer_keeps_to_its_limit_in_order_and_lets_urgent_frames_first() -> None:
    pacer = Pacer([(2, 0.2)])
    order: list[str] = []

    async def frame(name: str, urgent: bool = False) -> None:
        await pacer.slot(urgent=urgent)
        order.append(name)

    started = time.monotonic()
    async with asyncio.TaskGroup() as tasks:
        for n in range(6):
            tasks.create_task(frame(f"q{n}"))
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        assert pacer.depth == 4  # two went at once, four wait
        tasks.create_task(frame("update", urgent=True))
    elapsed = time.monotonic() - started
    assert order[:2] == ["q0", "q1"] and order[2] == "update" and order[3:] == ["q2", "q3", "q4", "q5"]
    assert elapsed >= 0.6 - 0.02  # 7 frames at 2 per 0.2 s: the last waits for the fourth window
    assert pacer.depth == 0


async def test_a_frame_that_would_wait_past_its_deadline_is_refused_at_once() -> None:
    pacer = Pacer([(1, 10.0)])
    await pacer.slot()
    started = time.monotonic()
    with pytest.raises(PaceExceeded) as refused:
        await pacer.slot(deadline=time.monotonic() + 1.0)
    assert refused.value.wait > 9 and time.monotonic() - started < 0.5
    assert pacer.depth == 0
    assert Pacer([(0, 60.0)]).limits == []  # 0 = no limit


# --- the channel against the fake AI bot ------------------------------------------------------------------------------


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


async def test_images_are_uploaded_and_sent_after_the_text_of_the_question() -> None:
    big = png() + b"\0" * (700 * 1024)  # two 512 KB chunks
    images = (data_url(png()), data_url(big))
    async with serve_fake(config()) as served, channel_on(served) as on:
        receipt = await on.channel.send_question(question("看这两张截图，要回滚吗？", images=images))
        sent = on.fake.get_messages("group-1")
        assert [m.msgtype for m in sent] == ["markdown", "image", "image"] and receipt.images == 2
        assert sent[0].content.startswith("[#1a2b3c4d proj]\n看这两张截图") and "附图 2 张" in sent[0].content
        for message, data in zip(sent[1:], (png(), big), strict=True):
            assert message.image_md5 == hashlib.md5(data).hexdigest()
            assert on.fake.aibot.uploaded(message.media_id) == data
        frames = on.fake.aibot.get_frames()
        chunks = [f for f in frames if f.direction == "in" and f.frame.get("cmd") == "aibot_upload_media_chunk"]
        assert len(chunks) == 3


async def test_a_failed_upload_names_its_cause_and_leaves_nothing_in_the_chat() -> None:
    async with serve_fake(config()) as served, channel_on(served) as on:
        on.fake.aibot.fail_next(40058, cmd="aibot_upload_media_init")
        with pytest.raises(ChannelError, match="图片上传失败") as failed:
            await on.channel.send_question(question(images=(data_url(png()),)))
        assert failed.value.errcode == 40058 and "40058" in str(failed.value)
        assert on.fake.get_messages() == []


async def test_a_burst_keeps_wecom_pace_with_no_errcode_and_each_chat_in_order() -> None:
    # The fake enforces 5 per 0.2 s; the server keeps 5 per 0.25 s (a margin for the link's jitter, as 60 s
    # windows have in real life).
    async with (
        serve_fake(config(rate_limit=5, rate_window=0.2)) as served,
        channel_on(served, max_per_minute=5, minute_window=0.25) as on,
    ):
        started = time.monotonic()
        async with asyncio.TaskGroup() as tasks:
            for n in range(20):
                chat = f"group-{n % 3}"
                tasks.create_task(on.channel.send_question(question(f"第 {n} 个问题", chat_id=chat, card_id=None)))
                await asyncio.sleep(0)
        elapsed = time.monotonic() - started
        assert [a.errcode for a in on.fake.get_attempts()] == [0] * 20
        assert elapsed >= 3 * 0.25 - 0.05  # 20 at 5 per window: three full windows waited
        for chat in ("group-0", "group-1", "group-2"):
            numbers = [int(m.content.split("第 ")[1].split(" ")[0]) for m in on.fake.get_messages(chat)]
            assert numbers == sorted(numbers) and numbers
        assert on.channel.queued == 0


async def test_a_question_that_cannot_go_out_before_its_deadline_fails_in_words() -> None:
    async with serve_fake(config()) as served, channel_on(served, max_per_minute=1, minute_window=30) as on:
        await on.channel.send_question(question("第一个"))
        with pytest.raises(ChannelError, match="已超过它的等待时限") as late:
            await on.channel.send_question(question("第二个", card_id=None, expires_at=time.time() + 2))
        assert late.value.errcode == ERR_PACE and "每分钟 1 条" in str(late.value)
        assert len(on.fake.get_messages()) == 1


async def test_a_pick_several_question_is_a_vote_card_and_its_submit_comes_back() -> None:
    async with serve_fake(config()) as served, channel_on(served) as on:
        await on.channel.send_question(question("发布哪些？", options=OPTIONS, multi_select=True))
        text_part, vote = on.fake.get_messages("group-1")
        assert text_part.msgtype == "markdown" and vote.card["card_type"] == "vote_interaction"
        assert vote.card["checkbox"]["mode"] == 1 and len(vote.card["checkbox"]["option_list"]) == 4
        await on.fake.aibot.click(
            userid="lisi",
            task_id="c" * 32,
            event_key="submit",
            selected_items=[{"question_key": "choice", "option_ids": ["0", "3"]}],
        )
        msg = await on.next_message()
        assert msg.card is not None and msg.card.selected == ["0", "3"] and msg.card.key == "submit"
