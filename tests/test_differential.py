"""Differential test, rsync as the oracle: volsync's mirrors, restores and reverts must hold
exactly what `rsync -aHAXS --numeric-ids` keeps of the tree they were made from (content,
type, mode with setuid/setgid/sticky, numeric owner, nanosecond mtimes of files, directories
and symlinks, xattrs, ACLs, hard links, holes, fifos, devices, the root's own metadata).

volsync runs only through its command line (in-process `volsync.cli.main`, or a real
`python -m volsync` subprocess with VOLSYNC_DIFF_SUBPROCESS=1).

Random sequences over volumes A (source), B (mirror of A) and C (mirror of B): edit A,
snapshot, transfer A B, transfer B C, revert, restore, and a failover cycle (break B, edit B,
resync B A, then role-swap B A or break A + resync A B). At every snapshot the live tree is
copied with rsync (the reference copy of that snapshot). After every volsync command:
  - every volume whose live tree should equal its latest snapshot (a mirror, a source just
    snapshotted or reverted) equals that snapshot's reference copy (rsync -nic prints nothing,
    no extra hard links, holes kept);
  - `volsync status` reports the expected mode and upstream, `volsync verify` passes;
  - no file outside the volumes changed (content, mode, owner, mtime, ctime, inode, xattrs).

Knobs (environment):
  VOLSYNC_DIFF_SEEDS     seeds: `1,2,3` (default), `100`, `1-20`
  VOLSYNC_DIFF_STEPS     steps per seed (default 10)
  VOLSYNC_DIFF_ENTRIES   entries in the first tree (default 25)
  VOLSYNC_DIFF_FEATURES  what the generator makes: `all` (default), `basic`, `xattrs,acls`,
                         `all,-sparse` (see tests/treegen.py)
  VOLSYNC_DIFF_SUBPROCESS=1  run `python -m volsync` as a child process for every command
  VOLSYNC_DIFF_CMD_TIMEOUT   seconds one volsync command may take (default 120)
One seed long: VOLSYNC_DIFF_SEEDS=100 VOLSYNC_DIFF_STEPS=60 pytest tests/test_differential.py
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import traceback
from pathlib import Path

import pytest
from helpers import sub, vs
from oracle import HAVE_RSYNC, compare, copy_tree, outside_changes, outside_state
from treegen import ALL_FEATURES, HAVE_SETFACL, IS_ROOT, ROOT_ONLY, TreeGen, features_from_env

pytestmark = pytest.mark.skipif(not HAVE_RSYNC, reason="rsync is not installed (it is the oracle)")


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            out += range(int(lo), int(hi) + 1)
        elif part:
            out.append(int(part))
    return out


SEEDS = _seeds(os.environ.get("VOLSYNC_DIFF_SEEDS", "1,2,3"))
STEPS = int(os.environ.get("VOLSYNC_DIFF_STEPS", "10"))
ENTRIES = int(os.environ.get("VOLSYNC_DIFF_ENTRIES", "25"))
FEATURES = features_from_env()
SUBPROCESS = os.environ.get("VOLSYNC_DIFF_SUBPROCESS") == "1"
MAX_LINES = 150
CMD_TIMEOUT = float(os.environ.get("VOLSYNC_DIFF_CMD_TIMEOUT", "120"))


class CommandTimeout(BaseException):
    """Raised in the main thread by SIGALRM (a BaseException: the CLI's own `except
    Exception` must not swallow it)."""


def run_volsync(*args):
    """`volsync ARGS` in-process (or as a subprocess), given CMD_TIMEOUT seconds: a command
    that blocks (say, opening a fifo for reading) fails the test instead of hanging it."""
    if SUBPROCESS:
        try:
            return sub(*args, timeout=CMD_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise CommandTimeout(f"no exit within {CMD_TIMEOUT:g} s") from exc

    def alarm(signum, frame):
        raise CommandTimeout(f"no exit within {CMD_TIMEOUT:g} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, CMD_TIMEOUT)
    try:
        return vs(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def timeout_lines(exc: CommandTimeout) -> list[str]:
    tb = traceback.format_exception(exc)
    return [f"{exc} (VOLSYNC_DIFF_CMD_TIMEOUT); where it was:"] + \
        "".join(tb).splitlines()[-24:]


def rmtree(path) -> None:
    """Remove a tree whose directories may be read-only (mode 0o555, 0o000)."""
    path = os.fsencode(os.fspath(path))
    if not os.path.lexists(path):
        return
    if not IS_ROOT:
        for dirpath, dirnames, _ in os.walk(path):
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if not os.path.islink(full):
                    os.chmod(full, 0o700)
    shutil.rmtree(path)


class Scenario:
    """One seeded random sequence; `history` is the replayable account shown on failure."""

    def __init__(self, tmp: Path, seed: int, features=FEATURES):
        self.tmp = tmp
        self.seed = seed
        self.rng = random.Random(seed * 7919 + 17)
        self.gen = TreeGen(seed, features)
        self.vol = {n: tmp / n for n in "ABC"}
        self.outside = tmp / "outside"
        self.refdir = tmp / "refs"
        self.refdir.mkdir()
        self.refs: dict[str, Path] = {}        # snapshot id -> reference copy
        self.unknown: set[str] = set()         # ids whose live tree the harness could not tell
        self.mode: dict[str, str] = {}         # volume -> read-write / read-only
        self.upstream: dict[str, str | None] = {}
        self.dirty: set[str] = set()           # live tree edited since its latest snapshot
        self.history: list[str] = []
        self._gen_seen = 0
        self._copies = 0

    # --- running and reporting --------------------------------------------------------------

    def _show_arg(self, a) -> str:
        s = os.fsdecode(a) if isinstance(a, bytes) else str(a)
        return s.replace(str(self.tmp) + "/", "")

    def note(self, text: str) -> None:
        self.history.append(text)

    def log_gen(self, limit: int = 400) -> None:
        lines = self.gen.log[self._gen_seen:]
        self._gen_seen = len(self.gen.log)
        for line in lines[:limit]:
            self.history.append("      gen: " + line.replace(str(self.tmp) + "/", ""))
        if len(lines) > limit:
            self.history.append(f"      gen: ... {len(lines) - limit} more")

    def fail(self, what: str, lines: list[str] = ()) -> None:
        shown = list(lines)[:MAX_LINES]
        if len(lines) > MAX_LINES:
            shown.append(f"... {len(lines) - MAX_LINES} more lines")
        text = "\n".join([
            f"differential test failed, seed {self.seed}, features "
            f"{','.join(sorted(self.gen.features)) or '(none)'}",
            f"replay: VOLSYNC_DIFF_SEEDS={self.seed} VOLSYNC_DIFF_STEPS=<n> "
            f"pytest tests/test_differential.py -k 'random_sequence'",
            "history:",
            *("  " + h for h in self.history),
            "",
            "FAILED: " + what,
            *("    " + line for line in shown),
            f"(work directory kept: {self.tmp})",
        ])
        (self.tmp / "FAILURE.txt").write_text(text, errors="backslashreplace")
        pytest.fail(text, pytrace=False)

    def cli(self, *args, expect: int = 0):
        """Run `volsync ARGS`; insist on exit `expect`; check the outside files stayed put."""
        vols = list(self.vol.values())
        before = outside_state(self.gen.outside, vols)
        try:
            r = run_volsync(*args)
        except CommandTimeout as exc:
            self.note(f"$ volsync {' '.join(self._show_arg(a) for a in args)}  -> TIMEOUT")
            self.fail("the command did not finish", timeout_lines(exc))
        self.note(f"$ volsync {' '.join(self._show_arg(a) for a in args)}  -> exit {r.code}")
        if r.code != expect:
            self.fail(f"exit {r.code}, expected {expect}",
                      (r.out + r.err).splitlines())
        changed = outside_changes(before, outside_state(self.gen.outside, vols))
        if changed:
            self.fail("a file OUTSIDE the volumes changed (it is hard-linked into a volume)",
                      changed)
        return r

    def query(self, *args) -> dict:
        try:
            r = run_volsync(*args, "--json")
        except CommandTimeout as exc:
            self.fail(f"volsync {' '.join(map(self._show_arg, args))} --json did not finish",
                      timeout_lines(exc))
        if r.code != 0:
            self.fail(f"volsync {' '.join(map(self._show_arg, args))} --json -> exit {r.code}",
                      (r.out + r.err).splitlines())
        return r.json

    def exists(self, name: str) -> bool:
        return name in self.mode

    def snapshots(self, name: str, all_: bool = True) -> list[dict]:
        args = ["snapshots", self.vol[name]] + (["--all"] if all_ else [])
        return self.query(*args)["snapshots"]

    def lineage(self, name: str) -> list[str]:
        return [s["id"] for s in self.snapshots(name, all_=False)]

    # --- reference copies -------------------------------------------------------------------

    def pending(self, names) -> dict[str, Path]:
        """Copies of the live trees a command may snapshot (read-write volumes)."""
        out = {}
        for name in names:
            if self.exists(name) and self.mode[name] == "read-write":
                self._copies += 1
                dst = self.refdir / f"{self._copies:03d}-{name}"
                copy_tree(self.vol[name], dst)
                out[name] = dst
        return out

    def register(self, names, pend: dict[str, Path]) -> set[str]:
        """Give each snapshot that appeared on NAMES (in order) the copy taken before;
        returns the names that got one."""
        got = set()
        for name in names:
            if not self.exists(name):
                continue
            new = [s for s in self.snapshots(name) if s["id"] not in self.refs
                   and s["id"] not in self.unknown]
            if not new:
                continue
            if len(new) == 1 and name in pend:
                s = new[0]
                self.refs[s["id"]] = pend.pop(name)
                got.add(name)
                kind = "preserved" if s["preserved"] else "lineage"
                self.note(f"      ({kind} snapshot {s['number']} {s['id'][:8]} of {name}: "
                          f"reference {self.refs[s['id']].name})")
            else:
                for s in new:
                    self.unknown.add(s["id"])
                self.note(f"      (new snapshots on {name} with no reference copy: "
                          f"{[s['number'] for s in new]})")
        for left in pend.values():
            rmtree(left)
        pend.clear()
        return got

    # --- checks -----------------------------------------------------------------------------

    def check(self) -> None:
        for name in "ABC":
            if not self.exists(name):
                continue
            path = self.vol[name]
            st = self.query("status", path)
            if st["mode"] != self.mode[name]:
                self.fail(f"status of {name}: mode {st['mode']}, expected {self.mode[name]}")
            if self.mode[name] == "read-only":
                want = os.path.realpath(self.vol[self.upstream[name]])
                if not st.get("upstream") or os.path.realpath(st["upstream"]) != want:
                    self.fail(f"status of {name}: upstream {st.get('upstream')}, expected "
                              f"{self._show_arg(want)}")
            if name not in self.dirty:
                lin = self.snapshots(name, all_=False)
                if lin:
                    self.compare_live(name, lin[-1])
            v = self.query("verify", path)
            if not v.get("ok"):
                self.fail(f"verify {name} failed", [str(e) for e in v.get("errors", [])])

    def compare_live(self, name: str, snap: dict) -> None:
        ref = self.refs.get(snap["id"])
        if ref is None:
            self.fail(f"{name}: no reference copy for its latest snapshot {snap['number']} "
                      f"({snap['id']}): the harness could not tell what it captured")
        lines = compare(ref, self.vol[name])
        if lines:
            role = "mirror" if self.mode[name] == "read-only" else "live tree"
            self.fail(f"{name} ({role}) differs from its latest snapshot {snap['number']} "
                      f"({snap['id'][:8]}, reference copy refs/{ref.name}); "
                      f"rsync -aHAXS --numeric-ids -nic --delete --modify-window=-1 "
                      f"EXPECTED/ {name}/ says:", lines)

    # --- steps ------------------------------------------------------------------------------

    def run(self, steps: int, entries: int = ENTRIES) -> None:
        A = self.vol["A"]
        self.note(f"populate A with {entries} random entries")
        self.gen.populate(A, self.outside, entries)
        self.log_gen()
        bs = self.rng.choice(["4K", "4K", "16K", "64K"])
        self.cli("init", A, "--block-size", bs)
        self.mode["A"], self.upstream["A"] = "read-write", None
        self.dirty.add("A")
        self.check()
        for i in range(steps):
            step = self.choose()
            self.note(f"-- step {i + 1}/{steps}: {step}")
            getattr(self, "step_" + step)()

    WEIGHTS = {"edit": 4, "snapshot": 2, "transfer_ab": 3, "transfer_bc": 2, "revert": 2,
               "restore": 2, "failover": 1}

    def choose(self) -> str:
        step = self.rng.choices(list(self.WEIGHTS), weights=list(self.WEIGHTS.values()))[0]
        if step in ("transfer_bc", "failover") and not self.exists("B"):
            return "transfer_ab"
        if step in ("revert", "restore") and not self.lineage("A"):
            return "snapshot"
        return step

    def edit(self, name: str, ops: int | None = None) -> None:
        ops = ops or self.rng.randint(1, 6)
        self.note(f"   edit {name} ({ops} ops)")
        self.gen.edit(self.vol[name], self.outside, ops)
        self.log_gen()
        self.dirty.add(name)

    def step_edit(self) -> None:
        self.edit("A")

    def step_snapshot(self, name: str = "A") -> None:
        pend = self.pending([name])
        self.cli("snapshot", self.vol[name])
        self.register([name], pend)
        self.dirty.discard(name)
        self.check()

    def mirror(self, src: str, dst: str) -> None:
        """transfer SRC DST; when DST has snapshots SRC's lineage lacks, transfer must refuse
        (exit 5) and resync does it."""
        pend = self.pending([src])
        S, D = self.vol[src], self.vol[dst]
        diverged = False
        if self.exists(dst):
            ls, ld = self.lineage(src), self.lineage(dst)
            diverged = ld != ls[:len(ld)]
        if diverged:
            self.cli("transfer", S, D, expect=5)
            if src in self.register([src, dst], pend):
                self.dirty.discard(src)  # SRC was snapshotted before the refusal
            self.check()
            pend = self.pending([src])
            self.cli("resync", S, D, "--force")
        else:
            self.cli("transfer", S, D)
        self.register([src, dst], pend)
        self.mode[dst], self.upstream[dst] = "read-only", src
        self.dirty.discard(src)
        self.dirty.discard(dst)
        self.check()

    def step_transfer_ab(self) -> None:
        self.mirror("A", "B")

    def step_transfer_bc(self) -> None:
        self.mirror("B", "C")

    def step_revert(self) -> None:
        lin = self.snapshots("A", all_=False)
        target = self.rng.choice(lin)
        r = self.rng.random()
        arg = ("latest" if target is lin[-1] and r < 0.3
               else target["id"][:12] if r < 0.5 else str(target["number"]))
        pend = self.pending(["A"])
        self.cli("revert", self.vol["A"], arg)
        self.register(["A"], pend)
        self.dirty.discard("A")
        after = self.lineage("A")
        if not after or after[-1] != target["id"]:
            self.fail(f"after revert A {arg}: A's latest snapshot is "
                      f"{after[-1] if after else None}, expected {target['id']}")
        self.check()

    def step_restore(self) -> None:
        name = self.rng.choice([n for n in "ABC" if self.exists(n)])
        snaps = [s for s in self.snapshots(name) if s["id"] in self.refs]
        if not snaps:
            return self.step_snapshot()
        s = self.rng.choice(snaps)
        arg = s["id"] if s["preserved"] else self.rng.choice([str(s["number"]), s["id"][:8]])
        self._copies += 1
        dest = self.tmp / f"restore-{self._copies:03d}"
        self.cli("restore", self.vol[name], arg, dest)
        lines = compare(self.refs[s["id"]], dest, exclude_meta=False)
        if lines:
            self.fail(f"restore {name} {arg} differs from the reference copy of snapshot "
                      f"{s['number']} ({s['id'][:8]}, refs/{self.refs[s['id']].name}):", lines)
        rmtree(dest)
        self.check()

    def step_failover(self) -> None:
        rng = self.rng
        A, B = self.vol["A"], self.vol["B"]
        self.cli("break", B)
        self.mode["B"], self.upstream["B"] = "read-write", None
        self.check()
        self.edit("B")
        if rng.random() < 0.5:
            self.step_snapshot("B")
        if self.exists("C") and rng.random() < 0.4:
            self.mirror("B", "C")
        if rng.random() < 0.4:
            self.edit("A")  # writes on the old source that never reached B: preserved by resync
        pend = self.pending(["B", "A"])
        self.cli("resync", B, A, "--force")
        self.register(["B", "A"], pend)
        self.mode["A"], self.upstream["A"] = "read-only", "B"
        self.dirty -= {"A", "B"}
        self.check()
        if rng.random() < 0.5:
            if rng.random() < 0.4:
                self.edit("B")
            pend = self.pending(["B"])
            self.cli("role-swap", B, A)
            self.register(["B", "A"], pend)
        else:
            self.cli("break", A)
            self.mode["A"], self.upstream["A"] = "read-write", None
            self.check()
            if rng.random() < 0.5:
                self.edit("A")
            if rng.random() < 0.4:
                self.edit("B")  # B's last writes: preserved on B by resync A B
            pend = self.pending(["A", "B"])
            self.cli("resync", A, B, "--force")
            self.register(["A", "B"], pend)
        self.mode["A"], self.upstream["A"] = "read-write", None
        self.mode["B"], self.upstream["B"] = "read-only", "A"
        self.dirty -= {"A", "B"}
        self.check()
        if self.exists("C"):
            self.mirror("B", "C")


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_random_sequence(tmp_path, seed):
    Scenario(tmp_path, seed).run(STEPS)


# --- one tree with every kind of metadata -------------------------------------------------

def roundtrip(tmp_path: Path, features, big_sparse: bool = False) -> list[str]:
    """snapshot -> transfer A B -> transfer B C -> restore from A and from C; every result
    compared with the rsync copy of the tree; returns the problems found."""
    gen = TreeGen(4242, features, big_sparse=big_sparse)
    A, B, C = tmp_path / "A", tmp_path / "B", tmp_path / "C"
    gen.populate_every_kind(A, tmp_path / "outside")
    problems: list[str] = []

    def run(*args) -> None:
        before = outside_state(gen.outside)
        try:
            r = run_volsync(*args)
        except CommandTimeout as exc:
            problems.append(f"volsync {' '.join(map(str, args))}: " + "\n".join(timeout_lines(exc)))
            return
        if r.code != 0:
            problems.append(f"volsync {' '.join(map(str, args))} -> exit {r.code}: "
                            f"{r.out.strip()} {r.err.strip()}")
        for line in outside_changes(before, outside_state(gen.outside)):
            problems.append(f"after volsync {args[0]}: {line}")

    run("init", A, "--block-size", "4K")
    ref = tmp_path / "ref"
    copy_tree(A, ref)
    run("snapshot", A)
    run("transfer", A, B)
    run("transfer", B, C)
    run("restore", A, "1", tmp_path / "R1")
    run("restore", C, "latest", tmp_path / "R2")
    for label, path, excl in (("A (source, after snapshot)", A, True), ("B (mirror of A)", B, True),
                              ("C (mirror of B)", C, True), ("restore A 1", tmp_path / "R1", False),
                              ("restore C latest", tmp_path / "R2", False)):
        if not path.exists():
            continue
        lines = compare(ref, path, exclude_meta=excl)
        problems += [f"{label}: {line}" for line in lines]
    for vol in (A, B, C):
        if (vol / ".volsync").exists():
            try:
                r = run_volsync("verify", vol, "--json")
            except CommandTimeout as exc:
                problems += timeout_lines(exc)
                continue
            if r.code != 0:
                problems.append(f"verify {vol.name}: exit {r.code} {r.out.strip()}")
    if problems:
        problems = ["generator log:"] + ["    " + g.replace(str(tmp_path) + "/", "")
                                          for g in gen.log] + ["problems:"] + problems
    return problems


def test_every_kind_of_metadata_roundtrip(tmp_path):
    """One tree with every kind of metadata this process can make (64 MiB sparse file with a
    few KiB of data included) survives snapshot -> transfer -> transfer -> restore exactly."""
    problems = roundtrip(tmp_path, None, big_sparse=True)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def _feature_params():
    out = [pytest.param(None, id="plain")]
    for f in sorted(ALL_FEATURES):
        marks = []
        if f in ROOT_ONLY and not IS_ROOT:
            marks.append(pytest.mark.skip(reason=f"{f} needs root"))
        if f == "acls" and not HAVE_SETFACL:
            marks.append(pytest.mark.skip(reason="setfacl is not installed (apt install acl)"))
        out.append(pytest.param(f, id=f, marks=marks))
    return out


@pytest.mark.parametrize("feature", _feature_params())
def test_feature_roundtrip(tmp_path, feature):
    """The same round trip, one feature at a time ('plain': files, directories, symlinks,
    ordinary modes, whole-second mtimes): a matrix of what the format keeps."""
    problems = roundtrip(tmp_path, frozenset({feature} if feature else set()))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
