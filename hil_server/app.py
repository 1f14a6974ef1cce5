"""The HIL Server application: `create_app(settings)`, and `main()` to run it (`hil-server`,
`python -m hil_server.app`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from hil_protocol.callback_endpoint import Accepted, callback_router
from hil_protocol.http_limits import BodyLimitMiddleware
from hil_protocol.settings import secret_value

from . import __version__, api, mcp_endpoint, metrics, status, worker_socket
from .auth import ApiAuth
from .channels import Channel
from .channels.webhook import WebhookChannel
from .channels.workers import RelayChannel, WorkerHub
from .config import ServerSettings
from .metrics import Metrics, RequestTimer
from .service import HilService
from .store import SessionStore, SqlitePersistence

logger = logging.getLogger("hil_server")


def create_app(settings: ServerSettings) -> FastAPI:
    mode = settings.mode
    if mode == "direct" and not secret_value(settings.bot_key):
        raise ValueError("HIL_MODE=direct needs BOT_KEY (the WeCom robot's webhook key)")
    auth = ApiAuth(secret_value(settings.hil_api_tokens))
    intake = settings.callback_intake()
    meters = Metrics(version=__version__, mode=mode)
    mcp = mcp_endpoint.McpEndpoint(settings, auth)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        persistence = None
        if settings.hil_store == "sqlite":
            persistence = SqlitePersistence(settings.hil_data_dir / "hil-server.sqlite3")
        store = SessionStore(persistence)
        hub = WorkerHub(grace=settings.worker_grace, request_timeout=settings.relay_request_timeout)
        async with httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=5.0)) as http:
            channel: Channel
            if mode == "direct":
                sender = settings.robot_sender(http)
                sender.on_attempt = meters.wecom_attempt
                channel = WebhookChannel(sender)
            else:
                channel = RelayChannel(
                    hub, heartbeat_interval=settings.heartbeat_interval, heartbeat_timeout=settings.heartbeat_timeout
                )
            service = HilService(
                store, channel, default_timeout=settings.hil_default_timeout, retention=settings.session_retention
            )
            service.observe = meters.observe
            meters.bind(store, hub)
            await service.sweep()  # time out what expired while we were down
            if not auth.enabled:
                logger.warning("HIL_API_TOKENS is not set: anyone who can reach this server can post to your chats")
            if mode == "relay" and not secret_value(settings.hil_worker_token):
                logger.warning("HIL_WORKER_TOKEN is not set: any worker may connect")
            logger.info(
                "hil-server %s mode=%s store=%s sessions=%d waiting=%d",
                __version__,
                mode,
                settings.hil_store,
                len(store),
                len(store.waiting()),
            )
            async with asyncio.TaskGroup() as tasks, mcp.run(service):
                background = [
                    tasks.create_task(service.run_hints(), name="hints"),
                    tasks.create_task(service.run_sweeper(settings.hil_sweep_interval), name="sweeper"),
                    tasks.create_task(channel.run(service.handle_message), name=f"channel-{channel.name}"),
                ]
                try:
                    yield {
                        "settings": settings,
                        "mode": mode,
                        "service": service,
                        "hub": hub,
                        "channel": channel,
                        "auth": auth,
                        "observe": service.observe,
                        "metrics": meters,
                        "started_at": time.time(),
                    }
                finally:
                    for link in list(hub.links.values()):
                        with contextlib.suppress(Exception):
                            await link.close(1001, "server shutting down")
                    for task in background:
                        task.cancel()
            store.close()

    app = FastAPI(title="hil-server", version=__version__, lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(api.PollFastPath)
    app.add_middleware(RequestTimer, metrics=meters, routes=app.router.routes)
    app.include_router(api.router)
    app.include_router(worker_socket.router)
    app.include_router(status.router)
    app.include_router(metrics.router)
    app.include_router(mcp_endpoint.router)
    app.add_route(mcp_endpoint.PATH, mcp, include_in_schema=False)

    async def store_callback(request: Request, accepted: Accepted) -> None:
        # Stored (and deduplicated) before the 200 goes back; hints are sent afterwards by the hint task.
        await request.state.service.handle_message(accepted.message)

    app.include_router(
        callback_router(
            "/api/callback", intake, store_callback, "The robot's callback: fly-pigeon JSON or WeCom's encrypted form"
        )
    )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in exc.errors()
        )
        return JSONResponse(
            {
                "success": False,
                "error": f"invalid request: {problems}",
                "message": f"invalid request: {problems}",
                "detail": jsonable_errors(exc),
            },
            status_code=422,
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"success": False, "error": exc.detail, "message": exc.detail, "detail": exc.detail},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    return app


def jsonable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


def main() -> None:
    """`python -m hil_server.app` (the seed's command): the same as `hil-server`."""
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
