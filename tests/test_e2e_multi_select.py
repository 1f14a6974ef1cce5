"""Pick-several answers in a text chat (the webhook robot, direct mode) end to end: a real MCP client over stdio
asks with `multi_select`, the person replies "1 5" (no option 5: asked again, nothing taken), then "１，３".
(The AI bot's vote card: tests/test_e2e_aibot.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Stack
from tests.test_e2e_choices import agent, asked, call, reply_as

pytestmark = pytest.mark.e2e

CHAT = "chatMulti"


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(mode="direct", tmp=tmp_path_factory.mktemp("multi"))
    try:
        yield stack.start()
    finally:
        stack.stop()


async def test_pick_several_by_numbers_in_a_text_chat_over_stdio(direct: Stack, tmp_path: Path) -> None:
    async with agent(direct, tmp_path, CHAT, "multi") as (client, chat):

        async def person() -> None:
            question, short_id = await asked(direct, chat, "这次发布哪些部分？")
            lines = question["content"].splitlines()
            assert "1. 前端" in lines and "4. 文档" in lines
            assert any("回复编号，可多选，如 1 3" in line for line in lines)
            await reply_as(chat, "zhangsan", "张三", "1 5")  # no option 5: a clarification, never a partial pick
            hints = [m for m in await chat.messages(question["seq"], wait=1) if "可多选" in (m["content"] or "")]
            assert hints and short_id in hints[0]["content"]
            status = (await chat.http.get(f"{direct.server_url}/api/poll/{short_id}")).json()
            assert status["status"] == "waiting" and status["choices"] == []
            await reply_as(chat, "zhangsan", "张三", "１，３")

        arguments = {
            "message": "这次发布哪些部分？",
            "options": ["前端", "后端", "数据库", "文档"],
            "multi_select": True,
        }
        result = await call(client, "send_and_wait_reply", arguments, person)
    assert result["status"] == "success"
    assert result["choice"] == {"index": 0, "label": "前端"}
    assert result["choices"] == [{"index": 0, "label": "前端"}, {"index": 2, "label": "数据库"}]
    assert '"前端" (option 1), "数据库" (option 3)' in result["message"]
