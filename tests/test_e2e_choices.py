"""Choices and approvals end to end in a text chat (the webhook robot, direct mode): a real MCP client over stdio,
the real HIL Server and the fake WeCom, where people answer with a number, a label or 批准/拒绝. (The AI bot's
buttons: tests/test_e2e_aibot.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.procs import FakeChat, Stack, mcp_stdio_params

pytestmark = pytest.mark.e2e

CHAT = "chatChoice"


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(mode="direct", tmp=tmp_path_factory.mktemp("choices"))
    try:
        yield stack.start()
    finally:
        stack.stop()


@asynccontextmanager
async def agent(
    stack: Stack, tmp_path: Path, chat_id: str = CHAT, project: str = "choices"
) -> AsyncIterator[tuple[Client, FakeChat]]:
    """A real MCP client over stdio asking in `chat_id`, and the fake WeCom's view of that chat."""
    params = mcp_stdio_params(stack.server_url, tmp_path / "mcp", "--chat-id", chat_id, "--project-name", project)
    async with (
        Client(params) as client,
        httpx.AsyncClient(base_url=stack.fake_url, trust_env=False, timeout=30) as http,
    ):
        yield client, FakeChat(http, chat_id)


async def asked(stack: Stack, chat: FakeChat, text: str) -> tuple[dict[str, Any], str]:
    """The question carrying `text`, once it is in the chat and the server has taken it as sent. A plain reply to a
    question still `sending` is not an answer (by design), and people here answer within milliseconds of seeing it,
    faster than the server hears WeCom's OK when the machine is busy."""
    question, short_id = await chat.question(text)
    with anyio.fail_after(10):
        while True:
            status = (await chat.http.get(f"{stack.server_url}/status.json")).json()
            if any(w["short_id"] == short_id for w in status["waiting"]):
                return question, short_id
            await anyio.sleep(0.02)


async def reply_as(chat: FakeChat, userid: str, name: str, text: str) -> None:
    response = await chat.http.post(
        "/_fake/reply", json={"chat_id": chat.chat_id, "text": text, "from_user": {"userid": userid, "name": name}}
    )
    response.raise_for_status()


async def call(client: Client, tool: str, arguments: dict[str, Any], act: Any) -> dict[str, Any]:
    """Call `tool` and, while it waits, let `act()` play the people in the chat."""
    outcome: dict[str, Any] = {}
    with anyio.fail_after(60):  # a lost answer fails the test here, not after the tool's 10-minute timeout
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                outcome["result"] = await client.call_tool(tool, arguments)

            tg.start_soon(run)
            await act()
    result = outcome["result"]
    assert not result.is_error, result
    return result.structured_content


async def test_a_choice_by_number_over_stdio(direct: Stack, tmp_path: Path) -> None:
    async with agent(direct, tmp_path) as (client, chat):

        async def person() -> None:
            question, _ = await asked(direct, chat, "合并这个 PR 吗？")
            lines = question["content"].splitlines()
            assert "1. 合并" in lines and "2. 不合并" in lines
            assert any("回复数字或选项文字" in line for line in lines)
            await reply_as(chat, "zhangsan", "张三", "２")  # a full-width digit

        result = await call(
            client, "send_and_wait_reply", {"message": "合并这个 PR 吗？", "options": ["合并", "不合并"]}, person
        )
    assert result["status"] == "success"
    assert result["choice"] == {"index": 1, "label": "不合并"}
    assert result["replies"][0]["answered_by"] == "zhangsan"


async def test_request_approval_with_a_reply_1(direct: Stack, tmp_path: Path) -> None:
    async with agent(direct, tmp_path) as (client, chat):

        async def person() -> None:
            question, _ = await asked(direct, chat, "部署 v1.4 到生产")
            assert "1. 批准" in question["content"] and "2. 拒绝" in question["content"]
            await reply_as(chat, "zhangsan", "张三", "1")

        result = await call(
            client, "request_approval", {"summary": "部署 v1.4 到生产", "details": "影响：全部用户"}, person
        )
    assert result["status"] == "success" and result["approved"] is True
    assert result["decided_by"] == ["zhangsan"]


async def test_a_non_responder_is_refused_and_two_people_approve(direct: Stack, tmp_path: Path) -> None:
    async with agent(direct, tmp_path) as (client, chat):

        async def people() -> None:
            question, short_id = await asked(direct, chat, "删除旧数据库")
            await reply_as(chat, "zhangsan", "张三", "批准")  # not a responder
            notices = [m for m in await chat.messages(question["seq"], wait=1) if "只有" in (m["content"] or "")]
            assert notices and "@lisi" in notices[0]["content"] and short_id in notices[0]["content"]
            await reply_as(chat, "lisi", "李四", "同意")
            await reply_as(chat, "lisi", "李四", "同意")  # the same person twice counts once
            status = (await chat.http.get(f"{direct.server_url}/api/poll/{short_id}")).json()
            assert status["status"] == "waiting" and status["approval"]["approvals"] == 1
            await reply_as(chat, "wangwu", "王五", "批准，备份已确认")

        result = await call(
            client,
            "request_approval",
            {"summary": "删除旧数据库", "responders": ["lisi", "wangwu"], "approvals_required": 2},
            people,
        )
    assert result["approved"] is True and result["decided_by"] == ["lisi", "wangwu"]
    assert result["comment"] == "备份已确认"
    async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
        status = (await http.get(f"{direct.server_url}/status.json")).json()
    assert any(r["outcome"].startswith("refused") and "zhangsan" in (r["by"] or "") for r in status["recent"])


async def test_one_rejection_decides_with_its_comment(direct: Stack, tmp_path: Path) -> None:
    async with agent(direct, tmp_path) as (client, chat):

        async def person() -> None:
            await asked(direct, chat, "合并到 main")
            await reply_as(chat, "lisi", "李四", "拒绝，先跑测试")

        result = await call(client, "request_approval", {"summary": "合并到 main", "approvals_required": 2}, person)
    assert result["approved"] is False and result["decided_by"] == ["lisi"] and result["comment"] == "先跑测试"


async def test_an_unclear_reply_is_asked_again_and_kept_then_a_clear_one_decides(direct: Stack, tmp_path: Path) -> None:
    """The reported misreading, replayed: "好的，先不要" on an approval is no 批准. The chat is asked again, the reply
    stays on the question as unclear (not an answer), and the person's "批准" then decides."""
    async with agent(direct, tmp_path) as (client, chat):

        async def person() -> None:
            question, short_id = await asked(direct, chat, "上线 v2.0")
            await reply_as(chat, "zhangsan", "张三", "好的，先不要")
            with anyio.fail_after(10):
                while not (
                    said := [m for m in await chat.messages(question["seq"], wait=1) if "没看懂" in m["content"]]
                ):
                    pass
            assert said[0]["content"] == f"#{short_id} 没看懂，请回复 1 批准 或 2 拒绝（可在后面附上说明）。"
            status = (await chat.http.get(f"{direct.server_url}/api/poll/{short_id}")).json()
            assert status["status"] == "waiting" and status["replies"] == [] and status["choice"] is None
            assert [r["content"] for r in status["unclear"]] == ["好的，先不要"]
            assert status["approval"]["approved"] is None and status["approval"]["approvals"] == 0
            await reply_as(chat, "zhangsan", "张三", "批准")

        result = await call(client, "request_approval", {"summary": "上线 v2.0"}, person)
    assert result["status"] == "success" and result["approved"] is True and result["decided_by"] == ["zhangsan"]
    assert [r["content"] for r in result["replies"]] == ["批准"]  # the raw text reaches the agent


async def test_a_quote_reply_to_an_emoji_project_name_matches(direct: Stack, tmp_path: Path) -> None:
    project = "👨\u200d💻 dev"  # an emoji joined by ZWJ: taken, shown in the header, and found again in a quote
    async with httpx.AsyncClient(base_url=direct.fake_url, trust_env=False, timeout=30) as http:
        chat = FakeChat(http, CHAT)
        ask = {"message": "合并 emoji 分支？", "chat_id": CHAT, "project_name": project, "approvals_required": 1}
        sent = (await http.post(f"{direct.server_url}/api/send", json=ask)).json()
        assert sent["success"] is True, sent
        question, short_id = await asked(direct, chat, "合并 emoji 分支？")
        assert question["content"].startswith(f"[#{short_id} {project}]")
        await chat.quote_reply(question, "拒绝，先跑测试")
        status = (await http.get(f"{direct.server_url}/api/poll/{short_id}", params={"wait": 10})).json()
    assert status["status"] == "replied" and status["approval"]["approved"] is False
    assert status["approval"]["comment"] == "先跑测试" and status["replies"][0]["matched_by"] == "quote"


async def test_over_mcp_an_unclear_refusal_is_asked_again_and_the_clear_one_decides(direct: Stack) -> None:
    """The same over the server's /mcp (no tokens: a loopback client): "ok, reject" decides nothing."""
    async with (
        httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=120), trust_env=False) as http2,
        Client(streamable_http_client(f"{direct.server_url}/mcp", http_client=http2)) as client,  # type: ignore[arg-type]
        httpx.AsyncClient(base_url=direct.fake_url, trust_env=False, timeout=30) as http,
    ):
        chat = FakeChat(http, CHAT)

        async def person() -> None:
            question, short_id = await asked(direct, chat, "删除 staging 库")
            await reply_as(chat, "lisi", "李四", "ok, reject")
            with anyio.fail_after(10):
                while not [m for m in await chat.messages(question["seq"], wait=1) if "没看懂" in m["content"]]:
                    pass
            status = (await http.get(f"{direct.server_url}/api/poll/{short_id}")).json()
            assert status["status"] == "waiting" and [r["content"] for r in status["unclear"]] == ["ok, reject"]
            await reply_as(chat, "lisi", "李四", "拒绝，先备份")

        arguments = {"summary": "删除 staging 库", "chat_id": CHAT}
        result = await call(client, "request_approval", arguments, person)
    assert result["approved"] is False and result["decided_by"] == ["lisi"] and result["comment"] == "先备份"
    assert [r["content"] for r in result["replies"]] == ["拒绝，先备份"]
