"""The copy-on-write filesystem fixtures themselves (tests/cowfs.py), without volsync: the
directory is on the filesystem asked for, a FICLONE of a 1 MiB file succeeds, and FIEMAP then
shows the clone's extents (and the original's) as shared."""

from __future__ import annotations

import os

from cowfs import FIEMAP_EXTENT_SHARED, extents, ficlone, shared_bytes

MIB = 1 << 20


def fs_type(path) -> str:
    """The filesystem type of the mount holding `path` (the longest matching mount point)."""
    best, kind = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt, fstype = line.split()[1:3]
            if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) > len(best):
                best, kind = mnt, fstype
    return kind


def test_cow_dir_is_on_its_filesystem_and_empty(cow_dir, request):
    assert fs_type(cow_dir) == request.node.callspec.id
    assert os.listdir(cow_dir) == []


def test_a_clone_shares_its_extents(cow_dir):
    src, dst = cow_dir / "a", cow_dir / "b"
    src.write_bytes(os.urandom(MIB))
    os.sync()
    assert shared_bytes(src) == 0
    ficlone(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    got = extents(dst)
    assert got and all(e[3] & FIEMAP_EXTENT_SHARED for e in got), got
    assert shared_bytes(dst) == MIB
    assert shared_bytes(src) == MIB


def test_btrfs_and_xfs_dirs(btrfs_dir, xfs_dir):
    assert fs_type(btrfs_dir) == "btrfs" and fs_type(xfs_dir) == "xfs"
