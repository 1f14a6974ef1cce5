"""The MCP tools, defined once for both transports: `send_and_wait_reply`, `request_approval`, `send_message_only`,
`wait_for_reply`.

`build_server(lifespan)` returns an mcp 2.x `MCPServer` with the tools. Its lifespan yields a `ToolHost`, which hands
each call a `Caller`: the backend to use (HTTP for hil-mcp on stdio, the service in-process for the HIL Server's
`/mcp`), the transport's settings, the caller's defaults and its memory of open questions. Nothing below knows which
transport it runs on.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from hil_protocol.images import IMAGE_MAX_BYTES

from . import __version__
from .backend import Approval, Backend, BackendError, Choice, Outgoing, Polled, QuestionRef, Reply, Sent, session_ref

logger = logging.getLogger("mcp_server")

INSTRUCTIONS = """\
Ask a person in WeCom (企业微信) and wait for the answer. Use request_approval before a risky or irreversible action
(deploy, merge, delete, spend): it returns approved true/false and who decided. Use send_and_wait_reply for any other
question; give `options` when the answer is a choice (the person taps or types one; you get `choice`). Use
send_message_only to report without waiting. If a call ends without an answer (status waiting or timeout, or a cut
call), the question stays open: call wait_for_reply with its session_id to keep waiting, or continue without it."""

REMOTE_IMAGES = (
    "image_paths names files on your machine, and this MCP server runs on the HIL Server, which cannot read them "
    "(nothing was sent). Send the question without images, or use hil-mcp on stdio for images."
)


# --- results -----------------------------------------------------------------------------------------------------


Status = Literal["success", "waiting", "timeout", "error"]


class OpenQuestion(BaseModel):
    """A question still open, listed when wait_for_reply cannot tell which one to wait for."""

    session_id: str
    short_id: str | None = None
    project_name: str | None = None
    preview: str = Field(default="", description="the question's first words")


class WaitResult(BaseModel):
    """The outcome of asking (or of waiting for an earlier question)."""

    status: Status = Field(
        description="success: the person answered (replies); waiting: this call ended before the client's own "
        "time limit, the question is still waiting (call wait_for_reply with session_id to keep waiting); "
        "timeout: no answer in the configured time, the question stays open; error: see message"
    )
    replies: list[Reply] = Field(default_factory=list, description="the person's messages, oldest first")
    message: str = Field(description="what happened, in words for the model")
    session_id: str | None = Field(default=None, description="the question's id, for wait_for_reply")
    short_id: str | None = Field(default=None, description="the 8-character id shown in the chat as [#short_id]")
    choice: Choice | None = Field(default=None, description="with options: the option the person chose, else null")
    choices: list[Choice] = Field(
        default_factory=list, description="with options and multi_select: every option the person chose"
    )
    open_questions: list[OpenQuestion] = Field(
        default_factory=list, description="when wait_for_reply needs an id: the open questions to choose from"
    )


class ApprovalResult(BaseModel):
    """The outcome of an approval request."""

    status: Status = Field(
        description="success: decided (see approved); waiting or timeout: not decided yet, the request stays open "
        "(call wait_for_reply with session_id to keep waiting); error: see message"
    )
    approved: bool | None = Field(default=None, description="true: approved; false: rejected; null: not decided")
    decided_by: list[str] = Field(default_factory=list, description="WeCom userids of who approved (or rejected)")
    comment: str = Field(default="", description="what the deciders wrote after their decision word")
    replies: list[Reply] = Field(default_factory=list, description="the people's messages as they wrote them")
    message: str = Field(description="what happened, in words for the model")
    session_id: str | None = None
    short_id: str | None = None


class SendResult(BaseModel):
    status: Literal["success", "error"]
    message: str


# --- what a transport provides -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolSettings:
    timeout: float  # longest wait for a reply; also the cap on wait_for_reply's timeout
    heartbeat: float  # longest single poll: progress goes out at least this often
    poll_interval: float  # pause before retrying a failed poll, and the pace against servers that do not hold polls
    send_timeout: float | None  # the session timeout sent with a question; None: the server's default
    local_files: bool  # image_paths can be read (stdio); the server's /mcp cannot read the agent's files
    # Longest single tool call for a client not known to allow long calls: the call returns "waiting" before the
    # client's own cut (the MCP TypeScript SDK's 60 s), the question stays open. See README, client time limits.
    max_call: float = 50.0
    long_call_clients: frozenset[str] = frozenset()  # clientInfo.name of clients that wait `timeout` in one call


@dataclass
class Question:
    session_id: str
    short_id: str | None
    key: tuple[Any, ...] | None = None  # what was asked (message, chat, project, options...) when asked through us
    project_name: str | None = None
    preview: str = ""

    def listed(self) -> OpenQuestion:
        return OpenQuestion(
            session_id=self.session_id, short_id=self.short_id, project_name=self.project_name, preview=self.preview
        )


@dataclass
class OpenQuestions:
    """Questions asked by this caller whose answer has not reached the agent yet (newest last), and those whose
    answer did (a late answer leaves the server's question "timeout": it is not handed out twice)."""

    open: list[Question] = field(default_factory=list)
    settled: deque[str] = field(default_factory=lambda: deque(maxlen=200))

    def remember(self, question: Question) -> None:
        self.open = [q for q in self.open if q.session_id != question.session_id]
        self.open.append(question)
        del self.open[:-100]

    def settle(self, session_id: str) -> None:
        self.open = [q for q in self.open if q.session_id != session_id]
        if session_id not in self.settled:
            self.settled.append(session_id)

    def find_open(self, key: tuple[Any, ...]) -> Question | None:
        return next((q for q in reversed(self.open) if q.key == key), None)

    def resolve(self, ref: str) -> Question | None:
        return next((q for q in self.open if ref in (q.session_id, q.short_id)), None)


def preview(message: str, chars: int = 30) -> str:
    """A question's first words, for a list the model picks from."""
    first = " ".join(message.split())
    return first if len(first) <= chars else first[: chars - 1].rstrip() + "…"


class Hangup(Protocol):
    """Tells a waiting call that its client went away (the HTTP stream was cut)."""

    def add(self, callback: Callable[[], object]) -> None: ...

    def discard(self, callback: Callable[[], object]) -> None: ...


@dataclass
class Caller:
    backend: Backend
    memory: OpenQuestions
    settings: ToolSettings
    chat_id: str | None = None
    project_name: str | None = None
    hangup: Hangup | None = None


class ToolHost(Protocol):
    """The lifespan context of a server built by `build_server`."""

    def caller(self, ctx: Context) -> Caller: ...


# --- the tool logic ------------------------------------------------------------------------------------------------


def _host(ctx: Context) -> ToolHost:
    return ctx.request_context.lifespan_context


def _reply_text(replies: list[Reply]) -> str:
    texts = [r.content for r in replies if r.content]
    images = sum(len(r.images or ([r.image_url] if r.image_url else [])) for r in replies)
    text = "\n".join(texts)
    if images:
        text += f"{chr(10) if text else ''}[{images} image(s) attached, see replies[].image_url]"
    return text


class _ImageProblem(Exception):
    pass


async def _load_images(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = await anyio.Path(raw).expanduser()
        try:
            info = await path.stat()  # anyio: no file system call on the event loop
        except OSError:
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):
            raise _ImageProblem(f"image file not found: {raw} (nothing was sent; fix the path or leave the image out)")
        if info.st_size > IMAGE_MAX_BYTES:
            raise _ImageProblem(f"image {raw} is larger than WeCom's 2 MB limit (nothing was sent)")
        files.append(Path(path))
    return files


async def _send(caller: Caller, outgoing: Outgoing, image_paths: list[str] | None) -> Sent:
    """Upload images and send. Raises BackendError or _ImageProblem."""
    files = await _load_images(image_paths or [])
    images = [await caller.backend.upload_image(path) for path in files]
    update = {"images": images, "timeout": caller.settings.send_timeout}
    return await caller.backend.send(outgoing.model_copy(update=update))


async def _ask(ctx: Context, outgoing: Outgoing, image_paths: list[str] | None) -> tuple[Caller, Question] | WaitResult:
    """Send a question (or reuse the same one still open) and remember it; or the error result."""
    caller, outgoing = _begin(ctx, outgoing, image_paths)
    key = (
        outgoing.message,
        outgoing.chat_id,
        outgoing.project_name,
        tuple(outgoing.options or ()),
        bool(outgoing.multi_select),
        tuple(outgoing.responders or ()),
        outgoing.approvals_required,
    )
    question = caller.memory.find_open(key)
    if question is not None:
        logger.info("reusing open question session_id=%s", question.session_id)
        return caller, question
    try:
        sent = await _send(caller, outgoing, image_paths)
    except (BackendError, _ImageProblem) as exc:
        return WaitResult(status="error", message=str(exc))
    if not sent.success or not sent.session_id:
        return WaitResult(
            status="error",
            message=f"The question was not delivered: {sent.error or sent.message or 'unknown error'}",
            session_id=sent.session_id,
            short_id=sent.short_id,
        )
    question = Question(sent.session_id, sent.short_id, key, outgoing.project_name, preview(outgoing.message))
    caller.memory.remember(question)
    return caller, question


def _begin(ctx: Context, outgoing: Outgoing, image_paths: list[str] | None) -> tuple[Caller, Outgoing]:
    """What a sending tool starts from: the caller, and what it sends with the caller's chat and project defaults."""
    caller = _host(ctx).caller(ctx)
    if image_paths and not caller.settings.local_files:
        # Refused before any path is looked at: on the server, a path is the server's file, never the agent's.
        raise ToolError(REMOTE_IMAGES)
    defaults = {
        "chat_id": outgoing.chat_id or caller.chat_id,
        "project_name": outgoing.project_name or caller.project_name,
    }
    return caller, outgoing.model_copy(update=defaults)


def call_limit(ctx: Context, settings: ToolSettings) -> float:
    """The longest this call may take: `max_call`, unless the client named itself in `initialize` as one known to
    wait longer (clientInfo.name). An unknown client must not be cut by its own time limit."""
    params = getattr(ctx.request_context.session, "client_params", None)
    name = params.client_info.name if params is not None else None
    return settings.timeout if name in settings.long_call_clients else settings.max_call


async def _wait(
    caller: Caller,
    ctx: Context,
    question: Question,
    timeout: float,
    on_poll: Callable[[Polled], object] | None = None,
) -> WaitResult:
    """Wait on long-polls until a reply, a final state, or `timeout`; progress notifications in between. A call
    longer than the client allows ends first with "waiting": the question keeps waiting for wait_for_reply.

    A cancelled call or a cut stream is a cancelled wait: the server is told the agent stopped waiting, the question
    stays open and a later answer is kept for wait_for_reply."""
    backend, settings = caller.backend, caller.settings
    limit = call_limit(ctx, settings)
    cut_short = limit < timeout
    timeout = min(timeout, limit)
    start = time.monotonic()
    deadline = start + timeout
    progress = 0.0

    def result(status: Status, message: str, polled: Polled | None = None) -> WaitResult:
        return WaitResult(
            status=status,
            replies=polled.replies if polled else [],
            message=message,
            session_id=question.session_id,
            short_id=question.short_id,
            choice=polled.choice if polled else None,
            choices=polled.choices if polled else [],
        )

    async def pause() -> None:
        await anyio.sleep(min(settings.poll_interval, max(0.0, deadline - time.monotonic())))

    with anyio.CancelScope() as cut:
        if caller.hangup is not None:
            caller.hangup.add(cut.cancel)
        try:
            # Tell the client at once that the question is out and the call is alive; some clients cut silent calls.
            await ctx.report_progress(progress, round(timeout, 1), f"问题已发送，等待回复中 (#{question.short_id})")
            while (remaining := deadline - time.monotonic()) > 0:
                wait = min(settings.heartbeat, remaining, 60.0)
                asked = time.monotonic()
                try:
                    polled = await backend.poll(question.session_id, wait=wait)
                except BackendError as exc:
                    if not exc.retryable:
                        return result("error", str(exc))
                    # The server may be restarting; its sessions are durable, so keep trying until our deadline.
                    logger.warning("poll failed (%s); retrying", exc)
                    await pause()
                else:
                    if on_poll is not None:
                        on_poll(polled)
                    if polled.status != "not_found":
                        question.session_id = polled.session_id
                        question.short_id = polled.short_id or question.short_id
                    # An approval is answered when it is decided (status replied), not at its first approval.
                    if polled.status == "replied" or (polled.replies and polled.approval is None):
                        caller.memory.settle(question.session_id)
                        return result("success", _answered(polled), polled)
                    if polled.status == "not_found":
                        caller.memory.settle(question.session_id)
                        return result(
                            "error", "The question is no longer on the HIL Server (expired or unknown session id)."
                        )
                    if polled.status == "failed":
                        caller.memory.settle(question.session_id)
                        return result("error", polled.message or "send failed")
                    if time.monotonic() - asked < min(wait, settings.poll_interval) * 0.5:
                        # The server answered at once: it does not hold polls (a seed server). Poll at the interval.
                        await pause()
                elapsed = time.monotonic() - start
                # MCP requires progress to increase with every notification; rounding alone can repeat a value.
                progress = round(max(elapsed, progress + 0.001), 3)
                await ctx.report_progress(
                    progress, round(timeout, 1), f"等待回复中，已等待 {int(elapsed)} 秒 (#{question.short_id})"
                )
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await _stop_waiting(backend, question)
            logger.info("wait cancelled session_id=%s", question.session_id)
            raise
        finally:
            if caller.hangup is not None:
                caller.hangup.discard(cut.cancel)
    if cut.cancelled_caught:
        # The client's stream was cut (the cancellation above already told the server): nobody reads this.
        return result("timeout", "The call was cut; the question stays open.")
    if cut_short:
        # Not a timeout: the question still waits for the person, this call only ends before the client cuts it.
        return result(
            "waiting",
            f"No reply yet after {int(timeout)} s (the longest single call for this client); the question "
            f"(#{question.short_id}) is still waiting for the person. Call "
            f'wait_for_reply(session_id="{question.session_id}") to keep waiting, or continue without an answer.',
        )
    await _stop_waiting(backend, question)
    return result(
        "timeout",
        f"No reply within {int(timeout)} s. The question (#{question.short_id}, session_id "
        f"{question.session_id}) stays open on the HIL Server and a later answer is kept: call "
        f'wait_for_reply(session_id="{question.session_id}") to keep waiting, or continue without an answer.',
    )


def _answered(polled: Polled) -> str:
    if polled.approval is not None and polled.approval.approved is not None:
        verdict = "approved" if polled.approval.approved else "rejected"
        comment = f" ({polled.approval.comment})" if polled.approval.comment else ""
        return f"The request was {verdict} by {', '.join(polled.approval.decided_by)}{comment}."
    said = _reply_text(polled.replies).strip()
    parts = [f"The person replied: {said}" if said else "The person answered."]
    if len(polled.choices) > 1:
        picked = ", ".join(f'"{c.label.strip()}" (option {c.index + 1})' for c in polled.choices)
        parts.append(f"They chose {picked}.")
    elif polled.choice is not None:
        label = polled.choice.label.strip()
        option = f"option {polled.choice.index + 1}"
        parts.append(f'They chose "{label}" ({option}).' if label else f"They chose {option}.")
    return " ".join(parts)


def _approval(result: WaitResult, approval: Approval | None) -> ApprovalResult:
    decision = approval or Approval()  # not polled: undecided, nobody, no comment
    return ApprovalResult(
        **result.model_dump(include={"status", "message", "session_id", "short_id"}),
        replies=result.replies,
        **decision.model_dump(include={"approved", "decided_by", "comment"}),
    )


async def _stop_waiting(backend: Backend, question: Question) -> None:
    with contextlib.suppress(BackendError):
        await backend.mark_timeout(question.session_id)


_F = TypeVar("_F", bound=Callable[..., Any])


def tool(server: MCPServer[Any]) -> Callable[[_F], _F]:
    """`server.tool()` with the docstring dedented, so tools/list shows the description without its indentation."""

    def register(fn: _F) -> _F:
        return server.tool(description=inspect.cleandoc(fn.__doc__ or ""))(fn)

    return register


def _question(ref: QuestionRef) -> Question:
    return Question(ref.session_id, ref.short_id, project_name=ref.project_name, preview=preview(ref.message or ""))


def _lane_result(questions: list[Question]) -> WaitResult:
    """wait_for_reply without an id when not exactly one question of this caller is open: ask for an id."""
    if not questions:
        return WaitResult(
            status="error",
            message="No open question asked here to wait for (a restart or a new session forgets them). If you "
            'have its id (session_id, or #short_id as shown in the chat), call wait_for_reply(session_id="…").',
        )
    listed = "; ".join(
        f"#{q.short_id or q.session_id}" + (f" [{q.project_name}]" if q.project_name else "") + f" {q.preview!r}"
        for q in questions
    )
    return WaitResult(
        status="error",
        message=f'{len(questions)} questions are open; say which one: call wait_for_reply(session_id="…") with '
        f"one of {listed}.",
        open_questions=[q.listed() for q in questions],
    )


def build_server(lifespan: Callable[[MCPServer[Any]], contextlib.AbstractAsyncContextManager[Any]]) -> MCPServer[Any]:
    """The MCP server with the tools; `lifespan` yields the `ToolHost`."""
    server: MCPServer[Any] = MCPServer(
        name="wecom-hil", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan
    )

    @tool(server)
    async def send_and_wait_reply(
        message: str,
        ctx: Context,
        chat_id: str | None = None,
        image_paths: list[str] | None = None,
        project_name: str | None = None,
        options: list[str] | None = None,
        responders: list[str] | None = None,
        multi_select: bool = False,
    ) -> WaitResult:
        """Ask a person in WeCom (企业微信) and wait for their answer: for information or a choice. (Before a risky
        action such as deploying, merging or deleting, use request_approval instead.)

        The message appears in the chat tagged [#short_id project]; the person answers (quote-reply when several
        questions are open). With `options` they tap a button (AI bot) or reply with the option's number or text,
        and the result's `choice` says which; free text is still accepted. Returns status "success" with the
        replies, "timeout" (the question stays open: use wait_for_reply to keep waiting) or "error".

        Args:
            message: the question, as the person should read it.
            chat_id: the WeCom chat to ask in (default: the configured chat).
            image_paths: local JPG/PNG files (≤ 2 MB each) to send with the question (hil-mcp on stdio only).
            project_name: shown in the header so the person knows which project asks.
            options: 1–20 short answers to choose from, e.g. ["合并", "不合并"].
            responders: WeCom userids who may answer; others are ignored (default: anyone in the chat).
            multi_select: with options, the person may pick several (ticks on a card, or "1 3" in text); the
                result's `choices` lists them all.
        """
        outgoing = Outgoing(
            message=message,
            chat_id=chat_id,
            project_name=project_name,
            options=options,
            responders=responders,
            multi_select=multi_select or None,
        )
        asked = await _ask(ctx, outgoing, image_paths)
        if isinstance(asked, WaitResult):
            return asked
        caller, question = asked
        return await _wait(caller, ctx, question, caller.settings.timeout)

    @tool(server)
    async def request_approval(
        summary: str,
        ctx: Context,
        details: str | None = None,
        chat_id: str | None = None,
        project_name: str | None = None,
        responders: list[str] | None = None,
        approvals_required: int = 1,
    ) -> ApprovalResult:
        """Ask for approval before a risky or irreversible action (deploy, merge, delete, migrate, spend) and wait
        for the decision: approved true or false, who decided (`decided_by`), and any comment ("拒绝，先跑测试").

        The person taps 批准/拒绝 (AI bot) or replies 1/2, 批准/同意/拒绝. With approvals_required=2, two different
        responders must approve; a single rejection decides at once. Only act when approved is true.

        Args:
            summary: what you are about to do, in one line ("部署 v1.4 到生产环境").
            details: anything the approver should know (what changes, the risk, how to undo).
            chat_id: the WeCom chat to ask in (default: the configured chat).
            project_name: shown in the header so the person knows which project asks.
            responders: WeCom userids who may decide (default: the server's default, else anyone in the chat).
            approvals_required: how many different people must approve (1–10).
        """
        if not 1 <= approvals_required <= 10:
            raise ToolError("approvals_required must be between 1 and 10")
        message = summary.strip() + (f"\n\n{details.strip()}" if details and details.strip() else "")
        outgoing = Outgoing(
            message=f"【请审批】{message}",
            chat_id=chat_id,
            project_name=project_name,
            responders=responders,
            approvals_required=approvals_required,
        )
        asked = await _ask(ctx, outgoing, None)
        if isinstance(asked, WaitResult):
            return _approval(asked, None)
        caller, question = asked
        final: list[Polled] = []
        result = await _wait(caller, ctx, question, caller.settings.timeout, on_poll=final.append)
        return _approval(result, final[-1].approval if final else None)

    @tool(server)
    async def send_message_only(
        message: str,
        ctx: Context,
        chat_id: str | None = None,
        image_paths: list[str] | None = None,
        project_name: str | None = None,
    ) -> SendResult:
        """Send a message to WeCom (企业微信) without waiting for a reply (e.g. to report that a task is done).

        Args:
            message: the text to send.
            chat_id: the WeCom chat (default: the configured chat).
            image_paths: local JPG/PNG files (≤ 2 MB each) to send with it (hil-mcp on stdio only).
            project_name: shown in front of the message.
        """
        outgoing = Outgoing(message=message, chat_id=chat_id, project_name=project_name, wait_reply=False)
        caller, outgoing = _begin(ctx, outgoing, image_paths)
        try:
            sent = await _send(caller, outgoing, image_paths)
        except (BackendError, _ImageProblem) as exc:
            return SendResult(status="error", message=str(exc))
        if not sent.success:
            return SendResult(status="error", message=f"Not delivered: {sent.error or sent.message}")
        return SendResult(status="success", message="Message delivered to WeCom.")

    @tool(server)
    async def wait_for_reply(ctx: Context, session_id: str | None = None, timeout: float | None = None) -> WaitResult:
        """Keep waiting for the answer to a question asked earlier (after "waiting", a timeout or a cut call).

        Args:
            session_id: the session_id from an earlier result, or the 8-character id shown in the chat
                (#1a2b3c4d). Leave it out only when you asked exactly one question that is still open here;
                with several (or none) you get the list and must pass an id.
            timeout: seconds to wait at most (default: the configured timeout).
        """
        if timeout is not None and not math.isfinite(timeout):
            raise ToolError("timeout must be a number of seconds")
        caller = _host(ctx).caller(ctx)
        memory = caller.memory
        if session_id is not None and session_id.strip():
            try:
                ref = session_ref(session_id)
            except ValueError as exc:
                raise ToolError(str(exc)) from None
            question = memory.resolve(ref)
            if question is None:
                # Named by the caller: from now on it is the caller's (a later call without an id may resume it).
                question = Question(ref, ref if len(ref) == 8 else None)
                memory.remember(question)
        else:
            # Only a question this caller asked, never a guess: another agent may share the token.
            try:
                lane = await caller.backend.open_questions()
            except BackendError as exc:
                return WaitResult(status="error", message=str(exc))
            # What this caller asked and has not had the answer of (answered meanwhile included), plus what the
            # server knows of its lane and is still open (after a restart of the server, memory is empty).
            candidates = list(memory.open)
            known = {q.session_id for q in candidates} | set(memory.settled)
            candidates += [_question(ref) for ref in lane or () if ref.session_id not in known]
            if len(candidates) != 1:
                return _lane_result(candidates)
            question = candidates[0]
        most = caller.settings.timeout
        limit = most if timeout is None else max(1.0, min(timeout, most))
        return await _wait(caller, ctx, question, limit)

    # More tools: define them in their own module as `def register(server)` using `tool(server)`, and call it here.
    from .gate_tool import register_permission_tool  # Claude Code's --permission-prompt-tool: gate_tool.py

    register_permission_tool(server)
    return server


__all__ = [
    "ApprovalResult",
    "Caller",
    "OpenQuestion",
    "OpenQuestions",
    "Question",
    "SendResult",
    "ToolHost",
    "ToolSettings",
    "WaitResult",
    "build_server",
    "call_limit",
    "tool",
]
