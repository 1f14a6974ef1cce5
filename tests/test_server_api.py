"""The HIL Server's HTTP and WebSocket API: create_app(settings) under TestClient, WeCom mocked with respx."""

from __future__ import annotations

import base64
import functools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from hil_server import __version__
from hil_server.app import create_app
from tests import helpers
from tests.helpers import quote
from tests.server_fixtures import WeCom, settings

# Settings read the environment and ./.env: neither may leak into these tests.
pytestmark = pytest.mark.usefixtures("clean_env")

WORKER_TOKEN = "worker-token-123456"
CHAT = "wrkChatA"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(200))


callback_body = functools.partial(helpers.callback_body, chat=CHAT)  # the chat the questions here go to


# --- health -------------------------------------------------------------------------------------------------------


def test_health_direct(client: TestClient) -> None:
    for path in ("/health", "/api/health"):
        response = client.get(path)
        assert response.status_code == 200
        assert response.json() == {"status": "healthy", "mode": "direct", "channel": "webhook"}
    root = client.get("/").json()
    assert root == {
        "service": "hil-server",
        "version": __version__,
        "status": "healthy",
        "mode": "direct",
        "channel": "webhook",
    }


def test_health_relay(tmp_path: Path) -> None:
    with TestClient(create_app(settings(tmp_path, hil_mode="relay", bot_key=None))) as client:
        expected = {
            "status": "healthy",
            "mode": "relay",
            "channel": "relay",
            "worker_connected": False,
            "worker_count": 0,
        }
        assert client.get("/health").json() == expected
        assert client.get("/api/health").json() == expected
        root = client.get("/").json()
        assert root["mode"] == "relay" and root["worker_connected"] is False and root["version"] == __version__


def test_direct_mode_needs_bot_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="BOT_KEY"):
        create_app(settings(tmp_path, bot_key=None))


def test_auto_mode_picks_direct_with_bot_key(tmp_path: Path, wecom: WeCom) -> None:
    with TestClient(create_app(settings(tmp_path, hil_mode="auto"))) as client:
        assert client.get("/health").json()["mode"] == "direct"


# --- send / poll --------------------------------------------------------------------------------------------------


def test_send_success_and_poll(client: TestClient, wecom: WeCom) -> None:
    response = client.post("/api/send", json={"message": "部署到生产？", "chat_id": CHAT, "project_name": "my proj"})
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    short_id = body["short_id"]
    assert len(body["session_id"]) == 32
    assert wecom.texts() == [f"[#{short_id} my proj]\n部署到生产？"]
    assert wecom.accepted[0]["chatid"] == CHAT
    poll = client.get(f"/api/poll/{body['session_id']}").json()
    assert poll["status"] == "waiting" and poll["has_reply"] is False and poll["replies"] == []
    assert client.get(f"/api/poll/{short_id}").json()["session_id"] == body["session_id"]


def test_send_without_wait_reply(client: TestClient, wecom: WeCom) -> None:
    body = client.post("/api/send", json={"message": "FYI", "chat_id": CHAT, "wait_reply": False}).json()
    assert body["success"] is True and "session_id" not in body
    assert wecom.texts() == ["FYI"]


def test_full_round_trip_with_callback(client: TestClient, wecom: WeCom) -> None:
    sent = client.post("/api/send", json={"message": "q?", "chat_id": CHAT}).json()
    response = client.post("/api/callback", json=callback_body(quote(sent["short_id"], "yes")))
    assert response.status_code == 200
    assert response.json() == {"errcode": 0, "errmsg": "ok"}
    poll = client.get(f"/api/poll/{sent['session_id']}").json()
    assert poll["status"] == "replied" and poll["has_reply"] is True
    (reply,) = poll["replies"]
    assert reply["content"] == "yes"
    assert reply["msg_type"] == "text"
    assert reply["from_user"]["userid"] == "zhangsan"
    assert isinstance(reply["timestamp"], float)


def test_long_poll_over_http(client: TestClient, wecom: WeCom) -> None:
    sent = client.post("/api/send", json={"message": "q?", "chat_id": CHAT}).json()
    start = time.monotonic()
    poll = client.get(f"/api/poll/{sent['session_id']}", params={"wait": 0.2}).json()
    assert 0.15 <= time.monotonic() - start < 2
    assert poll["status"] == "waiting"


def test_session_timeout_route(client: TestClient, wecom: WeCom) -> None:
    sent = client.post("/api/send", json={"message": "q?", "chat_id": CHAT}).json()
    assert client.post(f"/api/session/{sent['session_id']}/timeout").json()["success"] is True
    assert client.get(f"/api/poll/{sent['session_id']}").json()["status"] == "timeout"
    assert client.post(f"/api/session/{'a' * 32}/timeout").json()["success"] is False
    assert client.post("/api/session/nothex/timeout").status_code == 404


def test_plain_message_gets_chat_id_hint(client: TestClient, wecom: WeCom) -> None:
    assert client.post("/api/callback", json=callback_body("@HIL助手 hi", chat="wrkNew")).status_code == 200
    wecom.wait_for(lambda: wecom.markdowns())
    (hint,) = wecom.markdowns()
    assert "wrkNew" in hint
    assert wecom.accepted[0]["chatid"] == "wrkNew"


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"message": ""}, "message"),
        ({"message": "   \n\t "}, "message"),
        ({"message": "x" * 25 * 1024}, "message"),
        ({"message": "q", "timeout": -1}, "timeout"),
        ({"message": "q", "timeout": 0}, "timeout"),
        ({"message": "q", "timeout": 10**9}, "timeout"),
        ({"message": "q", "project_name": "a]b"}, "project_name"),
        ({"message": "q", "project_name": "a\nb"}, "project_name"),
        ({"message": "q", "project_name": "p" * 200}, "project_name"),
        ({"message": "q", "project_name": "x\u202ey"}, "project_name may not contain U+202E RIGHT-TO-LEFT OVERRIDE"),
        ({"message": "q", "responders": ["a", "A"], "approvals_required": 2}, "approvals_required is 2 but"),
        ({"message": "q", "chat_id": "chat with spaces"}, "chat_id"),
        ({"message": "q", "images": ["data:image/png;base64,AAAA"] * 6}, "images"),
        ({"message": "q", "images": ["/etc/passwd"]}, "images"),
        ({"message": "q", "images": ["ftp://host/a.png"]}, "images"),
        ({"chat_id": CHAT}, "message"),
        ({"message": 123}, "message"),
        ({"message": "q", "chat_type": "channel"}, "chat_type"),
    ],
    ids=[
        "empty",
        "whitespace",
        "25KB",
        "timeout-neg",
        "timeout-0",
        "timeout-huge",
        "project-bracket",
        "project-newline",
        "project-long",
        "project-bidi",
        "approvals-over-responders",
        "chat-spaces",
        "6-images",
        "image-path",
        "image-ftp",
        "no-message",
        "message-int",
        "chat-type",
    ],
)
def test_bad_send_is_4xx_naming_the_problem(client: TestClient, wecom: WeCom, body: dict[str, Any], names: str) -> None:
    response = client.post("/api/send", json=body)
    assert 400 <= response.status_code < 500, response.text
    data = response.json()
    assert data["success"] is False
    assert names in data["error"]
    assert wecom.route.call_count == 0


@pytest.mark.parametrize("raw", [b"not json", b"{", b"", b'["message"]', b"\xff\xfe"])
def test_non_json_send_body_is_4xx(client: TestClient, wecom: WeCom, raw: bytes) -> None:
    response = client.post("/api/send", content=raw, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["success"] is False
    assert wecom.route.call_count == 0


def test_body_over_limit_is_413(tmp_path: Path, wecom: WeCom) -> None:
    with TestClient(create_app(settings(tmp_path, max_body_bytes=2048))) as client:
        response = client.post("/api/send", json={"message": "x" * 4000, "chat_id": CHAT})
        assert response.status_code == 413
        assert "2048" in response.json()["error"]
        # Streamed without Content-Length: still refused.
        chunks = iter([b'{"message": "', b"y" * 3000, b'"}'])
        response = client.post("/api/send", content=chunks, headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert client.post("/api/send", json={"message": "small", "chat_id": CHAT}).json()["success"] is True
    assert wecom.texts() and wecom.texts()[-1].endswith("\nsmall")
    assert len(wecom.texts()) == 1


def test_poll_unknown_malformed_and_wait_bounds(client: TestClient) -> None:
    unknown = client.get(f"/api/poll/{'0' * 32}")
    assert unknown.status_code == 200
    assert unknown.json()["status"] == "not_found" and unknown.json()["has_reply"] is False
    malformed = client.get("/api/poll/not-a-session")
    assert malformed.status_code == 404
    assert malformed.json()["status"] == "not_found"
    too_long = client.get(f"/api/poll/{'0' * 32}", params={"wait": 61})
    assert too_long.status_code == 422
    assert "wait" in too_long.json()["error"]
    assert client.get(f"/api/poll/{'0' * 32}", params={"wait": -1}).status_code == 422


# --- callback -------------------------------------------------------------------------------------------------------


def test_callback_auth_header(tmp_path: Path, wecom: WeCom) -> None:
    app = create_app(settings(tmp_path, callback_auth_key="X-Pigeon-Auth", callback_auth_value="s3cret"))
    with TestClient(app) as client:
        sent = client.post("/api/send", json={"message": "q?", "chat_id": CHAT}).json()
        body = callback_body(quote(sent["short_id"], "answer"), msgid="auth-1")
        refused = client.post("/api/callback", json=body)
        assert refused.status_code == 401
        assert "X-Pigeon-Auth" in refused.json()["errmsg"]
        wrong = client.post("/api/callback", json=body, headers={"X-Pigeon-Auth": "nope"})
        assert wrong.status_code == 401
        assert client.get(f"/api/poll/{sent['session_id']}").json()["status"] == "waiting"
        accepted = client.post("/api/callback", json=body, headers={"X-Pigeon-Auth": "s3cret"})
        assert accepted.status_code == 200 and accepted.json()["errcode"] == 0
        poll = client.get(f"/api/poll/{sent['session_id']}").json()
        assert poll["status"] == "replied" and poll["replies"][0]["content"] == "answer"
        # The refused attempts were not recorded as seen: the msgid only counts once it is accepted.
        assert len(poll["replies"]) == 1


def test_callback_bad_bodies(client: TestClient, wecom: WeCom) -> None:
    not_json = client.post("/api/callback", content=b"<xml>hi</xml>", headers={"content-type": "text/xml"})
    assert not_json.status_code == 400
    assert "JSON" in not_json.json()["errmsg"]
    no_chat = client.post("/api/callback", json={"msgtype": "text", "text": {"content": "hi"}})
    assert no_chat.status_code == 400
    assert "chatid" in no_chat.json()["errmsg"]
    assert client.post("/api/callback", json=["a"]).status_code == 400


def test_callback_duplicate_msgid(client: TestClient, wecom: WeCom) -> None:
    sent = client.post("/api/send", json={"message": "q?", "chat_id": CHAT}).json()
    body = callback_body(quote(sent["short_id"], "once"), msgid="dup")
    for _ in range(3):
        assert client.post("/api/callback", json=body).status_code == 200
    assert len(client.get(f"/api/poll/{sent['session_id']}").json()["replies"]) == 1


# --- upload-image -----------------------------------------------------------------------------------------------------


def test_upload_image(client: TestClient) -> None:
    response = client.post("/api/upload-image", files={"file": ("shot.png", PNG, "image/png")})
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    assert body["image_url"] == "data:image/png;base64," + base64.b64encode(PNG).decode()


def test_upload_non_image(client: TestClient) -> None:
    response = client.post("/api/upload-image", files={"file": ("notes.txt", b"hello, not an image", "text/plain")})
    assert response.status_code == 400
    assert response.json()["success"] is False
    assert "PNG" in response.json()["error"]


def test_upload_without_file(client: TestClient) -> None:
    response = client.post("/api/upload-image", data={"other": "x"})
    assert 400 <= response.status_code < 500
    assert "file" in response.json()["error"]


# --- API tokens -------------------------------------------------------------------------------------------------------


def test_api_tokens(tmp_path: Path, wecom: WeCom) -> None:
    app = create_app(settings(tmp_path, hil_api_tokens="tokA,tokB=chat1|chat2"))
    a = {"Authorization": "Bearer tokA"}
    b = {"Authorization": "Bearer tokB"}
    with TestClient(app) as client:
        missing = client.post("/api/send", json={"message": "q", "chat_id": "chat1"})
        assert missing.status_code == 401
        assert "HIL_API_TOKEN" in missing.json()["error"]
        wrong = client.post(
            "/api/send", json={"message": "q", "chat_id": "chat1"}, headers={"Authorization": "Bearer x"}
        )
        assert wrong.status_code == 401
        assert client.get(f"/api/poll/{'0' * 32}").status_code == 401
        forbidden = client.post("/api/send", json={"message": "q", "chat_id": "chat3"}, headers=b)
        assert forbidden.status_code == 403
        assert "chat1" in forbidden.json()["error"]
        assert wecom.route.call_count == 0
        # Without a chat_id a bound token asks in its first chat.
        default = client.post("/api/send", json={"message": "q"}, headers=b).json()
        assert default["success"] is True
        assert wecom.accepted[-1]["chatid"] == "chat1"
        sent = client.post("/api/send", json={"message": "q", "chat_id": "chat1"}, headers=b).json()
        assert sent["success"] is True
        assert client.get(f"/api/poll/{sent['session_id']}", headers=b).json()["status"] == "waiting"
        other = client.get(f"/api/poll/{sent['session_id']}", headers=a)
        assert other.status_code == 200 and other.json()["status"] == "not_found"
        assert client.post(f"/api/session/{sent['session_id']}/timeout", headers=a).json()["success"] is False
        assert client.get(f"/api/poll/{sent['session_id']}", headers=b).json()["status"] == "waiting"
        # tokA may write anywhere.
        assert client.post("/api/send", json={"message": "q", "chat_id": "chat3"}, headers=a).json()["success"]
        # Health stays open for monitoring.
        assert client.get("/health").status_code == 200


# --- WeCom refusing and relay without worker ------------------------------------------------------------------------


def test_invalid_bot_key_fails_fast(client: TestClient, wecom: WeCom) -> None:
    wecom.errcode = 93000
    start = time.monotonic()
    body = client.post("/api/send", json={"message": "q", "chat_id": CHAT}).json()
    assert time.monotonic() - start < 2
    assert body["success"] is False
    assert "BOT_KEY" in body["error"]
    assert body["errcode"] == 93000
    assert wecom.route.call_count == 1
    assert client.get(f"/api/poll/{body['session_id']}").json()["status"] == "failed"


def test_relay_without_worker(tmp_path: Path) -> None:
    with TestClient(create_app(settings(tmp_path, hil_mode="relay", bot_key=None, worker_grace=0.2))) as client:
        start = time.monotonic()
        body = client.post("/api/send", json={"message": "q", "chat_id": CHAT}).json()
        assert time.monotonic() - start < 1
        assert body["success"] is False
        assert "worker" in body["error"].lower()


# --- relay WebSocket --------------------------------------------------------------------------------------------------


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(
        settings(tmp_path, hil_mode="relay", bot_key=None, hil_worker_token=WORKER_TOKEN, worker_grace=2.0)
    )
    with TestClient(app) as client:
        yield client


class Background:
    """Run a blocking call (an HTTP request through TestClient) in a thread; `.result()` joins it."""

    def __init__(self, fn: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Any) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # noqa: BLE001  # re-raised in the test thread
            self._error = exc

    def result(self, timeout: float = 5.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background request did not finish"
        if self._error is not None:
            raise self._error
        return self._value


def test_ws_wrong_token_refused(relay: TestClient) -> None:
    with pytest.raises(WebSocketDisconnect) as info:
        with relay.websocket_connect("/ws?worker_id=w1&token=wrong") as ws:
            ws.receive_json()
    assert info.value.code == 1008
    with pytest.raises(WebSocketDisconnect):
        with relay.websocket_connect("/ws?worker_id=w1") as ws:
            ws.receive_json()
    assert relay.get("/health").json()["worker_connected"] is False


def test_ws_request_response_and_callback(relay: TestClient) -> None:
    with relay.websocket_connect(f"/ws?worker_id=w1&token={WORKER_TOKEN}") as ws:
        hello = ws.receive_json()
        assert hello["type"] == "hello"
        assert "callback_ack" in hello["features"]
        health = relay.get("/health").json()
        assert health["worker_connected"] is True and health["worker_count"] == 1

        pending = Background(
            lambda: relay.post(
                "/api/send", json={"message": "Deploy?", "chat_id": CHAT, "project_name": "p", "mention_list": ["u1"]}
            ).json()
        )
        request = ws.receive_json()
        assert request["type"] == "request"
        assert request["action"] == "send_message"
        payload = request["payload"]
        assert payload["message"] == "Deploy?"
        assert payload["chat_id"] == CHAT
        assert payload["project_name"] == "p"
        assert payload["mention_list"] == ["u1"]
        assert len(payload["short_id"]) == 8
        ws.send_json({"type": "response", "id": request["id"], "success": True, "data": {"parts": 1}})
        sent = pending.result()
        assert sent["success"] is True
        assert sent["short_id"] == payload["short_id"]

        ws.send_json(
            {
                "type": "callback",
                "event": "wecom_callback",
                "id": "spool-42",
                "data": {"callback_data": callback_body(quote(payload["short_id"], "ship it"), msgid="ws-1")},
            }
        )
        ack = ws.receive_json()
        assert ack == {"type": "callback_ack", "id": "spool-42"}
        poll = relay.get(f"/api/poll/{sent['session_id']}").json()
        assert poll["status"] == "replied"
        assert poll["replies"][0]["content"] == "ship it"

        # A seed-style callback without id is stored and gets no ack; the next frame answered is the pong.
        ws.send_json(
            {
                "type": "callback",
                "event": "wecom_callback",
                "data": {"callback_data": callback_body(quote(payload["short_id"], "more"), msgid="ws-2")},
            }
        )
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}
        assert len(relay.get(f"/api/poll/{sent['session_id']}").json()["replies"]) == 2


def test_ws_worker_failure_response(relay: TestClient) -> None:
    with relay.websocket_connect(f"/ws?worker_id=w1&token={WORKER_TOKEN}") as ws:
        assert ws.receive_json()["type"] == "hello"
        pending = Background(lambda: relay.post("/api/send", json={"message": "q", "chat_id": CHAT}).json())
        request = ws.receive_json()
        ws.send_json(
            {"type": "response", "id": request["id"], "success": False, "error": "请检查 BOT_KEY", "errcode": 93000}
        )
        body = pending.result()
        assert body["success"] is False
        assert "BOT_KEY" in body["error"]
        assert body["errcode"] == 93000


def test_ws_hint_goes_through_worker(relay: TestClient) -> None:
    with relay.websocket_connect(f"/ws?worker_id=w1&token={WORKER_TOKEN}") as ws:
        assert ws.receive_json()["type"] == "hello"
        ws.send_json(
            {
                "type": "callback",
                "id": "c1",
                "data": {"callback_data": callback_body("@HIL助手 hello", chat="wrkLonely", msgid="h-1")},
            }
        )
        # The ack and the hint request are written by different tasks: either may come first.
        frames = {frame["type"]: frame for frame in (ws.receive_json(), ws.receive_json())}
        assert frames["callback_ack"] == {"type": "callback_ack", "id": "c1"}
        request = frames["request"]
        assert request["action"] == "send_hint"
        assert request["payload"]["msg_type"] == "markdown"
        assert request["payload"]["chat_id"] == "wrkLonely"
        assert "wrkLonely" in request["payload"]["message"]
        ws.send_json({"type": "response", "id": request["id"], "success": True})


def test_ws_unreadable_callback_still_acked(relay: TestClient) -> None:
    with relay.websocket_connect(f"/ws?worker_id=w1&token={WORKER_TOKEN}") as ws:
        assert ws.receive_json()["type"] == "hello"
        ws.send_text("this is not a frame")
        ws.send_json({"type": "callback", "id": "bad-1", "data": {"callback_data": {"no": "chatid"}}})
        assert ws.receive_json() == {"type": "callback_ack", "id": "bad-1"}


def test_ws_bearer_header_accepted(relay: TestClient) -> None:
    with relay.websocket_connect("/ws?worker_id=w2", headers={"Authorization": f"Bearer {WORKER_TOKEN}"}) as ws:
        assert ws.receive_json()["type"] == "hello"
        assert relay.get("/health").json()["worker_count"] == 1
    with pytest.raises(WebSocketDisconnect):
        with relay.websocket_connect("/ws?worker_id=w3", headers={"Authorization": "Bearer wrong"}) as ws:
            ws.receive_json()


def test_ws_disconnect_updates_health(relay: TestClient) -> None:
    with relay.websocket_connect(f"/ws?worker_id=w1&token={WORKER_TOKEN}") as ws:
        assert ws.receive_json()["type"] == "hello"
        assert relay.get("/health").json()["worker_count"] == 1
    deadline = time.monotonic() + 2
    while relay.get("/health").json()["worker_count"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert relay.get("/health").json() == {
        "status": "healthy",
        "mode": "relay",
        "channel": "relay",
        "worker_connected": False,
        "worker_count": 0,
    }


AES_KEY = base64.b64encode(bytes(range(32))).decode().rstrip("=")


def test_encrypted_endpoint_refuses_unsigned_json_unless_auth_header_configured(tmp_path: Path, wecom: WeCom) -> None:
    crypto = {"wecom_callback_token": "tok123", "wecom_callback_aes_key": AES_KEY}
    with TestClient(create_app(settings(tmp_path / "a", **crypto))) as c:
        refused = c.post("/api/callback", json=callback_body("@bot hi"))
        assert refused.status_code == 403 and "CALLBACK_AUTH_KEY" in refused.json()["errmsg"]
    auth = {"callback_auth_key": "X-Hil-Auth", "callback_auth_value": "v4lue"}
    with TestClient(create_app(settings(tmp_path / "b", **crypto, **auth))) as c:
        assert c.post("/api/callback", json=callback_body("@bot hi", msgid="m-2")).status_code == 401
        ok = c.post("/api/callback", json=callback_body("@bot hi", msgid="m-3"), headers={"X-Hil-Auth": "v4lue"})
        assert ok.status_code == 200 and ok.json()["errcode"] == 0
