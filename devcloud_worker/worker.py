"""The DevCloud Worker: `create_app(settings)`, and `main()` to run it (`hil-worker`,
`python -m devcloud_worker.worker`)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from hil_protocol.callback_endpoint import CALLBACK_MAX_BYTES, Accepted, NotStored, callback_router
from hil_protocol.http_limits import RequestLimits
from hil_protocol.metrics import CONTENT_TYPE
from hil_protocol.settings import secret_value
from hil_protocol.supervise import Supervisor

from .config import WorkerSettings
from .health import CRASH_WINDOW, Health
from .link import LinkOptions, RelayClient
from .metrics import WorkerMetrics
from .spool import Spool, SpoolError

logger = logging.getLogger("devcloud_worker")

SPOOL_FILE = "worker-spool.sqlite3"


def create_app(settings: WorkerSettings, *, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The worker app. `on_fatal(reason)` is called once if the link cannot be kept alive; the CLI passes one that
    stops the process with exit status 1. Without it the worker stays up and /health answers 503."""
    intake = settings.callback_intake()
    metrics = WorkerMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        try:
            spool = await Spool.open(settings.hil_data_dir / SPOOL_FILE)
        except SpoolError as exc:
            logger.error("%s: is HIL_DATA_DIR on a full or read-only disk?", exc)
            raise
        metrics.bind(lambda: spool.depth, lambda: spool.dead)
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=5.0)) as http:
                sender = settings.robot_sender(http)
                client = RelayClient(
                    hil_url=settings.hil_url,
                    worker_id=settings.worker_id,
                    token=secret_value(settings.hil_token),
                    sender=sender,
                    spool=spool,
                    metrics=metrics,
                    options=LinkOptions.of(settings),
                    secrets=settings.secrets(),
                )
                supervisor = Supervisor(
                    min_delay=settings.reconnect_min_delay,
                    max_delay=settings.reconnect_max_delay,
                    stable_after=CRASH_WINDOW,
                    on_restart=lambda name: metrics.restarts.labels(name).inc(),
                )
                health = Health(
                    client=client,
                    spool=spool,
                    supervisor=supervisor,
                    key=sender.key,
                    link_down_grace=settings.hil_link_down_grace,
                    max_crashes=settings.hil_link_max_crashes,
                    on_fatal=on_fatal,
                )
                warn_about(settings, open_callbacks=not intake.authenticated)
                logger.info(
                    "worker %s starting: HIL Server %s, %d spooled callbacks to replay",
                    settings.worker_id,
                    settings.hil_url.split("?")[0],
                    spool.depth,
                )
                async with asyncio.TaskGroup() as tasks:
                    supervisor.start(tasks, "link", client.run)
                    supervisor.start(tasks, "watchdog", health.run)
                    supervisor.start(tasks, "key-check", sender.watch_key)
                    try:
                        yield {"client": client, "spool": spool, "health": health}
                    finally:
                        supervisor.cancel()
        finally:
            await spool.close()

    app = FastAPI(title="hil-worker", lifespan=lifespan)
    app.add_middleware(RequestLimits, max_bytes=CALLBACK_MAX_BYTES, body_timeout=settings.hil_body_timeout)

    @app.get("/health", responses={503: {"description": "degraded: `reason` says why"}})
    async def health(request: Request) -> JSONResponse:
        client: RelayClient = request.state.client
        spool: Spool = request.state.spool
        problems = request.state.health.problems()
        body: dict[str, Any] = {
            "status": "degraded" if problems else "healthy",
            "ws_connected": client.connected,
            "worker_id": client.worker_id,
            "spooled_callbacks": spool.depth,
            "dead_callbacks": spool.dead,
            "link_down_seconds": round(client.down_for(), 1),
        }
        if request.state.health.key.refused is not None:
            body["bot_key_ok"] = False  # only while false, like the server's
        if problems:
            body["reason"] = "; ".join(problems)
        return JSONResponse(body, status_code=503 if problems else 200)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def spool_callback(request: Request, accepted: Accepted) -> None:
        # Durable in the spool before the robot gets its 200; forwarded now or after a reconnect.
        msg = accepted.message
        try:
            spool_id = await request.state.spool.add(accepted.data)
        except SpoolError as exc:
            # Not stored, so not acknowledged: WeCom (and fly-pigeon) send it again.
            metrics.callbacks.labels("refused").inc()
            raise NotStored(f"the worker cannot write its spool (disk full or read-only?): {exc}") from exc
        metrics.callbacks.labels("spooled").inc()
        request.state.client.wake_spool()
        logger.info("callback spooled id=%d msgid=%s chat_id=%s", spool_id, msg.msgid, msg.chat_id)

    app.include_router(
        callback_router("/callback", intake, spool_callback, "The robot's callback, spooled and relayed")
    )

    return app


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach a listener on `host` (a name other than localhost may resolve anywhere)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_about(settings: WorkerSettings, *, open_callbacks: bool) -> None:
    """What an operator must hear at start: a /callback anyone on the network can post answers to."""
    if open_callbacks and not is_loopback(settings.callback_host):
        logger.warning(
            "CALLBACKS ARE UNAUTHENTICATED: /callback listens on %s:%d and anyone who can reach it can answer "
            "questions in any name. Set CALLBACK_AUTH_KEY/CALLBACK_AUTH_VALUE (fly-pigeon) or "
            "WECOM_CALLBACK_TOKEN/WECOM_CALLBACK_AES_KEY (WeCom's signed callback), or CALLBACK_HOST=127.0.0.1 "
            "behind a proxy that checks them",
            settings.callback_host,
            settings.callback_port,
        )


def main() -> None:
    """`python -m devcloud_worker.worker` (the seed's command): the same as `hil-worker`."""
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
