"""The AI-bot channel (hil_server.channels.aibot) and its protocol module (hil_protocol.aibot).

Frames, callbacks and media are tested as data; the channel runs against the fake WeCom's AI bot under uvicorn in
this test's event loop (ws:// on 127.0.0.1, port 0), and against a bare websockets server where a test needs frames
the fake would never send (another bot's callback, a frame without req_id). Timing knobs are milliseconds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from hil_protocol.aibot import (
    FILE_ANSWER,
    FRAME_MAX_BYTES,
    CallbackError,
    FrameError,
    MediaError,
    MediaRef,
    decrypt_media,
    fetch_media,
    image_data_url,
    is_takeover,
    parse_frame,
    read_callback,
)
from hil_protocol.callback import IncomingMessage
from hil_protocol.outbound import CardUpdate, Notice, Question
from hil_protocol.wecom_robot import ERR_INVALID_MESSAGE
from hil_sandbox.fake_aibot import encrypt_media
from hil_server.channels import ChannelError
from hil_server.channels.aibot import AibotChannel, AibotOptions, plain_text
from hil_server.models import Session
from tests.helpers import png, until
from tests.test_fake_aibot import BOT, ROBOT, SECRET, Served, config, serve_fake

FAST = {
    "ping_interval": 0.2,
    "reconnect_min_delay": 0.05,
    "reconnect_max_delay": 0.2,
    "auth_retry": 0.6,
    "takeover_backoff": 0.6,
    "down_grace": 0.3,
    "send_timeout": 2.0,
    "open_timeout": 2.0,
    "media_timeout": 2.0,
}
TIMEOUT = 5.0


def frame(cmd: str | None, body: Any = None, req_id: str = "req-1", **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"headers": {"req_id": req_id}, **extra}
    if cmd is not None:
        out["cmd"] = cmd
    if body is not None:
        out["body"] = body
    return out


def msg_body(msgtype: str = "text", chattype: str = "group", **parts: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"msgid": "m-1", "aibotid": BOT, "chattype": chattype, "from": {"userid": "zhangsan"}}
    if chattype == "group":
        body["chatid"] = "group-1"
    return {**body, "msgtype": msgtype, **parts}


def callback(body: dict[str, Any], cmd: str = "aibot_msg_callback", req_id: str = "req-1") -> Any:
    return parse_frame(json.dumps(frame(cmd, body, req_id)))


# --- frames ------------------------------------------------------------------------------------------------------


def test_answers_and_callbacks_parse() -> None:
    answer = parse_frame('{"headers": {"req_id": "aibot_send_msg_1"}, "errcode": 0, "errmsg": "ok", "new": 1}')
    assert answer.is_answer and answer.req_id == "aibot_send_msg_1" and answer.errcode == 0
    push = parse_frame(json.dumps(frame("aibot_msg_callback", msg_body(text={"content": "hi"}))).encode())
    assert not push.is_answer and push.cmd == "aibot_msg_callback" and push.body["msgtype"] == "text"


@pytest.mark.parametrize(
    "raw",
    [
        "{not json",
        "[1, 2]",
        '"text"',
        b"\xff\xfe\x00",
        "",
        '{"cmd": "aibot_msg_callback", "body": {}}',  # no headers
        '{"cmd": "aibot_msg_callback", "headers": {}}',  # no req_id
        '{"headers": {"req_id": ""}}',
        '{"headers": {"req_id": 5}}',
        '{"cmd": 5, "headers": {"req_id": "r"}}',
        '{"headers": {"req_id": "r"}, "errcode": "zero"}',
        '{"headers": {"req_id": "\\ud800"}}',  # a lone surrogate
        '{"headers": {"req_id": "r"}, "body": ' + "[" * 500 + "]" * 500 + "}",
        '{"headers": {"req_id": "r"}, "body": "' + "x" * FRAME_MAX_BYTES + '"}',
    ],
)
def test_odd_frames_are_typed_errors(raw: str | bytes) -> None:
    with pytest.raises(FrameError):
        parse_frame(raw)


# --- callbacks -----------------------------------------------------------------------------------------------------


def test_group_text_loses_the_mention_and_keeps_who_and_where() -> None:
    inbound = read_callback(callback(msg_body(text={"content": f"@{ROBOT}  合并吧 "})), BOT)
    assert inbound is not None and inbound.kind == "text" and inbound.images == []
    msg = inbound.message
    assert (msg.msg_type, msg.answer, msg.chat_id, msg.chat_type) == ("text", "合并吧", "group-1", "group")
    assert (msg.msgid, msg.from_user.userid, msg.reply_to, msg.quoted_short_id) == ("m-1", "zhangsan", "req-1", None)


def test_a_single_chat_is_the_person() -> None:
    inbound = read_callback(callback(msg_body(chattype="single", text={"content": "@李四 也同意"})), BOT)
    assert inbound is not None
    # No chatid in a single chat: the chat is the userid (where a message to it goes); a leading @ is the person's.
    assert (inbound.message.chat_id, inbound.message.chat_type, inbound.message.answer) == (
        "zhangsan",
        "single",
        "@李四 也同意",
    )


@pytest.mark.parametrize(
    ("quote", "short_id"),
    [
        ({"msgtype": "text", "text": {"content": "[#1a2b3c4d my project]\n要合并吗？"}}, "1a2b3c4d"),
        ({"msgtype": "text", "text": {"content": "[#1a2b3c4d my project] (2/3)\n…"}}, "1a2b3c4d"),
        ({"msgtype": "text", "text": {"content": "[#1a2b3c4d]"}}, "1a2b3c4d"),  # a card's title
        (
            {"msgtype": "mixed", "mixed": {"msg_item": [{"msgtype": "text", "text": {"content": "[#1a2b3c4d]"}}]}},
            "1a2b3c4d",
        ),
        (
            {"msgtype": "text", "text": {"content": "看这个\n[#1a2b3c4d] 怎么回事"}},
            None,
        ),  # a header on line 2 names nothing
        ({"msgtype": "text", "text": {"content": "[#1A2B3C4D]"}}, None),
        ({"msgtype": "image", "image": {"url": "https://x", "aeskey": "k"}}, None),
    ],
)
def test_a_quote_names_its_question_by_the_header(quote: Any, short_id: str | None) -> None:
    inbound = read_callback(callback(msg_body(text={"content": f"@{ROBOT} 好"}, quote=quote)), BOT)
    assert inbound is not None and inbound.message.quoted_short_id == short_id
    assert inbound.message.answer == "好"


def test_voice_file_image_and_mixed() -> None:
    voice = read_callback(callback(msg_body("voice", "single", voice={"content": " 批准 "})), BOT)
    assert voice is not None and (voice.message.msg_type, voice.message.answer) == ("text", "批准")
    file = read_callback(callback(msg_body("file", "single", file={"url": "https://x/f", "aeskey": "k"})), BOT)
    assert file is not None and file.message.answer == FILE_ANSWER and file.images == []
    image = read_callback(callback(msg_body("image", "single", image={"url": "https://x/i", "aeskey": "k"})), BOT)
    assert image is not None and image.message.msg_type == "image" and image.images == [MediaRef("https://x/i", "k")]
    items = [
        {"msgtype": "text", "text": {"content": f"@{ROBOT} 看图"}},
        {"msgtype": "image", "image": {"url": "https://x/1", "aeskey": "a"}},
        {"msgtype": "text", "text": {"content": " 第二段 "}},
        {"msgtype": "image", "image": {"url": "", "aeskey": "b"}},
    ]
    mixed = read_callback(callback(msg_body("mixed", mixed={"msg_item": items})), BOT)
    assert mixed is not None and mixed.message.msg_type == "mixed"
    assert mixed.message.answer == "看图\n第二段" and mixed.images == [MediaRef("https://x/1", "a")]
    odd = read_callback(callback(msg_body("video", "single", video={"url": "https://x/v"})), BOT)
    assert odd is not None and odd.message.msg_type == "other"


def test_events() -> None:
    enter = {**msg_body("event", "single"), "event": {"eventtype": "enter_chat"}}
    inbound = read_callback(callback(enter, "aibot_event_callback", "req-e"), BOT)
    assert inbound is not None and inbound.kind == "enter_chat"
    assert (inbound.message.event_type, inbound.message.chat_id, inbound.message.reply_to) == (
        "enter_chat",
        "zhangsan",
        "req-e",
    )
    card_event = {"card_type": "button_interaction", "event_key": "1", "task_id": "a" * 32}
    click = {**msg_body("event"), "event": {"eventtype": "template_card_event", "template_card_event": card_event}}
    inbound = read_callback(callback(click, "aibot_event_callback"), BOT)
    assert inbound is not None and inbound.message.card is not None
    assert (inbound.message.card.task_id, inbound.message.card.key, inbound.message.chat_id) == (
        "a" * 32,
        "1",
        "group-1",
    )
    feedback = {**msg_body("event", "single"), "event": {"eventtype": "feedback_event", "feedback_event": {"type": 1}}}
    assert read_callback(callback(feedback, "aibot_event_callback"), BOT) is None
    kicked = callback({"msgtype": "event", "event": {"eventtype": "disconnected_event"}}, "aibot_event_callback")
    assert is_takeover(kicked) and not is_takeover(callback(enter, "aibot_event_callback"))


@pytest.mark.parametrize(
    "body",
    [
        {**msg_body(text={"content": "hi"}), "aibotid": "another-bot"},  # a callback for another bot
        {k: v for k, v in msg_body(text={"content": "hi"}).items() if k != "chatid"},  # a group without chatid
        {k: v for k, v in msg_body(text={"content": "hi"}).items() if k != "from"},
        {**msg_body(text={"content": "hi"}), "from": {"userid": ""}},
        {**msg_body(text={"content": "hi"}), "msgid": ""},
        {**msg_body(text={"content": "hi"}), "chattype": "blackboard"},
        {**msg_body(text={"content": "hi"}), "text": "not an object"},
        {**msg_body("event"), "event": {"eventtype": "template_card_event"}},  # a click without its card
        msg_body("event"),  # an event without event
        ["not", "a", "dict"],
    ],
)
def test_callbacks_we_cannot_take_are_typed_errors(body: Any) -> None:
    cmd = "aibot_event_callback" if isinstance(body, dict) and body.get("msgtype") == "event" else "aibot_msg_callback"
    with pytest.raises(CallbackError):
        read_callback(callback(body, cmd), BOT)


# --- media ---------------------------------------------------------------------------------------------------------


def test_media_decrypts_as_wecom_encrypts_it() -> None:
    for data in (png(), b"x", b"y" * 32, b"z" * 1000):
        ciphertext, aeskey = encrypt_media(data)
        assert decrypt_media(ciphertext, aeskey) == data
        assert decrypt_media(ciphertext, aeskey + "=") == data  # with its padding, too
    ciphertext, aeskey = encrypt_media(png())
    _, other = encrypt_media(png())
    for bad_data, bad_key in [
        (ciphertext, other),  # another message's key
        (ciphertext[:-1], aeskey),  # truncated
        (b"", aeskey),
        (ciphertext, "not base64 !"),
        (ciphertext, base64.b64encode(b"short").decode()),
    ]:
        with pytest.raises(MediaError):
            decrypt_media(bad_data, bad_key)


def test_data_urls_name_the_picture() -> None:
    assert image_data_url(png()).startswith("data:image/png;base64,")
    assert image_data_url(b"\xff\xd8\xff\xe0jpeg").startswith("data:image/jpeg;base64,")
    assert image_data_url(b"GIF89a....").startswith("data:image/gif;base64,")
    assert image_data_url(b"RIFF\x00\x00\x00\x00WEBPVP8 ").startswith("data:image/webp;base64,")
    with pytest.raises(MediaError):
        image_data_url(b"%PDF-1.4")


async def test_media_downloads_are_capped_in_size_and_time() -> None:
    ciphertext, aeskey = encrypt_media(png())

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/ok":
            return httpx.Response(200, stream=httpx.ByteStream(ciphertext))
        if request.url.path == "/big":
            return httpx.Response(200, stream=httpx.ByteStream(b"x" * 5000))
        if request.url.path == "/slow":
            await asyncio.sleep(1)
        return httpx.Response(404)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        got = await fetch_media(http, MediaRef("https://wecom.test/ok", aeskey), max_bytes=4096, timeout=1)
        assert got == png()
        for path, says in [("/big", "上限"), ("/slow", "超时"), ("/gone", "HTTP 404")]:
            with pytest.raises(MediaError, match=says):
                await fetch_media(http, MediaRef(f"https://wecom.test{path}", aeskey), max_bytes=4096, timeout=0.2)
        with pytest.raises(MediaError):
            await fetch_media(http, MediaRef("file:///etc/passwd", aeskey), max_bytes=4096, timeout=1)


def test_welcome_text_is_plain() -> None:
    hint = '当前会话\n> 本会话 chat_id：`zhangsan`\n**注意** <font color="warning">引用</font>'
    assert plain_text(hint) == "当前会话\n本会话 chat_id：zhangsan\n注意 引用"


# --- the channel against the fake ----------------------------------------------------------------------------------


@dataclass
class Running:
    channel: AibotChannel
    served: Served
    received: list[IncomingMessage] = field(default_factory=list)

    @property
    def fake(self) -> Any:
        return self.served.fake

    async def connected(self) -> None:
        await until(lambda: self.channel.link.connected, TIMEOUT)

    async def next_message(self, n: int = 1) -> IncomingMessage:
        await until(lambda: len(self.received) >= n, TIMEOUT)
        return self.received[n - 1]


Inbox = Callable[[IncomingMessage], Awaitable[object]]


@asynccontextmanager
async def channel_on(
    served: Served,
    *,
    inbox: Inbox | None = None,
    sessions: Callable[[str], Awaitable[Session | None]] | None = None,
    connect: bool = True,
    **options: Any,
) -> AsyncIterator[Running]:
    opts = AibotOptions(**{"bot_id": BOT, "secret": SECRET, "url": served.url, **FAST, **options})
    async with httpx.AsyncClient(trust_env=False) as http:
        running = Running(AibotChannel(opts, http, sessions=sessions), served)

        async def keep(message: IncomingMessage) -> None:
            running.received.append(message)

        async with asyncio.TaskGroup() as tasks:
            task = tasks.create_task(running.channel.run(inbox or keep))
            try:
                if connect:
                    await running.connected()
                yield running
            finally:
                task.cancel()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serve_fake(config()) as running:
        yield running


@pytest.fixture
async def on(served: Served) -> AsyncIterator[Running]:
    async with channel_on(served) as running:
        yield running


def question(message: str = "要合并这个 PR 吗？", **kw: Any) -> Question:
    values: dict[str, Any] = {"chat_id": "group-1", "short_id": "1a2b3c4d", "project_name": "proj", "card_id": "c" * 32}
    values.update(kw)
    return Question(message=message, **values)


async def test_a_question_is_markdown_with_the_header_on_every_part(on: Running) -> None:
    assert on.channel.health().ok and on.channel.health().fields == {"aibot_connected": True}
    receipt = await on.channel.send_question(question())
    [sent] = on.fake.get_messages("group-1")
    assert (sent.source, sent.msgtype, sent.key, sent.content) == (
        "aibot",
        "markdown",
        BOT,
        "[#1a2b3c4d proj]\n要合并这个 PR 吗？",
    )
    assert receipt.parts == 1

    long = "\n".join(f"第 {i} 行：" + "很长的问题" * 20 for i in range(40))
    receipt = await on.channel.send_question(question(long, chat_id="zhangsan", responders=("lisi",)))
    parts = on.fake.get_messages("zhangsan")
    assert receipt.parts == len(parts) > 1
    assert all(p.content.startswith("[#1a2b3c4d proj] (") and len(p.content.encode()) <= 4096 for p in parts)
    assert parts[-1].content.endswith("（只有 @lisi 可以回答）")


async def test_a_choice_is_a_button_card(on: Running) -> None:
    await on.channel.send_question(question(options=("合并", "不合并"), responders=("lisi",)))
    [card] = on.fake.get_messages("group-1")
    assert card.msgtype == "template_card" and card.task_id == "c" * 32
    assert card.card["card_type"] == "button_interaction"
    assert card.card["main_title"]["title"] == "[#1a2b3c4d proj]"
    assert card.card["sub_title_text"] == "要合并这个 PR 吗？"
    assert [(b["text"], b["key"]) for b in card.card["button_list"]] == [("合并", "0"), ("不合并", "1")]
    assert card.card["horizontal_content_list"] == [{"keyname": "可回答", "value": "lisi"}]

    # A long question: the text as markdown first, then the card; an approval's buttons are 批准 / 拒绝.
    await on.channel.send_question(
        question("请审批：" + "详细说明" * 100, card_id="d" * 32, options=("批准", "拒绝"), approvals_required=2)
    )
    text, approval = on.fake.get_messages("group-1")[1:]
    assert text.msgtype == "markdown" and text.content.startswith("[#1a2b3c4d proj]\n请审批")
    assert approval.card["main_title"]["desc"].startswith("需要 2 人批准")
    assert [b["text"] for b in approval.card["button_list"]] == ["批准", "拒绝"]

    # Seven options do not fit the buttons: the question as markdown, then a vote card (pick one) with a submit.
    seven = tuple(f"方案{i}" for i in range(7))
    await on.channel.send_question(question("选哪个？", card_id="e" * 32, options=seven))
    text, vote = on.fake.get_messages("group-1")[3:]
    assert text.msgtype == "markdown" and text.content == "[#1a2b3c4d proj]\n选哪个？"
    assert vote.card["card_type"] == "vote_interaction" and vote.card["checkbox"]["mode"] == 0
    assert [(o["id"], o["text"]) for o in vote.card["checkbox"]["option_list"]] == [
        (str(i), s) for i, s in enumerate(seven)
    ]
    assert vote.card["submit_button"]["key"] == "submit" and vote.card["main_title"]["title"] == "[#1a2b3c4d proj]"


async def test_what_the_ai_bot_cannot_send_is_refused_in_words(on: Running) -> None:
    with pytest.raises(ChannelError, match="只能发送 JPG 或 PNG"):  # not a picture: refused before anything is sent
        await on.channel.send_question(question(images=("data:image/png;base64,aGVsbG8gd29ybGQ=",)))
    with pytest.raises(ChannelError, match="chat_id"):
        await on.channel.send_question(question(chat_id=None))
    on.fake.aibot.fail_next(93006)
    with pytest.raises(ChannelError, match="93006") as invalid:
        await on.channel.send_question(question())
    assert invalid.value.errcode == 93006 and "chat_id 无效" in str(invalid.value)
    assert on.fake.get_messages() == []


async def test_text_that_cannot_be_utf8_is_an_invalid_message_not_a_lost_link(on: Running) -> None:
    """A lone surrogate (valid in JSON, not in UTF-8) fails the question with the robot client's code for it. The
    API refuses such text at its edge; a card is what carries it this far unchanged."""
    with pytest.raises(ChannelError, match="UTF-8") as invalid:
        await on.channel.send_question(question("合并吗\ud800", options=("合并", "不合并")))
    assert invalid.value.errcode == ERR_INVALID_MESSAGE
    assert on.fake.get_messages() == [] and on.channel.link.connected


async def test_people_are_heard_with_quotes_and_images(on: Running) -> None:
    await on.channel.send_question(question())
    [sent] = on.fake.get_messages("group-1")
    pushed = await on.fake.aibot.push_message(userid="lisi", chat_id="group-1", text="合并吧", quote_seq=sent.seq)
    msg = await on.next_message()
    assert (msg.answer, msg.quoted_short_id, msg.msgid, msg.reply_to) == (
        "合并吧",
        "1a2b3c4d",
        pushed.msgid,
        pushed.req_id,
    )

    picture = png(9, 7)
    await on.fake.aibot.push_message(userid="lisi", chat_type="single", images=[picture])
    msg = await on.next_message(2)
    assert msg.msg_type == "image" and msg.chat_id == "lisi"
    assert msg.image_urls == ["data:image/png;base64," + base64.b64encode(picture).decode()]


async def test_images_that_cannot_be_fetched_are_said(served: Served) -> None:
    async with channel_on(served, image_max_bytes=100) as on:
        await on.fake.aibot.push_message(userid="lisi", chat_id="group-1", text="看图", images=[png(200, 200)])
        msg = await on.next_message()
        assert msg.image_urls == [] and msg.answer.startswith("看图\n（1 张图片没有转交给 AI：")


async def test_notices_answer_the_callback_they_are_about(on: Running) -> None:
    entered = await on.fake.aibot.push_event(userid="wangwu", eventtype="enter_chat")
    msg = await on.next_message()
    await on.channel.send_notice(Notice(chat_id=msg.chat_id, text="本会话 chat_id：`wangwu`", reply_to=msg.reply_to))
    [welcome] = on.fake.get_messages("wangwu")
    assert (welcome.msgtype, welcome.content, welcome.reply_to) == ("text", "本会话 chat_id：wangwu", entered.msgid)

    asked = await on.fake.aibot.push_message(userid="lisi", chat_id="group-1", text="哪个？")
    msg = await on.next_message(2)
    await on.channel.send_notice(Notice(chat_id="group-1", text="**有 2 个问题**", reply_to=msg.reply_to))
    [reply] = on.fake.get_messages("group-1")
    assert (reply.msgtype, reply.content, reply.reply_to, reply.finished) == (
        "stream",
        "**有 2 个问题**",
        asked.msgid,
        True,
    )

    # Too late for a welcome (WeCom's 5 s): the notice goes to the chat instead.
    on.fake.update_config(aibot_reply_window=0.0)
    await on.fake.aibot.push_event(userid="zhaoliu", eventtype="enter_chat")
    msg = await on.next_message(3)
    await on.channel.send_notice(Notice(chat_id=msg.chat_id, text="你好", reply_to=msg.reply_to))
    [late] = on.fake.get_messages("zhaoliu")
    assert (late.msgtype, late.content, late.reply_to) == ("markdown", "你好", None)


async def test_card_updates_keep_the_buttons_while_the_question_is_open(served: Served) -> None:
    sessions: dict[str, Session] = {}

    async def lookup(card_id: str) -> Session | None:
        return sessions.get(card_id)

    async with channel_on(served, sessions=lookup) as on:
        q = question(options=("批准", "拒绝"), approvals_required=2)
        await on.channel.send_question(q)
        sessions[q.card_id or ""] = Session(
            session_id=q.card_id or "",
            short_id="1a2b3c4d",
            message=q.message,
            deadline=0,
            options=["批准", "拒绝"],
            approvals_required=2,
        )
        await on.fake.aibot.click(userid="lisi", task_id=q.card_id or "", event_key="0")
        click = await on.next_message()
        assert click.card is not None and (click.card.task_id, click.card.key) == (q.card_id, "0")
        await on.channel.update_card(
            CardUpdate(q.card_id or "", click.reply_to or "", "[#1a2b3c4d proj]", "已批准 1/2")
        )
        card = on.fake.aibot.card(q.card_id or "")
        assert card.card["main_title"]["desc"] == "已批准 1/2" and len(card.card["button_list"]) == 2

        sessions[q.card_id or ""].status = "replied"
        await on.fake.aibot.click(userid="wangwu", task_id=q.card_id or "", event_key="0")
        click = await on.next_message(2)
        await on.channel.update_card(CardUpdate(q.card_id or "", click.reply_to or "", "[#1a2b3c4d proj]", "✅ 批准了"))
        card = on.fake.aibot.card(q.card_id or "")
        assert card.card["card_type"] == "text_notice" and "button_list" not in card.card
        assert card.card["main_title"] == {"title": "[#1a2b3c4d proj]", "desc": "✅ 批准了"}


# --- the link ------------------------------------------------------------------------------------------------------


async def test_a_dropped_link_comes_back_and_sends_wait_for_it(on: Running) -> None:
    assert await on.fake.aibot.drop()
    await until(lambda: not on.channel.link.connected)
    await on.channel.send_question(question())  # waits for the reconnect, then goes out
    assert on.fake.get_messages("group-1")[0].content.startswith("[#1a2b3c4d proj]")
    assert on.channel.link.connects == 2


async def test_unanswered_pings_mean_a_dead_link(on: Running) -> None:
    on.fake.update_config(aibot_answer_pings=False)
    await until(lambda: not on.channel.link.connected)
    on.fake.update_config(aibot_answer_pings=True)
    await on.connected()
    assert on.channel.link.connects == 2


async def test_wrong_secret_degrades_health_once_in_the_log(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    def attempts() -> int:
        return sum(1 for f in served.fake.aibot.get_frames() if f.direction == "in")

    async with channel_on(served, connect=False, secret="wrong-secret", auth_retry=0.25, send_timeout=0.3) as on:
        await until(lambda: not on.channel.health().ok)
        before = attempts()
        await asyncio.sleep(0.6)
        assert 1 <= attempts() - before <= 3  # the slow retry, not a hot loop
        health = on.channel.health()
        assert "WECOM_AIBOT_SECRET" in (health.reason or "") and health.fields == {"aibot_connected": False}
        with pytest.raises(ChannelError, match="长连接没有建立"):
            await on.channel.send_notice(Notice(chat_id="g", text="x"))
    ours = [r for r in caplog.records if r.name == "hil_server.channels.aibot"]
    failures = [r for r in ours if "authentication failed" in r.getMessage()]
    assert len(failures) == 1 and "853000" in failures[0].getMessage() and failures[0].levelno == logging.ERROR
    assert "wrong-secret" not in caplog.text


async def test_a_takeover_is_not_fought(on: Running, caplog: pytest.LogCaptureFixture) -> None:
    assert await on.fake.aibot.kick()
    await until(lambda: not on.channel.health().ok)
    assert "took the AI bot over" in (on.channel.health().reason or "")
    assert "AI BOT TAKEN OVER" in caplog.text
    await asyncio.sleep(0.3)
    assert not on.fake.aibot.is_connected()  # still off: not fighting
    await on.connected()  # back after the backoff
    assert on.channel.health().ok


async def test_a_store_that_is_down_is_waited_out(served: Served) -> None:
    from hil_server.store import StoreUnavailable

    got: list[IncomingMessage] = []
    failures = [2]

    async def inbox(message: IncomingMessage) -> None:
        if failures[0]:
            failures[0] -= 1
            raise StoreUnavailable("disk full")
        got.append(message)

    async with channel_on(served, inbox=inbox) as on:
        await on.fake.aibot.push_message(userid="lisi", chat_id="group-1", text="在吗")
        await until(lambda: bool(got), TIMEOUT)
        assert got[0].answer == "在吗" and failures == [0]


# --- a stand-in server for frames the fake never sends ----------------------------------------------------------------


@asynccontextmanager
async def stand_in(script: Callable[[ServerConnection], Awaitable[None]]) -> AsyncIterator[str]:
    async def handler(ws: ServerConnection) -> None:
        hello = json.loads(await ws.recv())
        await ws.send(json.dumps({"headers": hello["headers"], "errcode": 0, "errmsg": "ok"}))
        await script(ws)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


async def test_odd_frames_never_end_the_link(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hil_server.channels.aibot")
    click = {"card_type": "button_interaction", "event_key": "0", "task_id": "t" * 32}
    sent = [
        "{not json",
        json.dumps({"cmd": "aibot_msg_callback", "body": msg_body(text={"content": "no req_id"})}),
        json.dumps(frame("aibot_msg_callback", {**msg_body(text={"content": "other bot"}), "aibotid": "other"})),
        json.dumps(frame("aibot_brand_new_cmd", {"x": 1})),
        json.dumps(frame(None, req_id="aibot_send_msg_nobody", errcode=0)),
        json.dumps(frame("aibot_msg_callback", "body is a string")),
        json.dumps(frame("aibot_msg_callback", {"msgid": "m", "msgtype": "text"})),
        "x" * (FRAME_MAX_BYTES + 10),
        json.dumps(frame("aibot_msg_callback", msg_body(text={"content": f"@{ROBOT} 还活着"}), "req-ok")),
        json.dumps(
            frame(
                "aibot_event_callback",
                {
                    **msg_body("event"),
                    "chatid": "other-group",
                    "event": {"eventtype": "template_card_event", "template_card_event": click},
                },
                "req-click",
            )
        ),
    ]

    async def script(ws: ServerConnection) -> None:
        for text in sent:
            await ws.send(text)

    async with stand_in(script) as url, httpx.AsyncClient() as http:
        received: list[IncomingMessage] = []

        async def keep(message: IncomingMessage) -> None:
            received.append(message)

        options = AibotOptions(bot_id=BOT, secret=SECRET, url=url, **FAST)
        channel = AibotChannel(options, http)
        async with asyncio.TaskGroup() as tasks:
            task = tasks.create_task(channel.run(keep))
            await until(lambda: len(received) >= 2, TIMEOUT)
            task.cancel()
    # Only the well-formed callbacks came through (the click is the service's to refuse: another chat's card).
    assert [m.answer for m in received] == ["还活着", ""]
    assert received[1].card is not None and received[1].chat_id == "other-group"
    assert channel.link.connects == 1 and channel.link.bad_frames == 3
    assert "another AI bot" in caplog.text and "unknown cmd 'aibot_brand_new_cmd'" in caplog.text


async def test_a_media_url_httpx_cannot_read_still_delivers_the_message() -> None:
    """httpx refuses a URL with a control character before any request (InvalidURL, no HTTPError): the person's
    words still arrive, with the picture said to be missing."""
    bad = {"msgtype": "image", "image": {"url": "https://wecom.test/\u0000", "aeskey": "A" * 43}}
    items = [{"msgtype": "text", "text": {"content": f"@{ROBOT} 看图"}}, bad]
    body = msg_body("mixed", mixed={"msg_item": items})

    async def script(ws: ServerConnection) -> None:
        await ws.send(json.dumps(frame("aibot_msg_callback", body, "req-img")))

    async with stand_in(script) as url, httpx.AsyncClient() as http:
        received: list[IncomingMessage] = []

        async def keep(message: IncomingMessage) -> None:
            received.append(message)

        channel = AibotChannel(AibotOptions(bot_id=BOT, secret=SECRET, url=url, **FAST), http)
        async with asyncio.TaskGroup() as tasks:
            task = tasks.create_task(channel.run(keep))
            await until(lambda: bool(received), TIMEOUT)
            task.cancel()
    assert received[0].image_urls == [] and received[0].answer.startswith("看图\n（1 张图片没有转交给 AI：")
    assert channel.failed == 0


# --- settings and the app ------------------------------------------------------------------------------------------


def aibot_settings(tmp_path: Any, **kw: Any) -> Any:
    from tests.server_fixtures import settings

    values = {"hil_mode": "auto", "bot_key": None, "wecom_aibot_id": BOT, "wecom_aibot_secret": SECRET}
    return settings(tmp_path, **{**values, **kw})


@pytest.mark.usefixtures("clean_env")
def test_the_channel_is_chosen_by_the_settings(tmp_path: Any) -> None:
    chosen = aibot_settings(tmp_path)
    assert (chosen.channel, chosen.mode) == ("aibot", "direct")
    assert aibot_settings(tmp_path, hil_channel="webhook", bot_key="k").channel == "webhook"
    assert aibot_settings(tmp_path, hil_channel="webhook").channel == "relay"
    assert aibot_settings(tmp_path, wecom_aibot_id=None, bot_key="k").channel == "webhook"
    assert aibot_settings(tmp_path, bot_key="k").channel == "aibot"  # auto: the AI bot when its id is set
    assert SECRET not in repr(chosen.aibot_options()) and SECRET in chosen.secrets()
    with pytest.raises(ValueError, match="WECOM_AIBOT_URL"):
        aibot_settings(tmp_path, wecom_aibot_url="https://openws.work.weixin.qq.com")


@pytest.mark.usefixtures("clean_env")
def test_every_hil_aibot_setting_tunes_the_option_of_its_name(tmp_path: Any) -> None:
    from hil_server.config import ServerSettings

    values: dict[str, Any] = {
        "hil_aibot_ping_interval": 7.0,
        "hil_aibot_missed_pings": 3,
        "hil_aibot_reconnect_min_delay": 0.5,
        "hil_aibot_reconnect_max_delay": 9.0,
        "hil_aibot_auth_retry": 11.0,
        "hil_aibot_takeover_backoff": 12.0,
        "hil_aibot_down_grace": 13.0,
        "hil_aibot_send_timeout": 14.0,
        "hil_aibot_markdown_limit": 2048,
        "hil_aibot_image_max_bytes": 4096,
        "hil_aibot_minute_window": 0.5,
        "hil_aibot_hour_window": 30.0,
        "hil_aibot_upload_timeout": 15.0,
    }
    assert set(values) == {name for name in ServerSettings.model_fields if name.startswith("hil_aibot_")}
    options = aibot_settings(tmp_path, **values).aibot_options()
    assert {name: getattr(options, name.removeprefix("hil_aibot_")) for name in values} == values
    # WeCom's pace is WECOM_AIBOT_MAX_PER_MINUTE / _PER_HOUR.
    paced = aibot_settings(tmp_path, wecom_aibot_max_per_minute=3, wecom_aibot_max_per_hour=0).aibot_options()
    assert (paced.max_per_minute, paced.max_per_hour) == (3, 0)
    # A maximum backoff below the minimum is raised to it.
    backwards = aibot_settings(tmp_path, hil_aibot_reconnect_min_delay=5.0, hil_aibot_reconnect_max_delay=1.0)
    assert backwards.aibot_options().reconnect_max_delay == 5.0


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"wecom_aibot_secret": None}, "WECOM_AIBOT_ID and WECOM_AIBOT_SECRET"),
        ({"hil_channel": "aibot", "wecom_aibot_id": None}, "WECOM_AIBOT_ID and WECOM_AIBOT_SECRET"),
        ({"hil_mode": "relay"}, "unset HIL_MODE=relay"),
    ],
)
def test_bad_combinations_are_one_line_at_start(tmp_path: Any, changes: dict[str, Any], says: str) -> None:
    from hil_server.app import create_app

    with pytest.raises(ValueError, match=says):
        create_app(aibot_settings(tmp_path, **changes))


@pytest.mark.usefixtures("clean_env")
def test_the_app_in_ai_bot_mode_has_no_callback_route_and_says_when_the_link_is_down(tmp_path: Any) -> None:
    from fastapi.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from hil_server.app import create_app
    from tests.helpers import free_port

    app = create_app(
        aibot_settings(
            tmp_path,
            wecom_aibot_url=f"ws://127.0.0.1:{free_port()}",
            hil_aibot_down_grace=0,
            hil_aibot_send_timeout=0.3,
        )
    )
    with TestClient(app) as client:
        for method in ("GET", "POST"):
            response = client.request(method, "/api/callback", json={})
            assert response.status_code == 404 and "long connection" in response.json()["errmsg"]
        health = client.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert (body["status"], body["mode"], body["channel"], body["aibot_connected"]) == (
            "degraded",
            "direct",
            "aibot",
            False,
        )
        assert "long connection has been down" in body["reason"]
        # No worker link either: a "worker" could only forge people's answers.
        with pytest.raises(WebSocketDisconnect), client.websocket_connect("/ws?worker_id=w") as ws:
            ws.send_text(json.dumps({"type": "callback", "data": {"callback_data": {}}}))
        sent = client.post("/api/send", json={"message": "在吗？", "chat_id": "group-1", "timeout": 5}).json()
        assert sent["success"] is False and "长连接没有建立" in sent["error"]
        assert client.get(f"/api/poll/{sent['session_id']}").json()["status"] == "failed"


async def test_another_chats_click_and_quote_change_nothing() -> None:
    """The channel with the real service: a click on a card from another chat, and a quote of a question from
    another chat (frames the fake cannot forge), leave the question waiting."""
    from hil_server.models import SendRequest
    from hil_server.service import HilService, NoMetrics
    from tests.service_helpers import close_service, open_repo

    class Outcomes(NoMetrics):
        def __init__(self) -> None:
            self.seen: list[str] = []

        def callback(self, outcome: Any, matched_by: Any) -> None:
            self.seen.append(outcome)

    pushes: asyncio.Queue[str] = asyncio.Queue()

    async def script(ws: ServerConnection) -> None:
        async def answer() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for raw in ws:
                    sent = json.loads(raw)
                    await ws.send(json.dumps({"headers": sent["headers"], "errcode": 0, "errmsg": "ok"}))

        async def push() -> None:
            while True:
                await ws.send(await pushes.get())

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(answer())
            pusher = tasks.create_task(push())
            await ws.wait_closed()
            pusher.cancel()

    repo, notifier = await open_repo()
    outcomes = Outcomes()
    async with stand_in(script) as url, httpx.AsyncClient() as http:
        channel = AibotChannel(AibotOptions(bot_id=BOT, secret=SECRET, url=url, **FAST), http, sessions=repo.get)
        service = HilService(repo, channel, notifier=notifier, metrics=outcomes)
        async with asyncio.TaskGroup() as tasks:
            running = [tasks.create_task(channel.run(service.handle_message)), tasks.create_task(service.run_notices())]
            await until(lambda: channel.link.connected, TIMEOUT)
            sent = await service.send(SendRequest(message="合并吗？", chat_id="group-a", options=["合并", "不合并"]))
            assert sent.success and sent.session_id
            click = {"card_type": "button_interaction", "event_key": "0", "task_id": sent.session_id}
            event = {"eventtype": "template_card_event", "template_card_event": click}
            elsewhere = {**msg_body("event"), "msgid": "m-click", "chatid": "group-b", "event": event}
            await pushes.put(json.dumps(frame("aibot_event_callback", elsewhere, "req-click")))
            quote = {"msgtype": "text", "text": {"content": f"[#{sent.short_id}]"}}
            text = {**msg_body(text={"content": f"@{ROBOT} 合并"}), "msgid": "m-quote", "chatid": "group-b"}
            await pushes.put(json.dumps(frame("aibot_msg_callback", {**text, "quote": quote}, "req-quote")))
            await until(lambda: len(outcomes.seen) == 2, TIMEOUT)
            assert sorted(outcomes.seen) == ["hint_other_chat", "ignored"]
            for task in running:
                task.cancel()
    session = await service.get(sent.session_id)
    await close_service(service)
    assert session is not None and session.status == "waiting" and session.replies == []
