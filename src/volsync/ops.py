"""Single-volume operations: snapshot, revert, restore, diff, status, verify, prune.

Every change follows one order: new data is made durable, then one atomic `commit` of the
state. A live-tree rewrite is announced in the state's journal first, so a crash leaves it for
`recover` (run by the next command that takes the lock) to finish.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadArgument, IntegrityError, VolsyncError
from .model import (
    DEFAULT_HASH,
    JOURNAL_MATERIALIZE,
    READ_ONLY,
    BlockId,
    Entry,
    FileWarning,
    Kind,
    Snapshot,
    SnapshotId,
    VolumeState,
    progress_step,
)
from .quoting import quote_path
from .store.blockindex import MIDX_NAME
from .store.blocklist import content_objects
from .store.fsutil import fsync_dir
from .store.idarray import PrefixSet
from .store.space import StoreSpace, filesystem_type, live_bytes, store_space
from .store.trees import META_NAME
from .store.volume import DEFAULT_BLOCK, Volume, preserved_names
from .store.walk import objects_under
from .tree import (
    KIND_WORDS,
    Change,
    Materializer,
    NotRestored,
    Objects,
    Progress,
    ScanResult,
    diff_trees,
    file_chunks,
    live_differs,
    lookup,
    parse_path,
    scan,
    select,
    walk,
)

# --- opening and locking ------------------------------------------------------------------------

@contextmanager
def writing(volume: Volume, wait: float = 0.0, resume: bool = False) -> Iterator[Volume]:
    """Hold the volume's lock, finishing first whatever a crashed run left in the journal.
    With `resume` an interrupted live-tree write of a mirror is left pending: the transfer
    about to run brings that live tree to its target anyway, keeping what was written."""
    with volume.locked(wait):
        if not (resume and resumable(volume.state())):
            recover(volume)
        yield volume


def resumable(state: VolumeState) -> bool:
    """A mirror whose live-tree write was interrupted: its live tree is volsync's own."""
    return (state.mode == READ_ONLY and bool(state.journal)
            and state.journal.get("op") == JOURNAL_MATERIALIZE)


def recover(volume: Volume) -> None:
    """Finish an interrupted live-tree step: the journal means "the live tree may be anywhere
    between two trees; bring it to the lineage's latest snapshot". Before a run's final commit
    that undoes the step; after it, it redoes it."""
    state = volume.state()
    if not state.journal or state.journal.get("op") != JOURNAL_MATERIALIZE:
        return  # other journal kinds belong to the mirroring layer, which finishes them
    bring_live_tree_to(volume, latest_root(volume, state))
    volume.commit(state.with_(journal=None))


def latest_root(volume: Volume, state: VolumeState) -> BlockId:
    return volume.snapshot(state.lineage[-1]).root if state.lineage else volume.empty_tree


def write_live_tree(volume: Volume, objects: Objects, live: ScanResult, target: BlockId,
                    progress: Progress | None = None) -> Materializer:
    """Bring the live tree (as `live` found it) to `target`, writing only what differs, with
    temp files in .volsync/tmp/; the stat cache is saved for what was written."""
    with volume.tmp_fd() as tmp_fd:
        m = Materializer(objects, volume.fmt, live.cache, tmp_fd, progress)
        cache = m.run(bytes(volume.root), live.root, target)
    volume.packs.flush()
    volume.save_statcache(cache)
    return m


def bring_live_tree_to(volume: Volume, target: BlockId, progress: Progress | None = None
                       ) -> Materializer:
    """Rewrite the live tree to `target`, touching only what differs."""
    live, objects = scan(volume, write=False)
    return write_live_tree(volume, objects, live, target, progress)


def init_volume(path: str, block_size: int = DEFAULT_BLOCK, hash_name: str = DEFAULT_HASH
                ) -> Volume:
    return Volume.create(path, block_size, hash_name=hash_name)


# --- resolving names ----------------------------------------------------------------------------

def resolve(volume: Volume, text: str, state: VolumeState | None = None) -> Snapshot:
    """SNAP: a lineage number or label, `latest`, a preserved snapshot's name `pN`, or any
    snapshot's id (unique prefix >= 8)."""
    state = state or volume.state()
    if text[:1] == "p" and text[1:].isdigit():
        by_name = {name: i for i, name in preserved_names(state).items()}
        if text not in by_name:
            raise BadArgument(f"no preserved snapshot {text} in {volume.root} "
                              "(see 'volsync snapshots --all')")
        return volume.snapshot(by_name[text])
    return resolve_in(volume.lineage(state), text, str(volume.root), state.preserved,
                      volume.snapshot)


def resolve_in(lineage: list[Snapshot], text: str, where: str, others: tuple = (),
               load=None) -> Snapshot:
    """SNAP among a lineage (a volume here or an endpoint's description of one); an id
    prefix may also name one of `others` (preserved ids), read by `load`."""
    if text == "latest":
        if not lineage:
            raise BadArgument(f"{where} has no snapshots yet")
        return lineage[-1]
    if text.isdigit():
        for snap in lineage:
            if snap.number == int(text):
                return snap
    labelled = [s for s in lineage if s.label == text]
    if len(labelled) == 1:
        return labelled[0]
    if len(labelled) > 1:
        raise BadArgument(f"label {text!r} names several snapshots; use a number or id")
    if len(text) >= 8 and all(c in "0123456789abcdef" for c in text.lower()):
        by_id = {s.id: s for s in lineage}
        found = list(dict.fromkeys(i for i in [*by_id, *others] if i.startswith(text.lower())))
        if len(found) == 1:
            return by_id.get(found[0]) or load(found[0])
        if len(found) > 1:
            raise BadArgument(f"id prefix {text!r} is ambiguous")
    raise BadArgument(f"no snapshot {text!r} in {where}")


# --- snapshot -----------------------------------------------------------------------------------

def new_snapshot_id() -> SnapshotId:
    return SnapshotId(secrets.token_hex(16))


def next_number(volume: Volume, state: VolumeState) -> int:
    return volume.snapshot(state.lineage[-1]).number + 1 if state.lineage else 1


def capture(volume: Volume, state: VolumeState, number: int, label: str | None,
            progress: Progress | None = None, strict: bool = True) -> tuple[Snapshot, ScanResult]:
    """Scan the live tree into the store and write (not yet commit) a snapshot record."""
    result, _ = scan(volume, write=True, progress=progress, strict=strict)
    return record_scan(volume, result, number, label), result


def record_scan(volume: Volume, result: ScanResult, number: int, label: str | None) -> Snapshot:
    """Write (not yet commit) a snapshot record of a scan made with write=True."""
    snap = Snapshot(new_snapshot_id(), number, time.time(), label, result.root, result.size,
                    result.files, volume.config.volume_id)
    volume.write_snapshot(snap)  # flushes packs first: data before metadata
    volume.save_statcache(result.cache)
    return snap


def take_snapshot(volume: Volume, label: str | None = None, wait: float = 0.0,
                  progress: Progress | None = None, strict: bool = True
                  ) -> tuple[Snapshot, list[str], list[FileWarning]]:
    """The next snapshot, the scan's notes (sockets skipped, ...) and its file warnings (see
    tree/scan.py: with `strict`, a busy or unreadable file is an error instead)."""
    with writing(volume, wait):
        state = volume.state()
        if state.mode == READ_ONLY:
            raise BadArgument(f"{volume.root} is a read-only mirror; only transfers change it")
        named = [s for s in volume.lineage(state) if label is not None and s.label == label]
        if named:
            raise BadArgument(f"label {label!r} already names snapshot {named[0].number}: a "
                              "label names one snapshot (choose another)")
        snap, result = capture(volume, state, next_number(volume, state), label, progress,
                               strict)
        volume.commit(state.with_(lineage=state.lineage + (snap.id,)))
        return snap, result.warnings, result.file_warnings


def live_changes(volume: Volume, state: VolumeState | None = None, trust_cache: bool = True,
                 progress: Progress | None = None) -> tuple[list[Change], BlockId]:
    """What differs between the latest snapshot and the live tree (hashing, storing nothing).
    A mirror's live tree is compared as this process could have written it."""
    changes, result = live_scan(volume, state or volume.state(), trust_cache, progress=progress)
    return changes, result.root


def live_scan(volume: Volume, state: VolumeState, trust_cache: bool = True, strict: bool = True,
              progress: Progress | None = None) -> tuple[list[Change], ScanResult]:
    """live_changes, with the whole scan result (its file warnings when not `strict`)."""
    result, objects = scan(volume, write=False, progress=progress, trust_cache=trust_cache,
                           strict=strict)
    latest = latest_root(volume, state)
    if state.mode == READ_ONLY:
        return live_differs(objects, latest, result.root), result
    return list(diff_trees(objects, latest, result.root)), result


# --- revert and restore -------------------------------------------------------------------------

@dataclass(frozen=True)
class RevertPlan:
    target: Snapshot
    preserve: tuple[Snapshot, ...]  # lineage snapshots after the target
    live_changed: bool
    revived: Snapshot | None = None  # reverting to a preserved snapshot: its new lineage copy


def plan_revert(volume: Volume, snap_name: str) -> RevertPlan:
    """Back to a lineage snapshot (later ones become preserved), or to a preserved one: it
    comes back as a new latest snapshot of the lineage, with its tree (the undo of a revert
    or of a resync that took a volume's own work out of its lineage)."""
    state = volume.state()
    target = resolve(volume, snap_name, state)
    changes, _ = live_changes(volume, state)
    if target.id in state.lineage:
        later = tuple(volume.lineage(state)[state.lineage.index(target.id) + 1 :])
        return RevertPlan(target, later, bool(changes))
    if state.mode == READ_ONLY:
        raise BadArgument(f"{volume.root} is a read-only mirror; bringing back a preserved "
                          "snapshot makes a new snapshot, which only a read-write volume "
                          "takes: run 'volsync break' on it first")
    number = next_number(volume, state)  # (kept live changes repeat it, as preserved ones do)
    name = preserved_names(state).get(target.id, target.id[:12])
    revived = Snapshot(new_snapshot_id(), number, time.time(), f"revert to {name}",
                       target.root, target.size, target.files, volume.config.volume_id)
    return RevertPlan(target, (), bool(changes), revived)


def revert(volume: Volume, snap_name: str, wait: float = 0.0, dry_run: bool = False,
           progress: Progress | None = None) -> tuple[RevertPlan, NotRestored]:
    with writing(volume, wait):
        plan = plan_revert(volume, snap_name)
        if dry_run:
            return plan, NotRestored()
        # every tree of the target is read (and validated) before anything changes: a bad
        # manifest must be refused now, not after the journal names it as the one to reach
        check_readable(volume, plan.target.root)
        state = volume.state()
        preserved = [s.id for s in plan.preserve]
        if plan.live_changed:
            what = plan.revived.label if plan.revived else f"revert to {plan.target.number}"
            live, _ = capture(volume, state, next_number(volume, state),
                              f"live changes before {what}", progress)
            preserved.append(live.id)
        if plan.revived:
            volume.write_snapshot(plan.revived)
            lineage = state.lineage + (plan.revived.id,)
        else:
            lineage = state.lineage[: state.lineage.index(plan.target.id) + 1]
        journal = {"op": JOURNAL_MATERIALIZE}
        state = state.with_(lineage=lineage, preserved=state.preserved + tuple(preserved),
                            journal=journal)
        try:
            volume.commit(state)
            written = bring_live_tree_to(volume, plan.target.root, progress)
            volume.commit(state.with_(journal=None))
        except BaseException:
            # if the new lineage is on disk, finish the live tree now should the error have
            # passed (else the journal stays, for the next command to finish)
            with suppress(Exception):
                recover(volume)
            raise
        return plan, written.skipped


def check_readable(volume: Volume, root: BlockId, objects: Objects | None = None) -> None:
    """Every tree and block list under root decodes (names and fields validated) and every
    block is stored; else an IntegrityError naming the first problem. `objects` may hold
    trees built in memory (a selection)."""
    objects = objects or Objects(volume, write=False)
    for object_id, _, _ in objects_under([root], volume.fmt, objects.raw):
        if not objects.has(object_id):
            raise IntegrityError(f"snapshot tree {root.hex()[:12]}: object "
                                 f"{object_id.hex()} is missing")


RESTORE_MARK = ".volsync-restore"  # inside restore's temp directory: proof that it is ours


def restore(volume: Volume, snap_name: str, dest: str, progress: Progress | None = None,
            paths: Sequence[str] = ()) -> tuple[Snapshot, NotRestored]:
    """Write a snapshot's content, or only `paths` in it (with the directories leading to
    them), to a new directory: built in a temp directory beside it, made durable, renamed
    into place, and the rename made durable. A selection reads only its own trees and
    blocks; a path not in the snapshot is refused before anything is written."""
    snap = resolve(volume, snap_name)
    wanted = [parse_path(p) for p in paths]
    target = Path(dest).absolute()
    if target.is_symlink() or (target.exists() and (not target.is_dir() or any(target.iterdir()))):
        raise BadArgument(f"{quote_path(dest)} exists and is not an empty directory")
    if not target.parent.is_dir():
        raise BadArgument(f"{quote_path(str(target.parent))}: no such directory")
    objects = Objects(volume, write=False)
    root = snap.root
    if wanted:
        root = select(objects, snap.root, wanted, f"snapshot {snap.number}")
    check_readable(volume, root, objects)
    _remove_restore_leftovers(target)
    tmp = target.with_name(f".{target.name}.volsync-restore-{secrets.token_hex(4)}")
    tmp.mkdir(0o700)
    try:
        (tmp / RESTORE_MARK).touch()
        fsync_dir(tmp)
        fsync_dir(tmp.parent)
        progress_step(progress, "write files", None if wanted else snap.size)
        m = Materializer(objects, volume.fmt, {}, None, progress)
        m.run(bytes(tmp), None, root)  # durable when it returns
        os.unlink(tmp / RESTORE_MARK)
        meta = objects.tree(root).meta
        if meta is not None:  # the unlink changed the directory's mtime
            os.utime(tmp, ns=(meta.mtime_ns, meta.mtime_ns))
        fsync_dir(tmp)
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return snap, m.skipped


def _remove_restore_leftovers(target: Path) -> None:
    """Temp directories of an interrupted restore to the same place (each holds its mark)."""
    prefix = f".{target.name}.volsync-restore-"
    for p in target.parent.iterdir():
        if (p.name.startswith(prefix) and len(p.name) == len(prefix) + 8 and not p.is_symlink()
                and p.is_dir() and (p / RESTORE_MARK).is_file()):
            shutil.rmtree(p, ignore_errors=True)


# --- reading a snapshot by path (ls, cat) -------------------------------------------------------

def list_snapshot(volume: Volume, snap_name: str, path_text: str | None, recursive: bool = True
                  ) -> tuple[Snapshot, Iterator[tuple[bytes, Entry]]]:
    """What is under a path of a snapshot (the top by default), as (path, entry) in walk
    order, read lazily; a path not in the snapshot is refused at once."""
    snap = resolve(volume, snap_name)
    objects = Objects(volume, write=False)
    path = parse_path(path_text or "")
    entry = lookup(objects, snap.root, path, f"snapshot {snap.number}")
    return snap, walk(objects, entry, path, recursive)


def file_content(volume: Volume, snap_name: str, path_text: str) -> Iterator[bytes]:
    """A regular file's bytes in a snapshot, block by block (holes as zeros); anything but a
    regular file is refused before a byte is read."""
    snap = resolve(volume, snap_name)
    objects = Objects(volume, write=False)
    path = parse_path(path_text)
    where = f"snapshot {snap.number}"
    if not path:
        raise BadArgument(f"the top of {where} is a directory, not a file")
    entry = lookup(objects, snap.root, path, where)
    if entry.kind is not Kind.FILE:
        raise BadArgument(f"{quote_path(path)} is a {KIND_WORDS[entry.kind]} in {where}, "
                          "not a regular file")
    return file_chunks(objects, entry)


# --- diff and status ----------------------------------------------------------------------------

def diff(volume: Volume, a: str | None, b: str | None) -> list[Change]:
    state = volume.state()
    objects = Objects(volume, write=False)
    if a is None:
        return live_changes(volume, state)[0]
    old = resolve(volume, a, state).root
    if b is None:
        live, objects = scan(volume, write=False)
        return list(diff_trees(objects, old, live.root))
    return list(diff_trees(objects, old, resolve(volume, b, state).root))


@dataclass(frozen=True)
class Status:
    mode: str
    upstream: str | None
    latest: Snapshot | None
    changed_paths: list[Change]
    lock_holder: int | None
    pending: str | None
    state: VolumeState
    warnings: tuple[FileWarning, ...] = ()  # files the live scan could not read as they are


def status(volume: Volume, strict: bool = True) -> Status:
    state = volume.state()
    lineage = volume.lineage(state)
    changes, live = live_scan(volume, state, strict=strict)
    return Status(state.mode, state.upstream, lineage[-1] if lineage else None, changes,
                  volume.lock_holder(), state.journal.get("op") if state.journal else None,
                  state, tuple(live.file_warnings))


# --- disk use (df) ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiskUse:
    """What a volume takes on disk: its live tree, its store (`.volsync/`) and how much of
    the store is in extents shared with other files (reflinks on btrfs or XFS)."""

    path: str
    live_bytes: int
    store: StoreSpace
    filesystem: str


def disk_use(volume: Volume) -> DiskUse:
    """Read the volume's disk use. Takes no lock (a reading of a moment, as `status`)."""
    return DiskUse(str(volume.root), live_bytes(volume.root), store_space(volume.meta),
                   filesystem_type(volume.root))


# --- verify -------------------------------------------------------------------------------------

@dataclass
class VerifyReport:
    blocks_checked: int = 0
    errors: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


VERIFY_THREADS = 2  # packs re-hashed at once by verify


def check_store(volume: Volume, report: VerifyReport, progress: Progress | None = None
                ) -> tuple[set[BlockId], set[str]]:
    """Re-hash every stored object, a pack at a time against its own index (memory bounded
    by a pack, not by the store). Returns the ids that are bad or unreadable and the packs
    that hold damage. Progress: the bytes of the pack files read, of their total."""
    bad: set[BlockId] = set()
    damaged: set[str] = set()
    packs = volume.packs
    _trusted_index(packs)
    unlocated: set[tuple[BlockId, str, int]] = set()
    sizes = {name: _file_size(packs.dir / f"{name}.pack") for name in packs.pack_names()}
    progress_step(progress, "check blocks", sum(sizes.values()))
    # two packs at a time: hashing releases the GIL (BLAKE3), so two cores hash side by side
    with ThreadPoolExecutor(VERIFY_THREADS) as pool:
        for check in pool.map(packs.verify_pack, sizes):
            name = check.name
            if check.index_problem is not None:
                report.errors.append(f"pack index {name}.idx: {check.index_problem}")
                damaged.add(name)
            for block_id in check.corrupt:
                bad.add(block_id)
                damaged.add(name)
                report.errors.append(f"pack {name}: block {block_id.hex()} is corrupt")
            report.blocks_checked += check.checked
            if check.damage is not None:
                damaged.add(name)
                report.errors.append(f"pack {name}: {check.damage}")
            unlocated.update((block_id, name, off) for block_id, off in check.unlocated)
            if progress:
                progress(sizes[name])
    for block_id, name, _ in sorted(unlocated):
        damaged.add(name)
        if block_id in bad:  # named corrupt already
            continue
        report.errors.append(f"block {block_id.hex()}: unreadable in pack {name}")
        if not _readable(packs, block_id, unlocated):
            bad.add(block_id)
    return bad, damaged


def _trusted_index(packs) -> None:
    """The index the rest of verify looks objects up in: the midx only once all of it
    checks out (then it is as good as the pack indexes it merges), else every pack index
    read into memory, and the midx left for the lock holder to rewrite."""
    problem = packs.check_midx() if (packs.dir / MIDX_NAME).exists() else None
    if problem is None:
        index = packs.index()
        if index.midx is not None:
            index.midx.verified = True
        return
    packs.load_indexes()
    packs.midx_problem = problem


def _readable(packs, block_id: BlockId, unlocated: set[tuple[BlockId, str, int]]) -> bool:
    """Whether the copy the index finds (another pack may hold one) is an intact record."""
    location = packs.index().get(block_id)
    if location is None or (block_id, *location[:2]) in unlocated:
        return False
    try:
        packs.get(block_id, verify=True)
    except (IntegrityError, OSError):
        return False
    return True


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def check_snapshots(volume: Volume, bad: set[BlockId], report: VerifyReport) -> None:
    """Walk every snapshot (lineage and preserved) and name each damaged path."""
    state = volume.state()
    memo: dict[BlockId, list[tuple[bytes, str]]] = {}
    for snap_id in state.lineage + state.preserved:
        try:
            snap = volume.snapshot(snap_id)
        except IntegrityError as exc:
            report.errors.append(f"snapshot {snap_id[:12]}: {exc}")
            continue
        where = f"snapshot {snap.number} ({snap.id[:12]})"
        with suppress(IntegrityError):  # (other damage is named by the walk below)
            if any(e.name == META_NAME for e in volume.tree(snap.root).entries):
                report.errors.append(f"{where}: its top directory names {META_NAME!r}")
        for sub, problem in _subtree_problems(volume, snap.root, bad, memo):
            report.errors.append(f"{where}: {quote_path(sub) if sub else '/'}: {problem}")


def _join_rel(rel: bytes, sub: bytes) -> bytes:
    return rel + b"/" + sub if rel and sub else rel or sub


def _subtree_problems(volume: Volume, tree_id: BlockId, bad: set[BlockId],
                      memo: dict[BlockId, list[tuple[bytes, str]]]) -> list[tuple[bytes, str]]:
    """Problems under one tree, each named by its path relative to the tree. The memo holds
    them per tree, so a subtree shared by several snapshots or paths is walked once yet named
    at each."""
    if tree_id in memo:
        return memo[tree_id]
    problems: list[tuple[bytes, str]] = []
    if tree_id in bad or (tree_id != volume.empty_tree and not volume.packs.has(tree_id)):
        memo[tree_id] = [(b"", "directory listing missing or corrupt")]
        return memo[tree_id]
    try:
        entries = volume.tree(tree_id).entries
    except IntegrityError as exc:
        memo[tree_id] = [(b"", str(exc))]
        return memo[tree_id]
    for entry in entries:
        if entry.kind is Kind.DIR:
            problems.extend((_join_rel(entry.name, sub), problem)
                            for sub, problem in _subtree_problems(volume, BlockId(entry.ref),
                                                                  bad, memo))
        elif entry.kind is Kind.FILE:
            problem = _file_problem(volume, entry, bad)
            if problem:
                problems.append((entry.name, problem))
    memo[tree_id] = problems
    return problems


def _file_problem(volume: Volume, entry, bad: set[BlockId]) -> str | None:
    """A file's blocks and block lists that are bad or missing, named for the file."""
    try:
        damaged = [oid for oid, _, _ in content_objects(entry.ref, entry.size, volume.fmt,
                                                        volume.packs.get)
                   if oid in bad or not volume.packs.has(oid)]
    except IntegrityError as exc:
        return f"block list missing or corrupt ({exc})"
    return f"{len(damaged)} block(s) or block list(s) missing or corrupt" if damaged else None


def verify(volume: Volume, repair_from=None, wait: float = 0.0,
           progress: Progress | None = None) -> VerifyReport:
    """Check under a shared lock (a writer never commits in the middle of a verify), or under
    the exclusive one when something is to be repaired or finished."""
    report = VerifyReport()
    if repair_from is not None or volume.state().journal:
        with writing(volume, wait):
            _verify(volume, report, repair_from, progress)
    else:
        with volume.shared(wait):
            _verify(volume, report, None, progress)
    return report


def _verify(volume: Volume, report: VerifyReport, repair_from,
            progress: Progress | None = None) -> None:
    bad, damaged = check_store(volume, report, progress)
    if repair_from is not None:
        repair_records(volume, repair_from, report)
    if repair_from is not None and (damaged or _missing(volume)):
        volume.packs.load_indexes()  # salvage finds a damaged pack's entries by its .idx
        volume.packs.salvage(damaged)
        repair(volume, repair_from, report)
        report.errors, report.blocks_checked = [], 0
        bad, damaged = check_store(volume, report, progress)
    check_snapshots(volume, bad, report)
    state = volume.state()
    if state.mode == READ_ONLY and state.lineage and not report.errors:
        # every live file is read again: damage that left its inode unchanged shows too
        progress_step(progress, "read live tree")
        changes, _ = live_changes(volume, state, trust_cache=False, progress=progress)
        for change in changes:
            report.errors.append(f"live tree: {quote_path(change.path)} {change.status} since "
                                 "the latest snapshot of this mirror")


def snapshot_roots(volume: Volume, state: VolumeState | None = None) -> list[BlockId]:
    """The root trees of the snapshots of `state` (default: the volume's) whose records
    read."""
    state = state or volume.state()
    roots = []
    for snap_id in state.lineage + state.preserved:
        try:
            roots.append(volume.snapshot(snap_id).root)
        except IntegrityError:
            continue
    return roots


def live_objects(volume: Volume, state: VolumeState | None = None) -> PrefixSet:
    """What prune keeps: every object the snapshots of `state` refer to, and the trees the
    stat cache may hand back without reading with everything under them; an unreadable tree
    or list included (what is below it is unknown until it is repaired). Kept compactly (8
    bytes an id, see PrefixSet): a dead object may be kept by chance, a live one never
    dropped."""
    cached = [BlockId(v[0]) for v in volume.load_statcache().values()]
    roots = snapshot_roots(volume, state) + [r for r in cached if volume.packs.has(r)]
    live = PrefixSet()
    for object_id in _ids_under(volume, roots, live.add):
        live.add(object_id)
    return live


def _ids_under(volume: Volume, roots: list[BlockId], unreadable: Callable[[BlockId], None]
               ) -> Iterator[BlockId]:
    """The id of every object under `roots` (a block named twice may come twice: nothing
    remembers every id); each tree or list that cannot be read goes to `unreadable`."""
    for object_id, _, _ in objects_under(roots, volume.fmt, volume.packs.get,
                                         on_error=lambda oid, _exc: unreadable(oid),
                                         blocks_once=False):
        yield object_id


def repair_records(volume: Volume, other, report: VerifyReport) -> None:
    """Replace missing or damaged snapshot records by the other volume's copy of the same
    record (records are immutable; the copy is checked as any record is)."""
    state = volume.state()
    for snap_id in dict.fromkeys(state.lineage + state.preserved):
        try:
            volume.snapshot(snap_id)
            continue
        except IntegrityError:
            pass
        try:
            snap = other.snapshot_record(snap_id)
            if snap.id != snap_id or len(snap.root) != volume.fmt.algo.size:
                raise IntegrityError(f"snapshot {snap_id}: wrong record")
        except (OSError, VolsyncError):
            report.notes.append(f"snapshot record {snap_id}: no good copy in {other.address}")
            continue
        volume.write_snapshot(snap)
        report.repaired.append(f"snapshot record {snap_id} copied from {other.address}")


def repair(volume: Volume, other, report: VerifyReport) -> None:
    """Fetch good copies of missing objects from a related volume (a `LocalEndpoint` or a
    remote one), each checked by digest. Missing trees come first, so each round may reveal
    blocks under newly fetched trees."""
    packs, digest = volume.packs, volume.fmt.algo.digest
    fixed: set[BlockId] = set()
    unfixable: set[BlockId] = set()
    while wanted := _missing(volume) - unfixable:
        got = _fetch(other, sorted(wanted))
        for block_id in wanted:
            data = got.get(block_id)
            if data is not None and digest(data) == block_id:
                packs.put(block_id, data)
                fixed.add(block_id)
            else:
                unfixable.add(block_id)
        packs.flush()
    report.repaired.extend(f"block {b.hex()} fetched from {other.address}" for b in sorted(fixed))
    report.notes.extend(f"block {b.hex()}: no good copy in {other.address}"
                        for b in sorted(unfixable))


def _fetch(other, ids: list[BlockId]) -> dict[BlockId, bytes]:
    """What the other volume can give of `ids`: asked in batches, then one by one where a
    batch failed (the other volume may lack or have damaged copies too)."""
    got: dict[BlockId, bytes] = {}
    for i in range(0, len(ids), 1024):
        chunk = ids[i : i + 1024]
        try:
            got.update((BlockId(k), v) for k, v in other.export(chunk))
            continue
        except (VolsyncError, KeyError, OSError):
            pass
        for block_id in chunk:
            with suppress(VolsyncError, KeyError, OSError):
                got.update((BlockId(k), v) for k, v in other.export([block_id]))
    return got


def _missing(volume: Volume) -> set[BlockId]:
    """Objects the snapshots refer to that the store lacks (an unreadable tree hides what is
    under it until it is fetched: repair calls this again after each round)."""
    has = volume.packs.has
    missing: set[BlockId] = set()
    for object_id in _ids_under(volume, snapshot_roots(volume), missing.add):
        if not has(object_id):
            missing.add(object_id)
    return {b for b in missing if not has(b)}


# --- what prune keeps (retention.py drops snapshots) ----------------------------------------

RECEIVED_PACKS = "received_packs"  # state.extra, written by a receiving endpoint
RECEIVE_GRACE = 7 * 86400.0  # how long prune spares what an interrupted transfer received


def received_packs(volume: Volume) -> set[str]:
    """Packs an interrupted transfer received, which no snapshot names yet: spared for
    RECEIVE_GRACE, so that the rerun resends nothing of them; the list is kept tidy."""
    state = volume.state()
    received = state.extra.get(RECEIVED_PACKS) or {}
    fresh = fresh_received(state)
    if fresh != received:
        extra = {k: v for k, v in state.extra.items() if k != RECEIVED_PACKS}
        volume.commit(state.with_(extra=extra | ({RECEIVED_PACKS: fresh} if fresh else {})))
    return set(fresh)


def fresh_received(state: VolumeState) -> dict[str, float]:
    """The packs received less than RECEIVE_GRACE ago (name -> time)."""
    received = state.extra.get(RECEIVED_PACKS) or {}
    now = time.time()
    return {n: t for n, t in received.items() if isinstance(t, float | int)
            and now - t < RECEIVE_GRACE}


# --- upgrade ------------------------------------------------------------------------------------

def upgrade(path: str, hash_name: str | None = None, wait: float = 0.0,
            progress: Progress | None = None):
    """Convert a volume of an older format in place to the current one, crash-safe (see
    store/upgrade.py); an interrupted upgrade is finished, a current volume left unchanged."""
    from .store.upgrade import upgrade_volume

    return upgrade_volume(path, hash_name, wait, progress)
