"""Console entry points of the server-side commands.

`pip install hil-mcp` brings only what the MCP server needs. The HIL Server, the worker and the sandbox need the
`server` extra; without it their commands say so instead of ending in an ImportError traceback.
"""

from __future__ import annotations

import importlib
import sys

SERVER_MODULES = frozenset({"fastapi", "websockets", "cryptography", "multipart", "prometheus_client"})


def run_server_command(prog: str, module: str) -> None:
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_MODULES:
            raise
        sys.exit(
            f"{prog}: {exc.name} is not installed; the HIL Server, the worker and the sandbox need the server extra: "
            "pip install 'hil-mcp[server]'"
        )
    main()


def hil_server() -> None:
    run_server_command("hil-server", "hil_server.app")


def hil_worker() -> None:
    run_server_command("hil-worker", "devcloud_worker.worker")


def hil_sandbox() -> None:
    run_server_command("hil-sandbox", "hil_sandbox.sandbox")
