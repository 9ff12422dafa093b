"""Fuzzing every format volsync reads: sealed envelopes of every kind, tree objects, pack
indexes, snapshot records, the state, the config and the stat cache.

Inputs are random bytes, mutations of valid encodings (bit flips, truncation, spliced-in
headers announcing huge lengths, deep nesting) and validly sealed bodies with wrong types. Every
input gives a valid value or one IntegrityError, never another exception, in bounded time and
with memory bounded by a small multiple of the input (tracemalloc)."""

from __future__ import annotations

import os
import string
import struct
import time
import tracemalloc

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volsync.errors import IntegrityError
from volsync.model import (
    BLAKE3,
    HASHES,
    READ_ONLY,
    READ_WRITE,
    Entry,
    Format,
    Kind,
    Snapshot,
    Tree,
    VolumeState,
)
from volsync.store.blocklist import depth_of
from volsync.store.codec import FORMAT_VERSION, open_sealed, pack, seal, unpack
from volsync.store.packs import read_index
from volsync.store.trees import (
    MAX_XATTR_NAME,
    MAX_XATTR_VALUE,
    META_NAME,
    decode_tree,
    encode_tree,
    valid_name,
    valid_path,
)
from volsync.store.volume import Volume, snapshot_body, snapshot_from_body

KINDS = ("config", "state", "snapshot", "index", "statcache")
MEMORY_LIMIT = 4 << 20  # bytes any decode of an input up to 4 KiB may allocate at its peak
TIME_LIMIT = 2.0  # seconds for one decode

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def bounded(fn, *args):
    """Call fn; return its value or the IntegrityError; anything else fails the test. Checks
    the peak allocation and the time taken."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.monotonic()
    try:
        return fn(*args)
    except IntegrityError as exc:
        return exc
    finally:
        elapsed = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak <= MEMORY_LIMIT, f"{fn.__name__} allocated {peak} bytes"
        assert elapsed <= TIME_LIMIT, f"{fn.__name__} took {elapsed:.2f} s"


# --- valid encodings and their mutations ------------------------------------------------------

SNAP_ID = "0123456789abcdef0123456789abcdef"
ALGO = BLAKE3
FMT = Format(ALGO, 4096)
ID = ALGO.size
digest_of = ALGO.digest
ROOT = digest_of(b"root")
ENTRIES = (
    Entry(b"a", Kind.FILE, 0o644, 1000, 1000, 1_600_000_000_000_000_000, 5000,
          digest_of(b"x") + digest_of(b"y"), ((b"user.k", b"v"),)),
    Entry(b"b", Kind.FILE, 0o644, 0, 0, 1, 5000, digest_of(b"x") + ALGO.hole, (), b"a"),
    Entry(b"big", Kind.FILE, 0o600, 0, 0, 1, 40 * 4096, digest_of(b"list")),
    Entry(b"d", Kind.DIR, 0o755, None, None, 1, 0, digest_of(b"sub")),
    Entry(b"dev", Kind.CHR, 0o600, 0, 0, 1, 0, b"", (), None, 259),
    Entry(b"l", Kind.LINK, 0o777, 0, 0, 2, 0, b"../target"),
    Entry(b"p", Kind.FIFO, 0o600, 0, 0, 2, 0, b""),
)
ROOT_META = Entry(b"", Kind.DIR, 0o755, 0, 0, 3, 0, b"", ((b"user.root", b""),))
VALID_BODIES = {
    "config": {"volume_id": "ab" * 16, "block_size": 65536, "hash": "blake3",
               "created": 1.5e9},
    "state": {"mode": "read-only", "upstream": "/srv/a", "upstream_id": "cd" * 16,
              "lineage": [SNAP_ID, "f" * 32], "preserved": ["e" * 32],
              "journal": {"op": "materialize"}, "extra": {"former_upstream": "/x"}},
    "snapshot": snapshot_body(Snapshot(SNAP_ID, 3, 1.7e9, "nightly", ROOT, 12345, 7, "ab" * 16)),
    "index": {"pack": "00112233aabbccdd", "ids": digest_of(b"1") + digest_of(b"2"),
              "offsets": struct.pack("<2Q", 8, 100), "lengths": struct.pack("<2I", 50, 60)},
    "statcache": {b"": [ROOT, 10, 2, {b"a": [1, 5, 1, 2, 3, 0o644], b"d": [2, 0o755, 1, ROOT]}],
                  b"d": [ROOT, 0, 0, {}]},
}
VALID = {k: seal(k, v) for k, v in VALID_BODIES.items()}
VALID_TREE = encode_tree(Tree(ENTRIES, ROOT_META))


def huge_headers() -> list[bytes]:
    """msgpack headers announcing far more than any input holds."""
    return [
        b"\xc6" + struct.pack(">I", 0xFFFFFFFF),  # bin32: 4 GiB
        b"\xdb" + struct.pack(">I", 0xFFFFFFFF),  # str32
        b"\xdd" + struct.pack(">I", 0xFFFFFFFF),  # array32
        b"\xdf" + struct.pack(">I", 0xFFFFFFFF),  # map32
        b"\xc9" + struct.pack(">I", 0xFFFFFFFF) + b"\x01",  # ext32
        b"\xdd" + struct.pack(">I", 1000),  # array32 of 1000 (within max_array_len)
        b"\xdf" + struct.pack(">I", 500),
    ]


@st.composite
def mutated(draw, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "header", "nest",
                                    "overwrite"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if how == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif how == "truncate":
            del data[pos:]
        elif how == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif how == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif how == "header":
            data[pos:pos] = draw(st.sampled_from(huge_headers())) * draw(st.integers(1, 200))
        elif how == "nest":  # deep nesting: up to 10,000 levels of arrays
            depth = draw(st.sampled_from([100, 1000, 10_000]))
            opener = draw(st.sampled_from([b"\x91", b"\xdc\x03\xe8", b"\x81\xc0"]))
            data[pos:pos] = opener * min(depth, 4096 // len(opener))
        elif how == "overwrite" and data:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos : pos + len(chunk)] = chunk
    return bytes(data[:4096])


def any_bytes(base: bytes):
    return st.one_of(st.binary(max_size=4096), mutated(base),
                     st.sampled_from([b"", b"\xc0", b"\x90", b"\x80", *huge_headers()]))


# msgpack values of every type (what a validly sealed but malicious body may hold)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=40), st.binary(max_size=40),
    st.sampled_from([SNAP_ID, "read-only", "read-write", "xxh3-128", "blake3", ROOT, b"", "", 0, -1,
                     float("inf"), 10**19, 65536, "../../etc", "a/b", "x" * 32]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.one_of(st.text(max_size=10), st.binary(max_size=10),
                                                      st.integers(-5, 5)), inner, max_size=5)),
    max_leaves=20,
)


@st.composite
def wrong_typed(draw, body: dict):
    """A valid body with fields replaced by values of any type, dropped or added."""
    out = dict(body)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(out, key=repr) or ["x"]))
        how = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if how == "replace":
            out[key] = draw(values)
        elif how == "drop":
            out.pop(key, None)
        else:
            out[draw(st.text(max_size=8))] = draw(values)
    return out


def sealed_bodies(kind: str):
    return st.one_of(wrong_typed(VALID_BODIES[kind]), values).map(lambda v: seal(kind, v))


def inputs(kind: str):
    return st.one_of(any_bytes(VALID[kind]), sealed_bodies(kind))


# --- open_sealed ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_open_sealed(kind):
    @FUZZ
    @given(data=inputs(kind))
    def check(data):
        bounded(open_sealed, data, kind, "fuzz")

    check()


@FUZZ
@given(data=st.one_of(any_bytes(pack([1, [2, 3]])), st.binary(max_size=4096)))
def test_unpack_is_bounded(data):
    bounded(unpack, data, "fuzz")


def test_memory_bomb_shapes_are_refused_cheaply():
    """Headers claiming far more than the input holds, nested as deep as msgpack allows:
    refused without allocating what they announce."""
    bombs = [h * n + b"\x00" * 16 for h in huge_headers() for n in (1, 300, 1000)]
    bombs += [b"\x91" * 10_000 + b"\xc0", b"\xdc\x03\xe8" * 1000, b"\x81\xc0" * 5000]
    for bomb in bombs:
        for kind in KINDS:
            result = bounded(open_sealed, bomb, kind, "fuzz")
            assert isinstance(result, IntegrityError)
        # sealed with a valid checksum: the body itself is the bomb
        sealed = pack(["volsync", FORMAT_VERSION, "state", bomb, xxhash.xxh3_64_intdigest(bomb)])
        assert isinstance(bounded(open_sealed, sealed, "state", "fuzz"), IntegrityError)


# --- tree objects -----------------------------------------------------------------------------

def _check_xattrs(xattrs) -> None:
    assert isinstance(xattrs, tuple)
    names = [k for k, _ in xattrs]
    assert names == sorted(set(names))
    for k, v in xattrs:
        assert isinstance(k, bytes) and isinstance(v, bytes)
        assert 0 < len(k) <= MAX_XATTR_NAME and b"\0" not in k and len(v) <= MAX_XATTR_VALUE


def _owner(v) -> bool:
    return v is None or (type(v) is int and 0 <= v < 1 << 32)


def check_tree(data: bytes) -> None:
    for tree_id in (None, digest_of(data)):
        result = bounded(decode_tree, data, tree_id, FMT)
        if isinstance(result, IntegrityError):
            continue
        assert isinstance(result, Tree)
        previous = b""
        for e in result.entries:
            assert isinstance(e, Entry) and valid_name(e.name) and e.name > previous
            previous = e.name
            assert e.kind in tuple(Kind)
            assert isinstance(e.ref, bytes) and 0 <= e.mode <= 0o7777 and e.size >= 0
            assert all(type(v) is int for v in (e.mode, e.mtime_ns, e.size, e.rdev))
            assert _owner(e.uid) and _owner(e.gid)
            _check_xattrs(e.xattrs)
            assert e.link is None or (e.kind is Kind.FILE and valid_path(e.link))
            assert e.rdev == 0 or e.kind in (Kind.CHR, Kind.BLK)
            if e.kind is Kind.DIR:
                assert len(e.ref) == ID and e.size == 0
            if e.kind is Kind.FILE:
                blocks = FMT.blocks_of(e.size)
                assert len(e.ref) == (ID if depth_of(blocks) else blocks * ID)
            if e.kind is Kind.LINK:
                assert e.ref and b"\0" not in e.ref and len(e.ref) <= 4096
            if e.kind in (Kind.FIFO, Kind.CHR, Kind.BLK):
                assert e.ref == b"" and e.size == 0
        if result.meta is not None:
            m = result.meta
            assert m.name == b"" and m.kind is Kind.DIR and 0 <= m.mode <= 0o7777
            assert _owner(m.uid) and _owner(m.gid) and type(m.mtime_ns) is int
            _check_xattrs(m.xattrs)
            assert META_NAME not in {e.name for e in result.entries}
    assert isinstance(bounded(decode_tree, data, digest_of(data + b"x"), FMT), IntegrityError)


names = st.one_of(st.binary(max_size=6),
                  st.sampled_from([b".", b"..", b"a/b", b"/", b"a\0", b"", b"ok", META_NAME]))
xattr_lists = st.one_of(
    st.lists(st.tuples(st.one_of(st.binary(max_size=8), st.sampled_from([b"user.a\0", b""])),
                       st.one_of(st.binary(max_size=8), values)).map(list), max_size=3),
    values)
raw_entries = st.lists(st.one_of(
    st.tuples(names,
              st.one_of(st.integers(-1, 7), values), st.one_of(st.integers(-1, 0o10000), values),
              st.one_of(st.integers(-1, 2**32), values), st.one_of(st.integers(-1, 2**32), values),
              values, st.one_of(st.integers(-1, 200_000), values),
              st.one_of(st.binary(max_size=3 * ID), st.sampled_from([ROOT, ROOT * 2, ALGO.hole]),
                        values),
              xattr_lists,
              st.one_of(st.none(), st.sampled_from([b"a", b"../a", b"/a", b"a/b", b"a//b", b""]),
                        values),
              st.one_of(st.integers(-1, 300), values)).map(list),
    values), max_size=6)
root_metas = st.one_of(
    st.none(), values,
    st.tuples(st.one_of(st.integers(-1, 0o10000), values), values, values, values,
              xattr_lists).map(list))


@FUZZ
@given(data=st.one_of(any_bytes(VALID_TREE),
                      st.tuples(raw_entries, root_metas).map(lambda t: pack(["T2", *t])),
                      raw_entries.map(lambda es: pack(["T1", es])),
                      st.tuples(values, values, values).map(lambda t: pack(list(t)))))
def test_decode_tree(data):
    check_tree(data)


def test_valid_tree_decodes():
    """The base every tree mutation starts from is itself a valid tree (with every kind)."""
    assert decode_tree(VALID_TREE, digest_of(VALID_TREE), FMT) == Tree(ENTRIES, ROOT_META)


# --- pack indexes -----------------------------------------------------------------------------

def test_read_index(tmp_path):
    path = tmp_path / "00112233aabbccdd.idx"

    @FUZZ
    @given(data=inputs("index"))
    def check(data):
        path.write_bytes(data)
        result = bounded(read_index, path, ID)
        if isinstance(result, IntegrityError):
            return
        name, entries = result
        assert name == path.stem
        for block_id, off, length in entries:
            assert isinstance(block_id, bytes) and len(block_id) == ID
            assert type(off) is int and type(length) is int and off >= 0 and length >= 0

    check()


# --- snapshot records -------------------------------------------------------------------------

def open_snapshot(data: bytes) -> Snapshot:
    return snapshot_from_body(open_sealed(data, "snapshot", "fuzz"), SNAP_ID, ID)


@FUZZ
@given(data=inputs("snapshot"))
def test_snapshot_record(data):
    snap = bounded(open_snapshot, data)
    if isinstance(snap, IntegrityError):
        return
    assert snap.id == SNAP_ID
    assert type(snap.number) is int and type(snap.size) is int and type(snap.files) is int
    assert isinstance(snap.created, float)
    assert snap.label is None or isinstance(snap.label, str)
    assert isinstance(snap.root, bytes) and len(snap.root) == ID
    assert isinstance(snap.origin, str)


# --- a volume's state, config and stat cache --------------------------------------------------

@pytest.fixture
def volume(tmp_path) -> Volume:
    return Volume.create(tmp_path / "vol", 4096)


HEX = set(string.hexdigits.lower())


def valid_ids(ids) -> bool:
    return isinstance(ids, tuple) and all(
        isinstance(i, str) and len(i) == 32 and set(i) <= HEX for i in ids)


def test_state(volume):
    @FUZZ
    @given(data=inputs("state"))
    def check(data):
        (volume.meta / "state").write_bytes(data)
        state = bounded(volume.state)
        if isinstance(state, IntegrityError):
            return
        assert isinstance(state, VolumeState)
        assert state.mode in (READ_WRITE, READ_ONLY)
        assert state.upstream is None or isinstance(state.upstream, str)
        assert state.upstream_id is None or isinstance(state.upstream_id, str)
        assert valid_ids(state.lineage) and valid_ids(state.preserved)
        assert state.journal is None or isinstance(state.journal, dict)
        assert isinstance(state.extra, dict)

    check()


def test_config(volume):
    config = volume.meta / "config"

    @FUZZ
    @given(data=inputs("config"))
    def check(data):
        config.write_bytes(data)
        vol = bounded(Volume, volume.root)
        if isinstance(vol, IntegrityError):
            return
        c = vol.config
        assert isinstance(c.volume_id, str) and c.hash in HASHES
        assert vol.fmt.algo is HASHES[c.hash]
        assert type(c.block_size) is int and 4096 <= c.block_size <= 4 << 20
        assert isinstance(c.created, float)

    check()


def test_statcache(volume):
    """A stat cache that fails its check, or holds anything but the documented shape, is no
    cache (it is advisory), and a scan over it still captures the live tree exactly."""
    (volume.root / "a").write_bytes(b"hello")
    os.utime(volume.root / "a", (1_600_000_000, 1_600_000_000))
    (volume.root / "d").mkdir()
    cache_path = volume.meta / "statcache"
    from volsync.tree import scan

    expected = scan(volume, write=False)[0].root

    @FUZZ
    @given(data=inputs("statcache"))
    def check(data):
        cache_path.write_bytes(data)
        cache = bounded(volume.load_statcache)
        assert isinstance(cache, dict)
        for rel, value in cache.items():
            assert isinstance(rel, bytes) and isinstance(value, list) and len(value) == 4
            assert isinstance(value[0], bytes) and len(value[0]) == volume.fmt.algo.size
            assert isinstance(value[3], bytes | dict)  # a directory's keys, packed or not
        result = scan(volume, write=False)[0]
        assert result.root == expected

    check()
