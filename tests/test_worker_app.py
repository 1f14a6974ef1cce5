"""The worker app (create_app under TestClient) and its spool: /health tells the truth, a callback is durable
before its 200 or refused with 503, /metrics, the spool's schema upgrade, and stopping when the link cannot be
kept alive."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from devcloud_worker.config import WorkerSettings
from devcloud_worker.spool import SCHEMA_VERSION, Spool, SpoolError
from devcloud_worker.worker import SPOOL_FILE, create_app
from tests.fault_proxy import redirecting_server
from tests.helpers import callback_body, eventually, free_port

pytestmark = pytest.mark.usefixtures("clean_env")


def worker_settings(tmp_path: Path, **kw: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "bot_key": "k",
        "hil_url": f"ws://127.0.0.1:{free_port()}/ws",  # nobody listens: the link stays down
        "hil_data_dir": tmp_path / "data",
        "wecom_api_base": "http://127.0.0.1:9",
        "reconnect_min_delay": 0.05,
        "reconnect_max_delay": 0.1,
    }
    values.update(kw)
    return WorkerSettings(_env_file=None, **values)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(worker_settings(tmp_path, hil_link_down_grace=0.3))) as client:
        yield client


def test_health_is_200_within_the_grace_and_503_once_the_link_stays_down(worker: TestClient) -> None:
    first = worker.get("/health")
    assert first.status_code == 200, first.json()
    body = first.json()
    assert body["status"] == "healthy" and body["ws_connected"] is False  # the seed's fields, unchanged
    assert body["spooled_callbacks"] == 0
    eventually(lambda: worker.get("/health").status_code == 503)
    body = worker.get("/health").json()
    assert body["status"] == "degraded" and body["ws_connected"] is False
    assert "link to HIL Server down" in body["reason"] and "cannot reach HIL Server" in body["reason"]


def test_a_callback_is_spooled_before_its_200(worker: TestClient, tmp_path: Path) -> None:
    response = worker.post("/callback", json=callback_body("@bot 好的", msgid="durable-1"))
    assert response.status_code == 200 and response.json()["errcode"] == 0
    # Committed: another connection sees it while the worker still runs.
    with sqlite3.connect(tmp_path / "data" / SPOOL_FILE) as conn:
        [(data,)] = conn.execute("SELECT data FROM spool").fetchall()
    assert '"durable-1"' in data
    assert worker.get("/health").json()["spooled_callbacks"] == 1


def test_a_spool_that_cannot_be_written_refuses_with_503_and_recovers(worker: TestClient, tmp_path: Path) -> None:
    spool: Spool = worker.app_state["spool"]
    writable = spool._conn
    # What a read-only or full disk looks like to SQLite: every write fails.
    spool._conn = sqlite3.connect(f"file:{spool.path}?mode=ro", uri=True, check_same_thread=False)
    try:
        refused = worker.post("/callback", json=callback_body("@bot 不丢", msgid="disk-1"))
        assert refused.status_code == 503, refused.text
        assert "spool" in refused.json()["errmsg"]
        health = worker.get("/health")
        assert health.status_code == 503 and "spool cannot be written" in health.json()["reason"]
    finally:
        spool._conn.close()
        spool._conn = writable
    # The watchdog's probe notices the disk is back; WeCom's retry of the same callback is taken.
    eventually(lambda: spool.error is None, timeout=3)
    assert worker.post("/callback", json=callback_body("@bot 不丢", msgid="disk-1")).status_code == 200
    assert spool.depth == 1
    metrics = worker.get("/metrics").text
    assert 'hil_worker_callbacks_total{outcome="refused"} 1.0' in metrics
    assert 'hil_worker_callbacks_total{outcome="spooled"} 1.0' in metrics


def test_metrics(worker: TestClient) -> None:
    worker.post("/callback", json=callback_body("@bot hi", msgid="metric-1"))
    text = worker.get("/metrics").text
    for line in ("hil_worker_spool_depth 1.0", "hil_worker_link_up 0.0", "hil_worker_spool_dead 0.0"):
        assert line in text
    assert "hil_worker_connect_failures_total" in text and "hil_worker_reconnects_total 0.0" in text


async def test_lone_surrogates_are_stored_as_valid_utf8(tmp_path: Path) -> None:
    # The callback parser refuses them where it reads; the spool must still never hold text it cannot relay.
    spool = await Spool.open(tmp_path / SPOOL_FILE)
    try:
        await spool.add({"msgid": "s-1", "extra": "a\ud800b\udfffc"})
        [row] = await spool.after(0, 10)
    finally:
        await spool.close()
    assert row.data == {"msgid": "s-1", "extra": "a?b?c"}


def test_a_link_that_keeps_crashing_is_reported_and_stops_the_worker(tmp_path: Path) -> None:
    fatal: list[str] = []
    with redirecting_server() as url:
        settings = worker_settings(tmp_path, hil_url=url, hil_link_max_crashes=3)
        with TestClient(create_app(settings, on_fatal=fatal.append)) as client:
            eventually(lambda: bool(fatal), timeout=5)
            health = client.get("/health")
            assert health.status_code == 503
            assert re.search(r"task link crashed \d+ times", health.json()["reason"]), health.json()
            assert "InvalidURI" in health.json()["reason"]
            assert "hil_worker_task_restarts_total" in client.get("/metrics").text
    assert len(fatal) == 1 and "InvalidURI" in fatal[0]


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8081/ws", "ws://127.0.0.1:99999/ws", "wss://", "127.0.0.1:8081", "ws:///ws"]
)
def test_hil_url_must_be_a_websocket_url(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValueError, match="HIL_URL"):
        worker_settings(tmp_path, hil_url=url)


# --- the spool file ----------------------------------------------------------------------------------------------


def seed_spool(path: Path, rows: list[str], version: str = "1") -> None:
    """A spool as the 0.2 worker left it (schema version 1: no attempts column, no dead table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE spool (id INTEGER PRIMARY KEY AUTOINCREMENT, data TEXT NOT NULL, created_at REAL NOT NULL)"
        )
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (version,))
        conn.executemany("INSERT INTO spool (data, created_at) VALUES (?, 0)", [(r,) for r in rows])


async def test_a_spool_left_by_the_previous_version_is_upgraded_and_replayed(tmp_path: Path) -> None:
    path = tmp_path / SPOOL_FILE
    seed_spool(path, ['{"msgid": "old-1"}', '{"msgid": "old-2"}'])
    spool = await Spool.open(path)
    try:
        assert spool.depth == 2 and spool.dead == 0
        rows = await spool.after(0, 10)
        assert [(r.data, r.attempts) for r in rows] == [({"msgid": "old-1"}, 0), ({"msgid": "old-2"}, 0)]
        assert await spool.blame(rows[0].id) == 1
        await spool.bury(rows[0].id, "test")
        await spool.remove([rows[1].id])
        assert (spool.depth, spool.dead) == (0, 1)
    finally:
        await spool.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (str(SCHEMA_VERSION),)
        assert conn.execute("SELECT reason, attempts FROM dead").fetchall() == [("test", 1)]


async def test_a_spool_from_a_newer_worker_is_refused(tmp_path: Path) -> None:
    path = tmp_path / SPOOL_FILE
    seed_spool(path, [], version="99")
    with pytest.raises(SpoolError, match="newer"):
        await Spool.open(path)


async def test_a_spool_that_cannot_be_opened_is_a_spool_error(tmp_path: Path) -> None:
    (tmp_path / SPOOL_FILE).mkdir()  # a directory where the file should be
    with pytest.raises(SpoolError, match="cannot open"):
        await Spool.open(tmp_path / SPOOL_FILE)


@pytest.mark.parametrize(
    ("host", "auth", "warned"),
    [
        ("0.0.0.0", {}, True),
        ("::", {}, True),
        ("10.1.2.3", {}, True),
        ("worker.example", {}, True),
        ("127.0.0.1", {}, False),
        ("::1", {}, False),
        ("localhost", {}, False),
        ("0.0.0.0", {"callback_auth_key": "X-Hil-Auth", "callback_auth_value": "v"}, False),
        ("0.0.0.0", {"wecom_callback_token": "t", "wecom_callback_aes_key": "a" * 43}, False),
    ],
)
def test_an_unauthenticated_callback_on_the_network_is_warned_about_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, host: str, auth: dict[str, str], warned: bool
) -> None:
    with caplog.at_level("WARNING", logger="devcloud_worker"):
        with TestClient(create_app(worker_settings(tmp_path, callback_host=host, **auth))):
            pass
    found = [r.getMessage() for r in caplog.records if "CALLBACKS ARE UNAUTHENTICATED" in r.getMessage()]
    assert bool(found) == warned
    if warned:
        assert host in found[0] and "CALLBACK_AUTH_KEY" in found[0]
