"""Settings the HIL Server and the worker share (the WeCom robot, its callback, data dir, logs), and the builders
that turn them into the objects both processes run: one place, so the two cannot drift apart.

Names are the environment variables (case-insensitive), read from the environment, then `.env` in the working
directory, then the defaults here. Settings a process adds that are not seed names carry a `HIL_` prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    import httpx

    from .callback_endpoint import CallbackIntake
    from .wecom_robot import RobotSender


def secret_value(value: SecretStr | None) -> str | None:
    """The secret's text, or None when unset or blank."""
    if value is None:
        return None
    return value.get_secret_value() or None


class CommonSettings(BaseSettings):
    """Fields every process has: logging."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True)

    hil_log_level: str = "INFO"
    hil_log_format: Literal["text", "json"] = "text"

    def secrets(self) -> list[str]:
        """Every configured secret value, so the log filter can redact it wherever it appears."""
        values = [getattr(self, name) for name in type(self).model_fields]
        found = [secret_value(value) for value in values if isinstance(value, SecretStr)]
        return [value for value in found if value]


class RobotSettings(CommonSettings):
    """The WeCom group robot: sending through its webhook, and its callback (fly-pigeon JSON or WeCom's signed,
    encrypted form). Shared by the HIL Server (direct mode) and the DevCloud Worker."""

    bot_key: SecretStr | None = None
    wecom_api_base: str = "https://qyapi.weixin.qq.com"
    wecom_sender: Literal["webhook", "pigeon", "auto"] = "webhook"
    wecom_max_per_minute: int | None = Field(default=None, ge=1)
    wecom_retry_deadline: float = Field(default=60.0, gt=0)
    callback_auth_key: str | None = None
    callback_auth_value: SecretStr | None = None
    wecom_callback_token: SecretStr | None = None
    wecom_callback_aes_key: SecretStr | None = None
    # seconds a signed callback's timestamp may be off from now before it is refused as a replay
    hil_callback_max_age: float = Field(default=300.0, ge=10)
    hil_data_dir: Path = Path("./data")
    # seconds a request body may take to arrive before the connection is closed (slow-body clients)
    hil_body_timeout: float = Field(default=30.0, gt=0)
    # Fetch image URLs from private and loopback addresses too (intranet image hosts); off: public addresses only.
    hil_image_allow_private: bool = False
    # seconds between checks of a BOT_KEY WeCom refused (errcode 93000/93004), until it works again
    hil_key_check_interval: float = Field(default=60.0, gt=0)

    def robot_sender(self, http: httpx.AsyncClient, on_attempt: Callable[[int], None] | None = None) -> RobotSender:
        """The one client every message to this robot goes through; `on_attempt` sees each attempt's errcode."""
        from .images import ImageFetcher
        from .wecom_robot import RetryPolicy, RobotSender, make_backend

        key = secret_value(self.bot_key)
        if key is None:
            raise ValueError("BOT_KEY is not set: the WeCom robot's webhook key is needed to send")
        backend = make_backend(self.wecom_sender, http, self.wecom_api_base, key)
        policy = RetryPolicy(deadline=self.wecom_retry_deadline, max_per_minute=self.wecom_max_per_minute)
        images = ImageFetcher(allow_private=self.hil_image_allow_private)
        return RobotSender(
            backend, policy, images=images, on_attempt=on_attempt, key_check_interval=self.hil_key_check_interval
        )

    def callback_intake(self) -> CallbackIntake:
        """How this process reads the robot's callback requests."""
        from .callback_endpoint import CallbackIntake

        return CallbackIntake(
            self.callback_auth_key,
            secret_value(self.callback_auth_value),
            secret_value(self.wecom_callback_token),
            secret_value(self.wecom_callback_aes_key),
            max_age=self.hil_callback_max_age,
        )
