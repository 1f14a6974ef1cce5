"""The shapes inside the HIL Server's HTTP API that both ends read: who answered, the option they chose, where an
approval stands, and a poll's status. The server builds its answers from them (hil_server.models) and hil-mcp parses
the answers with them (mcp_server.backend); a robot callback's sender is the same `Person`.

The envelopes around them stay with each end on purpose: the server validates what it takes strictly, while hil-mcp
reads leniently (fields a newer server adds pass through to the agent, and an older server's answers still read)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# What GET /api/poll/{ref} says about a question.
PollStatus = Literal["waiting", "replied", "timeout", "failed", "not_found"]


class Person(BaseModel):
    """A WeCom user as a callback names them ("from") and a reply shows them ("from_user"). WeCom may add fields:
    they are kept."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    userid: str = ""
    name: str = ""
    alias: str = ""


class Choice(BaseModel):
    """The option a reply picked: its position (0-based) and label."""

    index: int = Field(description="the option's position, from 0")
    label: str = Field(description="the option as the person saw it")


class Approval(BaseModel):
    """Where an approval stands: `approved` is None until it is decided."""

    approved: bool | None = None
    decided_by: list[str] = Field(default_factory=list)
    comment: str = ""
    approvals: int = 0
    required: int = 1


__all__ = ["Approval", "Choice", "Person", "PollStatus"]
