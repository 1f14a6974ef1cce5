"""hil-mcp settings. Precedence: command-line flag > environment > `.env` > default."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class McpSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True, populate_by_name=True
    )

    service_url: str = Field(
        default="http://localhost:8081",
        validation_alias=AliasChoices("service_url", "SERVICE_URL", "DEVCLOUD_SERVICE_URL"),
    )
    mode: Literal["auto", "direct", "relay"] = Field(
        default="auto", validation_alias=AliasChoices("mode", "SERVICE_MODE")
    )  # accepted for compatibility: the server decides its mode
    chat_id: str | None = Field(default=None, validation_alias=AliasChoices("chat_id", "DEFAULT_CHAT_ID"))
    project_name: str | None = Field(
        default=None, validation_alias=AliasChoices("project_name", "DEFAULT_PROJECT_NAME")
    )
    timeout: float = Field(default=1200.0, gt=0, validation_alias=AliasChoices("timeout", "DEFAULT_TIMEOUT"))
    poll_interval: float = Field(default=2.0, gt=0, validation_alias=AliasChoices("poll_interval", "POLL_INTERVAL"))
    api_token: SecretStr | None = Field(default=None, validation_alias=AliasChoices("api_token", "HIL_API_TOKEN"))
    # Longest single long-poll: progress goes out at least this often (9 s keeps "every 10 s" with room to spare).
    heartbeat_interval: float = Field(
        default=9.0, gt=0, validation_alias=AliasChoices("heartbeat_interval", "HIL_HEARTBEAT")
    )
    # Longest single tool call before it returns "waiting" (the question stays open; wait_for_reply goes on):
    # under the 60 s at which MCP TypeScript SDK clients cut a call. Clients known to wait longer get `timeout`.
    max_call_seconds: float = Field(
        default=50.0, gt=0, validation_alias=AliasChoices("max_call_seconds", "HIL_MAX_CALL")
    )
    log_level: str = Field(default="WARNING", validation_alias=AliasChoices("log_level", "HIL_LOG_LEVEL"))

    @field_validator("service_url")
    @classmethod
    def _base(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value.endswith("/api"):
            value = value[: -len("/api")]
        if not value.startswith(("http://", "https://")):
            raise ValueError("--service-url must start with http:// or https://")
        return value

    @field_validator("chat_id", "project_name", "api_token", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value
