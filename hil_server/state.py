"""The lifespan state every handler reads: typed (Starlette's TypedDict lifespan-state pattern), built once per
lifespan in `app.py`, read with `server_state(request)`."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict, cast

from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    from hil_protocol.callback_endpoint import CallbackIntake
    from hil_protocol.supervise import Supervisor

    from .auth import ApiAuth
    from .channels import Channel
    from .channels.workers import WorkerHub
    from .config import ServerSettings
    from .mcp_endpoint import McpEndpoint
    from .metrics import Metrics
    from .service import HilService


class ServerState(TypedDict):
    settings: ServerSettings
    mode: str
    service: HilService
    channel: Channel
    hub: WorkerHub
    auth: ApiAuth
    intake: CallbackIntake
    metrics: Metrics
    supervisor: Supervisor
    mcp: McpEndpoint
    started_at: float


def server_state(conn: HTTPConnection) -> ServerState:
    # Starlette copies the lifespan's state dict into every request's scope.
    return cast("ServerState", conn.scope["state"])
