"""The one walk over the objects of snapshot trees: trees, block lists and blocks.

Every caller that needs "the objects under these roots" (the transfer planner, prune's live
set, verify, restore's readability check) uses `objects_under`; a store that holds a tree or
list object holds everything under it, so `skip` prunes whole subtrees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from ..errors import IntegrityError
from ..model import BlockId, Format, Kind
from .blocklist import Reader, content_objects
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
