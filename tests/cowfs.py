"""Loop-mounted copy-on-write filesystems (btrfs, XFS with reflinks) for tests.

One sparse image of about 3 GiB per kind and per test process (each pytest-xdist worker makes
its own, under a fresh temporary directory), made and mounted on first use, unmounted and
deleted at the end of the session (and at interpreter exit, should the session not end
cleanly). Fixtures, imported into tests/conftest.py:

    btrfs_dir   a fresh empty directory on the btrfs mount, removed after the test
    xfs_dir     the same on the XFS mount (made with `-m reflink=1`)
    cow_dir     parametrized over both (ids "btrfs", "xfs")

When the filesystem cannot be had (not root, mkfs.btrfs / mkfs.xfs missing, mkfs or mount
failing), the test is skipped with a one-line reason naming the cause, unless
VOLSYNC_REQUIRE_COWFS=1 (CI), where it fails instead.

Helpers for tests on these filesystems, independent of volsync's own code:
`ficlone(src, dst)` makes dst a reflink copy of src; `extents(path)` lists a file's FIEMAP
extents as (logical, physical, length, flags); `shared_bytes(path)` sums the shared ones.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

KINDS = ("btrfs", "xfs")
IMAGE_BYTES = 3 << 30
MKFS = {
    "btrfs": ["mkfs.btrfs", "-q"],
    "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
}
PACKAGE = {"btrfs": "btrfs-progs", "xfs": "xfsprogs"}
REQUIRE_ENV = "VOLSYNC_REQUIRE_COWFS"

FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
FS_IOC_FIEMAP = 0xC020660B  # linux/fs.h: _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
_FIEMAP = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQQQI3I")  # logical, physical, length, reserved64[2], flags, reserved


class CowfsUnavailable(Exception):
    """This filesystem cannot be made or mounted here (the message says why, in one line)."""


def _tool(name: str) -> str | None:
    """The path of a system tool, also where /sbin is not on PATH (not root)."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


class _Mount:
    """One loop-mounted filesystem image: made by `mount()`, removed by `close()`."""

    def __init__(self, kind: str):
        self.kind = kind
        self.base: Path | None = None  # the temporary directory holding image and mountpoint
        self.where: Path | None = None  # the mountpoint, once mounted

    def mount(self) -> Path:
        kind = self.kind
        if os.geteuid() != 0:
            raise CowfsUnavailable(f"{kind}: loop-mounting needs root (running as uid "
                                   f"{os.geteuid()})")
        mkfs = _tool(MKFS[kind][0])
        if mkfs is None:
            raise CowfsUnavailable(f"{kind}: {MKFS[kind][0]} is not installed "
                                   f"(package {PACKAGE[kind]})")
        self.base = Path(tempfile.mkdtemp(prefix=f"volsync-cowfs-{kind}-{os.getpid()}-"))
        image, where = self.base / f"{kind}.img", self.base / "mnt"
        with open(image, "wb") as f:
            f.truncate(IMAGE_BYTES)  # sparse
        where.mkdir()
        made = subprocess.run([mkfs, *MKFS[kind][1:], str(image)], capture_output=True,
                              text=True, check=False)
        if made.returncode != 0:
            self.close()
            raise CowfsUnavailable(f"{kind}: {MKFS[kind][0]} failed: "
                                   f"{_one_line(made.stderr + made.stdout)}")
        mount = _tool("mount") or "mount"
        done = subprocess.run([mount, "-t", kind, "-o", "loop", str(image), str(where)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            self.close()
            raise CowfsUnavailable(f"{kind}: cannot loop-mount the image: "
                                   f"{_one_line(done.stderr + done.stdout)}")
        self.where = where
        return where

    def close(self) -> None:
        """Unmount (lazily when busy; the loop device goes with the last user) and delete
        the image. Idempotent."""
        if self.where is not None:
            umount = _tool("umount") or "umount"
            r = subprocess.run([umount, str(self.where)], capture_output=True, check=False)
            if r.returncode != 0:
                subprocess.run([umount, "-l", str(self.where)], capture_output=True,
                               check=False)
            self.where = None
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None


class CowMounts:
    """The session's mounts, one per kind, made on first request; a failure is remembered
    (the next request fails the same way without trying again)."""

    def __init__(self):
        self._mounts: dict[str, _Mount] = {}
        self._failed: dict[str, str] = {}

    def get(self, kind: str) -> Path:
        if kind in self._failed:
            raise CowfsUnavailable(self._failed[kind])
        m = self._mounts.get(kind)
        if m is None or m.where is None:
            m = _Mount(kind)
            try:
                m.mount()
            except CowfsUnavailable as e:
                self._failed[kind] = str(e)
                raise
            self._mounts[kind] = m
        assert m.where is not None
        return m.where

    def close(self) -> None:
        for m in self._mounts.values():
            m.close()
        self._mounts.clear()


def _unavailable(reason: str):
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"no copy-on-write filesystem: {reason} ({REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(f"no copy-on-write filesystem: {reason}")


@pytest.fixture(scope="session")
def cow_mounts():
    """The session's CowMounts (use btrfs_dir / xfs_dir / cow_dir instead)."""
    mounts = CowMounts()
    atexit.register(mounts.close)  # a session that does not finish cleanly
    try:
        yield mounts
    finally:
        mounts.close()
        atexit.unregister(mounts.close)


def _fresh_dir(mounts: CowMounts, kind: str, request):
    try:
        where = mounts.get(kind)
    except CowfsUnavailable as e:
        _unavailable(str(e))
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:40]
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=where))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def btrfs_dir(cow_mounts, request):
    """A fresh empty directory on a loop-mounted btrfs, removed after the test."""
    yield from _fresh_dir(cow_mounts, "btrfs", request)


@pytest.fixture
def xfs_dir(cow_mounts, request):
    """A fresh empty directory on a loop-mounted XFS with reflinks, removed after the test."""
    yield from _fresh_dir(cow_mounts, "xfs", request)


@pytest.fixture(params=KINDS, ids=list(KINDS))
def cow_dir(cow_mounts, request):
    """A fresh empty directory on each copy-on-write filesystem in turn (btrfs, xfs)."""
    yield from _fresh_dir(cow_mounts, request.param, request)


# --- helpers --------------------------------------------------------------------------------


def ficlone(src, dst) -> None:
    """Make `dst` (created or truncated) a reflink copy of the whole of `src`."""
    with open(src, "rb") as s, open(dst, "wb") as d:
        fcntl.ioctl(d.fileno(), FICLONE, s.fileno())


def extents(path, sync: bool = True) -> list[tuple[int, int, int, int]]:
    """The file's extents by FIEMAP: (logical, physical, length, flags) in order. Raises
    OSError (EOPNOTSUPP / ENOTTY) where the filesystem has no FIEMAP."""
    out: list[tuple[int, int, int, int]] = []
    batch = 64
    start = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            buf = bytearray(_FIEMAP.size + batch * _EXTENT.size)
            _FIEMAP.pack_into(buf, 0, start, (1 << 64) - 1 - start,
                              FIEMAP_FLAG_SYNC if sync else 0, 0, batch, 0)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            mapped = _FIEMAP.unpack_from(buf, 0)[3]
            if mapped == 0:
                return out
            for i in range(mapped):
                e = _EXTENT.unpack_from(buf, _FIEMAP.size + i * _EXTENT.size)
                logical, physical, length, flags = e[0], e[1], e[2], e[5]
                out.append((logical, physical, length, flags))
                if flags & FIEMAP_EXTENT_LAST:
                    return out
            start = logical + length
    finally:
        os.close(fd)


def shared_bytes(path) -> int:
    """The bytes of the file's extents marked shared (0 where FIEMAP is not supported)."""
    try:
        return sum(e[2] for e in extents(path) if e[3] & FIEMAP_EXTENT_SHARED)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
            return 0
        raise
