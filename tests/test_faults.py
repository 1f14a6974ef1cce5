"""Faults end to end, on real processes (tests/procs.py). After each fault the suite works (a send + reply round
trip succeeds) or is visibly down (/health 503, or the process exited non-zero with one line); no reply is lost,
none is recorded twice, and no question waits that no person was shown.

The worker's side: a fault proxy (tests/fault_proxy.py) between the worker and the fake WeCom gives odd answers,
resets, slow bodies and hangs; the worker is SIGKILLed during sends and during a replay; a 1,000-callback backlog
drains by itself; the spool's disk fills up.
The server's side: odd WeCom answers to its hints (direct mode), SIGKILL with 30 sends in flight, its store's disk
fills up (direct and relay), two servers on one data directory, a data directory it cannot write, clients that
drip their request bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fault_proxy import ODD_ANSWERS, Fault, FaultProxy, redirecting_server
from tests.helpers import eventually, free_port
from tests.procs import BOT_KEY, Proc, Stack

pytestmark = pytest.mark.e2e

FAST_WORKER = {
    "WECOM_RETRY_DEADLINE": "10",
    "RECONNECT_MIN_DELAY": "0.1",
    "RECONNECT_MAX_DELAY": "0.5",
    "HIL_LINK_DOWN_GRACE": "3",
    "HIL_PING_INTERVAL": "2",
    "HIL_PING_TIMEOUT": "2",
}


# --- helpers ------------------------------------------------------------------------------------------------------


def worker_health(stack: Stack) -> httpx.Response:
    return httpx.get(f"{stack.worker_url}/health", timeout=5)


def assert_worker_healthy(stack: Stack) -> None:
    health = worker_health(stack)
    assert health.status_code == 200, health.text
    assert health.json()["ws_connected"] is True, health.text
    assert httpx.get(f"{stack.server_url}/health", timeout=5).json()["worker_connected"] is True


def question_in_chat(stack: Stack, chat_id: str, short_id: str) -> str:
    found = [m["content"] for m in stack.messages(chat_id) if m["content"].startswith(f"[#{short_id}")]
    assert len(found) == 1, f"question #{short_id} reached {chat_id} {len(found)} times"
    return found[0]


def round_trip(stack: Stack, chat_id: str) -> None:
    """A question goes out, a person quote-replies, the answer comes back: the whole relay works."""
    sent = stack.send("还能正常问答吗？", chat_id=chat_id)
    assert sent["success"], sent
    stack.reply(chat_id, "能", quote=question_in_chat(stack, chat_id, sent["short_id"]))
    polled = stack.poll(sent["session_id"], wait=10)
    assert polled["status"] == "replied" and [r["content"] for r in polled["replies"]] == ["能"], polled


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in Prometheus text."""
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def spool_depth(stack: Stack) -> int:
    return int(worker_health(stack).json()["spooled_callbacks"])


async def _gather_posts(url: str, bodies: list[dict[str, Any]], concurrency: int) -> list[httpx.Response]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60) as http:

        async def post(body: dict[str, Any]) -> httpx.Response:
            async with gate:
                return await http.post(url, json=body)

        return await asyncio.gather(*(post(b) for b in bodies))


def ask_many(stack: Stack, chat_id: str, count: int) -> list[dict[str, Any]]:
    """`count` questions in one chat, sent concurrently; each with the text that reached the chat."""
    bodies = [{"message": f"第 {i} 个问题", "chat_id": chat_id} for i in range(count)]
    sent = [r.json() for r in asyncio.run(_gather_posts(f"{stack.server_url}/api/send", bodies, 50))]
    assert all(s["success"] for s in sent), [s for s in sent if not s["success"]][:3]
    by_short_id = {m["content"][2:10]: m["content"] for m in stack.messages(chat_id)}
    return [{**s, "content": by_short_id[s["short_id"]]} for s in sent]


def spool_replies_while_the_server_is_down(stack: Stack, questions: list[dict[str, Any]], chat_id: str) -> None:
    """Stop the server; every question gets a quote-reply, which the worker takes (200) and spools."""
    stack.procs["server"].stop()
    eventually(lambda: not worker_health(stack).json()["ws_connected"], 10, "worker did not notice the server left")
    bodies = [{"chat_id": chat_id, "text": f"回答 {q['short_id']}", "quote": q["content"]} for q in questions]
    records = [r.json() for r in asyncio.run(_gather_posts(f"{stack.fake_url}/_fake/reply", bodies, 16))]
    assert all(r["responses"][0]["status_code"] == 200 for r in records), records[:2]
    assert spool_depth(stack) == len(questions)


def assert_each_replied_once(stack: Stack, questions: list[dict[str, Any]]) -> None:
    async def polls() -> list[dict[str, Any]]:
        gate = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=stack.server_url, timeout=30) as http:

            async def poll(session_id: str) -> dict[str, Any]:
                async with gate:
                    return (await http.get(f"/api/poll/{session_id}")).json()

            return await asyncio.gather(*(poll(q["session_id"]) for q in questions))

    for question, polled in zip(questions, asyncio.run(polls()), strict=True):
        assert polled["status"] == "replied", polled
        assert [r["content"] for r in polled["replies"]] == [f"回答 {question['short_id']}"], polled


# --- a fault proxy in front of WeCom --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, FaultProxy]]:
    stack = Stack(mode="relay", tmp=tmp_path_factory.mktemp("faulty"))
    with FaultProxy(stack.fake_url, path_prefix="/cgi-bin/") as proxy:
        stack.worker_env.update({**FAST_WORKER, "WECOM_API_BASE": proxy.url})
        try:
            yield stack.start(), proxy
        finally:
            stack.stop()


def test_each_odd_wecom_answer_fails_at_most_that_send(faulty: tuple[Stack, FaultProxy]) -> None:
    stack, proxy = faulty
    for name, fault in ODD_ANSWERS.items():
        proxy.clear()
        proxy.inject(fault)
        response = httpx.post(
            f"{stack.server_url}/api/send", json={"message": f"odd {name}", "chat_id": f"chat-{name}"}, timeout=60
        )
        assert response.status_code == 200, (name, response.text)
        sent = response.json()
        assert proxy.pending == 0, f"{name}: the worker never asked WeCom"
        if sent["success"]:  # retried past the odd answer
            question_in_chat(stack, f"chat-{name}", sent["short_id"])
        else:
            assert sent["error"], sent
            assert stack.poll(sent["session_id"])["status"] == "failed", (name, sent)  # not left waiting
        assert_worker_healthy(stack)
    metrics = httpx.get(f"{stack.worker_url}/metrics").text
    assert metric(metrics, "hil_worker_reconnects_total") == 0  # the link never dropped
    round_trip(stack, "chat-after-odd-answers")


def test_an_image_url_that_cannot_be_fetched_fails_that_send_only(faulty: tuple[Stack, FaultProxy]) -> None:
    stack, _ = faulty
    for url in ("http://127.0.0.1:99999/x.png", "http://xn--a.invalid/x.png", f"http://127.0.0.1:{free_port()}/x.png"):
        response = httpx.post(
            f"{stack.server_url}/api/send",
            json={"message": "带图的问题", "chat_id": "chat-image", "images": [url]},
            timeout=60,
        )
        assert response.status_code < 500, (url, response.text)
        if response.status_code == 200:
            assert response.json()["success"] is False, response.text
        assert_worker_healthy(stack)
    assert stack.messages("chat-image") == []  # nothing half-sent
    round_trip(stack, "chat-after-image")


def test_a_reset_a_slow_body_and_a_hang_at_wecom(faulty: tuple[Stack, FaultProxy]) -> None:
    stack, proxy = faulty
    proxy.clear()
    proxy.inject(Fault.reset())
    sent = stack.send("连接被重置", chat_id="chat-reset")
    assert sent["success"], sent  # retried
    question_in_chat(stack, "chat-reset", sent["short_id"])

    proxy.inject(Fault.slow(0.02))
    sent = stack.send("慢慢回答", chat_id="chat-slow")
    assert sent["success"], sent
    question_in_chat(stack, "chat-slow", sent["short_id"])

    proxy.inject(Fault.hang())
    with ThreadPoolExecutor(1) as pool:
        hung = pool.submit(stack.send, "卡住的发送", chat_id="chat-hang")
        proxy.wait_seen("hang")
        # One send hangs at WeCom; the worker still does everything else, and says it is healthy because it is.
        assert_worker_healthy(stack)
        round_trip(stack, "chat-while-hung")
        proxy.release()
        sent = hung.result(timeout=30)
    assert sent["success"], sent  # the dropped connection was retried
    question_in_chat(stack, "chat-hang", sent["short_id"])
    assert_worker_healthy(stack)


# --- SIGKILL ---------------------------------------------------------------------------------------------------------


def test_sigkill_of_the_worker_during_sends(tmp_path: Path) -> None:
    stack = Stack(mode="relay", tmp=tmp_path)
    with FaultProxy(stack.fake_url, path_prefix="/cgi-bin/") as proxy:
        stack.worker_env.update({**FAST_WORKER, "WECOM_API_BASE": proxy.url})
        try:
            stack.start()
            proxy.inject(Fault.slow(0.03), count=30)  # each answer takes ~1 s: sends are in flight at the kill
            with ThreadPoolExecutor(30) as pool:
                futures = [pool.submit(stack.send, f"第 {i} 个", chat_id="chat-kill") for i in range(30)]
                eventually(lambda: sum(f.done() for f in futures) >= 4, 20, "no send was answered")
                stack.procs["worker"].kill()
                results = [f.result(timeout=60) for f in futures]
            proxy.clear()
            stack.start_worker()
            in_chat = [m["content"][2:10] for m in stack.messages("chat-kill")]
            assert len(in_chat) == len(set(in_chat)), "a question reached the chat twice"
            waiting = [r for r in results if r["success"]]
            assert waiting and len(waiting) < 30, "the kill did not land during the sends"
            for r in results:
                status = stack.poll(r["session_id"])["status"]
                assert status == ("waiting" if r["success"] else "failed"), (r, status)
            for r in waiting:  # every question the agent was told is out there really is, and gets its answer
                stack.reply(
                    "chat-kill", f"回答 {r['short_id']}", quote=question_in_chat(stack, "chat-kill", r["short_id"])
                )
            for r in waiting:
                polled = stack.poll(r["session_id"], wait=10)
                assert [x["content"] for x in polled["replies"]] == [f"回答 {r['short_id']}"], polled
            round_trip(stack, "chat-after-kill")
        finally:
            stack.stop()


def test_sigkill_of_the_worker_during_a_replay(tmp_path: Path) -> None:
    stack = Stack(mode="relay", tmp=tmp_path, worker_env={**FAST_WORKER, "HIL_SPOOL_WINDOW": "1"})
    try:
        stack.start()
        questions = ask_many(stack, "chat-replay", 300)
        spool_replies_while_the_server_is_down(stack, questions, "chat-replay")
        stack.start_server()
        depths: list[int] = []

        def replay_under_way() -> bool:
            depths.append(spool_depth(stack))
            return 0 < depths[-1] < 250

        eventually(replay_under_way, 20, "the replay did not start")
        stack.procs["worker"].kill()
        stack.start_worker()
        eventually(lambda: spool_depth(stack) == 0, 30, "the spool did not drain after the restart")
        assert_each_replied_once(stack, questions)
        server_metrics = httpx.get(f"{stack.server_url}/metrics").text
        assert metric(server_metrics, "hil_replies_matched_total") == 300
        round_trip(stack, "chat-after-replay-kill")
    finally:
        stack.stop()


# --- a backlog drains by itself ------------------------------------------------------------------------------------


def test_a_backlog_of_1000_callbacks_drains_by_itself(tmp_path: Path) -> None:
    stack = Stack(mode="relay", tmp=tmp_path, worker_env=dict(FAST_WORKER))
    try:
        stack.start()
        questions = ask_many(stack, "chat-backlog", 1000)
        spool_replies_while_the_server_is_down(stack, questions, "chat-backlog")
        started = time.monotonic()
        stack.start_server()
        up = time.monotonic()
        # No new callback arrives from here on: the worker must send all of them by itself.
        eventually(lambda: spool_depth(stack) == 0, 60, "the backlog did not drain")
        done = time.monotonic()
        print(
            f"\n1,000 spooled callbacks drained {done - up:.2f}s after the server answered /health "
            f"({done - started:.2f}s after it was started)"
        )
        assert_each_replied_once(stack, questions)
        assert worker_health(stack).json()["dead_callbacks"] == 0
    finally:
        stack.stop()


# --- the spool's disk fills up ---------------------------------------------------------------------------------------
# (A read-only disk cannot be made here: Linux refuses to remount a file system read-only while the worker holds
# files open for writing. tests/test_worker_app.py covers it with a read-only SQLite connection.)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs for the worker's data dir (needs root; skipped otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, check=False
    )
    if mounted.returncode != 0 or os.geteuid() != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Write to the disk until it is full (ENOSPC); remove the returned file to make room again."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    return filler


def test_the_spool_on_a_full_disk(tiny_disk: Path, tmp_path: Path) -> None:
    stack = Stack(mode="relay", tmp=tmp_path, worker_env={**FAST_WORKER, "HIL_DATA_DIR": str(tiny_disk)})
    try:
        stack.start()
        sent = stack.send("磁盘满了也不能丢回答", chat_id="chat-disk")
        question = question_in_chat(stack, "chat-disk", sent["short_id"])

        filler = fill(tiny_disk)
        refused = stack.reply("chat-disk", "第一次回答", quote=question, msgid="disk-full-1")
        assert refused["responses"][0]["status_code"] == 503  # not stored, so not acknowledged: WeCom retries
        health = worker_health(stack)
        assert health.status_code == 503 and "spool cannot be written" in health.json()["reason"], health.text
        filler.unlink()
        eventually(lambda: worker_health(stack).status_code == 200, 10, "worker did not notice the disk is back")
        retried = stack.reply("chat-disk", "第一次回答", quote=question, msgid="disk-full-1")  # WeCom's retry
        assert retried["responses"][0]["status_code"] == 200
        polled = stack.poll(sent["session_id"], wait=10)
        assert [r["content"] for r in polled["replies"]] == ["第一次回答"], polled

        round_trip(stack, "chat-after-disk")
    finally:
        stack.stop()


# --- a link that cannot be kept alive ------------------------------------------------------------------------------


def test_a_worker_whose_link_keeps_crashing_exits_1(tmp_path: Path) -> None:
    with redirecting_server() as url:
        worker = Proc(
            "hil-worker",
            ["-m", "devcloud_worker.worker"],
            {
                "HIL_URL": url,
                "BOT_KEY": BOT_KEY,
                "CALLBACK_HOST": "127.0.0.1",
                "CALLBACK_PORT": str(free_port()),
                "HIL_DATA_DIR": str(tmp_path / "worker-data"),
                "RECONNECT_MIN_DELAY": "0.05",
                "RECONNECT_MAX_DELAY": "0.1",
                "HIL_LINK_MAX_CRASHES": "3",
            },
            tmp_path / "worker.log",
        ).start()
        try:
            assert worker.popen is not None
            assert worker.popen.wait(30) == 1, worker.log()
        finally:
            worker.stop()
    log = worker.log()
    assert "stopped, the worker cannot be kept alive" in log and "InvalidURI" in log, log


# --- the server's side -------------------------------------------------------------------------------------------


def server_health(stack: Stack) -> httpx.Response:
    return httpx.get(f"{stack.server_url}/health", timeout=5)


def plain_round_trip(stack: Stack, chat_id: str) -> None:
    sent = stack.send("还好吗？", chat_id=chat_id)
    assert sent["success"], sent
    stack.reply(chat_id, "好的")
    assert stack.poll(sent["session_id"], wait=10)["status"] == "replied"


@pytest.mark.parametrize("answer", ["errcode_list", "errcode_string", "not_json", "gzip_garbage"])
def test_odd_answers_to_hints_leave_the_direct_server_working(answer: str, tmp_path: Path) -> None:
    stack = Stack(mode="direct", tmp=tmp_path)
    with FaultProxy(stack.fake_url, path_prefix="/cgi-bin/") as proxy:
        stack.server_env["WECOM_API_BASE"] = proxy.url
        with stack.running():
            proxy.inject(ODD_ANSWERS[answer], count=2)
            stack.reply("chat-hint", "没有问题在等，机器人会回一个提示")  # the hint gets the odd answer
            stack.reply("chat-hint", "再来一次")
            eventually(lambda: proxy.pending == 0, 10, "the hints never reached WeCom")
            assert server_health(stack).status_code == 200, server_health(stack).text
            plain_round_trip(stack, "chat-after-hint")
            metrics = httpx.get(f"{stack.server_url}/metrics", timeout=5).text
            assert metric(metrics, "hil_hints_sent_total") >= 2


def sending(stack: Stack) -> int:
    """Questions the server holds as `sending`, read from its store beside it (SQLite WAL allows a reader)."""
    path = stack.tmp / "server-data" / "hil.db"
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM questions WHERE status = 'sending'").fetchone()[0])


def test_sigkill_with_30_sends_in_flight_leaves_no_phantom_question(tmp_path: Path) -> None:
    stack = Stack(mode="direct", tmp=tmp_path, server_env={"WECOM_RETRY_DEADLINE": "60"})
    with stack.running():
        stack.fake("fail", {"errcodes": [45009] * 1000})  # WeCom refuses everything: every send keeps retrying
        bodies = [{"message": f"在途问题 {i}", "chat_id": "chat-kill"} for i in range(30)]
        with ThreadPoolExecutor(1) as pool:
            posting = pool.submit(asyncio.run, _gather_posts(f"{stack.server_url}/api/send", bodies, 30))
            eventually(lambda: sending(stack) == 30, 20, "the 30 questions were not all being sent")
            stack.procs["server"].kill()
            with contextlib.suppress(httpx.HTTPError):
                posting.result(30)
        stack.fake("reset", {})
        stack.start_server()
        status = httpx.get(f"{stack.server_url}/status.json", timeout=5).json()
        assert status["waiting"] == [], "a question waits that no person was shown"
        failed = [r for r in status["recent"] if r["outcome"] == "failed"]
        assert len(failed) == 30, status["recent"]
        for event in failed:
            polled = stack.poll(event["short_id"])
            assert polled["status"] == "failed" and "重启" in polled["message"], polled
        # The chat is told not to answer the half-sent questions.
        eventually(lambda: sum("已作废" in (m["content"] or "") for m in stack.messages()) == 30, 20, "no notices")
        plain_round_trip(stack, "chat-after-kill")


@pytest.mark.parametrize("mode", ["direct", "relay"])
def test_a_full_disk_under_the_server_loses_no_reply(mode: str, tiny_disk: Path, tmp_path: Path) -> None:
    env = {"HIL_DATA_DIR": str(tiny_disk / "server"), "HIL_STORE_RETRY_INTERVAL": "0.2"}
    stack = Stack(mode=mode, tmp=tmp_path, server_env=env, worker_env=dict(FAST_WORKER))
    with stack.running():
        sent = stack.send("磁盘满了也不能丢回答", chat_id="chat-disk")
        assert sent["success"], sent
        filler = fill(tiny_disk)
        # The person answers while nothing can be written: WeCom (or the worker) is told to try again.
        first = stack.reply("chat-disk", "可以", msgid="disk-1")
        eventually(lambda: server_health(stack).status_code == 503, 15, "/health did not say the store is down")
        assert "cannot write" in server_health(stack).json()["reason"]
        filler.unlink()
        eventually(lambda: server_health(stack).status_code == 200, 15, "the store did not recover")
        if mode == "direct":
            assert first["responses"][0]["status_code"] == 503, first
            # WeCom's retry of the same message (msgid), played once the store is back rather than on WeCom's 1.5 s
            # clock, which a recovery on a busy machine outlasts.
            again = stack.reply("chat-disk", "可以", msgid="disk-1")
            assert again["responses"][0]["status_code"] == 200, again
        polled = stack.poll(sent["session_id"], wait=15)
        assert polled["status"] == "replied", polled
        assert [r["content"] for r in polled["replies"]] == ["可以"]  # exactly once
        # Durable: after a restart the reply is still there, once.
        stack.procs["server"].stop()
        stack.start_server()
        if mode == "relay":
            stack.wait_worker()
        assert [r["content"] for r in stack.poll(sent["session_id"])["replies"]] == ["可以"]
        plain_round_trip(stack, "chat-disk-after")


def test_two_servers_on_one_data_dir(tmp_path: Path) -> None:
    stack = Stack(mode="direct", tmp=tmp_path)
    try:
        stack.start()
        env = {**stack.server_process_env(), "HIL_PORT": str(free_port())}
        second = Proc("second", ["-m", "hil_server.app"], env, tmp_path / "second.log").start()
        assert second.popen is not None and second.popen.wait(20) == 1
        output = second.log().strip()
        assert output.count("\n") == 0 and "is in use by pid" in output, output
        assert f"pid {stack.procs['server'].popen.pid} " in output  # type: ignore[union-attr]
        plain_round_trip(stack, "chat-one-writer")
    finally:
        stack.stop()


def test_an_unwritable_data_dir_is_one_line_and_exit_1(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    stack = Stack(mode="direct", tmp=tmp_path, server_env={"HIL_DATA_DIR": str(blocked / "data")})
    proc = Proc("hil-server", ["-m", "hil_server.app"], stack.server_process_env(), tmp_path / "server.log").start()
    assert proc.popen is not None and proc.popen.wait(20) == 1
    output = proc.log().strip()
    assert output.count("\n") == 0 and "not writable" in output and "HIL_DATA_DIR" in output, output


def test_clients_dripping_bodies_are_cut_off(tmp_path: Path) -> None:
    stack = Stack(mode="direct", tmp=tmp_path, server_env={"HIL_BODY_TIMEOUT": "1"})

    async def drip(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = b"POST /api/send HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
        writer.write(head + b"{")
        answer = b""
        with contextlib.suppress(OSError):
            for _ in range(20):  # a byte every 0.2 s (4 s if nobody stops it), reading what the server says
                writer.write(b" ")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    answer += await asyncio.wait_for(reader.read(65536), 0.2)
                if answer:
                    break
        writer.close()
        return answer

    async def fifty() -> list[bytes]:
        return await asyncio.gather(*(drip(stack.server_port) for _ in range(50)))

    try:
        stack.start()
        started = time.monotonic()
        answers = asyncio.run(fifty())
        assert time.monotonic() - started < 4
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), {a[:40] for a in answers}
        plain_round_trip(stack, "chat-after-drip")
    finally:
        stack.stop()
