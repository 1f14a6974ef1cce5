"""hil_protocol.wecom_robot: the robot client (webhook and fly-pigeon backends), WeCom's answers read by one model,
retries, deadlines and pacing."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import sys
import threading
import time
import types
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import httpx
import pytest
import respx

from hil_protocol.images import IMAGE_MAX_BYTES, ImageError, ImageFetcher
from hil_protocol.messages import TEXT_LIMIT, utf8_len
from hil_protocol.outbound import Notice, Question
from hil_protocol.wecom_robot import (
    ANSWER_MAX_BYTES,
    PigeonBackend,
    RetryPolicy,
    RobotSender,
    WebhookBackend,
    WeComAnswer,
    WeComBadResponse,
    WeComError,
    WeComInvalidKey,
    WeComInvalidMessage,
    WeComNetworkError,
    WeComRateLimited,
    make_backend,
    parse_answer,
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


async def refused_once(mock: respx.MockRouter, http: httpx.AsyncClient, errcode: int, errmsg: str) -> WeComError:
    """What a send raises when WeCom answers `errcode`, checked to have been tried once only."""
    route = mock.post(SEND).mock(return_value=err(errcode, errmsg))
    with pytest.raises(WeComError) as info:
        await sender(http).send_text("c", "hi")
    assert route.call_count == 1
    assert info.value.errcode == errcode
    return info.value


async def test_invalid_key_not_retried(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    error = await refused_once(mock, http, 93000, "invalid webhook url")
    assert isinstance(error, WeComInvalidKey)
    assert "BOT_KEY" in str(error)


async def test_unknown_errcode_not_retried(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    await refused_once(mock, http, 40008, "invalid message type")


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


async def test_persistent_rate_limit_gives_up_within_the_deadline(
    mock: respx.MockRouter, http: httpx.AsyncClient
) -> None:
    fake = FakeTime()
    starts: list[float] = []

    def wecom(request: httpx.Request) -> httpx.Response:
        starts.append(fake.now)
        return err(45009, "api freq out of limit")

    route = mock.post(SEND).mock(side_effect=wecom)
    policy = RetryPolicy(deadline=30.0, base_delay=1.0, max_delay=4.0)
    start = fake.now
    with pytest.raises(WeComRateLimited):
        await sender(http, policy, clock=fake.clock, sleep=fake.sleep).send_text("c", "x")
    # Never past the deadline, and it gave up only when the next pause would have ended past it.
    assert 30.0 - 4.0 * 1.2 <= fake.now - start <= 30.0
    assert all(t < start + 30.0 for t in starts)
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

    host = "recording"

    async def send(self, payload: dict[str, Any], timeout: float) -> None:
        self.times.append(self.fake.now)
        self.payloads.append(payload)

    async def upload_file(self, filename: str, data: bytes, timeout: float = 10.0) -> str:
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


# --- WeCom's answers: one model, every odd answer a typed error ----------------------------------------------------


class Chunks(httpx.AsyncByteStream):
    """A body without Content-Length."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def body(content: bytes, status: int = 200, **headers: str) -> httpx.Response:
    """Raw bytes as they come off the wire: httpx does not decode them before our reader sees them."""
    fields = {k.replace("_", "-"): v for k, v in headers.items()} | {"content-length": str(len(content))}
    return httpx.Response(status, headers=fields, stream=httpx.ByteStream(content))


ODD_ANSWERS = {
    "errcode-list": body(b'{"errcode":[45009],"errmsg":"x"}'),
    "errcode-word": body(b'{"errcode":"busy","errmsg":"x"}'),
    "errcode-float": body(b'{"errcode":45009.0}'),
    "errcode-null": body(b'{"errcode":null}'),
    "errcode-bool": body(b'{"errcode":true}'),
    "errcode-object": body(b'{"errcode":{"code":0}}'),
    "errcode-nan": body(b'{"errcode":NaN}'),
    "errcode-huge": body(b'{"errcode":1' + b"0" * 40 + b"}"),
    "errcode-5000-digits": body(b'{"errcode":1' + b"0" * 5000 + b"}"),
    "errcode-long-string": body(b'{"errcode":"99999999999"}'),
    "errcode-missing": body(b'{"errmsg":"ok"}'),
    "top-level-list": body(b"[0]"),
    "top-level-string": body(b'"ok"'),
    "top-level-number": body(b"0"),
    "empty-body": body(b""),
    "whitespace-body": body(b"  \r\n"),
    "not-json": body(b"<html>bad gateway</html>"),
    "http-404-html": body(b"<html>not found</html>", 404),
    "http-403-empty": body(b"", 403),
    "broken-gzip": body(b"\x1f\x8b\x08\x00garbage", content_encoding="gzip"),
    "truncated-gzip": body(gzip.compress(b'{"errcode":0,"errmsg":"ok"}')[:-8], content_encoding="gzip"),
    "gzip-not-gzip": body(b'{"errcode":0}', content_encoding="gzip"),
    "broken-deflate": body(b"\x78\x9cgarbage", content_encoding="deflate"),
    "gzip-bomb": body(gzip.compress(b" " * (ANSWER_MAX_BYTES * 50) + b'{"errcode":0}'), content_encoding="gzip"),
    "unknown-encoding": body(b'{"errcode":0}', content_encoding="br"),
    "content-length-over-cap": httpx.Response(
        200, headers={"Content-Length": str(ANSWER_MAX_BYTES + 1)}, stream=httpx.ByteStream(b'{"errcode":0}')
    ),
    "body-over-cap-unannounced": httpx.Response(200, stream=Chunks(b" " * ANSWER_MAX_BYTES, b'{"errcode":0}')),
    "not-utf8": body(b'{"errcode":0,"errmsg":"\xff\xfe"}'),
    "utf16": body('{"errcode":0}'.encode("utf-16")),
    "deep-nesting": body(b"[" * 30000 + b"]" * 30000),
}


@pytest.mark.parametrize("response", ODD_ANSWERS.values(), ids=ODD_ANSWERS.keys())
async def test_odd_answer_is_a_bad_response_for_that_send(
    mock: respx.MockRouter, http: httpx.AsyncClient, response: httpx.Response
) -> None:
    route = mock.post(SEND).mock(return_value=response)
    with pytest.raises(WeComBadResponse) as info:
        await sender(http).send_text("c", "x")
    assert route.call_count == 1  # not retried: the message may have been posted
    exc = info.value
    assert exc.errcode == -2 and not exc.retryable
    assert "wecom.test" in str(exc) and "WECOM_API_BASE" in str(exc)
    str(exc).encode("utf-8")  # printable, whatever came back


async def test_odd_answer_to_a_hint_is_typed_too(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    mock.post(SEND).mock(return_value=body(b'{"errcode":"busy"}'))
    with pytest.raises(WeComBadResponse, match="errcode"):
        await sender(http).send_notice(Notice(chat_id="c", text="**hint**"))


@pytest.mark.parametrize(
    "response",
    [
        body(b'{"errcode":0,"errmsg":"ok"}'),
        body(b'{"errcode":"0"}'),
        body(b'{"errcode":0}', content_type="text/plain"),
        body("\ufeff".encode() + b'{"errcode":0}'),
        body(gzip.compress(b'{"errcode":0,"errmsg":"ok"}'), content_encoding="gzip"),
        body(zlib.compress(b'{"errcode":0}'), content_encoding="deflate"),
        body(zlib.compress(b'{"errcode":0}')[2:-4], content_encoding="deflate"),  # raw deflate
        body(gzip.compress(gzip.compress(b'{"errcode":0}')), content_encoding="gzip, gzip"),
        body(b'{"errcode":0,"extra":{"nested":[1,2]}}'),
    ],
    ids=["plain", "numeric-string", "text-plain", "bom", "gzip", "deflate", "raw-deflate", "gzip-twice", "extra"],
)
async def test_readable_answers_succeed(
    mock: respx.MockRouter, http: httpx.AsyncClient, response: httpx.Response
) -> None:
    mock.post(SEND).mock(return_value=response)
    assert await sender(http).send_text("c", "x") == 0


async def test_numeric_string_errcode_is_read_as_its_number(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.post(SEND).mock(side_effect=[body(b'{"errcode":" 45009 ","errmsg":"freq"}'), ok()])
    assert await sender(http).send_text("c", "x") == 1
    assert route.call_count == 2
    with pytest.raises(WeComInvalidKey):
        mock.post(SEND).mock(return_value=body(b'{"errcode":"93000"}'))
        await sender(http).send_text("c", "x")


async def test_odd_errmsg_is_shown_safely(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    mock.post(SEND).mock(return_value=body(b'{"errcode":40035,"errmsg":"bad\\ud800\\u0000\\n' + b"x" * 5000 + b'"}'))
    with pytest.raises(WeComError) as info:
        await sender(http).send_text("c", "x")
    assert info.value.errcode == 40035
    assert len(info.value.errmsg) <= 201
    str(info.value).encode("utf-8")
    mock.post(SEND).mock(return_value=body(b'{"errcode":40035,"errmsg":["a",{"b":1}]}'))
    with pytest.raises(WeComError) as info:
        await sender(http).send_text("c", "x")
    assert info.value.errcode == 40035 and '"b"' in info.value.errmsg


async def test_proxy_error_page_quoting_the_key_is_redacted(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    page = f"<html>502 upstream {BASE}/cgi-bin/webhook/send?key={KEY} failed</html>".encode()
    mock.post(SEND).mock(return_value=body(page, 404))
    with pytest.raises(WeComBadResponse) as info:
        await sender(http).send_text("c", "x")
    for text in (str(info.value), info.value.errmsg, repr(info.value)):
        assert KEY not in text


@pytest.mark.parametrize("status", [429, 500, 502, 503])
async def test_http_5xx_and_429_are_retried_network_errors(
    mock: respx.MockRouter, http: httpx.AsyncClient, status: int
) -> None:
    route = mock.post(SEND).mock(side_effect=[body(b"<html>busy</html>", status), ok()])
    assert await sender(http).send_text("c", "x") == 1
    assert route.call_count == 2


async def test_upload_media_answer_goes_through_the_model(mock: respx.MockRouter, http: httpx.AsyncClient) -> None:
    route = mock.post(f"{BASE}/cgi-bin/webhook/upload_media")
    backend = WebhookBackend(http, BASE, KEY)
    for answer in (b'{"errcode":0,"errmsg":"ok"}', b'{"errcode":0,"media_id":["x"]}', b'{"errcode":"x"}'):
        route.mock(return_value=body(answer))
        with pytest.raises(WeComBadResponse):
            await backend.upload_file("a.txt", b"hello")
    route.mock(return_value=body(b'{"errcode":93000,"errmsg":"invalid webhook url"}'))
    with pytest.raises(WeComInvalidKey):
        await backend.upload_file("a.txt", b"hello")


def test_answer_model() -> None:
    assert parse_answer({"errcode": "45009", "errmsg": None}) == WeComAnswer(errcode=45009, errmsg="")
    assert parse_answer({"errcode": -1, "errmsg": "system busy"}).errcode == -1
    for odd in ({"errcode": [0]}, {"errcode": 1.5}, {"errcode": ""}, {}, None, "ok", 0, [], {"errcode": "0x10"}):
        with pytest.raises(WeComBadResponse):
            parse_answer(odd)


@pytest.mark.parametrize(
    "base", ["ftp://wecom.test", "not a url", "http://127.0.0.1:99999", "https://user:pw@wecom.test", "http://"]
)
def test_bad_api_base_is_refused_at_start(http: httpx.AsyncClient, base: str) -> None:
    with pytest.raises(ValueError, match="WECOM_API_BASE"):
        WebhookBackend(http, base, KEY)


# --- deadlines: one attempt, one message ----------------------------------------------------------------------------

SLOW_JSON = b'{"errcode":0,"errmsg":"ok"' + b" " * 200 + b"}"


async def test_dripped_body_cannot_hold_an_attempt_past_its_bound() -> None:
    async with TinyHTTP(lambda seen: Reply(body=SLOW_JSON, drip=0.02)) as server, httpx.AsyncClient() as http:
        backend = WebhookBackend(http, server.url, KEY)
        start = time.monotonic()
        with pytest.raises(WeComNetworkError, match="没有完整应答"):
            await backend.send({"msgtype": "text", "text": {"content": "x"}}, timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 0.35


async def test_slow_bodies_and_hangs_end_within_the_retry_deadline() -> None:
    replies = iter([Reply(body=SLOW_JSON, drip=0.05), Reply(hang=True)] * 50)
    async with TinyHTTP(lambda seen: next(replies)) as server, httpx.AsyncClient() as http:
        policy = RetryPolicy(deadline=0.7, attempt_timeout=0.25, base_delay=0.01, max_delay=0.02)
        start = time.monotonic()
        with pytest.raises(WeComNetworkError) as info:
            await RobotSender(WebhookBackend(http, server.url, KEY), policy).send_text("c", "x")
        elapsed = time.monotonic() - start
    assert elapsed < 0.7 + 0.1, elapsed
    assert len(server.seen) >= 3
    assert f"127.0.0.1:{server.port}" in str(info.value)


async def test_45009_storm_with_slow_bodies_ends_within_the_retry_deadline() -> None:
    storm = Reply(body=b'{"errcode":45009,"errmsg":"api freq out of limit"}')
    replies = iter([storm, storm, Reply(body=b'{"errcode":45009}' + b" " * 100, drip=0.05)] * 50)
    async with TinyHTTP(lambda seen: next(replies)) as server, httpx.AsyncClient() as http:
        policy = RetryPolicy(deadline=1.0, attempt_timeout=0.3, base_delay=0.05, max_delay=0.2)
        start = time.monotonic()
        with pytest.raises((WeComRateLimited, WeComNetworkError)):
            await RobotSender(WebhookBackend(http, server.url, KEY), policy).send_text("c", "x")
        elapsed = time.monotonic() - start
    assert elapsed < 1.0 + 0.1, elapsed
    assert len(server.seen) >= 3


async def test_pause_that_would_end_past_the_deadline_gives_up_at_once(
    mock: respx.MockRouter, http: httpx.AsyncClient
) -> None:
    fake = FakeTime()
    route = mock.post(SEND).mock(return_value=err(45009))
    policy = RetryPolicy(deadline=15.0, base_delay=10.0, max_delay=40.0)
    start = fake.now
    with pytest.raises(WeComRateLimited):
        await sender(http, policy, clock=fake.clock, sleep=fake.sleep).send_text("c", "x")
    # First refusal, a pause of ~10 s, second refusal: the next pause (~20 s) would end past 15 s, so stop now.
    assert route.call_count == 2
    assert fake.now - start < 15.0


async def test_attempt_bound_is_the_time_left_when_shorter(http: httpx.AsyncClient) -> None:
    fake = FakeTime()
    bounds: list[float] = []

    class Slow(RecordingBackend):
        async def send(self, payload: dict[str, Any], timeout: float) -> None:
            bounds.append(timeout)
            fake.now += timeout
            raise WeComNetworkError(-1, "timed out", host="wecom.test")

    policy = RetryPolicy(deadline=25.0, attempt_timeout=10.0, base_delay=1.0)
    with pytest.raises(WeComNetworkError):
        await RobotSender(Slow(fake), policy, clock=fake.clock, sleep=fake.sleep).send_text("c", "x")
    assert bounds[:2] == [10.0, 10.0]
    assert 0 < bounds[-1] < 10.0
    assert fake.now - 1000.0 <= 25.0 + 1e-9


async def test_an_attempt_the_deadline_cuts_short_does_not_hide_the_error_before_it() -> None:
    fake = FakeTime()

    class Refusing(RecordingBackend):
        async def send(self, payload: dict[str, Any], timeout: float) -> None:
            fake.now += 1.0
            if fake.now < 1000.0 + 9.0:
                raise WeComNetworkError(-1, "ConnectError", host="wecom.test")
            fake.now += timeout  # the last attempt, bounded by the deadline, times out
            raise WeComNetworkError(-1, f"{timeout:.3g} 秒内没有完整应答", host="wecom.test") from TimeoutError()

    policy = RetryPolicy(deadline=10.0, attempt_timeout=10.0, base_delay=1.0, max_delay=1.0)
    with pytest.raises(WeComNetworkError) as info:
        await RobotSender(Refusing(fake), policy, clock=fake.clock, sleep=fake.sleep).send_text("c", "x")
    assert "ConnectError" in str(info.value)


async def test_waiting_for_a_free_slot_ends_at_the_deadline() -> None:
    class Stuck:
        name = host = "stuck"

        async def send(self, payload: dict[str, Any], timeout: float) -> None:
            await asyncio.sleep(timeout)
            raise WeComNetworkError(-1, "timed out", host="stuck")

        async def upload_file(self, filename: str, data: bytes, timeout: float = 10.0) -> str:
            raise NotImplementedError

    s = RobotSender(Stuck(), RetryPolicy(deadline=0.3, concurrency=1, base_delay=0.01))
    start = time.monotonic()
    results = await asyncio.gather(s.send_text("c", "a"), s.send_text("c", "b"), return_exceptions=True)
    assert time.monotonic() - start < 0.3 + 0.1
    assert all(isinstance(r, WeComNetworkError) for r in results), results
    assert any("没有轮到" in str(r) for r in results)


async def test_question_parts_share_one_deadline(http: httpx.AsyncClient) -> None:
    fake = FakeTime()
    starts: list[float] = []

    class Slowish(RecordingBackend):
        async def send(self, payload: dict[str, Any], timeout: float) -> None:
            starts.append(fake.now)
            fake.now += 4.0

    s = RobotSender(Slowish(fake), RetryPolicy(deadline=10.0), clock=fake.clock, sleep=fake.sleep)
    with pytest.raises(WeComNetworkError):
        await s.send_question(Question(nine_kb(), chat_id="c", short_id="1a2b3c4d"))
    assert len(starts) == 3 and all(t < 1000.0 + 10.0 for t in starts)


async def test_unreachable_wecom_names_the_host_and_the_settings_within_the_deadline() -> None:
    async with TinyHTTP(lambda seen: Reply()) as server:
        port = server.port  # closed once the block ends: connections are refused
    async with httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{port}"
        policy = RetryPolicy(deadline=0.3, base_delay=0.02, max_delay=0.05)
        start = time.monotonic()
        with pytest.raises(WeComNetworkError) as info:
            await RobotSender(WebhookBackend(http, base, KEY), policy).send_text("c", "x")
        assert time.monotonic() - start < 0.3 + 0.1
    text = str(info.value)
    assert f"127.0.0.1:{port}" in text and "ConnectError" in text
    assert "WECOM_API_BASE" in text and "HTTPS_PROXY" in text
    assert KEY not in text and KEY not in repr(info.value)


# --- fly-pigeon's answers go through the same model ------------------------------------------------------------------


class RaisingJson:
    def json(self) -> Any:
        raise ValueError("Expecting value: line 1 column 1 (char 0)")


@pytest.mark.parametrize(
    "result",
    [{"errcode": "busy"}, {"errcode": [45009]}, None, "ok", 0, JsonResult({"errcode": None}), RaisingJson()],
    ids=["word", "list", "none", "string", "zero", "json-null", "json-raises"],
)
async def test_pigeon_odd_result_is_a_bad_response(result: Any) -> None:
    backend = PigeonBackend(KEY, bot_factory=lambda bot_key: FakeBot(bot_key, result))
    backend._bot.result = result  # FakeBot turns None into success; here None is what fly-pigeon returned
    with pytest.raises(WeComBadResponse):
        await backend.send({"msgtype": "text", "text": {"content": "x"}})


async def test_pigeon_numeric_string_errcode() -> None:
    ok_bot = PigeonBackend(KEY, bot_factory=lambda bot_key: FakeBot(bot_key, {"errcode": "0"}))
    await ok_bot.send({"msgtype": "text", "text": {"content": "x"}})
    limited = PigeonBackend(KEY, bot_factory=lambda bot_key: FakeBot(bot_key, JsonResult({"errcode": "45009"})))
    with pytest.raises(WeComRateLimited):
        await limited.send({"msgtype": "text", "text": {"content": "x"}})


async def test_pigeon_call_that_hangs_is_cut_at_the_attempt_bound() -> None:
    release = threading.Event()

    class Hanging(FakeBot):
        def text(self, **kwargs: Any) -> Any:
            release.wait(5)
            return {"errcode": 0}

    backend = PigeonBackend(KEY, bot_factory=Hanging)
    start = time.monotonic()
    try:
        with pytest.raises(WeComNetworkError, match="fly-pigeon"):
            await backend.send({"msgtype": "text", "text": {"content": "x"}}, timeout=0.1)
        assert time.monotonic() - start < 0.3
    finally:
        release.set()


@pytest.mark.parametrize(
    "send",
    [
        lambda s: s.send_question(Question("部署？\ud800", chat_id="c", short_id="1a2b3c4d")),
        lambda s: s.send_question(Question("ok", chat_id="c", short_id="1a2b3c4d", project_name="p\udc80")),
        lambda s: s.send_question(Question("ok", chat_id="c", mention_list=("zhang\ud800",))),
        lambda s: s.send_text("c\ud800", "x"),
        lambda s: s.send_notice(Notice(chat_id="c", text="hint \udfff")),
        lambda s: s.send_payload({"msgtype": "text", "text": {"content": "\ud800"}}),
    ],
    ids=["message", "project", "mention", "chat-id", "notice", "payload"],
)
async def test_text_that_is_not_valid_unicode_is_typed_and_nothing_is_sent(send: Any) -> None:
    backend = RecordingBackend(FakeTime())
    with pytest.raises(WeComInvalidMessage, match="UTF-8"):
        await send(RobotSender(backend, FAST))
    assert backend.payloads == []
