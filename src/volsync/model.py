"""Domain values: ids, hash algorithms, tree entries, snapshots, volume state. No I/O here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import NewType

import blake3
import xxhash

BlockId = NewType("BlockId", bytes)  # digest of a block, block list or tree object
SnapshotId = NewType("SnapshotId", str)  # 32 lowercase hex characters, globally unique

READ_WRITE = "read-write"
READ_ONLY = "read-only"
JOURNAL_MATERIALIZE = "materialize"  # journal op: a live-tree write that a crash may interrupt


@dataclass(frozen=True)
class HashAlgo:
    """How a volume names its objects. Every volume that shares snapshots uses the same one."""

    name: str
    size: int  # bytes per id
    digest: Callable[[bytes | memoryview], bytes]

    @property
    def hole(self) -> BlockId:
        """The id standing for a block (or a block list) that is all zeros: nothing stored."""
        return BlockId(bytes(self.size))


def _blake3(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


@dataclass(frozen=True)
class Format:
    """What a volume's objects are: their hash and block size (equal on every volume that
    shares snapshots)."""

    algo: HashAlgo
    block_size: int

    def blocks_of(self, size: int) -> int:
        return -(-size // self.block_size)

    def block_length(self, index: int, size: int) -> int:
        return min(self.block_size, size - index * self.block_size)


BLAKE3 = HashAlgo("blake3", 32, _blake3)
XXH3 = HashAlgo("xxh3-128", 16, xxhash.xxh3_128_digest)
HASHES = {h.name: h for h in (BLAKE3, XXH3)}
DEFAULT_HASH = BLAKE3.name


class Kind(IntEnum):
    FILE = 1
    DIR = 2
    LINK = 3
    FIFO = 4
    CHR = 5
    BLK = 6


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in a directory, with everything `rsync -aHAXS --numeric-ids` keeps.

    `ref` is a file's content reference (see store/blocklist.py), a directory's tree id, a
    symlink's target (never followed), or empty. `uid`/`gid` are None only in snapshots
    converted from format 1, which did not record them. `xattrs` holds (name, value) pairs
    sorted by name, POSIX ACLs included as their `system.posix_acl_*` attributes. `link` names
    a hard-link group by the path of its first member (in sorted depth-first order); every
    member carries the same content and metadata. `rdev` is a device's number."""

    name: bytes
    kind: Kind
    mode: int
    uid: int | None
    gid: int | None
    mtime_ns: int
    size: int
    ref: bytes
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    link: bytes | None = None
    rdev: int = 0

    def with_(self, **changes) -> Entry:
        return replace(self, **changes)

    def same_content(self, other: Entry) -> bool:
        return self.kind == other.kind and self.ref == other.ref and self.size == other.size \
            and self.rdev == other.rdev


@dataclass(frozen=True, slots=True)
class Tree:
    """A directory's entries sorted by name; `meta` is set on a snapshot's root only (the
    volume root's own mode, owner, mtime and xattrs, as an Entry named b"")."""

    entries: tuple[Entry, ...]
    meta: Entry | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A point-in-time image of a live tree; copied to mirrors with number and id unchanged."""

    id: SnapshotId
    number: int
    created: float
    label: str | None
    root: BlockId
    size: int
    files: int
    origin: str  # id of the volume that captured it


BUSY, UNREADABLE = "busy", "unreadable"  # FileWarning.problem
PREVIOUS, CURRENT, SKIPPED = "previous", "current", "skipped"  # FileWarning.recorded


@dataclass(frozen=True, slots=True)
class FileWarning:
    """A file (or directory) a scan could not capture as it is, and what it recorded instead:
    `problem` BUSY (it kept changing while read) or UNREADABLE (it could not be opened);
    `recorded` PREVIOUS (its entry in the latest snapshot), CURRENT (the bytes last read,
    possibly inconsistent) or SKIPPED (left out). `path` is relative to the volume root."""

    path: bytes
    problem: str
    recorded: str


@dataclass(frozen=True)
class VolumeState:
    """The mutable part of a volume, replaced as a whole by one atomic rename."""

    mode: str = READ_WRITE
    upstream: str | None = None  # absolute path of the upstream volume (mirrors)
    upstream_id: str | None = None
    lineage: tuple[SnapshotId, ...] = ()
    preserved: tuple[SnapshotId, ...] = ()
    journal: dict | None = None  # a pending live-tree or role step a crash left to redo
    extra: dict = field(default_factory=dict)

    def with_(self, **changes) -> VolumeState:
        return replace(self, **changes)


def newest_common(src: list[Snapshot], dst: list[Snapshot]) -> Snapshot | None:
    """The highest-numbered snapshot whose id is in both lineages."""
    src_ids = {s.id for s in src}
    common = [s for s in dst if s.id in src_ids]
    return max(common, key=lambda s: s.number, default=None)


def progress_step(progress: Callable[[int], None] | None, label: str,
                  total: int | None = None, counted: bool = True) -> None:
    """Tell a progress display that a new step starts, with its total bytes when known; the
    byte counts after it (`progress(n)`) are that step's. `counted` is False for a step whose
    bytes are not counted here (done on another machine). A plain callable just counts."""
    start = getattr(progress, "step", None)
    if start is not None:
        start(label, total, counted)
