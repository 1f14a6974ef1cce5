"""End to end: the real fake WeCom, HIL Server and (relay) worker processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
import re
import time

import httpx
import pytest

from tests import helpers
from tests.procs import BOT_KEY, Stack

pytestmark = pytest.mark.e2e

HEADER = re.compile(r"^\[#([0-9a-f]{8})(?: ([^\]]*))?\]")


def question_in_chat(stack: Stack, chat: str, short_id: str) -> dict:
    for message in stack.messages(chat):
        if message["content"] and message["content"].startswith(f"[#{short_id}"):
            return message
    raise AssertionError(f"#{short_id} not in chat {chat}: {stack.messages(chat)}")


def test_question_reaches_chat_and_plain_reply_comes_back(stack: Stack) -> None:
    sent = stack.send("要合并这个 PR 吗？", chat_id="chat1", project_name="my project")
    assert sent["success"] is True, sent
    [message] = stack.messages("chat1")
    assert message["content"] == f"[#{sent['short_id']} my project]\n要合并这个 PR 吗？"
    assert message["key"] == BOT_KEY

    response = stack.reply("chat1", "合并吧")  # a plain reply: only one question waits in this chat
    assert response["responses"][0]["status_code"] == 200
    polled = stack.poll(sent["session_id"], wait=5)
    assert polled["status"] == "replied"
    assert [r["content"] for r in polled["replies"]] == ["合并吧"]
    assert polled["replies"][0]["from_user"]["userid"] == "zhangsan"


def test_three_waiting_plain_reply_hints_then_quote_matches_one(stack: Stack) -> None:
    sent = [stack.send(f"问题 {i}：继续吗？", chat_id="chat3", project_name="proj") for i in range(3)]
    assert all(s["success"] for s in sent)
    questions = stack.messages("chat3", wait=3)

    stack.reply("chat3", "继续")
    hints = [m for m in stack.messages("chat3", wait=4) if m["msgtype"] == "markdown"]
    assert len(hints) == 1
    for s in sent:
        assert f"#{s['short_id']}" in hints[0]["content"]
        assert stack.poll(s["session_id"])["status"] == "waiting"

    second = questions[1]["content"]
    stack.reply("chat3", "只回答第二个", quote=second, quote_sender="HIL助手")
    polled = stack.poll(sent[1]["session_id"], wait=5)
    assert polled["status"] == "replied" and polled["replies"][0]["content"] == "只回答第二个"
    assert polled["replies"][0]["matched_by"] == "quote"
    assert stack.poll(sent[0]["session_id"])["status"] == "waiting"
    assert stack.poll(sent[2]["session_id"])["status"] == "waiting"


def test_message_with_nothing_waiting_gets_chat_id_hint(stack: Stack) -> None:
    stack.reply("lonely-chat", "你好")
    [hint] = stack.messages("lonely-chat", wait=1)
    assert "lonely-chat" in hint["content"] and "DEFAULT_CHAT_ID" in hint["content"]


def test_long_question_is_split_with_header_on_every_part(stack: Stack) -> None:
    body = "\n".join(f"第 {i} 行：这是一段很长的说明文字，用来测试分段发送。" for i in range(120))
    assert 8_000 < len(body.encode()) < 10_000
    sent = stack.send(body, chat_id="chat-long", project_name="长消息")
    assert sent["success"], sent
    parts = stack.messages("chat-long")
    assert len(parts) >= 4
    for i, part in enumerate(parts, start=1):
        assert part["content"].startswith(f"[#{sent['short_id']} 长消息] ({i}/{len(parts)})\n")
        assert len(part["content"].encode()) <= 2048
    rebuilt = "\n".join(p["content"].split("\n", 1)[1] for p in parts)
    assert rebuilt == body


def test_two_hundred_concurrent_questions_each_matched(stack: Stack) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(base_url=stack.server_url, timeout=60) as http:
            sends = await asyncio.gather(
                *(http.post("/api/send", json={"message": f"并发问题 {i}", "chat_id": "chat200"}) for i in range(200))
            )
            sessions = [r.json() for r in sends]
            assert all(s["success"] for s in sessions), [s for s in sessions if not s["success"]][:3]
            by_short = {s["short_id"]: s for s in sessions}
            questions = [m for m in stack.messages("chat200", wait=200, timeout=30) if m["msgtype"] == "text"]
            assert len(questions) == 200
            random.shuffle(questions)
        async with httpx.AsyncClient(base_url=stack.fake_url, timeout=60) as fake:
            replies = await asyncio.gather(
                *(
                    fake.post(
                        "/_fake/reply",
                        json={
                            "chat_id": "chat200",
                            "quote": q["content"],
                            "text": f"answer for {HEADER.match(q['content']).group(1)}",
                        },
                    )
                    for q in questions
                )
            )
            assert all(r.json()["responses"][0]["status_code"] == 200 for r in replies)
        async with httpx.AsyncClient(base_url=stack.server_url, timeout=60) as http:
            polls = await asyncio.gather(
                *(http.get(f"/api/poll/{s['session_id']}", params={"wait": 10}) for s in sessions)
            )
        matched = 0
        for poll in polls:
            body = poll.json()
            short = next(k for k, v in by_short.items() if v["session_id"] == body["session_id"])
            assert body["status"] == "replied"
            assert [r["content"] for r in body["replies"]] == [f"answer for {short}"]
            matched += 1
        assert matched == 200

    asyncio.run(run())


def test_duplicate_callbacks_are_recorded_once(stack: Stack) -> None:
    sent = stack.send("确认吗？", chat_id="chat-dup")
    [question] = stack.messages("chat-dup")
    result = stack.reply("chat-dup", "确认", quote=question["content"], repeat=3)
    assert [r["status_code"] for r in result["responses"]] == [200, 200, 200]
    time.sleep(0.5)  # let a relayed copy reach the server (if one were going to be recorded twice)
    polled = stack.poll(sent["session_id"])
    assert len(polled["replies"]) == 1


def test_rate_limit_errors_are_retried_and_delivered_once(stack: Stack) -> None:
    stack.fake("fail", {"errcodes": [45009, 45009]})
    sent = stack.send("限流也要送达", chat_id="chat-45009")
    assert sent["success"], sent
    assert [m["content"] for m in stack.messages("chat-45009")] == [f"[#{sent['short_id']}]\n限流也要送达"]
    attempts = httpx.get(f"{stack.fake_url}/_fake/attempts").json()["attempts"]
    assert [a["errcode"] for a in attempts] == [45009, 45009, 0]


def test_invalid_bot_key_is_reported_in_words_quickly(stack: Stack) -> None:
    stack.fake("fail", {"errcodes": [93000]})
    start = time.monotonic()
    sent = stack.send("这个发不出去", chat_id="chat-93000")
    assert time.monotonic() - start < 2
    assert sent["success"] is False
    assert "93000" in sent["error"] and "BOT_KEY" in sent["error"]
    assert stack.poll(sent["session_id"])["status"] == "failed"  # not left waiting forever


def test_burst_beyond_rate_limit_is_all_delivered(stack: Stack) -> None:
    # WeCom's limit is 20 a minute; the same shape in half-second windows, so the burst waits out six of them fast.
    stack.fake("config", {"rate_limit": 10, "rate_window": 0.5})

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=stack.server_url, timeout=120) as http:
            responses = await asyncio.gather(
                *(http.post("/api/send", json={"message": f"burst {i}", "chat_id": "chat-burst"}) for i in range(60))
            )
            return [r.json() for r in responses]

    results = asyncio.run(run())
    assert all(r["success"] for r in results), [r for r in results if not r["success"]][:3]
    delivered = [m["content"] for m in stack.messages("chat-burst")]
    assert sorted(delivered) == sorted(f"[#{r['short_id']}]\nburst {i}" for i, r in enumerate(results))
    assert len(set(delivered)) == 60


def test_sessions_survive_sigkill(stack: Stack) -> None:
    # Twenty are as many as a hundred for the store: each is its own row, written before the send answered.
    sent = [stack.send(f"重启前的问题 {i}", chat_id="chat-kill") for i in range(20)]
    assert all(s["success"] for s in sent)
    questions = stack.messages("chat-kill", wait=20)
    stack.procs["server"].kill()
    stack.start_server()
    if stack.mode == "relay":
        stack.wait_worker()
    for question in questions:
        result = stack.reply("chat-kill", "重启后的回答", quote=question["content"])
        assert result["responses"][0]["status_code"] == 200
    for s in sent:
        polled = stack.poll(s["session_id"], wait=5)
        assert polled["status"] == "replied", polled
        assert polled["replies"][0]["content"] == "重启后的回答"


def test_reply_while_server_is_down_is_not_lost(stack: Stack) -> None:
    sent = stack.send("服务器重启时回复", chat_id="chat-down")
    [question] = stack.messages("chat-down")
    stack.procs["server"].stop()
    # One message, sent while the server is down; WeCom tries again (same msgid) until one attempt gets HTTP 200.
    # The retry is played once the server answers again, not on a clock: a restart on a busy machine takes longer
    # than WeCom's three attempts would (the state this test waits on is "server back", not "1.5 s passed").
    reply = {"chat_id": "chat-down", "quote": question["content"], "text": "我在你重启时回答", "msgid": "down-1"}
    first = stack.fake("reply", reply)
    if stack.mode == "relay":
        # The worker took it at once and spooled it; the server was down, not the worker.
        assert first["responses"][0]["status_code"] == 200, first
    else:
        assert first["responses"][0]["status_code"] is None, first  # nobody listening: WeCom will try again
    stack.start_server()
    if stack.mode == "relay":
        stack.wait_worker()  # the spool replays on the new link
    else:
        again = stack.fake("reply", reply)
        assert again["responses"][0]["status_code"] == 200, again
    polled = stack.poll(sent["session_id"], wait=10)
    assert polled["status"] == "replied", polled
    assert [r["content"] for r in polled["replies"]] == ["我在你重启时回答"]


@pytest.fixture
def relay(tmp_path) -> Stack:
    s = Stack(mode="relay", tmp=tmp_path)
    try:
        yield s.start()
    finally:
        s.stop()


def test_worker_with_wrong_token_is_refused(relay: Stack) -> None:
    with httpx.Client() as http:
        import websockets.sync.client as ws_client
        from websockets.exceptions import InvalidStatus

        with pytest.raises(InvalidStatus) as refused:
            ws_client.connect(f"ws://127.0.0.1:{relay.server_port}/ws?worker_id=intruder&token=wrong", proxy=None)
        assert refused.value.response.status_code == 403
        with pytest.raises(InvalidStatus):
            ws_client.connect(
                f"ws://127.0.0.1:{relay.server_port}/ws?worker_id=intruder",
                additional_headers={"Authorization": "Bearer wrong"},
                proxy=None,
            )
        assert http.get(f"{relay.server_url}/health").json()["worker_count"] == 1


def test_worker_token_in_header_is_accepted(relay: Stack) -> None:
    import websockets.sync.client as ws_client

    from tests.procs import WORKER_TOKEN

    with ws_client.connect(
        f"ws://127.0.0.1:{relay.server_port}/ws?worker_id=header-worker",
        additional_headers={"Authorization": f"Bearer {WORKER_TOKEN}"},
        proxy=None,
    ) as ws:
        assert '"hello"' in ws.recv(timeout=5)
        assert httpx.get(f"{relay.server_url}/health").json()["worker_count"] == 2


def test_worker_is_back_within_5s_after_server_restart(relay: Stack) -> None:
    relay.procs["server"].stop()  # SIGTERM: the server closes the link with "going away"
    relay.start_server()
    assert relay.wait_worker(timeout=5) < 5
    sent = relay.send("重启后还能发吗？", chat_id="chat-restart")
    assert sent["success"], sent
    relay.reply("chat-restart", "能")
    assert relay.poll(sent["session_id"], wait=5)["replies"][0]["content"] == "能"


def test_logs_never_contain_secrets(stack: Stack) -> None:
    sent = stack.send("日志里不能有密钥", chat_id="chat-secret")
    stack.reply("chat-secret", "好")
    stack.poll(sent["session_id"], wait=5)
    stack.stop()
    logs = stack.logs()
    assert "/api/send" in logs  # the access log is there, so the check below means something
    from tests.procs import WORKER_TOKEN

    for secret in (BOT_KEY, WORKER_TOKEN):
        assert secret not in logs


def test_failed_send_is_tried_on_the_next_worker(relay: Stack, tmp_path) -> None:
    from tests.helpers import free_port
    from tests.procs import Proc

    # A second worker whose WeCom is unreachable: every send it takes fails with a network error.
    port = free_port()
    broken = Proc(
        "broken-worker",
        ["-m", "devcloud_worker.worker"],
        {
            "HIL_URL": f"ws://127.0.0.1:{relay.server_port}/ws",
            "HIL_TOKEN": relay.procs["worker"].env["HIL_TOKEN"],
            "BOT_KEY": BOT_KEY,
            "CALLBACK_HOST": "127.0.0.1",
            "CALLBACK_PORT": str(port),
            "WECOM_API_BASE": f"http://127.0.0.1:{free_port()}",
            "WECOM_RETRY_DEADLINE": "0.3",
            "HIL_DATA_DIR": str(tmp_path / "broken-data"),
            "WORKER_ID": "broken-worker",
        },
        tmp_path / "broken.log",
        f"http://127.0.0.1:{port}/health",
    ).start()
    relay.procs["broken"] = broken
    deadline = time.monotonic() + 10
    while httpx.get(f"{relay.server_url}/health").json()["worker_count"] < 2:
        assert time.monotonic() < deadline, "second worker did not connect"
        time.sleep(0.05)
    results = [relay.send(f"故障转移 {i}", chat_id="chat-failover") for i in range(6)]
    assert all(r["success"] for r in results), results
    assert len(relay.messages("chat-failover")) == 6
    assert "trying the next worker" in relay.procs["server"].log()


def test_silent_worker_is_evicted(relay: Stack) -> None:
    import websockets.sync.client as ws_client

    from tests.procs import WORKER_TOKEN

    # Connects, then never answers the server's pings (HEARTBEAT_INTERVAL=1, HEARTBEAT_TIMEOUT=5 in tests).
    with ws_client.connect(f"ws://127.0.0.1:{relay.server_port}/ws?worker_id=silent&token={WORKER_TOKEN}", proxy=None):
        assert httpx.get(f"{relay.server_url}/health").json()["worker_count"] == 2
        deadline = time.monotonic() + 10
        while httpx.get(f"{relay.server_url}/health").json()["worker_count"] != 1:
            assert time.monotonic() < deadline, "silent worker was not evicted"
            time.sleep(0.2)
    assert "worker_id=silent silent for" in relay.procs["server"].log()
    # The live worker still serves.
    assert relay.send("还在吗", chat_id="chat-alive")["success"]


def test_images_go_out_after_the_text_and_image_replies_come_back(stack: Stack) -> None:
    import base64
    import hashlib

    png = helpers.png(4, 4, (255, 0, 0))
    uploaded = httpx.post(f"{stack.server_url}/api/upload-image", files={"file": ("shot.png", png, "image/png")}).json()
    assert uploaded["success"] and uploaded["image_url"].startswith("data:image/png;base64,")
    sent = stack.send("看下这张截图？", chat_id="chat-img", images=[uploaded["image_url"]], chat_type="single")
    assert sent["success"], sent
    text, image = stack.messages("chat-img")
    assert text["msgtype"] == "text" and image["msgtype"] == "image"
    assert image["image_md5"] == hashlib.md5(png).hexdigest()
    assert base64.b64decode(uploaded["image_url"].split(",", 1)[1]) == png

    stack.reply("chat-img", None, image_url="https://wecom.example/answer.png", chat_type="single")
    polled = stack.poll(sent["session_id"], wait=5)
    assert polled["replies"][0]["msg_type"] == "image"
    assert polled["replies"][0]["image_url"] == "https://wecom.example/answer.png"
