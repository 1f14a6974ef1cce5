"""The gate's 本会话都允许 ("allow for the rest of this Claude Code session"), remembered by the server, since each
`hil-mcp gate` run is a new process that lives for one tool call.

`POST /api/gate/allow` records an allowance only from a question this API token asked, that a person answered with
本会话都允许, and whose text names exactly this session and these keys (hil_protocol.gate.allowance_line): what the
person saw is what is allowed, never more. `GET /api/gate/allow?session=…` lists the session's allowed keys.

Kept in memory with an expiry (ALLOWANCE_TTL): a server restart forgets them, and the next risky call asks again,
which fails safe.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field, field_validator

from hil_protocol.gate import AGENT_SESSION_RE, ALLOW_SESSION, allowance_line, check_keys

from .api import visible_session
from .auth import grant_of
from .errors import InvalidRequest
from .models import is_session_ref

ALLOWANCE_TTL = 24 * 3600.0
SESSIONS_MAX = 10_000


def _agent_session(value: str) -> str:
    if not AGENT_SESSION_RE.fullmatch(value):
        raise ValueError("session must be 1-128 letters, digits or _ . : - (Claude Code's session_id)")
    return value


class GrantRequest(BaseModel):
    question: str = Field(description="the session_id of the gate's question a person answered with 本会话都允许")
    session: str = Field(description="the agent's session id (Claude Code's session_id)")
    keys: list[str] = Field(description="what the allowance covers, as the question named it")

    @field_validator("session")
    @classmethod
    def _session(cls, value: str) -> str:
        return _agent_session(value)

    @field_validator("keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        return check_keys(value)


class Allowances:
    """(API token owner, agent session) -> allowed keys, each session forgotten ALLOWANCE_TTL after its last grant;
    at most SESSIONS_MAX sessions (the oldest go first)."""

    def __init__(self, ttl: float = ALLOWANCE_TTL, clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self._clock = clock
        self._sessions: OrderedDict[tuple[str, str], tuple[float, set[str]]] = OrderedDict()

    def grant(self, owner: str, session: str, keys: list[str]) -> None:
        _, allowed = self._sessions.pop((owner, session), (0.0, set()))
        self._sessions[(owner, session)] = (self._clock() + self.ttl, allowed | set(keys))
        while len(self._sessions) > SESSIONS_MAX:
            self._sessions.popitem(last=False)

    def allowed(self, owner: str, session: str) -> list[str]:
        expires, keys = self._sessions.get((owner, session), (0.0, set()))
        if expires <= self._clock():
            self._sessions.pop((owner, session), None)
            return []
        return sorted(keys)


def create_router(allowances: Allowances | None = None) -> APIRouter:
    """The gate's routes, with their own memory (built by the app factory, not at import)."""
    memory = allowances or Allowances()
    router = APIRouter()

    def owner_of(request: Request) -> str:
        grant = grant_of(request)
        return grant.owner if grant else ""

    @router.post("/api/gate/allow")
    async def grant_allowance(body: GrantRequest, request: Request) -> dict[str, Any]:
        """Remember 本会话都允许 for the agent's session, from the question a person answered with it."""
        question = await visible_session(request, body.question) if is_session_ref(body.question) else None
        if question is None:
            raise InvalidRequest("question: no such question for this API token")
        chose = next((r.choice for r in question.replies if r.choice is not None and r.matched_by != "late"), None)
        if chose is None or chose.label != ALLOW_SESSION or ALLOW_SESSION not in question.options:
            raise InvalidRequest(f"question: the person did not answer it with {ALLOW_SESSION}")
        if allowance_line(body.session, body.keys) not in question.message:
            raise InvalidRequest("keys: the question did not name this session and these keys")
        memory.grant(owner_of(request), body.session, body.keys)
        return {"success": True, "session": body.session, "keys": memory.allowed(owner_of(request), body.session)}

    @router.get("/api/gate/allow")
    async def list_allowances(
        request: Request, session: Annotated[str, Query(description="the agent's session id")]
    ) -> dict[str, Any]:
        """The keys 本会话都允许 covers in the agent's session (empty: none)."""
        try:
            _agent_session(session)
        except ValueError as exc:
            raise InvalidRequest(f"session: {exc}") from None
        return {"session": session, "keys": memory.allowed(owner_of(request), session)}

    return router


__all__ = ["ALLOWANCE_TTL", "Allowances", "GrantRequest", "create_router"]
