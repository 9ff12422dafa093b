"""Reliability under I/O faults: volsync's own I/O layer is made to fail (VOLSYNC_FAULT, see
store/crash.py) on the Nth write / fsync / read, once or from then on, in a real subprocess of
snapshot, revert, prune, transfer (baseline and incremental) and resync. Every case must end
with one clear line on stderr and exit 1, each volume's state either the old one or the new
one, every volume verifying, and a rerun with the fault gone giving the reference result.
The calls a run makes are counted first (in-process, the same run as the reference); the
cases then sample N over them (VOLSYNC_FAULT_SWEEP=all: every N, a few minutes).

Also: files that grow, vanish or keep changing while a snapshot reads them, and a real full
disk (a small tmpfs)."""

from __future__ import annotations

import errno
import hashlib
import importlib
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import helpers
import pytest
from helpers import Result as Res
from helpers import content as live
from helpers import ok, opened, vs

from volsync import ops
from volsync import tree as vtree
from volsync.store import fsutil
from volsync.store import packs as vpacks
from volsync.store.volume import Volume, is_volume

# the scanner's and the live-tree writer's modules (volsync.tree.scan the attribute is the
# scan function, so the module is looked up by name)
vscan = importlib.import_module("volsync.tree.scan")
vwrite = importlib.import_module("volsync.tree.write")

META = ".volsync"
WORKERS = max(2, min(6, (os.cpu_count() or 2) + 1))
OPS = ("write", "fsync", "read")


# --- running volsync ----------------------------------------------------------------------------

def sub(*args, fault: str | None = None, cwd: Path | None = None, timeout: float = 60) -> Res:
    """The real program in a child process, optionally with VOLSYNC_FAULT set."""
    return helpers.sub(*args, env_extra={"VOLSYNC_FAULT": fault} if fault else None, cwd=cwd,
                       timeout=timeout)


def write_files(root: Path, files: dict[str, bytes | str | None]) -> None:
    for rel, data in files.items():
        p = root / rel
        if data is None:
            p.unlink()
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)


def age(root: Path, when: int) -> None:
    """Every mtime under root (not .volsync) set to `when`, so trees are reproducible and the
    stat cache trusts them."""
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and META in dirnames:
            dirnames.remove(META)
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (when, when), follow_symlinks=False)


def signature(root: Path) -> dict:
    """A volume's state in terms that do not depend on where it lives or on random ids of
    snapshots made in different runs: mode, the lineage and the preserved set as
    (number, root tree) pairs, and the journal."""
    vol = Volume.open(root)
    st = vol.state()
    return {
        "mode": st.mode,
        "lineage": tuple((s.number, s.root) for s in vol.lineage(st)),
        "preserved": frozenset((s.number, s.root) for s in vol.preserved(st)),
        "journal": st.journal,
    }


def verify_ok(root: Path) -> list[str]:
    """In-process verify. The cases run in threads that fork subprocesses: a child forked
    while another thread held a volume's lock holds a copy of it until it execs (a moment),
    so the lock is waited for briefly instead of refused at once."""
    with opened(root) as vol:
        return ops.verify(vol, wait=10).errors


def copy_case(template: Path, dest: Path) -> None:
    shutil.copytree(template, dest, symlinks=True)


# --- scenarios ------------------------------------------------------------------------------------
#
# Each builds its volumes under a directory (in-process, fast), then names the command to break.
# Volumes are copied per case; a mirror's recorded upstream path then points at the template,
# which only makes a transfer re-commit it (the signature ignores the path).

T0 = 1_600_000_000
BIG = bytes(range(256)) * 1300  # 332800 bytes: written by the pack writer as its own record


def _files(tag: str) -> dict[str, bytes]:
    return {
        "a.txt": f"alpha {tag}\n".encode(),
        "d/b.bin": (tag.encode() * 5000)[:20000],
        "d/e/c.txt": f"deep {tag}\n".encode() * 50,
        "big.bin": BIG if tag == "1" else BIG[:-1000] + tag.encode() * 1000,
        "empty": b"",
    }


def build_snapshot(base: Path) -> list[str]:
    a = base / "A"
    write_files(a, _files("1"))
    ok("init", a, "--block-size", "4K")
    age(a, T0)
    ok("snapshot", a)
    write_files(a, _files("2") | {"a.txt": None, "new.txt": "fresh\n"})
    os.symlink("d/b.bin", a / "link")
    age(a, T0 + 10)
    return ["snapshot", "A"]


def build_revert(base: Path) -> list[str]:
    a = base / "A"
    write_files(a, _files("1"))
    ok("init", a, "--block-size", "4K")
    age(a, T0)
    ok("snapshot", a)
    write_files(a, _files("2"))
    age(a, T0 + 10)
    ok("snapshot", a)
    write_files(a, {"d/b.bin": b"live change " * 900, "x/y.txt": "unsnapshotted\n"})
    age(a, T0 + 20)
    return ["revert", "A", "1"]


def build_prune(base: Path) -> list[str]:
    a = base / "A"
    write_files(a, _files("1"))
    ok("init", a, "--block-size", "4K")
    for i in range(2, 5):
        age(a, T0 + i)
        ok("snapshot", a)
        write_files(a, _files(str(i)))
    age(a, T0 + 10)
    ok("snapshot", a)
    ok("revert", a, "3")
    return ["prune", "A", "--keep-last", "1", "--preserved"]


def build_transfer_baseline(base: Path) -> list[str]:
    a = base / "A"
    write_files(a, _files("1"))
    ok("init", a, "--block-size", "4K")
    age(a, T0)
    ok("snapshot", a)
    write_files(a, {"later.txt": "later\n"})
    age(a, T0 + 5)
    return ["transfer", "A", "B"]


def build_transfer_incremental(base: Path) -> list[str]:
    a = base / "A"
    write_files(a, _files("1"))
    ok("init", a, "--block-size", "4K")
    age(a, T0)
    ok("transfer", a, base / "B")
    write_files(a, _files("2") | {"d/e/c.txt": None, "z/new.txt": "new\n"})
    age(a, T0 + 10)
    ok("snapshot", a)
    write_files(a, _files("3"))
    age(a, T0 + 20)
    return ["transfer", "A", "B"]


def build_resync(base: Path) -> list[str]:
    a, b = base / "A", base / "B"
    write_files(a, _files("1"))
    ok("init", a, "--block-size", "4K")
    age(a, T0)
    ok("transfer", a, b)
    ok("break", b)
    write_files(b, {"b-only.txt": "written on B\n", "d/b.bin": b"B" * 9000})
    age(b, T0 + 5)
    ok("snapshot", b)
    write_files(b, {"b-live.txt": "B live change\n"})
    age(b, T0 + 6)
    write_files(a, _files("2"))
    age(a, T0 + 10)
    ok("snapshot", a)
    write_files(a, {"a-live.txt": "A live change\n"})
    age(a, T0 + 11)
    return ["resync", "A", "B", "--force"]


SCENARIOS = {
    "snapshot": build_snapshot,
    "revert": build_revert,
    "prune": build_prune,
    "transfer-baseline": build_transfer_baseline,
    "transfer-incremental": build_transfer_incremental,
    "resync": build_resync,
}


# --- one scenario: reference run, counting, then every fault case -------------------------------

@dataclass
class Reference:
    argv: list[str]
    volumes: list[str]
    before: dict[str, dict]
    before_live: dict[str, dict]
    before_root: dict[str, bytes]
    after: dict[str, dict]
    after_live: dict[str, dict]
    calls: dict[str, int]


def _volumes(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir() if is_volume(p))


def _patch_counting(monkeypatch, counts: dict[str, int]) -> None:
    def counting(op: str) -> None:
        counts[op] += 1

    for module in (vscan, vwrite, fsutil, vpacks):
        monkeypatch.setattr(module, "fault", counting)


def reference(name: str, root: Path, monkeypatch) -> tuple[Path, Reference]:
    template = root / "template"
    template.mkdir(parents=True)
    argv = SCENARIOS[name](template)
    vols = _volumes(template)
    before = {v: signature(template / v) for v in vols}
    before_live = {v: live(template / v) for v in vols}
    before_root = {v: live_root(template / v) for v in vols}
    # the reference run is made on a copy (as every case is), counting the I/O calls
    ref = root / "reference"
    copy_case(template, ref)
    counts = {op: 0 for op in OPS}
    with monkeypatch.context() as m:
        _patch_counting(m, counts)
        m.chdir(ref)
        r = vs(*argv)
    assert r.code == 0, r
    vols_after = _volumes(ref)
    after = {v: signature(ref / v) for v in vols_after}
    after_live = {v: live(ref / v) for v in vols_after}
    for v in vols_after:
        assert verify_ok(ref / v) == []
    return template, Reference(argv, vols_after, before, before_live, before_root, after,
                               after_live, counts)


def sample(n: int, k: int) -> list[int]:
    """1..n when small, else k values spread over it (first and last included);
    VOLSYNC_FAULT_SWEEP=all tries every N (slow)."""
    if n <= k or os.environ.get("VOLSYNC_FAULT_SWEEP") == "all":
        return list(range(1, n + 1))
    return sorted({1 + round(i * (n - 1) / (k - 1)) for i in range(k)})


EMPTY_MIRROR = {"mode": "read-only", "lineage": (), "preserved": frozenset(), "journal": None}


def between(sig: dict, old: dict | None, new: dict) -> str | None:
    """None when `sig` is the old state or the new one (a journal is never left behind;
    preserved snapshots may be the old set, the new set, or the old plus new ones kept)."""
    if sig["journal"] is not None:
        return f"journal left behind: {sig['journal']}"
    shapes = [new] + ([old] if old else [])
    if not any(sig["mode"] == s["mode"] and sig["lineage"] == s["lineage"] for s in shapes):
        return f"lineage/mode is neither old nor new: {sig['mode']} {sig['lineage']}"
    old_p = old["preserved"] if old else frozenset()
    if not (old_p & new["preserved"]) <= sig["preserved"] <= (old_p | new["preserved"]):
        return "preserved set is neither old nor new"
    return None


def live_root(path: Path) -> bytes:
    with opened(path) as vol:
        return vtree.scan(vol, write=False)[0].root


def check_live(path: Path, v: str, sig: dict, ref: Reference) -> list[str]:
    """The live tree goes with the state: the new live tree with the new lineage; with the
    old lineage the old live tree, or (resync keeps DST's live changes as a preserved
    snapshot first) the lineage's latest snapshot while a preserved one holds the old tree."""
    tree = live(path)
    new = ref.after[v]
    if sig["lineage"] == new["lineage"] and sig["mode"] == new["mode"]:
        return [] if tree == ref.after_live[v] else [f"{v}: live tree is not the new one"]
    if tree == ref.before_live.get(v, {}):
        return []
    here = live_root(path)
    if (sig["lineage"] and here == sig["lineage"][-1][1]
            and ref.before_root.get(v) in {r for _, r in sig["preserved"]}):
        return []
    return [f"{v}: live tree matches neither the old state nor the new one"]


def run_case(template: Path, ref: Reference, case_dir: Path, spec: str, errname: str
             ) -> tuple[str | None, int]:
    """One fault case; returns (None when it held, else what went wrong; its exit code)."""
    copy_case(template, case_dir)
    r = sub(*ref.argv, fault=spec, cwd=case_dir)
    problems = []
    if r.code not in (0, 1):
        problems.append(f"exit {r.code}")
    lines = r.err.strip().splitlines()
    errors = [x for x in lines if x.startswith("volsync: error:")]
    if "Traceback" in r.err or any(not x.startswith("volsync: ") for x in lines):
        problems.append("stderr is not volsync's own lines")
    if r.code == 1:
        if len(errors) != 1:
            problems.append(f"{len(errors)} error lines")
        elif os.strerror(getattr(errno, errname)) not in errors[0]:
            problems.append("the error line does not say what failed")
        elif spec.startswith("read:") and f"'{case_dir}/" not in errors[0]:
            problems.append("a failed read does not name the file")
    elif errors:
        problems.append("error printed with exit 0")
    # each volume: the old state or the new one, its live tree to match, and it verifies
    for v in ref.volumes:
        path = case_dir / v
        if not is_volume(path):  # (a `.volsync/` an interrupted create left is not a volume)
            if v in ref.before:
                problems.append(f"{v} lost its metadata")
            continue  # a mirror the failed transfer could not create
        sig = signature(path)
        if sig["journal"] is not None:
            # a live-tree step the run could neither finish nor undo: only when the fault
            # went on (sticky); the next command that takes the lock (here verify) finishes it
            if not spec.endswith("+"):
                problems.append(f"{v}: journal left behind after a one-off fault")
            errs = verify_ok(path)
            if errs:
                problems.append(f"{v}: verify: {errs[:3]}")
            sig = signature(path)
        why = between(sig, ref.before.get(v, EMPTY_MIRROR), ref.after[v])
        if why:
            problems.append(f"{v}: {why}")
        elif r.code == 0 and sig != ref.after[v]:
            problems.append(f"{v}: exit 0 but not the reference result")
        else:
            problems += check_live(path, v, sig, ref)
        errs = verify_ok(path)
        if errs:
            problems.append(f"{v}: verify: {errs[:3]}")
    # the fault gone, a rerun gives the reference result (a snapshot the failed run had
    # committed before its error makes the rerun's snapshot one more of the same tree)
    committed = all(is_volume(case_dir / v) and signature(case_dir / v) == ref.after[v]
                    for v in ref.volumes)
    r2 = sub(*ref.argv, cwd=case_dir)
    if r2.code != 0:
        problems.append(f"rerun exit {r2.code}: {r2.err.strip()}")
    else:
        for v in ref.volumes:
            path = case_dir / v
            want = ref.after[v]
            if committed and ref.argv[0] == "snapshot":
                last = want["lineage"][-1]
                want = want | {"lineage": want["lineage"] + ((last[0] + 1, last[1]),)}
            if signature(path) != want:
                problems.append(f"{v}: rerun state differs from the reference")
            if live(path) != ref.after_live[v]:
                problems.append(f"{v}: rerun live tree differs from the reference")
            errs = verify_ok(path)
            if errs:
                problems.append(f"{v}: verify after rerun: {errs[:3]}")
    shutil.rmtree(case_dir, ignore_errors=True)
    if problems:
        return f"{spec} (exit {r.code}, {r.err.strip()!r}): " + "; ".join(problems), r.code
    return None, r.code


def fault_specs(calls: dict[str, int]) -> list[tuple[str, str]]:
    """(VOLSYNC_FAULT, errno name) for every case of a scenario."""
    specs: list[tuple[str, str]] = []
    w, f, rd = calls["write"], calls["fsync"], calls["read"]
    specs += [(f"write:ENOSPC:{n}", "ENOSPC") for n in sample(w, 10)]
    specs += [(f"write:EIO:{n}", "EIO") for n in sample(w, 4)]
    specs += [(f"write:ENOSPC:{n}+", "ENOSPC") for n in sample(w, 3)]
    specs += [(f"write:EIO:{n}+", "EIO") for n in sample(w, 3)]
    specs += [(f"fsync:EIO:{n}", "EIO") for n in sample(f, 8)]
    specs += [(f"fsync:EIO:{n}+", "EIO") for n in sample(f, 2)]
    specs += [(f"read:EIO:{n}", "EIO") for n in sample(rd, 4)]
    specs += [(f"read:EIO:{n}+", "EIO") for n in sample(rd, 2)]
    return specs


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_io_faults(name, tmp_path, monkeypatch):
    template, ref = reference(name, tmp_path, monkeypatch)
    assert ref.calls["write"] > 0 and ref.calls["fsync"] > 0
    specs = fault_specs(ref.calls)
    with ThreadPoolExecutor(WORKERS) as pool:
        outcomes = list(pool.map(
            lambda i_spec: run_case(template, ref, tmp_path / f"case{i_spec[0]}", *i_spec[1]),
            enumerate(specs)))
    failures = [o for o, _ in outcomes if o]
    exit0 = sum(1 for _, code in outcomes if code == 0)
    print(f"\n{name}: I/O calls {ref.calls}; {len(specs)} fault cases, "
          f"{len(specs) - len(failures)} held ({exit0} ran to success despite the fault)")
    assert not failures, "\n".join(failures)


# --- files that change while a snapshot reads them ----------------------------------------------

_REAL_READ_BLOCK = vscan._read_block


def _interfere_on_read(monkeypatch, target: Path, action, times: int) -> list[int]:
    """Make `action()` happen right after the first block of `target` is read, on the first
    `times` reads of it; returns a list counting the reads interfered with."""
    real = vscan._read_block
    ino = target.stat().st_ino
    done: list[int] = []

    def read_block(fd: int, size: int, offset: int) -> bytes:
        data = real(fd, size, offset)
        st = os.fstat(fd)
        if st.st_ino == ino and len(done) < times and offset == 0:
            done.append(1)
            action()
        return data

    monkeypatch.setattr(vscan, "_read_block", read_block)
    return done


def _snapshot_files(tmp_path: Path, files: dict[str, bytes]) -> Path:
    vol = tmp_path / "V"
    write_files(vol, files)
    ok("init", vol, "--block-size", "4K")
    age(vol, T0)
    return vol


def _restored(vol: Path, snap: str, dest: Path) -> dict[str, tuple]:
    ok("restore", vol, snap, dest)
    return live(dest)


@pytest.mark.parametrize("times", [1, 3, 4])
def test_file_growing_while_read_is_read_again(tmp_path, monkeypatch, times):
    """A file appended to while read is read again; a later attempt that sees it still gets
    one complete version (the last), never a torn mix."""
    vol = _snapshot_files(tmp_path, {"grow.log": b"0" * 20000, "other": b"x"})
    target = vol / "grow.log"
    counter = iter(range(1, 100))

    def append() -> None:
        with open(target, "ab") as f:
            f.write(str(next(counter)).encode() * 3000)

    done = _interfere_on_read(monkeypatch, target, append, times)
    r = vs("snapshot", vol)
    assert r.code == 0, r
    assert len(done) == times
    got = _restored(vol, "latest", tmp_path / "r")
    assert got["grow.log"][1] == target.read_bytes()
    assert verify_ok(vol) == []


@pytest.mark.parametrize("change", ["grow", "shrink", "rewrite"])
def test_file_that_keeps_changing_is_reported_not_torn(tmp_path, monkeypatch, change):
    """A file that changes on every attempt, --strict: exit 1 naming it, nothing committed,
    and the next snapshot (once it holds still) captures it."""
    vol = _snapshot_files(tmp_path, {"busy.db": bytes(range(256)) * 200, "calm": b"calm"})
    ok("snapshot", vol)
    target = vol / "busy.db"
    target.write_bytes(bytes(range(255, -1, -1)) * 200)  # changed: the snapshot must read it
    before = signature(vol)
    n = iter(range(1, 100))

    def act() -> None:
        i = next(n)
        data = target.read_bytes()
        if change == "grow":
            data += b"+" * 100
        elif change == "shrink":
            data = data[: len(data) - 100]
        else:  # same size, new content, written in place
            data = bytes([i % 256]) * len(data)
        with open(target, "r+b") as f:
            f.write(data)
            f.truncate()

    done = _interfere_on_read(monkeypatch, target, act, 10**6)
    r = vs("snapshot", vol, "--strict")  # (without --strict: tests/test_busy_files.py)
    assert r.code == 1, r
    assert len(done) == vtree.READ_ATTEMPTS
    assert "busy.db" in r.err and "changing" in r.err and len(r.err.strip().splitlines()) == 1
    assert "Traceback" not in r.err
    assert signature(vol) == before
    assert verify_ok(vol) == []
    monkeypatch.setattr(vscan, "_read_block", _REAL_READ_BLOCK)
    r = vs("snapshot", vol)
    assert r.code == 0, r
    assert _restored(vol, "latest", tmp_path / "r")["busy.db"][1] == target.read_bytes()


def test_file_vanishing_while_read(tmp_path, monkeypatch):
    """A file deleted while read is left out (it was not there at the end), or captured whole;
    other files are captured."""
    vol = _snapshot_files(tmp_path, {"gone.tmp": b"g" * 30000, "stay": b"stay"})
    target = vol / "gone.tmp"
    done = _interfere_on_read(monkeypatch, target, lambda: target.unlink(), 1)
    r = vs("snapshot", vol)
    assert r.code == 0, r
    assert done == [1]
    got = _restored(vol, "latest", tmp_path / "r")
    assert got["stay"][1] == b"stay"
    assert "gone.tmp" not in got or got["gone.tmp"][1] == b"g" * 30000
    assert verify_ok(vol) == []


RECORD = 64


def _record(i: int) -> bytes:
    head = f"{i:010d} ".encode()
    tail = hashlib.sha256(head).hexdigest().encode()
    return (head + tail)[: RECORD - 1] + b"\n"


def _whole_records(data: bytes) -> bool:
    if len(data) % RECORD:
        return False
    return all(data[i * RECORD:(i + 1) * RECORD] == _record(i) for i in range(len(data) // RECORD))


def test_snapshot_while_appender_runs(tmp_path):
    """A helper thread appends whole records to a log without pause while `volsync snapshot`
    (a real process, --strict) runs again and again: each snapshot either holds a complete
    version of the log (whole records, a prefix of the final file) or reports the file; never
    a torn one."""
    vol = tmp_path / "V"
    base = b"".join(_record(i) for i in range(30000))  # ~1.9 MB: reading it takes a while
    write_files(vol, {"app.log": base, "other.txt": "other\n"})
    ok("init", vol, "--block-size", "4K")
    stop = threading.Event()
    count = [30000]

    def appender() -> None:
        fd = os.open(vol / "app.log", os.O_WRONLY | os.O_APPEND)
        try:
            while not stop.is_set():
                os.write(fd, b"".join(_record(count[0] + k) for k in range(8)))
                count[0] += 8
                if count[0] % 64 == 0:
                    time.sleep(0.002)  # leave the reader windows where the file holds still
        finally:
            os.close(fd)

    thread = threading.Thread(target=appender)
    thread.start()
    outcomes = {"captured": 0, "reported": 0}
    try:
        for _ in range(10):
            r = sub("snapshot", vol, "--strict")
            if r.code == 0:
                outcomes["captured"] += 1
            else:
                assert r.code == 1 and "app.log" in r.err and "Traceback" not in r.err, r
                outcomes["reported"] += 1
    finally:
        stop.set()
        thread.join()
    assert verify_ok(vol) == []
    final = (vol / "app.log").read_bytes()
    st = Volume.open(vol).state()
    for i, _ in enumerate(st.lineage, 1):
        got = _restored(vol, str(i), tmp_path / f"r{i}")
        log = got["app.log"][1]
        assert _whole_records(log) and final.startswith(log), f"snapshot {i} holds a torn log"
        assert got["other.txt"][1] == b"other\n"
    print(f"\nappender: {outcomes}")


# --- a real full disk ---------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs, grown by calling the returned function; skipped where mount fails."""
    where = tmp_path / "disk"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {r.stderr.strip()}")

    def grow(size: str = "32m") -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)

    try:
        yield where, grow
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _no_space(r: Res) -> None:
    assert r.code == 1, r
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("volsync: error:"), r
    assert "No space left on device" in lines[0] and "Traceback" not in r.err


def test_full_disk_snapshot(small_disk, tmp_path):
    disk, grow = small_disk
    vol = disk / "V"
    write_files(vol, {"small.txt": "small\n"})
    ok("init", vol, "--block-size", "4K")
    ok("snapshot", vol)
    before = signature(vol)
    write_files(vol, {f"f{i}.bin": os.urandom(400_000) for i in range(4)})  # 1.6 MB: no room
    want = live(vol)                                                        # for a second copy
    r = sub("snapshot", vol)
    _no_space(r)
    assert signature(vol) == before
    assert verify_ok(vol) == []
    assert sub("verify", vol).code == 0
    assert live(vol) == want
    grow()
    r = sub("snapshot", vol)
    assert r.code == 0, r
    assert verify_ok(vol) == []
    assert _restored(vol, "latest", tmp_path / "r") == want


@pytest.mark.parametrize("blob", [300_000, 170_000])
def test_full_disk_transfer(small_disk, tmp_path, blob):
    """Transfers into a mirror on a small disk until it fills: the failing one exits 1 saying
    so, the mirror keeps its previous state (and verifies), and once there is room the rerun
    brings it up to date."""
    disk, grow = small_disk
    src, dst = tmp_path / "S", disk / "M"
    write_files(src, {"seed.txt": "seed\n"})
    ok("init", src, "--block-size", "4K")
    done = 0
    for i in range(20):
        write_files(src, {f"d{i}/blob.bin": os.urandom(blob)})
        before = signature(dst) if is_volume(dst) else None
        before_live = live(dst) if before else {}
        r = sub("transfer", src, dst)
        if r.code != 0:
            break
        done += 1
        assert verify_ok(dst) == []
    else:
        pytest.fail("the small disk never filled")
    _no_space(r)
    assert done >= 1  # the first transfers fit
    sig = signature(dst)
    assert sig == before
    assert live(dst) == before_live
    assert verify_ok(dst) == [] and verify_ok(src) == []
    assert sub("verify", dst).code == 0
    grow()
    r = sub("transfer", src, dst)
    assert r.code == 0, r
    assert verify_ok(dst) == []
    assert live(dst) == live(src)
    assert signature(dst)["lineage"] == signature(src)["lineage"]
