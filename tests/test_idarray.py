"""Compact id arrays (store/idarray.py): de-duplication, in-place compaction and membership
against plain Python sets, ids that share their first eight bytes included."""

from __future__ import annotations

import os
import random
from array import array

import pytest

from volsync.store.idarray import IdSet, ObjectList, PrefixSet, compact, first_occurrences


def _ids(buf: bytes | bytearray, size: int) -> list[bytes]:
    return [bytes(buf[i : i + size]) for i in range(0, len(buf), size)]


def _random_ids(r: random.Random, n: int, size: int, shared_prefix: bool) -> list[bytes]:
    """n ids drawn from a small pool (so many repeat); with `shared_prefix`, the pool's ids
    share their first eight bytes in threes (as a hostile peer could make them)."""
    pool = []
    for _ in range(max(1, n // 3)):
        head = r.randbytes(8)
        for _ in range(3 if shared_prefix else 1):
            pool.append(head + r.randbytes(size - 8))
    return [r.choice(pool) for _ in range(n)]


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("shared_prefix", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_first_occurrences_and_compact_match_a_python_set(size, shared_prefix, seed):
    r = random.Random(seed)
    ids = _random_ids(r, r.randint(0, 3000), size, shared_prefix)
    buf = bytearray(b"".join(ids))
    lengths = array("Q", range(len(ids)))
    expected, seen = [], set()
    for i, block_id in enumerate(ids):
        if block_id not in seen:
            seen.add(block_id)
            expected.append(i)
    keep = first_occurrences(buf, size)
    assert [i for i, first in enumerate(keep) if first] == expected
    compact(buf, size, keep, lengths)
    assert _ids(buf, size) == [ids[i] for i in expected]
    assert list(lengths) == expected


@pytest.mark.parametrize("size", [16, 32])
def test_id_set_membership(size):
    r = random.Random(size)
    members = _random_ids(r, 2000, size, shared_prefix=True)
    ids = IdSet(b"".join(members), size)
    for block_id in members:
        assert block_id in ids
    for block_id in _random_ids(r, 500, size, shared_prefix=True):
        assert (block_id in ids) == (block_id in set(members))
    twin = members[0][:8] + bytes(b ^ 1 for b in members[0][8:])  # same first 8 bytes
    assert (twin in ids) == (twin in set(members))
    assert b"short" not in ids and None not in ids
    one = IdSet(members[0], size)
    assert members[0] in one and members[1] not in one or members[1] == members[0]
    assert os.urandom(size) not in IdSet(b"", size)


def test_object_list_is_a_sequence_of_ids_and_lengths():
    ids = [os.urandom(32) for _ in range(5)]
    objects = ObjectList(bytearray(b"".join(ids)), array("I", [1, 2, 3, 4, 5]), 32, 3)
    assert len(objects) == 5 and objects.bytes == 15 and objects.blocks == 3
    assert list(objects) == list(zip(ids, [1, 2, 3, 4, 5], strict=True))
    assert objects[-1] == (ids[-1], 5) and objects[1:3] == [(ids[1], 2), (ids[2], 3)]
    assert list(objects.ids()) == ids
    assert all(i in objects.id_set() for i in ids)
    with pytest.raises(IndexError):
        objects[5]
    with pytest.raises(ValueError):
        ObjectList(b"x" * 31, array("I", [1]), 32, 1)


@pytest.mark.parametrize("first_sort", [4, 1 << 20])
def test_prefix_set_never_says_no_for_a_member(first_sort, monkeypatch):
    """Copies count once, whenever the buffer is sorted; an id outside the set is refused
    unless it shares its first eight bytes with a member (then yes: the one false answer
    PrefixSet allows, safe for prune's live set, which keeps that dead object)."""
    monkeypatch.setattr(PrefixSet, "FIRST_SORT", first_sort)
    rng = random.Random(first_sort)
    members = [rng.randbytes(32) for _ in range(300)]
    live = PrefixSet()
    for object_id in members + members[:100] + members[::-1]:
        live.add(object_id)
    assert len(live) == 300
    assert all(m in live for m in members)
    strangers = [rng.randbytes(32) for _ in range(300)]
    assert not any(s in live for s in strangers)
    twin = members[7][:8] + bytes(24)  # the same first eight bytes, not the same id
    assert twin in live
    assert b"short" not in live and None not in live and b"" not in PrefixSet()


def test_id_set_at_the_edges_of_its_fanout():
    """Ids whose first two bytes are the lowest and highest values, or all alike: each
    found, and no stranger between them."""
    r = random.Random(5)
    members = ([b"\0\0" + r.randbytes(30) for _ in range(50)]
               + [b"\xff\xff" + r.randbytes(30) for _ in range(50)]
               + [b"\x12\x34" + r.randbytes(30) for _ in range(300)])
    r.shuffle(members)
    ids = IdSet(b"".join(members), 32)
    assert len(ids) == 400 and all(m in ids for m in members)
    for head in (b"\0\0", b"\xff\xff", b"\x12\x34", b"\x12\x35", b"\x00\x01"):
        assert not any(head + r.randbytes(30) in ids for _ in range(50))
