"""Pure planning for transfer and resync: the newest common snapshot, what leaves and joins
DST's lineage, and the set of objects DST lacks. The only input besides values is a tree
reader and DST's `has`, so the same function plans a dry run and the run itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import Diverged, NoCommonSnapshot
from .model import BlockId, Format, Snapshot, newest_common
from .store.walk import BLOCK, objects_under

TRANSFER, RESYNC = "transfer", "resync"


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
    objects: tuple[tuple[BlockId, int], ...]  # (id, length) in send order: children first
    blocks: int  # file blocks among the objects
    live_number: int | None  # number of the preserved snapshot of DST's live changes (resync)
    snapshot_src: bool  # SRC's live changes are captured as a new snapshot first
    baseline: bool  # DST is created as a new mirror

    @property
    def bytes(self) -> int:
        return sum(length for _, length in self.objects)

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


def missing_objects(read: Callable[[BlockId], bytes], dst_has: Callable[[BlockId], bool],
                    roots: list[BlockId], fmt: Format) -> tuple[list[tuple[BlockId, int]], int]:
    """Objects under `roots` that DST lacks, each once, children before the tree or list
    naming them. A tree or list DST already has is skipped whole: its subtree is complete
    there (stores commit an object only after everything under it). Returns (objects, count
    of file blocks)."""
    out: list[tuple[BlockId, int]] = []
    blocks = 0
    for object_id, length, kind in objects_under(roots, fmt, read, skip=dst_has):
        out.append((object_id, length))
        blocks += kind == BLOCK
    return out, blocks


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
