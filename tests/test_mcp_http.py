"""The HIL Server's /mcp: the MCP SDK's own streamable-HTTP client against a real server process (direct mode, the
fake WeCom), in both protocol eras (`auto` = the 2026 per-request protocol, `legacy` = initialize + sessions, what
editors speak today), plus the checks in front of it as an attacker would try them."""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from fastapi.testclient import TestClient
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from hil_server.app import create_app
from hil_server.mcp_endpoint import _is_loopback_host
from tests.helpers import ASK_PARAMETERS, parameters
from tests.procs import FakeChat, Nginx, Stack, ask_then_cancel, settled_status
from tests.server_fixtures import WeCom, settings

HEARTBEAT = 0.2
ORIGIN_OK = "https://ide.example.com"
# tokA may write to chatA (its default: the first listed) and chatB; the others are unrestricted. Each test that
# relies on "the newest open question of this token" has a token of its own, as engineers do.
TOKENS = "tokA=chatA|chatB,tokB=chatB,tokCut,tokCancel,tokFree,tokIds,tokSlow,tokLane,tokProj,tokStray"
LEGACY_VERSION = "2025-11-25"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"HIL_API_TOKENS": TOKENS, "HIL_MCP_HEARTBEAT": str(HEARTBEAT), "HIL_MCP_ALLOWED_ORIGINS": ORIGIN_OK}
    stack = Stack("direct", tmp_path_factory.mktemp("mcp-http"), server_env=env)
    try:
        yield stack.start()
    finally:
        stack.stop()


@pytest.fixture(params=["auto", "legacy"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


@asynccontextmanager
async def mcp_client(
    server: Stack | str,
    token: str | None,
    *,
    mode: str = "auto",
    query: str = "",
    headers: dict[str, str] | None = None,
    read_timeout: float | None = None,
) -> AsyncIterator[Client]:
    """The SDK's client, configured as an editor is: the URL (of the stack's server, or a base URL) and a token."""
    sent = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    timeout = httpx2.Timeout(30, read=300)
    async with httpx2.AsyncClient(headers=sent, timeout=timeout, trust_env=False) as http:
        url = f"{server.server_url if isinstance(server, Stack) else server}/mcp{query}"
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode, read_timeout_seconds=read_timeout) as client:  # type: ignore[arg-type]
            yield client


@asynccontextmanager
async def person(stack: Stack, chat_id: str) -> AsyncIterator[FakeChat]:
    async with httpx.AsyncClient(base_url=stack.fake_url, trust_env=False, timeout=30) as http:
        yield FakeChat(http, chat_id)


def structured(result: Any) -> dict[str, Any]:
    assert not result.is_error, result
    assert result.structured_content is not None
    return result.structured_content


async def poll(stack: Stack, token: str, ref: str, wait: float = 0) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False, timeout=wait + 10) as http:
        response = await http.get(
            f"{stack.server_url}/api/poll/{ref}", params={"wait": wait}, headers={"Authorization": f"Bearer {token}"}
        )
        return response.json()


async def ask_and_answer(
    client: Client, chat: FakeChat, text: str, answer: str, arguments: dict[str, Any] | None = None, **kw: Any
) -> dict[str, Any]:
    """Call send_and_wait_reply; the person quote-replies once the question is in the chat."""
    outcome: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:

        async def ask() -> None:
            outcome["result"] = await client.call_tool(
                "send_and_wait_reply", {"message": text, **(arguments or {})}, **kw
            )

        tg.start_soon(ask)
        question, _ = await chat.question(text)
        await chat.quote_reply(question, answer)
    return structured(outcome["result"])


# --- the tools over /mcp ---------------------------------------------------------------------------------------------


async def test_list_tools_with_output_schemas(remote: Stack, mode: str) -> None:
    async with mcp_client(remote, "tokFree", mode=mode) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == {
        "send_and_wait_reply",
        "request_approval",
        "send_message_only",
        "wait_for_reply",
        "permission_prompt",  # Claude Code's --permission-prompt-tool (mcp_server/gate_tool.py)
    }
    assert parameters(tools["send_and_wait_reply"]) == ASK_PARAMETERS
    output = tools["send_and_wait_reply"].output_schema
    assert output is not None and {"status", "replies", "message", "session_id", "short_id"} <= set(
        output["properties"]
    )


async def test_ask_and_the_person_answers_in_the_tokens_default_chat(remote: Stack, mode: str) -> None:
    text = f"要合并这个 PR 吗？({mode})"
    async with mcp_client(remote, "tokA", mode=mode) as client, person(remote, "chatA") as chat:
        result = await ask_and_answer(client, chat, text, "可以，合并吧")
    assert result["status"] == "success", result
    assert [r["content"] for r in result["replies"]] == ["可以，合并吧"]
    assert result["replies"][0]["from_user"]["userid"]
    assert "可以，合并吧" in result["message"]
    assert len(result["session_id"]) == 32 and len(result["short_id"]) == 8
    # The session belongs to tokA: its token polls it, another does not see it.
    assert (await poll(remote, "tokA", result["session_id"]))["status"] == "replied"
    assert (await poll(remote, "tokB", result["session_id"]))["status"] == "not_found"


async def test_chat_id_in_the_url_and_in_the_call(remote: Stack) -> None:
    async with mcp_client(remote, "tokA", query="?chat_id=chatB&project_name=url-proj") as client:
        async with person(remote, "chatB") as chat:
            result = await ask_and_answer(client, chat, "URL 里的会话", "好")
            question, _ = await chat.question("URL 里的会话")
            assert question["content"].startswith("[#") and " url-proj]" in question["content"].split("\n")[0]
        assert result["status"] == "success", result
        # A chat the token may not write to, given in the call: refused, nothing sent.
        refused = structured(await client.call_tool("send_message_only", {"message": "越权", "chat_id": "chatX"}))
    assert refused["status"] == "error" and "chatA" in refused["message"], refused
    async with person(remote, "chatX") as chat:
        assert await chat.count("越权") == 0


async def test_send_message_only(remote: Stack) -> None:
    async with mcp_client(remote, "tokFree") as client, person(remote, "chat-notice") as chat:
        result = structured(
            await client.call_tool("send_message_only", {"message": "部署完成 ✅", "chat_id": "chat-notice"})
        )
        assert result == {"status": "success", "message": "Message delivered to WeCom."}
        assert await chat.count("部署完成 ✅") == 1


async def test_progress_at_the_configured_spacing(remote: Stack, mode: str) -> None:
    times: list[float] = []
    values: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        times.append(time.monotonic())
        values.append(progress)
        assert message and "等待回复中" in message

    text = f"慢慢回答 ({mode})"
    async with mcp_client(remote, "tokFree", mode=mode) as client, person(remote, "chat-progress") as chat:
        outcome: dict[str, Any] = {}
        async with anyio.create_task_group() as tg:

            async def ask() -> None:
                arguments = {"message": text, "chat_id": "chat-progress"}
                outcome["result"] = await client.call_tool(
                    "send_and_wait_reply", arguments, progress_callback=on_progress
                )
                outcome["done"] = time.monotonic()

            tg.start_soon(ask)
            question, _ = await chat.question(text)
            started = time.monotonic()
            await anyio.sleep(6 * HEARTBEAT)
            await chat.quote_reply(question, "好了")
    assert structured(outcome["result"])["status"] == "success"
    assert all(b > a for a, b in itertools.pairwise(values)), values
    marks = [started, *[t for t in times if t > started], outcome["done"]]
    gaps = [b - a for a, b in itertools.pairwise(marks)]
    assert len(gaps) >= 5 and max(gaps) <= HEARTBEAT + 0.3, gaps


async def test_progress_every_10_s_with_the_default_heartbeat(tmp_path: Path) -> None:
    """One real run with the shipped default (HIL_MCP_HEARTBEAT 9 s): the person answers after ~11.5 s."""
    stack = Stack("direct", tmp_path, server_env={"HIL_API_TOKENS": "tokD"}).start()
    times: list[float] = []
    try:

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            times.append(time.monotonic())

        async with mcp_client(stack, "tokD") as client, person(stack, "chat-slow") as chat:
            outcome: dict[str, Any] = {}
            async with anyio.create_task_group() as tg:

                async def ask() -> None:
                    arguments = {"message": "十秒以上才回答", "chat_id": "chat-slow"}
                    outcome["result"] = await client.call_tool(
                        "send_and_wait_reply", arguments, progress_callback=on_progress
                    )
                    outcome["done"] = time.monotonic()

                started = time.monotonic()
                tg.start_soon(ask)
                question, _ = await chat.question("十秒以上才回答")
                await anyio.sleep(11.5)
                await chat.quote_reply(question, "久等了")
    finally:
        stack.stop()
    assert structured(outcome["result"])["status"] == "success"
    gaps = [b - a for a, b in itertools.pairwise([started, *times, outcome["done"]])]
    assert len(times) >= 2 and max(gaps) <= 10, gaps


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
async def test_through_the_nginx_sample(remote: Stack, tmp_path: Path) -> None:
    """deploy/nginx-hil.conf passes /mcp as it must for SSE: progress arrives as it is sent (no buffering) and the
    answer comes back; the token check and the Origin check still hold behind the proxy."""
    nginx = Nginx(tmp_path, remote.server_port).start()
    try:
        times: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            times.append(time.monotonic())

        async with mcp_client(nginx.url, "tokFree") as client, person(remote, "chat-nginx") as chat:
            arguments = {"chat_id": "chat-nginx"}
            outcome: dict[str, Any] = {}
            async with anyio.create_task_group() as tg:

                async def ask() -> None:
                    outcome["result"] = await client.call_tool(
                        "send_and_wait_reply", {"message": "经过 nginx", **arguments}, progress_callback=on_progress
                    )

                tg.start_soon(ask)
                question, _ = await chat.question("经过 nginx")
                started = time.monotonic()
                await anyio.sleep(5 * HEARTBEAT)
                await chat.quote_reply(question, "收到")
        assert structured(outcome["result"])["status"] == "success"
        gaps = [b - a for a, b in itertools.pairwise([started, *[t for t in times if t > started]])]
        assert len(gaps) >= 4 and max(gaps) <= HEARTBEAT + 0.3, gaps
        async with httpx.AsyncClient(base_url=nginx.url, trust_env=False) as http:
            refused = await http.post("/mcp", headers=ACCEPT, json=INIT)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            foreign = ACCEPT | {"Authorization": "Bearer tokFree", "Origin": "https://evil.example.com"}
            assert (await http.post("/mcp", headers=foreign, json=INIT)).status_code == 403
    finally:
        nginx.stop()


# --- cut streams, cancels, and coming back --------------------------------------------------------------------------


async def legacy_session(http: httpx.AsyncClient, url: str, token: str) -> dict[str, str]:
    """Open a handshake-era MCP session by hand; returns the headers its requests carry."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    init = {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
    response = await http.post(
        url, headers=headers, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}
    )
    assert response.status_code == 200, response.text
    headers |= {"Mcp-Session-Id": response.headers["mcp-session-id"], "Mcp-Protocol-Version": LEGACY_VERSION}
    response = await http.post(url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert response.status_code == 202, response.text
    return headers


async def test_a_cut_stream_is_a_cancelled_wait_and_wait_for_reply_gets_the_answer(remote: Stack) -> None:
    url = f"{remote.server_url}/mcp"
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http, person(remote, "chat-cut") as chat:
        headers = await legacy_session(http, url, "tokCut")
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {
                "name": "send_and_wait_reply",
                "arguments": {"message": "网断了的问题", "chat_id": "chat-cut"},
                "_meta": {"progressToken": 2},
            },
        }
        async with http.stream("POST", url, headers=headers, json=call) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data:") and "notifications/progress" in line:
                    break  # waiting: now the network goes away (the connection is closed, not the MCP session)
        question, short_id = await chat.question("网断了的问题")
        # The server noticed: the agent is no longer waiting, the question stays open.
        assert await settled_status(remote.server_url, short_id, "tokCut") == "timeout"
        await chat.quote_reply(question, "断线后才回答")
        # The agent comes back on a new connection of the same MCP session: its one open question, without an id.
        result = await raw_call(http, url, headers, "wait_for_reply", {})
        assert result["status"] == "success", result
        assert [r["content"] for r in result["replies"]] == ["断线后才回答"]
        assert result["short_id"] == short_id
        again = await raw_call(http, url, headers, "wait_for_reply", {})
    assert again["status"] == "error" and "No open question" in again["message"], again
    # Another conversation of the same token (no session) does not take it without an id either.
    async with mcp_client(remote, "tokCut") as client:
        other = structured(await client.call_tool("wait_for_reply", {}))
    assert other["status"] == "error" and other["replies"] == [], other


async def raw_call(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], tool: str, arguments: dict[str, Any]
) -> dict[str, Any]:
    """tools/call on a handshake-era session by hand; the structured result."""
    call = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}
    response = await http.post(url, headers=headers, json=call)
    assert response.status_code == 200, response.text
    for line in response.text.splitlines():
        if line.startswith("data:") and '"id":9' in line.replace(" ", ""):
            return json.loads(line[5:])["result"]["structuredContent"]
    raise AssertionError(response.text)


async def test_a_cancelled_call_then_wait_for_reply_by_id(remote: Stack, mode: str) -> None:
    text = f"取消的问题 ({mode})"
    async with mcp_client(remote, "tokCancel", mode=mode) as client, person(remote, "chat-cancel") as chat:
        question, short_id = await ask_then_cancel(client, chat, {"message": text, "chat_id": "chat-cancel"})
        assert await settled_status(remote.server_url, short_id, "tokCancel") == "timeout"
        await chat.quote_reply(question, "取消后才回答")
        result = structured(await client.call_tool("wait_for_reply", {"session_id": f"#{short_id}"}))
    assert result["status"] == "success", result
    assert [r["content"] for r in result["replies"]] == ["取消后才回答"]


async def test_wait_for_reply_times_out_and_says_how_to_continue(remote: Stack) -> None:
    # A client without sessions: its lane is its token with the chat and project of its URL.
    async with mcp_client(remote, "tokSlow", query="?chat_id=chat-slow") as client:
        sent = await anyio.to_thread.run_sync(
            lambda: httpx.post(
                f"{remote.server_url}/api/send",
                json={"message": "没人回答", "chat_id": "chat-slow"},
                headers={"Authorization": "Bearer tokSlow"},
                timeout=30,
            ).json()
        )
        started = time.monotonic()
        result = structured(await client.call_tool("wait_for_reply", {"timeout": 1}))
    assert 1 <= time.monotonic() - started < 5
    assert result["status"] == "timeout" and result["session_id"] == sent["session_id"]
    assert "wait_for_reply" in result["message"]


# --- two agents sharing one token: each in its own lane ---


async def test_two_mcp_sessions_sharing_a_token_never_receive_each_others_answers(remote: Stack) -> None:
    """The hole of issue 18: X's wait ends, X calls wait_for_reply() without an id while Y (same token) has a newer
    question; X must get X's answer, never Y's."""
    async with (
        mcp_client(remote, "tokLane", mode="legacy") as x,
        mcp_client(remote, "tokLane", mode="legacy") as y,
        person(remote, "chat-lane") as chat,
    ):
        x_question, _ = await ask_then_cancel(x, chat, {"message": "X 的问题", "chat_id": "chat-lane"})
        y_question, _ = await ask_then_cancel(y, chat, {"message": "Y 的问题", "chat_id": "chat-lane"})
        await chat.quote_reply(y_question, "给 Y 的回答")
        await chat.quote_reply(x_question, "给 X 的回答")
        got_x = structured(await x.call_tool("wait_for_reply", {}))
        got_y = structured(await y.call_tool("wait_for_reply", {}))
        # A third conversation of the token (no session, same chat) takes neither without an id.
        async with mcp_client(remote, "tokLane", query="?chat_id=chat-lane") as z:
            got_z = structured(await z.call_tool("wait_for_reply", {}))
    assert [r["content"] for r in got_x["replies"]] == ["给 X 的回答"], got_x
    assert [r["content"] for r in got_y["replies"]] == ["给 Y 的回答"], got_y
    assert got_z["status"] == "error" and got_z["replies"] == [], got_z


async def test_a_session_id_on_a_request_without_sessions_claims_no_lane(remote: Stack) -> None:
    """The 2026 protocol has no sessions: an Mcp-Session-Id sent with it is not checked by the SDK, so it must not
    make the caller the owner of that session's questions."""
    url = f"{remote.server_url}/mcp"
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http, person(remote, "chat-stray") as chat:
        headers = await legacy_session(http, url, "tokStray")
        arguments = {"message": "会话里的问题", "chat_id": "chat-stray"}
        params = {"name": "send_and_wait_reply", "arguments": arguments, "_meta": {"progressToken": 2}}
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": params}
        async with http.stream("POST", url, headers=headers, json=call) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:") and "notifications/progress" in line:
                    break  # asked and waiting: the agent of that session goes away for now
        question, _ = await chat.question("会话里的问题")
        await chat.quote_reply(question, "只给那个会话")
    stray = {"Mcp-Session-Id": headers["Mcp-Session-Id"]}
    async with mcp_client(remote, "tokStray", query="?chat_id=chat-stray", headers=stray) as client:
        result = structured(await client.call_tool("wait_for_reply", {}))
    assert result["status"] == "error" and result["replies"] == [] and result["open_questions"] == [], result
    assert "只给那个会话" not in json.dumps(result, ensure_ascii=False)


async def test_two_clients_without_sessions_keep_to_their_project(remote: Stack) -> None:
    async with (
        mcp_client(remote, "tokProj", query="?chat_id=chat-proj&project_name=projX") as x,
        mcp_client(remote, "tokProj", query="?chat_id=chat-proj&project_name=projY") as y,
        person(remote, "chat-proj") as chat,
    ):
        x_question, _ = await ask_then_cancel(x, chat, {"message": "X 项目的问题"})
        y_question, _ = await ask_then_cancel(y, chat, {"message": "Y 项目的问题"})
        await chat.quote_reply(y_question, "Y 项目的回答")
        await chat.quote_reply(x_question, "X 项目的回答")
        got_x = structured(await x.call_tool("wait_for_reply", {}))
        got_y = structured(await y.call_tool("wait_for_reply", {}))
        again = structured(await x.call_tool("wait_for_reply", {}))
    assert [r["content"] for r in got_x["replies"]] == ["X 项目的回答"], got_x
    assert [r["content"] for r in got_y["replies"]] == ["Y 项目的回答"], got_y
    assert again["status"] == "error" and again["replies"] == [], again


async def test_several_open_questions_are_listed_not_guessed(remote: Stack) -> None:
    async with mcp_client(remote, "tokProj", query="?chat_id=chat-list&project_name=listed") as client:
        async with person(remote, "chat-list") as chat:
            for text in ("第一个问题", "第二个问题"):
                await ask_then_cancel(client, chat, {"message": text})
            listed = structured(await client.call_tool("wait_for_reply", {}))
    assert listed["status"] == "error" and listed["replies"] == [], listed
    assert [q["preview"] for q in listed["open_questions"]] == ["第一个问题", "第二个问题"]
    assert all(q["project_name"] == "listed" for q in listed["open_questions"])
    assert "wait_for_reply(session_id=" in listed["message"]


def test_the_newest_route_of_old_clients_never_guesses(remote: Stack) -> None:
    """GET /api/session/newest (hil-mcp 0.3 after a restart): one question → it; several → 409 with the list."""
    headers = {"Authorization": "Bearer tokProj"}
    url = remote.server_url

    def send(text: str, project: str) -> dict[str, Any]:
        body = {"message": text, "chat_id": "chat-old", "project_name": project}
        return httpx.post(f"{url}/api/send", json=body, headers=headers, trust_env=False, timeout=30).json()

    def newest(**params: str) -> httpx.Response:
        return httpx.get(f"{url}/api/session/newest", params=params, headers=headers, trust_env=False)

    first = send("旧客户端的问题", "old1")
    one = newest(chat_id="chat-old", project_name="old1")
    assert one.status_code == 200 and one.json()["session_id"] == first["session_id"]
    second = send("另一个旧客户端的问题", "old2")
    # A chat without a project names the questions asked without one: none here.
    assert newest(chat_id="chat-old").status_code == 404
    unfiltered = newest()
    assert unfiltered.status_code == 409, unfiltered.text
    assert {q["project_name"] for q in unfiltered.json()["open"]} >= {"old1", "old2"}
    assert newest(chat_id="chat-old", project_name="old2").json()["session_id"] == second["session_id"]
    # Another token's filters find nothing of this token's.
    other = httpx.get(
        f"{url}/api/session/newest",
        params={"chat_id": "chat-old", "project_name": "old2"},
        headers={"Authorization": "Bearer tokFree"},
        trust_env=False,
    )
    assert other.status_code == 404 and second["session_id"] not in other.text


# --- another token's questions ---------------------------------------------------------------------------------------


async def test_another_tokens_question_is_invisible(remote: Stack) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        response = await http.post(
            f"{remote.server_url}/api/send",
            json={"message": "tokA 的问题", "chat_id": "chatB"},
            headers={"Authorization": "Bearer tokA"},
        )
    mine = response.json()
    assert mine["success"], mine
    async with mcp_client(remote, "tokB") as client:
        for ref in (mine["session_id"], mine["short_id"], f"#{mine['short_id']}"):
            result = structured(await client.call_tool("wait_for_reply", {"session_id": ref, "timeout": 1}))
            assert result["status"] == "error" and "no longer on the HIL Server" in result["message"], result
            assert "tokA 的问题" not in json.dumps(result, ensure_ascii=False)
        newest = structured(await client.call_tool("wait_for_reply", {}))
    assert newest["status"] == "error" and "No open question" in newest["message"], newest
    # tokB's looking did not touch it: still waiting for tokA.
    assert (await poll(remote, "tokA", mine["session_id"]))["status"] == "waiting"


async def test_a_session_id_opened_with_another_token_is_not_found(remote: Stack) -> None:
    url = f"{remote.server_url}/mcp"
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        headers = await legacy_session(http, url, "tokA")
        list_tools = {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}
        assert (await http.post(url, headers=headers, json=list_tools)).status_code == 200
        stolen = headers | {"Authorization": "Bearer tokB"}
        assert (await http.post(url, headers=stolen, json=list_tools)).status_code == 404


# --- attacks on the arguments ----------------------------------------------------------------------------------------


async def test_image_paths_are_refused_over_mcp(remote: Stack) -> None:
    async with mcp_client(remote, "tokFree") as client, person(remote, "chat-images") as chat:
        for tool in ("send_and_wait_reply", "send_message_only"):
            arguments = {"message": "看图", "chat_id": "chat-images", "image_paths": ["/etc/passwd"]}
            result = await client.call_tool(tool, arguments)
            assert result.is_error, result
            assert "cannot read them" in result.content[0].text and "nothing was sent" in result.content[0].text
            assert "root:" not in json.dumps(result.model_dump(), ensure_ascii=False)
        assert await chat.messages() == []


@pytest.mark.parametrize("ref", ["../../status.json", "1A2B3C4D", "1a2b3c4", "zzzzzzzz", "#", "0" * 33, "１a2b3c4d"])
async def test_malformed_ids_are_refused_over_mcp(remote: Stack, ref: str) -> None:
    async with mcp_client(remote, "tokIds") as client:
        result = await client.call_tool("wait_for_reply", {"session_id": ref})
    assert result.is_error, result
    assert "session_id must be" in result.content[0].text


# --- the checks in front of /mcp -------------------------------------------------------------------------------------

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}
ACCEPT = {"Accept": "application/json, text/event-stream"}


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", "Bearer", "Basic dG9rQTp4", "tokA", "Bearer tokA=chatA", "Bearer tokAx"]
)
def test_missing_or_wrong_token_is_401_before_any_mcp(remote: Stack, authorization: str | None) -> None:
    headers = ACCEPT | ({"Authorization": authorization} if authorization else {})
    for method, body in (("POST", INIT), ("GET", None), ("DELETE", None)):
        response = httpx.request(method, f"{remote.server_url}/mcp", headers=headers, json=body, trust_env=False)
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert "Authorization: Bearer" in error or "API token" in error
        # A remote client is told about its header, not about hil-mcp's stdio flag.
        assert "--api-token" not in error and "header" in error, error


async def test_the_sdk_client_with_a_wrong_token_fails(remote: Stack) -> None:
    with pytest.raises(ExceptionGroup) as caught:
        async with mcp_client(remote, "wrong") as client:
            await client.list_tools()
    assert caught.group_contains(MCPError)


def test_no_stream_outside_a_call(remote: Stack) -> None:
    """The standalone GET stream is refused with 405 (as the spec allows): this server sends nothing outside a call,
    and a held GET per session would cost memory for nothing."""
    headers = {"Accept": "text/event-stream", "Authorization": "Bearer tokFree"}
    response = httpx.get(f"{remote.server_url}/mcp", headers=headers, trust_env=False)
    assert response.status_code == 405 and response.headers["allow"] == "POST, DELETE"


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("https://evil.example.com", 403),
        ("null", 403),
        ("http://localhost:3000", 403),  # a page on the agent's machine, but this server is not on it
        ("https://ide.example.com.evil.com", 403),
        (ORIGIN_OK, 200),
        (ORIGIN_OK + "/", 200),
    ],
)
def test_an_origin_from_another_site_is_refused(remote: Stack, origin: str, status: int) -> None:
    headers = ACCEPT | {"Authorization": "Bearer tokFree", "Origin": origin, "Host": "hil.example.com"}
    response = httpx.post(f"{remote.server_url}/mcp", headers=headers, json=INIT, trust_env=False)
    assert response.status_code == status, response.text
    if status == 403:
        assert "HIL_MCP_ALLOWED_ORIGINS" in response.json()["error"]


def test_a_loopback_origin_on_a_loopback_host_is_allowed(remote: Stack) -> None:
    # A local tool (e.g. an MCP inspector page on localhost) talking to a server on this machine.
    headers = ACCEPT | {"Authorization": "Bearer tokFree", "Origin": "http://localhost:6274"}
    response = httpx.post(f"{remote.server_url}/mcp", headers=headers, json=INIT, trust_env=False)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("query", "status", "words"),
    [
        ("?chat_id=chatX", 403, "chatA"),  # not one of tokA's chats
        ("?chat_id=chatA%0A", 422, "chat_id"),  # chat ids are a full match: no trailing newline
        ("?chat_id=" + "c" * 200, 422, "chat_id"),
        ("?project_name=%5Bfake%5D", 422, "project_name"),
    ],
)
def test_a_bad_chat_or_project_in_the_url_is_refused(remote: Stack, query: str, status: int, words: str) -> None:
    headers = ACCEPT | {"Authorization": "Bearer tokA"}
    response = httpx.post(f"{remote.server_url}/mcp{query}", headers=headers, json=INIT, trust_env=False)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


# --- no tokens configured: loopback only (unit, with a fake client address) ------------------------------------------


@pytest.fixture
def open_server(tmp_path: Path, wecom: WeCom, clean_env: None) -> Iterator[Any]:
    def build(client: tuple[str, int], base_url: str) -> TestClient:
        return TestClient(create_app(settings(tmp_path)), client=client, base_url=base_url)

    yield build


@pytest.mark.parametrize(
    ("client", "base_url", "extra", "allowed"),
    [
        (("127.0.0.1", 5000), "http://127.0.0.1:8081", {}, True),
        (("::1", 5000), "http://localhost:8081", {}, True),
        (("127.0.0.1", 5000), "http://127.0.0.1:8081", {"Origin": "http://localhost:6274"}, True),
        (("203.0.113.7", 5000), "http://127.0.0.1:8081", {}, False),  # another machine
        (("10.0.0.5", 5000), "http://hil.internal:8081", {}, False),
        (("127.0.0.1", 5000), "http://hil.example.com", {}, False),  # through a proxy on this machine (nginx)
        (("127.0.0.1", 5000), "http://127.0.0.1:8081", {"X-Forwarded-For": "203.0.113.7"}, False),
        (("127.0.0.1", 5000), "http://127.0.0.1:8081", {"Forwarded": "for=203.0.113.7"}, False),
        (("127.0.0.1", 5000), "http://rebind.evil.com:8081", {"Origin": "http://rebind.evil.com:8081"}, False),
        (("127.0.0.1", 5000), "http://127.0.0.1:8081", {"Origin": "https://evil.example.com"}, False),
    ],
)
def test_without_tokens_only_loopback_clients(
    open_server: Any, client: tuple[str, int], base_url: str, extra: dict[str, str], allowed: bool
) -> None:
    with open_server(client, base_url) as http:
        response = http.post("/mcp", headers=ACCEPT | extra, json=INIT)
    if allowed:
        assert response.status_code == 200, response.text
        assert "mcp-session-id" in response.headers
    else:
        assert response.status_code == 403, response.text


def test_without_tokens_the_start_warns_about_mcp(open_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"), open_server(("127.0.0.1", 1), "http://127.0.0.1:8081"):
        pass
    assert any("/mcp answers only clients on this machine" in r.getMessage() for r in caplog.records)


def test_the_app_can_run_its_lifespan_again(tmp_path: Path, wecom: WeCom, clean_env: None) -> None:
    # An MCP session manager runs once; /mcp builds one per lifespan, so an app started twice serves it twice.
    app = create_app(settings(tmp_path))
    for _ in range(2):
        with TestClient(app, client=("127.0.0.1", 1), base_url="http://127.0.0.1:8081") as http:
            assert http.post("/mcp", headers=ACCEPT, json=INIT).status_code == 200


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1:8081", True),
        ("localhost", True),
        ("LOCALHOST:1", True),
        ("[::1]:8081", True),
        ("127.0.0.2", True),
        ("localhost.evil.com", False),
        ("127.0.0.1.evil.com:80", False),
        ("evil.com:127.0.0.1", False),
        ("[::1].evil.com", False),
        ("", False),
    ],
)
def test_loopback_host_names(host: str, local: bool) -> None:
    assert _is_loopback_host(host) is local


def test_each_tokens_default_chat_is_its_first() -> None:
    from hil_server.auth import parse_tokens

    defaults = {token.decode(): grant.default_chat for token, grant in parse_tokens(TOKENS)}
    assert defaults["tokA"] == "chatA" and defaults["tokB"] == "chatB" and defaults["tokFree"] is None


# --- latency ---------------------------------------------------------------------------------------------------------


async def test_accepted_connections_have_nagle_off() -> None:
    """The servers' listening socket says TCP, so asyncio sets TCP_NODELAY on every accepted connection; without it
    each keep-alive response body waited ~40 ms for the client's delayed ACK (a JSON tool result over /mcp, a poll)."""
    import asyncio
    import socket

    from hil_protocol.cli import bind

    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    sock = bind("127.0.0.1", 0, "test", "--port")
    server = await asyncio.start_server(connected, sock=sock)
    async with server:
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        nodelay = await asyncio.wait_for(accepted, 5)
        writer.close()
    assert nodelay == 1


# --- sessions: one token cannot lock the others out --------------------------------------------------------------

CAP_TOKENS = "tokHog,tokOther,tokThird,tokLate,tokMax"


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Small limits: 2 sessions per token, 5 in all, and 1 s for the longest single tool call."""
    env = {
        "HIL_API_TOKENS": CAP_TOKENS,
        "HIL_MCP_SESSIONS_PER_TOKEN": "2",
        "HIL_MCP_MAX_SESSIONS": "5",
        "HIL_MCP_MAX_CALL": "1",
        "HIL_MCP_HEARTBEAT": "0.2",
    }
    stack = Stack("direct", tmp_path_factory.mktemp("mcp-capped"), server_env=env)
    try:
        yield stack.start()
    finally:
        stack.stop()


async def alive(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> int:
    list_tools = {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}
    return (await http.post(url, headers=headers, json=list_tools)).status_code


async def test_a_token_past_its_cap_closes_its_own_oldest_session_and_locks_nobody_out(capped: Stack) -> None:
    url = f"{capped.server_url}/mcp"
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        hog = [await legacy_session(http, url, "tokHog") for _ in range(8)]
        # Only its two most recent sessions are left; the others answer 404 (the spec's "open a new session").
        assert [await alive(http, url, h) for h in hog] == [404] * 6 + [200] * 2
        other = [await legacy_session(http, url, "tokOther") for _ in range(2)]
        assert [await alive(http, url, h) for h in other] == [200, 200]
        assert (await http.get(f"{capped.server_url}/health")).status_code == 200
        # The hog's use of a session keeps it: the one it used last survives its next opening.
        assert await alive(http, url, hog[-2]) == 200
        hog.append(await legacy_session(http, url, "tokHog"))
        assert [await alive(http, url, h) for h in hog[-3:]] == [200, 404, 200]
        # Requests that open nothing close nothing: a stray POST without a session, a client without sessions.
        stray = {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}
        no_session = ACCEPT | {"Authorization": "Bearer tokHog"}
        assert (await http.post(url, headers=no_session, json=stray)).status_code >= 400
        async with mcp_client(capped, "tokHog") as modern:
            await modern.list_tools()
        assert [await alive(http, url, h) for h in (hog[-3], hog[-1])] == [200, 200]
        for headers in (*hog[-3:], *other):
            await http.delete(url, headers=headers)


async def test_a_full_server_says_so_with_503_and_health_recovers(capped: Stack) -> None:
    url = f"{capped.server_url}/mcp"
    health = f"{capped.server_url}/health"
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        opened: list[dict[str, str]] = []
        try:
            await fill_and_recover(http, url, health, opened)
        finally:
            for headers in opened:  # the next tests need room
                await http.delete(url, headers=headers)


async def fill_and_recover(http: httpx.AsyncClient, url: str, health: str, opened: list[dict[str, str]]) -> None:
    """Fill /mcp to its total (5), see 503 and /health 503, then recover; `opened` collects what to close."""
    for token in ("tokHog", "tokHog", "tokOther", "tokOther", "tokThird"):
        opened.append(await legacy_session(http, url, token))
    refused = await http.post(url, headers=ACCEPT | {"Authorization": "Bearer tokLate"}, json=INIT)
    assert refused.status_code == 503, refused.text
    assert "/mcp is full" in refused.json()["error"] and "HIL_MCP_MAX_SESSIONS" in refused.json()["error"]
    down = await http.get(health)
    assert down.status_code == 503 and down.json()["status"] == "degraded"
    assert "/mcp is full" in down.json()["reason"]
    # A token at its own cap still gets a session: it gives up its own oldest, nobody else's.
    opened.append(await legacy_session(http, url, "tokOther"))
    assert await alive(http, url, opened[2]) == 404 and await alive(http, url, opened[4]) == 200
    # One session ends: the server takes new ones again and says it is healthy.
    assert (await http.delete(url, headers=opened[4])).status_code in (200, 204)
    assert (await http.get(health)).status_code == 200
    opened.append(await legacy_session(http, url, "tokLate"))


# --- the longest single call --------------------------------------------------------------------------------------


async def test_a_client_that_cuts_calls_gets_waiting_first_then_the_answer(capped: Stack, mode: str) -> None:
    """A client that cuts a call after 4 s (as TypeScript-SDK clients do at 60 s, progress or not), against a server
    whose longest single call is 1 s: the call returns "waiting" in time, and wait_for_reply then gets the answer."""
    text = f"慢慢想 ({mode})"
    async with (
        mcp_client(capped, "tokMax", mode=mode, read_timeout=4) as client,
        person(capped, "chat-max") as chat,
    ):
        first = structured(await client.call_tool("send_and_wait_reply", {"message": text, "chat_id": "chat-max"}))
        assert first["status"] == "waiting", first
        assert f'wait_for_reply(session_id="{first["session_id"]}")' in first["message"]
        question, _ = await chat.question(text)
        # Still waiting for the person: not marked as abandoned.
        assert (await poll(capped, "tokMax", first["session_id"]))["status"] == "waiting"
        await chat.quote_reply(question, "想好了")
        assert await settled_status(capped.server_url, first["session_id"], "tokMax") == "replied"
        # Answered between two calls: the caller's one open question, so no id is needed.
        done = structured(await client.call_tool("wait_for_reply", {}))
    assert done["status"] == "success" and [r["content"] for r in done["replies"]] == ["想好了"], done


# --- Claude Code's --permission-prompt-tool over /mcp -------------------------------------------------------------


async def test_permission_prompt_over_mcp(remote: Stack) -> None:
    """The gate's tool at /mcp: one text block; a risky call asks in the token's chat, 本会话都允许 covers the rest of
    the MCP session; the server's own files are never read for a diff."""
    import json

    import anyio

    risky = {"tool_name": "Bash", "input": {"command": "git push origin main"}, "tool_use_id": "t1"}
    async with mcp_client(remote, "tokA") as client, person(remote, "chatA") as chat:
        safe = await client.call_tool("permission_prompt", {"tool_name": "Read", "input": {"file_path": "/etc/hosts"}})
        assert safe.structured_content is None and len(safe.content) == 1
        assert json.loads(safe.content[0].text) == {"behavior": "allow", "updatedInput": {"file_path": "/etc/hosts"}}
        outcome: dict[str, Any] = {}
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:

                async def ask() -> None:
                    outcome["first"] = await client.call_tool("permission_prompt", risky)

                tg.start_soon(ask)
                question, _ = await chat.question("git push origin main")
                assert "3. 本会话都允许" in question["content"]
                await chat.quote_reply(question, "3")
        assert json.loads(outcome["first"].content[0].text)["behavior"] == "allow"
        again = await client.call_tool("permission_prompt", {**risky, "tool_use_id": "t2"})
        assert json.loads(again.content[0].text) == {"behavior": "allow", "updatedInput": risky["input"]}
        assert await chat.count("git push origin main") == 1
