#!/usr/bin/env python3
"""Random-kill crash sweep: SIGKILL `volsync transfer` and `volsync resync` at random moments
and check that no kill loses data.

    python bench/crash_sweep.py --size-mib 300 --kills 100 [--seed 1] [--keep] [--work DIR]

For each command a scenario is built once (a template directory: volumes A and B), the command
is run uninterrupted once from a copy of it (its duration and end state are the reference),
then, `--kills` times: the template is copied back to the same absolute path (volumes name
their upstream by absolute path), the command is started as a real `volsync` process and
SIGKILLed after a delay drawn uniformly from [0.8 x the program's start-up time, 1.2 x the
reference duration] (the reference duration is the shorter of two uninterrupted runs), and

  * `volsync verify` passes on every volume (it finishes an interrupted live-tree step itself);
  * rerunning the same command exits 0;
  * the end state (modes, upstreams, journal, lineage and preserved snapshots by number, tree
    root and, for snapshots that existed before, id; every live tree with modes and mtimes)
    is exactly the reference run's, so every snapshot that existed before is still there with
    the same content (verify has re-hashed every block they need), DST's diverged snapshots
    and live changes are preserved, and the mirror's live tree is SRC's latest;
  * no temp file is left (`.tmp-*` in `.volsync/`, `.volsync-tmp-*` in live trees, a `.pack`
    without its `.idx`).

It prints how many kills landed (the process was still running when killed), how many runs
survived every check, and the command line that reproduces the sweep. The exit status is 1 if
any check failed. The same engine (with a few MiB of data) is tests/test_kill_sweep.py; the
exhaustive crash-point enumeration is tests/test_crash_points.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from volsync.cli import main as _cli_main
from volsync.store.volume import Volume, is_volume

CRASHED = 137
META = ".volsync"
LIVE_TMP = ".volsync-tmp-"  # the materializer's temp names (tree.TMP_NAME)
CREATE_TMP = ".volsync.tmp-"  # Volume.create's temp metadata directory


# --- running the CLI --------------------------------------------------------------------------

@dataclass
class Result:
    code: int
    out: str
    err: str


def vs(*args) -> Result:
    """`volsync ARGS` in-process (fast; for checks and reruns)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            _cli_main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return Result(code, out.getvalue(), err.getvalue())


def ok(*args) -> Result:
    r = vs(*args)
    if r.code != 0:
        raise AssertionError(f"volsync {' '.join(map(str, args))} -> {r.code}: {r.err.strip()}")
    return r


def program() -> list[str]:
    """The real program, started as `python -m volsync` (the installed `volsync` may be a
    pyenv shim that adds a shell and a second exec to every start)."""
    return [sys.executable, "-m", "volsync"]


def startup_time() -> float:
    """How long the program takes to start (imports) before it does anything: the smallest
    of three `volsync --version` runs."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(program() + ["--version"], capture_output=True, check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def child_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VOLSYNC_CRASH_AT", "VOLSYNC_CRASH_TRACE", "VOLSYNC_FAULT")}
    env.update(extra or {})
    return env


class Forked:
    """A child process forked from this one that runs `volsync CMD` through the already
    imported CLI (no interpreter start-up: the whole delay window falls on the command's own
    work) and exits with its exit code. `env` is applied in the child and the crash switches
    (store/crash.py, read at import) are re-read from it, so VOLSYNC_CRASH_AT works as in a
    freshly started program. Popen-like: pid, poll(), communicate(), returncode."""

    def __init__(self, cmd: list, env: dict | None = None):
        sys.stdout.flush()
        sys.stderr.flush()
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            code = 70
            try:
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                for k in ("VOLSYNC_CRASH_AT", "VOLSYNC_CRASH_TRACE", "VOLSYNC_FAULT"):
                    os.environ.pop(k, None)
                os.environ.update(env or {})
                import importlib

                from volsync.store import crash
                importlib.reload(crash)  # re-read the switches; importers share its globals
                code = vs(*cmd).code
            finally:
                os._exit(code)

    def _set(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._set(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self._set(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def communicate(self) -> tuple[bytes, bytes]:
        self.wait()
        return b"", b""


def spawn(cmd: list, env: dict | None = None, fork: bool = False):
    """Start `volsync CMD`: a real program (exec), or with `fork` a forked child."""
    if fork:
        return Forked(cmd, env)
    return subprocess.Popen(program() + [str(a) for a in cmd], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=child_env(env))


def run_cmd(cmd: list, env: dict | None = None, fork: bool = False, timeout: float = 600
            ) -> Result:
    if not fork:
        return run_sub(cmd, env, timeout)
    return Result(Forked(cmd, env).wait(), "", "")


def run_sub(cmd: list, env: dict | None = None, timeout: float = 600) -> Result:
    p = subprocess.run(program() + [str(a) for a in cmd], capture_output=True, text=True,
                       env=child_env(env), timeout=timeout, check=False)
    return Result(p.returncode, p.stdout, p.stderr)


# --- reading directories and volumes ------------------------------------------------------------

def content(root: Path, mtimes: bool = True) -> dict[str, tuple]:
    """Every entry under root but the top-level .volsync: ('f', bytes, mode[, mtime]),
    ('l', target[, mtime]), ('d', mode[, mtime])."""
    root = Path(root)
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != META]
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                value: tuple = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                value = ("d", stat.S_IMODE(st.st_mode))
            else:
                value = ("f", Path(p).read_bytes(), stat.S_IMODE(st.st_mode))
            out[rel] = value + (st.st_mtime_ns,) if mtimes else value
    return out


def digest_content(c: dict[str, tuple]) -> dict[str, tuple]:
    """The same, with file bytes replaced by their length and hash (cheap to keep and show)."""
    import hashlib

    return {k: (v[0], len(v[1]), hashlib.sha256(v[1]).hexdigest()[:16]) + v[2:]
            if v[0] == "f" else v for k, v in c.items()}


def vol_summary(path: Path, known_ids: set[str], with_content: bool = True) -> dict | None:
    """What the pass criteria compare: mode, upstream, journal, lineage and preserved
    snapshots (number, tree root, and the id when the snapshot existed before the command:
    new snapshots get fresh random ids), and the live tree."""
    if not is_volume(path):
        return None
    v = Volume.open(path)
    st = v.state()

    def ref(i: str) -> tuple:
        s = v.snapshot(i)
        return (s.number, s.root.hex(), i if i in known_ids else "new")

    return {"mode": st.mode, "upstream": st.upstream, "upstream_id": st.upstream_id,
            "journal": st.journal, "extra": comparable_extra(st.extra, ref),
            "lineage": [ref(i) for i in st.lineage],
            # the order of the preserved list is not meaningful (a rerun after a crash may
            # append the same snapshots in another order)
            "preserved": sorted(ref(i) for i in st.preserved),
            "live": digest_content(content(path)) if with_content else None}


def comparable_extra(extra: dict, ref: Callable[[str], tuple]) -> dict:
    """A state's extra with what differs between equally good runs taken out: times, the
    fresh ids of new snapshots (by `ref`), and a new mirror's volume id (holds are keyed by
    mirror id; they compare by address)."""
    out = dict(extra)
    if "preserved_names" in out:
        out["preserved_names"] = sorted((ref(i), n) for i, n in out["preserved_names"].items())
    if "holds" in out:
        out["holds"] = sorted((h["address"], sorted(ref(s) for s in h["snapshots"]))
                              for h in out["holds"].values())
    if "last_update" in out:
        out["last_update"] = ref(out["last_update"]["snapshot"])
    return out


def snapshot_roots(path: Path) -> dict[str, bytes]:
    """id -> tree root of every snapshot (lineage and preserved) of a volume."""
    if not is_volume(path):
        return {}
    v = Volume.open(path)
    st = v.state()
    return {i: v.snapshot(i).root for i in st.lineage + st.preserved}


def leftovers(root: Path, names: list[str], link: str | None = None) -> list[str]:
    """Temp files a crashed writer left behind and the rerun did not clean up."""
    found = []
    for name in names:
        vol = root / name
        if not vol.exists():
            continue
        found += [str(p) for p in vol.iterdir() if p.name.startswith(CREATE_TMP)]
        for dirpath, dirnames, filenames in os.walk(vol):
            if Path(dirpath) == vol and META in dirnames:
                dirnames.remove(META)
            found += [os.path.join(dirpath, n) for n in dirnames + filenames
                      if n.startswith(LIVE_TMP)]
        meta = vol / META
        if not meta.exists():
            continue
        for d in (meta, meta / "packs", meta / "snapshots"):
            found += [str(p) for p in d.iterdir() if p.name.startswith(".tmp-")]
        packs = {p.stem for p in (meta / "packs").glob("*.pack")}
        idxs = {p.stem for p in (meta / "packs").glob("*.idx")}
        found += [f"{meta}/packs/{s}.pack without .idx" for s in sorted(packs - idxs)]
        found += [f"{meta}/packs/{s}.idx without .pack" for s in sorted(idxs - packs)]
    if link:
        found += [str(p) for p in root.iterdir() if p.name.startswith(f".{link}.volsync-")]
    return found


def verify_problems(root: Path, names: list[str]) -> list[str]:
    problems = []
    for name in names:
        if is_volume(root / name):
            r = vs("verify", root / name, "--json")
            if r.code != 0:
                problems.append(f"verify {name}: exit {r.code} {r.out.strip()} {r.err.strip()}")
    return problems


# --- a scenario, kept as a template ---------------------------------------------------------------

@dataclass
class Case:
    """A scenario built once under `base/case`, kept as `base/tpl` and copied back to the
    same absolute path for every run."""

    base: Path
    name: str
    setup: Callable[[Path], list]
    names: list[str] = field(default_factory=lambda: ["A", "B"])
    link: str | None = None
    fork: bool = False  # start the command by fork (see Forked) instead of exec
    timings: int = 1  # uninterrupted runs to time (the last one's end state is the reference)

    def __post_init__(self) -> None:
        self.root = self.base / "case"
        self.tpl = self.base / "tpl"
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        built = self.setup(self.root)  # the command, or (command, volume names, link name)
        if isinstance(built, tuple):
            self.cmd, self.names, self.link = built
        else:
            self.cmd = built
        self.before_roots = {n: snapshot_roots(self.root / n) for n in self.names}
        self.known_ids = {i for roots in self.before_roots.values() for i in roots}
        self.root.rename(self.tpl)
        self.reset()
        self.before_live = {n: content(self.root / n) for n in self.names
                            if is_volume(self.root / n)}
        self.startup = 0.0 if self.fork else startup_time()
        # the duration is the shortest of `timings` runs (the first one may pay for cold caches)
        durations = []
        for i in range(self.timings):
            if i:
                self.reset()
            t0 = time.perf_counter()
            r = self.run_uninterrupted()
            durations.append(time.perf_counter() - t0)
            if r.code != 0:
                raise AssertionError(f"{self.name}: uninterrupted {self.cmd_text()} -> {r.code}: "
                                     f"{r.err}")
        self.duration = min(durations)
        self.expected = self.summary()
        self.check_leftovers()

    def run_uninterrupted(self) -> Result:
        return run_cmd(self.cmd, fork=self.fork)

    def cmd_text(self) -> str:
        return "volsync " + " ".join(shlex.quote(str(a)) for a in self.cmd)

    def reset(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)
        shutil.copytree(self.tpl, self.root, symlinks=True)

    def summary(self, with_content: bool = True) -> dict:
        out: dict = {n: vol_summary(self.root / n, self.known_ids, with_content)
                     for n in self.names}
        if self.link:
            p = self.root / self.link
            out["link"] = os.readlink(p) if p.is_symlink() else None
        return out

    def check_leftovers(self) -> None:
        left = leftovers(self.root, self.names, self.link)
        if left:
            raise AssertionError(f"{self.name}: temp files left: {left}")

    def check_after(self, what: str, rerun: Result, *, extra_ok: Callable[[dict], bool] | None = None
                    ) -> list[str]:
        """The pass criteria after a crash (`what` names it) and the rerun. Returns problems."""
        problems = []
        if rerun.code != 0:
            problems.append(f"{what}: rerun exit {rerun.code}: {rerun.err.strip()}")
            return problems
        got = self.summary()
        if got != self.expected and not (extra_ok and extra_ok(got)):
            problems.append(f"{what}: end state differs from an uninterrupted run:\n"
                            + describe_diff(self.expected, got))
        problems += [f"{what}: {p}" for p in verify_problems(self.root, self.names)]
        left = leftovers(self.root, self.names, self.link)
        if left:
            problems.append(f"{what}: temp files left after the rerun: {left}")
        return problems


def describe_diff(want: dict, got: dict, path: str = "") -> str:
    lines = []
    for key in sorted(set(want) | set(got), key=str):
        a, b = want.get(key, "<absent>"), got.get(key, "<absent>")
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            lines.append(describe_diff(a, b, f"{path}{key}."))
        else:
            lines.append(f"  {path}{key}: want {str(a)[:300]} got {str(b)[:300]}")
    return "\n".join(lines)


# --- the data and the scenarios ---------------------------------------------------------------------

def write_random(path: Path, rng: random.Random, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n


def make_data(root: Path, size: int, seed: int) -> None:
    """About `size` bytes: a dozen small files, a few directories, and the rest in files of
    64 KiB to 1/4 of the total, plus a symlink and an empty directory."""
    rng = random.Random(seed)
    for i in range(12):
        write_random(root / f"small/s{i:02d}", rng, rng.randint(0, 5000))
    left = size
    i = 0
    while left > 0:
        n = min(left, rng.randint(64 << 10, max(64 << 10, size // 4)))
        write_random(root / f"d{i % 3}" / f"sub{i % 2}" / f"big{i:03d}.bin", rng, n)
        left -= n
        i += 1
    (root / "empty").mkdir()
    os.symlink("small/s00", root / "link")
    age(root)


def age(root: Path, when: int = 1_600_000_000) -> None:
    """Old mtimes everywhere (so the stat cache trusts them; runs stay deterministic)."""
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and META in dirnames:
            dirnames.remove(META)
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (when, when), follow_symlinks=False)


def mutate(root: Path, seed: int, when: int) -> None:
    """Overwrite a region of some big files, rewrite a small one, delete one, add two."""
    rng = random.Random(seed)
    bigs = sorted(p for p in root.rglob("big*.bin"))
    for p in rng.sample(bigs, min(3, len(bigs))):
        size = p.stat().st_size
        off = rng.randrange(0, max(1, size - 20000))
        with open(p, "r+b") as f:
            f.seek(off)
            f.write(rng.randbytes(min(20000, size)))
    write_random(root / "small" / f"s{rng.randrange(12):02d}", rng, 3000)
    victim = root / "small" / f"s{rng.randrange(1, 12):02d}"
    if victim.exists():
        victim.unlink()
    write_random(root / f"new-{seed}" / "n.bin", rng, 70000)
    write_random(root / f"new-{seed}.txt", rng, 100)
    age(root, when)


def sc_transfer(size: int, seed: int) -> Callable[[Path], list]:
    """A baseline transfer into a missing DST (its longest form: every block is sent and every
    file written), of a read-write SRC with live changes since its latest snapshot."""
    def setup(root: Path) -> list:
        a = root / "A"
        make_data(a, size, seed)
        ok("init", a, "--block-size", "4K")
        ok("snapshot", a)
        mutate(a, seed + 1, 1_600_000_100)
        return ["transfer", a, root / "B"]
    return setup


def sc_resync(size: int, seed: int) -> Callable[[Path], list]:
    """A forward resync after a break with writes on both sides: SRC snapshotted and with live
    changes, DST with a snapshot of its own and live changes."""
    def setup(root: Path) -> list:
        a, b = root / "A", root / "B"
        make_data(a, size, seed)
        ok("init", a, "--block-size", "4K")
        ok("transfer", a, b)
        ok("break", b)
        mutate(a, seed + 2, 1_600_000_200)
        ok("snapshot", a)
        mutate(a, seed + 3, 1_600_000_300)
        mutate(b, seed + 4, 1_600_000_400)
        ok("snapshot", b)
        mutate(b, seed + 5, 1_600_000_500)
        return ["resync", "--force", a, b]
    return setup


@dataclass
class SweepStats:
    kills: int = 0
    landed: int = 0
    survived: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def phase_of(case: Case) -> str:
    """Where a kill left DST (B): untouched, created but empty, inside the journalled live-tree
    step, or after the final commit."""
    b = case.root / "B"
    if not is_volume(b):
        return "before DST was created"
    tpl_state = case.tpl / "B" / META / "state"
    state = (b / META / "state").read_bytes()
    if tpl_state.exists() and tpl_state.read_bytes() == state:
        return "DST untouched"
    st = Volume.open(b).state()
    if st.journal:
        return "DST live-tree step pending"
    if not st.lineage:
        return "DST created, nothing committed"
    want = case.expected["B"]
    got = vol_summary(b, case.known_ids, with_content=False)
    if got and want and got["lineage"] == want["lineage"] and got["mode"] == want["mode"]:
        return "after DST's final commit"
    return "DST state changed, not final"


def sweep(case: Case, kills: int, rng: random.Random, log: Callable[[str], None] | None = None,
          ) -> SweepStats:
    """`kills` random SIGKILLs of the case's command, each followed by the pass criteria."""
    stats = SweepStats()
    # the delay is drawn over the run's duration, from just before the program's imports are
    # done (kills during start-up prove nothing) to a little after its end
    low, high = 0.8 * min(case.startup, case.duration), 1.2 * case.duration
    for k in range(kills):
        case.reset()
        delay = rng.uniform(low, high)
        proc = spawn(case.cmd, fork=case.fork)
        time.sleep(delay)
        landed = proc.poll() is None
        if landed:
            os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        stats.kills += 1
        what = f"{case.name} kill {k} at {delay:.3f}s"
        problems = []
        if landed and proc.returncode != -signal.SIGKILL:
            landed = False  # it ended on its own between poll() and kill()
        if not landed and proc.returncode != 0:
            problems.append(f"{what}: uninterrupted run exit {proc.returncode}: "
                            f"{(err or b'').decode()[-500:]}")
        stats.landed += landed
        phase = phase_of(case) if landed else "finished before the kill"
        stats.phases[phase] = stats.phases.get(phase, 0) + 1
        state = case.summary(with_content=False)
        vols = [state[n] for n in case.names if state[n]]
        if sum(1 for s in vols if s["mode"] == "read-write") > 1 and case.name.startswith("role"):
            problems.append(f"{what}: two read-write volumes")
        problems += [f"{what} (before the rerun): {p}" for p in verify_problems(case.root, case.names)]
        problems += case.check_after(what, vs(*case.cmd))
        if problems:
            stats.problems += problems
        else:
            stats.survived += 1
        if log:
            log(f"{what}: {phase}, "
                f"{'OK' if not problems else 'FAILED'}")
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=float, default=300, help="data size per scenario")
    ap.add_argument("--kills", type=int, default=100, help="kills per command (transfer, resync)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--commands", default="transfer,resync")
    ap.add_argument("--work", default=None, help="work directory (default: a new one in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--fork", action="store_true",
                    help="fork the command from this process instead of starting the program "
                         "(no start-up time; what tests/test_kill_sweep.py does)")
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args(argv)
    size = int(args.size_mib * (1 << 20))
    work = Path(args.work or tempfile.mkdtemp(prefix="volsync-crash-sweep-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    builders = {"transfer": sc_transfer, "resync": sc_resync}
    total = SweepStats()
    t_start = time.perf_counter()
    try:
        for name in args.commands.split(","):
            t0 = time.perf_counter()
            case = Case(work / name, name, builders[name](size, args.seed), fork=args.fork,
                        timings=2)
            print(f"{name}: uninterrupted run {case.duration:.2f} s (start-up {case.startup:.2f} s);"
                  f" killing {args.kills} times at {0.8 * min(case.startup, case.duration):.2f}"
                  f"-{1.2 * case.duration:.2f} s", flush=True)
            stats = sweep(case, args.kills, rng, log=print if args.verbose else None)
            print(f"{name}: {stats.kills} kills, {stats.landed} landed, {stats.survived} survived "
                  f"every check ({time.perf_counter() - t0:.0f} s)", flush=True)
            for phase, n in sorted(stats.phases.items(), key=lambda kv: -kv[1]):
                print(f"    {n:4d}  {phase}")
            for field_ in ("kills", "landed", "survived"):
                setattr(total, field_, getattr(total, field_) + getattr(stats, field_))
            total.problems += stats.problems
            shutil.rmtree(work / name, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for p in total.problems:
        print("FAILED:", p)
    print(f"total: {total.kills} kills, {total.landed} landed, {total.survived} survived every "
          f"check, {len(total.problems)} problems, {time.perf_counter() - t_start:.0f} s")
    repro = ["python", "bench/crash_sweep.py", "--size-mib", f"{args.size_mib:g}", "--kills",
             str(args.kills), "--seed", str(args.seed), "--commands", args.commands]
    repro += ["--fork"] if args.fork else []
    print("reproduce: " + " ".join(repro))
    return 1 if total.problems else 0


if __name__ == "__main__":
    sys.exit(main())
