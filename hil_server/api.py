"""The HTTP API the MCP server (and people with curl) use."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from fastapi import APIRouter, File, HTTPException, Path, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from hil_protocol.images import IMAGE_MAX_BYTES, ImageError, check_image, to_data_url

from . import __version__
from .auth import Grant
from .models import SESSION_ID_RE, PollResponse, SendRequest, SendResponse

logger = logging.getLogger(__name__)

router = APIRouter()

SessionId = Annotated[str, Path(description="the session_id from /api/send, or its 8-character short id")]


def _grant(request: Request) -> Grant | None:
    return request.state.auth.check(request)


def health_body(request: Request) -> dict[str, Any]:
    state = request.state
    return {"status": "healthy", "mode": state.mode, **state.channel.health().fields}


@router.get("/")
async def root(request: Request) -> dict[str, Any]:
    return {"service": "hil-server", "version": __version__, **health_body(request)}


@router.get("/health")
@router.get("/api/health")
async def health(request: Request) -> dict[str, Any]:
    return health_body(request)


@router.post("/api/send", response_model=SendResponse, response_model_exclude_none=True)
async def send(body: SendRequest, request: Request) -> SendResponse:
    grant = _grant(request)
    request.state.auth.check_chat(grant, body.chat_id)
    return await request.state.service.send(body, owner=grant.owner if grant else None)


async def _poll(request: Request, session_id: str, wait: float) -> Response:
    grant = _grant(request)
    if not SESSION_ID_RE.match(session_id):
        return JSONResponse(
            {
                "session_id": session_id,
                "status": "not_found",
                "has_reply": False,
                "replies": [],
                "message": "not a session id (32 or 8 lowercase hex characters)",
            },
            status_code=404,
        )
    service = request.state.service
    session = service.store.find(session_id)
    if session is not None and grant is not None and session.owner not in (None, grant.owner):
        # Another token's question: say nothing about it.
        result = PollResponse(session_id=session_id, status="not_found", has_reply=False, message="会话不存在或已过期")
    else:
        request.state.observe("poll", "long" if wait else "short")
        result = await service.poll(session_id, wait)
    return Response(result.model_dump_json(), media_type="application/json")


async def poll_endpoint(request: Request) -> Response:
    """`GET /api/poll/{session_id}?wait=N`, served by `PollFastPath`."""
    raw = request.query_params.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= 60:  # also refuses nan and inf
        return JSONResponse(
            {
                "success": False,
                "error": "invalid request: wait: must be a number of seconds from 0 to 60",
                "message": "invalid request: wait: must be a number of seconds from 0 to 60",
            },
            status_code=422,
        )
    try:
        return await _poll(request, request.path_params["session_id"], wait)
    except HTTPException as exc:
        return JSONResponse(
            {"success": False, "error": exc.detail, "message": exc.detail, "detail": exc.detail},
            status_code=exc.status_code,
            headers=exc.headers,
        )


class PollFastPath:
    """Serves `GET /api/poll/{id}` before FastAPI's routing and exception layers (pure ASGI middleware).

    Long-polls are held open by the thousand, and every layer a request passes through keeps its frames alive while
    it waits: skipping FastAPI's router and dependency machinery saves ~10 KB per open poll (10,000 open polls:
    ~100 MB). Everything else goes to the app unchanged. The FastAPI route below documents the endpoint in the
    OpenAPI schema; its validation is the same."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            match = _POLL_PATH.match(scope["path"])
            if match is not None:
                scope["path_params"] = {"session_id": match.group(1)}
                response = await poll_endpoint(Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_POLL_PATH = re.compile(r"^/api/poll/([^/]+)$")


@router.get(
    "/api/poll/{session_id}",
    response_model=PollResponse,
    responses={401: {"description": "API token missing or wrong"}, 404: {"description": "not a session id"}},
)
async def poll(
    session_id: SessionId,
    request: Request,
    wait: Annotated[float, Query(ge=0, le=60, description="hold up to N seconds until a reply arrives")] = 0,
) -> Response:
    """Poll a session (long-poll with `wait`). Served by `PollFastPath`; this declaration is its schema."""
    return await _poll(request, session_id, wait)


@router.post("/api/session/{session_id}/timeout")
async def session_timeout(session_id: SessionId, request: Request) -> dict[str, Any]:
    grant = _grant(request)
    if not SESSION_ID_RE.match(session_id):
        raise HTTPException(404, "not a session id (32 or 8 lowercase hex characters)")
    session = request.state.service.store.find(session_id)
    if session is None or (grant is not None and session.owner not in (None, grant.owner)):
        return {"success": False, "message": "会话不存在或已过期"}
    await request.state.service.mark_timeout(session_id)
    return {"success": True, "message": "已标记为停止等待"}


@router.post("/api/upload-image")
async def upload_image(request: Request, file: Annotated[UploadFile, File()]) -> dict[str, Any]:
    _grant(request)
    data = await file.read(IMAGE_MAX_BYTES + 1)
    try:
        check_image(data)
    except ImageError as exc:
        raise HTTPException(400, str(exc)) from exc
    return {"success": True, "image_url": to_data_url(data)}
