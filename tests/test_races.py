"""Reliability under concurrency: several volsync processes started at once on the same
volumes. Each must either do its work or be refused with exit 3 naming the process that holds
the lock; each volume is held by one writer at a time (checked from a log every process keeps
of its lock holds and metadata writes); after every round every volume verifies, mirrors are
prefixes of their sources and no version of a source's files is lost. And a snapshot taken
while another process keeps rewriting files holds only whole versions of them."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

from helpers import clean_env as _env
from helpers import ok, opened

from volsync import ops
from volsync import tree as vtree
from volsync.store.volume import Volume

META = ".volsync"

# the real program, with its lock holds and metadata writes logged (one O_APPEND line each)
WRAPPER = textwrap.dedent("""
    import os, sys, time
    from volsync.store import fsutil, lock, packs, volume
    LOG = os.environ["VOLSYNC_TEST_LOCKLOG"]

    def emit(kind, path):
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{os.getpid()} {time.monotonic_ns()} {kind} {path}\\n".encode())
        os.close(fd)

    real_acquire, real_release = lock.VolumeLock.acquire, lock.VolumeLock.release

    def acquire(self, wait=0.0, shared=False):
        real_acquire(self, wait, shared)
        # readers (verify, sends) may share; only writers of the volume lock must not overlap
        self.logged = not shared and self.path.name == "lock"
        if self.logged:
            emit("acq", self.path.parent)

    def release(self):
        if self.fd is not None and getattr(self, "logged", True):
            emit("rel", self.path.parent)
        real_release(self)

    real_atomic_write = fsutil.atomic_write
    real_atomic_write_with = fsutil.atomic_write_with

    def atomic_write(path, data, **kw):
        emit("write", path)
        return real_atomic_write(path, data, **kw)

    def atomic_write_with(path, fill, **kw):  # the midx, written section by section
        emit("write", path)
        return real_atomic_write_with(path, fill, **kw)

    lock.VolumeLock.acquire, lock.VolumeLock.release = acquire, release
    for module in (fsutil, packs, volume):
        if hasattr(module, "atomic_write"):
            module.atomic_write = atomic_write
        if hasattr(module, "atomic_write_with"):
            module.atomic_write_with = atomic_write_with
    from volsync.cli import main
    sys.argv[0] = "volsync"
    main()
""")


def write_files(root: Path, files: dict[str, bytes | str]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)


def live_root(path: Path) -> bytes:
    with opened(path) as vol:
        return vtree.scan(vol, write=False)[0].root


def volume_of(path: str) -> str | None:
    """The volume a metadata path belongs to (None: a new volume's temp dir, not yet one)."""
    parts = Path(path).parts
    if META not in parts:
        return None
    return str(Path(*parts[: parts.index(META)]))


# --- the concurrent rounds ----------------------------------------------------------------------

LOCKED = re.compile(r"^volsync: error: volume (\S+) is locked by volsync process (\d+)( \(sending from it\))?$")


def check_lock_log(log: Path) -> list[str]:
    """Per volume, the lock holds of different processes never overlap, and every metadata
    write is made by a process holding that volume's lock."""
    problems = []
    holds: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    open_holds: dict[tuple[int, str], int] = {}
    held: dict[int, set[str]] = defaultdict(set)
    lines = log.read_text().splitlines() if log.exists() else []
    # each process logs in program order; sort by time only to pair across processes
    for line in lines:
        pid_s, t_s, kind, path = line.split(" ", 3)
        pid, t = int(pid_s), int(t_s)
        if kind == "acq":
            vol = volume_of(path)
            open_holds[(pid, vol)] = t
            held[pid].add(vol)
        elif kind == "rel":
            vol = volume_of(path)
            start = open_holds.pop((pid, vol), None)
            if start is None:
                problems.append(f"pid {pid} released {vol} it did not hold")
                continue
            holds[vol].append((start, t, pid))
            held[pid].discard(vol)
        elif kind == "write":
            vol = volume_of(path)
            if vol is not None and vol not in held[pid]:
                problems.append(f"pid {pid} wrote {path} without holding {vol}'s lock")
    for (pid, vol), start in open_holds.items():
        problems.append(f"pid {pid} never released {vol}")
    for vol, spans in holds.items():
        spans.sort()
        for (_, e1, p1), (s2, _, p2) in itertools.pairwise(spans):
            if s2 < e1:
                problems.append(f"{vol}: pid {p1} and pid {p2} held the lock at once")
    return problems


def test_lock_log_check_catches_overlaps_and_unlocked_writes(tmp_path):
    """The checker itself: overlapping holds and a write without the lock are reported."""
    log = tmp_path / "log"
    log.write_text(textwrap.dedent("""\
        1 10 acq /v/A/.volsync
        2 15 acq /v/A/.volsync
        1 20 write /v/A/.volsync/state
        1 30 rel /v/A/.volsync
        2 40 rel /v/A/.volsync
        3 50 write /v/B/.volsync/state
        4 60 write /v/C/.volsync.tmp-1234/state
    """))
    problems = check_lock_log(log)
    assert any("held the lock at once" in p for p in problems)
    assert any("pid 3 wrote" in p for p in problems)
    assert len(problems) == 2


class Cluster:
    """Two groups of volumes and the commands each round draws from.

    G1: A read-write -> B its mirror -> E B's mirror (a cascade).
    G2: C and D after a failover: D (was the mirror) is read-write, C must follow it again:
        `resync D C` is the reverse resync, run again and again.
    Every command in the menu is valid whatever the others did before it, so the only
    acceptable outcomes are success and "locked" (exit 3)."""

    def __init__(self, base: Path):
        self.base = base
        self.v = {n: base / n for n in "ABCDE"}
        self.versions: dict[str, list[bytes]] = {"A": [], "D": []}
        self.kept: dict[str, set[bytes]] = {"A": set(), "D": set()}
        self.step = 0
        v = self.v
        write_files(v["A"], {"data/a.txt": "a0\n", "data/big.bin": os.urandom(20000)})
        ok("init", v["A"], "--block-size", "4K")
        ok("transfer", v["A"], v["B"])
        ok("transfer", v["B"], v["E"])
        write_files(v["C"], {"c.txt": "c0\n", "sub/c.bin": os.urandom(9000)})
        ok("init", v["C"], "--block-size", "4K")
        ok("transfer", v["C"], v["D"])
        ok("break", v["D"])
        write_files(v["D"], {"written-on-D.txt": "after failover\n"})
        ok("snapshot", v["D"])
        ok("resync", v["D"], v["C"], "--force")
        self.menu = [
            ["snapshot", v["A"]], ["revert", v["A"], "latest"], ["transfer", v["A"], v["B"]],
            ["resync", v["A"], v["B"], "--force"], ["transfer", v["B"], v["E"]],
            ["prune", v["A"], "--keep-last", "1000"], ["prune", v["B"], "--preserved"],
            ["prune", v["E"], "--keep-last", "2"],
            ["resync", v["D"], v["C"], "--force"], ["transfer", v["D"], v["C"]], ["snapshot", v["D"]],
            ["revert", v["D"], "latest"], ["prune", v["C"], "--keep-last", "3"],
            ["prune", v["D"], "--preserved", "--keep-last", "1000"],
            # beside the writers, verify sees one consistent view: 0 or 3, never damage
            ["verify", v["B"]], ["verify", v["C"]],
        ]
        # D's preserved snapshots may be pruned on purpose: only A's versions are all kept
        self.no_loss = ["A"]

    def user_writes(self, rnd: random.Random) -> None:
        """Between rounds, users change the read-write volumes (small files, new content)."""
        self.step += 1
        for name in ("A", "D"):
            root = self.v[name]
            files = {"round.txt": f"{name} round {self.step}\n"}
            if rnd.random() < 0.3:
                files[f"data/r{self.step % 7}.bin"] = os.urandom(rnd.choice([10, 5000, 13000]))
            write_files(root, files)
            self.versions[name].append(live_root(root))

    def check(self) -> list[str]:
        problems = []
        states, lineages = {}, {}
        for name, path in self.v.items():
            with opened(path) as vol:
                errs = ops.verify(vol).errors
            if errs:
                problems.append(f"{name} does not verify: {errs[:3]}")
            vol = Volume.open(path)  # (no packs read: nothing to close)
            states[name] = st = vol.state()
            lineages[name] = list(st.lineage)
            if st.journal:
                problems.append(f"{name}: journal left behind {st.journal}")
        modes = {n: s.mode for n, s in states.items()}
        want = {"A": "read-write", "B": "read-only", "E": "read-only", "D": "read-write",
                "C": "read-only"}
        if modes != want:
            problems.append(f"modes changed: {modes}")
        a, b, e, c, d = (lineages[n] for n in "ABECD")
        if b != a[: len(b)]:
            problems.append("B's lineage is not a prefix of A's")
        if not _subsequence(e, b):
            problems.append("E's lineage is not drawn from B's")
        if not _subsequence(c, d):
            problems.append("C's lineage is not drawn from D's")
        for name in self.no_loss:
            path = self.v[name]
            vol = Volume.open(path)
            st = states[name]
            roots = {vol.snapshot(i).root for i in st.lineage + st.preserved}
            # the version users wrote before this round is in the live tree or a snapshot;
            # every version once captured by a snapshot stays captured (users may overwrite
            # a version no command captured: that one is theirs to lose)
            current = self.versions[name][-1]
            if current not in roots and current != live_root(path):
                problems.append(f"{name}: the version written before this round is lost")
            lost = sorted(self.kept[name] - roots)
            if lost:
                problems.append(f"{name}: {len(lost)} snapshotted version(s) lost")
            self.kept[name] |= roots & set(self.versions[name])
        return problems


def _subsequence(short: list, long: list) -> bool:
    it = iter(long)
    return all(x in it for x in short)


def run_round(cluster: Cluster, cmds: list[list], log: Path) -> tuple[list[tuple], list[str]]:
    """Start every command at once; returns ((argv, code, stderr) per command, problems)."""
    env = _env({"VOLSYNC_TEST_LOCKLOG": str(log)})
    procs = [subprocess.Popen([sys.executable, "-c", WRAPPER, *map(str, c)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    pids = {p.pid for p in procs}
    outcomes, problems = [], []
    for cmd, p in zip(cmds, procs):
        _, err = p.communicate(timeout=60)
        outcomes.append((cmd, p.returncode, err))
        shown = " ".join(str(x).replace(str(cluster.base) + "/", "") for x in cmd)
        if p.returncode == 3:
            m = LOCKED.match(err.strip())
            if not m:
                problems.append(f"{shown}: exit 3 without naming a pid: {err.strip()!r}")
            elif int(m.group(2)) not in pids - {p.pid}:
                problems.append(f"{shown}: names pid {m.group(2)}, not another of this round")
        elif p.returncode != 0:
            problems.append(f"{shown}: exit {p.returncode}: {err.strip()!r}")
    writers_done = any(o[1] == 0 and o[0][0] != "verify" for o in outcomes)
    if writers_done and " acq " not in (log.read_text() if log.exists() else ""):
        problems.append("no lock hold was logged")
    problems += check_lock_log(log)
    return outcomes, problems


def test_concurrent_commands(tmp_path):
    rnd = random.Random(int(os.environ.get("VOLSYNC_RACE_SEED", "20240611")))
    cluster = Cluster(tmp_path)
    rounds = int(os.environ.get("VOLSYNC_RACE_ROUNDS", "120"))
    tally = {"commands": 0, "done": 0, "locked": 0, "waited": 0}
    start = time.monotonic()
    failures = []
    for i in range(rounds):
        cluster.user_writes(rnd)
        k = rnd.choice([2, 2, 2, 2, 3, 3, 3, 4, 5, 6, 8])
        # a third wait for the lock (--wait) instead of giving up at once: they queue up
        cmds = [rnd.choice(cluster.menu) + (["--wait", "5"] if rnd.random() < 0.33 else [])
                for _ in range(k)]
        log = tmp_path / f"lock-{i}.log"
        outcomes, problems = run_round(cluster, cmds, log)
        tally["commands"] += k
        tally["waited"] += sum(1 for c in cmds if "--wait" in c)
        tally["done"] += sum(1 for o in outcomes if o[1] == 0)
        tally["locked"] += sum(1 for o in outcomes if o[1] == 3)
        problems += cluster.check()
        log.unlink(missing_ok=True)
        if problems:
            ran = ", ".join(f"{' '.join(str(x).replace(str(tmp_path) + '/', '') for x in c)}"
                            f" -> {code}" for c, code, _ in outcomes)
            failures.append(f"round {i} [{ran}]: " + "; ".join(problems))
            if len(failures) >= 5:
                break
    elapsed = time.monotonic() - start
    print(f"\nraces: {rounds} rounds, {tally} in {elapsed:.1f}s")
    assert not failures, "\n".join(failures)
    assert tally["locked"] > 0 and tally["done"] > rounds  # both outcomes were exercised


# --- snapshot while files are rewritten ---------------------------------------------------------

REWRITER = textwrap.dedent("""
    import hashlib, os, sys, time
    root, mode = sys.argv[1], sys.argv[2]
    names = sys.argv[3:]
    i = 0
    while not os.path.exists(os.path.join(root, "..", "stop")):
        i += 1
        for name in names:
            size = 4096 * 3 + 100 if name.endswith("big") else 700
            payload = (f"{name} version {i} ".encode() * (size // 10))[:size]
            data = payload + hashlib.sha256(payload).hexdigest().encode()
            path = os.path.join(root, name)
            if mode == "inplace":  # same size, one write over the old content
                fd = os.open(path, os.O_WRONLY)
                os.pwrite(fd, data, 0)
                os.close(fd)
            else:  # a new file renamed over the old one
                tmp = path + ".new"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
        time.sleep(0.001 if i % 3 else 0.004)
""")


def _whole(data: bytes) -> bool:
    payload, digest = data[:-64], data[-64:]
    return hashlib.sha256(payload).hexdigest().encode() == digest


def _prefix_of_a_version(name: str, data: bytes) -> bool:
    """Whether `data` is how far the writer had got with some version of `name`'s new file:
    empty just after its creation, then a prefix of a whole version (a reader may see a write
    part done, and the file as it then was is a consistent state to capture)."""
    found = re.match(rb"[^ ]+ version (\d+) ", data)
    if found is None:
        return not data or f"{name} version ".encode().startswith(data)
    size = 4096 * 3 + 100 if name.endswith("big") else 700
    payload = (f"{name} version {int(found[1])} ".encode() * (size // 10))[:size]
    return (payload + hashlib.sha256(payload).hexdigest().encode()).startswith(data)


def test_snapshot_never_tears_rewritten_files(tmp_path):
    names = ["one", "two-big", "sub/three", "sub/four-big"]
    results = {}
    for mode in ("inplace", "rename"):
        vol = tmp_path / mode / "V"
        write_files(vol, {n: b"x" for n in names})
        for n in names:  # start from a whole version of each
            size = 4096 * 3 + 100 if n.endswith("big") else 700
            payload = (f"{n} version 0 ".encode() * (size // 10))[:size]
            write_files(vol, {n: payload + hashlib.sha256(payload).hexdigest().encode()})
        ok("init", vol, "--block-size", "4K")
        (tmp_path / mode / "stop").unlink(missing_ok=True)
        writer = subprocess.Popen([sys.executable, "-c", REWRITER, str(vol), mode, *names],
                                  env=_env())
        captured = reported = 0
        try:
            for _ in range(12):
                r = subprocess.run([sys.executable, "-m", "volsync", "snapshot", str(vol),
                                    "--strict"],
                                   env=_env(), capture_output=True, text=True, check=False)
                if r.returncode == 0:
                    captured += 1
                else:
                    assert r.returncode == 1 and "kept changing" in r.stderr, r.stderr
                    assert "Traceback" not in r.stderr
                    reported += 1
        finally:
            (tmp_path / mode / "stop").write_text("stop")
            writer.wait(timeout=30)
        assert writer.returncode == 0
        with opened(vol) as v:
            assert ops.verify(v).errors == []
        st = Volume.open(vol).state()
        for n in range(1, len(st.lineage) + 1):
            dest = tmp_path / mode / f"r{n}"
            ok("restore", vol, n, dest)
            for name in names:
                data = (dest / name).read_bytes()
                assert _whole(data), f"{mode}: snapshot {n} holds a torn {name}"
            for p in dest.rglob("*.new"):  # caught between its creation and its rename
                assert _prefix_of_a_version(p.name[:-4], p.read_bytes()), \
                    f"{mode}: snapshot {n} holds a {p.name} no writer wrote"
        results[mode] = (captured, reported)
    print(f"\nrewrites: (captured, reported) {results}")
    assert any(c for c, _ in results.values())


def test_refusal_always_names_the_holder(tmp_path):
    """While another process takes and drops a volume's lock over and over, every refused
    command still names a process (the holder's pid is never missing from the lock file)."""
    vol = tmp_path / "V"
    write_files(vol, {"f": "x"})
    ok("init", vol, "--block-size", "4K")
    churn = textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        from volsync.store.lock import VolumeLock
        lock = VolumeLock(Path(sys.argv[1]) / ".volsync" / "lock", sys.argv[1])
        end = time.monotonic() + float(sys.argv[2])
        while time.monotonic() < end:
            try:
                lock.acquire()
            except Exception:
                continue
            time.sleep(0.0005)
            lock.release()
    """)
    holder = subprocess.Popen([sys.executable, "-c", churn, str(vol), "4"], env=_env())
    time.sleep(0.3)
    refused, bad = 0, []
    try:
        procs = [subprocess.Popen([sys.executable, "-m", "volsync", "snapshot", str(vol)],
                                  env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for _ in range(24)]
        for p in procs:
            _, err = p.communicate(timeout=60)
            if p.returncode == 3:
                refused += 1
                m = LOCKED.match(err.strip())
                if not m or int(m.group(2)) not in {holder.pid} | {q.pid for q in procs}:
                    bad.append(err.strip())
            elif p.returncode != 0:
                bad.append(f"exit {p.returncode}: {err.strip()}")
    finally:
        holder.wait(timeout=30)
    print(f"\nchurn: {refused} of 24 refused")
    assert refused and not bad, bad
