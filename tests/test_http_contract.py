"""The HTTP layer's own rules: one error shape on every route, auth before any body is parsed, one visibility rule,
the long-poll fast path answering exactly as the FastAPI route, and slow or huge bodies cut off."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from hil_server.app import create_app
from hil_server.auth import Grant, can_see, parse_tokens
from hil_server.models import Session
from tests.helpers import free_port
from tests.server_fixtures import WeCom, settings

pytestmark = pytest.mark.usefixtures("clean_env")

TOKENS = "tokA,tokB=chat1|chat2"
A = {"Authorization": "Bearer tokA"}
B = {"Authorization": "Bearer tokB"}


def assert_error_shape(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False
    assert isinstance(body["error"], str) and body["error"]
    assert body["message"] == body["error"]
    return body


@pytest.fixture
def tokens(tmp_path: Path, wecom: WeCom) -> Iterator[TestClient]:
    with TestClient(create_app(settings(tmp_path, hil_api_tokens=TOKENS))) as c:
        yield c


def test_every_error_has_one_shape(tokens: TestClient) -> None:
    assert_error_shape(tokens.post("/api/send", json={"message": "q"}), 401)
    assert_error_shape(tokens.get("/api/poll/" + "0" * 32), 401)
    assert_error_shape(tokens.get("/status.json", headers={"Authorization": "Bearer nope"}), 401)
    assert_error_shape(tokens.post("/api/send", json={"message": "q", "chat_id": "chat9"}, headers=B), 403)
    body = assert_error_shape(tokens.post("/api/send", json={"message": ""}, headers=A), 422)
    assert body["detail"][0]["loc"][-1] == "message"
    assert_error_shape(tokens.get("/api/poll/" + "0" * 32, params={"wait": "nan"}, headers=A), 422)
    assert_error_shape(tokens.post("/api/session/xyz/timeout", headers=A), 404)
    big = b'{"message": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    assert_error_shape(tokens.post("/api/send", content=big, headers={**A, "content-type": "application/json"}), 413)
    assert_error_shape(tokens.post("/api/callback", content=b"not json"), 400)  # and for WeCom, errcode too
    assert tokens.post("/api/callback", content=b"not json").json()["errcode"] == 400


def test_auth_runs_before_the_body_is_parsed(tokens: TestClient) -> None:
    # No token and a broken multipart body: 401, not 422.
    response = tokens.post("/api/upload-image", content=b"garbage", headers={"content-type": "multipart/form-data"})
    assert_error_shape(response, 401)
    response = tokens.post("/api/send", content=b"{broken", headers={"content-type": "application/json"})
    assert_error_shape(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


def test_one_visibility_rule() -> None:
    (_, a), (_, b) = parse_tokens(TOKENS)
    session = Session(session_id="0" * 32, short_id="0" * 8, message="q", deadline=0, owner=b.owner)
    assert can_see(None, session)  # tokens off
    assert can_see(b, session)
    assert not can_see(a, session)  # may write anywhere, still not another token's question
    assert not can_see(Grant(owner="tok-other", chats=None), session.model_copy(update={"owner": None}))


def test_another_tokens_question_is_invisible_on_every_route(tokens: TestClient) -> None:
    sent = tokens.post("/api/send", json={"message": "q"}, headers=B).json()
    for ref in (sent["session_id"], sent["short_id"]):
        assert tokens.get(f"/api/poll/{ref}", headers=A).json()["status"] == "not_found"
        assert tokens.post(f"/api/session/{ref}/timeout", headers=A).json()["success"] is False
    assert sent["short_id"] not in tokens.get("/status", headers=A).text
    assert tokens.get(f"/api/poll/{sent['short_id']}", headers=B).json()["status"] == "waiting"


@pytest.mark.parametrize("token_spec", ["s3cr3t=", "s3cr3t=|", "other,=chat", "other, s3cr3t = "])
def test_a_token_without_chats_is_a_startup_error(tmp_path: Path, token_spec: str) -> None:
    with pytest.raises(ValueError, match=r"HIL_API_TOKENS entry \d") as raised:
        create_app(settings(tmp_path, hil_api_tokens=token_spec))
    assert "s3cr3t" not in str(raised.value)  # names the position, never the token


@pytest.mark.parametrize("chat_id", ["nlchat\n", "chat\r", "a b", "x" * 129, "", "聊天"])
def test_chat_ids_use_a_full_match(tmp_path: Path, wecom: WeCom, chat_id: str) -> None:
    with TestClient(create_app(settings(tmp_path))) as client:
        response = client.post("/api/send", json={"message": "q", "chat_id": chat_id})
        if chat_id == "":
            assert response.status_code == 200  # empty means "not given"
        else:
            assert_error_shape(response, 422)


POLL_CASES = [
    ("0" * 32, None),
    ("0" * 8, "0"),
    ("0" * 8, "1.5"),
    ("xyz", None),
    ("0" * 31 + "%0A", None),
    ("0" * 8 + "%00", None),
    ("A" * 32, None),
    ("0" * 32, "61"),
    ("0" * 32, "-1"),
    ("0" * 32, "nan"),
    ("0" * 32, "inf"),
    ("0" * 32, "abc"),
    ("0" * 32, ""),
]


def test_fast_path_and_route_answer_identically(tmp_path: Path, wecom: WeCom) -> None:
    with (
        TestClient(create_app(settings(tmp_path / "fast", hil_api_tokens=TOKENS))) as fast,
        TestClient(create_app(settings(tmp_path / "slow", hil_api_tokens=TOKENS), poll_fast_path=False)) as slow,
    ):
        real = {}
        for name, client in (("fast", fast), ("slow", slow)):
            sent = client.post("/api/send", json={"message": "q", "chat_id": "chat1"}, headers=B).json()
            real[name] = sent
        for ref, wait in [*POLL_CASES, ("mine", None), ("mine", "0.01"), ("other", None)]:
            answers = []
            for name, client in (("fast", fast), ("slow", slow)):
                target = {"mine": real[name]["session_id"], "other": real[name]["short_id"]}.get(ref, ref)
                headers = A if ref == "other" else B
                params = {"wait": wait} if wait is not None else None
                response = client.get(f"/api/poll/{target}", params=params, headers=headers)
                body = response.json()
                body.pop("session_id", None)
                body.pop("short_id", None)
                answers.append((response.status_code, body))
            assert answers[0] == answers[1], (ref, wait)
        for client in (fast, slow):
            metrics = client.get("/metrics", headers=A).text
            assert 'route="/api/poll/{session_id}"' in metrics
            assert 'route="unmatched"' not in metrics


# --- slow bodies -----------------------------------------------------------------------------------------------


@pytest.fixture
def live_server(tmp_path: Path, wecom: WeCom) -> Iterator[str]:
    port = free_port()
    app = create_app(settings(tmp_path, hil_body_timeout=0.5))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_dripped_body_is_cut_off(live_server: str) -> None:
    async def drip() -> tuple[bytes, float]:
        host, port = live_server.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = b'{"message": "slow"}'
        writer.write(
            b"POST /api/send HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
        )
        start = time.monotonic()
        answer = b""
        for byte in body:
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                answer += await asyncio.wait_for(reader.read(65536), 0.2)
            except TimeoutError:
                continue
            if answer:
                break
        elapsed = time.monotonic() - start
        # The server closes the connection after its 408.
        rest = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer + rest, elapsed

    answer, elapsed = asyncio.run(drip())
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive within" in answer
    assert elapsed < 3
