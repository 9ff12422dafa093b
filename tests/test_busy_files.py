"""Busy and unreadable files (issue 9): one file that keeps changing while read, or that
cannot be read, no longer stops the whole volume. After bounded retries the file is recorded
as in the latest snapshot (a busy file without one: its last read bytes, "possibly
inconsistent"; an unreadable one without one: left out), a `volsync: warning:` line names its
full path, `--json` lists it under `warnings`, and the exit status is 7; `--strict` fails as
before (exit 1). On a copy-on-write filesystem a busy file is read from a clone instead.

"Busy" is forced deterministically by changing the file right after each read of its first
block (in-process, or in a far side whose scanner is patched the same way); a real appender
thread is tried too. "Unreadable": the tests run as root, whom mode 000 does not stop, so
volsync runs without the capabilities that let root read anything (setpriv
--bounding-set=-dac_override,-dac_read_search); as another user, mode 000 is enough."""

from __future__ import annotations

import base64
import importlib
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import Result, clean_env, content, make_volume, ok, okj, restored, sub, verify_clean
from helpers import vs as vs_run

from volsync.remote import protocol
from volsync.wire import ProtocolError

vscan = importlib.import_module("volsync.tree.scan")

IS_ROOT = os.geteuid() == 0
SETPRIV = shutil.which("setpriv")
NO_READ_OVERRIDE = [SETPRIV or "setpriv", "--bounding-set=-dac_override,-dac_read_search"]
HOST = "farhost"
V1, V2 = b"version one " * 1000, b"version two " * 1000


def vs(*args) -> Result:
    return vs_run(*args)


def warning_lines(r: Result) -> list[str]:
    lines = r.err.strip().splitlines()
    assert all(line.startswith("volsync: warning: ") for line in lines), r
    assert "Traceback" not in r.err
    return lines


def assert_one_error(r: Result, *words: str) -> None:
    lines = r.err.strip().splitlines()
    assert r.code == 1 and len(lines) == 1 and lines[0].startswith("volsync: error: "), r
    assert all(w in lines[0] for w in words), r


def same_as_snapshot(src: Path, dst: Path, work: Path) -> None:
    """DST verifies and its live tree is SRC's latest snapshot as recorded."""
    verify_clean(dst)
    work.mkdir(parents=True, exist_ok=True)
    assert content(dst) == restored(src, "latest", work / "recorded")


# --- busy, forced ------------------------------------------------------------------------------

def keep_changing(monkeypatch, target: Path, data=lambda i: None) -> list[int]:
    """Rewrite `target` in place right after each read of its first block (so every read
    attempt sees it change, by its size too); `data(i)` gives the i-th new content (default:
    V2 and i bytes more)."""
    real = vscan._read_block
    ino = target.stat().st_ino
    done: list[int] = []

    def read_block(fd: int, size: int, offset: int) -> bytes:
        got = real(fd, size, offset)
        if offset == 0 and os.fstat(fd).st_ino == ino:
            done.append(1)
            new = data(len(done)) or V2 + b"+" * len(done)
            with open(target, "r+b") as f:
                f.write(new)
        return got

    monkeypatch.setattr(vscan, "_read_block", read_block)
    return done


def test_busy_file_keeps_its_previous_version(tmp_path, monkeypatch):
    vol = make_volume(tmp_path / "V", {"busy.db": V1, "calm.txt": "calm 1"})
    ok("snapshot", vol)
    (vol / "busy.db").write_bytes(V2)
    (vol / "calm.txt").write_text("calm 2")
    done = keep_changing(monkeypatch, vol / "busy.db")
    r = vs("snapshot", vol, "--json")
    assert r.code == 7, r
    assert len(done) == vscan.READ_ATTEMPTS  # bounded retries
    assert r.json["warnings"] == [{"path": "busy.db", "problem": "busy", "recorded": "previous"}]
    assert warning_lines(r) == [
        (f"volsync: warning: file kept changing while being read; its previous version was "
         f"recorded: {vol}/busy.db")]
    got = restored(vol, "latest", tmp_path / "r2")
    assert got["busy.db"][1] == V1 and got["calm.txt"][1] == b"calm 2"  # the rest is new
    verify_clean(vol)
    monkeypatch.undo()  # it holds still now: the next snapshot reads it again (no stale cache)
    r = vs("snapshot", vol)
    assert r.code == 0 and "warning" not in r.out + r.err, r
    assert restored(vol, "latest", tmp_path / "r3")["busy.db"][1] == (vol / "busy.db").read_bytes()


def test_busy_file_without_previous_version_is_recorded_as_read(tmp_path, monkeypatch):
    """No snapshot holds it yet: its bytes as last read, marked possibly inconsistent."""
    vol = make_volume(tmp_path / "V", {"old.txt": "old"})
    ok("snapshot", vol)
    (vol / "new.log").write_bytes(V1)
    keep_changing(monkeypatch, vol / "new.log", lambda i: V1 + b"+" * (100 * i))
    r = vs("snapshot", vol)
    assert r.code == 7, r
    assert r.out.strip().endswith("; 1 warning(s)"), r
    assert warning_lines(r) == [
        ("volsync: warning: file kept changing while being read; recorded as last read, "
         f"possibly inconsistent: {vol}/new.log")]
    log = restored(vol, "latest", tmp_path / "r")["new.log"][1]
    assert log.startswith(V1) and (vol / "new.log").read_bytes().startswith(log)
    verify_clean(vol)


def test_busy_file_strict_fails_as_before(tmp_path, monkeypatch):
    vol = make_volume(tmp_path / "V", {"busy.db": V1})
    ok("snapshot", vol)
    (vol / "busy.db").write_bytes(V2)
    keep_changing(monkeypatch, vol / "busy.db")
    for args in (["snapshot", vol], ["transfer", vol, tmp_path / "M"], ["status", vol]):
        r = vs(*args, "--strict", "--json")
        assert_one_error(r, "busy.db", "kept changing")
        assert r.json["code"] == 1
    assert okj("snapshots", tmp_path / "M")["snapshots"] == []  # (made, as before: empty)
    assert len(okj("snapshots", vol)["snapshots"]) == 1


def test_transfer_of_a_busy_source(tmp_path, monkeypatch):
    """The mirror gets the busy file's previous version and everything else new; it verifies
    and matches SRC's snapshot; text and JSON say so; the run exits 7."""
    src = make_volume(tmp_path / "S", {"busy.db": V1, "calm.txt": "calm 1"})
    mirror = tmp_path / "M"
    ok("transfer", src, mirror)
    (src / "busy.db").write_bytes(V2)
    (src / "calm.txt").write_text("calm 2")
    keep_changing(monkeypatch, src / "busy.db")
    r = vs("transfer", src, mirror)
    assert r.code == 7, r
    assert "warnings: 1 file(s) of SRC not captured as they are" in r.out, r
    assert warning_lines(r) == [
        (f"volsync: warning: file kept changing while being read; its previous version was "
         f"recorded: {src}/busy.db")]
    assert (mirror / "busy.db").read_bytes() == V1
    assert (mirror / "calm.txt").read_text() == "calm 2"
    same_as_snapshot(src, mirror, tmp_path)
    (src / "calm.txt").write_text("calm 3")
    data = vs("transfer", src, mirror, "--json")
    assert data.code == 7 and data.json["added"] == [3], data
    assert data.json["warnings"] == [{"path": "busy.db", "problem": "busy",
                                      "recorded": "previous"}]
    dry = vs("transfer", src, mirror, "--dry-run", "--json")
    assert dry.code == 7 and dry.json["warnings"][0]["path"] == "busy.db", dry
    monkeypatch.undo()
    r = vs("transfer", src, mirror)
    assert r.code == 0, r
    assert (mirror / "busy.db").read_bytes() == (src / "busy.db").read_bytes()
    same_as_snapshot(src, mirror, tmp_path / "2")


def test_role_swap_and_resync_report_busy_files(tmp_path, monkeypatch):
    a = make_volume(tmp_path / "A", {"busy.db": V1})
    b = tmp_path / "B"
    ok("transfer", a, b)
    (a / "busy.db").write_bytes(V2)
    keep_changing(monkeypatch, a / "busy.db")
    r = vs("role-swap", a, b, "--strict")
    assert_one_error(r, "busy.db")
    r = vs("role-swap", a, b, "--json")
    assert r.code == 7 and r.json["read_write"] == str(b), r
    assert r.json["warnings"] == [{"path": "busy.db", "problem": "busy", "recorded": "previous"}]
    assert (b / "busy.db").read_bytes() == V1
    monkeypatch.undo()
    (b / "busy.db").write_bytes(V2)
    keep_changing(monkeypatch, b / "busy.db", lambda i: V1 + b"-" * i)
    r = vs("resync", b, a, "--json")
    assert r.code == 7 and r.json["warnings"][0]["recorded"] == "previous", r
    assert (a / "busy.db").read_bytes() == V1
    verify_clean(a)


def test_real_appender(tmp_path):
    """A thread appends to a big log every ~1 ms while `volsync transfer` (a real process)
    snapshots it: the run finishes (exit 7 with the log's previous version, or exit 0 with a
    whole version if a read happened to see it hold still), never fails, and the mirror
    verifies and matches the recorded snapshot."""
    first = b"".join(b"record %08d\n" % i for i in range(2_000_000))  # 32 MiB
    src = make_volume(tmp_path / "S", {"app.log": first, "other": "x"})
    mirror = tmp_path / "M"
    ok("transfer", src, mirror)
    stop = threading.Event()

    def appender() -> None:
        with open(src / "app.log", "ab", buffering=0) as f:
            n = 0
            while not stop.is_set():
                f.write(b"append %08d\n" % n)
                n += 1
                time.sleep(0.001)

    thread = threading.Thread(target=appender)
    thread.start()
    try:
        r = sub("transfer", src, mirror, "--json", timeout=300)
    finally:
        stop.set()
        thread.join()
    assert r.code in (0, 7), r
    print(f"\nappender: exit {r.code}, warnings {r.json['warnings']}")
    log = (mirror / "app.log").read_bytes()
    if r.code == 7:
        assert r.json["warnings"] == [{"path": "app.log", "problem": "busy",
                                       "recorded": "previous"}]
        assert log == first
    assert (src / "app.log").read_bytes().startswith(log) and log.startswith(first)
    same_as_snapshot(src, mirror, tmp_path)


# --- copy-on-write: a clone is a consistent copy ------------------------------------------------

@pytest.fixture
def btrfs(tmp_path):
    """A small btrfs on a loop device; skipped where it cannot be made or mounted."""
    if shutil.which("mkfs.btrfs") is None:
        pytest.skip("mkfs.btrfs (btrfs-progs) is not installed")
    image, where = tmp_path / "btrfs.img", tmp_path / "cow"
    with open(image, "wb") as f:
        f.truncate(128 << 20)
    where.mkdir()
    made = subprocess.run(["mkfs.btrfs", "-q", str(image)], capture_output=True, text=True,
                          check=False)
    mounted = made.returncode == 0 and subprocess.run(
        ["mount", "-o", "loop", str(image), str(where)], capture_output=True, check=False
    ).returncode == 0
    if not mounted:
        pytest.skip(f"cannot make or mount a btrfs loop filesystem: {made.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.parametrize("layout", ["packed", "aligned"])
def test_busy_file_is_read_from_a_clone_on_cow(btrfs, tmp_path, monkeypatch, layout):
    """On btrfs a busy file is read from a FICLONE clone in .volsync/tmp/ (the changes are made
    to the original, so the clone holds still): captured whole, no warning, exit 0; nothing
    left in .volsync/tmp/. With packed packs the second attempt reads the clone (the first saw
    the file change); with aligned packs (btrfs's default: they share the clone's extents)
    every changed file is read from a clone at once, so no read of the original sees it."""
    monkeypatch.setenv("VOLSYNC_PACK_LAYOUT", layout)
    vol = make_volume(btrfs / "V", {"busy.db": V1})
    ok("snapshot", vol)
    (vol / "busy.db").write_bytes(V2)
    done = keep_changing(monkeypatch, vol / "busy.db")
    r = vs("snapshot", vol, "--json")
    assert r.code == 0 and r.json["warnings"] == [], r
    assert len(done) == (1 if layout == "packed" else 0)
    got = restored(vol, "latest", tmp_path / "r")["busy.db"][1]
    assert got == (V2 + b"+" if layout == "packed" else V2)  # the file as it was when cloned
    assert list((vol / ".volsync" / "tmp").iterdir()) == []
    verify_clean(vol)


# --- unreadable ---------------------------------------------------------------------------------

def unprivileged() -> list[str]:
    """A command prefix under which mode 000 stops reads (root: without DAC override)."""
    if not IS_ROOT:
        return []
    if SETPRIV is None:
        pytest.skip("setpriv (util-linux) is not installed")
    return NO_READ_OVERRIDE


def run_unprivileged(*args, env_extra: dict | None = None) -> Result:
    argv = [*unprivileged(), sys.executable, "-m", "volsync", *map(os.fsdecode, args)]
    p = subprocess.run(argv, capture_output=True, text=True, errors="surrogateescape",
                       env=clean_env(env_extra), check=False, timeout=120)
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture
def unreadable_volume(tmp_path) -> Path:
    """Snapshot 1 holds sub/zz and closed/c; then sub/zz changes and it and the directory
    closed/ become unreadable, and a new unreadable file sub/new appears."""
    vol = make_volume(tmp_path / "V", {"a.txt": "a", "sub/zz": "zz 1", "closed/c": "c 1",
                                       "sub/ok": "ok 1"})
    ok("snapshot", vol)
    (vol / "sub" / "zz").write_text("zz 2")
    (vol / "sub" / "new").write_text("new")
    (vol / "sub" / "ok").write_text("ok 2")
    for p in ("sub/zz", "sub/new", "closed"):
        os.chmod(vol / p, 0)
    return vol


UNREADABLE_JSON = [
    {"path": "closed", "problem": "unreadable", "recorded": "previous"},
    {"path": "sub/new", "problem": "unreadable", "recorded": "skipped"},
    {"path": "sub/zz", "problem": "unreadable", "recorded": "previous"},
]


def unreadable_lines(root: str) -> list[str]:
    kept = "volsync: warning: cannot read it (permission denied); its previous version was kept"
    return [f"{kept}: {root}/closed",
            f"volsync: warning: cannot read it (permission denied); left out: {root}/sub/new",
            f"{kept}: {root}/sub/zz"]


def test_unreadable_files_snapshot(unreadable_volume, tmp_path):
    vol = unreadable_volume
    r = run_unprivileged("snapshot", vol, "--strict")
    assert_one_error(r, f"cannot read {vol}/closed: Permission denied")
    r = run_unprivileged("snapshot", vol, "--json")
    assert r.code == 7, r
    assert r.json["warnings"] == UNREADABLE_JSON
    assert warning_lines(r) == unreadable_lines(str(vol))
    got = restored(vol, "latest", tmp_path / "r")
    assert got["sub/zz"][1] == b"zz 1" and got["closed/c"][1] == b"c 1"  # previous versions
    assert "sub/new" not in got and got["sub/ok"][1] == b"ok 2"
    verify_clean(vol)


def test_unreadable_files_status(unreadable_volume):
    vol = unreadable_volume
    r = run_unprivileged("status", vol)
    assert r.code == 7, r
    assert "warnings: 3 file(s) could not be read as they are" in r.out
    assert "M sub/ok" in r.out and "zz" not in r.out  # compared as in the latest snapshot
    assert warning_lines(r) == unreadable_lines(str(vol))
    assert run_unprivileged("status", vol, "--json").json["warnings"] == UNREADABLE_JSON
    r = run_unprivileged("status", vol, "--strict", "--json")
    assert_one_error(r, "cannot read", "Permission denied", str(vol))
    assert r.json == {"code": 1, "error": r.err.strip().removeprefix("volsync: error: ")}


def test_unreadable_files_transfer(unreadable_volume, tmp_path):
    src, mirror = unreadable_volume, tmp_path / "M"
    r = run_unprivileged("transfer", src, mirror, "--strict")
    assert_one_error(r, "cannot read", "Permission denied")
    assert okj("snapshots", mirror)["snapshots"] == []
    r = run_unprivileged("transfer", src, mirror, "--json")
    assert r.code == 7 and r.json["warnings"] == UNREADABLE_JSON, r
    assert warning_lines(r) == unreadable_lines(str(src))
    assert (mirror / "sub" / "zz").read_text() == "zz 1" and not (mirror / "sub" / "new").exists()
    same_as_snapshot(src, mirror, tmp_path)
    for p in ("sub/zz", "sub/new", "closed"):  # readable again: all of it goes over
        os.chmod(src / p, 0o755)
    r = run_unprivileged("transfer", src, mirror)
    assert r.code == 0 and r.err == "", r
    assert (mirror / "sub" / "zz").read_text() == "zz 2"
    assert (mirror / "sub" / "new").read_text() == "new"
    same_as_snapshot(src, mirror, tmp_path / "2")


def test_many_warnings_and_odd_names(tmp_path):
    """More than 20: 20 lines and a count (all in --json); names quoted as git does, with
    the exact bytes in path_b64 when they are not UTF-8."""
    vol = make_volume(tmp_path / "V", {})
    odd = [b"e\nline", b"caf\xc3\xa9", b"bad\xff"]
    names = [os.fsencode(f"f{i:02d}") for i in range(22)] + odd
    for name in names:
        path = os.path.join(os.fsencode(vol), name)
        with open(path, "wb") as f:
            f.write(b"x")
        os.chmod(path, 0)
    r = run_unprivileged("snapshot", vol, "--json")
    assert r.code == 7, r
    assert len(r.json["warnings"]) == 25
    by_path = {w["path"]: w for w in r.json["warnings"]}
    assert by_path["bad\ufffd"]["path_b64"] == base64.b64encode(b"bad\xff").decode()
    assert "café" in by_path and "path_b64" not in by_path["café"]
    assert "e\nline" in by_path
    lines = warning_lines(r)
    assert len(lines) == 21 and lines[-1] == (
        "volsync: warning: 5 more file(s) not captured as they are (--json lists them)")
    shown = "\n".join(lines)
    assert f'"{vol}/bad\\377"' in shown and f'"{vol}/caf\\303\\251"' in shown
    assert f'"{vol}/e\\nline"' in shown


# --- a remote SRC ---------------------------------------------------------------------------

BUSY_SERVER = """
import importlib, os, sys
from volsync.cli import main
scan = importlib.import_module("volsync.tree.scan")
target, real = os.path.realpath(sys.argv.pop(1)), scan._read_block
def read_block(fd, size, offset):
    got = real(fd, size, offset)
    if offset == 0 and os.path.realpath(f"/proc/self/fd/{fd}") == target:
        with open(target, "ab") as f:
            f.write(b"+")
    return got
scan._read_block = read_block
main(sys.argv[1:])
"""


@pytest.fixture
def far(monkeypatch, rsh_shim):
    """Remote volumes through the rsh shim; returns a function setting the far command."""
    monkeypatch.setenv("VOLSYNC_RSH", rsh_shim)

    def far_side(*prefix: str) -> None:
        monkeypatch.setenv("VOLSYNC_REMOTE_PATH", shlex.join([*prefix]))

    far_side(*unprivileged(), sys.executable, "-m", "volsync")
    return far_side


def test_remote_source_with_unreadable_files(unreadable_volume, tmp_path, far):
    src, mirror = unreadable_volume, tmp_path / "M"
    address = f"{HOST}:{src}"
    r = vs("transfer", address, mirror, "--strict")
    assert r.code == 1 and "Permission denied" in r.err and "Traceback" not in r.err, r
    r = vs("transfer", address, mirror, "--json")
    assert r.code == 7 and r.json["warnings"] == UNREADABLE_JSON, r
    assert warning_lines(r) == unreadable_lines(address)
    assert (mirror / "sub" / "zz").read_text() == "zz 1"
    same_as_snapshot(src, mirror, tmp_path)
    r = vs("status", address)  # a served command: run whole on the far side
    assert r.code == 7 and warning_lines(r) == unreadable_lines(str(src)), r
    r = vs("snapshot", address, "--json")
    assert r.code == 7 and r.json["warnings"] == UNREADABLE_JSON, r
    assert vs("snapshot", address, "--strict").code == 1


def test_remote_source_with_a_busy_file(tmp_path, far):
    src = make_volume(tmp_path / "S", {"busy.db": V1, "calm.txt": "calm 1"})
    mirror = tmp_path / "M"
    ok("transfer", src, mirror)
    (src / "busy.db").write_bytes(V2)
    (src / "calm.txt").write_text("calm 2")
    script = tmp_path / "busy_server.py"
    script.write_text(BUSY_SERVER)
    far(sys.executable, str(script), str(src / "busy.db"))
    r = vs("transfer", f"{HOST}:{src}", mirror, "--json")
    assert r.code == 7, r
    assert r.json["warnings"] == [{"path": "busy.db", "problem": "busy", "recorded": "previous"}]
    assert warning_lines(r) == [
        ("volsync: warning: file kept changing while being read; its previous version was "
         f"recorded: {HOST}:{src}/busy.db")]
    assert (mirror / "busy.db").read_bytes() == V1 and (mirror / "calm.txt").read_text() == "calm 2"
    same_as_snapshot(src, mirror, tmp_path)


def test_protocol_checks_warnings_from_the_peer():
    good = {"snapshot": None, "warnings": [[b"a/b", "busy", "previous"]], "omitted": 2}
    snap, warnings, omitted = protocol.source_snapshot_in(good, 32)
    assert snap is None and omitted == 2 and warnings[0].path == b"a/b"
    bad_items = [[b"/abs", "busy", "previous"], [b"a\0b", "busy", "previous"],
                 [b"", "busy", "previous"], ["a", "busy", "previous"],
                 [b"a", "weird", "previous"], [b"a", "busy", "lost"], [b"a", "busy"],
                 [b"a" * (protocol.MAX_WARNING_PATH + 1), "busy", "previous"]]
    for item in bad_items:
        with pytest.raises(ProtocolError):
            protocol.source_snapshot_in(good | {"warnings": [item]}, 32)
    for body in ({"snapshot": None, "warnings": [], "omitted": -1}, {"snapshot": None},
                 {"snapshot": None, "omitted": 0,
                  "warnings": [[b"a", "busy", "previous"]] * (protocol.MAX_WARNINGS + 1)}):
        with pytest.raises(ProtocolError):
            protocol.source_snapshot_in(body, 32)
