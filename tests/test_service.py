"""hil_server.service.HilService (on a scratch SQLite repository, with a recording channel) and the old SQLite store
(still read to upgrade a data directory)."""

from __future__ import annotations

import asyncio
import functools
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from hil_protocol.callback import parse_callback
from hil_protocol.outbound import Notice, Question, SendReceipt
from hil_protocol.relay_frames import SendHintPayload, SendMessagePayload
from hil_server.channels import ChannelError
from hil_server.models import PollResponse, SendRequest
from hil_server.service import HilService
from hil_server.store import SessionStore, SqlitePersistence
from tests.helpers import ROBOT, callback_body, quote
from tests.service_helpers import close_service, new_service

CHAT = "wrkChatA"
OTHER_CHAT = "wrkChatB"


class FakeChannel:
    """Records what the service sends, in the relay wire shape (what a person would read)."""

    name = "fake"

    def __init__(self) -> None:
        self.messages: list[SendMessagePayload] = []
        self.hints: list[SendHintPayload] = []
        self.fail_with: ChannelError | None = None

    async def send_question(self, question: Question) -> SendReceipt:
        if self.fail_with is not None:
            raise self.fail_with
        self.messages.append(SendMessagePayload.of(question))
        return SendReceipt()

    async def send_notice(self, notice: Notice) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.hints.append(SendHintPayload.of(notice))


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def make(path: Path | None = None, **kw: Any) -> tuple[HilService, FakeChannel]:
    delivery = FakeChannel()
    return await new_service(delivery, path, **kw), delivery


async def handle(service: HilService, data: Any) -> str:
    return await service.handle_message(parse_callback(data))


async def poll(service: HilService, ref: str | None, wait: float = 0) -> PollResponse:
    session = await service.find(ref or "")
    if session is None:
        return PollResponse(session_id=ref or "", status="not_found", has_reply=False, message="not found")
    return await service.poll(session, wait)


async def stop_waiting(service: HilService, ref: str | None) -> bool:
    session = await service.find(ref or "")
    if session is None:
        return False
    await service.mark_timeout(session)
    return True


async def open_store(path: Path) -> SessionStore:
    return await SessionStore.open(await SqlitePersistence.open(path))


def drain(service: HilService) -> list[SendHintPayload]:
    out = []
    while not service._notices.empty():
        out.append(SendHintPayload.of(service._notices.get_nowait()))
    return out


callback = functools.partial(callback_body, chat=CHAT)  # the chat the questions here go to


async def ask(service: HilService, message: str = "Deploy?", chat: str | None = CHAT, **kw: Any):
    response = await service.send(SendRequest(message=message, chat_id=chat, project_name="proj", **kw))
    assert response.success, response
    return response


# --- sending --------------------------------------------------------------------------------------------------


async def test_send_creates_waiting_session_and_sends_payload() -> None:
    service, delivery = await make()
    response = await service.send(SendRequest(message="Deploy now?", chat_id=CHAT, project_name="proj"))
    assert response.success
    assert response.session_id and response.short_id
    session = await service.get(response.session_id)
    assert session is not None and session.status == "waiting"
    assert session.short_id == response.short_id
    (payload,) = delivery.messages
    assert payload.short_id == response.short_id
    assert payload.message == "Deploy now?"
    assert payload.chat_id == CHAT
    assert payload.project_name == "proj"
    result = await poll(service, response.session_id)
    assert result.status == "waiting" and not result.has_reply


async def test_send_without_wait_creates_no_session() -> None:
    service, delivery = await make()
    response = await service.send(SendRequest(message="FYI", chat_id=CHAT, wait_reply=False))
    assert response.success and response.session_id is None
    assert sum((await service.repo.counts()).values()) == 0
    assert delivery.messages[0].short_id is None


async def test_delivery_error_fails_the_session() -> None:
    service, delivery = await make()
    delivery.fail_with = ChannelError("机器人 Key 无效，请检查 BOT_KEY", 93000)
    response = await service.send(SendRequest(message="q", chat_id=CHAT))
    assert response.success is False
    assert response.errcode == 93000
    assert "BOT_KEY" in (response.error or "")
    assert response.session_id
    session = await service.get(response.session_id)
    assert session is not None and session.status == "failed"
    assert (await service.repo.open_in_chat(CHAT)) == []
    result = await poll(service, response.session_id)
    assert result.status == "failed"
    assert "BOT_KEY" in result.message


async def test_timeout_argument_sets_deadline() -> None:
    clock = Clock()
    service, _ = await make(clock=clock, default_timeout=1200)
    a = await ask(service, timeout=30)
    b = await ask(service)
    assert (await service.get(a.session_id)).deadline == clock.now + 30
    assert (await service.get(b.session_id)).deadline == clock.now + 1200


# --- matching -----------------------------------------------------------------------------------------------------


async def test_plain_reply_matches_the_only_waiting_session() -> None:
    service, _ = await make()
    sent = await ask(service)
    outcome = await handle(service, callback(f"@{ROBOT} yes, go"))
    assert outcome == "matched_only"
    result = await poll(service, sent.session_id)
    assert result.status == "replied" and result.has_reply
    (reply,) = result.replies
    assert reply.content == "yes, go"
    assert reply.matched_by == "only_waiting"
    assert reply.from_user.userid == "zhangsan"
    assert drain(service) == []


async def test_plain_reply_ignores_sessions_of_other_chats() -> None:
    service, _ = await make()
    other = await ask(service, chat=OTHER_CHAT)
    outcome = await handle(service, callback("@Bot hi", chat=CHAT))
    assert outcome == "hint_chat_id"
    assert (await service.get(other.session_id)).status == "waiting"


async def test_three_waiting_and_plain_reply_gives_one_hint() -> None:
    service, _ = await make()
    sent = [await ask(service, message=f"question {i}") for i in range(3)]
    outcome = await handle(service, callback(f"@{ROBOT} which?"))
    assert outcome == "hint_several"
    for s in sent:
        assert (await service.get(s.session_id)).status == "waiting"
        assert (await service.get(s.session_id)).replies == []
    hints = drain(service)
    assert len(hints) == 1
    assert hints[0].msg_type == "markdown"
    assert hints[0].chat_id == CHAT
    for s in sent:
        assert s.short_id in hints[0].message


async def test_quote_reply_matches_only_the_quoted_session() -> None:
    service, _ = await make()
    sent = [await ask(service, message=f"question {i}") for i in range(3)]
    outcome = await handle(service, callback(quote(sent[1].short_id, "the second one")))
    assert outcome == "matched_quote"
    statuses = [(await poll(service, s.session_id)).status for s in sent]
    assert statuses == ["waiting", "replied", "waiting"]
    reply = (await service.get(sent[1].session_id)).replies[0]
    assert reply.content == "the second one"
    assert reply.matched_by == "quote"
    assert drain(service) == []


async def test_quote_of_a_question_from_another_chat_is_not_an_answer() -> None:
    service, _ = await make()
    sent = await ask(service, chat=OTHER_CHAT)
    # Someone in another group (or a private chat typing the quote by hand) quotes the question.
    assert await handle(service, callback(quote(sent.short_id, "yes, deploy"), chat=CHAT)) == "hint_other_chat"
    (hint,) = drain(service)
    assert hint.chat_id == CHAT and sent.short_id in hint.message
    assert (await poll(service, sent.session_id)).status == "waiting"
    # The person in the question's own chat still gets through.
    assert await handle(service, callback(quote(sent.short_id, "no"), chat=OTHER_CHAT)) == "matched_quote"
    (reply,) = (await poll(service, sent.session_id)).replies
    assert reply.content == "no" and reply.chat_id == OTHER_CHAT


async def test_nothing_waiting_gives_chat_id_hint() -> None:
    service, _ = await make()
    outcome = await handle(service, callback(f"@{ROBOT} hello", chat="wrkLonelyChat"))
    assert outcome == "hint_chat_id"
    (hint,) = drain(service)
    assert hint.chat_id == "wrkLonelyChat"
    assert "wrkLonelyChat" in hint.message
    assert "DEFAULT_CHAT_ID" in hint.message


async def test_unknown_quoted_short_id_gives_hint() -> None:
    service, _ = await make()
    sent = await ask(service)
    outcome = await handle(service, callback(quote("deadbeef", "answer")))
    assert outcome == "hint_unknown_quote"
    assert (await service.get(sent.session_id)).status == "waiting"  # not taken by the only-waiting rule
    (hint,) = drain(service)
    assert "deadbeef" in hint.message


async def test_duplicate_msgid_recorded_once() -> None:
    service, _ = await make()
    sent = await ask(service)
    data = callback(quote(sent.short_id, "yes"), msgid="dup-1")
    assert await handle(service, data) == "matched_quote"
    assert await handle(service, data) == "duplicate"
    assert await handle(service, dict(data)) == "duplicate"
    assert len((await service.get(sent.session_id)).replies) == 1


async def test_duplicate_of_a_hinted_message_hints_once() -> None:
    service, _ = await make()
    data = callback("@Bot hi", msgid="dup-2")
    assert await handle(service, data) == "hint_chat_id"
    assert await handle(service, data) == "duplicate"
    assert len(drain(service)) == 1


async def test_enter_chat_event_is_not_a_reply() -> None:
    service, _ = await make()
    sent = await ask(service)
    event = callback(msgtype="event", event={"event_type": "enter_chat"}, chattype="single")
    del event["text"]
    assert await handle(service, event) == "event"
    assert (await service.get(sent.session_id)).status == "waiting"
    (hint,) = drain(service)
    assert CHAT in hint.message and "DEFAULT_CHAT_ID" in hint.message


async def test_delete_event_is_silent() -> None:
    service, _ = await make()
    event = callback(msgtype="event", event={"event_type": "delete_from_chat"})
    assert await handle(service, event) == "event"
    assert drain(service) == []


async def test_empty_answer_gives_hint_and_no_reply() -> None:
    service, _ = await make()
    sent = await ask(service)
    assert await handle(service, callback(f"@{ROBOT}")) == "hint_empty"
    assert (await service.get(sent.session_id)).replies == []
    assert len(drain(service)) == 1


async def test_image_reply_matches_with_url() -> None:
    service, _ = await make()
    sent = await ask(service)
    data = callback(msgtype="image", image={"image_url": "https://wework.test/1.png"})
    del data["text"]
    assert await handle(service, data) == "matched_only"
    reply = (await service.get(sent.session_id)).replies[0]
    assert reply.msg_type == "image"
    assert reply.image_url == "https://wework.test/1.png"


async def test_late_quote_reply_after_timeout() -> None:
    service, _ = await make()
    sent = await ask(service)
    assert await stop_waiting(service, sent.session_id) is True
    assert (await poll(service, sent.session_id)).status == "timeout"
    outcome = await handle(service, callback(quote(sent.short_id, "sorry, late")))
    assert outcome == "late"
    session = await service.get(sent.session_id)
    assert session.status == "timeout"
    (reply,) = session.replies
    assert reply.content == "sorry, late" and reply.matched_by == "late"
    result = await poll(service, sent.session_id)
    assert result.has_reply and result.replies[0].content == "sorry, late"
    (hint,) = drain(service)
    assert sent.short_id in hint.message
    assert hint.msg_type == "text"


async def test_plain_reply_does_not_go_to_timed_out_session() -> None:
    service, _ = await make()
    sent = await ask(service)
    await stop_waiting(service, sent.session_id)
    assert await handle(service, callback("@Bot answer")) == "hint_chat_id"
    assert (await service.get(sent.session_id)).replies == []


async def test_mark_timeout_unknown_session() -> None:
    service, _ = await make()
    assert await stop_waiting(service, "0" * 32) is False


async def test_poll_unknown_and_by_short_id() -> None:
    service, _ = await make()
    assert (await poll(service, "f" * 32)).status == "not_found"
    sent = await ask(service)
    assert (await poll(service, sent.short_id)).session_id == sent.session_id


# --- hints task -------------------------------------------------------------------------------------------------


async def test_notices_are_delivered_and_survive_failures() -> None:
    service, delivery = await make()
    task = asyncio.create_task(service.run_notices())
    try:
        delivery.fail_with = ChannelError("down")
        await handle(service, callback("@Bot a", chat="c1"))
        for _ in range(50):
            if service._notices.empty():
                break
            await asyncio.sleep(0.005)
        delivery.fail_with = None
        await handle(service, callback("@Bot b", chat="c2"))
        for _ in range(200):
            if delivery.hints:
                break
            await asyncio.sleep(0.005)
        assert [h.chat_id for h in delivery.hints] == ["c2"]
        assert not task.done()
    finally:
        task.cancel()


# --- long poll ----------------------------------------------------------------------------------------------------


async def test_long_poll_returns_soon_after_reply() -> None:
    service, _ = await make()
    sent = await ask(service)
    poll_task = asyncio.create_task(poll(service, sent.session_id, wait=5))
    await asyncio.sleep(0.05)
    assert not poll_task.done()
    replied_at = time.monotonic()
    await handle(service, callback(quote(sent.short_id, "now")))
    result = await asyncio.wait_for(poll_task, 2)
    elapsed = time.monotonic() - replied_at
    assert elapsed < 1.0
    assert result.status == "replied" and result.replies[0].content == "now"


async def test_long_poll_returns_after_wait_when_nothing_comes() -> None:
    service, _ = await make()
    sent = await ask(service)
    start = time.monotonic()
    result = await poll(service, sent.session_id, wait=0.2)
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 1.0
    assert result.status == "waiting" and not result.has_reply


async def test_long_poll_wakes_on_timeout_mark() -> None:
    service, _ = await make()
    sent = await ask(service)
    poll_task = asyncio.create_task(poll(service, sent.session_id, wait=5))
    await asyncio.sleep(0.02)
    await stop_waiting(service, sent.session_id)
    result = await asyncio.wait_for(poll_task, 1)
    assert result.status == "timeout"


async def test_several_long_polls_on_one_session_all_wake() -> None:
    service, _ = await make()
    sent = await ask(service)
    polls = [asyncio.create_task(poll(service, sent.session_id, wait=5)) for _ in range(3)]
    await asyncio.sleep(0.02)
    await handle(service, callback(quote(sent.short_id, "x")))
    results = await asyncio.wait_for(asyncio.gather(*polls), 1)
    assert [r.status for r in results] == ["replied"] * 3


# --- sweep --------------------------------------------------------------------------------------------------------


async def test_sweep_times_out_and_purges() -> None:
    clock = Clock()
    service, _ = await make(clock=clock, retention=3600)
    short = await ask(service, timeout=10)
    long = await ask(service, timeout=100)
    clock.now += 5
    await service.sweep()
    assert (await service.get(short.session_id)).status == "waiting"
    clock.now += 6
    await service.sweep()
    assert (await service.get(short.session_id)).status == "timeout"
    assert (await service.get(long.session_id)).status == "waiting"
    assert (await poll(service, short.session_id)).status == "timeout"
    clock.now += 3600 - 1
    await service.sweep()
    assert (await service.get(short.session_id)) is not None  # retained (late answers still land)
    clock.now += 2
    await service.sweep()
    assert (await service.get(short.session_id)) is None
    assert (await service.find(short.short_id)) is None
    assert (await poll(service, short.session_id)).status == "not_found"
    # The long one timed out at +100 and is still within retention.
    assert (await service.get(long.session_id)).status == "timeout"


async def test_sweep_purges_replied_sessions_after_retention() -> None:
    clock = Clock()
    service, _ = await make(clock=clock, retention=60)
    sent = await ask(service)
    await handle(service, callback(quote(sent.short_id, "ok")))
    clock.now += 59
    await service.sweep()
    assert (await service.get(sent.session_id)) is not None
    clock.now += 2
    await service.sweep()
    assert (await service.get(sent.session_id)) is None


# --- many at once -----------------------------------------------------------------------------------------------


async def test_200_concurrent_questions_and_quote_replies() -> None:
    service, delivery = await make()
    responses = await asyncio.gather(
        *(service.send(SendRequest(message=f"question {i}", chat_id=CHAT, project_name="load")) for i in range(200))
    )
    assert all(r.success for r in responses)
    assert len({r.short_id for r in responses}) == 200
    assert len(delivery.messages) == 200
    order = list(responses)
    random.Random(42).shuffle(order)
    outcomes = await asyncio.gather(
        *(handle(service, callback(quote(r.short_id, f"answer for {r.short_id}", "load"))) for r in order)
    )
    assert outcomes == ["matched_quote"] * 200
    for r in responses:
        session = await service.get(r.session_id)
        assert session.status == "replied"
        assert [reply.content for reply in session.replies] == [f"answer for {r.short_id}"]
    assert drain(service) == []


# --- persistence --------------------------------------------------------------------------------------------------


async def test_sqlite_store_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "hil.db"
    service, _ = await make(path)
    replied = await ask(service, message="答复我")
    waiting = await ask(service, message="still waiting", timeout=500)
    failing = FakeChannel()
    failing.fail_with = ChannelError("down")
    failed_service = HilService(service.repo, failing, notifier=service.notifier)
    failed = await failed_service.send(SendRequest(message="fails", chat_id=CHAT))
    await handle(service, callback(quote(replied.short_id, "好的"), msgid="persist-1"))
    await handle(service, callback("@Bot ?", chat="wrkNobody", msgid="persist-2"))
    before = {s.session_id: s.model_dump() for s in await service.repo.questions()}
    await close_service(service)

    service2, _ = await make(path)
    try:
        after = {s.session_id: s.model_dump() for s in await service2.repo.questions()}
        assert after == before
        assert (await service2.get(replied.session_id)).status == "replied"
        assert (await service2.get(replied.session_id)).replies[0].content == "好的"
        assert (await service2.get(waiting.session_id)).status == "waiting"
        assert (await service2.get(failed.session_id)).status == "failed"
        assert (await service2.find(waiting.short_id)).session_id == waiting.session_id
        assert [s.session_id for s in await service2.repo.open_in_chat(CHAT)] == [waiting.session_id]
        # A redelivered callback after a restart is still a duplicate, taken or not.
        again = callback(quote(replied.short_id, "好的"), msgid="persist-1")
        assert await handle(service2, again) == "duplicate"
        assert await handle(service2, callback("@Bot ?", chat="wrkNobody", msgid="persist-2")) == "duplicate"
        assert await handle(service2, callback("@Bot ?", chat="wrkNobody", msgid="persist-3")) == "hint_chat_id"
    finally:
        await close_service(service2)


async def test_old_msgids_are_forgotten_in_memory_and_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite3"
    store = await open_store(path)
    try:
        await store.save(msgid="old")
        await asyncio.sleep(0.01)
        cutoff = time.time()
        await asyncio.sleep(0.01)
        await store.save(msgid="new")
        await store.forget_msgids(cutoff)
        assert not store.seen_msgid("old") and store.seen_msgid("new")
    finally:
        await store.close()
    reopened = await open_store(path)
    try:
        assert not reopened.seen_msgid("old") and reopened.seen_msgid("new")
    finally:
        await reopened.close()


async def test_sqlite_delete_is_durable(tmp_path: Path) -> None:
    path = tmp_path / "hil.db"
    clock = Clock()
    service, _ = await make(path, clock=clock, retention=10)
    sent = await ask(service, timeout=5)
    clock.now += 100
    await service.sweep()  # times out
    assert (await service.get(sent.session_id)).status == "timeout"
    clock.now += 11
    await service.sweep()  # purges
    assert await service.get(sent.session_id) is None
    await close_service(service)
    reopened, _ = await make(path)
    try:
        assert await reopened.get(sent.session_id) is None
        assert sum((await reopened.repo.counts()).values()) == 0
    finally:
        await close_service(reopened)


async def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite3"
    await (await SqlitePersistence.open(path)).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        await SqlitePersistence.open(path)
