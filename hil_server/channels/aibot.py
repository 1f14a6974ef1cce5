"""AI-bot mode: the HIL Server holds the WeCom AI bot's (智能机器人) long connection itself, sends questions and
notices on it and hears people on it. No public URL, no callback route, no worker.

`AibotLink` is the connection: subscribe with the bot's id and secret, a ping every `ping_interval` whose answer
is checked, reconnect with backoff forever on network errors (a normal close is a lost link too), a slow retry
after an authentication failure, and a long pause, without fighting back, when another connection takes the bot
over. A frame we send waits for WeCom's answer under its req_id. `AibotChannel` is the `Channel`: it renders
questions (markdown split to the limit, a button card for 1-6 options), answers callbacks (a welcome for a chat
opened, a reply to a message, a card update after a click) and turns callbacks into `IncomingMessage`s for the
service. Callbacks are handled by a few worker tasks, so reading the link never waits on the store or a download.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from hil_protocol.aibot import (
    CMD_EVENT_CALLBACK,
    CMD_MSG_CALLBACK,
    CMD_PING,
    CMD_RESPOND,
    CMD_SEND,
    CMD_SUBSCRIBE,
    CMD_UPDATE,
    CMD_UPLOAD_CHUNK,
    CMD_UPLOAD_FINISH,
    CMD_UPLOAD_INIT,
    CMD_WELCOME,
    ERR_INVALID_REQ_ID,
    ERR_NO_LINK,
    ERR_STREAM_EXPIRED,
    EVENT_ENTER_CHAT,
    AibotError,
    Frame,
    FrameError,
    MediaError,
    MediaRef,
    dump_frame,
    error_for,
    fetch_media,
    image_data_url,
    is_takeover,
    new_req_id,
    parse_frame,
    read_callback,
)
from hil_protocol.callback import CallbackError, IncomingMessage
from hil_protocol.images import ImageError, ImageFetcher, image_kind, load_images
from hil_protocol.messages import split_text, truncate_bytes
from hil_protocol.outbound import CardUpdate, Notice, Question, SendReceipt
from hil_protocol.wecom_robot import ERR_BAD_RESPONSE, ERR_INVALID_MESSAGE

from ..choices import APPROVAL_OPTIONS, as_text
from ..models import Session
from ..store import StoreUnavailable
from . import ChannelError, ChannelHealth, Inbox
from .pace import PaceExceeded, Pacer

logger = logging.getLogger(__name__)

DEFAULT_URL = "wss://openws.work.weixin.qq.com"
# The websockets library's own cap on one message; parse_frame refuses more than 1 MiB as a frame, so a frame between
# the two is dropped with a log line and the link stays up.
WS_MAX_SIZE = 8 * 1024 * 1024
CLOSE_TIMEOUT = 1.0
# WeCom takes a welcome or a card update within 5 s of the callback it answers.
REPLY_WINDOW = 5.0
# button_interaction takes at most 6 buttons; more options (and pick-several questions) get a vote_interaction card,
# whose checkbox takes at most 20.
CARD_MAX_BUTTONS = 6
VOTE_MAX_OPTIONS = 20
VOTE_QUESTION_KEY = "choice"
VOTE_SUBMIT_KEY = "submit"
# Media go up over the link in chunks of at most 512 KB (before base64), at most 100 chunks (the official SDKs).
UPLOAD_CHUNK_BYTES = 512 * 1024
UPLOAD_MAX_CHUNKS = 100
# A question this short fits the card itself (its sub_title_text; WeCom suggests at most 112 characters).
CARD_TEXT_CHARS = 112
CALLBACK_WORKERS = 8
CALLBACK_QUEUE = 1000
REMEMBERED_CALLBACKS = 5000
MEDIA_PER_MESSAGE = 9
# A message the store could not take is retried this long (the store recovers by itself), then given up loudly.
REDELIVER_FOR = 600.0
MESSAGE_KINDS = frozenset({"text", "image", "mixed", "voice", "file"})

# ours: a question WeCom's pace would deliver only after its own deadline
ERR_PACE = -7
NO_CHAT = (
    "智能机器人需要知道发到哪个会话：请在请求中给出 chat_id（群聊的 chatid，或单聊对方的 userid；"
    "在企业微信里 @机器人 发任意消息可以看到），或设置 HIL_DEFAULT_CHAT_ID"
)

# What ends a link and is retried: the network, WeCom closing the socket, a handshake a proxy refused.
NETWORK_ERRORS = (OSError, TimeoutError, ConnectionClosed, InvalidHandshake)


@dataclass(frozen=True)
class AibotOptions:
    """The AI bot and how to hold its connection (ServerSettings.aibot_options() builds it)."""

    bot_id: str
    secret: str = dataclasses.field(repr=False)
    url: str = DEFAULT_URL
    ping_interval: float = 30.0
    missed_pings: int = 2  # unanswered pings in a row after which the link counts as dead
    reconnect_min_delay: float = 1.0
    reconnect_max_delay: float = 30.0
    auth_retry: float = 60.0  # seconds between attempts while WeCom refuses the bot id / secret
    takeover_backoff: float = 300.0  # seconds to stay off after another connection took the bot
    down_grace: float = 30.0  # seconds the link may be down before /health says degraded
    send_timeout: float = 10.0  # a frame's wait for the link and for WeCom's answer
    open_timeout: float = 10.0  # connect + subscribe
    markdown_limit: int = 4096
    image_max_bytes: int = 5 * 1024 * 1024
    media_timeout: float = 15.0
    # WeCom's pace for one bot (WECOM_AIBOT_MAX_PER_MINUTE / _PER_HOUR; 0 = no limit); the windows are knobs so
    # tests can pace in milliseconds.
    max_per_minute: int = 30
    max_per_hour: int = 1000
    minute_window: float = 60.0
    hour_window: float = 3600.0
    upload_timeout: float = 60.0  # one image's upload (init, chunks, finish)


class _LinkLost(Exception):
    """The link ended for a reason worth a reconnect."""


class _AuthFailed(Exception):
    def __init__(self, errcode: int, errmsg: str) -> None:
        super().__init__(f"errcode {errcode}: {errmsg}")
        self.errcode = errcode


class _TakenOver(Exception):
    pass


class AibotLink:
    """The one long connection of one AI bot."""

    def __init__(self, options: AibotOptions, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self._clock = clock
        self._ws: ClientConnection | None = None
        self._up = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._pending: dict[str, asyncio.Future[Frame]] = {}
        self._unanswered_pings = 0
        self._down_since = clock()
        self._problem: str | None = None  # degraded at once: the credentials were refused, the bot was taken
        self._last_error = "not connected yet"
        self._auth_logged = False
        self.connects = 0
        self.bad_frames = 0

    @property
    def connected(self) -> bool:
        return self._ws is not None

    def health(self) -> tuple[bool, str | None]:
        if self._ws is not None:
            return True, None
        if self._problem is not None:
            return False, self._problem
        down = self._clock() - self._down_since
        if down > self.options.down_grace:
            return False, f"the AI bot's long connection has been down for {down:.0f}s ({self._last_error})"
        return True, None

    async def run(self, on_callback: Callable[[Frame], None]) -> None:
        """Hold the link until cancelled. `on_callback` gets every callback frame; it must not block."""
        o = self.options
        delay = o.reconnect_min_delay
        while True:
            connects = self.connects
            try:
                await self._connect_once(on_callback)
            except _AuthFailed as exc:
                self._problem = (
                    f"WeCom refused the AI bot's credentials ({exc}): check WECOM_AIBOT_ID and WECOM_AIBOT_SECRET"
                )
                if not self._auth_logged:
                    logger.error(
                        "AI bot authentication failed bot_id=%s (%s): check WECOM_AIBOT_ID and WECOM_AIBOT_SECRET "
                        "(admin console: 智能机器人 → API 模式 → 长连接); retrying every %.0fs",
                        o.bot_id,
                        exc,
                        o.auth_retry,
                    )
                    self._auth_logged = True
                wait = o.auth_retry
            except _TakenOver:
                self._problem = (
                    f"another connection took the AI bot over; this server stays off for {o.takeover_backoff:.0f}s"
                )
                logger.error(
                    "AI BOT TAKEN OVER bot_id=%s: another connection subscribed this bot (a second HIL Server, or "
                    "the same bot in another tool?). Not fighting for it: reconnecting in %.0fs",
                    o.bot_id,
                    o.takeover_backoff,
                )
                wait = o.takeover_backoff
            except (*NETWORK_ERRORS, _LinkLost) as exc:
                self._last_error = _describe(exc)
                self._problem = None  # what holds now is a link that is down; /health says so after down_grace
                if self.connects > connects:  # a link that came up starts the backoff over
                    delay = o.reconnect_min_delay
                wait = delay
                delay = min(delay * 2, o.reconnect_max_delay)
                logger.warning("aibot link to %s is down (%s); reconnecting in %.1fs", o.url, self._last_error, wait)
            await asyncio.sleep(wait)

    async def _connect_once(self, on_callback: Callable[[Frame], None]) -> None:
        o = self.options
        async with connect(
            o.url,
            open_timeout=o.open_timeout,
            ping_interval=None,  # WeCom's own ping frame keeps the link, as its SDKs do
            close_timeout=CLOSE_TIMEOUT,
            max_size=WS_MAX_SIZE,
        ) as ws:
            await self._subscribe(ws)
            self._went_up(ws)
            try:
                await self._read(ws, on_callback)
            except asyncio.CancelledError:
                await ws.close(1001, "going away")  # shutting down: say so, rather than an internal error
                raise
            finally:
                self._went_down()

    async def _subscribe(self, ws: ClientConnection) -> None:
        o = self.options
        req_id = new_req_id(CMD_SUBSCRIBE)
        await ws.send(dump_frame(CMD_SUBSCRIBE, req_id, {"bot_id": o.bot_id, "secret": o.secret}))
        async with asyncio.timeout(o.open_timeout):
            while True:
                frame = self._parse(await ws.recv())
                if frame is None or not frame.is_answer or frame.req_id != req_id:
                    continue  # nothing else is expected before the answer; nothing else is for us yet
                if frame.errcode == 0:
                    return
                raise _AuthFailed(ERR_BAD_RESPONSE if frame.errcode is None else frame.errcode, frame.errmsg)

    def _went_up(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._problem = None
        self._auth_logged = False
        self._unanswered_pings = 0
        self.connects += 1
        self._up.set()
        logger.info("aibot link up bot_id=%s url=%s connects=%d", self.options.bot_id, self.options.url, self.connects)

    def _went_down(self) -> None:
        self._ws = None
        self._up.clear()
        self._down_since = self._clock()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the link closed before WeCom answered"))

    async def _read(self, ws: ClientConnection, on_callback: Callable[[Frame], None]) -> None:
        """Read until the link ends; ping on time in between (recv is cancellation-safe)."""
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + self.options.ping_interval
        while True:
            try:
                async with asyncio.timeout_at(next_ping):
                    raw = await ws.recv()
            except TimeoutError:
                next_ping = loop.time() + self.options.ping_interval
                await self._ping(ws)
                continue
            except ConnectionClosed as exc:
                raise _LinkLost(f"closed by the other end (code {exc.rcvd.code if exc.rcvd else 'none'})") from exc
            frame = self._parse(raw)
            if frame is None:
                continue
            if frame.is_answer:
                self._answered(frame)
            elif is_takeover(frame):
                raise _TakenOver
            elif frame.cmd in (CMD_MSG_CALLBACK, CMD_EVENT_CALLBACK):
                on_callback(frame)
            else:
                logger.info("aibot frame with unknown cmd %r ignored req_id=%s", frame.cmd, frame.req_id)

    async def _ping(self, ws: ClientConnection) -> None:
        if self._unanswered_pings >= self.options.missed_pings:
            raise _LinkLost(f"no answer to {self._unanswered_pings} pings in a row")
        self._unanswered_pings += 1
        async with self._send_lock:
            await ws.send(dump_frame(CMD_PING, new_req_id(CMD_PING)))

    def _answered(self, frame: Frame) -> None:
        future = self._pending.get(frame.req_id)
        if future is not None:
            if not future.done():
                future.set_result(frame)
        elif frame.req_id.startswith(CMD_PING + "_"):
            if frame.errcode == 0:
                self._unanswered_pings = 0
            else:
                logger.warning("aibot ping answered with errcode %s: %s", frame.errcode, frame.errmsg)
        else:
            logger.debug("aibot answer for no pending frame req_id=%s", frame.req_id)

    def _parse(self, raw: str | bytes) -> Frame | None:
        try:
            return parse_frame(raw)
        except FrameError as exc:
            self.bad_frames += 1
            logger.warning("aibot: unreadable frame ignored (%s)", exc)
            return None

    async def request(self, cmd: str, body: dict[str, Any], *, req_id: str | None = None) -> Frame:
        """Send a frame and wait for WeCom's answer (errcode 0), within `send_timeout` for the link to be up and the
        answer to come. Raises AibotError: WeCom's errcode, or ERR_NO_LINK when the frame or answer did not pass."""
        req_id = req_id or new_req_id(cmd)
        try:
            text = dump_frame(cmd, req_id, body)
            text.encode("utf-8")
        except (UnicodeEncodeError, ValueError) as exc:
            raise AibotError(ERR_INVALID_MESSAGE, "消息含有无法编码为 UTF-8 的字符，没有发出") from exc
        timeout = self.options.send_timeout
        try:
            async with asyncio.timeout(timeout):
                await self._up.wait()
        except TimeoutError:
            raise AibotError(
                ERR_NO_LINK, f"智能机器人的长连接没有建立（{self._problem or self._last_error}），消息没有发出"
            ) from None
        # Answers to one req_id come back under that id: one frame per req_id at a time.
        while (earlier := self._pending.get(req_id)) is not None:
            await asyncio.wait([earlier])
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = future
        try:
            ws = self._ws
            if ws is None:
                raise AibotError(ERR_NO_LINK, "智能机器人的长连接刚刚断开，消息没有发出")
            async with self._send_lock:
                await ws.send(text)
            async with asyncio.timeout(timeout):
                answer = await future
        except ConnectionClosed as exc:
            raise AibotError(ERR_NO_LINK, "智能机器人的长连接在发送时断开，消息没有发出") from exc
        except ConnectionError as exc:
            raise AibotError(
                ERR_NO_LINK, "智能机器人的长连接在等待企业微信确认时断开：消息可能已发出，也可能没有"
            ) from exc
        except TimeoutError:
            raise AibotError(
                ERR_NO_LINK, f"企业微信在 {timeout:.3g} 秒内没有确认这条消息：消息可能已发出，也可能没有"
            ) from None
        finally:
            if self._pending.get(req_id) is future:
                del self._pending[req_id]
            if future.done() and not future.cancelled():
                future.exception()  # seen here, so a link that dropped mid-send leaves no "never retrieved" warning
        if answer.errcode != 0:
            raise error_for(ERR_BAD_RESPONSE if answer.errcode is None else answer.errcode, answer.errmsg)
        return answer


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _LinkLost):
        return str(exc)
    if isinstance(exc, ConnectionClosed):
        return f"closed (code {exc.rcvd.code if exc.rcvd else 'none'})"
    if isinstance(exc, TimeoutError):
        return "timed out connecting or subscribing"
    return f"{type(exc).__name__}: {exc}"[:200]


async def _no_session(card_id: str) -> Session | None:
    return None


class AibotChannel:
    """The AI bot as the HIL Server's channel. `sessions` looks a question up by its card id (the session id), so
    a card keeps its buttons while its question is still open (an approval that needs more people, a click that
    was not taken)."""

    name = "aibot"

    def __init__(
        self,
        options: AibotOptions,
        http: httpx.AsyncClient,
        *,
        sessions: Callable[[str], Awaitable[Session | None]] | None = None,
        on_attempt: Callable[[int], None] | None = None,
        link: AibotLink | None = None,
        images: ImageFetcher | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.link = link or AibotLink(options, clock=clock)
        self._http = http
        self._sessions = sessions or _no_session
        self._on_attempt = on_attempt or (lambda errcode: None)  # metrics: every frame's errcode, 0 when taken
        self._clock = clock
        self._queue: asyncio.Queue[Frame] = asyncio.Queue(maxsize=CALLBACK_QUEUE)
        self._callbacks: OrderedDict[str, tuple[str, float]] = OrderedDict()  # req_id -> kind, when
        self._images = images or ImageFetcher()
        o = options
        self.pacer = Pacer([(o.max_per_minute, o.minute_window), (o.max_per_hour, o.hour_window)], clock=clock)
        # One question at a time per chat: its parts, card and images stay together and in the order asked.
        self._chat_locks: dict[str, asyncio.Lock] = {}
        self.dropped = 0
        self.failed = 0

    @property
    def queued(self) -> int:
        """Frames waiting for WeCom's pace now (/status, /metrics)."""
        return self.pacer.depth

    # --- the Channel protocol ----------------------------------------------------------------------------------

    async def run(self, inbox: Inbox) -> None:
        async with asyncio.TaskGroup() as tasks:
            for n in range(CALLBACK_WORKERS):
                tasks.create_task(self._work(inbox), name=f"aibot-callbacks-{n}")
            await self.link.run(self._enqueue)

    def health(self) -> ChannelHealth:
        ok, reason = self.link.health()
        return ChannelHealth(ok=ok, reason=reason, fields={"aibot_connected": self.link.connected})

    async def send_question(self, question: Question) -> SendReceipt:
        chat_id = question.chat_id
        if not chat_id:
            raise ChannelError(NO_CHAT)
        # Every image is loaded before anything is sent: a bad image fails the question before the chat sees it.
        try:
            images = await load_images(question.images, self._images) if question.images else []
        except ImageError as exc:
            raise ChannelError(f"图片无法发送：{exc}。问题没有发出") from exc
        vote = question.card_id is not None and _takes_vote(question)
        buttons = question.card_id is not None and not vote and 1 <= len(question.options) <= CARD_MAX_BUTTONS
        # A vote card has no room for the question itself (no sub_title_text): its text always goes above.
        card_only = buttons and len(question.message) <= CARD_TEXT_CHARS and not images
        parts: list[str] = []
        if not card_only:
            body = as_text(question) if question.options and not (buttons or vote) else _with_people(question)
            if images:
                body = f"{body.rstrip()}\n\n（附图 {len(images)} 张，见下方）"
            parts = split_text(body, question.header, self.options.markdown_limit)
        deadline = self._deadline(question)
        # Uploaded before anything is sent (a media_id lasts 3 days): a failed upload leaves nothing in the chat.
        name = question.short_id or "image"
        media_ids = [await self._upload_image(data, f"{name}-{i}") for i, data in enumerate(images, start=1)]
        lock = self._chat_locks.setdefault(chat_id, asyncio.Lock())
        async with lock:
            for part in parts:
                markdown = {"chatid": chat_id, "msgtype": "markdown", "markdown": {"content": part}}
                await self._send(CMD_SEND, markdown, deadline=deadline)
            for media_id in media_ids:
                image = {"chatid": chat_id, "msgtype": "image", "image": {"media_id": media_id}}
                await self._send(CMD_SEND, image, deadline=deadline)
            if buttons or vote:
                card = (vote_card if vote else question_card)(
                    question.card_id or "",
                    question.header,
                    question.message,
                    question.options,
                    approvals=question.approvals_required,
                    allow_text=question.allow_text,
                    responders=question.responders,
                    text_above=bool(parts),
                    **({"multi": question.multi_select} if vote else {}),
                )
                body = {"chatid": chat_id, "msgtype": "template_card", "template_card": card}
                await self._send(CMD_SEND, body, deadline=deadline)
        if len(self._chat_locks) > 1000:
            self._prune_locks()
        return SendReceipt(parts=len(parts) + int(buttons or vote), images=len(images))

    def _prune_locks(self) -> None:
        for chat, lock in list(self._chat_locks.items()):
            if not lock.locked():
                del self._chat_locks[chat]

    def _deadline(self, question: Question) -> float | None:
        """The question's deadline on the pacer's clock: a question that cannot go out before it fails."""
        if question.expires_at is None:
            return None
        return self._clock() + (question.expires_at - time.time())

    async def _upload_image(self, data: bytes, name: str) -> str:
        """Upload an image over the link (init, chunks, finish) -> its media_id (valid 3 days, this bot only)."""
        chunks = [data[i : i + UPLOAD_CHUNK_BYTES] for i in range(0, len(data), UPLOAD_CHUNK_BYTES)]
        if len(chunks) > UPLOAD_MAX_CHUNKS:
            raise ChannelError(f"图片太大：超过 {UPLOAD_MAX_CHUNKS} 个 512 KB 分片，企业微信不接受")
        filename = f"{name}.{image_kind(data) or 'png'}"
        try:
            async with asyncio.timeout(self.options.upload_timeout):
                init = await self.link.request(
                    CMD_UPLOAD_INIT,
                    {
                        "type": "image",
                        "filename": filename,
                        "total_size": len(data),
                        "total_chunks": len(chunks),
                        "md5": hashlib.md5(data).hexdigest(),
                    },
                )
                upload_id = _answer_field(init, "upload_id")
                for index, chunk in enumerate(chunks):
                    body = {
                        "upload_id": upload_id,
                        "chunk_index": index,
                        "base64_data": base64.b64encode(chunk).decode(),
                    }
                    await self.link.request(CMD_UPLOAD_CHUNK, body)
                finish = await self.link.request(CMD_UPLOAD_FINISH, {"upload_id": upload_id})
                return _answer_field(finish, "media_id")
        except AibotError as exc:
            self._on_attempt(exc.errcode)
            raise ChannelError(f"图片上传失败：{exc}", exc.errcode) from exc
        except TimeoutError:
            raise ChannelError(
                f"图片上传超时（{self.options.upload_timeout:.3g} 秒内没有完成），问题的图片没有发出", ERR_NO_LINK
            ) from None

    async def send_notice(self, notice: Notice) -> None:
        text = truncate_bytes(notice.text, self.options.markdown_limit)
        kind, at = self._callbacks.get(notice.reply_to or "", ("", 0.0))
        try:
            if kind == EVENT_ENTER_CHAT and self._clock() - at < REPLY_WINDOW:
                welcome = {"msgtype": "text", "text": {"content": plain_text(text)}}
                await self._send(CMD_WELCOME, welcome, req_id=notice.reply_to)
                return
            if kind in MESSAGE_KINDS:
                stream = {"id": uuid.uuid4().hex, "finish": True, "content": text}
                await self._send(CMD_RESPOND, {"msgtype": "stream", "stream": stream}, req_id=notice.reply_to)
                return
        except ChannelError as exc:
            if exc.errcode not in (ERR_INVALID_REQ_ID, ERR_STREAM_EXPIRED):
                raise
            # Too late to answer the callback itself: say it in the chat instead.
            logger.info("aibot reply to req_id=%s refused (%s); sending it to the chat", notice.reply_to, exc.errcode)
        if not notice.chat_id:
            raise ChannelError(NO_CHAT)
        await self._send(CMD_SEND, {"chatid": notice.chat_id, "msgtype": "markdown", "markdown": {"content": text}})

    async def update_card(self, update: CardUpdate) -> None:
        session = await self._sessions(update.card_id)
        if session is not None and session.status in ("sending", "waiting") and session.options:
            shown = Question(
                message=session.message,
                options=tuple(session.options),
                approvals_required=session.approvals_required,
                multi_select=session.multi_select,
            )
            render = vote_card if _takes_vote(shown) else question_card
            card = render(
                update.card_id,
                update.title,
                session.message,
                tuple(session.options),
                approvals=session.approvals_required,
                allow_text=session.allow_text,
                responders=tuple(session.responders),
                status=update.text,
                **({"multi": session.multi_select} if render is vote_card else {}),
            )
        else:
            card = closed_card(update.card_id, update.title, update.text, session.message if session else "")
        body = {"response_type": "update_template_card", "template_card": card}
        # Past WeCom's window the update would be refused anyway: better said here than queued in vain.
        await self._send(CMD_UPDATE, body, req_id=update.reply_to, urgent=True, deadline=self._clock() + REPLY_WINDOW)

    # --- sending -----------------------------------------------------------------------------------------------

    async def _send(
        self,
        cmd: str,
        body: dict[str, Any],
        *,
        req_id: str | None = None,
        urgent: bool = False,
        deadline: float | None = None,
    ) -> None:
        """One message frame, in its turn within WeCom's pace (answers to a callback are urgent: 5 s windows).
        WeCom's refusal is a ChannelError carrying its errcode."""
        try:
            await self.pacer.slot(urgent=urgent or req_id is not None, deadline=deadline)
        except PaceExceeded as exc:
            raise ChannelError(
                f"企业微信限制智能机器人每分钟 {self.options.max_per_minute} 条、"
                f"每小时 {self.options.max_per_hour} 条消息，排队的消息太多："
                f"这个问题要再等约 {exc.wait:.0f} 秒才能发出，已超过它的等待时限，没有发出。"
                "请稍后再问，或给问题更长的 timeout",
                ERR_PACE,
            ) from exc
        try:
            await self.link.request(cmd, body, req_id=req_id)
        except AibotError as exc:
            self._on_attempt(exc.errcode)
            raise ChannelError(str(exc), exc.errcode) from exc
        self._on_attempt(0)

    # --- receiving ---------------------------------------------------------------------------------------------

    def _enqueue(self, frame: Frame) -> None:
        try:
            self._queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.dropped += 1
            logger.error(
                "aibot callback dropped req_id=%s: %d callbacks are already waiting for the store",
                frame.req_id,
                CALLBACK_QUEUE,
            )

    async def _work(self, inbox: Inbox) -> None:
        while True:
            frame = await self._queue.get()
            try:
                await self._handle(frame, inbox)
            except Exception:  # one bad callback must not stop the others: logged once, counted
                self.failed += 1
                logger.exception("aibot callback req_id=%s could not be handled", frame.req_id)

    async def _handle(self, frame: Frame, inbox: Inbox) -> None:
        try:
            inbound = read_callback(frame, self.options.bot_id)
        except CallbackError as exc:
            logger.warning("aibot callback ignored req_id=%s: %s", frame.req_id, exc)
            return
        if inbound is None:
            return
        self._remember(frame.req_id, inbound.kind)
        message = inbound.message
        if inbound.images:
            message = await self._with_images(message, inbound.images)
        await self._deliver(message, inbox)

    def _remember(self, req_id: str, kind: str) -> None:
        self._callbacks[req_id] = (kind, self._clock())
        while len(self._callbacks) > REMEMBERED_CALLBACKS:
            self._callbacks.popitem(last=False)

    async def _with_images(self, message: IncomingMessage, refs: list[MediaRef]) -> IncomingMessage:
        """The images as data URLs; what could not be fetched is said in the answer, never dropped silently."""
        urls: list[str] = []
        problems: list[str] = []
        o = self.options
        try:
            async with asyncio.timeout(o.media_timeout):
                for ref in refs[:MEDIA_PER_MESSAGE]:
                    try:
                        data = await fetch_media(self._http, ref, max_bytes=o.image_max_bytes, timeout=o.media_timeout)
                        urls.append(image_data_url(data))
                    except MediaError as exc:
                        problems.append(str(exc))
        except TimeoutError:
            problems.append(f"下载图片超时（{o.media_timeout:.3g} 秒内没有全部下载完）")
        missing = len(refs) - len(urls)
        if len(refs) > MEDIA_PER_MESSAGE:
            problems.append(f"一条消息最多转交 {MEDIA_PER_MESSAGE} 张图片")
        answer = message.answer
        if missing:
            note = f"（{missing} 张图片没有转交给 AI：{'；'.join(dict.fromkeys(problems))}）"
            answer = f"{answer}\n{note}" if answer else note
            logger.warning(
                "aibot msgid=%s: %d of %d images not fetched: %s", message.msgid, missing, len(refs), problems
            )
        return message.model_copy(update={"image_urls": urls, "answer": answer})

    async def _deliver(self, message: IncomingMessage, inbox: Inbox) -> None:
        """Hand the message to the service, waiting out a store that is down (WeCom will not send it again)."""
        delay = 0.5
        warned = False
        started = self._clock()
        while True:
            try:
                await inbox(message)
                return
            except StoreUnavailable as exc:
                if self._clock() - started > REDELIVER_FOR:
                    logger.error("aibot message msgid=%s lost: the store stayed unavailable (%s)", message.msgid, exc)
                    return
                if not warned:
                    logger.warning("aibot message msgid=%s waits for the store: %s", message.msgid, exc)
                    warned = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _answer_field(answer: Frame, name: str) -> str:
    """A field of WeCom's answer body (upload_id, media_id); an answer without it is an unreadable answer."""
    body = answer.body if isinstance(answer.body, dict) else {}
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise AibotError(ERR_BAD_RESPONSE, f"企业微信的上传应答里没有 {name}")
    return value


def _takes_vote(question: Question) -> bool:
    """A vote_interaction card: pick-several questions, and single picks with more options than buttons fit."""
    count = len(question.options)
    if not 1 <= count <= VOTE_MAX_OPTIONS or question.approvals_required:
        return False
    return question.multi_select or count > CARD_MAX_BUTTONS


# --- rendering --------------------------------------------------------------------------------------------------------


def _people_lines(question: Question) -> list[str]:
    lines = []
    if question.responders:
        lines.append("（只有 " + "、".join(f"@{r}" for r in question.responders) + " 可以回答）")
    others = [m for m in question.mention_list if m not in question.responders]
    if others:
        lines.append(" ".join(f"@{m}" for m in others))
    return lines


def _with_people(question: Question) -> str:
    lines = _people_lines(question)
    return "\n\n".join([question.message.rstrip(), "\n".join(lines)]) if lines else question.message


def question_card(
    task_id: str,
    header: str,
    message: str,
    options: tuple[str, ...],
    *,
    approvals: int = 0,
    allow_text: bool = True,
    responders: tuple[str, ...] = (),
    status: str | None = None,
    text_above: bool = False,
) -> dict[str, Any]:
    """A `button_interaction` card: title = the question's header (so a quote of the card names the question),
    one button per option, key = the option's index."""
    if approvals:
        how = f"需要 {approvals} 人批准，一人拒绝即否决" if approvals > 1 else "请批准或拒绝"
    else:
        how = "请选择一项" + ("，或引用本卡片回复文字" if allow_text else "")
    flat = " ".join(message.split())
    if text_above or len(flat) > CARD_TEXT_CHARS:
        flat = flat[: CARD_TEXT_CHARS - 12] + "…（完整问题见上方消息）"
    card: dict[str, Any] = {
        "card_type": "button_interaction",
        "main_title": {"title": header, "desc": status or how},
        "sub_title_text": flat,
        "task_id": task_id,
        "button_list": [
            {"text": label, "style": 2 if approvals and label == APPROVAL_OPTIONS[1] else 1, "key": str(index)}
            for index, label in enumerate(options)
        ],
    }
    if responders:
        card["horizontal_content_list"] = [{"keyname": "可回答", "value": "、".join(responders)}]
    return card


def vote_card(
    task_id: str,
    header: str,
    message: str,
    options: tuple[str, ...],
    *,
    multi: bool = False,
    approvals: int = 0,
    allow_text: bool = True,
    responders: tuple[str, ...] = (),
    status: str | None = None,
    text_above: bool = True,
) -> dict[str, Any]:
    """A `vote_interaction` card: a checkbox of the options (id = the option's index; mode 1 picks several, 0 one)
    and a submit button. The question's text is the markdown above it; the title is its header, as on every card."""
    if multi:
        how = "可多选，勾选后点「提交」"
    else:
        how = "请选择一项后点「提交」"
    if allow_text:
        how += "；也可以引用回复文字"
    card: dict[str, Any] = {
        "card_type": "vote_interaction",
        "main_title": {"title": header, "desc": status or how},
        "task_id": task_id,
        "checkbox": {
            "question_key": VOTE_QUESTION_KEY,
            "mode": 1 if multi else 0,
            "option_list": [{"id": str(index), "text": label} for index, label in enumerate(options)],
        },
        "submit_button": {"text": "提交", "key": VOTE_SUBMIT_KEY},
    }
    if responders:
        card["horizontal_content_list"] = [{"keyname": "可回答", "value": "、".join(responders)}]
    return card


def closed_card(task_id: str, title: str, result: str, message: str) -> dict[str, Any]:
    """A decided (or closed) question's card: what happened and who did it; no buttons."""
    flat = " ".join(message.split())
    card: dict[str, Any] = {
        "card_type": "text_notice",
        "main_title": {"title": title, "desc": result},
        "task_id": task_id,
    }
    if flat:
        card["sub_title_text"] = flat if len(flat) <= CARD_TEXT_CHARS else flat[: CARD_TEXT_CHARS - 1] + "…"
    return card


def plain_text(markdown: str) -> str:
    """A hint's markdown as plain text, for a welcome (which WeCom takes as text only)."""
    lines = []
    for line in markdown.splitlines():
        line = line.removeprefix("> ").replace("**", "").replace("`", "")
        lines.append(line)
    text = "\n".join(lines)
    while "<font" in text:
        start = text.index("<font")
        end = text.find(">", start)
        if end < 0:
            break
        text = text[:start] + text[end + 1 :]
    return text.replace("</font>", "")


__all__ = ["DEFAULT_URL", "AibotChannel", "AibotLink", "AibotOptions"]
