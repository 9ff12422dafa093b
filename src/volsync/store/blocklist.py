"""A file's content reference: its block ids, split into list objects when the file is big.

A file of n blocks (n = ceil(size / block_size)) refers to its content by:
- n <= DIRECT_MAX: the n block ids concatenated, inside the tree entry itself;
- otherwise: the id of the root of a tree of *list objects*, as ZFS's indirect blocks are. A
  list object is FANOUT ids or fewer concatenated (no header); at depth 1 they are block ids,
  at depth d > 1 ids of list objects of depth d - 1. The depth is the smallest d with
  FANOUT**d >= n, so it follows from the size alone, and every node's child count is fixed.

The hole id (all zero bytes) stands for a block of zeros, and for a list object whose blocks
are all zeros: nothing is stored, sent or written for it. A change of one block thus changes
one list object per level (a few KiB), not a list of every block of the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..errors import IntegrityError
from ..model import BlockId, Format

DIRECT_MAX = 32
FANOUT = 128

Reader = Callable[[BlockId], bytes]


def depth_of(count: int) -> int:
    """Levels of list objects for `count` blocks (0: ids held directly in the entry)."""
    if count <= DIRECT_MAX:
        return 0
    depth, span = 1, FANOUT
    while span < count:
        depth, span = depth + 1, span * FANOUT
    return depth


def check_ref(ref: bytes, size: int, fmt: Format, what: str) -> None:
    count = fmt.blocks_of(size)
    want = count * fmt.algo.size if depth_of(count) == 0 else fmt.algo.size
    if len(ref) != want:
        raise IntegrityError(f"{what}: bad block list")


def split_ids(data: bytes, size: int) -> list[BlockId]:
    return [BlockId(data[i : i + size]) for i in range(0, len(data), size)]


def build_ref(ids: list[BlockId], fmt: Format, put: Callable[[BlockId, bytes], object]) -> bytes:
    """The content reference of a file whose blocks are `ids` (holes as the hole id);
    list objects are handed to `put(id, data)`, children before their parents."""
    hole = fmt.algo.hole
    level = ids
    for _ in range(depth_of(len(ids))):
        parents = []
        for i in range(0, len(level), FANOUT):
            chunk = level[i : i + FANOUT]
            if all(c == hole for c in chunk):
                parents.append(hole)
                continue
            data = b"".join(chunk)
            list_id = BlockId(fmt.algo.digest(data))
            put(list_id, data)
            parents.append(list_id)
        level = parents
    return b"".join(level)


def _span(depth: int) -> int:
    return FANOUT ** (depth - 1)


def _children(node: BlockId, depth: int, count: int, fmt: Format, read: Reader
              ) -> list[tuple[BlockId, int]]:
    """(child id, blocks it covers) of a list object of `depth` covering `count` blocks."""
    try:
        data = read(node)
    except IntegrityError as exc:
        exc.object_id = node  # which object the walk could not read
        raise
    if fmt.algo.digest(data) != node:
        exc = IntegrityError(f"block list {node.hex()}: digest mismatch")
        exc.object_id = node
        raise exc
    span = _span(depth)
    want = -(-count // span)
    if len(data) != want * fmt.algo.size:
        raise IntegrityError(f"block list {node.hex()}: wrong length")
    return [(child, min(span, count - i * span))
            for i, child in enumerate(split_ids(data, fmt.algo.size))]


def block_runs(ref: bytes, size: int, fmt: Format, read: Reader
               ) -> Iterator[tuple[int, BlockId, int]]:
    """A file's blocks in order as (first index, id, count): a run of holes (a hole list
    covers many blocks) is one item, so a huge sparse file costs its data, not its size."""
    count = fmt.blocks_of(size)
    depth = depth_of(count)
    if depth == 0:
        for i, block_id in enumerate(split_ids(ref, fmt.algo.size)):
            yield i, block_id, 1
        return
    yield from _runs(BlockId(ref), depth, count, 0, fmt, read)


def _runs(node: BlockId, depth: int, count: int, first: int, fmt: Format, read: Reader
          ) -> Iterator[tuple[int, BlockId, int]]:
    if node == fmt.algo.hole:
        yield first, node, count
        return
    span = _span(depth)
    for i, (child, covered) in enumerate(_children(node, depth, count, fmt, read)):
        if depth == 1:
            yield first + i, child, 1
        else:
            yield from _runs(child, depth - 1, covered, first + i * span, fmt, read)


def block_ids(ref: bytes, size: int, fmt: Format, read: Reader) -> Iterator[BlockId]:
    """Every block id of a file in order, holes included as the hole id (for small files
    and tests; writers use `block_runs`)."""
    for _, block_id, count in block_runs(ref, size, fmt, read):
        for _ in range(count):
            yield block_id


def zip_runs(new: Iterator[tuple[int, BlockId, int]], old: Iterator[tuple[int, BlockId, int]]
             ) -> Iterator[tuple[int, int, BlockId, BlockId | None]]:
    """Walk two files' runs side by side: (first index, count, new id, old id or None past
    the old file's end), each piece as long as both ids stay the same."""
    old_run = next(old, None)
    for start, new_id, count in new:
        end = start + count
        while start < end:
            while old_run is not None and old_run[0] + old_run[2] <= start:
                old_run = next(old, None)
            if old_run is None or old_run[0] > start:
                yield start, end - start, new_id, None
                break
            piece = min(end, old_run[0] + old_run[2]) - start
            yield start, piece, new_id, old_run[1]
            start += piece


def content_objects(ref: bytes, size: int, fmt: Format, read: Reader,
                    skip: Callable[[BlockId], bool] = lambda _id: False
                    ) -> Iterator[tuple[BlockId, int, bool]]:
    """The stored objects behind a file, children before the list naming them:
    (id, length, is_list). Holes are not objects. A list object for which `skip` is true is
    not opened (a store that holds a list object holds everything under it)."""
    count = fmt.blocks_of(size)
    depth = depth_of(count)
    if depth == 0:
        for i, block_id in enumerate(split_ids(ref, fmt.algo.size)):
            if block_id != fmt.algo.hole:
                yield block_id, fmt.block_length(i, size), False
        return
    yield from _objects(BlockId(ref), depth, count, 0, size, fmt, read, skip)


def _objects(node, depth, count, first, size, fmt, read, skip):
    if node == fmt.algo.hole or skip(node):
        return
    span = _span(depth)
    for i, (child, covered) in enumerate(_children(node, depth, count, fmt, read)):
        index = first + i * span
        if depth == 1:
            if child != fmt.algo.hole:
                yield child, fmt.block_length(index, size), False
        else:
            yield from _objects(child, depth - 1, covered, index, size, fmt, read, skip)
    yield node, -(-count // span) * fmt.algo.size, True
