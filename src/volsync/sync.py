"""Mirroring: transfer, break, resync and role-swap, each as plan then apply, over endpoints
(a local volume, or one on another machine behind the protocol: endpoint.py, remote/).

Apply order for transfer and resync, both volumes locked: (1) the refusals (plan.refusal);
(2) SRC's live changes become a snapshot (read-write SRC only); (3) DST's live changes are
stored and recorded, to be preserved (resync); (4) the plan: the objects under SRC's new
snapshots that DST lacks; (5) a journal entry on DST announces the live-tree step; (6) the
objects are copied, each re-hashed on receipt, made durable with the snapshot records, and
DST's live tree is brought to SRC's latest, writing only what differs; (7) one atomic commit
adds SRC's snapshots to DST's lineage, moves DST's own later ones to preserved, makes DST
SRC's mirror and clears the journal. A crash or a failure before (7) leaves DST's lineage as
it was and its live tree for the next command to put back (or, for an interrupted transfer,
to finish); what was received stays, so a rerun does not send it again.

A mirror update from a local SRC runs (1) and (2) side by side: DST's live tree is scanned
(by a child process, or by the far side) while SRC's changes are stored, and they become
SRC's snapshot only after the refusals have seen DST's scan (a refusal then takes back what
SRC's scan stored)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

from .endpoint import LocalEndpoint
from .errors import BadArgument, Diverged, VolsyncError
from .model import (
    READ_ONLY,
    READ_WRITE,
    FileWarning,
    Snapshot,
    VolumeState,
    newest_common,
    progress_step,
)
from .ops import writing
from .plan import (
    RESYNC,
    TRANSFER,
    TransferPlan,
    VolumeInfo,
    check_compatible,
    check_parent,
    keeps_live,
    missing_objects,
    plan_lineages,
    refusal,
)
from .remote.address import parse_address
from .remote.client import RemoteOptions
from .remote.endpoints import Endpoint, open_endpoint, opened, receiving, wire_bytes
from .store.crash import crashpoint
from .store.fsutil import fsync_dir, nearest_real
from .store.volume import META, Volume
from .tree import NotRestored, Progress

JOURNAL_ROLE_SWAP = "role-swap"


@dataclass(frozen=True)
class SyncResult:
    plan: TransferPlan
    dry_run: bool
    src_snapshot: Snapshot | None  # taken by this run (or, dry run, the one it would take)
    live_preserved: Snapshot | None  # DST's live changes kept as a preserved snapshot
    not_restored: NotRestored = field(default_factory=NotRestored)  # what DST could not get
    bytes_on_wire: int = 0  # what crossed connections (local: the bytes copied)
    warnings: tuple[FileWarning, ...] = ()  # SRC's files not captured as they are
    warnings_omitted: int = 0  # more of them, not sent by a remote SRC


# --- opening endpoints ----------------------------------------------------------------------

def _refuse_same(a: Endpoint, b: Endpoint) -> None:
    """One volume named twice (also through a symlink or '..'), or one inside the other (a
    mirror inside its source would capture itself, one level deeper each run)."""
    if not (a.is_local and b.is_local):
        if not a.is_local and not b.is_local and a.address == b.address:
            raise BadArgument("SRC and DST are the same volume")
        return
    pa, pb = a.root, b.root
    if pa == pb or (pa.exists() and pb.exists() and os.path.samefile(pa, pb)):
        raise BadArgument("SRC and DST are the same volume")
    ra, rb = nearest_real(pa), nearest_real(pb)
    if rb.startswith(ra + os.sep) or ra.startswith(rb + os.sep):
        inner, outer = (pb, pa) if rb.startswith(ra + os.sep) else (pa, pb)
        raise BadArgument(f"{inner} is inside {outer}: a volume and its mirror cannot nest")


def _refuse_one_volume(a: VolumeInfo, b: VolumeInfo) -> None:
    """The same volume reached by two spellings of an address (its id gives it away)."""
    if a.exists and b.exists and a.volume_id == b.volume_id:
        raise BadArgument(f"{a.address} and {b.address} are the same volume")


@contextmanager
def _locked_pair(a: Endpoint, b: Endpoint, wait: float, resume: Endpoint | None = None
                 ) -> Iterator[None]:
    """Lock two volumes in one fixed order (by address) so opposite runs cannot deadlock.
    `resume` names a mirror whose interrupted write the coming transfer picks up."""
    with ExitStack() as stack:
        for ep in sorted((a, b), key=lambda e: e.address):
            ep.lock(wait, resume=ep is resume)
            stack.callback(_release, ep)
        yield


def _release(ep: Endpoint) -> None:
    with suppress(Exception):  # a lost connection releases the far lock by itself
        ep.release()


def upstream_of(src: Endpoint, dst: Endpoint) -> str:
    """How DST records SRC: its path on a shared machine, else an address."""
    if src.is_local and dst.is_local:
        return str(src.root)
    return src.host_address() if src.is_local else src.address


# --- planning -------------------------------------------------------------------------------

def _plan(kind: str, src: Endpoint, dst: Endpoint, src_info: VolumeInfo,
          src_lineage: list[Snapshot], dst_info: VolumeInfo, *, live_number: int | None = None,
          snapshot_src: bool = False) -> TransferPlan:
    """The one planner, for dry runs and runs: lineages compared by id, then the objects
    under SRC's new snapshots that DST lacks, asked in batches."""
    if not src_lineage:
        raise BadArgument(f"{src.address} has no snapshots to send")
    lineages = plan_lineages(kind, src_lineage, list(dst_info.lineage))
    has = dst.has if dst_info.exists else (lambda ids: [False] * len(ids))
    objects, blocks = missing_objects(src.read, has, [s.root for s in lineages.add],
                                      src_info.fmt)
    return TransferPlan(kind, lineages, tuple(src_lineage), tuple(dst_info.lineage),
                        objects, blocks, live_number, snapshot_src,
                        not dst_info.lineage)


# --- transfer and resync ----------------------------------------------------------------------

@dataclass(frozen=True)
class Takeover:
    """What a resync is about to take out of a read-write DST's lineage (its own snapshots
    after the common one, and its live changes): both become preserved snapshots."""

    src: str
    dst: str
    src_lineage: tuple[Snapshot, ...]
    dst_lineage: tuple[Snapshot, ...]
    common: Snapshot | None
    removed: tuple[Snapshot, ...]
    live_changes: bool


Confirm = Callable[[Takeover], None]  # returns to go on, raises to refuse


def transfer(src_path: str, dst_path: str, *, no_snapshot: bool = False, dry_run: bool = False,
             wait: float = 0.0, progress: Progress | None = None,
             options: RemoteOptions | None = None, mkpath: bool = False,
             strict: bool = True, confirm: Confirm | None = None) -> SyncResult:
    return _sync(TRANSFER, src_path, dst_path, no_snapshot, dry_run, wait, progress, options,
                 mkpath, strict, None)


def resync(src_path: str, dst_path: str, *, no_snapshot: bool = False, dry_run: bool = False,
           wait: float = 0.0, progress: Progress | None = None,
           options: RemoteOptions | None = None, mkpath: bool = False,
           strict: bool = True, confirm: Confirm | None = None) -> SyncResult:
    """`confirm` is asked before a read-write DST's own work leaves its lineage (None: go on
    without asking, as --force)."""
    return _sync(RESYNC, src_path, dst_path, no_snapshot, dry_run, wait, progress, options,
                 mkpath, strict, confirm)


def _sync(kind, src_text, dst_text, no_snapshot, dry_run, wait, progress, options, mkpath,
          strict, confirm) -> SyncResult:
    with opened(src_text, dst_text, options=options) as (src, dst):
        _refuse_same(src, dst)
        src_info, dst_info = src.info("src"), dst.info("dst")
        _refuse_one_volume(src_info, dst_info)
        check_compatible(src_info, dst_info)
        check_parent(dst_info, mkpath)
        if dry_run:
            return _dry_run(kind, src, dst, src_info, dst_info, no_snapshot, strict)
        if (not dst_info.exists and not src_info.lineage
                and (no_snapshot or src_info.mode != READ_WRITE)):
            raise BadArgument(f"{src.address} has no snapshots to send")  # before DST exists
        if not dst_info.exists:
            dst.create_mirror(upstream_of(src, dst), src_info.volume_id, src_info.hash,
                              src_info.block_size)
        with _locked_pair(src, dst, wait, resume=dst if kind == TRANSFER else None):
            return apply_sync(kind, src, dst, no_snapshot, progress, strict, confirm=confirm,
                              hold_wait=wait, share_src=True)


def _dry_run(kind: str, src: Endpoint, dst: Endpoint, src_info: VolumeInfo,
             dst_info: VolumeInfo, no_snapshot: bool, strict: bool = True) -> SyncResult:
    extra = None
    if not no_snapshot and src_info.mode == READ_WRITE and not src_info.journal:
        extra = src.snapshot_source(dry_run=True, strict=strict)
    src_lineage = list(src_info.lineage) + ([extra] if extra else [])
    facts = dst.inspect_live() if dst_info.exists else None
    problem = refusal(kind, src_info, src_lineage, dst_info, facts)
    if problem is not None:
        raise problem
    live_number = None
    if (kind == RESYNC and facts is not None and not dst_info.journal
            and keeps_live(dst_info.mode, bool(dst_info.lineage), facts)):
        live_number = dst_info.lineage[-1].number + 1
    plan = _plan(kind, src, dst, src_info, src_lineage, dst_info, live_number=live_number,
                 snapshot_src=extra is not None)
    return _warned(SyncResult(plan, True, extra, None, bytes_on_wire=wire_bytes(src, dst)),
                   src)


def _warned(result: SyncResult, src: Endpoint) -> SyncResult:
    """The result with the warnings of SRC's snapshot scan, if it made one."""
    return replace(result, warnings=src.scan_warnings, warnings_omitted=src.scan_warnings_omitted)


def apply_sync(kind: str, src: Endpoint, dst: Endpoint, no_snapshot: bool,
               progress: Progress | None, strict: bool = True, *,
               confirm: Confirm | None = None, hold_wait: float = 0.0,
               share_src: bool = False) -> SyncResult:
    """Both volumes locked: refuse, or snapshot SRC, keep DST's live changes, plan, copy
    the objects, write DST's live tree and commit (see the module's docstring). With
    `share_src`, SRC records DST's hold and lets go of its exclusive lock before sending."""
    src_info, dst_info = src.info("src"), dst.info("dst")
    snapshot = not no_snapshot and src_info.mode == READ_WRITE
    if kind == TRANSFER and snapshot and isinstance(src, LocalEndpoint) and dst_info.lineage:
        src_snap = _snapshot_beside_scan(src, dst, src_info, dst_info, progress, strict)
    else:
        facts = dst.inspect_live()
        problem = refusal(kind, src_info, list(src_info.lineage), dst_info, facts)
        if problem is not None:
            raise problem
        if kind == RESYNC and confirm is not None:
            _confirm_takeover(src_info, dst_info, facts, confirm)
        src_snap = None
        if snapshot:
            progress_step(progress, "snapshot SRC", counted=src.is_local)
            src_snap = src.snapshot_source(progress=progress, strict=strict)
    live_snap = None
    if kind == RESYNC:
        progress_step(progress, "scan DST", counted=dst.is_local)
        live_snap = dst.keep_live_changes(progress=progress)
    src_lineage = list(src_info.lineage) + ([src_snap] if src_snap else [])
    hold = _Hold(src, dst, dst_info, src_lineage) if share_src and src_lineage else None
    if hold:
        hold.record()
    plan = _plan(kind, src, dst, src_info, src_lineage, dst_info,
                 live_number=live_snap.number if live_snap else None)
    upstream = upstream_of(src, dst)
    if _nothing_to_do(plan, dst_info, src_info, upstream, live_snap):
        dst.mark_updated()
        return _warned(SyncResult(plan, False, src_snap, None,
                                  bytes_on_wire=wire_bytes(src, dst)), src)
    if hold:
        src.share(hold_wait)
    # the bytes counted from here are the planned objects' (the scans above were steps of
    # their own): the total is the plan's, as the result line reports it
    progress_step(progress, "send", plan.bytes)
    with receiving(dst):
        dst.begin([live_snap.id] if live_snap else [])
        skipped = _copy_and_write(plan, src, dst, progress)
        common = plan.lineages.common
        dst.finish([s.id for s in dst_info.lineage], common.id if common else None,
                   [s.id for s in plan.lineages.add], [s.id for s in plan.lineages.remove],
                   live_snap.id if live_snap else None, upstream, src_info.volume_id)
    if hold:
        hold.settle(hold_wait)
    on_wire = wire_bytes(src, dst) if not (src.is_local and dst.is_local) else plan.bytes
    return _warned(SyncResult(plan, False, src_snap, live_snap, skipped, on_wire), src)


def _snapshot_beside_scan(src: LocalEndpoint, dst: Endpoint, src_info: VolumeInfo,
                          dst_info: VolumeInfo, progress: Progress | None,
                          strict: bool) -> Snapshot | None:
    """A mirror update from a local SRC: DST's live tree is scanned meanwhile (by a child
    process here, or by the far side) while SRC's changes are stored; they become SRC's
    snapshot only once DST's scan lets the transfer go on (a refused transfer takes back
    what SRC's scan stored and records no snapshot, as before)."""
    problem = refusal(TRANSFER, src_info, list(src_info.lineage), dst_info, None)
    if problem is not None:
        raise problem
    with dst.inspecting_live() as dst_facts:
        progress_step(progress, "snapshot SRC", counted=True)
        scanned = src.scan_source(progress=progress, strict=strict)
        facts = dst_facts()
    problem = refusal(TRANSFER, src_info, list(src_info.lineage), dst_info, facts)
    if problem is not None:
        src.drop_source_scan()
        raise problem
    return src.commit_source(scanned)


def _confirm_takeover(src: VolumeInfo, dst: VolumeInfo, facts, confirm: Confirm) -> None:
    """Ask before a resync takes a read-write DST's own snapshots or live changes out of its
    lineage (they stay, preserved; `revert DST pN` brings one back)."""
    if dst.mode != READ_WRITE:
        return
    lineages = plan_lineages(RESYNC, list(src.lineage), list(dst.lineage))
    live = not dst.journal and keeps_live(dst.mode, bool(dst.lineage), facts)
    if lineages.remove or live:
        confirm(Takeover(src.address, dst.address, src.lineage, dst.lineage, lineages.common,
                         lineages.remove, live))


@dataclass
class _Hold:
    """SRC's record that DST holds snapshots: before sending, the newest common snapshot and
    the one sent (whichever DST ends with stays); after, only the one sent."""

    src: Endpoint
    dst: Endpoint
    dst_info: VolumeInfo
    src_lineage: list[Snapshot]

    def __post_init__(self) -> None:
        self.address = upstream_of(self.dst, self.src)  # how SRC names DST

    def record(self) -> None:
        common = newest_common(self.src_lineage, list(self.dst_info.lineage))
        ids = ([common.id] if common else []) + [self.src_lineage[-1].id]
        self.src.hold(self.dst_info.volume_id, self.address, ids)

    def settle(self, wait: float) -> None:
        self.src.settle_hold(self.dst_info.volume_id, self.address, [self.src_lineage[-1].id],
                             wait)


def _nothing_to_do(plan: TransferPlan, dst: VolumeInfo, src: VolumeInfo, upstream: str,
                   live_snap: Snapshot | None) -> bool:
    """DST already is an up-to-date, unmodified mirror of SRC."""
    return (not plan.lineages.add and not plan.lineages.remove and live_snap is None
            and dst.mode == READ_ONLY and dst.upstream_id == src.volume_id
            and dst.upstream == upstream and bool(dst.lineage) and not dst.journal)


def _copy_and_write(plan: TransferPlan, src: Endpoint, dst: Endpoint,
                    progress: Progress | None) -> NotRestored:
    """Copy the planned objects (each re-hashed on receipt; a bad one stops the run, exit
    6), the snapshot records once the objects are durable, and DST's live tree."""
    snaps = list(plan.lineages.add)
    target = plan.src_lineage[-1].root
    if src.is_local and dst.is_local:
        return dst.receive_local(src, plan.objects, snaps, target, progress)
    dst.receive(src.export(plan.objects.ids()), progress)
    dst.add_snapshots(snaps)
    progress_step(progress, "write DST", counted=dst.is_local)
    return dst.materialize(target, progress)


# --- how far a mirror is behind ------------------------------------------------------------

@dataclass(frozen=True)
class Lag:
    """A mirror against its upstream now: snapshots and bytes the next transfer would bring
    (None with `why` when that cannot be told)."""

    snapshots: int | None
    bytes: int | None
    why: str | None = None


def lag(mirror: str, upstream: str, reach_remote: bool,
        options: RemoteOptions | None = None) -> Lag:
    """Plan (without locks or changes) the transfer from the upstream to the mirror. An
    upstream on another machine is asked only with `reach_remote` (status --check-upstream)."""
    if not reach_remote and parse_address(upstream) is not None:
        return Lag(None, None, "upstream is on another machine (--check-upstream asks it)")
    try:
        with opened(upstream, mirror, options=options) as (src, dst):
            src_info, dst_info = src.info("src"), dst.info("dst")
            if src_info.volume_id != dst_info.upstream_id:
                return Lag(None, None, f"{upstream} is not this mirror's upstream any more")
            plan = _plan(TRANSFER, src, dst, src_info, list(src_info.lineage), dst_info)
            return Lag(len(plan.lineages.add), plan.bytes)
    except VolsyncError as exc:
        return Lag(None, None, str(exc))


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
    read_write: str = ""
    read_only: str = ""


def role_swap(a_text: str, b_text: str, link: str | None = None, *, dry_run: bool = False,
              wait: float = 0.0, progress: Progress | None = None,
              options: RemoteOptions | None = None, strict: bool = True) -> RoleSwapResult:
    """A (read-write) and its mirror B swap roles with no write lost: last snapshot of A,
    transfer A->B, A becomes a mirror of B (journalled), B read-write, link flipped."""
    with opened(a_text, b_text, options=options) as (a, b):
        _refuse_same(a, b)
        if link is not None:
            _check_link(Path(link))
        ia, ib = a.info("src"), b.info("src")
        _refuse_one_volume(ia, ib)
        names = (_shown(b), _shown(a))
        if dry_run:
            _check_swap_roles(ia, ib)
            result = _dry_run(TRANSFER, a, b, ia, ib, no_snapshot=False, strict=strict)
            return RoleSwapResult(result, False, link, *names)
        with _locked_pair(a, b, wait):
            ia, ib = a.info("src"), b.info("src")
            if _swap_done(ia, ib):
                if ia.journal or link:
                    _finish_swap(a, b, link)
                return RoleSwapResult(None, True, link, *names)
            result = None
            if not _swap_half_done(ia, ib):
                _check_swap_roles(ia, ib)
                result = apply_sync(TRANSFER, a, b, False, progress, strict)
                a.set_role(READ_ONLY, upstream_of(b, a), ib.volume_id,
                           {"op": JOURNAL_ROLE_SWAP, "peer": b.address})
                crashpoint("role-swap-source-demoted")
            b.set_role(READ_WRITE, None, None, None)
            crashpoint("role-swap-mirror-promoted")
            _finish_swap(a, b, link)
            return RoleSwapResult(result, False, link, *names)


def _shown(ep: Endpoint) -> str:
    return str(ep.root) if ep.is_local else ep.address


def _check_swap_roles(a: VolumeInfo, b: VolumeInfo) -> None:
    if a.mode != READ_WRITE:
        raise BadArgument(f"{a.address} is not read-write; role-swap A B needs A to be the source")
    if b.mode != READ_ONLY:
        raise Diverged(f"{b.address} is read-write too: both are sources; diverged, use resync")
    if b.upstream_id != a.volume_id:
        raise BadArgument(f"{b.address} is not a mirror of {a.address}")


def _swap_half_done(a: VolumeInfo, b: VolumeInfo) -> bool:
    """A crash between demoting A and promoting B: both are mirrors of each other."""
    return (a.mode == READ_ONLY and a.upstream_id == b.volume_id
            and b.mode == READ_ONLY and b.upstream_id == a.volume_id
            and a.journal == JOURNAL_ROLE_SWAP and _last(a) == _last(b))


def _swap_done(a: VolumeInfo, b: VolumeInfo) -> bool:
    return (a.mode == READ_ONLY and a.upstream_id == b.volume_id
            and b.mode == READ_WRITE and _last(a) == _last(b))


def _last(info: VolumeInfo) -> list[str]:
    return [s.id for s in info.lineage[-1:]]


def _finish_swap(a: Endpoint, b: Endpoint, link: str | None) -> None:
    if link is not None:
        flip_link(Path(link), b.root if b.is_local else Path(b.address))
    a.clear_journal()


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


__all__ = ["META", "break_mirror", "open_endpoint", "opened", "resync", "role_swap",
           "transfer"]
