"""Faults on the HIL Server's side, on real processes: SIGKILL with sends in flight, a full disk, two servers on one
data directory, a data directory that cannot be written. After each the suite works (a send + reply round trip
succeeds) or is visibly down (/health 503, or the process exited non-zero with one line)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import Proc, Stack

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def running(mode: str, tmp: Path, **kw: Any) -> Iterator[Stack]:
    stack = Stack(mode=mode, tmp=tmp, **kw)
    try:
        stack.start()
        yield stack
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def health(stack: Stack) -> httpx.Response:
    return httpx.get(f"{stack.server_url}/health", timeout=5, trust_env=False)


def round_trip(stack: Stack, chat: str) -> None:
    """A question is asked, the person answers, the answer comes back: the suite works."""
    sent = stack.send("还好吗？", chat_id=chat)
    assert sent["success"], sent
    stack.reply(chat, "好的")
    assert stack.poll(sent["session_id"], wait=10)["status"] == "replied"


# --- SIGKILL with sends in flight ----------------------------------------------------------------------------------


def test_sigkill_with_30_sends_in_flight_leaves_no_phantom_question(tmp_path: Path) -> None:
    with running("direct", tmp_path, server_env={"WECOM_RETRY_DEADLINE": "60"}) as stack:
        stack.fake("fail", {"errcodes": [45009] * 1000})  # WeCom refuses everything: every send keeps retrying
        pool = ThreadPoolExecutor(30)
        for i in range(30):
            pool.submit(_send_quietly, stack, f"在途问题 {i}")
        wait_until(lambda: sending(stack) == 30, 20)
        stack.procs["server"].kill()
        pool.shutdown(wait=True)
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
        wait_until(lambda: sum("已作废" in (m["content"] or "") for m in stack.messages()) == 30, 20)
        round_trip(stack, "chat-after-kill")


def sending(stack: Stack) -> int:
    """Questions the server holds as `sending`, read from its store as a reader beside it (SQLite WAL)."""
    path = stack.tmp / "server-data" / "hil-server.sqlite3"
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as conn:
        return conn.execute("SELECT COUNT(*) FROM sessions WHERE status = 'sending'").fetchone()[0]


def _send_quietly(stack: Stack, message: str) -> None:
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"{stack.server_url}/api/send", json={"message": message, "chat_id": "chat-kill"}, timeout=60)


# --- a full disk ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of `size` at `path` (needs root; the test skips where it cannot mount one)."""
    path.mkdir(parents=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
            out.flush()
            os.fsync(out.fileno())
    return filler


@pytest.mark.parametrize("mode", ["direct", "relay"])
def test_a_full_disk_loses_no_reply(mode: str, tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk") as disk:
        env = {"HIL_DATA_DIR": str(disk / "server"), "HIL_STORE_RETRY_INTERVAL": "0.2"}
        with running(mode, tmp_path, server_env=env) as stack:
            sent = stack.send("磁盘满了也不能丢回答", chat_id="chat-disk")
            assert sent["success"], sent
            filler = fill(disk)
            # The person answers while nothing can be written: WeCom (or the worker) is told to try again.
            answered: dict[str, Any] = {}
            replying = threading.Thread(
                target=lambda: answered.update(stack.reply("chat-disk", "可以", wecom_retries=True, retry_interval=1.5))
            )
            replying.start()
            wait_until(lambda: health(stack).status_code == 503, 15)
            assert "cannot write" in health(stack).json()["reason"]
            filler.unlink()
            wait_until(lambda: health(stack).status_code == 200, 15)
            replying.join(30)
            polled = stack.poll(sent["session_id"], wait=15)
            assert polled["status"] == "replied", (polled, answered)
            assert [r["content"] for r in polled["replies"]] == ["可以"]  # exactly once
            if mode == "direct":
                codes = [r["status_code"] for r in answered["responses"]]
                assert codes[0] == 503 and codes[-1] == 200, codes
            # Durable: after a restart the reply is still there, once.
            stack.procs["server"].stop()
            stack.start_server()
            if mode == "relay":
                stack.wait_worker()
            assert [r["content"] for r in stack.poll(sent["session_id"])["replies"]] == ["可以"]
            round_trip(stack, "chat-disk-after")


# --- the data directory ----------------------------------------------------------------------------------------------


def test_two_servers_on_one_data_dir(tmp_path: Path) -> None:
    with running("direct", tmp_path) as stack:
        env = {**stack.server_process_env(), "HIL_PORT": "0"}
        second = Proc("second", ["-m", "hil_server.app"], env, tmp_path / "second.log").start()
        assert second.popen is not None
        assert second.popen.wait(20) == 1
        output = second.log().strip()
        assert output.count("\n") == 0 and "is in use by pid" in output, output
        assert str(stack.procs["server"].popen.pid) in output  # type: ignore[union-attr]
        round_trip(stack, "chat-one-writer")


def test_an_unwritable_data_dir_is_one_line_and_exit_1(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    stack = Stack(mode="direct", tmp=tmp_path, server_env={"HIL_DATA_DIR": str(blocked / "data")})
    proc = Proc("hil-server", ["-m", "hil_server.app"], stack.server_process_env(), tmp_path / "server.log").start()
    assert proc.popen is not None and proc.popen.wait(20) == 1
    output = proc.log().strip()
    assert output.count("\n") == 0 and "not writable" in output and "HIL_DATA_DIR" in output, output


def test_sigterm_exits_cleanly(tmp_path: Path) -> None:
    with running("direct", tmp_path) as stack:
        proc = stack.procs["server"]
        assert proc.popen is not None
        proc.popen.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal: systemd and docker see a clean stop.
        assert proc.popen.wait(15) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.log()
