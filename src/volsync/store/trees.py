"""Tree objects (one per directory, git-style): the manifest format of a snapshot (format 2).

A tree is msgpack `["T2", [entry, ...], root]`, entries sorted by name, where an entry is
`[name, kind, mode, uid, gid, mtime_ns, size, ref, xattrs, link, rdev]` and `root` is null
or, for a snapshot's top directory only, `[mode, uid, gid, mtime_ns, xattrs]`: the volume
root's own metadata. It is stored under its own id, so an unchanged subtree is recognised by
comparing one id and a tree read back is checked by re-hashing it. Everything in a tree is
validated before use: names, paths, field types and sizes.
"""

from __future__ import annotations

from ..errors import IntegrityError
from ..model import BlockId, Entry, Format, HashAlgo, Kind, Tree
from .blocklist import check_ref
from .codec import pack, unpack

TREE_TAG = "T2"
META_NAME = b".volsync"
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 64 << 10
MAX_XATTRS = 1024
MAX_LINK_PATH = 64 << 10
INT64 = 1 << 63


def _xattrs(entry: Entry) -> list:
    return [[k, v] for k, v in entry.xattrs]


def encode_tree(tree: Tree) -> bytes:
    meta = tree.meta
    root = None if meta is None else [meta.mode, meta.uid, meta.gid, meta.mtime_ns, _xattrs(meta)]
    return pack([TREE_TAG, [[e.name, int(e.kind), e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.ref,
                             _xattrs(e), e.link, e.rdev] for e in tree.entries], root])


def empty_tree_id(algo: HashAlgo) -> BlockId:
    return BlockId(algo.digest(EMPTY_TREE))


EMPTY_TREE = encode_tree(Tree(()))


def valid_name(name: object) -> bool:
    return (
        isinstance(name, bytes)
        and name not in (b"", b".", b"..")
        and len(name) <= 4096
        and b"/" not in name
        and b"\0" not in name
    )


def valid_path(path: object) -> bool:
    """A relative path inside a volume: names joined by '/', none of them '.', '..' or empty."""
    return (isinstance(path, bytes) and 0 < len(path) <= MAX_LINK_PATH
            and all(valid_name(part) for part in path.split(b"/")))


def decode_tree(data: bytes, tree_id: BlockId | None, fmt: Format, top: bool = False) -> Tree:
    """Decode and validate a tree; any malformed or unsafe content is an IntegrityError.
    `top`: the tree is a snapshot's top directory, which may not name `.volsync`."""
    what = f"tree {tree_id.hex()}" if tree_id else "tree"
    algo = fmt.algo
    if tree_id is not None and algo.digest(data) != tree_id:
        raise IntegrityError(f"{what}: digest mismatch")
    obj = unpack(data, what)
    if not (isinstance(obj, list) and len(obj) == 3 and obj[0] == TREE_TAG
            and isinstance(obj[1], list)):
        raise IntegrityError(f"{what}: not a tree")
    entries = []
    previous = b""
    for raw in obj[1]:
        entry = _entry(raw, what, fmt)
        if entry.name <= previous:
            raise IntegrityError(f"{what}: names unsorted or repeated")
        previous = entry.name
        entries.append(entry)
    meta = None if obj[2] is None else _root_meta(obj[2], what)
    if (top or meta is not None) and any(e.name == META_NAME for e in entries):
        raise IntegrityError(f"{what}: a snapshot's top directory names {META_NAME!r}")
    return Tree(tuple(entries), meta)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _owner_ok(v: object) -> bool:
    return v is None or (_is_int(v) and 0 <= v < 1 << 32)


def _check_xattrs(raw: object, what: str) -> tuple[tuple[bytes, bytes], ...]:
    if not isinstance(raw, list) or len(raw) > MAX_XATTRS:
        raise IntegrityError(f"{what}: malformed extended attributes")
    out = []
    previous = b""
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], bytes)
                and isinstance(pair[1], bytes) and 0 < len(pair[0]) <= MAX_XATTR_NAME
                and b"\0" not in pair[0] and len(pair[1]) <= MAX_XATTR_VALUE
                and pair[0] > previous):
            raise IntegrityError(f"{what}: malformed extended attribute")
        previous = pair[0]
        out.append((pair[0], pair[1]))
    return tuple(out)


def _root_meta(raw: object, what: str) -> Entry:
    if not (isinstance(raw, list) and len(raw) == 5):
        raise IntegrityError(f"{what}: malformed root metadata")
    mode, uid, gid, mtime_ns, xattrs = raw
    if not (_is_int(mode) and 0 <= mode <= 0o7777 and _owner_ok(uid) and _owner_ok(gid)
            and _is_int(mtime_ns) and -INT64 <= mtime_ns < INT64):
        raise IntegrityError(f"{what}: malformed root metadata")
    return Entry(b"", Kind.DIR, mode, uid, gid, mtime_ns, 0, b"", _check_xattrs(xattrs, what))


def _entry(raw: object, what: str, fmt: Format) -> Entry:
    if not (isinstance(raw, list) and len(raw) == 11):
        raise IntegrityError(f"{what}: malformed entry")
    name, kind, mode, uid, gid, mtime_ns, size, ref, xattrs, link, rdev = raw
    if not valid_name(name):
        raise IntegrityError(f"{what}: unsafe name {name!r}")
    shown = f"{what}: {name!r}"
    if not (all(_is_int(v) for v in (kind, mode, mtime_ns, size, rdev))
            and isinstance(ref, bytes) and _owner_ok(uid) and _owner_ok(gid)
            and kind in iter(Kind) and 0 <= mode <= 0o7777 and 0 <= size < INT64
            and -INT64 <= mtime_ns < INT64 and 0 <= rdev < INT64):
        raise IntegrityError(f"{shown}: malformed entry")
    kind = Kind(kind)
    if link is not None and (kind is not Kind.FILE or not valid_path(link)):
        raise IntegrityError(f"{shown}: bad hard-link group")
    if kind is Kind.FILE:
        check_ref(ref, size, fmt, shown)
    elif kind is Kind.DIR:
        if len(ref) != fmt.algo.size or size:
            raise IntegrityError(f"{shown}: bad subtree id")
    elif kind is Kind.LINK:
        if not ref or b"\0" in ref or len(ref) > 4096:
            raise IntegrityError(f"{shown}: bad symlink target")
    elif ref or size:
        raise IntegrityError(f"{shown}: a special file with content")
    if rdev and kind not in (Kind.CHR, Kind.BLK):
        raise IntegrityError(f"{shown}: a device number on a non-device")
    return Entry(name, kind, mode, uid, gid, mtime_ns, size, ref, _check_xattrs(xattrs, shown),
                 link, rdev)
