"""hil-mcp's tools, in process: an MCP client on the server object, the HIL Server's HTTP API mocked with respx."""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import respx
from mcp import Client
from mcp.types import Implementation

from mcp_server.__main__ import main, parse_args
from mcp_server.backend import BackendError
from mcp_server.client import HilClient
from mcp_server.config import McpSettings
from mcp_server.server import create_server
from tests.helpers import ASK_PARAMETERS, SEED_TOOL_PARAMETERS, parameters

BASE = "http://hil.test"
# A 1x1 PNG.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


@dataclass
class Session:
    session_id: str
    short_id: str
    body: dict[str, Any]
    replies: list[dict[str, Any]] = field(default_factory=list)
    status: str = "waiting"
    event: anyio.Event = field(default_factory=anyio.Event)


class FakeHil:
    """The HIL Server's HTTP API on a respx router; `honour_wait=False` plays a seed server without long-poll."""

    def __init__(self, router: respx.MockRouter, *, honour_wait: bool = True) -> None:
        self.honour_wait = honour_wait
        self.sessions: dict[str, Session] = {}
        self.poll_faults: list[Exception | int] = []
        self._asked: anyio.Event | None = None
        self.send = router.post("/api/send").mock(side_effect=self._send)
        self.poll = router.get(path__regex=r"^/api/poll/(?P<ref>[^/]+)$").mock(side_effect=self._poll)
        self.timeout = router.post(path__regex=r"^/api/session/(?P<ref>[^/]+)/timeout$").mock(side_effect=self._timeout)
        self.upload = router.post("/api/upload-image").respond(
            json={"success": True, "image_url": "data:image/png;base64,AAAA"}
        )
        self.newest = router.get("/api/session/newest").mock(side_effect=self._newest)

    def find(self, ref: str) -> Session | None:
        return next((s for s in self.sessions.values() if ref in (s.session_id, s.short_id)), None)

    def answer(self, session: Session | str, text: str) -> None:
        session = self.find(session) if isinstance(session, str) else session
        assert session is not None
        session.replies.append(
            {
                "msg_type": "text",
                "content": text,
                "image_url": None,
                "from_user": {"userid": "u1", "name": "张三", "alias": "zhangsan"},
                "timestamp": time.time(),
            }
        )
        session.status = "replied"
        session.event.set()

    async def next_question(self) -> Session:
        """The oldest question still waiting, once there is one."""
        while (session := next((s for s in self.sessions.values() if s.status == "waiting"), None)) is None:
            self._asked = self._asked or anyio.Event()
            await self._asked.wait()
        return session

    def sent_bodies(self) -> list[dict[str, Any]]:
        return [json.loads(call.request.content) for call in self.send.calls]

    def _send(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if not body.get("wait_reply", True):
            return httpx.Response(200, json={"success": True, "message": "消息已发送"})
        session = Session(secrets.token_hex(16), secrets.token_hex(4), body)
        self.sessions[session.session_id] = session
        if self._asked is not None:
            self._asked.set()
            self._asked = None
        return httpx.Response(
            200,
            json={
                "success": True,
                "session_id": session.session_id,
                "short_id": session.short_id,
                "message": "消息已发送",
            },
        )

    async def _poll(self, request: httpx.Request, ref: str) -> httpx.Response:
        if self.poll_faults:
            fault = self.poll_faults.pop(0)
            if isinstance(fault, Exception):
                raise fault
            return httpx.Response(fault, json={"detail": "unavailable"})
        session = self.find(ref)
        if session is None:
            return httpx.Response(
                200,
                json={
                    "session_id": ref,
                    "status": "not_found",
                    "has_reply": False,
                    "replies": [],
                    "message": "会话不存在或已过期",
                },
            )
        wait = float(request.url.params.get("wait", 0))
        if self.honour_wait and wait and not session.replies:
            with anyio.move_on_after(wait):
                await session.event.wait()
        return httpx.Response(
            200,
            json={
                "session_id": session.session_id,
                "short_id": session.short_id,
                "status": "replied" if session.replies else session.status,
                "has_reply": bool(session.replies),
                "replies": session.replies,
                "message": "",
            },
        )

    def _newest(self, request: httpx.Request) -> httpx.Response:
        found = [s for s in self.sessions.values() if s.status in ("waiting", "timeout")]
        if not found:
            return httpx.Response(404, json={"success": False, "message": "no open question"})
        return httpx.Response(200, json={"session_id": found[-1].session_id, "short_id": found[-1].short_id})

    def _timeout(self, request: httpx.Request, ref: str) -> httpx.Response:
        session = self.find(ref)
        if session is None:
            return httpx.Response(200, json={"success": False, "message": "会话不存在或已过期"})
        if session.status == "waiting":
            session.status = "timeout"
        return httpx.Response(200, json={"success": True})


def settings(**overrides: Any) -> McpSettings:
    values: dict[str, Any] = {
        "service_url": BASE,
        "chat_id": "c1",
        "timeout": 5,
        "poll_interval": 0.01,
        "heartbeat_interval": 1,
    }
    values.update(overrides)
    return McpSettings(**values)


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
def hil(router: respx.MockRouter) -> FakeHil:
    return FakeHil(router)


@asynccontextmanager
async def connect(*, client_name: str | None = None, **overrides: Any) -> AsyncIterator[Client]:
    info = Implementation(name=client_name, version="1") if client_name else None
    async with Client(create_server(settings(**overrides)), client_info=info) as client:
        yield client


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result
    assert result.structured_content is not None
    return result.structured_content


async def answer_when_asked(hil: FakeHil, text: str, after: float = 0.0) -> None:
    """Play the person: wait for the next question, then answer it `after` seconds later."""
    session = await hil.next_question()
    await anyio.sleep(after)
    hil.answer(session, text)


async def answer_later(hil: FakeHil, ref: str, text: str, after: float) -> None:
    await anyio.sleep(after)
    hil.answer(ref, text)


# --- the tools' surface ---


async def test_list_tools_has_the_four_tools_with_their_parameters(hil: FakeHil) -> None:
    async with connect() as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert {"send_and_wait_reply", "request_approval", "send_message_only", "wait_for_reply"} <= set(tools)
    assert parameters(tools["send_message_only"]) == SEED_TOOL_PARAMETERS
    assert parameters(tools["send_and_wait_reply"]) == ASK_PARAMETERS
    for name in ("send_and_wait_reply", "send_message_only"):
        assert tools[name].input_schema["required"] == ["message"]
        assert tools[name].description
    approval = tools["request_approval"]
    assert set(approval.input_schema["properties"]) == {
        "summary",
        "details",
        "chat_id",
        "project_name",
        "responders",
        "approvals_required",
    }
    assert approval.input_schema["required"] == ["summary"]
    assert {"approved", "decided_by", "comment", "session_id", "short_id"} <= set(approval.output_schema["properties"])
    assert "choice" in tools["send_and_wait_reply"].output_schema["properties"]
    schema = tools["wait_for_reply"].input_schema
    assert set(schema["properties"]) == {"session_id", "timeout"}
    assert not schema.get("required")
    # The timeout is the server's configuration, not the model's argument.
    assert "timeout" not in tools["send_and_wait_reply"].input_schema["properties"]
    # Descriptions as written, without the docstring's indentation.
    for tool in tools.values():
        text, _, args = (tool.description or "").partition("\nArgs:\n")
        assert text and args, tool.description
        assert not any(line.startswith(" ") for line in text.splitlines()), text
        assert all(line.startswith("    ") and not line.startswith("     ") for line in args.splitlines()[:1]), args


async def test_a_chosen_option_reads_as_one_sentence(hil: FakeHil, router: respx.MockRouter) -> None:
    # A button click carries no text: no double space, no empty quote, just the choice.
    async def choose(request: httpx.Request, ref: str) -> httpx.Response:
        session = hil.find(ref)
        assert session is not None
        body = {"session_id": session.session_id, "short_id": session.short_id, "status": "replied"}
        click = {"msg_type": "text", "content": "", "from_user": {"userid": "u1"}}
        return httpx.Response(200, json=body | {"replies": [click], "choice": {"index": 1, "label": "不合并"}})

    router.get(path__regex=r"^/api/poll/(?P<ref>[^/]+)$").mock(side_effect=choose)
    async with connect() as client:
        result = await call(client, "send_and_wait_reply", message="合并吗", options=["合并", "不合并"])
    assert result["message"] == 'The person answered. They chose "不合并" (option 2).'
    assert result["choice"] == {"index": 1, "label": "不合并"}


# --- send_and_wait_reply ---


async def test_send_and_wait_reply_posts_then_long_polls_until_the_answer(hil: FakeHil) -> None:
    async with connect(timeout=30, heartbeat_interval=5) as client, anyio.create_task_group() as tg:
        tg.start_soon(answer_when_asked, hil, "可以合并", 0.05)
        result = await call(client, "send_and_wait_reply", message="要合并吗", project_name="proj")

    assert hil.sent_bodies() == [
        {"message": "要合并吗", "chat_id": "c1", "project_name": "proj", "timeout": 30.0, "wait_reply": True}
    ]
    session = next(iter(hil.sessions.values()))
    assert result["status"] == "success"
    assert result["session_id"] == session.session_id
    assert [r["content"] for r in result["replies"]] == ["可以合并"]
    assert "可以合并" in result["message"]
    # One long-poll held until the answer came: no busy polling against a server that holds requests.
    polls = [call.request.url for call in hil.poll.calls]
    assert all(url.path == f"/api/poll/{session.session_id}" for url in polls)
    assert all(float(url.params["wait"]) > 0 for url in polls)
    assert len(polls) == 1
    assert not hil.timeout.called


async def test_chat_id_argument_overrides_the_configured_chat(hil: FakeHil) -> None:
    async with connect() as client, anyio.create_task_group() as tg:
        tg.start_soon(answer_when_asked, hil, "ok")
        await call(client, "send_and_wait_reply", message="q", chat_id="other-chat")
    assert hil.sent_bodies()[0]["chat_id"] == "other-chat"
    assert "project_name" not in hil.sent_bodies()[0]


@pytest.mark.parametrize("service_url", ["http://hil.test/api", "http://hil.test/", "http://hil.test/api/"])
async def test_service_url_with_api_or_slash_hits_the_same_urls(hil: FakeHil, service_url: str) -> None:
    async with connect(service_url=service_url) as client, anyio.create_task_group() as tg:
        tg.start_soon(answer_when_asked, hil, "ok")
        result = await call(client, "send_and_wait_reply", message="q")
    assert result["status"] == "success"
    assert str(hil.send.calls.last.request.url) == "http://hil.test/api/send"
    session_id = result["session_id"]
    assert hil.poll.calls.last.request.url.path == f"/api/poll/{session_id}"
    assert hil.poll.calls.last.request.url.host == "hil.test"


async def test_server_refusing_the_send_is_an_error_with_its_text(router: respx.MockRouter) -> None:
    router.post("/api/send").respond(
        json={"success": False, "message": "发送失败", "error": "WeCom errcode 93000: invalid webhook url"}
    )
    poll = router.get(path__regex=r"^/api/poll/")
    async with connect() as client:
        result = await call(client, "send_and_wait_reply", message="q")
    assert result["status"] == "error"
    assert "invalid webhook url" in result["message"]
    assert result["replies"] == []
    assert not poll.called


async def test_unreachable_server_says_so_and_names_service_url(router: respx.MockRouter) -> None:
    router.post("/api/send").mock(side_effect=httpx.ConnectError("Connection refused"))
    async with connect() as client:
        result = await call(client, "send_and_wait_reply", message="q")
        only = await call(client, "send_message_only", message="done")
    for outcome in (result, only):
        assert outcome["status"] == "error"
        assert "cannot reach the HIL Server" in outcome["message"]
        assert "--service-url" in outcome["message"]
        assert BASE in outcome["message"]


async def test_retryable_poll_errors_are_retried_until_the_answer(hil: FakeHil) -> None:
    hil.poll_faults = [httpx.ConnectError("refused"), 503, httpx.ConnectError("refused"), 502]
    async with connect() as client, anyio.create_task_group() as tg:
        tg.start_soon(answer_when_asked, hil, "好的")
        result = await call(client, "send_and_wait_reply", message="q")
    assert result["status"] == "success"
    assert result["replies"][0]["content"] == "好的"
    assert hil.poll.call_count >= 5
    assert hil.send.call_count == 1


async def test_a_server_that_ignores_wait_still_works(router: respx.MockRouter) -> None:
    hil = FakeHil(router, honour_wait=False)
    async with connect(heartbeat_interval=5) as client, anyio.create_task_group() as tg:
        tg.start_soon(answer_when_asked, hil, "收到", 0.2)
        started = time.monotonic()
        result = await call(client, "send_and_wait_reply", message="q")
    assert result["status"] == "success"
    assert result["replies"][0]["content"] == "收到"
    assert time.monotonic() - started < 2
    # Polled at poll_interval rather than held: several polls, but not a busy loop.
    assert 2 <= hil.poll.call_count <= 0.2 / 0.01 + 10


async def test_timeout_names_wait_for_reply_and_the_session_and_tells_the_server(hil: FakeHil) -> None:
    async with connect(timeout=0.3, heartbeat_interval=0.1) as client:
        started = time.monotonic()
        result = await call(client, "send_and_wait_reply", message="q")
        elapsed = time.monotonic() - started
    session = next(iter(hil.sessions.values()))
    assert result["status"] == "timeout"
    assert result["replies"] == []
    assert result["session_id"] == session.session_id
    assert "wait_for_reply" in result["message"]
    assert session.session_id in result["message"]
    assert 0.3 <= elapsed < 2
    assert hil.timeout.call_count == 1
    assert hil.timeout.calls.last.request.url.path == f"/api/session/{session.session_id}/timeout"


# --- images ---


async def test_missing_image_is_an_error_naming_the_file_and_nothing_is_sent(hil: FakeHil, tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    async with connect() as client:
        result = await call(client, "send_and_wait_reply", message="q", image_paths=[str(missing)])
        only = await call(client, "send_message_only", message="q", image_paths=[str(missing)])
    for outcome in (result, only):
        assert outcome["status"] == "error"
        assert str(missing) in outcome["message"]
    assert not hil.send.called
    assert not hil.upload.called


async def test_image_is_uploaded_and_its_url_sent(hil: FakeHil, tmp_path: Path) -> None:
    image = tmp_path / "shot.png"
    image.write_bytes(PNG)
    async with connect() as client, anyio.create_task_group() as tg:
        tg.start_soon(answer_when_asked, hil, "看到了")
        result = await call(client, "send_and_wait_reply", message="看图", image_paths=[str(image)])
    assert result["status"] == "success"
    assert hil.upload.call_count == 1
    upload = hil.upload.calls.last.request
    assert upload.headers["content-type"].startswith("multipart/form-data")
    assert b'name="file"; filename="shot.png"' in upload.content
    assert PNG in upload.content
    assert hil.sent_bodies()[0]["images"] == ["data:image/png;base64,AAAA"]


async def test_send_message_only_does_not_wait(hil: FakeHil) -> None:
    async with connect() as client:
        result = await call(client, "send_message_only", message="任务完成", project_name="proj")
    assert result["status"] == "success"
    assert hil.sent_bodies() == [
        {"message": "任务完成", "chat_id": "c1", "project_name": "proj", "timeout": 5.0, "wait_reply": False}
    ]
    assert not hil.poll.called


# --- auth ---


async def test_api_token_goes_on_every_request(hil: FakeHil, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(PNG)
    async with connect(api_token="tok-123", timeout=0.2, heartbeat_interval=0.1) as client:
        await call(client, "send_and_wait_reply", message="q", image_paths=[str(image)])
        await call(client, "send_message_only", message="m")
    calls = [*hil.send.calls, *hil.poll.calls, *hil.timeout.calls, *hil.upload.calls]
    assert hil.send.call_count == 2 and hil.poll.called and hil.timeout.called and hil.upload.called
    assert all(c.request.headers.get("authorization") == "Bearer tok-123" for c in calls)


async def test_no_token_no_authorization_header(hil: FakeHil) -> None:
    async with connect() as client:
        await call(client, "send_message_only", message="m")
    assert "authorization" not in hil.send.calls.last.request.headers


async def test_401_names_the_api_token_setting(router: respx.MockRouter) -> None:
    router.post("/api/send").respond(401, json={"detail": "invalid API token"})
    async with connect(api_token="wrong") as client:
        result = await call(client, "send_and_wait_reply", message="q")
    assert result["status"] == "error"
    assert "--api-token" in result["message"]
    assert "HIL_API_TOKEN" in result["message"]
    assert "wrong" not in result["message"]


# --- wait_for_reply and reuse of open questions ---


async def test_wait_for_reply_without_arguments_never_guesses_between_open_questions(hil: FakeHil) -> None:
    async with connect(timeout=0.3, heartbeat_interval=0.1, project_name="proj") as client:
        first = await call(client, "send_and_wait_reply", message="first question, with several words")
        second = await call(client, "send_and_wait_reply", message="second")
        assert first["status"] == second["status"] == "timeout"
        assert f'wait_for_reply(session_id="{second["session_id"]}")' in second["message"]
        hil.answer(second["session_id"], "answer to second")
        polls = hil.poll.call_count
        listed = await call(client, "wait_for_reply")
        assert listed["status"] == "error" and hil.poll.call_count == polls, listed
        assert [q["short_id"] for q in listed["open_questions"]] == [first["short_id"], second["short_id"]]
        assert listed["open_questions"][0] == {
            "session_id": first["session_id"],
            "short_id": first["short_id"],
            "project_name": "proj",
            "preview": "first question, with several…",
        }
        assert f"#{first['short_id']} [proj] 'first question" in listed["message"]
        assert "wait_for_reply(session_id=" in listed["message"]
        # With its id, the answer; then the one question left is this caller's only open one: no id needed.
        result = await call(client, "wait_for_reply", session_id=second["short_id"])
        assert result["status"] == "success" and result["replies"][0]["content"] == "answer to second"
        hil.answer(first["session_id"], "answer to first")
        only = await call(client, "wait_for_reply")
    assert only["status"] == "success" and only["session_id"] == first["session_id"]
    assert hil.poll.calls.last.request.url.path == f"/api/poll/{first['session_id']}"


async def test_wait_for_reply_with_nothing_open_says_so(hil: FakeHil) -> None:
    async with connect() as client:
        result = await call(client, "wait_for_reply")
    assert result["status"] == "error"
    assert "No open question" in result["message"]
    assert not hil.poll.called


async def test_wait_for_reply_by_short_id(hil: FakeHil) -> None:
    async with connect(timeout=0.3, heartbeat_interval=0.1) as client:
        asked = await call(client, "send_and_wait_reply", message="q")
        session = hil.sessions[asked["session_id"]]
        hil.answer(session, "yes")
        result = await call(client, "wait_for_reply", session_id=session.short_id)
    assert result["status"] == "success"
    assert result["replies"][0]["content"] == "yes"
    assert result["session_id"] == session.session_id


async def test_wait_for_reply_by_short_id_of_a_question_asked_elsewhere(hil: FakeHil) -> None:
    # A question this MCP server does not know (asked before a restart, or by another process): the HIL Server
    # resolves the 8-character id itself.
    session = Session(secrets.token_hex(16), secrets.token_hex(4), {"message": "q"})
    hil.sessions[session.session_id] = session
    hil.answer(session, "from before")
    async with connect() as client:
        result = await call(client, "wait_for_reply", session_id=f"#{session.short_id}")
    assert result["status"] == "success"
    assert result["replies"][0]["content"] == "from before"
    assert hil.poll.calls.last.request.url.path == f"/api/poll/{session.short_id}"


async def test_asking_the_same_open_question_again_reuses_its_session(hil: FakeHil) -> None:
    async with connect(timeout=0.3, heartbeat_interval=0.1) as client:
        first = await call(client, "send_and_wait_reply", message="same?")
        assert first["status"] == "timeout"
        async with anyio.create_task_group() as tg:
            tg.start_soon(answer_later, hil, first["session_id"], "late but here", 0.05)
            again = await call(client, "send_and_wait_reply", message="same?")
        assert hil.send.call_count == 1
        assert again["status"] == "success"
        assert again["session_id"] == first["session_id"]
        assert again["replies"][0]["content"] == "late but here"
        # Answered: asking once more is a new question.
        third = await call(client, "send_and_wait_reply", message="same?")
        assert hil.send.call_count == 2
        assert third["session_id"] != first["session_id"]
        # A different chat is a different question, too.
        await call(client, "send_and_wait_reply", message="same?", chat_id="c2")
        assert hil.send.call_count == 3


MALFORMED_IDS = [
    "../../status.json",
    "1a2b3c4d/../../x",
    "1A2B3C4D",
    "1a2b3c4",
    "1a2b3c4d5",
    "zzzzzzzz",
    "#",
    "##1a2b3c4d",
    "1a2b 3c4d",
    "%2e%2e%2fstatus",
    "１a2b3c4d",
    "0" * 31,
    "0" * 33,
]


@pytest.mark.parametrize("ref", MALFORMED_IDS)
async def test_malformed_ids_are_a_tool_error_and_reach_no_url(hil: FakeHil, ref: str) -> None:
    async with connect() as client:
        result = await client.call_tool("wait_for_reply", {"session_id": ref})
    assert result.is_error, result
    assert "session_id must be" in result.content[0].text
    assert not hil.poll.called and not hil.timeout.called and not hil.newest.called


@pytest.mark.parametrize("ref", ["1a2b3c4d", "#1a2b3c4d", " 1a2b3c4d\n", "0123456789abcdef0123456789abcdef"])
async def test_well_formed_ids_are_polled(hil: FakeHil, ref: str) -> None:
    async with connect(timeout=0.2, heartbeat_interval=0.1) as client:
        result = await call(client, "wait_for_reply", session_id=ref)
    assert result["status"] == "error" and "no longer on the HIL Server" in result["message"]
    assert hil.poll.calls.last.request.url.path == f"/api/poll/{ref.strip().lstrip('#')}"


async def test_the_http_client_never_puts_unchecked_text_in_a_url() -> None:
    requests: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda request: requests.append(request) or httpx.Response(200, json={}))
    async with httpx.AsyncClient(transport=transport) as http:
        client = HilClient(http, BASE)
        for ref in ("../../status.json", "1a2b3c4d?x=1", "1a2b3c4d\n"):
            with pytest.raises(BackendError, match="not a session id"):
                await client.poll(ref)
            with pytest.raises(BackendError, match="not a session id"):
                await client.mark_timeout(ref)
    assert requests == []


async def test_wait_for_reply_without_id_after_a_restart_asks_for_the_id(hil: FakeHil) -> None:
    # Asked before hil-mcp restarted, or by another agent with the same token: not this process's question, so
    # it is not taken without an id (the server cannot tell two processes of one token apart).
    session = Session(secrets.token_hex(16), secrets.token_hex(4), {"message": "q"}, status="timeout")
    hil.sessions[session.session_id] = session
    hil.answer(session, "someone else's answer")
    async with connect() as client:
        result = await call(client, "wait_for_reply")
        assert result["status"] == "error" and "No open question" in result["message"]
        assert 'wait_for_reply(session_id="' in result["message"] and result["replies"] == []
        assert not hil.poll.called and not hil.newest.called
        # With the id it has (from the earlier result, or #short_id in the chat), the answer.
        by_id = await call(client, "wait_for_reply", session_id=f"#{session.short_id}")
        assert by_id["status"] == "success" and by_id["replies"][0]["content"] == "someone else's answer"
        # A question named by its id becomes this caller's: still waiting, a later call needs no id.
        later = Session(secrets.token_hex(16), secrets.token_hex(4), {"message": "q2"})
        hil.sessions[later.session_id] = later
        first = await call(client, "wait_for_reply", session_id=later.short_id, timeout=1)
        assert first["status"] == "timeout" and first["session_id"] == later.session_id
        hil.answer(later, "second answer")
        again = await call(client, "wait_for_reply")
    assert again["status"] == "success" and again["replies"][0]["content"] == "second answer"


async def test_two_processes_sharing_a_token_keep_their_own_questions(hil: FakeHil) -> None:
    async with connect(timeout=0.3, heartbeat_interval=0.1) as x, connect(timeout=0.3, heartbeat_interval=0.1) as y:
        mine = await call(x, "send_and_wait_reply", message="X asks")
        theirs = await call(y, "send_and_wait_reply", message="Y asks")
        hil.answer(theirs["session_id"], "for Y only")
        hil.answer(mine["session_id"], "for X")
        got_x = await call(x, "wait_for_reply")
        got_y = await call(y, "wait_for_reply")
    assert got_x["session_id"] == mine["session_id"] and got_x["replies"][0]["content"] == "for X"
    assert got_y["session_id"] == theirs["session_id"] and got_y["replies"][0]["content"] == "for Y only"


async def test_results_are_typed_with_output_schemas(hil: FakeHil) -> None:
    async with connect() as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    for name in ("send_and_wait_reply", "wait_for_reply"):
        schema = tools[name].output_schema
        assert schema is not None
        assert {"status", "replies", "message", "session_id", "short_id"} <= set(schema["properties"])
    assert set(tools["send_message_only"].output_schema["properties"]) == {"status", "message"}


# --- the longest single call (clients that cut calls at 60 s) ---


async def test_a_call_longer_than_the_client_allows_returns_waiting_and_the_question_keeps_waiting(
    hil: FakeHil,
) -> None:
    async with connect(timeout=30, heartbeat_interval=0.1, max_call_seconds=0.3) as client:
        started = time.monotonic()
        first = await call(client, "send_and_wait_reply", message="slow answer")
        assert time.monotonic() - started < 3
        assert first["status"] == "waiting", first
        assert f'wait_for_reply(session_id="{first["session_id"]}")' in first["message"]
        # Not a timeout: the server was not told the agent stopped waiting.
        assert not hil.timeout.called and hil.sessions[first["session_id"]].status == "waiting"
        again = await call(client, "wait_for_reply")
        assert again["status"] == "waiting" and again["session_id"] == first["session_id"]
        hil.answer(first["session_id"], "here it is")
        done = await call(client, "wait_for_reply")
    assert done["status"] == "success" and done["replies"][0]["content"] == "here it is"


async def test_request_approval_also_returns_waiting(hil: FakeHil) -> None:
    async with connect(timeout=30, heartbeat_interval=0.1, max_call_seconds=0.2) as client:
        result = await call(client, "request_approval", summary="部署")
    assert result["status"] == "waiting" and result["approved"] is None and result["session_id"]


async def test_a_client_known_to_wait_long_gets_the_whole_timeout(hil: FakeHil) -> None:
    # Claude Code names itself "claude-code" in initialize and waits for tools/call as long as MCP_TOOL_TIMEOUT.
    async with connect(client_name="claude-code", timeout=0.6, heartbeat_interval=0.1, max_call_seconds=0.1) as c:
        result = await call(c, "send_and_wait_reply", message="q")
    assert result["status"] == "timeout", result
    async with connect(client_name="some-editor", timeout=0.6, heartbeat_interval=0.1, max_call_seconds=0.1) as c:
        result = await call(c, "send_and_wait_reply", message="q2")
    assert result["status"] == "waiting", result


# --- progress ---


async def test_progress_notifications_while_waiting(hil: FakeHil) -> None:
    notes: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        notes.append((progress, total, message))

    async with connect(timeout=30, heartbeat_interval=0.05) as client, anyio.create_task_group() as tg:
        tg.start_soon(answer_when_asked, hil, "done", 0.4)
        result = await client.call_tool("send_and_wait_reply", {"message": "q"}, progress_callback=on_progress)
    assert result.structured_content is not None
    assert result.structured_content["status"] == "success"
    assert len(notes) >= 3, notes
    progress = [p for p, _, _ in notes]
    assert all(b > a for a, b in itertools.pairwise(progress)), progress
    assert all(total == 30 for _, total, _ in notes)
    assert all(message and "等待回复中" in message for _, _, message in notes)


async def test_progress_strictly_increases_against_a_fast_polled_seed_server(router: respx.MockRouter) -> None:
    hil = FakeHil(router, honour_wait=False)
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async with connect(timeout=30, poll_interval=0.01) as client, anyio.create_task_group() as tg:
        tg.start_soon(answer_when_asked, hil, "done", 0.2)
        await client.call_tool("send_and_wait_reply", {"message": "q"}, progress_callback=on_progress)
    assert len(progress) >= 3
    assert all(b > a for a, b in itertools.pairwise(progress)), progress


# --- configuration ---


def from_cli(*argv: str) -> McpSettings:
    return McpSettings(**parse_args(list(argv)))


def test_max_call_seconds_flag_and_env(clean_env: pytest.MonkeyPatch) -> None:
    assert from_cli().max_call_seconds == 50
    assert from_cli("--max-call-seconds", "25").max_call_seconds == 25
    clean_env.setenv("HIL_MAX_CALL", "40")
    assert from_cli().max_call_seconds == 40
    assert from_cli("--max-call-seconds", "10").max_call_seconds == 10


def test_defaults(clean_env: pytest.MonkeyPatch) -> None:
    s = from_cli()
    assert s.service_url == "http://localhost:8081"
    assert s.timeout == 1200
    assert s.poll_interval == 2
    assert s.chat_id is None and s.project_name is None and s.api_token is None
    assert s.mode == "auto"


def test_parse_args_keeps_only_given_flags() -> None:
    assert parse_args([]) == {}
    assert parse_args(
        [
            "--service-url",
            "http://h:1/api",
            "--mode",
            "relay",
            "--chat-id",
            "c",
            "--project-name",
            "p",
            "--timeout",
            "60",
            "--poll-interval",
            "0.5",
            "--api-token",
            "t",
        ]
    ) == {
        "service_url": "http://h:1/api",
        "mode": "relay",
        "chat_id": "c",
        "project_name": "p",
        "timeout": 60.0,
        "poll_interval": 0.5,
        "api_token": "t",
    }


def test_flag_beats_env_beats_dotenv_beats_default(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "SERVICE_URL=http://dotenv:1\nDEFAULT_CHAT_ID=dotenv-chat\nDEFAULT_TIMEOUT=30\nPOLL_INTERVAL=3\n"
        "HIL_API_TOKEN=dotenv-token\nDEFAULT_PROJECT_NAME=dotenv-proj\n",
        encoding="utf-8",
    )
    s = from_cli()
    assert (s.service_url, s.chat_id, s.timeout, s.poll_interval, s.project_name) == (
        "http://dotenv:1",
        "dotenv-chat",
        30,
        3,
        "dotenv-proj",
    )
    assert s.api_token is not None and s.api_token.get_secret_value() == "dotenv-token"

    clean_env.setenv("SERVICE_URL", "http://env:2/api")
    clean_env.setenv("DEFAULT_CHAT_ID", "env-chat")
    clean_env.setenv("DEFAULT_TIMEOUT", "40")
    clean_env.setenv("POLL_INTERVAL", "4")
    clean_env.setenv("HIL_API_TOKEN", "env-token")
    s = from_cli()
    assert (s.service_url, s.chat_id, s.timeout, s.poll_interval) == ("http://env:2", "env-chat", 40, 4)
    assert s.api_token is not None and s.api_token.get_secret_value() == "env-token"
    assert s.project_name == "dotenv-proj"  # not in the environment: .env still counts

    s = from_cli(
        "--service-url",
        "http://flag:3/",
        "--chat-id",
        "flag-chat",
        "--timeout",
        "50",
        "--poll-interval",
        "5",
        "--api-token",
        "flag-token",
    )
    assert (s.service_url, s.chat_id, s.timeout, s.poll_interval) == ("http://flag:3", "flag-chat", 50, 5)
    assert s.api_token is not None and s.api_token.get_secret_value() == "flag-token"


def test_devcloud_service_url_is_accepted(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("DEVCLOUD_SERVICE_URL", "http://seed-name:9/api")
    assert from_cli().service_url == "http://seed-name:9"
    clean_env.setenv("SERVICE_URL", "http://new-name:8")
    assert from_cli().service_url == "http://new-name:8"
    assert from_cli("--service-url", "http://flag:7").service_url == "http://flag:7"


def test_devcloud_service_url_in_dotenv(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DEVCLOUD_SERVICE_URL=http://seed-dotenv:9\n", encoding="utf-8")
    assert from_cli().service_url == "http://seed-dotenv:9"


def test_blank_chat_id_is_none(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DEFAULT_CHAT_ID", "  ")
    clean_env.setenv("HIL_API_TOKEN", "")
    s = from_cli()
    assert s.chat_id is None and s.api_token is None


@pytest.mark.parametrize("url", ["localhost:8081", "ftp://h/api", "hil.example.com"])
def test_invalid_service_url_exits_2_with_a_message(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--service-url", url])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--service-url" in err
    assert "http://" in err


def test_invalid_timeout_exits_2(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--timeout", "soon"])
    assert exc.value.code == 2
    assert "--timeout" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--timeout", "0"])
    assert exc.value.code == 2
    assert "timeout" in capsys.readouterr().err
