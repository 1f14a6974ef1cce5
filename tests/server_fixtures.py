"""Fixtures shared by the tests that build the HIL Server with create_app(settings) under TestClient: a clean
environment, test settings, and a respx stand-in for WeCom's robot webhook. Loaded as a plugin by conftest.py;
a module opts in to the clean environment with `pytestmark = pytest.mark.usefixtures("clean_env")`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from fastapi.testclient import TestClient

from hil_server.app import create_app
from hil_server.config import ServerSettings
from tests.helpers import eventually, scrub_env

BASE = "https://wecom.test"
SEND = "/cgi-bin/webhook/send"
BOT_KEY = "test-bot-key-abcdef"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Settings read the environment and ./.env: neither may leak into the test (which may set its own)."""
    scrub_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def settings(tmp_path: Path, **kw: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "hil_mode": "direct",
        "bot_key": BOT_KEY,
        "wecom_api_base": BASE,
        "hil_data_dir": tmp_path / "data",
        "wecom_retry_deadline": 2.0,
        "worker_grace": 0.2,
    }
    values.update(kw)
    return ServerSettings(**values)


class WeCom:
    """respx stand-in for the robot webhook: records what it accepted, answers with `errcode`."""

    def __init__(self, router: respx.MockRouter) -> None:
        self.errcode = 0
        self.accepted: list[dict[str, Any]] = []
        self.route = router.post(SEND).mock(side_effect=self._send)

    def _send(self, request: httpx.Request) -> httpx.Response:
        assert request.url.params["key"] == BOT_KEY
        if self.errcode:
            return httpx.Response(200, json={"errcode": self.errcode, "errmsg": "invalid webhook url"})
        self.accepted.append(json.loads(request.content))
        return httpx.Response(200, json={"errcode": 0, "errmsg": "ok"})

    def texts(self) -> list[str]:
        return [p["text"]["content"] for p in self.accepted if p["msgtype"] == "text"]

    def markdowns(self) -> list[str]:
        return [p["markdown"]["content"] for p in self.accepted if p["msgtype"] == "markdown"]

    def wait_for(self, predicate: Any, timeout: float = 2.0) -> None:
        eventually(predicate, timeout, f"WeCom did not get the expected message; got {self.accepted}")


@pytest.fixture
def wecom() -> Iterator[WeCom]:
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield WeCom(router)


@pytest.fixture
def client(tmp_path: Path, wecom: WeCom) -> Iterator[TestClient]:
    with TestClient(create_app(settings(tmp_path))) as c:
        yield c
