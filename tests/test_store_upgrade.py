"""Upgrading in place: a data directory the old store wrote (hil-server.sqlite3, schema v1 or v2: whole-session JSON
rows, msgids, the audit trail) is copied into the repository at the first start, nothing lost, nothing doubled.

The old files are built here from the old schema's SQL (what hil-server 0.3 and the audit release created), not
by the old code, so the test keeps meaning something once that code is gone."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from hil_server.lifecycle import Status
from hil_server.models import Refused, Reply, Session
from hil_server.service import HilService
from hil_server.store import REPOSITORY_FILE, STORE_FILE, open_server_store
from tests.server_fixtures import settings

pytestmark = pytest.mark.usefixtures("clean_env")

NOW = 1_700_000_000.0
V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sessions (session_id TEXT PRIMARY KEY, short_id TEXT NOT NULL, chat_id TEXT, status TEXT NOT NULL,
    created_at REAL NOT NULL, data TEXT NOT NULL);
CREATE INDEX sessions_short_id ON sessions (short_id);
CREATE INDEX sessions_status_chat ON sessions (status, chat_id);
CREATE TABLE msgids (msgid TEXT PRIMARY KEY, seen_at REAL NOT NULL);
INSERT INTO meta (key, value) VALUES ('schema_version', '1');
"""
V2 = """
CREATE TABLE audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, kind TEXT NOT NULL, owner TEXT,
    chat_id TEXT, session_id TEXT, data TEXT NOT NULL);
CREATE INDEX audit_at ON audit (at);
UPDATE meta SET value = '2' WHERE key = 'schema_version';
"""


def old_sessions() -> list[Session]:
    person = {"userid": "zhangsan", "name": "张三"}
    replied = Session(
        session_id="a" * 32,
        short_id="1a2b3c4d",
        chat_id="chatA",
        message="上线？",
        status="replied",
        created_at=NOW,
        deadline=NOW + 600,
        closed_at=NOW + 5,
        owner="tok-a",
        options=["批准", "拒绝"],
        allow_text=False,
        responders=["zhangsan"],
        approvals_required=1,
        replies=[
            Reply(msg_type="text", content="批准", from_user=person, timestamp=NOW + 5, msgid="m-1", chat_id="chatA")
        ],
        refused=[Refused(userid="wangwu", name="王五", at=NOW + 3, text="批准")],
        unclear=[Reply(msg_type="text", content="好的，先不要", from_user=person, timestamp=NOW + 2, msgid="m-0")],
    )
    waiting = Session(
        session_id="b" * 32,
        short_id="5e6f7a8b",
        chat_id="chatB",
        message="继续吗？",
        created_at=NOW + 1,
        deadline=NOW + 9e6,
    )
    return [replied, waiting]


def write_old_store(path: Path, version: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.executescript(V1 if version == 1 else V1 + V2)
        for s in old_sessions():
            conn.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                (s.session_id, s.short_id, s.chat_id, s.status, s.created_at, s.model_dump_json()),
            )
        conn.executemany("INSERT INTO msgids VALUES (?, ?)", [("m-0", NOW + 2), ("m-1", NOW + 5), ("m-hint", NOW + 6)])
        if version == 2:
            rows = [
                (NOW, "asked", "tok-a", "chatA", "a" * 32, {"short_id": "1a2b3c4d", "via": "agent"}),
                (NOW + 5, "decided", "tok-a", "chatA", "a" * 32, {"short_id": "1a2b3c4d", "via": "server"}),
            ]
            for at, kind, owner, chat, sid, extra in rows:
                data = {"at": at, "kind": kind, "owner": owner, "chat_id": chat, "session_id": sid, **extra}
                conn.execute(
                    "INSERT INTO audit (at, kind, owner, chat_id, session_id, data) VALUES (?, ?, ?, ?, ?, ?)",
                    (at, kind, owner, chat, sid, json.dumps(data)),
                )
        conn.commit()
    finally:
        conn.close()


class Quiet:
    name = "quiet"


@pytest.mark.parametrize("version", [1, 2])
async def test_an_old_data_dir_is_upgraded_at_the_first_start(tmp_path: Path, version: int) -> None:
    config = settings(tmp_path)
    data = Path(config.hil_data_dir)
    write_old_store(data / STORE_FILE, version)
    for start in range(2):
        if start:  # a start that died after the copy, before the rename: the next one copies nothing again
            (data / f"{STORE_FILE}.migrated").rename(data / STORE_FILE)
        store = await open_server_store(config)
        try:
            assert store.name == "sqlite"
            assert not (data / STORE_FILE).exists() and (data / f"{STORE_FILE}.migrated").is_file()
            assert (data / REPOSITORY_FILE).is_file()
            service = HilService(store.repo, Quiet(), notifier=store.notifier)  # type: ignore[arg-type]
            replied = await service.get("a" * 32)
            assert replied is not None and replied.status == Status.REPLIED
            expected = old_sessions()[0]
            as_session = Session.model_validate(replied.model_dump())
            assert as_session.model_dump(exclude={"status"}) == expected.model_dump(exclude={"status"})
            waiting = await service.find("5e6f7a8b")
            assert waiting is not None and waiting.status == Status.WAITING and waiting.deadline == NOW + 9e6
            assert [q.session_id for q in await store.repo.open_in_chat("chatB")] == ["b" * 32]
            # the msgids seen before the upgrade are still duplicates (WeCom's retries after the restart)
            for msgid in ("m-0", "m-1", "m-hint"):
                assert not await store.repo.record_msgid(msgid, now=NOW + 7)
            rows = await service.audit_rows()
            if version == 2:
                assert [(r.seq, r.kind, r.short_id, r.owner) for r in rows] == [
                    (1, "asked", "1a2b3c4d", "tok-a"),
                    (2, "decided", "1a2b3c4d", "tok-a"),
                ]
            else:
                assert rows == []
            counts = await store.repo.table_counts()  # type: ignore[attr-defined]
            assert counts["questions"] == 2 and counts["answers"] == 2, start
        finally:
            await store.close()


async def test_no_old_store_no_upgrade(tmp_path: Path) -> None:
    config = settings(tmp_path)
    store = await open_server_store(config)
    try:
        assert sum((await store.repo.table_counts()).values()) == 0  # type: ignore[attr-defined]
    finally:
        await store.close()
    assert not (Path(config.hil_data_dir) / f"{STORE_FILE}.migrated").exists()
