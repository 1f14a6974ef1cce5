"""How a text reply is read (hil_server.choices.read_reply): the table of real phrasings, and what the service does
with a reply that decides nothing (kept on the question, the chat asked again, the question still waiting)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from hil_protocol.outbound import Notice
from hil_server.approvals import answered, tally
from hil_server.choices import APPROVAL_OPTIONS, Pick, Unclear, read_reply
from hil_server.models import UNCLEAR_KEPT
from hil_server.service import HilService
from tests.service_helpers import close_service, new_service
from tests.test_choices import Channel, ask, click, notices, reply, state

YES, NO = "yes", "no"  # an approval's reading: 批准 / 拒绝
UNCLEAR, NOTHING = "unclear", "nothing"  # names something but not one thing / names nothing

# (reply, reading, comment): approvals, rejections, deferrals, acknowledgements, mixed punctuation and width, emoji.
APPROVALS: list[tuple[str, str, str]] = [
    # approvals
    ("批准", YES, ""),
    ("同意", YES, ""),
    ("1", YES, ""),
    ("１", YES, ""),  # full-width digit
    ("②", NO, ""),  # a circled digit is its digit (NFKC)
    ("Approve", YES, ""),
    ("APPROVED!!!", YES, ""),
    ("ＯＫ", YES, ""),  # full-width letters
    ("ok", YES, ""),
    ("okay", YES, ""),
    ("LGTM 🚀", YES, "🚀"),
    ("yes please", YES, "please"),
    ("没问题", YES, ""),  # a negation that says yes
    ("同意，没问题", YES, ""),
    ("好的，上吧", YES, "上吧"),
    ("好吧", YES, ""),
    ("好好好", YES, ""),
    ("可以的", YES, ""),
    ("通过", YES, ""),
    ("我同意", YES, ""),
    ("嗯，批准", YES, ""),
    ("i approve", YES, ""),
    ("同意合并", YES, "合并"),
    ("批准，备份已确认", YES, "备份已确认"),
    ("同意，辛苦了", YES, "辛苦了"),
    ("批准。记得通知运营", YES, "记得通知运营"),
    ("批准吧", YES, ""),
    ("👍", YES, ""),
    ("👍🏻", YES, ""),  # a skin tone changes nothing
    ("✅", YES, ""),
    ("ok 👍", YES, ""),
    ("1 批准", YES, ""),
    ("1️⃣", YES, ""),  # keycap digit
    # rejections
    ("拒绝", NO, ""),
    ("2", NO, ""),
    ("不同意", NO, ""),
    ("我不同意", NO, ""),
    ("不行", NO, ""),
    ("不", NO, ""),
    ("不了", NO, ""),
    ("no", NO, ""),
    ("nope", NO, ""),
    ("i don't approve", NO, ""),
    ("reject: flaky", NO, "flaky"),
    ("拒绝，先跑测试", NO, "先跑测试"),  # a refusal may defer
    ("2 等 CI 绿了再说", NO, "等 CI 绿了再说"),
    ("不同意，先别上线", NO, "先别上线"),
    ("No, wait for CI", NO, "wait for CI"),
    ("驳回：缺少回滚方案", NO, "缺少回滚方案"),
    ("拒绝上线", NO, "上线"),
    ("拒绝，可以下周再试", NO, "可以下周再试"),  # "可以" reads on into its clause: not a yes
    ("👎", NO, ""),
    ("❌ 有 bug", NO, "有 bug"),
    ("算了", NO, ""),
    ("２，回滚方案呢", NO, "回滚方案呢"),
    ("不行吗？", UNCLEAR, ""),  # a question does not decide
    # acknowledgement first, then a refusal or deferral: the reported misreadings
    ("好的，先不要", UNCLEAR, ""),
    ("好，先别上线", UNCLEAR, ""),
    ("OK，不同意", UNCLEAR, ""),
    ("ok, reject", UNCLEAR, ""),
    ("可以，但不是现在", UNCLEAR, ""),
    ("好的！先不要！", UNCLEAR, ""),
    ("OK,先别", UNCLEAR, ""),
    ("yes, but later", UNCLEAR, ""),
    ("Yes... not now", UNCLEAR, ""),
    ("approve if tests pass", UNCLEAR, ""),
    ("ok, don't merge yet", UNCLEAR, ""),
    ("ok wait", UNCLEAR, ""),
    ("👍 等一下", UNCLEAR, ""),
    ("✅❌", UNCLEAR, ""),
    # a go-ahead with a condition first: unclear (the agent would act at once)
    ("批准，先跑测试再合并", UNCLEAR, ""),
    ("批准，不过要先跑测试", UNCLEAR, ""),
    ("同意，明天再上线", UNCLEAR, ""),
    ("可以，等我确认一下", UNCLEAR, ""),
    # both decisions, two numbers, a number without an option
    ("1 2", UNCLEAR, ""),
    ("1或2", UNCLEAR, ""),
    ("批准 拒绝", UNCLEAR, ""),
    ("行不行", UNCLEAR, ""),
    ("不行，好吧", UNCLEAR, ""),
    ("no, ok then", UNCLEAR, ""),
    ("3", UNCLEAR, ""),
    ("0", UNCLEAR, ""),
    ("12", UNCLEAR, ""),
    ("可以吗？", UNCLEAR, ""),
    ("批准?", UNCLEAR, ""),
    ("好像可以", UNCLEAR, ""),  # 好像 is "seems", not 好
    ("可以合并", UNCLEAR, ""),  # 可以 needs a break: "可以考虑" is not a yes
    ("先不要", UNCLEAR, ""),
    # acknowledgements
    ("好的，收到", UNCLEAR, ""),
    ("好的，我看看", UNCLEAR, ""),
    ("ok, let me check", UNCLEAR, ""),
    ("收到", NOTHING, ""),
    ("知道了", NOTHING, ""),
    ("👀", NOTHING, ""),
    ("noted", NOTHING, ""),
    # deferrals and free text: names no decision
    ("先等等", NOTHING, ""),
    ("等一下", NOTHING, ""),
    ("再说", NOTHING, ""),
    ("later", NOTHING, ""),
    ("not now", NOTHING, ""),
    ("wait", NOTHING, ""),
    ("别急，我看看", NOTHING, ""),
    ("嗯……让我想想", NOTHING, ""),
    ("不知道", NOTHING, ""),
    ("也许", NOTHING, ""),
    ("yesterday", NOTHING, ""),
    ("", NOTHING, ""),
]

OPTIONS = ["合并", "不合并", "Rebase First"]
PICKS: list[tuple[str, int | str, str]] = [
    ("1", 0, ""),
    ("３", 2, ""),
    ("合并", 0, ""),
    ("合并吧", 0, ""),
    ("  不合并  ", 1, ""),
    ("REBASE FIRST", 2, ""),
    ("rebase first, then merge", 2, "then merge"),
    ("1 合并", 0, ""),  # the number and the label of one option
    ("不合并，还有 bug", 1, "还有 bug"),
    ("2，等 CI 绿了", 1, "等 CI 绿了"),  # an option that refuses may defer
    ("1，备份已确认", 0, "备份已确认"),
    ("1 2", UNCLEAR, ""),
    ("1 不合并", UNCLEAR, ""),
    ("1或2", UNCLEAR, ""),
    ("合并，不合并也行", UNCLEAR, ""),
    ("1 先跑测试", UNCLEAR, ""),  # a go-ahead with a condition first
    ("3，不过先跑 CI", UNCLEAR, ""),
    ("合并?", UNCLEAR, ""),
    ("4", UNCLEAR, ""),
    ("我选合并", UNCLEAR, ""),
    ("我觉得可以", NOTHING, ""),
    ("1.5x", NOTHING, ""),
]


def _reading(result: Pick | Unclear | None, yes_no: bool) -> int | str:
    if result is None:
        return NOTHING
    if isinstance(result, Unclear):
        return UNCLEAR
    return (YES if result.index == 0 else NO) if yes_no else result.index


def _reads_as(text: str, options: Sequence[str], expected: int | str, comment: str, *, approval: bool = False) -> None:
    """One row of a table: how `text` reads against `options`, and a pick's label and comment."""
    result = read_reply(text, options, approval=approval)
    assert _reading(result, yes_no=approval) == expected, result
    if isinstance(result, Pick):
        assert result.label == options[result.index] and result.comment == comment


def test_the_table_is_large_enough() -> None:
    assert len(APPROVALS) + len(PICKS) >= 60 and len(APPROVALS) >= 60


@pytest.mark.parametrize(("text", "expected", "comment"), APPROVALS)
def test_approval_replies(text: str, expected: str, comment: str) -> None:
    _reads_as(text, APPROVAL_OPTIONS, expected, comment, approval=True)


@pytest.mark.parametrize(("text", "expected", "comment"), PICKS)
def test_option_replies(text: str, expected: int | str, comment: str) -> None:
    _reads_as(text, OPTIONS, expected, comment)


def test_a_label_that_refuses_or_holds_is_taken_whole() -> None:
    labels = ["上线", "先不上线", "later"]
    assert read_reply("先不上线", labels) == Pick(1, "先不上线")
    assert read_reply("later, after the freeze", labels) == Pick(2, "later", "after the freeze")
    assert isinstance(read_reply("上线，先不上线", labels), Unclear)


def test_ascii_labels_are_words_not_letters() -> None:
    # "a" and "b" are labels: the "a" in "fast" names nothing.
    assert read_reply("b, fast please", ["a", "b"]) == Pick(1, "b", "fast please")
    assert isinstance(read_reply("b, or a", ["a", "b"]), Unclear)


def test_the_comment_is_returned_as_written() -> None:
    # Full-width and case are only for reading; the comment keeps the person's characters.
    assert read_reply("ＲＥＪＥＣＴ：Ｆｌａｋｙ Test", APPROVAL_OPTIONS, approval=True) == Pick(
        1, "拒绝", "Ｆｌａｋｙ Test"
    )


# --- the service ---------------------------------------------------------------------------------------------------


@pytest.fixture
async def service() -> HilService:
    return await new_service(Channel())


async def test_an_unclear_approval_is_kept_asked_again_and_still_waits(service: HilService) -> None:
    session_id = await ask(service, approvals_required=1)
    assert await service.handle_message(reply("好的，先不要")) == "hint_unclear"
    (hint,) = notices(service)
    assert (
        isinstance(hint, Notice) and "没看懂，请回复 1 批准 或 2 拒绝" in hint.text and len(hint.text.splitlines()) == 1
    )
    result = await state(service, session_id)
    assert result.status == "waiting" and result.replies == [] and result.choice is None
    assert [r.content for r in result.unclear] == ["好的，先不要"] and result.unclear[0].choice is None
    assert result.approval is not None and result.approval.approved is None and result.approval.approvals == 0
    session = await service.get(session_id)
    assert session is not None and not answered(session) and tally(session).approved is None
    # The clear answer after it decides.
    assert await service.handle_message(reply("批准")) == "matched_only"
    result = await state(service, session_id)
    assert result.status == "replied" and result.approval.approved is True  # type: ignore[union-attr]
    assert [r.content for r in result.replies] == ["批准"] and len(result.unclear) == 1


async def test_an_unclear_pick_on_an_options_only_question_lists_the_numbers(service: HilService) -> None:
    session_id = await ask(service, options=OPTIONS, allow_text=False)
    assert await service.handle_message(reply("1 2")) == "hint_unclear"
    (hint,) = notices(service)
    assert isinstance(hint, Notice) and "1 合并、2 不合并、3 Rebase First" in hint.text
    result = await state(service, session_id)
    assert result.status == "waiting" and result.choice is None and [r.content for r in result.unclear] == ["1 2"]
    assert await service.handle_message(reply("2")) == "matched_only"
    assert (await state(service, session_id)).choice.label == "不合并"  # type: ignore[union-attr]


async def test_with_free_text_allowed_an_unclear_reply_is_a_text_answer(service: HilService) -> None:
    session_id = await ask(service, options=OPTIONS)
    assert await service.handle_message(reply("1 先跑测试")) == "matched_only"
    result = await state(service, session_id)
    assert result.status == "replied" and result.choice is None and result.replies[0].content == "1 先跑测试"
    assert result.unclear == []


async def test_buttons_stay_exact_after_an_unclear_text(service: HilService) -> None:
    session_id = await ask(service, approvals_required=1)
    assert await service.handle_message(reply("ok, reject")) == "hint_unclear"
    assert await service.handle_message(click(session_id, "1")) == "matched_button"
    result = await state(service, session_id)
    assert result.approval.approved is False and result.replies[0].via == "button"  # type: ignore[union-attr]


async def test_unclear_replies_are_bounded_and_survive_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "hil.db"
    service = await new_service(Channel(), path)
    session_id = await ask(service, approvals_required=1)
    for n in range(UNCLEAR_KEPT + 3):
        assert await service.handle_message(reply(f"ok, reject #{n}")) == "hint_unclear"
    kept = (await service.get(session_id)).unclear  # type: ignore[union-attr]
    assert len(kept) == UNCLEAR_KEPT and kept[-1].content.endswith(f"#{UNCLEAR_KEPT + 2}")
    await close_service(service)
    reloaded = await new_service(Channel(), path)
    assert len((await reloaded.get(session_id)).unclear) == UNCLEAR_KEPT  # type: ignore[union-attr]
    await close_service(reloaded)


async def test_responders_compare_case_insensitively(service: HilService) -> None:
    session_id = await ask(service, approvals_required=2, responders=["LiSi", "wangwu"])
    assert await service.handle_message(reply("批准", userid="lisi")) == "matched_only"
    # The same person with another spelling does not approve twice.
    assert await service.handle_message(reply("同意", userid="LISI")) == "matched_only"
    result = await state(service, session_id)
    assert result.status == "waiting" and result.approval.approvals == 1  # type: ignore[union-attr]
    assert await service.handle_message(reply("批准", userid="WangWu")) == "matched_only"
    assert (await state(service, session_id)).approval.approved is True  # type: ignore[union-attr]


def test_labels_that_are_decision_words_are_still_options() -> None:
    assert read_reply("ok", ["ok", "no"]) == Pick(0, "ok")
    assert isinstance(read_reply("ok, no", ["ok", "no"]), Unclear)
    assert isinstance(read_reply("是，或者否", ["是", "否"]), Unclear)  # a go-ahead whose comment refuses


def test_a_question_mark_in_a_label_is_no_question() -> None:
    labels = ["上线", "什么都不做"]
    assert read_reply("2 什么都不做", labels) == Pick(1, "什么都不做")
    assert isinstance(read_reply("2 什么都不做吗", labels), Unclear)


def test_random_replies_never_fail_and_never_approve_with_both_words() -> None:
    # Pieces people type, shuffled: reading never raises, a pick is in range, and no reply holding a refusal or
    # deferral word after an approval word reads as 批准.
    import random

    pieces = [
        "好的",
        "ok",
        "批准",
        "不",
        "先不要",
        "拒绝",
        "1",
        "2",
        "３",
        "，",
        "!",
        " ",
        "👍",
        "👎",
        "等等",
        "later",
        "?",
        "吧",
    ]
    rng = random.Random(18)
    for _ in range(3000):
        text = ""
        for piece in (rng.choice(pieces) for _ in range(rng.randint(0, 5))):
            glued = text[-1:].isascii() and text[-1:].isalnum() and piece[0].isascii() and piece[0].isalnum()
            text += (" " if glued else rng.choice(["", " ", "，"])) + piece  # "oklater" is no English word
        for options, approval in ((APPROVAL_OPTIONS, True), (OPTIONS, False)):
            result = read_reply(text, options, approval=approval)
            assert result is None or isinstance(result, Unclear) or 0 <= result.index < len(options)
        result = read_reply(text, APPROVAL_OPTIONS, approval=True)
        if isinstance(result, Pick) and result.index == 0:
            assert not any(w in text for w in ("不", "拒绝", "等等", "later", "👎", "2", "?")), text
