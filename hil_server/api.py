"""The HTTP API the MCP server (and people with curl) use."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, File, HTTPException, Path, Query, Request, UploadFile
from fastapi.responses import JSONResponse

from hil_protocol.wecom import IMAGE_MAX_BYTES, ImageError, check_image, to_data_url

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
    body: dict[str, Any] = {"status": "healthy", "mode": state.mode}
    if state.mode == "relay":
        body["worker_connected"] = state.hub.count > 0
        body["worker_count"] = state.hub.count
    return body


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


@router.get("/api/poll/{session_id}", response_model=PollResponse)
async def poll(
    session_id: SessionId,
    request: Request,
    wait: Annotated[float, Query(ge=0, le=60, description="hold up to N seconds until a reply arrives")] = 0,
) -> PollResponse | JSONResponse:
    grant = _grant(request)
    if not SESSION_ID_RE.match(session_id):
        return JSONResponse(
            {"session_id": session_id, "status": "not_found", "has_reply": False, "replies": [],
             "message": "not a session id (32 or 8 lowercase hex characters)"},
            status_code=404,
        )
    service = request.state.service
    session = service.store.find(session_id)
    if session is not None and grant is not None and session.owner not in (None, grant.owner):
        # Another token's question: say nothing about it.
        return PollResponse(session_id=session_id, status="not_found", has_reply=False, message="会话不存在或已过期")
    request.state.observe("poll", "long" if wait else "short")
    return await service.poll(session_id, wait)


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
