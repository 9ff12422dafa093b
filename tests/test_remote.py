"""Volumes on other machines, through the real command line (docs/contract.md, "Volumes on other
machines"): transfer/resync/role-swap between a local and a remote volume in both directions
(push: local SRC, remote DST; pull: remote SRC, local DST), refusals and their exit codes over
the wire, single-volume commands on a remote VOL, verify --repair-from a remote volume,
`serve --restrict-to-path / --read-only`, send/receive streams, --compress and --bwlimit.

Most tests reach the "remote" side through the rsh shim (tests/rsh_shim.py: runs
`REMOTE_PATH serve --stdio` locally, no ssh, ~0.3 s a session); a few go through the session's
real sshd (~0.9 s a session), and the forced-command ones through their own sshd. The far side
is this machine either way, so a test can look at a "remote" volume's files directly (its
path is the address's path)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import random
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    Result,
    clean_env,
    content,
    fingerprint,
    lineage,
    make_volume,
    ok,
    okj,
    preserved,
    restored,
    snap,
    status,
    sub,
    verify_clean,
    vs,
    write,
)

from volsync.store.volume import Volume

PLAN_KEYS = ("common", "added", "removed", "preserved", "blocks_sent", "bytes_sent")
REMOTE_PATH = f"{sys.executable} -m volsync"
HOST = "farhost"  # any name: the shim ignores it


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def plan_of(d: dict) -> dict:
    return {k: d[k] for k in PLAN_KEYS}


# --- addresses and fixtures -------------------------------------------------------------------

def scp(path) -> str:
    """The scp form `HOST:PATH` of a path on the (shim's) far side."""
    return f"{HOST}:{os.fspath(path)}"


def url(path) -> str:
    return f"ssh://{HOST}{os.fspath(path)}"


FORMS = {"scp": scp, "url": url}
DIRECTIONS = ["push", "pull"]


def ends(direction: str, src, dst, form=scp) -> tuple[str, str]:
    """SRC and DST as the command names them: push = local SRC, remote DST; pull = remote
    SRC, local DST."""
    if direction == "push":
        return str(src), form(dst)
    return form(src), str(dst)


@pytest.fixture
def shim(monkeypatch, rsh_shim):
    """Remote volumes reached through the rsh shim (VOLSYNC_RSH / VOLSYNC_REMOTE_PATH)."""
    monkeypatch.setenv("VOLSYNC_RSH", rsh_shim)
    monkeypatch.setenv("VOLSYNC_REMOTE_PATH", REMOTE_PATH)
    return rsh_shim


@pytest.fixture
def real_ssh(monkeypatch, sshd):
    """Remote volumes reached through the session's real sshd."""
    monkeypatch.setenv("VOLSYNC_RSH", sshd.rsh)
    monkeypatch.setenv("VOLSYNC_REMOTE_PATH", sshd.remote_path)
    return sshd


FILES = {"a.txt": "alpha\n", "dir/b.bin": rnd(10_000, 1), "dir/sub/c": "c" * 100, "empty": b""}


def src_volume(path: Path, files=None) -> Path:
    """A read-write volume (no snapshot yet) with files, symlinks (one dangling), odd modes,
    a hard link and a nanosecond mtime."""
    a = make_volume(path, FILES if files is None else files)
    os.symlink("dir/b.bin", a / "link")
    os.symlink("nowhere/dangling", a / "dir" / "dangling")
    (a / "exec.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(a / "exec.sh", 0o750)
    (a / "private").write_text("secret\n")
    os.chmod(a / "private", 0o600)
    os.makedirs(a / "closed")
    (a / "closed" / "x").write_text("x")
    os.chmod(a / "closed", 0o700)
    os.link(a / "a.txt", a / "dir" / "hardlink-to-a")
    os.utime(a / "dir" / "sub" / "c", ns=(1_500_000_000_123_456_789,) * 2)
    return a


def same_live_tree(a: Path, b: Path) -> None:
    """Content, modes, symlinks and mtimes (directories and symlinks too) equal; a hard link
    kept as a hard link."""
    assert content(b, mtimes=True) == content(a, mtimes=True)
    if (a / "dir" / "hardlink-to-a").exists():
        assert os.path.samefile(b / "a.txt", b / "dir" / "hardlink-to-a")


def refuse(code: int, *args) -> dict:
    """Run with --json expecting `code`: the JSON error names it, stderr has no traceback."""
    r = vs(*args, "--json")
    assert r.code == code, f"{args}: {r.code} {r.out} {r.err}"
    assert r.json["code"] == code and r.json["error"], r
    assert "Traceback" not in r.err and "volsync: error:" in r.err, r
    return r.json


def updated(vol) -> float:
    return Volume.open(vol).state().extra["last_update"]["time"]


def without_update(vol) -> dict:
    return without_update_of(fingerprint(vol)[0])


def without_update_of(state_files: dict) -> dict:
    """A volume's metadata files with its state's time of last update left out."""
    from volsync.store.codec import open_sealed

    out = dict(state_files)
    body = dict(open_sealed(out.pop("state"), "state", "state"))
    body["extra"] = {k: v for k, v in (body.get("extra") or {}).items() if k != "last_update"}
    return out | {"state": body}


def both(*vols) -> list:
    """Fingerprints (metadata and live tree) of volumes, None for a missing one."""
    return [fingerprint(v) if Path(v).exists() else None for v in vols]


# --- 1, 2: baseline, incremental, no change ----------------------------------------------------


@pytest.mark.parametrize(("direction", "form"), [("push", "scp"), ("pull", "url")])
def test_baseline_incremental_and_no_change(shim, tmp_path, direction, form):
    """The baseline creates the mirror (equal live tree: content, modes, mtimes, symlinks,
    hard links; same lineage); after a one-byte change only that block crosses; a big change
    crosses about its size; a transfer with nothing new sends nothing and changes nothing;
    verify of the mirror (by path and by address) is ok."""
    big = bytearray(rnd(64 * 4096, 7))
    a = src_volume(tmp_path / "A", FILES | {"big": bytes(big)})
    b = tmp_path / "B"
    src, dst = ends(direction, a, b, FORMS[form])
    first = okj("transfer", src, dst)
    assert first["common"] is None and first["added"] == [1] and first["baseline"] is True
    assert first["src_snapshot"] == 1 and first["removed"] == [] and first["preserved"] == []
    assert first["blocks_sent"] >= 64 + 3
    assert first["bytes_sent"] >= 64 * 4096
    assert first["bytes_sent"] < first["bytes_on_wire"] < first["bytes_sent"] * 1.2 + (64 << 10)
    same_live_tree(a, b)
    assert lineage(b) == lineage(a)
    st = status(dst)
    assert st["mode"] == "read-only" and st["latest"] == 1 and st["changed_paths"] == []
    if direction == "pull":
        assert st["upstream"] == src  # the mirror names its upstream by its address
    else:
        assert st["upstream"].endswith(f":{a}")  # this machine's name, then the path

    # incremental: one byte of one block
    big[10 * 4096 + 5] ^= 0xFF
    write(a, {"big": bytes(big)})
    res = okj("transfer", src, dst)
    assert set(PLAN_KEYS) | {"bytes_on_wire"} <= set(res)
    assert res["common"] == 1 and res["added"] == [2] and res["removed"] == []
    assert res["src_snapshot"] == 2 and res["blocks_sent"] == 1
    assert 4096 <= res["bytes_sent"] < first["bytes_sent"] // 20
    assert 0 < res["bytes_on_wire"] < first["bytes_on_wire"] // 4
    same_live_tree(a, b)
    assert lineage(b) == lineage(a) and [n for n, _ in lineage(b)] == [1, 2]

    # a big change: 32 blocks of new random data; the wire carries about that much
    big[20 * 4096 : 52 * 4096] = rnd(32 * 4096, 8)
    write(a, {"big": bytes(big), "dir/sub/new": "n"})
    res = okj("transfer", src, dst)
    assert res["added"] == [3] and res["blocks_sent"] == 33
    assert res["bytes_sent"] >= 32 * 4096
    assert res["bytes_sent"] <= res["bytes_on_wire"] <= res["bytes_sent"] * 1.2 + (32 << 10)
    same_live_tree(a, b)

    # nothing new: nothing sent, nothing changed on either side but the mirror's time of
    # its last update (status reports it)
    before = both(a, b), updated(b)
    res = okj("transfer", src, dst)
    assert res["added"] == [] and res["blocks_sent"] == 0 and res["bytes_sent"] == 0
    assert res["common"] == 3 and res["src_snapshot"] is None
    assert updated(b) > before[1]
    assert both(a)[0] == before[0][0] and fingerprint(b)[1] == before[0][1][1]
    assert without_update(b) == without_update_of(before[0][1][0])
    verify_clean(b)
    r = vs("verify", dst, "--json")
    assert r.code == 0 and r.json["ok"] and r.json["blocks_checked"] > 0, r


def test_rsh_command_line(shim, tmp_path, monkeypatch):
    """-p PORT and -l USER come from the address (IPv6 hosts in brackets too), then HOST and
    'REMOTE_PATH serve --stdio'; --rsh and --remote-path win over the environment."""
    log = tmp_path / "shim.log"
    monkeypatch.setenv("RSH_SHIM_LOG", str(log))
    a = src_volume(tmp_path / "A")
    ok("transfer", a, f"ssh://alice@h1:2222{tmp_path / 'B'}")
    ok("status", f"bob@h2:{tmp_path / 'B'}")
    ok("status", f"[::1]:{tmp_path / 'B'}")
    ok("status", f"ssh://carol@[fe80::1]:2200{tmp_path / 'B'}")
    monkeypatch.setenv("VOLSYNC_RSH", "/nonexistent/ssh")
    monkeypatch.setenv("VOLSYNC_REMOTE_PATH", "/nonexistent/volsync")
    ok("status", scp(tmp_path / "B"), "--rsh", shim, "--remote-path", REMOTE_PATH)
    command = f"{REMOTE_PATH} serve --stdio"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [
        {"host": "h1", "port": "2222", "user": "alice", "command": command},
        {"host": "h2", "port": None, "user": "bob", "command": command},
        {"host": "::1", "port": None, "user": None, "command": command},
        {"host": "fe80::1", "port": "2200", "user": "carol", "command": command},
        {"host": HOST, "port": None, "user": None, "command": command},
    ]


def test_rsh_argv_has_keepalive_options(tmp_path, monkeypatch):
    """The exact argv: RSH -o ServerAliveInterval=15 -o ServerAliveCountMax=4 [-p PORT]
    [-l USER] HOST 'REMOTE_PATH serve --stdio' (a fake ssh records it and fails: exit 1)."""
    argv_log = tmp_path / "argv.json"
    fake = tmp_path / "fake_ssh.py"
    fake.write_text(f"import json, sys\njson.dump(sys.argv[1:], open({str(argv_log)!r}, 'w'))\n"
                    "sys.exit(255)\n")
    monkeypatch.setenv("VOLSYNC_RSH", f"{sys.executable} {fake} -x")
    monkeypatch.setenv("VOLSYNC_REMOTE_PATH", "rp --opt")
    r = vs("status", "ssh://u@h:2200/srv/vol")
    assert r.code == 1 and "Traceback" not in r.err, r
    assert json.loads(argv_log.read_text()) == [
        "-x", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
        "-p", "2200", "-l", "u", "h", "rp --opt serve --stdio"]


# --- 3: cascade and fan-out --------------------------------------------------------------------


def test_cascade_local_remote_local(shim, tmp_path):
    """A (local) -> B (remote) -> C (local): read-only B is never snapshotted; C equals A with
    A's lineage and names B's address as its upstream."""
    a = src_volume(tmp_path / "A")
    b, c = tmp_path / "B", tmp_path / "C"
    ok("transfer", a, scp(b))
    r = okj("transfer", scp(b), c)
    assert r["src_snapshot"] is None and r["added"] == [1] and r["baseline"]
    write(a, {"a.txt": "round 2\n", "f2": rnd(5000, 2)})
    assert okj("transfer", a, scp(b))["added"] == [2]
    r = okj("transfer", scp(b), c)
    assert r["src_snapshot"] is None and r["added"] == [2] and r["common"] == 1
    assert r["blocks_sent"] == 3  # a.txt's new block and f2's two
    assert lineage(a) == lineage(b) == lineage(c)
    same_live_tree(a, b)
    same_live_tree(a, c)
    st = status(c)
    assert st["upstream"] == scp(b) and st["mode"] == "read-only"
    r = okj("transfer", scp(b), c)
    assert r["added"] == [] and r["blocks_sent"] == 0 and lineage(b) == lineage(a)
    verify_clean(c)


def test_fan_out_to_two_remotes(shim, tmp_path):
    """A -> B and A -> C, both remote: both track A; the second transfer takes no snapshot."""
    a = src_volume(tmp_path / "A")
    b, c = tmp_path / "B", tmp_path / "C"
    ok("transfer", a, scp(b))
    ok("transfer", a, url(c))
    write(a, {"dir/b.bin": rnd(10_000, 2)})
    r = okj("transfer", a, scp(b))
    assert r["added"] == [2] and r["src_snapshot"] == 2
    r = okj("transfer", a, url(c))
    assert r["src_snapshot"] is None and r["added"] == [2] and r["common"] == 1
    assert r["blocks_sent"] == 3
    same_live_tree(a, b)
    same_live_tree(a, c)
    assert lineage(b) == lineage(c) == lineage(a)


# --- 4: dry runs ---------------------------------------------------------------------------------


def dry_then_real(args: list, vols: list[Path]) -> tuple[dict, dict]:
    """The dry run changes nothing on either side and plans what the real run reports."""
    before = both(*vols)
    dry = okj(*args, "--dry-run")
    assert both(*vols) == before, "the dry run changed something"
    assert dry["dry_run"] is True
    real = okj(*args)
    assert real["dry_run"] is False
    assert plan_of(dry) == plan_of(real)
    assert (dry["baseline"], dry["src_snapshot"]) == (real["baseline"], real["src_snapshot"])
    assert set(dry) == set(real)
    return dry, real


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_dry_runs_plan_what_runs_do(shim, tmp_path, direction):
    """transfer and resync --dry-run over the wire: the same plan (keys and values, baseline
    included) as the run; nothing changes on either side (DST is not created)."""
    a = src_volume(tmp_path / "A")
    b = tmp_path / "B"
    src, dst = ends(direction, a, b)
    _dry, real = dry_then_real(["transfer", src, dst], [a, b])
    assert real["baseline"] is True and real["added"] == [1] and real["bytes_sent"] > 10_000
    write(a, {"dir/b.bin": rnd(10_000, 9), "z": "z"})
    _dry, real = dry_then_real(["transfer", src, dst], [a, b])
    assert real["added"] == [2] and real["src_snapshot"] == 2 and real["blocks_sent"] == 4
    assert real["baseline"] is False
    # diverge, then resync
    write(a, {"a.txt": "A3\n"})
    snap(a)
    ok("break", dst)
    write(b, {"a.txt": "B3\n", "b-only": "bo"})
    snap(dst)
    write(b, {"live": "unsnapshotted"})
    _dry, real = dry_then_real(["resync", src, dst, "--force"], [a, b])
    assert (real["common"], real["added"], real["removed"]) == (2, [3], [3])
    assert real["preserved"] == [3, 4]
    same_live_tree(a, b)


def test_dry_run_role_swap_with_remote_mirror(shim, tmp_path):
    """role-swap --dry-run with a remote mirror plans the swap's transfer, changes nothing,
    and prints the lineage picture."""
    a = src_volume(tmp_path / "A")
    b = tmp_path / "B"
    ok("transfer", a, scp(b))
    write(a, {"final": "f"})
    before = both(a, b)
    r = ok("role-swap", a, scp(b), "--dry-run")
    rows = [line.split() for line in r.out.splitlines()]
    assert ["common:", "1"] in rows and "dry run" in r.out
    dry = okj("role-swap", a, scp(b), "--dry-run")
    assert both(a, b) == before
    real = okj("role-swap", a, scp(b))
    assert plan_of(dry) == plan_of(real) and real["added"] == [2]
    assert status(scp(b))["mode"] == "read-write" and status(a)["mode"] == "read-only"
    assert content(a) == content(b)


# --- 5: refusals over the wire ---------------------------------------------------------------


@pytest.fixture(params=DIRECTIONS)
def remote_pair(request, shim, tmp_path):
    """(A, B, src, dst): A read-write with files, B its mirror after one transfer, named as
    the direction says."""
    a = src_volume(tmp_path / "A")
    b = tmp_path / "B"
    src, dst = ends(request.param, a, b)
    ok("transfer", src, dst)
    return a, b, src, dst


def test_refuses_read_write_dst(remote_pair):
    a, b, src, dst = remote_pair
    ok("break", dst)
    write(a, {"a.txt": "more\n"})
    before = both(a, b)
    err = refuse(5, "transfer", src, dst)
    assert "resync" in err["error"]
    assert both(a, b) == before


def test_refuses_written_dst(remote_pair):
    a, b, src, dst = remote_pair
    write(b, {"dir/sub/c": "tampered"})
    write(a, {"a.txt": "more\n"})
    before = both(a, b)
    refuse(5, "transfer", src, dst)
    assert both(a, b) == before
    assert status(dst)["changed_paths"] == ["dir/sub/c"]


def test_push_src_scan_failing_while_far_side_scans(shim, tmp_path, monkeypatch):
    """A push asks the far side to scan DST, then scans SRC here: SRC's scan failing leaves
    the session out of step; the command fails with the scan's error, the far lock goes with
    the session, and the next transfer works."""
    from importlib import import_module

    scan_module = import_module("volsync.tree.scan")
    a = src_volume(tmp_path / "A")
    b = tmp_path / "B"
    ok("transfer", a, scp(b))
    write(a, {"new.txt": "new\n"})
    time.sleep(0.1)  # not racy: only the new file is read

    def unreadable(self, rel, dfd, name, ino=0):
        raise PermissionError(13, "Permission denied", os.fsdecode(name))

    before = lineage(a)
    with monkeypatch.context() as patched:
        patched.setattr(scan_module.Scanner, "read_file", unreadable)
        r = vs("transfer", a, scp(b))
    assert r.code != 0 and "new.txt" in r.err and "Traceback" not in r.err, r.err
    assert lineage(a) == before == lineage(b)
    ok("transfer", a, scp(b))
    same_live_tree(a, b)
    assert lineage(b) == lineage(a)


def test_refuses_diverged_dst_with_json_details(remote_pair):
    a, b, src, dst = remote_pair
    write(a, {"a.txt": "two\n"})
    ok("transfer", src, dst)  # B: 1 2
    ok("revert", src, "1")
    write(a, {"a.txt": "two-prime\n"})
    snap(src)  # A: 1 2'
    before = both(a, b)
    for extra in ([], ["--dry-run"]):
        err = refuse(5, "transfer", src, dst, *extra)
        assert (err["common"], err["src_only"], err["dst_only"]) == (1, [2], [2]), err
        assert "resync" in err["error"]
    assert both(a, b) == before


def test_refuses_no_common_snapshot_remote_dst(shim, tmp_path):
    """A remote mirror of another volume: exit 4 for transfer, its dry run and resync."""
    a = src_volume(tmp_path / "A")
    x = make_volume(tmp_path / "X", {"x": "x"})
    c = tmp_path / "C"
    ok("transfer", x, c)
    before = both(a, c)
    refuse(4, "transfer", a, scp(c))
    refuse(4, "transfer", a, scp(c), "--dry-run")
    refuse(4, "resync", scp(c), a)  # pull: A is a read-write volume with files, no common
    assert both(a, c) == before


def test_refuses_non_volume_remote_dst(shim, tmp_path):
    """A non-empty remote directory that is not a volume is never touched: exit 4."""
    a = src_volume(tmp_path / "A")
    snap(a)
    d = tmp_path / "D"
    write(d, {"precious": "data"})
    before = content(d), fingerprint(a)
    refuse(4, "transfer", a, scp(d))
    refuse(4, "resync", a, url(d), "--dry-run")
    assert (content(d), fingerprint(a)) == before and not (d / ".volsync").exists()
    # and a remote SRC into a local one
    refuse(4, "transfer", scp(a), d)
    assert content(d) == before[0] and not (d / ".volsync").exists()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_locked_remote_volume_exit_3(shim, tmp_path, direction):
    """The remote volume (DST of a push, SRC of a pull) locked by this test process: exit 3
    naming the holder's pid, also for status and snapshot; afterwards the transfer works."""
    a = src_volume(tmp_path / "A")
    b = tmp_path / "B"
    src, dst = ends(direction, a, b)
    ok("transfer", src, dst)
    write(a, {"x": "x"})
    far, far_addr = (b, dst) if direction == "push" else (a, src)
    before = both(a, b)
    held = Volume.open(far)
    with held.locked():
        r = vs("transfer", src, dst, "--json")
        assert r.code == 3 and r.json["code"] == 3, r
        assert str(os.getpid()) in r.err and "Traceback" not in r.err, r
        assert status(far_addr)["lock_holder"] == os.getpid()
        r = vs("snapshot", far_addr)
        assert r.code == 3 and str(os.getpid()) in r.err, r
    held.packs.close()
    assert both(a, b) == before
    ok("transfer", src, dst)
    same_live_tree(a, b)


def test_locked_by_raw_flock_on_remote_dst(shim, tmp_path):
    """The lock protocol as the store defines it (flock on .volsync/lock, pid written in it),
    taken by hand on the remote DST: exit 3 naming that pid; nothing changed."""
    a = src_volume(tmp_path / "A")
    b = tmp_path / "B"
    ok("transfer", a, scp(b))
    write(a, {"x": "x"})
    fd = os.open(b / ".volsync" / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"424242\n", 0)
        os.ftruncate(fd, 7)
        before = both(a, b)
        r = vs("transfer", a, scp(b), "--json")
        assert r.code == 3 and "424242" in r.err, r
        assert both(a, b) == before
    finally:
        os.close(fd)
    ok("transfer", a, scp(b))
    same_live_tree(a, b)


def test_src_equals_dst_both_remote(shim, tmp_path):
    """Both remote with the same address: a bad argument (exit 1), nothing changed."""
    a = src_volume(tmp_path / "A")
    snap(a)
    before = fingerprint(a)
    for cmd in ("transfer", "resync", "role-swap"):
        refuse(1, cmd, scp(a), scp(a))
        refuse(1, cmd, url(a), url(a), "--dry-run")
    assert fingerprint(a) == before


def test_src_equals_dst_both_remote_spelled_differently(shim, tmp_path):
    """The same remote volume named two ways ('/.', '..', scp form and URL): a bad argument
    (1) as it is locally (test_mirror_cli.test_src_equals_dst_exit_1), not a lock held by the
    command itself (3) nor 'read-write DST' (5)."""
    a = src_volume(tmp_path / "A")
    snap(a)
    before = fingerprint(a)
    got = {}
    for other, extra in ((scp(str(a) + "/."), []), (scp(tmp_path / "B" / ".." / "A"),
                                                     ["--dry-run"]), (url(a), [])):
        got[" ".join([other, *extra])] = vs("transfer", scp(a), other, *extra).code
    assert fingerprint(a) == before
    assert set(got.values()) == {1}, got


@pytest.mark.parametrize("address", [
    "ssh://host", "ssh://host:99999/x", "ssh://", "ssh://user@/x", "host:",
])
def test_bad_address_exit_1(shim, tmp_path, address):
    a = src_volume(tmp_path / "A")
    err = refuse(1, "transfer", a, address)
    assert "address" in err["error"] or "path" in err["error"], err
    refuse(1, "status", address)
    assert lineage(a) == []


def test_unreachable_host_exit_1(tmp_path):
    """ssh cannot connect (nothing listens on the port): exit 1, one line on stderr, no
    traceback; nothing changed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    a = src_volume(tmp_path / "A")
    rsh = "ssh -F /dev/null -o BatchMode=yes -o ConnectTimeout=5 -o StrictHostKeyChecking=no"
    r = sub("transfer", a, f"ssh://127.0.0.1:{port}{tmp_path / 'B'}", "--rsh", rsh)
    assert r.code == 1, r
    assert "Traceback" not in r.err and r.out == ""
    assert lineage(a) == [] and not (tmp_path / "B").exists()
    assert len(r.err.strip().splitlines()) == 1, r


@pytest.mark.parametrize("rsh", [
    "false", "/nonexistent/ssh", "sh -c 'echo no route >&2; exit 255' --",
])
def test_rsh_failing_exit_1(tmp_path, rsh):
    """The ssh command fails (no output, cannot be run, an error of its own): exit 1, one
    line on stderr, no traceback; nothing created."""
    a = src_volume(tmp_path / "A")
    r = sub("transfer", a, scp(tmp_path / "B"), "--rsh", rsh)
    assert r.code == 1, r
    assert "Traceback" not in r.err and r.err.startswith("volsync")
    assert lineage(a) == [] and not (tmp_path / "B").exists()
    r = sub("status", scp(tmp_path / "B"), "--rsh", rsh, "--json")
    assert r.code == 1 and r.json["code"] == 1, r
    assert len(r.err.strip().splitlines()) == 1, r


def test_remote_path_not_found_exit_1(shim, tmp_path):
    a = src_volume(tmp_path / "A")
    r = sub("transfer", a, scp(tmp_path / "B"), "--remote-path", "/nonexistent/volsync")
    assert r.code == 1, r
    assert "Traceback" not in r.err and "--remote-path" in r.err, r
    r = sub("status", scp(a), "--remote-path", "no-such-volsync-program", "--json")
    assert r.code == 1 and r.json["code"] == 1, r
    assert lineage(a) == [] and not (tmp_path / "B").exists()


def test_remote_not_a_volume_exit_1(shim, tmp_path):
    (tmp_path / "plain").mkdir()
    refuse(1, "transfer", scp(tmp_path / "plain"), tmp_path / "B")
    refuse(1, "snapshot", url(tmp_path / "missing"))
    assert not (tmp_path / "B").exists() and not (tmp_path / "missing").exists()


# --- 6: failover drill over the real sshd -----------------------------------------------------


def test_failover_drill_over_ssh(real_ssh, tmp_path):
    """transfer A -> remote B; break B; write on B; snapshot B; resync B A carries B's writes
    back (A's unmirrored late write becomes a preserved snapshot); role-swap B A hands the
    role back; status and `snapshots --all` of both show nothing was lost."""
    a = src_volume(tmp_path / "A")
    b = tmp_path / "B"
    B = real_ssh.url(b)
    ok("transfer", a, B)
    write(a, {"a.txt": "second\n"})
    assert okj("transfer", a, B)["added"] == [2]
    same_live_tree(a, b)

    r = okj("break", B)
    assert r["mode"] == "read-write" and r["already_done"] is False
    write(b, {"failover-write": "fw", "dir/sub/c": "from B\n"})
    assert okj("snapshot", B)["number"] == 3
    write(b, {"more": "m"})  # live, snapshotted by the resync itself
    write(a, {"late-on-a": "never mirrored"})  # A's write that never reached B
    a_live = content(a)

    res = okj("resync", B, a, "--force")
    assert res["common"] == 2 and res["added"] == [3, 4] and res["preserved"] == [3]
    assert res["src_snapshot"] == 4 and res["bytes_on_wire"] > res["bytes_sent"] > 0
    same_live_tree(b, a)
    sa = status(a)
    assert sa["mode"] == "read-only" and sa["upstream"] == B
    assert lineage(a) == lineage(b)
    (_, late_id), = preserved(a)
    assert restored(a, late_id, tmp_path / "late") == a_live

    res = okj("role-swap", B, a)
    assert res["already_done"] is False
    sa, sb = status(a), okj("status", B)
    assert sa["mode"] == "read-write" and sa["upstream"] is None
    assert sb["mode"] == "read-only" and sb["upstream"].endswith(f":{a}")
    all_a = okj("snapshots", a, "--all")["snapshots"]
    assert [(s["number"], s["preserved"]) for s in all_a] == [
        (1, False), (2, False), (3, False), (4, False), (3, True)]
    all_b = okj("snapshots", B, "--all")["snapshots"]
    assert [s["id"] for s in all_b] == [s["id"] for s in all_a[:4]]
    assert (a / "failover-write").read_text() == "fw" and (a / "more").read_text() == "m"

    write(a, {"back-home": "1"})
    assert okj("transfer", a, B)["added"] == [5]
    same_live_tree(a, b)
    verify_clean(a)
    r = vs("verify", B, "--json")
    assert r.code == 0 and r.json["ok"], r


def test_pull_over_ssh_scp_form(real_ssh, tmp_path):
    """A baseline pull through the real sshd with the scp form (the port comes from --rsh)."""
    a = src_volume(tmp_path / "A")
    c = tmp_path / "C"
    r = okj("transfer", real_ssh.scp_address(a), c)
    assert r["added"] == [1] and r["bytes_on_wire"] > r["bytes_sent"] > 10_000
    same_live_tree(a, c)
    assert status(c)["upstream"] == real_ssh.scp_address(a)


# --- 7: single-volume commands on a remote VOL ------------------------------------------------


_ID = re.compile(r"\b[0-9a-f]{8,64}\b")
_TIME = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?([+-]\d\d:?\d\d|Z| UTC)?")
_CREATED = re.compile(r'"created": [0-9.e+]+')


def norm(text: str, *paths: Path) -> str:
    """Output with paths, ids and times replaced by placeholders."""
    for i, p in enumerate(paths):
        text = text.replace(str(p), f"<P{i}>")
    text = _CREATED.sub('"created": <T>', text)
    return _ID.sub("<ID>", _TIME.sub("<T>", text))


class Twin:
    """The same command on a local volume and on an identical one named by address; outputs
    and exit codes must match once paths, ids and times are normalized. In the arguments,
    "VOL" stands for the volume and "DIRn" for a directory next to it."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.local = tmp_path / "L"
        self.remote = tmp_path / "R"

    def run(self, *args, expect: int | None = 0) -> tuple[Result, Result]:
        results = []
        for side, vol in (("L", self.local), ("R", self.remote)):
            argv = [(str(vol) if side == "L" else scp(vol)) if a == "VOL"
                    else str(self.tmp / f"{a}-{side}") if a.startswith("DIR") else a
                    for a in args]
            results.append(vs(*argv))
        lr, rr = results
        assert lr.code == rr.code, (args, lr, rr)
        if expect is not None:
            assert lr.code == expect, (args, lr)
        dirs = sorted({a for a in args if a.startswith("DIR")})
        for stream in ("out", "err"):
            lt = norm(getattr(lr, stream), *[self.tmp / f"{d}-L" for d in dirs], self.local)
            rt = norm(getattr(rr, stream), *[self.tmp / f"{d}-R" for d in dirs], self.remote)
            rt = rt.replace(f"{HOST}:<P{len(dirs)}>", f"<P{len(dirs)}>")
            assert lt == rt, (args, stream, getattr(lr, stream), getattr(rr, stream))
        return lr, rr

    def each(self, fn) -> None:
        fn(self.local)
        fn(self.remote)


def test_single_volume_commands_match_local(shim, tmp_path):
    """init, snapshot, snapshots, status, diff, revert, restore (DIR on the volume's machine),
    prune, verify and break on a remote VOL: the same output (text and JSON) and exit codes as
    on a local one, errors included."""
    t = Twin(tmp_path)
    for d in (t.local, t.remote):
        write(d, {"a.txt": "alpha\n", "dir/b": rnd(9000, 3), "dir/sub/c": "c"})
        os.symlink("a.txt", d / "link")
    t.run("init", "VOL", "--block-size", "4K")
    t.run("snapshot", "VOL", "--label", "first")
    t.run("snapshot", "VOL", "--label", "5", "--json", expect=1)  # a bad label
    t.each(lambda d: write(d, {"a.txt": "changed\n", "new": "n", "dir/sub/c": None}))
    t.run("status", "VOL")
    t.run("diff", "VOL", "--json")
    t.run("snapshot", "VOL", "--json")
    t.run("diff", "VOL", "first", "2")
    t.run("snapshots", "VOL")
    t.each(lambda d: write(d, {"live": "unsnapshotted"}))
    t.run("revert", "VOL", "1", "--dry-run", "--json")
    t.run("revert", "VOL", "1")
    assert content(t.local) == content(t.remote)
    t.run("snapshots", "VOL", "--all", "--json")
    t.run("status", "VOL", "--json")
    t.run("restore", "VOL", "first", "DIR1", "--json")
    assert content(tmp_path / "DIR1-L") == content(tmp_path / "DIR1-R")
    assert (tmp_path / "DIR1-R" / "a.txt").read_text() == "alpha\n"
    t.run("restore", "VOL", "1", "DIR1", "--json", expect=1)  # DIR not empty
    t.run("revert", "VOL", "nosuch", expect=1)
    t.run("verify", "VOL", "--json")
    t.run("prune", "VOL", "--preserved")
    t.run("prune", "VOL", "--keep-last", "0", "--json", expect=1)
    t.run("break", "VOL", "--json", expect=1)  # not a mirror
    t.run("snapshots", "VOL", "--bogus", expect=2)
    assert content(t.local) == content(t.remote)
    # a new remote volume, created where it is
    ok("init", url(tmp_path / "fresh" / "vol"))
    assert (tmp_path / "fresh" / "vol" / ".volsync").is_dir()


def test_single_volume_remote_errors(shim, tmp_path):
    """Errors of single-volume commands on a remote VOL: the local exit codes, the JSON error
    on stdout, one line on stderr."""
    r = vs("status", scp(tmp_path / "nothing"), "--json")
    assert r.code == 1 and r.json["code"] == 1 and len(r.err.strip().splitlines()) == 1, r
    vol = make_volume(tmp_path / "V", {"f": "1"})
    snap(vol)
    # a flipped bit in the pack's last block: verify exits 6 over the wire, as locally
    pack = next((vol / ".volsync" / "packs").glob("*.pack"))
    data = bytearray(pack.read_bytes())
    data[-1] ^= 0x01
    pack.write_bytes(bytes(data))
    local = vs("verify", vol, "--json")
    r = vs("verify", scp(vol), "--json")
    assert r.code == local.code == 6 and r.json["ok"] is False, r
    assert r.json["errors"] == local.json["errors"]


# --- 8: verify --repair-from a remote volume ------------------------------------------------


@pytest.mark.parametrize("damage", ["delete-pack", "flip"])
def test_verify_repair_from_remote_source(shim, tmp_path, damage):
    """A local mirror whose pack is deleted or damaged is repaired from its remote source;
    every snapshot then restores as the source's does."""
    a = src_volume(tmp_path / "A", FILES | {"big": rnd(40_000, 5)})
    m = tmp_path / "M"
    ok("transfer", scp(a), m)
    pack = max((m / ".volsync" / "packs").glob("*.pack"), key=lambda p: p.stat().st_size)
    if damage == "flip":
        data = bytearray(pack.read_bytes())
        data[len(data) // 2] ^= 0x10
        pack.write_bytes(bytes(data))
    else:
        pack.unlink()
    assert vs("verify", m).code == 6
    live = content(m)
    r = vs("verify", m, "--repair-from", scp(a), "--json")
    assert r.code == 0, r
    assert r.json["ok"] is True and r.json["repaired"], r
    assert all(scp(a) in line for line in r.json["repaired"]), r
    verify_clean(m)
    assert content(m) == live
    assert restored(m, "1", tmp_path / "rm") == restored(a, "1", tmp_path / "ra")


def test_verify_repair_on_a_remote_vol_refused(shim, tmp_path):
    """verify REMOTE --repair-from OTHER: OTHER would be named from the far side; refused
    (exit 1) with a message, nothing changed."""
    a = src_volume(tmp_path / "A")
    m = tmp_path / "M"
    ok("transfer", a, m)
    before = fingerprint(m)
    refuse(1, "verify", scp(m), "--repair-from", a)
    assert fingerprint(m) == before


# --- 9: serve --restrict-to-path / --read-only ----------------------------------------------
#
# The full matrix goes through the shim with a REMOTE_PATH that runs `serve` with the options
# and comments out the rest ("... --restrict-to-path DIR # serve --stdio"), as a forced
# command would; then a few cases go through a real sshd whose key forces the command.


def forced(monkeypatch, *serve_args) -> None:
    cmd = " ".join([REMOTE_PATH, "serve", "--stdio", *map(str, serve_args)])
    monkeypatch.setenv("VOLSYNC_REMOTE_PATH", f"{cmd} #")


@pytest.fixture
def jail(tmp_path):
    """(allowed, outside, A): A a local read-write volume; allowed/escape -> outside; a
    volume outside/V with a snapshot."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    os.symlink(outside, allowed / "escape")
    make_volume(outside / "V", {"v": "v"})
    snap(outside / "V")
    return allowed, outside, src_volume(tmp_path / "A")


def escapes(allowed: Path, outside: Path) -> list[str]:
    return [str(outside / "B"), f"{allowed}/../outside/B", str(allowed / "escape" / "B"),
            str(allowed / "escape" / "V"), f"{allowed}/x/../../outside/V"]


def test_restrict_to_path(shim, monkeypatch, tmp_path, jail):
    """Inside the allowed path everything works; outside it (directly, through '..', through
    a symlink inside the allowed directory) every command is refused with exit 1 and nothing
    outside changes, a restore's DIR included."""
    allowed, outside, a = jail
    forced(monkeypatch, "--restrict-to-path", allowed)
    r = okj("transfer", a, scp(allowed / "B"))
    assert r["added"] == [1]
    same_live_tree(a, allowed / "B")
    assert okj("status", scp(allowed / "B"))["mode"] == "read-only"
    assert okj("transfer", url(allowed / "B"), tmp_path / "C")["added"] == [1]
    ok("restore", scp(allowed / "B"), "1", allowed / "R")
    assert (allowed / "R" / "a.txt").read_text() == "alpha\n"

    before = content(outside), fingerprint(outside / "V")
    for path in escapes(allowed, outside):
        err = refuse(1, "transfer", a, scp(path))
        assert "outside" in err["error"], err
    for i, path in enumerate(escapes(allowed, outside)[2:]):  # symlink and '..' to a volume
        refuse(1, "transfer", scp(path), tmp_path / f"D{i}")
        refuse(1, ["status", "snapshot", "verify"][i], scp(path))
        assert not (tmp_path / f"D{i}").exists()
    refuse(1, "restore", scp(allowed / "B"), "1", outside / "R")
    refuse(1, "restore", scp(allowed / "B"), "1", allowed / "escape" / "R")
    refuse(1, "init", scp(allowed / "escape" / "new"))
    assert (content(outside), fingerprint(outside / "V")) == before


def test_restrict_to_path_over_ssh(sshd_forced, monkeypatch, tmp_path, jail):
    """The same through a real sshd whose key forces `serve --stdio --restrict-to-path`."""
    allowed, outside, a = jail
    server = sshd_forced(f"{REMOTE_PATH} serve --stdio --restrict-to-path {allowed}")
    monkeypatch.setenv("VOLSYNC_RSH", server.rsh)
    monkeypatch.setenv("VOLSYNC_REMOTE_PATH", "/not/used/by/a/forced/command")
    assert okj("transfer", a, server.url(allowed / "B"))["added"] == [1]
    same_live_tree(a, allowed / "B")
    before = content(outside), fingerprint(outside / "V")
    paths = escapes(allowed, outside)
    refuse(1, "transfer", a, server.url(paths[1]))  # '..'
    refuse(1, "transfer", server.url(paths[3]), tmp_path / "D")  # symlink to a volume
    refuse(1, "status", server.url(paths[0]))
    assert (content(outside), fingerprint(outside / "V")) == before
    assert not (tmp_path / "D").exists()


@pytest.fixture
def ro_setup(tmp_path):
    """(A, M): A read-write with snapshot 1 and an unchanged live tree, M its local mirror."""
    a = src_volume(tmp_path / "A")
    snap(a)
    m = tmp_path / "M"
    ok("transfer", a, m)
    return a, m


def test_read_only_server(shim, monkeypatch, tmp_path, ro_setup):
    """serve --read-only: pulls (from a mirror; from a source with --no-snapshot), status,
    snapshots, diff and verify work; a push, snapshot, revert, break, prune, init, or a pull
    that would snapshot the source's live changes is refused (exit 1); nothing changes."""
    a, m = ro_setup
    forced(monkeypatch, "--read-only")
    before = both(a, m)
    assert okj("transfer", scp(m), tmp_path / "C1")["added"] == [1]
    r = okj("transfer", scp(a), tmp_path / "C2", "--no-snapshot")
    assert r["added"] == [1] and r["src_snapshot"] is None
    same_live_tree(a, tmp_path / "C2")
    assert okj("status", scp(a))["mode"] == "read-write"
    assert [s["number"] for s in okj("snapshots", scp(m))["snapshots"]] == [1]
    assert okj("verify", scp(m))["ok"] is True
    assert okj("diff", scp(a)) == {"added": [], "modified": [], "deleted": [], "changes": []}
    assert both(a, m) == before

    b = make_volume(tmp_path / "B", {"b": "b"})
    snap(b)
    write(a, {"live": "change"})
    before = both(a, m)
    refuse(1, "transfer", b, scp(tmp_path / "N"))  # a push into a new mirror
    refuse(1, "transfer", scp(a), m)  # a pull that would snapshot A's live change
    refuse(1, "snapshot", scp(a))
    refuse(1, "revert", scp(a), "1")
    refuse(1, "break", scp(m))
    refuse(1, "init", scp(tmp_path / "new"))
    assert both(a, m) == before
    assert not (tmp_path / "N").exists() and not (tmp_path / "new").exists()


def test_read_only_server_pull_from_unchanged_source(shim, monkeypatch, tmp_path, ro_setup):
    """A pull (no --no-snapshot) from a read-write source whose live tree did not change
    changes nothing on the server: a read-only server serves it."""
    a, m = ro_setup
    forced(monkeypatch, "--read-only")
    before = both(a, m)
    r = vs("transfer", scp(a), tmp_path / "C", "--json")
    assert r.code == 0, r
    assert r.json["added"] == [1] and r.json["src_snapshot"] is None
    assert both(a, m) == before


def test_read_only_server_over_ssh(sshd_forced, monkeypatch, tmp_path, ro_setup):
    """Through a real sshd forcing `serve --stdio --read-only`: a pull and status work, a push
    and a snapshot are refused (exit 1), nothing changes."""
    a, m = ro_setup
    server = sshd_forced(f"{REMOTE_PATH} serve --stdio --read-only")
    monkeypatch.setenv("VOLSYNC_RSH", server.rsh)
    before = both(a, m)
    assert okj("transfer", server.url(m), tmp_path / "C")["added"] == [1]
    assert okj("status", server.url(a))["latest"] == 1
    write(a, {"live": "change"})
    before = both(a, m)
    refuse(1, "transfer", a, server.url(tmp_path / "N"))
    refuse(1, "snapshot", server.url(a))
    assert both(a, m) == before and not (tmp_path / "N").exists()


# --- 10: send / receive ------------------------------------------------------------------------


def run_io(args: list, stdin=None, stdout=None, env: dict | None = None) -> Result:
    """A real `volsync` subprocess with stdin/stdout given as files."""
    p = subprocess.run([sys.executable, "-m", "volsync", *map(str, args)],
                       stdin=stdin if stdin is not None else subprocess.DEVNULL,
                       stdout=stdout if stdout is not None else subprocess.PIPE,
                       stderr=subprocess.PIPE, env=clean_env(env), check=False, timeout=60)
    out = p.stdout.decode(errors="replace") if isinstance(p.stdout, bytes) else ""
    return Result(p.returncode, out, p.stderr.decode(errors="replace"))


def send_to(path: Path, *args, env: dict | None = None) -> Result:
    with open(path, "wb") as f:
        return run_io(["send", *args], stdout=f, env=env)


def receive_from(path: Path, *args, env: dict | None = None) -> Result:
    with open(path, "rb") as f:
        return run_io(["receive", *args], stdin=f, env=env)


def test_send_receive_full_then_incremental(tmp_path):
    """send A > file; receive B < file creates the mirror; send --from 1 adds 2 and 3; the
    same stream again adds nothing; --to stops early. send's JSON goes to stderr, receive's
    JSON has the transfer keys."""
    a = src_volume(tmp_path / "A")
    snap(a)
    b = tmp_path / "B"
    s1 = tmp_path / "s1.stream"
    r = send_to(s1, a, "--json")
    assert r.code == 0, r
    assert r.out == ""  # stdout was the file
    sent = json.loads(r.err.strip().splitlines()[-1])
    assert set(PLAN_KEYS) | {"bytes_on_wire"} <= set(sent), sent
    assert sent["added"] == [1] and sent["bytes_on_wire"] == s1.stat().st_size
    r = receive_from(s1, b, "--json")
    assert r.code == 0, r
    got = json.loads(r.out)
    assert set(PLAN_KEYS) | {"bytes_on_wire"} <= set(got), got
    assert got["added"] == [1] and got["common"] is None and got["removed"] == []
    assert (got["blocks_sent"], got["bytes_sent"]) == (sent["blocks_sent"], sent["bytes_sent"])
    same_live_tree(a, b)
    assert lineage(b) == lineage(a)
    st = status(b)
    assert st["mode"] == "read-only" and st["changed_paths"] == []
    verify_clean(b)

    write(a, {"a.txt": "two\n"})
    snap(a)
    write(a, {"dir/b.bin": rnd(10_000, 2)})
    snap(a)
    s2 = tmp_path / "s2.stream"
    r = send_to(s2, a, "--from", "1", "--json")
    assert r.code == 0, r
    sent = json.loads(r.err.strip().splitlines()[-1])
    assert sent["added"] == [2, 3] and sent["blocks_sent"] == 4  # a.txt 1, b.bin 3
    r = receive_from(s2, b, "--json")
    assert r.code == 0, r
    got = json.loads(r.out)
    assert got["added"] == [2, 3] and got["common"] == 1 and got["blocks_sent"] == 4
    same_live_tree(a, b)
    assert lineage(b) == lineage(a)
    r = receive_from(s2, b, "--json")  # again: nothing new
    assert r.code == 0 and json.loads(r.out)["added"] == [], r
    verify_clean(b)
    s3 = tmp_path / "s3.stream"
    assert send_to(s3, a, "--to", "2").code == 0
    c = tmp_path / "C"
    r = receive_from(s3, c, "--json")
    assert r.code == 0 and json.loads(r.out)["added"] == [1, 2], r
    assert lineage(c) == lineage(a)[:2]


def test_receive_without_base_exit_4(tmp_path):
    """An incremental stream into a DST lacking its base: exit 4, DST untouched (a missing
    DST is not created)."""
    a = src_volume(tmp_path / "A")
    snap(a)
    write(a, {"x": "x"})
    snap(a)
    s = tmp_path / "inc.stream"
    assert send_to(s, a, "--from", "1").code == 0
    r = receive_from(s, tmp_path / "B", "--json")
    assert r.code == 4 and json.loads(r.out)["code"] == 4, r
    assert not (tmp_path / "B").exists()
    x = make_volume(tmp_path / "X", {"x": "x"})
    snap(x)
    ok("transfer", x, tmp_path / "C")
    before = fingerprint(tmp_path / "C")
    r = receive_from(s, tmp_path / "C")
    assert r.code == 4, r
    assert fingerprint(tmp_path / "C") == before


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    """A mirror B of A's snapshot 1 (by a full stream), and a valid stream of 2 after 1."""
    base = tmp_path_factory.mktemp("streams")
    a = src_volume(base / "A", FILES | {"big": rnd(100_000, 6)})
    snap(a)
    full = base / "full.stream"
    assert send_to(full, a).code == 0
    assert receive_from(full, base / "B").code == 0
    write(a, {"big": rnd(100_000, 7), "new": "n"})
    snap(a)
    inc = base / "inc.stream"
    assert send_to(inc, a, "--from", "1").code == 0
    return a, base / "B", full, inc


@pytest.mark.parametrize("damage", ["truncate", "flip-middle", "empty"])
def test_damaged_stream_exit_6_changes_nothing(tmp_path, streams, damage):
    """A cut stream, one flipped byte in its middle, or an empty one: exit 6, DST unchanged
    (metadata, live tree, snapshots); the valid stream then goes in."""
    a, b0, _full, inc = streams
    b = tmp_path / "B"
    subprocess.run(["cp", "-a", str(b0), str(b)], check=True)  # hard links kept
    data = inc.read_bytes()
    bad = tmp_path / "bad.stream"
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "flip-middle":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01
        bad.write_bytes(bytes(flipped))
    else:
        bad.write_bytes(b"")
    before = fingerprint(b), okj("snapshots", b, "--all")
    r = receive_from(bad, b, "--json")
    assert r.code == 6, r
    assert json.loads(r.out)["code"] == 6 and "Traceback" not in r.err
    assert (fingerprint(b), okj("snapshots", b, "--all")) == before
    assert status(b)["pending"] is None
    r = receive_from(inc, b, "--json")
    assert r.code == 0 and json.loads(r.out)["added"] == [2], r
    same_live_tree(a, b)
    verify_clean(b)


def test_damaged_baseline_stream_into_missing_dst(tmp_path, streams):
    """A baseline stream cut in the middle of its objects, into a missing DST: exit 6 and
    nothing committed, so DST stays missing (as a refused transfer leaves no mirror behind);
    the full stream then creates the mirror."""
    _a, b0, full, _inc = streams
    cut = tmp_path / "cut.stream"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    b = tmp_path / "B"
    r = receive_from(cut, b)
    assert r.code == 6, r
    left = sorted(p.name for p in b.iterdir()) if b.exists() else None
    assert receive_from(full, b).code == 0
    assert content(b, mtimes=True) == content(b0, mtimes=True)
    assert lineage(b) == lineage(b0)
    assert left is None, f"a failed receive left {b} behind holding {left}"


def test_send_from_remote_receive_into_remote(shim, tmp_path):
    """send from a remote SRC and receive into a remote DST (stream through a file)."""
    a = src_volume(tmp_path / "A")
    snap(a)
    s = tmp_path / "s.stream"
    env = {"VOLSYNC_RSH": shim, "VOLSYNC_REMOTE_PATH": REMOTE_PATH}
    r = send_to(s, scp(a), "--json", env=env)
    assert r.code == 0, r
    r = receive_from(s, url(tmp_path / "B"), "--json", env=env)
    assert r.code == 0, r
    assert json.loads(r.out)["added"] == [1]
    same_live_tree(a, tmp_path / "B")
    assert status(tmp_path / "B")["mode"] == "read-only"


def test_send_to_a_terminal_refused(tmp_path):
    """send with stdout on a terminal (a pty): exit 1 with a message, no stream written."""
    a = src_volume(tmp_path / "A")
    snap(a)
    master, slave = pty.openpty()
    try:
        p = subprocess.run([sys.executable, "-m", "volsync", "send", str(a)],
                           stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE,
                           env=clean_env(), timeout=60, check=False)
        os.close(slave)
        slave = -1
        written = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other end is closed
                break
            if not chunk:
                break
            written += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert p.returncode == 1, p
    assert b"volsync-stream" not in written and len(written) < 100, written
    assert b"Traceback" not in p.stderr and b"redirect" in p.stderr, p.stderr


def test_receive_from_a_terminal_refused(tmp_path):
    master, slave = pty.openpty()
    try:
        p = subprocess.run([sys.executable, "-m", "volsync", "receive", str(tmp_path / "B")],
                           stdin=slave, capture_output=True, env=clean_env(), timeout=60,
                           check=False)
    finally:
        os.close(slave)
        os.close(master)
    assert p.returncode == 1, p
    assert b"Traceback" not in p.stderr
    assert not (tmp_path / "B").exists()


# --- 11: --compress and --bwlimit ------------------------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_compress_shrinks_the_wire(shim, tmp_path, direction):
    """--compress on compressible data: the same bytes_sent, far fewer bytes_on_wire."""
    text = "".join(f"line {i} of some very repetitive log text\n" for i in range(20_000))
    a = make_volume(tmp_path / "A", {"log.txt": text, "noise": rnd(20_000, 3)})
    snap(a)
    plain = okj("transfer", *ends(direction, a, tmp_path / "B1"))
    packed = okj("transfer", *ends(direction, a, tmp_path / "B2"), "--compress")
    assert plain["bytes_sent"] == packed["bytes_sent"]
    assert packed["bytes_on_wire"] < plain["bytes_on_wire"] // 3, (plain, packed)
    assert content(tmp_path / "B2", mtimes=True) == content(a, mtimes=True)
    verify_clean(tmp_path / "B2")


def test_bwlimit_paces_the_transfer(shim, tmp_path):
    """--bwlimit 1M on ~3 MiB of incompressible data takes at least ~2 s (a loose lower bound:
    the rate limit is the feature itself)."""
    a = make_volume(tmp_path / "A", {"data": rnd(3 << 20, 11)})
    snap(a)
    start = time.monotonic()
    r = okj("transfer", a, scp(tmp_path / "B"), "--bwlimit", "1M")
    elapsed = time.monotonic() - start
    assert r["bytes_on_wire"] >= 3 << 20
    assert elapsed >= 2.0, elapsed
    assert content(tmp_path / "B") == content(a)


def test_bad_bwlimit_exit_1(shim, tmp_path):
    a = make_volume(tmp_path / "A", {"f": "f"})
    for rate in ("fast", "0", "-1M"):
        refuse(1, "transfer", a, scp(tmp_path / "B"), "--bwlimit", rate)
    assert not (tmp_path / "B").exists() and lineage(a) == []


def test_special_modes_kept_over_the_wire(shim, tmp_path):
    """setgid/sticky bits of a directory and a file cross the wire, with the mtimes."""
    a = make_volume(tmp_path / "A", {"f": "f", "d/x": "x"})
    os.chmod(a / "d", 0o3775)
    os.chmod(a / "f", 0o2640)
    b = tmp_path / "B"
    ok("transfer", a, scp(b))
    assert stat.S_IMODE(os.lstat(b / "d").st_mode) == 0o3775
    assert stat.S_IMODE(os.lstat(b / "f").st_mode) == 0o2640
    assert content(b, mtimes=True) == content(a, mtimes=True)


def test_program_logs_in_while_it_loads_and_uses_that_session(shim, tmp_path):
    """The installed program starts ssh for each remote address before its own modules load
    (login and the far side's start-up overlap this side's); the command then uses exactly
    that session: one login per address, none for an option's value, none left running."""
    log = tmp_path / "shim.log"
    a = src_volume(tmp_path / "A")
    env = {"VOLSYNC_RSH": shim, "VOLSYNC_REMOTE_PATH": REMOTE_PATH, "RSH_SHIM_LOG": str(log)}
    r = sub("transfer", a, scp(tmp_path / "B"), "--json", env_extra=env)
    assert r.code == 0, r
    r = sub("snapshot", a, "--label", "h9:x", env_extra=env)  # a label is not an address
    assert r.code == 0, r
    r = sub("transfer", scp(tmp_path / "B"), scp(tmp_path / "C"), env_extra=env)
    assert r.code == 0, r
    hosts = [json.loads(line)["host"] for line in log.read_text().splitlines()]
    assert hosts == [HOST, HOST, HOST], hosts
    r = sub("transfer", a, "nosuchhost-xyz:/b", env_extra=env | {"VOLSYNC_RSH": "false"})
    assert r.code == 1 and r.err.count("volsync: error:") == 1, r
