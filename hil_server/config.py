"""HIL Server settings: environment variables, then `.env` in the working directory, then defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True)

    hil_host: str = "0.0.0.0"
    hil_port: int = 8081
    hil_mode: Literal["auto", "relay", "direct"] = "auto"
    bot_key: SecretStr | None = None
    hil_worker_token: SecretStr | None = None
    heartbeat_interval: float = 30.0
    heartbeat_timeout: float = 90.0
    wecom_api_base: str = "https://qyapi.weixin.qq.com"
    wecom_sender: Literal["webhook", "pigeon", "auto"] = "webhook"
    wecom_max_per_minute: int | None = Field(default=None, ge=1)
    wecom_retry_deadline: float = 60.0
    hil_data_dir: Path = Path("./data")
    hil_store: Literal["sqlite", "memory"] = "sqlite"
    hil_api_tokens: SecretStr | None = None
    callback_auth_key: str | None = None
    callback_auth_value: SecretStr | None = None
    wecom_callback_token: SecretStr | None = None
    wecom_callback_aes_key: SecretStr | None = None
    # seconds a send waits for a worker to (re)connect in relay mode before failing
    worker_grace: float = 10.0
    relay_request_timeout: float = 90.0
    default_timeout: float = 1200.0
    # how long a closed question (replied / timed out) is kept, so late answers are not lost
    session_retention: float = 24 * 3600.0
    sweep_interval: float = 5.0
    max_body_bytes: int = 4 * 1024 * 1024
    hil_log_level: str = "INFO"
    hil_log_format: Literal["text", "json"] = "text"

    @property
    def mode(self) -> Literal["relay", "direct"]:
        if self.hil_mode == "auto":
            return "direct" if self.bot_key and self.bot_key.get_secret_value() else "relay"
        return self.hil_mode
