"""Unit tests of the on-disk store: packs, codec, tree objects, atomic writes, the lock."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import time

import msgpack
import pytest
import xxhash

from volsync.errors import IntegrityError, VolumeLocked
from volsync.model import BLAKE3, XXH3, BlockId, Entry, Format, Kind, Tree
from volsync.store import blockindex, fsutil
from volsync.store import packs as packs_mod
from volsync.store.blockindex import MIDX_NAME
from volsync.store.blocklist import DIRECT_MAX, FANOUT, build_ref
from volsync.store.codec import FORMAT_VERSION, open_sealed, pack, seal
from volsync.store.lock import VolumeLock, current_holder
from volsync.store.packs import PACK_HEADER, PackStore, PackWriter, read_index, record_struct
from volsync.store.trees import (
    EMPTY_TREE,
    MAX_XATTR_VALUE,
    decode_tree,
    empty_tree_id,
    encode_tree,
)

ALGO = BLAKE3  # the default hash; XXH3 volumes are covered where ids' size matters
digest_of = ALGO.digest
RECORD = record_struct(ALGO)

# --- packs ----------------------------------------------------------------------------------


def blob(i: int, size: int = 1000) -> bytes:
    return (f"block {i} ".encode() * size)[:size]


@pytest.fixture
def packdir(tmp_path):
    d = tmp_path / "packs"
    d.mkdir()
    return d


def put_all(store: PackStore, datas: list[bytes]) -> list[bytes]:
    ids = []
    for d in datas:
        i = digest_of(d)
        store.put(i, d)
        ids.append(i)
    return ids


def test_put_get_has_before_and_after_flush_and_reopen(packdir):
    """Objects are readable before flush (from the writer), after flush, and after reopen."""
    s = PackStore(packdir, ALGO)
    datas = [blob(i) for i in range(5)]
    ids = put_all(s, datas)
    assert all(s.has(i) for i in ids)
    assert [s.get(i) for i in ids] == datas
    assert not list(packdir.glob("*.idx"))  # not yet committed
    s.flush()
    assert len(list(packdir.glob("*.idx"))) == 1
    assert [s.get(i, verify=True) for i in ids] == datas
    s.close()
    s2 = PackStore(packdir, ALGO)
    assert all(s2.has(i) for i in ids)
    assert [s2.get(i, verify=True) for i in ids] == datas
    assert s2.length(ids[0]) == len(datas[0])
    assert not s2.has(digest_of(b"never stored"))
    with pytest.raises(IntegrityError):
        s2.get(digest_of(b"never stored"))
    s2.close()


def test_put_is_idempotent(packdir):
    """Putting an object already stored writes nothing and returns False."""
    s = PackStore(packdir, ALGO)
    d = blob(1)
    assert s.put(digest_of(d), d) is True
    assert s.put(digest_of(d), d) is False
    s.flush()
    assert s.put(digest_of(d), d) is False
    s.flush()
    assert len(list(packdir.glob("*.pack"))) == 1
    s.close()


def test_unflushed_objects_discarded(packdir):
    """discard (an aborted run) drops unflushed objects and their pack file."""
    s = PackStore(packdir, ALGO)
    ids = put_all(s, [blob(1)])
    s.discard()
    assert not s.has(ids[0])
    assert not list(packdir.glob("*.pack"))
    s.close()
    assert not PackStore(packdir, ALGO).has(ids[0])


def test_empty_flush_leaves_nothing(packdir):
    """flush with nothing put creates no pack."""
    s = PackStore(packdir, ALGO)
    s.flush()
    assert list(packdir.iterdir()) == []


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_verify_detects_corruption(packdir):
    """get(verify=True) refuses data that no longer matches its id; other objects still read."""
    s = PackStore(packdir, ALGO)
    datas = [blob(i) for i in range(3)]
    ids = put_all(s, datas)
    s.flush()
    name, off, _ = s.index()[ids[1]]
    s.close()
    _flip(packdir / f"{name}.pack", off + 5)
    s2 = PackStore(packdir, ALGO)
    assert s2.get(ids[1]) != datas[1]  # unverified read returns the bad bytes
    with pytest.raises(IntegrityError):
        s2.get(ids[1], verify=True)
    assert s2.get(ids[0], verify=True) == datas[0]
    assert s2.get(ids[2], verify=True) == datas[2]


def test_truncated_pack_read_is_integrity_error(packdir):
    """Reading an object past the end of a truncated pack is an IntegrityError."""
    s = PackStore(packdir, ALGO)
    ids = put_all(s, [blob(i) for i in range(3)])
    s.flush()
    name, off, _ = s.index()[ids[2]]
    s.close()
    os.truncate(packdir / f"{name}.pack", off + 3)
    with pytest.raises(IntegrityError):
        PackStore(packdir, ALGO).get(ids[2])


def test_bad_index_recorded_not_fatal(packdir):
    """A corrupt pack index is reported in bad_indexes; other packs stay readable."""
    s = PackStore(packdir, ALGO)
    a = put_all(s, [blob(1)])
    s.flush()
    b = put_all(s, [blob(2)])
    s.flush()
    bad_name = s.index()[b[0]][0]
    s.close()
    _flip(packdir / f"{bad_name}.idx", 20)
    s2 = PackStore(packdir, ALGO)
    assert s2.get(a[0], verify=True) == blob(1)
    assert not s2.has(b[0])
    assert [n for n, _ in s2.bad_indexes] == [f"{bad_name}.idx"]


def test_orphan_pack_adopted(packdir):
    """A pack without an index (crashed writer) is indexed: its intact records are kept, a
    torn tail is cut off, and indexed packs are untouched."""
    s = PackStore(packdir, ALGO)
    ids = put_all(s, [blob(1)])
    s.flush()
    w = PackWriter(packdir, RECORD)
    w.add(digest_of(blob(9)), blob(9))
    w.add(digest_of(blob(8)), blob(8))
    w.flush()
    w.drain()
    os.close(w.fd)
    orphan = w.path
    with open(orphan, "r+b") as f:  # tear the last record, as a crash mid-write would
        f.truncate(orphan.stat().st_size - 100)
    s2 = PackStore(packdir, ALGO)
    assert s2.adopt_orphans() == 1
    assert orphan.with_suffix(".idx").exists()
    assert s2.get(ids[0], verify=True) == blob(1)
    assert s2.get(digest_of(blob(9)), verify=True) == blob(9)
    assert not s2.has(digest_of(blob(8)))
    assert PackStore(packdir, ALGO).get(digest_of(blob(9)), verify=True) == blob(9)


def test_orphan_pack_with_nothing_intact_removed(packdir):
    """An orphan whose first record is already torn holds nothing: it is deleted."""
    w = PackWriter(packdir, RECORD)
    w.add(digest_of(blob(9)), blob(9))
    w.drain()
    os.close(w.fd)
    with open(w.path, "r+b") as f:
        f.truncate(30)
    assert PackStore(packdir, ALGO).adopt_orphans() == 0
    assert not w.path.exists()


def test_adopt_orphans_spares_own_writer(packdir):
    """adopt_orphans leaves alone the pack this store is currently writing."""
    s = PackStore(packdir, ALGO)
    ids = put_all(s, [blob(1)])
    s.adopt_orphans()
    s.flush()
    assert PackStore(packdir, ALGO).get(ids[0], verify=True) == blob(1)
    assert len(list(packdir.glob("*.idx"))) == 1


def test_repack_frees_garbage_keeps_live(packdir):
    """repack drops objects not in the live set, keeps the live ones readable across reopen,
    and removes the old packs."""
    s = PackStore(packdir, ALGO)
    datas = [blob(i, 2000 + i) for i in range(6)]
    ids = put_all(s, datas)
    s.flush()
    extra = put_all(s, [blob(100)])  # a second pack with only live data
    s.flush()
    old_packs = {p.name for p in packdir.glob("*.pack")}
    live = {ids[0], ids[2], ids[4], extra[0]}
    freed, freed_bytes = s.repack(live)
    assert freed == 3
    assert freed_bytes == sum(len(datas[i]) for i in (1, 3, 5))
    s.close()
    s2 = PackStore(packdir, ALGO)
    for i in (0, 2, 4):
        assert s2.get(ids[i], verify=True) == datas[i]
    for i in (1, 3, 5):
        assert not s2.has(ids[i])
    assert s2.get(extra[0], verify=True) == blob(100)
    new_packs = {p.name for p in packdir.glob("*.pack")}
    assert len(old_packs - new_packs) == 1  # only the pack holding garbage was rewritten
    assert len(list(packdir.glob("*.idx"))) == len(new_packs)
    assert sum(p.stat().st_size for p in packdir.glob("*.pack")) < 20_000


def test_repack_everything_dead(packdir):
    """repack with an empty live set leaves no packs."""
    s = PackStore(packdir, ALGO)
    put_all(s, [blob(i) for i in range(3)])
    s.flush()
    assert s.repack(set())[0] == 3
    assert list(packdir.glob("*.pack")) == [] and list(packdir.glob("*.idx")) == []


def test_salvage_keeps_good_records(packdir):
    """salvage rewrites a damaged pack keeping only records that still match their ids."""
    s = PackStore(packdir, ALGO)
    datas = [blob(i) for i in range(4)]
    ids = put_all(s, datas)
    s.flush()
    name, off, _ = s.index()[ids[1]]
    s.close()
    _flip(packdir / f"{name}.pack", off + 1)
    s2 = PackStore(packdir, ALGO)
    assert s2.salvage({name}) == 3
    s2.close()
    assert not (packdir / f"{name}.pack").exists()
    s3 = PackStore(packdir, ALGO)
    for i in (0, 2, 3):
        assert s3.get(ids[i], verify=True) == datas[i]
    assert not s3.has(ids[1])


def test_salvage_truncated_pack(packdir):
    """salvage of a truncated pack keeps the records before the cut."""
    s = PackStore(packdir, ALGO)
    datas = [blob(i) for i in range(4)]
    ids = put_all(s, datas)
    s.flush()
    name, off, _ = s.index()[ids[2]]
    s.close()
    os.truncate(packdir / f"{name}.pack", off + 10)
    s2 = PackStore(packdir, ALGO)
    assert s2.salvage({name}) == 2
    s2.close()
    s3 = PackStore(packdir, ALGO)
    assert [s3.has(i) for i in ids] == [True, True, False, False]
    assert s3.get(ids[1], verify=True) == datas[1]


def test_scan_pack_reports_records(packdir):
    """scan_pack yields every record with its data; a bad header is an IntegrityError."""
    s = PackStore(packdir, ALGO)
    datas = [blob(i) for i in range(3)]
    ids = put_all(s, datas)
    s.flush()
    name = s.pack_names()[0]
    assert [(i, d) for i, _, d in s.scan_pack(name)] == list(zip(ids, datas))
    _flip(packdir / f"{name}.pack", 0)
    with pytest.raises(IntegrityError):
        list(s.scan_pack(name))


@pytest.mark.parametrize("where", ["large", "copy", "run"])
def test_an_add_cut_short_by_ctrl_c_is_left_out_of_the_sealed_pack(packdir, monkeypatch, where):
    """Ctrl-C (KeyboardInterrupt in the main thread) in the middle of an add leaves its header
    written without its data; a transfer's interrupt handler then seals the pack for the rerun.
    The sealed pack must hold only whole records, as verify reads them one after another."""
    from volsync.store import packs

    w = PackWriter(packdir, RECORD)
    whole = [blob(i) for i in range(3)]
    for d in whole:
        w.add(BlockId(digest_of(d)), d)
    big = blob(9, packs.BUFFER_LIMIT // 8)
    if where == "large":  # the header went to the writer, the data's write never came
        real = PackWriter._write_at
        calls = []

        def write_at(self, offset, data):
            calls.append(1)
            if len(calls) > 1:
                raise KeyboardInterrupt
            real(self, offset, data)
        monkeypatch.setattr(PackWriter, "_write_at", write_at)
        with pytest.raises(KeyboardInterrupt):
            w.add(BlockId(digest_of(big)), big)
        monkeypatch.undo()
    else:  # the kernel copy was interrupted after part of the data
        src = packdir / "src"
        src.write_bytes(RECORD.pack(digest_of(big), len(big)) + big)

        def copy(src_fd, src_off, dst_fd, dst_off, length):
            os.pwrite(dst_fd, big[: length // 2], dst_off)
            raise KeyboardInterrupt
        monkeypatch.setattr(packs, "copy_range", copy)
        fd = os.open(src, os.O_RDONLY)
        try:
            with pytest.raises(KeyboardInterrupt):
                if where == "copy":
                    w.add_copy(BlockId(digest_of(big)), fd, RECORD.size, len(big))
                else:  # a run of whole records copied from another pack
                    w.add_run(fd, 0, [(BlockId(digest_of(big)), RECORD.size, len(big))])
        finally:
            os.close(fd)
        monkeypatch.undo()
    entries = w.seal()
    assert set(entries) == {digest_of(d) for d in whole}
    s = PackStore(packdir, ALGO)
    assert [d for _, _, d in s.scan_pack(w.name)] == whole
    for d in whole:
        assert s.get(BlockId(digest_of(d))) == d


def test_pack_records_and_index_follow_the_volume_hash(tmp_path, monkeypatch):
    """An XXH3 store writes 16-byte ids in its record headers and index; a BLAKE3 store 32;
    each reads back only its own."""
    monkeypatch.setenv("VOLSYNC_PACK_LAYOUT", "packed")
    for algo in (BLAKE3, XXH3):
        d = tmp_path / algo.name
        d.mkdir()
        s = PackStore(d, algo)
        datas = [blob(i) for i in range(3)]
        ids = [algo.digest(x) for x in datas]
        for i, x in zip(ids, datas):
            s.put(i, x)
        s.flush()
        name = s.pack_names()[0]
        raw = (d / f"{name}.pack").read_bytes()
        assert raw.startswith(PACK_HEADER)
        rec = record_struct(algo)
        assert rec.unpack_from(raw, len(PACK_HEADER)) == (ids[0], len(datas[0]))
        assert [e[0] for e in read_index(d / f"{name}.idx", algo.size)[1]] == ids
        assert [(i, x) for i, _, x in s.scan_pack(name)] == list(zip(ids, datas))
        s.close()
        other = XXH3 if algo is BLAKE3 else BLAKE3
        with pytest.raises(IntegrityError):
            read_index(d / f"{name}.idx", other.size + 1)


# --- codec ----------------------------------------------------------------------------------

def test_seal_round_trip():
    """open_sealed returns what seal wrapped."""
    obj = {"a": 1, "b": [b"x", "y"], "c": None}
    assert open_sealed(seal("state", obj), "state", "t") == obj


def _reseal(data: bytes, **changes) -> bytes:
    outer = msgpack.unpackb(data, raw=False)
    for k, v in changes.items():
        outer[["magic", "version", "kind", "body", "checksum"].index(k)] = v
    return msgpack.packb(outer, use_bin_type=True)


def test_open_sealed_rejects_bad_checksum():
    """A body that does not match its checksum is refused."""
    good = seal("state", {"a": 1})
    with pytest.raises(IntegrityError, match="checksum"):
        open_sealed(_reseal(good, body=pack({"a": 2})), "state", "t")
    with pytest.raises(IntegrityError):
        open_sealed(_reseal(good, checksum=12345), "state", "t")


def test_open_sealed_rejects_wrong_kind_version_magic():
    """The wrong kind, version or magic is refused."""
    good = seal("state", {"a": 1})
    with pytest.raises(IntegrityError):
        open_sealed(good, "config", "t")
    with pytest.raises(IntegrityError):
        open_sealed(_reseal(good, version=99), "state", "t")
    with pytest.raises(IntegrityError):
        open_sealed(_reseal(good, magic="other"), "state", "t")
    body = pack({"a": 1})
    with pytest.raises(IntegrityError):
        open_sealed(_reseal(good, body="text", checksum=xxhash.xxh3_64_intdigest(body)),
                    "state", "t")


@pytest.mark.parametrize("cut", [1, 2, 5, 10])
def test_open_sealed_rejects_truncation(cut):
    """Any truncated envelope is an IntegrityError."""
    good = seal("snapshot", {"x": b"y" * 50})
    with pytest.raises(IntegrityError):
        open_sealed(good[:-cut], "snapshot", "t")


@pytest.mark.parametrize("garbage", [b"", b"\xc1", b"hello world", b"\x93\x01\x02\x03",
                                     b"\xdb\xff\xff\xff\xff", random.Random(64).randbytes(64), b"\x00" * 30])
def test_open_sealed_rejects_garbage(garbage):
    """Garbage (including huge declared lengths) is an IntegrityError, not a crash."""
    with pytest.raises(IntegrityError):
        open_sealed(garbage, "state", "t")


def test_open_sealed_rejects_undecodable_body():
    """A body with a valid checksum but undecodable content is refused."""
    body = b"\xc1\xc1"
    bad = msgpack.packb(["volsync", FORMAT_VERSION, "state", body, xxhash.xxh3_64_intdigest(body)],
                        use_bin_type=True)
    with pytest.raises(IntegrityError):
        open_sealed(bad, "state", "t")


# --- tree objects ---------------------------------------------------------------------------

BS = 4096
FMT = Format(ALGO, BS)
D = b"\x11" * ALGO.size


def entry(name: bytes, kind: Kind, mode: int = 0o644, size: int = 0, ref: bytes = b"",
          uid: int | None = 0, gid: int | None = 0, mtime: int = 1, xattrs=(), link=None,
          rdev: int = 0) -> Entry:
    return Entry(name, kind, mode, uid, gid, mtime, size, ref, tuple(xattrs), link, rdev)


def raw_entry(name=b"f", kind=1, mode=0o644, uid=0, gid=0, mtime=1, size=3, ref=D, xattrs=(),
              link=None, rdev=0):
    return [name, kind, mode, uid, gid, mtime, size, ref, [list(x) for x in xattrs], link, rdev]


def tree_bytes(entries, tag="T2", root=None) -> bytes:
    return pack([tag, entries, root])


def decode(data: bytes, tree_id=None, fmt: Format = FMT) -> Tree:
    return decode_tree(data, tree_id, fmt)


ROOT_META = entry(b"", Kind.DIR, 0o755, uid=5, gid=6, mtime=9, xattrs=[(b"user.r", b"v")])


def test_tree_round_trip():
    """encode_tree/decode_tree round-trip every kind and field (owners, xattrs, hard-link
    groups, devices, direct and listed block refs, the root's metadata); the id is checked."""
    big = (DIRECT_MAX + 1) * BS  # a listed file: its ref is one list id
    entries = (
        entry(b"a", Kind.FILE, size=BS + 1, ref=D + D, uid=1000, gid=1001,
              xattrs=[(b"system.posix_acl_access", b"\x02\x00"), (b"user.k", b"")]),
        entry(b"a-link", Kind.FILE, size=BS + 1, ref=D + D, link=b"a"),
        entry(b"b", Kind.DIR, 0o1777, ref=D, uid=None, gid=None),
        entry(b"big", Kind.FILE, 0o4755, size=big, ref=D),
        entry(b"c", Kind.LINK, 0o777, ref=b"/etc/passwd", mtime=-123_456_789_012),
        entry(b"dev", Kind.CHR, 0o600, rdev=os.makedev(1, 3)),
        entry(b"disk", Kind.BLK, 0o600, rdev=os.makedev(8, 0)),
        entry(b"empty", Kind.FILE, size=0, ref=b""),
        entry(b"fifo", Kind.FIFO, 0o600),
        entry(b"hole", Kind.FILE, size=BS, ref=ALGO.hole, mtime=2**62),
    )
    for tree in (Tree(entries), Tree(entries, ROOT_META), Tree((), ROOT_META)):
        data = encode_tree(tree)
        assert decode(data, ALGO.digest(data)) == tree
        with pytest.raises(IntegrityError):
            decode(data, digest_of(b"other"))
    assert decode(EMPTY_TREE) == Tree(())
    assert empty_tree_id(ALGO) == ALGO.digest(EMPTY_TREE)


def test_tree_ids_follow_the_volume_hash():
    """An XXH3 volume's trees hold 16-byte ids; a BLAKE3 id (32 bytes) is refused there."""
    fmt16 = Format(XXH3, BS)
    d16 = b"\x22" * XXH3.size
    tree = Tree((entry(b"d", Kind.DIR, 0o755, ref=d16), entry(b"f", Kind.FILE, size=5, ref=d16)))
    data = encode_tree(tree)
    assert decode(data, XXH3.digest(data), fmt16) == tree
    with pytest.raises(IntegrityError):
        decode(data, None, FMT)  # 16-byte ids in a 32-byte format
    with pytest.raises(IntegrityError):
        decode(tree_bytes([raw_entry(ref=D)]), None, fmt16)
    with pytest.raises(IntegrityError):
        decode(data, ALGO.digest(data), fmt16)  # named by the other hash


@pytest.mark.parametrize("name", [b"..", b".", b"", b"a/b", b"/", b"/abs", b"a\0b", "str", 5,
                                  b"x" * 4097, None])
def test_decode_tree_rejects_bad_names(name):
    """Unsafe or malformed names ('..', '/', NUL, empty, too long, not bytes) are refused."""
    with pytest.raises(IntegrityError):
        decode(tree_bytes([raw_entry(name=name)]))


def test_decode_tree_rejects_unsorted_and_duplicates():
    """Entries must be strictly sorted by name."""
    with pytest.raises(IntegrityError):
        decode(tree_bytes([raw_entry(name=b"b"), raw_entry(name=b"a")]))
    with pytest.raises(IntegrityError):
        decode(tree_bytes([raw_entry(name=b"a"), raw_entry(name=b"a")]))
    assert len(decode(tree_bytes([raw_entry(name=b"a"), raw_entry(name=b"b")])).entries) == 2


def test_top_level_tree_naming_volsync_refused():
    """A snapshot's top directory (the tree with root metadata) may not name .volsync; a
    subdirectory's may (a user directory of that name below the top is data)."""
    root = [0o755, 0, 0, 1, []]
    with pytest.raises(IntegrityError):
        decode(tree_bytes([raw_entry(name=b".volsync", kind=2, ref=D, size=0)], root=root))
    with pytest.raises(IntegrityError):
        decode(tree_bytes([raw_entry(name=b".volsync")], root=root))
    assert decode(tree_bytes([raw_entry(name=b".volsync", kind=2, ref=D, size=0)])).entries


BIG = (DIRECT_MAX + 1) * BS


@pytest.mark.parametrize("entry", [
    raw_entry(kind=0), raw_entry(kind=7), raw_entry(kind="1"), raw_entry(kind=True),
    raw_entry(kind=None),
    raw_entry(mode=-1), raw_entry(mode=0o10000), raw_entry(mode="644"), raw_entry(mode=1.0),
    raw_entry(size=-1), raw_entry(size=2**63), raw_entry(mtime=1.5), raw_entry(mtime=2**63),
    raw_entry(mtime=2**64 - 1), raw_entry(ref="text"), raw_entry(ref=None),
    # owners: 32-bit unsigned ints (or nil)
    raw_entry(uid=-1), raw_entry(gid=2**32), raw_entry(uid="0"), raw_entry(gid=1.5),
    raw_entry(uid=True),
    # file refs: one id per block when direct, one list id when listed
    raw_entry(ref=b"\x00" * (ALGO.size - 1)), raw_entry(ref=D + D),
    raw_entry(size=BS + 1, ref=D), raw_entry(size=0, ref=D),
    raw_entry(size=BIG, ref=D + D), raw_entry(size=BIG, ref=D * (DIRECT_MAX + 1)),
    raw_entry(size=DIRECT_MAX * BS, ref=D),
    # dirs: one id, no size
    raw_entry(kind=2, ref=D + D), raw_entry(kind=2, ref=b""), raw_entry(kind=2, ref=D, size=1),
    # symlinks: a target without NUL, at most 4096 bytes
    raw_entry(kind=3, ref=b"", size=0), raw_entry(kind=3, ref=b"a\0b", size=0),
    raw_entry(kind=3, ref=b"x" * 4097, size=0),
    # fifos and devices carry no content; only devices a device number
    raw_entry(kind=4, ref=D, size=0), raw_entry(kind=4, ref=b"", size=3),
    raw_entry(kind=5, ref=D, size=0, rdev=259), raw_entry(kind=6, ref=b"", size=4096, rdev=1),
    raw_entry(kind=4, ref=b"", size=0, rdev=1), raw_entry(rdev=1),
    raw_entry(kind=3, ref=b"t", size=0, rdev=1),
    raw_entry(kind=5, ref=b"", size=0, rdev=-1), raw_entry(kind=5, ref=b"", size=0, rdev="1"),
    # hard-link groups: a relative path inside the volume, on regular files only
    raw_entry(link=b"../outside"), raw_entry(link=b"a/../../b"), raw_entry(link=b"/etc/passwd"),
    raw_entry(link=b""), raw_entry(link=b"a//b"), raw_entry(link=b"a/./b"),
    raw_entry(link=b"a\0b"), raw_entry(link="a"), raw_entry(link=5),
    raw_entry(link=b"x" * (64 << 10) + b"/y"),
    raw_entry(kind=2, ref=D, size=0, link=b"a"), raw_entry(kind=3, ref=b"t", size=0, link=b"a"),
    # xattrs: sorted unique (name, value) pairs, names without NUL, bounded sizes
    raw_entry(xattrs=[(b"user.a\0b", b"v")]), raw_entry(xattrs=[(b"", b"v")]),
    raw_entry(xattrs=[(b"user.big", b"v" * (MAX_XATTR_VALUE + 1))]),
    raw_entry(xattrs=[(b"u" * 256, b"v")]),
    raw_entry(xattrs=[(b"user.b", b"1"), (b"user.a", b"2")]),
    raw_entry(xattrs=[(b"user.a", b"1"), (b"user.a", b"2")]),
    raw_entry(xattrs=[("user.a", b"1")]), raw_entry(xattrs=[(b"user.a", "1")]),
    raw_entry(xattrs=[(b"user.a",)]), raw_entry(xattrs=[(b"user.a", b"1", b"2")]),
    raw_entry(xattrs=[(b"user.%d" % i, b"") for i in range(1025)]),
    raw_entry()[:10] + [0, 1], raw_entry()[:10], raw_entry()[:6], raw_entry()[:7] + [{}],
    [b"f", 1, 0o644, 1, 3], "notalist", None, {b"f": 1},
])
def test_decode_tree_rejects_bad_entries(entry):
    """Bad kinds, types, modes, sizes, owners, refs, xattrs, hard-link groups and device
    numbers are refused."""
    with pytest.raises(IntegrityError):
        decode(tree_bytes([entry]))


def test_raw_entry_base_is_valid():
    """The entry every refused case varies is itself accepted (else the cases prove nothing)."""
    assert decode(tree_bytes([raw_entry()])).entries[0] == entry(b"f", Kind.FILE, size=3, ref=D)
    assert decode(tree_bytes([raw_entry(kind=5, ref=b"", size=0, rdev=259)])).entries
    assert decode(tree_bytes([raw_entry(size=BIG, ref=D, link=b"a/b",
                                        xattrs=[(b"user.a", b"1"), (b"user.b", b"")])]))


@pytest.mark.parametrize("root", [[0o755, 0, 0, 1], [0o755, 0, 0, 1, [], 0], [0o10000, 0, 0, 1, []],
                                  [0o755, -1, 0, 1, []], [0o755, 0, 0, 1.5, []],
                                  [0o755, 0, 0, 1, [[b"a\0", b""]]], "root", 0, {}, []])
def test_decode_tree_rejects_bad_root_metadata(root):
    """A snapshot top directory's own metadata is validated like an entry's."""
    with pytest.raises(IntegrityError):
        decode(tree_bytes([raw_entry()], root=root))


@pytest.mark.parametrize("data", [pack(["T1", []]), pack(["T1", [], None]), pack(["T2", []]),
                                  pack(["T2"]), pack(["T2", {}, None]), pack(["T2", [], None, 1]),
                                  pack({"T2": []}), pack(["T2", "x", None]), b"\xc1", b"",
                                  EMPTY_TREE + b"\x00"])
def test_decode_tree_rejects_bad_shape(data):
    """Wrong tag (format 1's T1 included), shape or undecodable bytes are refused."""
    with pytest.raises(IntegrityError):
        decode(data)


# --- block lists ----------------------------------------------------------------------------

def test_block_refs_split_into_list_objects_past_direct_max():
    """Up to DIRECT_MAX blocks are listed in the entry; more go to list objects of FANOUT ids
    (children stored first), and lists of only holes are not stored."""
    from volsync.store.blocklist import block_ids, content_objects

    stored: dict[bytes, bytes] = {}

    def put(i, data):
        assert all(len(c) == ALGO.size and (c in stored or c.startswith(b"b")) for c in
                   (data[k : k + ALGO.size] for k in range(0, len(data), ALGO.size))
                   if c != ALGO.hole)
        stored[i] = data

    ids = [bytes([98]) + i.to_bytes(ALGO.size - 1, "big") for i in range(DIRECT_MAX)]
    assert build_ref(ids, FMT, put) == b"".join(ids) and not stored
    ids = [bytes([98]) + i.to_bytes(ALGO.size - 1, "big") for i in range(FANOUT * 2 + 5)]
    ids[FANOUT : 2 * FANOUT] = [ALGO.hole] * FANOUT
    ref = build_ref(ids, FMT, put)
    assert len(ref) == ALGO.size and len(stored) == 3  # two lists of blocks, one of lists
    size = len(ids) * BS - 7
    assert list(block_ids(ref, size, FMT, stored.__getitem__)) == ids
    objs = list(content_objects(ref, size, FMT, stored.__getitem__))
    assert [o for o, _, is_list in objs if is_list][-1] == ref
    assert {o for o, _, is_list in objs if is_list} == set(stored)
    with pytest.raises(IntegrityError):  # a list object that is not what its id says
        bad = dict(stored)
        first = next(k for k in bad if k != ref)
        bad[first] = bad[first][: -ALGO.size]
        list(block_ids(ref, size, FMT, bad.__getitem__))


# --- atomic_write ---------------------------------------------------------------------------

def test_atomic_write_creates_and_replaces(tmp_path):
    """atomic_write creates or replaces a file and leaves no temp file."""
    p = tmp_path / "f"
    fsutil.atomic_write(p, b"one")
    assert p.read_bytes() == b"one"
    fsutil.atomic_write(p, b"two" * 1000)
    assert p.read_bytes() == b"two" * 1000
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_write_failure_keeps_old(tmp_path, monkeypatch):
    """A write that fails midway leaves the old content and no temp file."""
    p = tmp_path / "f"
    fsutil.atomic_write(p, b"old")

    def boom(fd, data):
        os.write(fd, b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil, "write_all", boom)
    with pytest.raises(OSError):
        fsutil.atomic_write(p, b"new content")
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_write_crash_before_rename_keeps_old(tmp_path):
    """Killed just before the rename, the old content stays; remove_temps cleans up."""
    p = tmp_path / "f"
    fsutil.atomic_write(p, b"old")
    code = textwrap.dedent(f"""
        from pathlib import Path
        from volsync.store.fsutil import atomic_write
        atomic_write(Path({str(p)!r}), b"new")
    """)
    env = dict(os.environ, VOLSYNC_CRASH_AT="atomic-write-before-rename:1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, check=False)
    assert proc.returncode == 137
    assert p.read_bytes() == b"old"
    assert len(os.listdir(tmp_path)) == 2
    fsutil.remove_temps(tmp_path)
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_write_refuses_to_follow_symlinked_temp(tmp_path):
    """atomic_write replaces a symlink at the path rather than writing through it."""
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    p = tmp_path / "f"
    p.symlink_to(target)
    fsutil.atomic_write(p, b"new")
    assert target.read_bytes() == b"keep"
    assert not p.is_symlink() and p.read_bytes() == b"new"


# --- the lock -------------------------------------------------------------------------------

def test_lock_is_exclusive_and_names_holder(tmp_path):
    """A second acquire fails with VolumeLocked naming the holder's pid; release frees it."""
    path = tmp_path / "lock"
    a, b = VolumeLock(path, "vol"), VolumeLock(path, "vol")
    a.acquire()
    assert current_holder(path) == os.getpid()
    with pytest.raises(VolumeLocked) as exc:
        b.acquire()
    assert exc.value.pid == os.getpid()
    assert str(os.getpid()) in str(exc.value)
    a.release()
    assert current_holder(path) is None
    b.acquire()
    b.release()


def test_lock_released_when_holder_dies(tmp_path):
    """A process that dies holding the lock (os._exit, no cleanup) leaves no stale lock."""
    path = tmp_path / "lock"
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from volsync.store.lock import VolumeLock
        VolumeLock(Path({str(path)!r}), "vol").acquire()
        print("locked", flush=True)
        sys.stdin.readline()
        os._exit(0)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(VolumeLocked) as exc:
            VolumeLock(path, "vol").acquire()
        assert exc.value.pid == proc.pid
        assert current_holder(path) == proc.pid
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert current_holder(path) is None
    lock = VolumeLock(path, "vol")
    lock.acquire()
    lock.release()


def test_lock_wait_times_out(tmp_path):
    """acquire(wait) still fails when the holder keeps the lock."""
    path = tmp_path / "lock"
    a = VolumeLock(path, "vol")
    a.acquire()
    try:
        with pytest.raises(VolumeLocked):
            VolumeLock(path, "vol").acquire(wait=0.1)
    finally:
        a.release()


@pytest.mark.parametrize("names", [("aaaa", "ffff"), ("ffff", "aaaa")])
def test_repack_frees_copies_left_by_crashed_repack(packdir, monkeypatch, names):
    """Copies of an object in two packs (a repack killed before dropping the old pack) are
    reduced to one by the next repack, whichever pack the index prefers."""
    from volsync.store import packs as packs_mod

    real = packs_mod.secrets.token_hex
    chosen = iter(names)

    def pack_names(n=None):  # pack names are token_hex(8); temp names keep random ones
        return next(chosen) * 4 if n == 8 else real(n)

    monkeypatch.setattr(packs_mod.secrets, "token_hex", pack_names)
    s = PackStore(packdir, ALGO)
    a, b = blob(1, 30_000), blob(2, 30_000)
    put_all(s, [a, b])
    s.flush()
    w = PackWriter(packdir, RECORD)  # the crashed repack's new pack: only the live object
    w.add(digest_of(a), a)
    w.seal()
    s.close()
    chosen = iter(["9999"])
    s2 = PackStore(packdir, ALGO)
    s2.repack({digest_of(a)})
    s2.close()
    s3 = PackStore(packdir, ALGO)
    assert s3.get(digest_of(a), verify=True) == a and not s3.has(digest_of(b))
    total = sum(p.stat().st_size for p in packdir.glob("*.pack"))
    assert total < 40_000  # one copy of `a`, no copy of `b`


# --- the pool of open packs -------------------------------------------------------------------

def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def one_pack_each(store: PackStore, count: int, first: int = 0) -> list[bytes]:
    """`count` objects, each sealed in a pack of its own."""
    ids = []
    for i in range(first, first + count):
        ids += put_all(store, [blob(i, 300 + i)])
        store.flush()
    return ids


@pytest.fixture
def many_packs(packdir):
    store = PackStore(packdir, ALGO)
    ids = one_pack_each(store, 40)
    store.close()
    return packdir, ids


def test_the_pool_never_holds_more_than_its_cap_open(many_packs):
    packdir, ids = many_packs
    before = open_fds()
    store = PackStore(packdir, ALGO)
    store._pool.cap = 5
    out = os.open(packdir / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for _ in range(2):
            for n, block_id in enumerate(ids):
                assert digest_of(store.get(block_id, verify=True)) == block_id
                store.copy_to(block_id, out, 0, verify=n % 2 == 0)
                assert len(store._pool) <= 5
                assert open_fds() <= before + 2 * 5 + 1  # a mapping holds a dup of its fd
    finally:
        os.close(out)
    store.close()
    assert len(store._pool) == 0 and open_fds() == before


def test_the_pool_keeps_the_most_recently_used_packs_open(many_packs):
    packdir, ids = many_packs
    store = PackStore(packdir, ALGO)
    store._pool.cap = 3
    for block_id in ids[:3]:
        store.get(block_id)
    store.get(ids[0])  # used again: the second is now the least recent
    store.get(ids[3])
    names = [store.index()[i][0] for i in ids]
    assert list(store._pool._open) == [names[2], names[0], names[3]]
    store.close()


def test_a_pinned_pack_is_never_closed_however_many_others_are_opened(many_packs):
    packdir, ids = many_packs
    store = PackStore(packdir, ALGO)
    store._pool.cap = 1
    name, off, length = store.index()[ids[0]]
    with store._pool.use(name, mapped=True) as pack:
        for block_id in ids[1:]:
            store.get(block_id, verify=True)
        assert os.pread(pack.fd, length, off) == bytes(pack.view[off : off + length])
        assert digest_of(pack.view[off : off + length]) == ids[0]
    assert len(store._pool) == 1
    store.close()


def test_a_mapping_still_referenced_is_closed_later_not_broken(many_packs):
    packdir, ids = many_packs
    store = PackStore(packdir, ALGO)
    store._pool.cap = 1
    name, off, length = store.index()[ids[0]]
    with store._pool.use(name, mapped=True) as pack:
        kept = pack.view[off : off + length]  # a caller that holds on to a slice too long
    store.get(ids[1])  # evicts the first pack: its mapping cannot be closed yet
    assert digest_of(kept) == ids[0]
    del kept
    store.get(ids[2])
    assert len(store._pool) == 1
    store.close()
    assert not store._pool._lingering


def test_evictions_during_a_store_to_store_copy_break_nothing(many_packs, tmp_path):
    """put_many_from copies runs across many packs while another thread reads and kernel-copies
    from the same source store (a transfer's live-tree writer): with a pool of 2, packs are
    evicted under both all the time."""
    packdir, ids = many_packs
    src = PackStore(packdir, ALGO)
    src._pool.cap = 2
    src.index()  # loaded before the threads start, as a transfer's planning does
    dst_dir = tmp_path / "dst"
    dst_dir.mkdir()
    dst = PackStore(dst_dir, ALGO)
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    errors, stop = [], []

    def reader():
        try:
            while not stop:
                for block_id in reversed(ids):
                    length = src.copy_to(block_id, out, 0)
                    assert digest_of(os.pread(out, length, 0)) == block_id
                    assert digest_of(src.get(block_id)) == block_id
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    import threading
    thread = threading.Thread(target=reader)
    thread.start()
    copied = []
    try:
        # on_object reads an unrelated pack mid-run: it evicts the run's pack
        dst.put_many_from(src, ids, lambda n: (copied.append(n), src.get(ids[len(copied) % 7])))
        dst.flush()
    finally:
        stop.append(True)
        thread.join()
        os.close(out)
    assert not errors, errors
    assert len(copied) == len(ids) and len(src._pool) <= 2
    dst.close()
    dst = PackStore(dst_dir, ALGO)
    assert all(digest_of(dst.get(i)) == i for i in ids)
    dst.close()
    src.close()


# --- an OS limit is no damage -----------------------------------------------------------------

def _refuse_open(monkeypatch, err: int):
    real = os.open

    def refusing(path, *args, **kwargs):
        if str(path).endswith((".pack", ".idx")):
            raise OSError(err, os.strerror(err), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)


def test_too_many_open_files_reading_a_pack_is_exit_1_naming_the_limit(many_packs, monkeypatch):
    import errno
    import resource

    from volsync.errors import StoreAccessError
    packdir, ids = many_packs
    store = PackStore(packdir, ALGO)
    store.index()
    _refuse_open(monkeypatch, errno.EMFILE)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    for read in (lambda: store.get(ids[0]), lambda: store.copy_to(ids[0], 1, 0),
                 lambda: list(store.scan_pack(store.pack_names()[0]))):
        with pytest.raises(StoreAccessError) as caught:
            read()
        assert caught.value.code == 1 and not isinstance(caught.value, IntegrityError)
        assert f"too many open files (ulimit -n {soft}) while" in str(caught.value)
        assert store.pack_names()[0] in str(caught.value) or "pack" in str(caught.value)
    monkeypatch.undo()
    store.close()


@pytest.mark.parametrize("err", ["ENFILE", "ENOMEM", "EACCES"])
def test_other_os_refusals_are_no_damage_either(many_packs, monkeypatch, err):
    import errno

    from volsync.errors import StoreAccessError
    packdir, ids = many_packs
    store = PackStore(packdir, ALGO)
    store.index()
    _refuse_open(monkeypatch, getattr(errno, err))
    with pytest.raises(StoreAccessError) as caught:
        store.get(ids[0])
    name = store.index()[ids[0]][0]
    assert caught.value.code == 1 and f"while opening pack {name}" in str(caught.value)
    monkeypatch.undo()
    store.close()


def test_a_missing_pack_is_still_damage(many_packs):
    packdir, ids = many_packs
    store = PackStore(packdir, ALGO)
    name = store.index()[ids[0]][0]
    (packdir / f"{name}.pack").unlink()
    with pytest.raises(IntegrityError, match=f"pack {name}"):
        store.get(ids[0])
    store.close()


def test_an_index_unreadable_for_a_limit_is_not_a_bad_index(many_packs, monkeypatch):
    import errno

    from volsync.errors import StoreAccessError
    packdir, _ = many_packs
    store = PackStore(packdir, ALGO)
    _refuse_open(monkeypatch, errno.EMFILE)
    with pytest.raises(StoreAccessError, match="too many open files"):
        store.index()
    assert store.bad_indexes == []


def test_adopting_and_salvaging_under_a_limit_throw_nothing_away(many_packs, monkeypatch):
    import errno

    from volsync.errors import StoreAccessError
    packdir, ids = many_packs
    store = PackStore(packdir, ALGO)
    name = store.index()[ids[0]][0]
    (packdir / f"{name}.idx").unlink()  # an orphan, to be adopted
    other = store.index()[ids[1]][0]
    store.close()
    store = PackStore(packdir, ALGO)
    store.index()
    _refuse_open(monkeypatch, errno.EMFILE)
    with pytest.raises(StoreAccessError):
        store.adopt_orphans()
    with pytest.raises(StoreAccessError):
        store.salvage({other})
    monkeypatch.undo()
    assert (packdir / f"{name}.pack").exists() and (packdir / f"{other}.pack").exists()
    assert store.adopt_orphans() == 1
    store.close()


# --- merging small packs ----------------------------------------------------------------------

def pack_files(packdir) -> set[str]:
    return {p.stem for p in packdir.glob("*.pack")}


def test_repack_merges_small_packs_once_there_are_many(packdir):
    from volsync.store.packs import MERGE_SMALL_PACKS
    store = PackStore(packdir, ALGO)
    ids = one_pack_each(store, MERGE_SMALL_PACKS + 1)
    assert store.repack(set(ids)) == (0, 0)
    store.close()
    assert len(pack_files(packdir)) == 1
    store = PackStore(packdir, ALGO)
    assert all(digest_of(store.get(i, verify=True)) == i for i in ids)
    store.close()


def test_repack_leaves_few_small_packs_and_spared_ones_alone(packdir):
    from volsync.store.packs import MERGE_SMALL_PACKS
    store = PackStore(packdir, ALGO)
    ids = one_pack_each(store, MERGE_SMALL_PACKS)
    before = pack_files(packdir)
    store.repack(set(ids))
    assert pack_files(packdir) == before
    ids += one_pack_each(store, 1, first=len(ids))
    spare = set(sorted(before)[:2])  # so only MERGE_SMALL_PACKS - 1 count
    store.repack(set(ids), spare)
    assert len(pack_files(packdir)) == MERGE_SMALL_PACKS + 1
    store.repack(set(ids))
    assert len(pack_files(packdir)) == 1
    store.close()


class Killed(BaseException):
    """Stands for a kill at a crash point: nothing after it runs."""


@pytest.mark.parametrize("point, nth", [("pack-data-durable", 1), ("pack-index-committed", 1),
                                        ("pack-index-dropped", 1), ("pack-index-dropped", 40),
                                        ("pack-index-dropped", 70)])
def test_a_merge_killed_at_any_step_loses_nothing_and_the_next_one_finishes(
        packdir, monkeypatch, point, nth):
    from volsync.store import packs as packs_mod
    from volsync.store.packs import MERGE_SMALL_PACKS
    store = PackStore(packdir, ALGO)
    ids = one_pack_each(store, MERGE_SMALL_PACKS + 6)
    store.close()
    passages = []

    def crashpoint(name):
        passages.append(name)
        if name == point and passages.count(name) == nth:
            raise Killed()

    monkeypatch.setattr(packs_mod, "crashpoint", crashpoint)
    store = PackStore(packdir, ALGO)
    with pytest.raises(Killed):
        store.repack(set(ids))
    store._pool.close_all()  # the process is gone: no flush, no discard
    monkeypatch.undo()
    store = PackStore(packdir, ALGO)  # the next lock holder
    store.adopt_orphans()
    assert all(digest_of(store.get(i, verify=True)) == i for i in ids)
    store.repack(set(ids))
    store.close()
    store = PackStore(packdir, ALGO)
    assert all(digest_of(store.get(i, verify=True)) == i for i in ids)
    # at most MERGE_SMALL_PACKS small packs are left (the merge's own pack among them), and no
    # object is stored twice any more
    assert len(pack_files(packdir)) <= MERGE_SMALL_PACKS + 1
    indexed = [e for name in pack_files(packdir)
               for e in read_index(packdir / f"{name}.idx", ALGO.size)[1]]
    assert len(indexed) == len(ids)
    store.close()


# --- the block index: packs/multi.midx --------------------------------------------------------


def random_packs(packdir, algo, packs: int, per_pack: int, seed: int = 1) -> dict:
    """Packs of random objects, some ids in two packs (a crashed repack's copies): every
    location of each id, as the pack indexes list them."""
    rng = random.Random(seed)
    record = record_struct(algo)
    where: dict[bytes, set] = {}
    copies = []
    for _ in range(packs):
        w = PackWriter(packdir, record)
        for data in copies + [rng.randbytes(rng.randint(1, 64)) for _ in range(per_pack)]:
            w.add(algo.digest(data), data)
        for block_id, (off, length) in w.seal().items():
            where.setdefault(block_id, set()).add((w.name, off, length))
        copies = [rng.randbytes(8) for _ in range(3)]  # also go into the next pack
        for data in copies:
            w2 = PackWriter(packdir, record)
            w2.add(algo.digest(data), data)
            for block_id, (off, length) in w2.seal().items():
                where.setdefault(block_id, set()).add((w2.name, off, length))
    return where


def assert_index_matches(index, where: dict, algo=ALGO) -> None:
    for block_id, locations in where.items():
        assert index.get(block_id) in locations
        assert block_id in index
    assert {i for i, _ in index.items()} == set(where)
    assert all(loc in where[i] for i, loc in index.items())
    rng = random.Random(7)
    for _ in range(200):
        assert rng.randbytes(algo.size) not in index
    assert index.get(b"short") is None


@pytest.mark.parametrize("algo", [BLAKE3, XXH3])
@pytest.mark.parametrize("scan_limit", [64, 1])  # 1: every lookup bisects
def test_midx_lookups_equal_the_pack_indexes(packdir, monkeypatch, algo, scan_limit):
    """Every id the pack indexes list is found at one of its locations through the midx
    (ids in two packs included), nothing else is, and the midx covers every pack."""
    monkeypatch.setattr(blockindex, "SCAN_LIMIT", scan_limit)
    where = random_packs(packdir, algo, packs=6, per_pack=700)
    s = PackStore(packdir, algo)
    s.write_midx()
    s.close()
    s2 = PackStore(packdir, algo)
    index = s2.index()
    assert index.midx is not None and not index.overlay and not index.uncovered
    assert sorted(index.midx.names) == s2.pack_names()
    assert_index_matches(index, where, algo)
    some = next(iter(where))
    assert s2.get(some, verify=True)


@pytest.mark.parametrize("algo", [BLAKE3, XXH3])
def test_packs_the_midx_does_not_cover_are_indexed_compactly_with_the_same_answers(
        packdir, monkeypatch, algo):
    """Past EXTRA_MIN_BYTES of pack indexes the midx does not cover, they are read into a
    midx built in memory, not a dict: the answers are the dict's (a later pack's copy of an
    id found first), items() names each id once, deletions show, and a dropped pack's
    entries are no longer found."""
    where = random_packs(packdir, algo, packs=5, per_pack=400)
    s = PackStore(packdir, algo)
    s.write_midx()
    s.close()
    where.update(random_packs(packdir, algo, packs=4, per_pack=300, seed=2))  # uncovered
    answers = []
    for limit in (1 << 40, 0):  # the dict, then the midx in memory
        monkeypatch.setattr(packs_mod, "EXTRA_MIN_BYTES", limit)
        store = PackStore(packdir, algo)
        index = store.index()
        assert (index.extra is None) == bool(limit) and len(index.uncovered) > 4
        assert_index_matches(index, where, algo)
        ids = [i for i, _ in index.items()]
        assert len(ids) == len(set(ids))
        answers.append({i: index.get(i) for i in where})
        gone = next(iter(where))
        del index[gone]
        assert gone not in index and gone not in {i for i, _ in index.items()}
        if not limit:  # (the dict keeps a dropped pack's entries until they are removed)
            extra_pack = min(index.uncovered)
            index.drop_pack(extra_pack)
            assert all(loc[0] != extra_pack for _, loc in index.items())
        store.close()
    assert answers[0] == answers[1]


def test_a_writer_folds_its_overlay_into_the_index_in_memory(packdir, monkeypatch):
    """Between two rewrites of the midx file, a writer's new entries go from the overlay
    into the in-memory midx of the packs the file does not cover; lookups, deletions and
    reads are the same throughout, and the next store sees the same."""
    monkeypatch.setattr(packs_mod, "MIDX_MIN_ENTRIES", 1 << 30)
    monkeypatch.setattr(packs_mod, "MIDX_MAX_PACKS", 1 << 30)
    monkeypatch.setattr(packs_mod, "OVERLAY_FOLD", 50)
    s = PackStore(packdir, ALGO)
    ids = []
    for round_ in range(4):
        ids += put_all(s, [blob(100 * round_ + i) for i in range(60)])
        s.flush()
    index = s.index()
    assert index.extra is not None and len(index.overlay) < 60
    assert sorted(index.extra.names) == s.pack_names()
    gone = ids[5]
    del index[gone]
    ids += put_all(s, [blob(1000 + i) for i in range(60)])
    s.flush()  # folds again: the deletion stays
    assert gone not in index and ids[6] in index
    assert all(s.get(i, verify=True) for i in ids if i != gone)
    assert {i for i, _ in index.items()} == set(ids) - {gone}
    s.close()
    s2 = PackStore(packdir, ALGO)
    assert all(s2.get(i, verify=True) for i in ids)  # (the deletion was this store's own)


def test_midx_with_many_ids_under_one_prefix(packdir, monkeypatch):
    """Ranges the fanout leaves long are bisected before they are scanned."""
    monkeypatch.setattr(blockindex, "SCAN_LIMIT", 4)
    s = PackStore(packdir, ALGO)
    ids = sorted({bytes([1, 2]) + random.Random(i).randbytes(30) for i in range(300)})
    w = PackWriter(packdir, RECORD)
    for n, block_id in enumerate(ids):
        w.add(block_id, blob(n, 10))
    w.seal()
    s.write_midx()
    s.close()
    index = PackStore(packdir, ALGO).index()
    assert [index[i][1] for i in ids] == sorted(index[i][1] for i in ids)
    assert bytes([1, 2]) + bytes(30) not in index and bytes([1, 2]) + b"\xff" * 30 not in index


def test_midx_plus_overlay_of_packs_it_does_not_cover(packdir):
    """Packs sealed after the midx was written are read from their indexes, over it."""
    s = PackStore(packdir, ALGO)
    first = put_all(s, [blob(i) for i in range(50)])
    s.flush()
    s.write_midx()
    second = put_all(s, [blob(i) for i in range(50, 80)])
    s.flush()  # below the threshold: no rewrite
    assert s.index().uncovered and s.index().midx is not None
    s.close()
    s2 = PackStore(packdir, ALGO)
    index = s2.index()
    assert len(index.midx.names) == 1 and len(index.uncovered) == 1
    assert all(s2.get(i, verify=True) for i in first + second)
    assert len(index) == 80


def test_the_writer_rewrites_the_midx_past_the_threshold_a_reader_never(packdir, monkeypatch):
    monkeypatch.setattr(packs_mod, "MIDX_MIN_ENTRIES", 20)
    s = PackStore(packdir, ALGO)
    put_all(s, [blob(i) for i in range(10)])
    s.flush()
    assert not (packdir / MIDX_NAME).exists()
    ids = put_all(s, [blob(i) for i in range(10, 40)])
    s.flush()  # 40 entries outside any midx: written
    assert (packdir / MIDX_NAME).exists() and not s.index().overlay
    assert s.get(ids[-1], verify=True) == blob(39)
    s.close()
    before = (packdir / MIDX_NAME).read_bytes()
    reader = PackStore(packdir, ALGO)
    w = PackWriter(packdir, RECORD)  # another writer's pack, unknown to the midx
    for i in range(40, 100):
        w.add(digest_of(blob(i)), blob(i))
    w.seal()
    assert reader.has(digest_of(blob(99))) and reader.has(ids[0])
    assert (packdir / MIDX_NAME).read_bytes() == before  # reading writes nothing


def test_stale_midx_after_repack_is_ignored_then_rewritten(packdir, monkeypatch):
    """A midx that still covers packs a repack dropped (killed before rewriting it) finds
    nothing in them: the live objects are found where the repack put them."""
    s = PackStore(packdir, ALGO)
    keep = put_all(s, [blob(i, 20_000) for i in range(3)])
    drop = put_all(s, [blob(i, 20_000) for i in range(3, 6)])
    s.flush()
    s.write_midx()
    monkeypatch.setattr(PackStore, "maintain_index", lambda self, force=False: False)
    assert s.repack(set(keep)) == (3, 60_000)
    s.close()
    monkeypatch.undo()
    s2 = PackStore(packdir, ALGO)
    index = s2.index()
    assert index.stale and index.midx is not None
    assert all(s2.get(i, verify=True) for i in keep)
    assert not any(s2.has(i) for i in drop)
    assert {i for i, _ in index.items()} == set(keep)
    assert s2.maintain_index()  # the next writer rewrites it
    assert not s2.index().stale and sorted(s2.index().midx.names) == s2.pack_names()
    assert all(s2.get(i, verify=True) for i in keep) and not any(s2.has(i) for i in drop)


def test_repack_rewrites_the_midx(packdir):
    s = PackStore(packdir, ALGO)
    keep = put_all(s, [blob(i, 20_000) for i in range(3)])
    drop = put_all(s, [blob(i, 20_000) for i in range(3, 6)])
    s.flush()
    s.write_midx()
    s.repack(set(keep))
    assert not s.index().stale and sorted(s.index().midx.names) == s.pack_names()
    s.close()
    s2 = PackStore(packdir, ALGO)
    assert all(s2.get(i, verify=True) for i in keep) and not any(s2.has(i) for i in drop)


def test_a_copy_in_a_dropped_pack_is_found_in_the_other(packdir):
    """An id the midx lists in two packs is still found once one of them is gone."""
    s = PackStore(packdir, ALGO)
    a = blob(1, 5000)
    put_all(s, [a])
    s.flush()
    w = PackWriter(packdir, RECORD)
    w.add(digest_of(a), a)
    w.seal()
    s.close()
    s = PackStore(packdir, ALGO)
    s.write_midx()
    for name in s.index().midx.names:
        s.close()
        (packdir / f"{name}.idx").unlink()
        (packdir / f"{name}.pack").unlink()
        s = PackStore(packdir, ALGO)
        if s.pack_names():
            assert s.get(digest_of(a), verify=True) == a
    assert not s.has(digest_of(a))


def _damage(path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    lay = blockindex.Layout(*blockindex.HEADER.unpack_from(raw, 0)[1:])
    if how == "truncated":
        raw = raw[: len(raw) // 2]
    elif how == "empty":
        raw = bytearray()
    elif how == "magic":
        raw[0] ^= 1
    elif how == "id size":
        raw[8] = 16
    elif how == "names":
        raw[lay.names] ^= 0x20
    elif how == "fanout":
        raw[lay.fanout + 8 * 300] ^= 1
    elif how == "extra":
        raw += b"\0" * 8
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "empty", "magic", "id size", "names", "fanout",
                                 "extra", "symlink", "directory"])
def test_a_damaged_midx_is_ignored_for_the_pack_indexes(packdir, how):
    s = PackStore(packdir, ALGO)
    ids = put_all(s, [blob(i) for i in range(300)])
    s.flush()
    s.write_midx()
    s.close()
    midx = packdir / MIDX_NAME
    if how == "symlink":
        midx.rename(packdir / "elsewhere")
        midx.symlink_to(packdir / "elsewhere")
    elif how == "directory":
        midx.unlink()
        midx.mkdir()
    else:
        _damage(midx, how)
    s2 = PackStore(packdir, ALGO)
    assert s2.index().midx is None and s2.midx_problem
    assert all(s2.get(i, verify=True) == blob(n) for n, i in enumerate(ids))
    if how != "directory":
        assert s2.maintain_index()  # a writer replaces it
        assert s2.index().midx is not None and s2.midx_problem is None


def test_damage_past_the_header_is_caught_by_the_checks_of_reads_and_the_writer(packdir):
    """The arrays are not checked on open: a flipped offset makes a verified read fail (never
    return other data), verify reports it, and the next writer rebuilds the midx."""
    s = PackStore(packdir, ALGO)
    ids = put_all(s, [blob(i) for i in range(300)])
    s.flush()
    s.write_midx()
    s.close()
    midx = packdir / MIDX_NAME
    lay = blockindex.Layout(*blockindex.HEADER.unpack_from(midx.read_bytes(), 0)[1:])
    _flip(midx, lay.offsets + 8 * 5)
    s2 = PackStore(packdir, ALGO)
    assert s2.index().midx is not None
    results = []
    for n, i in enumerate(ids):
        try:
            results.append(s2.get(i, verify=True) == blob(n))
        except IntegrityError:
            results.append(None)
    assert None in results and False not in results
    assert "checksum mismatch" in s2.check_midx()
    assert s2.maintain_index()
    assert all(s2.get(i, verify=True) == blob(n) for n, i in enumerate(ids))
    assert s2.check_midx() is None


def test_a_midx_of_a_lost_index_is_dropped_when_the_pack_is_adopted(packdir):
    s = PackStore(packdir, ALGO)
    ids = put_all(s, [blob(i) for i in range(20)])
    s.flush()
    s.write_midx()
    name = s.pack_names()[0]
    (packdir / f"{name}.idx").unlink()
    s.close()
    s2 = PackStore(packdir, ALGO)
    assert not s2.has(ids[0])
    assert s2.adopt_orphans() == 20
    assert not (packdir / MIDX_NAME).exists()
    assert all(s2.get(i, verify=True) == blob(n) for n, i in enumerate(ids))


@pytest.mark.parametrize("point", ["pack-index-committed", "atomic-write-before-rename",
                                   "midx-written"])
def test_crash_between_pack_seal_and_midx_write(packdir, point):
    """Killed after a pack is sealed but before the midx covers it (or while it is being
    rewritten), every object is found: the pack's own index is read."""
    s = PackStore(packdir, ALGO)
    old = put_all(s, [blob(i) for i in range(40)])
    s.flush()
    s.write_midx()
    s.close()
    code = textwrap.dedent(f"""
        from pathlib import Path
        from volsync.model import BLAKE3
        from volsync.store import packs
        packs.MIDX_MIN_ENTRIES = 10
        s = packs.PackStore(Path({str(packdir)!r}), BLAKE3)
        for i in range(40, 80):
            data = (f"block {{i}} ".encode() * 1000)[:1000]
            s.put(BLAKE3.digest(data), data)
        s.flush()
    """)
    nth = {"pack-index-committed": 1, "atomic-write-before-rename": 2, "midx-written": 1}
    env = dict(os.environ, VOLSYNC_CRASH_AT=f"{point}:{nth[point]}")
    proc = subprocess.run([sys.executable, "-c", code], env=env, check=False)
    assert proc.returncode == 137
    fsutil.remove_temps(packdir)
    s2 = PackStore(packdir, ALGO)
    new = [digest_of(blob(i)) for i in range(40, 80)]
    assert all(s2.get(i, verify=True) == blob(n) for n, i in enumerate(old + new))
    assert s2.index().midx is not None and not s2.bad_indexes
    s2.maintain_index(force=True)
    assert sorted(s2.index().midx.names) == s2.pack_names()


def test_a_midx_that_cannot_be_written_leaves_the_store_working(packdir, monkeypatch):
    """Derived data: a full disk while writing it fails nothing."""
    monkeypatch.setattr(packs_mod, "MIDX_MIN_ENTRIES", 5)

    def full(path, fill, **kw):
        def fill_then_fail(fd):
            fill(fd)
            raise OSError(28, "No space left on device", str(path))

        return real(path, fill_then_fail if path.name == MIDX_NAME else fill, **kw)

    real = packs_mod.atomic_write_with
    monkeypatch.setattr(packs_mod, "atomic_write_with", full)
    s = PackStore(packdir, ALGO)
    ids = put_all(s, [blob(i) for i in range(20)])
    s.flush()
    assert not (packdir / MIDX_NAME).exists()
    assert not list(packdir.glob(".tmp-*"))  # the half-written file is gone too
    assert all(s.get(i, verify=True) == blob(n) for n, i in enumerate(ids))


def test_a_midx_written_to_a_file_equals_the_one_built_in_memory(packdir, monkeypatch):
    """The lock holder writes the midx section by section into its file (memory: a group
    of entries); the bytes are those of the midx built in one buffer, stale packs and an
    old midx merged included."""
    from volsync.store.blockindex import build_midx, open_midx

    monkeypatch.setattr(packs_mod, "MIDX_MIN_ENTRIES", 1 << 30)  # written by hand below
    s = PackStore(packdir, ALGO)
    for round_ in range(3):
        put_all(s, [blob(1000 * round_ + i) for i in range(300)])
        s.flush()
    s.write_midx()
    put_all(s, [blob(5000 + i) for i in range(50)])
    s.flush()
    old, _ = open_midx(packdir / MIDX_NAME, ALGO.size)
    live = [n != old.names[0] for n in old.names]  # as if the first pack were dropped
    fresh = [n for n in s.pack_names() if n not in old.names]
    in_memory = build_midx(ALGO.size, old, live, fresh, s._read_pack_index)
    path = packdir / "written.midx"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        assert build_midx(ALGO.size, old, live, fresh, s._read_pack_index, fd) is None
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(in_memory)
    written, problem = open_midx(path, ALGO.size)
    assert problem is None and written.intact() and written.count == old.count - sum(
        1 for first in range(256) for e in old.group(first) if e[1] == 0) + 50
    written.close()
    old.close()


def test_a_writer_that_read_every_index_still_replaces_a_damaged_midx(packdir):
    """verify --repair-from reads the .idx files, not the midx: its lock holder checks the
    midx once and writes it again if it is damaged."""
    s = PackStore(packdir, ALGO)
    ids = put_all(s, [blob(i) for i in range(300)])
    s.flush()
    s.write_midx()
    s.close()
    midx = packdir / MIDX_NAME
    _flip(midx, midx.stat().st_size - 20)
    s2 = PackStore(packdir, ALGO)
    s2.load_indexes()
    assert s2.maintain_index()
    assert s2.check_midx() is None
    assert all(s2.get(i, verify=True) == blob(n) for n, i in enumerate(ids))
    assert not s2.maintain_index()  # checked once, then good


@pytest.mark.parametrize("body_size", [0, 200, 300, 70_000, 200_000])
def test_sealed_body_read_in_place_or_by_the_general_decoder(body_size):
    """open_sealed reads seal()'s own layout (bodies of each msgpack bin width) as a view
    into the file's bytes, and gives the same value and the same errors as decoding the
    whole envelope; a file laid out otherwise (a str body, extra fields) goes to the general
    decoder, which says what is wrong."""
    from volsync.store.codec import _envelope, open_sealed, seal

    value = {b"k": os.urandom(body_size)}
    data = seal("statcache", value)
    assert isinstance(_envelope(data)[3], memoryview)
    assert open_sealed(data, "statcache", "w") == value
    body = msgpack.packb(value, use_bin_type=True)
    as_str = msgpack.packb(["volsync", 2, "statcache", body.hex(), xxhash.xxh3_64_intdigest(body)])
    six = msgpack.packb(["volsync", 2, "statcache", body, xxhash.xxh3_64_intdigest(body), 0])
    for bad, says in ((data[:-1], "undecodable"), (data + b"\0", "undecodable"),
                      (as_str, "expected a statcache file"), (six, "not a volsync")):
        assert _envelope(bad) is None
        with pytest.raises(IntegrityError, match=says):
            open_sealed(bad, "statcache", "w")
    flipped = bytearray(data)
    flipped[-12] ^= 1  # in the body: the checksum no longer matches
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        open_sealed(bytes(flipped), "statcache", "w")


def test_a_command_that_reads_no_object_leaves_the_index_unread(tmp_path, monkeypatch):
    """Releasing the lock checks whether the midx is due only where the command read the
    index: a no-change transfer (or snapshot) opens no pack index at all, which at millions
    of blocks would mean parsing every index the midx does not cover; a run that stores
    objects still reads it and keeps the midx up."""
    from helpers import make_volume, ok, write

    from volsync.store.packs import PackStore

    a = make_volume(tmp_path / "A", {f"f{i}": os.urandom(5000) for i in range(20)})
    time.sleep(0.1)  # no file written within a timestamp tick of a scan (racy: read again)
    ok("transfer", a, tmp_path / "B")
    opened = []
    real = PackStore._open_index

    def counting(self, use_midx):
        opened.append(self.dir)
        return real(self, use_midx)

    monkeypatch.setattr(PackStore, "_open_index", counting)
    ok("transfer", a, tmp_path / "B")
    ok("snapshot", a)
    assert opened == []
    write(a, {"f3": b"changed"})
    ok("transfer", a, tmp_path / "B")
    assert opened


@pytest.mark.parametrize("cap", [40, 1 << 30])
def test_a_long_write_rewrites_the_midx_once_its_pending_entries_reach_the_cap(
        packdir, monkeypatch, cap):
    """The midx is rewritten once the packs it does not cover hold 1/8 of its entries, but
    never more than MIDX_MAX_PENDING: a long write into a big volume holds that many in
    memory at most, not an eighth of the volume."""
    monkeypatch.setattr(packs_mod, "MIDX_MIN_ENTRIES", 1)
    monkeypatch.setattr(packs_mod, "MIDX_MAX_PACKS", 1 << 30)
    monkeypatch.setattr(packs_mod, "MIDX_MAX_PENDING", cap)
    s = PackStore(packdir, ALGO)
    put_all(s, [blob(i) for i in range(800)])
    s.flush()
    s.write_midx()
    assert s.index().covered() == 800 and s.index().pending() == 0
    put_all(s, [blob(1000 + i) for i in range(60)])  # 60: past the cap, under 800 / 8
    s.flush()
    assert s.index().pending() == (0 if cap == 40 else 60)
    assert s.index().covered() == (860 if cap == 40 else 800)
    s.close()
