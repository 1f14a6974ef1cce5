"""Every error the HTTP API answers, rendered in one place with one shape (`hil_protocol.http_errors.error_body`):
FastAPI's exception handlers and the long-poll fast path both call `render()`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from hil_protocol.http_errors import error_response
from hil_protocol.validation import problems

from .auth import AuthError
from .store import StoreUnavailable


class InvalidRequest(Exception):
    """A request FastAPI's validation did not see (query parameters read by hand): answered with 422."""


def render(exc: Exception) -> JSONResponse:
    if isinstance(exc, AuthError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, str(exc), headers=headers)
    if isinstance(exc, StoreUnavailable):
        return error_response(503, f"the HIL Server cannot store anything right now ({exc}); try again shortly")
    if isinstance(exc, InvalidRequest):
        return error_response(422, f"invalid request: {exc}")
    if isinstance(exc, RequestValidationError):
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return error_response(422, f"invalid request: {problems(exc.errors(), where=_where)}", detail=detail)
    if isinstance(exc, HTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers, detail=exc.detail)
    raise exc


# Every exception render() answers; anything else is a bug and a 500.
HANDLED = (AuthError, StoreUnavailable, InvalidRequest, RequestValidationError, HTTPException)


def _where(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(p) for p in loc if p != "body") or "body"


def install(app: FastAPI) -> None:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return render(exc)

    for cls in HANDLED:
        app.add_exception_handler(cls, handler)
