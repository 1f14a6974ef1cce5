"""The sandbox: a fake WeCom (with a web chat page) and a HIL Server in direct mode pointed at it, in one process.

Nothing in the HIL Server knows it is talking to a simulator: it sends through the robot webhook API at
WECOM_API_BASE and receives fly-pigeon callbacks on /api/callback, exactly as with the real WeCom.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hil_protocol.cli import exit_without_server_extra
from hil_protocol.logs import setup_logging

SANDBOX_BOT_KEY = "sandbox-bot-key"
logger = logging.getLogger("hil_sandbox")


def build(host: str, server_port: int, wecom_port: int, data_dir: Path, robot_name: str = "HIL助手") -> Any:
    from hil_server.app import create_app
    from hil_server.config import ServerSettings

    from .fake_wecom import FakeWeComConfig, create_fake_wecom_app

    wecom_url = f"http://{host}:{wecom_port}"
    server_url = f"http://{host}:{server_port}"
    fake_app = create_fake_wecom_app(
        FakeWeComConfig(
            bot_keys={SANDBOX_BOT_KEY},
            callback_url=f"{server_url}/api/callback",
            robot_name=robot_name,
            public_url=wecom_url,
        )
    )
    settings = ServerSettings(
        hil_host=host,
        hil_port=server_port,
        hil_mode="direct",
        bot_key=SANDBOX_BOT_KEY,
        wecom_api_base=wecom_url,
        hil_data_dir=data_dir,
        _env_file=None,
    )
    return fake_app, create_app(settings), wecom_url, server_url


async def serve(host: str, server_port: int, wecom_port: int, data_dir: Path) -> None:
    import uvicorn

    fake_app, server_app, wecom_url, server_url = build(host, server_port, wecom_port, data_dir)
    servers = [
        uvicorn.Server(
            uvicorn.Config(
                fake_app, host=host, port=wecom_port, log_config=None, access_log=False, timeout_graceful_shutdown=2
            )
        ),
        uvicorn.Server(
            uvicorn.Config(
                server_app, host=host, port=server_port, log_config=None, access_log=False, timeout_graceful_shutdown=2
            )
        ),
    ]
    print(
        "\n".join(
            [
                "",
                "hil-mcp sandbox 已启动 / is running:",
                f"  模拟企业微信聊天页 / WeCom chat page : {wecom_url}/",
                f"  HIL Server (direct mode)            : {server_url}  (health: {server_url}/health)",
                "",
                "  在 Cursor 的 ~/.cursor/mcp.json 中指向它 / point your MCP client at it:",
                f'    "command": "hil-mcp", "args": ["--service-url", "{server_url}", "--chat-id", "sandbox-chat"]',
                "",
                "  Ctrl+C 停止 / to stop.",
                "",
            ]
        ),
        flush=True,
    )
    await asyncio.gather(*(s.serve() for s in servers))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hil-sandbox", description="Fake WeCom + HIL Server (direct), locally.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="HIL Server port (default 8081)")
    parser.add_argument("--wecom-port", type=int, default=8090, help="fake WeCom + chat page port (default 8090)")
    parser.add_argument("--data-dir", type=Path, default=Path("./data/sandbox"))
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    try:
        import fastapi  # noqa: F401  # the sandbox runs the HIL Server
    except ModuleNotFoundError as exc:
        exit_without_server_extra("hil-sandbox", exc)
    setup_logging(args.log_level, "text", [])
    try:
        asyncio.run(serve(args.host, args.port, args.wecom_port, args.data_dir))
    except KeyboardInterrupt:
        pass
