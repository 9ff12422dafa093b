"""Durable, atomic file replacement: temp file, fsync, rename, fsync of the directory."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .crash import crashpoint, fault

TMP_PREFIX = ".tmp-"


def fsync(fd: int) -> None:
    fault("fsync")
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    fault("write")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    fault("write")
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new content."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        write_all(fd, data)
        fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    crashpoint("atomic-write-before-rename")
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def remove_temps(directory: Path) -> None:
    """Delete temp files a crashed writer left behind (only the lock holder calls this)."""
    for entry in os.scandir(directory):
        if entry.name.startswith(TMP_PREFIX):
            os.unlink(entry.path)
