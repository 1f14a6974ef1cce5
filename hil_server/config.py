"""HIL Server settings: environment variables, then `.env` in the working directory, then defaults."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, field_validator

from hil_protocol.settings import RobotSettings, secret_value

if TYPE_CHECKING:
    from .channels.aibot import AibotOptions

ChannelName = Literal["aibot", "webhook", "relay"]
AIBOT_PREFIX = "hil_aibot_"


class ServerSettings(RobotSettings):
    hil_host: str = "0.0.0.0"
    hil_port: int = Field(default=8081, ge=0, le=65535)
    hil_mode: Literal["auto", "relay", "direct"] = "auto"
    hil_worker_token: SecretStr | None = None
    heartbeat_interval: float = Field(default=30.0, gt=0)
    heartbeat_timeout: float = Field(default=90.0, gt=0)
    hil_store: Literal["sqlite", "memory"] = "sqlite"
    # postgresql://user:password@host:port/dbname: the store is this PostgreSQL database (unset: SQLite in
    # HIL_DATA_DIR, or memory with HIL_STORE=memory)
    hil_database_url: SecretStr | None = None
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
    # how long the audit trail (every question, answer, refusal and decision) is kept, seconds; independent of
    # SESSION_RETENTION (default 180 days)
    hil_audit_retention: float = Field(default=180 * 86400.0, gt=0)

    # The WeCom AI bot (智能机器人) over its long connection: auto picks it when WECOM_AIBOT_ID is set.
    hil_channel: Literal["auto", "webhook", "aibot"] = "auto"
    wecom_aibot_id: str | None = Field(default=None, max_length=128)
    wecom_aibot_secret: SecretStr | None = None
    wecom_aibot_url: str = "wss://openws.work.weixin.qq.com"
    # seconds between the link's pings; this many unanswered pings in a row mean a dead link
    hil_aibot_ping_interval: float = Field(default=30.0, gt=0)
    hil_aibot_missed_pings: int = Field(default=2, ge=1)
    # reconnect backoff (seconds, doubling) after a lost link
    hil_aibot_reconnect_min_delay: float = Field(default=1.0, gt=0)
    hil_aibot_reconnect_max_delay: float = Field(default=30.0, gt=0)
    # seconds between attempts while WeCom refuses the bot id / secret
    hil_aibot_auth_retry: float = Field(default=60.0, gt=0)
    # seconds to stay off after another connection took the bot over (not fighting for it)
    hil_aibot_takeover_backoff: float = Field(default=300.0, gt=0)
    # seconds the link may be down before /health answers 503
    hil_aibot_down_grace: float = Field(default=30.0, ge=0)
    # seconds a message waits for the link to be up and for WeCom's answer
    hil_aibot_send_timeout: float = Field(default=10.0, gt=0)
    # bytes of markdown per message (WeCom's limit for the AI bot is not published; the robot's 4096 is safe)
    hil_aibot_markdown_limit: int = Field(default=4096, ge=512, le=20480)
    # largest image a person sends that is passed on to the agent (as a data URL), bytes
    hil_aibot_image_max_bytes: int = Field(default=5 * 1024 * 1024, ge=1024)
    # WeCom's pace for one AI bot (about 30/min and 1000/h by secondary sources; 0 = no limit), and the windows
    # those counts are taken over (knobs for tests: 60 s and 3600 s in real life)
    wecom_aibot_max_per_minute: int = Field(default=30, ge=0)
    wecom_aibot_max_per_hour: int = Field(default=1000, ge=0)
    hil_aibot_minute_window: float = Field(default=60.0, gt=0)
    hil_aibot_hour_window: float = Field(default=3600.0, gt=0)
    # seconds one image's upload over the long connection may take (init, chunks, finish)
    hil_aibot_upload_timeout: float = Field(default=60.0, gt=0)

    @field_validator("wecom_aibot_url")
    @classmethod
    def _aibot_url(cls, value: str) -> str:
        if not value.startswith(("wss://", "ws://")) or len(value) < 7:
            raise ValueError("WECOM_AIBOT_URL must be a ws:// or wss:// URL, e.g. wss://openws.work.weixin.qq.com")
        return value

    @property
    def uses_aibot(self) -> bool:
        """HIL_CHANNEL=aibot, or auto with WECOM_AIBOT_ID set."""
        return self.hil_channel == "aibot" or (self.hil_channel == "auto" and bool(self.wecom_aibot_id))

    @property
    def channel(self) -> ChannelName:
        """How the server reaches people: the AI bot's long connection, the robot webhook (direct) or workers."""
        if self.uses_aibot:
            return "aibot"
        return "webhook" if self.mode == "direct" else "relay"

    def aibot_options(self) -> AibotOptions:
        from .channels.aibot import AibotOptions

        secret = secret_value(self.wecom_aibot_secret)
        if not self.wecom_aibot_id or not secret:
            raise ValueError(
                "HIL_CHANNEL=aibot needs WECOM_AIBOT_ID and WECOM_AIBOT_SECRET (the AI bot's Bot ID and Secret: "
                "WeCom admin console → 智能机器人 → the bot → API 模式, long connection)"
            )
        # How to hold the connection: each HIL_AIBOT_<NAME> setting is AibotOptions' <name>.
        tuning: dict[str, Any] = {
            name.removeprefix(AIBOT_PREFIX): getattr(self, name)
            for name in type(self).model_fields
            if name.startswith(AIBOT_PREFIX)
        }
        tuning["reconnect_max_delay"] = max(tuning["reconnect_max_delay"], tuning["reconnect_min_delay"])
        tuning["max_per_minute"] = self.wecom_aibot_max_per_minute
        tuning["max_per_hour"] = self.wecom_aibot_max_per_hour
        return AibotOptions(bot_id=self.wecom_aibot_id, secret=secret, url=self.wecom_aibot_url, **tuning)

    @property
    def default_responders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(u.strip() for u in self.hil_default_responders.split(",") if u.strip()))

    # /mcp: seconds between progress notifications while a tool waits (clients cut calls silent for long), and the
    # browser origins (comma-separated, e.g. https://ide.example.com) allowed to call it; other origins get 403.
    hil_mcp_heartbeat: float = Field(default=9.0, gt=0, le=60)
    hil_mcp_allowed_origins: str = ""
    # /mcp: the longest single tool call before it returns "waiting" (under the MCP TypeScript SDK's 60 s cut), and
    # the clients (clientInfo.name, comma-separated) that may wait HIL_DEFAULT_TIMEOUT in one call.
    hil_mcp_max_call: float = Field(default=50.0, gt=0)
    hil_mcp_long_call_clients: str = ""
    # /mcp sessions (the 2025 protocol's Mcp-Session-Id): per token, the least recently used is closed to open one
    # more; in all, more are refused with 503 (and /health says so); idle ones close after HIL_MCP_SESSION_IDLE s.
    hil_mcp_sessions_per_token: int = Field(default=50, ge=1)
    hil_mcp_max_sessions: int = Field(default=1000, ge=1)
    hil_mcp_session_idle: float = Field(default=1800.0, gt=0)

    @property
    def mode(self) -> Literal["relay", "direct"]:
        """direct: this server talks to WeCom itself (the robot webhook, or the AI bot); relay: workers do."""
        if self.hil_mode == "auto":
            return "direct" if secret_value(self.bot_key) or self.uses_aibot else "relay"
        return self.hil_mode

    def secrets(self) -> list[str]:
        # HIL_API_TOKENS is a list (`tokA,tokB=chat1|chat2`): each token is a secret, the chat ids are not.
        tokens = [item.partition("=")[0].strip() for item in (secret_value(self.hil_api_tokens) or "").split(",")]
        return [s for s in super().secrets() if s != secret_value(self.hil_api_tokens)] + [t for t in tokens if t]
