"""The volume lock: a kernel flock, so a dead process leaves no stale lock."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from ..errors import VolumeLocked


class VolumeLock:
    """Exclusive lock on `.volsync/lock`; the holder writes its pid there for others to name."""

    def __init__(self, path: Path, volume: str):
        self.path = path
        self.volume = volume
        self.fd: int | None = None

    def acquire(self, wait: float = 0.0) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise VolumeLocked(self.volume, holder_pid(self.path)) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def holder_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def current_holder(path: Path) -> int | None:
    """The pid holding the lock now, or None when it is free (probe without blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return holder_pid(path) or -1
    finally:
        os.close(fd)
    return None
