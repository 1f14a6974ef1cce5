"""Sandbox tools: a fake WeCom robot API for end-to-end tests and demos.

The fake is written from WeCom's documented behaviour only and imports nothing from the other hil packages, so a test
that passes against it does not merely check our code against itself.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CallbackNotConfiguredError",
    "FakeWeCom",
    "FakeWeComConfig",
    "SendAttempt",
    "SentMessage",
    "UploadedMedia",
    "create_fake_wecom_app",
    "format_quote_reply",
]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m hil_sandbox.fake_wecom` does not import the module twice (runpy warns about that).
    if name in __all__:
        from hil_sandbox import fake_wecom

        return getattr(fake_wecom, name)
    raise AttributeError(f"module 'hil_sandbox' has no attribute {name!r}")
