"""`volsync df VOL` and src/volsync/store/space.py: the disk a volume takes (live tree, store)
and how much of the store is in extents shared with other files (FIEMAP), on ext4 (tmp_path)
and on the copy-on-write filesystems of tests/cowfs.py (btrfs, XFS)."""

from __future__ import annotations

import os
import random
import sys

import pytest
from cowfs import extents, ficlone
from cowfs import shared_bytes as oracle_shared
from helpers import make_volume, ok, okj, vs

from volsync.store import space
from volsync.store.volume import Volume

MIB = 1 << 20
KEYS = {"volume": str, "live_bytes": int, "store_bytes": int, "store_shared_bytes": int,
        "store_unshared_bytes": int, "store_files": int, "filesystem": str}
NOTHING_SHARED = ("ext2", "ext3", "ext4", "tmpfs")  # filesystems without reflinks


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def fs_of(path) -> str:
    """The filesystem type of `path` by /proc/self/mounts (deepest mount point), the test's
    own reading of the mount table."""
    best, kind = "", ""
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            point, fstype = line.split()[1:3]
            if (real + "/").startswith(point.rstrip("/") + "/") and len(point) >= len(best):
                best, kind = point, fstype
    return kind


def snapped_volume(where, files: dict) -> os.PathLike:
    vol = make_volume(where, files)
    ok("snapshot", vol)
    return vol


def df(vol) -> dict:
    d = okj("df", vol)
    assert {k: type(d[k]) for k in KEYS} == KEYS, d
    assert d["store_unshared_bytes"] == d["store_bytes"] - d["store_shared_bytes"]
    assert 0 <= d["store_shared_bytes"] <= d["store_bytes"]
    return d


# --- the command ----------------------------------------------------------------------------

def test_df_after_a_snapshot(tmp_path):
    """The store takes at least the live data (random, so incompressible; packs hold it all);
    nothing is shared where the filesystem has no reflinks; the filesystem is named."""
    data = {"a.bin": rnd(3 * MIB, 1), "d/b.bin": rnd(MIB, 2), "d/small": "x" * 100}
    vol = snapped_volume(tmp_path / "V", data)
    d = df(vol)
    assert d["volume"] == str(vol)
    assert d["filesystem"] == fs_of(vol)
    assert d["live_bytes"] >= 4 * MIB + 100
    assert d["store_bytes"] >= 4 * MIB + 100
    assert d["store_files"] >= 2  # at least a pack and its index
    if d["filesystem"] in NOTHING_SHARED:
        assert d["store_shared_bytes"] == 0


def test_df_text_is_one_line(tmp_path):
    vol = snapped_volume(tmp_path / "V", {"a.bin": rnd(MIB, 3)})
    r = ok("df", vol)
    assert r.out.count("\n") == 1 and r.err == "", r
    line = r.out.rstrip("\n")
    assert line.startswith(f"{vol}: live tree 1.0 MiB; store ")
    assert "shared with other files" in line and "of the live tree)" in line
    assert line.endswith(f"; filesystem {fs_of(vol)}")
    assert ok("df", vol, "--quiet").out == ""


def test_df_of_an_empty_volume(tmp_path):
    vol = make_volume(tmp_path / "V")
    d = df(vol)
    assert d["live_bytes"] == 0 and d["store_bytes"] > 0
    assert "of the live tree" not in ok("df", vol).out  # no ratio to a zero


def test_df_hard_links_count_once_and_symlinks_are_not_followed(tmp_path):
    outside = tmp_path / "big"
    outside.write_bytes(rnd(4 * MIB, 4))
    vol = make_volume(tmp_path / "V", {"f": rnd(MIB, 5)})
    os.link(vol / "f", vol / "g")
    os.symlink(outside, vol / "link")
    live = df(vol)["live_bytes"]
    assert MIB <= live < 2 * MIB


def test_df_takes_no_lock(tmp_path):
    """df reads while another command holds the volume's exclusive lock."""
    vol = snapped_volume(tmp_path / "V", {"a": "a"})
    with Volume.open(vol).locked():
        assert df(vol)["store_bytes"] > 0
        assert vs("snapshot", vol).code == 3  # the lock is really held


@pytest.mark.parametrize("what", ["missing", "not a volume"])
def test_df_of_no_volume_is_one_error_line(tmp_path, what):
    path = tmp_path / "nope"
    if what == "not a volume":
        path.mkdir()
    r = vs("df", path)
    assert r.code == 1 and r.out == "", r
    assert r.err.count("\n") == 1 and r.err.startswith("volsync: error: "), r
    r = vs("df", path, "--json")
    assert r.code == 1 and r.json["code"] == 1 and r.json["error"], r


def test_df_of_a_remote_volume(tmp_path, monkeypatch, rsh_shim):
    """Through the rsh stand-in: the far side's df, as it prints it there; also through a
    read-only server (df changes nothing)."""
    monkeypatch.setenv("VOLSYNC_RSH", rsh_shim)
    monkeypatch.setenv("VOLSYNC_REMOTE_PATH", f"{sys.executable} -m volsync")
    vol = snapped_volume(tmp_path / "V", {"a.bin": rnd(MIB, 6)})
    local = df(vol)
    assert df(f"farhost:{vol}") == local
    assert ok("df", f"ssh://farhost{vol}").out == ok("df", vol).out
    monkeypatch.setenv("VOLSYNC_REMOTE_PATH",
                       f"{sys.executable} -m volsync serve --stdio --read-only #")
    assert df(f"farhost:{vol}") == local
    r = vs("df", f"farhost:{tmp_path / 'nope'}")
    assert r.code == 1 and r.err.startswith("volsync: error: "), r


# --- copy-on-write filesystems --------------------------------------------------------------

def test_df_counts_extents_shared_with_the_live_tree(cow_dir):
    """A file of the live tree cloned into .volsync/ (as a pack sharing its extents would be)
    is counted as shared; the unshared figure does not grow by it."""
    vol = snapped_volume(cow_dir / "V", {"img": rnd(2 * MIB, 7)})
    os.sync()
    before = df(vol)
    ficlone(vol / "img", vol / ".volsync" / "cloned")
    after = df(vol)
    assert after["filesystem"] == fs_of(cow_dir) in ("btrfs", "xfs")
    assert after["store_shared_bytes"] - before["store_shared_bytes"] >= 2 * MIB
    assert after["store_bytes"] - before["store_bytes"] >= 2 * MIB
    assert after["store_unshared_bytes"] - before["store_unshared_bytes"] < 64 * 1024
    assert after["live_bytes"] == before["live_bytes"]


# --- space.py -------------------------------------------------------------------------------

def scattered_file(path, extents_wanted: int) -> int:
    """A file of `extents_wanted` separate 4 KiB extents (holes between), written from the
    end backwards (no write extends the file, so no speculative preallocation fills the
    holes); returns the bytes written."""
    with open(path, "wb") as f:
        for i in reversed(range(extents_wanted)):
            f.seek(i * 16384)
            f.write(rnd(4096, i))
        f.flush()
        os.fsync(f.fileno())
    return extents_wanted * 4096


def file_space(path) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return space.file_space(fd)
    finally:
        os.close(fd)


def test_file_space_without_sharing(tmp_path):
    written = scattered_file(tmp_path / "f", 10)
    allocated, shared = file_space(tmp_path / "f")
    assert allocated >= written and shared == 0
    (tmp_path / "empty").write_bytes(b"")
    assert file_space(tmp_path / "empty") == (0, 0)


def test_file_space_on_tmpfs_has_no_fiemap():
    if not os.path.isdir("/dev/shm") or fs_of("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    path = f"/dev/shm/volsync-test-{os.getpid()}"
    try:
        with open(path, "wb") as f:
            f.write(rnd(100_000, 8))
        allocated, shared = file_space(path)
        assert allocated >= 100_000 and shared == 0
    finally:
        os.unlink(path)


def test_file_space_reads_many_extents_in_batches(cow_dir):
    """A clone of a file of 600 extents (more than one FIEMAP call's 256): every extent of
    both is shared, as the oracle's own FIEMAP walk (64 a call) sees it."""
    src, dst = cow_dir / "src", cow_dir / "dst"
    written = scattered_file(src, 600)
    assert len(extents(src)) >= 300  # the filesystem may merge a few, not most
    assert file_space(src)[1] == 0
    ficlone(src, dst)
    for path in (src, dst):
        allocated, shared = file_space(path)
        assert allocated >= written
        assert shared == min(oracle_shared(path), allocated)
        assert shared >= written


def test_store_space_sums_its_files(cow_dir):
    store = cow_dir / "store"
    (store / "sub").mkdir(parents=True)
    (store / "a").write_bytes(rnd(MIB, 9))
    ficlone(store / "a", store / "sub" / "b")
    os.symlink("/nowhere", store / "link")
    os.link(store / "a", store / "hard")
    s = space.store_space(store)
    assert s.files == 2  # a (once, with its hard link) and sub/b
    assert s.shared == 2 * MIB and s.allocated >= 2 * MIB
    assert s.unshared == s.allocated - s.shared


def test_filesystem_type_from_mountinfo(tmp_path):
    """The deepest mount point above the path, preferring the one with the path's device;
    octal escapes in mount points are read."""
    dev = os.stat(tmp_path).st_dev
    mine = f"{os.major(dev)}:{os.minor(dev)}"
    real = os.path.realpath(tmp_path)
    odd = os.path.join(real, "a b")
    os.mkdir(odd)
    table = tmp_path / "mountinfo"
    table.write_text(
        f"1 0 {mine} / / rw - ext4 /dev/root rw\n"
        f"2 1 0:99 / {real.replace(' ', chr(92) + '040')}/a\\040b rw - btrfs /dev/x rw\n"
        f"3 1 0:98 / /elsewhere rw - xfs /dev/y rw\n")
    assert space.filesystem_type(tmp_path, str(table)) == "ext4"  # device wins over depth
    table.write_text(f"1 0 9:9 / / rw - ext4 /dev/root rw\n"
                     f"2 1 0:99 / {real}/a\\040b rw - btrfs /dev/x rw\n")
    assert space.filesystem_type(odd, str(table)) == "btrfs"  # no device matches: deepest
    assert space.filesystem_type(tmp_path, str(tmp_path / "missing")) == "unknown"


FICLONERANGE = 0x4020940D  # linux/fs.h: _IOW(0x94, 13, struct file_clone_range)


def clone_range(src, dst, offset: int, length: int) -> None:
    import fcntl
    import struct

    with open(src, "rb") as s, open(dst, "wb") as d:
        fcntl.ioctl(d.fileno(), FICLONERANGE, struct.pack("=qQQQ", s.fileno(), offset, length, 0))


@pytest.mark.parametrize("kind", ["btrfs", "xfs"])
def test_a_partial_clone(kind, request):
    """64 KiB of an 8 MiB file cloned: XFS marks those 64 KiB shared; btrfs marks the whole
    extent (it frees an extent only when no part of it is referenced), as space.py says."""
    where = request.getfixturevalue(f"{kind}_dir")
    src = where / "src"
    with open(src, "wb") as f:
        f.write(rnd(8 * MIB, 10))
        os.fsync(f.fileno())
    clone_range(src, where / "part", 4 * MIB, 64 * 1024)
    allocated, shared = file_space(src)
    assert allocated == 8 * MIB
    assert shared == (64 * 1024 if kind == "xfs" else sum(
        e[2] for e in extents(src) if e[0] <= 4 * MIB < e[0] + e[2]))
