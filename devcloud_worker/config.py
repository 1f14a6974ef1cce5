"""Worker settings: environment variables, then `.env` in the working directory, then defaults."""

from __future__ import annotations

import uuid

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

    @field_validator("bot_key")
    @classmethod
    def _bot_key_set(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("BOT_KEY is empty: set it to the WeCom robot's webhook key")
        return value
