"""The worker's side of the relay link: connect (and reconnect with backoff), answer requests, replay the spool.

A request from the server can only fail as an error `response` for that request: whatever a WeCom send raises,
the link stays up. The reconnect loop retries network and handshake errors only; anything else is a crash that
propagates out of `run()` to the supervisor, which restarts it with backoff and counts it (never a hot loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from hil_protocol.images import load_image, to_data_url
from hil_protocol.logs import redact
from hil_protocol.relay_frames import (
    ACTION_SEND_HINT,
    ACTION_SEND_MESSAGE,
    ACTION_UPLOAD_IMAGE,
    FEATURE_CALLBACK_ACK,
    FEATURE_WORKER_STATUS,
    CallbackAck,
    FrameError,
    Hello,
    Ping,
    Pong,
    Request,
    Response,
    SendHintPayload,
    SendMessagePayload,
    UploadImagePayload,
    WorkerStatus,
    dump_frame,
    parse_frame,
)
from hil_protocol.supervise import being_cancelled
from hil_protocol.validation import problems
from hil_protocol.wecom_robot import RobotSender, WeComError

from .config import WorkerSettings
from .metrics import WorkerMetrics, action_label
from .replay import Replayer
from .spool import Spool, SpoolError

logger = logging.getLogger(__name__)

MAX_FRAME_BYTES = 8 * 1024 * 1024
OPEN_TIMEOUT = 10.0
# A link that stayed up this long was not flapping: the pause before the next one starts again from the minimum.
STABLE_LINK_SECONDS = 30.0
ERROR_TEXT_LIMIT = 500


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


def retryable(exc: Exception) -> bool:
    """Network and handshake errors: trying again later may work. Anything else is a bug or a bad setting."""
    return isinstance(exc, OSError | EOFError | InvalidHandshake)  # OSError covers TimeoutError


def _request_id(text: str | bytes) -> str | None:
    """The id of a request frame that does not validate, so it can still be answered."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(raw, dict) and raw.get("type") == "request" and isinstance(raw.get("id"), str):
        return raw["id"]
    return None


class LinkClosed(ConnectionError):
    """The server closed the link; raised inside the link's task group so requests in flight stop with it."""


@dataclasses.dataclass(frozen=True)
class LinkOptions:
    min_delay: float = 0.5
    max_delay: float = 30.0
    hello_timeout: float = 1.0
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    window: int = 100
    ack_timeout: float = 30.0
    max_attempts: int = 10

    @classmethod
    def of(cls, settings: WorkerSettings) -> LinkOptions:
        return cls(
            min_delay=settings.reconnect_min_delay,
            max_delay=settings.reconnect_max_delay,
            hello_timeout=settings.hello_timeout,
            ping_interval=settings.hil_ping_interval,
            ping_timeout=settings.hil_ping_timeout,
            window=settings.hil_spool_window,
            ack_timeout=settings.hil_callback_ack_timeout,
            max_attempts=settings.hil_callback_max_attempts,
        )


class RelayClient:
    def __init__(
        self,
        *,
        hil_url: str,
        worker_id: str,
        token: str | None,
        sender: RobotSender,
        spool: Spool,
        metrics: WorkerMetrics,
        options: LinkOptions | None = None,
        secrets: Sequence[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker_id = worker_id
        self._url = link_url(hil_url, worker_id, token)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._sender = sender
        self._spool = spool
        self._metrics = metrics
        self._options = options or LinkOptions()
        self._secrets = [s for s in secrets if s]
        self._clock = clock
        self._ws: ClientConnection | None = None
        self._replayer: Replayer | None = None
        self._send_lock = asyncio.Lock()
        self._spool_wake = asyncio.Event()
        self.down_since: float = clock()  # monotonic; meaningful while not connected
        self.last_error: str | None = None  # why the last attempt to connect failed
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self._ws is not None

    def down_for(self) -> float:
        return 0.0 if self.connected else self._clock() - self.down_since

    def wake_spool(self) -> None:
        self._spool_wake.set()

    # --- the connection loop ------------------------------------------------------------------------------------

    def _process_exception(self, exc: Exception) -> Exception | None:
        """websockets' hook for a failed attempt to connect: None = try again after a delay."""
        if not retryable(exc):
            return exc
        level = logging.WARNING
        if isinstance(exc, InvalidStatus):
            status = exc.response.status_code
            if status in (401, 403):
                level = logging.ERROR  # a setting to fix, not a server to wait for
                reason = f"HIL Server refused this worker (HTTP {status}): check HIL_TOKEN against HIL_WORKER_TOKEN"
            else:
                reason = f"HIL Server answered HTTP {status} to the WebSocket upgrade"
        else:
            reason = f"cannot reach HIL Server: {type(exc).__name__}"
        self._metrics.connect_failures.inc()
        if reason != self.last_error:  # once per cause, not once per attempt
            logger.log(level, "%s", reason)
        self.last_error = reason
        return None

    async def run(self) -> None:
        o = self._options
        pauses = backoff(o.min_delay, o.max_delay)
        connector = websockets.connect(
            self._url,
            additional_headers=self._headers,
            process_exception=self._process_exception,
            reconnect_delays=lambda: backoff(o.min_delay, o.max_delay),
            max_size=MAX_FRAME_BYTES,
            open_timeout=OPEN_TIMEOUT,
            ping_interval=o.ping_interval,
            ping_timeout=o.ping_timeout,
            proxy=None,
        )
        # aclosing: if this loop crashes, the connection closes now, not whenever the generator is collected.
        async with contextlib.aclosing(aiter(connector)) as links:
            async for ws in links:
                opened = self._clock()
                self._up(ws)
                try:
                    await self._serve_until_closed(ws)
                except asyncio.CancelledError:
                    # Shutting down: close with "going away", not the 1011 a connection left by an exception gets.
                    with contextlib.suppress(ConnectionClosed, OSError, TimeoutError):
                        await asyncio.wait_for(ws.close(1001, "worker shutting down"), 2)
                    raise
                finally:
                    self._down(ws)
                await self._blame_oldest()
                if self._clock() - opened >= STABLE_LINK_SECONDS:
                    pauses = backoff(o.min_delay, o.max_delay)
                # websockets reconnects at once after a link that opened; pause, growing while it keeps dropping,
                # so a server that accepts and then drops us (restarting, or replacing this worker) is not hammered.
                pause = next(pauses)
                logger.info("reconnecting in %.1fs", pause)
                await asyncio.sleep(pause)

    def _up(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._replayer = None
        self.last_error = None
        self.connects += 1
        if self.connects > 1:
            self._metrics.reconnects.inc()
        self._metrics.link_up.set(1)
        logger.info("connected to HIL Server worker_id=%s", self.worker_id)

    def _down(self, ws: ClientConnection) -> None:
        self._ws = None
        self.down_since = self._clock()
        self._metrics.link_up.set(0)
        logger.warning("link to HIL Server closed (code %s)", ws.close_code)

    async def _blame_oldest(self) -> None:
        replayer, self._replayer = self._replayer, None
        if replayer is None:
            return
        oldest = replayer.oldest_in_flight()
        if oldest is None:
            return
        try:
            attempts = await self._spool.blame(oldest)
        except SpoolError as exc:  # not counted: the row is simply sent again
            logger.warning("could not count the lost delivery of callback id=%d: %s", oldest, exc)
            return
        logger.info("link dropped with callback id=%d unacknowledged (%d times so far)", oldest, attempts)

    async def _serve_until_closed(self, ws: ClientConnection) -> None:
        try:
            await self._serve(ws)
        except* (ConnectionClosed, OSError):
            # The link dropped: reconnect, unless this task was cancelled in the same step (see being_cancelled).
            if being_cancelled():
                raise asyncio.CancelledError from None

    async def _serve(self, ws: ClientConnection) -> None:
        hello = asyncio.Event()
        features: set[str] = set()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._replay(hello, features), name="spool-replay")
            tasks.create_task(self._report_key(hello, features), name="key-report")
            async for text in ws:
                try:
                    frame = parse_frame(text)
                except FrameError as exc:
                    logger.warning("bad frame from HIL Server: %s", exc)
                    request_id = _request_id(text)
                    if request_id is not None:  # a request we cannot read still gets its answer
                        self._metrics.requests.labels("unknown", "invalid").inc()
                        response = Response(id=request_id, success=False, error=f"invalid request: {exc}")
                        tasks.create_task(self._answer(response))
                    continue
                if isinstance(frame, Request):
                    # Each request in its own task: a slow WeCom send must not stop us reading pings.
                    tasks.create_task(self._handle_request(frame))
                elif isinstance(frame, Ping):
                    await self._send_text(dump_frame(Pong()))
                elif isinstance(frame, Hello):
                    features.update(frame.features)
                    hello.set()
                elif isinstance(frame, CallbackAck):
                    if self._replayer is not None:
                        self._replayer.acked(frame.id)
            raise LinkClosed("the HIL Server closed the link")

    async def _send_text(self, text: str) -> None:
        ws = self._ws
        if ws is None:
            raise LinkClosed("not connected")
        async with self._send_lock:
            await ws.send(text)

    async def _replay(self, hello: asyncio.Event, features: set[str]) -> None:
        o = self._options
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that meets the hello, and
        # the replay then outlives the link's TaskGroup (a shutdown that hangs).
        try:
            async with asyncio.timeout(o.hello_timeout):
                await hello.wait()
        except TimeoutError:
            logger.info("HIL Server sent no hello: assuming a seed server without callback acknowledgements")
        self._replayer = Replayer(
            self._spool,
            self._send_text,
            self._spool_wake,
            self._metrics,
            acks=FEATURE_CALLBACK_ACK in features,
            window=o.window,
            ack_timeout=o.ack_timeout,
            max_attempts=o.max_attempts,
        )
        await self._replayer.run()

    async def _report_key(self, hello: asyncio.Event, features: set[str]) -> None:
        """Tell a server that understands `worker_status` whether WeCom takes our BOT_KEY: once on connect, then on
        every change, so its /health shows this worker's state."""
        try:
            await asyncio.wait_for(hello.wait(), self._options.hello_timeout)
        except TimeoutError:
            return  # a seed server: it learns of a refused key from our answers' errcode alone
        if FEATURE_WORKER_STATUS not in features:
            return
        key = self._sender.key
        while True:
            await self._send_text(dump_frame(WorkerStatus(bot_key_refused=key.reason())))
            await key.wait_change()

    # --- requests -----------------------------------------------------------------------------------------------

    async def _handle_request(self, request: Request) -> None:
        """Answer one request. Whatever happens on the way, the outcome is a `response` frame: never the link."""
        action = action_label(request.action)
        try:
            data = await self._perform(request)
        except WeComError as exc:
            logger.warning("request %s action=%s refused by WeCom: errcode %s", request.id, action, exc.errcode)
            response = self._failure(request, "wecom_error", str(exc), exc.errcode)
        except ValidationError as exc:
            found = problems(exc.errors(), default="payload", limit=3)
            response = self._failure(request, "invalid", f"invalid {action} payload: {found}")
        except ValueError as exc:  # ImageError (a bad image), an unknown action
            response = self._failure(request, "invalid", str(exc))
        except Exception as exc:  # one send failed in a way nobody foresaw: that send fails, never the link
            logger.exception("request %s action=%s failed unexpectedly", request.id, action)
            error = f"worker 无法完成 {action}：{type(exc).__name__}（详见 worker 日志）"
            response = self._failure(request, "error", error)
        else:
            self._metrics.requests.labels(action, "ok").inc()
            response = Response(id=request.id, success=True, data=data)
        await self._answer(response)

    async def _answer(self, response: Response) -> None:
        try:
            await self._send_text(dump_frame(response))
        except (ConnectionClosed, OSError):
            logger.warning("could not answer request %r: link closed", response.id[:64])
        except ValueError as exc:  # an id (or data) that cannot be encoded as UTF-8 JSON
            logger.warning("could not encode the answer to a request: %s", exc)

    def _failure(self, request: Request, result: str, error: str, errcode: int | None = None) -> Response:
        self._metrics.requests.labels(action_label(request.action), result).inc()
        text = redact(error, self._secrets)[:ERROR_TEXT_LIMIT].encode("utf-8", "replace").decode("utf-8")
        return Response(id=request.id, success=False, error=text, errcode=errcode)

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
        raise ValueError(f"unknown action {request.action[:64]!r}")
