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

from hil_protocol.callback_endpoint import Accepted, callback_router
from hil_protocol.http_limits import RequestLimits
from hil_protocol.settings import secret_value

from .config import WorkerSettings
from .link import RelayClient
from .spool import Spool

logger = logging.getLogger("devcloud_worker")


def create_app(settings: WorkerSettings) -> FastAPI:
    intake = settings.callback_intake()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        spool = Spool(settings.hil_data_dir / "worker-spool.sqlite3")
        async with httpx.AsyncClient(timeout=httpx.Timeout(15.0, connect=5.0)) as http:
            sender = settings.robot_sender(http)
            client = RelayClient(
                hil_url=settings.hil_url,
                worker_id=settings.worker_id,
                token=secret_value(settings.hil_token),
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
    app.add_middleware(RequestLimits, max_bytes=1024 * 1024, body_timeout=settings.hil_body_timeout)

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
    """`python -m devcloud_worker.worker` (the seed's command): the same as `hil-worker`."""
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
