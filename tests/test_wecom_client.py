"""hil_protocol.wecom_robot: the robot client (webhook and fly-pigeon backends), images, retries and pacing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sys
import threading
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import httpx
import pytest
import respx

from hil_protocol.images import IMAGE_MAX_BYTES, ImageError, ImageFetcher
from hil_protocol.messages import TEXT_LIMIT, utf8_len
from hil_protocol.outbound import Question
from hil_protocol.wecom_robot import (
    PigeonBackend,
    RetryPolicy,
    RobotSender,
    WebhookBackend,
    WeComError,
    WeComInvalidKey,
    WeComNetworkError,
    WeComRateLimited,
    make_backend,
)
from tests.tiny_http import Reply, TinyHTTP

BASE = "https://wecom.test"
KEY = "secret-bot-key-0123456789"
SEND = f"{BASE}/cgi-bin/webhook/send"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
JPEG = b"\xff\xd8\xff\xe0" + b"\x01\x02" * 300
FAST = RetryPolicy(deadline=5.0, base_delay=0.01, max_delay=0.02)


def ok() -> httpx.Response:
    return httpx.Response(200, json={"errcode": 0, "errmsg": "ok"})


def err(code: int, msg: str = "error") -> httpx.Response:
    return httpx.Response(200, json={"errcode": code, "errmsg": msg})


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        yield router


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def sender(http: httpx.AsyncClient, policy: RetryPolicy = FAST, **kw: Any) -> RobotSender:
    return RobotSender(WebhookBackend(http, BASE, KEY), policy, **kw)


def sent(route: respx.Route) -> list[dict[str, Any]]:
    return [json.loads(call.request.content) for call in route.calls]


# --- payload shapes -------------------------------------------------------------------------------------------


async def test_text_payload_with_mentions(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.post(SEND).mock(return_value=ok())
    await sender(http).send_text("chat-1", "你好 hello", ["zhangsan", "@all"])
    assert route.call_count == 1
    request = route.calls[0].request
    assert request.url.params["key"] == KEY
    assert json.loads(request.content) == {
        "msgtype": "text",
        "text": {"content": "你好 hello", "mentioned_list": ["zhangsan", "@all"]},
        "chatid": "chat-1",
    }


async def test_text_without_chat_or_mentions_leaves_fields_out(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.post(SEND).mock(return_value=ok())
    await sender(http).send_text(None, "hi")
    assert sent(route) == [{"msgtype": "text", "text": {"content": "hi"}}]


async def test_markdown_truncated_to_4096_bytes(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.post(SEND).mock(return_value=ok())
    await sender(http).send_markdown("chat-1", "**标题**\n" + "内容" * 3000)
    (payload,) = sent(route)
    assert payload["msgtype"] == "markdown"
    assert payload["chatid"] == "chat-1"
    content = payload["markdown"]["content"]
    assert content.startswith("**标题**\n")
    assert 4096 - 3 <= utf8_len(content) <= 4096


async def test_image_payload_base64_and_md5_of_raw_bytes(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.post(SEND).mock(return_value=ok())
    await sender(http).send_image("chat-1", PNG)
    (payload,) = sent(route)
    assert payload == {
        "msgtype": "image",
        "image": {"base64": base64.b64encode(PNG).decode(), "md5": hashlib.md5(PNG).hexdigest()},
        "chatid": "chat-1",
    }


async def test_text_over_limit_refused_before_sending(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.post(SEND).mock(return_value=ok())
    with pytest.raises(WeComError):
        await sender(http).send_text("c", "中" * 700)
    assert route.call_count == 0


# --- errors and retries -----------------------------------------------------------------------------------------


async def test_invalid_key_not_retried(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.post(SEND).mock(return_value=err(93000, "invalid webhook url"))
    with pytest.raises(WeComInvalidKey) as info:
        await sender(http).send_text("c", "hi")
    assert route.call_count == 1
    assert info.value.errcode == 93000
    assert "BOT_KEY" in str(info.value)


async def test_unknown_errcode_not_retried(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.post(SEND).mock(return_value=err(40008, "invalid message type"))
    with pytest.raises(WeComError) as info:
        await sender(http).send_text("c", "hi")
    assert route.call_count == 1
    assert info.value.errcode == 40008


async def test_rate_limited_twice_then_ok(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    delivered: list[dict[str, Any]] = []
    refusals = 2

    def wecom(request: httpx.Request) -> httpx.Response:
        nonlocal refusals
        if refusals:
            refusals -= 1
            return err(45009, "api freq out of limit")
        delivered.append(json.loads(request.content))
        return ok()

    route = mock.post(SEND).mock(side_effect=wecom)
    retries = await sender(http).send_text("c", "only once")
    assert route.call_count == 3
    assert retries == 2
    assert delivered == [{"msgtype": "text", "text": {"content": "only once"}, "chatid": "c"}]


async def test_rate_limit_backs_off_with_growing_pauses(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    fake = FakeTime()
    route = mock.post(SEND).mock(side_effect=[err(45009)] * 3 + [ok()])
    policy = RetryPolicy(deadline=60, base_delay=1.0, max_delay=10.0)
    await sender(http, policy, clock=fake.clock, sleep=fake.sleep).send_text("c", "x")
    assert route.call_count == 4
    # Three pauses of ~1, ~2, ~4 s (with ±20% jitter) before the attempts after each 45009.
    assert len(fake.sleeps) == 3
    for pause, nominal in zip(fake.sleeps, (1.0, 2.0, 4.0), strict=True):
        assert nominal * 0.8 <= pause <= nominal * 1.2


async def test_network_error_then_ok_is_retried(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.post(SEND).mock(side_effect=[httpx.ConnectError("connection refused"), ok()])
    retries = await sender(http).send_text("c", "x")
    assert route.call_count == 2
    assert retries == 1


async def test_http_5xx_is_retried(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.post(SEND).mock(side_effect=[httpx.Response(502), ok()])
    await sender(http).send_text("c", "x")
    assert route.call_count == 2


async def test_persistent_rate_limit_raises_after_deadline(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    fake = FakeTime()
    route = mock.post(SEND).mock(return_value=err(45009, "api freq out of limit"))
    policy = RetryPolicy(deadline=30.0, base_delay=1.0, max_delay=4.0)
    start = fake.now
    with pytest.raises(WeComRateLimited):
        await sender(http, policy, clock=fake.clock, sleep=fake.sleep).send_text("c", "x")
    assert fake.now - start >= 30.0
    assert fake.now - start < 30.0 + 4.0 * 1.2 + 0.01  # gave up at the first attempt past the deadline
    assert 5 <= route.call_count <= 20


async def test_network_error_text_never_carries_the_key(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    leaky = httpx.ConnectError(f"cannot connect to {BASE}/cgi-bin/webhook/send?key={KEY}")
    mock.post(SEND).mock(side_effect=leaky)
    policy = RetryPolicy(deadline=0.05, base_delay=0.01, max_delay=0.01)
    with pytest.raises(WeComNetworkError) as info:
        await sender(http, policy).send_text("c", "x")
    exc = info.value
    for text in (str(exc), repr(exc), exc.errmsg, exc.describe()):
        assert KEY not in text
    assert "ConnectError" in str(exc)


async def test_on_attempt_sees_each_errcode(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    mock.post(SEND).mock(side_effect=[err(45009), ok()])
    s = sender(http)
    seen: list[int] = []
    s.on_attempt = seen.append
    await s.send_text("c", "x")
    assert seen == [45009, 0]


# --- questions: split, mentions, images ---------------------------------------------------------------------------


def nine_kb() -> str:
    return "\n".join(f"第{i}段：please review 这一段内容 line {i}" + "。" * (i % 10) for i in range(260))


async def test_send_question_splits_in_order_and_sends_images_last(
    mock: respx.MockRouter, http: httpx.AsyncClient
) -> None:
    route = mock.post(SEND).mock(return_value=ok())
    message = nine_kb()
    assert utf8_len(message) > 9000
    report = await sender(http).send_question(
        Question(
            message,
            chat_id="chat-9",
            short_id="1a2b3c4d",
            project_name="proj x",
            images=(
                data_url(PNG),
                data_url(JPEG),
            ),
        )
    )
    payloads = sent(route)
    texts = [p for p in payloads if p["msgtype"] == "text"]
    n = len(texts)
    assert n >= 4
    assert report.parts == n and report.images == 2
    assert [p["msgtype"] for p in payloads] == ["text"] * n + ["image", "image"]
    for i, p in enumerate(texts, start=1):
        content = p["text"]["content"]
        assert utf8_len(content) <= TEXT_LIMIT
        assert content.startswith(f"[#1a2b3c4d proj x] ({i}/{n})\n")
        assert p["chatid"] == "chat-9"
    joined = "".join(p["text"]["content"].split("\n", 1)[1] for p in texts)
    assert joined.replace("\n", "") == message.replace("\n", "")
    assert base64.b64decode(payloads[-2]["image"]["base64"]) == PNG
    assert base64.b64decode(payloads[-1]["image"]["base64"]) == JPEG


async def test_mention_only_on_first_part(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.post(SEND).mock(return_value=ok())
    await sender(http).send_question(Question(nine_kb(), chat_id="c", short_id="1a2b3c4d", mention_list=("zhangsan",)))
    payloads = sent(route)
    assert len(payloads) >= 4
    assert payloads[0]["text"]["mentioned_list"] == ["zhangsan"]
    assert all("mentioned_list" not in p["text"] for p in payloads[1:])


async def test_short_question_is_one_part_with_header(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.post(SEND).mock(return_value=ok())
    await sender(http).send_question(Question("部署到生产？", chat_id="c", short_id="0000abcd"))
    assert [p["text"]["content"] for p in sent(route)] == ["[#0000abcd]\n部署到生产？"]


async def test_send_without_short_id_has_no_header(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.post(SEND).mock(return_value=ok())
    await sender(http).send_question(Question("note", chat_id="c"))
    assert [p["text"]["content"] for p in sent(route)] == ["note"]


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (data_url(b"\x89PNG\r\n\x1a\n" + b"\x00" * IMAGE_MAX_BYTES), "2 MB"),
        (data_url(b"GIF89a" + b"\x00" * 100, "image/gif"), "JPG"),
        ("data:image/png;base64,@@@not-base64@@@", "base64"),
        ("data:image/png,rawbytes", "base64"),
    ],
    ids=["too-big", "gif", "bad-base64", "not-base64-url"],
)
async def test_bad_image_fails_before_anything_is_sent(
    mock: respx.MockRouter, http: httpx.AsyncClient, image: str, match: str
) -> None:
    route = mock.post(SEND).mock(return_value=ok())
    with pytest.raises(ImageError, match=match):
        await sender(http).send_question(
            Question(
                "q",
                chat_id="c",
                short_id="1a2b3c4d",
                images=(
                    data_url(PNG),
                    image,
                ),
            )
        )
    assert route.call_count == 0


async def test_http_image_url_is_fetched_by_the_senders_fetcher() -> None:
    backend = RecordingBackend(FakeTime())
    async with TinyHTTP(lambda seen: Reply(body=JPEG)) as server:
        s = RobotSender(backend, FAST, images=ImageFetcher(allow_private=True))
        question = Question("look", chat_id="c", short_id="1a2b3c4d", images=(f"{server.url}/pic.jpg",))
        await s.send_question(question)
    assert [p["msgtype"] for p in backend.payloads] == ["text", "image"]
    assert backend.payloads[-1]["image"]["md5"] == hashlib.md5(JPEG).hexdigest()


async def test_loopback_image_url_refused_by_default_before_anything_is_sent() -> None:
    backend = RecordingBackend(FakeTime())
    async with TinyHTTP(lambda seen: Reply(body=JPEG)) as server:
        question = Question("look", chat_id="c", short_id="1a2b3c4d", images=(f"{server.url}/pic.jpg",))
        with pytest.raises(ImageError, match="HIL_IMAGE_ALLOW_PRIVATE"):
            await RobotSender(backend, FAST).send_question(question)
        assert server.seen == []
    assert backend.payloads == []


async def test_http_image_404_is_image_error() -> None:
    backend = RecordingBackend(FakeTime())
    async with TinyHTTP(lambda seen: Reply(404)) as server:
        s = RobotSender(backend, FAST, images=ImageFetcher(allow_private=True))
        with pytest.raises(ImageError, match="404"):
            await s.send_question(Question("q", chat_id="c", short_id="1a2b3c4d", images=(f"{server.url}/x.png",)))
    assert backend.payloads == []


# --- pacing ------------------------------------------------------------------------------------------------------


class RecordingBackend:
    name = "recording"

    def __init__(self, fake: FakeTime) -> None:
        self.fake = fake
        self.times: list[float] = []
        self.payloads: list[dict[str, Any]] = []

    async def send(self, payload: dict[str, Any]) -> None:
        self.times.append(self.fake.now)
        self.payloads.append(payload)

    async def upload_file(self, filename: str, data: bytes) -> str:
        raise NotImplementedError


async def test_fixed_pace_spaces_consecutive_sends(http: httpx.AsyncClient) -> None:
    fake = FakeTime()
    backend = RecordingBackend(fake)
    s = RobotSender(backend, RetryPolicy(max_per_minute=600, base_delay=0.01), clock=fake.clock, sleep=fake.sleep)
    await asyncio.gather(*(s.send_text("c", f"m{i}") for i in range(10)))
    assert len(backend.times) == 10
    gaps = [b - a for a, b in zip(backend.times, backend.times[1:], strict=False)]
    assert all(gap >= 0.1 - 1e-9 for gap in gaps), gaps
    assert backend.times[-1] - backend.times[0] < 0.1 * 9 + 0.05  # paced, not slower than asked


async def test_no_pace_by_default(http: httpx.AsyncClient) -> None:
    fake = FakeTime()
    backend = RecordingBackend(fake)
    s = RobotSender(backend, RetryPolicy(base_delay=0.01), clock=fake.clock, sleep=fake.sleep)
    for i in range(5):
        await s.send_text("c", f"m{i}")
    assert fake.sleeps == []
    assert len(backend.payloads) == 5


# --- fly-pigeon backend -------------------------------------------------------------------------------------------


class FakeBot:
    """Stands in for `pigeon.Bot`: records calls (and the thread they ran on) and returns `result`."""

    instances: ClassVar[list[FakeBot]] = []

    def __init__(self, bot_key: str, result: Any = None) -> None:
        self.bot_key = bot_key
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.threads: list[int] = []
        self.result = {"errcode": 0, "errmsg": "ok"} if result is None else result
        FakeBot.instances.append(self)

    def _record(self, name: str, kwargs: dict[str, Any]) -> Any:
        self.calls.append((name, kwargs))
        self.threads.append(threading.get_ident())
        return self.result

    def text(self, **kwargs: Any) -> Any:
        return self._record("text", kwargs)

    def markdown(self, **kwargs: Any) -> Any:
        return self._record("markdown", kwargs)

    def image(self, **kwargs: Any) -> Any:
        return self._record("image", kwargs)

    def file(self, **kwargs: Any) -> Any:
        return self._record("file", kwargs)


class JsonResult:
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def json(self) -> dict[str, Any]:
        return self.body


async def test_pigeon_backend_maps_each_msgtype(http: httpx.AsyncClient) -> None:
    backend = PigeonBackend(KEY, bot_factory=FakeBot)
    bot: FakeBot = backend._bot
    assert bot.bot_key == KEY
    s = RobotSender(backend, FAST)
    await s.send_text("chat-1", "hello", ["zhangsan"])
    await s.send_text("chat-1", "no mentions")
    await s.send_markdown("chat-2", "**md**")
    await s.send_image("chat-3", PNG)
    await backend.send({"msgtype": "file", "chatid": "chat-4", "file": {"media_id": "m-1"}})
    assert bot.calls == [
        ("text", {"chat_id": "chat-1", "msg_content": "hello", "mentioned_list": ["zhangsan"]}),
        ("text", {"chat_id": "chat-1", "msg_content": "no mentions", "mentioned_list": None}),
        ("markdown", {"chat_id": "chat-2", "msg_content": "**md**"}),
        ("image", {"msg_content": base64.b64encode(PNG).decode(), "chat_id": "chat-3"}),
        ("file", {"chat_id": "chat-4", "media_id": "m-1"}),
    ]


async def test_pigeon_result_object_with_json() -> None:
    backend = PigeonBackend(KEY, bot_factory=lambda bot_key: FakeBot(bot_key, JsonResult({"errcode": 0})))
    await backend.send({"msgtype": "text", "text": {"content": "x"}})
    failing = PigeonBackend(KEY, bot_factory=lambda bot_key: FakeBot(bot_key, JsonResult({"errcode": 93000})))
    with pytest.raises(WeComInvalidKey):
        await failing.send({"msgtype": "text", "text": {"content": "x"}})


async def test_pigeon_errcode_in_dict_result_raises() -> None:
    backend = PigeonBackend(KEY, bot_factory=lambda bot_key: FakeBot(bot_key, {"errcode": 40058, "errmsg": "long"}))
    with pytest.raises(WeComError) as info:
        await backend.send({"msgtype": "markdown", "markdown": {"content": "x"}})
    assert info.value.errcode == 40058


async def test_pigeon_exception_becomes_network_error() -> None:
    class Broken(FakeBot):
        def text(self, **kwargs: Any) -> Any:
            raise OSError(f"connection reset while posting key={KEY}")

    backend = PigeonBackend(KEY, bot_factory=Broken)
    with pytest.raises(WeComNetworkError) as info:
        await backend.send({"msgtype": "text", "text": {"content": "x"}})
    assert KEY not in str(info.value)


async def test_pigeon_unknown_msgtype() -> None:
    backend = PigeonBackend(KEY, bot_factory=FakeBot)
    with pytest.raises(WeComError) as info:
        await backend.send({"msgtype": "news", "news": {}})
    assert info.value.errcode == 40008


async def test_make_backend_pigeon_not_installed(monkeypatch: pytest.MonkeyPatch, http: httpx.AsyncClient) -> None:
    monkeypatch.setitem(sys.modules, "pigeon", None)  # makes `import pigeon` raise ImportError
    with pytest.raises(RuntimeError, match="WECOM_SENDER"):
        make_backend("pigeon", http, BASE, KEY)


async def test_make_backend_auto_falls_back_to_webhook(
    monkeypatch: pytest.MonkeyPatch, http: httpx.AsyncClient
) -> None:
    monkeypatch.setitem(sys.modules, "pigeon", None)
    backend = make_backend("auto", http, BASE, KEY)
    assert isinstance(backend, WebhookBackend)
    assert isinstance(make_backend("webhook", http, BASE, KEY), WebhookBackend)


async def test_make_backend_uses_installed_pigeon_off_the_loop(
    monkeypatch: pytest.MonkeyPatch, http: httpx.AsyncClient
) -> None:
    module = types.ModuleType("pigeon")
    module.Bot = FakeBot  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pigeon", module)
    FakeBot.instances.clear()
    for kind in ("pigeon", "auto"):
        backend = make_backend(kind, http, BASE, KEY)
        assert isinstance(backend, PigeonBackend)
    bot = FakeBot.instances[-1]
    assert bot.bot_key == KEY
    loop_thread = threading.get_ident()
    s = RobotSender(backend, FAST)
    await s.send_text("c", "hi")
    await s.send_markdown("c", "**x**")
    assert len(bot.threads) == 2
    assert all(t != loop_thread for t in bot.threads)


async def test_pigeon_cannot_upload_files() -> None:
    backend = PigeonBackend(KEY, bot_factory=FakeBot)
    with pytest.raises(WeComError, match="webhook"):
        await backend.upload_file("a.txt", b"hello")


async def test_webhook_upload_file(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.post(f"{BASE}/cgi-bin/webhook/upload_media").mock(
        return_value=httpx.Response(200, json={"errcode": 0, "errmsg": "ok", "type": "file", "media_id": "MID"})
    )
    media_id = await WebhookBackend(http, BASE, KEY).upload_file("report.txt", b"hello world")
    assert media_id == "MID"
    request = route.calls[0].request
    assert request.url.params["type"] == "file"
    assert b'name="media"' in request.content and b'filename="report.txt"' in request.content
