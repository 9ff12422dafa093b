"""Unit tests of the on-disk store: packs, codec, tree objects, atomic writes, the lock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import msgpack
import pytest
import xxhash

from volsync.errors import IntegrityError, VolumeLocked
from volsync.model import Entry, Kind, digest_of
from volsync.store import fsutil
from volsync.store.codec import open_sealed, pack, seal
from volsync.store.lock import VolumeLock, current_holder
from volsync.store.packs import PackStore, PackWriter
from volsync.store.trees import EMPTY_TREE, decode_tree, encode_tree

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
    s = PackStore(packdir)
    datas = [blob(i) for i in range(5)]
    ids = put_all(s, datas)
    assert all(s.has(i) for i in ids)
    assert [s.get(i) for i in ids] == datas
    assert not list(packdir.glob("*.idx"))  # not yet committed
    s.flush()
    assert len(list(packdir.glob("*.idx"))) == 1
    assert [s.get(i, verify=True) for i in ids] == datas
    s.close()
    s2 = PackStore(packdir)
    assert all(s2.has(i) for i in ids)
    assert [s2.get(i, verify=True) for i in ids] == datas
    assert s2.length(ids[0]) == len(datas[0])
    assert not s2.has(digest_of(b"never stored"))
    with pytest.raises(IntegrityError):
        s2.get(digest_of(b"never stored"))
    s2.close()


def test_put_is_idempotent(packdir):
    """Putting an object already stored writes nothing and returns False."""
    s = PackStore(packdir)
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
    s = PackStore(packdir)
    ids = put_all(s, [blob(1)])
    s.discard()
    assert not s.has(ids[0])
    assert not list(packdir.glob("*.pack"))
    s.close()
    assert not PackStore(packdir).has(ids[0])


def test_empty_flush_leaves_nothing(packdir):
    """flush with nothing put creates no pack."""
    s = PackStore(packdir)
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
    s = PackStore(packdir)
    datas = [blob(i) for i in range(3)]
    ids = put_all(s, datas)
    s.flush()
    name, off, _ = s.index()[ids[1]]
    s.close()
    _flip(packdir / f"{name}.pack", off + 5)
    s2 = PackStore(packdir)
    assert s2.get(ids[1]) != datas[1]  # unverified read returns the bad bytes
    with pytest.raises(IntegrityError):
        s2.get(ids[1], verify=True)
    assert s2.get(ids[0], verify=True) == datas[0]
    assert s2.get(ids[2], verify=True) == datas[2]


def test_truncated_pack_read_is_integrity_error(packdir):
    """Reading an object past the end of a truncated pack is an IntegrityError."""
    s = PackStore(packdir)
    ids = put_all(s, [blob(i) for i in range(3)])
    s.flush()
    name, off, _ = s.index()[ids[2]]
    s.close()
    os.truncate(packdir / f"{name}.pack", off + 3)
    with pytest.raises(IntegrityError):
        PackStore(packdir).get(ids[2])


def test_bad_index_recorded_not_fatal(packdir):
    """A corrupt pack index is reported in bad_indexes; other packs stay readable."""
    s = PackStore(packdir)
    a = put_all(s, [blob(1)])
    s.flush()
    b = put_all(s, [blob(2)])
    s.flush()
    bad_name = s.index()[b[0]][0]
    s.close()
    _flip(packdir / f"{bad_name}.idx", 20)
    s2 = PackStore(packdir)
    assert s2.get(a[0], verify=True) == blob(1)
    assert not s2.has(b[0])
    assert [n for n, _ in s2.bad_indexes] == [f"{bad_name}.idx"]


def test_orphan_pack_adopted(packdir):
    """A pack without an index (crashed writer) is indexed: its intact records are kept, a
    torn tail is cut off, and indexed packs are untouched."""
    s = PackStore(packdir)
    ids = put_all(s, [blob(1)])
    s.flush()
    w = PackWriter(packdir)
    w.add(digest_of(blob(9)), blob(9))
    w.add(digest_of(blob(8)), blob(8))
    w.flush()
    w.drain()
    os.close(w.fd)
    orphan = w.path
    with open(orphan, "r+b") as f:  # tear the last record, as a crash mid-write would
        f.truncate(orphan.stat().st_size - 100)
    s2 = PackStore(packdir)
    assert s2.adopt_orphans() == 1
    assert orphan.with_suffix(".idx").exists()
    assert s2.get(ids[0], verify=True) == blob(1)
    assert s2.get(digest_of(blob(9)), verify=True) == blob(9)
    assert not s2.has(digest_of(blob(8)))
    assert PackStore(packdir).get(digest_of(blob(9)), verify=True) == blob(9)


def test_orphan_pack_with_nothing_intact_removed(packdir):
    """An orphan whose first record is already torn holds nothing: it is deleted."""
    w = PackWriter(packdir)
    w.add(digest_of(blob(9)), blob(9))
    w.drain()
    os.close(w.fd)
    with open(w.path, "r+b") as f:
        f.truncate(30)
    assert PackStore(packdir).adopt_orphans() == 0
    assert not w.path.exists()


def test_adopt_orphans_spares_own_writer(packdir):
    """adopt_orphans leaves alone the pack this store is currently writing."""
    s = PackStore(packdir)
    ids = put_all(s, [blob(1)])
    s.adopt_orphans()
    s.flush()
    assert PackStore(packdir).get(ids[0], verify=True) == blob(1)
    assert len(list(packdir.glob("*.idx"))) == 1


def test_repack_frees_garbage_keeps_live(packdir):
    """repack drops objects not in the live set, keeps the live ones readable across reopen,
    and removes the old packs."""
    s = PackStore(packdir)
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
    s2 = PackStore(packdir)
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
    s = PackStore(packdir)
    put_all(s, [blob(i) for i in range(3)])
    s.flush()
    assert s.repack(set())[0] == 3
    assert list(packdir.glob("*.pack")) == [] and list(packdir.glob("*.idx")) == []


def test_salvage_keeps_good_records(packdir):
    """salvage rewrites a damaged pack keeping only records that still match their ids."""
    s = PackStore(packdir)
    datas = [blob(i) for i in range(4)]
    ids = put_all(s, datas)
    s.flush()
    name, off, _ = s.index()[ids[1]]
    s.close()
    _flip(packdir / f"{name}.pack", off + 1)
    s2 = PackStore(packdir)
    assert s2.salvage({name}) == 3
    s2.close()
    assert not (packdir / f"{name}.pack").exists()
    s3 = PackStore(packdir)
    for i in (0, 2, 3):
        assert s3.get(ids[i], verify=True) == datas[i]
    assert not s3.has(ids[1])


def test_salvage_truncated_pack(packdir):
    """salvage of a truncated pack keeps the records before the cut."""
    s = PackStore(packdir)
    datas = [blob(i) for i in range(4)]
    ids = put_all(s, datas)
    s.flush()
    name, off, _ = s.index()[ids[2]]
    s.close()
    os.truncate(packdir / f"{name}.pack", off + 10)
    s2 = PackStore(packdir)
    assert s2.salvage({name}) == 2
    s2.close()
    s3 = PackStore(packdir)
    assert [s3.has(i) for i in ids] == [True, True, False, False]
    assert s3.get(ids[1], verify=True) == datas[1]


def test_scan_pack_reports_records(packdir):
    """scan_pack yields every record with its data; a bad header is an IntegrityError."""
    s = PackStore(packdir)
    datas = [blob(i) for i in range(3)]
    ids = put_all(s, datas)
    s.flush()
    name = s.pack_names()[0]
    assert [(i, d) for i, _, d in s.scan_pack(name)] == list(zip(ids, datas))
    _flip(packdir / f"{name}.pack", 0)
    with pytest.raises(IntegrityError):
        list(s.scan_pack(name))


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
                                     b"\xdb\xff\xff\xff\xff", os.urandom(64), b"\x00" * 30])
def test_open_sealed_rejects_garbage(garbage):
    """Garbage (including huge declared lengths) is an IntegrityError, not a crash."""
    with pytest.raises(IntegrityError):
        open_sealed(garbage, "state", "t")


def test_open_sealed_rejects_undecodable_body():
    """A body with a valid checksum but undecodable content is refused."""
    body = b"\xc1\xc1"
    bad = msgpack.packb(["volsync", 1, "state", body, xxhash.xxh3_64_intdigest(body)],
                        use_bin_type=True)
    with pytest.raises(IntegrityError):
        open_sealed(bad, "state", "t")


# --- tree objects ---------------------------------------------------------------------------

D = b"\x11" * 16


def raw_entry(name=b"f", kind=1, mode=0o644, mtime=1, size=3, ref=D):
    return [name, kind, mode, mtime, size, ref]


def tree_bytes(entries, tag="T1") -> bytes:
    return pack([tag, entries])


def test_tree_round_trip():
    """encode_tree/decode_tree round-trip files, dirs and links; the id is checked."""
    entries = [Entry(b"a", Kind.FILE, 0o644, 5, 3, D + D), Entry(b"b", Kind.DIR, 0o755, 6, 0, D),
               Entry(b"c", Kind.LINK, 0o777, 7, 0, b"/etc/passwd")]
    data = encode_tree(entries)
    assert decode_tree(data, digest_of(data)) == entries
    assert decode_tree(EMPTY_TREE) == []
    with pytest.raises(IntegrityError):
        decode_tree(data, digest_of(b"other"))


@pytest.mark.parametrize("name", [b"..", b".", b"", b"a/b", b"/", b"/abs", b"a\0b", "str", 5])
def test_decode_tree_rejects_bad_names(name):
    """Unsafe or malformed names ('..', '/', NUL, empty, not bytes) are refused."""
    with pytest.raises(IntegrityError):
        decode_tree(tree_bytes([raw_entry(name=name)]))


def test_decode_tree_rejects_unsorted_and_duplicates():
    """Entries must be strictly sorted by name."""
    with pytest.raises(IntegrityError):
        decode_tree(tree_bytes([raw_entry(name=b"b"), raw_entry(name=b"a")]))
    with pytest.raises(IntegrityError):
        decode_tree(tree_bytes([raw_entry(name=b"a"), raw_entry(name=b"a")]))
    assert len(decode_tree(tree_bytes([raw_entry(name=b"a"), raw_entry(name=b"b")]))) == 2


@pytest.mark.parametrize("entry", [
    raw_entry(kind=0), raw_entry(kind=4), raw_entry(kind="1"), raw_entry(kind=True),
    raw_entry(mode=-1), raw_entry(mode=0o10000), raw_entry(mode="644"),
    raw_entry(size=-1), raw_entry(mtime=1.5), raw_entry(ref="text"),
    raw_entry(ref=b"\x00" * 15),                      # file block list not a multiple of 16
    raw_entry(kind=2, ref=D + D), raw_entry(kind=2, ref=b""),  # dir ref must be one id
    raw_entry(kind=3, ref=b""), raw_entry(kind=3, ref=b"a\0b"),  # bad link targets
    [b"f", 1, 0o644, 1, 3], "notalist", None,
])
def test_decode_tree_rejects_bad_entries(entry):
    """Bad kinds, types, modes, sizes and refs are refused."""
    with pytest.raises(IntegrityError):
        decode_tree(tree_bytes([entry]))


@pytest.mark.parametrize("data", [pack(["T2", []]), pack(["T1"]), pack(["T1", {}]),
                                  pack({"T1": []}), b"\xc1", b""])
def test_decode_tree_rejects_bad_shape(data):
    """Wrong tag, shape or undecodable bytes are refused."""
    with pytest.raises(IntegrityError):
        decode_tree(data)


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
    s = PackStore(packdir)
    a, b = blob(1, 30_000), blob(2, 30_000)
    put_all(s, [a, b])
    s.flush()
    w = PackWriter(packdir)  # the crashed repack's new pack: only the live object
    w.add(digest_of(a), a)
    w.seal()
    s.close()
    chosen = iter(["9999"])
    s2 = PackStore(packdir)
    s2.repack({digest_of(a)})
    s2.close()
    s3 = PackStore(packdir)
    assert s3.get(digest_of(a), verify=True) == a and not s3.has(digest_of(b))
    total = sum(p.stat().st_size for p in packdir.glob("*.pack"))
    assert total < 40_000  # one copy of `a`, no copy of `b`
