"""The gate: whether one of Claude Code's tool calls may run, decided by a person in WeCom.

`decide()` is the one place the decision is made, for both ways in: `hil-mcp gate` (a Claude Code hook, this
module's `main`) and the `permission_prompt` MCP tool (gate_tool.py). It reads the call with the policy
(gate_policy.py), asks the person through the HIL Server (a question with 批准 / 拒绝 / 本会话都允许, or an N-of-M
approval), waits within the policy's `wait`, and fails closed: nobody decided, the server cannot be reached or
refuses the token — the call is denied (or left to Claude Code's own prompt with `on_timeout = "ask"`), with the
reason.

The hook prints only the decision on stdout (Claude Code reads it); logs go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from hil_protocol.gate import AGENT_SESSION_RE, ALLOW_SESSION, GATE_OPTIONS, allowance_line, check_keys
from hil_protocol.messages import utf8_len
from hil_protocol.validation import problems

from .backend import Backend, BackendError, Outgoing, Polled
from .gate_policy import Policy, PolicyError, Verdict, check_call, load_policy
from .gate_render import BODY_MAX_BYTES, QUESTION_MAX_BYTES, fit, render_input

logger = logging.getLogger("mcp_server.gate")

STDIN_MAX_BYTES = 1024 * 1024
# What the gate keeps for itself out of `wait`: telling the server it stopped waiting, printing the decision.
MARGIN = 1.0
Behavior = Literal["allow", "deny", "ask"]


@dataclass(frozen=True)
class Decision:
    behavior: Behavior
    reason: str


@dataclass(frozen=True)
class ToolCall:
    tool_name: str
    tool_input: dict[str, Any]
    cwd: str
    session: str | None = None  # the agent's session id: what 本会话都允许 is remembered for


class Allowances(Protocol):
    """Where 本会话都允许 is remembered: the HIL Server for the hook (a process per call), memory for the tool."""

    async def allowed(self, session: str) -> list[str]: ...

    async def grant(self, question: str, session: str, keys: list[str]) -> None: ...


class MemoryAllowances:
    """For a process that lives as long as the agent's session (the MCP prompt tool)."""

    def __init__(self) -> None:
        self._keys: dict[str, set[str]] = {}

    async def allowed(self, session: str) -> list[str]:
        return sorted(self._keys.get(session, set()))

    async def grant(self, question: str, session: str, keys: list[str]) -> None:
        self._keys.setdefault(session, set()).update(keys)


# --- the decision ----------------------------------------------------------------------------------------------------


def question_text(call: ToolCall, verdict: Verdict, *, local_files: bool, session_option: bool) -> str:
    head = "\n".join(
        [
            f"【Claude Code 请求批准】{call.tool_name}",
            fit(f"目录：{call.cwd or '（未知）'}", 1024),
            fit(f"原因：{'、'.join(verdict.rules)}", 1024),
        ]
    )
    tail = f"\n\n{allowance_line(call.session, verdict.keys)}" if session_option and call.session else ""
    # Whatever the folder and the rules take, the whole question stays within the server's limit.
    room = min(BODY_MAX_BYTES, QUESTION_MAX_BYTES - utf8_len(head) - utf8_len(tail))
    body = render_input(call.tool_name, call.tool_input, call.cwd, local_files=local_files, limit=room)
    return f"{head}\n{body}{tail}"


async def decide(
    call: ToolCall,
    policy: Policy,
    backend: Backend,
    allowances: Allowances,
    *,
    deadline: float,
    local_files: bool,
) -> Decision | None:
    """The person's decision on `call`; None when the policy needs no person (Claude Code's own rules apply).
    `deadline` (time.monotonic()) bounds everything, telling the server included."""
    verdict = check_call(call.tool_name, call.tool_input, call.cwd, policy)
    if not verdict.needs_person:
        return None
    keys = verdict.keys
    session = call.session if call.session and AGENT_SESSION_RE.fullmatch(call.session) else None
    if session is not None:
        try:
            allowed = await allowances.allowed(session)
        except BackendError as exc:
            logger.warning("cannot read this session's allowances (%s); asking", exc)
            allowed = []
        if set(keys) <= set(allowed):
            return Decision("allow", f"Allowed: the person chose {ALLOW_SESSION} for {', '.join(keys)} earlier.")
    try:
        check_keys(keys)
        session_option = session is not None and policy.approvals_required == 1 and verdict.session_allowable
    except ValueError:
        session_option = False
    ask_call = ToolCall(call.tool_name, call.tool_input, call.cwd, session)
    outgoing = Outgoing(
        message=question_text(ask_call, verdict, local_files=local_files, session_option=session_option),
        chat_id=policy.chat_id,
        project_name=policy.project_name,
        responders=policy.responders or None,
        timeout=max(1.0, policy.wait),
    )
    if policy.approvals_required > 1:
        outgoing.approvals_required = policy.approvals_required
    else:
        outgoing.options = list(GATE_OPTIONS if session_option else GATE_OPTIONS[:2])
        outgoing.allow_text = False
    asked: list[str] = []  # the question's session id, once it is out
    try:
        with anyio.move_on_after(max(0.0, deadline - MARGIN - time.monotonic())):
            try:
                sent = await backend.send(outgoing)
            except BackendError as exc:
                return _unreachable(policy, exc)
            if not sent.success or not sent.session_id:
                why = sent.error or sent.message or "unknown error"
                return _failed(policy, f"the question was not delivered: {why}")
            question = sent.session_id
            asked.append(question)
            logger.info("asked session_id=%s short_id=%s tool=%s", question, sent.short_id, call.tool_name)
            while True:
                wait = min(30.0, deadline - MARGIN - time.monotonic())
                if wait < 0.1:
                    await anyio.sleep(max(wait, 0.0) + 0.05)  # the scope ends the wait now
                    continue
                try:
                    polled = await backend.poll(question, wait=wait)
                except BackendError as exc:
                    if not exc.retryable:
                        return _unreachable(policy, exc)
                    logger.warning("poll failed (%s); retrying", exc)
                    await anyio.sleep(0.2)
                    continue
                decided = polled.approval is not None and polled.approval.approved is not None
                if polled.status == "replied" or decided:
                    return await _answered(polled, allowances, question, session, keys)
                if polled.status in ("timeout", "failed", "not_found"):
                    return _failed(policy, f"the question ended without a decision ({polled.status}: {polled.message})")
    except anyio.get_cancelled_exc_class():
        # Claude Code gave up on us (the MCP call was cancelled, the hook was stopped): tell the server, then go.
        await _stop_waiting(backend, asked)
        raise
    # The wait is over and nobody decided: the question stays in the chat, marked as no longer waited for.
    await _stop_waiting(backend, asked)
    return _failed(policy, f"nobody decided in WeCom within {policy.wait:g} s")


async def _stop_waiting(backend: Backend, asked: list[str]) -> None:
    for question in asked:
        with anyio.move_on_after(max(0.2, MARGIN / 2), shield=True):
            try:
                await backend.mark_timeout(question)
            except BackendError as exc:
                logger.warning("could not tell the server the gate stopped waiting: %s", exc)


async def _answered(
    polled: Polled, allowances: Allowances, question: str, session: str | None, keys: list[str]
) -> Decision:
    who = ", ".join(dict.fromkeys(r.from_user.userid or r.from_user.name for r in polled.replies)) or "someone"
    if polled.approval is not None and polled.approval.approved is not None:
        deciders = ", ".join(polled.approval.decided_by) or who
        if polled.approval.approved:
            return Decision("allow", f"Approved in WeCom by {deciders}.")
        comment = f": {polled.approval.comment}" if polled.approval.comment else "."
        return Decision("deny", f"Rejected in WeCom by {deciders}{comment}")
    if polled.choice is None:
        return Decision("deny", "The answer in WeCom was not one of 批准 / 拒绝; not run.")
    if polled.choice.label == GATE_OPTIONS[1]:
        # The person's whole reply ("2 先跑测试", "拒绝，先跑测试"): the agent reads their words, not our parse of them.
        said = "\n".join(r.content for r in polled.replies if r.content and r.content != polled.choice.label)
        return Decision("deny", f"Rejected in WeCom by {who}" + (f': "{said}"' if said else "."))
    if polled.choice.label == ALLOW_SESSION and session is not None:
        try:
            await allowances.grant(question, session, keys)
        except BackendError as exc:
            logger.warning(
                "could not record %s (%s): this call is allowed, the next one asks again", ALLOW_SESSION, exc
            )
        return Decision("allow", f"Approved in WeCom by {who} for the rest of this session ({', '.join(keys)}).")
    return Decision("allow", f"Approved in WeCom by {who}.")


def _failed(policy: Policy, why: str) -> Decision:
    if policy.on_timeout == "ask":
        return Decision("ask", f"WeCom approval: {why}; asking here instead.")
    return Decision("deny", f"Not run: {why} (the gate fails closed).")


def _unreachable(policy: Policy, exc: BackendError) -> Decision:
    return _failed(policy, f"the HIL Server could not ask a person ({exc})")


# --- the hook --------------------------------------------------------------------------------------------------------


class HookInput(BaseModel):
    """What Claude Code writes on the hook's stdin (fields we do not read pass through)."""

    model_config = ConfigDict(extra="allow")
    hook_event_name: Literal["PreToolUse", "PermissionRequest"]
    tool_name: StrictStr = Field(min_length=1, max_length=256)
    tool_input: dict[str, Any]
    cwd: StrictStr = Field(default="", max_length=4096)
    session_id: StrictStr | None = Field(default=None, max_length=256)


class BadInput(Exception):
    """The hook's stdin is not a tool call we can read."""


def read_hook_input(raw: bytes) -> HookInput:
    """Raises BadInput saying what is wrong."""
    if len(raw) > STDIN_MAX_BYTES:
        raise BadInput(f"hook input is larger than {STDIN_MAX_BYTES // 1024} KB")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInput("hook input is not UTF-8") from None
    except RecursionError:
        raise BadInput("hook input is nested too deeply") from None
    except ValueError as exc:
        raise BadInput(f"hook input is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadInput("hook input is not a JSON object")
    try:
        return HookInput.model_validate(data)
    except ValidationError as exc:
        raise BadInput(f"hook input is not a tool call: {problems(exc.errors())}") from None


def hook_output(event: str, decision: Decision) -> dict[str, Any] | None:
    """Claude Code's decision JSON for `event` (None: print nothing, Claude Code's own prompt decides)."""
    if event == "PermissionRequest":
        if decision.behavior == "ask":
            return None
        verdict: dict[str, Any] = {"behavior": decision.behavior}
        if decision.behavior == "deny":
            verdict["message"] = decision.reason
        return {"hookSpecificOutput": {"hookEventName": event, "decision": verdict}}
    return {
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": decision.behavior,
            "permissionDecisionReason": decision.reason,
        }
    }


def gate_main(raw: bytes, connection: Callable[[], tuple[str, str | None]], started: float) -> tuple[int, str]:
    """The hook's exit code and stdout for `raw` stdin. Input that cannot be read is refused with exit code 2 and the
    reason on stderr, which blocks the call whatever the event was. `connection()` gives the HIL Server's URL and
    token (ValueError: the configuration cannot be read); it and the HTTP client are loaded only when a person is
    needed, so the calls that need nobody (most of them) start fast."""
    try:
        hook = read_hook_input(raw)
    except BadInput as exc:
        print(f"hil-mcp gate: blocked: {exc}", file=sys.stderr)
        return 2, ""
    try:
        policy = load_policy(hook.cwd or None)
    except PolicyError as exc:
        output = hook_output(hook.hook_event_name, Decision("deny", f"Not run: {exc}. Fix the file or remove it."))
        return 0, json.dumps(output, ensure_ascii=False)
    call = ToolCall(hook.tool_name, hook.tool_input, hook.cwd, hook.session_id)
    if not check_call(call.tool_name, call.tool_input, call.cwd, policy).needs_person:
        return 0, ""
    try:
        from .gate_http import ask_over_http

        decision = anyio.run(ask_over_http, call, policy, connection, started + policy.wait)
    except Exception as exc:  # fail closed: whatever went wrong, the call does not run unasked
        logger.exception("gate failed")
        decision = Decision("deny", f"Not run: the gate failed ({type(exc).__name__}: {exc}).")
    if decision is None:
        return 0, ""
    logger.info("decision %s for %s: %s", decision.behavior, hook.tool_name, decision.reason)
    output = hook_output(hook.hook_event_name, decision)
    return 0, json.dumps(output, ensure_ascii=False) if output is not None else ""


__all__ = [
    "Allowances",
    "Decision",
    "HookInput",
    "MemoryAllowances",
    "ToolCall",
    "decide",
    "gate_main",
    "hook_output",
    "read_hook_input",
]
