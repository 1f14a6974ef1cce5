"""`hil-worker` / `python -m devcloud_worker`: run the DevCloud Worker. Flags override the environment and `.env`."""

from __future__ import annotations

import argparse
import contextlib
import signal
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

from hil_protocol.cli import console_parser, fail, load_settings, run_process

from . import __version__
from .config import WorkerSettings  # settings need only the base install: --help and bad values work without the extra

PROG = "hil-worker"
DESCRIPTION = (
    "DevCloud Worker: inside the intranet, keeps a WebSocket to the HIL Server, sends its messages to "
    "WeCom (企业微信) and forwards the robot's callbacks. Settings come from the environment and .env "
    "(see deploy/worker.env.example; BOT_KEY is required); these flags override them."
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = console_parser(PROG, __version__, DESCRIPTION)
    parser.add_argument("--hil-url", help="the HIL Server's WebSocket URL (HIL_URL, default ws://localhost:8081/ws)")
    parser.add_argument("--host", help="callback listen address (CALLBACK_HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="callback listen port (CALLBACK_PORT, default 8082)")
    parser.add_argument("--data-dir", help="where the callback spool lives (HIL_DATA_DIR, default ./data)")
    parser.add_argument("--worker-id", help="this worker's name on the server (WORKER_ID, default random)")
    return parser.parse_args(argv)


class FatalExit:
    """Stops the process with exit status 1 when the worker cannot be kept alive, so systemd or docker restart it.

    uvicorn shuts down gracefully on SIGTERM (callbacks in flight are answered, the spool is closed), so `request`
    raises SIGTERM in this process; once uvicorn is done it raises the signal again, and the handler installed by
    `armed` turns it into exit status 1 instead of a death by signal (which systemd counts as a clean stop)."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            signal.raise_signal(signal.SIGTERM)

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)
        self.check()  # a server that did not raise the signal again

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.check()
        signal.signal(signum, signal.SIG_DFL)  # a plain SIGTERM: stop the way it always did
        signal.raise_signal(signum)

    def check(self) -> None:
        if self.reason is not None:
            fail(PROG, f"stopped, the worker cannot be kept alive: {self.reason}", 1)


def settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    """The flags over the environment, `.env` and the defaults; a bad or missing value exits with one line."""
    overrides = {
        "hil_url": args.hil_url,
        "callback_host": args.host,
        "callback_port": args.port,
        "hil_data_dir": args.data_dir,
        "worker_id": args.worker_id,
    }
    return load_settings(WorkerSettings, PROG, overrides)


def main(argv: Sequence[str] | None = None) -> None:
    settings = settings_from_args(parse_args(argv))

    fatal = FatalExit()

    def build() -> Any:
        from .worker import create_app

        return create_app(settings, on_fatal=fatal.request)

    with fatal.armed():
        run_process(
            PROG,
            settings,
            build,
            lock="hil-worker",
            data_dir=settings.hil_data_dir,
            host=settings.callback_host,
            port=settings.callback_port,
            flag="--port / CALLBACK_PORT",
        )
