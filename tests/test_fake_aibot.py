"""The fake WeCom's AI-bot long connection (hil_sandbox.fake_aibot).

Conformance: WeCom's official Python SDK (``wecom-aibot-python-sdk``, package ``aibot``) runs against the fake over
wss with a certificate made here, so the fake is proven to speak the real protocol. The fake's own rules are then
attacked with a bare ``websockets`` client. Every test runs the fake under uvicorn on 127.0.0.1 with port 0.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect

from hil_sandbox.fake_aibot import AibotConflictError, AibotError, AibotNotConnectedError, AibotNotFoundError
from hil_sandbox.fake_wecom import FakeWeCom, FakeWeComConfig, create_fake_wecom_app
from hil_sandbox.fake_wecom import main as fake_main
from tests.helpers import PNG_MAGIC, TlsFiles, aibot_chat_page, png, throwaway_tls, until

pytest.importorskip("aibot", reason="wecom-aibot-python-sdk is in the test extra: pip install -e '.[test]'")
import aibot  # WeCom's official SDK; its api and ws modules hold the SSL contexts replaced below
import aibot.api
import aibot.utils
import aibot.ws

BOT = "aib-test-bot"
SECRET = "s3cret-of-the-bot"
ROBOT = "HIL助手"
TIMEOUT = 5.0


def markdown(chatid: str, content: str) -> dict[str, Any]:
    return {"chatid": chatid, "msgtype": "markdown", "markdown": {"content": content}}


def frames_of(fake: FakeWeCom, cmd: str) -> list[Any]:
    return [f for f in fake.aibot.get_frames() if isinstance(f.frame, dict) and f.frame.get("cmd") == cmd]


def button_card(task_id: str, *keys: str) -> dict[str, Any]:
    return {
        "card_type": "button_interaction",
        "main_title": {"title": "要合并这个 PR 吗？"},
        "task_id": task_id,
        "button_list": [{"text": key, "style": 1, "key": key} for key in keys or ("merge", "skip")],
    }


# ----- a throwaway certificate authority and a server certificate for 127.0.0.1 -----


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return throwaway_tls(tmp_path_factory.mktemp("tls"), "127.0.0.1")


# ----- the fake under uvicorn, in the test's own event loop -----


@dataclass
class Served:
    fake: FakeWeCom
    url: str  # ws:// or wss:// root, as WECOM_AIBOT_URL would be
    http: httpx.AsyncClient


@asynccontextmanager
async def serve_fake(config: FakeWeComConfig, tls: TlsFiles | None = None) -> AsyncIterator[Served]:
    app = create_fake_wecom_app(config)
    ssl_files = {"ssl_certfile": str(tls.certfile), "ssl_keyfile": str(tls.keyfile)} if tls else {}
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", timeout_graceful_shutdown=1, **ssl_files
        )
    )
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(server.serve())
        await until(lambda: server.started)
        port = server.servers[0].sockets[0].getsockname()[1]
        scheme = "https" if tls else "http"
        fake: FakeWeCom = app.state.fake
        fake.update_config(public_url=f"{scheme}://127.0.0.1:{port}")
        verify: ssl.SSLContext | bool = tls.client_context() if tls else True
        try:
            async with httpx.AsyncClient(
                base_url=f"{scheme}://127.0.0.1:{port}", verify=verify, trust_env=False
            ) as http:
                yield Served(fake, f"{'wss' if tls else 'ws'}://127.0.0.1:{port}", http)
        finally:
            server.should_exit = True


def config(**changes: Any) -> FakeWeComConfig:
    return FakeWeComConfig(aibots={BOT: SECRET}, robot_name=ROBOT, **changes)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serve_fake(config()) as running:
        yield running


# ----- the official SDK as the bot -----


class QuietLogger:
    """The SDK's Logger protocol, keeping lines for assertions instead of printing them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def debug(self, message: str, *args: Any) -> None:
        pass

    def info(self, message: str, *args: Any) -> None:
        self.lines.append(message)

    def warn(self, message: str, *args: Any) -> None:
        self.lines.append(message)

    def error(self, message: str, *args: Any) -> None:
        self.lines.append(message)


@dataclass
class SdkBot:
    client: Any
    logger: QuietLogger
    inbox: dict[str, asyncio.Queue[Any]] = field(default_factory=dict)

    def queue(self, event: str) -> asyncio.Queue[Any]:
        if event not in self.inbox:
            queue: asyncio.Queue[Any] = asyncio.Queue()
            # Events carry one argument (a frame, a reason, an error) or none (authenticated).
            self.client.on(event, lambda *args: queue.put_nowait(args[0] if args else None))
            self.inbox[event] = queue
        return self.inbox[event]

    async def next(self, event: str, timeout: float = TIMEOUT) -> Any:
        async with asyncio.timeout(timeout):
            return await self.queue(event).get()


@asynccontextmanager
async def sdk_bot(
    served: Served,
    monkeypatch: pytest.MonkeyPatch,
    tls: TlsFiles,
    *,
    secret: str = SECRET,
    authenticate: bool = True,
    **options: Any,
) -> AsyncIterator[SdkBot]:
    """WSClient with the SDK's SSL contexts replaced (in this test only) by one that trusts the test CA."""
    context = tls.client_context()
    monkeypatch.setattr(aibot.ws, "_SSL_CONTEXT", context)
    monkeypatch.setattr(aibot.api, "_SSL_CONTEXT", context)
    logger = QuietLogger()
    options = {"max_reconnect_attempts": 0, **options}
    client = aibot.WSClient(
        aibot.WSClientOptions(bot_id=BOT, secret=secret, ws_url=served.url, logger=logger, **options)
    )
    bot = SdkBot(client, logger)
    for event in ("authenticated", "error", "event.disconnected_event"):
        bot.queue(event)
    await client.connect()
    if authenticate:
        await bot.next("authenticated")
    try:
        yield bot
    finally:
        if client._started:  # disconnect() warns when it was already stopped
            client.disconnect()
        await until(lambda: not client.is_connected)
        await asyncio.sleep(0.05)  # let the SDK's cancelled tasks finish


# ----- conformance: the official SDK against the fake over wss -----


async def test_sdk_authenticates_receives_text_and_sends_markdown(
    tls: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_fake(config(), tls) as served, sdk_bot(served, monkeypatch, tls) as bot:
        fake = served.fake
        await fake.aibot.wait_connected()
        pushed = await fake.aibot.push_message(userid="zhangsan", chat_id="group-1", text="要合并吗？", name="张三")
        frame = await bot.next("message.text")
        assert frame["cmd"] == "aibot_msg_callback"
        assert frame["headers"]["req_id"] == pushed.req_id
        body = frame["body"]
        assert body["text"] == {"content": f"@{ROBOT} 要合并吗？"}
        assert body["msgid"] == pushed.msgid and body["aibotid"] == BOT
        assert body["chatid"] == "group-1" and body["chattype"] == "group" and body["from"] == {"userid": "zhangsan"}

        ack = await bot.client.reply_stream(frame, "stream-1", "收到，正在处理", finish=True)
        assert ack["errcode"] == 0 and ack["headers"]["req_id"] == pushed.req_id
        ack = await bot.client.send_message("group-1", {"msgtype": "markdown", "markdown": {"content": "**合并了**"}})
        assert ack == {"headers": {"req_id": ack["headers"]["req_id"]}, "errcode": 0, "errmsg": "ok"}
        assert ack["headers"]["req_id"].startswith("aibot_send_msg_")

        stream, sent = fake.get_messages("group-1")
        assert (stream.source, stream.msgtype, stream.finished, stream.content) == (
            "aibot",
            "stream",
            True,
            "收到，正在处理",
        )
        assert stream.reply_to == pushed.msgid and stream.key == BOT
        assert (sent.msgtype, sent.content, sent.reply_to) == ("markdown", "**合并了**", None)
        # The frame log keeps what went over the wire, never the secret.
        [subscribe] = frames_of(fake, "aibot_subscribe")
        assert subscribe.frame["body"] == {"bot_id": BOT, "secret": "***"}
        assert SECRET not in json.dumps([f.model_dump() for f in fake.aibot.get_frames()])


async def sdk_upload(bot: SdkBot, data: bytes, kind: str = "image", chunk: int = 512 * 1024) -> str:
    """The three upload frames, sent by the official SDK's frame sender (1.0.2 has no upload method; the frames
    are the Node SDK's `uploadMedia`): init, chunks (0-based), finish -> media_id."""
    send = bot.client._ws_manager.send_reply
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    init_body = {"type": kind, "filename": f"shot.{kind}", "total_size": len(data), "total_chunks": len(chunks)}
    init = await send(aibot.utils.generate_req_id("aibot_upload_media_init"), init_body, "aibot_upload_media_init")
    upload_id = init["body"]["upload_id"]
    for index, part in enumerate(chunks):
        body = {"upload_id": upload_id, "chunk_index": index, "base64_data": base64.b64encode(part).decode()}
        await send(aibot.utils.generate_req_id("aibot_upload_media_chunk"), body, "aibot_upload_media_chunk")
    finish_id = aibot.utils.generate_req_id("aibot_upload_media_finish")
    finish = await send(finish_id, {"upload_id": upload_id}, "aibot_upload_media_finish")
    assert finish["errcode"] == 0 and finish["body"]["type"] == kind
    return str(finish["body"]["media_id"])


async def test_sdk_uploads_an_image_and_sends_it(tls: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve_fake(config(), tls) as served, sdk_bot(served, monkeypatch, tls) as bot:
        fake = served.fake
        picture = png() + b"\0" * (600 * 1024)  # two chunks
        media_id = await sdk_upload(bot, picture)
        assert fake.aibot.uploaded(media_id) == picture
        ack = await bot.client.send_message("group-1", {"msgtype": "image", "image": {"media_id": media_id}})
        assert ack["errcode"] == 0
        [sent] = fake.get_messages("group-1")
        assert (sent.msgtype, sent.media_id, sent.image_size) == ("image", media_id, len(picture))
        assert fake.get_image(sent.image_id or "") == picture
        # What WeCom refuses: an unknown media_id, a chunk missing, bytes that are no picture, a chunk too large.
        with pytest.raises(RuntimeError, match="errcode=40007"):
            await bot.client.send_message("group-1", {"msgtype": "image", "image": {"media_id": "nope"}})
        send = bot.client._ws_manager.send_reply
        init = {"type": "image", "filename": "a.png", "total_size": 10, "total_chunks": 2}
        started = await send(aibot.utils.generate_req_id("aibot_upload_media_init"), init, "aibot_upload_media_init")
        with pytest.raises(RuntimeError, match="errcode=40058"):
            body = {"upload_id": started["body"]["upload_id"]}
            await send(aibot.utils.generate_req_id("aibot_upload_media_finish"), body, "aibot_upload_media_finish")
        with pytest.raises(RuntimeError, match="errcode=40007"):
            await sdk_upload(bot, b"not a picture at all")
        with pytest.raises(RuntimeError, match="errcode=40058"):
            await sdk_upload(bot, png() + b"\0" * (600 * 1024), chunk=600 * 1024 + 100)
        with pytest.raises(RuntimeError, match="errcode=40058"):  # over WeCom's 10 MB for an image
            await sdk_upload(bot, png() + b"\0" * (10 * 1024 * 1024))
        assert len(fake.get_messages("group-1")) == 1


async def test_sdk_vote_card_submit_and_rate_limit(tls: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    async with (
        serve_fake(config(rate_limit=2, rate_window=30), tls) as served,
        sdk_bot(served, monkeypatch, tls) as bot,
    ):
        fake = served.fake
        card = {
            "card_type": "vote_interaction",
            "main_title": {"title": "发布哪些？"},
            "task_id": "vote-1",
            "checkbox": {
                "question_key": "q",
                "mode": 1,
                "option_list": [{"id": "0", "text": "a"}, {"id": "1", "text": "b"}],
            },
            "submit_button": {"text": "提交", "key": "submit"},
        }
        ack = await bot.client.send_message("group-1", {"msgtype": "template_card", "template_card": card})
        assert ack["errcode"] == 0
        ticked = [{"question_key": "q", "option_ids": ["0", "1"]}]
        await fake.aibot.click(userid="lisi", task_id="vote-1", event_key="submit", selected_items=ticked)
        frame = await bot.next("event.template_card_event")
        event = frame["body"]["event"]["template_card_event"]
        assert event["event_key"] == "submit" and event["card_type"] == "vote_interaction"
        assert event["selected_items"] == {
            "selected_item": [{"question_key": "q", "option_ids": {"option_id": ["0", "1"]}}]
        }
        # Past the bot's pace WeCom answers 45009, and the SDK raises it.
        await bot.client.send_message("group-1", {"msgtype": "markdown", "markdown": {"content": "2"}})
        with pytest.raises(RuntimeError, match="errcode=45009"):
            await bot.client.send_message("group-1", {"msgtype": "markdown", "markdown": {"content": "3"}})


async def test_sdk_card_click_and_update(tls: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve_fake(config(), tls) as served, sdk_bot(served, monkeypatch, tls) as bot:
        fake = served.fake
        ack = await bot.client.send_message(
            "group-1", {"msgtype": "template_card", "template_card": button_card("merge-1", "merge", "skip")}
        )
        assert ack["errcode"] == 0
        pushed = await fake.aibot.click(userid="lisi", task_id="merge-1", event_key="merge")
        frame = await bot.next("event.template_card_event")
        assert frame["cmd"] == "aibot_event_callback" and frame["headers"]["req_id"] == pushed.req_id
        body = frame["body"]
        assert body["msgtype"] == "event" and body["from"] == {"userid": "lisi"} and body["chatid"] == "group-1"
        assert body["event"] == {
            "eventtype": "template_card_event",
            "template_card_event": {"card_type": "button_interaction", "event_key": "merge", "task_id": "merge-1"},
        }

        decided = {"card_type": "text_notice", "main_title": {"title": "✅ 李四 选择了「merge」"}, "task_id": "merge-1"}
        ack = await bot.client.update_template_card(frame, decided)
        assert ack["errcode"] == 0
        state = fake.aibot.card("merge-1")
        assert state.card == decided and [u.card for u in state.updates] == [decided]
        assert fake.get_messages("group-1")[0].card == decided
        # The buttons are gone, so nobody can click them any more.
        with pytest.raises(AibotConflictError):
            await fake.aibot.click(userid="lisi", task_id="merge-1", event_key="merge")

        # Past the window, WeCom refuses the update and the SDK raises.
        fake.update_config(aibot_reply_window=0.05)
        await bot.client.send_message("group-1", {"msgtype": "template_card", "template_card": button_card("merge-2")})
        await fake.aibot.click(userid="lisi", task_id="merge-2", event_key="skip")
        late = await bot.next("event.template_card_event")
        await asyncio.sleep(0.1)
        with pytest.raises(RuntimeError, match="errcode=846605"):
            await bot.client.update_template_card(late, {**decided, "task_id": "merge-2"})
        assert fake.aibot.card("merge-2").updates == []


async def test_sdk_download_file_decrypts_images_and_files(tls: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve_fake(config(), tls) as served, sdk_bot(served, monkeypatch, tls) as bot:
        fake = served.fake
        image = png(7, 5)
        await fake.aibot.push_message(userid="zhangsan", chat_type="single", images=[image])
        frame = await bot.next("message.image")
        assert frame["body"]["chattype"] == "single" and "chatid" not in frame["body"]  # only groups carry a chatid
        part = frame["body"]["image"]
        assert len(part["aeskey"]) == 43 and part["url"].startswith(served.http.base_url.scheme + "://127.0.0.1")
        assert await bot.client.download_file(part["url"], part["aeskey"]) == (image, None)
        # Without the key the bytes are useless: the URL serves only ciphertext.
        raw, _ = await bot.client.download_file(part["url"])
        assert raw != image and len(raw) % 32 == 0

        report = "第一行\n".encode() * 100
        await fake.aibot.push_message(userid="zhangsan", chat_type="single", file=("周报 v2.txt", report))
        part = (await bot.next("message.file"))["body"]["file"]
        assert await bot.client.download_file(part["url"], part["aeskey"]) == (report, "周报 v2.txt")

        await fake.aibot.push_message(userid="zhangsan", chat_id="group-1", text="看图", images=[image, png(2, 2)])
        items = (await bot.next("message.mixed"))["body"]["mixed"]["msg_item"]
        assert [item["msgtype"] for item in items] == ["text", "image", "image"]
        assert items[0]["text"] == {"content": f"@{ROBOT} 看图"}
        assert await bot.client.download_file(items[2]["image"]["url"], items[2]["image"]["aeskey"]) == (
            png(2, 2),
            None,
        )


async def test_sdk_sees_a_takeover_and_a_kick_as_its_disconnected_event(
    tls: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_fake(config(), tls) as served, sdk_bot(served, monkeypatch, tls) as first:
        fake = served.fake
        async with sdk_bot(served, monkeypatch, tls) as second:
            kicked = await first.next("event.disconnected_event")
            assert kicked["cmd"] == "aibot_event_callback"
            assert kicked["body"]["event"] == {"eventtype": "disconnected_event"}
            assert kicked["body"]["msgtype"] == "event" and kicked["body"]["aibotid"] == BOT
            # Then the server closes the old link. (With websockets >= 14 the SDK's receive loop ends quietly on a
            # normal close: no "disconnected" event, no reconnect. That is the SDK's business; the link is gone.)
            await until(lambda: not first.client.is_connected)
            [status] = fake.aibot.status()
            assert status.connected and status.takeovers == 1
            assert second.client.is_connected

            assert await fake.aibot.kick()
            await second.next("event.disconnected_event")
            await until(lambda: not second.client.is_connected)
            await fake.aibot.wait_connected(connected=False)


async def test_sdk_heartbeat_and_a_half_dead_link(tls: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve_fake(config(), tls) as served, sdk_bot(served, monkeypatch, tls, heartbeat_interval=50) as bot:
        fake = served.fake
        await asyncio.sleep(0.3)
        [status] = fake.aibot.status()
        assert status.connected and status.pings >= 3 and bot.client.is_connected

        fake.update_config(aibot_answer_pings=False)
        await until(lambda: not bot.client.is_connected)  # two pings unanswered: the SDK gives the link up
        assert any("No heartbeat ack" in line for line in bot.logger.lines), bot.logger.lines
        await fake.aibot.wait_connected(connected=False)


async def test_sdk_wrong_secret_and_welcome(tls: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve_fake(config(), tls) as served:
        async with sdk_bot(served, monkeypatch, tls, secret="wrong", authenticate=False) as refused:
            error = await refused.next("error")
            assert "Authentication failed" in str(error) and "853000" in str(error)
            await until(lambda: not refused.client.is_connected)
        assert not served.fake.aibot.is_connected()

        async with sdk_bot(served, monkeypatch, tls) as bot:
            pushed = await served.fake.aibot.push_event(userid="wangwu", eventtype="enter_chat")
            frame = await bot.next("event.enter_chat")
            assert frame["body"]["event"] == {"eventtype": "enter_chat"} and frame["body"]["chattype"] == "single"
            ack = await bot.client.reply_welcome(frame, {"msgtype": "text", "text": {"content": "你好，我是 HIL 助手"}})
            assert ack["errcode"] == 0
            [welcome] = served.fake.get_messages("wangwu")
            assert (welcome.msgtype, welcome.content, welcome.reply_to) == ("text", "你好，我是 HIL 助手", pushed.msgid)


# ----- the fake's own rules, with a bare websockets client -----


class Link:
    """A bare long-connection client: frames in, answers matched by req_id, pushes kept aside."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pushes: list[dict[str, Any]] = []
        self._ids = 0

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            return json.loads(await self.ws.recv())

    async def call(self, cmd: str, body: Any = None, *, req_id: str | None = None) -> dict[str, Any]:
        if req_id is None:
            self._ids += 1
            req_id = f"{cmd}_{self._ids}"
        frame: dict[str, Any] = {"cmd": cmd, "headers": {"req_id": req_id}}
        if body is not None:
            frame["body"] = body
        await self.ws.send(json.dumps(frame))
        return await self.answer(req_id)

    async def answer(self, req_id: str) -> dict[str, Any]:
        while True:
            frame = await self.recv()
            if "cmd" in frame:
                self.pushes.append(frame)
            elif frame["headers"]["req_id"] == req_id:
                return frame

    async def push(self) -> dict[str, Any]:
        return self.pushes.pop(0) if self.pushes else await self.recv()

    async def closed(self) -> int | None:
        async with asyncio.timeout(TIMEOUT):
            await self.ws.wait_closed()
        return self.ws.close_code

    async def send_card(self, card: dict[str, Any], chatid: str = "group-1") -> dict[str, Any]:
        return await self.call("aibot_send_msg", {"chatid": chatid, "msgtype": "template_card", "template_card": card})


@asynccontextmanager
async def link(served: Served, bot_id: str = BOT, secret: str = SECRET, subscribe: bool = True) -> AsyncIterator[Link]:
    async with connect(served.url, max_size=None, open_timeout=TIMEOUT) as ws:
        bare = Link(ws)
        if subscribe:
            answer = await bare.call("aibot_subscribe", {"bot_id": bot_id, "secret": secret})
            assert answer["errcode"] == 0, answer
        yield bare


@pytest.mark.parametrize(("bot_id", "secret"), [(BOT, "wrong"), ("no-such-bot", SECRET), (BOT, SECRET.upper())])
async def test_wrong_credentials_are_refused_and_the_link_closed(served: Served, bot_id: str, secret: str) -> None:
    async with link(served, subscribe=False) as bare:
        answer = await bare.call("aibot_subscribe", {"bot_id": bot_id, "secret": secret}, req_id="aibot_subscribe_1")
        assert answer["errcode"] == 853000 and answer["headers"] == {"req_id": "aibot_subscribe_1"}
        assert "invalid bot_id or secret" in answer["errmsg"] and secret not in answer["errmsg"]
        assert await bare.closed() == 1000
    assert not served.fake.aibot.is_connected()


@pytest.mark.parametrize(
    ("cmd", "body"),
    [("ping", None), ("aibot_send_msg", {"chatid": "g", "msgtype": "markdown", "markdown": {"content": "x"}})],
)
async def test_nothing_but_subscribe_before_auth(served: Served, cmd: str, body: Any) -> None:
    async with link(served, subscribe=False) as bare:
        answer = await bare.call(cmd, body)
        assert answer["errcode"] == 40058 and "aibot_subscribe first" in answer["errmsg"]
        assert await bare.closed() == 1008
    assert served.fake.messages == []


async def test_subscribe_with_a_malformed_body_is_refused(served: Served) -> None:
    async with link(served, subscribe=False) as bare:
        answer = await bare.call("aibot_subscribe", {"bot_id": BOT, "secret": 12345})
        assert answer["errcode"] == 40058 and await bare.closed() == 1000


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", '"text"', b"\xff\xfe\x00", ""])
async def test_frames_that_are_not_json_objects_close_the_link(served: Served, raw: str | bytes) -> None:
    async with link(served) as bare:
        await bare.ws.send(raw)
        assert await bare.closed() == 1007
    assert not served.fake.aibot.is_connected()


NESTED = {"cmd": "aibot_send_msg", "headers": {"req_id": "deep"}, "body": {"chatid": "g", "x": [[[[[[[[[[[]]]]]]]]]]]}}


@pytest.mark.parametrize(
    ("frame", "outcome"),
    [
        ({"cmd": 1, "headers": {"req_id": "r"}}, 40058),
        ({"cmd": "ping", "headers": "r"}, 40058),
        ({"cmd": "aibot_send_msg", "headers": {"req_id": "r"}, "body": []}, 40058),
        ({"cmd": "aibot_send_msg", "headers": {"req_id": "r"}, "body": None}, 40058),
        ({"cmd": "aibot_respond_msg", "headers": {"req_id": "r"}, "body": {"msgtype": 5}}, 846605),
        ({"cmd": "aibot_respond_update_msg", "headers": {"req_id": "r"}, "body": {"template_card": 5}}, 846605),
        ({"cmd": "aibot_send_msg", "headers": {"req_id": "\ud800"}, "body": {}}, 40058),
        ({"cmd": "aibot_send_msg", "headers": {"req_id": "r" * 300}, "body": {}}, 40058),
        (
            {"cmd": "aibot_send_msg", "headers": {"req_id": "r"}, "body": markdown("g", "x") | {"markdown": "x"}},
            40058,
        ),
        (
            {
                "cmd": "aibot_send_msg",
                "headers": {"req_id": "r"},
                "body": {
                    "chatid": "g",
                    "msgtype": "template_card",
                    "template_card": button_card("t") | {"button_list": "x"},
                },
            },
            40058,
        ),
        (NESTED, 40058),
        (
            {"cmd": "aibot_subscribe", "headers": {"req_id": "r"}, "body": {"bot_id": "\u0000", "secret": "\u00e9"}},
            853000,
        ),
        ("[" * 100_000 + "]" * 100_000, 1007),  # past the JSON parser's own recursion limit
        (
            json.dumps(
                {
                    "cmd": "ping",
                    "headers": {"req_id": "r"},
                    "body": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
                }
            ),
            1007,
        ),
        ('{"cmd": "ping", "headers": {"req_id": "r"}, "body": 1e999999}', 1007),
        ('{"cmd": "ping", "headers": {"req_id": "r"}, "body": NaN}', 1007),
        ('{"cmd": "ping", "headers": {"req_id": "r"}, "body": 1.5}', "answer"),
    ],
)
async def test_odd_frames_are_answered_or_close_the_link_never_crash_it(
    served: Served, frame: Any, outcome: int | str
) -> None:
    async with link(served) as bare:
        await bare.ws.send(frame if isinstance(frame, str) else json.dumps(frame))
        if outcome == 1007:
            assert await bare.closed() == 1007
        else:
            answer = await bare.recv()
            assert answer.get("errcode", 0) == (0 if outcome == "answer" else outcome), answer
            if outcome == 853000:  # a failed subscribe ends even an authenticated link
                assert await bare.closed() == 1000
            else:
                assert (await bare.call("ping"))["errcode"] == 0  # the link lives on
    # Whatever came in, the control API can still show it.
    assert (await served.http.get("/_fake/aibot/frames")).status_code == 200


async def test_stored_text_can_always_be_served_back(served: Served) -> None:
    """A lone surrogate is valid JSON escaping but not UTF-8: both doors into the message log scrub it."""
    lone = '{"chatid": "g", "msgtype": "markdown", "markdown": {"content": "a\\ud800b"}}'
    webhook = await served.http.post(
        "/cgi-bin/webhook/send",
        params={"key": "test-bot-key"},
        content=lone,
        headers={"content-type": "application/json"},
    )
    assert webhook.json()["errcode"] == 0
    deep = await served.http.post("/cgi-bin/webhook/send", params={"key": "test-bot-key"}, content="[" * 100_000)
    assert deep.json()["errcode"] == 47001
    async with link(served) as bare:
        await bare.ws.send(f'{{"cmd": "aibot_send_msg", "headers": {{"req_id": "r"}}, "body": {lone}}}')
        assert (await bare.answer("r"))["errcode"] == 0
    messages = (await served.http.get("/_fake/messages")).json()["messages"]
    assert [m["content"] for m in messages] == ["a\ufffdb", "a\ufffdb"]


async def test_unknown_cmd_and_missing_req_id_are_answered_and_the_link_stays(served: Served) -> None:
    async with link(served) as bare:
        answer = await bare.call("aibot_do_magic", {})
        assert answer["errcode"] == 40058 and "unknown cmd" in answer["errmsg"]
        await bare.ws.send(json.dumps({"cmd": "ping", "headers": {}}))
        assert (await bare.recv()) | {"errmsg": ""} == {"headers": {"req_id": ""}, "errcode": 40058, "errmsg": ""}
        await bare.ws.send(json.dumps({"cmd": "ping", "headers": {"req_id": 7}}))
        assert (await bare.recv())["errcode"] == 40058
        # Binary frames carrying JSON are read like text ones.
        await bare.ws.send(json.dumps({"cmd": "ping", "headers": {"req_id": "ping_bin"}}).encode())
        assert await bare.answer("ping_bin") == {"headers": {"req_id": "ping_bin"}, "errcode": 0, "errmsg": "ok"}
    [frame] = frames_of(served.fake, "aibot_do_magic")
    assert frame.direction == "in" and frame.bot_id == BOT and frame.frame["body"] == {}


async def test_a_second_subscriber_takes_the_bot_over(served: Served) -> None:
    async with link(served) as first, link(served) as second:
        kicked = await first.push()
        assert kicked["cmd"] == "aibot_event_callback" and kicked["headers"]["req_id"]
        assert kicked["body"]["event"] == {"eventtype": "disconnected_event"} and kicked["body"]["aibotid"] == BOT
        assert await first.closed() == 1000
        assert (await second.call("ping"))["errcode"] == 0
        pushed = await served.fake.aibot.push_message(userid="zhangsan", chat_id="g", text="hi")
        assert (await second.push())["headers"]["req_id"] == pushed.req_id
        [status] = served.fake.aibot.status()
        assert status.connected and status.takeovers == 1 and status.pings == 1


async def test_replies_must_answer_the_right_callback_in_time(served: Served) -> None:
    fake = served.fake
    fake.update_config(aibot_reply_window=0.2)
    async with link(served) as bare:
        assert (await bare.send_card(button_card("t-1")))["errcode"] == 0
        click = await fake.aibot.click(userid="lisi", task_id="t-1", event_key="merge")
        message = await fake.aibot.push_message(userid="lisi", chat_id="group-1", text="hi")
        enter = await fake.aibot.push_event(userid="lisi", eventtype="enter_chat")
        update = {"response_type": "update_template_card", "template_card": button_card("t-1", "done")}
        welcome = {"msgtype": "text", "text": {"content": "你好"}}
        stream = {"msgtype": "stream", "stream": {"id": "s", "finish": True, "content": "ok"}}

        # Each reply fits one kind of callback only.
        assert (await bare.call("aibot_respond_update_msg", update, req_id=message.req_id))["errcode"] == 846605
        assert (await bare.call("aibot_respond_welcome_msg", welcome, req_id=click.req_id))["errcode"] == 846605
        assert (await bare.call("aibot_respond_msg", stream, req_id=enter.req_id))["errcode"] == 846605
        assert (await bare.call("aibot_respond_msg", stream, req_id="never-pushed"))["errcode"] == 846605
        other_task = {**update, "template_card": button_card("t-2")}
        assert (await bare.call("aibot_respond_update_msg", other_task, req_id=click.req_id))["errcode"] == 40058
        bad_type = {**update, "response_type": "replace"}
        assert (await bare.call("aibot_respond_update_msg", bad_type, req_id=click.req_id))["errcode"] == 40058
        # In time, the right ones pass; a second welcome does not.
        assert (await bare.call("aibot_respond_update_msg", update, req_id=click.req_id))["errcode"] == 0
        assert (await bare.call("aibot_respond_welcome_msg", welcome, req_id=enter.req_id))["errcode"] == 0
        assert (await bare.call("aibot_respond_welcome_msg", welcome, req_id=enter.req_id))["errcode"] == 846605
        markdown_welcome = {"msgtype": "markdown", "markdown": {"content": "x"}}
        enter2 = await fake.aibot.push_event(userid="lisi", eventtype="enter_chat")
        assert (await bare.call("aibot_respond_welcome_msg", markdown_welcome, req_id=enter2.req_id))[
            "errcode"
        ] == 40008

        await asyncio.sleep(0.3)
        late = await bare.call("aibot_respond_update_msg", update, req_id=click.req_id)
        assert late["errcode"] == 846605 and "after the click" in late["errmsg"]
        enter3 = await fake.aibot.push_event(userid="lisi", eventtype="enter_chat")
        await asyncio.sleep(0.3)
        assert (await bare.call("aibot_respond_welcome_msg", welcome, req_id=enter3.req_id))["errcode"] == 846605
        # Messages have 6 minutes (a knob here).
        fake.update_config(aibot_stream_window=0.1)
        assert (await bare.call("aibot_respond_msg", stream, req_id=message.req_id))["errcode"] == 846608
    assert [u.card["button_list"][0]["key"] for u in fake.aibot.card("t-1").updates] == ["done"]
    assert [a.errcode for a in fake.get_attempts()].count(0) == 3  # card, update, welcome


async def test_a_reply_from_another_connection_is_refused(served: Served) -> None:
    async with link(served) as first:
        pushed = await served.fake.aibot.push_message(userid="lisi", chat_id="g", text="hi")
        await first.push()
    async with link(served) as second:
        stream = {"msgtype": "stream", "stream": {"id": "s", "content": "ok"}}
        assert (await second.call("aibot_respond_msg", stream, req_id=pushed.req_id))["errcode"] == 846605


async def test_stream_replies_grow_one_message(served: Served) -> None:
    fake = served.fake
    async with link(served) as bare:
        pushed = await fake.aibot.push_message(userid="lisi", chat_type="single", text="讲讲")
        await bare.push()
        for content, finish in (("第一段", False), ("第一段，第二段", True)):
            body = {"msgtype": "stream", "stream": {"id": "s-1", "finish": finish, "content": content}}
            assert (await bare.call("aibot_respond_msg", body, req_id=pushed.req_id))["errcode"] == 0
        late = {"msgtype": "stream", "stream": {"id": "s-1", "content": "又一段"}}
        assert (await bare.call("aibot_respond_msg", late, req_id=pushed.req_id))["errcode"] == 40058
        too_long = {"msgtype": "stream", "stream": {"id": "s-2", "content": "字" * 6827}}  # 20481 bytes
        assert (await bare.call("aibot_respond_msg", too_long, req_id=pushed.req_id))["errcode"] == 40058
        with_card = {
            "msgtype": "stream_with_template_card",
            "stream": {"id": "s-3", "finish": True, "content": "选一个"},
            "template_card": button_card("t-s"),
        }
        assert (await bare.call("aibot_respond_msg", with_card, req_id=pushed.req_id))["errcode"] == 0
        text = {"msgtype": "text", "text": {"content": "x"}}
        assert (await bare.call("aibot_respond_msg", text, req_id=pushed.req_id))["errcode"] == 40008
    first, stream, card = fake.get_messages("lisi")
    assert (first.content, first.finished, first.stream_id) == ("第一段，第二段", True, "s-1")
    assert (stream.content, card.task_id) == ("选一个", "t-s")
    updates = [e for e in fake.aibot.get_events() if e.kind == "update"]
    assert [(u.message_seq, u.content, u.finished) for u in updates] == [(first.seq, "第一段，第二段", True)]


@pytest.mark.parametrize(
    ("card", "errcode", "says"),
    [
        (button_card("dup"), 40058, "already used"),  # sent once in the test first
        (button_card("x" * 129), 40058, "at most 128"),
        (button_card("有中文"), 40058, "digits, letters"),
        ({**button_card("t"), "task_id": None}, 40058, "needs a task_id"),
        (button_card("seven", *"abcdefg"), 40058, "at most 6"),
        (button_card("big-key", "k" * 1025), 40058, "1024"),
        (button_card("same", "a", "a"), 40058, "must not repeat"),
        ({**button_card("no-buttons"), "button_list": []}, 40058, "1 to 6 buttons"),
        ({**button_card("typed"), "button_list": [{"text": "a", "style": "1", "key": "a"}]}, 40058, "style"),
        ({**button_card("bad-type"), "card_type": "poll"}, 40058, "card_type"),
        ({"card_type": "vote_interaction", "task_id": "v"}, 40058, "checkbox"),
        ("not a card", 40058, "template_card"),
    ],
)
async def test_template_card_rules(served: Served, card: Any, errcode: int, says: str) -> None:
    async with link(served) as bare:
        assert (await bare.send_card(button_card("dup")))["errcode"] == 0
        answer = await bare.send_card(card)
        assert answer["errcode"] == errcode and says in answer["errmsg"], answer
    assert len(served.fake.get_messages()) == 1


async def test_other_cards_pass_and_clicks_follow_them(served: Served) -> None:
    vote = {
        "card_type": "vote_interaction",
        "task_id": "vote-1",
        "checkbox": {"question_key": "q", "option_list": [{"id": "a", "text": "A"}, {"id": "b", "text": "B"}]},
        "submit_button": {"text": "提交", "key": "submit"},
    }
    async with link(served) as bare:
        assert (await bare.send_card({"card_type": "text_notice", "main_title": {"title": "通知"}}))["errcode"] == 0
        assert (await bare.send_card(vote, chatid="lisi"))["errcode"] == 0
        clicked = await served.fake.aibot.click(
            userid="lisi",
            task_id="vote-1",
            event_key="submit",
            selected_items=[{"question_key": "q", "option_ids": ["b"]}],
        )
        assert clicked.button_text == "提交"  # what the chat page shows: the button's text, not its key
        body = (await bare.push())["body"]
        assert body["event"]["template_card_event"]["selected_items"] == {
            "selected_item": [{"question_key": "q", "option_ids": {"option_id": ["b"]}}]
        }
        with pytest.raises(AibotConflictError, match="keys now: submit"):
            await served.fake.aibot.click(userid="lisi", task_id="vote-1", event_key="a")


@pytest.mark.parametrize(
    ("body", "errcode"),
    [
        ({"msgtype": "markdown", "markdown": {"content": "x"}}, 40058),  # no chatid
        ({"chatid": "", "msgtype": "markdown", "markdown": {"content": "x"}}, 93006),
        ({"chatid": 42, "msgtype": "markdown", "markdown": {"content": "x"}}, 40058),
        ({"chatid": "g" * 257, "msgtype": "markdown", "markdown": {"content": "x"}}, 93006),
        ({"chatid": "g", "msgtype": "markdown", "markdown": {"content": ""}}, 44004),
        ({"chatid": "g", "msgtype": "markdown", "markdown": {}}, 40058),
        ({"chatid": "g", "msgtype": "markdown", "markdown": {"content": "字" * 6827}}, 40058),  # 20481 bytes
        ({"chatid": "g", "msgtype": "text", "text": {"content": "x"}}, 40008),
        ({"chatid": "g", "msgtype": "file", "file": {"media_id": "m"}}, 40007),
        ("a string body", 40058),
    ],
)
async def test_send_msg_rules(served: Served, body: Any, errcode: int) -> None:
    async with link(served) as bare:
        answer = await bare.call("aibot_send_msg", body)
        assert answer["errcode"] == errcode, answer
        assert "more info at https://open.work.weixin.qq.com" in answer["errmsg"]
        ok = await bare.call(
            "aibot_send_msg", {"chatid": "g", "msgtype": "markdown", "markdown": {"content": "字" * 6826}}
        )
        assert ok["errcode"] == 0  # 20478 bytes: the limit is in bytes
    attempt = served.fake.get_attempts()[0]
    assert (attempt.key, attempt.errcode, attempt.message_seq) == (BOT, errcode, None)


async def test_a_huge_frame_closes_the_link(served: Served) -> None:
    served.fake.update_config(aibot_max_frame_bytes=64 * 1024)
    async with link(served) as bare:
        content = "x" * (64 * 1024)
        await bare.ws.send(
            json.dumps({"cmd": "aibot_send_msg", "headers": {"req_id": "r"}, "body": {"content": content}})
        )
        assert await bare.closed() == 1009
    assert served.fake.messages == []
    assert served.fake.aibot.get_frames()[-1].frame == f"<{64 * 1024 + 78} bytes>"


async def test_injected_failures(served: Served) -> None:
    fake = served.fake
    fake.aibot.fail_next(45009, 93006)
    fake.aibot.fail_next(45009, cmd="aibot_subscribe")
    async with link(served, subscribe=False) as bare:
        assert (await bare.call("aibot_subscribe", {"bot_id": BOT, "secret": SECRET}))["errcode"] == 45009
        assert await bare.closed() == 1000
    async with link(served) as bare:
        markdown = {"chatid": "g", "msgtype": "markdown", "markdown": {"content": "x"}}
        assert [(await bare.call("aibot_send_msg", markdown))["errcode"] for _ in range(3)] == [45009, 93006, 0]
        response = await served.http.post("/_fake/aibot/fail", json={"errcodes": [-1], "cmd": "ping"})
        assert response.json() == {"pending": [{"errcode": -1, "cmd": "ping"}]}
        assert (await bare.call("ping"))["errcode"] == -1
        assert (await bare.call("ping"))["errcode"] == 0
    assert [(a.errcode, a.injected) for a in fake.get_attempts()] == [(45009, True), (93006, True), (0, False)]


async def test_idle_links_are_closed_and_silent_pings_are_not_answered(served: Served) -> None:
    fake = served.fake
    fake.update_config(aibot_answer_pings=False)
    async with link(served) as bare:
        await bare.ws.send(json.dumps({"cmd": "ping", "headers": {"req_id": "ping_1"}}))
        with pytest.raises(TimeoutError):
            await bare.recv(timeout=0.3)
        assert fake.aibot.status()[0].pings == 1
        fake.update_config(aibot_idle_timeout=0.2)
        assert await bare.closed() == 1000
    await fake.aibot.wait_connected(connected=False)
    async with link(served, subscribe=False) as bare:  # a link that never subscribes is closed too
        assert await bare.closed() == 1000


# ----- the control API -----


async def test_control_api_plays_people(served: Served) -> None:
    http, fake = served.http, served.fake
    assert (await http.post("/_fake/aibot/message", json={"chat_id": "g", "text": "hi"})).status_code == 409
    async with link(served) as bare:
        status = (await http.get("/_fake/aibot/status", params={"wait": "connected", "timeout": 2})).json()
        assert status["timed_out"] is False and status["bots"][0]["connected"] is True
        attached = (await http.post("/_fake/images", files={"file": ("a.png", png(), "image/png")})).json()
        pushed = await http.post(
            "/_fake/aibot/message",
            json={"chat_type": "single", "userid": "lisi", "name": "李四", "image_ids": [attached["image_id"]]},
        )
        assert pushed.status_code == 200, pushed.text
        event = pushed.json()
        frame = await bare.push()
        assert event["frame"] == frame and event["image_ids"] == [attached["image_id"]] and event["name"] == "李四"
        media = await http.get(frame["body"]["image"]["url"])
        assert media.status_code == 200 and not media.content.startswith(PNG_MAGIC)

        voice = await http.post("/_fake/aibot/message", json={"chat_type": "single", "voice": "帮我合并"})
        assert (await bare.push())["body"]["voice"] == {"content": "帮我合并"} and voice.json()["chat_id"] == "zhangsan"
        encoded = base64.b64encode(b"hello").decode()
        await http.post(
            "/_fake/aibot/message", json={"chat_type": "single", "file_name": "a.txt", "file_base64": encoded}
        )
        assert (await bare.push())["body"]["msgtype"] == "file"
        feedback = {"eventtype": "feedback_event", "feedback": {"id": "fb", "type": 2}}
        assert (await http.post("/_fake/aibot/event", json=feedback)).status_code == 200
        assert (await bare.push())["body"]["event"]["feedback_event"] == {"id": "fb", "type": 2}

        # Messages WeCom would never deliver are refused with a reason.
        refusals = [
            ("/_fake/aibot/message", {"chat_id": "g", "images": []}, 422),
            (
                "/_fake/aibot/message",
                {"chat_id": "g", "image_base64": [base64.b64encode(png()).decode()], "msgtype": "image"},
                422,
            ),
            ("/_fake/aibot/message", {"chat_id": "g", "voice": "hi"}, 422),
            ("/_fake/aibot/message", {"text": "no chat"}, 422),
            ("/_fake/aibot/message", {"chat_type": "single", "chat_id": "other", "text": "x"}, 422),
            ("/_fake/aibot/message", {"chat_type": "single", "image_ids": ["nope"]}, 404),
            ("/_fake/aibot/message", {"chat_type": "single", "image_base64": ["!!"]}, 422),
            ("/_fake/aibot/message", {"chat_type": "single", "image_base64": [encoded]}, 422),  # not an image
            ("/_fake/aibot/message", {"chat_id": "g", "text": "x", "quote_seq": 99}, 404),
            ("/_fake/aibot/message", {"chat_id": "g", "text": "x", "quote_text": "a", "quote_seq": 1}, 422),
            ("/_fake/aibot/message", {"chat_type": "single", "file_name": "a.txt"}, 422),
            ("/_fake/aibot/event", {"eventtype": "enter_chat", "chat_type": "group", "chat_id": "g"}, 422),
            ("/_fake/aibot/click", {"task_id": "nope", "event_key": "k"}, 404),
            ("/_fake/aibot/message", {"chat_id": "g", "text": "x", "bogus": 1}, 422),
        ]
        for path, body, status_code in refusals:
            response = await http.post(path, json=body)
            assert response.status_code == status_code, (body, response.text)
            assert response.json()["detail"]
        assert bare.pushes == []

    assert (await http.post("/_fake/aibot/kick", json={})).json() == {"kicked": False}
    assert (await http.post("/_fake/aibot/drop", json={})).json() == {"dropped": False}
    events = (await http.get("/_fake/aibot/events")).json()["events"]
    assert [e["kind"] for e in events] == ["push"] * 4
    frames = (await http.get("/_fake/aibot/frames", params={"since_seq": 1})).json()["frames"]
    assert frames and all(f["seq"] > 1 for f in frames)
    fake.reset()
    assert fake.aibot.get_events() == [] and fake.aibot.get_frames() == []


async def test_quote_replies(served: Served) -> None:
    async with link(served) as bare:
        await bare.call(
            "aibot_send_msg", {"chatid": "g", "msgtype": "markdown", "markdown": {"content": "[#1a2b3c4d] 合并吗？"}}
        )
        await bare.send_card(button_card("q-card"), chatid="g")
        await served.fake.aibot.push_message(userid="lisi", chat_id="g", text="合并", quote_seq=1)
        body = (await bare.push())["body"]
        assert body["text"] == {"content": f"@{ROBOT} 合并"}
        assert body["quote"] == {"msgtype": "text", "text": {"content": "[#1a2b3c4d] 合并吗？"}}
        await served.fake.aibot.push_message(userid="lisi", chat_id="g", quote_seq=2)  # only the @mention
        body = (await bare.push())["body"]
        assert body["text"] == {"content": f"@{ROBOT}"} and body["quote"]["text"]["content"] == "要合并这个 PR 吗？"
        raw = {"msgtype": "image", "image": {"url": "http://x", "aeskey": "k"}}
        await served.fake.aibot.push_message(userid="lisi", chat_type="single", text="这张？", quote=raw)
        assert (await bare.push())["body"]["quote"] == raw
        with pytest.raises(AibotError, match="a text message needs text"):
            await served.fake.aibot.push_message(userid="lisi", chat_type="single", quote_seq=1)


async def test_drop_kick_and_several_bots(served: Served) -> None:
    fake = served.fake
    fake.update_config(aibots={BOT: SECRET, "other": "other-secret"})
    async with link(served) as bare, link(served, "other", "other-secret") as other:
        with pytest.raises(AibotError, match="name one with bot_id"):
            await fake.aibot.push_message(userid="lisi", chat_id="g", text="hi")
        await fake.aibot.push_message(userid="lisi", chat_id="g", text="hi", bot_id="other")
        assert (await other.push())["body"]["aibotid"] == "other"
        assert (await served.http.post("/_fake/aibot/drop", json={"bot_id": BOT, "code": 4000})).json()["dropped"]
        assert await bare.closed() == 4000
        assert [(s.bot_id, s.connected) for s in fake.aibot.status()] == [(BOT, False), ("other", True)]
    with pytest.raises(AibotNotConnectedError):
        await fake.aibot.push_message(userid="lisi", chat_id="g", text="hi", bot_id="other")
    with pytest.raises(AibotNotFoundError):
        fake.aibot.card("nope", bot_id="other")


async def test_media_urls_expire(served: Served) -> None:
    served.fake.update_config(aibot_media_ttl=0.1)
    async with link(served) as bare:
        await served.fake.aibot.push_message(userid="lisi", chat_type="single", images=[png()])
        url = (await bare.push())["body"]["image"]["url"]
        assert (await served.http.get(url)).status_code == 200
        await asyncio.sleep(0.2)
        assert (await served.http.get(url)).status_code == 404
    assert (await served.http.get("/_fake/aibot/media/../../etc/passwd")).status_code == 404


async def test_config_and_cli() -> None:
    async with serve_fake(FakeWeComConfig()) as served:
        view = (await served.http.post("/_fake/config", json={"aibots": {BOT: SECRET}, "aibot_reply_window": 1})).json()
        assert view["aibot_ids"] == [BOT] and view["aibot_reply_window"] == 1 and SECRET not in json.dumps(view)
        assert (await served.http.post("/_fake/config", json={"aibots": {"": "x"}})).status_code == 422
        assert (await served.http.post("/_fake/config", json={"aibot_idle_timeout": 0})).status_code == 422
        async with link(served):
            assert served.fake.aibot.is_connected()
    with pytest.raises(SystemExit):
        fake_main(["--aibot-id", "a", "--aibot-id", "b", "--aibot-secret", "x"])


async def test_pushes_from_another_thread_reach_the_link(served: Served) -> None:
    """The typed API works from a thread with its own loop (as TestClient tests have), not only the app's loop."""
    async with link(served) as bare:

        def from_thread() -> str:
            return asyncio.run(served.fake.aibot.push_message(userid="lisi", chat_id="g", text="hi")).req_id

        req_id = await asyncio.to_thread(from_thread)
        assert (await bare.push())["headers"]["req_id"] == req_id


# ----- the chat page in AI-bot mode, in a real browser -----

CHROMIUM = shutil.which("chromium")


@pytest.mark.e2e
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: apt-get install chromium")
async def test_chat_page_in_ai_bot_mode(served: Served) -> None:
    async_api = pytest.importorskip("playwright.async_api", reason="playwright is in the test extra")
    expect: Callable[..., Any] = async_api.expect
    fake = served.fake
    assert CHROMIUM is not None
    async with link(served) as bare, aibot_chat_page(CHROMIUM, f"{served.http.base_url}/#chat=group-1", "lisi") as chat:
        page = chat.page
        await page.get_by_test_id("whoami-name").fill("李四")

        # The bot asks with a card; the person clicks as 李四.
        assert (await bare.send_card(button_card("page-1", "merge", "skip")))["errcode"] == 0
        card = page.get_by_test_id("message").filter(has=page.get_by_test_id("card"))
        await expect(card).to_contain_text("要合并这个 PR 吗？")
        await card.get_by_test_id("card-button").filter(has_text="merge").click()
        click = await bare.push()
        assert click["body"]["from"] == {"userid": "lisi"}
        assert click["body"]["event"]["template_card_event"]["event_key"] == "merge"
        decided = {"card_type": "text_notice", "main_title": {"title": "✅ 李四 选择了「merge」"}, "task_id": "page-1"}
        update = {"response_type": "update_template_card", "template_card": decided}
        assert (await bare.call("aibot_respond_update_msg", update, req_id=click["headers"]["req_id"]))["errcode"] == 0
        await expect(card).to_contain_text("✅ 李四 选择了「merge」")
        await expect(card.get_by_test_id("card-button")).to_have_count(0)

        # A quote-reply from the page goes out over the long connection with the structured quote.
        await bare.call(
            "aibot_send_msg", {"chatid": "group-1", "msgtype": "markdown", "markdown": {"content": "**部署吗？**"}}
        )
        question = page.get_by_test_id("message").filter(has_text="部署吗？")
        await question.get_by_test_id("quote-button").click()
        await page.get_by_test_id("composer-input").fill("部署吧")
        await page.get_by_test_id("send-button").click()
        reply = (await bare.push())["body"]
        assert reply["text"] == {"content": f"@{ROBOT} 部署吧"} and reply["from"] == {"userid": "lisi"}
        assert reply["quote"] == {"msgtype": "text", "text": {"content": "**部署吗？**"}}
        mine = page.get_by_test_id("message").and_(page.locator('[data-kind="person"]')).last
        await expect(mine.get_by_test_id("message-quote")).to_contain_text("**部署吗？**")
        await expect(mine).to_contain_text("李四")
        await expect(mine.get_by_test_id("callback-status")).to_have_text("已推送")
        assert (await page.screenshot()).startswith(PNG_MAGIC)
    assert not chat.errors, chat.errors
    assert fake.aibot.card("page-1").card == decided
