"""Disk space: what a volume's store (`.volsync/`) takes on disk, how much of that is shared
with other files (extents reflinked with the live tree or another volume on btrfs or XFS),
and what the live tree takes.

Allocated bytes are `st_blocks * 512`. Shared bytes come from FIEMAP: the extents the
filesystem marks FIEMAP_EXTENT_SHARED (referenced by more than one file or snapshot). Where
the filesystem has no FIEMAP (tmpfs) or shares nothing (ext4), shared is 0. XFS reports
sharing block by block. btrfs reports a whole extent as shared when any part of it is
referenced elsewhere (a clone of 64 KiB out of a 100 MiB pack extent marks all 100 MiB), and
keeps the whole extent allocated until no part is referenced, so on both "unshared" is about
what deleting the files would free.

Nothing is locked: the figures are a reading of a moment, as `df` and `du` give, and a file
that vanishes during the walk is passed over. The walks hold one directory's pending
subdirectories at a time (and the inodes of hard-linked files), never every path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass

FS_IOC_FIEMAP = 0xC020660B  # linux/fs.h: _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1  # flush dirty data first, so delayed allocations are mapped
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
# struct fiemap: fm_start, fm_length (u64); fm_flags, fm_mapped_extents, fm_extent_count,
# fm_reserved (u32); then fm_extent_count struct fiemap_extent: fe_logical, fe_physical,
# fe_length, fe_reserved64[2] (u64); fe_flags, fe_reserved[3] (u32): 56 bytes
_FIEMAP = struct.Struct("=QQIIII")
_EXTENT = struct.Struct("=QQQ16xI12x")
EXTENTS_PER_CALL = 256
_NO_FIEMAP = {errno.EOPNOTSUPP, errno.ENOTTY}
META = ".volsync"


@dataclass(frozen=True)
class StoreSpace:
    """A store's disk use: its regular files, the bytes allocated to it (files and
    directories), and how many of those are in extents shared with other files."""

    files: int
    allocated: int
    shared: int

    @property
    def unshared(self) -> int:
        return self.allocated - self.shared


def shared_extent_bytes(fd: int) -> int:
    """The bytes of the file's extents marked shared, by FIEMAP in batches; 0 where the
    filesystem does not support FIEMAP."""
    total = 0
    start = 0
    buf = bytearray(_FIEMAP.size + EXTENTS_PER_CALL * _EXTENT.size)
    while True:
        _FIEMAP.pack_into(buf, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0,
                          EXTENTS_PER_CALL, 0)
        buf[_FIEMAP.size:] = bytes(len(buf) - _FIEMAP.size)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as exc:
            if exc.errno in _NO_FIEMAP:
                return 0
            raise
        mapped = _FIEMAP.unpack_from(buf, 0)[3]
        if mapped == 0:
            return total
        end = start
        for i in range(mapped):
            logical, _physical, length, flags = _EXTENT.unpack_from(
                buf, _FIEMAP.size + i * _EXTENT.size)
            if flags & FIEMAP_EXTENT_SHARED:
                total += length
            if flags & FIEMAP_EXTENT_LAST:
                return total
            end = logical + length
        if end <= start:  # no progress (cannot happen with a sane filesystem): stop
            return total
        start = end


def file_space(fd: int) -> tuple[int, int]:
    """(allocated bytes, shared bytes) of an open regular file; shared is capped at allocated
    (a compressed extent's length is its logical length)."""
    st = os.fstat(fd)
    if st.st_size == 0 and st.st_blocks == 0:
        return 0, 0
    shared = shared_extent_bytes(fd)
    allocated = os.fstat(fd).st_blocks * 512  # after FIEMAP's sync: delayed allocations done
    return allocated, min(shared, allocated)


def _entries(top: str, skip_top: str | None = None) -> Iterator[tuple[str, os.stat_result]]:
    """(path, lstat) of everything under `top` (not `top` itself), depth first, never
    following a symlink; `skip_top` names an entry of `top` left out with all under it.
    Entries that vanish meanwhile are passed over."""
    pending = [top]
    while pending:
        directory = pending.pop()
        try:
            it = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                if directory == top and entry.name == skip_top:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    pending.append(entry.path)
                yield entry.path, st


def _first_sight(st: os.stat_result, seen: set[tuple[int, int]]) -> bool:
    """False for a hard-linked inode already counted (only those with links are remembered)."""
    if stat.S_ISDIR(st.st_mode) or st.st_nlink < 2:
        return True
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


def store_space(volsync_dir: str | os.PathLike) -> StoreSpace:
    """The disk use of a store directory (a volume's `.volsync/`), the directory included."""
    top = os.fspath(volsync_dir)
    files = 0
    allocated = os.lstat(top).st_blocks * 512
    shared = 0
    seen: set[tuple[int, int]] = set()
    for path, st in _entries(top):
        if not _first_sight(st, seen):
            continue
        if not stat.S_ISREG(st.st_mode):
            allocated += st.st_blocks * 512
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            a, s = file_space(fd)
        finally:
            os.close(fd)
        files += 1
        allocated += a
        shared += s
    return StoreSpace(files, allocated, shared)


def live_bytes(root: str | os.PathLike) -> int:
    """The bytes allocated to a volume's live tree (every file, directory and symlink under
    `root`, each hard-linked inode once), without `.volsync/` and without `root` itself."""
    seen: set[tuple[int, int]] = set()
    return sum(st.st_blocks * 512 for _path, st in _entries(os.fspath(root), skip_top=META)
               if _first_sight(st, seen))


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are written as octal escapes."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def filesystem_type(path: str | os.PathLike, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The type of the filesystem holding `path` ("ext4", "btrfs", "xfs", ...), from the
    mount table: the deepest mount point above the path, preferring one whose device is the
    path's; "unknown" where the table cannot be read."""
    real = os.path.realpath(path)
    dev = os.stat(real).st_dev
    want = f"{os.major(dev)}:{os.minor(dev)}"
    best: tuple[int, int, str] | None = None  # (device matches, mount point length, type)
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        point = _unescape(fields[4])
        if not (real == point or real.startswith(point.rstrip("/") + "/")):
            continue
        rank = (int(fields[2] == want), len(point), tail.split()[0])
        if best is None or rank[:2] >= best[:2]:  # a later mount over the same point wins
            best = rank
    return best[2] if best else "unknown"
