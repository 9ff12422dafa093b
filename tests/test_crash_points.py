"""Crash safety by exhaustive enumeration: every state-changing command is killed at every
durable step it passes, and no kill may lose data.

For each command, an uninterrupted run with VOLSYNC_CRASH_TRACE=FILE lists every passage of a
crash point (store/crash.py); then for each (point, N) the command is run again from the same
starting state in a child process with VOLSYNC_CRASH_AT=point:N, which dies (exit 137) right
there, and:

  * at the moment of the crash: never two read-write volumes; a --link points at exactly one
    of the two volumes, and at B only once B is read-write;
  * `volsync verify` passes on every volume (it finishes an interrupted live-tree step);
  * rerunning the command exits 0 (for `break`, whose rerun on a volume it already made
    read-write is refused by contract with exit 1, the crash must then have left the final
    state);
  * the end state equals the uninterrupted run's: modes, upstreams, journal, every lineage and
    preserved snapshot by number and tree root (and by id for those that existed before; new
    snapshots get fresh random ids), every live tree with modes and mtimes. (`snapshot` is not
    idempotent: killed after its commit, its rerun adds one more snapshot of the same tree.)
  * nothing is lost: every snapshot that existed before still restores (`volsync restore`)
    to its old content, and every volume's live tree as it was before the command restores
    from one of that volume's snapshots (for revert and resync: DST's diverged snapshots and
    its live changes are preserved snapshots);
  * no temp file is left after the rerun (`.tmp-*` in `.volsync`, `.volsync-tmp-*` in live
    trees, a `.pack` without its `.idx`).

The child is forked from the test process and re-reads the crash switches from its
environment (bench/crash_sweep.py `Forked`): the same code path as a fresh `volsync` process
without 0.15 s of interpreter start-up per case. VOLSYNC_TEST_EXEC=1 runs real `python -m
volsync` processes instead (slower, same results).

Sampling: the points passed once per file written (`live-entry-written`) or per object
received (`object-received`) are tried at their first three passages, the middle one and the
last; every other point is tried at every passage. VOLSYNC_CRASH_FULL=1 tries them all.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import crash_sweep as cs

from volsync.store.volume import Volume, is_volume

CRASHED = 137
# VOLSYNC_CRASH_FULL=1 tries every passage of every point (no sampling; a few minutes)
SAMPLED = set() if os.environ.get("VOLSYNC_CRASH_FULL") == "1" else {"live-entry-written",
                                                                       "object-received"}
FORK = os.environ.get("VOLSYNC_TEST_EXEC", "") != "1"


# --- small trees (block size 4K: multi-block files are cheap) --------------------------------------

def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def base_files() -> dict[str, bytes]:
    files = {f"f{i:02d}.txt": f"file {i}\n".encode() * (i + 1) for i in range(14)}
    files.update({f"d/g{i}": rnd(200 + 300 * i, 100 + i) for i in range(6)})
    files.update({f"d/e/h{i}": rnd(50 * i, 200 + i) for i in range(4)})
    files.update({"big1.bin": rnd(6 * 4096 + 100, 1),      # patched in place
                  "d/big2.bin": rnd(9 * 4096, 2),           # rewritten
                  "d/e/big3.bin": rnd(3 * 4096 + 7, 3),     # deleted
                  "zero": b""})
    return files


def write(root: Path, files: dict[str, bytes | None]) -> None:
    for rel, data in files.items():
        p = root / rel
        if data is None:
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def make_a(root: Path) -> Path:
    a = root / "A"
    write(a, base_files())
    (a / "empty").mkdir()
    os.symlink("d/g1", a / "lnk")
    cs.age(a, 1_600_000_000)
    cs.ok("init", a, "--block-size", "4K")
    cs.ok("snapshot", a)
    return a


def edit(vol: Path, seed: int) -> None:
    """Patch one block of a big file, rewrite another, delete a file and a directory, add a
    directory and files, change a mode; then give everything a fixed mtime."""
    big = bytearray((vol / "big1.bin").read_bytes())
    big[4096 + seed % 4000] ^= 0xFF
    write(vol, {"big1.bin": bytes(big), "d/big2.bin": rnd(7 * 4096 + seed, seed),
                f"f{seed % 14:02d}.txt": f"edited {seed}\n".encode(),
                f"new-{seed}/n.bin": rnd(2 * 4096 + 1, seed + 1), f"new-{seed}.txt": b"new",
                "d/e/big3.bin": None, f"d/g{seed % 6}": None})
    if (vol / "d/e").exists() and seed % 2:
        shutil.rmtree(vol / "d/e")
    os.chmod(vol / f"f{(seed + 1) % 14:02d}.txt", 0o600)
    cs.age(vol, 1_600_000_000 + seed * 1000)


# --- scenarios: build the starting state under root, return (command, volumes, link) --------------

def sc_snapshot(root):
    a = make_a(root)
    edit(a, 11)
    return ["snapshot", a], ["A"], None


def _history(root):
    """A with snapshots 1-4, each changing big files, and live changes."""
    a = make_a(root)
    for seed in (21, 22, 23):
        edit(a, seed)
        cs.ok("snapshot", a)
    edit(a, 24)
    return a


def sc_revert(root):
    a = _history(root)
    return ["revert", a, "2"], ["A"], None


def _pruneable(root):
    a = _history(root)
    cs.ok("revert", a, "3")  # 4 and the live changes become preserved
    edit(a, 25)
    cs.ok("snapshot", a)  # a new 4
    return a


def sc_prune_keep_last(root):
    a = _pruneable(root)
    return ["prune", a, "--keep-last", "1"], ["A"], None


def sc_prune_preserved(root):
    a = _pruneable(root)
    return ["prune", a, "--preserved"], ["A"], None


def sc_baseline(root):
    a = make_a(root)
    edit(a, 31)  # SRC's live changes are snapshotted first
    return ["transfer", a, root / "B"], ["A", "B"], None


def sc_incremental(root):
    a = make_a(root)
    cs.ok("transfer", a, root / "B")
    edit(a, 41)
    cs.ok("snapshot", a)
    edit(a, 42)
    return ["transfer", a, root / "B"], ["A", "B"], None


def sc_resync(root):
    a, b = make_a(root), root / "B"
    cs.ok("transfer", a, b)
    edit(a, 51)
    cs.ok("snapshot", a)
    edit(a, 52)
    cs.ok("break", b)
    edit(b, 53)
    cs.ok("snapshot", b)
    edit(b, 54)
    write(b, {"b-live": b"b only"})
    cs.age(b, 1_600_099_000)
    return ["resync", "--force", a, b], ["A", "B"], None


def sc_reverse_resync(root):
    a, b = make_a(root), root / "B"
    cs.ok("transfer", a, b)
    cs.ok("break", b)  # failover: A is lost...
    edit(a, 61)  # ...with a snapshot and live changes that never reached B
    cs.ok("snapshot", a)
    edit(a, 62)
    edit(b, 63)  # users work on B
    cs.ok("snapshot", b)
    edit(b, 64)
    return ["resync", "--force", b, a], ["A", "B"], None


def _swap(root):
    a, b = make_a(root), root / "B"
    cs.ok("transfer", a, b)
    edit(a, 71)
    cs.ok("snapshot", a)
    edit(a, 72)  # the last changes, snapshotted and sent by the swap
    return a, b


def sc_role_swap(root):
    a, b = _swap(root)
    return ["role-swap", a, b], ["A", "B"], None


def sc_role_swap_link(root):
    a, b = _swap(root)
    os.symlink(a, root / "current")
    return ["role-swap", a, b, "--link", root / "current"], ["A", "B"], "current"


def sc_break(root):
    a, b = make_a(root), root / "B"
    cs.ok("transfer", a, b)
    return ["break", b], ["A", "B"], None


SCENARIOS = {
    "snapshot": sc_snapshot, "revert": sc_revert, "prune-keep-last": sc_prune_keep_last,
    "prune-preserved": sc_prune_preserved, "transfer-baseline": sc_baseline,
    "transfer-incremental": sc_incremental, "resync": sc_resync,
    "resync-reverse": sc_reverse_resync, "role-swap": sc_role_swap,
    "role-swap-link": sc_role_swap_link, "break": sc_break,
}


# --- the enumeration -------------------------------------------------------------------------------

class PointCase(cs.Case):
    """A scenario with the trace of its uninterrupted run and the content of everything that
    existed before it."""

    def __post_init__(self) -> None:
        trace = self.base / "trace"
        self.trace_env = {"VOLSYNC_CRASH_TRACE": str(trace)}
        super().__post_init__()
        self.passages = trace.read_text().split() if trace.exists() else []
        trace.unlink(missing_ok=True)
        # what every snapshot that existed before holds, and every live tree before
        self.reset()
        self.snap_content: dict[tuple[str, str], dict] = {}
        for name, roots in self.before_roots.items():
            for snap_id in roots:
                self.snap_content[(name, snap_id)] = self.restored(name, snap_id)

    def run_uninterrupted(self):  # used by cs.Case.__post_init__
        return cs.run_cmd(self.cmd, env=self.trace_env, fork=self.fork)

    def restored(self, name: str, snap_id: str) -> dict:
        dest = self.base / f"restore-{len(os.listdir(self.base))}"
        cs.ok("restore", self.root / name, snap_id, dest)
        try:
            return cs.content(dest)
        finally:
            shutil.rmtree(dest)

    def cases(self) -> list[tuple[str, int]]:
        counts: dict[str, int] = {}
        for p in self.passages:
            counts[p] = counts.get(p, 0) + 1
        out = []
        for point, total in counts.items():
            ns = range(1, total + 1)
            if point in SAMPLED:
                ns = sorted({1, 2, 3, (total + 1) // 2, total} & set(ns))
            out += [(point, n) for n in ns]
        return out

    def nothing_lost(self, what: str) -> list[str]:
        """Every snapshot that existed before restores to its old content (unless the
        command's very purpose was to drop it: prune); every live tree as it was before
        restores from one of its volume's snapshots."""
        problems = []
        kept = {name: {r[2] for r in s["lineage"] + s["preserved"]}
                for name, s in self.expected.items() if isinstance(s, dict)}
        for (name, snap_id), old in self.snap_content.items():
            if snap_id not in kept[name]:
                continue  # pruned on purpose (the uninterrupted run drops it too)
            roots = cs.snapshot_roots(self.root / name)
            if snap_id not in roots:
                problems.append(f"{what}: snapshot {snap_id[:12]} of {name} is gone")
            elif self.restored(name, snap_id) != old:
                problems.append(f"{what}: snapshot {snap_id[:12]} of {name} restores wrong")
        for name, live in self.before_live.items():
            roots = cs.snapshot_roots(self.root / name)
            seen: set[bytes] = set()
            for snap_id in sorted(roots, key=lambda i: i in self.known_ids):  # new ones first
                if roots[snap_id] in seen:
                    continue
                seen.add(roots[snap_id])
                if self.restored(name, snap_id) == live:
                    break
            else:
                problems.append(f"{what}: {name}'s live tree before the command is in none of "
                                f"its {len(roots)} snapshots")
        return problems


def crash_moment_problems(case: PointCase, what: str) -> list[str]:
    problems: list[str] = []
    if not case.name.startswith("role-swap"):
        return problems
    states = {n: Volume.open(case.root / n).state() for n in case.names if is_volume(case.root / n)}
    if sum(s.mode == "read-write" for s in states.values()) > 1:
        problems.append(f"{what}: two read-write volumes at the crash: "
                        f"{ {n: (s.mode, s.upstream) for n, s in states.items()} }")
    if case.link:
        link = case.root / case.link
        target = os.readlink(link) if link.is_symlink() else None
        if target not in (str(case.root / "A"), str(case.root / "B")):
            problems.append(f"{what}: --link points at {target!r}, not at A or B")
        elif target == str(case.root / "B") and states["B"].mode != "read-write":
            problems.append(f"{what}: --link points at B before B is read-write")
    return problems


def run_all(case: PointCase) -> tuple[int, list[str]]:
    problems: list[str] = []
    cases = case.cases()
    for point, n in cases:
        what = f"{case.name} {point}:{n}"
        case.reset()
        code = cs.run_cmd(case.cmd, env={"VOLSYNC_CRASH_AT": f"{point}:{n}"}, fork=case.fork).code
        if code != CRASHED:
            # every tried passage came in the traced run; the trees are aged and copied
            # (new inodes: no stat-cache hits), so every run passes the same points
            problems.append(f"{what}: expected the crash (137), got exit {code}")
            continue
        problems += crash_moment_problems(case, what)
        problems += [f"{what} (after the crash): {p}" for p in cs.verify_problems(case.root, case.names)]
        broken_already = case.name == "break" and case.summary() == case.expected
        rerun = cs.vs(*case.cmd)
        if broken_already and rerun.code == 1 and "already read-write" in rerun.err:
            rerun = cs.Result(0, "", "")  # break finished before the crash: nothing to redo
        problems += case.check_after(what, rerun, extra_ok=case.extra_ok)
        problems += case.nothing_lost(what)
    return len(cases), problems


def snapshot_extra_ok(case: PointCase):
    """`snapshot` killed after its commit: its rerun adds one more snapshot of the same tree."""
    def ok(got: dict) -> bool:
        want = case.expected["A"]
        last = want["lineage"][-1]
        extra = {**want, "lineage": want["lineage"] + [(last[0] + 1, last[1], "new")]}
        return got["A"] == extra
    return ok


# --- tests -----------------------------------------------------------------------------------------

def make_case(tmp_path: Path, name: str) -> PointCase:
    case = PointCase(tmp_path, name, lambda root: tuple(SCENARIOS[name](root)), fork=FORK)
    case.extra_ok = snapshot_extra_ok(case) if name == "snapshot" else None
    return case


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_crash_point(tmp_path, name):
    case = make_case(tmp_path, name)
    assert case.passages, f"{name} passes no crash point"
    tried, problems = run_all(case)
    print(f"{name}: {tried} (point, N) cases of {len(case.passages)} passages")
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} problems in {tried} cases)"


def _sample(passages: list[str]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for p in passages:
        counts[p] = counts.get(p, 0) + 1
    return [(p, n) for p, total in counts.items()
            for n in sorted({1, min(2, total), (total + 1) // 2, total})]


@pytest.mark.parametrize("name", ["revert", "transfer-incremental", "resync", "role-swap-link"])
def test_crash_during_the_rerun(tmp_path, name):
    """A second crash, inside the rerun that recovers from the first one (killed in the
    middle of the live-tree step), loses nothing either: the rerun after it still ends in
    the uninterrupted run's state. Each point of the recovering rerun is tried at its first,
    second, middle and last passage."""
    case = make_case(tmp_path, name)
    first = "live-entry-written:2"
    case.reset()
    assert cs.run_cmd(case.cmd, env={"VOLSYNC_CRASH_AT": first}, fork=FORK).code == CRASHED
    crashed_tpl = tmp_path / "tpl-crashed"
    shutil.copytree(case.root, crashed_tpl, symlinks=True)
    clean_tpl, case.tpl = case.tpl, crashed_tpl
    case.reset()
    trace = tmp_path / "trace-rerun"
    assert cs.run_cmd(case.cmd, env={"VOLSYNC_CRASH_TRACE": str(trace)}, fork=FORK).code == 0
    problems = case.check_after(f"{name} {first} then rerun", cs.Result(0, "", ""),
                                extra_ok=case.extra_ok)
    cases = _sample(trace.read_text().split())
    for point, n in cases:
        what = f"{name} {first}, then the rerun at {point}:{n}"
        case.reset()
        code = cs.run_cmd(case.cmd, env={"VOLSYNC_CRASH_AT": f"{point}:{n}"}, fork=FORK).code
        if code != CRASHED:
            problems.append(f"{what}: expected the crash (137), got exit {code}")
            continue
        problems += crash_moment_problems(case, what)
        problems += [f"{what} (after the crash): {p}" for p in cs.verify_problems(case.root, case.names)]
        problems += case.check_after(what, cs.vs(*case.cmd), extra_ok=case.extra_ok)
        problems += case.nothing_lost(what)
    case.tpl = clean_tpl
    print(f"{name}: {len(cases)} second-crash cases")
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} problems)"
