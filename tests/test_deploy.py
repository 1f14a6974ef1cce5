"""The deployment files: deploy_hil.sh and deploy_worker.sh run for real (start / status / restart / stop),
plus checks of the env examples, the systemd units, the README's deploy steps and (when nginx is installed) the
nginx sample, served with TLS and a throwaway certificate."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from devcloud_worker.config import WorkerSettings
from hil_server.config import ServerSettings
from tests.helpers import child_env, free_port, throwaway_tls

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
HIL = ROOT / "deploy_hil.sh"
WORKER = ROOT / "deploy_worker.sh"
COMMON = ROOT / "deploy" / "common.sh"
SCRIPTS = [HIL, WORKER, COMMON]
SECRET = "s3cret-worker-token-do-not-print"
VENV = Path(sys.prefix)

needs_venv = pytest.mark.skipif(
    not (VENV / "bin" / "python").exists(), reason="the test interpreter is not in a virtualenv with bin/python"
)


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port and it can be bound again."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        pass
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan may wait for a reaper that never comes)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# What the deploy scripts read besides the programs' settings: none of it may come from the test runner.
SCRIPT_VARS = ("VENV", "PID_FILE", "LOG_FILE", "HEALTH_URL", "START_TIMEOUT", "STOP_TIMEOUT", "PYTHON")


def script_env(tmp_path: Path, name: str, **extra: str) -> dict[str, str]:
    """A deploy script's environment: this test's venv, and pid, log and data files under `tmp_path`."""
    files = {
        "VENV": str(VENV),
        "PID_FILE": str(tmp_path / "run" / f"{name}.pid"),
        "LOG_FILE": str(tmp_path / "logs" / f"{name}.log"),
        "HIL_DATA_DIR": str(tmp_path / "data"),
        "HIL_LOG_LEVEL": "INFO",
    }
    return child_env(drop=SCRIPT_VARS, **{**files, **extra})


def run(
    script: Path, *args: str, env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def health_json(stdout: str) -> dict:
    """The JSON line the script printed after its own messages."""
    for line in stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no health JSON in:\n{stdout}")


def read_pid(env: dict[str, str]) -> int:
    return int(Path(env["PID_FILE"]).read_text().strip())


@pytest.fixture
def reaper() -> Iterator[list[dict[str, str]]]:
    """Envs whose pid file is killed after the test, whatever happened in it."""
    envs: list[dict[str, str]] = []
    yield envs
    for env in envs:
        pid_file = Path(env["PID_FILE"])
        if pid_file.exists():
            pid = int(pid_file.read_text().strip() or 0)
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)


# --- static checks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_scripts_are_executable() -> None:
    assert os.access(HIL, os.X_OK) and os.access(WORKER, os.X_OK)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck() -> None:
    result = subprocess.run(
        ["shellcheck", "-x", "deploy_hil.sh", "deploy_worker.sh", "deploy/common.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_help(tmp_path: Path) -> None:
    result = run(HIL, "--help", env=script_env(tmp_path, "hil"), cwd=tmp_path)
    assert result.returncode == 0
    assert "usage: deploy_hil.sh" in result.stdout
    result = run(WORKER, "bogus", env=script_env(tmp_path, "worker"), cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: deploy_worker.sh" in result.stderr


# --- the HIL Server ---------------------------------------------------------------------------------------------


@needs_venv
def test_hil_start_status_restart_stop(tmp_path: Path, reaper: list[dict[str, str]]) -> None:
    port = free_port()
    # The port and a secret come from ./hil.env; the mode from the environment, which wins over the file
    # (direct mode without BOT_KEY would not start).
    env_file = tmp_path / "hil.env"
    env_file.write_text(f"HIL_PORT={port}\nHIL_MODE=direct\nHIL_WORKER_TOKEN='{SECRET}'\nHIL_API_TOKENS=api-tok\n")
    env_file.chmod(0o600)
    env = script_env(tmp_path, "hil", HIL_HOST="127.0.0.1", HIL_MODE="relay")
    reaper.append(env)
    outputs: list[str] = []

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        result = run(HIL, *args, env=env, cwd=tmp_path)
        outputs.append(result.stdout + result.stderr)
        return result

    started = call("start")
    assert started.returncode == 0, started.stdout + started.stderr
    assert health_json(started.stdout) == {
        "status": "healthy",
        "mode": "relay",
        "channel": "relay",
        "worker_connected": False,
        "worker_count": 0,
    }
    pid = read_pid(env)
    assert alive(pid)
    assert "warning" not in started.stderr.lower()  # the env file is private, the API and /ws are guarded

    status = call("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"running (pid {pid})" in status.stdout
    assert health_json(status.stdout)["status"] == "healthy"
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["mode"] == "relay"

    again = call("start")  # already running: says so, starts nothing
    assert again.returncode == 0 and "already running" in again.stdout
    assert read_pid(env) == pid

    logs = subprocess.Popen(
        ["bash", str(HIL), "logs"],
        env={**env, "TAIL_LINES": "50"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(1)
    logs.terminate()
    tail, _ = logs.communicate(timeout=10)
    assert "Application startup complete" in tail

    restarted = call("restart")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    new_pid = read_pid(env)
    assert new_pid != pid and not alive(pid) and alive(new_pid)
    assert health_json(restarted.stdout)["status"] == "healthy"

    stopped = call("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not alive(new_pid)
    assert not Path(env["PID_FILE"]).exists()
    assert port_free(port)

    status = call("status")
    assert status.returncode == 3 and "not running" in status.stdout
    assert call("stop").returncode == 0  # stopping twice is fine

    log = Path(env["LOG_FILE"]).read_text()
    assert "Finished server process" in log  # a clean shutdown on SIGTERM
    for output in outputs:
        assert SECRET not in output
    assert SECRET not in log


@needs_venv
def test_start_repeats_the_servers_warnings(tmp_path: Path, reaper: list[dict[str, str]]) -> None:
    """An open API is said in the deploy output itself, not only in the log; in either log format."""
    port = free_port()
    env = script_env(tmp_path, "hil", HIL_HOST="127.0.0.1", HIL_PORT=str(port), HIL_MODE="relay")
    reaper.append(env)
    Path(env["LOG_FILE"]).parent.mkdir(parents=True)
    Path(env["LOG_FILE"]).write_text("2026-01-01 00:00:00,000 WARNING old: from an earlier run\n")
    for log_format in ("text", "json"):
        env["HIL_LOG_FORMAT"] = log_format
        started = run(HIL, "restart", env=env, cwd=tmp_path)
        assert started.returncode == 0, started.stdout + started.stderr
        warnings = [line for line in started.stderr.splitlines() if "WARNING" in line]
        assert any("HIL_API_TOKENS is not set" in line for line in warnings), started.stderr
        assert any("HIL_WORKER_TOKEN is not set" in line for line in warnings), started.stderr
        assert all(line.startswith("hil-server: ") for line in warnings)
        assert "from an earlier run" not in started.stderr  # only what this start logged
    assert run(HIL, "stop", env=env, cwd=tmp_path).returncode == 0


@needs_venv
def test_hil_start_failure_shows_log_and_exits_nonzero(tmp_path: Path, reaper: list[dict[str, str]]) -> None:
    env = script_env(tmp_path, "hil", HIL_HOST="127.0.0.1", HIL_PORT=str(free_port()), HIL_MODE="direct")
    reaper.append(env)
    result = run(HIL, "start", env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "BOT_KEY" in result.stderr  # the server's own error, from the tail of the log
    assert "exited during startup" in result.stderr
    assert not Path(env["PID_FILE"]).exists()


@needs_venv
def test_hil_refuses_a_busy_port(tmp_path: Path, reaper: list[dict[str, str]]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = script_env(tmp_path, "hil", HIL_HOST="127.0.0.1", HIL_PORT=str(port), HIL_MODE="relay")
        reaper.append(env)
        result = run(HIL, "start", env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "already in use" in result.stderr
    assert not Path(env["PID_FILE"]).exists()


def test_missing_explicit_env_file(tmp_path: Path) -> None:
    env = script_env(tmp_path, "hil", HIL_ENV_FILE=str(tmp_path / "nope.env"))
    result = run(HIL, "status", env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "nope.env" in result.stderr


# --- the DevCloud Worker ----------------------------------------------------------------------------------------


@needs_venv
def test_worker_start_status_stop(tmp_path: Path, reaper: list[dict[str, str]]) -> None:
    port = free_port()
    closed = free_port()  # nothing listens there: the worker runs anyway and keeps retrying
    env = script_env(
        tmp_path,
        "worker",
        BOT_KEY="deploy-test-bot-key",
        CALLBACK_HOST="127.0.0.1",
        CALLBACK_PORT=str(port),
        HIL_URL=f"ws://127.0.0.1:{closed}/ws",
    )
    reaper.append(env)

    started = run(WORKER, env=env, cwd=tmp_path)  # no argument: the venv exists, so just start
    assert started.returncode == 0, started.stdout + started.stderr
    assert health_json(started.stdout)["ws_connected"] is False
    pid = read_pid(env)
    assert alive(pid)

    status = run(WORKER, "status", env=env, cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"running (pid {pid})" in status.stdout
    body = health_json(status.stdout)
    assert body["status"] == "healthy" and body["ws_connected"] is False

    stopped = run(WORKER, "stop", env=env, cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not alive(pid)
    assert not Path(env["PID_FILE"]).exists()
    assert port_free(port)
    for result in (started, status, stopped):
        assert "deploy-test-bot-key" not in result.stdout + result.stderr


@needs_venv
def test_worker_refuses_to_start_without_bot_key(tmp_path: Path, reaper: list[dict[str, str]]) -> None:
    port = free_port()
    env = script_env(tmp_path, "worker", CALLBACK_HOST="127.0.0.1", CALLBACK_PORT=str(port))
    reaper.append(env)
    (tmp_path / "worker.env").write_text("BOT_KEY=\n")  # present but empty counts as missing
    for args in (["start"], ["restart"]):
        result = run(WORKER, *args, env=env, cwd=tmp_path)
        assert result.returncode != 0
        assert "BOT_KEY" in result.stderr
        assert not Path(env["PID_FILE"]).exists()
        assert port_free(port)


# --- nginx sample: HTTPS by default; the worker reaches the server through it over wss ----------------------------


def test_nginx_sample_is_https_by_default() -> None:
    site = (ROOT / "deploy" / "nginx-hil.conf").read_text()
    active = "\n".join(line.split("#", 1)[0] for line in site.splitlines())
    blocks = active.split("server {")[1:]
    assert len(blocks) == 2
    plain, tls = blocks if "listen 80;" in blocks[0] else blocks[::-1]
    # Port 80 does nothing but redirect; port 443 carries TLS with placeholder certificate paths.
    assert re.findall(r"^\s*(\w+)", plain, re.M) == ["listen", "listen", "server_name", "return"]
    assert "return 308 https://$host$request_uri;" in plain
    assert "listen 443 ssl;" in tls and "listen [::]:443 ssl;" in tls
    assert "ssl_certificate     /etc/letsencrypt/live/your-domain.com/fullchain.pem;" in tls
    assert "ssl_certificate_key /etc/letsencrypt/live/your-domain.com/privkey.pem;" in tls
    assert "proxy_pass" not in plain and "proxy_pass" in tls


@needs_venv
@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_sample_proxies_api_ws_and_health_only(tmp_path: Path, reaper: list[dict[str, str]]) -> None:
    server_port, worker_port, http_port, https_port = free_port(), free_port(), free_port(), free_port()
    ngx = tmp_path / "nginx"
    ngx.mkdir()
    tls = throwaway_tls(ngx, "localhost", "127.0.0.1")
    site = (ROOT / "deploy" / "nginx-hil.conf").read_text()
    for placeholder, value in (
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen [::]:80;", ""),
        ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        ("listen [::]:443 ssl;", ""),
        ("/etc/letsencrypt/live/your-domain.com/fullchain.pem", str(tls.certfile)),
        ("/etc/letsencrypt/live/your-domain.com/privkey.pem", str(tls.keyfile)),
    ):
        assert site.count(placeholder) == 1, placeholder
        site = site.replace(placeholder, value)
    assert "127.0.0.1:8081" in site
    site = site.replace("127.0.0.1:8081", f"127.0.0.1:{server_port}")
    (ngx / "site.conf").write_text(site)
    (ngx / "nginx.conf").write_text(
        f"daemon off;\nmaster_process off;\npid {ngx}/nginx.pid;\nerror_log {ngx}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {ngx}/body;\n  proxy_temp_path {ngx}/proxy;\n"
        f"  fastcgi_temp_path {ngx}/fcgi;\n  uwsgi_temp_path {ngx}/uwsgi;\n  scgi_temp_path {ngx}/scgi;\n"
        f"  include {ngx}/site.conf;\n}}\n"
    )
    nginx_cmd = ["nginx", "-p", str(ngx), "-e", str(ngx / "error.log"), "-c", str(ngx / "nginx.conf")]
    check = subprocess.run([*nginx_cmd, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr

    server_env = script_env(
        tmp_path, "hil", HIL_HOST="127.0.0.1", HIL_PORT=str(server_port), HIL_MODE="relay", HIL_WORKER_TOKEN=SECRET
    )
    worker_env = script_env(
        tmp_path,
        "worker",
        BOT_KEY="deploy-test-bot-key",
        HIL_TOKEN=SECRET,
        CALLBACK_HOST="127.0.0.1",
        CALLBACK_PORT=str(worker_port),
        HIL_URL=f"wss://127.0.0.1:{https_port}/ws",
        SSL_CERT_FILE=str(tls.cafile),  # the worker trusts the throwaway CA as it would a real one
        HIL_DATA_DIR=str(tmp_path / "worker-data"),
    )
    reaper.extend([server_env, worker_env])
    trust = tls.client_context()
    nginx = subprocess.Popen(nginx_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert run(HIL, "start", env=server_env, cwd=tmp_path).returncode == 0
        assert run(WORKER, "start", env=worker_env, cwd=tmp_path).returncode == 0
        base = f"https://127.0.0.1:{https_port}"
        with httpx.Client(verify=trust, trust_env=False, timeout=10) as https:
            deadline = time.monotonic() + 15
            while True:
                try:
                    if https.get(f"{base}/health").json().get("worker_connected"):
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                logs = (ngx / "error.log").read_text() + Path(worker_env["LOG_FILE"]).read_text()
                assert time.monotonic() < deadline, logs
                time.sleep(0.2)
            assert httpx.get(f"http://127.0.0.1:{worker_port}/health", timeout=5).json()["ws_connected"] is True
            assert https.get(f"{base}/api/health").json()["worker_count"] == 1
            poll = https.get(f"{base}/api/poll/0123abcd?wait=1")
            assert poll.status_code == 200 and poll.json()["status"] == "not_found"
            for hidden in ("/", "/docs", "/openapi.json", "/healthz"):
                assert https.get(base + hidden).status_code == 404, hidden
        # Plain HTTP only redirects, keeping the method (308), and never reaches the server.
        plain = f"http://127.0.0.1:{http_port}"
        for method, path in (("GET", "/health"), ("POST", "/api/send"), ("GET", "/ws")):
            answer = httpx.request(method, plain + path, json={} if method == "POST" else None, timeout=5)
            assert answer.status_code == 308, (method, path, answer.status_code)
            assert answer.headers["location"] == f"https://127.0.0.1{path}"
    finally:
        run(WORKER, "stop", env=worker_env, cwd=tmp_path)
        run(HIL, "stop", env=server_env, cwd=tmp_path)
        nginx.terminate()
        nginx.wait(10)


# --- env examples and systemd units -----------------------------------------------------------------------------


def example_values(path: Path) -> dict[str, str]:
    """NAME -> value of every `NAME=value` / `# NAME=value` line."""
    values = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^(?:#\s?)?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            values[m.group(1)] = m.group(2).strip().strip("'\"")
    return values


@pytest.mark.parametrize(
    ("example", "settings"),
    [("hil.env.example", ServerSettings), ("worker.env.example", WorkerSettings)],
)
def test_env_example_lists_every_setting_with_its_default(example: str, settings: type[BaseSettings]) -> None:
    values = example_values(ROOT / "deploy" / example)
    fields = settings.model_fields
    assert set(values) == {name.upper() for name in fields}
    for name, field in fields.items():
        value = values[name.upper()]
        if field.default_factory is not None:
            continue
        default = field.default
        if default is None or default is PydanticUndefined or isinstance(default, SecretStr):
            assert value == "", name
        elif isinstance(default, Path):
            assert Path(value) == default, name
        elif isinstance(default, bool):
            assert value.lower() == str(default).lower(), name
        elif isinstance(default, (int, float)):
            assert float(value) == default, name
        else:
            assert value == str(default), name
    for line in (ROOT / "deploy" / example).read_text().splitlines():
        if not line.startswith("#") and "=" in line:  # active lines: only empty secrets
            assert line.endswith("="), line


@pytest.mark.parametrize(
    ("example", "module"),
    [
        ("hil.env.example", "hil_server.config.ServerSettings"),
        ("worker.env.example", "devcloud_worker.config.WorkerSettings"),
    ],
)
def test_env_example_loads(tmp_path: Path, example: str, module: str) -> None:
    """Sourced as deploy_*.sh does, the example is a valid configuration (the worker's BOT_KEY aside)."""
    mod, cls = module.rsplit(".", 1)
    code = f"from {mod} import {cls}; {cls}()"
    env = script_env(tmp_path, "x")
    del env["HIL_DATA_DIR"], env["HIL_LOG_LEVEL"]
    result = subprocess.run(
        [
            "bash",
            "-c",
            'set -ae; . "$1"; : "${BOT_KEY:=placeholder-key}"; exec "$2" -c "$3"',
            "x",
            str(ROOT / "deploy" / example),
            sys.executable,
            code,
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("unit", "module", "env_file"),
    [
        ("hil-server.service", "hil_server.app", "hil.env"),
        ("hil-worker.service", "devcloud_worker.worker", "worker.env"),
    ],
)
def test_systemd_unit(tmp_path: Path, unit: str, module: str, env_file: str) -> None:
    text = (ROOT / "deploy" / unit).read_text()
    for line in (
        "WorkingDirectory=/opt/hil-mcp",
        f"EnvironmentFile=/opt/hil-mcp/{env_file}",
        f"ExecStart=/opt/hil-mcp/.venv/bin/python -m {module}",
        "Restart=on-failure",
        "User=hil",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=20",
        "NoNewPrivileges=true",
        "ProtectSystem=strict",
        "ReadWritePaths=/opt/hil-mcp/data",
        "Environment=HIL_DATA_DIR=/opt/hil-mcp/data",
        f"Documentation={REPOSITORY}",
    ):
        assert line in text.splitlines(), line
    assert "pypi.org" not in text  # PyPI's hil-mcp page is the older package's
    assert f"install -m 600 deploy/{env_file}.example /opt/hil-mcp/{env_file}" in text
    if shutil.which("systemd-analyze"):
        copy = tmp_path / unit
        copy.write_text(text.replace("/opt/hil-mcp/.venv/bin/python", sys.executable))
        result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
        # Unknown keys and bad values are only warnings (exit status 0), naming the file.
        problems = [ln for ln in result.stderr.splitlines() if str(copy) in ln]
        assert result.returncode == 0 and not problems, result.stderr


# --- one virtualenv, and the README's deploy steps ----------------------------------------------------------------


def test_deploy_scripts_and_hil_share_one_venv(tmp_path: Path) -> None:
    venv = ROOT / ".venv"
    env = script_env(tmp_path, "hil")
    del env["VENV"]
    usage = run(HIL, "--help", env=env, cwd=tmp_path).stdout
    assert f"default {venv}, shared with ./hil" in usage
    hil_help = subprocess.run(
        [str(ROOT / "hil"), "help"], env=env, capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert f"The virtualenv is {venv} " in hil_help
    # HIL_VENV, ./hil's override, moves the deploy scripts' venv too.
    missing = tmp_path / "elsewhere"
    status = run(HIL, "start", env={**env, "HIL_VENV": str(missing)}, cwd=tmp_path)
    assert status.returncode != 0 and f"no Python at {missing}/bin/python" in status.stderr


def readme_commands(section: str) -> list[str]:
    """The shell lines of the README's bash blocks under `## {section}` (comments dropped)."""
    body = README.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", body, re.S):
        lines += [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]
    return lines


def test_readme_creates_env_files_private() -> None:
    commands = readme_commands("部署")
    assert "install -m 600 deploy/hil.env.example hil.env" in commands
    assert "install -m 600 deploy/worker.env.example worker.env" in commands
    assert not [c for c in commands if c.startswith("cp ") and ".env" in c]
    assert f"git clone {REPOSITORY} hil-mcp && cd hil-mcp" in commands


def test_readme_direct_mode_one_liner_appends(tmp_path: Path) -> None:
    [line] = [c for c in readme_commands("部署") if "BOT_KEY=" in c]
    assert line.endswith(" && ./deploy_hil.sh")
    setup = line.removesuffix(" && ./deploy_hil.sh")
    fresh, kept = tmp_path / "fresh", tmp_path / "kept"
    fresh.mkdir()
    kept.mkdir()
    (kept / "hil.env").write_text("HIL_API_TOKENS=tok\nBOT_KEY=\n")
    (kept / "hil.env").chmod(0o644)
    for cwd in (fresh, kept):
        subprocess.run(["bash", "-euc", setup], cwd=cwd, check=True, timeout=30)
        assert (cwd / "hil.env").stat().st_mode & 0o777 == 0o600
    assert (fresh / "hil.env").read_text() == "BOT_KEY=your-bot-key\n"
    assert (kept / "hil.env").read_text() == "HIL_API_TOKENS=tok\nBOT_KEY=\nBOT_KEY=your-bot-key\n"
    # Sourced as deploy_*.sh and systemd read it, the last BOT_KEY wins.
    sourced = subprocess.run(
        ["bash", "-c", 'set -a; . ./hil.env; printf %s "$BOT_KEY"'], cwd=kept, capture_output=True, text=True
    )
    assert sourced.stdout == "your-bot-key"


def test_docs_point_at_the_repository_not_pypi() -> None:
    assert REPOSITORY.startswith("https://") and "pypi.org" not in REPOSITORY
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert all("pypi.org" not in url for url in project["urls"].values())
    # Every MCP config runs this code, never PyPI's older hil-mcp: the HIL Server's own /mcp, or hil-mcp from a clone.
    configs = re.findall(r"```json\n(.*?)```", README.split("## 在 MCP 客户端中配置", 1)[1].split("\n## ", 1)[0], re.S)
    servers = [json.loads(c).get("mcpServers", {}).get("wecom-hil") for c in configs]
    assert servers[0] is not None and servers[0]["url"].endswith("/mcp")
    launched = [s for s in servers if s and "command" in s]
    assert launched and all(s["args"][:3] == ["--from", "/path/to/hil-mcp", "hil-mcp"] for s in launched), launched


# --- secrets out of git, and logs that say what they do ------------------------------------------------------------


def test_secrets_files_and_data_are_git_ignored() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["hil.env", "worker.env", "data/hil-store.sqlite3", "data/sandbox/x", ".env"]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.split()
    assert ignored == paths
    examples = ["deploy/hil.env.example", "deploy/worker.env.example"]
    assert subprocess.run(["git", "check-ignore", "--no-index", *examples], cwd=ROOT, check=False).returncode == 1


@pytest.mark.parametrize(("script", "env_file"), [(HIL, "hil.env"), (WORKER, "worker.env"), (HIL, ".env")])
def test_refuses_to_start_with_a_secrets_file_tracked_by_git(tmp_path: Path, script: Path, env_file: str) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    secrets = tmp_path / env_file
    secrets.write_text("BOT_KEY=not-a-real-key\n")
    secrets.chmod(0o600)
    subprocess.run(["git", "add", env_file], cwd=tmp_path, check=True)
    result = run(script, "start", env=script_env(tmp_path, script.stem), cwd=tmp_path)
    assert result.returncode == 1, result
    assert f"{env_file} is tracked by git" in result.stderr and "git rm --cached" in result.stderr, result.stderr
    assert "not-a-real-key" not in result.stdout + result.stderr
    assert not Path(script_env(tmp_path, script.stem)["PID_FILE"]).exists()


def test_logs_says_it_follows_and_how_to_stop(tmp_path: Path) -> None:
    env = script_env(tmp_path, "hil")
    Path(env["LOG_FILE"]).parent.mkdir(parents=True)
    Path(env["LOG_FILE"]).write_text("a line\n")
    follow = subprocess.Popen(
        ["bash", str(HIL), "logs"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert follow.stderr is not None and follow.stdout is not None
        said = follow.stderr.readline()
        assert "following" in said and env["LOG_FILE"] in said and "Ctrl+C to stop" in said, said
        assert follow.stdout.readline() == "a line\n"
    finally:
        follow.kill()
        follow.wait(10)
