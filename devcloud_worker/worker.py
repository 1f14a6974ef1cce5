"""The DevCloud Worker: `create_app(settings)`, and `main()` to run it (`hil-worker`,
`python -m devcloud_worker.worker`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request

from hil_protocol.logs import setup_logging
from hil_protocol.web import Accepted, BodyLimitMiddleware, CallbackIntake, callback_router
from hil_protocol.wecom import RetryPolicy, RobotSender, make_backend

from .config import WorkerSettings
from .relay import RelayClient
from .spool import Spool

logger = logging.getLogger("devcloud_worker")


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def create_app(settings: WorkerSettings) -> FastAPI:
    intake = CallbackIntake(
        settings.callback_auth_key,
        _secret(settings.callback_auth_value),
        _secret(settings.wecom_callback_token),
        _secret(settings.wecom_callback_aes_key),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        spool = Spool(settings.hil_data_dir / "worker-spool.sqlite3")
        async with httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=5.0)) as http:
            backend = make_backend(
                settings.wecom_sender, http, settings.wecom_api_base, settings.bot_key.get_secret_value()
            )
            policy = RetryPolicy(deadline=settings.wecom_retry_deadline, max_per_minute=settings.wecom_max_per_minute)
            sender = RobotSender(backend, http, policy)
            client = RelayClient(
                hil_url=settings.hil_url,
                worker_id=settings.worker_id,
                token=_secret(settings.hil_token),
                sender=sender,
                http=http,
                spool=spool,
                min_delay=settings.reconnect_min_delay,
                max_delay=settings.reconnect_max_delay,
                hello_timeout=settings.hello_timeout,
            )
            pending = await spool.count()
            logger.info(
                "worker %s starting: HIL Server %s, %d spooled callbacks to replay",
                settings.worker_id,
                settings.hil_url.split("?")[0],
                pending,
            )
            task = asyncio.create_task(client.run(), name="relay")
            try:
                yield {"client": client, "spool": spool}
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                spool.close()

    app = FastAPI(title="hil-worker", lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, max_bytes=1024 * 1024)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        client: RelayClient = request.state.client
        return {
            "status": "healthy",
            "ws_connected": client.is_connected,
            "worker_id": client.worker_id,
            "spooled_callbacks": await request.state.spool.count(),
        }

    async def spool_callback(request: Request, accepted: Accepted) -> None:
        # Durable in the spool before the robot gets its 200; forwarded now or after a reconnect.
        spool_id = await request.state.spool.add(accepted.data)
        request.state.client.wake_spool()
        msg = accepted.message
        logger.info("callback spooled id=%d msgid=%s chat_id=%s", spool_id, msg.msgid, msg.chat_id)

    app.include_router(
        callback_router("/callback", intake, spool_callback, "The robot's callback, spooled and relayed")
    )

    return app


def main() -> None:
    try:
        settings = WorkerSettings()
    except ValueError as exc:
        raise SystemExit(f"hil-worker: configuration error (BOT_KEY is required): {exc}") from None
    setup_logging(settings.hil_log_level, settings.hil_log_format, settings.secrets())
    import uvicorn

    uvicorn.run(
        create_app(settings),
        host=settings.callback_host,
        port=settings.callback_port,
        log_config=None,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
