"""Start the real processes on 127.0.0.1 with free ports, for end-to-end tests and the benchmark."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import ROBOT, child_env, free_port
from tests.pg_backend import fresh_database_url, on_postgres

BOT_KEY = "e2e-bot-key-0123456789"
WORKER_TOKEN = "e2e-worker-token-abcdef"


# Deadlines for a state, not sleeps: a start that is quick returns at once. A Python process that imports FastAPI,
# the MCP SDK and pydantic takes over 20 s to answer on a 2-core machine whose load is 8.
START_DEADLINE = 60.0


@dataclass
class Proc:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    health_url: str | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self, wait: float = START_DEADLINE) -> Proc:
        env = child_env(**{**self.env, "PYTHONUNBUFFERED": "1"})
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, *self.args], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.log_path.parent
        )
        if self.health_url:
            try:
                self.wait_healthy(wait)
            except BaseException:
                self.kill()  # nobody holds it to stop it later: a process that never got healthy would be orphaned
                raise
        return self

    def wait_healthy(self, wait: float = START_DEADLINE) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.health_url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not healthy after {wait}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(sig)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Stack:
    """A fake WeCom, a HIL Server and (relay mode) a worker, all real processes."""

    mode: str
    tmp: Path
    server_env: dict[str, str] = field(default_factory=dict)
    worker_env: dict[str, str] = field(default_factory=dict)
    fake_args: list[str] = field(default_factory=list)
    fake_port: int = field(default_factory=free_port)
    server_port: int = field(default_factory=free_port)
    worker_port: int = field(default_factory=free_port)
    procs: dict[str, Proc] = field(default_factory=dict)
    database_url: str | None = None  # the server's PostgreSQL (HIL_TEST_BACKEND=postgres)

    @property
    def fake_url(self) -> str:
        return f"http://127.0.0.1:{self.fake_port}"

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    @property
    def worker_url(self) -> str:
        return f"http://127.0.0.1:{self.worker_port}"

    @property
    def callback_url(self) -> str:
        return f"{self.server_url}/api/callback" if self.mode == "direct" else f"{self.worker_url}/callback"

    def start(self) -> Stack:
        self.procs["fake"] = Proc(
            "fake-wecom",
            [
                "-m",
                "hil_sandbox.fake_wecom",
                "--port",
                str(self.fake_port),
                "--bot-key",
                BOT_KEY,
                "--callback-url",
                self.callback_url,
                "--log-level",
                "warning",
                *self.fake_args,
            ],
            {},
            self.tmp / "fake.log",
            f"{self.fake_url}/_fake/config",
        ).start()
        self.start_server()
        if self.mode == "relay":
            self.start_worker()
        return self

    def server_process_env(self) -> dict[str, str]:
        """The server's environment in this stack (the test's server_env last)."""
        env = {
            "HIL_HOST": "127.0.0.1",
            "HIL_PORT": str(self.server_port),
            "HIL_MODE": self.mode,
            "HIL_DATA_DIR": str(self.tmp / "server-data"),
            "WECOM_API_BASE": self.fake_url,
            "HEARTBEAT_INTERVAL": "1",
            "HEARTBEAT_TIMEOUT": "5",
            "WECOM_RETRY_DEADLINE": "30",
            "HIL_SWEEP_INTERVAL": "0.5",
        }
        if self.mode == "direct":
            env["BOT_KEY"] = BOT_KEY
        else:
            env["HIL_WORKER_TOKEN"] = WORKER_TOKEN
        if on_postgres():  # HIL_TEST_BACKEND=postgres: one fresh database per stack, kept across server restarts
            if self.database_url is None:
                self.database_url = fresh_database_url()
            env["HIL_DATABASE_URL"] = self.database_url
        env.update(self.server_env)
        return env

    def start_server(self) -> Proc:
        self.procs["server"] = Proc(
            "hil-server",
            ["-m", "hil_server.app"],
            self.server_process_env(),
            self.tmp / "server.log",
            f"{self.server_url}/health",
        ).start()
        return self.procs["server"]

    def start_worker(self, wait_connected: bool = True) -> Proc:
        env = {
            "HIL_URL": f"ws://127.0.0.1:{self.server_port}/ws",
            "HIL_TOKEN": WORKER_TOKEN,
            "BOT_KEY": BOT_KEY,
            "CALLBACK_HOST": "127.0.0.1",
            "CALLBACK_PORT": str(self.worker_port),
            "WECOM_API_BASE": self.fake_url,
            "HIL_DATA_DIR": str(self.tmp / "worker-data"),
            "WORKER_ID": "e2e-worker",
            "RECONNECT_MIN_DELAY": "0.2",
            "RECONNECT_MAX_DELAY": "1",
            "WECOM_RETRY_DEADLINE": "30",
        }
        env.update(self.worker_env)
        self.procs["worker"] = Proc(
            "hil-worker", ["-m", "devcloud_worker.worker"], env, self.tmp / "worker.log", f"{self.worker_url}/health"
        ).start()
        if wait_connected:
            self.wait_worker()
        return self.procs["worker"]

    def wait_worker(self, timeout: float = 30.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                if httpx.get(f"{self.server_url}/health", timeout=1).json().get("worker_connected"):
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"worker did not connect in {timeout}s:\n{self.procs['worker'].log()}")

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    @contextlib.contextmanager
    def running(self) -> Iterator[Stack]:
        """Started for the block and stopped after it; every process's log is printed when the block fails."""
        try:
            yield self.start()
        except BaseException:
            print(self.logs())
            raise
        finally:
            self.stop()

    def logs(self) -> str:
        return "\n".join(f"===== {name}\n{proc.log()}" for name, proc in self.procs.items())

    # --- helpers over HTTP ---
    def send(self, message: str, **body: Any) -> dict[str, Any]:
        return httpx.post(f"{self.server_url}/api/send", json={"message": message, **body}, timeout=60).json()

    def poll(self, session_id: str, wait: float = 0) -> dict[str, Any]:
        params = {"wait": wait} if wait else None
        return httpx.get(f"{self.server_url}/api/poll/{session_id}", params=params, timeout=wait + 10).json()

    def reply(self, chat_id: str, text: str, **kw: Any) -> dict[str, Any]:
        response = httpx.post(f"{self.fake_url}/_fake/reply", json={"chat_id": chat_id, "text": text, **kw}, timeout=30)
        response.raise_for_status()
        return response.json()

    def messages(
        self, chat_id: str | None = None, wait: int | None = None, timeout: float = 10
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {}
        if chat_id:
            params["chat_id"] = chat_id
        if wait:
            params["wait"] = wait
            params["timeout"] = timeout
        return httpx.get(f"{self.fake_url}/_fake/messages", params=params, timeout=timeout + 5).json()["messages"]

    def fake(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return httpx.post(f"{self.fake_url}/_fake/{path}", json=body, timeout=10).json()


def mcp_stdio_params(
    server_url: str, cwd: Path, *args: str, env: dict[str, str] | None = None, log_level: str = "INFO"
):
    """hil-mcp launched over stdio as an agent's MCP config would: `python -m mcp_server --service-url URL *args`.

    Settings the test does not give come from nowhere: inherited settings and proxies are dropped, and `cwd`
    (created) keeps any `.env` out."""
    from mcp.client.stdio import StdioServerParameters

    base = child_env(**{"PYTHONUNBUFFERED": "1", "HIL_LOG_LEVEL": log_level, **(env or {})})
    cwd.mkdir(parents=True, exist_ok=True)
    return StdioServerParameters(
        command=sys.executable, args=["-m", "mcp_server", "--service-url", server_url, *args], env=base, cwd=cwd
    )


class FakeChat:
    """One chat at the fake WeCom, played as its person: read what the robot posted, answer it (async)."""

    def __init__(self, http: httpx.AsyncClient, chat_id: str) -> None:
        self.http = http  # base_url = the fake's URL
        self.chat_id = chat_id

    async def messages(self, since_seq: int = 0, wait: int = 0) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"chat_id": self.chat_id, "since_seq": since_seq}
        if wait:
            params.update(wait=wait, timeout=20)
        response = await self.http.get("/_fake/messages", params=params)
        response.raise_for_status()
        return response.json()["messages"]

    async def question(self, text: str, since_seq: int = 0) -> tuple[dict[str, Any], str]:
        """Wait for the question carrying `text`; returns it and its short id."""
        from hil_protocol.messages import HEADER_RE

        while True:
            messages = await self.messages(since_seq, wait=1)
            assert messages, f"no message to {self.chat_id} after seq {since_seq}"
            for message in messages:
                if text in (message["content"] or ""):
                    match = HEADER_RE.match(message["content"])
                    assert match, message["content"]
                    return message, match["short_id"]
            since_seq = messages[-1]["seq"]

    async def count(self, text: str) -> int:
        return sum(text in (m["content"] or "") for m in await self.messages())

    async def quote_reply(self, question: dict[str, Any], answer: str) -> None:
        response = await self.http.post(
            "/_fake/reply",
            json={"chat_id": self.chat_id, "text": answer, "quote": question["content"], "quote_sender": ROBOT},
        )
        response.raise_for_status()
        assert all(r["status_code"] == 200 for r in response.json()["responses"]), response.json()


@dataclass
class Nginx:
    """deploy/nginx-hil.conf in front of a server on 127.0.0.1:`server_port`, listening on a free port (no TLS)."""

    tmp: Path
    server_port: int
    port: int = field(default_factory=free_port)
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: float = 10.0) -> Nginx:
        # The sample serves HTTPS on 443 and only redirects on 80: here its HTTPS server block listens in plain HTTP
        # on our port (no certificate needed) and the redirect block on a port of its own.
        site = (Path(__file__).resolve().parents[1] / "deploy" / "nginx-hil.conf").read_text()
        for placeholder, value in (
            ("listen 80;", f"listen 127.0.0.1:{free_port()};"),
            ("listen [::]:80;", ""),
            ("listen 443 ssl;", f"listen 127.0.0.1:{self.port};"),
            ("listen [::]:443 ssl;", ""),
        ):
            assert site.count(placeholder) == 1, placeholder
            site = site.replace(placeholder, value)
        site = "\n".join(line for line in site.splitlines() if not line.strip().startswith("ssl_"))
        site = site.replace("127.0.0.1:8081", f"127.0.0.1:{self.server_port}")
        ngx = self.tmp / "nginx"
        ngx.mkdir(exist_ok=True)
        (ngx / "site.conf").write_text(site)
        temp = "".join(
            f"  {kind}_temp_path {ngx}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (ngx / "nginx.conf").write_text(
            f"daemon off;\nmaster_process off;\npid {ngx}/nginx.pid;\nerror_log {ngx}/error.log;\nevents {{}}\n"
            f"http {{\n  access_log off;\n{temp}  include {ngx}/site.conf;\n}}\n"
        )
        self.popen = subprocess.Popen(
            ["nginx", "-p", str(ngx), "-e", str(ngx / "error.log"), "-c", str(ngx / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/health", timeout=1, trust_env=False)
                return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not start:\n{(ngx / 'error.log').read_text()}")

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            self.popen.wait(10)


async def ask_then_cancel(client: Any, chat: FakeChat, arguments: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """An MCP client calls send_and_wait_reply, and once the call reports progress (it is waiting for the answer)
    gives up on it, as an editor does when its user stops the agent. Returns the question at the fake, its short id."""
    import anyio

    waiting = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        waiting.set()

    async with anyio.create_task_group() as tg:

        async def ask() -> None:
            await client.call_tool("send_and_wait_reply", arguments, progress_callback=on_progress)
            raise AssertionError("the call returned although nobody answered")

        tg.start_soon(ask)
        question, short_id = await chat.question(arguments["message"])
        with anyio.fail_after(10):
            await waiting.wait()
        tg.cancel_scope.cancel()
    return question, short_id


async def settled_status(server_url: str, ref: str, token: str | None = None, limit: float = 5.0) -> str:
    """A session's poll status once it is no longer "waiting" (or after `limit` seconds)."""
    import anyio

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    status = "waiting"
    async with httpx.AsyncClient(trust_env=False, timeout=10, headers=headers) as http:
        for _ in range(int(limit / 0.05)):  # the state lives in another process: look again shortly
            status = (await http.get(f"{server_url}/api/poll/{ref}")).json()["status"]
            if status != "waiting":
                break
            await anyio.sleep(0.05)
    return status
