"""The HTTP backend: the HIL Server's HTTP API, as hil-mcp on stdio uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
from pydantic import ValidationError

from hil_protocol.images import image_kind

from .backend import SESSION_REF_RE, BackendError, Outgoing, Polled, QuestionRef, Sent

# Kept for code written against 0.2, where the error had this name.
HilApiError = BackendError


class HilClient:
    """`Backend` over HTTP. One `httpx.AsyncClient` per process, passed in."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, api_token: str | None = None) -> None:
        self._http = http
        self.base_url = base_url
        self._headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}

    async def _request(self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        try:
            response = await self._http.request(
                method, url, headers=self._headers, timeout=timeout or httpx.USE_CLIENT_DEFAULT, **kwargs
            )
        except httpx.TimeoutException as exc:
            raise BackendError(f"HIL Server at {self.base_url} did not answer in time", retryable=True) from exc
        except httpx.TransportError as exc:
            raise BackendError(
                f"cannot reach the HIL Server at {self.base_url} ({type(exc).__name__}); is it running, and is "
                "--service-url / SERVICE_URL right? (a proxy in http_proxy/https_proxy can also get in the way)",
                retryable=True,
            ) from exc
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code == 401:
            raise BackendError(
                f"the HIL Server refused the API token: {_detail(body)}. Set --api-token / HIL_API_TOKEN"
            )
        if response.status_code == 403:
            raise BackendError(f"the HIL Server refused: {_detail(body)}")
        if response.status_code >= 500:
            raise BackendError(f"the HIL Server failed (HTTP {response.status_code})", retryable=True)
        if response.status_code >= 400 and response.status_code != 404:
            raise BackendError(f"the HIL Server refused the request (HTTP {response.status_code}): {_detail(body)}")
        if not isinstance(body, dict):
            raise BackendError(f"unexpected answer from the HIL Server (HTTP {response.status_code})")
        if response.status_code == 404:
            body.setdefault("status", "not_found")
        return body

    async def send(self, outgoing: Outgoing) -> Sent:
        payload = outgoing.model_dump(exclude_none=True)
        if not payload["images"]:
            del payload["images"]
        # Sending may include WeCom retries on the server side; give it time.
        return _parse(Sent, await self._request("POST", "/api/send", json=payload, timeout=120))

    async def poll(self, ref: str, wait: float = 0) -> Polled:
        params = {"wait": f"{wait:.1f}"} if wait > 0 else None
        body = await self._request("GET", f"/api/poll/{_checked(ref)}", params=params, timeout=wait + 15)
        body.setdefault("session_id", ref)
        return _parse(Polled, body)

    async def mark_timeout(self, ref: str) -> None:
        await self._request("POST", f"/api/session/{_checked(ref)}/timeout", timeout=10)

    async def upload_image(self, path: Path) -> str:
        data = await anyio.Path(path).read_bytes()
        # From the bytes, not the name: mimetypes would read the system's type files on the event loop.
        mime = {"png": "image/png", "jpg": "image/jpeg"}.get(image_kind(data) or "", "application/octet-stream")
        body = await self._request("POST", "/api/upload-image", files={"file": (path.name, data, mime)}, timeout=60)
        if not body.get("success") or not body.get("image_url"):
            raise BackendError(f"uploading {path.name} failed: {body.get('error') or body.get('message')}")
        return str(body["image_url"])

    async def open_questions(self) -> list[QuestionRef] | None:
        # The server cannot tell two hil-mcp processes of one token apart: this process's memory is its lane.
        return None


def _checked(ref: str) -> str:
    """Only a well-formed id goes into a URL path."""
    if not SESSION_REF_RE.fullmatch(ref):
        raise BackendError(f"not a session id: {ref[:40]!r} (32 or 8 lowercase hex characters)")
    return ref


M = TypeVar("M", Sent, Polled)


def _parse(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise BackendError(f"unexpected answer from the HIL Server: {exc.errors()[0]['msg']}") from exc


def _detail(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            if body.get(key):
                return str(body[key])
    return "no details"
