"""The one walk over the objects of snapshot trees: trees, block lists and blocks.

Every caller that needs "the objects under these roots" (the transfer planner, prune's live
set, verify, restore's readability check) uses `objects_under`; a store that holds a tree or
list object holds everything under it, so `skip` prunes whole subtrees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from ..errors import IntegrityError
from ..model import BlockId, Format, Kind
from .blocklist import FANOUT, Reader, content_objects, depth_of, split_ids
from .trees import decode_tree, empty_tree_id

TREE, LIST, BLOCK = "tree", "list", "block"


def objects_under(roots: Iterable[BlockId], fmt: Format, read: Reader,
                  skip: Callable[[BlockId], bool] = lambda _id: False,
                  on_error: Callable[[BlockId, IntegrityError], None] | None = None
                  ) -> Iterator[tuple[BlockId, int, str]]:
    """(id, length, kind) of every object under `roots`, each once, children before the
    object that names them. Objects for which `skip` is true are neither yielded nor opened.
    An unreadable tree or list raises, or with `on_error` is reported and passed over."""
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
                                             on_error)


def _file_objects(ref, size, fmt, read, skipped, seen, on_error):
    try:
        for object_id, length, is_list in content_objects(ref, size, fmt, read, skipped):
            if not skipped(object_id):
                seen.add(object_id)
                yield object_id, length, LIST if is_list else BLOCK
    except IntegrityError as exc:
        if on_error is None:
            raise
        on_error(getattr(exc, "object_id", BlockId(ref[: fmt.algo.size])), exc)


Batch = Callable[[list[BlockId]], list]


def missing_under(roots: Iterable[BlockId], fmt: Format, read_many: Batch, has_many: Batch
                  ) -> tuple[list[tuple[BlockId, int, str]], int]:
    """The objects under `roots` a receiver lacks, each once, children before the object
    naming them: ([(id, length, kind)], round trips). The walk goes a level at a time, so
    `has_many` (the receiver) and `read_many` (the sender's trees and lists) are asked once
    per level in big batches, never once per object. An object the receiver holds is not
    opened: a store that holds a tree or list holds everything under it, so the cost
    follows what changed, not the volume's size."""
    roots = list(dict.fromkeys(roots))
    tops = set(roots)
    empty, hole = empty_tree_id(fmt.algo), fmt.algo.hole
    nodes: dict[BlockId, int | tuple[int, str, list[BlockId]]] = {}  # a block: its length
    seen: set[BlockId] = set()
    level: list[tuple] = [(TREE, r) for r in roots]
    trips = 0
    while level:
        fresh = []
        for item in level:
            if item[1] not in seen and item[1] not in (empty, hole):
                seen.add(item[1])
                fresh.append(item)
        if not fresh:
            break
        held = _batched(has_many, [item[1] for item in fresh])
        need = [item for item, have in zip(fresh, held, strict=True) if not have]
        to_read = [item[1] for item in need if item[0] != BLOCK]
        data = dict(zip(to_read, _batched(read_many, to_read), strict=True))
        trips += 2
        level = []
        for item in need:
            kind, object_id = item[0], item[1]
            if kind == BLOCK:
                nodes[object_id] = item[2]  # no tuple, no list: most objects are blocks
                continue
            raw = data[object_id]
            children = (_tree_children(raw, object_id, fmt, object_id in tops) if kind == TREE
                        else _list_children(raw, object_id, item[2], fmt))
            nodes[object_id] = (len(raw), kind, [c[1] for c in children])
            level.extend(children)
    return _children_first(roots, nodes), trips


def _batched(ask: Batch, ids: list[BlockId], size: int = 8192) -> list:
    out: list = []
    for i in range(0, len(ids), size):
        answer = ask(ids[i : i + size])
        if len(answer) != len(ids[i : i + size]):
            raise IntegrityError("peer answered a batch with the wrong number of items")
        out.extend(answer)
    return out


def _tree_children(raw: bytes, tree_id: BlockId, fmt: Format, top: bool) -> list[tuple]:
    out: list[tuple] = []
    for entry in decode_tree(raw, tree_id, fmt, top=top).entries:
        if entry.kind is Kind.DIR:
            out.append((TREE, BlockId(entry.ref)))
        elif entry.kind is Kind.FILE:
            out.extend(_content_children(entry.ref, entry.size, fmt))
    return out


def _content_children(ref: bytes, size: int, fmt: Format) -> list[tuple]:
    count = fmt.blocks_of(size)
    depth = depth_of(count)
    if depth == 0:
        return [(BLOCK, block_id, fmt.block_length(i, size))
                for i, block_id in enumerate(split_ids(ref, fmt.algo.size))]
    return [(LIST, BlockId(ref), (depth, count, 0, size))]


def _list_children(raw: bytes, list_id: BlockId, where: tuple, fmt: Format) -> list[tuple]:
    depth, count, first, size = where
    span = FANOUT ** (depth - 1)
    if fmt.algo.digest(raw) != list_id:
        raise IntegrityError(f"block list {list_id.hex()}: digest mismatch")
    if len(raw) != -(-count // span) * fmt.algo.size:
        raise IntegrityError(f"block list {list_id.hex()}: wrong length")
    out: list[tuple] = []
    for i, child in enumerate(split_ids(raw, fmt.algo.size)):
        index = first + i * span
        if depth == 1:
            out.append((BLOCK, child, fmt.block_length(index, size)))
        else:
            out.append((LIST, child, (depth - 1, min(span, count - i * span), index, size)))
    return out


def _children_first(roots: list[BlockId], nodes: dict) -> list[tuple[BlockId, int, str]]:
    """Post-order over the missing objects: a tree or list only after everything under it,
    so a receiver that stops half way never holds a parent without its children. Each node
    leaves `nodes` when it is met, so one met again (a shared subtree) is not sent twice."""
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
            if type(node) is int:
                out.append((object_id, node, BLOCK))
                continue
            stack.append((object_id, node))
            stack.extend((child, None) for child in reversed(node[2]) if child in nodes)
    return out
