"""`permission_prompt`: the gate as an MCP tool, for `claude -p … --permission-prompt-tool mcp__hil__permission_prompt`
(headless runs, where no one sits at Claude Code's prompt).

Claude Code calls it with `{tool_name, input, tool_use_id}` and reads back ONE text block holding
`{"behavior":"allow","updatedInput":<the input>}` or `{"behavior":"deny","message":…}`; a result with structured
content is refused by Claude Code, so the tool is registered without structured output. The decision is
`gate.decide()`, the same as the hook's. 本会话都允许 is remembered per MCP session (one Claude Code run).
"""

from __future__ import annotations

import inspect
import json
import os
import time
from typing import Any

from mcp.server.mcpserver import Context, MCPServer

from .gate import Decision, MemoryAllowances, ToolCall, decide
from .gate_policy import Policy, PolicyError, load_policy

TOOL_NAME = "permission_prompt"


def prompt_result(decision: Decision | None, tool_input: dict[str, Any]) -> str:
    """The text Claude Code expects. No person needed (None) and "ask" both allow with the input unchanged only when
    the policy needs nobody; a failed ask denies (there is no prompt to fall back to in a headless run)."""
    if decision is None or decision.behavior == "allow":
        # updatedInput must echo the input: an empty object would wipe the tool's arguments.
        return json.dumps({"behavior": "allow", "updatedInput": tool_input}, ensure_ascii=False)
    return json.dumps({"behavior": "deny", "message": decision.reason}, ensure_ascii=False)


def register_permission_tool(server: MCPServer[Any]) -> None:
    allowances = MemoryAllowances()
    # On stdio the process is one Claude Code run; on /mcp the MCP session (its id is the server's random UUID).
    this_process = f"mcp-{os.urandom(8).hex()}"

    async def permission_prompt(
        tool_name: str, input: dict[str, Any], ctx: Context, tool_use_id: str | None = None
    ) -> str:
        """Claude Code's --permission-prompt-tool: asks a person in WeCom whether a tool call may run, by the gate's
        policy (.hil/gate.toml). Not for the model to call.

        Args:
            tool_name: the tool Claude Code is about to run (Bash, Write, mcp__server__tool, ...)
            input: that tool's input, returned unchanged as updatedInput when the call is allowed
            tool_use_id: Claude Code's id of the call
        """
        caller = ctx.request_context.lifespan_context.caller(ctx)
        local = caller.settings.local_files
        cwd = os.getcwd() if local else ""
        try:
            # The server's /mcp cannot see the agent's project: there the built-in policy applies.
            policy = load_policy(cwd) if local else Policy()
        except PolicyError as exc:
            return prompt_result(Decision("deny", f"Not run: {exc}. Fix the file or remove it."), input)
        policy = policy.model_copy(
            update={
                "chat_id": policy.chat_id or caller.chat_id,
                "project_name": policy.project_name or caller.project_name,
                # Nobody is at a prompt in a headless run: "ask" would mean no answer at all.
                "on_timeout": "deny",
            }
        )
        request = ctx.request_context.request
        header = request.headers.get("mcp-session-id") if request is not None else None
        session = f"mcp-{header}"[:128] if header and not local else this_process
        call = ToolCall(tool_name, input, cwd, session)
        deadline = time.monotonic() + policy.wait
        decision = await decide(call, policy, caller.backend, allowances, deadline=deadline, local_files=local)
        return prompt_result(decision, input)

    server.add_tool(
        permission_prompt,
        name=TOOL_NAME,
        description=inspect.cleandoc(permission_prompt.__doc__ or ""),
        structured_output=False,
    )


__all__ = ["TOOL_NAME", "prompt_result", "register_permission_tool"]
