"""The worker against a seed HIL Server: no `hello`, no `callback_ack` — callbacks must still flow, once each."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve

from tests.helpers import free_port
from tests.procs import BOT_KEY, Proc

pytestmark = pytest.mark.e2e


class SeedServer:
    """Speaks only the seed's frames: ping/request out, pong/response/callback in."""

    def __init__(self) -> None:
        self.port = free_port()
        self.frames: list[dict] = []
        self.connected = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._ws: ServerConnection | None = None
        self._stop: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _handler(self, ws: ServerConnection) -> None:
        self._ws = ws
        self.connected.set()
        async for text in ws:
            self.frames.append(json.loads(text))

    async def _main(self) -> None:
        self._stop = self._loop.create_future()
        async with serve(self._handler, "127.0.0.1", self.port):
            await self._stop

    def start(self) -> SeedServer:
        self._thread.start()
        return self

    def send(self, frame: dict) -> None:
        assert self._ws is not None
        asyncio.run_coroutine_threadsafe(self._ws.send(json.dumps(frame)), self._loop).result(5)

    def wait_for(self, kind: str, count: int = 1, timeout: float = 10) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [f for f in self.frames if f.get("type") == kind]
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no {count} {kind} frame(s): {self.frames}")

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(5)


@pytest.fixture
def seed_and_worker(tmp_path: Path) -> Iterator[tuple[SeedServer, Proc, str]]:
    seed = SeedServer().start()
    fake_port, worker_port = free_port(), free_port()
    fake = Proc(
        "fake-wecom",
        ["-m", "hil_sandbox.fake_wecom", "--port", str(fake_port), "--bot-key", BOT_KEY, "--log-level", "warning"],
        {},
        tmp_path / "fake.log",
        f"http://127.0.0.1:{fake_port}/_fake/config",
    ).start()
    worker = Proc(
        "hil-worker",
        ["-m", "devcloud_worker.worker"],
        {
            "HIL_URL": f"ws://127.0.0.1:{seed.port}/ws",
            "BOT_KEY": BOT_KEY,
            "CALLBACK_HOST": "127.0.0.1",
            "CALLBACK_PORT": str(worker_port),
            "WECOM_API_BASE": f"http://127.0.0.1:{fake_port}",
            "HIL_DATA_DIR": str(tmp_path / "worker-data"),
            "HELLO_TIMEOUT": "0.3",
        },
        tmp_path / "worker.log",
        f"http://127.0.0.1:{worker_port}/health",
    ).start()
    try:
        assert seed.connected.wait(10), worker.log()
        yield seed, worker, f"http://127.0.0.1:{worker_port}"
    finally:
        worker.stop()
        fake.stop()
        seed.stop()


def test_callbacks_flow_to_a_server_that_never_acknowledges(seed_and_worker) -> None:
    seed, _, worker_url = seed_and_worker
    for i in range(3):
        body = {
            "msgid": f"seed-{i}",
            "chatid": "c1",
            "chattype": "group",
            "msgtype": "text",
            "from": {"userid": "u"},
            "text": {"content": f"@bot answer {i}"},
        }
        assert httpx.post(f"{worker_url}/callback", json=body).json()["errcode"] == 0
    frames = seed.wait_for("callback", 3)
    assert [f["data"]["callback_data"]["msgid"] for f in frames] == ["seed-0", "seed-1", "seed-2"]  # in order
    assert all("id" not in f for f in frames)  # a seed server would not know what to do with spool ids
    deadline = time.monotonic() + 5
    while httpx.get(f"{worker_url}/health").json()["spooled_callbacks"] != 0:
        assert time.monotonic() < deadline, "spool not emptied without acknowledgements"
        time.sleep(0.05)


def test_seed_requests_are_answered(seed_and_worker) -> None:
    seed, _, _ = seed_and_worker
    seed.send({"type": "ping"})
    seed.wait_for("pong")
    seed.send(
        {
            "type": "request",
            "id": "r1",
            "action": "send_message",
            "payload": {
                "short_id": "1a2b3c4d",
                "message": "seed question",
                "chat_id": "c1",
                "chat_type": "group",
                "images": [],
                "project_name": "seed",
            },
        }
    )
    [response] = seed.wait_for("response")
    assert response["id"] == "r1" and response["success"] is True, response
    seed.send(
        {
            "type": "request",
            "id": "r2",
            "action": "send_hint",
            "payload": {"chat_id": "c1", "message": "**hint**", "msg_type": "markdown"},
        }
    )
    responses = seed.wait_for("response", 2)
    assert responses[1]["id"] == "r2" and responses[1]["success"] is True


def test_a_failing_request_from_a_seed_server_does_not_drop_the_link(seed_and_worker) -> None:
    seed, worker, worker_url = seed_and_worker
    payload = {"short_id": "1a2b3c4d", "message": "q", "chat_id": "c1", "images": ["http://127.0.0.1:99999/x.png"]}
    seed.send({"type": "request", "id": "bad", "action": "send_message", "payload": payload})
    [response] = seed.wait_for("response")
    assert response["id"] == "bad" and response["success"] is False and response["error"], response
    seed.send({"type": "ping"})
    seed.wait_for("pong")  # the same link still answers
    health = httpx.get(f"{worker_url}/health").json()
    assert health["status"] == "healthy" and health["ws_connected"] is True
    assert "connected to HIL Server" in worker.log() and worker.log().count("connected to HIL Server") == 1
