"""Durable, atomic file replacement: temp file, fsync, rename, fsync of the directory."""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def read_nofollow(path: Path) -> bytes:
    """A metadata file's bytes, never through a symlink (ELOOP) and only from a regular file."""
    with _regular_file(path) as (fd, _), os.fdopen(os.dup(fd), "rb") as f:
        return f.read()


def map_nofollow(path: Path) -> bytes | mmap.mmap:
    """A metadata file's bytes as `read_nofollow` gives them, but mapped (the page cache's,
    not this process's own memory: for a big file read once, as the stat cache). volsync
    replaces such files by rename, never in place, so the mapped inode does not change."""
    with _regular_file(path) as (fd, st):
        if st.st_size == 0:
            return b""
        return mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)


@contextmanager
def _regular_file(path: Path) -> Iterator[tuple[int, os.stat_result]]:
    """The file opened read-only without following a symlink, and its stat; anything but a
    regular file is EINVAL."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        yield fd, st
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new content."""
    atomic_write_with(path, lambda fd: write_all(fd, data), sync_dir=sync_dir)


def atomic_write_with(path: Path, fill: Callable[[int], object], *,
                      sync_dir: bool = True) -> None:
    """`atomic_write` of what `fill(fd)` writes into a new file (opened read-write, so it
    may write at offsets and read back what it wrote)."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        fill(fd)
        fsync(fd)
    except OSError as exc:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from None
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


def nearest_real(path: Path) -> str:
    """The real path of `path`, or of its nearest existing parent plus the rest (a path
    that does not exist yet, compared as where it would be created)."""
    rest: list[str] = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        rest.insert(0, p.name)
        p = p.parent
    return os.path.join(os.path.realpath(p), *rest)
