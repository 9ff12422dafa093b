"""Where a scan or a live-tree write reads and puts objects."""

from __future__ import annotations

from collections.abc import Container, Iterator

from ..model import BlockId, Tree
from ..store.blocklist import block_runs, build_ref
from ..store.trees import decode_tree, encode_tree
from ..store.volume import Volume


class Cancelled(Exception):
    """A concurrent step failed; this one stops where it is."""


class Objects:
    """Trees, block lists and blocks for a scan or a live-tree write. With `write` False (a
    check that must change nothing), new trees and lists live in memory and file blocks are
    hashed only. `source`, if given, is another volume read first (a transfer writes DST's
    live tree from SRC's store)."""

    def __init__(self, volume: Volume, write: bool = True, source: Volume | None = None,
                 checked_elsewhere: Container[BlockId] = frozenset()):
        self.volume = volume
        self.fmt = volume.fmt
        self.write = write
        self.overlay: dict[BlockId, bytes] = {}
        self.readers = (source.packs, volume.packs) if source else (volume.packs,)
        self.cancelled = False
        # blocks a concurrent step verifies (a failure there undoes this one): not re-hashed
        self.checked_elsewhere = checked_elsewhere

    def put_object(self, object_id: BlockId, data: bytes) -> None:
        if self.write:
            self.volume.packs.put(object_id, data)
        elif not self.volume.packs.has(object_id):
            self.overlay[object_id] = data

    def put_tree(self, tree: Tree) -> BlockId:
        data = encode_tree(tree)
        tree_id = BlockId(self.fmt.algo.digest(data))
        if tree_id != self.volume.empty_tree:
            self.put_object(tree_id, data)
        return tree_id

    def content_ref(self, ids: list[BlockId]) -> bytes:
        return build_ref(ids, self.fmt, self.put_object)

    def runs(self, ref: bytes, size: int) -> Iterator[tuple[int, BlockId, int]]:
        """A file's blocks as (first index, id, count) runs (holes in long runs)."""
        return block_runs(ref, size, self.fmt, self.raw)

    def tree(self, tree_id: BlockId | None, top: bool = False) -> Tree:
        """A tree, validated; `top`: a snapshot's top directory (no `.volsync` in it)."""
        if tree_id is None or tree_id == self.volume.empty_tree:
            return Tree(())
        return decode_tree(self.raw(tree_id), tree_id, self.fmt, top)

    def has(self, object_id: BlockId) -> bool:
        return (object_id == self.volume.empty_tree or object_id in self.overlay
                or any(packs.has(object_id) for packs in self.readers))

    def raw(self, object_id: BlockId) -> bytes:
        data = self.overlay.get(object_id)
        return data if data is not None else self._reader(object_id).get(object_id)

    def _reader(self, block_id: BlockId):
        for packs in self.readers:
            if packs.has(block_id):
                return packs
        return self.readers[-1]  # raises the missing-block IntegrityError

    def block(self, block_id: BlockId) -> bytes:
        """A block's bytes, checked against its id (IntegrityError otherwise)."""
        return self._reader(block_id).get(block_id, verify=True)

    def put_block(self, block_id: BlockId, data: bytes,
                  src: tuple[int, int] | None = None) -> None:
        """Store a file's block; `src` (fd, offset): a private copy of it (see PackStore.put)."""
        if self.write:
            self.volume.packs.put(block_id, data, src)

    def settle(self) -> None:
        """Copy what put_block deferred from a private source (before it is closed)."""
        if self.write:
            self.volume.packs.settle()

    def copy_blocks(self, block_ids: list[BlockId], fd: int, offset: int) -> int:
        """Write a file's consecutive blocks from `offset`, each verified as copy_block does;
        blocks lying one after another in a pack go by one kernel copy."""
        if self.cancelled:
            raise Cancelled()
        written, i = 0, 0
        while i < len(block_ids):  # the blocks each store has, in stretches
            reader = self._reader(block_ids[i])
            j = i + 1
            while j < len(block_ids) and self._reader(block_ids[j]) is reader:
                j += 1
            written += reader.copy_many_to(block_ids[i:j], fd, offset + written,
                                           self.checked_elsewhere)
            i = j
        return written

    def copy_block(self, block_id: BlockId, fd: int, offset: int | None) -> int:
        """Write a verified block into a file (at `offset`, or at its position)."""
        if self.cancelled:
            raise Cancelled()
        verify = block_id not in self.checked_elsewhere
        return self._reader(block_id).copy_to(block_id, fd, offset, verify)
