"""The one walk over the objects of snapshot trees: trees, block lists and blocks.

Every caller that needs "the objects under these roots" (the transfer planner, prune's live
set, verify, restore's readability check) uses `objects_under`; a store that holds a tree or
list object holds everything under it, so `skip` prunes whole subtrees.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator

from ..errors import IntegrityError
from ..model import BlockId, Format, Kind
from .blocklist import FANOUT, Reader, content_objects, depth_of, split_ids
from .idarray import ObjectList, compact, first_occurrences
from .trees import decode_tree, empty_tree_id

TREE, LIST, BLOCK = "tree", "list", "block"


def objects_under(roots: Iterable[BlockId], fmt: Format, read: Reader,
                  skip: Callable[[BlockId], bool] = lambda _id: False,
                  on_error: Callable[[BlockId, IntegrityError], None] | None = None,
                  blocks_once: bool = True) -> Iterator[tuple[BlockId, int, str]]:
    """(id, length, kind) of every object under `roots`, each once, children before the
    object that names them. Objects for which `skip` is true are neither yielded nor opened.
    An unreadable tree or list raises, or with `on_error` is reported and passed over.
    Without `blocks_once`, a file block named in several places may come more than once
    (trees and lists still come once): the walk then remembers only the trees and lists it
    met, not every block, for a caller that gathers the ids compactly itself."""
    seen: set[BlockId] = set()
    empty = empty_tree_id(fmt.algo)
    roots = list(roots)
    tops = set(roots)

    def skipped(object_id: BlockId) -> bool:
        return object_id in seen or skip(object_id)

    for root in roots:
        stack: list[tuple[BlockId, bytes | None]] = [(root, None)]
        while stack:
            tree_id, data = stack.pop()
            if data is not None:  # second visit: everything below is out, now the tree
                yield tree_id, len(data), TREE
                continue
            if tree_id == empty or skipped(tree_id):
                continue
            seen.add(tree_id)
            try:
                data = read(tree_id)
                tree = decode_tree(data, tree_id, fmt, top=tree_id in tops)
            except IntegrityError as exc:
                if on_error is None:
                    raise
                on_error(tree_id, exc)
                continue
            stack.append((tree_id, data))
            for entry in tree.entries:
                if entry.kind is Kind.DIR:
                    stack.append((BlockId(entry.ref), None))
                elif entry.kind is Kind.FILE:
                    yield from _file_objects(entry.ref, entry.size, fmt, read, skipped, seen,
                                             on_error, blocks_once)


def _file_objects(ref, size, fmt, read, skipped, seen, on_error, blocks_once):
    try:
        for object_id, length, is_list in content_objects(ref, size, fmt, read, skipped):
            if not skipped(object_id):
                if is_list or blocks_once:
                    seen.add(object_id)
                yield object_id, length, LIST if is_list else BLOCK
    except IntegrityError as exc:
        if on_error is None:
            raise
        on_error(getattr(exc, "object_id", BlockId(ref[: fmt.algo.size])), exc)


Batch = Callable[[list[BlockId]], list]
ASK = 8192  # ids per question to the receiver
READ = 1024  # trees and lists per read of the sender's objects (their bytes are held)
RUNS_LIMIT = 1 << 20  # bytes of block ids a level holds before it asks about them


def missing_under(roots: Iterable[BlockId], fmt: Format, read_many: Batch, has_many: Batch
                  ) -> tuple[ObjectList, int]:
    """The objects under `roots` a receiver lacks, each once: (objects, round trips). File
    blocks come first, then the lists and trees, each after everything under it (so a
    receiver that stops half way never holds a parent without its children). The walk
    goes a level at a time, so `has_many` (the receiver) and `read_many` (the sender's
    trees and lists) are asked once per level in big batches, never once per object. An
    object the receiver holds is not opened: a store that holds a tree or list holds
    everything under it, so the cost follows what changed, not the volume's size. Blocks
    are kept end to end in one buffer (idarray.py), not as a Python object each."""
    roots = list(dict.fromkeys(roots))
    tops = set(roots)
    empty = empty_tree_id(fmt.algo)
    nodes: dict[BlockId, tuple[int, str, list[BlockId]]] = {}  # the trees and lists to send
    seen: set[BlockId] = set()  # trees and lists met (few: a list names FANOUT blocks)
    blocks = _Blocks(fmt)
    level: list[tuple] = [(TREE, r) for r in roots]
    runs: list[tuple[bytes, int, int]] = []  # blocks met, as runs of a file's ids
    trips = pending = 0  # pending: the bytes of block ids in `runs`
    while level or runs:
        fresh = []
        for item in level:
            if item[1] not in seen and item[1] != empty and item[1] != fmt.algo.hole:
                seen.add(item[1])
                fresh.append(item)
        held = blocks.ask([item[1] for item in fresh], runs, has_many, seen)
        need = [item for item, have in zip(fresh, held, strict=True) if not have]
        trips += 2
        level, runs, pending = [], [], 0
        for start in range(0, len(need), READ):  # a batch of reads at a time
            chunk = need[start : start + READ]
            raws = _batched(read_many, [item[1] for item in chunk], READ)
            for i, (kind, object_id, *where) in enumerate(chunk):
                raw, raws[i] = raws[i], b""  # each read's bytes go once it is decoded
                runs_before = len(runs)
                children = (_tree_children(raw, object_id, fmt, object_id in tops, runs)
                            if kind == TREE
                            else _list_children(raw, object_id, where[0], fmt, runs))
                nodes[object_id] = (len(raw), kind, [c[1] for c in children])
                level.extend(children)
                pending += sum(len(run[0]) for run in runs[runs_before:])
                if pending > RUNS_LIMIT:  # a wide level: ask about its blocks now
                    blocks.ask([], runs, has_many, seen)
                    runs, pending = [], 0
    return blocks.then(_children_first(roots, nodes)), trips


class _Blocks:
    """The missing blocks met so far, end to end, with their lengths; `then` drops the
    second copies (one sort of the buffer) and appends the lists and trees."""

    def __init__(self, fmt: Format):
        self.fmt, self.size, self.hole = fmt, fmt.algo.size, fmt.algo.hole
        self.ids, self.lengths = bytearray(), array("I")  # no object reaches 4 GiB

    def ask(self, lead: list[BlockId], runs: list[tuple[bytes, int, int]], has_many: Batch,
            trees: set[BlockId]) -> list[bool]:
        """Ask the receiver about `lead` (a level's trees and lists: their answers are
        returned) and the blocks of `runs`, in batches of ASK ids, the blocks after `lead`;
        keep the blocks it lacks. A block met twice in one batch is asked once; one whose
        bytes are a list or tree met already (a copy of a store) goes as that (a receiver
        stores an object once, should a later one come twice)."""
        answers: list[bool] = []
        batch: dict[BlockId, int] = dict.fromkeys(lead[:ASK], 0)
        for start in range(ASK, len(lead), ASK):  # more trees than a batch: they go alone
            answers += self._keep(batch, has_many, len(batch))
            batch = dict.fromkeys(lead[start : start + ASK], 0)
        firsts = len(batch)
        for raw, first, size in runs:
            for i, block_id in enumerate(split_ids(raw, self.size)):
                if block_id == self.hole or block_id in batch or block_id in trees:
                    continue
                batch[block_id] = self.fmt.block_length(first + i, size)
                if len(batch) >= ASK:
                    answers += self._keep(batch, has_many, firsts)
                    batch, firsts = {}, 0
        if batch:
            answers += self._keep(batch, has_many, firsts)
        return answers

    def _keep(self, batch: dict[BlockId, int], has_many: Batch, lead: int) -> list[bool]:
        """Ask about a batch whose first `lead` ids are trees or lists (their answers are
        returned); keep the blocks after them that the receiver lacks."""
        ids = list(batch)
        held = has_many(ids)
        if len(held) != len(ids):
            raise IntegrityError("peer answered a batch with the wrong number of items")
        for block_id, have in zip(ids[lead:], held[lead:], strict=True):
            if not have:
                self.ids += block_id
                self.lengths.append(batch[block_id])
        return list(held[:lead])

    def then(self, others: list[tuple[BlockId, int, str]]) -> ObjectList:
        """The blocks once each, then `others` (the lists and trees) in their order."""
        if len(self.lengths) > 1:
            compact(self.ids, self.size, first_occurrences(self.ids, self.size), self.lengths)
        count = len(self.lengths)
        for object_id, length, _ in others:
            if length >= 1 << 32:
                raise IntegrityError(f"object {object_id.hex()} is too large to send")
            self.ids += object_id
            self.lengths.append(length)
        return ObjectList(self.ids, self.lengths, self.size, count)


def _batched(ask: Batch, ids: list[BlockId], size: int = ASK) -> list:
    out: list = []
    for i in range(0, len(ids), size):
        answer = ask(ids[i : i + size])
        if len(answer) != len(ids[i : i + size]):
            raise IntegrityError("peer answered a batch with the wrong number of items")
        out.extend(answer)
    return out


def _tree_children(raw: bytes, tree_id: BlockId, fmt: Format, top: bool,
                   runs: list[tuple[bytes, int, int]]) -> list[tuple]:
    """The trees and lists a tree names; its files' blocks go to `runs`."""
    out: list[tuple] = []
    for entry in decode_tree(raw, tree_id, fmt, top=top).entries:
        if entry.kind is Kind.DIR:
            out.append((TREE, BlockId(entry.ref)))
        elif entry.kind is Kind.FILE:
            count = fmt.blocks_of(entry.size)
            depth = depth_of(count)
            if depth == 0:
                runs.append((entry.ref, 0, entry.size))
            else:
                out.append((LIST, BlockId(entry.ref), (depth, count, 0, entry.size)))
    return out


def _list_children(raw: bytes, list_id: BlockId, where: tuple, fmt: Format,
                   runs: list[tuple[bytes, int, int]]) -> list[tuple]:
    """The lists a list names; at depth 1 its blocks go to `runs`."""
    depth, count, first, size = where
    span = FANOUT ** (depth - 1)
    if fmt.algo.digest(raw) != list_id:
        raise IntegrityError(f"block list {list_id.hex()}: digest mismatch")
    if len(raw) != -(-count // span) * fmt.algo.size:
        raise IntegrityError(f"block list {list_id.hex()}: wrong length")
    if depth == 1:
        runs.append((raw, first, size))
        return []
    return [(LIST, child, (depth - 1, min(span, count - i * span), first + i * span, size))
            for i, child in enumerate(split_ids(raw, fmt.algo.size))]


def _children_first(roots: list[BlockId], nodes: dict) -> list[tuple[BlockId, int, str]]:
    """Post-order over the missing lists and trees: each only after everything under it.
    Each node leaves `nodes` when it is met, so one met again (a shared subtree) is not
    sent twice."""
    out: list[tuple[BlockId, int, str]] = []
    for root in roots:
        stack: list[tuple[BlockId, tuple | None]] = [(root, None)]
        while stack:
            object_id, expanded = stack.pop()
            if expanded is not None:  # everything under it is out: now the node itself
                out.append((object_id, expanded[0], expanded[1]))
                continue
            node = nodes.pop(object_id, None)
            if node is None:
                continue
            stack.append((object_id, node))
            stack.extend((child, None) for child in reversed(node[2]) if child in nodes)
    return out
