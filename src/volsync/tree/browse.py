"""Reading a snapshot by path: find one entry, list a subtree, stream a file's bytes, and
build the tree of a selection (restore --path). Only the tree objects along a path and under
what is asked for are read, and only the blocks of the files asked for."""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterator

from ..errors import BadArgument, IntegrityError
from ..model import BlockId, Entry, Kind, Tree
from ..quoting import quote_path
from .objects import Objects
from .scan import _join

KIND_NAMES = {Kind.FILE: "file", Kind.DIR: "dir", Kind.LINK: "symlink", Kind.FIFO: "fifo",
              Kind.CHR: "char", Kind.BLK: "block"}
KIND_WORDS = {Kind.FILE: "regular file", Kind.DIR: "directory", Kind.LINK: "symlink",
              Kind.FIFO: "fifo", Kind.CHR: "character device", Kind.BLK: "block device"}
ZERO_CHUNK = 1 << 20  # a hole is written out in pieces of this size


def parse_path(text: str) -> bytes:
    """A path inside a snapshot as given on the command line: relative to the snapshot's top,
    '.' and empty parts dropped (b"" is the top itself); '..', a leading '/' and NUL are
    refused."""
    raw = os.fsencode(text)
    if b"\0" in raw:
        raise BadArgument(f"bad path {quote_path(raw)}: it holds a NUL byte")
    if raw.startswith(b"/"):
        raise BadArgument(f"bad path {quote_path(raw)}: give it relative to the snapshot's top "
                          "(no leading '/')")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise BadArgument(f"bad path {quote_path(raw)}: '..' is not allowed")
    return b"/".join(parts)


def _child(tree: Tree, name: bytes) -> Entry | None:
    """The entry named `name` (entries are sorted by name)."""
    i = bisect_left(tree.entries, name, key=lambda e: e.name)
    return tree.entries[i] if i < len(tree.entries) and tree.entries[i].name == name else None


def top_entry(objects: Objects, root: BlockId) -> Entry:
    """The snapshot's top directory as an entry (its recorded metadata, its tree as ref)."""
    meta = objects.tree(root, top=True).meta
    if meta is None:  # converted from format 1: no metadata of the top was recorded
        meta = Entry(b"", Kind.DIR, 0o755, None, None, 0, 0, b"")
    return meta.with_(ref=bytes(root))


def lookup(objects: Objects, root: BlockId, path: bytes, where: str) -> Entry:
    """The entry `path` names in the tree at `root`, reading only the trees along the way
    (a symlink on the way is not followed); b"" names the top. A BadArgument names a path
    that is not in the snapshot."""
    entry = top_entry(objects, root)
    for name in path.split(b"/") if path else []:
        found = None
        if entry.kind is Kind.DIR:
            found = _child(objects.tree(BlockId(entry.ref)), name)
        if found is None:
            raise BadArgument(f"{where} has no {quote_path(path)}")
        entry = found
    return entry


def walk(objects: Objects, entry: Entry, path: bytes, recursive: bool = True
         ) -> Iterator[tuple[bytes, Entry]]:
    """(path, entry) of what is under a directory entry, depth first in name order (a
    directory before its content); a non-directory entry is itself."""
    if entry.kind is not Kind.DIR:
        yield path, entry
        return
    stack = [(path, iter(objects.tree(BlockId(entry.ref)).entries))]
    while stack:
        rel, entries = stack[-1]
        child = next(entries, None)
        if child is None:
            stack.pop()
            continue
        child_path = _join(rel, child.name)
        yield child_path, child
        if recursive and child.kind is Kind.DIR:
            stack.append((child_path, iter(objects.tree(BlockId(child.ref)).entries)))


def file_chunks(objects: Objects, entry: Entry) -> Iterator[bytes]:
    """A regular file's bytes in order, one block at a time, each block checked against its
    id (IntegrityError otherwise); holes come out as zeros without reading anything."""
    fmt = objects.fmt
    bs, hole = fmt.block_size, fmt.algo.hole
    for start, block_id, count in objects.runs(entry.ref, entry.size):
        if block_id == hole:
            left = min(entry.size, (start + count) * bs) - start * bs
            while left > 0:
                n = min(left, ZERO_CHUNK)
                yield bytes(n)
                left -= n
            continue
        data = objects.block(block_id)
        if len(data) != fmt.block_length(start, entry.size):
            raise IntegrityError(f"block {block_id.hex()}: {len(data)} bytes where the file "
                                 f"needs {fmt.block_length(start, entry.size)}")
        yield data


# --- a selection of paths (restore --path) ------------------------------------------------------

def _parts(path: bytes) -> list[bytes]:
    return path.split(b"/")


def outermost(paths: list[bytes]) -> list[bytes]:
    """The paths without repeats and without those inside another one, in walk order."""
    kept: list[bytes] = []
    for path in sorted(set(paths), key=_parts):
        if not any(_parts(path)[: len(_parts(k))] == _parts(k) for k in kept):
            kept.append(path)
    return kept


def select(objects: Objects, root: BlockId, paths: list[bytes], where: str) -> BlockId:
    """A tree holding only `paths` (each with everything under it) and the directories that
    lead to them, every entry with its recorded metadata; new trees go to `objects` (in
    memory when it does not write). A hard-link group that is only partly selected is tied
    to its first member inside the selection; a lone member becomes a plain file. Every path
    is found (or refused) before anything is built."""
    if b"" in paths:
        raise BadArgument("a path names the snapshot's top: leave the path out to take all")
    found = {path: lookup(objects, root, path, where) for path in paths}
    chosen = {path: found[path] for path in outermost(paths)}
    relink = _relinked_groups(objects, chosen)
    trie: dict = {}
    for path in chosen:
        *parents, name = _parts(path)
        node = trie
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = None  # everything under it
    top = objects.tree(root, top=True)
    return objects.put_tree(Tree(_pick(objects, top, b"", trie, relink), top.meta))


def _relinked_groups(objects: Objects, chosen: dict[bytes, Entry]
                     ) -> dict[bytes, bytes | None]:
    """For each hard-link group with members in the selection: its first member there (in
    walk order), or None when only one member is selected."""
    members: dict[bytes, list[bytes]] = {}
    for path, entry in chosen.items():
        for sub, e in walk(objects, entry, path):
            if e.kind is Kind.FILE and e.link is not None:
                members.setdefault(e.link, []).append(sub)
    return {link: min(found, key=_parts) if len(found) > 1 else None
            for link, found in members.items()}


def _pick(objects: Objects, tree: Tree, rel: bytes, trie: dict,
          relink: dict[bytes, bytes | None]) -> tuple[Entry, ...]:
    """The entries of `tree` the trie names: whole (None) or pruned further (a dict)."""
    out = []
    for entry in tree.entries:
        if entry.name not in trie:
            continue
        path, below = _join(rel, entry.name), trie[entry.name]
        if below is None:
            out.append(_relink(objects, entry, path, relink))
            continue
        sub = objects.tree(BlockId(entry.ref))
        out.append(entry.with_(ref=objects.put_tree(Tree(_pick(objects, sub, path, below,
                                                                relink)))))
    return tuple(out)


def _relink(objects: Objects, entry: Entry, path: bytes, relink: dict[bytes, bytes | None]
            ) -> Entry:
    """The entry with its hard-link groups tied inside the selection (a subtree is rebuilt
    only when something in it changes)."""
    if entry.kind is Kind.FILE and entry.link is not None:
        return entry.with_(link=relink[entry.link])
    if entry.kind is not Kind.DIR or all(k == v for k, v in relink.items()):
        return entry
    tree = objects.tree(BlockId(entry.ref))
    entries = tuple(_relink(objects, e, _join(path, e.name), relink) for e in tree.entries)
    if entries == tree.entries:
        return entry
    return entry.with_(ref=objects.put_tree(Tree(entries)))
