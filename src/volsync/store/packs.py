"""Blocks and tree objects stored once each under their xxh3-128 id, appended to pack files.

A pack `packs/<name>.pack` is a header and records `[id 16][length u32][data]`. It becomes part
of the store only when its index `packs/<name>.idx` is renamed into place after the pack data is
durable; a pack without an index is a crashed writer's leftover and is deleted by the next writer.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import secrets
import struct
import threading
from array import array
from collections.abc import Container, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from ..errors import IntegrityError
from ..model import BlockId, HashAlgo
from .alignedpack import (
    ALIGN,
    ALIGNED_HEADER,
    align_up,
    capacity,
    entry_struct,
    group_page,
    probe_reflink,
    small_cow_reservations,
    walk_groups,
)
from .blockindex import MIDX_NAME, BlockIndex, Location, Midx, build_midx, open_midx
from .codec import FORMAT_VERSION, open_sealed, seal
from .crash import crashpoint, fault
from .fsutil import (
    atomic_write,
    atomic_write_with,
    fsync,
    fsync_dir,
    pwrite_all,
    read_nofollow,
    write_all,
)
from .packpool import OpenPack, PackPool, access_error, is_damage, pack_error

PACK_HEADER = b"VSPACK\x00\x02"


def record_struct(algo: HashAlgo) -> struct.Struct:
    """A record header: the object's id, then its length (u32 LE)."""
    return struct.Struct(f"<{algo.size}sI")
PACK_TARGET = 128 << 20  # bytes per pack before a new one is started
# the lock holder rewrites the midx once the packs it does not cover hold this many entries
# (and at least 1/8 of those it covers: rewrites stay rare as a volume grows, but never more
# than MIDX_MAX_PENDING, which bounds what a long write holds in memory) or number this
# many: a reader loads those packs' indexes into memory
MIDX_MIN_ENTRIES = 1 << 14
MIDX_MAX_PENDING = 1 << 18
MIDX_MAX_PACKS = 16
# past this many bytes of pack indexes, those the midx does not cover are read into a midx
# built in memory (48 bytes an entry), not a dict (about 200)
EXTRA_MIN_BYTES = 1 << 20
OVERLAY_FOLD = 1 << 14  # a writer's overlay entries past this go into that midx in memory
BUFFER_LIMIT = 4 << 20
QUEUE_DEPTH = 32  # writes in flight (each up to BUFFER_LIMIT or one block)
SYNC_EVERY = 32 << 20  # start writeback this often, so the final fsync is short
DEFER_LIMIT = 8 << 20  # a deferred run of clonable blocks is copied once this long
SMALL_PACK = 8 << 20  # a pack smaller than this is merged by a repack once there are
MERGE_SMALL_PACKS = 64  # more than this many of them (each snapshot writes its own)


class PackWriter:
    """Appends records to one new pack; `seal` makes it durable and indexed.

    Writes go to a background thread (bounded queue) that also starts flushing to disk every
    SYNC_EVERY bytes, so reading and hashing, copying into the page cache and writeback
    overlap; `seal` waits for it, then fsyncs."""

    def __init__(self, directory: Path, record: struct.Struct):
        self.record = record
        self.name = secrets.token_hex(8)
        self.path = directory / f"{self.name}.pack"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        self.entries: dict[BlockId, tuple[int, int]] = {}
        self.flushed = 0
        self.complete = len(PACK_HEADER)  # the end of the last whole record
        self.buffer = bytearray(PACK_HEADER)
        self.queue: queue.Queue | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def size(self) -> int:
        return self.flushed + len(self.buffer)

    def add(self, block_id: BlockId, data: bytes | memoryview) -> None:
        self._begin(block_id, len(data), shared=False)
        offset = self.size
        if len(data) >= BUFFER_LIMIT // 16:  # large: skip the copy into the buffer
            self.flush()
            self._write_at(self.flushed, data if isinstance(data, bytes) else bytes(data))
            self.flushed += len(data)
        else:
            self.buffer += data
        self._done(block_id, offset, len(data))
        if len(self.buffer) >= BUFFER_LIMIT:
            self.flush()

    def add_copy(self, block_id: BlockId, src_fd: int, src_off: int, length: int) -> None:
        """Append a record whose data the kernel copies from another file (sharing its
        extents, on a copy-on-write filesystem, where the layout aligns them)."""
        self._begin(block_id, length, shared=src_off % ALIGN == 0)
        self.flush()
        copy_range(src_fd, src_off, self.fd, self.flushed, length)
        self.flushed += length
        self._done(block_id, self.flushed - length, length)

    def _begin(self, block_id: BlockId, length: int, shared: bool) -> None:
        """Before a record's data: its header."""
        self.buffer += self.record.pack(block_id, length)

    def add_run(self, src_fd: int, start: int, records: list[tuple[BlockId, int, int]]) -> None:
        """Append whole records copied by the kernel from another pack: the bytes from
        `start` to the end of the last of `records` (id, data offset there, length)."""
        self.flush()
        size = records[-1][1] + records[-1][2] - start
        try:
            copy_range(src_fd, start, self.fd, self.flushed, size)
        except OSError as exc:  # ENOSPC, EIO: name the pack being written
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        base = self.flushed - start
        self.flushed += size
        for block_id, off, length in records:
            self._done(block_id, base + off, length)

    def _done(self, block_id: BlockId, offset: int, length: int) -> None:
        """A record is whole: only now does the index name it (a Ctrl-C in the middle of an
        add leaves a partial record past `complete`, which seal cuts off)."""
        self.entries[block_id] = (offset, length)
        self.complete = offset + length

    def flush(self) -> None:
        """Hand the buffer to the writer (positional writes only: kernel copies by
        `add_copy` do not move the file position)."""
        if self.buffer:
            self._write_at(self.flushed, bytes(self.buffer))
            self.flushed += len(self.buffer)
            self.buffer = bytearray()

    def _write_at(self, offset: int, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        if self.thread is None:
            self.queue = queue.Queue(maxsize=QUEUE_DEPTH)
            self.thread = threading.Thread(target=self._run, name="volsync-pack", daemon=True)
            self.thread.start()
        self.queue.put((offset, data))

    def _run(self) -> None:
        unsynced = 0
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                pwrite_all(self.fd, item[1], item[0])
                unsynced += len(item[1])
                if unsynced >= SYNC_EVERY:
                    fault("fsync")
                    os.fdatasync(self.fd)
                    unsynced = 0
            except OSError as exc:  # re-raised in the caller's thread, naming the pack
                self.error = OSError(exc.errno, exc.strerror, str(self.path))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                self.error = exc

    def drain(self) -> None:
        """Wait until every queued write is in the file; re-raise a write error."""
        self.flush()
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None
        if self.error is not None:
            raise self.error

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.flushed:
            start = offset - self.flushed
            return bytes(self.buffer[start : start + length])
        self.drain()
        return os.pread(self.fd, length, offset)

    def seal(self) -> dict[BlockId, tuple[int, int]]:
        self.drain()
        if os.fstat(self.fd).st_size > self.complete:  # an add cut short (Ctrl-C)
            os.ftruncate(self.fd, self.complete)
        fsync(self.fd)
        crashpoint("pack-data-durable")
        ids = list(self.entries)
        body = {
            "pack": self.name,
            "ids": b"".join(ids),
            "offsets": array("Q", (self.entries[i][0] for i in ids)).tobytes(),
            "lengths": array("I", (self.entries[i][1] for i in ids)).tobytes(),
        }
        atomic_write(self.path.with_suffix(".idx"), seal("index", body))
        crashpoint("pack-index-committed")
        os.close(self.fd)
        return self.entries

    def abandon(self) -> None:
        with suppress(BaseException):
            self.drain()
        os.close(self.fd)
        self.path.unlink(missing_ok=True)


class AlignedPackWriter(PackWriter):
    """A PackWriter laying records out on filesystem-block boundaries, with their headers in
    group pages (store/alignedpack.py), so that copies share extents on XFS and btrfs."""

    def __init__(self, directory: Path, record: struct.Struct):
        super().__init__(directory, record)
        id_size = record.size - 4
        self.entry = entry_struct(id_size)
        self.cap = capacity(id_size)
        self.buffer = bytearray()
        self.flushed = self.complete = ALIGN  # the first group's page is at 0
        self.group = 0
        self.group_entries: list[bytes] = []
        self.realign = False  # the last record shares extents: the next one starts aligned
        small_cow_reservations(self.fd)
        self.page_written = -1  # how many entries the group page last written named
        # a run of clonable records from one private file, copied by one call when it ends:
        # [src fd, src offset, offset here, length]
        self.deferred: list[int] | None = None

    def _begin(self, block_id: BlockId, length: int, shared: bool) -> None:
        if len(self.group_entries) == self.cap:
            self.flush()  # the data, then the full group's page
            self.group, self.group_entries, self.page_written = align_up(self.flushed), [], -1
            self.flushed = self.group + ALIGN
        if shared or self.realign or length >= ALIGN:
            self._skip_to(align_up(self.size))
        self.realign = shared

    def _skip_to(self, offset: int) -> None:
        """Leave a hole up to `offset` (never written: no space taken)."""
        if offset > self.size:
            self.flush()
            self.flushed = offset

    def _done(self, block_id: BlockId, offset: int, length: int) -> None:
        super()._done(block_id, offset, length)
        self.group_entries.append(self.entry.pack(block_id, offset, length))

    def add_deferred(self, block_id: BlockId, src_fd: int, src_off: int, length: int) -> None:
        """add_copy, at an aligned `src_off`, of a block of a private file (a scan's clone)
        that stays open until `settle`: consecutive blocks of it are copied by one kernel call
        (once the run ends, at `settle`, or when anything else is written or read)."""
        d = self.deferred
        if not (d and d[0] == src_fd and d[1] + d[3] == src_off
                and self.flushed == d[2] + d[3] and not self.buffer
                and len(self.group_entries) < self.cap and d[3] < DEFER_LIMIT):
            self.settle()
            self._begin(block_id, length, shared=True)
            self.flush()
            d = self.deferred = [src_fd, src_off, self.flushed, 0]
        offset = d[2] + d[3]
        d[3] += length
        self.flushed = offset + length
        self.realign = True
        self._done(block_id, offset, length)

    def settle(self) -> None:
        """Copy the deferred run, if any (before its source is closed)."""
        d, self.deferred = self.deferred, None
        if d:
            try:
                copy_range(d[0], d[1], self.fd, d[2], d[3])
            except OSError as exc:  # ENOSPC, EIO: name the pack being written
                raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def add_copy(self, block_id: BlockId, src_fd: int, src_off: int, length: int) -> None:
        self.settle()
        super().add_copy(block_id, src_fd, src_off, length)

    def read(self, offset: int, length: int) -> bytes:
        self.settle()
        return super().read(offset, length)

    def flush(self) -> None:
        """Also name the records flushed so far in the group page, so that a killed writer's
        records are found again (adopt); small records are thus named once per buffer."""
        self.settle()
        super().flush()
        if len(self.group_entries) != self.page_written:
            self._write_group()

    def _write_group(self) -> None:
        """Write the group page now, in this thread (only this thread writes group pages, so
        an older one never lands over a newer; records it names whose data is still queued
        are checked by adopt like any torn record)."""
        if self.group_entries or self.group == 0:
            try:
                pwrite_all(self.fd, group_page(self.group == 0, self.group_entries), self.group)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(self.path)) from None
            self.page_written = len(self.group_entries)

    def add_run(self, src_fd: int, start: int, records: list[tuple[BlockId, int, int]]) -> None:
        raise AssertionError("runs are copied between packed-layout packs only")

    def add_span(self, src_fd: int, records: list[tuple[BlockId, int, int]]) -> None:
        """Append records the kernel copies in one call from a span of another aligned pack
        ((id, offset there, length), in order, each less than a page after the one before):
        the span keeps its layout from the page its first record is in, so the filesystem
        shares its extents. Split where this pack's group fills."""
        while records:
            self._begin(records[0][0], ALIGN, shared=True)  # room in the group, aligned
            part, records = records[: self.cap - len(self.group_entries)], \
                records[self.cap - len(self.group_entries) :]
            low = part[0][1] & ~(ALIGN - 1)
            size = part[-1][1] + part[-1][2] - low
            self.flush()
            base = self.flushed
            copy_range(src_fd, low, self.fd, base, size)
            self.flushed = base + size
            for block_id, off, length in part:
                self._done(block_id, base + off - low, length)
        self.flush()  # the group page names them (a killed run's records are adopted)

    def seal(self) -> dict[BlockId, tuple[int, int]]:
        self._write_group()
        return super().seal()


def copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int | None, length: int) -> None:
    """Kernel-side copy (copy_file_range), falling back to read and write where unsupported.
    With dst_off None the destination's file position is used and advanced."""
    fault("write")
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src_fd, dst_fd, length - done, src_off + done,
                                   None if dst_off is None else dst_off + done)
            if n == 0:
                raise IntegrityError("source ended early while copying a block")
            done += n
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    data = os.pread(src_fd, length - done, src_off + done)
    if dst_off is None:
        write_all(dst_fd, data)
    else:
        pwrite_all(dst_fd, data, dst_off + done)


def read_index(path: Path, id_size: int, version: int = FORMAT_VERSION
               ) -> tuple[str, list[tuple[BlockId, int, int]]]:
    """Decode one pack index, refusing any that fails its checksum or shape (an OS limit
    hit reading it is StoreAccessError: not an OSError, so no caller takes it for damage)."""
    try:
        raw = read_nofollow(path)
    except OSError as exc:
        if is_damage(exc):
            raise
        raise access_error(exc, f"reading pack index {path.name}") from None
    return parse_index(raw, path, id_size, version)


def parse_index(raw: bytes, path: Path, id_size: int, version: int = FORMAT_VERSION
                ) -> tuple[str, list[tuple[BlockId, int, int]]]:
    """An index's (pack name, [(id, offset, length)]); `version` 1 for `upgrade`."""
    body = open_sealed(raw, "index", f"pack index {path.name}", version)
    try:
        ids, offs, lens = body["ids"], array("Q"), array("I")
        offs.frombytes(body["offsets"])
        lens.frombytes(body["lengths"])
        name = body["pack"]
    except (KeyError, TypeError, ValueError):
        raise IntegrityError(f"pack index {path.name}: malformed") from None
    if not isinstance(ids, bytes):
        raise IntegrityError(f"pack index {path.name}: malformed")
    count = len(ids) // id_size
    if len(ids) % id_size or len(offs) != count or len(lens) != count or name != path.stem:
        raise IntegrityError(f"pack index {path.name}: malformed")
    return name, [
        (BlockId(ids[i * id_size : (i + 1) * id_size]), offs[i], lens[i])
        for i in range(count)
    ]


@dataclass(frozen=True)
class PackCheck:
    """What `verify_pack` found in one pack."""

    name: str
    checked: int  # records re-hashed
    corrupt: list[BlockId]  # records whose data does not match their id
    unlocated: list[tuple[BlockId, int]]  # entries of its index (id, offset) with no
    # intact record where they say
    damage: Exception | None  # what stopped the walk of its records
    index_problem: str | None  # its index is unreadable


class PackStore:
    """Content-addressed object store over the packs of one volume."""

    def __init__(self, directory: Path, algo: HashAlgo):
        self.dir = directory
        self.algo = algo
        self.digest = algo.digest
        self.record = record_struct(algo)
        self._index: BlockIndex | None = None
        self.midx_problem: str | None = None  # why a midx present was ignored
        self._defer_midx = False  # during repack and salvage: rewritten once they are done
        self._midx_unread = False  # the index was read without the midx (verify)
        self._pool = PackPool(directory)  # open packs (MAX_OPEN_PACKS), pinned while used
        self._writer: PackWriter | None = None
        self._aligned: bool | None = None  # the layout of new packs, decided on first write
        self.bad_indexes: list[tuple[str, str]] = []

    # --- reading ---------------------------------------------------------------------------
    def index(self) -> BlockIndex:
        """Where each object is: the midx (mapped, searched in place) and the indexes of
        the packs it does not cover."""
        if self._index is None:
            self._index = self._open_index(use_midx=True)
        return self._index

    def load_indexes(self) -> BlockIndex:
        """Read every pack index, ignoring the midx (verify: finds the unreadable ones)."""
        self._reset_index()
        self._index = self._open_index(use_midx=False)
        self._midx_unread = True
        return self._index

    def _open_index(self, use_midx: bool) -> BlockIndex:
        existing = set(self.pack_names())
        midx, self.midx_problem = (open_midx(self.dir / MIDX_NAME, self.algo.size)
                                   if use_midx else (None, None))
        covered = set(midx.names) if midx else set()
        rest = [name for name in sorted(existing) if name not in covered]
        live = [name in existing for name in midx.names] if midx else []
        if self._index_bytes(rest) >= EXTRA_MIN_BYTES:
            extra, uncovered = self._extra_index(rest)
            return BlockIndex(midx, live, {}, uncovered, extra)
        overlay: dict[BlockId, Location] = {}
        uncovered = set()
        for name in rest:
            entries = self._read_pack_index(name)
            if entries is not None:
                uncovered.add(name)
                for block_id, off, length in entries:
                    overlay[block_id] = (name, off, length)
        return BlockIndex(midx, live, overlay, uncovered)

    def _index_bytes(self, names: list[str]) -> int:
        total = 0
        for name in names:
            with suppress(OSError):
                total += (self.dir / f"{name}.idx").stat().st_size
        return total

    def _extra_index(self, names: list[str]) -> tuple[Midx, set[str]]:
        """The entries of packs the midx does not cover, as a midx built in memory (a
        later pack's copy of an id found first, as the overlay's dict had it), and the
        packs whose index could be read (the names it holds)."""
        image = build_midx(self.algo.size, None, [], sorted(names, reverse=True),
                           self._read_pack_index)
        extra = Midx.in_memory(image, self.algo.size)
        return extra, set(extra.names)

    def _read_pack_index(self, name: str) -> list[tuple[BlockId, int, int]] | None:
        try:
            return read_index(self.dir / f"{name}.idx", self.algo.size)[1]
        except (IntegrityError, OSError) as exc:
            self.bad_indexes.append((f"{name}.idx", str(exc)))
            return None

    def _reset_index(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None
        self.bad_indexes = []

    # --- the midx (lock holder only) -------------------------------------------------------
    def maintain_index(self, force: bool = False, if_read: bool = False) -> bool:
        """Rewrite the midx when it is stale, damaged, or leaves too many entries or packs
        to the overlay (or when `force`d and there is something to cover): True if it was.
        With `if_read`, only where this store's index was read (a command that looked up no
        object changed nothing in it: opening the index just to check would read every pack
        index the midx does not cover, a cost that grows with the volume)."""
        if if_read and self._index is None:
            return False
        index = self.index()
        if self._defer_midx or not (force or self._midx_due(index)):
            return False
        if not (index.covered() or index.uncovered):
            return False
        try:
            self.write_midx()
        except OSError:  # derived data: a full disk leaves the old midx and the .idx files
            return False
        return True

    def _midx_due(self, index: BlockIndex) -> bool:
        if index.stale or self.midx_problem:
            return True
        if self._midx_unread:  # left out by verify: rewritten if it is damaged
            self._midx_unread = False
            if (self.dir / MIDX_NAME).exists() and self.check_midx():
                return True
        if index.midx is not None and not index.midx.intact():
            self.midx_problem = f"{MIDX_NAME}: checksum mismatch"
            return True
        return (len(index.uncovered) >= MIDX_MAX_PACKS
                or index.pending() >= max(MIDX_MIN_ENTRIES,
                                          min(index.covered() // 8, MIDX_MAX_PENDING)))

    def write_midx(self) -> None:
        """Merge the live part of the midx and the indexes of the packs it does not cover
        into a new midx, then reopen the index on it (the same object: callers keep it)."""
        index = self.index()
        old = index.midx if index.midx is not None and index.midx.intact() else None
        existing = self.pack_names()
        present, covered = set(existing), set(old.names) if old else set()
        live = [name in present for name in old.names] if old else []
        fresh = [n for n in existing if n not in covered]
        atomic_write_with(self.dir / MIDX_NAME, lambda fd: build_midx(
            self.algo.size, old, live, fresh, self._read_pack_index, fd))
        crashpoint("midx-written")
        self.bad_indexes = []
        index.take(self._open_index(use_midx=True))
        if index.midx is not None:
            index.midx.verified = True  # the bytes just written

    def check_midx(self) -> str | None:
        """What is wrong with the midx, if there is one (verify: reads all of it)."""
        midx, problem = open_midx(self.dir / MIDX_NAME, self.algo.size)
        if midx is None:
            return problem
        try:
            return None if midx.intact() else f"{MIDX_NAME}: checksum mismatch"
        finally:
            midx.close()

    def remove_midx(self) -> None:
        """Drop the midx (derived data): the indexes are read until it is written again."""
        self._reset_index()
        (self.dir / MIDX_NAME).unlink(missing_ok=True)

    def has(self, block_id: BlockId) -> bool:
        return block_id in self.index() or bool(self._writer and block_id in self._writer.entries)

    def length(self, block_id: BlockId) -> int:
        if self._writer and block_id in self._writer.entries:
            return self._writer.entries[block_id][1]
        return self.index()[block_id][2]

    def get(self, block_id: BlockId, verify: bool = False) -> bytes:
        """The object's bytes; with `verify`, re-hashed and refused if they do not match."""
        w = self._writer
        if w and block_id in w.entries:
            data = w.read(*w.entries[block_id])
        else:
            loc = self.index().get(block_id)
            if loc is None:
                raise IntegrityError(f"missing block {block_id.hex()}")
            name, off, length = loc
            data = self._pread(name, off, length, block_id)
            if len(data) != length:
                raise IntegrityError(f"block {block_id.hex()}: pack {name} is truncated")
        if verify and self.digest(data) != block_id:
            raise IntegrityError(f"block {block_id.hex()} failed its digest check")
        return data

    def _pread(self, name: str, off: int, length: int, block_id: BlockId) -> bytes:
        with self._pool.use(name) as pack:
            try:
                return os.pread(pack.fd, length, off)
            except OSError as exc:
                raise pack_error(exc, f"reading pack {name}",
                                 f"block {block_id.hex()}: unreadable pack {name}: {exc}"
                                 ) from None

    def copy_to(self, block_id: BlockId, out_fd: int, out_off: int | None = None,
                verify: bool = True) -> int:
        """Write a (verified) object into a file without copying it through Python: its
        digest is checked through a read-only mapping, then the kernel copies it."""
        w = self._writer
        if w and block_id in w.entries:
            data = self.get(block_id, verify=verify)
            if out_off is None:
                write_all(out_fd, data)
            else:
                pwrite_all(out_fd, data, out_off)
            return len(data)
        loc = self.index().get(block_id)
        if loc is None:
            raise IntegrityError(f"missing block {block_id.hex()}")
        name, off, length = loc
        with self._pool.use(name, mapped=verify) as pack:
            if verify:
                self._check_in_place(pack, block_id, off, length)
            copy_range(pack.fd, off, out_fd, out_off, length)
        return length

    def copy_many_to(self, ids: list[BlockId], out_fd: int, out_off: int,
                     checked: Container[BlockId] = frozenset()) -> int:
        """Write objects one after another into a file from `out_off`, each checked against
        its id (unless in `checked`) as copy_to does; those lying one after another in a
        pack (an aligned pack's blocks of one file) go by one kernel copy, which the
        filesystem does by sharing extents where it can. Returns the bytes written."""
        pos = out_off
        run: list[tuple[BlockId, int, int]] = []  # (id, offset, length) in one pack
        run_name = None
        for block_id in ids:
            loc = None if self._writer and block_id in self._writer.entries \
                else self.index().get(block_id)
            if run and (loc is None or loc[0] != run_name
                        or loc[1] != run[-1][1] + run[-1][2]):
                pos += self._copy_out(run_name, run, out_fd, pos, checked)
                run = []
            if loc is None:  # in the pack being written, or missing (which raises)
                pos += self.copy_to(block_id, out_fd, pos, block_id not in checked)
                continue
            run_name = loc[0]
            run.append((block_id, loc[1], loc[2]))
        if run:
            pos += self._copy_out(run_name, run, out_fd, pos, checked)
        return pos - out_off

    def _copy_out(self, name: str, run: list[tuple[BlockId, int, int]], out_fd: int,
                  out_off: int, checked: Container[BlockId]) -> int:
        size = run[-1][1] + run[-1][2] - run[0][1]
        verify = any(block_id not in checked for block_id, _, _ in run)
        with self._pool.use(name, mapped=verify) as pack:
            for block_id, off, length in run:
                if block_id not in checked:
                    self._check_in_place(pack, block_id, off, length)
            copy_range(pack.fd, run[0][1], out_fd, out_off, size)
        return size

    def _check_in_place(self, pack: OpenPack, block_id: BlockId, off: int, length: int) -> None:
        view = pack.view
        if off + length > len(view):
            raise IntegrityError(f"block {block_id.hex()}: pack {pack.name} is truncated")
        if self.digest(view[off : off + length]) != block_id:
            raise IntegrityError(f"block {block_id.hex()} failed its digest check")

    def put_many_from(self, other: PackStore, ids, on_object=None) -> None:
        """Receive objects from another store: each is checked against its id (and its
        record header) through a read-only mapping, then runs of consecutive records are
        copied by the kernel in one call. `on_object(length)` is called for each once its
        run is copied."""
        run: list[tuple[BlockId, int, int]] = []  # (id, offset, length) in one source pack
        run_pack = None
        span: list[tuple[BlockId, int, int]] = []  # the same, between aligned packs
        span_pack = None
        for block_id in ids:  # unique ids
            if self.has(block_id):
                continue
            if block_id not in other.index():  # only in the other's unsealed writer
                data = other.get(block_id, verify=True)
                self.put(block_id, data)
                if on_object:
                    on_object(len(data))
                continue
            name, off, length, aligned = self._checked_location(other, block_id)
            if aligned and self.aligned():  # spans of records (sharing their extents)
                if span and not (span_pack == name and _follows(span[-1], off)
                                 and off - span[0][1] < PACK_TARGET // 4):
                    self._copy_records(other, span_pack, span, on_object, "span")
                    span = []
                span_pack = name
                span.append((block_id, off, length))
                continue
            if aligned or self.aligned():  # between layouts: record by record
                self._copy_records(other, name, [(block_id, off, length)], on_object, "each")
                continue
            contiguous = (run and run_pack == name
                          and off == run[-1][1] + run[-1][2] + self.record.size)
            if run and not contiguous:
                self._copy_records(other, run_pack, run, on_object, "run")
                run = []
            run_pack = name
            run.append((block_id, off, length))
        if run:
            self._copy_records(other, run_pack, run, on_object, "run")
        if span:
            self._copy_records(other, span_pack, span, on_object, "span")

    def _checked_location(self, other: PackStore, block_id: BlockId
                          ) -> tuple[str, int, int, bool]:
        """Where the other store has the object (name, offset, length, aligned layout),
        its bytes checked against its id (and its record header, in the packed layout)."""
        loc = other.index().get(block_id)
        if loc is None:
            raise IntegrityError(f"missing block {block_id.hex()}")
        name, off, length = loc
        with other._pool.use(name, mapped=True) as pack:
            view = pack.view
            if off < self.record.size or off + length > len(view):
                raise IntegrityError(f"block {block_id.hex()}: pack {name} is truncated")
            aligned = view[: len(ALIGNED_HEADER)] == ALIGNED_HEADER
            if not aligned and \
                    view[off - self.record.size : off] != self.record.pack(block_id, length):
                raise IntegrityError(f"block {block_id.hex()}: record header in pack {name} "
                                     "is corrupt")
            del view
            self._check_in_place(pack, block_id, off, length)
        return name, off, length, aligned

    def _copy_records(self, other: PackStore, name: str, records, on_object, how: str
                      ) -> None:
        """Copy records of one of the other store's packs ((id, offset, length), checked):
        `how` is "run" (packed to packed: the bytes from the first record's header on, in one
        call), "span" (aligned to aligned, in one call) or "each" (between the layouts). Then
        each is counted, and a full pack is sealed."""
        w = self._new_writer()
        with other._pool.use(name) as pack:
            if how == "run":
                w.add_run(pack.fd, records[0][1] - self.record.size, records)
            elif how == "span":
                w.add_span(pack.fd, records)
            else:
                for block_id, off, length in records:
                    w.add_copy(block_id, pack.fd, off, length)
        for _, _, length in records:
            if on_object:
                on_object(length)
        if w.size >= PACK_TARGET:
            self.flush()

    # --- writing (lock holder only) ---------------------------------------------------------
    def put(self, block_id: BlockId, data: bytes | memoryview,
            src: tuple[int, int] | None = None) -> bool:
        """Store an object unless present; True when it was written. `src` (an fd that
        nothing else writes, an offset) holds the same bytes: the aligned layout has the
        kernel copy them from there, sharing their extents where the filesystem can."""
        if self.has(block_id):
            return False
        w = self._new_writer()
        if src is not None and isinstance(w, AlignedPackWriter) and src[1] % ALIGN == 0:
            w.add_deferred(block_id, src[0], src[1], len(data))
        else:
            w.add(block_id, data)
        if w.size >= PACK_TARGET:
            self.flush()
        return True

    def settle(self) -> None:
        """Copy what `put` deferred from a private source (call before closing it)."""
        if isinstance(self._writer, AlignedPackWriter):
            self._writer.settle()

    def _new_writer(self) -> PackWriter:
        if self._writer is None:
            layout = AlignedPackWriter if self.aligned() else PackWriter
            self._writer = layout(self.dir, self.record)
        return self._writer

    def aligned(self) -> bool:
        """Whether new packs use the aligned layout: where files in the store can share
        extents (XFS, btrfs). VOLSYNC_PACK_LAYOUT=aligned or =packed decides instead."""
        if self._aligned is None:
            forced = os.environ.get("VOLSYNC_PACK_LAYOUT", "")
            self._aligned = (forced == "aligned" if forced in ("aligned", "packed")
                             else shares_extents(self.dir))
        return self._aligned

    def flush(self) -> None:
        """Make every object put so far durable and indexed."""
        w, self._writer = self._writer, None
        if w is None:
            return
        if not w.entries:
            w.abandon()
            return
        try:
            entries = w.seal()
        except BaseException:
            # not indexed, so not committed: drop it as `discard` would have (on a full disk
            # this frees the space the run's undo needs); an index already renamed in keeps it
            if w.path.with_suffix(".idx").exists():
                with suppress(OSError):
                    os.close(w.fd)
            else:
                w.abandon()
            raise
        index = self.index()
        index.add_pack(w.name, entries)
        if not self.maintain_index() and len(index.overlay) >= OVERLAY_FOLD:
            self._fold(index)

    def _fold(self, index: BlockIndex) -> None:
        """Move the overlay's entries of packs the midx does not cover into the midx built
        in memory for those packs (a writer between two rewrites of the midx file would
        otherwise hold a dict entry and a tuple for every object it wrote)."""
        extra, readable = self._extra_index(sorted(index.uncovered))
        index.fold(extra, {block_id: loc for block_id, loc in index.overlay.items()
                           if loc is None or loc[0] not in readable})

    def discard(self) -> None:
        """Drop objects put since the last flush (an aborted run)."""
        if self._writer is not None:
            self._writer.abandon()
            self._writer = None

    def drop_since(self, before: set[str]) -> None:
        """Undo what a run stored since `pack_names()` was `before` (a refused transfer):
        objects not yet flushed are dropped, and the packs it sealed removed; no committed
        record refers to them, as `put` never writes an id the store has."""
        self.discard()
        for name in set(self.pack_names()) - before:
            self._drop_pack(name)
        self._reset_index()

    def adopt_orphans(self) -> int:
        """Index packs that have none (a writer killed before sealing, or a lost index):
        records that match their ids are kept, the torn tail is cut off. Objects received
        before a crash are thus not sent again, and nothing readable is thrown away."""
        indexed = {p.stem for p in self.dir.glob("*.idx")}
        adopted = 0
        for pack in sorted(self.dir.glob("*.pack")):
            if pack.stem in indexed or (self._writer and self._writer.name == pack.stem):
                continue
            if self._index is not None and self._index.midx is not None \
                    and pack.stem in self._index.midx.names:
                self.remove_midx()  # it lists what was indexed before: may not match now
            adopted += self._adopt(pack)
        return adopted

    def _adopt(self, pack: Path) -> int:
        if self._layout_of(pack) == ALIGNED_HEADER:
            return self._adopt_aligned(pack)
        writer = PackWriter.__new__(PackWriter)  # index an existing file, writing no data
        writer.name, writer.path, writer.entries = pack.stem, pack, {}
        end = len(PACK_HEADER)
        try:
            for block_id, off, data in self.scan_pack(pack.stem):
                if self.digest(data) != block_id:
                    break
                writer.entries[block_id] = (off, len(data))
                end = off + len(data)
        except (IntegrityError, OSError):
            pass  # keep the intact records before the damage
        if not writer.entries:
            pack.unlink(missing_ok=True)
            return 0
        fd = os.open(pack, os.O_RDWR | os.O_NOFOLLOW)
        try:
            os.ftruncate(fd, end)
            fsync(fd)
        finally:
            os.close(fd)
        writer.fd = os.open(pack, os.O_RDONLY | os.O_NOFOLLOW)
        writer.flushed, writer.buffer, writer.thread, writer.error = end, bytearray(), None, None
        writer.complete = end
        entries = writer.seal()
        if self._index is not None:
            self._index.add_pack(pack.stem, entries, replace=False)
        return len(entries)

    def _layout_of(self, pack: Path) -> bytes:
        """A pack's first bytes (its layout's header); b"" if it cannot be read for damage."""
        try:
            fd = self._open_leftover(pack)
        except OSError:
            return b""
        try:
            return os.pread(fd, len(ALIGNED_HEADER), 0)
        except OSError:
            return b""
        finally:
            os.close(fd)

    @staticmethod
    def _open_leftover(pack: Path) -> int:
        try:
            return os.open(pack, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            if is_damage(exc):
                raise
            raise access_error(exc, f"reading pack {pack.stem}") from None

    def _adopt_aligned(self, pack: Path) -> int:
        """An aligned leftover: the records its group pages list that match their ids are
        copied into a new pack (the kernel shares their extents where it can), then it goes
        (its last group page may list records a crash lost, so it is not indexed in place)."""
        good = []
        try:
            for block_id, off, data in self.scan_pack(pack.stem):
                if self.digest(data) != block_id:
                    break
                good.append((block_id, off, len(data)))
        except (IntegrityError, OSError):
            pass  # keep the intact records before the damage
        kept = 0
        fd = self._open_leftover(pack)
        try:
            for block_id, off, length in good:
                if not self.has(block_id):
                    self._new_writer().add_copy(block_id, fd, off, length)
                    kept += 1
            self.flush()
        finally:
            os.close(fd)
        pack.unlink(missing_ok=True)
        return kept

    def close(self) -> None:
        self.discard()
        self._reset_index()
        self._pool.close_all()

    def __del__(self) -> None:
        # pack fds are raw descriptors: a store dropped without close() (a command run
        # in-process, a library caller) must not leak them
        with suppress(Exception):
            self._pool.close_all()

    def _close_pack(self, name: str) -> None:
        self._pool.close(name)

    # --- whole-store passes -----------------------------------------------------------------
    def pack_names(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.idx"))

    def scan_pack(self, name: str) -> Iterator[tuple[BlockId, int, bytes]]:
        """Every record of a pack as written, for verify (id, offset, data). An OS limit hit
        on the way is StoreAccessError, which no caller takes for damage."""
        try:
            yield from self._scan_records(name)
        except OSError as exc:
            if is_damage(exc):
                raise
            raise access_error(exc, f"reading pack {name}") from None

    def _scan_records(self, name: str) -> Iterator[tuple[BlockId, int, bytes]]:
        fd = os.open(self.dir / f"{name}.pack", os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            magic = f.read(len(PACK_HEADER))
            if magic == ALIGNED_HEADER:
                yield from self._scan_aligned(name, f.fileno())
                return
            if magic != PACK_HEADER:
                raise IntegrityError(f"pack {name}: bad header")
            while head := f.read(self.record.size):
                if len(head) < self.record.size:
                    raise IntegrityError(f"pack {name}: truncated record")
                block_id, length = self.record.unpack(head)
                off = f.tell()
                data = f.read(length)
                if len(data) != length:
                    raise IntegrityError(f"pack {name}: truncated record")
                yield BlockId(block_id), off, data

    def _scan_aligned(self, name: str, fd: int) -> Iterator[tuple[BlockId, int, bytes]]:
        def read(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        for block_id, off, length in walk_groups(read, os.fstat(fd).st_size, name,
                                                 self.algo.size):
            data = os.pread(fd, length, off)
            if len(data) != length:
                raise IntegrityError(f"pack {name}: truncated record")
            yield block_id, off, data

    def verify_pack(self, name: str) -> PackCheck:
        """One pack against its own index, in memory bounded by the pack (verify streams
        the store a pack at a time, never holding every id): its records re-hashed, and the
        entries of its `.idx` that name no intact record at their offset."""
        try:
            entries = read_index(self.dir / f"{name}.idx", self.algo.size)[1]
            index_problem = None
        except (IntegrityError, OSError) as exc:  # (an OS limit is StoreAccessError)
            entries, index_problem = [], str(exc)
        records, damage = self.check_pack(name)
        intact = {off: block_id for block_id, off, good in records if good}
        return PackCheck(
            name, len(records), [block_id for block_id, _, good in records if not good],
            [(block_id, off) for block_id, off, _ in entries if intact.get(off) != block_id],
            damage, index_problem)

    def check_pack(self, name: str) -> tuple[list[tuple[BlockId, int, bool]], Exception | None]:
        """Re-hash every record of a pack in place, through a read-only mapping (no copies; safe
        to run in a thread per pack): (id, data offset, whether it matches) for each whole
        record, and the damage that stopped the walk, if any. An OS limit is StoreAccessError."""
        records: list[tuple[BlockId, int, bool]] = []
        try:
            fd = os.open(self.dir / f"{name}.pack", os.O_RDONLY | os.O_NOFOLLOW)
            try:
                size = os.fstat(fd).st_size
                if size < len(PACK_HEADER):
                    raise IntegrityError(f"pack {name}: bad header")
                with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapped:
                    self._check_records(name, memoryview(mapped), records)
            finally:
                os.close(fd)
        except IntegrityError as exc:
            return records, exc
        except OSError as exc:
            if not is_damage(exc):
                raise access_error(exc, f"reading pack {name}") from None
            return records, exc
        return records, None

    def _check_records(self, name: str, view: memoryview, records: list) -> None:
        try:
            if view[: len(ALIGNED_HEADER)] == ALIGNED_HEADER:
                self._check_aligned(name, view, records)
                return
            if view[: len(PACK_HEADER)] != PACK_HEADER:
                raise IntegrityError(f"pack {name}: bad header")
            pos, end, head = len(PACK_HEADER), len(view), self.record.size
            while pos < end:
                if pos + head > end:
                    raise IntegrityError(f"pack {name}: truncated record")
                block_id, length = self.record.unpack_from(view, pos)
                off = pos + head
                if off + length > end:
                    raise IntegrityError(f"pack {name}: truncated record")
                records.append((BlockId(block_id), off,
                                self.digest(view[off : off + length]) == block_id))
                pos = off + length
        finally:
            view.release()

    def _check_aligned(self, name: str, view: memoryview, records: list) -> None:
        def read(offset: int, length: int) -> bytes:
            return bytes(view[offset : offset + length])  # a page: no slice outlives the map

        for block_id, off, length in walk_groups(read, len(view), name, self.algo.size):
            records.append((block_id, off, self.digest(view[off : off + length]) == block_id))

    def repack(self, live: Container[bytes], spare: set[str] = frozenset()
               ) -> tuple[int, int]:
        """Free objects not in `live`: rewrite each pack holding garbage or copies that live
        elsewhere (a crashed earlier repack leaves those), and the small packs once there are
        many, then drop the old packs once the rewritten data is durable; packs in `spare` are
        left as they are. Returns (objects freed, bytes freed)."""
        with self._midx_deferred():
            return self._repack(live, spare)

    @contextmanager
    def _midx_deferred(self) -> Iterator[None]:
        """Packs are being rewritten and dropped: the midx is rewritten once, at the end
        (not by the flushes in between, which would see packs about to go)."""
        self._defer_midx = True
        try:
            yield
        finally:
            self._defer_midx = False
        self.maintain_index()

    def _repack(self, live: Container[bytes], spare: set[str]) -> tuple[int, int]:
        index = self.index()
        doomed = self._to_rewrite(live, spare)
        freed = freed_bytes = 0
        for name in doomed:
            for block_id, off, length in self._records(name)[0]:
                if block_id in live:
                    self._move(block_id, name, off, length)
                else:
                    # dropping the pack forgets the midx's entries of it; only one the
                    # overlay holds is forgotten here (not a deletion mark per object freed)
                    if block_id in index.overlay:
                        del index[block_id]
                    freed += 1
                    freed_bytes += length
        self.flush()
        for name in doomed:
            self._drop_pack(name)
        if doomed:
            fsync_dir(self.dir)  # the space is freed for good only once the unlinks are durable
        return freed, freed_bytes

    def _move(self, block_id: BlockId, name: str, off: int, length: int) -> None:
        """Rewrite a live object into the pack being written (the kernel copies it, sharing
        its extents where the layout and the filesystem allow)."""
        del self.index()[block_id]
        w = self._new_writer()
        with self._pool.use(name) as pack:
            if isinstance(w, AlignedPackWriter):
                w.add_copy(block_id, pack.fd, off, length)
            else:
                w.add(block_id, os.pread(pack.fd, length, off))
        if w.size >= PACK_TARGET:
            self.flush()

    def garbage(self, live: Container[bytes], spare: set[str] = frozenset()
                ) -> tuple[int, int]:
        """What `repack(live, spare)` would free, (objects, bytes), changing nothing."""
        dead = [length for name in self._to_rewrite(live, spare)
                for block_id, _, length in self._records(name)[0] if block_id not in live]
        return len(dead), sum(dead)

    def _to_rewrite(self, live: Container[bytes], spare: set[str]) -> list[str]:
        """The packs holding garbage or copies that live elsewhere: the ones a repack
        rewrites. And, once there are more than MERGE_SMALL_PACKS small packs, those too:
        merged into one. A pack's records are read again when it is rewritten, so only one
        pack's are in memory at a time."""
        found, small = [], []
        for name in self.pack_names():
            if name in spare:
                continue
            try:
                own, total = self._records(name)
            except (IntegrityError, OSError):
                continue  # a damaged pack is verify's business, not prune's
            if not (all(e[0] in live for e in own) and len(own) == total):
                found.append(name)
            elif self._is_small(name):
                small.append(name)
        return found + (small if len(small) > MERGE_SMALL_PACKS else [])

    def _records(self, name: str) -> tuple[list[tuple[BlockId, int, int]], int]:
        """The records of a pack's index that the block index locates in that pack (id,
        offset, length), and how many records the index has: the others are copies living
        elsewhere."""
        index = self.index()
        _, entries = read_index(self.dir / f"{name}.idx", self.algo.size)
        return [e for e in entries if index.get(e[0], ("",))[0] == name], len(entries)

    def _is_small(self, name: str) -> bool:
        try:
            return (self.dir / f"{name}.pack").stat().st_size < SMALL_PACK
        except OSError:
            return False  # a missing pack is verify's business

    def _drop_pack(self, name: str) -> None:
        if self._index is not None:
            self._index.drop_pack(name)
        self._close_pack(name)
        (self.dir / f"{name}.idx").unlink(missing_ok=True)
        crashpoint("pack-index-dropped")
        (self.dir / f"{name}.pack").unlink(missing_ok=True)

    def ids(self) -> Iterable[BlockId]:
        return self.index().keys()

    def salvage(self, damaged: set[str]) -> int:
        """Rewrite damaged packs (bad index, corrupt or truncated records) keeping only the
        records that still match their id; returns how many records were kept."""
        with self._midx_deferred():
            return self._salvage(damaged)

    def _salvage(self, damaged: set[str]) -> int:
        index = self.index()
        kept = 0
        for name in sorted(damaged):
            good = {}
            try:
                for block_id, _, data in self.scan_pack(name):
                    if self.digest(data) == block_id:
                        good[block_id] = data
            except (IntegrityError, OSError):
                pass  # keep what was readable before the damage
            listed = [i for i, loc in index.items() if loc[0] == name]
            for block_id in listed:
                # the index still finds records whose header (or an earlier record's
                # length) is damaged: keep each whose data matches its id
                if block_id not in good:
                    with suppress(IntegrityError, OSError):
                        good[block_id] = self.get(block_id, verify=True)
                del index[block_id]
            self._close_pack(name)
            for block_id, data in good.items():
                index.pop(block_id, None)
                kept += self.put(block_id, data)
            self.flush()
            self._drop_pack(name)
        fsync_dir(self.dir)
        self.bad_indexes = [b for b in self.bad_indexes if b[0][:-4] not in damaged]
        return kept


def _follows(prev: tuple[BlockId, int, int], off: int) -> bool:
    """Whether a record at `off` comes right after `prev` in an aligned pack (less than a page
    between them: no group page, no long hole)."""
    return 0 <= off - (prev[1] + prev[2]) < ALIGN


_SHARES: dict[int, bool] = {}  # per filesystem (st_dev): whether files there share extents


def shares_extents(directory: Path) -> bool:
    """Whether files in `directory` can share extents (probed once per filesystem)."""
    try:
        dev = os.stat(directory).st_dev
    except OSError:
        return False
    if dev not in _SHARES:
        _SHARES[dev] = probe_reflink(directory)
    return _SHARES[dev]
