"""Mirroring: transfer, break, resync and role-swap, each as plan then apply.

Apply order for transfer and resync: (1) SRC's live changes become a snapshot (read-write SRC
only); (2) DST's live changes become a preserved snapshot (resync); (3) the planned objects are
copied, each checked against its id, and made durable with the snapshot records; (4) one atomic
commit of DST's state adds SRC's snapshots, moves DST's own later ones to preserved, sets the
mode and a journal entry; (5) DST's live tree is brought to SRC's latest, writing only what
differs; (6) the journal entry is cleared. A crash before (4) leaves DST as it was; after it,
the next command finishes (5)."""

from __future__ import annotations

import os
import secrets
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadArgument, Diverged, NoCommonSnapshot
from .model import READ_ONLY, READ_WRITE, Snapshot, VolumeState
from .ops import (
    JOURNAL_MATERIALIZE,
    latest_root,
    new_snapshot_id,
    next_number,
    record_scan,
    recover,
    resumable,
    writing,
)
from .plan import RESYNC, TRANSFER, TransferPlan, missing_objects, plan_lineages
from .store.crash import crashpoint
from .store.fsutil import fsync_dir
from .store.volume import META, Volume, is_create_leftover, is_volume
from .tree import Materializer, NotRestored, Objects, Progress, ScanResult, live_differs, scan

JOURNAL_ROLE_SWAP = "role-swap"


@dataclass(frozen=True)
class SyncResult:
    plan: TransferPlan
    dry_run: bool
    src_snapshot: Snapshot | None  # taken by this run (or, dry run, the one it would take)
    live_preserved: Snapshot | None  # DST's live changes kept as a preserved snapshot
    not_restored: NotRestored = field(default_factory=NotRestored)  # what DST could not get


# --- opening DST ----------------------------------------------------------------------------

def _dst_is_new(path: Path) -> bool:
    """A missing or empty directory becomes a new mirror; a non-empty non-volume is refused."""
    if not path.exists():
        return True
    if not path.is_dir():
        raise BadArgument(f"{path} exists and is not a directory")
    if is_volume(path):
        return False
    leftover = is_create_leftover(path)
    if any(p.name != META or not leftover for p in path.iterdir()):
        raise NoCommonSnapshot(f"{path} is not empty and not a volume: no common snapshot")
    return True


def _create_mirror(path: Path, src: Volume) -> Volume:
    state = VolumeState(mode=READ_ONLY, upstream=str(src.root),
                        upstream_id=src.config.volume_id)
    return Volume.create(path, src.config.block_size, state, hash_name=src.config.hash)


def _refuse_same(a: Path, b: Path) -> None:
    """One volume named twice (also through a symlink or '..'), or one inside the other (a
    mirror inside its source would capture itself, one level deeper each run)."""
    if a == b or (a.exists() and b.exists() and os.path.samefile(a, b)):
        raise BadArgument("SRC and DST are the same volume")
    ra, rb = _real(a), _real(b)
    if rb.startswith(ra + os.sep) or ra.startswith(rb + os.sep):
        inner, outer = (b, a) if rb.startswith(ra + os.sep) else (a, b)
        raise BadArgument(f"{inner} is inside {outer}: a volume and its mirror cannot nest")


def _real(path: Path) -> str:
    """The real path of `path`, or of its nearest existing parent plus the rest."""
    rest: list[str] = []
    p = path
    while not p.exists() and p != p.parent:
        rest.insert(0, p.name)
        p = p.parent
    return os.path.join(os.path.realpath(p), *rest)


@contextmanager
def _locked_pair(a: Volume, b: Volume, wait: float, resume: Volume | None = None
                 ) -> Iterator[None]:
    """Lock two volumes in one fixed order (by path) so opposite runs cannot deadlock.
    `resume` names a mirror whose interrupted write the coming transfer picks up."""
    _refuse_same(a.root, b.root)
    with ExitStack() as stack:
        for vol in sorted((a, b), key=lambda v: str(v.root)):
            stack.enter_context(writing(vol, wait, resume=vol is resume))
        yield


# --- planning -------------------------------------------------------------------------------

def _src_snapshot_needed(src: Volume, no_snapshot: bool
                         ) -> tuple[bool, ScanResult | None, Objects | None]:
    state = src.state()
    if no_snapshot or state.mode != READ_WRITE or state.journal:
        return False, None, None
    result, objects = scan(src, write=False)
    latest = src.lineage(state)[-1].root if state.lineage else None
    return result.root != latest, result, objects


def check_compatible(src: Volume, dst: Volume) -> None:
    """Volumes that share snapshots name blocks by one hash and cut them at one size."""
    if dst.config.hash != src.config.hash:
        raise BadArgument(f"SRC names blocks by {src.config.hash} and DST by {dst.config.hash}: "
                          "volumes that share snapshots must use the same hash")
    if dst.config.block_size != src.config.block_size:
        raise BadArgument("SRC and DST have different block sizes")


def build_plan(kind: str, src: Volume, dst: Volume | None, *, src_objects: Objects,
               extra_src: Snapshot | None = None, live_number: int | None = None,
               baseline: bool = False) -> TransferPlan:
    """The one planner: dry runs pass SRC's would-be snapshot as `extra_src`."""
    src_lineage = src.lineage() + ([extra_src] if extra_src else [])
    if not src_lineage:
        raise BadArgument(f"{src.root} has no snapshots to send")
    dst_lineage = dst.lineage() if dst else []
    if dst is not None:
        check_compatible(src, dst)
    lineages = plan_lineages(kind, src_lineage, dst_lineage)
    has = dst.packs.has if dst else (lambda _id: False)
    objects, blocks = missing_objects(src_objects.raw, has, [s.root for s in lineages.add],
                                      src.fmt)
    return TransferPlan(kind, lineages, tuple(src_lineage), tuple(dst_lineage), tuple(objects),
                        blocks, live_number, extra_src is not None, baseline)


def _virtual_snapshot(src: Volume, result: ScanResult) -> Snapshot:
    state = src.state()
    return Snapshot(new_snapshot_id(), next_number(src, state), 0.0, None, result.root,
                    result.size, result.files, src.config.volume_id)


def _refuse_unrelated_files(dst: Volume, live: ScanResult, objects: Objects,
                            src: Volume | None = None) -> None:
    """A DST with no snapshots is filled from SRC only if its live tree is empty, or if it is
    a mirror of SRC whose baseline was interrupted (its files are volsync's own)."""
    state = dst.state()
    if (src is not None and state.mode == READ_ONLY and not state.lineage
            and state.upstream_id == src.config.volume_id):
        return
    if objects.tree(live.root).entries:
        raise NoCommonSnapshot(f"{dst.root} is not empty and shares no snapshot with SRC")


def _check_transfer_dst(src: Volume, src_lineage: list[Snapshot], dst: Volume,
                        pending: bool = False) -> tuple[ScanResult, Objects] | None:
    """Transfer's refusals, before anything changes, in the contract's order: no common
    snapshot with a non-empty DST (exit 4) first; then a read-write DST, a written-to DST
    or one with snapshots SRC lacks (exit 5). Returns the scan of DST's live tree. With
    `pending` (an interrupted live-tree write of this mirror, which the run picks up), the
    live tree is volsync's own work in progress: no modification to refuse."""
    state = dst.state()
    dst_lineage = dst.lineage(state)
    if dst_lineage:
        plan_lineages(TRANSFER, src_lineage, dst_lineage)
    if pending:
        if state.mode == READ_WRITE:
            raise Diverged(f"{dst.root} is read-write: transfer only updates mirrors; "
                           "diverged, use resync")
        return scan(dst, write=False)
    result, objects = scan(dst, write=False)
    if not dst_lineage:
        _refuse_unrelated_files(dst, result, objects, src)
    if state.mode == READ_WRITE:
        raise Diverged(f"{dst.root} is read-write: transfer only updates mirrors; "
                       "diverged, use resync")
    latest = latest_root(dst, state)
    # as status and verify see it: content and every piece of metadata, mtimes included
    if live_differs(objects, latest, result.root):
        raise Diverged(f"{dst.root}: live tree was modified since its latest snapshot; "
                       "diverged, use resync")
    return result, objects


# --- transfer and resync ----------------------------------------------------------------------

def transfer(src_path: str, dst_path: str, *, no_snapshot: bool = False, dry_run: bool = False,
             wait: float = 0.0, progress: Progress | None = None) -> SyncResult:
    return _sync(TRANSFER, src_path, dst_path, no_snapshot, dry_run, wait, progress)


def resync(src_path: str, dst_path: str, *, no_snapshot: bool = False, dry_run: bool = False,
           wait: float = 0.0, progress: Progress | None = None) -> SyncResult:
    return _sync(RESYNC, src_path, dst_path, no_snapshot, dry_run, wait, progress)


def _sync(kind, src_path, dst_path, no_snapshot, dry_run, wait, progress) -> SyncResult:
    src = Volume.open(src_path)
    dst_root = Path(os.path.abspath(dst_path))
    _refuse_same(src.root, dst_root)
    new = _dst_is_new(dst_root)
    if not new:
        check_compatible(src, Volume.open(dst_root))
    if dry_run:
        dst = None if new else Volume.open(dst_root)
        return _dry_run(kind, src, dst, no_snapshot)
    if new and not src.state().lineage and (no_snapshot or src.state().mode != READ_WRITE):
        raise BadArgument(f"{src.root} has no snapshots to send")  # before DST is created
    dst = _create_mirror(dst_root, src) if new and not is_volume(dst_root) else Volume.open(dst_root)
    with _locked_pair(src, dst, wait, resume=dst if kind == TRANSFER else None):
        return _apply_sync(kind, src, dst, no_snapshot, progress)


def _dry_run(kind: str, src: Volume, dst: Volume | None, no_snapshot: bool) -> SyncResult:
    needed, result, objects = _src_snapshot_needed(src, no_snapshot)
    extra = _virtual_snapshot(src, result) if needed else None
    live_number = None
    pending = dst is not None and bool(dst.state().journal)
    if dst is not None and kind == TRANSFER:
        _check_transfer_dst(src, src.lineage() + ([extra] if extra else []), dst, pending)
    elif dst is not None and not pending:
        live, live_objects = scan(dst, write=False)
        lineage = dst.lineage()
        if not lineage:
            _refuse_unrelated_files(dst, live, live_objects, src)
        elif live.root != lineage[-1].root:
            live_number = lineage[-1].number + 1
    plan = build_plan(kind, src, dst, src_objects=objects or Objects(src, write=False),
                      extra_src=extra, live_number=live_number, baseline=dst is None)
    return SyncResult(plan, True, extra, None)


def _apply_sync(kind, src, dst, no_snapshot, progress) -> SyncResult:
    src_state, dst_state = src.state(), dst.state()
    baseline = not dst_state.lineage
    live_snap = None
    if kind == TRANSFER:
        live = _check_transfer_dst(src, src.lineage(src_state), dst, resumable(dst_state))
    elif baseline:  # resync must not overwrite files it could not preserve
        _refuse_unrelated_files(dst, *scan(dst, write=False), src)
    src_snap = None
    if not no_snapshot and src_state.mode == READ_WRITE:
        src_snap = _snapshot_if_changed(src, progress)
    if kind == RESYNC:
        live, live_snap = _keep_live_changes(dst, dst_state, progress)
    plan = build_plan(kind, src, dst, src_objects=Objects(src, write=False),
                      live_number=live_snap.number if live_snap else None, baseline=baseline)
    state = dst.state()
    if _nothing_to_do(plan, state, src, live_snap):
        return SyncResult(plan, False, src_snap, None)
    # announce the live-tree step; DST's live changes are kept before it is touched
    kept = (live_snap.id,) if live_snap else ()
    try:  # (an error once the journal may be on disk, even in its commit, undoes the step)
        dst.commit(state.with_(preserved=state.preserved + kept,
                               journal={"op": JOURNAL_MATERIALIZE}))
        skipped = _send_and_materialize(plan, src, dst, live, progress)
        _commit_dst(plan, src, dst, live_snap)  # a failed commit, too, leaves the old state
    except KeyboardInterrupt:
        # Ctrl-C: keep what was received (sealed) and the journal; a rerun resumes the
        # transfer from there (and any other command undoes the step)
        with suppress(Exception):
            dst.packs.flush()
        raise
    except BaseException:
        _undo(dst)
        raise
    return SyncResult(plan, False, src_snap, live_snap, skipped)


def _snapshot_if_changed(src: Volume, progress: Progress | None) -> Snapshot | None:
    """One scan that stores what is new; a snapshot record only if the tree changed."""
    state = src.state()
    result, _ = scan(src, write=True, progress=progress)
    if state.lineage and src.lineage(state)[-1].root == result.root:
        src.packs.flush()
        src.save_statcache(result.cache)
        return None
    snap = record_scan(src, result, next_number(src, state), None)
    src.commit(state.with_(lineage=state.lineage + (snap.id,)))
    return snap


def _keep_live_changes(dst: Volume, state: VolumeState, progress: Progress | None
                       ) -> tuple[tuple[ScanResult, Objects], Snapshot | None]:
    """Scan DST's live tree, storing it; if it differs from DST's latest snapshot, write
    (not yet commit) a record of it, to be preserved."""
    live = scan(dst, write=False) if not state.lineage else scan(dst, write=True, progress=progress)
    latest = dst.lineage(state)[-1] if state.lineage else None
    unchanged = latest is not None and (
        live[0].root == latest.root
        or (state.mode == READ_ONLY and not live_differs(live[1], latest.root, live[0].root)))
    if latest is None or unchanged:
        dst.packs.flush()
        return live, None
    return live, record_scan(dst, live[0], latest.number + 1, "live changes before resync")


def _nothing_to_do(plan: TransferPlan, state: VolumeState, src: Volume,
                   live_snap: Snapshot | None) -> bool:
    """DST already is an up-to-date, unmodified mirror of SRC."""
    return (not plan.lineages.add and not plan.lineages.remove and live_snap is None
            and state.mode == READ_ONLY and state.upstream_id == src.config.volume_id
            and state.upstream == str(src.root) and bool(state.lineage))


def _send_and_materialize(plan: TransferPlan, src: Volume, dst: Volume,
                          scanned: tuple[ScanResult, Objects], progress: Progress | None
                          ) -> NotRestored:
    """Copy the planned objects into DST's store while a second thread writes DST's live
    tree (as `scanned` found it) from SRC's store; then make both durable."""
    live, dst_objects = scanned
    sent = frozenset(block_id for block_id, _ in plan.objects)
    objects = Objects(dst, write=False, source=src, checked_elsewhere=sent)
    objects.overlay = dst_objects.overlay
    target = plan.src_lineage[-1].root
    outcome: dict = {}
    with dst.tmp_fd() as tmp_fd:
        writer = Materializer(objects, dst.fmt, live.cache, tmp_fd)

        def write_live_tree() -> None:
            try:
                outcome["cache"] = writer.run(bytes(dst.root), live.root, target)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                outcome["error"] = exc

        thread = threading.Thread(target=write_live_tree, name="volsync-materialize")
        thread.start()
        try:
            _send(plan, src, dst, progress)
        finally:
            if sys.exc_info()[0] is not None:
                objects.cancelled = True
            thread.join()
    if "error" in outcome:
        raise outcome["error"]
    dst.save_statcache(outcome["cache"])
    return writer.skipped


def _undo(dst: Volume) -> None:
    """After a failed run, put DST's live tree back to its latest snapshot now (the next
    command would do the same from the journal)."""
    dst.packs.discard()
    with suppress(Exception):  # a full disk: the temp files' space first
        dst.clear_tmp()
    with suppress(Exception):  # if this fails too, the journal stays for the next command
        recover(dst)


def _send(plan: TransferPlan, src: Volume, dst: Volume, progress: Progress | None) -> None:
    """Copy the planned objects, each re-hashed on receipt (a bad one stops the run, exit 6),
    then the snapshot records once the objects are durable."""
    def received(length: int) -> None:
        crashpoint("object-received")
        if progress:
            progress(length)

    dst.packs.put_many_from(src.packs, [block_id for block_id, _ in plan.objects], received)
    for snap in plan.lineages.add:
        dst.write_snapshot(snap)  # flushes the packs first: data before metadata


def _commit_dst(plan: TransferPlan, src: Volume, dst: Volume, live_snap: Snapshot | None) -> None:
    """The one commit: SRC's snapshots join DST's lineage, DST's own later ones leave it
    (preserved, before the live changes kept earlier), DST becomes SRC's read-only mirror,
    and the live-tree step is done."""
    state = dst.state()
    common = plan.lineages.common
    keep = state.lineage[: state.lineage.index(common.id) + 1] if common else ()
    live = (live_snap.id,) if live_snap else ()
    earlier = tuple(i for i in state.preserved if i not in live)
    dst.commit(state.with_(
        mode=READ_ONLY, upstream=str(src.root), upstream_id=src.config.volume_id,
        lineage=keep + tuple(s.id for s in plan.lineages.add),
        preserved=earlier + tuple(s.id for s in plan.lineages.remove) + live,
        journal=None,
    ))


# --- break and role-swap ----------------------------------------------------------------------

def break_mirror(path: str, wait: float = 0.0) -> tuple[VolumeState, bool]:
    """Failover: the mirror becomes read-write at once, nothing copied. Returns the new
    state and whether it was already broken (a rerun after an interrupted but committed
    break is done, not an error)."""
    vol = Volume.open(path)
    with writing(vol, wait):
        state = vol.state()
        if state.mode != READ_ONLY:
            if state.extra.get("former_upstream"):
                return state, True
            raise BadArgument(f"{vol.root} is already read-write (not a mirror)")
        new = state.with_(mode=READ_WRITE, upstream=None, upstream_id=None,
                          extra={**state.extra, "former_upstream": state.upstream})
        vol.commit(new)
        return new, False


@dataclass(frozen=True)
class RoleSwapResult:
    sync: SyncResult | None
    already_done: bool
    link: str | None


def role_swap(a_path: str, b_path: str, link: str | None = None, *, dry_run: bool = False,
              wait: float = 0.0, progress: Progress | None = None) -> RoleSwapResult:
    """A (read-write) and its mirror B swap roles with no write lost: last snapshot of A,
    transfer A->B, A becomes a mirror of B (journalled), B read-write, link flipped."""
    a, b = Volume.open(a_path), Volume.open(b_path)
    _refuse_same(a.root, b.root)
    if link is not None:
        _check_link(Path(link))
    if dry_run:
        _check_swap_roles(a, b)
        return RoleSwapResult(_dry_run(TRANSFER, a, b, no_snapshot=False), False, link)
    with _locked_pair(a, b, wait):
        sa, sb = a.state(), b.state()
        if _swap_done(a, b, sa, sb):
            if sa.journal or link:
                _finish_swap(a, b, link)
            return RoleSwapResult(None, True, link)
        if not _swap_half_done(a, b, sa, sb):
            _check_swap_roles(a, b)
            result = _apply_sync(TRANSFER, a, b, False, progress)
            sa = a.state()
            a.commit(sa.with_(mode=READ_ONLY, upstream=str(b.root), upstream_id=b.config.volume_id,
                              journal={"op": JOURNAL_ROLE_SWAP, "peer": str(b.root)}))
            crashpoint("role-swap-source-demoted")
        else:
            result = None
        b.commit(b.state().with_(mode=READ_WRITE, upstream=None, upstream_id=None))
        crashpoint("role-swap-mirror-promoted")
        _finish_swap(a, b, link)
        return RoleSwapResult(result, False, link)


def _check_swap_roles(a: Volume, b: Volume) -> None:
    sa, sb = a.state(), b.state()
    if sa.mode != READ_WRITE:
        raise BadArgument(f"{a.root} is not read-write; role-swap A B needs A to be the source")
    if sb.mode != READ_ONLY:
        raise Diverged(f"{b.root} is read-write too: both are sources; diverged, use resync")
    if sb.upstream_id != a.config.volume_id:
        raise BadArgument(f"{b.root} is not a mirror of {a.root}")


def _swap_half_done(a: Volume, b: Volume, sa: VolumeState, sb: VolumeState) -> bool:
    """A crash between demoting A and promoting B: both are mirrors of each other."""
    return (sa.mode == READ_ONLY and sa.upstream_id == b.config.volume_id
            and sb.mode == READ_ONLY and sb.upstream_id == a.config.volume_id
            and bool(sa.journal) and sa.journal.get("op") == JOURNAL_ROLE_SWAP
            and sa.lineage[-1:] == sb.lineage[-1:])


def _swap_done(a: Volume, b: Volume, sa: VolumeState, sb: VolumeState) -> bool:
    return (sa.mode == READ_ONLY and sa.upstream_id == b.config.volume_id
            and sb.mode == READ_WRITE and sa.lineage[-1:] == sb.lineage[-1:])


def _finish_swap(a: Volume, b: Volume, link: str | None) -> None:
    if link is not None:
        flip_link(Path(link), b.root)
    a.commit(a.state().with_(journal=None))


def _check_link(path: Path) -> None:
    if os.path.lexists(path) and not path.is_symlink():
        raise BadArgument(f"--link {path} exists and is not a symlink; refusing to replace it")
    if not path.parent.is_dir():
        raise BadArgument(f"--link {path}: no such directory {path.parent}")


def flip_link(path: Path, target: Path) -> None:
    """Point the symlink at `target` by renaming a new link over it (atomic for readers)."""
    tmp = path.with_name(f".{path.name}.volsync-{secrets.token_hex(4)}")
    os.symlink(target, tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    crashpoint("link-flipped")


__all__ = ["META", "break_mirror", "resync", "role_swap", "transfer"]
