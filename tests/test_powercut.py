"""Power-cut tests of volsync on tests/powercut_fs.py, a FUSE filesystem that keeps only what
was made durable (fsync of a file: its data and metadata; fsync of a directory: its entries)
and, on `cut()`, throws everything else away, as losing power would.

Every volume under test (source A, mirror B, a restore target) lives inside the mount, and
every command under test runs as a real `python -m volsync` subprocess:

1. Acknowledged work survives: a whole volume life (init, snapshot, baseline and incremental
   transfer, break, snapshot on the mirror, resync, role-swap with a link, revert, restore,
   prune) with a power cut after every command that exited 0; then the command's effect is
   there, `verify` passes on every volume and the next command works.
2. Random moments: a baseline transfer of a few MiB, an incremental transfer, a resync and a
   revert are killed (SIGKILL) after a seeded random delay, then power is cut; every volume
   opens and holds its old or its new lineage, `verify` passes (it finishes a pending journal
   first), and rerunning the command exits 0 with the expected result.

What the test writes as "the user" into a live tree it fsyncs itself (files and directories):
a user's unsynced data may be lost in a power cut, volsync's acknowledged work may not.
Checks run in-process (`helpers.vs`, read-only commands and verify) to keep the module fast;
the test process holds no file of the mount open across a cut.

VOLSYNC_POWERCUT_ROUNDS=N runs N killed runs per command (default 3) and repeats the
acknowledged-work life N//3 more times with other data (default once).
"""

from __future__ import annotations

import functools
import gc
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import clean_env, content, sub, vs
from powercut_fs import fuse_unavailable_reason, mounted

ROUNDS = max(1, int(os.environ.get("VOLSYNC_POWERCUT_ROUNDS", "3")))
LIVES = max(1, ROUNDS // 3)

pytestmark = pytest.mark.skipif(bool(fuse_unavailable_reason()),
                                reason=str(fuse_unavailable_reason()))


@pytest.fixture
def fs(tmp_path):
    with mounted(tmp_path) as f:
        yield f


# --- the user's side: durable writes into a live tree ----------------------------------------

def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def user_write(root: Path, files: dict[str, bytes | None]) -> None:
    """Write (None: delete) files under root as a careful user would: each file fsynced, then
    every directory of the tree (and root's parent), so all of it survives a power cut."""
    root = Path(root)
    created = root
    while not created.parent.exists():
        created = created.parent
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        p = root / rel
        if data is None:
            if p.is_file() or p.is_symlink():
                p.unlink()
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    for dirpath, dirnames, _ in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d != ".volsync"]
        fsync_path(Path(dirpath))
    for d in [root, *root.parents]:  # root and any parent directory this call created
        fsync_path(d.parent)
        if d == created:
            break


def user_extras(root: Path, tag: str) -> dict[str, bytes]:
    """Entries that are not plain files (made durable): a symlink, an empty directory, an
    executable file and a hard link of it. Returns the regular files added."""
    data = f"#!/bin/sh\necho {tag}\n".encode()
    user_write(root, {f"bin/{tag}": data})
    os.chmod(root / "bin" / tag, 0o755)
    os.link(root / "bin" / tag, root / "bin" / f"{tag}-hard")
    os.symlink(f"bin/{tag}", root / f"link-{tag}")
    (root / f"empty-{tag}").mkdir(mode=0o750)
    for p in (root / "bin" / tag, root / "bin", root):
        fsync_path(p)
    return {f"bin/{tag}": data, f"bin/{tag}-hard": data}


def gen_files(rng: random.Random, total: int, prefix: str = "") -> dict[str, bytes]:
    """About `total` bytes in a few files and directories, one big file among them."""
    files = {f"{prefix}big.bin": rng.randbytes(total // 2 + rng.randrange(4096))}
    left = total - len(files[f"{prefix}big.bin"])
    i = 0
    while left > 0:
        n = min(left, rng.choice([0, 17, 900, 5000, 70_000, 200_000]))
        d = rng.choice(["", "d/", "d/e/", "x/y/z/"])
        files[f"{prefix}{d}f{i}"] = rng.randbytes(n)
        left -= max(n, 1)
        i += 1
    return files


def edit_files(rng: random.Random, live: dict[str, bytes], tag: str) -> dict[str, bytes | None]:
    """A change: one block of the big file flipped, a file added, one rewritten, one deleted
    (never under bin/, where user_extras keeps hard links)."""
    names = sorted(k for k in live if not k.endswith("big.bin") and not k.startswith("bin/"))
    big_name = next(k for k in live if k.endswith("big.bin"))
    big = bytearray(live[big_name])
    big[rng.randrange(len(big))] ^= 0xFF
    out: dict[str, bytes | None] = {big_name: bytes(big), f"new/{tag}": rng.randbytes(3000)}
    if names:
        out[names[0]] = f"rewritten {tag}".encode()
    if len(names) > 1:
        out[names[-1]] = None
    return out


def heavy_change(rng: random.Random, live: dict[str, bytes], tag: str
                 ) -> dict[str, bytes | None]:
    """A change big enough that writing it into a mirror takes a while (so random kills
    land in it): about half the files rewritten, a new 800 KiB file, the small edits."""
    out = edit_files(rng, live, tag)
    for name in sorted(live):
        if name not in out and not name.endswith("big.bin") and not name.startswith("bin/") \
                and rng.random() < 0.5:
            out[name] = rng.randbytes(len(live[name]) + 1)
    out[f"new/{tag}-blob"] = rng.randbytes(800_000)
    return out


def apply(files: dict[str, bytes], change: dict[str, bytes | None]) -> dict[str, bytes]:
    out = dict(files)
    for k, v in change.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def as_content(files: dict[str, bytes]) -> dict[str, bytes]:
    return dict(sorted(files.items()))


def file_data(root: Path) -> dict[str, bytes]:
    return {k: v[1] for k, v in content(root).items() if v[0] == "f"}


# --- volsync's side -----------------------------------------------------------------------------

def run(*args, code: int = 0):
    """A command under test: a real subprocess."""
    r = sub(*args, timeout=180)
    assert r.code == code, f"volsync {' '.join(map(str, args))} -> {r.code}\n{r.out}\n{r.err}"
    return r


def setup_run(*args) -> None:
    """A command that only sets the scene (not under test): in-process, for speed."""
    r = vs(*args)
    assert r.code == 0, f"volsync {' '.join(map(str, args))} -> {r.code}\n{r.out}\n{r.err}"


def check(*args) -> dict:
    """A read-only check (or verify), in-process for speed; must exit 0."""
    r = vs(*args, "--json")
    assert r.code == 0, f"volsync {' '.join(map(str, args))} -> {r.code}\n{r.out}\n{r.err}"
    return r.json


def lineage(vol: Path) -> list[str]:
    return [s["id"] for s in check("snapshots", vol)["snapshots"]]


def preserved(vol: Path) -> list[str]:
    return [s["id"] for s in check("snapshots", vol, "--all")["snapshots"] if s["preserved"]]


def mode(vol: Path) -> str:
    return check("status", vol)["mode"]


def verified(*vols: Path) -> None:
    for vol in vols:
        r = vs("verify", vol, "--json")
        assert r.code == 0 and r.json["ok"], f"verify {vol} -> {r.code}: {r.out}{r.err}"


class Outside:
    """Restores into fresh directories outside the mount (the reference content)."""

    def __init__(self, base: Path):
        self.base = base
        base.mkdir(exist_ok=True)
        self.n = 0

    def snapshot_files(self, vol: Path, snap: str) -> dict[str, bytes]:
        self.n += 1
        dest = self.base / f"r{self.n}"
        r = vs("restore", vol, snap, dest)
        assert r.code == 0, f"restore {vol} {snap} -> {r.code}: {r.out}{r.err}"
        return file_data(dest)

    def snapshot_content(self, vol: Path, snap: str) -> dict:
        """Modes, symlinks and mtimes too (what a snapshot records)."""
        self.n += 1
        dest = self.base / f"r{self.n}"
        r = vs("restore", vol, snap, dest)
        assert r.code == 0, f"restore {vol} {snap} -> {r.code}: {r.out}{r.err}"
        return content(dest, mtimes=True)


def cut(fs) -> None:
    gc.collect()  # no in-process volume keeps a pack of the mount mapped across the cut
    fs.cut()


# --- 1. acknowledged work survives a power cut after each command -------------------------------

def test_acknowledged_work_survives_each_command(fs, tmp_path):
    for life in range(LIVES):
        _one_life(fs, fs.path / f"life{life}", Outside(tmp_path / f"out{life}"),
                  random.Random(f"powercut-life-{life}"))


def _one_life(fs, root: Path, out: Outside, rng: random.Random) -> None:
    A, B, C, R, link = root / "A", root / "B", root / "C", root / "R", root / "current"
    user_write(root, {})

    # init of a directory holding the user's (durable) files, and of a missing one
    files_a = gen_files(rng, 300_000)
    user_write(A, files_a)
    files_a.update(user_extras(A, "a"))
    run("init", A)
    cut(fs)
    assert lineage(A) == [] and mode(A) == "read-write"
    assert file_data(A) == files_a
    run("init", C)
    cut(fs)
    assert lineage(C) == [] and mode(C) == "read-write"
    verified(A, C)

    # snapshot
    s1 = run("snapshot", A, "--json")
    cut(fs)
    assert lineage(A) == [s1.json["id"]]
    assert out.snapshot_files(A, "latest") == files_a
    verified(A)

    # baseline transfer: B is created
    run("transfer", A, B)
    cut(fs)
    assert lineage(B) == lineage(A) and len(lineage(A)) == 1
    assert mode(B) == "read-only"
    assert content(B, mtimes=True) == out.snapshot_content(A, "latest")
    assert file_data(B) == files_a
    verified(A, B)

    # incremental transfer after the user changed A (durably)
    change = edit_files(rng, files_a, "t2")
    user_write(A, change)
    files_a = apply(files_a, change)
    files_a.update(user_extras(A, "t2"))
    run("transfer", A, B)
    cut(fs)
    assert len(lineage(A)) == 2 and lineage(B) == lineage(A)
    assert file_data(B) == files_a
    assert content(B, mtimes=True) == out.snapshot_content(A, "latest")
    verified(A, B)

    # failover: break B, the users write on B and snapshot it
    run("break", B)
    cut(fs)
    assert mode(B) == "read-write"
    verified(B)
    change = edit_files(rng, files_a, "onB")
    user_write(B, change)
    files_b = apply(files_a, change)
    run("snapshot", B)
    cut(fs)
    assert len(lineage(B)) == 3 and lineage(B)[:2] == lineage(A)
    assert out.snapshot_files(B, "latest") == files_b
    verified(B)

    # meanwhile A got writes nobody mirrored: resync B A keeps them as a preserved snapshot
    change = edit_files(rng, files_a, "lateA")
    user_write(A, change)
    late_a = apply(files_a, change)
    run("resync", B, A, "--force")
    cut(fs)
    assert lineage(A) == lineage(B) and mode(A) == "read-only"
    assert file_data(A) == files_b
    assert content(A, mtimes=True) == out.snapshot_content(B, "latest")
    kept = preserved(A)
    assert kept, "A's unmirrored writes must stay as a preserved snapshot"
    assert out.snapshot_files(A, kept[-1]) == late_a
    verified(A, B)

    # planned switchover back: A read-write, B its mirror, the link on A
    change = edit_files(rng, files_b, "beforeswap")
    user_write(B, change)
    files_b = apply(files_b, change)
    os.symlink(B, link)
    fsync_path(root)
    run("role-swap", B, A, "--link", link)
    cut(fs)
    assert mode(A) == "read-write" and mode(B) == "read-only"
    assert lineage(A) == lineage(B) and len(lineage(A)) == 4
    assert os.readlink(link) == str(A)
    assert file_data(A) == files_b and file_data(B) == files_b
    assert content(B, mtimes=True) == out.snapshot_content(A, "latest")
    verified(A, B)

    # revert A to snapshot 2: the later snapshots and A's live changes become preserved
    numbers = [s["number"] for s in check("snapshots", A)["snapshots"]]
    s2_files = out.snapshot_files(A, str(numbers[1]))
    later = lineage(A)[2:]
    change = edit_files(rng, files_b, "live-before-revert")
    user_write(A, change)
    live_a = apply(files_b, change)
    run("revert", A, str(numbers[1]))
    cut(fs)
    assert len(lineage(A)) == 2
    assert file_data(A) == s2_files
    kept = preserved(A)
    assert set(later) <= set(kept)
    assert out.snapshot_files(A, kept[-1]) == live_a
    verified(A, B)

    # restore a snapshot to a new directory inside the mount
    run("restore", A, str(numbers[1]), R)
    cut(fs)
    assert content(R, mtimes=True) == out.snapshot_content(A, str(numbers[1]))
    assert file_data(R) == s2_files
    run("restore", A, kept[-1], root / "R2")
    cut(fs)
    assert file_data(root / "R2") == live_a

    # prune: removed snapshots stay removed, freed packs stay freed, everything verifies
    before = lineage(A)
    run("prune", A, "--keep-last", "1")
    cut(fs)
    assert lineage(A) == before[-1:]
    assert not set(before[:-1]) & {s["id"] for s in check("snapshots", A, "--all")["snapshots"]}
    run("prune", A, "--preserved")
    cut(fs)
    assert preserved(A) == [] and lineage(A) == before[-1:]
    assert file_data(A) == s2_files
    verified(A, B)

    # the next command works: A's reverted lineage goes back to B by resync
    run("resync", A, B, "--force")
    cut(fs)
    # (B keeps its own older snapshots: prune on A did not touch B)
    assert lineage(B)[-1:] == lineage(A) and file_data(B) == s2_files
    assert mode(B) == "read-only"
    verified(A, B, C)


# --- 2. a command killed at a random moment, then power lost ----------------------------------

class Scenario:
    """Sets up volumes under `root`; `cmd` is the command to kill; `src`/`dst` the volumes
    whose lineages it changes; `expect` what the rerun must produce."""

    def __init__(self, root: Path, rng: random.Random):
        self.root, self.rng = root, rng
        self.A, self.B = root / "A", root / "B"

    def volumes(self) -> list[Path]:
        return [self.A, self.B]

    def lineages(self) -> dict[str, list[str] | None]:
        out = {}
        for name, vol in (("A", self.A), ("B", self.B)):
            if vol not in self.volumes():
                continue
            r = vs("snapshots", vol, "--json")
            out[name] = [s["id"] for s in r.json["snapshots"]] if r.code == 0 else None
        return out


class Baseline(Scenario):
    size = 3 << 20

    def setup(self):
        self.files = gen_files(self.rng, self.size)
        user_write(self.A, self.files)
        setup_run("init", self.A)
        return ["transfer", self.A, self.B]

    def check_cut(self, before, after):
        # A: its lineage gained the transfer's snapshot or not; B: absent, an interrupted
        # init, or a mirror holding nothing yet or all of A's lineage
        assert after["A"][: len(before["A"])] == before["A"]
        assert len(after["A"]) in (len(before["A"]), len(before["A"]) + 1)
        if after["B"] is None:
            meta = self.B / ".volsync"
            assert (not meta.exists() or (meta / "init-incomplete").exists()
                    or not any(meta.iterdir())), \
                "B has volume metadata that does not open"
        else:
            assert after["B"] in (before["B"] or [], after["A"])

    def check_final(self, before):
        la = lineage(self.A)
        assert len(la) == len(before["A"]) + 1 and la[: len(before["A"])] == before["A"]
        assert lineage(self.B) == la
        assert file_data(self.B) == self.files
        assert mode(self.B) == "read-only"


class Incremental(Baseline):
    size = 600_000

    def setup(self):
        super().setup()
        setup_run("transfer", self.A, self.B)
        change = heavy_change(self.rng, self.files, "inc")
        user_write(self.A, change)
        self.files = apply(self.files, change)
        return ["transfer", self.A, self.B]


class Resync(Scenario):
    """B failed over and was written; A has unmirrored writes; `resync B A`."""

    def setup(self):
        files = gen_files(self.rng, 600_000)
        user_write(self.A, files)
        setup_run("init", self.A)
        setup_run("transfer", self.A, self.B)
        setup_run("break", self.B)
        change = heavy_change(self.rng, files, "onB")
        user_write(self.B, change)
        setup_run("snapshot", self.B)
        change2 = heavy_change(self.rng, apply(files, change), "onB-live")
        user_write(self.B, change2)
        self.files = apply(apply(files, change), change2)
        change = heavy_change(self.rng, files, "onA")
        user_write(self.A, change)
        self.late_a = apply(files, change)
        return ["resync", self.B, self.A, "--force"]

    def check_cut(self, before, after):
        # B (the source) gains its live changes as a snapshot or not; A keeps its lineage or
        # becomes B's mirror with all of it
        assert after["B"][: len(before["B"])] == before["B"]
        assert len(after["B"]) in (len(before["B"]), len(before["B"]) + 1)
        assert after["A"] in (before["A"], after["B"])

    def check_final(self, before):
        lb = lineage(self.B)
        assert len(lb) == len(before["B"]) + 1 and lb[: len(before["B"])] == before["B"]
        assert lineage(self.A) == lb and mode(self.A) == "read-only"
        assert file_data(self.A) == self.files
        kept = preserved(self.A)
        assert kept, "A's unmirrored writes must be kept as a preserved snapshot"
        assert self.outside.snapshot_files(self.A, kept[-1]) == self.late_a


class Revert(Scenario):
    """A with snapshots 1 and 2 and live changes; `revert A 1`."""

    def setup(self):
        files = gen_files(self.rng, 600_000)
        user_write(self.A, files)
        setup_run("init", self.A)
        setup_run("snapshot", self.A)
        self.files = files
        change = heavy_change(self.rng, files, "s2")
        user_write(self.A, change)
        setup_run("snapshot", self.A)
        files2 = apply(files, change)
        change = heavy_change(self.rng, files2, "live")
        user_write(self.A, change)
        self.live = apply(files2, change)
        return ["revert", self.A, "1"]

    def volumes(self) -> list[Path]:
        return [self.A]

    def check_cut(self, before, after):
        assert after["A"] in (before["A"], before["A"][:1])

    def check_final(self, before):
        assert lineage(self.A) == before["A"][:1]
        assert file_data(self.A) == self.files
        kept = preserved(self.A)
        assert before["A"][1] in kept
        assert self.outside.snapshot_files(self.A, kept[-1]) == self.live


@functools.cache
def startup_time() -> float:
    """How long `python -m volsync` takes before it touches a volume (imports): a kill
    before that tests nothing, so the random delays start there."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import volsync.cli"], check=True, env=clean_env())
    return time.monotonic() - start


def _run_killed(cmd: list, delay: float | None) -> tuple[int, float]:
    """Run the command; with `delay`, SIGKILL it then (if still running). Returns its exit
    status (negative: killed) and how long it ran."""
    start = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "volsync", *map(str, cmd)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    if delay is not None:
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=180)
    took = time.monotonic() - start
    assert p.returncode in (0, -signal.SIGKILL), f"{cmd} -> {p.returncode}: {err.decode()}"
    return p.returncode, took


@pytest.mark.parametrize("kind", [Baseline, Incremental, Resync, Revert],
                         ids=lambda k: k.__name__.lower())
def test_killed_at_random_moment_then_power_cut(fs, tmp_path, kind):
    rng = random.Random(f"powercut-{kind.__name__}")
    outside = Outside(tmp_path / "out")
    duration = None
    for rnd in range(ROUNDS + 1):
        sc = kind(fs.path / f"r{rnd}", random.Random(rng.random()))
        sc.outside = outside
        cmd = sc.setup()
        cut(fs)  # the setup was acknowledged (commands) or fsynced (the user): all survives
        before = sc.lineages()
        # round 0 runs to the end (acknowledged, then cut), and times the command; later
        # rounds are killed at a random moment within that time
        # (stratified: round i is killed in the i-th slice of the run after start-up)
        if duration is not None:
            lo, hi = startup_time() * 0.9, max(duration * 1.05, startup_time())
            delay = lo + (hi - lo) * (rnd - 1 + rng.random()) / ROUNDS
        else:
            delay = None
        code, took = _run_killed(cmd, delay)
        if duration is None:
            duration = took
        cut(fs)
        after = sc.lineages()
        try:
            sc.check_cut(before, after)
            if code == 0:  # it finished before the kill: acknowledged, so all of it is there
                sc.check_final(before)
            # verify passes on every volume as the cut left it (it finishes a journal first)
            verified(*[v for v, lin in zip(sc.volumes(), after.values()) if lin is not None])
            run(*cmd)
            sc.check_final(before)
            verified(*sc.volumes())
        except AssertionError as exc:
            raise AssertionError(f"round {rnd}, killed after {delay} s (exit {code}, "
                                 f"ran {took:.2f} s): {exc}") from None
