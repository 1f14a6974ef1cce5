"""The HIL Server application: `create_app(settings)`; `main()` runs it (`hil-server`, `python -m hil_server.app`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute

from hil_protocol.callback_endpoint import Accepted, NotStored, callback_router, wecom_error
from hil_protocol.http_limits import RequestLimits
from hil_protocol.images import ImageFetcher
from hil_protocol.settings import secret_value
from hil_protocol.supervise import Supervisor

from . import __version__, api, errors, gate_api, mcp_endpoint, metrics, status, worker_socket
from .auth import ApiAuth, AuthMiddleware
from .channels import Channel
from .channels.aibot import AibotChannel
from .channels.webhook import WebhookChannel
from .channels.workers import RelayChannel, WorkerHub
from .config import ServerSettings
from .events import RecentEvents
from .metrics import Metrics, RequestTimer
from .service import HilService
from .state import ServerState, server_state
from .store import StoreUnavailable, open_server_store

logger = logging.getLogger("hil_server")


def create_app(settings: ServerSettings, *, poll_fast_path: bool = True, warn_open: bool = True) -> FastAPI:
    """The HIL Server. Raises ValueError for settings that cannot work together. `poll_fast_path=False` serves
    long-polls through FastAPI's router instead (tests compare the two). `warn_open=False`: no warnings about open
    ways in (no API tokens, unauthenticated callbacks), for the loopback sandbox that leaves them open itself."""
    mode = settings.mode
    kind = settings.channel
    if kind == "aibot" and mode == "relay":
        raise ValueError("HIL_CHANNEL=aibot talks to WeCom itself: unset HIL_MODE=relay (or set it to direct)")
    # ValueError without the AI bot's id and secret
    aibot_options = settings.aibot_options() if kind == "aibot" else None
    if kind != "aibot" and mode == "direct" and not secret_value(settings.bot_key):
        raise ValueError("HIL_MODE=direct needs BOT_KEY (the WeCom robot's webhook key)")
    auth = ApiAuth(secret_value(settings.hil_api_tokens))
    intake = settings.callback_intake()
    # The AI bot hears people on its long connection: the robot callback route is off.
    take_callbacks = kind != "aibot" and (mode == "direct" or settings.hil_relay_callbacks)
    if mode == "relay" and settings.hil_relay_callbacks and not intake.authenticated:
        raise ValueError(
            "HIL_RELAY_CALLBACKS=true needs callback authentication on this public server: set "
            "CALLBACK_AUTH_KEY/CALLBACK_AUTH_VALUE or WECOM_CALLBACK_TOKEN/WECOM_CALLBACK_AES_KEY"
        )
    meters = Metrics(version=__version__, mode=mode)
    mcp = mcp_endpoint.McpEndpoint(settings, auth)
    mcp.warn_open = warn_open

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[ServerState]:
        store = await open_server_store(settings)
        hub = WorkerHub(
            grace=settings.worker_grace,
            request_timeout=settings.relay_request_timeout,
            on_change=meters.workers_changed,
        )
        supervisor = Supervisor(on_restart=meters.task_restarted)
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=5.0)) as http:
                channel: Channel
                if aibot_options is not None:
                    aibot = AibotChannel(
                        aibot_options,
                        http,
                        sessions=store.get_question,
                        on_attempt=meters.wecom_attempt,
                        images=ImageFetcher(allow_private=settings.hil_image_allow_private),
                    )
                    meters.bind_send_queue(lambda: aibot.queued)
                    channel = aibot
                elif mode == "direct":
                    channel = WebhookChannel(settings.robot_sender(http, on_attempt=meters.wecom_attempt))
                else:
                    channel = RelayChannel(
                        hub,
                        heartbeat_interval=settings.heartbeat_interval,
                        heartbeat_timeout=settings.heartbeat_timeout,
                    )
                service = HilService(
                    store.repo,
                    channel,
                    notifier=store.notifier,
                    metrics=meters,
                    events=RecentEvents(),
                    default_timeout=settings.hil_default_timeout,
                    retention=settings.session_retention,
                    msgid_memory=settings.hil_callback_max_age * 2,
                    default_chat_id=settings.hil_default_chat_id,
                    default_responders=settings.default_responders,
                    audit_retention=settings.hil_audit_retention,
                )
                meters.bind(service)
                await service.resolve_interrupted()
                await service.sweep()  # time out what expired while we were down
                if warn_open:
                    warn_about(settings, mode, auth.enabled, take_callbacks and not intake.authenticated)
                if aibot_options is not None and secret_value(settings.bot_key):
                    logger.warning("BOT_KEY is set but the AI bot is the channel (WECOM_AIBOT_ID): BOT_KEY is unused")
                logger.info(
                    "hil-server %s mode=%s channel=%s store=%s waiting=%d",
                    __version__,
                    mode,
                    channel.name,
                    store.name,
                    service.waiting_count,
                )
                async with asyncio.TaskGroup() as tasks, mcp.run(service):
                    supervisor.start(tasks, "notices", service.run_notices)
                    supervisor.start(tasks, "sweeper", lambda: service.run_sweeper(settings.hil_sweep_interval))
                    supervisor.start(tasks, f"channel-{channel.name}", lambda: channel.run(service.handle_message))
                    supervisor.start(
                        tasks, "store-recovery", lambda: service.run_recovery(settings.hil_store_retry_interval)
                    )
                    try:
                        yield {
                            "settings": settings,
                            "mode": mode,
                            "service": service,
                            "channel": channel,
                            "hub": hub,
                            "auth": auth,
                            "intake": intake,
                            "metrics": meters,
                            "supervisor": supervisor,
                            "mcp": mcp,
                            "started_at": time.time(),
                        }
                    finally:
                        for link in list(hub.links.values()):
                            with contextlib.suppress(ConnectionError):  # WorkerLink.close: the socket is gone
                                await link.close(1001, "server shutting down")
                        supervisor.cancel()
        finally:
            await store.close()

    app = FastAPI(title="hil-server", version=__version__, lifespan=lifespan)
    errors.install(app)
    app.include_router(api.router)
    app.include_router(gate_api.create_router())  # the Claude Code gate's 本会话都允许
    if mode == "relay":
        # Only relay mode has workers: anywhere else a "worker" connecting to /ws could only forge answers.
        app.include_router(worker_socket.router)
    app.include_router(status.router)
    app.include_router(metrics.router)
    app.add_route(mcp_endpoint.PATH, mcp, include_in_schema=False)
    if take_callbacks:

        async def store_callback(request: Request, accepted: Accepted) -> None:
            # Stored (and deduplicated) before the 200 goes back; notices are sent afterwards by their task.
            try:
                await server_state(request)["service"].handle_message(accepted.message)
            except StoreUnavailable as exc:
                raise NotStored(str(exc)) from exc

        app.include_router(
            callback_router(
                "/api/callback",
                intake,
                store_callback,
                "The robot's callback: fly-pigeon JSON or WeCom's encrypted form",
            )
        )
    else:
        if kind == "aibot":
            reason = (
                "this HIL Server hears people over the WeCom AI bot's long connection (HIL_CHANNEL=aibot): there "
                "is no robot callback to configure. Remove the callback URL from the robot, or run with "
                "HIL_CHANNEL=webhook to take robot callbacks here"
            )
        else:
            reason = (
                "this HIL Server runs in relay mode: point the robot's callback at a DevCloud Worker "
                "(http://<worker>:8082/callback), which relays it over its link. To take callbacks here as well, "
                "set HIL_RELAY_CALLBACKS=true with CALLBACK_AUTH_KEY/VALUE or WeCom's callback Token/AESKey"
            )

        @app.api_route("/api/callback", methods=["GET", "POST"], include_in_schema=False)
        async def callbacks_come_elsewhere() -> object:
            return wecom_error(404, reason)

    # Outermost first: metrics time everything; limits and auth run before any body is parsed.
    if poll_fast_path:
        poll_route = next(r for r in api.router.routes if isinstance(r, APIRoute) and r.path == api.POLL_PATH)
        app.add_middleware(api.PollFastPath, route=poll_route)
    app.add_middleware(AuthMiddleware, auth=auth)
    app.add_middleware(RequestLimits, max_bytes=settings.max_body_bytes, body_timeout=settings.hil_body_timeout)
    app.add_middleware(RequestTimer, metrics=meters, routes=app.router.routes)
    return app


def warn_about(settings: ServerSettings, mode: str, tokens: bool, open_callbacks: bool) -> None:
    """What an operator must hear at start: the ways in that nobody guards."""
    if not tokens:
        logger.warning("HIL_API_TOKENS is not set: anyone who can reach this server can post to your chats")
    if mode == "relay" and not secret_value(settings.hil_worker_token):
        logger.warning("HIL_WORKER_TOKEN is not set: any worker may connect")
    if open_callbacks:
        logger.warning(
            "CALLBACKS ARE UNAUTHENTICATED: anyone who can reach /api/callback can answer questions in any name. "
            "Set CALLBACK_AUTH_KEY/CALLBACK_AUTH_VALUE (fly-pigeon) or WECOM_CALLBACK_TOKEN/WECOM_CALLBACK_AES_KEY "
            "(WeCom's signed callback), or keep this port off every network but the robot's"
        )


def main() -> None:
    """`python -m hil_server.app` (the seed's command): the same as `hil-server`."""
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
