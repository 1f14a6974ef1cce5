"""Trust the answer (unit level, on create_app under TestClient): every way someone other than the asked person could
answer is refused, and the asked person still gets through afterwards. The same attacks run against real processes
in tests/test_security_e2e.py."""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hil_server.app import create_app
from tests.helpers import callback_body, quote
from tests.server_fixtures import WeCom, settings
from tests.wecom_oracle import WeComOracle, new_aes_key, new_callback_token, text_payload_json

pytestmark = pytest.mark.usefixtures("clean_env")

AUTH = {"callback_auth_key": "X-Hil-Auth", "callback_auth_value": "v4lue-123"}


def ask(client: TestClient, chat: str | None = "chatA", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"message": "要上线吗？", **extra}
    if chat:
        body["chat_id"] = chat
    sent = client.post("/api/send", json=body).json()
    assert sent["success"], sent
    return sent


def status(client: TestClient, sent: dict[str, Any]) -> dict[str, Any]:
    return client.get(f"/api/poll/{sent['session_id']}").json()


# --- relay mode: callbacks only through workers -------------------------------------------------------------------


def test_relay_server_refuses_callbacks_and_says_where_they_go(tmp_path: Path) -> None:
    app = create_app(settings(tmp_path, hil_mode="relay", bot_key=None, hil_api_tokens="tok"))
    with TestClient(app) as client:
        forged = {
            "chatid": "chatA",
            "msgtype": "text",
            "from": {"userid": "ceo"},
            "text": {"content": "yes, deploy"},
        }
        response = client.post("/api/callback", json=forged)
        assert response.status_code == 404
        assert "DevCloud Worker" in response.json()["error"] and "HIL_RELAY_CALLBACKS" in response.json()["error"]
        assert client.get("/api/callback").status_code == 404


def test_relay_callbacks_need_authentication_when_enabled(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HIL_RELAY_CALLBACKS"):
        create_app(settings(tmp_path, hil_mode="relay", bot_key=None, hil_relay_callbacks=True))
    app = create_app(settings(tmp_path, hil_mode="relay", bot_key=None, hil_relay_callbacks=True, **AUTH))
    with TestClient(app) as client:
        assert client.post("/api/callback", json=callback_body("hi")).status_code == 401
        headers = {"X-Hil-Auth": AUTH["callback_auth_value"]}
        assert client.post("/api/callback", json=callback_body("hi"), headers=headers).status_code == 200


def test_open_callbacks_warn_loudly_and_show_on_status(
    tmp_path: Path, wecom: WeCom, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), TestClient(create_app(settings(tmp_path))) as client:
        assert client.get("/status.json").json()["callbacks"] == "callbacks unauthenticated"
    assert any("CALLBACKS ARE UNAUTHENTICATED" in r.getMessage() for r in caplog.records)
    with TestClient(create_app(settings(tmp_path / "b", **AUTH))) as client:
        assert client.get("/status.json").json()["callbacks"] == "X-Hil-Auth header"


# --- signed callbacks ---------------------------------------------------------------------------------------------


@pytest.fixture
def oracle() -> WeComOracle:
    return WeComOracle(new_callback_token(), new_aes_key())


def crypto(oracle: WeComOracle) -> dict[str, str]:
    key = base64.b64encode(oracle.key).decode().rstrip("=")
    return {"wecom_callback_token": oracle.token, "wecom_callback_aes_key": key}


def signed(client: TestClient, oracle: WeComOracle, payload: dict[str, Any], **kw: Any) -> Any:
    params, body = oracle.json_post(payload, **kw)
    return client.post("/api/callback", params=params, content=body)


def test_a_signed_callback_needs_no_header_even_when_a_header_rule_is_set(
    tmp_path: Path, wecom: WeCom, oracle: WeComOracle
) -> None:
    # The README's advice for one URL taking both forms: WeCom's signed POST cannot carry the custom header.
    with TestClient(create_app(settings(tmp_path, **crypto(oracle), **AUTH))) as client:
        sent = ask(client)
        response = signed(client, oracle, text_payload_json("chatA", quote(sent["short_id"], "可以"), "s-1"))
        assert response.status_code == 200, response.text
        assert status(client, sent)["status"] == "replied"
        # Unsigned JSON still needs the header.
        assert client.post("/api/callback", json=callback_body("x", msgid="u-1")).status_code == 401


# WeCom's timestamp is whole seconds: 301 s ahead, cut to an integer, can land inside the 300 s window; 302 cannot.
@pytest.mark.parametrize("offset", [-3600 * 24 * 365 * 3, -301, 302, 86400])
def test_stale_or_future_signed_callbacks_are_refused(
    tmp_path: Path, wecom: WeCom, oracle: WeComOracle, offset: float
) -> None:
    with TestClient(create_app(settings(tmp_path, **crypto(oracle)))) as client:
        sent = ask(client)
        payload = text_payload_json("chatA", quote(sent["short_id"], "yes, deploy"), f"old-{offset}")
        response = signed(client, oracle, payload, at=time.time() + offset)
        assert response.status_code == 403 and "timestamp" in response.json()["error"]
        assert status(client, sent)["status"] == "waiting"
        fresh = signed(client, oracle, text_payload_json("chatA", quote(sent["short_id"], "不要"), "new-1"))
        assert fresh.status_code == 200
        assert status(client, sent)["replies"][0]["content"] == "不要"


def test_a_replayed_signed_callback_answers_nothing_new(tmp_path: Path, wecom: WeCom, oracle: WeComOracle) -> None:
    # Retention shorter than the replay window: the msgid memory still covers the window.
    app = create_app(
        settings(tmp_path, **crypto(oracle), session_retention=1, hil_callback_max_age=300, hil_sweep_interval=0.1)
    )
    with TestClient(app) as client:
        first = ask(client)
        params, body = oracle.json_post(text_payload_json("chatA", "yes", "cap-1"))
        assert client.post("/api/callback", params=params, content=body).status_code == 200
        assert status(client, first)["status"] == "replied"
        second = ask(client)
        # The captured "yes" sent again (same signature, same msgid) is a duplicate, not an answer to the new one.
        assert client.post("/api/callback", params=params, content=body).status_code == 200
        assert status(client, second)["status"] == "waiting"
        deadline = time.monotonic() + 5
        while status(client, first)["status"] != "not_found" and time.monotonic() < deadline:
            time.sleep(0.05)  # past SESSION_RETENTION (1 s): the answered question is purged...
        assert status(client, first)["status"] == "not_found"
        # ...but its msgid is remembered for the whole replay window.
        assert client.post("/api/callback", params=params, content=body).status_code == 200
        assert status(client, second)["status"] == "waiting"


# --- other chats ---------------------------------------------------------------------------------------------------


def test_quotes_and_plain_replies_from_other_chats_are_not_answers(tmp_path: Path, wecom: WeCom) -> None:
    with TestClient(create_app(settings(tmp_path))) as client:
        sent = ask(client, chat="chatA")
        other_group = callback_body(quote(sent["short_id"], "yes, deploy"), chat="chatB", msgid="x-1")
        assert client.post("/api/callback", json=other_group).status_code == 200
        private = callback_body("\u201c[#" + sent["short_id"] + "]\u201d\n------\nyes", chat="zhangsan", msgid="x-2")
        private["chattype"] = "single"
        assert client.post("/api/callback", json=private).status_code == 200
        plain = callback_body("yes", chat="chatB", msgid="x-3")
        assert client.post("/api/callback", json=plain).status_code == 200
        assert status(client, sent)["status"] == "waiting"
        wecom.wait_for(lambda: sum("不是在这个会话里提出的" in t for t in wecom.texts()) == 2)
        assert {p["chatid"] for p in wecom.accepted if "不是在这个会话" in p.get("text", {}).get("content", "")} == {
            "chatB",
            "zhangsan",
        }
        real = callback_body(quote(sent["short_id"], "不行"), chat="chatA", msgid="x-4")
        assert client.post("/api/callback", json=real).status_code == 200
        (reply,) = status(client, sent)["replies"]
        assert reply["content"] == "不行" and reply["chat_id"] == "chatA"
        assert reply["from_user"]["userid"] == "zhangsan" and reply["from_user"]["name"] == "张三"


def test_a_question_without_chat_id_is_answered_only_from_group_chats(tmp_path: Path, wecom: WeCom) -> None:
    with TestClient(create_app(settings(tmp_path))) as client:
        sent = ask(client, chat=None)
        private = callback_body(quote(sent["short_id"], "yes"), chat="lisi", msgid="p-1")
        private["chattype"] = "single"
        assert client.post("/api/callback", json=private).status_code == 200
        assert status(client, sent)["status"] == "waiting"
        group = callback_body("好的", chat="robot-group", msgid="p-2")
        assert client.post("/api/callback", json=group).status_code == 200
        (reply,) = status(client, sent)["replies"]
        assert reply["chat_id"] == "robot-group"  # recorded: where the answer came from


def test_default_chat_id_setting_binds_questions_without_one(tmp_path: Path, wecom: WeCom) -> None:
    with TestClient(create_app(settings(tmp_path, hil_default_chat_id="chatHome"))) as client:
        sent = ask(client, chat=None)
        assert wecom.accepted[-1]["chatid"] == "chatHome"
        elsewhere = callback_body("yes", chat="chatB", msgid="d-1")
        assert client.post("/api/callback", json=elsewhere).status_code == 200
        assert status(client, sent)["status"] == "waiting"
        home = callback_body("yes", chat="chatHome", msgid="d-2")
        assert client.post("/api/callback", json=home).status_code == 200
        assert status(client, sent)["status"] == "replied"
