"""The one shape of an HTTP error from the HIL Server and the worker:

    {"success": false, "error": "<sentence>", "message": "<sentence>", ...extra}

`error` is what the seed's clients read, `message` what the rest of the API uses for people; extra fields say more
(`detail` for validation errors, `errcode`/`errmsg` where WeCom or a worker reads the answer).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Send


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    return {"success": False, "error": message, "message": message, **extra}


def error_response(
    status: int, message: str, *, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(error_body(message, **extra), status_code=status, headers=headers)


async def send_error(
    send: Send, status: int, message: str, *, headers: Sequence[tuple[bytes, bytes]] = (), **extra: Any
) -> None:
    """The same body from pure ASGI code (middleware that answers before the app runs)."""
    body = json.dumps(error_body(message, **extra), ensure_ascii=False).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
