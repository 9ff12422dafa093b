"""Comparing trees: the paths that differ, by content or by any recorded metadata."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from ..model import BlockId, Entry, Kind
from .meta import PRIVILEGED
from .objects import Objects
from .scan import _join

# attributes only a privileged process reads or writes: not a difference for the others
PRIVILEGED_XATTRS = (b"trusted.", b"security.")


@dataclass(frozen=True)
class Change:
    status: str  # "added", "modified" or "deleted"
    path: str
    kind: Kind


def comparable(entry: Entry | None, unprivileged: bool) -> Entry | None:
    """The entry as a process without privileges can restore it: no ownership, no trusted. or
    security. attributes, no setuid/setgid bits, and no devices."""
    if entry is None or not unprivileged:
        return entry
    if entry.kind in (Kind.CHR, Kind.BLK):
        return None
    return entry.with_(uid=None, gid=None, mode=entry.mode & 0o1777,
                       xattrs=tuple(x for x in entry.xattrs
                                    if not x[0].startswith(PRIVILEGED_XATTRS)))


def entries_differ(x: Entry, y: Entry, inside_changed: bool = False) -> bool:
    """Any difference but a subtree's id (compared by walking it); None owners (not
    recorded by format 1) match any owner. A directory whose content changed has a new mtime
    for that reason alone: its mtime then counts only with the content (not as a change of its
    own), so adding a file shows the file, not its directory too."""
    if x.kind is Kind.DIR:
        x = x.with_(ref=y.ref)
        if inside_changed:
            x = x.with_(mtime_ns=y.mtime_ns)
    if x.uid is None or y.uid is None:
        x = x.with_(uid=y.uid, gid=y.gid)
    return x != y


def diff_trees(objects: Objects, a: BlockId | None, b: BlockId | None,
               rel: bytes = b"", unprivileged: bool = False) -> Iterator[Change]:
    """Paths that differ from tree a to tree b; equal subtrees are skipped by their id. With
    `unprivileged`, what such a process cannot restore is not a difference."""
    if a == b:
        return
    ta, tb = objects.tree(a, top=not rel), objects.tree(b, top=not rel)
    if not rel and ta.meta is not None and tb.meta is not None:
        ma, mb = comparable(ta.meta, unprivileged), comparable(tb.meta, unprivileged)
        if entries_differ(ma, mb, ta.entries != tb.entries):
            yield Change("modified", "/", Kind.DIR)
    old = {e.name: comparable(e, unprivileged) for e in ta.entries}
    new = {e.name: comparable(e, unprivileged) for e in tb.entries}
    for name in sorted(old.keys() | new.keys()):
        x, y = old.get(name), new.get(name)
        path = _join(rel, name)
        shown = os.fsdecode(path)
        if x is not None and y is not None and x.kind == y.kind:
            if x.kind is Kind.DIR:
                if entries_differ(x, y, x.ref != y.ref):
                    yield Change("modified", shown + "/", Kind.DIR)
                yield from diff_trees(objects, BlockId(x.ref), BlockId(y.ref), path,
                                      unprivileged)
            elif entries_differ(x, y):
                yield Change("modified", shown, y.kind)
            continue
        if x is not None:
            yield from _all(objects, x, path, "deleted")
        if y is not None:
            yield from _all(objects, y, path, "added")


def _all(objects: Objects, entry: Entry, path: bytes, status: str) -> Iterator[Change]:
    shown = os.fsdecode(path)
    if entry.kind is not Kind.DIR:
        yield Change(status, shown, entry.kind)
        return
    yield Change(status, shown + "/", Kind.DIR)
    for child in objects.tree(BlockId(entry.ref)).entries:
        yield from _all(objects, child, _join(path, child.name), status)


def live_differs(objects: Objects, snapshot_root: BlockId, live_root: BlockId) -> list[Change]:
    """How the live tree differs from a snapshot, as this process could have restored it."""
    if snapshot_root == live_root:
        return []
    return list(diff_trees(objects, snapshot_root, live_root, unprivileged=not PRIVILEGED))
