"""Choices, approvals and who may answer: the pure rules (hil_server.choices) and the service applying them."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from hil_protocol.callback import CardClick, IncomingMessage, parse_callback
from hil_protocol.outbound import CardUpdate, Notice, Question, SendReceipt
from hil_server.choices import as_text, check_options, pick_decision, pick_option
from hil_server.models import SendRequest
from hil_server.service import HilService
from tests.helpers import callback_body
from tests.service_helpers import new_service

OPTIONS = ["合并", "不合并", "Rebase First"]


@pytest.mark.parametrize(
    ("text", "index", "comment"),
    [
        ("1", 0, ""),
        ("１", 0, ""),  # full-width digit
        (" 2 ", 1, ""),
        ("合并", 0, ""),
        ("  不合并  ", 1, ""),
        ("rebase first", 2, ""),
        ("REBASE FIRST", 2, ""),
        ("３", 2, ""),
        ("1 备份已确认", 0, "备份已确认"),
        ("合并吧", 0, ""),  # a particle after the label
        ("不合并，还有 bug", 1, "还有 bug"),
        ("2，等 CI 绿了再说", 1, "等 CI 绿了再说"),  # an option that refuses may defer
    ],
)
def test_pick_option(text: str, index: int, comment: str) -> None:
    picked = pick_option(text, OPTIONS)
    assert picked is not None and picked.index == index and picked.label == OPTIONS[index]
    assert picked.comment == comment


# "1 先跑测试" is a go-ahead with a condition first: it decides nothing (tests/test_decisions.py has the table).
@pytest.mark.parametrize("text", ["4", "0", "我觉得可以", "", "12", "1.5x", "1 先跑测试", "1 2", "合并，不合并也行"])
def test_no_pick(text: str) -> None:
    assert pick_option(text, OPTIONS) is None


@pytest.mark.parametrize(
    ("text", "approved", "comment"),
    [
        ("批准", True, ""),
        ("同意", True, ""),
        ("1", True, ""),
        ("Approve", True, ""),
        ("拒绝，先跑测试", False, "先跑测试"),
        ("不同意", False, ""),
        ("2 等 CI 绿了再说", False, "等 CI 绿了再说"),
        ("reject: flaky", False, "flaky"),
        ("好的，上吧", True, "上吧"),
    ],
)
def test_pick_decision(text: str, approved: bool, comment: str) -> None:
    picked = pick_decision(text)
    assert picked is not None and (picked.index == 0) is approved and picked.comment == comment


@pytest.mark.parametrize("text", ["也许", "不知道", "同意吗？还要想想" * 0 + "再看看"])
def test_no_decision(text: str) -> None:
    assert pick_decision(text) is None


@pytest.mark.parametrize(
    "options",
    [[], ["a"] * 21, ["a", "A"], ["1"], ["２"], ["x" * 41], ["line\nbreak"], [" "]],
)
def test_bad_options_are_refused(options: list[str]) -> None:
    with pytest.raises(ValueError):
        check_options(options)


def test_text_rendering_numbers_options_and_says_how_to_answer() -> None:
    text = as_text(Question("合并这个 PR 吗？", options=("合并", "不合并"), responders=("lisi",)))
    assert text.splitlines()[2:4] == ["1. 合并", "2. 不合并"]
    assert "回复数字或选项文字" in text and "@lisi" in text
    assert as_text(Question("plain")) == "plain"


# --- the service ---------------------------------------------------------------------------------------------------


class Channel:
    name = "test"

    def __init__(self) -> None:
        self.questions: list[Question] = []
        self.cards: list[CardUpdate] = []

    async def send_question(self, question: Question) -> SendReceipt:
        self.questions.append(question)
        return SendReceipt()

    async def send_notice(self, notice: Notice) -> None:
        pass

    async def update_card(self, update: CardUpdate) -> None:
        self.cards.append(update)


def reply(text: str, userid: str = "zhangsan", chat: str = "c", name: str = "张三") -> IncomingMessage:
    return parse_callback(callback_body(text, chat, sender={"userid": userid, "name": name}))


_clicks = itertools.count(1)


def click(session_id: str, key: str, userid: str = "zhangsan", chat: str = "c") -> IncomingMessage:
    seq = next(_clicks)
    return IncomingMessage(
        msgid=f"k-{seq}",
        chat_id=chat,
        chat_type="group",
        msg_type="event",
        event_type="template_card_event",
        from_user={"userid": userid, "name": userid},
        card=CardClick(task_id=session_id, key=key),
        reply_to=f"req-{seq}",
    )


def notices(service: HilService) -> list[Notice | CardUpdate]:
    out = []
    while not service._notices.empty():
        out.append(service._notices.get_nowait())
    return out


async def ask(service: HilService, **body: Any) -> str:
    sent = await service.send(SendRequest(message="合并吗？", chat_id="c", **body))
    assert sent.success and sent.session_id
    return sent.session_id


async def state(service: HilService, session_id: str) -> Any:
    return await service.poll(await service.get(session_id))  # type: ignore[arg-type]


@pytest.fixture
async def service() -> HilService:
    return await new_service(Channel())


async def test_choice_by_number_label_and_free_text(service: HilService) -> None:
    first = await ask(service, options=OPTIONS)
    assert await service.handle_message(reply("２")) == "matched_only"
    result = await state(service, first)
    assert result.status == "replied" and result.choice.label == "不合并"
    assert result.replies[0].answered_by == "zhangsan" and result.replies[0].choice.index == 1

    second = await ask(service, options=OPTIONS)
    await service.handle_message(reply("先等等，我看下"))
    result = await state(service, second)
    assert result.status == "replied" and result.choice is None  # free text is still an answer


async def test_without_free_text_a_non_choice_gets_the_options(service: HilService) -> None:
    session_id = await ask(service, options=OPTIONS, allow_text=False)
    assert await service.handle_message(reply("先等等")) == "hint_options"
    (hint,) = notices(service)
    assert isinstance(hint, Notice) and "**1** 合并" in hint.text
    assert (await state(service, session_id)).status == "waiting"
    assert await service.handle_message(reply("rebase first")) == "matched_only"
    assert (await state(service, session_id)).choice.index == 2


async def test_only_responders_are_taken_and_others_told_once(service: HilService) -> None:
    session_id = await ask(service, options=OPTIONS, responders=["lisi"])
    question = service.channel.questions[-1]  # type: ignore[attr-defined]
    assert "lisi" in question.mention_list and question.responders == ("lisi",)
    assert await service.handle_message(reply("1", userid="zhangsan")) == "refused_responder"
    assert await service.handle_message(reply("1", userid="zhangsan")) == "refused_responder"
    told = [n for n in notices(service) if isinstance(n, Notice)]
    assert len(told) == 1 and "只有 @lisi 可以回答" in told[0].text
    session = await service.get(session_id)
    assert [r.userid for r in session.refused] == ["zhangsan", "zhangsan"]  # type: ignore[union-attr]
    assert await service.handle_message(click(session_id, "0", userid="wangwu")) == "refused_responder"
    assert (await state(service, session_id)).status == "waiting"
    assert await service.handle_message(reply("合并", userid="lisi", name="李四")) == "matched_only"
    assert (await state(service, session_id)).replies[0].answered_by == "lisi"


async def test_default_responders_apply_when_a_question_names_none() -> None:
    service = await new_service(Channel(), default_responders=("boss",))
    session_id = await ask(service)
    assert await service.handle_message(reply("ok", userid="intern")) == "refused_responder"
    assert await service.handle_message(reply("ok", userid="boss")) == "matched_only"
    assert (await state(service, session_id)).status == "replied"


async def test_a_click_is_a_choice_and_updates_the_card(service: HilService) -> None:
    session_id = await ask(service, options=OPTIONS)
    assert await service.handle_message(click(session_id, "1")) == "matched_button"
    result = await state(service, session_id)
    assert result.choice.label == "不合并" and result.replies[0].via == "button"
    (update,) = [n for n in notices(service) if isinstance(n, CardUpdate)]
    assert update.card_id == session_id and "✅ zhangsan 选择了「不合并」" in update.text
    # A later click changes nothing; its card says what was decided.
    assert await service.handle_message(click(session_id, "0", userid="lisi")) == "ignored"
    (update,) = [n for n in notices(service) if isinstance(n, CardUpdate)]
    assert "不合并" in update.text
    assert len((await state(service, session_id)).replies) == 1


@pytest.mark.parametrize("key", ["7", "-1", "x", "", "0" * 50])
async def test_odd_click_keys_are_ignored(service: HilService, key: str) -> None:
    session_id = await ask(service, options=OPTIONS)
    assert await service.handle_message(click(session_id, key)) == "ignored"
    assert await service.handle_message(click("f" * 32, "0")) == "ignored"
    assert (await state(service, session_id)).status == "waiting"


async def test_a_click_from_another_chat_is_ignored(service: HilService) -> None:
    session_id = await ask(service, options=OPTIONS)
    assert await service.handle_message(click(session_id, "0", chat="elsewhere")) == "ignored"
    assert (await state(service, session_id)).status == "waiting"


async def test_two_person_approval(service: HilService) -> None:
    session_id = await ask(service, approvals_required=2, responders=["lisi", "wangwu", "zhaoliu"])
    question = service.channel.questions[-1]  # type: ignore[attr-defined]
    assert question.options == ("批准", "拒绝") and question.allow_text is False
    assert await service.handle_message(reply("批准", userid="lisi")) == "matched_only"
    result = await state(service, session_id)
    assert result.status == "waiting" and result.approval.approvals == 1 and result.approval.approved is None
    # The same person again does not count twice.
    await service.handle_message(reply("同意", userid="lisi"))
    assert (await state(service, session_id)).approval.approvals == 1
    assert await service.handle_message(click(session_id, "0", userid="wangwu")) == "matched_button"
    result = await state(service, session_id)
    assert result.status == "replied" and result.approval.approved is True
    assert result.approval.decided_by == ["lisi", "wangwu"]


async def test_one_rejection_decides_at_once_with_its_comment(service: HilService) -> None:
    session_id = await ask(service, approvals_required=2)
    await service.handle_message(reply("批准", userid="lisi"))
    assert await service.handle_message(reply("拒绝，先跑测试", userid="wangwu")) == "matched_only"
    result = await state(service, session_id)
    assert result.status == "replied" and result.approval.approved is False
    assert result.approval.decided_by == ["wangwu"] and result.approval.comment == "先跑测试"


async def test_an_approval_needs_a_decision(service: HilService) -> None:
    session_id = await ask(service, approvals_required=1)
    assert await service.handle_message(reply("嗯……让我想想")) == "hint_options"
    assert (await state(service, session_id)).status == "waiting"
    assert await service.handle_message(reply("2")) == "matched_only"
    assert (await state(service, session_id)).approval.approved is False


def test_api_validation_of_typed_questions() -> None:
    with pytest.raises(ValueError, match="approval has its own options"):
        SendRequest(message="q", options=["a"], approvals_required=1)
    with pytest.raises(ValueError, match="approvals_required is 3 but responders name only 2 distinct people"):
        SendRequest(message="q", approvals_required=3, responders=["a", "b"])
    with pytest.raises(ValueError, match="responders"):
        SendRequest(message="q", responders=["bad id!"])
    assert SendRequest(message="q", responders=[" a ", "a", ""]).responders == ["a"]


async def test_a_long_poll_holds_while_an_approval_is_undecided(service: HilService) -> None:
    session_id = await ask(service, approvals_required=2)
    await service.handle_message(reply("批准", userid="lisi"))
    session = await service.get(session_id)
    assert session is not None
    held = asyncio.create_task(service.poll(session, wait=5))
    await asyncio.sleep(0.05)
    assert not held.done()  # one approval of two decides nothing: the agent keeps waiting, not re-polling
    await service.handle_message(reply("批准", userid="wangwu"))
    result = await asyncio.wait_for(held, 1)
    assert result.status == "replied" and result.approval.approved is True


async def test_a_late_click_is_recorded_as_a_click(service: HilService) -> None:
    session_id = await ask(service, options=OPTIONS)
    await service.mark_timeout(await service.get(session_id))  # type: ignore[arg-type]
    assert await service.handle_message(click(session_id, "1")) == "late"
    (late,) = (await state(service, session_id)).replies
    assert late.matched_by == "late" and late.via == "button" and late.choice.label == "不合并"
