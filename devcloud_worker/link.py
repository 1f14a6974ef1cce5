"""The worker's side of the relay link: connect (and reconnect with backoff), answer requests, forward callbacks."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Generator
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from hil_protocol.images import ImageError, load_image, to_data_url
from hil_protocol.relay_frames import (
    ACTION_SEND_HINT,
    ACTION_SEND_MESSAGE,
    ACTION_UPLOAD_IMAGE,
    FEATURE_CALLBACK_ACK,
    Callback,
    CallbackAck,
    CallbackData,
    FrameError,
    Hello,
    Ping,
    Pong,
    Request,
    Response,
    SendHintPayload,
    SendMessagePayload,
    UploadImagePayload,
    dump_frame,
    parse_frame,
)
from hil_protocol.wecom_robot import RobotSender, WeComError

from .spool import Spool

logger = logging.getLogger(__name__)


def link_url(hil_url: str, worker_id: str, token: str | None) -> str:
    """The seed's query form (`?worker_id=&token=`), which seed servers need; new servers also take the header."""
    parts = urlsplit(hil_url)
    params = {"worker_id": worker_id}
    if token:
        params["token"] = token
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/ws", query, ""))


def backoff(min_delay: float, max_delay: float) -> Generator[float, None, None]:
    delay = min_delay
    while True:
        yield delay * (0.75 + random.random() * 0.5)
        delay = min(delay * 2, max_delay)


class RelayClient:
    def __init__(
        self,
        *,
        hil_url: str,
        worker_id: str,
        token: str | None,
        sender: RobotSender,
        http: httpx.AsyncClient,
        spool: Spool,
        min_delay: float = 0.5,
        max_delay: float = 30.0,
        hello_timeout: float = 1.0,
    ) -> None:
        self.worker_id = worker_id
        self._url = link_url(hil_url, worker_id, token)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._sender = sender
        self._http = http
        self._spool = spool
        self._min_delay = min_delay
        self._max_delay = max_delay
        self._hello_timeout = hello_timeout
        self._ws: ClientConnection | None = None
        self._send_lock = asyncio.Lock()
        self._spool_wake = asyncio.Event()
        self.connected = asyncio.Event()

    @property
    def is_connected(self) -> bool:
        return self.connected.is_set()

    def wake_spool(self) -> None:
        self._spool_wake.set()

    def _retry(self, exc: Exception) -> Exception | None:
        # Keep trying whatever went wrong (the operator may fix the server's token or start it later), but say why.
        if isinstance(exc, InvalidStatus):
            status = exc.response.status_code
            if status in (401, 403):
                logger.error(
                    "HIL Server refused this worker (HTTP %d): check HIL_TOKEN against HIL_WORKER_TOKEN", status
                )
            else:
                logger.warning("HIL Server answered HTTP %d to the WebSocket upgrade", status)
        else:
            logger.warning("cannot reach HIL Server: %s", type(exc).__name__)
        return None

    async def run(self) -> None:
        async for ws in websockets.connect(
            self._url,
            additional_headers=self._headers,
            process_exception=self._retry,
            reconnect_delays=lambda: backoff(self._min_delay, self._max_delay),
            max_size=8 * 1024 * 1024,
            open_timeout=10,
            ping_interval=20,
            ping_timeout=20,
            proxy=None,
        ):
            logger.info("connected to HIL Server worker_id=%s", self.worker_id)
            try:
                await self._serve(ws)
            except* (ConnectionClosed, ConnectionError):
                pass
            finally:
                self._ws = None
                self.connected.clear()
            code = ws.close_code
            logger.warning("link to HIL Server closed (code %s); reconnecting", code)
            # websockets reconnects at once after a connection that opened; pause so a server that accepts and
            # then drops us (restarting, or replacing this worker) is not hammered.
            await asyncio.sleep(self._min_delay)

    async def _serve(self, ws: ClientConnection) -> None:
        self._ws = ws
        self.connected.set()
        hello = asyncio.Event()
        features: set[str] = set()
        async with asyncio.TaskGroup() as tasks:
            forwarder = tasks.create_task(self._forward_spool(hello, features))
            try:
                async for text in ws:
                    try:
                        frame = parse_frame(text)
                    except FrameError as exc:
                        logger.warning("bad frame from HIL Server: %s", exc)
                        continue
                    if isinstance(frame, Request):
                        # Each request in its own task: a slow WeCom send must not stop us reading pings.
                        tasks.create_task(self._handle_request(frame))
                    elif isinstance(frame, Ping):
                        await self._send(Pong())
                    elif isinstance(frame, Hello):
                        features.update(frame.features)
                        hello.set()
                    elif isinstance(frame, CallbackAck):
                        tasks.create_task(self._acked(frame.id))
            finally:
                forwarder.cancel()

    async def _send(self, frame: Any) -> None:
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected")
        async with self._send_lock:
            await ws.send(dump_frame(frame))

    async def _acked(self, frame_id: str) -> None:
        try:
            await self._spool.remove(int(frame_id))
        except ValueError:
            logger.warning("callback_ack for an id this worker never sent: %r", frame_id[:40])

    async def _forward_spool(self, hello: asyncio.Event, features: set[str]) -> None:
        """Send spooled callbacks in order. With a server that acknowledges, keep each until its ack; with a seed
        server (no hello), drop each once it is written to the socket."""
        try:
            await asyncio.wait_for(hello.wait(), self._hello_timeout)
        except TimeoutError:
            logger.info("HIL Server sent no hello: assuming a seed server without callback acknowledgements")
        acks = FEATURE_CALLBACK_ACK in features
        sent: set[int] = set()
        while True:
            self._spool_wake.clear()
            for spool_id, data in await self._spool.pending():
                if spool_id in sent:
                    continue
                await self._send(Callback(data=CallbackData(callback_data=data), id=str(spool_id) if acks else None))
                if acks:
                    sent.add(spool_id)
                else:
                    await self._spool.remove(spool_id)
            await self._spool_wake.wait()

    async def _handle_request(self, request: Request) -> None:
        try:
            data = await self._perform(request)
            response = Response(id=request.id, success=True, data=data)
        except WeComError as exc:
            logger.warning("request %s action=%s refused by WeCom: errcode %s", request.id, request.action, exc.errcode)
            response = Response(id=request.id, success=False, error=str(exc), errcode=exc.errcode)
        except (ImageError, ValueError) as exc:
            response = Response(id=request.id, success=False, error=str(exc))
        try:
            await self._send(response)
        except (ConnectionClosed, ConnectionError):
            logger.warning("could not answer request %s: link closed", request.id)

    async def _perform(self, request: Request) -> dict[str, Any]:
        if request.action == ACTION_SEND_MESSAGE:
            question = SendMessagePayload.model_validate(request.payload).question()
            receipt = await self._sender.send_question(question)
            logger.info("sent short_id=%s chat_id=%s parts=%d", question.short_id, question.chat_id, receipt.parts)
            return dataclasses.asdict(receipt)
        if request.action == ACTION_SEND_HINT:
            await self._sender.send_notice(SendHintPayload.model_validate(request.payload).notice())
            return {}
        if request.action == ACTION_UPLOAD_IMAGE:
            image = UploadImagePayload.model_validate(request.payload)
            data = await load_image(image.image, self._sender.images)
            return {"image_url": to_data_url(data)}
        raise ValueError(f"unknown action {request.action!r}")
