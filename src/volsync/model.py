"""Domain values: ids, tree entries, snapshots, volume state. No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import NewType

import xxhash

BlockId = NewType("BlockId", bytes)  # xxh3-128 digest (16 bytes) of a block or tree object
SnapshotId = NewType("SnapshotId", str)  # 32 lowercase hex characters, globally unique

DIGEST_SIZE = 16
READ_WRITE = "read-write"
READ_ONLY = "read-only"


def digest_of(data: bytes | memoryview) -> BlockId:
    return BlockId(xxhash.xxh3_128_digest(data))


class Kind(IntEnum):
    FILE = 1
    DIR = 2
    LINK = 3


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in a directory. `ref` is the concatenated block ids of a file, the tree id
    of a directory, or the target of a symlink (never followed)."""

    name: bytes
    kind: Kind
    mode: int
    mtime_ns: int
    size: int
    ref: bytes

    def blocks(self) -> list[BlockId]:
        r = self.ref
        return [BlockId(r[i : i + DIGEST_SIZE]) for i in range(0, len(r), DIGEST_SIZE)]


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
