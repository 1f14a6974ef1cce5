"""devcloud_worker.link and .replay against a stand-in HIL Server (a real websockets server on port 0, in-process):
no request can take the link down, only network errors are retried, and the spool drains by itself in order."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import InvalidMessage, InvalidURI
from websockets.http11 import Response as HttpResponse

from devcloud_worker.link import LinkOptions, RelayClient, retryable
from devcloud_worker.metrics import WorkerMetrics
from devcloud_worker.spool import Spool
from hil_protocol.wecom_robot import RetryPolicy, RobotSender, WeComError
from tests.helpers import callback_body, until

FAST = LinkOptions(min_delay=0.02, max_delay=0.05, hello_timeout=0.2, ack_timeout=5.0)
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


class Backend:
    """A robot backend that records payloads, or raises what a test queued."""

    name = "test"
    host = "wecom.test"

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.raises: list[BaseException] = []

    async def send(self, payload: dict[str, Any], timeout: float) -> None:
        if self.raises:
            raise self.raises.pop(0)
        self.sent.append(payload)

    async def upload_file(self, filename: str, data: bytes, timeout: float = 10.0) -> str:
        raise WeComError(-3, "no uploads here")


def insert_raw(path: Path, text: str) -> None:
    """A row as something other than the spool would have written it."""
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO spool (data, created_at) VALUES (?, 0)", (text,))


# What the stand-in does with a callback frame: ack it, ignore it, or drop the link.
Decide = Callable[[dict[str, Any]], str]


@dataclass
class StandIn:
    """A HIL Server that speaks the relay frames: hello, callback_ack, requests."""

    hello: bool = True
    decide: Decide = lambda frame: "ack"
    frames: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    ws: ServerConnection | None = None
    server: Server | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self, **kw: Any) -> None:
        """Listen (again, on the same port once it had one); `kw` goes to websockets' serve()."""
        self.server = await serve(self.handler, "127.0.0.1", self.port, **kw)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        self.ws = ws
        if self.hello:
            await ws.send(json.dumps({"type": "hello", "features": ["callback_ack"]}))
        async for text in ws:
            frame = json.loads(text)
            self.frames.append(frame)
            if frame.get("type") == "callback" and frame.get("id"):
                what = self.decide(frame)
                if what == "ack":
                    await ws.send(json.dumps({"type": "callback_ack", "id": frame["id"]}))
                elif what == "close":
                    await ws.close(1011, "cannot handle this callback")
                    return

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]

    def msgids(self) -> list[str]:
        return [f["data"]["callback_data"]["msgid"] for f in self.of_type("callback")]

    async def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        await until(predicate, timeout)

    async def request(self, action: str, payload: Any, request_id: str = "r1") -> dict[str, Any]:
        assert self.ws is not None
        await self.ws.send(json.dumps({"type": "request", "id": request_id, "action": action, "payload": payload}))
        await self.until(lambda: any(f.get("id") == request_id for f in self.of_type("response")))
        return next(f for f in self.of_type("response") if f.get("id") == request_id)


@dataclass
class Rig:
    stand_in: StandIn
    client: RelayClient
    spool: Spool
    backend: Backend
    metrics: WorkerMetrics
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.client.run())

    async def connected(self) -> None:
        await self.stand_in.until(lambda: self.client.connected and self.stand_in.connections > 0)

    async def spool_callbacks(self, count: int, prefix: str = "m") -> None:
        for i in range(count):
            await self.spool.add(callback_body(f"@bot answer {i}", msgid=f"{prefix}-{i}"))
        self.client.wake_spool()


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    rigs: list[Rig] = []
    stand_ins: list[StandIn] = []

    async def make(stand_in: StandIn | None = None, options: LinkOptions = FAST, url: str | None = None) -> Rig:
        stand_in = stand_in or StandIn()
        await stand_in.start()
        stand_ins.append(stand_in)
        spool = await Spool.open(tmp_path / f"spool-{len(rigs)}.sqlite3")
        backend = Backend()
        sender = RobotSender(backend, RetryPolicy(deadline=0.2, base_delay=0.01, max_delay=0.02))
        metrics = WorkerMetrics()
        client = RelayClient(
            hil_url=url or stand_in.url,
            worker_id="w1",
            token="tok",
            sender=sender,
            spool=spool,
            metrics=metrics,
            options=options,
            secrets=["secret-bot-key"],
        )
        rig = Rig(stand_in, client, spool, backend, metrics)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        if rig.task is not None:
            rig.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await rig.task
        await rig.spool.close()
    for stand_in in stand_ins:
        await stand_in.stop()


def metric(rig: Rig, name: str, **labels: str) -> float:
    return rig.metrics.registry.get_sample_value(name, labels or None) or 0.0


# --- requests: each fails alone --------------------------------------------------------------------------------


async def test_no_request_can_take_the_link_down(make_rig) -> None:
    rig = await make_rig()
    rig.start()
    await rig.connected()
    s = rig.stand_in
    question = {"short_id": "1a2b3c4d", "message": "q", "chat_id": "c1"}
    bad: list[tuple[str, Any, BaseException | None]] = [
        ("send_message", {"message": 5}, None),  # payload that does not validate
        ("send_message", ["not", "an", "object"], None),
        ("launch_missiles", {}, None),  # unknown action
        ("send_message", {**question, "images": ["http://127.0.0.1:99999/x.png"]}, None),  # OverflowError inside
        ("upload_image", {"image": "http://127.0.0.1:99999/x.png"}, None),
        ("upload_image", {"image": "data:image/png;base64,@@@"}, None),
        ("send_message", question, TypeError("int() argument must be ... not 'list'")),  # {"errcode":[45009]}
        ("send_message", question, httpx.DecodingError("gzip garbage")),
        ("send_hint", {"chat_id": "c1", "message": "hi"}, OverflowError("port must be 0-65535")),
        ("send_hint", {"chat_id": "c1", "message": "hi"}, RuntimeError("secret-bot-key leaked in a message")),
        ("send_message", question, WeComError(93000, "invalid webhook url")),
    ]
    for i, (action, payload, raises) in enumerate(bad):
        if raises is not None:
            rig.backend.raises.append(raises)
        response = await s.request(action, payload, request_id=f"bad-{i}")
        assert response["success"] is False, (action, payload, response)
        assert response["error"], response
        assert "secret-bot-key" not in response["error"]
        assert rig.client.connected and s.connections == 1, f"link dropped after {action} {payload}"
    assert s.of_type("response")[-1]["errcode"] == 93000
    # Still serving: a good request goes through on the same link.
    assert (await s.request("send_message", question, request_id="good"))["success"] is True
    assert rig.backend.sent[-1]["text"]["content"].startswith("[#1a2b3c4d]")
    assert s.connections == 1
    assert metric(rig, "hil_worker_requests_total", action="unknown", result="invalid") == 2  # + the list payload
    assert metric(rig, "hil_worker_requests_total", action="send_hint", result="error") == 2
    assert metric(rig, "hil_worker_requests_total", action="send_message", result="ok") == 1


async def test_odd_frames_and_an_unencodable_request_id_are_survived(make_rig) -> None:
    rig = await make_rig()
    rig.start()
    await rig.connected()
    s = rig.stand_in
    assert s.ws is not None
    for junk in ["not json", "[]", '{"type": "nope"}', '{"type": "request"}', b"\xff\xfe binary", "{" * 5000]:
        await s.ws.send(junk)
    # A lone surrogate in the id: the answer cannot be encoded as UTF-8; that answer is dropped, not the link.
    await s.ws.send('{"type": "request", "id": "\\ud800", "action": "send_hint", "payload": {"message": "x"}}')
    for forged in ("not-a-number", "424242", "-1", "9" * 5000, ""):
        await s.ws.send(json.dumps({"type": "callback_ack", "id": forged}))
    for i in range(50):  # made-up actions: answered, and counted under one label, not fifty
        await s.ws.send(json.dumps({"type": "request", "id": f"x{i}", "action": f"act-{i}", "payload": {}}))
    await s.ws.send('{"type": "ping"}')
    await s.until(lambda: bool(s.of_type("pong")))
    assert (await s.request("send_hint", {"chat_id": "c", "message": "still here"}))["success"] is True
    assert s.connections == 1 and rig.client.connected
    await s.until(lambda: len(s.of_type("response")) >= 51)
    # the fifty, and the request with the unencodable id (pydantic's JSON parser refuses lone surrogates)
    assert metric(rig, "hil_worker_requests_total", action="unknown", result="invalid") == 51
    assert "act-1" not in generate_latest(rig.metrics.registry).decode()


async def test_a_hung_send_does_not_hold_up_other_requests(make_rig) -> None:
    rig = await make_rig()
    release = asyncio.Event()
    original = rig.backend.send

    async def slow_then_fast(payload: dict[str, Any], timeout: float) -> None:
        if payload.get("text", {}).get("content", "").endswith("slow"):
            await release.wait()
        await original(payload, timeout)

    rig.backend.send = slow_then_fast  # type: ignore[method-assign]
    rig.start()
    await rig.connected()
    s = rig.stand_in
    assert s.ws is not None
    slow = {"type": "request", "id": "slow", "action": "send_hint", "payload": {"message": "slow"}}
    await s.ws.send(json.dumps(slow))
    assert (await s.request("send_hint", {"message": "fast"}, request_id="fast"))["success"] is True
    await s.ws.send('{"type": "ping"}')
    await s.until(lambda: bool(s.of_type("pong")))
    release.set()
    await s.until(lambda: any(f.get("id") == "slow" for f in s.of_type("response")))


# --- the connection loop ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "again"),
    [
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (EOFError(), True),
        (InvalidMessage("did not receive a valid HTTP response"), True),
        (TypeError("connect() got an unexpected keyword argument 'reconnect_delays'"), False),  # websockets 16
        (InvalidURI("https://x/ws", "scheme isn't ws or wss"), False),
        (ValueError("bad"), False),
    ],
)
def test_only_network_and_handshake_errors_are_retried(exc: Exception, again: bool) -> None:
    assert retryable(exc) is again


async def test_network_errors_are_retried_until_the_server_is_there(make_rig, tmp_path: Path) -> None:
    rig = await make_rig()
    await rig.stand_in.stop()
    rig.start()
    await until(lambda: metric(rig, "hil_worker_connect_failures_total") >= 3)
    assert not rig.client.connected
    assert "cannot reach HIL Server" in (rig.client.last_error or "")
    assert not rig.task.done()  # still trying
    await rig.stand_in.start()
    await rig.connected()
    assert rig.client.last_error is None


async def test_a_refused_token_is_retried_and_named(make_rig) -> None:
    def refuse(connection: ServerConnection, request: Any) -> HttpResponse:
        return HttpResponse(403, "Forbidden", Headers(), b"invalid worker token")

    rig = await make_rig()
    await rig.stand_in.stop()
    await rig.stand_in.start(process_request=refuse)
    rig.start()
    await until(lambda: metric(rig, "hil_worker_connect_failures_total") >= 2)
    assert "HTTP 403" in (rig.client.last_error or "") and "HIL_TOKEN" in (rig.client.last_error or "")
    assert not rig.task.done()


async def test_a_non_network_error_is_raised_not_retried(make_rig) -> None:
    """websockets 16 raised TypeError on every connect and the seed retried it forever. Now anything that is not a
    network or handshake error leaves run() at once, for the supervisor to count and restart with backoff."""

    def redirect(connection: ServerConnection, request: Any) -> HttpResponse:
        # nginx sending ws:// to https://: not a WebSocket URL, so websockets raises InvalidURI.
        return HttpResponse(302, "Found", Headers({"Location": "https://127.0.0.1:1/ws"}), b"")

    rig = await make_rig()
    await rig.stand_in.stop()
    await rig.stand_in.start(process_request=redirect)
    started = time.monotonic()
    with pytest.raises(InvalidURI):
        await asyncio.wait_for(rig.client.run(), 5)
    assert time.monotonic() - started < 1
    assert metric(rig, "hil_worker_connect_failures_total") == 0
    assert rig.stand_in.connections == 0


async def test_reconnects_after_the_server_drops_the_link(make_rig) -> None:
    rig = await make_rig()
    rig.start()
    await rig.connected()
    assert rig.stand_in.ws is not None
    await rig.stand_in.ws.close(1001, "going away")
    await rig.stand_in.until(lambda: rig.stand_in.connections == 2 and rig.client.connected)
    assert metric(rig, "hil_worker_reconnects_total") == 1
    assert metric(rig, "hil_worker_link_up") == 1


async def test_a_shutdown_that_meets_a_dropping_link_still_stops_the_link(make_rig, monkeypatch) -> None:
    # Python 3.11's TaskGroup reports a child's error instead of the task's cancellation when both happen in the
    # same step; the link must not take that for a dropped link and reconnect, or shutdown waits for it forever.
    rig = await make_rig()
    drop = asyncio.Event()

    async def replay_that_drops(hello: asyncio.Event, features: set[str]) -> None:
        await drop.wait()
        raise ConnectionResetError("the link dropped")

    monkeypatch.setattr(rig.client, "_replay", replay_that_drops)
    rig.start()
    await rig.connected()
    drop.set()
    assert rig.task is not None
    rig.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(rig.task, 5)
    assert rig.stand_in.connections == 1


async def test_a_cancellation_that_meets_the_hello_stops_the_replay(make_rig) -> None:
    # On Python 3.11 asyncio.wait_for returns the result when its awaitable finished in the step the cancellation
    # came: the replay then ran on and its link's TaskGroup never ended (a worker test that hung in teardown on a
    # busy machine). Here the hello and the cancellation meet on purpose.
    rig = await make_rig()
    hello = asyncio.Event()
    replay = asyncio.create_task(rig.client._replay(hello, {"callback_ack"}))
    await asyncio.sleep(0.01)
    hello.set()
    await asyncio.sleep(0)  # the hello's waiter is done, the replay not yet resumed
    replay.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(replay, 2)


# --- the spool: replay, window, acks, poison ------------------------------------------------------------------


async def test_a_backlog_drains_by_itself_in_order_within_the_window(make_rig) -> None:
    stand_in = StandIn()
    in_flight_max = 0

    def ack_and_measure(frame: dict[str, Any]) -> str:
        nonlocal in_flight_max
        sent = len(stand_in.of_type("callback"))
        in_flight_max = max(in_flight_max, sent - int(metric(rig, "hil_worker_callbacks_acked_total")))
        return "ack"

    stand_in.decide = ack_and_measure
    rig = await make_rig(stand_in, LinkOptions(min_delay=0.02, max_delay=0.05, hello_timeout=0.5, window=25))
    await rig.spool_callbacks(1000)
    rig.start()
    await stand_in.until(lambda: rig.spool.depth == 0 and len(stand_in.of_type("callback")) == 1000, timeout=30)
    assert stand_in.msgids() == [f"m-{i}" for i in range(1000)]  # in order, each once
    assert in_flight_max <= 25
    assert metric(rig, "hil_worker_callbacks_relayed_total", kind="first") == 1000


async def test_unacknowledged_callbacks_wait_in_the_window_and_are_resent(make_rig) -> None:
    stand_in = StandIn(decide=lambda frame: "ignore")
    options = LinkOptions(min_delay=0.02, max_delay=0.05, hello_timeout=0.5, window=5, ack_timeout=0.3)
    rig = await make_rig(stand_in, options)
    await rig.spool_callbacks(8)
    rig.start()
    await stand_in.until(lambda: len(stand_in.of_type("callback")) >= 5)
    await asyncio.sleep(0.1)
    assert stand_in.msgids() == [f"m-{i}" for i in range(5)]  # the window is full: nothing more until acks
    stand_in.decide = lambda frame: "ack"
    # No ack came: after the timeout the five are sent again; now they are acknowledged and the rest follows.
    await stand_in.until(lambda: rig.spool.depth == 0, timeout=5)
    assert stand_in.msgids()[5:10] == [f"m-{i}" for i in range(5)]
    assert set(stand_in.msgids()) == {f"m-{i}" for i in range(8)}
    assert metric(rig, "hil_worker_callbacks_relayed_total", kind="resent") == 5


async def test_unacknowledged_callbacks_are_sent_again_after_a_reconnect(make_rig) -> None:
    stand_in = StandIn(decide=lambda frame: "ignore")
    rig = await make_rig(stand_in)
    await rig.spool_callbacks(3)
    rig.start()
    await stand_in.until(lambda: len(stand_in.of_type("callback")) == 3)
    stand_in.decide = lambda frame: "ack"
    assert stand_in.ws is not None
    await stand_in.ws.close(1012, "restarting")
    await stand_in.until(lambda: rig.spool.depth == 0)
    assert stand_in.msgids() == ["m-0", "m-1", "m-2", "m-0", "m-1", "m-2"]


async def test_a_callback_that_keeps_dropping_the_link_is_set_aside(make_rig) -> None:
    stand_in = StandIn(decide=lambda frame: "close" if frame["data"]["callback_data"]["msgid"] == "m-1" else "ack")
    options = LinkOptions(min_delay=0.01, max_delay=0.02, hello_timeout=0.5, max_attempts=3)
    rig = await make_rig(stand_in, options)
    await rig.spool_callbacks(4)
    rig.start()
    await stand_in.until(lambda: rig.spool.depth == 0, timeout=10)
    assert rig.spool.dead == 1
    assert stand_in.msgids().count("m-1") == 3
    assert [m for m in stand_in.msgids() if m != "m-1"][-2:] == ["m-2", "m-3"]  # the queue went on behind it


async def test_an_unreadable_row_is_set_aside_and_the_rest_flows(make_rig) -> None:
    rig = await make_rig()
    await rig.spool_callbacks(1, prefix="before")
    for text in ("{oops", "[1]"):
        await asyncio.to_thread(insert_raw, rig.spool.path, text)
    rig.spool.depth += 2
    await rig.spool_callbacks(1, prefix="after")
    rig.start()
    await rig.stand_in.until(lambda: rig.spool.depth == 0)
    assert rig.stand_in.msgids() == ["before-0", "after-0"]
    assert rig.spool.dead == 2


async def test_a_seed_server_gets_callbacks_without_ids_and_the_spool_empties(make_rig) -> None:
    stand_in = StandIn(hello=False)
    rig = await make_rig(stand_in)
    await rig.spool_callbacks(150)
    rig.start()
    await stand_in.until(lambda: rig.spool.depth == 0 and len(stand_in.of_type("callback")) == 150, timeout=10)
    assert all("id" not in f for f in stand_in.of_type("callback"))
    assert stand_in.msgids() == [f"m-{i}" for i in range(150)]


async def test_a_callback_arriving_while_connected_is_sent_at_once(make_rig) -> None:
    rig = await make_rig()
    rig.start()
    await rig.connected()
    await asyncio.sleep(0.05)  # replay idle
    await rig.spool_callbacks(1, prefix="live")
    await rig.stand_in.until(lambda: rig.spool.depth == 0, timeout=2)
    assert rig.stand_in.msgids() == ["live-0"]
