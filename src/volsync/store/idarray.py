"""Compact arrays of object ids, for the walks that meet millions of blocks.

A Python set or list holds a bytes object, a hash slot and often a tuple per id: 150-300
bytes each, gigabytes at millions of blocks. Here ids lie end to end in one buffer (the
id's own 16 or 32 bytes), with their lengths in an array beside them, and membership is a
search of a sorted array of the ids' first bytes with their positions (8 bytes per id),
through a fanout table, as git's pack `.idx` is searched. Sorting and de-duplicating use
NumPy, in place where they can, imported only when a walk is big enough to need it.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from ..model import BlockId

CHUNK = 1 << 16  # rows moved at a time when a buffer is compacted in place
HEAD, KEY = 4, 8  # IdSet: bytes of an id kept sorted, and with the id's position


def _rows(buf: bytes | bytearray, size: int):
    """The ids of `buf` as an (n, size // 8) array of little-endian uint64 (no copy)."""
    import numpy as np

    if size % 8:
        raise ValueError(f"id size {size} is not a multiple of 8")
    return np.frombuffer(buf, dtype="<u8").reshape(-1, size // 8)


def _by_prefix(rows):
    """The order that sorts the ids by their first eight bytes (stable: among equal ones,
    the first copy first), and those eight bytes in that order."""
    import numpy as np

    order = np.argsort(rows[:, 0], kind="stable")
    return order, rows[order, 0]


def first_occurrences(buf: bytes | bytearray, size: int):
    """Which ids of `buf` are the first copy of their value: a NumPy bool array, one per
    id. One sort of a copy of the ids' first eight bytes finds the values some ids share;
    only the ids holding those are then told apart by all their bytes, so no two different
    ids are ever taken for one, and the extra memory is 9 bytes an id plus the shared ones."""
    import numpy as np

    rows = _rows(buf, size)
    keep = np.ones(len(rows), dtype=bool)
    if len(rows) < 2:
        return keep
    prefix = np.sort(rows[:, 0])
    shared = np.unique(prefix[1:][prefix[1:] == prefix[:-1]])
    del prefix
    if not len(shared):
        return keep
    where = np.concatenate([start + np.flatnonzero(_among(rows[start : start + CHUNK, 0],
                                                          shared))
                            for start in range(0, len(rows), CHUNK)])
    keep[where[~_firsts(rows[where])]] = False
    return keep


def _among(values, sorted_values):
    """Which of `values` are in the sorted array `sorted_values`."""
    import numpy as np

    at = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return sorted_values[at] == values


def _firsts(rows):
    """first_occurrences over an array of rows (the few whose first eight bytes are shared):
    a stable sort by those bytes, then whole rows compared."""
    import numpy as np

    n = len(rows)
    keep = np.ones(n, dtype=bool)
    order, prefix = _by_prefix(rows)
    same = np.flatnonzero(prefix[1:] == prefix[:-1])  # pairs sharing their first bytes
    if len(same):
        dup = np.zeros(n, dtype=bool)
        whole = (rows[order[same + 1]] == rows[order[same]]).all(axis=1)
        dup[same[whole] + 1] = True
        if not whole.all():  # another id between two copies: settle those groups by hand
            _settle_mixed_groups(rows, order, prefix, same[~whole], dup)
        keep[order[dup]] = False
    return keep


def _settle_mixed_groups(rows, order, prefix, mixed, dup) -> None:
    """Groups of ids that share their first eight bytes but not all of them (rare: 1 in
    2**64 per pair, or a peer's crafted ids): each id's first copy in order is kept."""
    import numpy as np

    for value in set(prefix[mixed + 1].tolist()):
        positions = np.flatnonzero(prefix == value)  # sorted, so in their original order
        seen: set[bytes] = set()
        for pos in positions.tolist():
            key = rows[order[pos]].tobytes()
            dup[pos] = key in seen
            seen.add(key)


def compact(buf: bytearray | array, size: int, keep, lengths: array | None = None) -> None:
    """Keep only the ids (and lengths) where the bool array `keep` is true, in place: the
    moves go a chunk at a time, so no second buffer of every id is ever made. `buf` holds
    `size` bytes an id: a bytearray, or an array whose items are cut to `size` bytes."""
    import numpy as np

    rows = np.frombuffer(buf, dtype=f"V{size}")
    lens = np.frombuffer(lengths, dtype=lengths.typecode) if lengths is not None else None
    kept, moved = 0, None
    for start in range(0, len(rows), CHUNK):
        chosen = keep[start : start + CHUNK]
        moved = rows[start : start + CHUNK][chosen]  # a copy: rows before `kept` are done
        rows[kept : kept + len(moved)] = moved
        if lens is not None:
            lens[kept : kept + len(moved)] = lens[start : start + CHUNK][chosen]
        kept += len(moved)
    del rows, lens, moved  # no view may outlive the resize
    del buf[kept * size // getattr(buf, "itemsize", 1) :]
    if lengths is not None:
        del lengths[kept:]


class IdSet:
    """Which of a fixed collection of ids a value is: `in` bisects the ids' first HEAD
    bytes, kept sorted with each id's position (8 bytes an id besides the ids' buffer,
    filled a chunk at a time and sorted in place: no larger array is ever made), then
    compares whole ids (ids that share their first bytes are all compared)."""

    def __init__(self, buf: bytes | bytearray, size: int):
        if size % 8:
            raise ValueError(f"id size {size} is not a multiple of 8")
        self.buf, self.size = buf, size
        self.count = len(buf) // size
        self.keys = bytearray(KEY * self.count)  # per id: its first HEAD bytes, its position
        self.fanout: array | None = None
        if self.count > 1:
            self._fill()
        elif self.count:
            self.keys[:HEAD] = buf[:HEAD]

    def _fill(self) -> None:
        import numpy as np

        ids = np.frombuffer(self.buf, dtype=[("head", f"V{HEAD}"),
                                             ("rest", f"V{self.size - HEAD}")])
        keys = np.frombuffer(self.keys, dtype=[("head", f"V{HEAD}"), ("at", "<u4")])
        for start in range(0, self.count, CHUNK):
            keys["head"][start : start + CHUNK] = ids["head"][start : start + CHUNK]
            keys["at"][start : start + CHUNK] = np.arange(start, min(start + CHUNK,
                                                                     self.count))
        np.frombuffer(self.keys, dtype=f"V{KEY}").sort()  # in place, as bytes: by head
        # where each value of the first two bytes starts (as git's .idx fanout): a search
        # then bisects a few entries, not all of them
        first = np.frombuffer(self.keys, dtype=[("two", ">u2"), ("rest", f"V{KEY - 2}")])["two"]
        counts = np.zeros(1 << 16, dtype=np.int64)
        for start in range(0, self.count, CHUNK):
            counts += np.bincount(first[start : start + CHUNK], minlength=1 << 16)
        self.fanout = array("I", np.concatenate([[0], np.cumsum(counts)]).astype(np.uint32))

    def __len__(self) -> int:
        return self.count

    def __contains__(self, object_id: object) -> bool:
        if not isinstance(object_id, bytes) or len(object_id) != self.size:
            return False
        head, keys, size = object_id[:HEAD], self.keys, self.size
        lo, hi = 0, self.count
        if self.fanout is not None:
            two = int.from_bytes(head[:2], "big")
            lo, hi = self.fanout[two], self.fanout[two + 1]
        i = bisect_left(_Heads(keys, self.count), head, lo, hi)
        while i < self.count and keys[KEY * i : KEY * i + HEAD] == head:
            start = int.from_bytes(keys[KEY * i + HEAD : KEY * (i + 1)], "little") * size
            if self.buf[start : start + size] == object_id:
                return True
            i += 1
        return False


class _Heads(Sequence):
    """The first-HEAD-bytes column of IdSet's keys, for bisect."""

    def __init__(self, keys: bytearray, count: int):
        self.keys, self.count = keys, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):  # type: ignore[override]
        return self.keys[KEY * i : KEY * i + HEAD]


class PrefixSet:
    """A set of ids kept as their distinct first eight bytes, sorted: 8 bytes an id, however
    many times the ids were added. `in` may say yes for an id outside the set that shares its
    first eight bytes with one inside (by chance 1 in 2**64 per pair), never no for one
    inside: use it only where a false yes is safe, as prune's live set (a dead object kept,
    never a live one dropped). Added ids are sorted and their copies dropped whenever the
    buffer doubles, so copies cost at most twice the distinct ids."""

    FIRST_SORT = 1 << 20  # ids added before the buffer is first sorted

    def __init__(self, ids: Iterable[bytes] = ()):
        self.prefixes, self.distinct, self.limit = array("Q"), 0, self.FIRST_SORT
        for object_id in ids:
            self.add(object_id)

    def add(self, object_id: bytes) -> None:
        self.prefixes.append(int.from_bytes(object_id[:8], "little"))
        if len(self.prefixes) >= self.limit:
            self._sort()

    def _sort(self) -> None:
        """Sort the buffer in place and keep one copy of each value (`compact`): beside the
        buffer, only a bool per entry."""
        if self.distinct == len(self.prefixes):
            return
        import numpy as np

        values = np.frombuffer(self.prefixes, dtype=np.uint64)
        values.sort()
        fresh = np.empty(len(values), dtype=bool)
        fresh[0], fresh[1:] = True, values[1:] != values[:-1]
        del values  # no view may outlive compact's resize
        compact(self.prefixes, 8, fresh)
        self.distinct = len(self.prefixes)
        self.limit = max(2 * self.distinct, self.FIRST_SORT)

    def __len__(self) -> int:
        self._sort()
        return self.distinct

    def __contains__(self, object_id: object) -> bool:
        if not isinstance(object_id, bytes) or len(object_id) < 8:
            return False
        self._sort()
        key = int.from_bytes(object_id[:8], "little")
        i = bisect_left(self.prefixes, key)
        return i < self.distinct and self.prefixes[i] == key


class ObjectList(Sequence):
    """The objects a transfer sends, in order, as (id, length): the ids end to end in one
    buffer and their lengths in an array. File blocks come first (`blocks` of them), then
    the block lists and trees, each after everything under it."""

    def __init__(self, ids: bytes | bytearray, lengths: array, size: int, blocks: int):
        if len(ids) != len(lengths) * size:
            raise ValueError("ids and lengths disagree")
        self.buf, self.lengths, self.size, self.blocks = ids, lengths, size, blocks
        self.bytes = sum(lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return BlockId(bytes(self.buf[i * self.size : (i + 1) * self.size])), self.lengths[i]

    def __iter__(self) -> Iterator[tuple[BlockId, int]]:
        size, buf = self.size, self.buf
        for i, length in enumerate(self.lengths):
            yield BlockId(bytes(buf[i * size : (i + 1) * size])), length

    def ids(self) -> Iterator[BlockId]:
        size, buf = self.size, self.buf
        for start in range(0, len(buf), size):
            yield BlockId(bytes(buf[start : start + size]))

    def id_set(self) -> IdSet:
        return IdSet(self.buf, self.size)


def empty_objects(size: int) -> ObjectList:
    return ObjectList(b"", array("I"), size, 0)
