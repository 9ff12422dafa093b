"""Pure planning for transfer and resync: the newest common snapshot, what leaves and joins
DST's lineage, and the set of objects DST lacks. The only input besides values is a tree
reader and DST's `has`, so the same function plans a dry run and the run itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import Diverged, NoCommonSnapshot
from .model import BlockId, Kind, Snapshot, newest_common
from .store.trees import EMPTY_TREE_ID, decode_tree

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
    src_after = tuple(src[src.index(common) + 1 :]) if common else tuple(src)
    dst_after = tuple(dst[dst.index(common) + 1 :]) if common else ()
    if kind == TRANSFER and dst_after:
        raise Diverged(
            f"diverged, use resync: DST has snapshot(s) {_nums(dst_after)} after the common "
            f"snapshot {common.number} that SRC lacks",
            common.number, tuple(s.number for s in src_after), tuple(s.number for s in dst_after))
    return LineagePlan(common, src_after, dst_after)


def _nums(snaps) -> str:
    return " ".join(str(s.number) for s in snaps)


def missing_objects(read_tree: Callable[[BlockId], bytes], dst_has: Callable[[BlockId], bool],
                    roots: list[BlockId], block_size: int) -> tuple[list[tuple[BlockId, int]], int]:
    """Objects under `roots` that DST lacks, each once, children before the tree naming them.
    A tree DST already has is skipped whole: its subtree is complete there (stores commit a
    tree only after everything under it). Returns (objects, count of file blocks)."""
    out: list[tuple[BlockId, int]] = []
    planned: set[BlockId] = set()
    blocks = 0
    for root in roots:
        stack: list[tuple[BlockId, bytes | None]] = [(root, None)]
        while stack:
            tree_id, data = stack.pop()
            if data is not None:  # second visit: children are planned, now the tree itself
                out.append((tree_id, len(data)))
                continue
            if tree_id in planned or tree_id == EMPTY_TREE_ID or dst_has(tree_id):
                continue
            planned.add(tree_id)
            data = read_tree(tree_id)
            stack.append((tree_id, data))
            for entry in decode_tree(data, tree_id):
                if entry.kind is Kind.DIR:
                    stack.append((BlockId(entry.ref), None))
                elif entry.kind is Kind.FILE:
                    for block_id, length in _block_lengths(entry.blocks(), entry.size, block_size):
                        if block_id not in planned and not dst_has(block_id):
                            planned.add(block_id)
                            out.append((block_id, length))
                            blocks += 1
    return out, blocks


def _block_lengths(ids: list[BlockId], size: int, block_size: int):
    for i, block_id in enumerate(ids):
        yield block_id, min(block_size, size - i * block_size)


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
