"""Relay mode: the DevCloud Workers connected over the relay WebSocket, and the channel that sends through them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hil_protocol.outbound import CardUpdate, Notice, Question, SendReceipt
from hil_protocol.relay_frames import (
    ACTION_SEND_HINT,
    ACTION_SEND_MESSAGE,
    Ping,
    Request,
    Response,
    SendHintPayload,
    SendMessagePayload,
    dump_frame,
)
from hil_protocol.wecom_robot import KEY_REFUSED_ERRCODES

from ..choices import as_text
from . import ChannelError, ChannelHealth, Inbox

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class WorkerLink:
    """One connected worker. `send_text` writes a frame and `close` closes the socket; both raise ConnectionError
    when the socket is gone. Writes are serialised by `lock`."""

    worker_id: str
    send_text: Callable[[str], Awaitable[None]]
    close: Callable[[int, str], Awaitable[None]]
    connected_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    pending: dict[str, asyncio.Future[Response]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # why WeCom refuses this worker's BOT_KEY, while it does: from its `worker_status` frames, or (a seed worker)
    # from its answers to our requests
    key_problem: str | None = None

    async def send(self, frame: Any) -> None:
        async with self.lock:
            await self.send_text(dump_frame(frame))

    def touch(self) -> None:
        self.last_seen = time.monotonic()


class WorkerHub:
    def __init__(
        self,
        *,
        grace: float = 10.0,
        request_timeout: float = 90.0,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.grace = grace
        self.request_timeout = request_timeout
        self.links: dict[str, WorkerLink] = {}
        self._changed = asyncio.Condition()
        self._rr = 0
        self._on_change = on_change or (lambda count: None)

    @property
    def count(self) -> int:
        return len(self.links)

    async def add(self, link: WorkerLink) -> None:
        old = self.links.get(link.worker_id)
        if old is not None:
            # The same worker reconnected before we noticed it left: the old socket is dead.
            await self.remove(old, reason="replaced by a new connection")
            with contextlib.suppress(ConnectionError):  # the old socket is usually already gone
                await old.close(4000, "replaced by a new connection")
        self.links[link.worker_id] = link
        self._on_change(self.count)
        async with self._changed:
            self._changed.notify_all()

    async def remove(self, link: WorkerLink, reason: str = "") -> None:
        if self.links.get(link.worker_id) is link:
            del self.links[link.worker_id]
            self._on_change(self.count)
        for future in link.pending.values():
            if not future.done():
                future.set_exception(ConnectionError(f"worker {link.worker_id} left: {reason}"))
        link.pending.clear()

    def resolve(self, link: WorkerLink, response: Response) -> None:
        future = link.pending.pop(response.id, None)
        if future is not None and not future.done():
            future.set_result(response)

    async def _wait_for_worker(self) -> list[WorkerLink]:
        if not self.links and self.grace > 0:
            logger.info("no worker connected; waiting up to %.0fs for one", self.grace)
            try:
                async with self._changed:
                    await asyncio.wait_for(self._changed.wait_for(lambda: bool(self.links)), self.grace)
            except TimeoutError:
                pass
        links = list(self.links.values())  # remove() takes a link out of `links` the moment it is gone
        if not links:
            return []
        # Round-robin start point, so load spreads and a failed worker is followed by the next.
        self._rr = (self._rr + 1) % len(links)
        return links[self._rr :] + links[: self._rr]

    async def request(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        links = await self._wait_for_worker()
        if not links:
            raise ChannelError(
                "没有已连接的 DevCloud Worker（relay 模式需要 worker 连接到 HIL Server 的 /ws）；"
                "请检查 worker 是否在运行、HIL_URL 与 HIL_TOKEN 是否正确"
            )
        last: ChannelError | None = None
        for link in links:
            try:
                return await self._request_one(link, action, payload)
            except ChannelError as exc:
                last = exc
                if exc.errcode is not None and exc.errcode > 0:
                    # WeCom itself refused the message: another worker with the same robot would be refused too.
                    raise
                logger.warning("worker_id=%s failed %s: %s; trying the next worker", link.worker_id, action, exc)
        assert last is not None
        raise last

    async def _request_one(self, link: WorkerLink, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        request_id = uuid.uuid4().hex
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        link.pending[request_id] = future
        try:
            await link.send(Request(id=request_id, action=action, payload=payload))
            response = await asyncio.wait_for(future, self.request_timeout)
        except TimeoutError as exc:
            raise ChannelError(f"worker {link.worker_id} 在 {self.request_timeout:.0f} 秒内没有应答") from exc
        except ConnectionError as exc:
            raise ChannelError(f"与 worker {link.worker_id} 的连接中断") from exc
        finally:
            link.pending.pop(request_id, None)
        if not response.success:
            if response.errcode in KEY_REFUSED_ERRCODES:
                link.key_problem = link.key_problem or f"WeCom refuses its BOT_KEY (errcode {response.errcode})"
            raise ChannelError(response.error or "worker 发送失败", response.errcode)
        link.key_problem = None
        return response.data or {}

    async def heartbeat(self, interval: float, timeout: float) -> None:
        """Ping every worker; evict one that has said nothing for `timeout` seconds."""
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for link in list(self.links.values()):
                if now - link.last_seen > timeout:
                    logger.warning("worker_id=%s silent for %.0fs, evicting", link.worker_id, now - link.last_seen)
                    await self.remove(link, reason="heartbeat timeout")
                    with contextlib.suppress(ConnectionError):  # a half-dead socket may fail to close; it is gone
                        await link.close(4001, "heartbeat timeout")
                    continue
                try:
                    await link.send(Ping())
                except ConnectionError as exc:  # a broken socket: the reader notices and removes it
                    logger.info("ping to worker_id=%s failed: %s", link.worker_id, type(exc).__name__)

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {
                "worker_id": link.worker_id,
                "connected_at": link.connected_at,
                "last_seen_seconds_ago": round(now - link.last_seen, 1),
                "in_flight": len(link.pending),
            }
            for link in self.links.values()
        ]


class RelayChannel:
    """Sends through a connected worker; what people send arrives as `callback` frames on the worker socket
    (`worker_socket.py`), which hands it to the inbox."""

    name = "relay"

    def __init__(self, hub: WorkerHub, *, heartbeat_interval: float = 30.0, heartbeat_timeout: float = 90.0) -> None:
        self.hub = hub
        self._interval = heartbeat_interval
        self._timeout = heartbeat_timeout

    async def send_question(self, question: Question) -> SendReceipt:
        # Options are rendered here, into the text: any worker (a seed one too) sends them as they are.
        payload = SendMessagePayload.of(dataclasses.replace(question, message=as_text(question)))
        data = await self.hub.request(ACTION_SEND_MESSAGE, payload.model_dump(exclude_none=True))
        return SendReceipt(
            parts=_int(data.get("parts"), 1), images=_int(data.get("images"), 0), retries=_int(data.get("retries"), 0)
        )

    async def send_notice(self, notice: Notice) -> None:
        await self.hub.request(ACTION_SEND_HINT, SendHintPayload.of(notice).model_dump(exclude_none=True))

    async def update_card(self, update: CardUpdate) -> None:
        pass  # no cards in a text chat: the question's options are numbered lines

    async def run(self, inbox: Inbox) -> None:
        await self.hub.heartbeat(self._interval, self._timeout)

    def health(self) -> ChannelHealth:
        # One worker whose key is refused fails the sends routed to it (WeCom's refusal is not retried elsewhere).
        refused = [
            f"worker {link.worker_id}: {link.key_problem}" for link in self.hub.links.values() if link.key_problem
        ]
        return ChannelHealth(
            ok=not refused,
            reason="; ".join(refused) or None,
            # bot_key_ok appears only while false, so the seed's body is unchanged while all is well
            fields={"worker_connected": self.hub.count > 0, "worker_count": self.hub.count}
            | ({"bot_key_ok": False} if refused else {}),
        )


def _int(value: Any, default: int) -> int:
    # A seed worker answers send_message with data of its own shape; the counts are informative only.
    return value if isinstance(value, int) and not isinstance(value, bool) else default
