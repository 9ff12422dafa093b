"""The volume lock: a kernel flock, so a dead process leaves no stale lock."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from ..errors import IntegrityError, VolumeLocked


class VolumeLock:
    """A flock on a file in `.volsync/`; the holder writes its pid there for others to name.
    `why` says, in a refusal, what the holder is doing with the volume."""

    def __init__(self, path: Path, volume: str, why: str = ""):
        self.path = path
        self.volume = volume
        self.why = why
        self.fd: int | None = None

    def acquire(self, wait: float = 0.0, shared: bool = False) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise IntegrityError(f"{self.path} is a symlink, not a lock file") from None
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise VolumeLocked(self.volume, holder_pid(self.path), self.why) from None
                time.sleep(0.05)
        # the pid overwrites the last holder's and the file is never emptied (not on release
        # either): a command refused at any moment finds a pid to name, this holder's or
        # that of the one it just followed (readers sharing the lock write theirs too)
        pid = f"{os.getpid()}\n".encode()
        try:
            os.pwrite(fd, pid, 0)
            os.ftruncate(fd, len(pid))
        except BaseException:
            os.close(fd)  # never keep a lock this command will not use
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def holder_pid(path: Path) -> int | None:
    try:
        words = path.read_text().split()
    except OSError:
        return None
    # the first line is the pid (a longer previous one may trail it for a moment)
    return int(words[0]) if words and words[0].isdigit() else None


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
