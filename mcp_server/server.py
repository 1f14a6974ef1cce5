"""The MCP tools: `send_and_wait_reply`, `send_message_only`, `wait_for_reply` (mcp 2.x `MCPServer`)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from mcp.server.mcpserver import Context, MCPServer

from . import __version__
from .client import IMAGE_MAX_BYTES, HilApiError, HilClient
from .config import McpSettings

logger = logging.getLogger("mcp_server")

INSTRUCTIONS = """\
Ask a person in WeCom (企业微信) and wait for the answer. Use send_and_wait_reply when you need a human decision
or information; the person answers in the chat. If a wait ends without an answer (timeout or a cut call), the question
stays open: call wait_for_reply to keep waiting, or continue without the answer."""


@dataclass
class Question:
    session_id: str
    short_id: str | None
    key: tuple[str, str | None, str | None]


@dataclass
class HilState:
    settings: McpSettings
    client: HilClient
    # Questions asked through this MCP server whose answer has not reached the agent yet, newest last.
    open_questions: list[Question] = field(default_factory=list)

    def remember(self, question: Question) -> None:
        self.forget(question.session_id)
        self.open_questions.append(question)
        del self.open_questions[:-100]

    def forget(self, session_id: str) -> None:
        self.open_questions = [q for q in self.open_questions if q.session_id != session_id]

    def find_open(self, key: tuple[str, str | None, str | None]) -> Question | None:
        return next((q for q in reversed(self.open_questions) if q.key == key), None)

    def resolve(self, ref: str | None) -> Question | None:
        if not ref:
            return self.open_questions[-1] if self.open_questions else None
        return next((q for q in self.open_questions if ref in (q.session_id, q.short_id)), None)


def _state(ctx: Context) -> HilState:
    return ctx.request_context.lifespan_context


def _load_images(paths: list[str]) -> tuple[list[Path], str | None]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file():
            return [], f"image file not found: {raw} (nothing was sent; fix the path or leave the image out)"
        if path.stat().st_size > IMAGE_MAX_BYTES:
            return [], f"image {raw} is larger than WeCom's 2 MB limit (nothing was sent)"
        files.append(path)
    return files, None


def _reply_text(replies: list[dict[str, Any]]) -> str:
    texts = [r.get("content") or "" for r in replies]
    images = sum(len(r.get("images") or ([r["image_url"]] if r.get("image_url") else [])) for r in replies)
    text = "\n".join(t for t in texts if t)
    if images:
        text += f"{chr(10) if text else ''}[{images} image(s) attached, see replies[].image_url]"
    return text


async def _wait(state: HilState, ctx: Context, question: Question, timeout: float) -> dict[str, Any]:
    """Wait on long-polls until a reply, a final state, or `timeout`; progress notifications in between."""
    settings = state.settings
    client = state.client
    start = time.monotonic()
    deadline = start + timeout
    base = {"session_id": question.session_id, "short_id": question.short_id}
    progress = 0.0
    try:
        # Tell the client at once that the question is out and the call is alive; some clients cut silent calls.
        await ctx.report_progress(progress, round(timeout, 1), f"问题已发送，等待回复中 (#{question.short_id})")
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            wait = min(settings.heartbeat_interval, remaining, 60.0)
            asked = time.monotonic()
            try:
                result = await client.poll(question.session_id, wait=wait)
            except HilApiError as exc:
                if not exc.retryable:
                    return {"status": "error", "replies": [], "message": str(exc), **base}
                # The server may be restarting; its sessions are durable, so keep trying until our deadline.
                logger.warning("poll failed (%s); retrying", exc)
                await anyio.sleep(min(settings.poll_interval, max(0.0, deadline - time.monotonic())))
                result = None
            if result is not None:
                status = result.get("status")
                replies = result.get("replies") or []
                if replies or status == "replied":
                    state.forget(question.session_id)
                    return {
                        "status": "success",
                        "replies": replies,
                        "message": f"The person replied: {_reply_text(replies)}",
                        **base,
                    }
                if status == "not_found":
                    state.forget(question.session_id)
                    return {
                        "status": "error",
                        "replies": [],
                        "message": "The question is no longer on the HIL Server (expired or unknown session id).",
                        **base,
                    }
                if status == "failed":
                    state.forget(question.session_id)
                    return {"status": "error", "replies": [], "message": result.get("message", "send failed"), **base}
                if time.monotonic() - asked < min(wait, settings.poll_interval) * 0.5:
                    # The server answered at once: it does not hold polls (a seed server). Poll at the interval.
                    await anyio.sleep(min(settings.poll_interval, max(0.0, deadline - time.monotonic())))
            elapsed = time.monotonic() - start
            # MCP requires progress to increase with every notification; rounding alone can repeat a value.
            progress = round(max(elapsed, progress + 0.001), 3)
            await ctx.report_progress(
                progress, round(timeout, 1), f"等待回复中，已等待 {int(elapsed)} 秒 (#{question.short_id})"
            )
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True), contextlib.suppress(HilApiError):
            await client.mark_timeout(question.session_id)
        logger.info("wait cancelled session_id=%s", question.session_id)
        raise
    with contextlib.suppress(HilApiError):
        await client.mark_timeout(question.session_id)
    return {
        "status": "timeout",
        "replies": [],
        "message": (
            f"No reply within {int(timeout)} s. The question (#{question.short_id}, session_id "
            f"{question.session_id}) stays open on the HIL Server and a later answer is kept: call "
            f'wait_for_reply(session_id="{question.session_id}") to keep waiting, or continue without an answer.'
        ),
        **base,
    }


async def _post(
    state: HilState,
    message: str,
    chat_id: str | None,
    image_paths: list[str] | None,
    project_name: str | None,
    wait_reply: bool,
) -> dict[str, Any]:
    """Upload images and POST /api/send. Returns the server's answer, or a result dict with status error."""
    files, problem = _load_images(image_paths or [])
    if problem:
        return {"status": "error", "message": problem}
    images = [await state.client.upload_image(path) for path in files]
    payload: dict[str, Any] = {"message": message, "wait_reply": wait_reply, "timeout": state.settings.timeout}
    if chat_id:
        payload["chat_id"] = chat_id
    if project_name:
        payload["project_name"] = project_name
    if images:
        payload["images"] = images
    return await state.client.send(payload)


def create_server(settings: McpSettings) -> MCPServer[HilState]:
    @contextlib.asynccontextmanager
    async def lifespan(server: MCPServer[HilState]) -> AsyncIterator[HilState]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0)) as http:
            token = settings.api_token.get_secret_value() if settings.api_token else None
            yield HilState(settings=settings, client=HilClient(http, settings.service_url, token))

    server: MCPServer[HilState] = MCPServer(
        name="wecom-hil", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan
    )

    @server.tool()
    async def send_and_wait_reply(
        message: str,
        ctx: Context,
        chat_id: str | None = None,
        image_paths: list[str] | None = None,
        project_name: str | None = None,
    ) -> dict[str, Any]:
        """Send a question to a person in WeCom (企业微信) and wait for their reply.

        The message appears in the chat tagged [#short_id project]; the person answers (quote-reply when several
        questions are open). Returns {"status": "success"|"timeout"|"error", "replies": [...], "message",
        "session_id"}. If it times out or the call is cut, use wait_for_reply to keep waiting.

        Args:
            message: the question, as the person should read it.
            chat_id: the WeCom chat to ask in (default: the configured chat).
            image_paths: local JPG/PNG files (≤ 2 MB each) to send with the question.
            project_name: shown in the header so the person knows which project asks.
        """
        state = _state(ctx)
        chat = chat_id or state.settings.chat_id
        project = project_name or state.settings.project_name
        key = (message, chat, project)
        question = state.find_open(key)
        if question is not None:
            logger.info("reusing open question session_id=%s", question.session_id)
        else:
            try:
                sent = await _post(state, message, chat, image_paths, project, wait_reply=True)
            except HilApiError as exc:
                return {"status": "error", "replies": [], "message": str(exc)}
            if sent.get("status") == "error":
                return {**sent, "replies": []}
            if not sent.get("success") or not sent.get("session_id"):
                reason = sent.get("error") or sent.get("message") or "unknown error"
                return {
                    "status": "error",
                    "replies": [],
                    "message": f"The question was not delivered: {reason}",
                    **({"session_id": sent["session_id"]} if sent.get("session_id") else {}),
                }
            question = Question(sent["session_id"], sent.get("short_id"), key)
            state.remember(question)
        return await _wait(state, ctx, question, state.settings.timeout)

    @server.tool()
    async def send_message_only(
        message: str,
        ctx: Context,
        chat_id: str | None = None,
        image_paths: list[str] | None = None,
        project_name: str | None = None,
    ) -> dict[str, Any]:
        """Send a message to WeCom (企业微信) without waiting for a reply (e.g. to report that a task is done).

        Args:
            message: the text to send.
            chat_id: the WeCom chat (default: the configured chat).
            image_paths: local JPG/PNG files (≤ 2 MB each) to send with it.
            project_name: shown in front of the message.
        """
        state = _state(ctx)
        try:
            sent = await _post(
                state,
                message,
                chat_id or state.settings.chat_id,
                image_paths,
                project_name or state.settings.project_name,
                wait_reply=False,
            )
        except HilApiError as exc:
            return {"status": "error", "message": str(exc)}
        if sent.get("status") == "error":
            return sent
        if not sent.get("success"):
            return {"status": "error", "message": f"Not delivered: {sent.get('error') or sent.get('message')}"}
        return {"status": "success", "message": "Message delivered to WeCom."}

    @server.tool()
    async def wait_for_reply(
        ctx: Context, session_id: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Keep waiting for the answer to a question asked earlier (after a timeout or a cut call).

        Args:
            session_id: the session_id from an earlier result, or the 8-character id shown in the chat
                (#1a2b3c4d); leave it out for the newest open question asked through this server.
            timeout: seconds to wait at most (default: the configured timeout).
        """
        state = _state(ctx)
        question = state.resolve(session_id)
        if question is None:
            if not session_id:
                return {"status": "error", "replies": [], "message": "No open question to wait for."}
            ref = session_id.strip().lstrip("#")
            question = Question(ref, ref if len(ref) == 8 else None, ("", None, None))
        limit = state.settings.timeout if timeout is None else max(1.0, min(timeout, state.settings.timeout))
        return await _wait(state, ctx, question, limit)

    return server


__all__ = ["HilState", "create_server"]
