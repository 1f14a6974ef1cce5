"""The sandbox: a fake WeCom (with a web chat page) and a HIL Server in direct mode pointed at it, in one process.

Nothing in the HIL Server knows it is talking to a simulator: it sends through the robot webhook API at
WECOM_API_BASE and receives fly-pigeon callbacks on /api/callback, exactly as with the real WeCom. With `--aibot`
(or HIL_CHANNEL=aibot in the environment) the fake also runs an AI bot (智能机器人) and the server holds its long
connection instead (HIL_CHANNEL=aibot); the chat page sees the AI bot and switches to it by itself. With `--relay`
the server runs in relay mode and a DevCloud Worker beside it holds the link: the fake's callbacks (the chat page's
replies) go to the worker's /callback, which relays them, as in a deployment with a worker in the robot's network.

Every port is bound before anything else happens (a taken port is one line that names it and the flag to change it),
and the banner with the MCP config is printed only once every server answers.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import secrets
import shlex
import socket
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from devcloud_worker.config import WorkerSettings
from hil_protocol import __version__
from hil_protocol.cli import bind, console_parser, data_dir_lock, exit_without_server_extra, fail
from hil_protocol.logs import setup_logging
from hil_server.config import ServerSettings

PROG = "hil-sandbox"
DESCRIPTION = (
    "The sandbox: a fake WeCom (企业微信) robot API with a web chat page, and a HIL Server in direct "
    "mode pointed at it (or, with --relay, in relay mode with a DevCloud Worker), in one process. Nothing is read "
    "from the environment or .env but HIL_CHANNEL (aibot is the same as --aibot): these flags are all."
)
SANDBOX_BOT_KEY = "sandbox-bot-key"
SANDBOX_AIBOT_ID = "sandbox-aibot"
SANDBOX_AIBOT_SECRET = "sandbox-aibot-secret"
SANDBOX_CHAT = "sandbox-chat"
SANDBOX_WORKER_ID = "sandbox-worker"
READY_TIMEOUT = 30.0
logger = logging.getLogger("hil_sandbox")


def on_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only (then the sandbox's open doors are no risk)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def reachable_host(host: str) -> str:
    """The address to put in URLs for a listen address: a wildcard is reached on loopback."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def hil_mcp_command() -> tuple[list[str], dict[str, str]]:
    """How to start this installation's hil-mcp, and the environment it needs: the console script beside this Python
    (absolute, so an MCP client started from anywhere runs it), or, when the package is not installed, this Python
    with `-m mcp_server` and the source tree on PYTHONPATH."""
    scripts = Path(sysconfig.get_path("scripts")).absolute()
    for name in ("hil-mcp", "hil-mcp.exe"):
        if (scripts / name).is_file():
            return [str(scripts / name)], {}
    source = Path(__file__).resolve().parent.parent
    return [str(Path(sys.executable).absolute()), "-m", "mcp_server"], {"PYTHONPATH": str(source)}


def mcp_config(server_url: str, chat_id: str = SANDBOX_CHAT) -> dict[str, Any]:
    """The MCP client config (Cursor's mcp.json shape) that points this installation's hil-mcp at the sandbox.
    The proxy variables are cleared so a proxy set for the agent does not intercept 127.0.0.1."""
    (command, *prefix), env = hil_mcp_command()
    return {
        "mcpServers": {
            "wecom-hil": {
                "command": command,
                "args": [*prefix, "--service-url", server_url, "--chat-id", chat_id, "--project-name", "sandbox"],
                "env": {**env, "http_proxy": "", "https_proxy": "", "all_proxy": ""},
            }
        }
    }


def banner(wecom_url: str, server_url: str, data_dir: Path, aibot: bool = False, worker_url: str | None = None) -> str:
    config = mcp_config(server_url)
    server = config["mcpServers"]["wecom-hil"]
    claude = shlex.join(["claude", "mcp", "add", "wecom-hil", "--", server["command"], *server["args"]])
    if aibot:
        how = [
            f"  HIL Server (AI-bot mode)            : {server_url}  (health: {server_url}/health)",
            f"  智能机器人长连接 / AI bot link       : {ws_url(wecom_url)}  (bot id {SANDBOX_AIBOT_ID})",
            "  聊天页已是「智能机器人」模式：回复、引用回复、点卡片按钮都经长连接送到 HIL Server。",
            "  The chat page is in AI-bot mode: replies, quote-replies and card clicks reach the server over the link.",
        ]
    elif worker_url is not None:
        how = [
            f"  HIL Server (relay mode)             : {server_url}  (health: {server_url}/health)",
            f"  DevCloud Worker                     : {worker_url}  (health: {worker_url}/health)",
            "  聊天页的回复经 Worker 的 /callback 和 WebSocket 中继到 HIL Server。",
            "  The chat page's replies reach the worker's /callback, which relays them over its link.",
        ]
    else:
        how = [
            f"  HIL Server (direct mode)            : {server_url}  (health: {server_url}/health)",
            "  智能机器人（长连接）模式 / AI-bot mode: ./hil --aibot",
            "  中继模式（Worker）/ relay mode      : ./hil --relay",
        ]
    return "\n".join(
        [
            "",
            f"hil-mcp sandbox {__version__} 已启动 / is running:",
            f"  模拟企业微信聊天页 / WeCom chat page : {wecom_url}/",
            *how,
            f"  数据 / data                         : {data_dir.absolute()}",
            "",
            "  MCP 客户端配置（如 Cursor 的 ~/.cursor/mcp.json）/ MCP client config (e.g. ~/.cursor/mcp.json):",
            json.dumps(config, ensure_ascii=False, indent=2),
            f"  Claude Code: {claude}",
            "",
            "  Ctrl+C 停止 / to stop.",
            "",
        ]
    )


class ArgumentsOnly:
    """Settings from the arguments only: no environment, no `.env` (a deployment's settings must not leak in)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class SandboxSettings(ArgumentsOnly, ServerSettings):
    """The HIL Server's settings, from the arguments only."""


class SandboxWorkerSettings(ArgumentsOnly, WorkerSettings):
    """The worker's settings (--relay), from the arguments only."""


def ws_url(http_url: str) -> str:
    return "ws://" + http_url.removeprefix("http://")


@dataclass
class Built:
    """The sandbox's apps wired to each other, and where each is reached."""

    fake_app: Any
    server_app: Any
    wecom_url: str
    server_url: str
    worker_app: Any = None
    worker_url: str | None = None


def build(
    host: str,
    server_port: int,
    wecom_port: int,
    data_dir: Path,
    robot_name: str = "HIL助手",
    *,
    aibot: bool = False,
    relay: bool = False,
    worker_port: int = 0,
) -> Built:
    """The fake WeCom app and the HIL Server app (and with `relay` a worker) wired to each other. The server's
    settings are these alone: a HIL_API_TOKENS or HIL_DEFAULT_CHAT_ID meant for a real deployment must not change the
    sandbox (its banner's MCP config would stop working). `aibot`: the fake runs an AI bot and the server uses it.
    On loopback the server does not warn about the doors the sandbox leaves open itself (no API tokens, callbacks
    without a secret): nobody else can reach them."""
    from hil_server.app import create_app

    from .fake_wecom import FakeWeComConfig, create_fake_wecom_app

    if aibot and relay:
        raise ValueError("--aibot and --relay do not go together: the AI bot talks to WeCom itself, without a worker")
    wecom_url = f"http://{reachable_host(host)}:{wecom_port}"
    server_url = f"http://{reachable_host(host)}:{server_port}"
    worker_url = f"http://{reachable_host(host)}:{worker_port}" if relay else None
    if aibot:
        callback_url = None  # the chat page's replies (and /_fake/reply) go over the AI bot's long connection
    elif worker_url is not None:
        callback_url = f"{worker_url}/callback"
    else:
        callback_url = f"{server_url}/api/callback"
    fake_app = create_fake_wecom_app(
        FakeWeComConfig(
            bot_keys={SANDBOX_BOT_KEY},
            callback_url=callback_url,
            robot_name=robot_name,
            public_url=wecom_url,
            hil_server_url=server_url,
            # With an AI bot configured, the chat page talks to it (the long connection) instead of the callback.
            aibots={SANDBOX_AIBOT_ID: SANDBOX_AIBOT_SECRET} if aibot else {},
        )
    )
    channel: dict[str, Any] = {"bot_key": SANDBOX_BOT_KEY, "hil_mode": "direct"}
    if aibot:
        channel = {
            "hil_mode": "direct",
            "hil_channel": "aibot",
            "wecom_aibot_id": SANDBOX_AIBOT_ID,
            "wecom_aibot_secret": SANDBOX_AIBOT_SECRET,
            "wecom_aibot_url": ws_url(wecom_url),
        }
    worker_token = secrets.token_urlsafe(16)  # set here, so no worker but the sandbox's can link
    if relay:
        channel = {"hil_mode": "relay", "hil_worker_token": worker_token}
    settings = SandboxSettings(
        hil_host=host, hil_port=server_port, wecom_api_base=wecom_url, hil_data_dir=data_dir, **channel
    )
    built = Built(fake_app, create_app(settings, warn_open=not on_loopback(host)), wecom_url, server_url)
    if relay:
        from devcloud_worker.worker import create_app as create_worker_app

        worker = SandboxWorkerSettings(
            hil_url=f"{ws_url(server_url)}/ws",
            hil_token=worker_token,
            bot_key=SANDBOX_BOT_KEY,
            callback_host=host,
            callback_port=worker_port,
            wecom_api_base=wecom_url,
            hil_data_dir=data_dir / "worker",
            worker_id=SANDBOX_WORKER_ID,
            reconnect_min_delay=0.2,
            reconnect_max_delay=2.0,
        )
        built.worker_app, built.worker_url = create_worker_app(worker), worker_url
    return built


@dataclass
class Served:
    name: str
    sock: socket.socket
    server: Any  # uvicorn.Server
    probe: str  # a URL that answers 200 once the app serves
    after: Served | None = None  # starts once this one serves (the worker links to the server at once)


async def answers(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(url)).status_code == 200
    except httpx.HTTPError:
        return False


async def run(served: list[Served], on_ready: str) -> bool:
    """Serve every app until one stops (Ctrl+C stops them all); print `on_ready` once all answer.
    False when one of them did not start."""

    async def serve(item: Served) -> None:
        try:
            while item.after is not None and not (item.after.server.started or item.server.should_exit):  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # uvicorn offers no event to wait on for "started"
            await item.server.serve(sockets=[item.sock])
        except SystemExit:  # uvicorn's report of a failed application startup, already logged with its cause
            logger.error("%s did not start", item.name)
        finally:
            for other in served:  # one down: stop the rest, so the sandbox never runs half
                other.server.should_exit = True

    async def announce(tasks: list[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        pending = {item.name: item for item in served}
        async with httpx.AsyncClient(trust_env=False, timeout=2.0) as client:
            while pending:
                if any(task.done() for task in tasks):
                    return
                for name, item in list(pending.items()):
                    if item.server.started and await answers(client, item.probe):
                        del pending[name]
                if loop.time() > deadline:
                    logger.error("%s did not answer within %.0f s; stopping", ", ".join(pending), READY_TIMEOUT)
                    for item in served:
                        item.server.should_exit = True
                    return
                if pending:
                    await asyncio.sleep(0.05)
        print(on_ready, flush=True)

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(serve(item), name=item.name) for item in served]
        group.create_task(announce(tasks), name="announce")
    return all(item.server.started for item in served)


CHANNELS = ("auto", "webhook", "aibot")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = console_parser(PROG, __version__, DESCRIPTION)
    parser.add_argument(
        "--aibot",
        action="store_true",
        default=None,
        help="the AI bot (智能机器人) mode: the fake runs an AI bot and the server holds its long connection "
        "(default: on when HIL_CHANNEL=aibot)",
    )
    parser.add_argument(
        "--relay",
        action="store_true",
        help="relay mode: the server in relay mode and a DevCloud Worker linked to it, which takes the chat page's "
        "replies on its /callback (as a worker in the robot's network does)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address of all servers (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8081, help="HIL Server port (default 8081)")
    parser.add_argument("--wecom-port", type=int, default=8090, help="fake WeCom + chat page port (default 8090)")
    parser.add_argument("--worker-port", type=int, default=8082, help="the worker's port with --relay (default 8082)")
    parser.add_argument(
        "--data-dir", type=Path, default=Path("./data/sandbox"), help="the sandbox's store (default ./data/sandbox)"
    )
    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    parser.add_argument("--log-level", type=str.upper, default="INFO", choices=levels, help="default INFO")
    args = parser.parse_args(argv)
    if args.aibot is None:
        channel = os.environ.get("HIL_CHANNEL", "").strip().lower()
        if channel and channel not in CHANNELS:
            # The server refuses it too: a typo must not quietly give the other channel.
            fail(PROG, f"HIL_CHANNEL={channel!r} is not a channel: use one of {', '.join(CHANNELS)} (or --aibot)", 2)
        args.aibot = channel == "aibot"
    if args.aibot and args.relay:
        fail(PROG, "--aibot and --relay do not go together: the AI bot talks to WeCom itself, without a worker", 2)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401  # the sandbox runs the HIL Server
        import uvicorn
    except ModuleNotFoundError as exc:
        exit_without_server_extra(PROG, exc)
    setup_logging(args.log_level, "text", [])
    server_sock = bind(args.host, args.port, PROG, "--port")
    wecom_sock = bind(args.host, args.wecom_port, PROG, "--wecom-port")
    worker_sock = bind(args.host, args.worker_port, PROG, "--worker-port") if args.relay else None
    server_port, wecom_port = server_sock.getsockname()[1], wecom_sock.getsockname()[1]
    worker_port = worker_sock.getsockname()[1] if worker_sock is not None else 0
    with data_dir_lock(args.data_dir, "hil-server", PROG, "--data-dir"):
        try:
            built = build(
                args.host,
                server_port,
                wecom_port,
                args.data_dir,
                aibot=args.aibot,
                relay=args.relay,
                worker_port=worker_port,
            )
        except ValueError as exc:
            fail(PROG, f"cannot build the sandbox: {exc}", 2)
        options: dict[str, Any] = {"log_config": None, "access_log": False, "timeout_graceful_shutdown": 2}
        fake_server = uvicorn.Server(uvicorn.Config(built.fake_app, **options))
        hil_server = uvicorn.Server(uvicorn.Config(built.server_app, **options))
        served = [
            Served("fake WeCom", wecom_sock, fake_server, f"{built.wecom_url}/_fake/config"),
            Served("HIL Server", server_sock, hil_server, f"{built.server_url}/health"),
        ]
        if worker_sock is not None and built.worker_url is not None:
            worker_server = uvicorn.Server(uvicorn.Config(built.worker_app, **options))
            worker_health = f"{built.worker_url}/health"
            served.append(Served("DevCloud Worker", worker_sock, worker_server, worker_health, after=served[1]))
        ready = banner(built.wecom_url, built.server_url, args.data_dir, args.aibot, built.worker_url)
        try:
            started = asyncio.run(run(served, ready))
        except KeyboardInterrupt:
            return
    if not started:
        fail(PROG, "the sandbox did not start (the log above says why)")
