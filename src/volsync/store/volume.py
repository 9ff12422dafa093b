"""A volume on disk: the live tree at `root` plus `root/.volsync/` holding the format config,
the state (mode, upstream, lineage, preserved, journal), snapshot records and packs."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadArgument, IntegrityError, NotAVolume
from ..model import (
    READ_ONLY,
    READ_WRITE,
    BlockId,
    Entry,
    Snapshot,
    SnapshotId,
    VolumeState,
    digest_of,
)
from .codec import open_sealed, seal
from .crash import crashpoint
from .fsutil import atomic_write, fsync_dir, read_nofollow, remove_temps
from .lock import VolumeLock, current_holder
from .packs import PackStore
from .trees import EMPTY_TREE, EMPTY_TREE_ID, decode_tree, encode_tree

META = ".volsync"
HASH_NAME = "xxh3-128"
MIN_BLOCK, MAX_BLOCK, DEFAULT_BLOCK = 4 << 10, 4 << 20, 64 << 10


@dataclass(frozen=True)
class VolumeConfig:
    volume_id: str
    block_size: int
    hash: str
    created: float


def check_block_size(size: int) -> int:
    if size < MIN_BLOCK or size > MAX_BLOCK or size & (size - 1):
        raise BadArgument(f"bad block size {size}: must be a power of two from 4K to 4M")
    return size


def is_volume(path: Path) -> bool:
    """A directory with volume metadata (complete or damaged: damage is verify's to report)."""
    return os.path.lexists(path / META)


def is_create_leftover(name: str) -> bool:
    """The temp metadata dir of a `Volume.create` that crashed before renaming it in."""
    return name.startswith(f"{META}.tmp-")


class Volume:
    """One opened volume. Reading needs no lock; every change happens under `locked()`."""

    def __init__(self, root: Path):
        self.root = root
        self.meta = root / META
        if not os.path.lexists(self.meta):
            raise NotAVolume(f"{root} is not a volsync volume (run 'volsync init')")
        for sub in (self.meta, self.meta / "packs", self.meta / "snapshots"):
            if sub.is_symlink() or not sub.is_dir():
                raise IntegrityError(f"{sub} is missing or not a real directory")
        try:
            raw = read_nofollow(self.meta / "config")
        except OSError as exc:
            raise _damage_or_io(exc, f"{root}: cannot read volume config") from None
        cfg = open_sealed(raw, "config", f"{root}: config")
        try:
            self.config = VolumeConfig(cfg["volume_id"], int(cfg["block_size"]), cfg["hash"],
                                       float(cfg["created"]))
        except (KeyError, TypeError, ValueError, OverflowError):
            raise IntegrityError(f"{root}: config is malformed") from None
        if not isinstance(self.config.volume_id, str) or isinstance(cfg["block_size"], bool):
            raise IntegrityError(f"{root}: config is malformed")
        if self.config.hash != HASH_NAME:
            raise IntegrityError(f"{root}: unsupported hash {self.config.hash!r}")
        try:
            check_block_size(self.config.block_size)
        except BadArgument as exc:
            raise IntegrityError(f"{root}: config: {exc}") from None
        self.packs = PackStore(self.meta / "packs")
        self._lock = VolumeLock(self.meta / "lock", str(root))
        self._snapshots: dict[SnapshotId, Snapshot] = {}

    # --- creation ----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> Volume:
        root = Path(os.path.abspath(path))
        if not root.is_dir():
            raise NotAVolume(f"{path}: no such directory")
        return cls(root)

    @classmethod
    def create(cls, path: str | Path, block_size: int = DEFAULT_BLOCK,
               state: VolumeState | None = None) -> Volume:
        """Make `path` a volume in place: metadata is built in a temp dir and renamed in."""
        root = Path(os.path.abspath(path))
        check_block_size(block_size)
        root.mkdir(parents=True, exist_ok=True)
        if (root / META).exists():
            raise BadArgument(f"{path} is already a volsync volume")
        for stale in root.iterdir():
            if is_create_leftover(stale.name) and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"{META}.tmp-{secrets.token_hex(4)}"
        try:
            (tmp / "packs").mkdir(parents=True)
            (tmp / "snapshots").mkdir()
            config = {"volume_id": secrets.token_hex(16), "block_size": block_size,
                      "hash": HASH_NAME, "created": time.time()}
            atomic_write(tmp / "config", seal("config", config))
            atomic_write(tmp / "state", seal("state", _state_body(state or VolumeState())))
            for sub in ("packs", "snapshots"):
                fsync_dir(tmp / sub)
            os.rename(tmp, root / META)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(root)
        return cls(root)

    # --- lock --------------------------------------------------------------------------------
    @contextmanager
    def locked(self, wait: float = 0.0) -> Iterator[Volume]:
        self._lock.acquire(wait)
        try:
            remove_temps(self.meta)
            remove_temps(self.meta / "snapshots")
            remove_temps(self.meta / "packs")
            self.packs.adopt_orphans()
            yield self
            self.packs.flush()
        finally:
            self.packs.discard()
            self._lock.release()

    def lock_holder(self) -> int | None:
        return current_holder(self.meta / "lock")

    # --- state -------------------------------------------------------------------------------
    def state(self) -> VolumeState:
        try:
            raw = read_nofollow(self.meta / "state")
        except OSError as exc:
            raise _damage_or_io(exc, f"{self.root}: cannot read volume state") from None
        body = open_sealed(raw, "state", f"{self.root}: state")
        try:
            state = VolumeState(
                mode=body["mode"], upstream=body["upstream"], upstream_id=body["upstream_id"],
                lineage=tuple(body["lineage"]), preserved=tuple(body["preserved"]),
                journal=body["journal"], extra=body.get("extra") or {},
            )
        except (KeyError, TypeError, AttributeError):
            raise IntegrityError(f"{self.root}: state is malformed") from None
        if not (state.mode in (READ_WRITE, READ_ONLY)
                and all(v is None or isinstance(v, str) for v in (state.upstream, state.upstream_id))
                and all(map(valid_snapshot_id, state.lineage + state.preserved))
                and (state.journal is None or isinstance(state.journal, dict))
                and isinstance(state.extra, dict)):
            raise IntegrityError(f"{self.root}: state is malformed")
        return state

    def commit(self, state: VolumeState) -> None:
        """The one atomic step that changes a volume's lineage, mode or journal."""
        assert state.mode in (READ_WRITE, READ_ONLY)
        # a preserved snapshot that is (back) in the lineage is no longer preserved, and none
        # is listed twice (else prune --preserved would drop a lineage snapshot)
        in_lineage = set(state.lineage)
        state = state.with_(preserved=tuple(dict.fromkeys(
            i for i in state.preserved if i not in in_lineage)))
        self.packs.flush()
        atomic_write(self.meta / "state", seal("state", _state_body(state)))
        crashpoint("state-committed")

    # --- snapshots ---------------------------------------------------------------------------
    def snapshot(self, snap_id: SnapshotId) -> Snapshot:
        snap = self._snapshots.get(snap_id)
        if snap is None:
            path = self.meta / "snapshots" / snap_id
            try:
                raw = read_nofollow(path)
            except FileNotFoundError:
                raise IntegrityError(f"{self.root}: snapshot record {snap_id} is missing") from None
            except OSError as exc:
                raise _damage_or_io(exc, f"{self.root}: snapshot record {snap_id} is unreadable"
                                    ) from None
            body = open_sealed(raw, "snapshot", f"snapshot {snap_id}")
            snap = snapshot_from_body(body, snap_id)
            self._snapshots[snap_id] = snap
        return snap

    def write_snapshot(self, snap: Snapshot) -> None:
        """Record a snapshot (durable); it joins a lineage only by a later `commit`."""
        self.packs.flush()
        atomic_write(self.meta / "snapshots" / snap.id, seal("snapshot", snapshot_body(snap)))
        crashpoint("snapshot-record-written")
        self._snapshots[snap.id] = snap

    def remove_snapshot_records(self, keep: set[SnapshotId]) -> int:
        removed = 0
        for path in (self.meta / "snapshots").iterdir():
            if path.name not in keep and not path.name.startswith("."):
                path.unlink()
                self._snapshots.pop(SnapshotId(path.name), None)
                removed += 1
        return removed

    def lineage(self, state: VolumeState | None = None) -> list[Snapshot]:
        return [self.snapshot(i) for i in (state or self.state()).lineage]

    def preserved(self, state: VolumeState | None = None) -> list[Snapshot]:
        return [self.snapshot(i) for i in (state or self.state()).preserved]

    # --- trees -------------------------------------------------------------------------------
    def tree(self, tree_id: BlockId) -> list[Entry]:
        if tree_id == EMPTY_TREE_ID:
            return []
        return decode_tree(self.packs.get(tree_id), tree_id)

    def put_tree(self, entries: list[Entry]) -> BlockId:
        data = encode_tree(entries) if entries else EMPTY_TREE
        tree_id = digest_of(data)
        self.packs.put(tree_id, data)
        return tree_id

    # --- stat cache (advisory: a lost or bad one only costs re-reading files) ---------------
    def load_statcache(self) -> dict:
        try:
            cache = open_sealed(read_nofollow(self.meta / "statcache"), "statcache", "statcache")
        except (OSError, IntegrityError):
            return {}
        # anything but the documented shape is no cache: {dir: [tree id, size, files, keys]}
        if not isinstance(cache, dict) or not all(
                isinstance(rel, bytes) and isinstance(v, list) and len(v) == 4
                and isinstance(v[0], bytes) and len(v[0]) == 16 and type(v[1]) is int
                and type(v[2]) is int and isinstance(v[3], dict) for rel, v in cache.items()):
            return {}
        return cache

    def save_statcache(self, cache: dict) -> None:
        atomic_write(self.meta / "statcache", seal("statcache", cache), sync_dir=False)


def _damage_or_io(exc: OSError, what: str) -> Exception:
    """A metadata file that is missing, a symlink or not a regular file is damage (exit 6);
    any other failure to read it (EIO, EMFILE, ...) is an I/O error (exit 1)."""
    if exc.errno in (errno.ENOENT, errno.ELOOP, errno.EINVAL, errno.EISDIR, errno.ENOTDIR):
        return IntegrityError(f"{what}: {exc.strerror}")
    return OSError(exc.errno, f"{what}: {exc.strerror}")


def _state_body(state: VolumeState) -> dict:
    return {
        "mode": state.mode, "upstream": state.upstream, "upstream_id": state.upstream_id,
        "lineage": list(state.lineage), "preserved": list(state.preserved),
        "journal": state.journal, "extra": state.extra,
    }


def snapshot_body(snap: Snapshot) -> dict:
    return {
        "id": snap.id, "number": snap.number, "created": snap.created, "label": snap.label,
        "root": snap.root, "size": snap.size, "files": snap.files, "origin": snap.origin,
    }


def valid_snapshot_id(snap_id: object) -> bool:
    """32 lowercase hex characters (ids name files under snapshots/)."""
    return (isinstance(snap_id, str) and len(snap_id) == 32
            and all(c in "0123456789abcdef" for c in snap_id))


def snapshot_from_body(body: dict, snap_id: str) -> Snapshot:
    try:
        snap = Snapshot(
            id=SnapshotId(body["id"]), number=int(body["number"]), created=float(body["created"]),
            label=body["label"], root=BlockId(body["root"]), size=int(body["size"]),
            files=int(body["files"]), origin=body["origin"],
        )
    except (KeyError, TypeError, ValueError, OverflowError):
        raise IntegrityError(f"snapshot {snap_id}: malformed record") from None
    if snap.id != snap_id or not isinstance(snap.root, bytes) or len(snap.root) != 16:
        raise IntegrityError(f"snapshot {snap_id}: record does not match its name")
    if not (isinstance(snap.label, str | None) and isinstance(snap.origin, str)):
        raise IntegrityError(f"snapshot {snap_id}: malformed record")
    return snap
