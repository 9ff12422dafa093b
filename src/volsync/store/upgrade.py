"""`volsync upgrade`: convert a format-1 volume in place to format 2, crash-safe.

The conversion depends on snapshot content alone, so a source and its mirror converted on
their own get identical tree ids and keep their common snapshots (ids and numbers are kept):
every block is re-hashed with the new hash (a block of zeros becomes the hole id), block lists
are rebuilt by `build_ref`, trees are re-encoded as format-2 trees with what format 1 did not
record left unrecorded (uid/gid None, no xattrs, no hard-link group, no root metadata).

Steps, under the volume lock:
  1. stage: the complete format-2 metadata is built in `.volsync/upgrade/` (packs/,
     snapshots/, state, and config carrying "upgrade": "moving") and made durable. A crash
     here leaves a format-1 volume; a rerun resumes (sealed staged packs are kept).
  2. commit: `upgrade/config` is renamed over `.volsync/config`. From here on the volume is
     format 2 with a move to finish.
  3. move (`finish_move`, idempotent): packs, snapshots and state replace the old ones, the
     format-1 stat cache is dropped, config is rewritten without the "upgrade" key and
     `upgrade/` removed. `Volume()` runs it on open, so any command finishes an interrupted
     upgrade (and so does rerunning `upgrade`).
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import xxhash

from ..errors import BadArgument, IntegrityError, NotAVolume
from ..model import (
    DEFAULT_HASH,
    HASHES,
    BlockId,
    Entry,
    Format,
    Kind,
    Snapshot,
    SnapshotId,
    Tree,
    VolumeState,
)
from .blocklist import build_ref
from .codec import FORMAT_1, FORMAT_VERSION, envelope_version, open_sealed, pack, seal, unpack
from .crash import crashpoint
from .fsutil import atomic_write, fsync_dir, read_nofollow, remove_temps
from .lock import VolumeLock
from .packpool import PackPool, pack_error
from .packs import PackStore, parse_index
from .trees import decode_tree, empty_tree_id, encode_tree, valid_name
from .volume import (
    META,
    TMP_DIR,
    UPGRADE_DIR,
    _damage_or_io,
    _state_body,
    check_block_size,
    check_hash,
    is_create_leftover,
    snapshot_body,
    snapshot_from_body,
    valid_snapshot_id,
)

UPGRADE_KEY = "upgrade"  # in a format-2 config: the move of step 3 is not finished
MOVING = "moving"
FINISH_WAIT = 60.0  # how long opening a volume waits for the lock to finish a move

ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class UpgradeResult:
    path: str
    status: str  # "upgraded", "finished" (an interrupted upgrade's move), "already"
    hash: str
    snapshots: int = 0
    blocks: int = 0  # distinct format-1 blocks re-hashed
    holes: int = 0  # of those, blocks of zeros (now holes)
    trees: int = 0  # distinct format-1 trees converted


# --- the format-1 reader (self-contained: format 1 as docs/format.md version 1 describes) ----

V1_PACK_HEADER = b"VSPACK\x00\x01"
V1_RECORD = struct.Struct("<16sI")
V1_ID_SIZE = 16
V1_TREE_TAG = "T1"
V1_HASH = "xxh3-128"
V1_EMPTY_TREE_ID = xxhash.xxh3_128_digest(pack([V1_TREE_TAG, []]))


def _digest1(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


@dataclass(frozen=True, slots=True)
class V1Entry:
    name: bytes
    kind: Kind
    mode: int
    mtime_ns: int
    size: int
    ref: bytes


def _read_meta_file(path: Path, what: str) -> bytes:
    try:
        return read_nofollow(path)
    except OSError as exc:
        raise _damage_or_io(exc, what) from None


class V1Reader:
    """Reads a format-1 volume's metadata and objects, checking every object's xxh3-128."""

    def __init__(self, root: Path):
        self.root = root
        self.meta = root / META
        for sub in (self.meta / "packs", self.meta / "snapshots"):
            if sub.is_symlink() or not sub.is_dir():
                raise IntegrityError(f"{sub} is missing or not a real directory")
        cfg = self._sealed(self.meta / "config", "config")
        try:
            self.volume_id = cfg["volume_id"]
            self.block_size = cfg["block_size"]
            self.hash = cfg["hash"]
            self.created = float(cfg["created"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise IntegrityError(f"{root}: config is malformed") from None
        if not (isinstance(self.volume_id, str) and type(self.block_size) is int):
            raise IntegrityError(f"{root}: config is malformed")
        if self.hash != V1_HASH:
            raise IntegrityError(f"{root}: unsupported format-1 hash {self.hash!r}")
        try:
            check_block_size(self.block_size)
        except BadArgument as exc:
            raise IntegrityError(f"{root}: config: {exc}") from None
        self.state = self._state()
        self.index = self._index()
        self._pool = PackPool(self.meta / "packs")  # bounded, as a current store's
        self._headers_checked: set[str] = set()

    def _sealed(self, path: Path, kind: str):
        what = f"{self.root}: {path.relative_to(self.meta)}"
        return open_sealed(_read_meta_file(path, what), kind, what, version=FORMAT_1)

    def _state(self) -> VolumeState:
        body = self._sealed(self.meta / "state", "state")
        try:
            state = VolumeState(
                mode=body["mode"], upstream=body["upstream"], upstream_id=body["upstream_id"],
                lineage=tuple(body["lineage"]), preserved=tuple(body["preserved"]),
                journal=body["journal"], extra=body.get("extra") or {})
        except (KeyError, TypeError, AttributeError):
            raise IntegrityError(f"{self.root}: state is malformed") from None
        if not (state.mode in ("read-write", "read-only")
                and all(v is None or isinstance(v, str) for v in (state.upstream,
                                                                   state.upstream_id))
                and all(map(valid_snapshot_id, state.lineage + state.preserved))
                and (state.journal is None or isinstance(state.journal, dict))
                and isinstance(state.extra, dict)):
            raise IntegrityError(f"{self.root}: state is malformed")
        return state

    def _index(self) -> dict[bytes, tuple[str, int, int]]:
        """Every pack index; a damaged one is refused (the upgrade would lose its objects)."""
        index: dict[bytes, tuple[str, int, int]] = {}
        for idx in sorted((self.meta / "packs").glob("*.idx")):
            raw = _read_meta_file(idx, f"{self.root}: pack index {idx.name}")
            name, entries = parse_index(raw, idx, V1_ID_SIZE, FORMAT_1)
            for block_id, off, length in entries:
                index[block_id] = (name, off, length)
        return index

    def snapshot(self, snap_id: SnapshotId) -> Snapshot:
        body = self._sealed(self.meta / "snapshots" / snap_id, "snapshot")
        return snapshot_from_body(body, snap_id, V1_ID_SIZE)

    def get(self, object_id: bytes) -> bytes:
        """An object's bytes, its record header and xxh3-128 checked."""
        loc = self.index.get(object_id)
        if loc is None:
            raise IntegrityError(f"{self.root}: object {object_id.hex()} is missing")
        name, off, length = loc
        start = off - V1_RECORD.size
        if start < len(V1_PACK_HEADER):
            raise IntegrityError(f"{self.root}: object {object_id.hex()}: bad offset")
        raw = self._read(name, start, V1_RECORD.size + length)
        if len(raw) != V1_RECORD.size + length:
            raise IntegrityError(f"{self.root}: object {object_id.hex()}: pack {name} is truncated")
        if raw[: V1_RECORD.size] != V1_RECORD.pack(object_id, length):
            raise IntegrityError(f"{self.root}: object {object_id.hex()}: record header in "
                                 f"pack {name} is corrupt")
        data = raw[V1_RECORD.size :]
        if _digest1(data) != object_id:
            raise IntegrityError(f"{self.root}: object {object_id.hex()} failed its digest check")
        return data

    def _read(self, name: str, offset: int, length: int) -> bytes:
        """Bytes of a pack, its header checked the first time it is read."""
        try:
            with self._pool.use(name) as pack:
                header_ok = (name in self._headers_checked
                             or os.pread(pack.fd, len(V1_PACK_HEADER), 0) == V1_PACK_HEADER)
                data = os.pread(pack.fd, length, offset) if header_ok else None
        except OSError as exc:
            raise pack_error(exc, f"reading pack {name} of {self.root}",
                             f"{self.root}: pack {name}: {exc.strerror}") from None
        except IntegrityError as exc:  # the pool's: the pack is missing or unreadable
            raise IntegrityError(f"{self.root}: {exc}") from None
        if data is None:
            raise IntegrityError(f"{self.root}: pack {name}: bad header")
        self._headers_checked.add(name)
        return data

    def tree(self, tree_id: bytes) -> list[V1Entry]:
        if tree_id == V1_EMPTY_TREE_ID:
            return []
        what = f"{self.root}: tree {tree_id.hex()}"
        obj = unpack(self.get(tree_id), what)
        if not (isinstance(obj, list) and len(obj) == 2 and obj[0] == V1_TREE_TAG
                and isinstance(obj[1], list)):
            raise IntegrityError(f"{what}: not a format-1 tree")
        entries = []
        previous = b""
        for raw in obj[1]:
            if not (isinstance(raw, list) and len(raw) == 6):
                raise IntegrityError(f"{what}: malformed entry")
            name, kind, mode, mtime_ns, size, ref = raw
            if not valid_name(name):
                raise IntegrityError(f"{what}: unsafe name {name!r}")
            if name <= previous:
                raise IntegrityError(f"{what}: names unsorted or repeated")
            previous = name
            if not (all(type(v) is int for v in (kind, mode, mtime_ns, size))
                    and isinstance(ref, bytes) and kind in (1, 2, 3)
                    and 0 <= mode <= 0o7777 and size >= 0):
                raise IntegrityError(f"{what}: malformed entry {name!r}")
            kind = Kind(kind)
            if kind is Kind.FILE and len(ref) % V1_ID_SIZE:
                raise IntegrityError(f"{what}: bad block list for {name!r}")
            if kind is Kind.DIR and len(ref) != V1_ID_SIZE:
                raise IntegrityError(f"{what}: bad subtree id for {name!r}")
            if kind is Kind.LINK and (not ref or b"\0" in ref):
                raise IntegrityError(f"{what}: bad symlink target for {name!r}")
            entries.append(V1Entry(name, kind, mode, mtime_ns, size, ref))
        return entries

    def close(self) -> None:
        self._pool.close_all()


# --- conversion -------------------------------------------------------------------------------

class Converter:
    """Format-1 trees and blocks to format-2 objects in `packs`; memoized by format-1 id, so
    what several snapshots share is read and converted once."""

    def __init__(self, reader: V1Reader, fmt: Format, packs: PackStore,
                 progress: ProgressFn | None = None):
        self.reader = reader
        self.fmt = fmt
        self.packs = packs
        self.progress = progress
        self.empty_tree = empty_tree_id(fmt.algo)
        self.blocks: dict[bytes, tuple[BlockId, int]] = {}  # v1 id -> (v2 id or hole, length)
        self.trees: dict[bytes, BlockId] = {}  # v1 tree id -> v2 tree id
        self.holes = 0

    def tree(self, root: bytes) -> BlockId:
        """The format-2 id of a format-1 tree, converting everything under it (children
        first, iteratively: directory depth is not bounded by Python's recursion)."""
        loading: dict[bytes, list[V1Entry]] = {}  # in progress: an ancestor of the top
        stack = [root]
        while stack:
            tid = stack[-1]
            if tid in self.trees:
                stack.pop()
                continue
            entries = loading.get(tid)
            if entries is None:
                entries = loading[tid] = self.reader.tree(tid)
                children = [e.ref for e in entries
                            if e.kind is Kind.DIR and e.ref not in self.trees]
                if any(c in loading for c in children):
                    raise IntegrityError(f"{self.reader.root}: tree {tid.hex()} contains itself")
                if children:
                    stack.extend(reversed(children))
                    continue
            self.trees[tid] = self._put_tree(tid, entries)
            del loading[tid]
            stack.pop()
        return self.trees[root]

    def _put_tree(self, tid: bytes, entries: list[V1Entry]) -> BlockId:
        out = []
        for e in entries:
            if e.kind is Kind.FILE:
                ref = self._file_ref(e)
            elif e.kind is Kind.DIR:
                ref = self.trees[e.ref]
            else:
                ref = e.ref
            out.append(Entry(e.name, e.kind, e.mode, None, None, e.mtime_ns, e.size, ref,
                             (), None, 0))
        data = encode_tree(Tree(tuple(out), None))
        tree_id = BlockId(self.fmt.algo.digest(data))
        try:  # what format 2 would refuse to read is refused now, before anything changes
            decode_tree(data, tree_id, self.fmt)
        except IntegrityError as exc:
            raise IntegrityError(f"{self.reader.root}: format-1 tree {tid.hex()} cannot be "
                                 f"converted: {exc}") from None
        if tree_id != self.empty_tree:
            self.packs.put(tree_id, data)
        return tree_id

    def _file_ref(self, e: V1Entry) -> bytes:
        fmt = self.fmt
        old = [e.ref[i : i + V1_ID_SIZE] for i in range(0, len(e.ref), V1_ID_SIZE)]
        if len(old) != fmt.blocks_of(e.size):
            raise IntegrityError(f"{self.reader.root}: {e.name!r}: block list does not match "
                                 f"its size")
        ids = []
        for i, old_id in enumerate(old):
            known = self.blocks.get(old_id)
            if known is None:
                known = self.blocks[old_id] = self._block(old_id)
            if known[1] != fmt.block_length(i, e.size):
                raise IntegrityError(f"{self.reader.root}: {e.name!r}: block {i} has the "
                                     f"wrong length")
            ids.append(known[0])
        return build_ref(ids, fmt, self.packs.put)

    def _block(self, old_id: bytes) -> tuple[BlockId, int]:
        data = self.reader.get(old_id)
        if self.progress:
            self.progress(len(data))
        if data.count(0) == len(data):
            self.holes += 1
            return self.fmt.algo.hole, len(data)
        new_id = BlockId(self.fmt.algo.digest(data))
        self.packs.put(new_id, data)
        return new_id, len(data)


# --- the volume-level steps -------------------------------------------------------------------

def _config(meta: Path) -> tuple[int | None, dict | None]:
    """(envelope version, body) of a volume's config; body None unless it is format 2."""
    raw = _read_meta_file(meta / "config", f"{meta.parent}: config")
    version = envelope_version(raw)
    if version == FORMAT_VERSION:
        return version, open_sealed(raw, "config", f"{meta.parent}: config")
    return version, None


def _staged_config(up: Path) -> dict | None:
    try:
        return open_sealed(read_nofollow(up / "config"), "config", "staged config")
    except (OSError, IntegrityError):
        return None


def upgrade_volume(path: str | Path, hash_name: str | None = None, wait: float = 0.0,
                   progress: ProgressFn | None = None) -> UpgradeResult:
    """Convert the volume at `path` to format 2 (see the module docstring)."""
    root = Path(os.path.abspath(path))
    if not root.is_dir():
        raise NotAVolume(f"{path}: no such directory")
    meta = root / META
    if not os.path.lexists(meta):
        raise NotAVolume(f"{root} is not a volsync volume (run 'volsync init')")
    if is_create_leftover(root):
        raise NotAVolume(f"{root}: an interrupted 'volsync init' (run it again)")
    if meta.is_symlink() or not meta.is_dir():
        raise IntegrityError(f"{meta} is missing or not a real directory")
    if hash_name is not None:
        check_hash(hash_name)
    version, cfg = _config(meta)
    if version == FORMAT_VERSION and UPGRADE_KEY not in cfg \
            and not os.path.lexists(meta / UPGRADE_DIR):
        return UpgradeResult(str(root), "already", cfg.get("hash", ""))  # not even locked
    lock = VolumeLock(meta / "lock", str(root))
    lock.acquire(wait)
    try:
        version, cfg = _config(meta)
        if version == FORMAT_VERSION:
            if cfg.get(UPGRADE_KEY) == MOVING or os.path.lexists(meta / UPGRADE_DIR):
                finish_move(meta, cfg)
                return UpgradeResult(str(root), "finished", cfg.get("hash", ""))
            return UpgradeResult(str(root), "already", cfg.get("hash", ""))
        if version is None:
            raise IntegrityError(f"{root}: config is damaged or not a volsync config")
        if version != FORMAT_1:
            raise IntegrityError(f"{root}: config: unsupported format version {version!r}")
        try:
            result = _stage(root, hash_name, progress)
        except Exception:
            # refused (damage, a full disk): the volume is left as it was, format 1; only a
            # kill leaves the staging directory, for a rerun to resume
            if os.path.lexists(meta / UPGRADE_DIR):
                _remove(meta / UPGRADE_DIR)
                fsync_dir(meta)
            raise
        up = meta / UPGRADE_DIR
        os.rename(up / "config", meta / "config")  # the commit: the volume is format 2
        fsync_dir(meta)
        fsync_dir(up)
        crashpoint("upgrade-committed")
        finish_move(meta, _config(meta)[1])
        return result
    finally:
        lock.release()


def _stage(root: Path, hash_name: str | None, progress: ProgressFn | None) -> UpgradeResult:
    """Build the whole format-2 metadata in .volsync/upgrade/ and make it durable. A leftover
    of an interrupted run is resumed when it is for the same volume and hash (its sealed packs
    are kept: put() skips what they hold), else discarded."""
    meta = root / META
    up = meta / UPGRADE_DIR
    reader = V1Reader(root)
    try:
        staged = _staged_config(up) if up.is_dir() and not up.is_symlink() else None
        if hash_name is None:
            hash_name = staged["hash"] if staged and staged.get("hash") in HASHES \
                else DEFAULT_HASH
        config = {"format": FORMAT_VERSION, "volume_id": reader.volume_id,
                  "block_size": reader.block_size, "hash": hash_name,
                  "created": reader.created, UPGRADE_KEY: MOVING}
        if os.path.lexists(up) and staged != config:
            _remove(up)
        if not os.path.lexists(up):
            up.mkdir()
            fsync_dir(meta)
        algo = HASHES[hash_name]
        if staged == config and not _staged_packs_intact(up / "packs", algo):
            _remove(up / "packs")  # resumed only if every staged object checks out
        for sub in ("packs", "snapshots"):
            path = up / sub
            if os.path.lexists(path) and (sub == "snapshots" or path.is_symlink()
                                          or not path.is_dir()):
                _remove(path)  # records are rewritten from the current format-1 state
            path.mkdir(exist_ok=True)
            remove_temps(path)
        remove_temps(up)
        if staged != config:
            atomic_write(up / "config", seal("config", config))
        fmt = Format(algo, reader.block_size)
        packs = PackStore(up / "packs", algo)
        try:
            packs.adopt_orphans()  # records of a killed writer that match their ids
            conv = Converter(reader, fmt, packs, progress)
            state = reader.state
            ids = list(dict.fromkeys(state.lineage + state.preserved))
            records = []
            for snap_id in ids:
                snap = reader.snapshot(snap_id)
                records.append(replace(snap, root=conv.tree(snap.root)))
            packs.flush()
        finally:
            packs.close()
        for snap in records:
            atomic_write(up / "snapshots" / snap.id, seal("snapshot", snapshot_body(snap)),
                         sync_dir=False)
        atomic_write(up / "state", seal("state", _state_body(state)), sync_dir=False)
        fsync_dir(up / "snapshots")
        fsync_dir(up / "packs")
        fsync_dir(up)
        crashpoint("upgrade-staged")
        return UpgradeResult(str(root), "upgraded", hash_name, len(ids), len(conv.blocks),
                             conv.holes, len(conv.trees))
    finally:
        reader.close()


def _staged_packs_intact(directory: Path, algo) -> bool:
    """Every indexed object of an interrupted run's staged packs re-hashed: kept objects are
    never written again, so one damaged since would otherwise go into the new volume."""
    if directory.is_symlink() or not directory.is_dir():
        return False
    packs = PackStore(directory, algo)
    try:
        index = packs.load_indexes()
        if packs.bad_indexes:
            return False
        seen = set()
        for name in packs.pack_names():
            for block_id, off, data in packs.scan_pack(name):
                if algo.digest(data) != block_id:
                    return False
                seen.add((block_id, name, off))
        return all((block_id, name, off) in seen for block_id, (name, off, _) in index.items())
    except (IntegrityError, OSError):
        return False
    finally:
        packs.close()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def finish_move(meta: Path, config: dict) -> None:
    """Step 3, under the lock, idempotent: put the staged packs, snapshots and state in
    place of the format-1 ones, then drop the "upgrade" key and the staging directory."""
    up = meta / UPGRADE_DIR
    for name in ("packs", "snapshots", "state"):
        new, old = up / name, meta / name
        if not os.path.lexists(new):
            continue  # moved already
        if name != "state" and os.path.lexists(old):
            _remove(old)
            fsync_dir(meta)
            crashpoint("upgrade-old-removed")
        os.rename(new, old)
        fsync_dir(meta)
        fsync_dir(up)
        crashpoint("upgrade-moved")
    (meta / "statcache").unlink(missing_ok=True)  # format 1's: advisory, not converted
    if not (meta / TMP_DIR).is_dir():
        (meta / TMP_DIR).mkdir()
    fsync_dir(meta)
    if UPGRADE_KEY in config:
        final = {k: v for k, v in config.items() if k != UPGRADE_KEY}
        atomic_write(meta / "config", seal("config", final))
        crashpoint("upgrade-config-final")
    if os.path.lexists(up):
        _remove(up)
        fsync_dir(meta)


def finish_interrupted(root: Path) -> None:
    """Called by `Volume()` when `.volsync/upgrade/` exists: finish the move of an upgrade
    that committed (under the lock). Before the commit the volume is still format 1: nothing
    to do here (opening it then reports that it needs `volsync upgrade`)."""
    meta = root / META
    try:
        version, cfg = _config(meta)
    except (OSError, IntegrityError):
        return  # opening the volume reports it
    if version != FORMAT_VERSION:
        return
    lock = VolumeLock(meta / "lock", str(root))
    lock.acquire(FINISH_WAIT)
    try:
        version, cfg = _config(meta)  # another process may have finished it meanwhile
        if version == FORMAT_VERSION and (cfg.get(UPGRADE_KEY) == MOVING
                                           or os.path.lexists(meta / UPGRADE_DIR)):
            finish_move(meta, cfg)
    finally:
        lock.release()
