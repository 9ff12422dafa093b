"""Format 2 through the CLI: every piece of metadata a mirror keeps, and the live-tree writer's
safety rules, each with the bug (found from outside) it guards against."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import clean_env, content, make_volume, ok, okj, opened, snap, sub, verify_clean, vs

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (ownership, devices)")
RSYNC = shutil.which("rsync")


def rsync_diff(expected: Path, actual: Path) -> str:
    """rsync's itemized differences (-aHAXS --numeric-ids, by checksum); empty when equal."""
    p = subprocess.run(["rsync", "-aHAXS", "--numeric-ids", "-nic", "--delete",
                        "--exclude=/.volsync", f"{expected}/", f"{actual}/"],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    return p.stdout


def inode(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def aged(path: Path, seconds: int = 100) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


# --- what a snapshot records -------------------------------------------------------------------

@pytest.mark.skipif(not RSYNC, reason="rsync not installed")
def test_every_kind_of_metadata_survives_transfer_and_restore(tmp_path):
    # owners, setuid/sticky modes, xattrs, ACLs, hard links, holes, fifos, devices, odd names,
    # nanosecond mtimes before 1970 and after 2038, and the root's own metadata
    a = tmp_path / "a"
    (a / "d" / "e").mkdir(parents=True)
    (a / "f").write_bytes(b"x" * 10000)
    os.link(a / "f", a / "d" / "e" / "f-link")
    os.link(a / "f", a / "g-link")
    with open(a / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"data")
    (a / "zeros").write_bytes(bytes(200000))
    os.mkfifo(a / "fifo")
    os.symlink("dangling/target", a / "link")
    os.symlink("/abs/elsewhere", a / "d" / "abs")
    (a / b"odd \n name \xff".decode("utf-8", "surrogateescape")).write_bytes(b"odd")
    os.setxattr(a / "f", "user.k", b"\x00\x01binary")
    os.setxattr(a / "d", "user.empty", b"")
    os.setxattr(a, "user.root", b"on the root")
    if shutil.which("setfacl"):
        subprocess.run(["setfacl", "-m", "u:4321:rw", str(a / "f")], check=True)
        subprocess.run(["setfacl", "-d", "-m", "g:777:rx", str(a / "d")], check=True)
    os.chmod(a / "d", 0o1777)
    os.chmod(a / "f", 0o4755)
    if ROOT:
        os.chown(a / "f", 1000, 1001)  # chown clears setuid: set it again after
        os.chmod(a / "f", 0o4755)
        os.chown(a / "d", 12345, 54321)
        os.chown(a / "link", 7, 8, follow_symlinks=False)
        os.mknod(a / "null", stat.S_IFCHR | 0o644, os.makedev(1, 3))
        os.setxattr(a / "f", "trusted.t", b"trusted value")
    os.utime(a / "f", ns=(0, -123_456_789_012))
    os.utime(a / "link", ns=(0, 4_102_444_800_123_456_789), follow_symlinks=False)
    os.utime(a / "d" / "e", ns=(0, 2_500_000_000_000_000_001))
    os.chmod(a, 0o750)
    os.utime(a, ns=(0, 1_600_000_000_987_654_321))
    ok("init", a)
    os.utime(a, ns=(0, 1_600_000_000_987_654_321))  # init's .volsync/ changed it
    ok("snapshot", a)
    r = okj("transfer", a, tmp_path / "b")
    assert rsync_diff(a, tmp_path / "b") == ""
    assert r["bytes_sent"] < 200_000  # holes and zero blocks are neither stored nor sent
    assert inode(tmp_path / "b" / "f") == inode(tmp_path / "b" / "g-link")
    ok("restore", a, "latest", tmp_path / "r")
    assert rsync_diff(a, tmp_path / "r") == ""
    assert os.stat(tmp_path / "r" / "sparse").st_blocks * 512 < 1 << 20
    ok("transfer", tmp_path / "b", tmp_path / "c")  # a cascade keeps it all too
    assert rsync_diff(a, tmp_path / "c") == ""
    for vol in (a, tmp_path / "b", tmp_path / "c"):
        verify_clean(vol)


def test_sockets_are_skipped_with_a_warning(tmp_path):
    # rsync skips sockets too; the snapshot still succeeds
    import socket

    v = make_volume(tmp_path / "v", {"f": "x"})
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(v / "sock"))
    try:
        r = ok("snapshot", v)
        assert "socket sock" in r.err
    finally:
        s.close()


def test_metadata_only_changes_are_seen_without_reading_data(tmp_path):
    # chmod, setfattr and touch change ctime: found by the stat key, data not read again
    v = make_volume(tmp_path / "v", {"big": os.urandom(1 << 20)})
    aged(v / "big")
    snap(v)
    os.chmod(v / "big", 0o600)
    os.setxattr(v / "big", "user.new", b"1")
    os.utime(v / "big", (1000, 1000))
    r = okj("status", v)
    assert r["changed_paths"] == ["big"]
    s2 = snap(v)
    with opened(v) as vol:
        assert vol.snapshot(vol.state().lineage[-1]).number == s2["number"]
    ok("restore", v, "latest", tmp_path / "r")
    st = os.stat(tmp_path / "r" / "big")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o600, 1000 * 10**9)
    assert os.getxattr(tmp_path / "r" / "big", "user.new") == b"1"


# --- writing a live tree safely -----------------------------------------------------------------

def test_revert_never_writes_through_a_hard_link_to_a_file_outside(tmp_path):
    # bug 1: revert patched a live file in place; its other name outside the volume changed
    v = make_volume(tmp_path / "v", {"img": b"A" * (64 << 10)}, block_size="4K")
    snap(v)
    new = v / "img.new"
    new.write_bytes(b"A" * (32 << 10) + b"B" * (32 << 10))
    os.rename(new, v / "img")
    outside = tmp_path / "outside-copy"
    os.link(v / "img", outside)  # cp -al style backup
    before = outside.read_bytes()
    ok("revert", v, "1")
    assert outside.read_bytes() == before
    assert (v / "img").read_bytes() == b"A" * (64 << 10)
    verify_clean(v)


def test_hard_links_inside_the_volume_stay_linked_through_every_update(tmp_path):
    # bug 1: a mirror's linked names were patched one through the other, then refused forever
    a = make_volume(tmp_path / "a", {"x": b"1" * 50000, "d/keep": "k"}, block_size="4K")
    os.link(a / "x", a / "d" / "y")
    snap(a)
    b = tmp_path / "b"
    ok("transfer", a, b)
    assert inode(b / "x") == inode(b / "d" / "y")
    with open(a / "x", "r+b") as f:  # an in-place write: both names change
        f.write(b"2" * 100)
    ok("transfer", a, b)
    assert (b / "d" / "y").read_bytes()[:100] == b"2" * 100
    assert inode(b / "x") == inode(b / "d" / "y")
    ok("transfer", a, b)  # and the next cron run is a no-op, not a refusal
    verify_clean(b)
    os.unlink(a / "d" / "y")  # the group breaks up: x is a single file again
    ok("transfer", a, b)
    assert not (b / "d" / "y").exists() and os.stat(b / "x").st_nlink == 1
    verify_clean(b)


def test_a_running_program_on_a_mirror_is_replaced_not_written(tmp_path):
    # bug 2: ETXTBSY on a mirrored running program made every transfer exit 1
    a = make_volume(tmp_path / "a", {})
    shutil.copy2("/bin/sleep", a / "prog")
    snap(a)
    b = tmp_path / "b"
    ok("transfer", a, b)
    proc = subprocess.Popen([str(b / "prog"), "30"])
    try:
        time.sleep(0.2)
        os.chmod(a / "prog", 0o700)  # a mode change
        ok("transfer", a, b)
        with open(a / "prog", "ab") as f:  # and a content change
            f.write(b"\0" * 10)
        ok("transfer", a, b)
        assert (b / "prog").read_bytes() == (a / "prog").read_bytes()
        assert stat.S_IMODE(os.stat(b / "prog").st_mode) == 0o700
    finally:
        proc.kill()
        proc.wait()
    verify_clean(b)


def test_names_like_volsync_temp_files_are_user_data(tmp_path):
    # bug 3: `.volsync-tmp-*` at any depth was never captured and revert deleted it; init
    # deleted a user's top-level `.volsync.tmp-*` directory with everything in it
    v = tmp_path / "v"
    (v / ".volsync.tmp-mine").mkdir(parents=True)
    (v / ".volsync.tmp-mine" / "keep").write_text("precious")
    (v / "sub").mkdir()
    (v / "sub" / ".volsync-tmp-notes").write_text("notes")
    (v / ".volsync-tmp-top").write_text("top")
    ok("init", v)
    assert (v / ".volsync.tmp-mine" / "keep").read_text() == "precious"
    snap(v)
    ok("restore", v, "1", tmp_path / "r")
    assert content(tmp_path / "r") == content(v)
    (v / "later").write_text("x")
    snap(v)
    ok("revert", v, "1")
    assert (v / "sub" / ".volsync-tmp-notes").read_text() == "notes"
    assert (v / ".volsync-tmp-top").read_text() == "top"


@needs_root
def test_setuid_of_an_ordinary_user_never_becomes_setuid_root(tmp_path):
    # bug 4: mirrors and restores made by root gave every file to root, setuid bit included
    a = make_volume(tmp_path / "a", {"tool": b"#!/bin/sh\n"})
    os.chown(a / "tool", 1000, 1000)
    os.chmod(a / "tool", 0o4755)
    snap(a)
    ok("transfer", a, tmp_path / "b")
    ok("restore", a, "1", tmp_path / "r")
    for copy in (tmp_path / "b" / "tool", tmp_path / "r" / "tool"):
        st = os.stat(copy)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o4755)


def test_sparse_image_stays_sparse_on_mirror_and_restore(tmp_path):
    # bug 5: a 1 GiB sparse image holding 4 KiB became 1 GiB on every mirror and restore
    a = make_volume(tmp_path / "a", {})
    with open(a / "disk.img", "wb") as f:
        f.truncate(1 << 30)
        f.seek(300 << 20)
        f.write(os.urandom(4096))
    r = okj("snapshot", a)
    assert r["size"] == 1 << 30
    t = okj("transfer", a, tmp_path / "b")
    assert t["bytes_sent"] < 1 << 20
    ok("restore", a, "latest", tmp_path / "r")
    for copy in (tmp_path / "b" / "disk.img", tmp_path / "r" / "disk.img"):
        assert os.stat(copy).st_size == 1 << 30
        assert os.stat(copy).st_blocks * 512 <= 1 << 20
    assert (tmp_path / "b" / "disk.img").read_bytes() == (a / "disk.img").read_bytes()
    verify_clean(tmp_path / "b")


def test_mtime_only_changes_count_everywhere(tmp_path):
    # bug 6: an mtime-only change was not preserved by revert, not repaired on a mirror, and
    # not reported by status or verify
    a = make_volume(tmp_path / "a", {"f": "data"})
    snap(a)
    b = tmp_path / "b"
    ok("transfer", a, b)
    os.utime(b / "f", (5, 5))
    assert okj("status", b)["changed_paths"] == ["f"]
    assert vs("verify", b).code == 6
    assert vs("transfer", a, b).code == 5
    ok("resync", a, b, "--force")
    assert os.stat(b / "f").st_mtime_ns == os.stat(a / "f").st_mtime_ns
    verify_clean(b)
    os.utime(a / "f", (7, 7))
    r = okj("revert", a, "1")
    assert r["live_changes_preserved"]
    pres = [s for s in okj("snapshots", a, "--all")["snapshots"] if s["preserved"]]
    ok("restore", a, pres[0]["id"], tmp_path / "kept")
    assert os.stat(tmp_path / "kept" / "f").st_mtime_ns == 7 * 10**9


def test_verify_rereads_a_mirrors_files_whatever_the_stat_cache_says(tmp_path):
    # bug 8: bytes damaged without a change the stat cache can see passed verify
    a = make_volume(tmp_path / "a", {"f": b"good data" * 1000})
    snap(a)
    b = tmp_path / "b"
    ok("transfer", a, b)
    st = os.stat(b / "f")
    with open(b / "f", "r+b") as f:
        f.write(b"BAD")
    os.utime(b / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
    with opened(b) as vol:  # the cache is made to vouch for the damaged file, as bit rot would
        from volsync.tree import scan as vscan

        result, _ = vscan(vol, write=False, trust_cache=False)
        vol.save_statcache(result.cache)
    r = vs("verify", b, "--json")
    assert r.code == 6 and any("f" in e for e in r.json["errors"])


def test_verify_beside_a_running_transfer_reports_only_real_damage(tmp_path):
    # bug 9: verify read the state, packs and live tree at different moments and reported
    # damage that was not there
    a = make_volume(tmp_path / "a", {f"f{i}": os.urandom(20000) for i in range(30)})
    b = tmp_path / "b"
    ok("transfer", a, b)
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            (a / f"f{n % 30}").write_bytes(os.urandom(20000 + n))
            sub("transfer", a, b, "--wait", "10")

    t = threading.Thread(target=writer)
    t.start()
    try:
        codes = [sub("verify", b).code for _ in range(8)]
    finally:
        stop.set()
        t.join()
    assert set(codes) <= {0, 3}, codes
    verify_clean(b)


def test_an_interrupted_baseline_resumes_when_run_again(tmp_path):
    # bug 10: Ctrl-C during a first transfer left a DST that every rerun refused (exit 4)
    a = make_volume(tmp_path / "a", {f"f{i}": os.urandom(1 << 20) for i in range(60)})
    snap(a)
    b = tmp_path / "b"
    for delay in (0.3, 0.6, 0.9):
        p = subprocess.Popen([sys.executable, "-m", "volsync", "transfer", str(a), str(b)],
                             env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        assert p.returncode in (0, 130), err
        r = sub("transfer", a, b)
        assert r.code == 0, r
        assert content(b) == content(a)
        verify_clean(b)
        shutil.rmtree(b)


def test_a_mirror_inside_its_source_is_refused(tmp_path):
    # bug 11: `transfer small small/sub` nested one level deeper on each run until disk full
    a = make_volume(tmp_path / "a", {"f": "x"})
    snap(a)
    r = vs("transfer", a, a / "sub")
    assert r.code == 1 and "inside" in r.err
    assert not (a / "sub").exists()
    ok("transfer", a, tmp_path / "b")
    assert vs("transfer", tmp_path / "b", tmp_path / "b" / "deeper").code == 1


def test_a_nested_volumes_metadata_is_never_captured(tmp_path):
    # bug 11: init of the parent of a volume captured the inner .volsync/ as data
    outer = tmp_path / "outer"
    make_volume(outer / "inner", {"f": "inner"})
    snap(outer / "inner")
    ok("init", outer)
    r = ok("snapshot", outer)
    assert "nested volume" in r.err
    ok("restore", outer, "latest", tmp_path / "r")
    assert (tmp_path / "r" / "inner" / "f").read_text() == "inner"
    assert not (tmp_path / "r" / "inner" / ".volsync").exists()


def test_break_rerun_after_it_committed_says_already(tmp_path):
    # bug 7: a break retried after an interrupted but committed one exited 1
    a = make_volume(tmp_path / "a", {"f": "x"})
    snap(a)
    ok("transfer", a, tmp_path / "b")
    ok("break", tmp_path / "b")
    r = okj("break", tmp_path / "b")
    assert r["already_done"] and r["mode"] == "read-write"
    assert vs("break", a).code == 1  # never a mirror: still an error


def test_a_failed_fsync_fails_the_command_and_the_next_one_finishes(tmp_path):
    # bug 7: a failed durability call was ignored; now exit 1, and a rerun completes
    a = make_volume(tmp_path / "a", {f"f{i}": os.urandom(5000) for i in range(5)})
    snap(a)
    b = tmp_path / "b"
    ok("transfer", a, b)
    (a / "f1").write_bytes(os.urandom(7000))
    failures = 0
    for n in range(1, 12):
        r = sub("transfer", a, b, env_extra={"VOLSYNC_FAULT": f"fsync:EIO:{n}"})
        assert r.code in (0, 1), r
        if r.code == 1:
            failures += 1
            assert "Input/output error" in r.err
        ok("transfer", a, b)
        assert content(b) == content(a)
        verify_clean(b)
        (a / "f2").write_bytes(os.urandom(6000 + n))
    assert failures


def test_one_changed_block_of_a_big_file_sends_a_few_kib(tmp_path):
    # block lists are split: a change of one block re-sends one list object per level
    a = make_volume(tmp_path / "a", {"big": os.urandom(8 << 20)}, block_size="4K")
    snap(a)
    ok("transfer", a, tmp_path / "b")
    with open(a / "big", "r+b") as f:
        f.seek(5 << 20)
        f.write(b"changed")
    r = okj("transfer", a, tmp_path / "b")
    assert r["blocks_sent"] == 1
    assert r["bytes_sent"] < 4096 + 3 * 4096 + 2048  # the block, its lists, the tree
    assert (tmp_path / "b" / "big").read_bytes() == (a / "big").read_bytes()


def test_volumes_of_different_hashes_do_not_mix(tmp_path):
    # blocks named by different hashes cannot be shared: refused with a clear message
    a = make_volume(tmp_path / "a", {"f": "x"})
    snap(a)
    b = tmp_path / "b"
    b.mkdir()
    ok("init", b, "--hash", "xxh3-128")
    r = vs("resync", a, b)
    assert r.code == 1 and "hash" in r.err
    assert okj("snapshots", b)["snapshots"] == []


def test_a_killed_baseline_resends_only_what_the_mirror_lacks(tmp_path):
    # bug 10: a baseline killed half-way resumes: what was received stays (adopted), the live
    # tree written so far is kept, and the rerun sends only the rest
    a = make_volume(tmp_path / "a", {f"f{i:02}": os.urandom(1 << 20) for i in range(40)},
                    block_size="64K")
    snap(a)
    total = okj("transfer", a, tmp_path / "plan", "--dry-run")["bytes_sent"]
    b = tmp_path / "b"
    r = sub("transfer", a, b, env_extra={"VOLSYNC_CRASH_AT": "object-received:400"})
    assert r.code == 137, r
    again = okj("transfer", a, b)
    assert again["bytes_sent"] <= total - 399 * (64 << 10)
    assert content(b) == content(a)
    verify_clean(b)


def test_a_no_change_scan_reads_no_data_and_no_xattrs(tmp_path, monkeypatch):
    # the stat key vouches for data and metadata alike: nothing is read again
    from volsync import tree as vtree

    v = make_volume(tmp_path / "v", {"d/f": os.urandom(50000), "g": "x"})
    os.setxattr(v / "g", "user.k", b"v")
    for p in (v / "d" / "f", v / "g", v / "d", v):
        aged(p)
    snap(v)
    calls = []
    real = os.listxattr
    monkeypatch.setattr(os, "listxattr", lambda *a, **k: calls.append(a) or real(*a, **k))
    with opened(v) as vol:
        result, _ = vtree.scan(vol, write=False)
    assert result.bytes_read == 0 and calls == []
