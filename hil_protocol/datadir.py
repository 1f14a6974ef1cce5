"""One writing process per data directory.

The HIL Server's store and the worker's spool are SQLite files that one process writes at a time; a second process
on the same directory would time out the first one's questions or replay its callbacks. Each process takes an
exclusive lock on `<data dir>/<name>.lock` for its whole life; a second one refuses to start and names the holder.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock file still names the holder, but does not exclude
    fcntl = None  # type: ignore[assignment]


class DataDirError(RuntimeError):
    """The data directory cannot be used; `str()` is one line that says what to do."""


class DataDirLock:
    def __init__(self, directory: Path, name: str, setting: str = "HIL_DATA_DIR (or --data-dir)") -> None:
        self.directory = directory
        self.setting = setting  # what the person sets to choose another directory, named in the errors
        self.path = directory / f"{name}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DataDirError(
                f"data directory {self.directory} is not writable ({exc.strerror or type(exc).__name__}); "
                f"set {self.setting} to a directory this user can write"
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd) or "another process"
                os.close(fd)
                raise DataDirError(
                    f"data directory {self.directory} is in use by {holder}; one process per data directory: "
                    f"stop that one, or give this one its own {self.setting}"
                ) from None
        try:
            os.ftruncate(fd, 0)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode())
        except OSError as exc:
            os.close(fd)
            raise DataDirError(
                f"cannot write to data directory {self.directory} ({exc.strerror or type(exc).__name__}); "
                "is the disk full or read-only?"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _read(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 200).decode(errors="replace").strip()
    except OSError:
        return ""
