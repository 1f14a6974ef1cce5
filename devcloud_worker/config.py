"""Worker settings: environment variables, then `.env` in the working directory, then defaults."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from hil_protocol.settings import RobotSettings


class WorkerSettings(RobotSettings):
    hil_url: str = "ws://localhost:8081/ws"
    hil_token: SecretStr | None = None
    bot_key: SecretStr = Field(description="the WeCom robot's webhook key (required)")  # type: ignore[assignment]
    callback_host: str = "0.0.0.0"
    callback_port: int = Field(default=8082, ge=0, le=65535)
    worker_id: str = Field(default_factory=lambda: "worker-" + uuid.uuid4().hex[:8])
    reconnect_min_delay: float = Field(default=0.5, gt=0)
    reconnect_max_delay: float = Field(default=30.0, gt=0)
    # how long to wait for the server's hello before treating it as a seed server (no callback acknowledgements)
    hello_timeout: float = Field(default=1.0, gt=0)

    # --- new in 0.3 (HIL_ prefix): health, supervision, replay ---
    # /health answers 503 once the link to the HIL Server has been down this long (seconds)
    hil_link_down_grace: float = Field(default=60.0, gt=0)
    # the link task crashing this many times within a minute stops the process with exit code 1
    hil_link_max_crashes: int = Field(default=5, ge=1)
    # WebSocket keepalive: ping the server this often; a pong later than the timeout drops the link (seconds)
    hil_ping_interval: float = Field(default=20.0, gt=0)
    hil_ping_timeout: float = Field(default=20.0, gt=0)
    # spooled callbacks sent and not yet acknowledged by the server, at most
    hil_spool_window: int = Field(default=100, ge=1, le=10_000)
    # a callback the server has not acknowledged after this many seconds is sent again
    hil_callback_ack_timeout: float = Field(default=30.0, gt=0)
    # a callback that was the oldest unacknowledged one when the link dropped this many times is set aside
    # (table `dead` in the spool) so it cannot hold up the ones behind it
    hil_callback_max_attempts: int = Field(default=10, ge=1)

    @field_validator("bot_key")
    @classmethod
    def _bot_key_set(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("BOT_KEY is empty: set it to the WeCom robot's webhook key")
        return value

    @field_validator("hil_url")
    @classmethod
    def _ws_url(cls, value: str) -> str:
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018  (raises ValueError for a port out of range)
        except ValueError as exc:
            raise ValueError(f"HIL_URL has a bad port: {value!r}") from exc
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"HIL_URL must be a WebSocket URL (ws://host:port/ws or wss://host/ws): {value!r}")
        return value
