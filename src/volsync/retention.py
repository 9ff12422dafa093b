"""What a volume keeps: holds (which mirror still needs which snapshot), retention rules
(`--keep-last`, an age grid as sanoid and zrepl have), and the commands that drop snapshots:
`prune` and `destroy`. A held snapshot survives both unless forced.

Holds live in the volume's state (`extra["holds"]`): for each mirror, by volume id, the
address it was reached at, the snapshots it holds and when. A transfer or resync records them
on its source under the source's lock, before it sends: the newest common snapshot and the one
being sent, so that whichever the mirror ends with is still there for the next run."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from .errors import BadArgument, Diverged
from .model import Snapshot, VolumeState
from .ops import fresh_received, live_objects, received_packs, writing
from .store.fsutil import fsync_dir
from .store.volume import Volume, preserved_names

HOLDS = "holds"  # state.extra
MAX_HOLDS = 4096  # a state names at most this many mirrors (hostile or runaway input)


@dataclass(frozen=True)
class Hold:
    mirror_id: str
    address: str
    snapshots: tuple[str, ...]
    time: float


def holds(state: VolumeState) -> list[Hold]:
    """The volume's holds, oldest mirror first; malformed entries are ignored (and dropped
    at the next change)."""
    found = []
    raw = state.extra.get(HOLDS)
    for mirror_id, body in (raw.items() if isinstance(raw, dict) else ()):
        try:
            snaps = tuple(s for s in body["snapshots"] if isinstance(s, str))
            hold = Hold(str(mirror_id), str(body["address"]), snaps, float(body["time"]))
        except (KeyError, TypeError, ValueError):
            continue
        found.append(hold)
    return sorted(found, key=lambda h: h.time)


def held_ids(state: VolumeState) -> set[str]:
    return {s for h in holds(state) for s in h.snapshots}


def with_hold(state: VolumeState, mirror_id: str, address: str,
              snapshots: list[str]) -> VolumeState:
    """The state with `mirror_id` holding `snapshots` (those the volume still has)."""
    known = set(state.lineage + state.preserved)
    table = {h.mirror_id: h for h in holds(state)}
    table[mirror_id] = Hold(mirror_id, address, tuple(dict.fromkeys(
        s for s in snapshots if s in known)), time.time())
    if len(table) > MAX_HOLDS:
        raise BadArgument(f"more than {MAX_HOLDS} mirrors hold snapshots of this volume")
    return state.with_(extra={**state.extra, HOLDS: _table_body(table.values())})


def without_hold(state: VolumeState, mirror_id: str) -> VolumeState:
    table = [h for h in holds(state) if h.mirror_id != mirror_id]
    extra = {k: v for k, v in state.extra.items() if k != HOLDS}
    return state.with_(extra=extra | ({HOLDS: _table_body(table)} if table else {}))


def _table_body(table) -> dict:
    return {h.mirror_id: {"address": h.address, "snapshots": list(h.snapshots),
                          "time": h.time} for h in table}


def record_hold(volume: Volume, mirror_id: str, address: str, snapshots: list[str]) -> bool:
    """Under the volume's lock: commit the hold unless it already says the same. Returns
    whether anything changed."""
    state = volume.state()
    current = {h.mirror_id: h for h in holds(state)}.get(mirror_id)
    new = with_hold(state, mirror_id, address, snapshots)
    if current and (current.address, current.snapshots) == (
            address, tuple(new.extra[HOLDS][mirror_id]["snapshots"])):
        return False
    volume.commit(new)
    return True


def find_hold(state: VolumeState, mirror: str) -> Hold:
    """A hold by its mirror's volume id (or a unique prefix of it) or address."""
    table = holds(state)
    exact = [h for h in table if mirror in (h.mirror_id, h.address)]
    found = exact or [h for h in table if len(mirror) >= 8 and h.mirror_id.startswith(mirror)]
    if len(found) == 1:
        return found[0]
    if found:
        raise BadArgument(f"{mirror!r} names several mirrors; give the whole volume id")
    raise BadArgument(f"no mirror {mirror!r} holds snapshots of this volume "
                      "(see 'volsync holds')")


def release(volume: Volume, mirror: str, wait: float = 0.0) -> Hold:
    """Drop one mirror's hold (a mirror that is gone)."""
    with writing(volume, wait):
        state = volume.state()
        hold = find_hold(state, mirror)
        volume.commit(without_hold(state, hold.mirror_id))
        return hold


# --- retention rules ----------------------------------------------------------------------------

PERIODS: dict[str, Callable[[datetime], tuple]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}


def parse_keep(text: str) -> dict[str, int]:
    """`hourly=24,daily=7,weekly=4,monthly=12` (also `yearly`)."""
    rules: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"([a-z]+)=(\d+)", part)
        if not m or m.group(1) not in PERIODS:
            raise BadArgument(f"--keep {part!r}: expected PERIOD=N with PERIOD one of "
                              f"{', '.join(PERIODS)}")
        rules[m.group(1)] = int(m.group(2))
    if not rules:
        raise BadArgument("--keep: no rule given (like hourly=24,daily=7)")
    return rules


def kept_by_grid(lineage: list[Snapshot], rules: dict[str, int]) -> set[str]:
    """For each rule PERIOD=N, the newest snapshot of each of the N newest periods (local
    time) that have one, as sanoid and restic keep them."""
    kept: set[str] = set()
    for period, count in rules.items():
        key = PERIODS[period]
        seen: list[tuple] = []
        for snap in reversed(lineage):
            bucket = key(datetime.fromtimestamp(snap.created))
            if bucket in seen:
                continue
            if len(seen) >= count:
                break
            seen.append(bucket)
            kept.add(snap.id)
    return kept


# --- prune and destroy --------------------------------------------------------------------------

@dataclass(frozen=True)
class PrunePlan:
    remove: tuple[Snapshot, ...]  # lineage snapshots to drop
    drop_preserved: tuple[Snapshot, ...]
    held: tuple[Snapshot, ...] = ()  # snapshots the rules would drop, kept for a mirror


@dataclass(frozen=True)
class PruneResult:
    plan: PrunePlan
    blocks_freed: int
    bytes_freed: int


def plan_prune(volume: Volume, keep_last: int | None, preserved: bool,
               keep: dict[str, int] | None = None) -> PrunePlan:
    if keep_last is not None and keep_last < 1:
        raise BadArgument("--keep-last must be at least 1 (the latest snapshot is always kept)")
    state = volume.state()
    lineage = volume.lineage(state)
    held = held_ids(state)
    if keep_last is None and keep is None:
        candidates: list[Snapshot] = []
    else:
        kept = {s.id for s in lineage[-(keep_last or 1):]}
        kept |= kept_by_grid(lineage, keep or {})
        candidates = [s for s in lineage if s.id not in kept]
    dropped = list(volume.preserved(state)) if preserved else []
    return PrunePlan(tuple(s for s in candidates if s.id not in held),
                     tuple(s for s in dropped if s.id not in held),
                     tuple(s for s in candidates + dropped if s.id in held))


def prune(volume: Volume, keep_last: int | None, preserved: bool, wait: float = 0.0,
          dry_run: bool = False, keep: dict[str, int] | None = None) -> PruneResult:
    with writing(volume, wait):
        plan = plan_prune(volume, keep_last, preserved, keep)
        if dry_run:
            return PruneResult(plan, *would_free(volume, {s.id for s in plan.remove
                                                            + plan.drop_preserved}))
        freed = drop_snapshots(volume, {s.id for s in plan.remove + plan.drop_preserved}, wait)
        return PruneResult(plan, *freed)


def drop_snapshots(volume: Volume, gone: set[str], wait: float) -> tuple[int, int]:
    """Under the volume's lock: take snapshots out of the state (one commit), then delete
    their records and the objects nothing else refers to, while no send reads the volume.
    Returns (objects freed, bytes freed)."""
    with volume.deleting(wait):
        state = volume.state()
        if gone:
            state = state.with_(lineage=tuple(i for i in state.lineage if i not in gone),
                                preserved=tuple(i for i in state.preserved if i not in gone))
            volume.commit(state)
        volume.remove_snapshot_records(set(state.lineage + state.preserved))
        fsync_dir(volume.meta / "snapshots")
        live = live_objects(volume)
        return volume.packs.repack(live, spare=received_packs(volume))


def would_free(volume: Volume, gone: set[str]) -> tuple[int, int]:
    """What drop_snapshots(gone) would free, by the same reachability, changing nothing."""
    state = volume.state()
    state = state.with_(lineage=tuple(i for i in state.lineage if i not in gone),
                        preserved=tuple(i for i in state.preserved if i not in gone))
    live = live_objects(volume, state)
    return volume.packs.garbage(live, spare=set(fresh_received(state)))


@dataclass(frozen=True)
class DestroyResult:
    snapshot: Snapshot
    name: str  # its number, or pN for a preserved one
    held_by: tuple[Hold, ...]
    blocks_freed: int
    bytes_freed: int


def destroy(volume: Volume, target: Snapshot, force: bool = False, wait: float = 0.0,
            dry_run: bool = False) -> DestroyResult:
    """Drop one snapshot (not the lineage's latest, the live tree's base). A snapshot a
    mirror holds is refused (exit 5) unless `force`."""
    with writing(volume, wait):
        state = volume.state()
        lineage = volume.lineage(state)
        if lineage and target.id == lineage[-1].id:
            raise BadArgument(f"snapshot {target.number} is the latest of the lineage (the live "
                              "tree's base); take a new snapshot first")
        name = preserved_names(state).get(target.id) or str(target.number)
        held_by = tuple(h for h in holds(state) if target.id in h.snapshots)
        if held_by and not force:
            who = ", ".join(f"{h.address} ({h.mirror_id[:12]})" for h in held_by)
            raise Diverged(f"snapshot {name} is held by mirror {who}: destroying it would "
                           "force that mirror's next transfer into a full baseline; pass "
                           "--force, or 'volsync release' the hold first")
        if dry_run:
            return DestroyResult(target, name, held_by, *would_free(volume, {target.id}))
        freed = drop_snapshots(volume, {target.id}, wait)
        return DestroyResult(target, name, held_by, *freed)
