"""Aligned packs: pack data placed on filesystem-block boundaries, so that on a copy-on-write
filesystem (XFS, btrfs) a record can share its extents with a live-tree file.

Layout (header `VSPACK\\x00\\x03`): the file is a chain of groups. A group is one ALIGN-byte
header page `[magic 8][count u32][pad u32]` followed by up to `capacity` entries `[id][offset
u64][length u32]`, then the data of those records at the offsets the entries name (each after
the page, in order, without overlap). A record of ALIGN bytes or more, and any record copied
from another file, starts on an ALIGN boundary, so the kernel's copy (copy_file_range) clones
it instead of copying; small records are packed tightly. Gaps are holes, never written. A new
group starts, at the next boundary, only once the current one is full: a group with fewer
entries than it can hold is the last.

The header pages make a pack readable without its index (verify walks them, and a crashed
writer's leftover is salvaged from them by re-checking every record against its id).
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator

from ..errors import IntegrityError
from ..model import BlockId

ALIGNED_HEADER = b"VSPACK\x00\x03"
GROUP_MAGIC = b"VSGROUP\x03"
ALIGN = 4096
GROUP_HEAD = struct.Struct("<8sII")  # magic, count, reserved
FICLONERANGE = 0x4020940D  # linux/fs.h: _IOW(0x94, 13, struct file_clone_range)


def entry_struct(id_size: int) -> struct.Struct:
    return struct.Struct(f"<{id_size}sQI")


def capacity(id_size: int) -> int:
    """Entries per header page."""
    return (ALIGN - GROUP_HEAD.size) // entry_struct(id_size).size


def align_up(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def group_page(first: bool, entries: list[bytes]) -> bytes:
    return GROUP_HEAD.pack(ALIGNED_HEADER if first else GROUP_MAGIC, len(entries), 0) \
        + b"".join(entries)


def walk_groups(read, size: int, name: str, id_size: int
                ) -> Iterator[tuple[BlockId, int, int]]:
    """Every record (id, data offset, length) the header pages list, in order; `read(offset,
    length)` reads the pack. Damage (a bad page, an entry out of bounds or overlapping) raises
    IntegrityError naming the pack, after the records before it."""
    entry, cap = entry_struct(id_size), capacity(id_size)
    group, first = 0, True
    while group < size:
        page = read(group, GROUP_HEAD.size + cap * entry.size)
        if len(page) < GROUP_HEAD.size:
            raise IntegrityError(f"pack {name}: truncated group header")
        magic, count, _ = GROUP_HEAD.unpack_from(page)
        if magic != (ALIGNED_HEADER if first else GROUP_MAGIC):
            raise IntegrityError(f"pack {name}: bad header" if first
                                 else f"pack {name}: bad group header at {group}")
        if count > cap or len(page) < GROUP_HEAD.size + count * entry.size:
            raise IntegrityError(f"pack {name}: malformed group header at {group}")
        end = group + ALIGN
        for i in range(count):
            block_id, off, length = entry.unpack_from(page, GROUP_HEAD.size + i * entry.size)
            if off < end or off + length > size:
                raise IntegrityError(f"pack {name}: truncated record")
            yield BlockId(block_id), off, length
            end = off + length
        if count < cap:
            return
        group, first = align_up(end), False


FS_IOC_FSGETXATTR = 0x801C581F  # linux/fs.h: struct fsxattr (28 bytes)
FS_IOC_FSSETXATTR = 0x401C5820
FS_XFLAG_COWEXTSIZE = 0x00010000
FSXATTR = struct.Struct("<IIIII8x")  # xflags, extsize, nextents, projid, cowextsize


def small_cow_reservations(fd: int) -> None:
    """Ask the filesystem to reserve one block, not its default 32, when a write lands on a
    shared block of this file (XFS's copy-on-write extent size hint): writing after a cloned
    record's unaligned last page unshares that page, and on XFS the default held 128 KiB per
    record until the inode left the cache. Filesystems without the hint ignore it."""
    buf = bytearray(FSXATTR.size)
    try:
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf)
        xflags, extsize, nextents, projid, _ = FSXATTR.unpack(buf)
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR,
                    FSXATTR.pack(xflags | FS_XFLAG_COWEXTSIZE, extsize, nextents, projid, ALIGN))
    except OSError:
        pass


def probe_reflink(directory) -> bool:
    """Whether files in `directory` can share extents (FICLONERANGE works there), tried on two
    unnamed temp files (gone when closed); False wherever anything fails."""
    try:
        a = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError:
        return False
    b = -1
    try:
        b = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        os.pwrite(a, b"\x01" * ALIGN, 0)
        # struct file_clone_range {s64 src_fd; u64 src_offset, src_length, dest_offset}
        arg = struct.pack("<qQQQ", a, 0, ALIGN, 0)
        fcntl.ioctl(b, FICLONERANGE, arg)
        return os.pread(b, 1, 0) == b"\x01"
    except OSError:
        return False
    finally:
        os.close(a)
        if b >= 0:
            os.close(b)
