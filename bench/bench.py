#!/usr/bin/env python
"""hil-mcp benchmark: starts the real processes on 127.0.0.1 (fake WeCom, HIL Server, DevCloud Worker), measures,
and prints a table of figures against targets.

    ./hil bench [--rounds 20] [--sessions 10000] [--only P1,P3]

P1  a person's quote-reply -> the MCP tool call returns (real MCP client over stdio, relay mode)
P2  200 concurrent /api/send until all 200 reached WeCom (relay mode)
P3  N waiting sessions with N open long-polls: server RSS, and reply -> poll-returns p99 for a sample (relay mode)
P4  callbacks matched per second, POSTed straight to /api/callback (direct mode)
P1A P1 on the AI-bot channel: the quote-reply comes over the AI bot's long connection
P5  a click on a question's card (AI bot) -> the held long-poll returns the choice
P6  a click on 批准 (AI bot) -> request_approval over a real stdio MCP client returns approved
P7  a click on 批准 (AI bot) -> the Claude Code gate hook (`hil-mcp gate`) prints allow; its start-up separately
M1  P1 over /mcp (the SDK's streamable-HTTP client)
M2  server RSS with 2,000 tool calls waiting at /mcp at once
M3  server RSS per open, idle /mcp session (the 2025 protocol's Mcp-Session-Id; what HIL_MCP_MAX_SESSIONS bounds)

A missed target is reported, not fatal: the exit status is 0 when every measurement ran, 1 when one failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# The processes the bench starts run this checkout's code too, whatever is installed in the venv.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

import httpx  # noqa: E402

from tests.helpers import ROBOT, callback_body, question_text, quote  # noqa: E402
from tests.procs import BOT_KEY, Stack, mcp_stdio_params  # noqa: E402

T = TypeVar("T")

# --- results ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    measured: str
    target: str
    ok: bool | None  # None: no target (context only)


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def add(self, figure: str, measured: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append(Row(figure, measured, target, ok))
        mark = {True: "ok", False: "MISSED", None: ""}[ok]
        print(f"  -> {figure}: {measured}  {('(target ' + target + ') ' + mark) if target else ''}", flush=True)

    def latency(self, figure: str, ms: list[float], target_ms: float | None = None) -> None:
        """A latency figure: the median (and max) of `ms`, met when the median is within `target_ms`."""
        median = statistics.median(ms)
        self.add(
            f"{figure}, median of {len(ms)}",
            f"{median:.1f} ms (max {max(ms):.1f})",
            "" if target_ms is None else f"≤ {target_ms:g} ms",
            None if target_ms is None else median <= target_ms,
        )

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def table(self) -> str:
        lines = ["| figure | measured | target | ok |", "|---|---|---|---|"]
        for row in self.rows:
            ok = {True: "✅", False: "❌", None: "–"}[row.ok]
            lines.append(f"| {row.figure} | {row.measured} | {row.target or '–'} | {ok} |")
        return "\n".join(lines)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 200 samples is the 198th smallest)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


# --- machine ----------------------------------------------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Raise the soft file-descriptor limit to the hard one; processes started later inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


async def settled_fd_count(pid: int, quiet: float = 0.3, limit: float = 5.0) -> int:
    """The process's fd count once it has stopped changing (closed connections take a moment to go)."""
    deadline = time.monotonic() + limit
    last, since = fd_count(pid), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now = fd_count(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_of(stack: Stack) -> dict[str, float]:
    return {name: cpu_seconds(proc.popen.pid) for name, proc in stack.procs.items() if proc.popen is not None}


def cpu_note(before: dict[str, float], after: dict[str, float], wall: float, bench_cpu: float) -> str:
    """Who used the CPU over a phase, as a share of one core."""
    parts = [f"{name} {(after[name] - before[name]) / wall:.0%}" for name in before]
    return f"CPU (share of one core over {wall:.2f} s): " + ", ".join(parts) + f", bench {bench_cpu / wall:.0%}"


def machine() -> str:
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "?"
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"nproc={os.cpu_count()} ({model}), {mem_gb:.0f} GB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()} ({sys.executable})"
    )


# --- stacks -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_stack(mode: str, workdir: Path, name: str, make: Callable[[Path], Stack] | None = None, **kw: Any):
    tmp = workdir / name
    tmp.mkdir(parents=True, exist_ok=True)
    # The product's sweep interval, not the tests' 0.5 s (which makes the O(sessions) sweep run 10x as often).
    kw.setdefault("server_env", {"HIL_SWEEP_INTERVAL": "5"})
    stack = make(tmp) if make is not None else Stack(mode, tmp, **kw)
    started = time.monotonic()
    try:
        stack.start()
        log(
            f"{name}: {mode}-mode stack up in {time.monotonic() - started:.1f}s "
            f"(fake {stack.fake_url}, server {stack.server_url}"
            f"{', worker ' + stack.worker_url if mode == 'relay' else ''})"
        )
        yield stack
    finally:
        stack.stop()


def client(timeout: float = 30, **kw: Any) -> httpx.AsyncClient:
    """httpx for the control calls (a few requests each). Load goes through Http1: httpcore's pool scans every
    connection on each request, which made the bench, not the server, the bottleneck (profiled: >90% of the
    bench's CPU in connection_pool._assign_requests_to_connections with 50-200 connections)."""
    return httpx.AsyncClient(trust_env=False, timeout=timeout, **kw)


class Http1:
    """One keep-alive HTTP/1.1 connection with the least client-side work, so load measures the server."""

    def __init__(self, base_url: str) -> None:
        host, _, port = base_url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.headers: dict[str, str] = {}  # of the last response

    async def connect(self) -> Http1:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        return self

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        if self._writer is None:
            await self.connect()
        assert self._reader is not None and self._writer is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._writer.write(head.encode() + b"\r\n" + (body or b""))
        raw = await self._reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            data = await self._reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while size := int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16):
                chunks.append(await self._reader.readexactly(size))
                await self._reader.readexactly(2)
            await self._reader.readuntil(b"\r\n")
            data = b"".join(chunks)
        else:
            data = await self._reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        self.headers = headers
        return status, data

    async def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        raw = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        status, data = await self.request(method, path, raw)
        return status, json.loads(data) if data else None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def outcome(task: asyncio.Task[Any]) -> str:
    """How a finished task ended, in a line."""
    return repr(task.exception()) if task.exception() else str(task.result())[:300]


async def open_conns(base_url: str, n: int) -> list[Http1]:
    return list(await asyncio.gather(*(Http1(base_url).connect() for _ in range(n))))


def close_all(conns: list[Http1]) -> None:
    for conn in conns:
        conn.close()


async def fake_messages(
    http: httpx.AsyncClient, stack: Stack, chat_id: str, since_seq: int = 0, wait: int = 0, timeout: float = 30
) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"chat_id": chat_id, "since_seq": since_seq}
    if wait:
        params.update(wait=wait, timeout=timeout)
    response = await http.get(f"{stack.fake_url}/_fake/messages", params=params, timeout=timeout + 10)
    response.raise_for_status()
    return response.json()["messages"]


async def last_seq(http: httpx.AsyncClient, stack: Stack) -> int:
    response = await http.get(f"{stack.fake_url}/_fake/messages", params={"since_seq": 0})
    messages = response.json()["messages"]
    return messages[-1]["seq"] if messages else 0


async def lanes(conns: list[Http1], items: list[Any], fn: Callable[[Http1, Any], Awaitable[Any]]) -> list[Any]:
    """Run fn over items, one lane per connection (so at most len(conns) in flight); results in order."""
    results: list[Any] = [None] * len(items)
    it = iter(enumerate(items))

    async def lane(conn: Http1) -> None:
        for i, item in it:
            results[i] = await fn(conn, item)

    await asyncio.gather(*(lane(conn) for conn in conns))
    return results


async def create_sessions(
    stack: Stack, n: int, chat_id: str, concurrency: int = 200, label: str = "q", timeout: float = 3600
) -> list[dict[str, Any]]:
    """n questions through /api/send, `concurrency` at a time; returns the send answers (+ message)."""
    conns = await open_conns(stack.server_url, concurrency)

    async def one(conn: Http1, i: int) -> dict[str, Any]:
        message = f"bench {label} {i}"
        body = {"message": message, "chat_id": chat_id, "timeout": timeout}
        status, answer = await conn.json("POST", "/api/send", body)
        if status != 200 or not answer.get("success"):
            raise RuntimeError(f"/api/send failed: HTTP {status} {answer}")
        return {**answer, "message": message}

    try:
        return await lanes(conns, list(range(n)), one)
    finally:
        close_all(conns)


# --- P1: reply -> MCP tool returns ------------------------------------------------------------------------------


async def reply_by_webhook_callback(http: httpx.AsyncClient, stack: Stack, chat: str, question: dict, answer: str):
    """The person quote-replies in the robot's group: the fake posts the robot callback (to the worker here)."""
    body = {"chat_id": chat, "text": answer, "quote": question["content"], "quote_sender": ROBOT}
    return await http.post(f"{stack.fake_url}/_fake/reply", json=body)


async def reply_by_aibot(http: httpx.AsyncClient, stack: Stack, chat: str, question: dict, answer: str):
    """The person quote-replies to the AI bot's message: a callback frame on the bot's long connection."""
    body = {"userid": "zhangsan", "chat_id": chat, "text": answer, "quote_seq": question["seq"]}
    return await http.post(f"{stack.fake_url}/_fake/aibot/message", json=body)


async def reply_rounds(
    mcp: Any,
    stack: Stack,
    chat: str,
    rounds: int,
    label: str,
    reply: Callable[..., Awaitable[httpx.Response]] | None = None,
) -> list[float]:
    """Rounds of send_and_wait_reply on an MCP client; ms from the person's quote-reply to the call's return.
    `reply` plays the person (default: a quote-reply through the robot callback)."""
    reply = reply or reply_by_webhook_callback
    latencies: list[float] = []
    async with client(30) as http:
        since = await last_seq(http, stack)
        for i in range(rounds + 1):  # round 0 warms up every hop and is not counted
            text = f"bench {label} question {i}"
            call = asyncio.create_task(mcp.call_tool("send_and_wait_reply", {"message": text, "chat_id": chat}))
            messages = await fake_messages(http, stack, chat, since, wait=1, timeout=20)
            question = next((m for m in messages if text in (m["content"] or "")), None)
            if question is None:
                call.cancel()
                raise RuntimeError(f"question {i} did not reach the fake WeCom: {messages}")
            since = max(m["seq"] for m in messages)
            # The tool's long-poll starts right after /api/send answers; give it a moment to be parked.
            await asyncio.sleep(0.05)
            answer = f"answer {i}"
            t0 = time.perf_counter()
            post = asyncio.create_task(reply(http, stack, chat, question, answer))
            result = await asyncio.wait_for(call, 30)
            t1 = time.perf_counter()
            response = await post
            response.raise_for_status()
            out = result.structured_content or {}
            got = [r.get("content") for r in out.get("replies") or []]
            if result.is_error or out.get("status") != "success" or got != [answer]:
                raise RuntimeError(f"round {i}: unexpected tool result {result}")
            if i:
                latencies.append((t1 - t0) * 1000)
    return latencies


async def p1(
    stack: Stack,
    workdir: Path,
    rounds: int,
    res: Results,
    *,
    reply: Callable[..., Awaitable[httpx.Response]] = reply_by_webhook_callback,
    figure: str = "P1",
    path: str = "relay",
    target_ms: float = 30,
) -> None:
    from mcp import Client
    from mcp.client.stdio import stdio_client

    chat = "bench"
    params = mcp_stdio_params(stack.server_url, workdir, "--chat-id", chat, "--timeout", "60")
    with (workdir / f"mcp-{figure}.log").open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as mcp:
            latencies = await reply_rounds(mcp, stack, chat, rounds, figure, reply)
    res.latency(
        f"{figure} person's quote-reply → MCP tool call returns ({path}, stdio MCP client)", latencies, target_ms
    )


# --- M1, M2: the tools over the server's /mcp (streamable HTTP) ---------------------------------------------------

MCP_TOKEN = "bench-mcp-token"
MODERN = "2026-07-28"
LEGACY = "2025-11-25"


async def m1(stack: Stack, rounds: int, res: Results) -> None:
    """P1's rounds through the SDK's streamable-HTTP client at /mcp, in both protocol eras."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    for mode, era in (("auto", f"{MODERN} protocol"), ("legacy", f"{LEGACY} sessions")):
        headers = {"Authorization": f"Bearer {MCP_TOKEN}"}
        async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300), trust_env=False) as http:
            transport = streamable_http_client(f"{stack.server_url}/mcp", http_client=http)
            async with Client(transport, mode=mode) as mcp:  # type: ignore[arg-type]
                latencies = await reply_rounds(mcp, stack, "bench-m1", rounds, f"M1 {mode}")
        res.latency(
            f"M1 person's quote-reply → tool call at /mcp returns (relay, SDK streamable-HTTP client, {era})",
            latencies,
            10 if mode == "auto" else None,
        )


def _mcp_headers(era: str, session: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {MCP_TOKEN}"}
    if era == MODERN:  # only tools/call goes out in this era here
        headers |= {"Mcp-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "send_and_wait_reply"}
    elif session is not None:
        headers |= {"Mcp-Protocol-Version": LEGACY, "Mcp-Session-Id": session}
    return headers | extra


def _tool_call(era: str, message: str, chat: str) -> bytes:
    meta: dict[str, Any] = {"progressToken": 1}
    if era == MODERN:
        meta |= {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {},
        }
    params = {"name": "send_and_wait_reply", "arguments": {"message": message, "chat_id": chat}, "_meta": meta}
    return json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": params}).encode()


def _sse_result(data: bytes) -> dict[str, Any]:
    """The JSON-RPC result in an SSE body (the last `data:` line that carries one)."""
    for line in reversed(data.decode().splitlines()):
        if line.startswith("data:") and '"result"' in line:
            return json.loads(line[5:])["result"]
    raise RuntimeError(f"no result in {data[-300:]!r}")


async def m2(stack: Stack, n: int, era: str, res: Results, sample: int = 20) -> None:
    """n agents each waiting in send_and_wait_reply at /mcp at once: server RSS. Raw HTTP/1.1 as the SDK's client
    sends it (legacy: initialize, initialized, the standalone GET stream, then the call)."""
    chat = f"bench-m2-{era}"
    server_pid = stack.procs["server"].popen.pid
    async with client(10) as http:
        await http.post(f"{stack.fake_url}/_fake/config", json={"rate_limit": None})
        since = await last_seq(http, stack)
    rss_idle = rss_mb(server_pid)
    base_fds = await settled_fd_count(server_pid)
    conns: list[Http1] = []
    calls: dict[int, asyncio.Task[tuple[int, bytes]]] = {}

    async def agent(i: int) -> tuple[int, bytes]:
        conn = Http1(stack.server_url)
        conns.append(conn)
        if era == LEGACY:
            init = {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}
            body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}).encode()
            status, data = await conn.request("POST", "/mcp", body, _mcp_headers(era))
            if status != 200:
                raise RuntimeError(f"initialize: HTTP {status} {data[:200]!r}")
            session = conn.headers["mcp-session-id"]
            body = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
            await conn.request("POST", "/mcp", body, _mcp_headers(era, session))
            get = Http1(stack.server_url)
            conns.append(get)
            # The SDK's client opens the standalone GET stream too; this server answers 405 (no stream outside a
            # call), so nothing is held for it. Were it held, it would cost ~60 KB per session (M2: 462 MB).
            status, _ = await get.request("GET", "/mcp", None, _mcp_headers(era, session))
            get.close()
            if status != 405:
                raise RuntimeError(f"GET /mcp: HTTP {status}, expected 405")
            return await conn.request(
                "POST", "/mcp", _tool_call(era, f"bench M2 {i}", chat), _mcp_headers(era, session)
            )
        return await conn.request("POST", "/mcp", _tool_call(era, f"bench M2 {i}", chat), _mcp_headers(era))

    try:
        t0 = time.perf_counter()
        batch = 200
        async with client(60) as http:
            for start in range(0, n, batch):
                for i in range(start, min(start + batch, n)):
                    calls[i] = asyncio.create_task(agent(i))
                arrived = await fake_messages(http, stack, chat, since, wait=min(start + batch, n), timeout=60)
                if len(arrived) < min(start + batch, n):
                    raise RuntimeError(f"only {len(arrived)} of {min(start + batch, n)} questions reached the fake")
            questions = {int(m["content"].rsplit(" ", 1)[1]): m for m in arrived}
        started_in = time.perf_counter() - t0
        held = await settled_fd_count(server_pid, quiet=1.0, limit=20)
        await asyncio.sleep(1.0)
        ended = [i for i, task in calls.items() if task.done()]
        rss = rss_mb(server_pid)
        log(
            f"M2 {era}: {n} waiting calls in {started_in:.1f}s; server holds {held - base_fds} more fds; "
            f"RSS {rss:.0f} MB"
        )
        if ended:
            raise RuntimeError(f"{len(ended)} calls ended before any reply (first: {outcome(calls[ended[0]])})")
        res.add(
            f"M2 server RSS with {n} tool calls waiting at /mcp at once ({era}"
            f"{' sessions' if era == LEGACY else ' protocol'})",
            f"{rss:.0f} MB (idle {rss_idle:.0f} MB; {(rss - rss_idle) * 1024 / n:.0f} KB per waiting call)",
            "≤ 400 MB",
            rss <= 400,
        )
        # The calls are real: a sample of them gets its answer.
        async with client(30) as http:
            for i in random.Random(5).sample(sorted(calls), min(sample, n)):
                body = {"chat_id": chat, "text": f"answer {i}", "quote": questions[i]["content"], "quote_sender": ROBOT}
                (await http.post(f"{stack.fake_url}/_fake/reply", json=body)).raise_for_status()
                status, data = await asyncio.wait_for(calls[i], 30)
                out = _sse_result(data)["structuredContent"]
                if status != 200 or out["status"] != "success" or out["replies"][0]["content"] != f"answer {i}":
                    raise RuntimeError(f"call {i}: unexpected result {out}")
    finally:
        for task in calls.values():
            task.cancel()
        await asyncio.gather(*calls.values(), return_exceptions=True)
        close_all(conns)


async def m3(stack: Stack, n: int, res: Results, lanes_n: int = 10) -> None:
    """n idle sessions opened at /mcp (initialize + initialized, as the SDK's client does, and nothing after):
    server RSS before and after, per session. The session caps are raised for the measurement."""
    server_pid = stack.procs["server"].popen.pid
    conns = [Http1(stack.server_url) for _ in range(lanes_n)]
    init = {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}
    opening = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}).encode()
    initialized = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()

    async def open_session(conn: Http1, i: int) -> str:
        status, data = await conn.request("POST", "/mcp", opening, _mcp_headers(LEGACY))
        if status != 200:
            raise RuntimeError(f"initialize {i}: HTTP {status} {data[:200]!r}")
        session = conn.headers["mcp-session-id"]
        await conn.request("POST", "/mcp", initialized, _mcp_headers(LEGACY, session))
        return session

    try:
        await asyncio.sleep(1.0)
        rss_idle = rss_mb(server_pid)
        t0 = time.perf_counter()
        sessions = await lanes(conns, list(range(n)), open_session)
        opened_in = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        rss = rss_mb(server_pid)
        if len(set(sessions)) != n:
            raise RuntimeError(f"only {len(set(sessions))} of {n} sessions opened")
        log(f"M3: {n} sessions opened in {opened_in:.1f}s; RSS {rss_idle:.0f} -> {rss:.0f} MB")
        res.add(
            f"M3 server RSS per open idle /mcp session ({n} sessions, 2025 protocol)",
            f"{(rss - rss_idle) * 1024 / n:.0f} KB per session ({rss_idle:.0f} → {rss:.0f} MB)",
        )
    finally:
        close_all(conns)


# --- P2: 200 concurrent sends -----------------------------------------------------------------------------------


async def p2_trial(stack: Stack, conns: list[Http1], trial: int) -> tuple[float, float, str]:
    """One burst of len(conns) concurrent sends: (seconds until all at WeCom, until the last answer, CPU note)."""
    n = len(conns)
    chat = f"bench-p2-{trial}"
    async with client(60) as http:
        since = await last_seq(http, stack)
        bodies = [
            json.dumps({"message": f"bench P2 {trial}.{i}", "chat_id": chat, "timeout": 600}).encode() for i in range(n)
        ]
        arrived = asyncio.create_task(fake_messages(http, stack, chat, since, wait=n, timeout=30))
        await asyncio.sleep(0.2)  # the fake's long-poll is parked before the clock starts
        cpu0, bench0 = cpu_of(stack), time.process_time()
        t0 = time.perf_counter()
        sends = (c.json("POST", "/api/send", body) for c, body in zip(conns, bodies, strict=True))
        answers = await asyncio.gather(*sends)
        t_sent = time.perf_counter()
        messages = await arrived
        t1 = time.perf_counter()
        cpu1, bench1 = cpu_of(stack), time.process_time()
    failed = [a for status, a in answers if status != 200 or not a.get("success")]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n} sends failed, e.g. {failed[0]}")
    if len(messages) < n:
        raise RuntimeError(f"only {len(messages)} of {n} messages reached the fake WeCom")
    return t1 - t0, t_sent - t0, cpu_note(cpu0, cpu1, t1 - t0, bench1 - bench0)


async def p2(stack: Stack, res: Results, n: int = 200, trials: int = 3) -> None:
    conns = await open_conns(stack.server_url, n)
    try:
        # Warm-up: every connection used once, and a small burst so the worker's pool to WeCom is open (it sends up
        # to 8 at once per robot).
        await asyncio.gather(*(c.request("GET", "/health") for c in conns))
        warm = await asyncio.gather(
            *(
                c.json("POST", "/api/send", {"message": f"warm-up {i}", "chat_id": "bench-p2", "wait_reply": False})
                for i, c in enumerate(conns[:16])
            )
        )
        assert all(status == 200 and answer.get("success") for status, answer in warm), warm
        results = [await p2_trial(stack, conns, trial) for trial in range(trials)]
    finally:
        close_all(conns)
    arrived = sorted(r[0] for r in results)
    median = statistics.median(arrived)
    res.add(
        f"P2 {n} concurrent /api/send → all at WeCom (relay), median of {trials}",
        f"{median:.3f} s (each: {', '.join(f'{r[0]:.3f}' for r in results)})",
        "≤ 0.5 s",
        median <= 0.5,
    )
    res.note("P2 (median burst) " + sorted(results)[len(results) // 2][2])


# --- P3: N waiting sessions with open long-polls ----------------------------------------------------------------


async def p3(stack: Stack, n: int, res: Results, sample: int = 200) -> None:
    chat = "bench-p3"
    server_pid = stack.procs["server"].popen.pid
    async with client(10) as http:
        await http.post(f"{stack.fake_url}/_fake/config", json={"rate_limit": None})
    rss_idle = rss_mb(server_pid)

    t0 = time.perf_counter()
    sessions = await create_sessions(stack, n, chat, concurrency=200, label="P3")
    created = time.perf_counter() - t0
    rss_sessions = rss_mb(server_pid)
    log(f"P3: {n} sessions created in {created:.1f}s ({n / created:.0f}/s); server RSS {rss_sessions:.0f} MB")
    res.add("P3 … sessions created (200 concurrent /api/send, relay)", f"{n} in {created:.1f} s ({n / created:.0f}/s)")

    done_at: dict[str, float] = {}
    polls: dict[str, asyncio.Task[tuple[int, Any]]] = {}
    conns: list[Http1] = []
    base_fds = await settled_fd_count(server_pid)

    async def poll(session_id: str) -> tuple[int, Any]:
        conn = Http1(stack.server_url)
        conns.append(conn)
        try:
            return await conn.json("GET", f"/api/poll/{session_id}?wait=60")
        finally:
            done_at[session_id] = time.perf_counter()

    try:
        t0 = time.perf_counter()
        batch = 500  # below uvicorn's listen backlog (2048), so no SYN is dropped and retried a second later
        for start in range(0, n, batch):
            for i in range(start, min(start + batch, n)):
                sid = sessions[i]["session_id"]
                polls[sid] = asyncio.create_task(poll(sid))
            target = base_fds + min(start + batch, n)
            deadline = time.monotonic() + 10
            while fd_count(server_pid) < target and time.monotonic() < deadline:  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.02)
            if fd_count(server_pid) < target:
                log(f"P3: server accepted only {fd_count(server_pid) - base_fds} of {min(start + batch, n)} so far")
        opened_in = time.perf_counter() - t0
        await asyncio.sleep(1.0)  # let the last requests reach their handlers
        early = [sid for sid, task in polls.items() if task.done()]
        open_now = fd_count(server_pid) - base_fds
        rss_polls = rss_mb(server_pid)
        log(
            f"P3: {len(polls)} long-polls started in {opened_in:.1f}s; server holds {open_now} more fds, "
            f"{len(early)} polls already ended; RSS {rss_polls:.0f} MB"
        )
        if early:
            res.note(f"{len(early)} polls ended before any reply (first: {outcome(polls[early[0]])})")
        achieved = min(n - len(early), open_now)
        ok_n = achieved >= n
        res.add("P3 open long-polls held at once", f"{achieved} of {n}", f"{n}", ok_n)
        if not ok_n:
            res.note(f"only {achieved} of {n} long-polls could be held open on this machine")
        res.add(
            f"P3 server RSS with {achieved} waiting sessions + open long-polls",
            f"{rss_polls:.0f} MB (idle {rss_idle:.0f} MB, sessions only {rss_sessions:.0f} MB)",
            "≤ 300 MB",
            rss_polls <= 300,
        )

        # Reply to a sample, one at a time, and time reply -> that session's poll returns.
        open_ids = [sid for sid in polls if not polls[sid].done()]
        by_id = {s["session_id"]: s for s in sessions}
        picks = random.Random(3).sample(open_ids, min(sample, len(open_ids)))
        latencies: list[float] = []
        async with client(30) as http:
            cpu0, w0 = cpu_seconds(server_pid), time.perf_counter()
            for sid in picks:
                s = by_id[sid]
                body = {
                    "chat_id": chat,
                    "text": f"answer {s['short_id']}",
                    "quote": question_text(s["short_id"], s["message"]),
                    "quote_sender": ROBOT,
                }
                t0 = time.perf_counter()
                post = asyncio.create_task(http.post(f"{stack.fake_url}/_fake/reply", json=body))
                _, out = await asyncio.wait_for(polls[sid], 30)
                latencies.append((done_at[sid] - t0) * 1000)
                (await post).raise_for_status()
                if out.get("status") != "replied" or out["replies"][0]["content"] != f"answer {s['short_id']}":
                    raise RuntimeError(f"unexpected poll answer for {sid}: {out}")
            cpu_used = cpu_seconds(server_pid) - cpu0
            wall = time.perf_counter() - w0
        p99 = percentile(latencies, 99)
        res.add(
            f"P3 reply → long-poll returns, p99 ({len(latencies)} sampled, {achieved} polls open)",
            f"{p99:.1f} ms (median {statistics.median(latencies):.1f}, max {max(latencies):.1f})",
            "≤ 50 ms",
            p99 <= 50,
        )
        log(f"P3: server CPU during the sample {cpu_used:.2f}s of {wall:.2f}s")
    finally:
        for task in polls.values():
            task.cancel()
        await asyncio.gather(*polls.values(), return_exceptions=True)
        close_all(conns)


# --- P4: callbacks matched per second (direct mode) -------------------------------------------------------------


def callback_json(stack: Stack, chat: str, short_id: str, message: str, answer: str) -> bytes:
    """The fly-pigeon JSON of a person's quote-reply to the question (WECOM.md), as the fake would post it."""
    body = callback_body(
        quote(short_id, answer, project=None, question=message),
        chat,
        uuid.uuid4().hex,
        sender={"alias": "zhangsan"},
        webhook_url=f"{stack.fake_url}/cgi-bin/webhook/send?key={BOT_KEY}",
    )
    return json.dumps(body, ensure_ascii=False).encode()


async def p4_trial(stack: Stack, m: int, trial: int, concurrency: int) -> tuple[float, int, float, float]:
    """m waiting sessions, then their m quote-reply callbacks: (elapsed, matched, server CPU s, bench CPU s)."""
    chat = f"bench-p4-{trial}"
    server_pid = stack.procs["server"].popen.pid
    sessions = await create_sessions(stack, m, chat, concurrency=100, label=f"P4.{trial}")
    bodies = [callback_json(stack, chat, s["short_id"], s["message"], f"answer {s['short_id']}") for s in sessions]
    conns = await open_conns(stack.server_url, concurrency)
    try:
        await asyncio.gather(*(c.request("GET", "/health") for c in conns))  # every connection used once

        async def post(conn: Http1, body: bytes) -> None:
            status, data = await conn.request("POST", "/api/callback", body)
            if status != 200 or json.loads(data).get("errcode") != 0:
                raise RuntimeError(f"callback refused: HTTP {status} {data[:200]!r}")

        await asyncio.sleep(0.5)  # let the session burst's log lines and sqlite commits drain
        cpu0, bench0 = cpu_seconds(server_pid), time.process_time()
        t0 = time.perf_counter()
        await lanes(conns, bodies, post)
        elapsed = time.perf_counter() - t0
        server_cpu, bench_cpu = cpu_seconds(server_pid) - cpu0, time.process_time() - bench0

        async def check(conn: Http1, s: dict[str, Any]) -> bool:
            _, out = await conn.json("GET", f"/api/poll/{s['session_id']}")
            got = [r.get("content") for r in out.get("replies") or []]
            return out.get("status") == "replied" and got == [f"answer {s['short_id']}"]

        matched = sum(await lanes(conns, sessions, check))
    finally:
        close_all(conns)
    return elapsed, matched, server_cpu, bench_cpu


async def p4(stack: Stack, m: int, res: Results, concurrency: int = 50, trials: int = 3) -> None:
    results = [await p4_trial(stack, m, trial, concurrency) for trial in range(trials)]
    rates = [matched / elapsed for elapsed, matched, _, _ in results]
    all_matched = all(matched == m for _, matched, _, _ in results)
    median = statistics.median(rates)
    res.add(
        f"P4 callbacks matched per second (direct mode, {m} per trial, {concurrency} concurrent "
        f"POST /api/callback), median of {trials}",
        f"{median:,.0f}/s (each: {', '.join(f'{r:,.0f}' for r in rates)}; "
        f"{'all' if all_matched else 'NOT all'} {m * trials} matched, checked by poll)",
        "≥ 2,000/s",
        median >= 2000 and all_matched,
    )
    elapsed, _, server_cpu, bench_cpu = sorted(results, key=lambda r: r[1] / r[0])[len(results) // 2]
    res.note(
        f"P4 (median trial): server CPU {server_cpu / elapsed:.0%} and bench CPU {bench_cpu / elapsed:.0%} of one "
        f"core over {elapsed:.2f} s; {server_cpu / (m or 1) * 1e6:.0f} µs of server CPU per callback"
    )


# --- P1A / P5: the AI-bot channel ---------------------------------------------------------------------------------


def aibot_bench_stack(tmp: Path) -> Stack:
    """The fake WeCom with an AI bot and the server on HIL_CHANNEL=aibot (the e2e tests' stack, product timings)."""
    from tests.test_e2e_aibot import aibot_stack

    # The fake does not rate-limit, so WeCom's pace (30 a minute) would only make P7 wait behind P1A..P6's rounds.
    pace = {"WECOM_AIBOT_MAX_PER_MINUTE": "100000", "WECOM_AIBOT_MAX_PER_HOUR": "1000000"}
    return aibot_stack(tmp, HIL_AIBOT_PING_INTERVAL="30", HIL_SWEEP_INTERVAL="5", **pace)


async def click_until(
    http: httpx.AsyncClient, stack: Stack, click: dict[str, str], done: Awaitable[T]
) -> tuple[T, float]:
    """A click on a card's button in the fake AI bot; what `done` gives and the ms from the click until it did."""
    t0 = time.perf_counter()
    post = asyncio.create_task(http.post(f"{stack.fake_url}/_fake/aibot/click", json=click))
    result = await asyncio.wait_for(done, 30)
    t1 = time.perf_counter()
    (await post).raise_for_status()
    return result, (t1 - t0) * 1000


async def p5(stack: Stack, rounds: int, res: Results) -> None:
    """A question with options; a held long-poll; a click on the card's first button -> the poll returns."""
    chat = "bench-p5"
    latencies: list[float] = []
    async with client(30) as http:
        since = await last_seq(http, stack)
        for i in range(rounds + 1):  # round 0 warms up and is not counted
            body = {"message": f"bench P5 {i}", "chat_id": chat, "options": ["合并", "不合并"], "timeout": 600}
            sent = (await http.post(f"{stack.server_url}/api/send", json=body)).json()
            if not sent.get("success"):
                raise RuntimeError(f"/api/send failed: {sent}")
            cards = await fake_messages(http, stack, chat, since, wait=1, timeout=20)
            card = next((m for m in cards if m.get("task_id") == sent["session_id"]), None)
            if card is None:
                raise RuntimeError(f"the card of question {i} did not reach the fake WeCom: {cards}")
            since = max(m["seq"] for m in cards)
            poll = asyncio.create_task(http.get(f"{stack.server_url}/api/poll/{sent['session_id']}?wait=30"))
            await asyncio.sleep(0.05)  # the long-poll is parked
            click = {"userid": "zhangsan", "task_id": sent["session_id"], "event_key": "0"}
            polled, ms = await click_until(http, stack, click, poll)
            answer = polled.json()
            if answer.get("status") != "replied" or (answer.get("choice") or {}).get("label") != "合并":
                raise RuntimeError(f"round {i}: unexpected poll result {answer}")
            if i:
                latencies.append(ms)
    res.latency("P5 click on a card's button → held long-poll returns the choice (AI bot)", latencies, 15)


async def p6(stack: Stack, workdir: Path, rounds: int, res: Results) -> None:
    """request_approval over a real stdio MCP client; one click on 批准 in the AI bot's card -> the tool returns
    approved with the clicker in decided_by."""
    from mcp import Client
    from mcp.client.stdio import stdio_client

    chat = "bench-p6"
    params = mcp_stdio_params(stack.server_url, workdir, "--chat-id", chat, "--timeout", "60")
    latencies: list[float] = []
    with (workdir / "mcp-P6.log").open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as mcp, client(30) as http:
            since = await last_seq(http, stack)
            for i in range(rounds + 1):  # round 0 warms up every hop and is not counted
                summary = f"bench P6 部署 {i}"
                call = asyncio.create_task(mcp.call_tool("request_approval", {"summary": summary}))
                cards = await fake_messages(http, stack, chat, since, wait=1, timeout=20)
                card = next(
                    (m for m in cards if m.get("task_id") and summary in json.dumps(m, ensure_ascii=False)), None
                )
                if card is None:
                    call.cancel()
                    raise RuntimeError(f"the approval card {i} did not reach the fake WeCom: {cards}")
                since = max(m["seq"] for m in cards)
                await asyncio.sleep(0.05)  # the tool's long-poll is parked
                click = {"userid": "lisi", "task_id": card["task_id"], "event_key": "0"}
                result, ms = await click_until(http, stack, click, call)
                out = result.structured_content or {}
                if result.is_error or out.get("approved") is not True or out.get("decided_by") != ["lisi"]:
                    raise RuntimeError(f"round {i}: unexpected tool result {result}")
                if i:
                    latencies.append(ms)
    res.latency("P6 one click on 批准 → request_approval returns approved (AI bot, stdio MCP client)", latencies, 15)


# --- P7: the Claude Code gate ------------------------------------------------------------------------------------


async def p7(stack: Stack, workdir: Path, rounds: int, res: Results) -> None:
    """`hil-mcp gate` as Claude Code runs it (a new process per tool call, the hook event on stdin): a risky Bash
    call; one click on 批准 in the AI bot's card -> the process prints allow. Its start-up (a call that needs nobody)
    is measured on its own."""
    chat = "bench-p7"
    project = workdir / "p7-project"
    (project / ".hil").mkdir(parents=True, exist_ok=True)
    (project / ".hil" / "gate.toml").write_text(f'chat_id = "{chat}"\nwait = 30\n')
    env = {**os.environ, "SERVICE_URL": stack.server_url, "PYTHONPATH": str(ROOT), "NO_PROXY": "127.0.0.1"}

    def event(command: str, i: int) -> bytes:
        return json.dumps(
            {
                "hook_event_name": "PreToolUse",
                "session_id": f"bench-{i}",
                "cwd": str(project),
                "tool_name": "Bash",
                "tool_input": {"command": command},
            }
        ).encode()

    async def gate(stdin: bytes) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mcp_server", "gate", env=env, cwd=project,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
        return proc

    startups: list[float] = []
    for i in range(max(5, rounds // 2)):
        t0 = time.perf_counter()
        proc = await gate(event("ls", i))
        out, _ = await proc.communicate()
        startups.append((time.perf_counter() - t0) * 1000)
        if out.strip():
            raise RuntimeError(f"a safe call printed a decision: {out!r}")
    latencies: list[float] = []
    async with client(30) as http:
        since = await last_seq(http, stack)
        for i in range(rounds + 1):  # round 0 warms up and is not counted
            command = f"git push origin bench-p7-{i}"
            proc = await gate(event(command, i))
            card = None
            deadline = time.monotonic() + 20
            while card is None and time.monotonic() < deadline:  # the question's text comes first, then its card
                cards = await fake_messages(http, stack, chat, since, wait=1, timeout=5)
                card = next((m for m in cards if m.get("task_id")), None)
                since = max([since, *(m["seq"] for m in cards)])
            if card is None:
                proc.kill()
                raise RuntimeError(f"the gate's card {i} did not reach the fake WeCom")
            await asyncio.sleep(0.2)  # the gate's long-poll is parked
            click = {"userid": "lisi", "task_id": card["task_id"], "event_key": "0"}
            assert proc.stdout is not None
            line, ms = await click_until(http, stack, click, proc.stdout.readline())
            await proc.wait()
            decision = json.loads(line or b"{}").get("hookSpecificOutput", {}).get("permissionDecision")
            if decision != "allow":
                raise RuntimeError(f"round {i}: the gate printed {line!r}")
            if i:
                latencies.append(ms)
    res.latency("P7 click on 批准 → Claude Code's gate hook (hil-mcp gate) prints allow (AI bot)", latencies, 50)
    res.add(
        f"P7 gate hook process start-up to exit, a call that needs no person, median of {len(startups)}",
        f"{statistics.median(startups):.0f} ms (max {max(startups):.0f})",
    )


# --- main -------------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, workdir: Path, res: Results) -> None:
    figures = {"P1", "P2", "P3", "P4", "M1", "M2", "M3", "P1A", "P5", "P6", "P7"}
    only = {x.strip().upper() for x in args.only.split(",")} if args.only else figures
    # SIGTERM (timeout, CI) cancels like Ctrl-C, so the stacks below are stopped instead of left running.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)

    async def measure(name: str, fn: Callable[[], Awaitable[None]]) -> None:
        log(f"{name} ...")
        started = time.monotonic()
        try:
            await fn()
        except Exception as exc:  # noqa: BLE001  # one failed measurement is reported, the others still run
            res.failed.append(name)
            res.add(f"{name} failed", f"{type(exc).__name__}: {str(exc)[:300]}", "", False)
            traceback.print_exc()
        log(f"{name} done in {time.monotonic() - started:.1f}s")

    if only & {"P1", "P2"}:
        with running_stack("relay", workdir, "relay-p1p2") as stack:
            if "P1" in only:
                await measure("P1", lambda: p1(stack, workdir, args.rounds, res))
            if "P2" in only:
                await measure("P2", lambda: p2(stack, res))
    if "P3" in only:
        with running_stack("relay", workdir, "relay-p3") as stack:
            await measure("P3", lambda: p3(stack, args.sessions, res))
    if "P4" in only:
        with running_stack("direct", workdir, "direct-p4") as stack:
            await measure("P4", lambda: p4(stack, args.callbacks, res))
    if only & {"M1", "M2", "M3"}:
        env = {"HIL_SWEEP_INTERVAL": "5", "HIL_API_TOKENS": MCP_TOKEN}
        if "M1" in only:
            with running_stack("relay", workdir, "relay-m1", server_env=env) as stack:
                await measure("M1", lambda: m1(stack, args.rounds, res))
        if "M2" in only:
            # Every waiting call of the 2025 protocol holds a session of the one bench token: room for all of them.
            room = str(args.mcp_calls)
            caps = {"HIL_MCP_SESSIONS_PER_TOKEN": room, "HIL_MCP_MAX_SESSIONS": room}
            for era in (MODERN, LEGACY):
                with running_stack("relay", workdir, f"relay-m2-{era}", server_env=env | caps) as stack:
                    await measure(f"M2 {era}", functools.partial(m2, stack, args.mcp_calls, era, res))
        if "M3" in only:
            room = str(args.mcp_sessions)
            caps = {"HIL_MCP_SESSIONS_PER_TOKEN": room, "HIL_MCP_MAX_SESSIONS": room}
            with running_stack("relay", workdir, "relay-m3", server_env=env | caps) as stack:
                await measure("M3", lambda: m3(stack, args.mcp_sessions, res))
    if only & {"P1A", "P5", "P6", "P7"}:
        with running_stack("direct", workdir, "aibot-p1a-p5", make=aibot_bench_stack) as stack:
            if "P1A" in only:
                await measure(
                    "P1A",
                    lambda: p1(
                        stack,
                        workdir,
                        args.rounds,
                        res,
                        reply=reply_by_aibot,
                        figure="P1A",
                        path="AI bot",
                        target_ms=10,
                    ),
                )
            if "P5" in only:
                await measure("P5", lambda: p5(stack, args.rounds, res))
            if "P6" in only:
                await measure("P6", lambda: p6(stack, workdir, args.rounds, res))
            if "P7" in only:
                await measure("P7", lambda: p7(stack, workdir, args.rounds, res))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./hil bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="P1 rounds (default 20)")
    parser.add_argument(
        "--sessions", type=int, default=10000, help="P3 waiting sessions / open long-polls (default 10000)"
    )
    parser.add_argument(
        "--callbacks", type=int, default=2000, help="P4 sessions answered by callbacks, per trial (default 2000)"
    )
    parser.add_argument(
        "--mcp-calls", type=int, default=2000, help="M2 tool calls waiting at /mcp at once (default 2000)"
    )
    parser.add_argument("--mcp-sessions", type=int, default=1000, help="M3 idle sessions opened at /mcp (default 1000)")
    parser.add_argument(
        "--only", help="comma-separated subset, e.g. P1,P3,M1 (P1A, P5, P6: the AI-bot channel; M1-M3: /mcp)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs and data (printed at the end)")
    args = parser.parse_args(argv)

    soft, hard = raise_nofile()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}  (= ./hil bench {shlex.join(sys.argv[1:])})")
    print(f"machine: {machine()}")
    print(f"open files limit: {soft} (hard {hard})")
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if load[0] > 1.0:
        print("warning: the machine is busy; figures are noisier and lower than on an idle machine")
    if soft < args.sessions + 200:
        print(f"warning: RLIMIT_NOFILE {soft} is below --sessions {args.sessions}; P3 will hold fewer long-polls")

    workdir = Path(tempfile.mkdtemp(prefix="hil-bench-"))
    res = Results()
    started = time.monotonic()
    try:
        asyncio.run(run(args, workdir, res))
    except (KeyboardInterrupt, asyncio.CancelledError):
        res.failed.append("interrupted")
        print("\ninterrupted: processes stopped", file=sys.stderr)
    finally:
        keep = args.keep or bool(res.failed)
        print()
        print(res.table())
        for text in res.notes:
            print(f"- {text}")
        load = os.getloadavg()
        print(
            f"\ntotal {time.monotonic() - started:.0f} s; load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        )
        if keep:
            print(f"logs and data: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())
