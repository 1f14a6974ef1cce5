"""The gate's way to the HIL Server for the hook: the HTTP client with the gate's routes, loaded only when a call
needs a person (every `hil-mcp gate` run is a new process, and most calls need nobody)."""

from __future__ import annotations

import signal
from collections.abc import Callable

import anyio
import httpx

from .backend import BackendError
from .client import HilClient
from .gate import Decision, ToolCall, decide
from .gate_policy import Policy

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


class GateClient(HilClient):
    """The HIL Server's HTTP API, with the gate's routes (`/api/gate/allow`, which remembers 本会话都允许)."""

    async def allowed(self, session: str) -> list[str]:
        body = await self._request("GET", "/api/gate/allow", params={"session": session}, timeout=5)
        keys = body.get("keys")
        return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []

    async def grant(self, question: str, session: str, keys: list[str]) -> None:
        body = {"question": question, "session": session, "keys": keys}
        await self._request("POST", "/api/gate/allow", json=body, timeout=5)


async def ask_over_http(
    call: ToolCall, policy: Policy, connection: Callable[[], tuple[str, str | None]], deadline: float
) -> Decision | None:
    try:
        service_url, token = connection()
    except ValueError as exc:
        return Decision("deny", f"Not run: hil-mcp gate cannot read its configuration: {exc}")
    # Connecting is bounded tightly: a server that is down denies at once, not after the wait.
    stopped: list[int] = []
    decision: Decision | None = None
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=3.0)) as http, anyio.create_task_group() as tg:
        client = GateClient(http, service_url, token)

        async def on_signal() -> None:
            # Claude Code stops a hook with a signal (its timeout, the user's Esc): decide() tells the server.
            with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
                async for number in signals:
                    stopped.append(number)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(on_signal)
        try:
            decision = await decide(call, policy, client, client, deadline=deadline, local_files=True)
        except BackendError as exc:  # decide() turns these into decisions; this is the last guard
            decision = Decision("deny", f"Not run: {exc}")
        tg.cancel_scope.cancel()
    if stopped:
        return Decision("deny", f"Not run: the gate was stopped (signal {stopped[0]}) before anyone decided.")
    return decision


__all__ = ["GateClient", "ask_over_http"]
