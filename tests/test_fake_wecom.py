"""Tests for the fake WeCom robot API (hil_sandbox.fake_wecom)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from hil_sandbox import fake_wecom
from hil_sandbox.fake_wecom import (
    FakeWeCom,
    FakeWeComConfig,
    ImageStore,
    create_fake_wecom_app,
    format_quote_reply,
)
from tests.helpers import free_port

KEY = "test-bot-key"
OTHER_KEY = "other-bot-key"
CALLBACK_URL = "http://hil.test/api/callback"
BASE = "http://fake.test"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Receiver:
    """A tiny callback receiver standing in for hil_server's /api/callback."""

    calls: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    app: FastAPI = field(default_factory=FastAPI)

    def __post_init__(self) -> None:
        @self.app.post("/api/callback")
        async def callback(request: Request) -> dict[str, Any]:
            self.calls.append((dict(request.headers), await request.json()))
            return {"received": len(self.calls)}


@dataclass
class Env:
    fake: FakeWeCom
    client: httpx.AsyncClient
    receiver: Receiver

    async def send(self, body: Any, key: str | None = KEY) -> dict[str, Any]:
        params = {"key": key} if key is not None else {}
        response = await self.client.post("/cgi-bin/webhook/send", params=params, json=body)
        assert response.status_code == 200  # WeCom answers 200 even for errors
        return response.json()

    async def text(self, content: str, chatid: str | None = "chat-1", key: str = KEY) -> dict[str, Any]:
        body: dict[str, Any] = {"msgtype": "text", "text": {"content": content}}
        if chatid is not None:
            body["chatid"] = chatid
        return await self.send(body, key=key)

    async def upload(self, data: bytes, filename: str = "report.txt", key: str = KEY, type_: str = "file") -> dict:
        response = await self.client.post(
            "/cgi-bin/webhook/upload_media", params={"key": key, "type": type_}, files={"media": (filename, data)}
        )
        assert response.status_code == 200
        return response.json()


def image_body(data: bytes, md5: str | None = None) -> dict[str, Any]:
    return {
        "msgtype": "image",
        "image": {"base64": base64.b64encode(data).decode(), "md5": md5 or hashlib.md5(data).hexdigest()},
    }


def make_env(config: FakeWeComConfig) -> Env:
    receiver = Receiver()
    callback_client = httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver.app))
    app = create_fake_wecom_app(config, http_client=callback_client)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)
    return Env(fake=app.state.fake, client=client, receiver=receiver)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    config = FakeWeComConfig(
        bot_keys={KEY, OTHER_KEY}, callback_url=CALLBACK_URL, callback_headers={"X-Hil-Token": "s3cret"}
    )
    environment = make_env(config)
    yield environment
    await environment.client.aclose()
    assert environment.fake.http_client is not None
    await environment.fake.http_client.aclose()


def errcodes(fake: FakeWeCom) -> list[int]:
    return [attempt.errcode for attempt in fake.attempts]


# ----- sending -----


async def test_text_send_is_recorded(env: Env) -> None:
    body = {"msgtype": "text", "chatid": "chat-1", "text": {"content": "hello", "mentioned_list": ["zhangsan"]}}
    assert await env.send(body) == {"errcode": 0, "errmsg": "ok"}
    [message] = env.fake.messages
    assert (message.seq, message.key, message.chatid, message.msgtype) == (1, KEY, "chat-1", "text")
    assert message.content == "hello"
    assert message.mentioned_list == ["zhangsan"]
    assert message.image_md5 is None and message.media_id is None
    assert env.fake.attempts[0].errcode == 0 and env.fake.attempts[0].message_seq == 1


async def test_send_without_chatid_records_none(env: Env) -> None:
    assert (await env.text("to every group", chatid=None))["errcode"] == 0
    assert env.fake.messages[0].chatid is None


@pytest.mark.parametrize("key", [None, "", "wrong-key"])
async def test_unknown_or_missing_key_is_93000(env: Env, key: str | None) -> None:
    answer = await env.send({"msgtype": "text", "text": {"content": "hi"}}, key=key)
    assert answer["errcode"] == 93000
    assert answer["errmsg"].startswith("invalid webhook url")
    assert env.fake.messages == []
    assert errcodes(env.fake) == [93000]


async def test_body_not_json_or_not_object_is_47001(env: Env) -> None:
    response = await env.client.post("/cgi-bin/webhook/send", params={"key": KEY}, content=b"{not json")
    assert response.status_code == 200 and response.json()["errcode"] == 47001
    response = await env.client.post("/cgi-bin/webhook/send", params={"key": KEY}, content=b"\xff\xfe")
    assert response.json()["errcode"] == 47001
    assert (await env.send(["msgtype", "text"]))["errcode"] == 47001
    assert env.fake.messages == []


@pytest.mark.parametrize("msgtype", ["voice", "template_card_x", None, 7])
async def test_invalid_msgtype_is_40008(env: Env, msgtype: Any) -> None:
    answer = await env.send({"msgtype": msgtype, "text": {"content": "hi"}})
    assert answer["errcode"] == 40008
    assert answer["errmsg"].startswith("invalid message type")


async def test_text_limit_counts_utf8_bytes(env: Env) -> None:
    exactly = "中" * 682 + "ab"  # 2046 + 2 = 2048 bytes
    too_long = "中" * 683  # 2049 bytes but only 683 characters
    assert len(exactly.encode()) == 2048 and len(too_long.encode()) == 2049
    assert (await env.text(exactly))["errcode"] == 0
    answer = await env.text(too_long)
    assert answer["errcode"] == 40058
    assert answer["errmsg"].startswith("content exceed max length")
    assert [m.content for m in env.fake.messages] == [exactly]


@pytest.mark.parametrize("msgtype", ["markdown", "markdown_v2"])
async def test_markdown_limit_counts_utf8_bytes(env: Env, msgtype: str) -> None:
    exactly = "中" * 1365 + "a"  # 4095 + 1 = 4096 bytes
    too_long = "中" * 1365 + "ab"  # 4097 bytes
    assert len(exactly.encode()) == 4096 and len(too_long.encode()) == 4097
    assert (await env.send({"msgtype": msgtype, msgtype: {"content": exactly}}))["errcode"] == 0
    assert (await env.send({"msgtype": msgtype, msgtype: {"content": too_long}}))["errcode"] == 40058
    assert env.fake.messages[0].content == exactly and env.fake.messages[0].msgtype == msgtype


@pytest.mark.parametrize(
    ("body", "errcode"),
    [
        ({"msgtype": "text", "text": {"content": ""}}, 44004),
        ({"msgtype": "text", "text": {}}, 44004),
        ({"msgtype": "text"}, 44004),
        ({"msgtype": "markdown", "markdown": {"content": ""}}, 44004),
        ({"msgtype": "text", "text": "hi"}, 40035),
        ({"msgtype": "text", "text": {"content": 5}}, 40035),
        ({"msgtype": "text", "text": {"content": "hi", "mentioned_list": "zhangsan"}}, 40035),
        ({"msgtype": "text", "chatid": 12, "text": {"content": "hi"}}, 40035),
        ({"msgtype": "text", "chatid": "|".join(["c"] * 101), "text": {"content": "hi"}}, 40035),
        ({"msgtype": "news", "news": {"articles": []}}, 40035),
        ({"msgtype": "news", "news": {"articles": [{"title": "t"}]}}, 40035),
    ],
)
async def test_malformed_bodies(env: Env, body: dict[str, Any], errcode: int) -> None:
    assert (await env.send(body))["errcode"] == errcode
    assert env.fake.messages == []


async def test_news_is_accepted(env: Env) -> None:
    articles = [{"title": "第一", "url": "https://example.com/1"}, {"title": "second", "url": "https://example.com/2"}]
    assert (await env.send({"msgtype": "news", "news": {"articles": articles}}))["errcode"] == 0
    assert env.fake.messages[0].content == "第一\nsecond"


# ----- images -----


@pytest.mark.parametrize("data", [PNG, JPEG])
async def test_image_png_and_jpeg_accepted(env: Env, data: bytes) -> None:
    assert (await env.send(image_body(data)))["errcode"] == 0
    message = env.fake.messages[0]
    assert message.content is None
    assert (message.image_md5, message.image_size) == (hashlib.md5(data).hexdigest(), len(data))


async def test_image_md5_compared_case_insensitively(env: Env) -> None:
    assert (await env.send(image_body(PNG, hashlib.md5(PNG).hexdigest().upper())))["errcode"] == 0


async def test_image_md5_mismatch(env: Env) -> None:
    answer = await env.send(image_body(PNG, hashlib.md5(b"other").hexdigest()))
    assert answer["errcode"] == 301019
    assert env.fake.messages == []


async def test_image_not_png_or_jpeg(env: Env) -> None:
    assert (await env.send(image_body(b"GIF89a" + b"\x00" * 32)))["errcode"] == 40005


async def test_image_over_2mb(env: Env) -> None:
    exactly = PNG + b"\x00" * (2 * 1024 * 1024 - len(PNG))
    assert (await env.send(image_body(exactly)))["errcode"] == 0
    assert (await env.send(image_body(exactly + b"\x00")))["errcode"] == 40009


@pytest.mark.parametrize(
    "image",
    [{"base64": "not base64!!", "md5": "0" * 32}, {"md5": "0" * 32}, {"base64": "aGVsbG8="}, "x"],
)
async def test_image_bad_parameters(env: Env, image: Any) -> None:
    assert (await env.send({"msgtype": "image", "image": image}))["errcode"] == 40035


# ----- rate limit and injected failures -----


async def test_rate_limit_then_recovery_after_window(env: Env) -> None:
    env.fake.update_config(rate_limit=2, rate_window=0.2)
    assert (await env.text("1"))["errcode"] == 0
    assert (await env.send({"msgtype": "bogus"}))["errcode"] == 40008  # rejected sends don't use the budget
    assert (await env.text("2"))["errcode"] == 0
    answer = await env.text("3")
    assert answer["errcode"] == 45009
    assert answer["errmsg"].startswith("api freq out of limit")
    assert (await env.text("3 again"))["errcode"] == 45009
    # Per key: the other robot has its own budget.
    assert (await env.text("other", key=OTHER_KEY))["errcode"] == 0
    await asyncio.sleep(0.25)
    assert (await env.text("4"))["errcode"] == 0
    assert errcodes(env.fake).count(45009) == 2
    assert [m.content for m in env.fake.messages] == ["1", "2", "other", "4"]


async def test_rate_limit_with_injected_clock() -> None:
    now = [1000.0]
    fake = FakeWeCom(FakeWeComConfig(rate_limit=1, rate_window=60), clock=lambda: now[0])
    body = {"msgtype": "text", "text": {"content": "x"}}
    assert fake.handle_send(KEY, body)["errcode"] == 0
    now[0] += 59.9
    assert fake.handle_send(KEY, body)["errcode"] == 45009
    now[0] += 0.2
    assert fake.handle_send(KEY, body)["errcode"] == 0


async def test_fail_next_injects_errcodes_in_order(env: Env) -> None:
    env.fake.fail_next(45009, 93000, 40058, 12345)
    answers = [await env.text(f"try {i}") for i in range(5)]
    assert [a["errcode"] for a in answers] == [45009, 93000, 40058, 12345, 0]
    assert answers[0]["errmsg"].startswith("api freq out of limit")
    assert answers[3]["errmsg"].startswith("injected failure")
    assert [m.content for m in env.fake.messages] == ["try 4"]
    assert [a.injected for a in env.fake.attempts] == [True, True, True, True, False]


async def test_fail_next_applies_after_key_check(env: Env) -> None:
    env.fake.fail_next(45009)
    assert (await env.text("x", key="wrong-key"))["errcode"] == 93000
    assert env.fake.pending_failures == [45009]
    assert (await env.text("x"))["errcode"] == 45009
    assert env.fake.pending_failures == []


async def test_control_fail_attempts_and_reset(env: Env) -> None:
    response = await env.client.post("/_fake/fail", json={"errcodes": [45009, 45009]})
    assert response.json() == {"pending": [45009, 45009]}
    for _ in range(3):
        await env.text("hi")
    attempts = (await env.client.get("/_fake/attempts")).json()["attempts"]
    assert [a["errcode"] for a in attempts] == [45009, 45009, 0]
    assert (await env.client.post("/_fake/fail", json={"errcodes": []})).status_code == 422

    assert (await env.client.post("/_fake/reset")).json() == {"ok": True}
    assert (await env.client.get("/_fake/messages")).json()["messages"] == []
    assert (await env.client.get("/_fake/attempts")).json()["attempts"] == []
    assert (await env.text("fresh"))["errcode"] == 0
    assert env.fake.messages[0].seq == 1


async def test_control_config(env: Env) -> None:
    response = await env.client.post("/_fake/config", json={"rate_limit": 1, "rate_window": 0.2})
    assert response.status_code == 200
    view = response.json()
    assert view["rate_limit"] == 1 and view["callback_header_names"] == ["X-Hil-Token"]
    assert "s3cret" not in response.text
    assert (await env.text("1"))["errcode"] == 0
    assert (await env.text("2"))["errcode"] == 45009
    # Only the fields sent change; null turns the limit off.
    assert (await env.client.post("/_fake/config", json={"rate_limit": None})).json()["rate_window"] == 0.2
    assert (await env.text("3"))["errcode"] == 0
    assert (await env.client.post("/_fake/config", json={"rate_limt": 3})).status_code == 422
    assert (await env.client.post("/_fake/config", json={"rate_window": 0})).status_code == 422
    await env.client.post("/_fake/config", json={"bot_keys": ["new-key"]})
    assert (await env.text("4"))["errcode"] == 93000
    assert (await env.text("4", key="new-key"))["errcode"] == 0


# ----- files -----


async def test_upload_media_then_send_file(env: Env) -> None:
    upload = await env.upload(b"hello world", filename="日志.txt")
    assert upload["errcode"] == 0 and upload["type"] == "file"
    assert upload["media_id"] and upload["created_at"].isdigit()
    body = {"msgtype": "file", "chatid": "chat-1", "file": {"media_id": upload["media_id"]}}
    assert (await env.send(body))["errcode"] == 0
    message = env.fake.messages[0]
    assert (message.msgtype, message.media_id, message.file_name, message.content) == (
        "file",
        upload["media_id"],
        "日志.txt",
        None,
    )
    # A media_id belongs to the robot that uploaded it.
    assert (await env.send(body, key=OTHER_KEY))["errcode"] == 40007


async def test_file_send_with_unknown_or_missing_media_id(env: Env) -> None:
    assert (await env.send({"msgtype": "file", "file": {"media_id": "nope"}}))["errcode"] == 40007
    assert (await env.send({"msgtype": "file", "file": {}}))["errcode"] == 40035


async def test_media_expires() -> None:
    now = [0.0]
    fake = FakeWeCom(FakeWeComConfig(media_ttl=10), clock=lambda: now[0])
    media_id = fake.handle_upload(KEY, "file", "a.txt", b"12345")["media_id"]
    assert fake.handle_send(KEY, {"msgtype": "file", "file": {"media_id": media_id}})["errcode"] == 0
    now[0] = 10.0
    assert fake.handle_send(KEY, {"msgtype": "file", "file": {"media_id": media_id}})["errcode"] == 40007


async def test_upload_media_errors(env: Env) -> None:
    assert (await env.upload(b"1234"))["errcode"] == 40006  # under 5 bytes
    assert (await env.upload(b"12345"))["errcode"] == 0
    assert (await env.upload(b"12345", key="wrong-key"))["errcode"] == 93000
    assert (await env.upload(b"12345", type_="image"))["errcode"] == 40004
    response = await env.client.post(
        "/cgi-bin/webhook/upload_media", params={"key": KEY, "type": "file"}, files={"other": ("a.txt", b"12345")}
    )
    assert response.json()["errcode"] == 44001
    response = await env.client.post(
        "/cgi-bin/webhook/upload_media", params={"key": KEY, "type": "file"}, data={"media": "no filename"}
    )
    assert response.json()["errcode"] == 40035


async def test_upload_media_over_20mb(env: Env) -> None:
    assert (await env.upload(b"\x00" * (20 * 1024 * 1024 + 1)))["errcode"] == 40006


# ----- people replying -----


def test_format_quote_reply() -> None:
    quote = "[#1a2b3c4d my project]\nWhich database?"
    assert (
        format_quote_reply(quote, "use postgres", "HIL助手", "HIL助手")
        == "\u201cHIL助手\uff1a\n[#1a2b3c4d my project]\nWhich database?\u201d\n------\n@HIL助手 use postgres"
    )
    assert format_quote_reply("q", "a") == "\u201cq\u201d\n------\na"
    assert format_quote_reply("q", "a", robot_name="Bot") == "“q”\n------\n@Bot a"


async def test_reply_posts_quote_reply_to_callback(env: Env) -> None:
    response = await env.client.post(
        "/_fake/reply",
        json={
            "chat_id": "chat-1",
            "text": "use postgres",
            "quote": "[#1a2b3c4d my project] Which database?",
            "quote_sender": "HIL助手",
            "from_user": {"userid": "lisi", "name": "李四", "alias": "lisi"},
            "msgid": "msg-1",
        },
    )
    assert response.status_code == 200
    result = response.json()
    expected = {
        "webhook_url": f"{BASE}/cgi-bin/webhook/send?key={min(KEY, OTHER_KEY)}",
        "msgid": "msg-1",
        "chatid": "chat-1",
        "chattype": "group",
        "msgtype": "text",
        "from": {"userid": "lisi", "name": "李四", "alias": "lisi"},
        "text": {
            "content": "\u201cHIL助手\uff1a\n[#1a2b3c4d my project] Which database?\u201d\n------\n"
            "@HIL助手 use postgres"
        },
    }
    assert result["callback"] == expected
    assert result["responses"] == [{"status_code": 200, "body": {"received": 1}, "error": None}]
    [(headers, body)] = env.receiver.calls
    assert body == expected
    assert headers["x-hil-token"] == "s3cret"
    assert (await env.client.get("/_fake/callbacks")).json()["callbacks"][0]["callback"] == expected


async def test_reply_repeat_sends_same_msgid(env: Env) -> None:
    result = await env.fake.reply("chat-1", "ok", repeat=3)
    assert len(result["responses"]) == 3
    msgids = [body["msgid"] for _, body in env.receiver.calls]
    assert len(msgids) == 3 and len(set(msgids)) == 1 and msgids[0] == result["callback"]["msgid"]
    assert env.receiver.calls[0][1]["text"]["content"] == "@HIL助手 ok"


async def test_reply_shapes(env: Env) -> None:
    fake = env.fake
    single = fake.build_callback("zhangsan", "hi there", chat_type="single")
    assert single["chattype"] == "single" and single["text"] == {"content": "hi there"}
    assert fake.build_callback("c", "hi", at_robot=False)["text"] == {"content": "hi"}
    quoted = fake.build_callback("c", "yes", quote="[#1a2b3c4d p] q", chat_type="single")
    assert quoted["text"]["content"] == "\u201c[#1a2b3c4d p] q\u201d\n------\nyes"

    image = fake.build_callback("zhangsan", image_url="https://img.test/1.png", chat_type="single")
    assert image["msgtype"] == "image" and image["image"] == {"image_url": "https://img.test/1.png"}
    assert "text" not in image

    mixed = fake.build_callback("c", "see this", image_url="https://img.test/2.png", quote="[#1a2b3c4d p] q")
    assert mixed["msgtype"] == "mixed"
    assert mixed["mixed_message"]["msg_item"] == [
        {"msg_type": "text", "text": {"content": "\u201c[#1a2b3c4d p] q\u201d\n------\n@HIL助手 see this"}},
        {"msg_type": "image", "image": {"image_url": "https://img.test/2.png"}},
    ]

    event = fake.build_callback("c", event_type="enter_chat")
    assert event["msgtype"] == "event" and event["event"] == {"event_type": "enter_chat"}
    assert set(event) == {"webhook_url", "msgid", "chatid", "chattype", "msgtype", "from", "event"}

    default = fake.build_callback("c", "x")
    assert default["from"] == {"userid": "zhangsan", "name": "张三", "alias": "zhangsan"}
    assert default["webhook_url"] == f"http://127.0.0.1:8090/cgi-bin/webhook/send?key={OTHER_KEY}"
    with pytest.raises(ValueError, match="image_url"):
        fake.build_callback("c", "x", msgtype="image")


@pytest.mark.parametrize(
    "body",
    [
        {"chat_id": "c"},
        {"chat_id": "c", "msgtype": "image"},
        {"chat_id": "c", "msgtype": "event"},
        {"chat_id": "c", "text": "x", "repeat": 0},
        {"chat_id": "c", "text": "x", "chat_type": "channel"},
        {"text": "x"},
    ],
)
async def test_reply_rejects_bad_requests(env: Env, body: dict[str, Any]) -> None:
    assert (await env.client.post("/_fake/reply", json=body)).status_code == 422
    assert env.receiver.calls == []


async def test_reply_without_callback_url_is_409(env: Env) -> None:
    await env.client.post("/_fake/config", json={"callback_url": None})
    response = await env.client.post("/_fake/reply", json={"chat_id": "c", "text": "x"})
    assert response.status_code == 409
    assert "callback_url" in response.json()["detail"]


async def test_reply_reports_unreachable_callback() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    fake = FakeWeCom(FakeWeComConfig(callback_url=CALLBACK_URL), http_client=client)
    result = await fake.reply("c", "x", repeat=2)
    assert [r["status_code"] for r in result["responses"]] == [None, None]
    assert "ConnectError" in result["responses"][0]["error"]
    await client.aclose()


def test_reply_through_lifespan_client_with_respx() -> None:
    config = FakeWeComConfig(callback_url=CALLBACK_URL, callback_headers={"Authorization": "Bearer t"})
    app = create_fake_wecom_app(config)
    with respx.mock(assert_all_called=True) as mock, TestClient(app, base_url=BASE) as client:
        route = mock.post(CALLBACK_URL).respond(200, text="")
        response = client.post("/_fake/reply", json={"chat_id": "c", "text": "done", "msgid": "m-9", "repeat": 2})
        assert response.status_code == 200
        assert response.json()["responses"] == [{"status_code": 200, "body": "", "error": None}] * 2
        assert route.call_count == 2
        sent = route.calls.last.request
        assert sent.headers["authorization"] == "Bearer t"
        assert sent.read().decode().count("m-9") == 1
    assert app.state.fake.http_client is None  # closed by the lifespan


# ----- observing sends -----


async def test_messages_filtered_by_chat_and_seq(env: Env) -> None:
    await env.text("a", chatid="chat-1")
    await env.text("b", chatid="chat-2|chat-1")
    await env.text("c", chatid="chat-2")
    await env.text("d", chatid=None)
    get = env.client.get
    assert [m["content"] for m in (await get("/_fake/messages")).json()["messages"]] == ["a", "b", "c", "d"]
    chat1 = (await get("/_fake/messages", params={"chat_id": "chat-1"})).json()["messages"]
    assert [m["content"] for m in chat1] == ["a", "b"]
    later = (await get("/_fake/messages", params={"chat_id": "chat-2", "since_seq": 2})).json()["messages"]
    assert [m["content"] for m in later] == ["c"]
    assert set(chat1[0]) >= {"seq", "key", "chatid", "msgtype", "content", "mentioned_list", "image_md5", "ts"}


async def test_wait_for_messages(env: Env) -> None:
    waiter = asyncio.create_task(env.fake.wait_for_messages(2, chat_id="chat-1", timeout=5))
    await env.text("other chat", chatid="chat-2")
    await env.text("one")
    await asyncio.sleep(0)
    assert not waiter.done()
    await env.text("two")
    assert [m.content for m in await waiter] == ["one", "two"]
    # Already satisfied: returns at once.
    assert len(await env.fake.wait_for_messages(1, timeout=0)) == 3


async def test_wait_for_messages_times_out(env: Env) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="chat-9"):
        await env.fake.wait_for_messages(1, chat_id="chat-9", timeout=0.05)
    assert time.monotonic() - start < 1
    assert env.fake._waiters == []


async def test_messages_long_poll(env: Env) -> None:
    poll = asyncio.create_task(env.client.get("/_fake/messages", params={"wait": 1, "chat_id": "c", "timeout": 5}))
    await asyncio.sleep(0.01)
    await env.text("late", chatid="c")
    body = (await poll).json()
    assert body["timed_out"] is False and [m["content"] for m in body["messages"]] == ["late"]
    body = (await env.client.get("/_fake/messages", params={"wait": 2, "chat_id": "c", "timeout": 0.05})).json()
    assert body["timed_out"] is True and len(body["messages"]) == 1


async def test_wait_for_messages_across_threads() -> None:
    # TestClient runs the app on its own thread and loop; the waiter here must still wake up.
    app = create_fake_wecom_app(FakeWeComConfig())
    with TestClient(app) as client:
        waiter = asyncio.create_task(app.state.fake.wait_for_messages(1, timeout=5))
        await asyncio.sleep(0)
        body = {"msgtype": "text", "text": {"content": "from another thread"}}
        response = await asyncio.to_thread(client.post, "/cgi-bin/webhook/send", params={"key": KEY}, json=body)
        assert response.json()["errcode"] == 0
        assert [m.content for m in await asyncio.wait_for(waiter, 5)] == ["from another thread"]


# ----- what the sandbox chat page uses -----


async def test_chat_page_is_served_self_contained(env: Env) -> None:
    response = await env.client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    for testid in ("composer-input", "send-button", "quote-bar", "chat-id-input", "chat-list", "image-input"):
        assert f'data-testid="{testid}"' in page
    # Nothing from elsewhere: no external scripts, styles or fonts.
    assert "<script src" not in page and "<link" not in page and "@import" not in page


async def test_sent_image_is_kept_for_the_page(env: Env) -> None:
    assert (await env.send(image_body(PNG)))["errcode"] == 0
    image_id = env.fake.messages[0].image_id
    assert image_id is not None
    response = await env.client.get(f"/_fake/images/{image_id}")
    assert response.status_code == 200 and response.content == PNG
    assert response.headers["content-type"] == "image/png"
    assert (await env.send(image_body(PNG, md5="0" * 32)))["errcode"] == 301019
    assert len(env.fake.images) == 1  # a rejected send keeps nothing
    await env.client.post("/_fake/reset")
    assert (await env.client.get(f"/_fake/images/{image_id}")).status_code == 404


def test_image_store_forgets_the_oldest_past_its_bounds() -> None:
    store = ImageStore(max_bytes=10, max_count=2)
    first, second = store.add(b"1234"), store.add(b"5678")
    third = store.add(b"9")
    assert store.get(first) is None and store.get(second) == b"5678" and store.get(third) == b"9"
    big = store.add(b"0123456789")
    assert len(store) == 1 and store.get(big) == b"0123456789"


async def test_attach_image_then_reply_with_its_url(env: Env) -> None:
    response = await env.client.post("/_fake/images", files={"file": ("shot.jpg", JPEG, "image/jpeg")})
    assert response.status_code == 201
    url = response.json()["url"]
    assert url == f"{BASE}/_fake/images/{response.json()['image_id']}"
    served = await env.client.get(url)
    assert served.content == JPEG and served.headers["content-type"] == "image/jpeg"

    result = (await env.client.post("/_fake/reply", json={"chat_id": "c", "image_url": url})).json()
    assert result["callback"]["image"] == {"image_url": url}

    env.fake.update_config(public_url="http://wecom.example:8090/")
    response = await env.client.post("/_fake/images", files={"file": ("a.png", PNG, "image/png")})
    assert response.json()["url"].startswith("http://wecom.example:8090/_fake/images/")


async def test_attach_image_errors(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    post = env.client.post
    assert (await post("/_fake/images", files={"file": ("a.txt", b"hello", "text/plain")})).status_code == 415
    assert (await post("/_fake/images", files={"other": ("a.png", PNG, "image/png")})).status_code == 400
    assert (await post("/_fake/images", content=b"x", headers={"content-type": "text/plain"})).status_code == 400
    monkeypatch.setattr(fake_wecom, "ATTACH_MAX_BYTES", 16)
    too_big = await post("/_fake/images", files={"file": ("a.png", PNG, "image/png")})
    assert too_big.status_code == 413 and "at most 16" in too_big.json()["detail"]
    assert (await env.client.get("/_fake/images/unknown")).status_code == 404
    assert len(env.fake.images) == 0


async def test_callbacks_have_seq_and_long_poll(env: Env) -> None:
    before = time.time()
    first = await env.fake.reply("c", "one")
    assert first["seq"] == 1 and before <= first["ts"] <= time.time()
    await env.fake.reply("c", "two")
    later = (await env.client.get("/_fake/callbacks", params={"since_seq": 1})).json()
    assert [c["callback"]["text"]["content"] for c in later["callbacks"]] == ["@HIL助手 two"]

    poll = asyncio.create_task(env.client.get("/_fake/callbacks", params={"since_seq": 2, "wait": 1, "timeout": 5}))
    await asyncio.sleep(0.01)
    await env.fake.reply("c", "three")
    body = (await poll).json()
    assert body["timed_out"] is False and [c["seq"] for c in body["callbacks"]] == [3]
    body = (await env.client.get("/_fake/callbacks", params={"since_seq": 3, "wait": 1, "timeout": 0.05})).json()
    assert body == {"callbacks": [], "timed_out": True}
    assert env.fake._waiters == []


# ----- the CLI, as a real process -----


@pytest.fixture
def cli_server() -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "hil_sandbox.fake_wecom", "--port", str(port), "--bot-key", "k1"]
    command += ["--rate-limit", "5", "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as process:
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    httpx.get(f"{url}/_fake/config", timeout=0.5)
                    break
                except httpx.TransportError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        process.kill()
                        raise RuntimeError(f"fake WeCom did not start: {process.communicate()[1].decode()}") from None
                    time.sleep(0.05)  # a sync fixture polling a child process; nothing to await here
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)


@pytest.mark.e2e
def test_cli_runs_a_real_server(cli_server: str) -> None:
    body = {"msgtype": "text", "chatid": "c", "text": {"content": "real"}}
    assert httpx.post(f"{cli_server}/cgi-bin/webhook/send", params={"key": "k1"}, json=body).json()["errcode"] == 0
    bad_key = httpx.post(f"{cli_server}/cgi-bin/webhook/send", params={"key": KEY}, json=body).json()
    assert bad_key["errcode"] == 93000
    assert httpx.get(f"{cli_server}/_fake/config").json()["rate_limit"] == 5
    messages = httpx.get(f"{cli_server}/_fake/messages").json()["messages"]
    assert [m["content"] for m in messages] == ["real"]
    reply = httpx.post(f"{cli_server}/_fake/reply", json={"chat_id": "c", "text": "x"})
    assert reply.status_code == 409


async def test_hil_status_long_poll_answers_when_outcomes_change_not_when_ages_do() -> None:
    """The chat page's tags follow the server's outcomes without polling from the browser: /_fake/hil-status?wait=1
    holds until the outcomes differ from `since` (ages that grow every second do not count) or the timeout passes."""
    outcomes: list[dict[str, Any]] = []
    reads = 0

    def hil_server(request: httpx.Request) -> httpx.Response:
        nonlocal reads
        reads += 1
        assert request.url.path == "/status.json"
        recent = [{**event, "seconds_ago": reads} for event in outcomes]
        return httpx.Response(200, json={"recent": recent, "waiting": []})

    server = httpx.AsyncClient(transport=httpx.MockTransport(hil_server))
    config = FakeWeComConfig(hil_server_url="http://hil.test", hil_status_interval=0.01)
    app = create_fake_wecom_app(config, http_client=server)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        first = (await client.get("/_fake/hil-status")).json()
        since = first["fingerprint"]
        held = (await client.get("/_fake/hil-status", params={"since": since, "wait": 1, "timeout": 0.2})).json()
        assert held["fingerprint"] == since and reads > 3  # read again and again, nothing to tell

        async def answer_soon() -> None:
            await asyncio.sleep(0.05)
            outcomes.append({"short_id": "1a2b3c4d", "outcome": "replied (quote)", "by": "张三 (zhangsan)", "at": 1.0})

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(answer_soon())
            params = {"since": since, "wait": 1, "timeout": 10}
            changed = (await client.get("/_fake/hil-status", params=params)).json()
        assert changed["fingerprint"] != since and changed["recent"][0]["by"] == "张三 (zhangsan)"
    await server.aclose()
