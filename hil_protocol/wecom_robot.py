"""The WeCom robot client: send text / markdown / images through the webhook API, split to its limits, retry
what WeCom asks us to retry, and pace a burst so that nothing is lost to its rate limit.

Two backends speak to WeCom: the public webhook API over httpx (default) and fly-pigeon (Tencent-internal,
used only when `pigeon` imports and `WECOM_SENDER=pigeon`). Whatever either gets back is read by one model,
`WeComAnswer`; anything else that comes back is a `WeComBadResponse` for that one send, never another exception.

Time is bounded twice: one attempt (request and body) within `RetryPolicy.attempt_timeout`, and one message,
retries and pacing pauses included, within `RetryPolicy.deadline` (WECOM_RETRY_DEADLINE): no attempt starts after
it, and an attempt's bound is the time left when that is shorter.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import random
import re
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

import httpx
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from .images import ImageFetcher, check_image, load_images
from .messages import MARKDOWN_LIMIT, TEXT_LIMIT, split_text, truncate_bytes, utf8_len
from .outbound import Notice, Question, SendReceipt
from .validation import problems

logger = logging.getLogger(__name__)

ERR_RATE_LIMITED = 45009
ERR_INVALID_KEY = 93000
ERR_ROBOT_DISABLED = 93004
ERR_TOO_LONG = 40058
ERR_NETWORK = -1
ERR_BAD_RESPONSE = -2
ERR_UNSUPPORTED = -3
ERR_INVALID_MESSAGE = -4
# Errcodes that mean "this robot cannot send at all", whatever the message or chat: 93000 invalid webhook url (the
# key is wrong or revoked, or the robot was removed from its group) and 93004 (the robot is disabled, per WeCom's
# global error code list). Not here: 93005/93006/93008 (one user or chat the robot may not reach; another chat still
# works), 40008/40058/44004 (one bad message), 45009 (rate limit, retried).
KEY_REFUSED_ERRCODES = frozenset({ERR_INVALID_KEY, ERR_ROBOT_DISABLED})
# What the key check uploads (upload_media, type=file): it proves the key works and posts nothing in the chat;
# WeCom keeps the file for three days, unused.
KEY_CHECK_FILE = ("hil-key-check.txt", b"hil-mcp BOT_KEY check\n")

ATTEMPT_TIMEOUT = 10.0
# WeCom's answers are a few dozen bytes; anything near this is not WeCom talking.
ANSWER_MAX_BYTES = 64 * 1024
SNIPPET_CHARS = 200
PROXY_HINT = "请检查网络和代理设置（HTTPS_PROXY / NO_PROXY），或用 WECOM_API_BASE 指向可以访问的企业微信地址"

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_INT_TEXT = re.compile(r"-?[0-9]{1,10}")


class WeComError(Exception):
    """WeCom refused a message (errcode != 0), could not be reached, or answered something we cannot read."""

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
    """No answer from WeCom: a transport error, a timeout, HTTP 5xx or 429. Retried until the deadline."""

    retryable = True

    def __init__(self, errcode: int, errmsg: str, hint: str = "", *, host: str | None = None) -> None:
        self.host = host
        super().__init__(errcode, errmsg, hint or (PROXY_HINT if host else ""))

    def describe(self) -> str:
        where = f"企业微信（{self.host}）" if self.host else "企业微信"
        text = f"无法连接{where}：{self.errmsg}"
        return f"{text}。{self.hint}" if self.hint else text


class WeComBadResponse(WeComError):
    """WeCom (or something between us) answered, but not with `{"errcode": <int>, ...}`. Not retried: the message
    may have been posted, and sending it again could post it twice."""

    def __init__(self, errmsg: str, *, host: str | None = None) -> None:
        self.host = host
        super().__init__(ERR_BAD_RESPONSE, errmsg)

    def describe(self) -> str:
        where = f"企业微信（{self.host}）" if self.host else "企业微信"
        return (
            f"{where}的应答无法识别：{self.errmsg}。消息可能没有发出；"
            "请检查 WECOM_API_BASE 是否指向企业微信，以及中间是否有代理改写了应答"
        )


class WeComInvalidMessage(WeComError):
    """A message that cannot be sent as it is (text that is not valid Unicode). Nothing was sent."""

    def describe(self) -> str:
        return self.errmsg


@contextlib.contextmanager
def _valid_unicode() -> Iterator[None]:
    try:
        yield
    except UnicodeEncodeError as exc:  # a lone surrogate from JSON ("\ud800") cannot become UTF-8
        raise WeComInvalidMessage(
            ERR_INVALID_MESSAGE, "消息含有无法编码为 UTF-8 的字符（孤立的 Unicode 代理项），请去掉后重发"
        ) from exc


def error_for(errcode: int, errmsg: str) -> WeComError:
    if errcode == ERR_RATE_LIMITED:
        return WeComRateLimited(errcode, errmsg, "发送过于频繁，已按企业微信的频率限制重试")
    if errcode == ERR_INVALID_KEY:
        return WeComInvalidKey(errcode, errmsg, "机器人 Key 无效或机器人已被移出群聊，请检查 BOT_KEY")
    if errcode == ERR_ROBOT_DISABLED:
        return WeComInvalidKey(errcode, errmsg, "机器人已被停用，请在群设置中启用它或更换 BOT_KEY")
    if errcode == ERR_TOO_LONG:
        return WeComContentTooLong(errcode, errmsg, "消息超过企业微信的长度限制")
    return WeComError(errcode, errmsg)


# --- WeCom's answers ----------------------------------------------------------------------------------------------


def printable(text: str, limit: int = SNIPPET_CHARS) -> str:
    """Text from outside, safe to put in an error or a log line: no control characters or lone surrogates."""
    text = _UNPRINTABLE.sub("?", text)
    return text if len(text) <= limit else text[:limit] + "…"


def _errcode(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"errcode is {type(value).__name__}, not an integer")
    if isinstance(value, str):
        if not _INT_TEXT.fullmatch(value.strip()):
            raise ValueError("errcode is a word, not an integer")
        value = int(value)
    if not -(2**31) <= value < 2**31:
        raise ValueError("errcode is out of range")
    return value


def _errmsg(value: object) -> str:
    if value is None:
        return ""
    return printable(value) if isinstance(value, str) else _snippet(value)


class WeComAnswer(BaseModel):
    """What the webhook API (send, upload_media) and fly-pigeon answer: `{"errcode": 0, "errmsg": "ok", ...}`.
    errcode must be an integer (a numeric string is read as one); errmsg is only shown to people."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    errcode: Annotated[int, BeforeValidator(_errcode)]
    errmsg: Annotated[str, BeforeValidator(_errmsg)] = ""
    media_id: str | None = None


def _snippet(value: object) -> str:
    if isinstance(value, bytes):
        return printable(value[: SNIPPET_CHARS * 4].decode("utf-8", "replace"))
    try:
        return printable(json.dumps(value, ensure_ascii=False, default=repr)[: SNIPPET_CHARS * 4])
    except (TypeError, ValueError, RecursionError):
        return f"<{type(value).__name__}>"


def parse_answer(value: object, *, host: str | None = None) -> WeComAnswer:
    """A decoded answer (JSON value, or what fly-pigeon returned) -> WeComAnswer; WeComBadResponse otherwise.
    Does not look at errcode: `raise_for_errcode` does."""
    if not isinstance(value, dict):
        raise WeComBadResponse(f"不是 JSON 对象：{_snippet(value)}", host=host)
    try:
        return WeComAnswer.model_validate(value)
    except ValidationError as exc:
        problem = problems(exc.errors(include_url=False))
        raise WeComBadResponse(f"{printable(problem)}：{_snippet(value)}", host=host) from exc


def raise_for_errcode(answer: WeComAnswer) -> WeComAnswer:
    if answer.errcode != 0:
        raise error_for(answer.errcode, answer.errmsg)
    return answer


def _decompress(body: bytes, encoding: str, *, host: str | None) -> bytes:
    """Undo Content-Encoding (gzip / deflate, possibly stacked) within ANSWER_MAX_BYTES, or WeComBadResponse."""
    for coding in reversed([c.strip().lower() for c in encoding.split(",") if c.strip()]):
        if coding == "identity":
            continue
        if coding in ("gzip", "x-gzip"):
            decoders = [zlib.decompressobj(16 + zlib.MAX_WBITS)]
        elif coding == "deflate":  # zlib-wrapped as the RFC says, or raw deflate as some servers send
            decoders = [zlib.decompressobj(zlib.MAX_WBITS), zlib.decompressobj(-zlib.MAX_WBITS)]
        else:
            raise WeComBadResponse(f"不支持的 Content-Encoding {printable(coding)}", host=host)
        for decoder in decoders:
            try:
                out = decoder.decompress(body, ANSWER_MAX_BYTES + 1)
            except zlib.error:
                continue
            if len(out) > ANSWER_MAX_BYTES or decoder.unconsumed_tail:
                raise WeComBadResponse(f"解压后超过 {ANSWER_MAX_BYTES} 字节", host=host)
            if not decoder.eof:
                raise WeComBadResponse(f"{coding} 数据不完整", host=host)
            body = out
            break
        else:
            raise WeComBadResponse(f"{coding} 数据损坏，无法解压", host=host)
    return body


def decode_answer(status: int, body: bytes, encoding: str = "", *, host: str | None = None) -> WeComAnswer:
    """An HTTP answer's status and raw body (as received, before Content-Encoding) -> WeComAnswer."""
    raw = _decompress(body, encoding, host=host)
    if not raw.strip():
        raise WeComBadResponse(f"HTTP {status}，应答为空", host=host)
    try:
        value = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise WeComBadResponse(f"HTTP {status}，应答不是 UTF-8：{_snippet(raw)}", host=host) from exc
    except (ValueError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError; RecursionError: [[[[…
        raise WeComBadResponse(f"HTTP {status}，应答不是 JSON：{_snippet(raw)}", host=host) from exc
    return parse_answer(value, host=host)


# --- backends -------------------------------------------------------------------------------------------------


class RobotBackend(Protocol):
    """Sends one payload, once, within `timeout` seconds (request and answer), or raises a WeComError."""

    name: str
    host: str

    async def send(self, payload: dict[str, Any], timeout: float) -> None: ...

    async def upload_file(self, filename: str, data: bytes, timeout: float = ATTEMPT_TIMEOUT) -> str: ...


def _api_host(api_base: str) -> str:
    """WECOM_API_BASE's host[:port], for errors and logs (the key is in the query, never here)."""
    try:
        url = httpx.URL(api_base)
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(f"WECOM_API_BASE {api_base!r} is not a URL; use e.g. https://qyapi.weixin.qq.com") from exc
    port_ok = url.port is None or 0 < url.port < 65536
    if url.scheme not in ("http", "https") or not url.host or not port_ok or url.query or url.userinfo:
        raise ValueError(
            f"WECOM_API_BASE {api_base!r} must be http(s)://host[:port][/path] (port 1-65535, no user or query); "
            "e.g. https://qyapi.weixin.qq.com"
        )
    return url.netloc.decode("ascii")


class WebhookBackend:
    """WeCom's public robot webhook API: `POST {base}/cgi-bin/webhook/send?key=KEY`."""

    name = "webhook"

    def __init__(self, http: httpx.AsyncClient, api_base: str, bot_key: str) -> None:
        self._http = http
        self.host = _api_host(api_base)
        self._base = api_base.rstrip("/")
        self._key = bot_key

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    async def _post(self, path: str, timeout: float, **kwargs: Any) -> WeComAnswer:
        try:
            # One bound over the request and the whole body: httpx's timeouts are per read, so a body dripped a
            # byte at a time would never trip them.
            async with asyncio.timeout(timeout):
                status, body, encoding = await self._exchange(path, **kwargs)
        except TimeoutError as exc:
            raise WeComNetworkError(ERR_NETWORK, f"{timeout:.3g} 秒内没有完整应答", host=self.host) from exc
        try:
            answer = decode_answer(status, body, encoding, host=self.host)
        except WeComBadResponse as exc:
            # A proxy's error page may quote the URL, and the URL carries the key.
            raise WeComBadResponse(self._redact(exc.errmsg), host=self.host) from exc.__cause__
        return raise_for_errcode(answer)

    async def _exchange(self, path: str, **kwargs: Any) -> tuple[int, bytes, str]:
        """The answer's status, raw body and Content-Encoding; WeComNetworkError for 5xx and 429 (retried)."""
        headers = {"Accept-Encoding": "gzip, deflate"}
        try:
            async with self._http.stream("POST", f"{self._base}{path}", headers=headers, **kwargs) as response:
                if response.status_code >= 500 or response.status_code == 429:
                    raise WeComNetworkError(ERR_NETWORK, f"HTTP {response.status_code}", host=self.host)
                length = response.headers.get("content-length", "")
                if length.strip().isdigit() and int(length) > ANSWER_MAX_BYTES:
                    raise WeComBadResponse(f"应答有 {int(length)} 字节，不像企业微信的应答", host=self.host)
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_raw():
                    size += len(chunk)
                    if size > ANSWER_MAX_BYTES:
                        raise WeComBadResponse(f"应答超过 {ANSWER_MAX_BYTES} 字节，不像企业微信的应答", host=self.host)
                    chunks.append(chunk)
                return response.status_code, b"".join(chunks), response.headers.get("content-encoding", "")
        except httpx.TimeoutException as exc:
            raise WeComNetworkError(ERR_NETWORK, f"请求超时（{type(exc).__name__}）", host=self.host) from exc
        except httpx.TransportError as exc:
            # The exception text can carry the URL, and the URL carries the key: say only what kind of failure.
            raise WeComNetworkError(ERR_NETWORK, type(exc).__name__, host=self.host) from exc
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise WeComBadResponse(f"读取应答失败（{type(exc).__name__}）", host=self.host) from exc

    async def send(self, payload: dict[str, Any], timeout: float = ATTEMPT_TIMEOUT) -> None:
        await self._post("/cgi-bin/webhook/send", timeout, params={"key": self._key}, json=payload)

    async def upload_file(self, filename: str, data: bytes, timeout: float = ATTEMPT_TIMEOUT) -> str:
        answer = await self._post(
            "/cgi-bin/webhook/upload_media",
            timeout,
            params={"key": self._key, "type": "file"},
            files={"media": (filename, data, "application/octet-stream")},
        )
        if not answer.media_id:
            raise WeComBadResponse("upload_media 成功但没有返回 media_id", host=self.host)
        return answer.media_id


class PigeonBackend:
    """fly-pigeon's `pigeon.Bot`. Its calls are synchronous, so each runs in a worker thread."""

    name = "pigeon"
    host = "fly-pigeon"

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
            result = self._bot.text(
                chat_id=chat_id, msg_content=text["content"], mentioned_list=text.get("mentioned_list") or None
            )
        elif msgtype in ("markdown", "markdown_v2"):
            result = self._bot.markdown(chat_id=chat_id, msg_content=payload[msgtype]["content"])
        elif msgtype == "image":
            result = self._bot.image(msg_content=payload["image"]["base64"], chat_id=chat_id)
        elif msgtype == "file":
            result = self._bot.file(chat_id=chat_id, media_id=payload["file"]["media_id"])
        else:
            raise WeComError(40008, f"fly-pigeon backend cannot send msgtype {msgtype}")
        # A response object: read it here, in the thread, since .json() may read the body from the network.
        return result.json() if hasattr(result, "json") else result

    async def send(self, payload: dict[str, Any], timeout: float = ATTEMPT_TIMEOUT) -> None:
        try:
            async with asyncio.timeout(timeout):
                result = await asyncio.to_thread(self._call, payload)
        except WeComError:
            raise
        except TimeoutError as exc:
            # The thread cannot be stopped; it finishes on its own and its result is dropped.
            raise WeComNetworkError(ERR_NETWORK, f"fly-pigeon 在 {timeout:.3g} 秒内没有返回") from exc
        except ValueError as exc:  # .json() of a body that is not JSON
            raise WeComBadResponse(f"fly-pigeon 的应答不是 JSON（{type(exc).__name__}）", host=self.host) from exc
        except Exception as exc:  # fly-pigeon raises whatever requests raises; we only know it failed to send
            raise WeComNetworkError(ERR_NETWORK, f"fly-pigeon: {type(exc).__name__}") from exc
        raise_for_errcode(parse_answer(result, host=self.host))

    async def upload_file(self, filename: str, data: bytes, timeout: float = ATTEMPT_TIMEOUT) -> str:
        raise WeComError(ERR_UNSUPPORTED, "the fly-pigeon backend cannot upload files; use WECOM_SENDER=webhook")


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


def text_payload(chat_id: str | None, content: str, mentioned_list: list[str] | None = None) -> dict[str, Any]:
    if utf8_len(content) > TEXT_LIMIT:
        raise WeComContentTooLong(ERR_TOO_LONG, f"text is {utf8_len(content)} bytes, limit {TEXT_LIMIT}")
    text: dict[str, Any] = {"content": content}
    if mentioned_list:
        text["mentioned_list"] = mentioned_list
    return _addressed({"msgtype": "text", "text": text}, chat_id)


def markdown_payload(chat_id: str | None, content: str) -> dict[str, Any]:
    markdown = {"content": truncate_bytes(content, MARKDOWN_LIMIT)}
    return _addressed({"msgtype": "markdown", "markdown": markdown}, chat_id)


def image_payload(chat_id: str | None, data: bytes) -> dict[str, Any]:
    image = {"base64": base64.b64encode(data).decode(), "md5": hashlib.md5(data).hexdigest()}
    return _addressed({"msgtype": "image", "image": image}, chat_id)


def _addressed(payload: dict[str, Any], chat_id: str | None) -> dict[str, Any]:
    if chat_id:
        payload["chatid"] = chat_id
    return payload


# --- pacing and retries ---------------------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    """How hard to try before telling the caller WeCom would not take a message."""

    deadline: float = 60.0  # total seconds one message may spend on WeCom, pauses and attempts included
    attempt_timeout: float = ATTEMPT_TIMEOUT  # one attempt, request and answer body
    base_delay: float = 0.5
    max_delay: float = 10.0
    concurrency: int = 8  # sends in flight at once per robot
    max_per_minute: int | None = None  # optional fixed pace (off: public and internal WeCom limits differ)


class _OutOfTime(Exception):
    """The message's deadline came before its next attempt could start."""


class _Pacer:
    """Shared by every send of one robot: a concurrency cap, a pause after 45009 (doubling while WeCom keeps
    refusing, reset by a success), and an optional fixed pace. Every wait ends at the message's deadline."""

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

    async def run(self, send: Callable[[float], Awaitable[None]], deadline: float) -> None:
        """Run `send(bound)` once its turn comes, or raise _OutOfTime if that is not before `deadline`."""
        # While WeCom is refusing, go one at a time so the queue drains at the pace WeCom allows.
        async with (
            self._hold(self._slots, deadline),
            self._hold(self._throttle_lock, deadline) if self._throttled else contextlib.nullcontext(),
        ):
            await self._wait_turn(deadline)
            await self._send(send, deadline)

    @contextlib.asynccontextmanager
    async def _hold(self, lock: asyncio.Semaphore | asyncio.Lock, deadline: float) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock())):
                await lock.acquire()
        except TimeoutError:
            raise _OutOfTime from None
        try:
            yield
        finally:
            lock.release()

    async def _wait_turn(self, deadline: float) -> None:
        while True:
            now = self._clock()
            start = max(self._paused_until, self._next_start, now)
            if start >= deadline:
                raise _OutOfTime
            if start <= now:
                break
            await self._sleep(start - now)
        if self._policy.max_per_minute:
            self._next_start = max(self._clock(), self._next_start) + 60.0 / self._policy.max_per_minute

    async def _send(self, send: Callable[[float], Awaitable[None]], deadline: float) -> None:
        epoch = self._epoch
        bound = min(self._policy.attempt_timeout, deadline - self._clock())
        if bound <= 0:
            raise _OutOfTime
        try:
            await send(bound)
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


class KeyHealth:
    """Whether WeCom takes this robot's key. Refused (an errcode of KEY_REFUSED_ERRCODES) from the attempt that got
    one until a later send or key check succeeds; `/health` reports it (503, naming BOT_KEY) while it lasts."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.refused: WeComError | None = None
        self.since = 0.0  # monotonic, while refused
        self._clock = clock
        self._waiters: list[asyncio.Event] = []

    def note(self, errcode: int, error: WeComError | None = None) -> None:
        """What one request with the key got back: 0 for success."""
        if errcode in KEY_REFUSED_ERRCODES and error is not None:
            if self.refused is None:
                self.since = self._clock()
                logger.error("WeCom refuses BOT_KEY (errcode %d): every send fails until it is fixed", errcode)
                self._changed()
            self.refused = error
        elif errcode == 0 and self.refused is not None:
            logger.warning("WeCom takes BOT_KEY again after %.0fs", self._clock() - self.since)
            self.refused = None
            self._changed()

    def reason(self) -> str | None:
        """Why the key does not work, while it does not (what the worker tells the server); None while it works (or
        nothing has said otherwise)."""
        error = self.refused
        if error is None:
            return None
        return (
            f"WeCom refuses BOT_KEY (errcode {error.errcode}: {printable(error.errmsg, 80)}): every send fails; "
            "check BOT_KEY and that the robot is still in its group and enabled"
        )

    def problem(self) -> str | None:
        """`reason()` with how long it has lasted, for this process's /health."""
        reason = self.reason()
        return None if reason is None else f"{reason} (for {self._clock() - self.since:.0f}s)"

    async def wait_change(self) -> None:
        event = asyncio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        finally:
            self._waiters.remove(event)

    def _changed(self) -> None:
        for event in self._waiters:
            event.set()


class RobotSender:
    """One per robot (BOT_KEY): everything that goes to WeCom goes through here. `images` fetches image URLs
    (default: public hosts only). `key` tracks whether WeCom takes the key; `watch_key()` re-checks it every
    `key_check_interval` seconds while it is refused."""

    def __init__(
        self,
        backend: RobotBackend,
        policy: RetryPolicy | None = None,
        *,
        images: ImageFetcher | None = None,
        on_attempt: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        key_check_interval: float = 60.0,
    ) -> None:
        self.backend = backend
        self.images = images or ImageFetcher()
        self.policy = policy or RetryPolicy()
        self.key = KeyHealth(clock)
        self.key_check_interval = key_check_interval
        self._clock = clock
        self._pacer = _Pacer(self.policy, clock, sleep)
        # An observer (metrics) sees every attempt's errcode.
        self.on_attempt = on_attempt

    def _deadline(self) -> float:
        return self._clock() + self.policy.deadline

    async def send_payload(self, payload: dict[str, Any], deadline: float | None = None) -> int:
        """Send one message, retrying rate limits and network errors until the deadline (default: the policy's
        deadline from now). Returns how many retries it took; raises a WeComError when WeCom would not take it:
        the last attempt's error, and never later than the deadline."""
        with _valid_unicode():
            json.dumps(payload, ensure_ascii=False).encode("utf-8")
        deadline = self._deadline() if deadline is None else deadline
        retries = 0
        last: WeComError | None = None
        while True:
            try:
                await self._pacer.run(lambda bound: self._attempt(payload, bound), deadline)
            except _OutOfTime:
                break
            except WeComError as exc:
                if not exc.retryable:
                    raise
                # An attempt that the message's deadline cut short and timed out says less than the error before
                # it ("no answer within 0.001 s" after "ConnectError"): the reason given is the telling one.
                cut_short = isinstance(exc.__cause__, TimeoutError) and self._clock() >= deadline
                if last is None or not cut_short:
                    last = exc
                retries += 1
                logger.info("wecom send retry #%d after errcode %s", retries, exc.errcode)
            else:
                return retries
        if last is None:
            last = WeComNetworkError(
                ERR_NETWORK, "发送期限（WECOM_RETRY_DEADLINE）内没有轮到这条消息发送", host=self.backend.host
            )
        logger.warning("wecom send gave up after %d retries: %s", retries, last)
        raise last

    async def _attempt(self, payload: dict[str, Any], bound: float) -> None:
        try:
            await self.backend.send(payload, bound)
        except WeComError as exc:
            self.key.note(exc.errcode, exc)
            if self.on_attempt:
                self.on_attempt(exc.errcode)
            raise
        self.key.note(0)
        if self.on_attempt:
            self.on_attempt(0)

    async def check_key(self) -> None:
        """Ask WeCom whether it takes the key, without posting anything: an upload_media of a tiny file. A refusal
        keeps (or marks) it refused, success clears it; a network error or a backend that cannot upload (fly-pigeon)
        says nothing, and only the next successful send clears a refusal."""
        filename, data = KEY_CHECK_FILE
        try:
            await self.backend.upload_file(filename, data, self.policy.attempt_timeout)
        except WeComError as exc:
            if exc.errcode in KEY_REFUSED_ERRCODES:
                self.key.note(exc.errcode, exc)
            else:
                logger.info("BOT_KEY check inconclusive: %s", printable(str(exc)))
            return
        self.key.note(0)

    async def watch_key(self) -> None:
        """Background task: while the key is refused, check it every `key_check_interval` seconds."""
        while True:
            await asyncio.sleep(self.key_check_interval)
            if self.key.refused is not None:
                await self.check_key()

    async def send_text(self, chat_id: str | None, content: str, mentioned_list: list[str] | None = None) -> int:
        with _valid_unicode():
            payload = text_payload(chat_id, content, mentioned_list)
        return await self.send_payload(payload)

    async def send_markdown(self, chat_id: str | None, content: str) -> int:
        with _valid_unicode():
            payload = markdown_payload(chat_id, content)
        return await self.send_payload(payload)

    async def send_image(self, chat_id: str | None, data: bytes) -> int:
        return await self.send_payload(image_payload(chat_id, check_image(data)))

    async def send_question(self, question: Question) -> SendReceipt:
        """A question: header + text split into parts (sent in order), then its images. Raises ImageError for an
        image it cannot load (before anything is sent) and WeComError when WeCom would not take a part; all
        parts and images share one retry deadline. Text that is not valid Unicode is a WeComInvalidMessage."""
        # Load every image first: a bad image should fail the question before any part reaches the chat.
        loaded = await load_images(question.images, self.images)
        header = question.header
        mentions = list(question.mention_list) or None
        with _valid_unicode():
            parts = split_text(question.message, header)
            # Mention people once, on the first part, so they are not pinged five times for one question.
            payloads = [
                text_payload(question.chat_id, part, mentions if index == 0 else None)
                for index, part in enumerate(parts)
            ]
        payloads += [image_payload(question.chat_id, data) for data in loaded]
        deadline = self._deadline()
        retries = 0
        for payload in payloads:
            retries += await self.send_payload(payload, deadline)
        return SendReceipt(parts=len(parts), images=len(loaded), retries=retries)

    async def send_notice(self, notice: Notice) -> None:
        if notice.markdown:
            await self.send_markdown(notice.chat_id, notice.text)
        else:
            await self.send_text(notice.chat_id, notice.text)
