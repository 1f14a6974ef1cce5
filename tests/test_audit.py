"""The audit trail: every step of a question on the record, in order, durable, purged after HIL_AUDIT_RETENTION,
scoped per API token, and exported by `GET /api/audit` and `hil-server audit export`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from hil_server import cli
from hil_server.app import create_app
from hil_server.audit import parse_since
from hil_server.channels import ChannelError
from hil_server.models import SendRequest
from hil_server.service import HilService
from hil_server.store import REPOSITORY_FILE, STORE_FILE
from tests.helpers import callback_body, child_env, quote
from tests.procs import BOT_KEY, Stack
from tests.server_fixtures import WeCom, settings
from tests.service_helpers import close_service
from tests.test_service import CHAT, OTHER_CHAT, Clock, handle, make

pytestmark = pytest.mark.usefixtures("clean_env")

ZHANG = {"userid": "zhangsan", "name": "张三"}
LI = {"userid": "lisi", "name": "李四"}
WANG = {"userid": "wangwu", "name": "王五"}


async def two_of_two(service: HilService) -> str:
    """A 2-of-2 approval: 张三 approves, 王五 (not a responder) tries, 李四 approves."""
    sent = await service.send(
        SendRequest(message="上线？", chat_id=CHAT, responders=["zhangsan", "lisi"], approvals_required=2),
        owner="tok-a",
    )
    assert sent.short_id is not None
    outcomes = [
        await handle(service, callback_body(quote(sent.short_id, text), chat=CHAT, sender=person))
        for person, text in ((ZHANG, "批准"), (WANG, "批准"), (LI, "1"))
    ]
    assert outcomes == ["matched_quote", "refused_responder", "matched_quote"]
    return sent.short_id


def steps(rows: list[Any]) -> list[tuple[str, str | None]]:
    return [(row.kind, row.userid) for row in rows]


async def test_a_two_of_two_approval_lists_every_step_in_order() -> None:
    clock = Clock()
    service, _ = await make(clock=clock)
    short_id = await two_of_two(service)
    rows = await service.audit_rows()
    assert steps(rows) == [
        ("asked", None),
        ("reply", "zhangsan"),
        ("refused", "wangwu"),
        ("reply", "lisi"),
        ("decided", None),
    ]
    assert [row.seq for row in rows] == [1, 2, 3, 4, 5]
    asked, first, refused, _, decided = rows
    assert {r.short_id for r in rows} == {short_id} and {r.owner for r in rows} == {"tok-a"}
    assert asked.via == "agent" and asked.detail["responders"] == ["zhangsan", "lisi"]
    assert asked.detail["approvals_required"] == 2 and asked.detail["text"] == "上线？"
    assert first.name == "张三" and first.via == "text" and first.detail["choice"] == "批准"
    assert first.detail["matched_by"] == "quote" and first.detail["msgid"] and first.chat_id == CHAT
    assert refused.detail["reason"] == "not a responder"
    assert decided.detail["approved"] is True and decided.detail["decided_by"] == ["zhangsan", "lisi"]
    assert all(r.at == clock.now for r in rows) and rows[0].time.startswith("2023-11-14T22:13:20")


async def test_timeouts_cancellations_failures_other_chats_and_late_answers_are_recorded() -> None:
    clock = Clock()
    service, channel = await make(clock=clock)
    timed = await service.send(SendRequest(message="a", chat_id=CHAT, timeout=10))
    cancelled = await service.send(SendRequest(message="b", chat_id=OTHER_CHAT))
    clock.now += 11
    await service.sweep()
    session = await service.find(cancelled.session_id or "")
    assert session is not None
    await service.mark_timeout(session)
    assert timed.short_id is not None
    # quoted in another chat: not taken; then the late answer in the right chat is kept
    assert await handle(service, callback_body(quote(timed.short_id, "好"), chat=OTHER_CHAT)) == "hint_other_chat"
    assert await handle(service, callback_body(quote(timed.short_id, "好"), chat=CHAT)) == "late"
    channel.fail_with = ChannelError("机器人 Key 无效", 93000)
    failed = await service.send(SendRequest(message="c", chat_id=CHAT))
    assert not failed.success
    await service.send(SendRequest(message="d", chat_id=CHAT, wait_reply=False), owner="tok-b")

    rows = await service.audit_rows()
    kinds = [(r.kind, r.short_id, r.detail.get("reason") or r.detail.get("matched_by")) for r in rows]
    assert kinds == [
        ("asked", timed.short_id, None),
        ("asked", cancelled.short_id, None),
        ("timeout", timed.short_id, None),
        ("cancelled", cancelled.short_id, None),
        ("refused", timed.short_id, "hint_other_chat"),
        ("reply", timed.short_id, "late"),
        ("asked", failed.short_id, None),
        ("send_failed", failed.short_id, None),
        ("send_failed", None, None),
    ]
    assert rows[3].via == "agent" and rows[4].chat_id == OTHER_CHAT
    assert rows[7].detail["error"] == "机器人 Key 无效"
    assert rows[8].owner == "tok-b" and rows[8].detail == {
        "wait_reply": False,
        "error": "机器人 Key 无效",
        "errcode": 93000,
    }
    assert [r.kind for r in await service.audit_rows(chat_id=OTHER_CHAT)] == ["asked", "cancelled", "refused"]
    assert [r.kind for r in await service.audit_rows(owner="tok-b")] == ["send_failed"]


async def test_a_reply_that_decides_nothing_is_on_the_record_with_its_reason() -> None:
    service, _ = await make()
    sent = await service.send(SendRequest(message="上线？", chat_id=CHAT, approvals_required=1))
    assert sent.short_id is not None
    assert await handle(service, callback_body(quote(sent.short_id, "好的，先不要"), chat=CHAT)) == "hint_unclear"
    rows = await service.audit_rows()
    assert [(r.kind, r.userid, r.detail.get("reason")) for r in rows][1:] == [("refused", "zhangsan", "hint_unclear")]


async def test_purge_keeps_rows_for_the_audit_retention_not_the_session_retention() -> None:
    clock = Clock()
    day = 86400.0
    service, _ = await make(clock=clock, retention=day, audit_retention=10 * day)
    try:
        old = await service.send(SendRequest(message="old", chat_id=CHAT, timeout=60))
        clock.now += 5 * day
        new = await service.send(SendRequest(message="new", chat_id=CHAT, timeout=60))
        clock.now += 2 * day
        await service.sweep()  # both time out
        assert [(r.kind, r.short_id) for r in await service.audit_rows()] == [
            ("asked", old.short_id),
            ("asked", new.short_id),
            ("timeout", old.short_id),
            ("timeout", new.short_id),
        ]
        clock.now += 4 * day  # old's asked row is 11 days old, the rest at most 6 days
        await service.sweep()
        assert sum((await service.repo.counts()).values()) == 0  # past SESSION_RETENTION; their trail is not
        assert [(r.kind, r.short_id) for r in await service.audit_rows()] == [
            ("asked", new.short_id),
            ("timeout", old.short_id),
            ("timeout", new.short_id),
        ]
    finally:
        await close_service(service)


def version_1_store(path: Path) -> None:
    """A store as hil-server 0.3.0 left it (schema 1: no audit table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE sessions (session_id TEXT PRIMARY KEY, short_id TEXT NOT NULL, chat_id TEXT,
            status TEXT NOT NULL, created_at REAL NOT NULL, data TEXT NOT NULL);
        CREATE TABLE msgids (msgid TEXT PRIMARY KEY, seen_at REAL NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        """
    )
    conn.close()


def schema_version(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    finally:
        conn.close()


async def test_the_trail_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / REPOSITORY_FILE
    service, _ = await make(path)
    await two_of_two(service)
    await close_service(service)
    service, _ = await make(path)
    try:
        rows = await service.audit_rows()
        assert [r.kind for r in rows] == ["asked", "reply", "refused", "reply", "decided"]
        assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
        assert [r.kind for r in await service.audit_rows(since=rows[0].at, limit=2)] == ["asked", "reply"]
    finally:
        await close_service(service)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, None), ("", None), ("0", 0.0), ("1700000000.5", 1700000000.5), ("2023-11-14T22:13:20", 1700000000.0)],
)
def test_since_takes_epoch_seconds_or_iso_8601(raw: str | None, expected: float | None) -> None:
    assert parse_since(raw) == expected
    assert parse_since("2023-11-15T06:13:20+08:00") == 1700000000.0


@pytest.mark.parametrize("raw", ["yesterday", "nan", "inf", "-1", "1e400", "2023-13-01", "' OR 1=1 --"])
def test_since_refuses_garbage(raw: str) -> None:
    with pytest.raises(ValueError, match="since"):
        parse_since(raw)


# --- GET /api/audit ----------------------------------------------------------------------------------------------


def lines(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines()]


def test_a_token_sees_only_its_own_rows_and_the_query_string_cannot_widen_it(tmp_path: Path, wecom: WeCom) -> None:
    app = create_app(settings(tmp_path, hil_api_tokens="tokA=chat1,tokB=chat2"))
    a, b = {"Authorization": "Bearer tokA"}, {"Authorization": "Bearer tokB"}
    with TestClient(app) as client:
        assert client.get("/api/audit").status_code == 401
        assert client.post("/api/send", json={"message": "A 的问题"}, headers=a).json()["success"]
        assert client.post("/api/send", json={"message": "B 的问题"}, headers=b).json()["success"]
        mine = lines(client.get("/api/audit", headers=a))
        assert [(r["kind"], r["chat_id"], r["detail"]["text"]) for r in mine] == [("asked", "chat1", "A 的问题")]
        assert [r["detail"]["text"] for r in lines(client.get("/api/audit", headers=b))] == ["B 的问题"]
        # Another token's chat: no lines (the same answer as a chat without events).
        assert lines(client.get("/api/audit", params={"chat_id": "chat1"}, headers=b)) == []
        assert len(lines(client.get("/api/audit", params={"chat_id": "chat1"}, headers=a))) == 1
        assert lines(client.get("/api/audit", params={"since": "2999-01-01"}, headers=a)) == []
        for chat in ("' OR 1=1 --", "%", "chat1' --"):  # bound as a parameter, never SQL
            assert lines(client.get("/api/audit", params={"chat_id": chat}, headers=b)) == []
        for params in (
            {"since": "garbage"},
            {"since": "nan"},
            {"limit": "0"},
            {"limit": "100001"},
            {"limit": "x"},
            {"chat_id": "c" * 129},
        ):
            response = client.get("/api/audit", params=params, headers=a)
            assert response.status_code == 422, (params, response.text)
        # Parameters the route does not know change nothing (owner= is not a way in).
        widened = client.get("/api/audit", params={"owner": "", "owner_scoped": "false"}, headers=b)
        assert [r["detail"]["text"] for r in lines(widened)] == ["B 的问题"]


def test_without_tokens_the_trail_is_open_like_every_route(tmp_path: Path, wecom: WeCom) -> None:
    with TestClient(create_app(settings(tmp_path))) as client:
        sent = client.post("/api/send", json={"message": "q", "chat_id": "c1"}).json()
        client.post(f"/api/session/{sent['session_id']}/timeout")
        rows = lines(client.get("/api/audit"))
        assert [(r["kind"], r["owner"], r["via"]) for r in rows] == [
            ("asked", None, "agent"),
            ("cancelled", None, "agent"),
        ]


# --- real processes: the trail after a restart, and the operator's export ----------------------------------------


def export(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hil_server", "audit", "export", "--data-dir", str(data_dir), *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def export_here(capsys: pytest.CaptureFixture[str], data_dir: Path, *args: str) -> tuple[int, str, str]:
    """`hil-server audit export` in this process (the real process runs once, above): exit code, stdout, stderr."""
    code = 0
    try:
        cli.main(["audit", "export", "--data-dir", str(data_dir), *args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_trail_of_a_real_round_trip_survives_a_restart_and_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = Stack("direct", tmp_path, server_env={"HIL_API_TOKENS": "tokA"})
    headers = {"Authorization": "Bearer tokA"}
    data_dir = tmp_path / "server-data"
    with stack.running():
        body = {"message": "发布？", "chat_id": "chatA", "responders": ["zhangsan", "lisi"], "approvals_required": 2}
        sent = httpx.post(f"{stack.server_url}/api/send", json=body, headers=headers, timeout=30).json()
        short_id = sent["short_id"]
        header = f"[#{short_id}]"
        for person, text in ((ZHANG, "批准"), (WANG, "批准"), (LI, "批准")):
            stack.reply("chatA", text, quote=header + "\n发布？", from_user=person)
        poll = httpx.get(f"{stack.server_url}/api/poll/{short_id}", params={"wait": 10}, headers=headers, timeout=20)
        assert poll.json()["status"] == "replied"
        stack.procs["server"].stop()
        stack.start_server()
        rows = lines(httpx.get(f"{stack.server_url}/api/audit", headers=headers, timeout=10))
        assert [(r["kind"], r["userid"]) for r in rows] == [
            ("asked", None),
            ("reply", "zhangsan"),
            ("refused", "wangwu"),
            ("reply", "lisi"),
            ("decided", None),
        ]
        assert all(r["short_id"] == short_id for r in rows)
        exported = export(data_dir)  # the console script, while the server runs
        assert exported.returncode == 0, exported.stderr
        assert [json.loads(line) for line in exported.stdout.splitlines()] == rows
    assert BOT_KEY not in exported.stdout and "tokA" not in exported.stdout
    assert export_here(capsys, data_dir, "--chat-id", "elsewhere") == (0, "", "")
    code, out, _ = export_here(capsys, data_dir, "--since", str(rows[-1]["at"]))
    assert code == 0 and [json.loads(line)["kind"] for line in out.splitlines()] == ["reply", "decided"]
    code, out, _ = export_here(capsys, data_dir, "--limit", "1")
    assert code == 0 and [json.loads(line)["kind"] for line in out.splitlines()] == ["asked"]
    code, _, err = export_here(capsys, data_dir, "--since", "garbage")
    assert code == 2 and "since" in err
    code, _, err = export_here(capsys, tmp_path / "nowhere")
    assert code == 1 and "no session store" in err
    assert not (tmp_path / "nowhere").exists()


def test_the_export_changes_nothing_on_disk_and_refuses_a_store_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    version_1_store(data_dir / STORE_FILE)
    code, out, err = export_here(capsys, data_dir)
    assert code == 1 and out == "" and "schema version 1" in err and "upgrade" in err
    assert schema_version(data_dir / STORE_FILE) == "1"  # the running (older) server's store is left alone
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / STORE_FILE).write_bytes(b"not a database at all" * 100)
    code, _, err = export_here(capsys, tmp_path / "junk")
    assert code == 1 and "cannot read the audit trail" in err
