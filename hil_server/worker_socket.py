"""Relay mode: the endpoint DevCloud Workers connect to."""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from hil_protocol.callback import CallbackError, parse_callback
from hil_protocol.relay_frames import (
    FEATURE_CALLBACK_ACK,
    FEATURE_WORKER_STATUS,
    Callback,
    CallbackAck,
    FrameError,
    Hello,
    Ping,
    Pong,
    Response,
    WorkerStatus,
    parse_frame,
)
from hil_protocol.settings import secret_value

from .auth import worker_token_ok
from .channels.workers import WorkerLink
from .state import server_state
from .store import StoreUnavailable

logger = logging.getLogger(__name__)

router = APIRouter()


@router.websocket("/ws")
async def worker_socket(websocket: WebSocket, worker_id: str | None = None, token: str | None = None) -> None:
    state = server_state(websocket)
    expected = secret_value(state["settings"].hil_worker_token)
    if not worker_token_ok(expected, token, websocket.headers.get("authorization")):
        logger.warning("worker refused: bad token worker_id=%s", (worker_id or "")[:64])
        await websocket.close(code=1008, reason="invalid worker token")
        return
    await websocket.accept()
    hub = state["hub"]
    service = state["service"]

    async def send_text(text: str) -> None:
        try:
            await websocket.send_text(text)
        except (RuntimeError, OSError, WebSocketDisconnect) as exc:  # closed, or the peer is gone
            raise ConnectionError(f"worker socket closed: {type(exc).__name__}") from exc

    async def close(code: int, reason: str) -> None:
        try:
            await websocket.close(code=code, reason=reason)
        except (RuntimeError, OSError, WebSocketDisconnect) as exc:
            raise ConnectionError(f"worker socket closed: {type(exc).__name__}") from exc

    link = WorkerLink(worker_id=(worker_id or uuid.uuid4().hex[:8])[:64], send_text=send_text, close=close)
    try:
        await link.send(Hello(features=[FEATURE_CALLBACK_ACK, FEATURE_WORKER_STATUS]))
    except ConnectionError:
        logger.info("worker left before its hello worker_id=%s", link.worker_id)
        return
    await hub.add(link)
    logger.info("worker connected worker_id=%s workers=%d", link.worker_id, hub.count)
    try:
        # Never await a reply from this socket while reading it: responses resolve futures other tasks await,
        # and notices go out through the notice task, so this loop only stores and acknowledges.
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            link.touch()
            try:
                frame = parse_frame(message.get("text") or message.get("bytes") or b"")
            except FrameError as exc:
                logger.warning("worker_id=%s sent a bad frame: %s", link.worker_id, exc)
                continue
            if isinstance(frame, Response):
                hub.resolve(link, frame)
            elif isinstance(frame, Callback):
                try:
                    await service.handle_message(parse_callback(frame.data.callback_data))
                except CallbackError as exc:
                    # Acknowledged all the same: it will never parse, and the worker must not replay it forever.
                    logger.warning("worker_id=%s forwarded an unreadable callback: %s", link.worker_id, exc)
                except StoreUnavailable as exc:
                    # Not acknowledged: the worker keeps it and sends it again after it reconnects.
                    logger.error("worker_id=%s callback not stored (%s); closing the link", link.worker_id, exc)
                    await link.close(1011, "store unavailable; resend later")
                    break
                if frame.id:
                    await link.send(CallbackAck(id=frame.id))
            elif isinstance(frame, Ping):
                await link.send(Pong())
            elif isinstance(frame, WorkerStatus):
                problem = (frame.bot_key_refused or "")[:300] or None
                if problem != link.key_problem:
                    logger.warning("worker_id=%s BOT_KEY %s", link.worker_id, problem or "works again")
                link.key_problem = problem
    except (WebSocketDisconnect, ConnectionError):  # gone while we read, acknowledged or answered a ping
        pass
    finally:
        await hub.remove(link, reason="disconnected")
        logger.info("worker disconnected worker_id=%s workers=%d", link.worker_id, hub.count)
