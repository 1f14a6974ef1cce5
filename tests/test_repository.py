"""The repository's contract (hil_server/repository), the same tests over both backends: SQLite in tmp_path and
PostgreSQL on the throwaway cluster of tests/conftest_pg.py (a fresh schema per test). Then what only PostgreSQL can
do wrong: connections killed mid-operation, the server restarted, the LISTEN connection dropped."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hil_protocol.api_models import Person
from hil_server.lifecycle import OPEN, Status, Timer
from hil_server.models import Refused, Reply, Session
from hil_server.notifier import LocalNotifier, Notifier, PgNotifier
from hil_server.repository import (
    OUTBOX_KEY,
    AuditItem,
    Conflict,
    NotFound,
    OutboxItem,
    Repository,
    RepositoryUnavailable,
    SchemaTooNew,
    ShortIdExhausted,
    StoredQuestion,
    open_repository,
    open_with_notifier,
    outbox_key,
)
from hil_server.repository import schema as repo_schema
from hil_server.repository.sqlite import SqliteRepository
from tests.conftest_pg import PgServer

T0 = 1_000_000.0


@dataclass
class Backend:
    kind: str
    tmp: Path
    url: str | None = None  # postgres: the test's schema
    server: PgServer | None = None
    opened: list[Any] = field(default_factory=list)

    async def open(
        self, short_ids: Callable[[], str] | None = None, timeout: float = 3.0
    ) -> tuple[Repository, Notifier]:
        extra: dict[str, Any] = {"short_ids": short_ids} if short_ids else {}
        if self.kind == "sqlite":
            local = LocalNotifier()
            repo: Any = await SqliteRepository.open(self.tmp / "hil.db", notify=local.wake, **extra)
            self.opened += [repo, local]
            return repo, local
        from hil_server.repository.postgres import PostgresRepository

        assert self.url is not None
        channel = f"hil_{uuid.uuid4().hex[:8]}"
        repo = await PostgresRepository.open(self.url, channel=channel, timeout=timeout, **extra)
        self.opened.append(repo)
        notifier = PgNotifier(self.url, channel, idle=0.2, backoff_min=0.05, backoff_max=0.5, connect_timeout=2)
        self.opened.append(notifier)
        await notifier.start(wait=10)
        assert notifier.connected
        return repo, notifier


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b = Backend(request.param, tmp_path)
    if request.param == "postgres":
        b.url = request.getfixturevalue("pg_url")
        b.server = request.getfixturevalue("pg_server")
    try:
        yield b
    finally:
        for thing in reversed(b.opened):
            await thing.close()


@pytest.fixture
async def repo(backend: Backend) -> Repository:
    opened, _ = await backend.open()
    return opened


def question(
    *, chat_id: str | None = "chat-a", owner: str | None = None, status: str = "waiting", at: float = T0, **kw: Any
) -> Session:
    return Session(
        session_id=uuid.uuid4().hex,
        short_id="",
        chat_id=chat_id,
        message="部署到生产环境吗？",
        status=status,  # type: ignore[arg-type]
        created_at=at,
        deadline=at + 60,
        owner=owner,
        **kw,
    )


def reply(msgid: str | None, text: str = "好的", userid: str = "alice") -> Reply:
    return Reply(msg_type="text", content=text, msgid=msgid, from_user=Person(userid=userid), timestamp=T0)


def always(_: StoredQuestion) -> bool:
    return True


# --- questions ---------------------------------------------------------------------------------------------------


async def test_create_get_find(repo: Repository) -> None:
    created = await repo.create_question(question(project_name="demo", options=["是", "否"]))
    assert len(created.short_id) == 8 and created.status == Status.WAITING
    got = await repo.get(created.session_id)
    assert got == created
    assert got is not None and got.project_name == "demo" and got.options == ["是", "否"] and got.replies == []
    assert await repo.find(created.short_id) == created
    assert await repo.find(created.session_id) == created
    assert await repo.get("0" * 32) is None and await repo.find("deadbeef") is None
    with pytest.raises(Conflict):  # the same question id twice
        await repo.create_question(question().model_copy(update={"session_id": created.session_id}))


async def test_short_ids_stay_unique_when_the_generator_collides(backend: Backend) -> None:
    counter = itertools.count()
    repo, _ = await backend.open(short_ids=lambda: f"{next(counter) // 2:08x}")  # every id offered twice
    created = await asyncio.gather(*(repo.create_question(question()) for _ in range(50)))
    assert len({q.short_id for q in created}) == 50


async def test_short_id_is_held_only_while_open(backend: Backend) -> None:
    repo, _ = await backend.open(short_ids=lambda: "0000abcd")
    first = await repo.create_question(question())
    with pytest.raises(ShortIdExhausted):
        await repo.create_question(question())
    assert await repo.transition(first.session_id, Status.TIMEOUT, now=T0 + 1) is not None
    second = await repo.create_question(question(at=T0 + 2))
    assert second.short_id == first.short_id
    # find() prefers the open question holding the short id
    assert (await repo.find("0000abcd")) == second
    # the first cannot reopen while the second holds its short id
    with pytest.raises(Conflict):
        await repo.transition(first.session_id, Status.WAITING, now=T0 + 3, deadline=T0 + 100)


def test_the_partial_index_spells_lifecycle_open() -> None:
    assert set(repo_schema.OPEN_STATUSES_IN_INDEX) == {s.value for s in OPEN}
    clause = f"WHERE status IN {repo_schema.OPEN_STATUSES_IN_INDEX!r}"
    assert all(clause in m for m in (repo_schema.SQLITE[0], repo_schema.POSTGRES[0]))


async def test_transition_is_conditional(repo: Repository) -> None:
    q = await repo.create_question(question(status="sending"))
    outbox = [OutboxItem("notice", {"text": "已超时"}, chat_id="chat-a")]
    audit = [AuditItem("timeout", question_id=q.session_id)]
    sent = await repo.transition(q.session_id, Status.WAITING, now=T0 + 1)
    assert sent is not None and sent.status == Status.WAITING and sent.closed_at is None
    timed_out = await repo.transition(q.session_id, Status.TIMEOUT, now=T0 + 2, outbox=outbox, audit=audit)
    assert timed_out is not None and timed_out.closed_at == T0 + 2
    # lost: nothing written, not the outbox or audit rows either
    assert await repo.transition(q.session_id, Status.FAILED, now=T0 + 3, error="x", outbox=outbox, audit=audit) is None
    assert await repo.transition("f" * 32, Status.TIMEOUT, now=T0) is None
    assert len(await repo.claim_outbox("w", now=T0 + 10, lease=5, limit=10)) == 1
    assert len(await repo.audit()) == 1
    # the agent waits again: reopened with a new deadline
    reopened = await repo.transition(q.session_id, Status.WAITING, now=T0 + 4, deadline=T0 + 500)
    assert reopened is not None and reopened.closed_at is None and reopened.deadline == T0 + 500
    failed = await repo.transition(q.session_id, Status.FAILED, now=T0 + 5, error="发送失败")
    assert failed is not None and failed.error == "发送失败"


async def test_record_reply_and_duplicate_msgid(repo: Repository) -> None:
    q = await repo.create_question(question())
    first = await repo.record_reply(q.session_id, reply("m1"), now=T0 + 1, close=always)
    assert first.new and first.closed and first.question is not None
    assert first.question.status == Status.REPLIED and first.question.replies[0].content == "好的"
    again = await repo.record_reply(
        q.session_id,
        reply("m1", "又一次"),
        now=T0 + 2,
        close=always,
        outbox=[OutboxItem("hint", {})],
        audit=[AuditItem("reply")],
    )
    assert (again.new, again.closed, again.question) == (False, False, None)
    # a late answer is kept, and closes nothing
    late = await repo.record_reply(q.session_id, reply("m2", "晚了"), now=T0 + 3, close=always)
    assert late.new and not late.closed and late.question is not None
    assert [r.content for r in late.question.replies] == ["好的", "晚了"]
    assert await repo.claim_outbox("w", now=T0 + 10, lease=5) == [] and await repo.audit() == []
    with pytest.raises(NotFound):
        await repo.record_reply("e" * 32, reply("m3"), now=T0)
    # the msgid of a reply to a missing question was not kept
    assert await repo.record_msgid("m3", now=T0)


async def test_the_same_msgid_at_once_is_recorded_once(repo: Repository) -> None:
    q = await repo.create_question(question())
    results = await asyncio.gather(
        *(repo.record_reply(q.session_id, reply("retried", f"第{i}次"), now=T0) for i in range(4))
    )
    assert sorted(r.new for r in results) == [False, False, False, True]
    got = await repo.get(q.session_id)
    assert got is not None and len(got.replies) == 1


async def test_reply_without_close_rule_leaves_it_open(repo: Repository) -> None:
    q = await repo.create_question(question())
    result = await repo.record_reply(q.session_id, reply(None), now=T0 + 1, close=lambda q: len(q.replies) >= 2)
    assert result.new and not result.closed and result.question is not None
    assert result.question.status == Status.WAITING


async def test_refused_and_msgids(repo: Repository) -> None:
    q = await repo.create_question(question(responders=["bob"]))
    refused = Refused(userid="mallory", name="M", at=T0, text="批准")
    result = await repo.record_refused(q.session_id, refused, now=T0, msgid="r1")
    assert result.new and result.question is not None and result.question.refused == [refused]
    assert not (await repo.record_refused(q.session_id, refused, now=T0, msgid="r1")).new
    assert await repo.record_msgid("hint-1", now=T0, outbox=[OutboxItem("hint", {"text": "chat id"})])
    assert not await repo.record_msgid("hint-1", now=T0, outbox=[OutboxItem("hint", {"text": "chat id"})])
    assert len(await repo.claim_outbox("w", now=T0, lease=5, limit=10)) == 1


async def test_two_approvers_at_once_are_both_recorded(repo: Repository) -> None:
    def two_approvals(q: StoredQuestion) -> bool:
        return len({r.from_user.userid for r in q.replies}) >= 2

    for i in range(5):
        q = await repo.create_question(question(responders=["alice", "bob"], approvals_required=2))
        a, b = await asyncio.gather(
            repo.record_reply(q.session_id, reply(f"a{i}", "批准", "alice"), now=T0, close=two_approvals),
            repo.record_reply(q.session_id, reply(f"b{i}", "批准", "bob"), now=T0, close=two_approvals),
        )
        assert a.new and b.new and sorted([a.closed, b.closed]) == [False, True]
        final = await repo.get(q.session_id)
        assert final is not None and final.status == Status.REPLIED
        assert sorted(r.from_user.userid for r in final.replies) == ["alice", "bob"]


async def test_a_reply_racing_the_sweeper_exactly_one_closes(repo: Repository) -> None:
    for i in range(8):
        q = await repo.create_question(question())
        result, swept = await asyncio.gather(
            repo.record_reply(q.session_id, reply(f"m{i}"), now=T0 + 61, close=always),
            repo.transition(q.session_id, Status.TIMEOUT, now=T0 + 61),
        )
        assert result.new and result.closed != (swept is not None)
        final = await repo.get(q.session_id)
        assert final is not None and len(final.replies) == 1  # the reply is kept either way
        assert final.status == (Status.REPLIED if result.closed else Status.TIMEOUT)


async def test_open_in_chat_due_newest_open(repo: Repository) -> None:
    a1 = await repo.create_question(question(chat_id="chat-a", owner="ci", at=T0))
    anywhere = await repo.create_question(question(chat_id=None, owner="ci", at=T0 + 1))
    await repo.create_question(question(chat_id="chat-b", at=T0 + 2))
    sending = await repo.create_question(question(chat_id="chat-a", status="sending", owner="ci", at=T0 + 3))
    assert [q.session_id for q in await repo.open_in_chat("chat-a")] == [a1.session_id, anywhere.session_id]
    assert [q.session_id for q in await repo.open_in_chat(None)] == [anywhere.session_id]
    # deadlines are T0+60.. T0+63; a question being sent does not time out
    assert [q.session_id for q in await repo.due(T0 + 61)] == [a1.session_id, anywhere.session_id]
    assert len(await repo.due(T0 + 1000)) == 3 and await repo.due(T0) == []
    newest = await repo.newest_open("ci")
    assert newest is not None and newest.session_id == sending.session_id
    await repo.transition(sending.session_id, Status.FAILED, now=T0 + 4)
    await repo.transition(anywhere.session_id, Status.TIMEOUT, now=T0 + 5)
    newest = await repo.newest_open("ci")  # timed out: still awaitable
    assert newest is not None and newest.session_id == anywhere.session_id
    assert (await repo.newest_open(None)) is not None and await repo.newest_open("nobody") is None
    counts = await repo.counts()
    assert counts == {Status.WAITING: 2, Status.FAILED: 1, Status.TIMEOUT: 1}
    assert len(await repo.questions(statuses=[Status.WAITING])) == 2 and len(await repo.questions(limit=3)) == 3


async def test_reminder_and_escalation_timers(repo: Repository) -> None:
    q = await repo.create_question(question())
    assert await repo.set_timers(q.session_id, now=T0, next_remind_at=T0 + 10, escalate_at=T0 + 30)
    assert [x.session_id for x in await repo.due(T0 + 11, Timer.REMIND)] == [q.session_id]
    assert await repo.due(T0 + 11, Timer.ESCALATE) == []
    assert await repo.set_timers(q.session_id, now=T0 + 11, next_remind_at=T0 + 20, reminders_sent=1)
    got = await repo.get(q.session_id)
    assert got is not None and got.reminders_sent == 1 and got.escalate_at is None
    await repo.transition(q.session_id, Status.REPLIED, now=T0 + 12)
    assert not await repo.set_timers(q.session_id, now=T0 + 13, next_remind_at=T0 + 30)
    assert await repo.due(T0 + 100, Timer.REMIND) == []


async def test_purge(repo: Repository) -> None:
    old = await repo.create_question(question())
    await repo.record_reply(old.session_id, reply("old-msg"), now=T0 + 1, close=always)
    still_open = await repo.create_question(question())
    recent = await repo.create_question(question())
    await repo.transition(recent.session_id, Status.TIMEOUT, now=T0 + 500)
    await repo.append_audit([AuditItem("a")], now=T0)
    await repo.append_audit([AuditItem("b")], now=T0 + 500)
    [row] = await repo.enqueue([OutboxItem("notice", {})], now=T0)
    await repo.claim_outbox("w", now=T0, lease=5)
    await repo.complete_outbox(row, "w", now=T0 + 1)
    purged = await repo.purge(
        closed_before=T0 + 100, msgids_before=T0 + 100, outbox_before=T0 + 100, audit_before=T0 + 100
    )
    assert (purged.questions, purged.msgids, purged.outbox, purged.audit) == (1, 1, 1, 1)
    assert await repo.get(old.session_id) is None
    assert await repo.get(still_open.session_id) is not None and await repo.get(recent.session_id) is not None
    assert await repo.record_msgid("old-msg", now=T0 + 600)  # forgotten, so new again
    assert [a.kind for a in await repo.audit()] == ["b"] and await repo.get_outbox(row) is None


# --- outbox ------------------------------------------------------------------------------------------------------


async def test_outbox_in_the_same_transaction_and_in_order_per_chat(repo: Repository) -> None:
    q = await repo.create_question(
        question(), outbox=[OutboxItem("question", {"text": "q"}, chat_id="chat-a")], audit=[AuditItem("created")]
    )
    await repo.enqueue(
        [OutboxItem("notice", {"n": 2}, chat_id="chat-a"), OutboxItem("notice", {"n": 3}, chat_id="chat-b")], now=T0
    )
    first = await repo.claim_outbox("w1", now=T0, lease=30, limit=10)
    # chat-a's second row waits for its first; chat-b's goes now
    assert [(r.kind, r.chat_id) for r in first] == [("question", "chat-a"), ("notice", "chat-b")]
    assert first[0].question_id == q.session_id and first[0].payload == {"text": "q"} and first[0].attempts == 1
    assert await repo.claim_outbox("w2", now=T0, lease=30, limit=10) == []
    assert await repo.complete_outbox(first[0].id, "w1", now=T0 + 1)
    assert not await repo.complete_outbox(first[0].id, "w1", now=T0 + 1)  # done already
    [nxt] = await repo.claim_outbox("w2", now=T0 + 1, lease=30, limit=10)
    assert nxt.payload == {"n": 2}
    assert not await repo.complete_outbox(nxt.id, "w1", now=T0 + 2)  # not its holder
    # a failed send is retried from retry_at, or fails for good
    assert await repo.fail_outbox(nxt.id, "w2", now=T0 + 2, error="45009", retry_at=T0 + 10)
    assert await repo.claim_outbox("w2", now=T0 + 5, lease=30) == []
    [retry] = await repo.claim_outbox("w2", now=T0 + 10, lease=30)
    assert retry.id == nxt.id and retry.attempts == 2 and retry.error == "45009"
    assert await repo.fail_outbox(retry.id, "w2", now=T0 + 11, error="gone")
    row = await repo.get_outbox(retry.id)
    assert row is not None and row.state == "failed"
    assert [a.kind for a in await repo.audit(question_id=q.session_id)] == ["created"]
    assert len(await repo.claim_outbox("w", now=T0 + 1, lease=30, kinds=["question"])) == 0


async def test_two_claimers_never_get_the_same_row(repo: Repository) -> None:
    await repo.enqueue([OutboxItem("notice", {"i": i}, chat_id=f"chat-{i}") for i in range(40)], now=T0)
    seen: list[int] = []

    async def claimer(name: str) -> None:
        while rows := await repo.claim_outbox(name, now=T0, lease=30, limit=3):
            seen.extend(r.id for r in rows)
            for r in rows:
                assert await repo.complete_outbox(r.id, name, now=T0)

    await asyncio.gather(claimer("w1"), claimer("w2"), claimer("w3"))
    assert len(seen) == 40 and len(set(seen)) == 40


async def test_an_expired_claim_is_reported_and_resolved_once(repo: Repository) -> None:
    q = await repo.create_question(question(), outbox=[OutboxItem("question", {}, chat_id="chat-a")])
    [row] = await repo.claim_outbox("dead-worker", now=T0, lease=10)
    assert await repo.expired_claims(T0 + 5) == []
    assert await repo.extend_claim(row.id, "dead-worker", now=T0 + 5, lease=10)
    [expired] = await repo.expired_claims(T0 + 16)
    assert expired.id == row.id and expired.holder == "dead-worker" and expired.state == "claimed"
    notice = OutboxItem("notice", {"text": "不要回答"}, chat_id="chat-a")
    outcomes = await asyncio.gather(
        *(repo.abandon_claim(row.id, now=T0 + 16, error="holder died", outbox=[notice]) for _ in range(3))
    )
    assert sorted(outcomes) == [False, False, True]
    assert not await repo.complete_outbox(row.id, "dead-worker", now=T0 + 17)  # never counted as sent
    got = await repo.get_outbox(row.id)
    assert got is not None and got.state == "abandoned" and got.question_id == q.session_id
    [told] = await repo.claim_outbox("w", now=T0 + 17, lease=10, limit=10)
    assert told.payload == {"text": "不要回答"} and told.question_id == q.session_id
    assert await repo.complete_outbox(told.id, "w", now=T0 + 18)
    assert await repo.expired_claims(T0 + 100) == []


# --- audit -------------------------------------------------------------------------------------------------------


async def test_audit_append_query_purge(repo: Repository) -> None:
    await repo.append_audit([AuditItem("sent", chat_id="a", owner="ci", data={"k": "值"})], now=T0)
    await repo.append_audit([AuditItem("replied", chat_id="a", owner="dev", actor="alice")], now=T0 + 10)
    await repo.append_audit([AuditItem("sent", chat_id="b", owner="ci")], now=T0 + 20)
    assert [a.kind for a in await repo.audit()] == ["sent", "replied", "sent"]
    assert [a.at for a in await repo.audit(since=T0 + 10)] == [T0 + 10, T0 + 20]
    assert [a.owner for a in await repo.audit(chat_id="a")] == ["ci", "dev"]
    [ci_a] = await repo.audit(owner="ci", chat_id="a")
    assert ci_a.data == {"k": "值"}
    assert len(await repo.audit(limit=1)) == 1
    assert (await repo.purge(closed_before=0, msgids_before=0, audit_before=T0 + 15)).audit == 2
    assert [a.chat_id for a in await repo.audit()] == ["b"]


# --- notifier ----------------------------------------------------------------------------------------------------


async def test_a_change_wakes_its_waiter(backend: Backend) -> None:
    repo, notifier = await backend.open()
    q = await repo.create_question(question())
    other = await repo.create_question(question())
    async with notifier.subscribe(q.session_id) as sub, notifier.subscribe(other.session_id) as idle:
        # the notifications of their creation may still be on their way (a spurious wake-up is allowed: waiters
        # read again); let them arrive
        await asyncio.gather(sub.wait(0.3), idle.wait(0.3))
        waiter = asyncio.create_task(sub.wait(10))
        await asyncio.sleep(0)
        await repo.record_reply(q.session_id, reply("m1"), now=T0, close=always)
        assert await waiter
        assert not await idle.wait(0.05)
    # an outbox row's end wakes whoever waits on it (/api/send waits for its question to be sent)
    [row] = await repo.enqueue([OutboxItem("question", {})], now=T0)
    async with notifier.subscribe(outbox_key(row)) as sub, notifier.subscribe(OUTBOX_KEY) as drainers:
        await repo.enqueue([OutboxItem("notice", {}, chat_id="x")], now=T0)
        assert await drainers.wait(10)
        await repo.claim_outbox("w", now=T0, lease=10)
        await repo.complete_outbox(row, "w", now=T0)
        assert await sub.wait(10)
    # publish() outside a change
    assert not await notifier.wait("nothing", 0.05)
    waiter = asyncio.create_task(notifier.wait("k", 10))
    await asyncio.sleep(0.05)
    await notifier.publish("k")
    assert await waiter


# --- schema ------------------------------------------------------------------------------------------------------


async def test_reopening_keeps_the_data_and_a_newer_schema_is_refused(backend: Backend, tmp_path: Path) -> None:
    repo, _ = await backend.open()
    q = await repo.create_question(question())
    again, _ = await backend.open()
    assert await again.get(q.session_id) == q
    if backend.kind == "sqlite":
        await repo.close()
        await again.close()
        backend.opened.clear()
        with sqlite3.connect(tmp_path / "hil.db") as conn:
            conn.execute("INSERT INTO schema_version VALUES (99, 0)")
        with pytest.raises(SchemaTooNew, match="upgrade"):
            await SqliteRepository.open(tmp_path / "hil.db")
    else:
        import psycopg

        assert backend.url is not None
        async with await psycopg.AsyncConnection.connect(backend.url, autocommit=True) as conn:
            await conn.execute("INSERT INTO schema_version VALUES (99, 0)")
        with pytest.raises(SchemaTooNew, match="upgrade"):
            await backend.open()


async def test_open_repository_picks_the_backend_by_url(tmp_path: Path) -> None:
    repo = await open_repository(f"sqlite:///{tmp_path}/x.db")
    try:
        assert isinstance(repo, SqliteRepository) and (tmp_path / "x.db").exists()
    finally:
        await repo.close()
    with pytest.raises(ValueError, match="postgresql://"):
        await open_repository("host=127.0.0.1 dbname=hil")


async def test_open_with_notifier_wires_the_wake_ups(backend: Backend, tmp_path: Path) -> None:
    url = backend.url if backend.kind == "postgres" else f"sqlite:///{tmp_path}/y.db"
    assert url is not None
    repo, notifier = await open_with_notifier(url)
    backend.opened += [repo, notifier]
    assert type(repo).__name__ == ("PostgresRepository" if backend.kind == "postgres" else "SqliteRepository")
    assert type(notifier).__name__ == ("PgNotifier" if backend.kind == "postgres" else "LocalNotifier")
    q = await repo.create_question(question())
    async with notifier.subscribe(q.session_id) as sub:
        await repo.transition(q.session_id, Status.CANCELLED, now=T0)
        assert await sub.wait(10)


async def test_sqlite_errors_become_repository_errors(tmp_path: Path) -> None:
    repo = await SqliteRepository.open(tmp_path / "hil.db")
    try:
        # a database that takes no writes (read-only, as a full or failing disk refuses them): no sqlite3.Error
        # reaches the caller, and nothing is half-written
        await repo._write(lambda tx: tx.conn.execute("PRAGMA query_only = ON"))
        with pytest.raises(RepositoryUnavailable, match="readonly"):
            await repo.create_question(question())
        with pytest.raises(RepositoryUnavailable):
            await repo.ping()
        # (the writer itself cannot undo it: every batch it starts is refused; it is idle now)
        await asyncio.to_thread(repo._conn.execute, "PRAGMA query_only = OFF")
        await repo.ping()  # writable again: the next operation works
        assert await repo.questions() == []
    finally:
        await repo.close()
    with pytest.raises(RepositoryUnavailable, match="closed"):
        await repo.ping()


# --- PostgreSQL faults -------------------------------------------------------------------------------------------


@pytest.fixture
async def pg(pg_url: str, pg_server: PgServer, tmp_path: Path) -> AsyncIterator[Backend]:
    b = Backend("postgres", tmp_path, url=pg_url, server=pg_server)
    try:
        yield b
    finally:
        for thing in reversed(b.opened):
            await thing.close()


async def _admin(server: PgServer, sql: str, args: list[Any] | None = None) -> list[tuple[Any, ...]]:
    import psycopg

    async with await psycopg.AsyncConnection.connect(server.url, autocommit=True) as conn:
        cur = await conn.execute(sql, args)  # type: ignore[arg-type]
        return await cur.fetchall() if cur.description else []


async def _eventually(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            result = await check()
            if result:
                return result
        except RepositoryUnavailable:
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("not within the timeout")
        await asyncio.sleep(0.1)


async def test_pg_connection_killed_mid_operation(pg: Backend) -> None:
    import psycopg

    assert pg.url is not None and pg.server is not None
    repo, _ = await pg.open()
    q = await repo.create_question(question())
    async with await psycopg.AsyncConnection.connect(pg.url) as blocker:
        # hold the question's row, so the reply's transaction stops midway (msgid written, row lock awaited)
        await blocker.execute("SELECT 1 FROM questions WHERE id = %s FOR UPDATE", [q.session_id])
        task = asyncio.create_task(
            repo.record_reply(
                q.session_id,
                reply("m-killed"),
                now=T0,
                close=always,
                outbox=[OutboxItem("card", {})],
                audit=[AuditItem("replied")],
            )
        )

        async def blocked_pid() -> int | None:
            rows = await _admin(
                pg.server,  # type: ignore[arg-type]
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE%'",
            )
            return rows[0][0] if rows else None

        pid = await _eventually(blocked_pid, timeout=10)
        await _admin(pg.server, "SELECT pg_terminate_backend(%s)", [pid])
        with pytest.raises(RepositoryUnavailable):
            await task
        await blocker.rollback()
    # nothing of it was written: not the msgid, the reply, the outbox row or the audit row
    got = await repo.get(q.session_id)
    assert got is not None and got.replies == [] and got.status == Status.WAITING
    assert await repo.claim_outbox("w", now=T0, lease=5) == [] and await repo.audit() == []
    again = await repo.record_reply(q.session_id, reply("m-killed"), now=T0, close=always)
    assert again.new and again.closed


async def test_pg_idle_connections_killed_the_next_operation_works(pg: Backend) -> None:
    assert pg.server is not None
    repo, _ = await pg.open()
    q = await repo.create_question(question())
    await _admin(
        pg.server,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '' "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND query NOT LIKE 'LISTEN%'",
    )
    assert await repo.get(q.session_id) is not None


async def test_pg_restart_fails_cleanly_then_recovers(pg: Backend) -> None:
    assert pg.server is not None
    repo, notifier = await pg.open(timeout=0.5)
    q = await repo.create_question(question())
    await asyncio.to_thread(pg.server.stop)
    try:
        with pytest.raises(RepositoryUnavailable):
            await repo.get(q.session_id)
        with pytest.raises(RepositoryUnavailable):
            await repo.record_reply(q.session_id, reply("during"), now=T0, close=always)
        with pytest.raises(RepositoryUnavailable):
            await repo.ping()
    finally:
        await asyncio.to_thread(pg.server.start)
    await _eventually(lambda: repo.get(q.session_id))
    result = await repo.record_reply(q.session_id, reply("during"), now=T0, close=always)
    assert result.new and result.closed  # the failed attempt left nothing behind
    assert isinstance(notifier, PgNotifier) and await notifier.wait_connected(20)


async def test_pg_restart_wakes_waiters_and_later_notifies_arrive(pg: Backend) -> None:
    assert pg.server is not None
    repo, notifier = await pg.open(timeout=1.0)
    assert isinstance(notifier, PgNotifier)
    q = await repo.create_question(question())
    before = notifier.connections
    async with notifier.subscribe(q.session_id) as sub:
        await asyncio.to_thread(pg.server.restart)
        # woken when the connection was lost: what is sent while it is not listening is lost, so it reads again
        assert await sub.wait(20)

    async def reconnected() -> bool:
        return notifier.connections > before and notifier.connected

    await _eventually(reconnected)
    async with notifier.subscribe(q.session_id) as sub:
        await _eventually(lambda: repo.transition(q.session_id, Status.TIMEOUT, now=T0 + 61))
        assert await sub.wait(10)


async def test_pg_listen_connection_dropped_reconnects(pg: Backend) -> None:
    assert pg.server is not None
    repo, notifier = await pg.open()
    assert isinstance(notifier, PgNotifier)
    q = await repo.create_question(question())
    before, pid = notifier.connections, notifier.backend_pid
    async with notifier.subscribe(q.session_id) as early:
        await _admin(pg.server, "SELECT pg_terminate_backend(%s)", [pid])
        assert await early.wait(10)  # the reconnect wakes it: it reads again

    async def reconnected() -> bool:
        return notifier.connections > before and notifier.connected

    await _eventually(reconnected, timeout=10)
    assert notifier.backend_pid != pid
    async with notifier.subscribe(q.session_id) as sub:
        await repo.record_reply(q.session_id, reply("after"), now=T0, close=always)
        assert await sub.wait(10)
