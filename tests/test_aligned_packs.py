"""The aligned pack layout (store/alignedpack.py): records on filesystem-block boundaries with
their headers in group pages, so that on XFS and btrfs a snapshot, a restore and a transfer
share extents with the live tree instead of copying. The layout's own properties are tested on
any filesystem (VOLSYNC_PACK_LAYOUT=aligned); the sharing on loop-mounted btrfs and XFS."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess

import pytest
from conftest import read_tree
from cowfs import shared_bytes
from helpers import ok, okj, sub, vs

from volsync.errors import IntegrityError
from volsync.model import BLAKE3, XXH3
from volsync.store.alignedpack import ALIGN, ALIGNED_HEADER, GROUP_HEAD, capacity
from volsync.store.packs import PackStore, read_index, shares_extents
from volsync.store.space import filesystem_type


@pytest.fixture
def aligned(monkeypatch):
    monkeypatch.setenv("VOLSYNC_PACK_LAYOUT", "aligned")


def blobs(n: int, seed: int = 1) -> list[bytes]:
    """Sizes around the alignment: tiny, unaligned, exactly aligned, several pages."""
    rng = random.Random(seed)
    sizes = [4, 100, ALIGN - 1, ALIGN, ALIGN + 1, 3 * ALIGN, 65536, 70000]
    return [i.to_bytes(4, "little") + rng.randbytes(sizes[i % len(sizes)] - 4)
            for i in range(n)]


def fill(directory, algo, datas) -> tuple[PackStore, list[bytes]]:
    store = PackStore(directory, algo)
    ids = [algo.digest(d) for d in datas]
    for block_id, data in zip(ids, datas):
        store.put(block_id, data)
    store.flush()
    return store, ids


@pytest.mark.parametrize("algo", [XXH3, BLAKE3], ids=["xxh3", "blake3"])
def test_records_are_aligned_and_named_by_group_pages(tmp_path, aligned, algo):
    n = 2 * capacity(algo.size) + 5  # three groups
    datas = blobs(n)
    store, ids = fill(tmp_path, algo, datas)
    names = store.pack_names()
    assert len(names) == 1
    pack = tmp_path / f"{names[0]}.pack"
    assert pack.read_bytes()[:8] == ALIGNED_HEADER
    entries = read_index(tmp_path / f"{names[0]}.idx", algo.size)[1]
    assert [e[0] for e in entries] == ids
    for _, off, length in entries:
        assert length < ALIGN or off % ALIGN == 0, (off, length)
    for prev, cur in itertools.pairwise(entries):  # in order, never overlapping
        assert cur[1] >= prev[1] + prev[2]
    assert [(i, d) for i, _, d in store.scan_pack(names[0])] == list(zip(ids, datas))
    records, damage = store.check_pack(names[0])
    assert damage is None and [r[0] for r in records] == ids and all(r[2] for r in records)
    assert all(store.get(i, verify=True) == d for i, d in zip(ids, datas))
    store.close()


def test_the_layout_follows_the_filesystem_unless_forced(tmp_path, monkeypatch):
    monkeypatch.delenv("VOLSYNC_PACK_LAYOUT", raising=False)
    assert PackStore(tmp_path, XXH3).aligned() is shares_extents(tmp_path)
    monkeypatch.setenv("VOLSYNC_PACK_LAYOUT", "packed")
    assert PackStore(tmp_path, XXH3).aligned() is False
    monkeypatch.setenv("VOLSYNC_PACK_LAYOUT", "aligned")
    assert PackStore(tmp_path, XXH3).aligned() is True


def test_tmpfs_and_ext4_share_nothing(tmp_path):
    if filesystem_type(tmp_path) not in ("ext4", "tmpfs"):
        pytest.skip(f"{tmp_path} is on {filesystem_type(tmp_path)}")
    assert shares_extents(tmp_path) is False


@pytest.mark.parametrize("where", ["group page", "entry", "data", "truncated"])
def test_damage_in_an_aligned_pack_is_found(tmp_path, aligned, where):
    datas = blobs(capacity(XXH3.size) + 3)
    store, ids = fill(tmp_path, XXH3, datas)
    name = store.pack_names()[0]
    entries = read_index(tmp_path / f"{name}.idx", XXH3.size)[1]
    store.close()
    path = tmp_path / f"{name}.pack"
    raw = bytearray(path.read_bytes())
    if where == "truncated":
        raw = raw[: entries[-1][1] + entries[-1][2] // 2]
    else:
        at = {"group page": 0, "entry": GROUP_HEAD.size + 20,
              "data": entries[7][1] + entries[7][2] // 2}[where]
        raw[at] ^= 0x40
    path.write_bytes(bytes(raw))
    store = PackStore(tmp_path, XXH3)
    records, damage = store.check_pack(name)
    assert damage is not None or not all(r[2] for r in records)
    if where == "data":
        assert [r[0] for r in records if not r[2]] == [ids[7]]
        with pytest.raises(IntegrityError):
            store.get(ids[7], verify=True)
    store.close()


def test_a_killed_writers_records_are_adopted(tmp_path, aligned):
    datas = blobs(40)
    store = PackStore(tmp_path, XXH3)
    ids = [XXH3.digest(d) for d in datas]
    for block_id, data in zip(ids, datas):
        store.put(block_id, data)
    writer = store._writer
    writer.flush()
    writer.drain()  # as a kill leaves it: data and group page written, no index
    # and a torn record after them: its data cut short
    os.ftruncate(writer.fd, os.fstat(writer.fd).st_size + 100)
    os.close(writer.fd)
    store._writer = None
    store.close()
    store = PackStore(tmp_path, XXH3)
    assert store.adopt_orphans() == 40
    assert all(store.get(i, verify=True) == d for i, d in zip(ids, datas))
    assert len(list(tmp_path.glob("*.pack"))) == 1  # the leftover went once copied
    assert all(store.check_pack(n)[1] is None for n in store.pack_names())
    store.close()


@pytest.mark.parametrize("direction", ["packed->aligned", "aligned->packed"])
def test_objects_move_between_layouts(tmp_path, monkeypatch, direction):
    first, second = direction.split("->")
    monkeypatch.setenv("VOLSYNC_PACK_LAYOUT", first)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    src, ids = fill(tmp_path / "a", XXH3, blobs(30))
    monkeypatch.setenv("VOLSYNC_PACK_LAYOUT", second)
    dst = PackStore(tmp_path / "b", XXH3)
    dst.put_many_from(src, ids)
    dst.flush()
    head = (tmp_path / "b" / f"{dst.pack_names()[0]}.pack").read_bytes()[:8]
    assert (head == ALIGNED_HEADER) is (second == "aligned")
    assert all(dst.get(i, verify=True) == src.get(i) for i in ids)
    # repack in the receiving layout keeps what is live and drops the rest
    freed, _ = dst.repack(set(ids[::2]))
    assert freed == len(ids[1::2])
    assert all(dst.get(i, verify=True) == src.get(i) for i in ids[::2])
    src.close()
    dst.close()


def test_the_cli_works_on_aligned_packs_anywhere(tmp_path, aligned):
    src, dst, _ = mirrored(tmp_path)
    assert ok("verify", dst).code == 0
    assert read_tree(dst) == read_tree(src)


# --- sharing extents on XFS and btrfs -------------------------------------------------------

def write_files(root, seed: int = 7) -> int:
    """Mixed files (big, unaligned, small, one with a hole); their bytes in all."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    for i, size in enumerate([3 << 20, 1_000_003, 200_000, 65536, 5000, 10, 0, 2 << 20]):
        data = rng.randbytes(size)
        (root / f"f{i}").write_bytes(data)
        total += size
    with open(root / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(rng.randbytes(300_000))
    total += 300_000
    (root / "d").mkdir()
    (root / "d" / "g").write_bytes(rng.randbytes(500_000))
    return total + 500_000


def snapshotted(root) -> int:
    """A volume of write_files' files with one snapshot; their bytes in all."""
    data = write_files(root)
    ok("init", root)
    ok("snapshot", root)
    return data


def mirrored(base) -> tuple:
    """SRC (snapshotted) and DST, its new mirror, under `base`; and SRC's data bytes."""
    src, dst = base / "src", base / "dst"
    data = snapshotted(src)
    ok("transfer", src, dst)
    return src, dst, data


def store_bytes(vol) -> tuple[int, int]:
    """(allocated, shared) bytes of the volume's packs."""
    allocated = shared = 0
    for p in (vol / ".volsync" / "packs").glob("*.pack"):
        allocated += os.stat(p).st_blocks * 512
        shared += shared_bytes(p)
    return allocated, shared


def test_a_snapshot_shares_the_live_trees_extents(cow_dir):
    vol = cow_dir / "vol"
    data = snapshotted(vol)
    allocated, shared = store_bytes(vol)
    # all but the unaligned tails (which the next record's write unshares) and small records
    assert allocated - shared < 0.05 * data + 64 * 1024, (allocated, shared, data)
    first = read_tree(vol)
    # the live files change in place: the snapshot keeps what it captured
    with open(vol / "f0", "r+b") as f:
        f.seek(100_000)
        f.write(b"changed in place" * 1000)
    with open(vol / "d" / "g", "r+b") as f:
        f.write(b"x" * 70_000)
    assert ok("verify", vol).code == 0
    out = cow_dir / "restored"
    ok("restore", vol, "1", out)
    assert read_tree(out) == first
    ok("snapshot", vol)
    assert ok("verify", vol).code == 0


def test_a_mirror_and_a_restore_on_the_same_filesystem_share_extents(cow_dir):
    src, dst, data = mirrored(cow_dir)
    assert ok("verify", dst).code == 0
    assert read_tree(dst) == read_tree(src)
    allocated, shared = store_bytes(dst)
    assert allocated - shared < 0.05 * data + 64 * 1024, (allocated, shared, data)
    assert shared_bytes(dst / "f0") >= (3 << 20) - ALIGN
    out = cow_dir / "out"
    ok("restore", dst, "latest", out)
    assert read_tree(out) == read_tree(src)
    assert shared_bytes(out / "f1") >= 1_000_003 - 2 * ALIGN


def test_an_incremental_update_on_cow_sends_only_the_change(cow_dir):
    src, dst, _ = mirrored(cow_dir)
    with open(src / "f0", "r+b") as f:
        f.seek(2 << 20)
        f.write(b"new bytes")
    ok("snapshot", src)
    r = okj("transfer", src, dst)
    assert r["blocks_sent"] == 1
    assert read_tree(dst) == read_tree(src)
    assert ok("verify", dst).code == 0 and ok("verify", src).code == 0


def test_a_killed_transfer_on_cow_resumes_and_verifies(cow_dir):
    src, dst = cow_dir / "src", cow_dir / "dst"
    snapshotted(src)
    r = sub("transfer", src, dst, env_extra={"VOLSYNC_CRASH_AT": "object-received:40"})
    assert r.code == 137, r.err
    again = okj("transfer", src, dst)
    assert again["blocks_sent"] < 110  # what was received before the kill is adopted
    assert read_tree(dst) == read_tree(src)
    assert vs("verify", dst).code == 0


def test_prune_on_cow_keeps_what_is_shared(cow_dir):
    vol = cow_dir / "vol"
    snapshotted(vol)
    for i in range(3):
        (vol / f"new{i}").write_bytes(os.urandom(300_000))
        ok("snapshot", vol)
    ok("prune", vol, "--keep-last", "1")
    assert ok("verify", vol).code == 0
    out = cow_dir / "out"
    ok("restore", vol, "latest", out)
    assert read_tree(out) == read_tree(vol)
    shutil.rmtree(out)


def test_a_file_that_refuses_a_clone_is_read_and_the_rest_still_share(btrfs_dir):
    # btrfs cannot clone a nodatacow file (chattr +C) into an ordinary one: that file is read
    # as it is, and the files after it are still shared
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    vol = btrfs_dir / "vol"
    vol.mkdir()
    nocow = vol / "a-nocow"
    nocow.touch()
    subprocess.run(["chattr", "+C", str(nocow)], check=True)
    nocow.write_bytes(os.urandom(300_000))
    data = snapshotted(vol)
    allocated, shared = store_bytes(vol)
    assert allocated - shared < 300_000 + 0.05 * data + 64 * 1024, (allocated, shared)
    out = btrfs_dir / "out"
    ok("restore", vol, "latest", out)
    assert read_tree(out) == read_tree(vol)
    assert ok("verify", vol).code == 0


def test_unshared_tails_hold_no_reservations_on_xfs(xfs_dir):
    # each cloned record's unaligned last page is unshared by the write after it: XFS used to
    # reserve 128 KiB of copy-on-write space for each (until the inode left the cache)
    vol = xfs_dir / "vol"
    vol.mkdir()
    for i in range(200):
        (vol / f"f{i:03}").write_bytes(os.urandom(70_000))
    ok("init", vol)
    ok("snapshot", vol)
    os.sync()
    allocated, shared = store_bytes(vol)
    assert allocated - shared < 0.1 * 200 * 70_000, (allocated, shared)


def test_a_failover_drill_on_cow_keeps_every_version(cow_dir):
    # failover writes in place on the mirror's live files (which share extents with both
    # stores) must change neither store: the reverse resync keeps SRC's late write preserved,
    # and every snapshot on both sides restores to what it captured
    src, dst, _ = mirrored(cow_dir)
    first = read_tree(src)
    ok("break", dst)
    with open(dst / "f0", "r+b") as f:  # in place, inside shared extents
        f.seek(4096)
        f.write(b"failover write" * 5000)
    with open(src / "f1", "r+b") as f:  # SRC's late write, never sent
        f.write(b"late on src" * 100)
    late = read_tree(src)
    r = okj("resync", dst, src, "--force")
    assert r["preserved"], r
    assert read_tree(src) == read_tree(dst)
    for vol in (src, dst):
        assert ok("verify", vol).code == 0
        ok("restore", vol, "1", cow_dir / f"first-{vol.name}")
        assert read_tree(cow_dir / f"first-{vol.name}") == first
    name = okj("snapshots", src, "--all")["snapshots"]
    preserved = [s["name"] for s in name if s["name"].startswith("p")]
    ok("restore", src, preserved[-1], cow_dir / "late")
    assert read_tree(cow_dir / "late") == late


@pytest.mark.parametrize("switch", ["VOLSYNC_CRASH_AT=pack-data-durable:1",
                                    "VOLSYNC_CRASH_AT=pack-index-committed:1",
                                    "VOLSYNC_CRASH_AT=snapshot-record-written:1",
                                    "VOLSYNC_FAULT=write:ENOSPC:2",
                                    "VOLSYNC_FAULT=write:EIO:3+"])
def test_a_snapshot_on_cow_cut_short_leaves_a_volume_that_verifies(cow_dir, switch):
    # a snapshot's clonable blocks are copied a run at a time: a kill or an I/O error at any
    # of these steps leaves a volume that verifies, and the rerun captures everything
    vol = cow_dir / "vol"
    data = write_files(vol)
    ok("init", vol)
    name, value = switch.split("=", 1)
    r = sub("snapshot", vol, env_extra={name: value})
    assert r.code in (1, 137), (r.code, r.err)
    assert "Traceback" not in r.err
    assert vs("verify", vol).code == 0
    ok("snapshot", vol)
    assert ok("verify", vol).code == 0
    out = cow_dir / "out"
    ok("restore", vol, "latest", out)
    assert read_tree(out) == read_tree(vol)
    allocated, shared = store_bytes(vol)
    assert allocated - shared < 0.1 * data + 256 * 1024
