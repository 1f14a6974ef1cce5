"""HIL Server settings: environment variables, then `.env` in the working directory, then defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from hil_protocol.settings import RobotSettings, secret_value


class ServerSettings(RobotSettings):
    hil_host: str = "0.0.0.0"
    hil_port: int = Field(default=8081, ge=0, le=65535)
    hil_mode: Literal["auto", "relay", "direct"] = "auto"
    hil_worker_token: SecretStr | None = None
    heartbeat_interval: float = Field(default=30.0, gt=0)
    heartbeat_timeout: float = Field(default=90.0, gt=0)
    hil_store: Literal["sqlite", "memory"] = "sqlite"
    hil_api_tokens: SecretStr | None = None
    # seconds a send waits for a worker to (re)connect in relay mode before failing
    worker_grace: float = Field(default=10.0, ge=0)
    relay_request_timeout: float = Field(default=90.0, gt=0)
    # how long a closed question (replied / timed out) is kept, so late answers are not lost
    session_retention: float = Field(default=24 * 3600.0, gt=0)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # The server's own settings added after the seed carry HIL_, so a variable meant for hil-mcp (DEFAULT_TIMEOUT)
    # never changes the server. Seconds a question waits when /api/send gives no timeout:
    hil_default_timeout: float = Field(default=1200.0, gt=0)
    hil_sweep_interval: float = Field(default=5.0, gt=0)
    # the chat a question goes to when /api/send names none (WeCom's chat id, as the chat-id hint shows it);
    # unset: the robot's default delivery (its group chats)
    hil_default_chat_id: str | None = None
    # comma-separated WeCom userids who may answer a question that names no responders (empty: anyone in the chat)
    hil_default_responders: str = ""
    # relay mode takes robot callbacks through its workers only; true also serves /api/callback (authenticated)
    hil_relay_callbacks: bool = False
    # seconds between attempts to write again after the store failed (a full or failing disk)
    hil_store_retry_interval: float = Field(default=2.0, gt=0)

    @property
    def default_responders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(u.strip() for u in self.hil_default_responders.split(",") if u.strip()))

    # /mcp: seconds between progress notifications while a tool waits (clients cut calls silent for long), and the
    # browser origins (comma-separated, e.g. https://ide.example.com) allowed to call it; other origins get 403.
    hil_mcp_heartbeat: float = Field(default=9.0, gt=0, le=60)
    hil_mcp_allowed_origins: str = ""

    @property
    def mode(self) -> Literal["relay", "direct"]:
        if self.hil_mode == "auto":
            return "direct" if secret_value(self.bot_key) else "relay"
        return self.hil_mode

    def secrets(self) -> list[str]:
        # HIL_API_TOKENS is a list (`tokA,tokB=chat1|chat2`): each token is a secret, the chat ids are not.
        tokens = [item.partition("=")[0].strip() for item in (secret_value(self.hil_api_tokens) or "").split(",")]
        return [s for s in super().secrets() if s != secret_value(self.hil_api_tokens)] + [t for t in tokens if t]
