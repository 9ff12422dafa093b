"""The block index: where each object lives, (pack name, data offset, length) by id.

The `.idx` file of each pack is the source of truth. `packs/multi.midx` merges those of many
packs into one file sorted by id, with a fanout table by the ids' first two bytes, read
through mmap and searched in place: opening a volume reads none of its ids. Packs it does not
cover (sealed since it was written) are read into a small in-memory overlay. It is derived
data: rewritten by the lock holder (`PackStore.maintain_index`), ignored whenever anything
about it is in doubt. Layout (little-endian, sections 8-byte aligned): see docs/format.md.
"""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import stat
import struct
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from pathlib import Path

import xxhash

from ..errors import IntegrityError
from ..model import BlockId
from .fsutil import pwrite_all

MIDX_NAME = "multi.midx"
MIDX_MAGIC = b"VSMIDX\x00\x01"
HEADER = struct.Struct("<8sIIQQ")  # magic, id size, packs, entries, bytes of pack names
FANOUT = 1 << 16  # cumulative entry counts by the ids' first two bytes
FANOUT_ENTRY = struct.Struct("<Q")
SUM = struct.Struct("<Q")  # xxh3-64
CHUNK = 4 << 20
SCAN_LIMIT = 64  # a range this small is searched with bytes.find, not bisected

Location = tuple[str, int, int]  # pack name, data offset, length
Entry = tuple[bytes, int, int, int]  # id, pack number, offset, length


def _align(n: int) -> int:
    return (n + 7) & ~7


def _le(col: array) -> bytes:
    if sys.byteorder == "big":
        col = array(col.typecode, col)
        col.byteswap()
    return col.tobytes()


class Layout:
    """Where each section of a midx starts, from its header's counts."""

    def __init__(self, id_size: int, packs: int, count: int, names_len: int):
        self.id_size, self.packs, self.count, self.names_len = id_size, packs, count, names_len
        self.names = HEADER.size
        self.fanout = _align(self.names + names_len)
        self.head_sum = self.fanout + FANOUT * FANOUT_ENTRY.size
        self.ids = self.head_sum + SUM.size
        self.pack_nos = _align(self.ids + count * id_size)
        self.offsets = _align(self.pack_nos + 4 * count)
        self.lengths = self.offsets + 8 * count
        self.file_sum = _align(self.lengths + 4 * count)
        self.size = self.file_sum + SUM.size


class Midx:
    """One mapped midx file, its header, names and fanout checked on open (its arrays are
    checked only by `intact`, which reads them all: every read of an object it locates is
    checked against the object's id where that matters)."""

    def __init__(self, path: Path, id_size: int):
        self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        self.verified = False  # `intact` found the whole file good
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < HEADER.size:
                raise IntegrityError(f"{path.name}: not a block index")
            self.map = mmap.mmap(self.fd, st.st_size, prot=mmap.PROT_READ)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        try:
            self._check_header(path.name, id_size)
        except BaseException:
            self.close()
            raise

    @classmethod
    def in_memory(cls, image: bytes | bytearray, id_size: int) -> Midx:
        """A midx built in memory (the packs a midx file does not cover), searched as a
        file's is: 48 bytes per entry instead of a dict entry and a tuple each."""
        self = cls.__new__(cls)
        self.fd, self.verified, self.map = -1, True, image
        self._check_header("the index of the packs the midx does not cover", id_size)
        return self

    def _check_header(self, what: str, id_size: int) -> None:
        magic, size, packs, count, names_len = HEADER.unpack_from(self.map, 0)
        if magic != MIDX_MAGIC or size != id_size:
            raise IntegrityError(f"{what}: not a block index of this volume")
        lay = self.layout = Layout(id_size, packs, count, names_len)
        if lay.size != len(self.map):
            raise IntegrityError(f"{what}: wrong size")
        (head_sum,) = SUM.unpack_from(self.map, lay.head_sum)
        if xxhash.xxh3_64_intdigest(self.map[: lay.head_sum]) != head_sum:
            raise IntegrityError(f"{what}: header checksum mismatch")
        try:
            names = self.map[lay.names : lay.names + names_len].decode("ascii").split("\n")
        except UnicodeDecodeError:
            raise IntegrityError(f"{what}: bad pack names") from None
        names = names if names_len else []
        if len(names) != packs or len(set(names)) != packs or not all(
                n and "/" not in n and "\0" not in n for n in names):
            raise IntegrityError(f"{what}: bad pack names")
        if sys.byteorder != "little":
            raise IntegrityError(f"{what}: read in place on little-endian hosts only")
        self.names, self.count, self.id_size = names, count, id_size
        whole = memoryview(self.map)
        self.views = [whole]  # released before the map is closed
        self.fanout = self._cast(lay.fanout, FANOUT, "Q")
        self.pack_nos = self._cast(lay.pack_nos, count, "I")
        self.offsets = self._cast(lay.offsets, count, "Q")
        self.lengths = self._cast(lay.lengths, count, "I")
        if self.fanout[FANOUT - 1] != count:
            raise IntegrityError(f"{what}: fanout does not match the entry count")

    def _cast(self, start: int, count: int, typecode: str) -> memoryview:
        size = array(typecode).itemsize
        view = self.views[0][start : start + count * size].cast(typecode)
        self.views.append(view)
        return view

    def intact(self) -> bool:
        """The whole file matches its checksum (read once, in chunks, not through the map)."""
        if not self.verified:
            (file_sum,) = SUM.unpack_from(self.map, self.layout.file_sum)
            digest, done, end = xxhash.xxh3_64(), 0, self.layout.file_sum
            while done < end:
                chunk = os.pread(self.fd, min(CHUNK, end - done), done)
                if not chunk:
                    return False
                digest.update(chunk)
                done += len(chunk)
            self.verified = digest.intdigest() == file_sum
        return self.verified

    def close(self) -> None:
        """Unmap and close (once: the fd number may be reused by then)."""
        for view in reversed(getattr(self, "views", ())):
            view.release()
        self.views = []
        if self.fd >= 0:
            self.map.close()
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:  # a store dropped without close() must not leak the fd
        with suppress(Exception):
            self.close()

    def _fanout(self, prefix: int) -> int:
        return self.fanout[prefix] if prefix >= 0 else 0

    def _id(self, i: int) -> bytes:
        start = self.layout.ids + i * self.id_size
        return self.map[start : start + self.id_size]

    def _entry(self, i: int) -> tuple[int, int, int]:
        return self.pack_nos[i], self.offsets[i], self.lengths[i]

    def find(self, key: bytes, live: list[bool]) -> tuple[int, int, int] | None:
        """(pack number, offset, length) of the first entry of `key` in a live pack."""
        if len(key) != self.id_size:
            return None
        prefix = key[0] << 8 | key[1]
        lo, end = self._fanout(prefix - 1), self._fanout(prefix)
        if not lo <= end <= self.count:
            return None  # a damaged fanout finds nothing
        hi = end
        while hi - lo > SCAN_LIMIT:  # bisect_left: ids before lo < key <= ids from hi
            mid = (lo + hi) // 2
            if self._id(mid) < key:
                lo = mid + 1
            else:
                hi = mid
        i = self._scan(key, lo, min(end, hi + 1))
        while i is not None and i < end and self._id(i) == key:  # one id, several packs
            pack, off, length = self._entry(i)
            if pack < len(live) and live[pack]:
                return pack, off, length
            i += 1
        return None

    def _scan(self, key: bytes, lo: int, hi: int) -> int | None:
        """The first i in [lo, hi) whose id is `key` (a search of the bytes, id-aligned)."""
        base, size = self.layout.ids, self.id_size
        chunk = self.map[base + lo * size : base + hi * size]
        pos = chunk.find(key)
        while pos >= 0 and pos % size:
            pos = chunk.find(key, pos + 1)
        return None if pos < 0 else lo + pos // size

    def group(self, first: int) -> list[Entry]:
        """Every entry whose id starts with byte `first`, in order (id, pack, offset, length)."""
        size = self.id_size
        lo, hi = self._fanout(first * 256 - 1), self._fanout(first * 256 + 255)
        if not lo <= hi <= self.count:
            raise IntegrityError(f"{MIDX_NAME}: damaged fanout")
        ids = bytes(self.map[self.layout.ids + lo * size : self.layout.ids + hi * size])
        return list(zip([ids[i : i + size] for i in range(0, len(ids), size)],
                        self.pack_nos[lo:hi].tolist(), self.offsets[lo:hi].tolist(),
                        self.lengths[lo:hi].tolist(), strict=True))


def open_midx(path: Path, id_size: int) -> tuple[Midx | None, str | None]:
    """The midx at `path`, or None and why not (None, None: there is none)."""
    try:
        return Midx(path, id_size), None
    except FileNotFoundError:
        return None, None
    except (IntegrityError, OSError, ValueError, struct.error) as exc:
        return None, str(exc)


# --- writing -----------------------------------------------------------------------------------

class _Image:
    """Where a midx is put together: a buffer, or a file written at offsets and read back
    for its sums (then memory is a group of entries, not the file)."""

    def __init__(self, size: int, fd: int | None):
        self.fd, self.buf = fd, bytearray(size) if fd is None else None
        if fd is not None:
            os.ftruncate(fd, size)

    def put(self, offset: int, data: bytes | bytearray) -> None:
        if self.buf is not None:
            self.buf[offset : offset + len(data)] = data
        else:
            pwrite_all(self.fd, data, offset)

    def digest(self, end: int) -> int:
        if self.buf is not None:
            return xxhash.xxh3_64_intdigest(memoryview(self.buf)[:end])
        digest, done = xxhash.xxh3_64(), 0
        while done < end:
            chunk = os.pread(self.fd, min(CHUNK, end - done), done)
            if not chunk:
                raise OSError(errno.EIO, "midx being written came back short")
            digest.update(chunk)
            done += len(chunk)
        return digest.intdigest()


def build_midx(id_size: int, old: Midx | None, old_live: list[bool],
               new_packs: Iterable[str],
               read_pack: Callable[[str], list[tuple[BlockId, int, int]] | None],
               fd: int | None = None) -> bytearray | None:
    """A midx covering the live packs of `old` and `new_packs` (whose entries `read_pack`
    gives, None for an unreadable index: that pack is left uncovered): returned, or with
    `fd` written into that new file. The new entries are gathered by first byte as packed
    records, then the file is written one group (1/256 of the ids) sorted at a time, each
    section at its offset: memory is the new entries and a group, never every entry."""
    names: list[str] = []
    renumber = []
    for name, live in zip(old.names if old else [], old_live, strict=False):
        renumber.append(len(names) if live else -1)
        if live:
            names.append(name)
    record = struct.Struct(f"<{id_size}sIQI")
    groups = [bytearray() for _ in range(256)]
    for name in new_packs:
        entries = read_pack(name)
        if entries is None:
            continue
        number = len(names)
        names.append(name)
        for block_id, off, length in entries:
            groups[block_id[0]] += record.pack(block_id, number, off, length)
    same_numbers = renumber == list(range(len(renumber)))
    count = (_live_entries(old, renumber, same_numbers)
             + sum(len(g) for g in groups) // record.size)
    names_raw = "\n".join(names).encode("ascii")
    lay = Layout(id_size, len(names), count, len(names_raw))
    out = _Image(lay.size, fd)
    fanout, done = array("Q"), 0
    for first in range(256):
        entries = old.group(first) if old else []
        if not same_numbers:
            entries = [(i, renumber[p], o, n) for i, p, o, n in entries
                       if p < len(renumber) and renumber[p] >= 0]
        entries += record.iter_unpack(groups[first])
        groups[first] = bytearray()
        entries.sort()
        group_ids, group_packs, group_offsets, group_lengths = (
            zip(*entries, strict=True) if entries else ((), (), (), ()))
        fanout.extend(done + bisect.bisect_left(group_ids, bytes((first, second + 1)))
                      for second in range(255))
        if entries:
            out.put(lay.ids + done * id_size, b"".join(group_ids))
            out.put(lay.pack_nos + 4 * done, _le(array("I", group_packs)))
            out.put(lay.offsets + 8 * done, _le(array("Q", group_offsets)))
            out.put(lay.lengths + 4 * done, _le(array("I", group_lengths)))
        done += len(entries)
        fanout.append(done)
    if done != count:
        raise IntegrityError(f"{MIDX_NAME}: {done} entries where {count} were counted")
    head = bytearray(lay.head_sum)
    HEADER.pack_into(head, 0, MIDX_MAGIC, id_size, len(names), count, len(names_raw))
    head[lay.names : lay.names + len(names_raw)] = names_raw
    head[lay.fanout : lay.head_sum] = _le(fanout)
    out.put(0, head)
    out.put(lay.head_sum, SUM.pack(xxhash.xxh3_64_intdigest(head)))
    out.put(lay.file_sum, SUM.pack(out.digest(lay.file_sum)))
    return out.buf


def _live_entries(old: Midx | None, renumber: list[int], all_live: bool) -> int:
    """How many of the old midx's entries name a pack that is still live."""
    if old is None:
        return 0
    if all_live:
        return old.count
    import numpy as np

    counts = np.bincount(np.frombuffer(old.pack_nos, dtype=np.uint32), minlength=1).tolist()
    return sum(n for pack, n in enumerate(counts) if pack < len(renumber) and renumber[pack] >= 0)


# --- the index as the store uses it ------------------------------------------------------------

class BlockIndex:
    """A mapping id -> (pack name, offset, length): the midx's entries of packs that still
    exist, under the entries of the packs it does not cover (`extra`, a midx built in
    memory when the index is opened) and an overlay of changes made since (None in the
    overlay: deleted)."""

    def __init__(self, midx: Midx | None, live: list[bool], overlay: dict[BlockId, Location],
                 uncovered: set[str], extra: Midx | None = None):
        self.midx, self.live = midx, live
        self.overlay: dict[BlockId, Location | None] = overlay  # type: ignore[assignment]
        self.uncovered = uncovered  # packs the midx does not cover (in `extra` or the overlay)
        self.extra = extra
        self.extra_live = [True] * len(extra.names) if extra else []

    def take(self, other: BlockIndex) -> None:
        """Become `other` (a reopened index), closing this one's midx: whoever holds this
        object sees the new one."""
        self.close()
        self.__dict__.update(other.__dict__)
        other.midx = other.extra = None  # now this object's to close

    def fold(self, extra: Midx, overlay: dict[BlockId, Location | None]) -> None:
        """Take a new midx in memory of the packs the midx file does not cover, and what is
        left of the overlay: its deletions and its entries of other packs."""
        if self.extra is not None:
            self.extra.close()
        self.extra, self.extra_live, self.overlay = extra, [True] * len(extra.names), overlay

    @property
    def stale(self) -> bool:
        """The midx covers packs that no longer exist."""
        return not all(self.live)

    def covered(self) -> int:
        return self.midx.count if self.midx else 0

    def pending(self) -> int:
        """Entries the midx does not cover: what a rewrite of it would take in."""
        return len(self.overlay) + (self.extra.count if self.extra else 0)

    def get(self, block_id: BlockId, default=None) -> Location | None:
        if block_id in self.overlay:
            found = self.overlay[block_id]
            return default if found is None else found
        for midx, live in ((self.extra, self.extra_live), (self.midx, self.live)):
            if midx is not None:
                hit = midx.find(block_id, live)
                if hit is not None:
                    return midx.names[hit[0]], hit[1], hit[2]
        return default

    def __contains__(self, block_id: BlockId) -> bool:
        return self.get(block_id) is not None

    def __getitem__(self, block_id: BlockId) -> Location:
        found = self.get(block_id)
        if found is None:
            raise KeyError(block_id)
        return found

    def __setitem__(self, block_id: BlockId, location: Location) -> None:
        self.overlay[block_id] = location

    def __delitem__(self, block_id: BlockId) -> None:
        if self.get(block_id) is None:
            raise KeyError(block_id)
        if self.midx is None and self.extra is None:
            del self.overlay[block_id]
        else:
            self.overlay[block_id] = None

    def pop(self, block_id: BlockId, default=None) -> Location | None:
        found = self.get(block_id)
        if found is not None:
            del self[block_id]
            return found
        return default

    def setdefault(self, block_id: BlockId, location: Location) -> Location:
        found = self.get(block_id)
        if found is None:
            self[block_id] = found = location
        return found

    def add_pack(self, name: str, entries: dict[BlockId, tuple[int, int]],
                 replace: bool = True) -> None:
        """A newly indexed pack's entries; with `replace` False, ids located already keep
        their location."""
        self.uncovered.add(name)
        for block_id, (off, length) in entries.items():
            if replace:
                self.overlay[block_id] = (name, off, length)
            else:
                self.setdefault(block_id, (name, off, length))

    def drop_pack(self, name: str) -> None:
        """A pack was deleted: the midx's entries of it are no longer found."""
        self.uncovered.discard(name)
        for midx, live in ((self.midx, self.live), (self.extra, self.extra_live)):
            if midx is not None and name in midx.names:
                live[midx.names.index(name)] = False

    def items(self) -> Iterator[tuple[BlockId, Location]]:
        """Each id once, where `get` finds it."""
        for first in range(256):
            ahead = dict(_group(self.extra, self.extra_live, first))  # found before the midx
            for block_id, location in ahead.items():
                if block_id not in self.overlay:
                    yield BlockId(block_id), location
            for block_id, location in _group(self.midx, self.live, first):
                if block_id not in self.overlay and block_id not in ahead:
                    yield BlockId(block_id), location
        for block_id, location in list(self.overlay.items()):
            if location is not None:
                yield block_id, location

    def keys(self) -> Iterator[BlockId]:
        return (block_id for block_id, _ in self.items())

    __iter__ = keys

    def __len__(self) -> int:
        return sum(1 for _ in self.items())

    def close(self) -> None:
        for midx in (self.midx, self.extra):
            if midx is not None:
                midx.close()
        self.midx = self.extra = None


def _group(midx: Midx | None, live: list[bool], first: int
           ) -> Iterator[tuple[bytes, Location]]:
    """The entries of a midx whose id starts with byte `first`: each id once, in its first
    live pack (as `find` answers), in id order."""
    if midx is None:
        return
    previous = None
    for block_id, pack, off, length in midx.group(first):
        if block_id != previous and pack < len(live) and live[pack]:
            previous = block_id
            yield block_id, (midx.names[pack], off, length)
