"""Nothing acknowledged before it is durable, no phantom questions, late plain answers while the agent waits again
(unit level: the service and store with a persistence that can be made to fail; e2e in tests/test_faults.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hil_protocol.callback import parse_callback
from hil_protocol.outbound import Notice, Question, SendReceipt
from hil_server.app import create_app
from hil_server.models import SendRequest
from hil_server.notifier import LocalNotifier
from hil_server.repository import RepositoryUnavailable
from hil_server.repository.sqlite import SqliteRepository
from hil_server.service import HilService
from hil_server.store import StoreUnavailable
from tests.helpers import callback_body
from tests.server_fixtures import WeCom, settings


class FlakyDisk(SqliteRepository):
    """The SQLite repository failing every write while `full` is set, like a full disk."""

    full = False

    async def _write(self, fn: Any) -> Any:
        if self.full:
            raise RepositoryUnavailable("the SQLite database cannot write (OperationalError: database or disk is full)")
        return await super()._write(fn)


class Channel:
    name = "test"

    def __init__(self) -> None:
        self.questions: list[Question] = []
        self.notices: list[Notice] = []
        self.block: asyncio.Event | None = None
        self.sending = asyncio.Event()

    async def send_question(self, question: Question) -> SendReceipt:
        self.questions.append(question)
        self.sending.set()
        if self.block is not None:
            await self.block.wait()
        return SendReceipt()

    async def send_notice(self, notice: Notice) -> None:
        self.notices.append(notice)


async def service_on(path: Path) -> tuple[HilService, FlakyDisk, Channel]:
    notifier = LocalNotifier()
    disk = await FlakyDisk.open(path, notify=notifier.wake)
    channel = Channel()
    return HilService(disk, channel, notifier=notifier), disk, channel  # type: ignore[arg-type]


async def test_a_failed_write_is_never_acknowledged_and_nothing_is_lost(tmp_path: Path) -> None:
    service, disk, _ = await service_on(tmp_path / "s.sqlite3")
    sent = await service.send(SendRequest(message="上线？", chat_id="c"))
    reply = parse_callback(callback_body("可以", chat="c", msgid="m-1"))
    disk.full = True
    with pytest.raises(StoreUnavailable):
        await service.handle_message(reply)
    assert service.broken is not None
    # WeCom's retry of the same msgid: still refused (not "duplicate"), and polls say the store is down.
    with pytest.raises(StoreUnavailable):
        await service.handle_message(reply)
    with pytest.raises(StoreUnavailable):
        await service.poll(await service.get(sent.session_id))  # type: ignore[arg-type]
    assert not await service.recover()
    disk.full = False
    assert await service.recover()
    session = await service.get(sent.session_id)
    assert session is not None and session.status == "waiting" and not session.replies  # nothing half-written
    assert await service.handle_message(reply) == "matched_only"
    assert await service.handle_message(reply) == "duplicate"
    await disk.close()
    reopened, _, _ = await service_on(tmp_path / "s.sqlite3")
    (saved,) = (await reopened.get(sent.session_id)).replies  # type: ignore[union-attr]
    assert saved.content == "可以"
    await reopened.repo.close()


def test_the_callback_route_answers_503_while_the_store_is_down(tmp_path: Path, wecom: WeCom) -> None:
    app = create_app(settings(tmp_path, hil_store_retry_interval=0.05))
    with TestClient(app) as client:
        sent = client.post("/api/send", json={"message": "q", "chat_id": "chatA"}).json()
        repo = client.app_state["service"].repo
        real_write = repo._write

        async def full(*args: object, **kwargs: object) -> None:
            raise RepositoryUnavailable("the SQLite database cannot write (OperationalError: database or disk is full)")

        repo._write = full
        response = client.post("/api/callback", json=callback_body("好", chat="chatA", msgid="f-1"))
        assert response.status_code == 503 and "send it again" in response.json()["errmsg"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert "cannot write" in health.json()["reason"]
        assert client.get(f"/api/poll/{sent['session_id']}").status_code == 503
        repo._write = real_write
        for _ in range(200):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.02)
        assert client.get("/health").status_code == 200
        assert client.post("/api/callback", json=callback_body("好", chat="chatA", msgid="f-1")).status_code == 200
        assert client.get(f"/api/poll/{sent['session_id']}").json()["status"] == "replied"


async def test_a_question_still_sending_is_not_answered_by_plain_replies_nor_listed(tmp_path: Path) -> None:
    service, _, channel = await service_on(tmp_path / "s.sqlite3")
    channel.block = asyncio.Event()
    sending = asyncio.create_task(service.send(SendRequest(message="长问题", chat_id="c")))
    await channel.sending.wait()
    (session,) = await service.repo.questions()
    assert session.status == "sending"
    assert await service.handle_message(parse_callback(callback_body("好", chat="c", msgid="s-1"))) == "hint_chat_id"
    # A quote-reply to a part the person already sees is an answer.
    quoted = f"\u201c[#{session.short_id}]\n长问题\u201d\n------\n好"
    assert await service.handle_message(parse_callback(callback_body(quoted, chat="c", msgid="s-2"))) == (
        "matched_quote"
    )
    channel.block.set()
    sent = await sending
    assert sent.success and (await service.get(session.session_id)).status == "replied"  # type: ignore[union-attr]


async def test_questions_interrupted_while_sending_fail_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    service, disk, channel = await service_on(path)
    channel.block = asyncio.Event()
    sending = asyncio.create_task(service.send(SendRequest(message="发到一半", chat_id="c")))
    await channel.sending.wait()
    sending.cancel()  # the process dies here: the row says "sending"
    await disk.close()

    restarted, _, _ = await service_on(path)
    (session,) = await restarted.repo.questions()
    assert session.status == "sending"
    await restarted.resolve_interrupted()
    session = await restarted.get(session.session_id)  # type: ignore[assignment]
    assert session.status == "failed" and "重启" in (session.error or "")
    assert (await restarted.waiting()) == []
    notice = await restarted._notices.get()
    assert notice.chat_id == "c" and session.short_id in notice.text
    result = await restarted.poll(session)
    assert result.status == "failed"


async def test_waiting_again_after_a_timeout_takes_plain_replies(tmp_path: Path) -> None:
    service, _, _ = await service_on(tmp_path / "s.sqlite3")
    sent = await service.send(SendRequest(message="q", chat_id="c"))
    session = await service.get(sent.session_id)
    assert session is not None
    await service.mark_timeout(session)
    session = await service.get(sent.session_id)  # the agent's next wait finds it timed out
    assert session is not None
    assert await service.handle_message(parse_callback(callback_body("迟到", chat="c", msgid="l-1"))) == "hint_chat_id"

    async def reply_soon() -> None:
        await asyncio.sleep(0.05)
        await service.handle_message(parse_callback(callback_body("现在答", chat="c", msgid="l-2")))

    replier = asyncio.create_task(reply_soon())
    result = await service.poll(session, wait=2)
    await replier
    assert result.status == "replied" and result.replies[0].content == "现在答"
