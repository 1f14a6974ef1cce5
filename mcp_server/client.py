"""The HIL Server's HTTP API, as hil-mcp uses it."""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

import anyio
import httpx

IMAGE_MAX_BYTES = 2 * 1024 * 1024


class HilApiError(Exception):
    """The HIL Server could not be reached or refused the request; `str()` says what to do."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class HilClient:
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
            raise HilApiError(f"HIL Server at {self.base_url} did not answer in time", retryable=True) from exc
        except httpx.TransportError as exc:
            raise HilApiError(
                f"cannot reach the HIL Server at {self.base_url} ({type(exc).__name__}); is it running, and is "
                "--service-url / SERVICE_URL right? (a proxy in http_proxy/https_proxy can also get in the way)",
                retryable=True,
            ) from exc
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code == 401:
            raise HilApiError(f"the HIL Server refused the API token: {_detail(body)}. Set --api-token / HIL_API_TOKEN")
        if response.status_code == 403:
            raise HilApiError(f"the HIL Server refused: {_detail(body)}")
        if response.status_code >= 500:
            raise HilApiError(f"the HIL Server failed (HTTP {response.status_code})", retryable=True)
        if response.status_code >= 400 and response.status_code != 404:
            raise HilApiError(f"the HIL Server refused the request (HTTP {response.status_code}): {_detail(body)}")
        if not isinstance(body, dict):
            raise HilApiError(f"unexpected answer from the HIL Server (HTTP {response.status_code})")
        return body

    async def send(self, payload: dict[str, Any]) -> dict[str, Any]:
        # Sending may include WeCom retries on the server side; give it time.
        return await self._request("POST", "/api/send", json=payload, timeout=120)

    async def poll(self, session_id: str, wait: float = 0) -> dict[str, Any]:
        params = {"wait": f"{wait:.1f}"} if wait > 0 else None
        return await self._request("GET", f"/api/poll/{session_id}", params=params, timeout=wait + 15)

    async def mark_timeout(self, session_id: str) -> None:
        await self._request("POST", f"/api/session/{session_id}/timeout", timeout=10)

    async def upload_image(self, path: Path) -> str:
        data = await anyio.Path(path).read_bytes()
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        body = await self._request("POST", "/api/upload-image", files={"file": (path.name, data, mime)}, timeout=60)
        if not body.get("success") or not body.get("image_url"):
            raise HilApiError(f"uploading {path.name} failed: {body.get('error') or body.get('message')}")
        return str(body["image_url"])


def _detail(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            if body.get(key):
                return str(body[key])
    return "no details"
