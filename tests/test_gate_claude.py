"""The gate with the real Claude Code: `claude -p` against a fake Anthropic API (tests/fake_anthropic.py) that
scripts a Bash call, with the gate as its PreToolUse hook (or its --permission-prompt-tool), a real HIL Server and
the sandbox's fake WeCom, where the person answers 1 批准 / 2 拒绝 / 3 本会话都允许.

The CLI is found through HIL_TEST_CLAUDE (a path), else `claude` on PATH. Without it the tests skip saying why,
except under CI (env CI set), where they fail: CI installs the pinned CLI (.ci/run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hil_protocol.messages import HEADER_RE
from tests.fake_anthropic import FINAL_TEXT, FakeAnthropic, ToolResult
from tests.helpers import ROBOT, child_env, free_port
from tests.procs import Stack

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
RISKY = "python3 -c 'print(42)'"
HOOK_TIMEOUT = 20


def find_claude() -> str:
    path = os.environ.get("HIL_TEST_CLAUDE") or shutil.which("claude")
    if path and Path(path).exists():
        return path
    why = "Claude Code CLI not found: set HIL_TEST_CLAUDE or put `claude` on PATH (npm i @anthropic-ai/claude-code)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must run these tests (.ci/run installs it)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def claude() -> str:
    return find_claude()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(mode="direct", tmp=tmp_path_factory.mktemp("gate")).running() as stack:
        yield stack


@pytest.fixture(scope="module")
def api() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


def project(tmp_path: Path, chat: str, *, hook: bool = True, policy: str = "") -> Path:
    """A project folder whose Claude Code settings run the gate as hook, with a policy asking about python3."""
    folder = tmp_path / "proj"
    (folder / ".hil").mkdir(parents=True)
    (folder / ".hil" / "gate.toml").write_text(
        f'chat_id = "{chat}"\nproject_name = "gate-test"\nwait = 10\n{policy}\n[bash]\nask = ["python3"]\n'
    )
    if hook:
        (folder / ".claude").mkdir()
        command = f"{sys.executable} -m mcp_server gate"
        hooks = {
            "PreToolUse": [
                {"matcher": "*", "hooks": [{"type": "command", "command": command, "timeout": HOOK_TIMEOUT}]}
            ]
        }
        (folder / ".claude" / "settings.json").write_text(json.dumps({"hooks": hooks}))
    return folder


class Run:
    """One `claude -p` run in the background; `finish()` waits for it."""

    def __init__(self, claude: str, folder: Path, api: FakeAnthropic, service_url: str, *args: str) -> None:
        home = folder.parent / "home"
        home.mkdir(exist_ok=True)
        env = child_env(
            HOME=str(home),
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
            DISABLE_TELEMETRY="1",
            DISABLE_AUTOUPDATER="1",
            DISABLE_ERROR_REPORTING="1",
            ANTHROPIC_BASE_URL=api.url,
            ANTHROPIC_API_KEY="dummy",
            SERVICE_URL=service_url,
            PYTHONPATH=str(REPO),
            HIL_LOG_LEVEL="INFO",
        )
        self.api = api
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            [claude, "-p", "run the command", "--output-format", "json", *args],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(self, timeout: float = 60) -> tuple[dict[str, Any], list[ToolResult], float]:
        out, err = self.popen.communicate(timeout=timeout)
        took = time.monotonic() - self.started
        assert self.popen.returncode == 0, f"claude failed ({self.popen.returncode}):\n{out}\n{err}"
        result = json.loads(out.strip().splitlines()[-1])
        assert result.get("result") == FINAL_TEXT, result
        return result, list(self.api.results), took


def question(
    stack: Stack, chat: str, since: int = 0, timeout: float = 60, run: Run | None = None
) -> tuple[dict[str, Any], str]:
    """The gate's next question in `chat` (after seq `since`) and its short id. With `run`: fails at once, with its
    output, when that claude run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run is not None and run.popen.poll() is not None:
            out, err = run.popen.communicate()
            raise AssertionError(f"claude ended before the gate asked in {chat}:\n{out}\n{err}\n{stack.logs()}")
        for message in stack.messages(chat):
            content = message.get("content") or ""
            if message["seq"] > since and "Claude Code 请求批准" in content:
                match = HEADER_RE.match(content)
                assert match, content
                return message, match["short_id"]
        time.sleep(0.05)
    raise AssertionError(f"no gate question in {chat}: {stack.messages(chat)}")


def answer(stack: Stack, chat: str, asked: dict[str, Any], text: str, userid: str = "zhangsan") -> None:
    stack.reply(chat, text, quote=asked["content"], quote_sender=ROBOT, from_user={"userid": userid, "name": userid})


def asked_count(stack: Stack, chat: str) -> int:
    return sum("Claude Code 请求批准" in (m.get("content") or "") for m in stack.messages(chat))


# --- the hook ----------------------------------------------------------------------------------------------------


def test_approved_by_a_reply_runs(claude: str, stack: Stack, api: FakeAnthropic, tmp_path: Path) -> None:
    chat = "gateApprove"
    api.reset(RISKY)
    run = Run(claude, project(tmp_path, chat), api, stack.server_url)
    asked, _ = question(stack, chat, run=run)
    content = asked["content"]
    assert RISKY in content and "目录：" in content and "原因：python3" in content
    assert "1. 批准" in content and "2. 拒绝" in content and "3. 本会话都允许" in content
    answer(stack, chat, asked, "1")
    _, results, _ = run.finish()
    assert [(r.content.strip(), r.is_error) for r in results] == [("42", False)]


def test_rejected_with_a_comment_does_not_run(claude: str, stack: Stack, api: FakeAnthropic, tmp_path: Path) -> None:
    chat = "gateReject"
    api.reset(RISKY)
    run = Run(claude, project(tmp_path, chat), api, stack.server_url)
    asked, _ = question(stack, chat, run=run)
    answer(stack, chat, asked, "2 先跑测试")
    result, results, _ = run.finish()
    assert len(results) == 1 and results[0].is_error
    assert "先跑测试" in results[0].content and "42" not in results[0].content
    assert [d["tool_name"] for d in result["permission_denials"]] == ["Bash"]


def test_nobody_answers_denied_before_the_hook_timeout(
    claude: str, stack: Stack, api: FakeAnthropic, tmp_path: Path
) -> None:
    chat = "gateSilent"
    api.reset(RISKY)
    folder = project(tmp_path, chat)
    policy = folder / ".hil" / "gate.toml"
    policy.write_text(policy.read_text().replace("wait = 10", "wait = 5"))
    run = Run(claude, folder, api, stack.server_url)
    _, short_id = question(stack, chat, run=run)
    _, results, took = run.finish()
    assert len(results) == 1 and results[0].is_error and "nobody decided" in results[0].content
    assert took < HOOK_TIMEOUT
    # The question is marked as no longer waited for.
    assert stack.poll(short_id)["status"] == "timeout"


def test_server_down_denied_at_once(claude: str, api: FakeAnthropic, tmp_path: Path) -> None:
    api.reset(RISKY)
    run = Run(claude, project(tmp_path, "gateDown"), api, f"http://127.0.0.1:{free_port()}")
    _, results, took = run.finish()
    assert len(results) == 1 and results[0].is_error and "cannot reach the HIL Server" in results[0].content
    assert took < 10


def test_a_safe_call_is_not_asked(claude: str, stack: Stack, api: FakeAnthropic, tmp_path: Path) -> None:
    chat = "gateSafe"
    api.reset("echo hi")
    _, results, _ = Run(claude, project(tmp_path, chat), api, stack.server_url).finish()
    assert [(r.content.strip(), r.is_error) for r in results] == [("hi", False)]
    assert asked_count(stack, chat) == 0


def test_allow_for_the_session_stops_the_second_ask_only_in_that_session(
    claude: str, stack: Stack, api: FakeAnthropic, tmp_path: Path
) -> None:
    chat = "gateSession"
    folder = project(tmp_path, chat)
    api.reset(RISKY, "python3 -c 'print(43)'")
    run = Run(claude, folder, api, stack.server_url)
    asked, _ = question(stack, chat, run=run)
    assert "「本会话都允许」：会话 " in asked["content"]
    answer(stack, chat, asked, "3")
    _, results, _ = run.finish()
    assert [(r.content.strip(), r.is_error) for r in results] == [("42", False), ("43", False)]
    assert asked_count(stack, chat) == 1
    # A new Claude Code session asks again.
    api.reset(RISKY)
    run = Run(claude, folder, api, stack.server_url)
    asked, _ = question(stack, chat, since=asked["seq"], run=run)
    answer(stack, chat, asked, "拒绝")
    _, results, _ = run.finish()
    assert results[0].is_error and asked_count(stack, chat) == 2


def test_two_people_must_approve(claude: str, stack: Stack, api: FakeAnthropic, tmp_path: Path) -> None:
    chat = "gateTwo"
    api.reset(RISKY)
    folder = project(tmp_path, chat, policy='responders = ["zhangsan", "lisi"]\napprovals_required = 2')
    run = Run(claude, folder, api, stack.server_url)
    asked, short_id = question(stack, chat, run=run)
    assert "需要 2 人批准" in asked["content"] and "本会话都允许" not in asked["content"]
    answer(stack, chat, asked, "批准", userid="zhangsan")
    time.sleep(0.3)  # the first approval alone decides nothing
    assert run.popen.poll() is None and stack.poll(short_id)["approval"]["approvals"] == 1
    answer(stack, chat, asked, "1", userid="lisi")
    _, results, _ = run.finish()
    assert [(r.content.strip(), r.is_error) for r in results] == [("42", False)]


# --- --permission-prompt-tool over stdio ---------------------------------------------------------------------------


def prompt_tool_args(folder: Path, service_url: str) -> list[str]:
    config = {
        "mcpServers": {
            "hil": {
                "command": sys.executable,
                "args": ["-m", "mcp_server", "--service-url", service_url],
                "env": {"PYTHONPATH": str(REPO)},
            }
        }
    }
    (folder / "mcp.json").write_text(json.dumps(config))
    return ["--mcp-config", str(folder / "mcp.json"), "--permission-prompt-tool", "mcp__hil__permission_prompt"]


@pytest.mark.parametrize(("reply", "ran"), [("批准", True), ("拒绝，先跑测试", False)])
def test_permission_prompt_tool(
    claude: str, stack: Stack, api: FakeAnthropic, tmp_path: Path, reply: str, ran: bool
) -> None:
    chat = f"gatePrompt{int(ran)}"
    folder = project(tmp_path, chat, hook=False)
    api.reset(RISKY)
    run = Run(claude, folder, api, stack.server_url, *prompt_tool_args(folder, stack.server_url))
    asked, _ = question(stack, chat, run=run)
    assert RISKY in asked["content"]
    answer(stack, chat, asked, reply)
    _, results, _ = run.finish()
    assert len(results) == 1
    if ran:
        assert (results[0].content.strip(), results[0].is_error) == ("42", False)
    else:
        assert results[0].is_error and "先跑测试" in results[0].content


def test_permission_prompt_tool_server_down_and_safe_call(claude: str, api: FakeAnthropic, tmp_path: Path) -> None:
    folder = project(tmp_path, "gatePromptDown", hook=False)
    down = f"http://127.0.0.1:{free_port()}"
    api.reset(RISKY)
    _, results, took = Run(claude, folder, api, down, *prompt_tool_args(folder, down)).finish()
    assert results[0].is_error and "cannot reach the HIL Server" in results[0].content and took < 15


def test_permission_prompt_tool_session_allowance(
    claude: str, stack: Stack, api: FakeAnthropic, tmp_path: Path
) -> None:
    chat = "gatePromptSession"
    folder = project(tmp_path, chat, hook=False)
    api.reset(RISKY, "python3 -c 'print(43)'")
    run = Run(claude, folder, api, stack.server_url, *prompt_tool_args(folder, stack.server_url))
    asked, _ = question(stack, chat, run=run)
    answer(stack, chat, asked, "本会话都允许")
    _, results, _ = run.finish()
    assert [(r.content.strip(), r.is_error) for r in results] == [("42", False), ("43", False)]
    assert asked_count(stack, chat) == 1


def test_the_fake_api_is_what_claude_calls(api: FakeAnthropic) -> None:
    response = httpx.post(
        f"{api.url}/v1/messages?beta=true", json={"messages": [], "tools": [{"name": "Bash"}], "stream": True}
    )
    assert response.status_code == 200 and "event: message_start" in response.text


# --- the hook processes on their own, against the real server ------------------------------------------------------


def gate_process(folder: Path, service_url: str, event: dict[str, Any], sub: str = "gate") -> subprocess.Popen[str]:
    env = child_env(PYTHONPATH=str(REPO), HOME=str(folder.parent), SERVICE_URL=service_url)
    env["XDG_CACHE_HOME"] = str(folder.parent / "cache")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_server", sub],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=folder,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps({"cwd": str(folder), **event}))
    proc.stdin.close()
    return proc


def finished(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[str, str]:
    """The process's stdout and stderr once it exits (its stdin is already closed)."""
    assert proc.stdout is not None and proc.stderr is not None
    proc.wait(timeout)
    return proc.stdout.read(), proc.stderr.read()


def test_a_stopped_hook_denies_and_tells_the_server(stack: Stack, tmp_path: Path) -> None:
    import signal

    chat = "gateStopped"
    folder = project(tmp_path, chat, hook=False)
    event = {"hook_event_name": "PreToolUse", "tool_name": "Bash", "tool_input": {"command": "git push"}}
    proc = gate_process(folder, stack.server_url, {**event, "session_id": "s-stop"})
    _, short_id = question(stack, chat)
    time.sleep(0.3)  # the gate is waiting on its long-poll
    proc.send_signal(signal.SIGTERM)
    out, err = finished(proc)
    decision = json.loads(out)["hookSpecificOutput"]
    assert decision["permissionDecision"] == "deny" and "stopped" in decision["permissionDecisionReason"], err
    assert stack.poll(short_id)["status"] == "timeout"


def test_notify_sends_when_turned_on_and_is_rate_limited(stack: Stack, tmp_path: Path) -> None:
    chat = "gateNotify"
    folder = project(tmp_path, chat, hook=False, policy="[notify]\nstop = true\ninterval = 3600")
    event = {"hook_event_name": "Stop", "last_assistant_message": "部署完成\n全部测试通过\n第三行"}
    for _ in range(2):
        proc = gate_process(folder, stack.server_url, event, sub="notify")
        out, err = finished(proc)
        assert (proc.returncode, out) == (0, ""), err
    notices = [m["content"] for m in stack.messages(chat) if "Claude Code 已完成" in (m.get("content") or "")]
    assert len(notices) == 1 and "部署完成" in notices[0] and "全部测试通过" in notices[0]
    # Notification is still off in this policy.
    proc = gate_process(folder, stack.server_url, {"hook_event_name": "Notification", "message": "等你"}, sub="notify")
    assert finished(proc)[0] == ""
    assert not [m for m in stack.messages(chat) if "等你" in (m.get("content") or "")]
