"""The AI-bot channel end to end: the fake WeCom with an AI bot and a HIL Server on HIL_CHANNEL=aibot, real
processes on 127.0.0.1; people act through the fake's control API (`/_fake/aibot/*`), the agent through the HTTP
API or a real MCP client over stdio.

One stack serves the tests that only ask and answer (each in its own chat); the link tests start their own."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from websockets.asyncio.client import connect

from hil_protocol.images import to_data_url
from tests.helpers import aibot_chat_page, free_port, png
from tests.procs import Proc, Stack, mcp_stdio_params

pytestmark = pytest.mark.e2e

BOT = "aib-e2e-bot"
SECRET = "aibot-e2e-secret-0123"
ROBOT = "HIL助手"
FAST = {
    "HIL_AIBOT_PING_INTERVAL": "0.5",
    "HIL_AIBOT_RECONNECT_MIN_DELAY": "0.05",
    "HIL_AIBOT_RECONNECT_MAX_DELAY": "0.5",
    "HIL_AIBOT_AUTH_RETRY": "1",
    "HIL_AIBOT_TAKEOVER_BACKOFF": "1.5",
    "HIL_AIBOT_DOWN_GRACE": "1",
}


def aibot_stack(tmp: Path, **env: str) -> Stack:
    stack = Stack(mode="direct", tmp=tmp, fake_args=["--aibot-id", BOT, "--aibot-secret", SECRET])
    stack.server_env = {
        "HIL_CHANNEL": "aibot",
        "WECOM_AIBOT_ID": BOT,
        "WECOM_AIBOT_SECRET": SECRET,
        "WECOM_AIBOT_URL": f"ws://127.0.0.1:{stack.fake_port}",
        **FAST,
        **env,
    }
    return stack


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = aibot_stack(tmp_path_factory.mktemp("aibot-e2e"))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def own(tmp_path: Path) -> Iterator[Stack]:
    stack = aibot_stack(tmp_path)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


class World:
    """The agent (HTTP API) and the people (the fake's control API) around one stack."""

    def __init__(self, stack: Stack, http: httpx.AsyncClient) -> None:
        self.stack = stack
        self.http = http

    async def ask(self, message: str, chat_id: str, **body: Any) -> dict[str, Any]:
        sent = (
            await self.http.post(
                f"{self.stack.server_url}/api/send", json={"message": message, "chat_id": chat_id, **body}
            )
        ).json()
        assert sent["success"], sent
        return sent

    async def poll(self, ref: str, wait: float = 0) -> dict[str, Any]:
        url = f"{self.stack.server_url}/api/poll/{ref}"
        return (await self.http.get(url, params={"wait": wait}, timeout=wait + 10)).json()

    async def messages(self, chat_id: str, n: int = 1, since_seq: int = 0) -> list[dict[str, Any]]:
        """The bot's messages in a chat, once there are at least n after since_seq."""
        params = {"chat_id": chat_id, "since_seq": since_seq, "wait": n, "timeout": 10}
        found = (await self.http.get(f"{self.stack.fake_url}/_fake/messages", params=params, timeout=20)).json()
        assert len(found["messages"]) >= n, found
        return found["messages"]

    async def card(self, session_id: str, updates: int = 1) -> dict[str, Any]:
        """The fake's state of a question's card once it has had at least `updates` updates (a click's update goes
        out after the reply is stored and after any notice, so the poll or the notice can come first)."""
        url = f"{self.stack.fake_url}/_fake/aibot/cards/{session_id}"
        deadline = time.monotonic() + 5
        while True:
            state = (await self.http.get(url)).json()
            if len(state["updates"]) >= updates or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.05)

    async def person(self, path: str, **body: Any) -> dict[str, Any]:
        response = await self.http.post(f"{self.stack.fake_url}/_fake/aibot/{path}", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    async def health(self) -> tuple[int, dict[str, Any]]:
        response = await self.http.get(f"{self.stack.server_url}/health")
        return response.status_code, response.json()

    async def until_health(self, status: int, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            code, body = await self.health()
            if code == status or time.monotonic() > deadline:
                assert code == status, body
                return body
            await asyncio.sleep(0.05)

    async def link_id(self) -> int | None:
        status = (await self.http.get(f"{self.stack.fake_url}/_fake/aibot/status")).json()
        return status["bots"][0]["link_id"]


@asynccontextmanager
async def world(stack: Stack) -> AsyncIterator[World]:
    async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
        yield World(stack, http)


async def test_health_says_the_channel(shared: Stack) -> None:
    async with world(shared) as w:
        code, body = await w.health()
    assert code == 200 and body == {
        "status": "healthy",
        "mode": "direct",
        "channel": "aibot",
        "aibot_connected": True,
    }


async def test_quote_reply_plain_reply_and_several_waiting(shared: Stack) -> None:
    chat = "group-answers"
    async with world(shared) as w:
        first = await w.ask("要合并这个 PR 吗？", chat, project_name="my proj")
        [question] = await w.messages(chat)
        assert question["source"] == "aibot" and question["msgtype"] == "markdown"
        assert question["content"] == f"[#{first['short_id']} my proj]\n要合并这个 PR 吗？"

        second = await w.ask("发布到生产环境吗？", chat)
        # Two waiting: a quote-reply names its question.
        await w.person("message", userid="lisi", chat_id=chat, text="合并吧", quote_seq=question["seq"])
        answered = await w.poll(first["session_id"], wait=10)
        assert answered["status"] == "replied"
        [reply] = answered["replies"]
        assert (reply["content"], reply["matched_by"], reply["answered_by"], reply["chat_id"]) == (
            "合并吧",
            "quote",
            "lisi",
            chat,
        )

        # One waiting: a plain reply is its answer.
        await w.person("message", userid="lisi", chat_id=chat, text="发吧")
        answered = await w.poll(second["session_id"], wait=10)
        assert answered["status"] == "replied" and answered["replies"][0]["matched_by"] == "only_waiting"

        # Several waiting: a plain reply gets the list, as a reply to that message.
        third = await w.ask("第三个问题", chat)
        fourth = await w.ask("第四个问题", chat)
        seq = (await w.messages(chat))[-1]["seq"]
        pushed = await w.person("message", userid="lisi", chat_id=chat, text="好的")
        [hint] = await w.messages(chat, since_seq=seq)
        assert hint["reply_to"] == pushed["msgid"] and "2 个问题" in hint["content"]
        assert third["short_id"] in hint["content"] and fourth["short_id"] in hint["content"]
        assert (await w.poll(third["session_id"]))["status"] == "waiting"


async def test_a_quote_of_another_chats_question_is_not_taken(shared: Stack) -> None:
    async with world(shared) as w:
        asked = await w.ask("只在 A 群问的问题", "group-a")
        [question] = await w.messages("group-a")
        await w.person("message", userid="lisi", chat_id="group-b", text="批准", quote_text=question["content"])
        [hint] = await w.messages("group-b")
        assert "不是在这个会话里提出的" in hint["content"]
        assert (await w.poll(asked["session_id"]))["status"] == "waiting"


async def test_enter_chat_is_welcomed_with_the_chat_id(shared: Stack) -> None:
    async with world(shared) as w:
        pushed = await w.person("event", userid="wangwu", eventtype="enter_chat")
        [welcome] = await w.messages("wangwu")
    assert welcome["msgtype"] == "text" and welcome["reply_to"] == pushed["msgid"]
    assert "本会话 chat_id：wangwu" in welcome["content"] and "`" not in welcome["content"]


async def test_a_click_is_the_choice_and_the_card_says_so(shared: Stack) -> None:
    chat = "group-click"
    async with world(shared) as w:
        asked = await w.ask("合并吗？", chat, options=["合并", "不合并"])
        [card] = await w.messages(chat)
        assert card["msgtype"] == "template_card" and card["task_id"] == asked["session_id"]
        waiting = asyncio.create_task(w.poll(asked["session_id"], wait=10))
        await asyncio.sleep(0.1)
        clicked = time.monotonic()
        await w.person("click", userid="lisi", task_id=asked["session_id"], event_key="0")
        answered = await waiting
        assert answered["status"] == "replied" and answered["choice"] == {"index": 0, "label": "合并"}
        assert answered["replies"][0]["answered_by"] == "lisi" and answered["replies"][0]["via"] == "button"
        state = await w.card(asked["session_id"])
        [update] = state["updates"]
        assert update["ts"] - time.time() + (time.monotonic() - clicked) < 5  # within WeCom's window
        assert state["card"]["card_type"] == "text_notice"
        assert state["card"]["main_title"]["desc"] == "✅ lisi 选择了「合并」"
        metrics = (await w.http.get(f"{shared.server_url}/metrics")).text
        assert 'hil_wecom_sends_total{errcode="0"}' in metrics  # every frame WeCom took, the card update too


async def test_pick_several_by_vote_card_and_by_numbers_in_text(shared: Stack) -> None:
    options = ["前端", "后端", "数据库", "文档"]
    async with world(shared) as w:
        # By card: a vote_interaction card (pick several); the submit carries the ticked option ids.
        asked = await w.ask("这次发布哪些部分？", "group-vote", options=options, multi_select=True)
        text, card = await w.messages("group-vote", 2)
        assert text["msgtype"] == "markdown" and card["card"]["card_type"] == "vote_interaction"
        assert card["card"]["checkbox"]["mode"] == 1 and card["task_id"] == asked["session_id"]
        ticked = [{"question_key": "choice", "option_ids": ["0", "2"]}]
        await w.person("click", userid="lisi", task_id=asked["session_id"], event_key="submit", selected_items=ticked)
        answered = await w.poll(asked["session_id"], wait=10)
        assert answered["status"] == "replied" and answered["choice"] == {"index": 0, "label": "前端"}
        assert answered["choices"] == [{"index": 0, "label": "前端"}, {"index": 2, "label": "数据库"}]
        state = await w.card(asked["session_id"])
        assert state["card"]["main_title"]["desc"] == "✅ lisi 选择了「前端」「数据库」"

        # By text: "1,3"; an out-of-range number first is a clarification, never a partial pick.
        asked = await w.ask("发布哪些？", "group-vote-text", options=options, multi_select=True, allow_text=False)
        await w.messages("group-vote-text", 2)
        await w.person("message", userid="lisi", chat_id="group-vote-text", text="1 5")
        hint = (await w.messages("group-vote-text", 3))[-1]
        assert hint["reply_to"] is not None and "可多选，如 1 3" in hint["content"]
        polled = await w.poll(asked["session_id"])
        assert polled["status"] == "waiting" and polled["choices"] == [] and len(polled["unclear"]) == 1
        await w.person("message", userid="lisi", chat_id="group-vote-text", text="1,3")
        answered = await w.poll(asked["session_id"], wait=10)
        assert answered["status"] == "replied"
        assert [c["label"] for c in answered["choices"]] == ["前端", "数据库"]


async def test_a_question_with_two_images_arrives_as_text_and_two_images(shared: Stack) -> None:
    pictures = [png(), png(rgb=(200, 30, 30))]
    async with world(shared) as w:
        asked = await w.ask("这两张截图哪个对？", "group-images", images=[to_data_url(p) for p in pictures])
        text, *images = await w.messages("group-images", 3)
        assert text["msgtype"] == "markdown" and text["content"].startswith(f"[#{asked['short_id']}]")
        assert [m["msgtype"] for m in images] == ["image", "image"]
        for message, picture in zip(images, pictures, strict=True):
            stored = await w.http.get(f"{shared.fake_url}/_fake/images/{message['image_id']}")
            assert stored.content == picture


async def test_a_burst_of_100_questions_keeps_wecom_pace_in_order_with_no_errcode(tmp_path: Path) -> None:
    # The fake enforces 20 per 0.2 s; the server keeps 20 per 0.25 s (a margin for the link's jitter).
    stack = aibot_stack(tmp_path, WECOM_AIBOT_MAX_PER_MINUTE="20", HIL_AIBOT_MINUTE_WINDOW="0.25")
    stack.fake_args += ["--rate-limit", "20", "--rate-window", "0.2"]
    try:
        stack.start()
        async with world(stack) as w:
            started = time.monotonic()

            async def ask(n: int) -> dict[str, Any]:
                return await w.ask(f"第 {n} 个问题", "group-burst", wait_reply=False)

            sent = []
            for batch in range(0, 100, 20):  # in order per chat: each batch after the last was taken
                sent += await asyncio.gather(*(ask(n) for n in range(batch, batch + 20)))
            elapsed = time.monotonic() - started
            messages = await w.messages("group-burst", 100)
            attempts = (await w.http.get(f"{stack.fake_url}/_fake/attempts")).json()
            status = (await w.http.get(f"{stack.server_url}/status.json")).json()
            page = (await w.http.get(f"{stack.server_url}/status")).text
            metrics = (await w.http.get(f"{stack.server_url}/metrics")).text
        assert status["send_queue"] == 0 and "hil_aibot_send_queue 0.0" in metrics and "发送排队 Send queue" in page
        assert all(s["success"] for s in sent)
        assert [a["errcode"] for a in attempts["attempts"]] == [0] * 100
        assert elapsed >= 4 * 0.25 - 0.05  # 100 at 20 per window: four windows waited
        numbers = [int(m["content"].split("第 ")[1].split(" ")[0]) for m in messages]
        assert sorted(numbers) == list(range(100))
        for batch in range(0, 100, 20):  # batches in the order asked
            assert set(numbers[batch : batch + 20]) == set(range(batch, batch + 20))
    finally:
        stack.stop()


async def test_a_non_responders_click_is_refused_and_the_right_persons_taken(shared: Stack) -> None:
    chat = "group-responders"
    async with world(shared) as w:
        asked = await w.ask("上线吗？", chat, options=["上线", "再等等"], responders=["lisi"])
        [card] = await w.messages(chat)
        await w.person("click", userid="wangwu", task_id=asked["session_id"], event_key="0")
        [notice] = await w.messages(chat, since_seq=card["seq"])
        assert "只有 @lisi 可以回答" in notice["content"]
        state = await w.card(asked["session_id"])
        assert len(state["updates"]) == 1 and len(state["card"]["button_list"]) == 2  # still open
        assert (await w.poll(asked["session_id"]))["status"] == "waiting"

        await w.person("click", userid="lisi", task_id=asked["session_id"], event_key="1")
        answered = await w.poll(asked["session_id"], wait=10)
        assert answered["status"] == "replied" and answered["choice"]["label"] == "再等等"
        assert [r["answered_by"] for r in answered["replies"]] == ["lisi"]


async def test_a_two_person_approval_by_clicks(shared: Stack) -> None:
    chat = "group-approval"
    async with world(shared) as w:
        asked = await w.ask("删除旧数据？", chat, approvals_required=2, responders=["lisi", "wangwu"])
        [card] = await w.messages(chat)
        assert [b["text"] for b in card["card"]["button_list"]] == ["批准", "拒绝"]
        await w.person("click", userid="lisi", task_id=asked["session_id"], event_key="0")
        state = await w.card(asked["session_id"])
        assert state["card"]["main_title"]["desc"] == "已批准 1/2，等待更多批准"
        assert (await w.poll(asked["session_id"]))["status"] == "waiting"

        await w.person("click", userid="wangwu", task_id=asked["session_id"], event_key="0")
        answered = await w.poll(asked["session_id"], wait=10)
        assert answered["status"] == "replied"
        assert answered["approval"]["approved"] is True and answered["approval"]["decided_by"] == ["lisi", "wangwu"]


async def test_an_mcp_client_over_stdio_gets_the_quote_reply(shared: Stack, tmp_path: Path) -> None:
    chat = "group-mcp"
    params = mcp_stdio_params(shared.server_url, tmp_path / "mcp", "--chat-id", chat, "--project-name", "mcp")
    async with world(shared) as w, Client(params) as client:
        call = asyncio.create_task(client.call_tool("send_and_wait_reply", {"message": "可以发布吗？"}))
        [question] = await w.messages(chat)
        assert question["content"].startswith("[#") and question["content"].endswith("mcp]\n可以发布吗？")
        await w.person("message", userid="lisi", chat_id=chat, text="可以", quote_seq=question["seq"])
        result = await asyncio.wait_for(call, 20)
    assert not result.is_error and result.structured_content is not None
    assert result.structured_content["status"] == "success"
    assert [r["content"] for r in result.structured_content["replies"]] == ["可以"]


async def test_request_approval_over_stdio_with_one_click(shared: Stack, tmp_path: Path) -> None:
    chat = "group-approve-mcp"
    params = mcp_stdio_params(shared.server_url, tmp_path / "mcp", "--chat-id", chat)
    async with world(shared) as w, Client(params) as client:
        call = asyncio.create_task(
            client.call_tool("request_approval", {"summary": "部署 v2 到生产", "details": "回滚：v1 镜像仍在"})
        )
        [card] = await w.messages(chat)
        assert [b["text"] for b in card["card"]["button_list"]] == ["批准", "拒绝"]
        await w.person("click", userid="lisi", task_id=card["task_id"], event_key="0")
        result = await asyncio.wait_for(call, 20)
        state = await w.card(card["task_id"])
    assert not result.is_error and result.structured_content is not None
    out = result.structured_content
    assert out["status"] == "success" and out["approved"] is True and out["decided_by"] == ["lisi"]
    # The card now says who decided, and its buttons are gone.
    assert "lisi" in json.dumps(state["card"], ensure_ascii=False) and not state["card"].get("button_list")


async def test_a_dropped_link_reconnects_and_the_next_reply_matches(own: Stack) -> None:
    chat = "group-drop"
    async with world(own) as w:
        asked = await w.ask("断线后还能收到吗？", chat)
        before = await w.link_id()
        assert (await w.person("drop", code=1011))["dropped"]
        for _ in range(200):
            now = await w.link_id()
            if now is not None and now != before:
                break
            await asyncio.sleep(0.02)
        assert now is not None and now != before
        await w.person("message", userid="lisi", chat_id=chat, text="能")
        answered = await w.poll(asked["session_id"], wait=10)
    assert answered["status"] == "replied" and answered["replies"][0]["content"] == "能"
    assert "is down (closed by the other end (code 1011))" in own.procs["server"].log()


async def test_a_second_subscriber_is_not_fought(own: Stack) -> None:
    async with world(own) as w:
        url = f"ws://127.0.0.1:{own.fake_port}"
        async with connect(url) as other:
            await other.send(
                json.dumps(
                    {
                        "cmd": "aibot_subscribe",
                        "headers": {"req_id": "aibot_subscribe_x"},
                        "body": {"bot_id": BOT, "secret": SECRET},
                    }
                )
            )
            assert json.loads(await other.recv())["errcode"] == 0
            body = await w.until_health(503, timeout=5)
            assert "took the AI bot over" in body["reason"] and body["aibot_connected"] is False
            await asyncio.sleep(0.5)
            status = (await w.http.get(f"{own.fake_url}/_fake/aibot/status")).json()["bots"][0]
            assert status["takeovers"] == 1  # the server did not take it back
        await w.until_health(200, timeout=10)  # back after the backoff
    assert "AI BOT TAKEN OVER" in own.procs["server"].log()


async def test_a_wrong_secret_is_a_clear_log_line_and_degraded_health(shared: Stack, tmp_path: Path) -> None:
    port = free_port()
    env = {**shared.server_process_env(), "HIL_PORT": str(port), "WECOM_AIBOT_SECRET": "not-the-secret"}
    env["HIL_DATA_DIR"] = str(tmp_path / "data")
    server = Proc("hil-server-wrong-secret", ["-m", "hil_server.app"], env, tmp_path / "server.log").start()
    try:
        body: dict[str, Any] = {}
        async with httpx.AsyncClient(trust_env=False) as http:
            for _ in range(400):
                try:
                    answer = await http.get(f"http://127.0.0.1:{port}/health")
                    body = answer.json()
                    if answer.status_code == 503:
                        break
                except httpx.HTTPError:
                    pass  # not listening yet
                await asyncio.sleep(0.05)
        assert body["status"] == "degraded" and "WECOM_AIBOT_SECRET" in body["reason"]
        await asyncio.sleep(1.2)  # a retry or two at the slow pace
    finally:
        server.stop()
    log = server.log()
    lines = [line for line in log.splitlines() if "AI bot authentication failed" in line]
    assert len(lines) == 1 and "853000" in lines[0] and "WECOM_AIBOT_SECRET" in lines[0]
    assert "not-the-secret" not in log


async def test_the_sandbox_in_ai_bot_mode_with_a_click_in_the_chat_page(tmp_path: Path) -> None:
    """./hil --aibot as a newcomer sees it: the page is in AI-bot mode by itself, a question with options is a card,
    a click as a chosen person answers it, and the card then says who chose what."""
    from tests.test_cli import start_sandbox, wait_for_banner

    proc = start_sandbox(tmp_path, "--port", "0", "--wecom-port", "0", env={"HIL_CHANNEL": "aibot"})
    try:
        sandbox = wait_for_banner(proc)
        assert "HIL Server (AI-bot mode)" in proc.log() and "智能机器人" in proc.log()
        async with httpx.AsyncClient(trust_env=False, timeout=20) as http:
            health = (await http.get(f"{sandbox.server_url}/health")).json()
            assert (health["channel"], health["aibot_connected"]) == ("aibot", True)
            # A quote-reply over the link answers a question.
            send = f"{sandbox.server_url}/api/send"
            asked = (await http.post(send, json={"message": "沙盒里能问吗？", "chat_id": "sandbox-chat"})).json()
            params = {"chat_id": "sandbox-chat", "wait": 1, "timeout": 10}
            [question] = (await http.get(f"{sandbox.wecom_url}/_fake/messages", params=params)).json()["messages"]
            body = {"chat_id": "sandbox-chat", "userid": "zhangsan", "text": "能", "quote_seq": question["seq"]}
            assert (await http.post(f"{sandbox.wecom_url}/_fake/aibot/message", json=body)).status_code == 200
            answer = (
                await http.get(f"{sandbox.server_url}/api/poll/{asked['session_id']}", params={"wait": 10})
            ).json()
            assert answer["status"] == "replied" and answer["replies"][0]["content"] == "能"
            from tests.test_cli import assert_no_warnings_about_its_own_setup

            assert_no_warnings_about_its_own_setup(proc.log())  # no BOT_KEY, tokens or callbacks it set itself

            # The README's curl flow: /_fake/reply speaks over the long connection, and a click names the button by
            # its text in the chat (no task_id to look up).
            asked = (await http.post(send, json={"message": "curl 能答吗？", "chat_id": "sandbox-chat"})).json()
            [question] = (
                await http.get(f"{sandbox.wecom_url}/_fake/messages", params={**params, "since_seq": question["seq"]})
            ).json()["messages"]
            reply = {"chat_id": "sandbox-chat", "quote": question["content"], "text": "能答"}
            pushed = (await http.post(f"{sandbox.wecom_url}/_fake/reply", json=reply)).json()
            assert pushed["via"] == "aibot" and pushed["userid"] == "zhangsan", pushed
            answer = (
                await http.get(f"{sandbox.server_url}/api/poll/{asked['session_id']}", params={"wait": 10})
            ).json()
            assert answer["status"] == "replied" and answer["replies"][0]["content"] == "能答", answer
            choice = {"message": "发布吗？", "chat_id": "sandbox-chat", "options": ["发布", "等等"]}
            asked = (await http.post(send, json=choice)).json()
            click = {"chat_id": "sandbox-chat", "button": "等等", "userid": "wangwu"}
            clicked = await http.post(f"{sandbox.wecom_url}/_fake/aibot/click", json=click)
            for _ in range(100):  # the card arrives just after /api/send answers
                if clicked.status_code != 404:
                    break
                await asyncio.sleep(0.05)
                clicked = await http.post(f"{sandbox.wecom_url}/_fake/aibot/click", json=click)
            assert clicked.status_code == 200 and clicked.json()["button_text"] == "等等", clicked.text
            answer = (
                await http.get(f"{sandbox.server_url}/api/poll/{asked['session_id']}", params={"wait": 10})
            ).json()
            assert answer["choice"] == {"index": 1, "label": "等等"}, answer
            wrong = await http.post(f"{sandbox.wecom_url}/_fake/reply", json={**reply, "wecom_retries": True})
            assert wrong.status_code == 422 and "/_fake/aibot/message" in wrong.json()["detail"]

            chromium = shutil.which("chromium")
            async_api = pytest.importorskip("playwright.async_api")
            if chromium is None:
                pytest.skip("Chromium is not installed: apt-get install chromium")

            expect: Any = async_api.expect
            async with aibot_chat_page(chromium, f"{sandbox.wecom_url}/#chat=sandbox-chat", "lisi") as chat:
                page = chat.page
                choice = {"message": "要合并这个 PR 吗？", "chat_id": "sandbox-chat", "options": ["合并", "不合并"]}
                asked = (await http.post(send, json=choice)).json()
                cards = page.get_by_test_id("message").filter(has=page.get_by_test_id("card"))
                card = cards.filter(has_text="要合并这个 PR 吗？")
                await expect(card).to_contain_text("要合并这个 PR 吗？")
                await card.get_by_test_id("card-button").filter(has_text="不合并").click()
                poll = f"{sandbox.server_url}/api/poll/{asked['session_id']}"
                answer = (await http.get(poll, params={"wait": 10})).json()
                assert answer["choice"] == {"index": 1, "label": "不合并"}
                assert answer["replies"][0]["answered_by"] == "lisi"
                await expect(card).to_contain_text("✅ lisi 选择了「不合并」")
                # The click shows as the button's text, not its key ("1"); the tag names the AI bot's userid.
                await expect(page.get_by_text("点击了卡片按钮「不合并」")).to_have_count(1)
                await expect(card.get_by_test_id("answered")).to_have_text("✅ 已回答 · lisi：不合并")
                await expect(card.get_by_test_id("card-button")).to_have_count(0)

                # A pick-several question is a vote card: tick two options, submit.
                several = {"message": "发布哪些？", "chat_id": "sandbox-chat", "options": ["前端", "后端", "文档"]}
                asked = (await http.post(send, json={**several, "multi_select": True})).json()
                vote = page.get_by_test_id("card").filter(has=page.get_by_test_id("card-submit"))
                await expect(vote.get_by_test_id("card-option")).to_have_count(3)
                await vote.get_by_test_id("card-option").nth(0).check()
                await vote.get_by_test_id("card-option").nth(2).check()
                await vote.get_by_test_id("card-submit").click()
                poll = f"{sandbox.server_url}/api/poll/{asked['session_id']}"
                answer = (await http.get(poll, params={"wait": 10})).json()
                assert [c["label"] for c in answer["choices"]] == ["前端", "文档"]
                await expect(page.get_by_test_id("card").last).to_contain_text("✅ lisi 选择了「前端」「文档」")
            assert not chat.errors, chat.errors
    finally:
        proc.stop()
