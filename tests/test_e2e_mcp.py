"""hil-mcp end to end: a real MCP client session over stdio, the real HIL Server (+ worker) and the fake WeCom."""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from tests.helpers import ASK_PARAMETERS, SEED_TOOL_PARAMETERS, parameters
from tests.procs import FakeChat, Stack, ask_then_cancel, mcp_stdio_params, settled_status

pytestmark = pytest.mark.e2e

CHAT = "chatE2E"
PROJECT = "e2e-proj"


def mcp_params(
    stack: Stack, cwd: Path, *, timeout: float = 30, env: dict[str, str] | None = None
) -> StdioServerParameters:
    args = ["--chat-id", CHAT, "--project-name", PROJECT, "--timeout", str(timeout)]
    return mcp_stdio_params(stack.server_url, cwd, *args, env=env)


@asynccontextmanager
async def session(
    stack: Stack, tmp_path: Path, *, reply_timeout: float = 30, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[Client, FakeChat]]:
    cwd = tmp_path / "mcp"
    cwd.mkdir(parents=True, exist_ok=True)
    async with (
        Client(mcp_params(stack, cwd, timeout=reply_timeout, env=env)) as client,
        httpx.AsyncClient(base_url=stack.fake_url, trust_env=False, timeout=30) as http,
    ):
        yield client, FakeChat(http, CHAT)


def structured(result: Any) -> dict[str, Any]:
    assert not result.is_error, result
    assert result.structured_content is not None
    return result.structured_content


async def test_list_tools(stack: Stack, tmp_path: Path) -> None:
    async with session(stack, tmp_path) as (client, _):
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert {"send_and_wait_reply", "send_message_only", "wait_for_reply"} <= set(tools)
    assert parameters(tools["send_and_wait_reply"]) == ASK_PARAMETERS
    assert parameters(tools["send_message_only"]) == SEED_TOOL_PARAMETERS


async def test_send_and_wait_reply_gets_the_quote_reply(stack: Stack, tmp_path: Path) -> None:
    question_text = "要合并这个 PR 吗？"
    outcome: dict[str, Any] = {}
    async with session(stack, tmp_path) as (client, chat), anyio.create_task_group() as tg:

        async def ask() -> None:
            outcome["result"] = await client.call_tool("send_and_wait_reply", {"message": question_text})

        tg.start_soon(ask)
        question, short_id = await chat.question(question_text)
        assert question["content"].startswith(f"[#{short_id} {PROJECT}]")
        await chat.quote_reply(question, "可以，合并吧")

    result = structured(outcome["result"])
    assert result["status"] == "success", result
    assert [r["content"] for r in result["replies"]] == ["可以，合并吧"]
    assert "可以，合并吧" in result["message"]
    assert result["session_id"]
    assert result.get("short_id") in (None, short_id)


async def test_send_message_only_delivers(stack: Stack, tmp_path: Path) -> None:
    async with session(stack, tmp_path) as (client, chat):
        result = structured(await client.call_tool("send_message_only", {"message": "部署完成 ✅"}))
        assert result["status"] == "success", result
        messages = await chat.messages(wait=1)
    assert any("部署完成 ✅" in (m["content"] or "") for m in messages), messages


async def test_cancelled_call_then_wait_for_reply_and_asking_again(stack: Stack, tmp_path: Path) -> None:
    # A short heartbeat, so the first progress notification (the call is waiting) comes quickly.
    async with session(stack, tmp_path, env={"HIL_HEARTBEAT": "0.3"}) as (client, chat):

        async def ask_and_cancel(text: str) -> tuple[dict[str, Any], str]:
            question, short_id = await ask_then_cancel(client, chat, {"message": text})
            # The cancellation reached the MCP server: it told the HIL Server it stopped waiting.
            assert await settled_status(stack.server_url, short_id) == "timeout"
            return question, short_id

        # 1. Cut call, late answer, wait_for_reply() and wait_for_reply(short id) both return it.
        question, short_id = await ask_and_cancel("第一个问题")
        await chat.quote_reply(question, "第一个回答")
        result = structured(await client.call_tool("wait_for_reply", {}))
        assert result["status"] == "success", result
        assert [r["content"] for r in result["replies"]] == ["第一个回答"]
        result = structured(await client.call_tool("wait_for_reply", {"session_id": short_id}))
        assert result["status"] == "success", result
        assert [r["content"] for r in result["replies"]] == ["第一个回答"]

        # 2. Cut call, late answer, the agent asks the same again: the answer comes back, nothing new is posted.
        question, short_id = await ask_and_cancel("第二个问题")
        await chat.quote_reply(question, "第二个回答")
        result = structured(await client.call_tool("send_and_wait_reply", {"message": "第二个问题"}))
        assert result["status"] == "success", result
        assert [r["content"] for r in result["replies"]] == ["第二个回答"]
        assert await chat.count("第二个问题") == 1
        assert await chat.count("第一个问题") == 1


async def test_timeout_returns_the_session_and_names_wait_for_reply(stack: Stack, tmp_path: Path) -> None:
    async with session(stack, tmp_path, reply_timeout=2) as (client, chat):
        started = time.monotonic()
        result = structured(await client.call_tool("send_and_wait_reply", {"message": "没人回答的问题"}))
        elapsed = time.monotonic() - started
        assert await chat.count("没人回答的问题") == 1
    assert result["status"] == "timeout", result
    assert result["session_id"]
    assert result["session_id"] in result["message"]
    assert "wait_for_reply" in result["message"]
    assert 2 <= elapsed < 10
    assert await settled_status(stack.server_url, result["session_id"]) == "timeout"


@pytest.mark.parametrize("stack", ["relay"], indirect=True)
async def test_progress_keeps_a_long_wait_alive(stack: Stack, tmp_path: Path) -> None:
    """Progress goes out at least every HIL_HEARTBEAT seconds (default 9, so "every 10 s" holds; here 0.3 s, so the
    test needs no long wait: the spacing is configuration)."""
    heartbeat = 0.3
    times: list[float] = []
    messages: list[str | None] = []
    outcome: dict[str, Any] = {}

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        times.append(time.monotonic())
        messages.append(message)

    env = {"HIL_HEARTBEAT": str(heartbeat)}
    async with session(stack, tmp_path, env=env) as (client, chat), anyio.create_task_group() as tg:
        started = time.monotonic()

        async def ask() -> None:
            outcome["result"] = await client.call_tool(
                "send_and_wait_reply", {"message": "慢慢回答的问题"}, progress_callback=on_progress
            )
            outcome["done"] = time.monotonic()

        tg.start_soon(ask)
        question, _ = await chat.question("慢慢回答的问题")
        await anyio.sleep(8 * heartbeat)  # the person takes their time
        await chat.quote_reply(question, "终于回答了")

    result = structured(outcome["result"])
    assert result["status"] == "success", result
    assert len(times) >= 6, times
    marks = [started, *times, outcome["done"]]
    gaps = [b - a for a, b in itertools.pairwise(marks)]
    # The first gap includes starting hil-mcp's HTTP client and sending the question.
    assert max(gaps[1:]) <= heartbeat + 0.5, gaps
    assert all(m and "等待回复中" in m for m in messages), messages


async def test_a_new_hil_mcp_asks_for_the_id_and_the_answer_comes_with_it(stack: Stack, tmp_path: Path) -> None:
    """wait_for_reply() without an id in a fresh hil-mcp process (the editor restarted it): it asked nothing yet, and
    the server cannot tell its questions from another agent's, so it asks for the id the timeout result gave."""
    async with session(stack, tmp_path, reply_timeout=1) as (client, chat):
        asked = structured(await client.call_tool("send_and_wait_reply", {"message": "重启前的问题"}))
        assert asked["status"] == "timeout", asked
        assert f'wait_for_reply(session_id="{asked["session_id"]}")' in asked["message"]
        question, _ = await chat.question("重启前的问题")
        await chat.quote_reply(question, "重启后才回答")
    async with session(stack, tmp_path) as (client, _):
        blind = structured(await client.call_tool("wait_for_reply", {}))
        assert blind["status"] == "error" and blind["replies"] == [] and "session_id" in blind["message"], blind
        result = structured(await client.call_tool("wait_for_reply", {"session_id": asked["session_id"]}))
    assert result["status"] == "success", result
    assert [r["content"] for r in result["replies"]] == ["重启后才回答"]


@pytest.mark.parametrize("stack", ["direct"], indirect=True)
async def test_two_hil_mcp_processes_sharing_a_token_never_receive_each_others_answers(
    stack: Stack, tmp_path: Path
) -> None:
    """Issue 18's hole over stdio: two agents of one person (one token, even the same chat and project). X's wait
    ends, Y asks later; each wait_for_reply() without an id gets its own answer, whichever came first."""
    async with (
        session(stack, tmp_path / "x", reply_timeout=1) as (x, chat),
        session(stack, tmp_path / "y", reply_timeout=1) as (y, _),
    ):
        mine = structured(await x.call_tool("send_and_wait_reply", {"message": "X 的问题"}))
        theirs = structured(await y.call_tool("send_and_wait_reply", {"message": "Y 的问题"}))
        assert mine["status"] == theirs["status"] == "timeout"
        y_question, _ = await chat.question("Y 的问题")
        x_question, _ = await chat.question("X 的问题")
        await chat.quote_reply(y_question, "给 Y 的回答")
        # Only Y's answer is in: X keeps waiting on X's own question (and gives up after its 1 s).
        early = structured(await x.call_tool("wait_for_reply", {}))
        assert early["status"] == "timeout" and early["session_id"] == mine["session_id"], early
        assert early["replies"] == [] and "给 Y" not in json.dumps(early, ensure_ascii=False)
        await chat.quote_reply(x_question, "给 X 的回答")
        got_x = structured(await x.call_tool("wait_for_reply", {}))
        got_y = structured(await y.call_tool("wait_for_reply", {}))
    assert got_x["session_id"] == mine["session_id"], got_x
    assert [r["content"] for r in got_x["replies"]] == ["给 X 的回答"], got_x
    assert [r["content"] for r in got_y["replies"]] == ["给 Y 的回答"], got_y


def test_hil_mcp_exits_quietly_when_its_client_goes_away(tmp_path: Path) -> None:
    """The editor closes the pipes while a tool is waiting: exit 0, no BrokenPipe traceback."""
    params = mcp_stdio_params(
        "http://127.0.0.1:9", tmp_path / "mcp", "--poll-interval", "0.1", env={"HIL_HEARTBEAT": "0.1"}
    )
    proc = subprocess.Popen(
        [params.command, *params.args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=params.env,
        cwd=params.cwd,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

    def send(message: dict[str, Any]) -> None:
        proc.stdin.write(json.dumps(message).encode() + b"\n")
        proc.stdin.flush()

    try:
        init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
        send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init})
        assert b'"id":1' in proc.stdout.readline()
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        call = {"name": "wait_for_reply", "arguments": {"session_id": "1a2b3c4d"}, "_meta": {"progressToken": 1}}
        send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call})
        assert b"notifications/progress" in proc.stdout.readline()  # waiting, and writing progress
        proc.stdout.close()  # the client is gone: the next progress notification hits a broken pipe
        time.sleep(0.5)
        proc.stdin.close()
        assert proc.wait(10) == 0
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err and "BrokenPipe" not in err, err


async def test_invalid_bot_key_is_said_in_words_within_2s(stack: Stack, tmp_path: Path) -> None:
    import time

    async with session(stack, tmp_path) as (client, _chat):
        async with httpx.AsyncClient(trust_env=False) as http:
            await http.post(f"{stack.fake_url}/_fake/fail", json={"errcodes": [93000]})
        started = time.monotonic()
        result = structured(await client.call_tool("send_and_wait_reply", {"message": "发得出去吗？"}))
        elapsed = time.monotonic() - started
    assert elapsed < 2, elapsed
    assert result["status"] == "error", result
    assert "93000" in result["message"] and "BOT_KEY" in result["message"]
