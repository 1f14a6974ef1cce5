"""Worker settings: environment variables, then `.env` in the working directory, then defaults."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True)

    hil_url: str = "ws://localhost:8081/ws"
    hil_token: SecretStr | None = None
    bot_key: SecretStr = Field(description="the WeCom robot's webhook key (required)")
    callback_host: str = "0.0.0.0"
    callback_port: int = 8082
    callback_auth_key: str | None = None
    callback_auth_value: SecretStr | None = None
    worker_id: str = Field(default_factory=lambda: "worker-" + uuid.uuid4().hex[:8])
    wecom_api_base: str = "https://qyapi.weixin.qq.com"
    wecom_sender: Literal["webhook", "pigeon", "auto"] = "webhook"
    wecom_max_per_minute: int | None = Field(default=None, ge=1)
    wecom_retry_deadline: float = 60.0
    hil_data_dir: Path = Path("./data")
    wecom_callback_token: SecretStr | None = None
    wecom_callback_aes_key: SecretStr | None = None
    reconnect_min_delay: float = 0.5
    reconnect_max_delay: float = 30.0
    # how long to wait for the server's hello before treating it as a seed server (no callback acknowledgements)
    hello_timeout: float = 1.0
    hil_log_level: str = "INFO"
    hil_log_format: Literal["text", "json"] = "text"

    @field_validator("bot_key")
    @classmethod
    def _bot_key_set(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("BOT_KEY is empty: set it to the WeCom robot's webhook key")
        return value

    def secrets(self) -> list[str]:
        values = [
            self.hil_token,
            self.bot_key,
            self.callback_auth_value,
            self.wecom_callback_token,
            self.wecom_callback_aes_key,
        ]
        return [v.get_secret_value() for v in values if v is not None and v.get_secret_value()]
