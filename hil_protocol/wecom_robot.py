"""The WeCom robot client: send text / markdown / images through the webhook API, split to its limits, retry
what WeCom asks us to retry, and pace a burst so that nothing is lost to its rate limit.

Two backends speak to WeCom: the public webhook API over httpx (default) and fly-pigeon (Tencent-internal,
used only when `pigeon` imports and `WECOM_SENDER=pigeon`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from .images import ImageFetcher, check_image, load_images
from .messages import MARKDOWN_LIMIT, TEXT_LIMIT, split_text, truncate_bytes, utf8_len
from .outbound import Notice, Question, SendReceipt

logger = logging.getLogger(__name__)

ERR_RATE_LIMITED = 45009
ERR_INVALID_KEY = 93000
ERR_TOO_LONG = 40058
ERR_NETWORK = -1


class WeComError(Exception):
    """WeCom refused a message (errcode != 0) or could not be reached."""

    retryable = False

    def __init__(self, errcode: int, errmsg: str, hint: str = "") -> None:
        self.errcode = errcode
        self.errmsg = errmsg
        self.hint = hint
        super().__init__(self.describe())

    def describe(self) -> str:
        text = f"企业微信拒绝了消息（errcode {self.errcode}: {self.errmsg}）"
        return f"{text}。{self.hint}" if self.hint else text


class WeComRateLimited(WeComError):
    retryable = True


class WeComInvalidKey(WeComError):
    pass


class WeComContentTooLong(WeComError):
    pass


class WeComNetworkError(WeComError):
    retryable = True

    def describe(self) -> str:
        return f"无法连接企业微信：{self.errmsg}"


def error_for(errcode: int, errmsg: str) -> WeComError:
    if errcode == ERR_RATE_LIMITED:
        return WeComRateLimited(errcode, errmsg, "发送过于频繁，已按企业微信的频率限制重试")
    if errcode == ERR_INVALID_KEY:
        return WeComInvalidKey(errcode, errmsg, "机器人 Key 无效或机器人已被移出群聊，请检查 BOT_KEY")
    if errcode == ERR_TOO_LONG:
        return WeComContentTooLong(errcode, errmsg, "消息超过企业微信的长度限制")
    return WeComError(errcode, errmsg)


def _check(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise WeComError(-2, f"unexpected response: {str(body)[:200]}")
    errcode = body.get("errcode", 0)
    if errcode not in (0, None):
        raise error_for(int(errcode), str(body.get("errmsg", "")))
    return body


# --- backends -------------------------------------------------------------------------------------------------


class RobotBackend(Protocol):
    name: str

    async def send(self, payload: dict[str, Any]) -> None: ...

    async def upload_file(self, filename: str, data: bytes) -> str: ...


class WebhookBackend:
    """WeCom's public robot webhook API: `POST {base}/cgi-bin/webhook/send?key=KEY`."""

    name = "webhook"

    def __init__(self, http: httpx.AsyncClient, api_base: str, bot_key: str) -> None:
        self._http = http
        self._base = api_base.rstrip("/")
        self._key = bot_key

    async def _post(self, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._http.post(f"{self._base}{path}", **kwargs)
        except httpx.TimeoutException as exc:
            raise WeComNetworkError(ERR_NETWORK, "请求超时") from exc
        except httpx.TransportError as exc:
            # The exception text can carry the URL, and the URL carries the key: say only what kind of failure.
            raise WeComNetworkError(ERR_NETWORK, type(exc).__name__) from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise WeComNetworkError(ERR_NETWORK, f"HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError as exc:
            raise WeComError(-2, f"HTTP {response.status_code}, response is not JSON") from exc
        return _check(body)

    async def send(self, payload: dict[str, Any]) -> None:
        await self._post("/cgi-bin/webhook/send", params={"key": self._key}, json=payload)

    async def upload_file(self, filename: str, data: bytes) -> str:
        body = await self._post(
            "/cgi-bin/webhook/upload_media",
            params={"key": self._key, "type": "file"},
            files={"media": (filename, data, "application/octet-stream")},
        )
        return str(body["media_id"])


class PigeonBackend:
    """fly-pigeon's `pigeon.Bot`. Its calls are synchronous, so each runs in a worker thread."""

    name = "pigeon"

    def __init__(self, bot_key: str, bot_factory: Callable[..., Any] | None = None) -> None:
        if bot_factory is None:
            from pigeon import Bot  # type: ignore[import-not-found]  # optional, Tencent-internal

            bot_factory = Bot
        self._bot = bot_factory(bot_key=bot_key)

    def _call(self, payload: dict[str, Any]) -> Any:
        chat_id = payload.get("chatid")
        msgtype = payload["msgtype"]
        if msgtype == "text":
            text = payload["text"]
            return self._bot.text(
                chat_id=chat_id, msg_content=text["content"], mentioned_list=text.get("mentioned_list") or None
            )
        if msgtype in ("markdown", "markdown_v2"):
            return self._bot.markdown(chat_id=chat_id, msg_content=payload[msgtype]["content"])
        if msgtype == "image":
            return self._bot.image(msg_content=payload["image"]["base64"], chat_id=chat_id)
        if msgtype == "file":
            return self._bot.file(chat_id=chat_id, media_id=payload["file"]["media_id"])
        raise WeComError(40008, f"fly-pigeon backend cannot send msgtype {msgtype}")

    async def send(self, payload: dict[str, Any]) -> None:
        try:
            result = await asyncio.to_thread(self._call, payload)
        except WeComError:
            raise
        except Exception as exc:  # fly-pigeon raises whatever requests raises; we only know it failed to send
            raise WeComNetworkError(ERR_NETWORK, f"fly-pigeon: {type(exc).__name__}") from exc
        if hasattr(result, "json"):
            result = result.json()
        _check(result if result is not None else {"errcode": 0})

    async def upload_file(self, filename: str, data: bytes) -> str:
        raise WeComError(-3, "the fly-pigeon backend cannot upload files; use WECOM_SENDER=webhook")


def make_backend(kind: str, http: httpx.AsyncClient, api_base: str, bot_key: str) -> RobotBackend:
    """`kind` is webhook | pigeon | auto (pigeon when it imports, else webhook)."""
    if kind in ("pigeon", "auto"):
        try:
            return PigeonBackend(bot_key)
        except ImportError as exc:
            if kind == "pigeon":
                raise RuntimeError(
                    "WECOM_SENDER=pigeon but fly-pigeon (`pigeon`) is not installed; "
                    "install it or use WECOM_SENDER=webhook"
                ) from exc
    return WebhookBackend(http, api_base, bot_key)


# --- payloads ---------------------------------------------------------------------------------------------------


def image_payload(chat_id: str | None, data: bytes) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "msgtype": "image",
        "image": {"base64": base64.b64encode(data).decode(), "md5": hashlib.md5(data).hexdigest()},
    }
    if chat_id:
        payload["chatid"] = chat_id
    return payload


# --- pacing and retries ---------------------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    """How hard to try before telling the caller WeCom would not take a message."""

    deadline: float = 60.0  # total seconds one message may spend waiting for WeCom
    base_delay: float = 0.5
    max_delay: float = 10.0
    concurrency: int = 8  # sends in flight at once per robot
    max_per_minute: int | None = None  # optional fixed pace (off: public and internal WeCom limits differ)


class _Pacer:
    """Shared by every send of one robot: a concurrency cap, a pause after 45009 (doubling while WeCom keeps
    refusing, reset by a success), and an optional fixed pace."""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float], sleep: Callable[[float], Awaitable[None]]):
        self._policy = policy
        self._clock = clock
        self._sleep = sleep
        self._slots = asyncio.Semaphore(policy.concurrency)
        self._paused_until = 0.0
        self._delay = policy.base_delay
        self._next_start = 0.0
        self._throttled = False
        self._throttle_lock = asyncio.Lock()
        self._epoch = 0

    async def run(self, send: Callable[[], Awaitable[None]]) -> None:
        async with self._slots:
            # While WeCom is refusing, go one at a time so the queue drains at the pace WeCom allows.
            if self._throttled:
                async with self._throttle_lock:
                    await self._wait_turn()
                    await self._send(send)
            else:
                await self._wait_turn()
                await self._send(send)

    async def _wait_turn(self) -> None:
        while True:
            now = self._clock()
            wait = max(self._paused_until, self._next_start) - now
            if wait <= 0:
                break
            await self._sleep(wait)
        if self._policy.max_per_minute:
            self._next_start = max(self._clock(), self._next_start) + 60.0 / self._policy.max_per_minute

    async def _send(self, send: Callable[[], Awaitable[None]]) -> None:
        epoch = self._epoch
        try:
            await send()
        except WeComRateLimited:
            self._throttled = True
            # Sends already in flight when WeCom started refusing fail together; one burst is one refusal, so
            # only a refusal of a send started after the last pause lengthens the pause.
            if epoch == self._epoch:
                self._epoch += 1
                self._paused_until = self._clock() + self._delay * (0.8 + random.random() * 0.4)
                self._delay = min(self._delay * 2, self._policy.max_delay)
            raise
        except WeComNetworkError:
            self._paused_until = max(self._paused_until, self._clock() + self._policy.base_delay)
            raise
        self._delay = self._policy.base_delay
        if self._paused_until <= self._clock():
            self._throttled = False


class RobotSender:
    """One per robot (BOT_KEY): everything that goes to WeCom goes through here. `images` fetches image URLs
    (default: public hosts only)."""

    def __init__(
        self,
        backend: RobotBackend,
        policy: RetryPolicy | None = None,
        *,
        images: ImageFetcher | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.backend = backend
        self.images = images or ImageFetcher()
        self.policy = policy or RetryPolicy()
        self._clock = clock
        self._pacer = _Pacer(self.policy, clock, sleep)
        # Observers (metrics) see every attempt's errcode.
        self.on_attempt: Callable[[int], None] | None = None

    async def send_payload(self, payload: dict[str, Any]) -> int:
        """Send one message, retrying rate limits and network errors until the policy's deadline.

        Returns how many retries it took; raises the last WeComError when WeCom would not take it."""
        deadline = self._clock() + self.policy.deadline
        retries = 0
        while True:
            try:
                await self._pacer.run(lambda: self._attempt(payload))
                return retries
            except WeComError as exc:
                if not exc.retryable or self._clock() >= deadline:
                    raise
                retries += 1
                logger.info("wecom send retry #%d after errcode %s", retries, exc.errcode)

    async def _attempt(self, payload: dict[str, Any]) -> None:
        try:
            await self.backend.send(payload)
        except WeComError as exc:
            if self.on_attempt:
                self.on_attempt(exc.errcode)
            raise
        if self.on_attempt:
            self.on_attempt(0)

    async def send_text(self, chat_id: str | None, content: str, mentioned_list: list[str] | None = None) -> int:
        if utf8_len(content) > TEXT_LIMIT:
            raise WeComContentTooLong(ERR_TOO_LONG, f"text is {utf8_len(content)} bytes, limit {TEXT_LIMIT}")
        text: dict[str, Any] = {"content": content}
        if mentioned_list:
            text["mentioned_list"] = mentioned_list
        payload: dict[str, Any] = {"msgtype": "text", "text": text}
        if chat_id:
            payload["chatid"] = chat_id
        return await self.send_payload(payload)

    async def send_markdown(self, chat_id: str | None, content: str) -> int:
        payload: dict[str, Any] = {
            "msgtype": "markdown",
            "markdown": {"content": truncate_bytes(content, MARKDOWN_LIMIT)},
        }
        if chat_id:
            payload["chatid"] = chat_id
        return await self.send_payload(payload)

    async def send_image(self, chat_id: str | None, data: bytes) -> int:
        return await self.send_payload(image_payload(chat_id, check_image(data)))

    async def send_question(self, question: Question) -> SendReceipt:
        """A question: header + text split into parts (sent in order), then its images."""
        # Load every image first: a bad image should fail the question before any part reaches the chat.
        loaded = await load_images(question.images, self.images)
        header = question.header
        parts = split_text(question.message, header) if header else _split_plain(question.message)
        mentions = list(question.mention_list) or None
        retries = 0
        for index, part in enumerate(parts):
            # Mention people once, on the first part, so they are not pinged five times for one question.
            retries += await self.send_text(question.chat_id, part, mentions if index == 0 else None)
        for data in loaded:
            retries += await self.send_image(question.chat_id, data)
        return SendReceipt(parts=len(parts), images=len(loaded), retries=retries)

    async def send_notice(self, notice: Notice) -> None:
        if notice.markdown:
            await self.send_markdown(notice.chat_id, notice.text)
        else:
            await self.send_text(notice.chat_id, notice.text)


def _split_plain(message: str) -> list[str]:
    if utf8_len(message) <= TEXT_LIMIT:
        return [message]
    return split_text(message, "")
