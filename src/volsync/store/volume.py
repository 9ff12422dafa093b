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

from ..errors import BadArgument, FormatTooOld, IntegrityError, NotAVolume
from ..model import (
    DEFAULT_HASH,
    HASHES,
    READ_ONLY,
    READ_WRITE,
    BlockId,
    Format,
    Snapshot,
    SnapshotId,
    Tree,
    VolumeState,
)
from .codec import (
    FORMAT_VERSION,
    envelope_version,
    open_sealed,
    pack,
    seal,
    unpack,
    write_sealed_map,
)
from .crash import crashpoint
from .fsutil import (
    atomic_write,
    atomic_write_with,
    fsync_dir,
    map_nofollow,
    read_nofollow,
    remove_temps,
)
from .lock import VolumeLock, current_holder
from .packpool import describe
from .packs import PackStore
from .trees import decode_tree, empty_tree_id, encode_tree

META = ".volsync"
INIT_MARKER = "init-incomplete"  # present while `Volume.create` builds .volsync/
TMP_DIR = "tmp"  # temp files of live-tree writes: only volsync's own, cleared by the lock holder
UPGRADE_DIR = "upgrade"  # `volsync upgrade`'s staging area (store/upgrade.py)
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


def check_hash(name: str) -> str:
    if name not in HASHES:
        raise BadArgument(f"unknown hash {name!r}: use one of {', '.join(sorted(HASHES))}")
    return name


def is_volume(path: Path) -> bool:
    """A directory with volume metadata (complete or damaged: damage is verify's to report);
    the leftover of an interrupted `init` is not one."""
    return os.path.lexists(path / META) and not is_create_leftover(path)


def is_create_leftover(path: Path) -> bool:
    """`.volsync/` of a `Volume.create` that was interrupted before its commit: it holds the
    marker, or nothing at all (killed, or the power lost, between its mkdir and the marker's
    creation; an empty directory holds nothing to lose)."""
    meta = path / META
    if not meta.is_dir() or meta.is_symlink():
        return False
    try:
        return os.path.lexists(meta / INIT_MARKER) or not os.listdir(meta)
    except OSError:
        return False


class Volume:
    """One opened volume. Reading needs no lock; every change happens under `locked()`."""

    def __init__(self, root: Path):
        self.root = root
        self.meta = root / META
        if not os.path.lexists(self.meta):
            raise NotAVolume(f"{root} is not a volsync volume (run 'volsync init')")
        if is_create_leftover(root):
            raise NotAVolume(f"{root}: an interrupted 'volsync init' (run it again)")
        if os.path.lexists(self.meta / UPGRADE_DIR):  # an upgrade was interrupted: finish it
            from .upgrade import finish_interrupted  # here: upgrade.py imports this module

            finish_interrupted(root)
        for sub in (self.meta, self.meta / "packs", self.meta / "snapshots"):
            if sub.is_symlink() or not sub.is_dir():
                raise IntegrityError(f"{sub} is missing or not a real directory")
        self.config = self._read_config()
        self.fmt = Format(HASHES[self.config.hash], self.config.block_size)
        self.empty_tree = empty_tree_id(self.fmt.algo)
        self.packs = PackStore(self.meta / "packs", self.fmt.algo)
        self._lock = VolumeLock(self.meta / "lock", str(root))
        # held shared by whoever sends committed snapshots from the volume, exclusive by
        # whoever deletes objects (prune, destroy): snapshots and holds go on during a send
        self._readers = VolumeLock(self.meta / "readers", str(root), " (sending from it)")
        self._snapshots: dict[SnapshotId, Snapshot] = {}

    def _read_config(self) -> VolumeConfig:
        try:
            raw = read_nofollow(self.meta / "config")
        except OSError as exc:
            raise _damage_or_io(exc, f"{self.root}: cannot read volume config") from None
        version = envelope_version(raw)
        if version is not None and version < FORMAT_VERSION:
            raise FormatTooOld(f"{self.root} is a format-{version} volume; run "
                               f"'volsync upgrade {self.root}' to convert it")
        cfg = open_sealed(raw, "config", f"{self.root}: config")
        try:
            config = VolumeConfig(cfg["volume_id"], int(cfg["block_size"]), cfg["hash"],
                                  float(cfg["created"]))
        except (KeyError, TypeError, ValueError, OverflowError):
            raise IntegrityError(f"{self.root}: config is malformed") from None
        if not isinstance(config.volume_id, str) or isinstance(cfg["block_size"], bool):
            raise IntegrityError(f"{self.root}: config is malformed")
        if not isinstance(config.hash, str) or config.hash not in HASHES:
            raise IntegrityError(f"{self.root}: unsupported hash {config.hash!r}")
        try:
            check_block_size(config.block_size)
        except BadArgument as exc:
            raise IntegrityError(f"{self.root}: config: {exc}") from None
        return config

    # --- creation ----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> Volume:
        root = Path(os.path.abspath(path))
        if not root.is_dir():
            raise NotAVolume(f"{path}: no such directory")
        return cls(root)

    @classmethod
    def create(cls, path: str | Path, block_size: int = DEFAULT_BLOCK,
               state: VolumeState | None = None, hash_name: str = DEFAULT_HASH) -> Volume:
        """Make `path` a volume in place. `.volsync/` is built under a marker file whose
        removal is the commit: an interrupted create is finished by running it again."""
        root = Path(os.path.abspath(path))
        check_block_size(block_size)
        check_hash(hash_name)
        if not root.is_dir():
            root.mkdir(parents=True, exist_ok=True)
            fsync_dir(root.parent)
        meta = root / META
        if is_create_leftover(root):
            shutil.rmtree(meta)
        elif os.path.lexists(meta):
            raise BadArgument(f"{path} is already a volsync volume")
        meta.mkdir()
        marker = meta / INIT_MARKER
        marker.touch()
        fsync_dir(meta)
        fsync_dir(root)
        for sub in ("packs", "snapshots", TMP_DIR):
            (meta / sub).mkdir()
        config = {"format": FORMAT_VERSION, "volume_id": secrets.token_hex(16),
                  "block_size": block_size, "hash": hash_name, "created": time.time()}
        atomic_write(meta / "config", seal("config", config), sync_dir=False)
        atomic_write(meta / "state", seal("state", _state_body(state or VolumeState())),
                     sync_dir=False)
        for sub in ("packs", "snapshots", TMP_DIR):
            fsync_dir(meta / sub)
        fsync_dir(meta)
        crashpoint("volume-created")
        marker.unlink()
        fsync_dir(meta)
        return cls(root)

    # --- lock --------------------------------------------------------------------------------
    @contextmanager
    def locked(self, wait: float = 0.0) -> Iterator[Volume]:
        """The exclusive lock of a changing command; its temp leftovers are cleared first."""
        self._lock.acquire(wait)
        try:
            remove_temps(self.meta)
            remove_temps(self.meta / "snapshots")
            remove_temps(self.meta / "packs")
            self.clear_tmp()
            self.packs.adopt_orphans()
            yield self
            self.packs.flush()
            self.packs.maintain_index(if_read=True)
        finally:
            try:
                self.packs.discard()
            finally:
                self._lock.release()  # whatever discard raised, the lock is let go

    @contextmanager
    def shared(self, wait: float = 0.0) -> Iterator[Volume]:
        """A shared lock: no writer commits while it is held, so a reader (verify) sees one
        consistent state, pack set and live tree."""
        self._lock.acquire(wait, shared=True)
        try:
            yield self
        finally:
            self._lock.release()

    @contextmanager
    def reading(self, wait: float = 0.0) -> Iterator[Volume]:
        """Committed snapshots are being read (sent): nothing deletes objects meanwhile. Taken
        while `lock` is held, which may then be let go."""
        self._readers.acquire(wait, shared=True)
        try:
            yield self
        finally:
            self._readers.release()

    @contextmanager
    def deleting(self, wait: float = 0.0) -> Iterator[Volume]:
        """Objects are about to be deleted: no send may be reading them (inside `locked`)."""
        self._readers.acquire(wait)
        try:
            yield self
        finally:
            self._readers.release()

    @property
    def tmp(self) -> Path:
        return self.meta / TMP_DIR

    @contextmanager
    def tmp_fd(self) -> Iterator[int]:
        """A directory fd of .volsync/tmp/, where live-tree writes make their temp files."""
        fd = os.open(self.tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            yield fd
        finally:
            os.close(fd)

    def clear_tmp(self) -> None:
        """Remove what a crashed live-tree write left in .volsync/tmp/ (only ever volsync's)."""
        tmp = self.tmp
        if tmp.is_symlink():
            raise IntegrityError(f"{tmp} is a symlink, not a directory")
        if not tmp.is_dir():
            tmp.mkdir(exist_ok=True)
            fsync_dir(self.meta)
            return
        for entry in os.scandir(tmp):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)

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
        state = name_preserved(state.with_(preserved=tuple(dict.fromkeys(
            i for i in state.preserved if i not in in_lineage))))
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
            snap = snapshot_from_body(body, snap_id, self.fmt.algo.size)
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
    def tree(self, tree_id: BlockId) -> Tree:
        if tree_id == self.empty_tree:
            return Tree(())
        return decode_tree(self.packs.get(tree_id), tree_id, self.fmt)

    def put_tree(self, tree: Tree) -> BlockId:
        data = encode_tree(tree)
        tree_id = BlockId(self.fmt.algo.digest(data))
        if tree_id != self.empty_tree:
            self.packs.put(tree_id, data)
        return tree_id

    # --- stat cache (advisory: a lost or bad one only costs re-reading files) ---------------
    def load_statcache(self) -> dict:
        """{dir: [tree id, size, files, keys]}, each directory's keys still packed (bytes:
        see `packed_keys`; a cache written before they were packed holds dicts)."""
        try:
            cache = open_sealed(map_nofollow(self.meta / "statcache"), "statcache", "statcache")
        except (OSError, IntegrityError):
            return {}
        # anything but the documented shape is no cache
        if not isinstance(cache, dict) or not all(
                isinstance(rel, bytes) and isinstance(v, list) and len(v) == 4
                and isinstance(v[0], bytes) and len(v[0]) == self.fmt.algo.size
                and type(v[1]) is int
                and type(v[2]) is int and isinstance(v[3], bytes | dict)
                for rel, v in cache.items()):
            return {}
        return cache

    def save_statcache(self, cache: dict) -> None:
        """Written an entry at a time (see write_sealed_map): never a second, packed copy
        of the whole cache in memory."""
        items = ((rel, [v[0], v[1], v[2], packed_keys(v[3])]) for rel, v in cache.items())
        atomic_write_with(self.meta / "statcache",
                          lambda fd: write_sealed_map(fd, "statcache", len(cache), items),
                          sync_dir=False)


def packed_keys(keys: dict | bytes) -> bytes:
    """A directory's stat keys {name: key} as the stat cache keeps them: one msgpack value in
    name order, so equal keys pack to equal bytes (a scan compares them packed, and a cache
    of a million files is a thousand byte strings in memory, not a million lists)."""
    if isinstance(keys, bytes):
        return keys
    return pack(dict(sorted(keys.items())))


def unpacked_keys(keys: dict | bytes) -> dict:
    """A directory's stat keys as a dict (empty if its packed form is damaged)."""
    if isinstance(keys, dict):
        return keys
    try:
        value = unpack(keys, "statcache")
    except IntegrityError:
        return {}
    return value if isinstance(value, dict) else {}


PRESERVED_NAMES = "preserved_names"  # state.extra: {snapshot id: n}, shown and taken as pN
PRESERVED_NEXT = "preserved_next"  # state.extra: the next n (never reused while any is kept)


def name_preserved(state: VolumeState) -> VolumeState:
    """Give every preserved snapshot a stable name pN (in the order they were preserved) and
    forget the names of those no longer preserved."""
    names = state.extra.get(PRESERVED_NAMES) or {}
    names = {i: n for i, n in names.items() if i in state.preserved and isinstance(n, int)}
    nxt = max([state.extra.get(PRESERVED_NEXT) or 1, *(n + 1 for n in names.values())])
    if not state.preserved:
        nxt = 1
    for snap_id in state.preserved:
        if snap_id not in names:
            names[snap_id] = nxt
            nxt += 1
    extra = {k: v for k, v in state.extra.items() if k not in (PRESERVED_NAMES, PRESERVED_NEXT)}
    if state.preserved:
        extra |= {PRESERVED_NAMES: names, PRESERVED_NEXT: nxt}
    return state.with_(extra=extra)


def preserved_names(state: VolumeState) -> dict[str, str]:
    """Each preserved snapshot's id -> its name `pN` (one committed before names existed
    gets one at the next commit; meanwhile its place in the list stands in)."""
    names = name_preserved(state).extra.get(PRESERVED_NAMES) or {}
    return {i: f"p{n}" for i, n in names.items()}


def _damage_or_io(exc: OSError, what: str) -> Exception:
    """A metadata file that is missing, a symlink or not a regular file is damage (exit 6);
    any other failure to read it (EIO, EMFILE, ...) is an I/O error (exit 1)."""
    if exc.errno in (errno.ENOENT, errno.ELOOP, errno.EINVAL, errno.EISDIR, errno.ENOTDIR):
        return IntegrityError(f"{what}: {exc.strerror}")
    return OSError(exc.errno, f"{what}: {describe(exc)}")


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


def snapshot_from_body(body: dict, snap_id: str, id_size: int) -> Snapshot:
    try:
        snap = Snapshot(
            id=SnapshotId(body["id"]), number=int(body["number"]), created=float(body["created"]),
            label=body["label"], root=BlockId(body["root"]), size=int(body["size"]),
            files=int(body["files"]), origin=body["origin"],
        )
    except (KeyError, TypeError, ValueError, OverflowError):
        raise IntegrityError(f"snapshot {snap_id}: malformed record") from None
    if snap.id != snap_id or not isinstance(snap.root, bytes) or len(snap.root) != id_size:
        raise IntegrityError(f"snapshot {snap_id}: record does not match its name")
    if not (isinstance(snap.label, str | None) and isinstance(snap.origin, str)):
        raise IntegrityError(f"snapshot {snap_id}: malformed record")
    return snap
