"""Tree objects (one per directory, git-style): the manifest format of a snapshot.

A tree is msgpack `["T1", [[name, kind, mode, mtime_ns, size, ref], ...]]` sorted by name and
stored in the pack store under its own xxh3-128 id, so an unchanged subtree is recognised by
comparing one id and a tree read back is checked by re-hashing it.
"""

from __future__ import annotations

from ..errors import IntegrityError
from ..model import DIGEST_SIZE, BlockId, Entry, Kind, digest_of
from .codec import pack, unpack

TREE_TAG = "T1"
EMPTY_TREE = pack([TREE_TAG, []])
EMPTY_TREE_ID = digest_of(EMPTY_TREE)


def encode_tree(entries: list[Entry]) -> bytes:
    return pack([TREE_TAG, [[e.name, int(e.kind), e.mode, e.mtime_ns, e.size, e.ref] for e in entries]])


def valid_name(name: object) -> bool:
    return (
        isinstance(name, bytes)
        and name not in (b"", b".", b"..")
        and b"/" not in name
        and b"\0" not in name
    )


def decode_tree(data: bytes, tree_id: BlockId | None = None) -> list[Entry]:
    """Decode and validate a tree; any malformed or unsafe content is an IntegrityError."""
    what = f"tree {tree_id.hex()}" if tree_id else "tree"
    if tree_id is not None and digest_of(data) != tree_id:
        raise IntegrityError(f"{what}: digest mismatch")
    obj = unpack(data, what)
    if not (isinstance(obj, list) and len(obj) == 2 and obj[0] == TREE_TAG):
        raise IntegrityError(f"{what}: not a tree")
    if not isinstance(obj[1], list):
        raise IntegrityError(f"{what}: malformed")
    entries = []
    previous = b""
    for raw in obj[1]:
        entry = _entry(raw, what)
        if entry.name <= previous:
            raise IntegrityError(f"{what}: names unsorted or repeated")
        previous = entry.name
        entries.append(entry)
    return entries


def _entry(raw: object, what: str) -> Entry:
    if not (isinstance(raw, list) and len(raw) == 6):
        raise IntegrityError(f"{what}: malformed entry")
    name, kind, mode, mtime_ns, size, ref = raw
    if not valid_name(name):
        raise IntegrityError(f"{what}: unsafe name {name!r}")
    ints_ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (kind, mode, mtime_ns, size))
    if not ints_ok or not isinstance(ref, bytes) or kind not in (1, 2, 3):
        raise IntegrityError(f"{what}: malformed entry {name!r}")
    if not (0 <= mode <= 0o7777 and size >= 0):
        raise IntegrityError(f"{what}: bad mode or size for {name!r}")
    kind = Kind(kind)
    if kind is Kind.FILE and len(ref) % DIGEST_SIZE:
        raise IntegrityError(f"{what}: bad block list for {name!r}")
    if kind is Kind.DIR and len(ref) != DIGEST_SIZE:
        raise IntegrityError(f"{what}: bad subtree id for {name!r}")
    if kind is Kind.LINK and (not ref or b"\0" in ref):
        raise IntegrityError(f"{what}: bad symlink target for {name!r}")
    return Entry(name, kind, mode, mtime_ns, size, ref)
