"""The HTTP API the MCP server (and people with curl) use.

Authentication happens before any of this runs (`auth.AuthMiddleware`); handlers read the caller's grant with
`grant_of()`, the lifespan state with `server_state()`, decide visibility with `auth.can_see()` and raise the errors
`errors.render()` turns into responses.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Annotated, Any

from fastapi import APIRouter, File, HTTPException, Path, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from hil_protocol.http_errors import error_response
from hil_protocol.images import IMAGE_MAX_BYTES, ImageError, check_image, to_data_url

from . import __version__, errors
from .audit import AUDIT_LIMIT_MAX, json_lines, parse_since
from .auth import can_see, grant_of
from .errors import InvalidRequest
from .models import PollResponse, SendRequest, SendResponse, Session, is_session_ref
from .state import ServerState, server_state

logger = logging.getLogger(__name__)

router = APIRouter()

SessionId = Annotated[str, Path(description="the session_id from /api/send, or its 8-character short id")]
NOT_FOUND = "会话不存在或已过期"
NOT_AN_ID = "not a session id (32 or 8 lowercase hex characters)"


def health(state: ServerState) -> tuple[int, dict[str, Any]]:
    """Whether this server can do its job now: 200 healthy, or 503 degraded with the reason."""
    channel = state["channel"].health()
    problems = [] if channel.ok else [channel.reason or f"the {state['channel'].name} channel is down"]
    if state["service"].broken is not None:
        problems.append(state["service"].broken)
    problems += state["supervisor"].problems()
    problems += state["mcp"].problems()
    body: dict[str, Any] = {
        "status": "degraded" if problems else "healthy",
        "mode": state["mode"],
        "channel": state["channel"].name,
        **channel.fields,
    }
    if problems:
        body["reason"] = "; ".join(problems)
    return (503 if problems else 200), body


@router.get("/")
async def root(request: Request) -> dict[str, Any]:
    return {"service": "hil-server", "version": __version__, **health(server_state(request))[1]}


@router.get("/health", responses={503: {"description": "degraded: the body's `reason` says why"}})
@router.get("/api/health", include_in_schema=False)
async def health_endpoint(request: Request) -> JSONResponse:
    status, body = health(server_state(request))
    return JSONResponse(body, status_code=status)


@router.post("/api/send", response_model=SendResponse, response_model_exclude_none=True)
async def send(body: SendRequest, request: Request) -> SendResponse:
    state = server_state(request)
    grant = grant_of(request)
    if grant is not None and body.chat_id is None:
        body.chat_id = grant.default_chat
    state["auth"].check_chat(grant, body.chat_id)
    return await state["service"].send(body, owner=grant.owner if grant else None)


async def visible_session(request: Request, ref: str) -> Session | None:
    """The session `ref` names, if it exists and the caller may see it (another token's question: None)."""
    session = await server_state(request)["service"].find(ref)
    if session is None or not can_see(grant_of(request), session):
        return None
    return session


def parse_wait(raw: str | None) -> float:
    """`?wait=N`: 0–60 seconds (nan and inf refused)."""
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    if not 0 <= wait <= 60:
        raise InvalidRequest("wait: must be a number of seconds from 0 to 60")
    return wait


async def poll_response(request: Request, session_id: str, raw_wait: str | None) -> Response:
    """`GET /api/poll/{session_id}?wait=N`, for the FastAPI route and the fast path alike."""
    try:
        wait = parse_wait(raw_wait)
        if not is_session_ref(session_id):
            result = PollResponse(session_id=session_id, status="not_found", has_reply=False, message=NOT_AN_ID)
            return Response(result.model_dump_json(), status_code=404, media_type="application/json")
        session = await visible_session(request, session_id)
        if session is None:
            result = PollResponse(session_id=session_id, status="not_found", has_reply=False, message=NOT_FOUND)
        else:
            result = await server_state(request)["service"].poll(session, wait)
    except errors.HANDLED as exc:  # the fast path runs outside FastAPI's exception handlers
        return errors.render(exc)
    return Response(result.model_dump_json(), media_type="application/json")


POLL_PATH = "/api/poll/{session_id}"


@router.get(
    POLL_PATH,
    response_model=PollResponse,
    responses={401: {"description": "API token missing or wrong"}, 404: {"description": "not a session id"}},
)
async def poll(
    session_id: SessionId,
    request: Request,
    wait: Annotated[
        str | None,
        Query(description="hold up to N seconds (0–60) until a reply arrives", examples=["30"]),
    ] = None,
) -> Response:
    """Poll a session (long-poll with `wait`). Served by `PollFastPath` in the app; both run `poll_response`."""
    return await poll_response(request, session_id, wait)


class PollFastPath:
    """Serves `GET /api/poll/{id}` before FastAPI's routing and dependency layers (pure ASGI middleware).

    Long-polls are held open by the thousand, and every layer a request passes through keeps its frames alive while
    it waits: skipping FastAPI's router saves ~10 KB per open poll (10,000 open polls: ~100 MB). It runs the same
    `poll_response` as the route above and marks the request with that route, so metrics see the same template."""

    def __init__(self, app: ASGIApp, route: BaseRoute) -> None:
        self.app = app
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            match = _POLL_RE.fullmatch(scope["path"])
            if match is not None:
                scope["route"] = self.route
                request = Request(scope, receive)
                response = await poll_response(request, match.group(1), request.query_params.get("wait"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_POLL_RE = re.compile(r"/api/poll/([^/]+)")


@router.get("/api/session/newest")
async def newest_open_session(request: Request, chat_id: str | None = None, project_name: str | None = None) -> Any:
    """The caller's one question still open to the agent (waiting, or the agent stopped waiting), for hil-mcp 0.3's
    `wait_for_reply()` without an id after a restart. Never a guess between agents sharing a token: only questions
    asked outside /mcp sessions, with this chat and project when given, and only when exactly one matches (several:
    409 with the list, so the agent asks for an id)."""
    grant = grant_of(request)
    lane = {"chat_id": chat_id, "project_name": project_name, "any_chat": chat_id is None and project_name is None}
    found = await server_state(request)["service"].open_questions(grant.owner if grant else None, **lane)
    if not found:
        return error_response(404, "no open question for this API token")
    if len(found) > 1:
        listed = [{"session_id": s.session_id, "short_id": s.short_id, "project_name": s.project_name} for s in found]
        return error_response(409, "several open questions: wait for one by its session_id", open=listed)
    session = found[0]
    return {"success": True, "session_id": session.session_id, "short_id": session.short_id, "status": session.status}


@router.post("/api/session/{session_id}/timeout")
async def session_timeout(session_id: SessionId, request: Request) -> dict[str, Any]:
    if not is_session_ref(session_id):
        raise HTTPException(404, NOT_AN_ID)
    session = await visible_session(request, session_id)
    if session is None:
        return {"success": False, "message": NOT_FOUND}
    await server_state(request)["service"].mark_timeout(session)
    return {"success": True, "message": "已标记为停止等待"}


@router.post("/api/upload-image")
async def upload_image(file: Annotated[UploadFile, File()]) -> dict[str, Any]:
    data = await file.read(IMAGE_MAX_BYTES + 1)
    try:
        check_image(data)
    except ImageError as exc:
        raise HTTPException(400, str(exc)) from exc
    return {"success": True, "image_url": to_data_url(data)}


@router.get(
    "/api/audit",
    response_class=Response,
    responses={
        200: {"content": {"application/x-ndjson": {}}, "description": "one audit event per line, oldest first"},
        401: {"description": "API token missing or wrong"},
        422: {"description": "since, chat_id or limit not understood"},
    },
)
async def audit_export(
    request: Request,
    since: Annotated[
        str | None,
        Query(description="only events at or after this time: epoch seconds or ISO 8601", examples=["2026-01-31"]),
    ] = None,
    chat_id: Annotated[str | None, Query(max_length=128, description="only events in this chat")] = None,
    limit: Annotated[int, Query(ge=1, le=AUDIT_LIMIT_MAX, description="at most this many events")] = 10_000,
) -> Response:
    """The audit trail as JSON lines. With API tokens, a token sees only the events of its own questions (whatever
    `chat_id` it names: another token's chat gives no lines, and says nothing about whether that chat has any)."""
    try:
        start = parse_since(since)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    grant = grant_of(request)
    rows = await server_state(request)["service"].audit_rows(
        since=start, chat_id=chat_id, owner=grant.owner if grant else None, limit=limit
    )
    return Response(json_lines(rows), media_type="application/x-ndjson")
