"""/metrics and /status: counters that follow real requests, the status page, token protection; the container
files (Dockerfile, docker-compose.yml, the entry script); and one end-to-end run with JSON logs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from hil_protocol.outbound import Notice
from hil_protocol.relay_frames import SendHintPayload
from hil_server import __version__
from hil_server.app import create_app
from tests.helpers import callback_body, eventually
from tests.procs import Stack
from tests.server_fixtures import WeCom, settings

ROOT = Path(__file__).resolve().parent.parent

# Settings read the environment and ./.env: neither may leak into these tests.
pytestmark = pytest.mark.usefixtures("clean_env")

WORKER_TOKEN = "worker-token-123456"
ADMIN_TOKEN = "admin-token-abcdef"
BOUND_TOKEN = "bound-token-654321"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, keyed by (sample name, labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def scrape(client: Any, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


def value(page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return page.get((name, frozenset(labels.items())))


# --- /metrics ----------------------------------------------------------------------------------------------------


def test_metrics_follow_a_question_and_its_reply(client: TestClient, wecom: WeCom) -> None:
    page = scrape(client)
    assert value(page, "hil_waiting_sessions") == 0
    assert value(page, "hil_info", version=__version__, mode="direct") == 1

    sent = client.post("/api/send", json={"message": "继续吗？", "chat_id": "chatA", "project_name": "proj"}).json()
    assert sent["success"], sent
    page = scrape(client)
    assert value(page, "hil_waiting_sessions") == 1
    assert (value(page, "hil_wecom_sends_total", errcode="0") or 0) >= 1

    assert client.post("/api/callback", json=callback_body("继续")).status_code == 200
    page = scrape(client)
    assert value(page, "hil_replies_matched_total", method="only_waiting") == 1
    assert value(page, "hil_replies_matched_total", method="quote") is None
    assert value(page, "hil_callbacks_total", outcome="matched_only") == 1
    assert value(page, "hil_waiting_sessions") == 0

    assert client.get(f"/api/poll/{sent['session_id']}").json()["status"] == "replied"
    assert client.get(f"/api/poll/{sent['short_id']}", params={"wait": 1}).json()["status"] == "replied"
    client.get("/nowhere")
    client.request("BREW", "/health")
    page = scrape(client)
    assert value(page, "hil_polls_total", kind="short") == 1
    assert value(page, "hil_polls_total", kind="long") == 1
    count = "hil_http_request_duration_seconds_count"
    assert value(page, count, method="POST", route="/api/send") == 1
    assert value(page, count, method="POST", route="/api/callback") == 1
    assert value(page, count, method="GET", route="/api/poll/{session_id}") == 2
    assert value(page, count, method="GET", route="unmatched") == 1
    assert value(page, count, method="other", route="/health") == 1
    routes = {dict(labels).get("route") for name, labels in page if name == count}
    assert not any(sent["session_id"] in r or sent["short_id"] in r for r in routes if r)
    assert "/metrics" not in routes


def test_wecom_93000_is_counted_by_errcode(client: TestClient, wecom: WeCom) -> None:
    wecom.errcode = 93000
    sent = client.post("/api/send", json={"message": "还在吗？", "chat_id": "chatA"}).json()
    assert sent["success"] is False and sent["errcode"] == 93000
    page = scrape(client)
    assert value(page, "hil_wecom_sends_total", errcode="93000") == 1  # not retried
    assert value(page, "hil_wecom_sends_total", errcode="0") is None
    assert value(page, "hil_waiting_sessions") == 0


def test_hints_are_counted_by_kind_and_result(client: TestClient, wecom: WeCom) -> None:
    client.post("/api/callback", json=callback_body("你好", chat="lonely", msgid="h-1"))
    eventually(lambda: value(scrape(client), "hil_hints_sent_total", kind="chat_id", result="sent") == 1)

    for i in range(2):
        assert client.post("/api/send", json={"message": f"问题 {i}", "chat_id": "chatB"}).json()["success"]
    client.post("/api/callback", json=callback_body("好的", chat="chatB", msgid="h-2"))
    eventually(lambda: value(scrape(client), "hil_hints_sent_total", kind="several", result="sent") == 1)
    assert value(scrape(client), "hil_callbacks_total", outcome="hint_several") == 1

    wecom.errcode = 93000
    client.post("/api/callback", json=callback_body("", chat="lonely", msgid="h-3"))
    eventually(lambda: value(scrape(client), "hil_hints_sent_total", kind="empty", result="failed") == 1)


def test_hint_kind_stays_off_the_wire() -> None:
    hint = Notice(chat_id="c", text="m", markdown=False, kind="several")
    assert SendHintPayload.of(hint).model_dump(exclude_none=True) == {
        "chat_id": "c",
        "message": "m",
        "msg_type": "text",
    }


def test_each_app_has_its_own_registry(tmp_path: Path, wecom: WeCom) -> None:
    with TestClient(create_app(settings(tmp_path / "a"))) as a, TestClient(create_app(settings(tmp_path / "b"))) as b:
        a.post("/api/send", json={"message": "只在 a", "chat_id": "chatA"})
        assert value(scrape(a), "hil_waiting_sessions") == 1
        assert value(scrape(b), "hil_waiting_sessions") == 0
        assert value(scrape(b), "hil_http_request_duration_seconds_count", method="POST", route="/api/send") is None


def test_worker_connections_in_relay_mode(tmp_path: Path) -> None:
    app = create_app(settings(tmp_path, hil_mode="relay", bot_key=None, hil_worker_token=WORKER_TOKEN))
    with TestClient(app) as client:
        page = scrape(client)
        assert value(page, "hil_worker_connections") == 0
        assert value(page, "hil_worker_connects_total") == 0
        with client.websocket_connect(f"/ws?worker_id=w1&token={WORKER_TOKEN}") as ws:
            assert ws.receive_json()["type"] == "hello"
            page = scrape(client)
            assert value(page, "hil_worker_connections") == 1
            assert value(page, "hil_worker_connects_total") == 1
            [worker] = client.get("/status.json").json()["workers"]
            assert worker["worker_id"] == "w1" and worker["in_flight"] == 0
            assert worker["last_heartbeat_seconds_ago"] < 5
            assert "w1" in client.get("/status").text
        eventually(lambda: value(scrape(client), "hil_worker_connections") == 0)
        with client.websocket_connect("/ws?worker_id=w1", headers={"authorization": f"Bearer {WORKER_TOKEN}"}) as ws:
            ws.receive_json()
            assert value(scrape(client), "hil_worker_connections") == 1
        eventually(lambda: value(scrape(client), "hil_worker_connections") == 0)
        assert value(scrape(client), "hil_worker_connects_total") == 2
        assert client.get("/status.json").json()["workers"] == []


# --- /status -----------------------------------------------------------------------------------------------------


def test_status_lists_waiting_questions_and_recent_outcomes(client: TestClient, wecom: WeCom) -> None:
    question = "<script>alert('x')</script> 这是一个很长的问题，" + "需要人来确认是否继续执行下一步操作" * 3
    sent = client.post("/api/send", json={"message": question, "chat_id": "chatA", "project_name": "a&b"}).json()

    data = client.get("/status.json").json()
    assert data["mode"] == "direct" and data["version"] == __version__ and data["scope"] == "all"
    assert data["uptime_seconds"] >= 0 and data["workers"] == []
    [waiting] = data["waiting"]
    assert waiting["short_id"] == sent["short_id"] and waiting["project"] == "a&b" and waiting["chat_id"] == "chatA"
    assert waiting["question"] == question[:40] + "…"
    assert waiting["age_seconds"] >= 0

    page = client.get("/status")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert sent["short_id"] in html and "a&amp;b" in html and "chatA" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "等待回复的问题 / Waiting questions" in html and "direct" in html

    client.post("/api/callback", json=callback_body("可以"))
    data = client.get("/status.json").json()
    assert data["waiting"] == []
    assert data["recent"][0]["short_id"] == sent["short_id"]
    assert data["recent"][0]["outcome"] == "replied (only_waiting)"
    assert "replied (only_waiting)" in client.get("/status").text


def test_tokens_protect_status_and_metrics(tmp_path: Path, wecom: WeCom) -> None:
    spec = f"{ADMIN_TOKEN},{BOUND_TOKEN}=chatB"
    with TestClient(create_app(settings(tmp_path, hil_api_tokens=spec))) as client:
        for path in ("/status", "/status.json", "/metrics"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"authorization": "Bearer wrong-token"}).status_code == 401, path
            for token in (ADMIN_TOKEN, BOUND_TOKEN):
                assert client.get(path, headers={"authorization": f"Bearer {token}"}).status_code == 200, path
        assert client.get("/health").status_code == 200  # health stays open for load balancers

        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        bound = {"authorization": f"Bearer {BOUND_TOKEN}"}
        mine = client.post("/api/send", json={"message": "admin 的问题", "chat_id": "chatA"}, headers=admin).json()
        theirs = client.post("/api/send", json={"message": "bound 的问题", "chat_id": "chatB"}, headers=bound).json()
        # One visibility rule everywhere (auth.can_see): a token sees the questions it asked, even one that may
        # write to any chat; nobody reads another token's questions and answers.
        admins = client.get("/status.json", headers=admin).json()
        assert admins["scope"] == "own"
        assert [w["short_id"] for w in admins["waiting"]] == [mine["short_id"]]
        own = client.get("/status.json", headers=bound).json()
        assert own["scope"] == "own"
        assert [w["short_id"] for w in own["waiting"]] == [theirs["short_id"]]
        assert mine["short_id"] not in client.get("/status", headers=bound).text
        assert value(scrape(client, bound), "hil_waiting_sessions") == 2  # metrics are totals, not per token


# --- container files ---------------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def healthcheck_code(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test  # slim images have no curl
    return test[3]


def test_compose_file_describes_the_relay_stack() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"hil-server", "hil-worker", "sandbox"}
    for service in services.values():
        assert service["build"] == "." and service["image"] == "hil-mcp:latest"
        code = healthcheck_code(service)
        compile(code, "<healthcheck>", "exec")
        assert "urllib.request" in code

    server = services["hil-server"]
    assert server["command"] == ["server"]
    assert server["environment"]["HIL_MODE"] == "relay"
    assert server["environment"]["HIL_WORKER_TOKEN"].startswith("${HIL_WORKER_TOKEN:-")
    assert "8081:8081" in server["ports"]
    assert "127.0.0.1:8081/health" in healthcheck_code(server)
    assert "hil-server-data:/data" in server["volumes"]

    worker = services["hil-worker"]
    assert worker["command"] == ["worker"]
    env = worker["environment"]
    assert env["HIL_URL"] == "ws://hil-server:8081/ws"
    assert env["HIL_TOKEN"] == server["environment"]["HIL_WORKER_TOKEN"]
    assert env["BOT_KEY"].startswith("${BOT_KEY")
    assert env["WECOM_API_BASE"] == "${WECOM_API_BASE:-http://sandbox:8090}"
    assert worker["depends_on"]["hil-server"]["condition"] == "service_healthy"
    assert "127.0.0.1:8082/health" in healthcheck_code(worker)
    assert "ports" not in worker  # the callback port stays inside the compose network

    sandbox = services["sandbox"]
    assert sandbox["profiles"] == ["demo"]
    assert sandbox["command"][0] == "fake-wecom"
    assert "--callback-url=http://hil-worker:8082/callback" in sandbox["command"]
    assert "--port=8090" in sandbox["command"]
    assert "8090:8090" in sandbox["ports"]
    assert set(doc["volumes"]) == {"hil-server-data", "hil-worker-data"}


def test_dockerfile_builds_one_non_root_image() -> None:
    text = (ROOT / "Dockerfile").read_text()
    logical = text.replace("\\\n", " ")  # join continuation lines
    instructions = [
        [*line.split(None, 1), ""][:2] for line in logical.splitlines() if line.strip() and not line.startswith("#")
    ]
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert froms and all(f.startswith("python:3.12-slim") for f in froms)
    assert "[server]" in text and "pip install" in text
    users = [rest.strip() for op, rest in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert "HIL_DATA_DIR=/data" in text
    assert 'VOLUME ["/data"]' in text
    assert 'ENTRYPOINT ["hil-entrypoint"]' in text
    assert "COPY deploy/docker-entrypoint.sh /usr/local/bin/hil-entrypoint" in text
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for pattern in ("**/.env", "**/*.env", ".venv", "data", ".git", "!deploy/docker-entrypoint.sh"):
        assert pattern in ignored, pattern


def entrypoint(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        ["sh", str(ROOT / "deploy" / "docker-entrypoint.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
def test_entrypoint_picks_the_process() -> None:
    if not (Path(sys.executable).parent / "hil-mcp").exists():
        pytest.skip("hil-mcp is not installed beside the test interpreter")
    mcp = entrypoint("mcp", "--help")
    assert mcp.returncode == 0, mcp.stderr
    assert "--service-url" in mcp.stdout
    bad = entrypoint("bogus")
    assert bad.returncode == 2
    assert "server|worker|mcp|sandbox" in bad.stderr
    assert entrypoint("--help").returncode == 0


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_entrypoint_passes_shellcheck() -> None:
    result = subprocess.run(
        ["shellcheck", str(ROOT / "deploy" / "docker-entrypoint.sh")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) when installed, else Debian's `docker-compose` (v1): both validate the file
    against the Compose schema with `config`, and neither needs a running Docker engine for that."""
    if shutil.which("docker") is not None:
        result = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose") is not None:
        return ["docker-compose"]
    return None


@pytest.mark.skipif(
    compose_command() is None,
    reason="neither `docker compose` (v2 plugin) nor `docker-compose` is installed (apt-get install docker-compose)",
)
def test_docker_compose_config_accepts_the_file() -> None:
    command = compose_command()
    assert command is not None
    for profile in ([], ["--profile", "demo"]):
        result = subprocess.run(
            [*command, "-f", str(ROOT / "docker-compose.yml"), *profile, "config", "--quiet"],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
            env={**os.environ, "BOT_KEY": "k"},
        )
        assert result.returncode == 0, result.stderr


# --- end to end --------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_metrics_and_json_logs_in_a_real_relay_run(tmp_path: Path) -> None:
    stack = Stack(mode="relay", tmp=tmp_path, server_env={"HIL_LOG_FORMAT": "json"})
    try:
        stack.start()
        sent = stack.send("要发布吗？", chat_id="chat-metrics", project_name="metrics")
        assert sent["success"], sent
        before = samples(httpx.get(f"{stack.server_url}/metrics", timeout=5).text)
        assert value(before, "hil_waiting_sessions") == 1
        stack.reply("chat-metrics", "发布")
        assert stack.poll(sent["session_id"], wait=10)["status"] == "replied"

        page = samples(httpx.get(f"{stack.server_url}/metrics", timeout=5).text)
        assert value(page, "hil_waiting_sessions") == 0
        assert value(page, "hil_replies_matched_total", method="only_waiting") == 1
        assert value(page, "hil_callbacks_total", outcome="matched_only") == 1
        assert value(page, "hil_polls_total", kind="long") == 1
        assert value(page, "hil_worker_connections") == 1
        assert (value(page, "hil_worker_connects_total") or 0) >= 1
        assert value(page, "hil_http_request_duration_seconds_count", method="POST", route="/api/send") == 1
        status = httpx.get(f"{stack.server_url}/status.json", timeout=5).json()
        assert [w["worker_id"] for w in status["workers"]] == ["e2e-worker"]
        assert status["recent"][0]["short_id"] == sent["short_id"]

        # The compose file's healthcheck, pointed at this server.
        code = healthcheck_code(compose()["services"]["hil-server"]).replace(":8081/", f":{stack.server_port}/")
        assert subprocess.run([sys.executable, "-c", code], timeout=30, check=False).returncode == 0
    finally:
        stack.stop()

    lines = [line for line in stack.procs["server"].log().splitlines() if line.strip()]
    assert len(lines) >= 3
    for line in lines:
        entry = json.loads(line)  # every line, including uvicorn's and the shutdown's, is one JSON object
        assert {"ts", "level", "logger", "message"} <= set(entry), line
    messages = "\n".join(json.loads(line)["message"] for line in lines)
    assert re.search(r"question sent session_id=" + sent["session_id"], messages)
    assert "e2e-worker-token" not in stack.procs["server"].log()
