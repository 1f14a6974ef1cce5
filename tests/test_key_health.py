"""A BOT_KEY WeCom refuses (93000: revoked, robot removed; 93004: robot disabled) turns /health 503 with a reason
naming BOT_KEY — on the server in direct mode, on the worker and (through the relay link) on the server in relay
mode — and recovers by itself after a later send or key check succeeds."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from fastapi.testclient import TestClient
from websockets.asyncio.server import ServerConnection, serve

from devcloud_worker.link import LinkOptions, RelayClient
from devcloud_worker.metrics import WorkerMetrics
from devcloud_worker.spool import Spool
from hil_protocol.relay_frames import Request, Response, WorkerStatus, dump_frame, parse_frame
from hil_protocol.wecom_robot import KEY_CHECK_FILE, RetryPolicy, RobotSender, WebhookBackend, WeComError
from hil_server.app import create_app
from hil_server.channels.workers import RelayChannel, WorkerHub, WorkerLink
from tests.helpers import eventually, until
from tests.procs import BOT_KEY, Stack
from tests.server_fixtures import WeCom, settings

pytestmark = pytest.mark.usefixtures("clean_env")

BASE = "https://wecom.test"
FAST = RetryPolicy(deadline=2.0, base_delay=0.01, max_delay=0.02)


class Robot:
    """A webhook that answers sends and uploads with the errcode set on it."""

    def __init__(self) -> None:
        self.send_errcode = 0
        self.upload_errcode = 0
        self.uploads: list[bytes] = []
        self.sends = 0
        self.upload_down = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/upload_media"):
            self.uploads.append(request.content)
            if self.upload_down:
                raise httpx.ConnectError("down")
            if self.upload_errcode:
                return httpx.Response(200, json={"errcode": self.upload_errcode, "errmsg": "invalid webhook url"})
            return httpx.Response(200, json={"errcode": 0, "errmsg": "ok", "type": "file", "media_id": "m1"})
        self.sends += 1
        if self.send_errcode:
            return httpx.Response(200, json={"errcode": self.send_errcode, "errmsg": "invalid webhook url"})
        return httpx.Response(200, json={"errcode": 0, "errmsg": "ok"})


@pytest.fixture
def robot() -> Iterator[tuple[Robot, RobotSender]]:
    fake = Robot()
    with respx.mock(base_url=BASE) as router:
        router.route().mock(side_effect=fake)
        sender = RobotSender(WebhookBackend(httpx.AsyncClient(), BASE, "the-secret-key"), FAST, key_check_interval=0.01)
        yield fake, sender


@pytest.mark.parametrize("errcode", [93000, 93004])
async def test_a_refused_key_is_reported_until_a_send_succeeds(robot: tuple[Robot, RobotSender], errcode: int) -> None:
    fake, sender = robot
    assert sender.key.problem() is None
    fake.send_errcode = errcode
    with pytest.raises(WeComError):
        await sender.send_text("c", "hi")
    problem = sender.key.problem()
    assert problem is not None and "BOT_KEY" in problem and f"errcode {errcode}" in problem
    assert "the-secret-key" not in problem
    fake.send_errcode = 0
    await sender.send_text("c", "hi")
    assert sender.key.problem() is None


@pytest.mark.parametrize("errcode", [93005, 93006, 93008, 40008, 40058, 44004])
async def test_errcodes_about_one_chat_or_one_message_leave_the_key_alone(
    robot: tuple[Robot, RobotSender], errcode: int
) -> None:
    fake, sender = robot
    fake.send_errcode = errcode
    with pytest.raises(WeComError):
        await sender.send_text("c", "hi")
    assert sender.key.problem() is None


async def test_the_key_check_posts_nothing_and_clears_a_refusal_only_when_the_key_works(
    robot: tuple[Robot, RobotSender],
) -> None:
    fake, sender = robot
    await sender.check_key()  # a working key: nothing changes, nothing is posted
    assert sender.key.problem() is None and fake.sends == 0
    fake.send_errcode = fake.upload_errcode = 93000
    with pytest.raises(WeComError):
        await sender.send_text("c", "hi")
    changed = asyncio.ensure_future(sender.key.wait_change())
    watcher = asyncio.ensure_future(sender.watch_key())
    try:
        await asyncio.sleep(0.05)
        assert len(fake.uploads) >= 2 and sender.key.problem() is not None  # checked, still refused
        assert KEY_CHECK_FILE[1] in fake.uploads[0]
        assert not changed.done()
        fake.upload_errcode = 0  # fixed (a new robot with the same key, or re-enabled)
        await asyncio.wait_for(changed, 2)
        assert sender.key.problem() is None and fake.sends == 1  # recovered without posting anything
        uploads = len(fake.uploads)
        await asyncio.sleep(0.05)
        assert len(fake.uploads) == uploads  # a working key is not checked again
    finally:
        watcher.cancel()
        changed.cancel()


async def test_a_network_error_in_the_check_says_nothing_about_the_key(robot: tuple[Robot, RobotSender]) -> None:
    fake, sender = robot
    fake.send_errcode = 93000
    with pytest.raises(WeComError):
        await sender.send_text("c", "hi")
    fake.upload_down = True
    await sender.check_key()
    assert sender.key.problem() is not None and fake.uploads


async def test_the_server_learns_a_seed_workers_refused_key_from_its_answers() -> None:
    """A worker that sends no `worker_status` (a seed worker): its answers' errcode tell the server."""
    hub = WorkerHub(grace=0, request_timeout=2)
    channel = RelayChannel(hub)
    answers: list[dict[str, Any]] = [{"success": False, "errcode": 93000, "error": "invalid webhook url"}]

    async def send_text(text: str) -> None:
        frame = parse_frame(text)
        assert isinstance(frame, Request)
        hub.resolve(link, Response(id=frame.id, **answers.pop(0)))

    async def close(code: int, reason: str) -> None:
        pass

    link = WorkerLink("seed-1", send_text, close)
    await hub.add(link)
    with pytest.raises(Exception, match="invalid webhook url"):
        await hub.request("send_hint", {"message": "x"})
    health = channel.health()
    assert not health.ok and "worker seed-1" in (health.reason or "") and "BOT_KEY" in (health.reason or "")
    assert health.fields["bot_key_ok"] is False
    answers.append({"success": True, "data": {}})
    await hub.request("send_hint", {"message": "x"})
    assert channel.health().ok


def test_worker_status_frames_round_trip() -> None:
    assert dump_frame(WorkerStatus()) == '{"type":"worker_status"}'
    frame = parse_frame('{"type":"worker_status","bot_key_refused":"WeCom refuses BOT_KEY","extra":1}')
    assert isinstance(frame, WorkerStatus) and frame.bot_key_refused == "WeCom refuses BOT_KEY"


# --- real processes --------------------------------------------------------------------------------------------


def health(url: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{url}/health", timeout=5)
    return response.status_code, response.json()


def refuse_key(stack: Stack, refused: bool) -> None:
    stack.fake("config", {"bot_keys": ["some-other-key"] if refused else [BOT_KEY]})


@pytest.mark.parametrize("mode", ["direct", "relay"])
def test_a_refused_key_turns_health_503_and_recovers_by_itself(tmp_path: Path, mode: str) -> None:
    quick = {"HIL_KEY_CHECK_INTERVAL": "0.2"}
    stack = Stack(mode, tmp_path, server_env=quick, worker_env=quick)
    with stack.running():
        assert health(stack.server_url)[0] == 200
        refuse_key(stack, True)
        sent = stack.send("上线？", chat_id="chatA")
        assert not sent["success"] and sent["errcode"] == 93000
        status, body = health(stack.server_url)
        assert status == 503 and body["status"] == "degraded" and body["bot_key_ok"] is False
        assert "BOT_KEY" in body["reason"] and "93000" in body["reason"] and BOT_KEY not in body["reason"]
        if mode == "relay":
            assert "worker e2e-worker" in body["reason"]
            worker_status, worker_body = health(stack.worker_url)
            assert worker_status == 503 and "BOT_KEY" in worker_body["reason"] and not worker_body["bot_key_ok"]
        # Fixed in WeCom: the periodic key check notices without any message being sent.
        refuse_key(stack, False)
        eventually(lambda: health(stack.server_url)[0] == 200, 10, "server /health did not recover")
        assert "bot_key_ok" not in health(stack.server_url)[1]
        if mode == "relay":
            assert health(stack.worker_url)[0] == 200
        assert stack.messages() == []  # the check posted nothing
        assert stack.send("上线？", chat_id="chatA")["success"]


def test_a_later_send_clears_the_refusal_without_waiting_for_the_check(tmp_path: Path, wecom: WeCom) -> None:
    with TestClient(create_app(settings(tmp_path, hil_key_check_interval=3600))) as client:
        wecom.errcode = 93000
        assert client.post("/api/send", json={"message": "one", "wait_reply": False}).json()["errcode"] == 93000
        assert client.get("/health").status_code == 503
        wecom.errcode = 0
        assert client.post("/api/send", json={"message": "two", "wait_reply": False}).json()["success"]
        assert client.get("/health").json() == {"status": "healthy", "mode": "direct", "channel": "webhook"}


# --- the relay link: the worker reports to a server that asks, and only to one ---------------------------------


class RefusingBackend:
    """A robot backend whose key WeCom refuses until `fixed`."""

    name = "test"
    host = "wecom.test"

    def __init__(self) -> None:
        self.fixed = False

    async def send(self, payload: dict[str, Any], timeout: float) -> None:
        if not self.fixed:
            raise WeComError(93000, "invalid webhook url")

    async def upload_file(self, filename: str, data: bytes, timeout: float = 10.0) -> str:
        raise WeComError(-3, "no uploads here")


@pytest.mark.parametrize("asks", [True, False])
async def test_the_worker_reports_its_key_to_a_server_that_asks_and_only_to_one(tmp_path: Path, asks: bool) -> None:
    frames: list[dict[str, Any]] = []
    sockets: list[ServerConnection] = []

    async def handler(ws: ServerConnection) -> None:
        sockets.append(ws)
        features = ["callback_ack", "worker_status"] if asks else ["callback_ack"]
        await ws.send(json.dumps({"type": "hello", "features": features}))
        async for text in ws:
            frames.append(json.loads(text))

    backend = RefusingBackend()
    sender = RobotSender(backend, FAST)
    spool = await Spool.open(tmp_path / "spool.sqlite3")
    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = RelayClient(
            hil_url=f"ws://127.0.0.1:{port}/ws",
            worker_id="w1",
            token=None,
            sender=sender,
            spool=spool,
            metrics=WorkerMetrics(),
            options=LinkOptions(min_delay=0.02, max_delay=0.05, hello_timeout=0.2),
        )
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: sockets and client.connected)
            request = {"type": "request", "id": "r1", "action": "send_hint", "payload": {"message": "x"}}
            await sockets[0].send(json.dumps(request))
            await until(lambda: any(f["type"] == "response" for f in frames))
            backend.fixed = True
            await sockets[0].send(json.dumps({**request, "id": "r2"}))
            await until(lambda: sum(f["type"] == "response" for f in frames) == 2)
            await asyncio.sleep(0.1)  # a status frame would have followed the recovery by now
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await spool.close()
    statuses = [f.get("bot_key_refused") for f in frames if f["type"] == "worker_status"]
    if asks:  # on connect, on the refusal, on the recovery
        assert len(statuses) == 3 and statuses[0] is None and statuses[2] is None
        assert "BOT_KEY" in statuses[1] and "93000" in statuses[1]
    else:
        assert statuses == []
    responses = [f for f in frames if f["type"] == "response"]
    assert responses[0]["errcode"] == 93000 and responses[1]["success"]
