"""hil-mcp on stdio: the tools of `tools.py` over the HIL Server's HTTP API, for one agent on its own machine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from mcp.server.mcpserver import Context, MCPServer

from .client import HilClient
from .config import McpSettings
from .tools import Caller, OpenQuestions, ToolSettings, build_server

# Clients whose tool calls over stdio wait as long as the server says (README: client time limits). Claude Code
# (clientInfo "claude-code") waits for tools/call until MCP_TOOL_TIMEOUT, which is long unless set.
STDIO_LONG_CALL_CLIENTS = frozenset({"claude-code"})


@dataclass
class StdioHost:
    """One agent, one process: every call shares the settings' defaults and the process's open questions."""

    the_caller: Caller

    def caller(self, ctx: Context) -> Caller:
        return self.the_caller


def create_server(settings: McpSettings) -> MCPServer[StdioHost]:
    tool_settings = ToolSettings(
        timeout=settings.timeout,
        heartbeat=settings.heartbeat_interval,
        poll_interval=settings.poll_interval,
        send_timeout=settings.timeout,
        local_files=True,
        max_call=settings.max_call_seconds,
        long_call_clients=STDIO_LONG_CALL_CLIENTS,
    )

    @contextlib.asynccontextmanager
    async def lifespan(server: MCPServer[StdioHost]) -> AsyncIterator[StdioHost]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0)) as http:
            token = settings.api_token.get_secret_value() if settings.api_token else None
            caller = Caller(
                backend=HilClient(http, settings.service_url, token),
                memory=OpenQuestions(),
                settings=tool_settings,
                chat_id=settings.chat_id,
                project_name=settings.project_name,
            )
            yield StdioHost(caller)

    return build_server(lifespan)


__all__ = ["StdioHost", "create_server"]
