"""Faults of a server on PostgreSQL (HIL_DATABASE_URL), as real processes: its database connections killed while
callbacks come in (pg_terminate_backend), and PostgreSQL restarted with questions waiting. Each ends with nothing
acknowledged lost, nothing doubled, and /health 503 while the database cannot take writes."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg

from tests.conftest_pg import PgServer
from tests.helpers import eventually
from tests.pg_backend import fresh_database_url
from tests.procs import Stack
from tests.test_faults import plain_round_trip, question_in_chat, server_health

FAST = {"HIL_STORE_RETRY_INTERVAL": "0.2"}


def kill_server_connections(maintenance_url: str) -> int:
    """Terminate every other session of the cluster (the server's pool and its LISTEN connection)."""
    with psycopg.connect(maintenance_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
        ).fetchall()
    return len(rows)


def test_the_servers_connections_killed_mid_callback_lose_and_double_nothing(
    pg_server: PgServer, tmp_path: Path
) -> None:
    url = fresh_database_url(pg_server.url)
    stack = Stack(mode="direct", tmp=tmp_path, server_env={"HIL_DATABASE_URL": url, **FAST})
    with stack.running():
        chats = [f"chat-kill-{n}" for n in range(6)]
        sent = [stack.send(f"问题 {n}", chat_id=chat) for n, chat in enumerate(chats)]
        assert all(s["success"] for s in sent), sent
        quotes = [question_in_chat(stack, chat, s["short_id"]) for chat, s in zip(chats, sent, strict=True)]
        stop = threading.Event()

        def killer() -> None:
            while not stop.is_set():
                kill_server_connections(pg_server.url)
                stop.wait(0.2)

        answered: list[dict[str, Any]] = []
        with ThreadPoolExecutor(1) as pool:
            killing = pool.submit(killer)
            try:
                for n, (chat, quote) in enumerate(zip(chats, quotes, strict=True)):
                    # WeCom sends a callback again (3 attempts): a 503 (or a reset) is never an ack
                    answered.append(
                        stack.reply(
                            chat, "可以", quote=quote, msgid=f"kill-{n}", wecom_retries=True, retry_interval=0.5
                        )
                    )
            finally:
                stop.set()
                killing.result(10)
        for n, (chat, quote, reply) in enumerate(zip(chats, quotes, answered, strict=True)):
            if reply["responses"][-1]["status_code"] != 200:  # never acknowledged: the person's next try, same msgid
                eventually(lambda: server_health(stack).status_code == 200, 15, "the server did not recover")
                again = stack.reply(chat, "可以", quote=quote, msgid=f"kill-{n}", wecom_retries=True)
                assert again["responses"][-1]["status_code"] == 200, again
        for s in sent:
            polled = stack.poll(s["session_id"], wait=10)
            assert polled["status"] == "replied", polled
            assert [r["content"] for r in polled["replies"]] == ["可以"]  # once, however often it was sent
        eventually(lambda: server_health(stack).status_code == 200, 15, "the server did not recover")
        plain_round_trip(stack, "chat-after-kills")


def test_postgres_restarted_with_questions_waiting(pg_server: PgServer, tmp_path: Path) -> None:
    url = fresh_database_url(pg_server.url)
    stack = Stack(mode="direct", tmp=tmp_path, server_env={"HIL_DATABASE_URL": url, **FAST})
    with stack.running():
        chats = [f"chat-restart-{n}" for n in range(3)]
        sent = [stack.send(f"重启前的问题 {n}", chat_id=chat) for n, chat in enumerate(chats)]
        assert all(s["success"] for s in sent), sent
        quotes = [question_in_chat(stack, chat, s["short_id"]) for chat, s in zip(chats, sent, strict=True)]
        pg_server.stop()
        try:
            refused = stack.reply(chats[0], "可以", quote=quotes[0])
            # not stored, so not acknowledged: 503, or no answer within WeCom's time (the pool waits for a connection)
            assert refused["responses"][0]["status_code"] in (503, None), refused
            eventually(lambda: server_health(stack).status_code == 503, 15, "/health did not say the store is down")
        finally:
            pg_server.start()
        eventually(lambda: server_health(stack).status_code == 200, 30, "the server did not recover")
        for chat, quote in zip(chats, quotes, strict=True):
            reply = stack.reply(chat, "可以", quote=quote, wecom_retries=True, retry_interval=0.3)
            assert reply["responses"][-1]["status_code"] == 200, reply
        for s in sent:
            polled = stack.poll(s["session_id"], wait=10)
            assert polled["status"] == "replied" and [r["content"] for r in polled["replies"]] == ["可以"], polled
        plain_round_trip(stack, "chat-after-restart")
