"""Endpoints: the narrow interface through which the engine (sync.py) reaches a volume.

`LocalEndpoint` wraps a `Volume` on this machine. `remote.RemoteEndpoint` offers the same
methods by speaking the protocol to `volsync serve --stdio`, which serves a `LocalEndpoint` on
its own machine: every method here takes and returns plain values (snapshots, ids, counts), so
that it can cross the wire. The engine decides; an endpoint only reports facts about its
volume and carries out steps on it (zrepl's sender and receiver)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path

from .child import ReadingChild
from .errors import BadArgument, IntegrityError, NoCommonSnapshot, VolumeLocked
from .model import READ_ONLY, READ_WRITE, BlockId, FileWarning, Snapshot, VolumeState
from .ops import (
    JOURNAL_MATERIALIZE,
    latest_root,
    new_snapshot_id,
    next_number,
    record_scan,
    recover,
    writing,
)
from .plan import LiveFacts, VolumeInfo, keeps_live
from .retention import record_hold, without_hold
from .store.crash import crashpoint
from .store.fsutil import fsync_dir
from .store.idarray import IdSet, ObjectList
from .store.volume import META, Volume, is_create_leftover, is_volume
from .tree import Materializer, NotRestored, Objects, Progress, ScanResult, live_differs, scan

SEAL_EVERY = 64 << 20  # a receiver makes what it got durable this often (resume point)
RECEIVED_PACKS = "received_packs"  # state.extra: packs of an unfinished receive


@dataclass
class ReceiveCount:
    objects: int = 0
    bytes: int = 0


class LocalEndpoint:
    """A volume on this machine. Holds, for one command, the volume's lock and the scans the
    engine's later steps use."""

    is_local = True

    def __init__(self, path: str | os.PathLike, address: str | None = None):
        self.root = Path(os.path.abspath(path))
        self.address = address or str(self.root)
        self._volume: Volume | None = None
        self._stack = ExitStack()  # a shared lock (read-only serve)
        self._exclusive = ExitStack()  # the volume's lock, for changes
        self._reading = ExitStack()  # after `share`: sending committed snapshots
        self._exclusive_held = False
        self._objects: Objects | None = None  # SRC: reads, through a dry run's scan
        self._live = None  # DST: (ScanResult, Objects) of its live tree
        self._received = bytearray()  # ids of the objects this run received, each re-hashed
        self._packs_before: set[str] | None = None  # SRC's packs before scan_source
        self.scan_warnings: tuple[FileWarning, ...] = ()  # of snapshot_source's scan
        self.scan_warnings_omitted = 0  # (a remote SRC sends at most a bounded number)

    # --- facts ------------------------------------------------------------------------------
    @property
    def volume(self) -> Volume:
        if self._volume is None:
            self._volume = Volume.open(self.root)
        return self._volume

    def info(self, role: str = "src") -> VolumeInfo:
        """SRC must be a volume; DST may also be missing or empty (a new mirror)."""
        if role == "dst" and _new_mirror_dir(self.root):
            return VolumeInfo(self.address, False,
                              parent_missing=not os.path.isdir(self.root.parent))
        vol = self.volume
        state = vol.state()
        journal = state.journal or {}
        return VolumeInfo(
            self.address, True, vol.config.volume_id, vol.config.hash, vol.config.block_size,
            state.mode, state.upstream, state.upstream_id, tuple(vol.lineage(state)),
            tuple(state.preserved), journal.get("op"), journal.get("peer"))

    def host_address(self) -> str:
        """How a volume on another machine names this one (its upstream)."""
        return f"{socket.gethostname()}:{self.root}"

    # --- locking ----------------------------------------------------------------------------
    def create_mirror(self, upstream: str, upstream_id: str, hash_name: str,
                      block_size: int) -> None:
        if is_volume(self.root):
            return
        self._made_dir = not os.path.lexists(self.root)
        state = VolumeState(mode=READ_ONLY, upstream=upstream, upstream_id=upstream_id)
        self._volume = Volume.create(self.root, block_size, state, hash_name=hash_name)

    def discard_new(self) -> None:
        """Take back a mirror this command created, while it holds no snapshot (a receive
        whose stream failed): the directory is as it was before."""
        vol = self.volume
        state = vol.state()
        if state.lineage or state.preserved or not hasattr(self, "_made_dir"):
            return
        self.release()
        shutil.rmtree(vol.meta)
        fsync_dir(self.root)
        if self._made_dir:
            with suppress(OSError):
                os.rmdir(self.root)
                fsync_dir(self.root.parent)

    def lock(self, wait: float = 0.0, resume: bool = False, shared: bool = False) -> None:
        """Hold the volume's lock until `release` (finishing a crashed run's step first,
        unless `resume` keeps a mirror's interrupted write for the coming transfer)."""
        vol = self.volume
        if shared:
            self._stack.enter_context(vol.shared(wait))
        else:
            self._exclusive.enter_context(writing(vol, wait, resume=resume))
            self._exclusive_held = True

    def share(self, wait: float = 0.0) -> None:
        """A source done changing (snapshot taken, holds recorded) goes on sending under the
        readers' lock only: snapshots, and other transfers from it, run meanwhile, and only
        what deletes objects (prune, destroy) waits."""
        if self._exclusive_held:
            self._reading.enter_context(self.volume.reading(wait))
            self._release_exclusive()

    def _release_exclusive(self) -> None:
        self._exclusive_held = False
        self._exclusive.close()

    def release(self) -> None:
        self._release_exclusive()
        self._reading.close()
        self._stack.close()

    # --- holds ------------------------------------------------------------------------------
    def hold(self, mirror_id: str, address: str, snapshots: list[str]) -> bool:
        """Under the exclusive lock: record that `mirror_id` holds `snapshots` of this
        (source) volume, so that prune keeps them."""
        return record_hold(self.volume, mirror_id, address, snapshots)

    def settle_hold(self, mirror_id: str, address: str, snapshots: list[str],
                    wait: float = 0.0) -> bool:
        """After a send: narrow the hold to what the mirror now has, taking the lock for a
        moment. False if it stayed busy: the wider hold is kept, which is only cautious."""
        self._reading.close()
        try:
            with writing(self.volume, wait):
                return record_hold(self.volume, mirror_id, address, snapshots)
        except VolumeLocked:
            return False

    def mark_updated(self) -> None:
        """A mirror found up to date: note the time (status reports it)."""
        vol = self.volume
        vol.commit(_updated(vol.state()))

    # --- the sending side -------------------------------------------------------------------
    def snapshot_source(self, dry_run: bool = False, progress: Progress | None = None,
                        strict: bool = True) -> Snapshot | None:
        """Capture a read-write SRC's live changes as its next snapshot, if it changed (a dry
        run: the snapshot it would take, its trees kept in memory for planning). Unless
        `strict`, busy or unreadable files are recorded otherwise, in `scan_warnings`."""
        vol = self.volume
        state = vol.state()
        self.scan_warnings = ()
        if state.mode != READ_WRITE or state.journal:
            return None
        latest = vol.lineage(state)[-1].root if state.lineage else None
        if dry_run:
            result, objects = scan(vol, write=False, strict=strict)
            self.scan_warnings = tuple(result.file_warnings)
            if result.root == latest:
                return None
            self._objects = objects
            return Snapshot(new_snapshot_id(), next_number(vol, state), 0.0, None, result.root,
                            result.size, result.files, vol.config.volume_id)
        return self.commit_source(self.scan_source(progress, strict))

    def scan_source(self, progress: Progress | None = None, strict: bool = True
                    ) -> ScanResult | None:
        """The first half of `snapshot_source`: a read-write SRC's live changes stored (its
        new blocks and trees), not yet recorded; None where there is nothing to capture."""
        vol = self.volume
        state = vol.state()
        self.scan_warnings = ()
        if state.mode != READ_WRITE or state.journal:
            return None
        self._packs_before = set(vol.packs.pack_names())
        result, _ = scan(vol, write=True, progress=progress, strict=strict)
        self.scan_warnings = tuple(result.file_warnings)
        return result

    def commit_source(self, result: ScanResult | None) -> Snapshot | None:
        """The second half: the scan becomes SRC's next snapshot if the live tree changed
        (its stat cache is saved either way)."""
        if result is None:
            return None
        vol = self.volume
        state = vol.state()
        latest = vol.lineage(state)[-1].root if state.lineage else None
        if result.root == latest:
            vol.packs.flush()
            if result.cache_changed:
                vol.save_statcache(result.cache)
            return None
        snap = record_scan(vol, result, next_number(vol, state), None)
        vol.commit(state.with_(lineage=state.lineage + (snap.id,)))
        return snap

    def drop_source_scan(self) -> None:
        """Take back what `scan_source` stored (the transfer was refused): SRC's store is
        as it was, and its stat cache was not saved."""
        if self._packs_before is not None:
            self.volume.packs.drop_since(self._packs_before)

    def would_change_source(self) -> bool:
        """A read-write SRC whose live tree differs from its latest snapshot."""
        state = self.volume.state()
        if state.mode != READ_WRITE or state.journal:
            return False
        result, _ = scan(self.volume, write=False)
        return result.root != latest_root(self.volume, state)

    def _reader(self) -> Objects:
        if self._objects is None:
            self._objects = Objects(self.volume, write=False)
        return self._objects

    def read(self, ids: list[BlockId]) -> list[bytes]:
        """Trees and block lists, for planning (a dry run's new trees included)."""
        objects = self._reader()
        return [objects.raw(i) for i in ids]

    def export(self, ids: Iterable[BlockId], verify: bool = False
               ) -> Iterator[tuple[BlockId, bytes]]:
        """Objects to send. The receiver re-hashes each against its id, so they are not
        hashed here too (a block damaged in this store is refused there, exit 6)."""
        packs = self.volume.packs
        for object_id in ids:
            yield object_id, packs.get(object_id, verify=verify)

    def snapshot_record(self, snap_id: str) -> Snapshot:
        return self.volume.snapshot(snap_id)

    # --- the receiving side -----------------------------------------------------------------
    def has(self, ids: list[BlockId]) -> list[bool]:
        vol = self.volume
        return [i == vol.empty_tree or vol.packs.has(i) for i in ids]

    def inspect_live(self) -> LiveFacts:
        """Scan DST's live tree (hashing, storing nothing); kept for the live-tree write."""
        vol = self.volume
        state = vol.state()
        self._live = scan(vol, write=False)
        return _facts(vol, state, *self._live)

    @contextmanager
    def inspecting_live(self) -> Iterator[Callable[[], LiveFacts]]:
        """`inspect_live` in a child process (it only reads) while the caller works on the
        other volume, so the two scans use two cores; the yielded function waits for it.
        Where no child can be made, or it fails, the scan runs here when asked for (an error
        is then raised as `inspect_live` raises it)."""
        vol = self.volume
        state = vol.state()
        child = ReadingChild.start(lambda: _live_scan_out(vol))
        try:
            def facts() -> LiveFacts:
                got = child.result() if child else None
                if got is None:
                    return self.inspect_live()
                live, overlay = got
                if live.cache is None:
                    live = replace(live, cache=vol.load_statcache())
                objects = Objects(vol, write=False)
                objects.overlay = overlay
                self._live = (live, objects)
                return _facts(vol, state, live, objects)

            yield facts
        finally:
            if child:
                child.cancel()

    def keep_live_changes(self, progress: Progress | None = None) -> Snapshot | None:
        """Store DST's live tree and, if the planner's rule keeps it, write (not yet commit)
        a record of it, to be preserved."""
        vol = self.volume
        state = vol.state()
        if not state.lineage:
            self._live = scan(vol, write=False)
            return None
        self._live = scan(vol, write=True, progress=progress)
        if not keeps_live(state.mode, True, _facts(vol, state, *self._live)):
            vol.packs.flush()
            return None
        latest = vol.lineage(state)[-1]
        return record_scan(vol, self._live[0], latest.number + 1, "live changes before resync")

    def begin(self, kept: list[str]) -> None:
        """Announce the live-tree step (journal), the kept live changes preserved with it."""
        vol = self.volume
        state = vol.state()
        vol.commit(state.with_(preserved=state.preserved + tuple(kept),
                               journal={"op": JOURNAL_MATERIALIZE}))

    def receive(self, objects: Iterable[tuple[bytes, bytes]],
                progress: Progress | None = None) -> ReceiveCount:
        """Store objects sent by a peer, each re-hashed against its id (a wrong one stops
        the run, exit 6); sealed every SEAL_EVERY bytes, so a rerun resends only the rest."""
        vol = self.volume
        digest, size = vol.fmt.algo.digest, vol.fmt.algo.size
        count, unsealed = ReceiveCount(), 0
        known = set(vol.packs.pack_names())
        for object_id, data in objects:
            if len(object_id) != size or digest(data) != object_id:
                raise IntegrityError(f"object {bytes(object_id).hex()} from the peer failed "
                                     "its digest check (damaged in the sending store or on "
                                     "the way); nothing committed")
            if len(data) > vol.fmt.block_size and len(data) > (1 << 22):
                raise IntegrityError("object from the peer is larger than any block")
            vol.packs.put(BlockId(object_id), data)
            self._received += object_id
            crashpoint("object-received")
            count.objects += 1
            count.bytes += len(data)
            unsealed += len(data)
            if unsealed >= SEAL_EVERY:
                vol.packs.flush()
                known = _note_received(vol, known)
                unsealed = 0
            if progress:
                progress(len(data))
        vol.packs.flush()
        _note_received(vol, known)
        return count

    def add_snapshots(self, snaps: list[Snapshot]) -> None:
        vol = self.volume
        for snap in snaps:
            if len(snap.root) != vol.fmt.algo.size:
                raise IntegrityError(f"snapshot {snap.id}: root id of the wrong size")
            if snap.root != vol.empty_tree and not vol.packs.has(snap.root):
                raise IntegrityError(f"snapshot {snap.id}: its tree was not received")
            vol.write_snapshot(snap)  # flushes the packs first: data before metadata

    def materialize(self, target: BlockId, progress: Progress | None = None) -> NotRestored:
        """Bring the live tree (as the last scan found it) to `target`."""
        vol = self.volume
        live, objects = self._live if self._live else scan(vol, write=False)
        # what this run received was hashed on arrival: not hashed a second time here
        reader = Objects(vol, write=False,
                         checked_elsewhere=IdSet(self._received, vol.fmt.algo.size))
        reader.overlay = objects.overlay
        with vol.tmp_fd() as tmp_fd:
            writer = Materializer(reader, vol.fmt, live.cache, tmp_fd, progress)
            cache = writer.run(bytes(vol.root), live.root, target)
        vol.save_statcache(cache)
        return writer.skipped

    def receive_local(self, src: LocalEndpoint, planned: ObjectList, snaps: list[Snapshot],
                      target: BlockId, progress: Progress | None = None) -> NotRestored:
        """Both volumes on this machine: copy the objects store to store (the kernel copies
        runs of records) while a second thread writes the live tree from SRC's store."""
        vol, sent = self.volume, planned.id_set()
        live, dst_objects = self._live if self._live else scan(vol, write=False)
        objects = Objects(vol, write=False, source=src.volume, checked_elsewhere=sent)
        objects.overlay = dst_objects.overlay
        outcome: dict = {}
        with vol.tmp_fd() as tmp_fd:
            writer = Materializer(objects, vol.fmt, live.cache, tmp_fd)

            def write_live_tree() -> None:
                try:
                    outcome["cache"] = writer.run(bytes(vol.root), live.root, target)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    outcome["error"] = exc

            thread = threading.Thread(target=write_live_tree, name="volsync-materialize")
            thread.start()
            try:
                def received(length: int) -> None:
                    crashpoint("object-received")
                    if progress:
                        progress(length)

                vol.packs.put_many_from(src.volume.packs, planned.ids(), received)
                self.add_snapshots(snaps)
            finally:
                if sys.exc_info()[0] is not None:
                    objects.cancelled = True
                thread.join()
        if "error" in outcome:
            raise outcome["error"]
        vol.save_statcache(outcome["cache"])
        return writer.skipped

    def finish(self, expect_lineage: list[str], common: str | None, added: list[str],
               removed: list[str], live: str | None, upstream: str, upstream_id: str) -> None:
        """The one commit: SRC's snapshots join DST's lineage after the common one, DST's own
        later ones leave it (preserved, before its kept live changes), DST becomes SRC's
        read-only mirror and the live-tree step is done. Refused if DST's lineage is not
        what the plan was made from (compare-and-swap)."""
        vol = self.volume
        state = vol.state()
        if list(state.lineage) != list(expect_lineage):
            raise BadArgument(f"{self.address} changed while the transfer was planned; "
                              "nothing committed, run it again")
        keep = state.lineage[: state.lineage.index(common) + 1] if common else ()
        kept = (live,) if live else ()
        earlier = tuple(i for i in state.preserved if i not in kept)
        # its upstream no longer holds what it has as its mirror (a failover turned around)
        state = without_hold(state, upstream_id)
        extra = {k: v for k, v in state.extra.items() if k != RECEIVED_PACKS}
        vol.commit(_updated(state.with_(
            mode=READ_ONLY, upstream=upstream, upstream_id=upstream_id,
            lineage=keep + tuple(added), preserved=earlier + tuple(removed) + kept,
            journal=None, extra=extra)))

    def undo(self) -> None:
        """After a failed run, put the live tree back to its latest snapshot now (the next
        command would do the same from the journal)."""
        vol = self.volume
        vol.packs.discard()
        with suppress(Exception):  # a full disk: the temp files' space first
            vol.clear_tmp()
        with suppress(Exception):  # if this fails too, the journal stays for the next command
            recover(vol)

    def interrupted(self) -> None:
        """Ctrl-C or a lost peer: keep what was received (sealed) and the journal, so a rerun
        resumes the transfer (any other command undoes the step)."""
        with suppress(Exception):
            self.volume.packs.flush()

    def set_role(self, mode: str, upstream: str | None, upstream_id: str | None,
                 journal: dict | None) -> None:
        """role-swap's steps: one commit of mode, upstream and journal."""
        vol = self.volume
        vol.commit(vol.state().with_(mode=mode, upstream=upstream, upstream_id=upstream_id,
                                     journal=journal))

    def clear_journal(self) -> None:
        vol = self.volume
        vol.commit(vol.state().with_(journal=None))


LAST_UPDATE = "last_update"  # state.extra of a mirror: {"time", "snapshot"} of its last update


def _updated(state: VolumeState) -> VolumeState:
    mark = {"time": time.time(), "snapshot": state.lineage[-1] if state.lineage else None}
    return state.with_(extra={**state.extra, LAST_UPDATE: mark})


def _note_received(vol: Volume, known: set[str]) -> set[str]:
    """Name the packs sealed by a receive in the state, so that `prune` spares them for a
    grace period while no snapshot names their objects yet (a rerun resumes from them)."""
    names = set(vol.packs.pack_names())
    new = names - known
    if new:
        state = vol.state()
        received = dict(state.extra.get(RECEIVED_PACKS) or {})
        received.update({name: time.time() for name in new})
        vol.commit(state.with_(extra={**state.extra, RECEIVED_PACKS: received}))
    return names


def _live_scan_out(vol: Volume) -> tuple[ScanResult, dict]:
    """What a child scanning DST's live tree hands back: the scan and the trees it built;
    the stat cache only if it differs from the saved one (the parent loads that itself)."""
    live, objects = scan(vol, write=False)
    if not live.cache_changed:
        live = replace(live, cache=None)
    return live, objects.overlay


def _facts(vol: Volume, state: VolumeState, live, objects: Objects) -> LiveFacts:
    latest = latest_root(vol, state)
    # (a tree holding files has entries: its listing is read only when it holds none)
    empty = live.files == 0 and not objects.tree(live.root).entries
    return LiveFacts(empty, live.root != latest, bool(live_differs(objects, latest, live.root)))


def _new_mirror_dir(path: Path) -> bool:
    """A missing or empty directory becomes a new mirror; a non-empty non-volume is refused."""
    if not os.path.lexists(path):
        return True
    if not path.is_dir():
        raise BadArgument(f"{path} exists and is not a directory")
    if is_volume(path):
        return False
    leftover = is_create_leftover(path)
    if any(p.name != META or not leftover for p in path.iterdir()):
        raise NoCommonSnapshot(f"{path} is not empty and not a volume: no common snapshot")
    return True


__all__ = ["LiveFacts", "LocalEndpoint", "ReceiveCount", "VolumeInfo"]
