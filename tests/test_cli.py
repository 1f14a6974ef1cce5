"""The command lines a newcomer meets first: `--help` of every console script (in-process: exits 0, prints help, makes
nothing), flags over the environment over `.env`, one line for a bad setting, and `./hil` — its help, and the sandbox
it starts: banner only once both servers answer, an MCP config that runs as printed, one line for a taken port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

import devcloud_worker.cli
import hil_server.cli
import mcp_server.__main__
from hil_protocol import __version__
from hil_sandbox import sandbox
from mcp_server.config import McpSettings
from tests.procs import Proc, mcp_stdio_params

pytestmark = pytest.mark.usefixtures("clean_env")  # no HIL_*/BOT_* from the runner; cwd is tmp_path

ROOT = Path(__file__).resolve().parent.parent
HIL = ROOT / "hil"
MAINS: dict[str, Callable[[list[str]], Any]] = {
    "hil-server": hil_server.cli.main,
    "hil-worker": devcloud_worker.cli.main,
    "hil-sandbox": sandbox.main,
    "hil-mcp": mcp_server.__main__.main,
}


def exit_code(call: Callable[[], Any]) -> int | str | None:
    with pytest.raises(SystemExit) as stopped:
        call()
    return stopped.value.code


# --- --help and --version, in-process -----------------------------------------------------------------------------


@pytest.mark.parametrize("prog", MAINS)
def test_help_exits_0_and_touches_nothing(
    prog: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A .env that could not be loaded, and no BOT_KEY: --help must not read settings at all.
    (tmp_path / ".env").write_bytes(b"HIL_PORT=\xff\xfe\nBOT_KEY\n")
    monkeypatch.setenv("HIL_PORT", "not-a-port")
    before = sorted(tmp_path.iterdir())
    assert exit_code(lambda: MAINS[prog](["--help"])) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: {prog}") and ("--port" in out or "--service-url" in out), out
    assert err == ""
    assert sorted(tmp_path.iterdir()) == before  # no data dir, no lock file


@pytest.mark.parametrize("prog", MAINS)
def test_version(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert __version__ == "0.3.0"
    assert exit_code(lambda: MAINS[prog](["--version"])) == 0
    assert capsys.readouterr().out.strip() == f"{prog} {__version__}"


def test_every_package_reports_the_one_version() -> None:
    import devcloud_worker
    import hil_server
    import mcp_server

    assert hil_server.__version__ == mcp_server.__version__ == devcloud_worker.__version__ == __version__


# --- flags > environment > .env > defaults -------------------------------------------------------------------------


def test_server_flags_override_environment_and_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("HIL_HOST=10.0.0.1\nHIL_PORT=7001\nHIL_DATA_DIR=from-dotenv\nHIL_STORE=memory\n")
    monkeypatch.setenv("HIL_PORT", "7002")
    monkeypatch.setenv("HIL_MODE", "direct")
    monkeypatch.setenv("BOT_KEY", "k")

    def load(*argv: str) -> Any:
        return hil_server.cli.settings_from_args(hil_server.cli.parse_args(list(argv)))

    plain = load()
    assert (plain.hil_host, plain.hil_port, plain.hil_data_dir, plain.hil_mode) == (
        "10.0.0.1",  # .env over the default
        7002,  # environment over .env
        Path("from-dotenv"),
        "direct",
    )
    assert plain.hil_store == "memory"  # what no flag names still comes from .env
    flagged = load("--host", "127.0.0.1", "--port", "7003", "--data-dir", str(tmp_path / "d"), "--mode", "relay")
    assert (flagged.hil_host, flagged.hil_port, flagged.hil_data_dir, flagged.hil_mode) == (
        "127.0.0.1",
        7003,
        tmp_path / "d",
        "relay",
    )
    assert not (tmp_path / "d").exists()  # loading settings creates nothing


def test_worker_flags_override_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BOT_KEY", "k")
    monkeypatch.setenv("CALLBACK_PORT", "7100")
    monkeypatch.setenv("HIL_URL", "ws://env/ws")
    argv = ["--host", "127.0.0.1", "--port", "7101", "--data-dir", str(tmp_path), "--hil-url", "wss://flag/ws"]
    settings = devcloud_worker.cli.settings_from_args(devcloud_worker.cli.parse_args(argv))
    assert (settings.callback_host, settings.callback_port, settings.hil_url) == ("127.0.0.1", 7101, "wss://flag/ws")
    assert settings.hil_data_dir == tmp_path
    assert devcloud_worker.cli.settings_from_args(devcloud_worker.cli.parse_args([])).callback_port == 7100


def test_mcp_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVICE_URL", "http://env:8081")
    monkeypatch.setenv("DEFAULT_TIMEOUT", "30")
    assert McpSettings(**mcp_server.__main__.parse_args([])).service_url == "http://env:8081"
    flagged = McpSettings(**mcp_server.__main__.parse_args(["--service-url", "http://flag:1/api", "--timeout", "5"]))
    assert (flagged.service_url, flagged.timeout) == ("http://flag:1", 5)


# --- a bad setting is one line that names it -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prog", "env", "argv", "named"),
    [
        ("hil-server", {"HIL_PORT": "eighty"}, [], "HIL_PORT"),
        ("hil-server", {"HIL_MODE": "both"}, [], "HIL_MODE"),
        ("hil-server", {}, ["--port", "70000"], "HIL_PORT"),
        ("hil-worker", {}, [], "BOT_KEY"),
        ("hil-worker", {"BOT_KEY": "k", "CALLBACK_PORT": "x"}, [], "CALLBACK_PORT"),
        # hil-mcp names a setting the way a person sets it: its flag and its environment variable
        ("hil-mcp", {"DEFAULT_TIMEOUT": "abc"}, [], "--timeout / DEFAULT_TIMEOUT: "),
        ("hil-mcp", {}, ["--poll-interval", "-3"], "--poll-interval / POLL_INTERVAL: "),
        ("hil-mcp", {"HIL_HEARTBEAT": "0"}, [], "HIL_HEARTBEAT: "),
    ],
)
def test_bad_setting_is_one_line(
    prog: str,
    env: dict[str, str],
    argv: list[str],
    named: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert exit_code(lambda: MAINS[prog](argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: invalid configuration: {named}"), err


def test_unreadable_dotenv_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / ".env").write_bytes(b"HIL_PORT=\xff\n")
    assert exit_code(lambda: hil_server.cli.main([])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".env" in err and "UTF-8" in err, err


def test_sandbox_bad_flag_is_argparse_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(lambda: sandbox.main(["--log-level", "loud"])) == 2
    assert "--log-level" in capsys.readouterr().err


def test_a_wrong_hil_channel_is_an_error_in_the_sandbox_and_the_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # A typo must not quietly give the webhook channel.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HIL_CHANNEL", "bogus")
    assert exit_code(lambda: sandbox.main(["--port", "0", "--wecom-port", "0"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HIL_CHANNEL='bogus' is not a channel" in err and "aibot" in err, err
    monkeypatch.setenv("BOT_KEY", "k")
    assert exit_code(lambda: hil_server.cli.main([])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HIL_CHANNEL" in err and "aibot" in err, err


def test_sandbox_aibot_and_relay_do_not_go_together(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(lambda: sandbox.main(["--aibot", "--relay"])) == 2
    assert "--aibot and --relay do not go together" in capsys.readouterr().err


# --- the sandbox's MCP config ---------------------------------------------------------------------------------


def test_mcp_config_names_this_installations_hil_mcp_absolutely() -> None:
    server = sandbox.mcp_config("http://127.0.0.1:9")["mcpServers"]["wecom-hil"]
    command = Path(server["command"])
    assert command.is_absolute() and os.access(command, os.X_OK)
    assert command.parent == Path(sys.executable).absolute().parent  # this venv's, not one found on PATH
    assert server["args"][-6:] == [
        *("--service-url", "http://127.0.0.1:9"),
        *("--chat-id", "sandbox-chat"),
        *("--project-name", "sandbox"),
    ]


@pytest.mark.parametrize(
    ("host", "url_host"), [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("::", "[::1]"), ("::1", "[::1]")]
)
def test_wildcard_hosts_are_reached_on_loopback(host: str, url_host: str) -> None:
    assert sandbox.reachable_host(host) == url_host


# --- ./hil ------------------------------------------------------------------------------------------------------


def run_hil(*args: str, venv: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HIL_VENV": str(venv)}
    return subprocess.run([str(HIL), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("flag", ["help", "--help", "-h"])
def test_hil_help_lists_the_subcommands_and_builds_nothing(flag: str, tmp_path: Path) -> None:
    venv = tmp_path / "no-venv"
    result = run_hil(flag, venv=venv)
    assert result.returncode == 0, result.stderr
    for command in ("sandbox", "test", "server", "worker", "mcp", "bench", "setup", "help"):
        assert f"\n  {command} " in result.stdout, command
    assert str(venv) in result.stdout  # says which virtualenv it uses
    assert not venv.exists()


def test_hil_unknown_command_is_usage_and_exit_2(tmp_path: Path) -> None:
    venv = tmp_path / "no-venv"
    result = run_hil("serve", venv=venv)
    assert result.returncode == 2
    assert result.stderr.startswith("hil: unknown command 'serve'\nusage: ./hil")
    assert not venv.exists()


def this_venv_is_set_up_by_hil() -> bool:
    stamp = Path(sys.prefix) / ".hil-installed"
    return stamp.exists() and stamp.stat().st_mtime >= (ROOT / "pyproject.toml").stat().st_mtime


@pytest.mark.skipif(not this_venv_is_set_up_by_hil(), reason="the test venv is not one ./hil set up (no fresh stamp)")
def test_hil_with_a_taken_port_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # Flags without a command go to the sandbox, the default command.
        args = ["--port", str(port), "--wecom-port", "0", "--data-dir", str(tmp_path / "d")]
        result = run_hil(*args, venv=Path(sys.prefix))
    assert result.returncode == 1
    assert result.stdout == ""  # no banner
    assert result.stderr.splitlines()[-1] == (
        f"hil-sandbox: port {port} on 127.0.0.1 is already in use; stop what uses it, or choose another with --port"
    )
    assert "Traceback" not in result.stderr


# --- the sandbox, as a process ------------------------------------------------------------------------------------


class Sandbox:
    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        log = proc.log()
        lines = log.splitlines()
        start = lines.index("{")
        end = start + lines[start:].index("}")
        self.config = json.loads("\n".join(lines[start : end + 1]))["mcpServers"]["wecom-hil"]
        self.server_url = self.config["args"][self.config["args"].index("--service-url") + 1]
        self.wecom_url = next(line.split(" : ")[1].strip().rstrip("/") for line in lines if "WeCom chat page" in line)


def start_sandbox(tmp_path: Path, *args: str, name: str = "sandbox", env: dict[str, str] | None = None) -> Proc:
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = ["-m", "hil_sandbox", "--data-dir", str(tmp_path / "data"), "--log-level", "WARNING"]
    return Proc(name, [*base, *args], env or {}, tmp_path / f"{name}.log").start()


def wait_for_banner(proc: Proc, timeout: float = 30) -> Sandbox:
    end = time.monotonic() + timeout
    while "Ctrl+C" not in proc.log():
        assert proc.popen is not None and proc.popen.poll() is None, proc.log()
        assert time.monotonic() < end, proc.log()
        time.sleep(0.02)
    return Sandbox(proc)


@pytest.fixture
def running_sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    # Settings meant for a real deployment, which the sandbox must not take (its banner's config would get a 401).
    env = {"HIL_API_TOKENS": "real-token", "HIL_DEFAULT_CHAT_ID": "real-chat", "HIL_STORE": "bogus"}
    proc = start_sandbox(tmp_path, "--port", "0", "--wecom-port", "0", env=env)
    try:
        yield wait_for_banner(proc)
    finally:
        proc.stop()


def test_sandbox_banner_comes_once_both_servers_answer(running_sandbox: Sandbox) -> None:
    # No retry: when the banner is out, both already answer.
    health = httpx.get(f"{running_sandbox.server_url}/health", timeout=5, trust_env=False)
    assert health.status_code == 200 and health.json()["mode"] == "direct"
    assert httpx.get(f"{running_sandbox.wecom_url}/", timeout=5, trust_env=False).status_code == 200
    assert f"hil-mcp sandbox {__version__}" in running_sandbox.proc.log()
    assert_no_warnings_about_its_own_setup(running_sandbox.proc.log())


def assert_no_warnings_about_its_own_setup(log: str) -> None:
    """On loopback the sandbox leaves tokens unset and callbacks open itself: nothing there for a person to act on."""
    for warning in ("UNAUTHENTICATED", "is not set", "BOT_KEY is set", "unauthenticated"):
        assert warning not in log, log


def test_sandbox_in_relay_mode_takes_the_chat_pages_replies_through_its_worker(tmp_path: Path) -> None:
    """./hil --relay: the fake's callbacks go to the worker's /callback, the worker relays them to the server."""
    proc = start_sandbox(tmp_path, "--relay", "--port", "0", "--wecom-port", "0", "--worker-port", "0")
    try:
        running = wait_for_banner(proc)
        log = proc.log()
        assert "HIL Server (relay mode)" in log and "DevCloud Worker" in log
        assert_no_warnings_about_its_own_setup(log)
        with httpx.Client(timeout=20, trust_env=False) as http:
            health = http.get(f"{running.server_url}/health").json()
            assert (health["mode"], health["worker_connected"]) == ("relay", True), health
            config = http.get(f"{running.wecom_url}/_fake/config").json()
            worker_url = next(line.split(" : ")[1].split()[0] for line in log.splitlines() if "DevCloud Worker" in line)
            assert config["callback_url"] == f"{worker_url}/callback"
            asked = http.post(
                f"{running.server_url}/api/send", json={"message": "中继能问吗？", "chat_id": "sandbox-chat"}
            ).json()
            params = {"chat_id": "sandbox-chat", "wait": 1, "timeout": 10}
            [question] = http.get(f"{running.wecom_url}/_fake/messages", params=params).json()["messages"]
            reply = {"chat_id": "sandbox-chat", "quote": question["content"], "text": "能"}
            answered = http.post(f"{running.wecom_url}/_fake/reply", json=reply).json()
            assert answered["responses"][0]["status_code"] == 200, answered
            polled = http.get(f"{running.server_url}/api/poll/{asked['session_id']}", params={"wait": 10}).json()
        assert polled["status"] == "replied" and polled["replies"][0]["content"] == "能", polled
    finally:
        proc.stop()


async def test_sandbox_mcp_config_runs_as_printed(running_sandbox: Sandbox, tmp_path: Path) -> None:
    """The banner's config, launched as an MCP client would, asks in the fake chat and gets the quote-reply."""
    config = running_sandbox.config
    cwd = tmp_path / "agent"
    env = {**mcp_stdio_params(running_sandbox.server_url, cwd).env, **config["env"]}
    params = StdioServerParameters(command=config["command"], args=config["args"], env=env, cwd=cwd)
    question = "要合并这个 PR 吗？"
    outcome: dict[str, Any] = {}
    async with (
        Client(params) as client,
        httpx.AsyncClient(base_url=running_sandbox.wecom_url, trust_env=False, timeout=30) as chat,
        anyio.create_task_group() as tg,
    ):

        async def ask() -> None:
            outcome["result"] = await client.call_tool("send_and_wait_reply", {"message": question})

        tg.start_soon(ask)
        listed = await chat.get("/_fake/messages", params={"chat_id": "sandbox-chat", "wait": 1, "timeout": 20})
        sent = listed.json()["messages"][0]["content"]
        assert sent.startswith("[#") and "sandbox]" in sent and question in sent, sent
        reply = await chat.post("/_fake/reply", json={"chat_id": "sandbox-chat", "quote": sent, "text": "合并吧"})
        assert reply.status_code == 200, reply.text
    result = outcome["result"].structured_content
    assert result["status"] == "success", result
    assert [r["content"] for r in result["replies"]] == ["合并吧"]


def test_second_sandbox_on_a_taken_port_is_one_line(running_sandbox: Sandbox, tmp_path: Path) -> None:
    server_port = running_sandbox.server_url.rsplit(":", 1)[1]
    wecom_port = running_sandbox.wecom_url.rsplit(":", 1)[1]
    for args, flag, port in (
        (["--port", server_port, "--wecom-port", "0"], "--port", server_port),
        (["--port", "0", "--wecom-port", wecom_port], "--wecom-port", wecom_port),
    ):
        proc = start_sandbox(tmp_path / flag.strip("-"), *args, name="second")
        assert proc.popen is not None
        assert proc.popen.wait(30) == 1
        assert proc.log().splitlines() == [
            f"hil-sandbox: port {port} on 127.0.0.1 is already in use; stop what uses it, or choose another with {flag}"
        ]


def test_second_sandbox_on_the_same_data_dir_is_one_line(running_sandbox: Sandbox, tmp_path: Path) -> None:
    proc = start_sandbox(tmp_path, "--port", "0", "--wecom-port", "0", name="same-data")
    assert proc.popen is not None
    assert proc.popen.wait(30) == 1
    lines = proc.log().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hil-sandbox: ") and "data" in lines[0], lines
    assert "--data-dir" in lines[0] and "HIL_DATA_DIR" not in lines[0], lines  # its own flag: it reads no env


def test_sandbox_on_an_address_not_on_this_host_is_one_line(tmp_path: Path) -> None:
    proc = start_sandbox(tmp_path, "--host", "203.0.113.7", "--port", "0", "--wecom-port", "0", name="elsewhere")
    assert proc.popen is not None
    assert proc.popen.wait(30) == 1
    [line] = proc.log().splitlines()
    assert line.startswith("hil-sandbox: cannot listen on 203.0.113.7:0 (") and line.endswith("given with --port")
    assert not (tmp_path / "data").exists()  # nothing made before the ports were bound


def test_mcp_config_without_the_console_script_runs_the_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sandbox.sysconfig, "get_path", lambda name: str(tmp_path))  # no console script there
    server = sandbox.mcp_config("http://127.0.0.1:9")["mcpServers"]["wecom-hil"]
    assert server["command"] == str(Path(sys.executable).absolute())
    assert server["args"][:2] == ["-m", "mcp_server"]
    env = {**os.environ, **server["env"]}
    result = subprocess.run(
        [server["command"], *server["args"], "--version"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.stdout.strip() == f"hil-mcp {__version__}", result.stderr
