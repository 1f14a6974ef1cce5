"""The sandbox's web chat (GET / on the fake WeCom) in a real browser, against the real sandbox process.

Chromium is Debian's (`apt-get install chromium`), driven by the `playwright` package; `playwright install` is never
run (it downloads a browser). Without either the tests skip, saying which is missing.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from hil_sandbox.sandbox import SANDBOX_BOT_KEY
from tests.helpers import CHROMIUM_ARGS, PNG_MAGIC, free_port, png
from tests.procs import Proc, mcp_stdio_params

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install playwright (it is in the test extra)"
)
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip(
        "Chromium is not installed: apt-get install chromium (the browser test drives /usr/bin/chromium)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.e2e


@dataclass
class Sandbox:
    proc: Proc
    server_url: str
    wecom_url: str
    http: httpx.Client

    def send(self, message: str, chat_id: str, **body: Any) -> dict[str, Any]:
        response = self.http.post(f"{self.server_url}/api/send", json={"message": message, "chat_id": chat_id, **body})
        response.raise_for_status()
        return response.json()

    def poll(self, session_id: str, wait: float = 0) -> dict[str, Any]:
        params = {"wait": wait} if wait else None
        response = self.http.get(f"{self.server_url}/api/poll/{session_id}", params=params, timeout=wait + 10)
        return response.json()

    def robot_send(self, payload: dict[str, Any]) -> None:
        """Send as the robot straight to the fake's webhook, as the HIL Server would."""
        url = f"{self.wecom_url}/cgi-bin/webhook/send"
        assert self.http.post(url, params={"key": SANDBOX_BOT_KEY}, json=payload).json()["errcode"] == 0


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    tmp = tmp_path_factory.mktemp("sandbox")
    port, wecom_port = free_port(), free_port()
    server_url, wecom_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{wecom_port}"
    args = ["-m", "hil_sandbox", "--port", str(port), "--wecom-port", str(wecom_port), "--data-dir", str(tmp / "data")]
    proc = Proc("sandbox", args, {}, tmp / "sandbox.log", f"{server_url}/health").start()
    # Both servers run in the one process but start independently: wait for the fake too.
    proc.health_url = f"{wecom_url}/_fake/config"
    proc.wait_healthy()
    # trust_env=False: a proxy from the environment must not stand between the test and 127.0.0.1.
    with httpx.Client(timeout=30, trust_env=False) as http:
        try:
            yield Sandbox(proc, server_url, wecom_url, http)
        finally:
            proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any, sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, locale="zh-CN")
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{sandbox.wecom_url}/")
    yield page
    context.close()
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed:
        print(sandbox.proc.log())
    assert not errors, f"JavaScript errors in the page: {errors}"


def by(page_or_locator: Any, testid: str) -> Any:
    return page_or_locator.get_by_test_id(testid)


def open_chat(page: Any, chat_id: str) -> None:
    by(page, "chat-id-input").fill(chat_id)
    by(page, "chat-id-input").press("Enter")
    sync_api.expect(by(page, "chat-title")).to_have_text(chat_id)


def question_in_page(page: Any, short_id: str) -> Any:
    question = by(page, "message").and_(page.locator('[data-kind="robot"]')).filter(has_text=f"[#{short_id}")
    sync_api.expect(question).to_have_count(1)
    return question


def test_quote_reply_from_the_page_answers_the_waiting_question(sandbox: Sandbox, page: Any, tmp_path: Path) -> None:
    expect = sync_api.expect
    expect(by(page, "chat-title")).to_have_text("sandbox-chat")  # the default chat
    expect(by(page, "connection-status")).to_have_text("已连接")
    sent = sandbox.send("要合并这个 PR 吗？", "sandbox-chat", project_name="browser-test")
    short_id = sent["short_id"]

    with ThreadPoolExecutor(max_workers=1) as pool:
        answer = pool.submit(sandbox.poll, sent["session_id"], 30)
        question = question_in_page(page, short_id)
        expect(question).to_contain_text("要合并这个 PR 吗？")

        by(question, "quote-button").click()
        expect(by(page, "quote-bar")).to_be_visible()
        expect(by(page, "quote-bar-text")).to_contain_text(f"[#{short_id} browser-test]")
        by(page, "composer-input").fill("合并吧，记得打 tag")
        by(page, "send-button").click()
        result = answer.result(timeout=40)

    assert result["status"] == "replied", result
    assert [reply["content"] for reply in result["replies"]] == ["合并吧，记得打 tag"]
    assert result["replies"][0]["matched_by"] == "quote"
    # The page marks the question as answered, and by whom (from the HIL Server's /status.json).
    expect(by(question, "answered")).to_contain_text("已回答")
    expect(by(question, "answered")).to_contain_text("张三")

    # The person's message is in the timeline: the quoted question, the answer, and the callback's HTTP status.
    mine = by(page, "message").and_(page.locator('[data-kind="person"]'))
    expect(mine).to_have_count(1)
    expect(by(mine, "message-quote")).to_contain_text(f"[#{short_id} browser-test]")
    expect(by(mine, "message-body")).to_have_text("@HIL助手 合并吧，记得打 tag")
    expect(by(mine, "callback-status")).to_have_text("回调 200")
    expect(by(page, "quote-bar")).to_be_hidden()
    expect(by(page, "composer-input")).to_have_value("")

    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot))
    data = shot.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_plain_reply_with_two_waiting_shows_the_hint(sandbox: Sandbox, page: Any, tmp_path: Path) -> None:
    expect = sync_api.expect
    open_chat(page, "browser-two")
    first = sandbox.send("用 PostgreSQL 还是 MySQL？", "browser-two", project_name="db")
    second = sandbox.send("要不要加缓存？", "browser-two", project_name="cache")
    question_in_page(page, first["short_id"])
    question_in_page(page, second["short_id"])

    by(page, "composer-input").fill("好的")
    by(page, "composer-input").press("Enter")

    hint = by(page, "message").filter(has_text="个问题在等待回复")
    expect(hint).to_have_count(1)
    expect(hint).to_contain_text(f"#{first['short_id']}")
    expect(hint).to_contain_text(f"#{second['short_id']}")
    # Rendered as markdown: bold, inline code and the warning colour, not the raw markup.
    expect(hint.locator("strong")).to_contain_text("当前有 2 个问题在等待回复")
    expect(hint.locator("code")).to_have_text([f"#{first['short_id']}", f"#{second['short_id']}"])
    expect(hint.locator(".font-warning")).to_have_text("「引用回复」")
    expect(hint).not_to_contain_text("<font")
    # The plain reply answered neither question.
    assert sandbox.poll(first["session_id"])["status"] == "waiting"
    assert sandbox.poll(second["session_id"])["status"] == "waiting"
    expect(by(page, "chat-item").and_(page.locator('[data-chat-id="browser-two"]'))).to_have_count(1)
    page.screenshot(path=str(tmp_path / "hint.png"))


def test_image_answer_from_the_page(sandbox: Sandbox, page: Any) -> None:
    expect = sync_api.expect
    open_chat(page, "browser-image")
    sent = sandbox.send("截图发我看看", "browser-image")
    question_in_page(page, sent["short_id"])

    by(page, "image-input").set_input_files(
        files=[{"name": "screen.png", "mimeType": "image/png", "buffer": png(80, 50, (47, 124, 246))}]
    )
    expect(by(page, "attachment")).to_be_visible()
    by(page, "send-button").click()

    result = sandbox.poll(sent["session_id"], wait=20)
    assert result["status"] == "replied", result
    [reply] = result["replies"]
    # In a group a lone picture arrives as a mixed message with the @mention, as WeCom sends it.
    assert reply["msg_type"] == "mixed"
    assert reply["images"] and reply["images"][0].startswith(f"{sandbox.wecom_url}/_fake/images/")
    assert sandbox.http.get(reply["images"][0]).content.startswith(PNG_MAGIC)

    mine = by(page, "message").and_(page.locator('[data-kind="person"]'))
    expect(mine).to_have_attribute("data-msgtype", "mixed")
    image = by(mine, "message-image")
    expect(image).to_be_visible()
    assert image.evaluate("img => img.complete && img.naturalWidth") == 80
    expect(by(page, "attachment")).to_be_hidden()


def test_rendering_escapes_text_and_shows_robot_images(sandbox: Sandbox, page: Any) -> None:
    expect = sync_api.expect
    open_chat(page, "browser-render")
    sandbox.robot_send(
        {
            "msgtype": "markdown",
            "chatid": "browser-render",
            "markdown": {
                "content": '# 标题\n> 引用一行\n**加粗** `x<y>` <img src=x onerror="window.pwned=1">\n'
                '<font color="info">绿色</font> [链接](javascript:alert(1))'
            },
        }
    )
    sandbox.robot_send({"msgtype": "text", "chatid": "browser-render", "text": {"content": "<b>不是粗体</b>"}})
    image = png(30, 20, (230, 60, 40))
    sandbox.robot_send(
        {
            "msgtype": "image",
            "chatid": "browser-render",
            "image": {"base64": base64.b64encode(image).decode(), "md5": hashlib.md5(image).hexdigest()},
        }
    )

    messages = by(page, "message")
    expect(messages).to_have_count(3)
    markdown = messages.nth(0)
    expect(markdown.locator(".md-h1")).to_have_text("标题")
    expect(markdown.locator(".md-quote")).to_have_text("引用一行")
    expect(markdown.locator("strong")).to_have_text("加粗")
    expect(markdown.locator("code")).to_have_text("x<y>")
    expect(markdown.locator(".font-info")).to_have_text("绿色")
    expect(markdown).to_contain_text('<img src=x onerror="window.pwned=1">')
    expect(markdown.locator("img")).to_have_count(0)
    expect(markdown.locator("a")).to_have_count(0)  # only http(s) links become links
    expect(messages.nth(1)).to_contain_text("<b>不是粗体</b>")
    expect(messages.nth(1).locator("b")).to_have_count(0)
    robot_image = by(messages.nth(2), "message-image")
    expect(robot_image).to_be_visible()
    assert robot_image.evaluate("img => img.complete && img.naturalWidth") == 30
    assert page.evaluate("window.pwned") is None

    # Live updates are long polls: while nothing happens, the page sends no requests.
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.wait_for_timeout(1500)
    assert requests == []


def _ask_through_hil_mcp(server_url: str, question: str, cwd: Path) -> dict[str, Any]:
    """A real MCP client session over stdio with hil-mcp, asking `question` (runs in its own thread and loop)."""
    import asyncio
    import json

    from mcp import Client

    params = mcp_stdio_params(server_url, cwd, "--chat-id", "mcp-chat", "--project-name", "cursor", "--timeout", "60")

    async def run() -> dict[str, Any]:
        async with Client(params) as client:
            result = await client.call_tool("send_and_wait_reply", {"message": question})
            return json.loads(result.content[0].text)

    return asyncio.run(run())


def test_question_from_hil_mcp_is_answered_in_the_page(sandbox: Sandbox, page: Any, tmp_path: Path) -> None:
    """The README's promise: point hil-mcp at the sandbox, answer in the page, the tool gets the answer."""
    expect = sync_api.expect
    open_chat(page, "mcp-chat")
    with ThreadPoolExecutor(max_workers=1) as pool:
        call = pool.submit(_ask_through_hil_mcp, sandbox.server_url, "部署到生产环境吗？", tmp_path)
        question = by(page, "message").and_(page.locator('[data-kind="robot"]')).filter(has_text="部署到生产环境吗？")
        expect(question).to_have_count(1, timeout=30_000)
        expect(question).to_contain_text("cursor]")
        by(question, "quote-button").click()
        by(page, "composer-input").fill("可以，先灰度")
        by(page, "send-button").click()
        result = call.result(timeout=60)
    assert result["status"] == "success", result
    assert [r["content"] for r in result["replies"]] == ["可以，先灰度"]


def test_tags_follow_live_approvals_so_far_and_the_agent_stopping(sandbox: Sandbox, page: Any) -> None:
    """The tags come without a reload: an approval shows 1/2 and who, then both names; a question the AI stopped
    waiting for says so (not 已超时, which is the question's own deadline)."""
    expect = sync_api.expect
    open_chat(page, "browser-tags")
    approval = sandbox.send("上线 v2 吗？", "browser-tags", approvals_required=2)
    stopped = sandbox.send("还需要我等吗？", "browser-tags")
    question = question_in_page(page, approval["short_id"])
    other = question_in_page(page, stopped["short_id"])

    def approve(userid: str, name: str) -> None:
        body = {
            "chat_id": "browser-tags",
            "quote": f"[#{approval['short_id']}]\n上线 v2 吗？",
            "text": "批准",
            "from_user": {"userid": userid, "name": name, "alias": userid},
        }
        answer = sandbox.http.post(f"{sandbox.wecom_url}/_fake/reply", json=body).json()
        assert answer["responses"][0]["status_code"] == 200, answer

    approve("zhangsan", "张三")
    expect(by(question, "answered")).to_have_text("⏳ 已批准 1/2 · 张三 (zhangsan)")
    approve("lisi", "李四")
    expect(by(question, "answered")).to_contain_text("✅ 已回答 · 张三 (zhangsan)、李四 (lisi)")

    response = sandbox.http.post(f"{sandbox.server_url}/api/session/{stopped['session_id']}/timeout")
    assert response.json()["success"] is True
    expect(by(other, "answered")).to_have_text("⏹ AI 已停止等待")
