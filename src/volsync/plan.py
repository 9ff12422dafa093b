"""Pure planning for transfer and resync: the newest common snapshot, what leaves and joins
DST's lineage, and the set of objects DST lacks. The only input besides values is a tree
reader and DST's `has`, so the same function plans a dry run and the run itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import BadArgument, Diverged, NoCommonSnapshot, VolsyncError
from .model import (
    HASHES,
    JOURNAL_MATERIALIZE,
    READ_ONLY,
    READ_WRITE,
    BlockId,
    Format,
    Snapshot,
    newest_common,
)
from .store.idarray import ObjectList
from .store.walk import missing_under

TRANSFER, RESYNC = "transfer", "resync"


@dataclass(frozen=True)
class VolumeInfo:
    """What the engine knows of a volume before planning. `exists` False: a missing or empty
    directory, which a transfer creates as a new mirror."""

    address: str
    exists: bool
    volume_id: str | None = None
    hash: str | None = None
    block_size: int | None = None
    mode: str | None = None
    upstream: str | None = None
    upstream_id: str | None = None
    lineage: tuple[Snapshot, ...] = ()
    preserved: tuple[str, ...] = ()
    journal: str | None = None  # the op of a pending journal entry
    journal_peer: str | None = None
    parent_missing: bool = False  # not `exists`, and its parent directory is missing too

    @property
    def fmt(self) -> Format:
        return Format(HASHES[self.hash], self.block_size)

    @property
    def pending_write(self) -> bool:
        """An interrupted live-tree write of a mirror, which a transfer picks up."""
        return self.mode == READ_ONLY and self.journal == JOURNAL_MATERIALIZE


@dataclass(frozen=True)
class LiveFacts:
    """DST's live tree against its latest snapshot, as the planner needs it."""

    empty: bool  # no entries at all
    root_changed: bool  # its tree differs from the latest snapshot's, metadata included
    modified: bool  # it differs as status and verify see it (a mirror: as it was written)


def keeps_live(mode: str, has_lineage: bool, facts: LiveFacts) -> bool:
    """resync keeps DST's live tree as a preserved snapshot when it changed: any change on a
    read-write DST; on a mirror, a change beyond what volsync could not restore."""
    return has_lineage and facts.root_changed and (mode == READ_WRITE or facts.modified)


def check_compatible(src: VolumeInfo, dst: VolumeInfo) -> None:
    """Volumes that share snapshots name blocks by one hash and cut them at one size."""
    if not dst.exists:
        return
    if dst.hash != src.hash:
        raise BadArgument(f"SRC names blocks by {src.hash} and DST by {dst.hash}: "
                          "volumes that share snapshots must use the same hash")
    if dst.block_size != src.block_size:
        raise BadArgument("SRC and DST have different block sizes")


def check_parent(dst: VolumeInfo, mkpath: bool) -> None:
    """A new mirror's missing parent directories are created only on request (as rsync's
    --mkpath): a typo in a mount path must not fill the root filesystem."""
    if not dst.exists and dst.parent_missing and not mkpath:
        raise BadArgument(f"{dst.address}: its parent directory does not exist (a typo?); "
                          "pass --mkpath to create it")


def refusal(kind: str, src: VolumeInfo, src_lineage: list[Snapshot], dst: VolumeInfo,
            facts: LiveFacts | None) -> VolsyncError | None:
    """Every reason transfer or resync refuses, in the contract's order, as one typed error
    carrying its evidence (or None): no common snapshot with a non-empty DST (exit 4)
    first; then, for transfer, snapshots DST has after the common one, a read-write DST or a
    written-to DST (exit 5). A mirror's interrupted write (which transfer picks up) is
    volsync's own work in progress, not a modification."""
    if not dst.exists:
        return None
    try:
        plan_lineages(kind, src_lineage, list(dst.lineage))
    except (NoCommonSnapshot, Diverged) as exc:
        return exc
    related = dst.mode == READ_ONLY and dst.upstream_id == src.volume_id
    if not dst.lineage and facts is not None and not facts.empty and not related:
        return NoCommonSnapshot(f"{dst.address} is not empty and shares no snapshot with SRC")
    if kind != TRANSFER:
        return None
    if dst.mode == READ_WRITE:
        return Diverged(f"{dst.address} is read-write: transfer only updates mirrors; "
                        "diverged, use resync")
    if facts is not None and facts.modified and not dst.pending_write:
        return Diverged(f"{dst.address}: live tree was modified since its latest snapshot; "
                        "diverged, use resync")
    return None


@dataclass(frozen=True)
class LineagePlan:
    common: Snapshot | None
    add: tuple[Snapshot, ...]  # SRC's snapshots after the common one, oldest first
    remove: tuple[Snapshot, ...]  # DST's snapshots after the common one (they become preserved)


@dataclass(frozen=True)
class TransferPlan:
    kind: str
    lineages: LineagePlan
    src_lineage: tuple[Snapshot, ...]
    dst_lineage: tuple[Snapshot, ...]
    objects: ObjectList  # (id, length) in send order: blocks, then lists and trees
    blocks: int  # file blocks among the objects
    live_number: int | None  # number of the preserved snapshot of DST's live changes (resync)
    snapshot_src: bool  # SRC's live changes are captured as a new snapshot first
    baseline: bool  # DST is created as a new mirror

    @property
    def bytes(self) -> int:
        return self.objects.bytes

    @property
    def live_changed(self) -> bool:
        return self.live_number is not None

    @property
    def preserved_numbers(self) -> list[int]:
        """DST's snapshots leaving the lineage, then its preserved live changes."""
        live = [self.live_number] if self.live_number is not None else []
        return [s.number for s in self.lineages.remove] + live


def plan_lineages(kind: str, src: list[Snapshot], dst: list[Snapshot]) -> LineagePlan:
    """Compare lineages by id. transfer refuses divergence (exit 5); both refuse a non-empty
    DST with no common snapshot (exit 4, checked first)."""
    common = newest_common(src, dst)
    if common is None and dst:
        raise NoCommonSnapshot(
            f"no common snapshot: DST's {len(dst)} snapshot(s) share no id with SRC's lineage")
    src_after = tuple(src[_position(src, common) + 1 :]) if common else tuple(src)
    dst_after = tuple(dst[_position(dst, common) + 1 :]) if common else ()
    if kind == TRANSFER and dst_after:
        raise Diverged(
            f"diverged, use resync: DST has snapshot(s) {_nums(dst_after)} after the common "
            f"snapshot {common.number} that SRC lacks",
            common.number, tuple(s.number for s in src_after), tuple(s.number for s in dst_after))
    return LineagePlan(common, src_after, dst_after)


def _position(lineage: list[Snapshot], snap: Snapshot) -> int:
    """Where a snapshot (by id: each volume holds its own copy of the record) is."""
    return next(i for i, s in enumerate(lineage) if s.id == snap.id)


def _nums(snaps) -> str:
    return " ".join(str(s.number) for s in snaps)


def missing_objects(read_many: Callable[[list[BlockId]], list[bytes]],
                    has_many: Callable[[list[BlockId]], list[bool]],
                    roots: list[BlockId], fmt: Format) -> tuple[ObjectList, int]:
    """Objects under `roots` that DST lacks, each once: file blocks, then the trees and
    lists, each after everything it names. A tree or list DST already has is skipped
    whole: its subtree is complete there (stores commit an object only after everything
    under it). Both questions go in batches (git's have/want), so a peer over ssh costs a
    round trip per tree level. Returns (objects, count of file blocks)."""
    found, _ = missing_under(roots, fmt, read_many, has_many)
    return found, found.blocks


def lineage_picture(plan: TransferPlan, src_name: str, dst_name: str) -> str:
    """Both lineages side by side; DST's snapshots that SRC lacks are marked with a prime."""
    src_ids = {s.id for s in plan.src_lineage}
    width = max(len(src_name), len(dst_name), len("common")) + 1
    src_line = " ".join(str(s.number) for s in plan.src_lineage)
    dst_line = " ".join(f"{s.number}" + ("" if s.id in src_ids else "'") for s in plan.dst_lineage)
    common = plan.lineages.common.number if plan.lineages.common else "none"
    return "\n".join([f"{src_name + ':':{width}} {src_line or '(empty)'}",
                      f"{dst_name + ':':{width}} {dst_line or '(empty)'}",
                      f"{'common:':{width}} {common}"])

