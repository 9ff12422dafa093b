"""Single-volume behaviour through the command line (docs/contract.md)."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import age_tree, assert_same_tree, read_tree, spec_to_flat, write_tree
from helpers import diff_lists, opened

from volsync import tree as vtree
from volsync.model import Kind
from volsync.store.blocklist import block_ids
from volsync.store.volume import Volume

BASE = {
    "a.txt": "alpha\n",
    "docs": {"readme": "read me\n", "deep": {"x": b"\x00\x01\x02" * 100}},
    "empty-dir": {},
    "link": ("link", "a.txt"),
}


def snap(run, vol, *extra) -> dict:
    r = run("snapshot", vol, "--json", *extra)
    assert r.code == 0, r
    return r.json


def listing(run, vol, all_=True) -> list[dict]:
    r = run("snapshots", vol, "--json", *(["--all"] if all_ else []))
    assert r.code == 0, r
    return r.json["snapshots"]


def one_error_line(r) -> None:
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r
    assert "Traceback" not in r.err


# --- init -----------------------------------------------------------------------------------

def test_init_in_place_keeps_files(run, tmp_path):
    """init turns an existing directory into a volume without touching its files."""
    d = tmp_path / "data"
    write_tree(d, BASE)
    before = read_tree(d, mtimes=True)
    r = run("init", d)
    assert r.code == 0, r
    assert (d / ".volsync" / "config").is_file()
    assert read_tree(d, mtimes=True) == before


def test_init_creates_missing_directory(run, tmp_path, monkeypatch):
    """init creates DIR (and parents) when it is absent; relative paths work."""
    d = tmp_path / "new" / "vol"
    r = run("init", d)
    assert r.code == 0, r
    assert (d / ".volsync").is_dir()
    monkeypatch.chdir(tmp_path)
    r = run("init", "rel")
    assert r.code == 0, r
    assert (tmp_path / "rel" / ".volsync").is_dir()


@pytest.mark.parametrize("size", ["3K", "2K", "8M", "abc", "0", "-4K", "100000"])
def test_init_bad_block_size(run, tmp_path, size):
    """A block size that is not a power of two in 4K..4M exits 1 with one line, no traceback."""
    r = run("init", tmp_path / "v", "--block-size", size)
    assert r.code == 1, r
    one_error_line(r)
    assert not (tmp_path / "v" / ".volsync").exists()


@pytest.mark.parametrize("size,expected", [("4K", 4096), ("1M", 1 << 20), ("4M", 4 << 20)])
def test_init_good_block_size(run, tmp_path, size, expected):
    """Valid block sizes are accepted and recorded in the volume's config."""
    r = run("init", tmp_path / "v", "--block-size", size, "--json")
    assert r.code == 0, r
    assert Volume.open(tmp_path / "v").config.block_size == expected


def test_init_twice_refused(run, make_volume):
    """init on a directory that already is a volume exits 1."""
    v = make_volume(BASE)
    r = run("init", v)
    assert r.code == 1, r
    one_error_line(r)


# --- snapshot and listing -------------------------------------------------------------------

def test_snapshot_prints_number_and_json(run, make_volume):
    """snapshot prints its number; --json gives {"number", "id"}; numbers increase by one."""
    v = make_volume(BASE)
    r = run("snapshot", v)
    assert r.code == 0, r
    assert re.search(r"\b1\b", r.out), r
    j = snap(run, v)
    assert j["number"] == 2
    assert isinstance(j["id"], str) and len(j["id"]) == 32
    assert json.loads(run("snapshot", v, "--json").out)["number"] == 3


def test_snapshot_ids_unique_across_volumes(run, make_volume):
    """Two volumes' snapshot 1 get different ids."""
    a = make_volume(BASE, name="a")
    b = make_volume(BASE, name="b")
    assert snap(run, a)["id"] != snap(run, b)["id"]


def test_snapshots_listing_json_keys_and_all(run, make_volume):
    """snapshots lists the lineage; --all adds preserved ones, flagged, with the JSON keys."""
    v = make_volume(BASE)
    s1 = snap(run, v, "--label", "first")
    s2 = snap(run, v)
    assert run("revert", v, "1").code == 0
    lineage = listing(run, v, all_=False)
    assert [s["number"] for s in lineage] == [1]
    every = listing(run, v)
    for row in every:
        assert {"number", "id", "created", "label", "preserved"} <= set(row)
    by_id = {row["id"]: row for row in every}
    assert by_id[s1["id"]]["preserved"] is False
    assert by_id[s1["id"]]["label"] == "first"
    assert by_id[s2["id"]]["preserved"] is True
    assert by_id[s2["id"]]["number"] == 2


def test_snapshot_label_resolves(run, make_volume, tmp_path):
    """A label names a lineage snapshot as SNAP."""
    v = make_volume(BASE)
    snap(run, v, "--label", "before")
    (v / "a.txt").write_text("changed")
    snap(run, v)
    r = run("restore", v, "before", tmp_path / "out")
    assert r.code == 0, r
    assert (tmp_path / "out" / "a.txt").read_text() == "alpha\n"


@pytest.mark.parametrize("label", ["", "12", "latest"])
def test_snapshot_bad_label(run, make_volume, label):
    """Labels that would be ambiguous as SNAP are refused with exit 1."""
    v = make_volume(BASE)
    r = run("snapshot", v, "--label", label)
    assert r.code == 1, r


# --- status and diff ------------------------------------------------------------------------

def test_status_json(run, make_volume):
    """status --json has mode, upstream, latest and changed_paths, and reports live changes."""
    v = make_volume(BASE)
    j = run("status", v, "--json").json
    assert j["mode"] == "read-write" and j["upstream"] is None and j["latest"] is None
    snap(run, v)
    j = run("status", v, "--json").json
    assert j["latest"] == 1 and j["changed_paths"] == []
    (v / "a.txt").write_text("new")
    (v / "added").write_text("x")
    j = run("status", v, "--json").json
    assert sorted(j["changed_paths"]) == ["a.txt", "added"]


def test_diff_latest_a_and_b(run, make_volume):
    """diff reports added/modified/deleted for latest→live, A→live and A→B."""
    v = make_volume(BASE)
    snap(run, v)
    (v / "a.txt").write_text("modified")
    (v / "docs" / "readme").unlink()
    (v / "new").write_text("n")
    j = run("diff", v, "--json").json
    assert diff_lists(j) == {"added": ["new"], "modified": ["a.txt"], "deleted": ["docs/readme"]}
    snap(run, v)
    (v / "new").unlink()
    assert diff_lists(run("diff", v, "--json").json) == {
        "added": [], "modified": [], "deleted": ["new"]}
    assert diff_lists(run("diff", v, "1", "--json").json) == {
        "added": [], "modified": ["a.txt"], "deleted": ["docs/readme"]}
    assert diff_lists(run("diff", v, "1", "2", "--json").json) == {
        "added": ["new"], "modified": ["a.txt"], "deleted": ["docs/readme"]}
    assert diff_lists(run("diff", v, "2", "1", "--json").json) == {
        "added": ["docs/readme"], "modified": ["a.txt"], "deleted": ["new"]}
    r = run("diff", v, "1", "2")
    assert r.code == 0 and "a.txt" in r.out and "new" in r.out


def test_diff_directory_added_and_removed(run, make_volume):
    """A new directory shows as added with its content; a removed one as deleted."""
    v = make_volume(BASE)
    snap(run, v)
    write_tree(v, {"nd": {"f": "1"}})
    import shutil
    shutil.rmtree(v / "docs")
    j = run("diff", v, "--json").json
    assert set(j["added"]) == {"nd/", "nd/f"}
    assert set(j["deleted"]) == {"docs/", "docs/readme", "docs/deep/", "docs/deep/x"}


# --- revert and restore ---------------------------------------------------------------------

def test_revert_preserves_later_snapshots_and_live_changes(run, make_volume, tmp_path):
    """revert keeps later snapshots and unsnapshotted live changes as restorable preserved
    snapshots, and sets the live tree and lineage back."""
    v = make_volume(BASE)
    t1 = read_tree(v)
    s1 = snap(run, v)
    (v / "a.txt").write_text("two")
    t2 = read_tree(v)
    s2 = snap(run, v)
    (v / "docs" / "readme").unlink()
    write_tree(v, {"three": {"f": "3"}})
    t3 = read_tree(v)
    s3 = snap(run, v)
    (v / "live-only").write_text("unsnapshotted")
    (v / "a.txt").write_text("live edit")
    t_live = read_tree(v)

    r = run("revert", v, "1", "--json")
    assert r.code == 0, r
    assert r.json["preserved"] == [2, 3]
    assert r.json["live_changes_preserved"] is True
    assert_same_tree(v, t1)
    rows = listing(run, v)
    assert [(x["number"], x["preserved"]) for x in rows if not x["preserved"]] == [(1, False)]
    assert rows[0]["id"] == s1["id"]
    preserved = [x for x in rows if x["preserved"]]
    assert {x["id"] for x in preserved} >= {s2["id"], s3["id"]}
    assert len(preserved) == 3
    live_snap = next(x for x in preserved if x["id"] not in (s2["id"], s3["id"]))

    for i, (sid, expect) in enumerate([(s2["id"], t2), (s3["id"], t3),
                                       (live_snap["id"], t_live)]):
        out = tmp_path / f"r{i}"
        r = run("restore", v, sid, out)
        assert r.code == 0, r
        assert_same_tree(out, expect)
        r = run("restore", v, sid[:8], tmp_path / f"p{i}")
        assert r.code == 0, r
    assert run("verify", v).code == 0
    # the next snapshot continues the lineage after 1
    assert snap(run, v)["number"] == 2


def test_revert_without_live_changes_makes_no_live_snapshot(run, make_volume):
    """revert with a clean live tree preserves only the later snapshots."""
    v = make_volume(BASE)
    snap(run, v)
    (v / "a.txt").write_text("two")
    snap(run, v)
    r = run("revert", v, "latest", "--json")
    assert r.code == 0, r
    assert r.json["preserved"] == [] and r.json["live_changes_preserved"] is False
    assert len(listing(run, v)) == 2


def test_revert_dry_run_changes_nothing(run, make_volume):
    """revert --dry-run prints the plan and leaves lineage and live tree as they were."""
    v = make_volume(BASE)
    snap(run, v)
    (v / "a.txt").write_text("two")
    snap(run, v)
    (v / "x").write_text("live")
    before = read_tree(v, mtimes=True)
    r = run("revert", v, "1", "--dry-run", "--json")
    assert r.code == 0, r
    assert r.json["preserved"] == [2]
    assert read_tree(v, mtimes=True) == before
    assert len(listing(run, v)) == 2


def test_revert_to_preserved_brings_it_back(run, make_volume):
    """A preserved snapshot (by id or pN) comes back as a new latest snapshot and as the live
    tree: the undo of a revert. A name that is no preserved snapshot is exit 1."""
    v = make_volume(BASE)
    snap(run, v)
    (v / "a.txt").write_text("two")
    s2 = snap(run, v)
    assert run("revert", v, "1").code == 0
    assert (v / "a.txt").read_text() != "two"
    r = run("revert", v, s2["id"], "--json")
    assert r.code == 0, r
    assert r.json["added"]["number"] == 2 and r.json["added"]["id"] != s2["id"]
    assert (v / "a.txt").read_text() == "two"
    r = run("revert", v, "p7")
    assert r.code == 1, r
    one_error_line(r)


def test_restore_into_nonempty_dir_refused(run, make_volume, tmp_path):
    """restore refuses a DIR that exists and is not empty (exit 1) and leaves it untouched."""
    v = make_volume(BASE)
    snap(run, v)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    r = run("restore", v, "1", out)
    assert r.code == 1, r
    one_error_line(r)
    assert read_tree(out) == {b"keep": ("file", b"mine", 0o644)}
    f = tmp_path / "afile"
    f.write_text("x")
    assert run("restore", v, "1", f).code == 1


def test_restore_into_empty_existing_dir(run, make_volume, tmp_path):
    """restore into an existing empty directory works."""
    v = make_volume(BASE)
    snap(run, v)
    out = tmp_path / "out"
    out.mkdir()
    assert run("restore", v, "1", out).code == 0
    assert_same_tree(out, v)


def test_restore_keeps_modes_and_mtimes(run, make_volume, tmp_path):
    """restore reproduces file and directory modes and mtimes (ns), and symlink mtimes."""
    spec = {
        "exec": ("file", "#!/bin/sh\n", 0o755),
        "secret": ("file", "s", 0o600),
        "sticky": ("file", "s", 0o1644),
        "d": ("dir", 0o750, {"inner": ("dir", 0o711, {"f": "f"}), "l": ("link", "../exec")}),
    }
    v = make_volume(spec)
    t = 1_500_000_000
    for i, p in enumerate([b"exec", b"secret", b"sticky", b"d/inner/f", b"d/l", b"d/inner",
                           b"d"]):
        ns = (t + i) * 10**9 + 123456789 + i
        os.utime(os.path.join(bytes(v), p), ns=(ns, ns), follow_symlinks=False)
    before = read_tree(v, mtimes=True)
    snap(run, v)
    out = tmp_path / "out"
    assert run("restore", v, "1", out).code == 0
    after = read_tree(out, mtimes=True)
    assert after == before
    assert stat.S_IMODE(os.stat(out / "d").st_mode) == 0o750
    assert os.stat(out / "d" / "inner" / "f").st_mtime_ns == os.stat(v / "d" / "inner" / "f").st_mtime_ns


def test_symlinks_not_followed(run, make_volume, tmp_path):
    """A symlink (even to /etc/passwd or a directory outside) is captured as a link and
    restored as the same link, never as the target's content."""
    v = make_volume({"pw": ("link", "/etc/passwd"), "dl": ("link", "/etc"),
                     "dangling": ("link", "nowhere/at/all")})
    s = snap(run, v)
    vol = Volume.open(v)
    entries = {e.name: e for e in vol.tree(vol.snapshot(s["id"]).root).entries}
    assert entries[b"pw"].kind is Kind.LINK and entries[b"pw"].ref == b"/etc/passwd"
    assert entries[b"dl"].kind is Kind.LINK
    out = tmp_path / "out"
    assert run("restore", v, "1", out).code == 0
    assert os.readlink(out / "pw") == "/etc/passwd"
    assert os.readlink(out / "dl") == "/etc"
    assert os.readlink(out / "dangling") == "nowhere/at/all"
    assert sorted(os.listdir(out)) == ["dangling", "dl", "pw"]


def test_odd_names_round_trip(run, make_volume, tmp_path):
    """Names with spaces, newlines, non-UTF-8 bytes and leading dashes survive snapshot,
    diff, restore and revert."""
    spec = {b"with space": "1", b"new\nline": "2", b"\xff\xfe": "3", b"-dash": "4",
            b"d\xe9j\xe0": {b"\x80inner": "5"}, b"tab\there": ("link", b"\xff\xfe")}
    v = make_volume(spec)
    snap(run, v)
    out = tmp_path / "out"
    assert run("restore", v, "1", out).code == 0
    assert read_tree(out) == spec_to_flat(spec)
    os.unlink(os.path.join(bytes(v), b"\xff\xfe"))
    with open(os.path.join(bytes(v), b"new\xffname"), "w") as f:
        f.write("x")
    r = run("diff", v)
    assert r.code == 0, r
    j = run("diff", v, "--json").json
    assert j["added"] == ["new\ufffdname"] and j["deleted"] == ["\ufffd\ufffd"]
    assert [(c["status"], base64.b64decode(c["path_b64"])) for c in j["changes"]] == [
        ("added", b"new\xffname"), ("deleted", b"\xff\xfe")]
    assert run("status", v).code == 0
    assert run("revert", v, "1").code == 0
    assert read_tree(v) == spec_to_flat(spec)


def test_empty_files_and_dirs_round_trip(run, make_volume, tmp_path):
    """Empty files and (nested) empty directories are captured and restored."""
    spec = {"empty": "", "e1": {}, "e2": {"e3": {}}, "d": {"zero": ""}}
    v = make_volume(spec)
    snap(run, v)
    out = tmp_path / "out"
    assert run("restore", v, "1", out).code == 0
    assert read_tree(out) == spec_to_flat(spec)


def test_fifo_captured_and_restored(run, make_volume, tmp_path):
    """A fifo is captured (never opened for reading) and restored as a fifo with its mode."""
    v = make_volume({"f": "x"})
    os.mkfifo(v / "pipe", 0o640)
    r = run("snapshot", v)
    assert r.code == 0, r
    out = tmp_path / "out"
    assert run("restore", v, "1", out).code == 0
    st = os.lstat(out / "pipe")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640


def test_hard_links_are_kept(run, make_volume, tmp_path):
    """Hard-linked names are restored as one inode with two names."""
    v = make_volume({"a": "shared"})
    os.link(v / "a", v / "b")
    snap(run, v)
    out = tmp_path / "out"
    assert run("restore", v, "1", out).code == 0
    sa, sb = os.stat(out / "a"), os.stat(out / "b")
    assert sa.st_ino == sb.st_ino and sa.st_nlink == 2
    assert (out / "b").read_text() == "shared"


def test_volsync_dir_never_captured(run, make_volume, tmp_path):
    """The top-level .volsync folder is not part of any snapshot (but a nested one is)."""
    v = make_volume({"sub": {".volsync": {"x": "data"}}, "f": "1"})
    s = snap(run, v)
    vol = Volume.open(v)
    names = [e.name for e in vol.tree(vol.snapshot(s["id"]).root).entries]
    assert b".volsync" not in names
    out = tmp_path / "out"
    assert run("restore", v, "1", out).code == 0
    assert not (out / ".volsync").exists()
    assert (out / "sub" / ".volsync" / "x").read_text() == "data"
    assert diff_lists(run("diff", v, "--json").json) == {
        "added": [], "modified": [], "deleted": []}


def test_unchanged_files_not_reread(run, make_volume):
    """With old mtimes, a second scan reads no file data; a changed file alone is re-read."""
    v = make_volume({"big": b"b" * 200_000, "d": {"small": "s" * 1000}})
    age_tree(v)
    snap(run, v)
    vol = Volume.open(v)
    result, _ = vtree.scan(vol, write=False)
    assert result.bytes_read == 0
    snap(run, v)
    result, _ = vtree.scan(Volume.open(v), write=False)
    assert result.bytes_read == 0
    (v / "d" / "small").write_text("t" * 1500)
    past = int(time.time()) - 50
    os.utime(v / "d" / "small", (past, past))
    result, _ = vtree.scan(Volume.open(v), write=False)
    assert result.bytes_read == 1500


def test_recent_files_are_reread(run, make_volume, monkeypatch):
    """A file modified within the racy window is not trusted from the cache. (The window is
    widened to a minute here, so that a loaded machine's delay between the write and the
    snapshot cannot take the file out of it.)"""
    import importlib

    monkeypatch.setattr(importlib.import_module("volsync.tree.scan"), "RACY_NS", 60 * 10**9)
    v = make_volume({"f": "x" * 100})
    snap(run, v)
    result, _ = vtree.scan(Volume.open(v), write=False)
    assert result.bytes_read == 100


def test_same_size_same_mtime_rewrite_detected(run, make_volume, tmp_path):
    """A rewrite that keeps size and mtime (e.g. touch -r) is still captured (ctime/inode)."""
    v = make_volume({"f": "aaaa"})
    age_tree(v)
    snap(run, v)
    st = os.stat(v / "f")
    (v / "f").write_text("bbbb")
    os.utime(v / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run("diff", v, "--json").json["modified"] == ["f"]
    snap(run, v)
    out = tmp_path / "out"
    assert run("restore", v, "2", out).code == 0
    assert (out / "f").read_text() == "bbbb"


def test_file_changing_on_every_read_reported(run, make_volume, monkeypatch):
    """A file that changes during every read makes `snapshot --strict` fail (exit 1, naming
    it) rather than record a torn file; nothing is committed and the volume verifies clean.
    (Without --strict: tests/test_busy_files.py.)"""
    v = make_volume({"stable": "s", "hot": "h" * 10_000})
    original = vtree.Scanner.hash_blocks

    def changing(self, fd, size):
        out = original(self, fd, size)
        path = f"/proc/self/fd/{fd}"
        if os.path.realpath(path).endswith("/hot"):
            with open(os.path.realpath(path), "ab") as f:
                f.write(b"more")
        return out

    monkeypatch.setattr(vtree.Scanner, "hash_blocks", changing)
    r = run("snapshot", v, "--strict")
    assert r.code == 1, r
    one_error_line(r)
    assert "hot" in r.err
    assert listing(run, v) == []
    monkeypatch.undo()
    assert run("verify", v).code == 0
    assert snap(run, v)["number"] == 1


def test_file_changing_once_is_reread_consistently(run, make_volume, monkeypatch, tmp_path):
    """A file changed once during its read is read again and recorded whole (not torn)."""
    v = make_volume({"hot": "h" * 10_000})
    original = vtree.Scanner.hash_blocks
    calls = []

    def changing_once(self, fd, size):
        out = original(self, fd, size)
        if not calls:
            calls.append(1)
            with open(v / "hot", "ab") as f:
                f.write(b"tail")
        return out

    monkeypatch.setattr(vtree.Scanner, "hash_blocks", changing_once)
    assert run("snapshot", v).code == 0
    monkeypatch.undo()
    out = tmp_path / "out"
    assert run("restore", v, "1", out).code == 0
    assert (out / "hot").read_bytes() == b"h" * 10_000 + b"tail"


def test_revert_large_file_writes_only_changed_blocks(run, make_volume, monkeypatch):
    """Reverting a large file that differs in a few blocks rewrites only those blocks, in
    place (same inode)."""
    bs = 4096
    data = bytes(range(256)) * (64 * bs // 256)
    v = make_volume({"big": data}, block_size="4K")
    snap(run, v)
    with open(v / "big", "r+b") as f:
        f.seek(3 * bs + 10)
        f.write(b"XXXX")
        f.seek(40 * bs)
        f.write(b"Y" * bs)
    snap(run, v)
    ino = os.stat(v / "big").st_ino
    written = []
    original = vtree.Materializer.count

    def counting(self, n):
        written.append(n)
        return original(self, n)

    monkeypatch.setattr(vtree.Materializer, "count", counting)
    assert run("revert", v, "1").code == 0
    assert (v / "big").read_bytes() == data
    assert os.stat(v / "big").st_ino == ino
    assert sum(written) == 2 * bs


def test_revert_small_changes_leave_other_files_alone(run, make_volume):
    """revert does not rewrite files whose content is already right (inode and ctime kept)."""
    v = make_volume({"keep": "k" * 5000, "change": "c"})
    age_tree(v)
    snap(run, v)
    (v / "change").write_text("changed")
    snap(run, v)
    st = os.stat(v / "keep")
    assert run("revert", v, "1").code == 0
    st2 = os.stat(v / "keep")
    assert (st.st_ino, st.st_ctime_ns) == (st2.st_ino, st2.st_ctime_ns)
    assert (v / "change").read_text() == "c"


def test_revert_replaces_type_changes(run, make_volume):
    """revert turns a file back into a dir, a dir into a link, a link into a file."""
    spec = {"a": {"x": "1"}, "b": ("link", "a"), "c": "file"}
    v = make_volume(spec)
    snap(run, v)
    import shutil
    shutil.rmtree(v / "a")
    (v / "a").write_text("now a file")
    os.unlink(v / "b")
    (v / "b").mkdir()
    (v / "b" / "y").write_text("2")
    os.unlink(v / "c")
    os.symlink("/etc/passwd", v / "c")
    snap(run, v)
    assert run("revert", v, "1").code == 0
    assert read_tree(v) == spec_to_flat(spec)
    assert run("revert", v, "1").code == 0
    assert diff_lists(run("diff", v, "--json").json) == {
        "added": [], "modified": [], "deleted": []}


# --- verify ---------------------------------------------------------------------------------

def _file_block_ids(vol: Volume, snap_id: str, path: bytes) -> list:
    """The block ids of the file at `path` in a snapshot, in order."""
    tree_id = vol.snapshot(snap_id).root
    *dirs, name = path.split(b"/")
    for d in dirs:
        tree_id = {e.name: e for e in vol.tree(tree_id).entries}[d].ref
    entry = {e.name: e for e in vol.tree(tree_id).entries}[name]
    return list(block_ids(entry.ref, entry.size, vol.fmt, vol.packs.get))


def _block_location(v: Path, snap_id: str, path: bytes):
    """(pack path, offset, length) of the first block of the file at `path` in a snapshot."""
    vol = Volume.open(v)
    pack, off, length = vol.packs.index()[_file_block_ids(vol, snap_id, path)[0]]
    return vol.meta / "packs" / f"{pack}.pack", off, length


def test_verify_ok(run, make_volume):
    """verify of a healthy volume exits 0 with ok and a block count."""
    v = make_volume(BASE)
    snap(run, v)
    r = run("verify", v, "--json")
    assert r.code == 0, r
    assert r.json["ok"] is True and r.json["errors"] == [] and r.json["blocks_checked"] > 0


def test_verify_detects_flipped_bit(run, make_volume):
    """A flipped bit in a pack fails verify (exit 6), naming the snapshot and the path."""
    v = make_volume(BASE)
    snap(run, v)
    (v / "a.txt").write_text("second version")
    snap(run, v)
    s = listing(run, v)[-1]
    pack, off, length = _block_location(v, s["id"], b"docs/deep/x")
    with open(pack, "r+b") as f:
        f.seek(off + length // 2)
        byte = f.read(1)
        f.seek(off + length // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    r = run("verify", v)
    assert r.code == 6, r
    assert "docs/deep/x" in r.out
    assert "snapshot 1" in r.out and "snapshot 2" in r.out
    r = run("verify", v, "--json")
    assert r.code == 6
    assert r.json["ok"] is False and r.json["code"] == 6 and "error" in r.json
    assert any("docs/deep/x" in e and "snapshot 2" in e for e in r.json["errors"])
    assert run("restore", v, "1", v.parent / "out").code == 6


def test_verify_detects_truncated_pack(run, make_volume):
    """A truncated pack file fails verify with exit 6."""
    v = make_volume(BASE)
    snap(run, v)
    pack = next((v / ".volsync" / "packs").glob("*.pack"))
    size = pack.stat().st_size
    os.truncate(pack, size - 7)
    assert run("verify", v).code == 6


def test_verify_detects_missing_snapshot_record(run, make_volume):
    """A deleted snapshot record fails verify (exit 6) naming the snapshot."""
    v = make_volume(BASE)
    snap(run, v)
    s2 = snap(run, v)
    os.unlink(v / ".volsync" / "snapshots" / s2["id"])
    r = run("verify", v, "--json")
    assert r.code == 6, r
    assert any(s2["id"][:12] in e for e in r.json["errors"])


@pytest.mark.parametrize("name", ["state", "config"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_verify_corrupt_metadata(run, make_volume, name, damage):
    """A corrupted state or config file: verify exits 6 with one line and no traceback."""
    v = make_volume(BASE)
    snap(run, v)
    p = v / ".volsync" / name
    data = bytearray(p.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) - 5]
    else:
        data = bytearray(b"this is not a volsync file at all")
    p.write_bytes(bytes(data))
    r = run("verify", v)
    assert r.code == 6, r
    one_error_line(r)
    r = run("verify", v, "--json")
    assert r.code == 6
    assert r.json["code"] == 6 and r.json["error"]


# --- prune ----------------------------------------------------------------------------------

def _fill(v: Path, i: int) -> None:
    (v / f"unique{i}").write_bytes(os.urandom(50_000))


def _unique_snapshots(run, v: Path, count: int) -> Iterator[dict]:
    """Take `count` snapshots, each holding one new 50 KB file in place of the one before (so
    each older snapshot holds blocks no later one has), yielding the tree each captured."""
    for i in range(count):
        _fill(v, i)
        if i:
            (v / f"unique{i - 1}").unlink()
        tree = read_tree(v)
        snap(run, v)
        yield tree


def test_prune_keep_last(run, make_volume, tmp_path):
    """prune --keep-last N drops older lineage snapshots, frees their blocks, and the rest
    still restores and verifies."""
    v = make_volume(BASE)
    trees = list(_unique_snapshots(run, v, 4))
    r = run("prune", v, "--keep-last", "2", "--json")
    assert r.code == 0, r
    assert r.json["removed"] == [1, 2]
    assert r.json["blocks_freed"] > 0 and r.json["bytes_freed"] >= 100_000
    assert [s["number"] for s in listing(run, v)] == [3, 4]
    for n in (3, 4):
        out = tmp_path / f"out{n}"
        assert run("restore", v, str(n), out).code == 0
        assert_same_tree(out, trees[n - 1])
    assert run("restore", v, "1", tmp_path / "gone").code == 1
    r = run("verify", v, "--json")
    assert r.code == 0 and r.json["ok"], r
    assert len(os.listdir(v / ".volsync" / "snapshots")) == 2



def test_the_block_index_through_snapshot_prune_verify(run, make_volume, tmp_path, monkeypatch):
    """With the midx rewritten at every chance: snapshots, prune, restore and verify work
    through it; prune leaves it covering exactly the packs that remain; damage in its
    entries is found by the next command under the lock, which writes it again."""
    from volsync.store import packs as packs_mod
    from volsync.store.blockindex import MIDX_NAME, open_midx

    monkeypatch.setattr(packs_mod, "MIDX_MIN_ENTRIES", 1)
    monkeypatch.setattr(packs_mod, "MIDX_MAX_PACKS", 1)
    v = make_volume(BASE)
    midx_path = v / ".volsync" / "packs" / MIDX_NAME
    trees = []
    for tree in _unique_snapshots(run, v, 3):
        trees.append(tree)
        assert midx_path.exists()
    assert run("prune", v, "--keep-last", "1").code == 0
    with opened(v) as vol:
        midx, problem = open_midx(midx_path, vol.fmt.algo.size)
        assert problem is None and sorted(midx.names) == vol.packs.pack_names()
        midx.close()
    assert run("restore", v, "3", tmp_path / "out").code == 0
    assert_same_tree(tmp_path / "out", trees[2])
    r = run("verify", v, "--json")
    assert r.code == 0 and r.json["ok"], r
    raw = bytearray(midx_path.read_bytes())
    raw[-20] ^= 1  # in the entries: only the file sum shows it
    midx_path.write_bytes(bytes(raw))
    with opened(v) as vol:
        assert "checksum mismatch" in vol.packs.check_midx()
    r = run("verify", v, "--json")  # reads the .idx files, not the midx
    assert r.code == 0 and r.json["ok"], r
    snap(run, v)
    with opened(v) as vol:
        assert vol.packs.check_midx() is None

def test_verify_reads_a_pack_at_a_time_not_every_index_at_once(run, make_volume,
                                                                monkeypatch):
    """With an intact midx, verify checks each pack against its own .idx and looks objects
    up through the midx: it never loads every pack index into memory (that held a Python
    entry per block: gigabytes at millions of blocks). It still finds a record whose bytes
    no longer match its id, and names the file."""
    from volsync.store import packs as packs_mod

    monkeypatch.setattr(packs_mod, "MIDX_MIN_ENTRIES", 1)
    monkeypatch.setattr(packs_mod, "MIDX_MAX_PACKS", 1)
    v = make_volume({"a.bin": os.urandom(300_000), "d": {"b.txt": b"bee" * 5000}})
    first = snap(run, v)["id"]
    _fill(v, 0)
    snap(run, v)
    loads = []
    real = packs_mod.PackStore.load_indexes
    monkeypatch.setattr(packs_mod.PackStore, "load_indexes",
                        lambda self: loads.append(1) or real(self))
    r = run("verify", v, "--json")
    assert r.code == 0 and r.json["ok"] and r.json["blocks_checked"] > 0, r
    assert loads == []
    with opened(v) as vol:
        block = _file_block_ids(vol, first, b"d/b.txt")[0]
        name, off, _ = vol.packs.index()[block]
    pack = v / ".volsync" / "packs" / f"{name}.pack"
    raw = bytearray(pack.read_bytes())
    raw[off] ^= 0xFF
    pack.write_bytes(bytes(raw))
    r = run("verify", v, "--json")
    assert r.code == 6 and not r.json["ok"], r
    assert any(f"block {block.hex()} is corrupt" in e for e in r.json["errors"]), r.json
    assert any("d/b.txt" in e for e in r.json["errors"]), r.json
    assert loads == []


def test_verify_names_an_index_entry_whose_record_is_gone(run, make_volume):
    """A pack cut short under its index: the entries past the cut are named unreadable
    and what needs them damaged (the file, or the listing stored after it), as when every
    index was read at once."""
    v = make_volume({"a.bin": os.urandom(200_000)})
    first = snap(run, v)["id"]
    with opened(v) as vol:
        ids = _file_block_ids(vol, first, b"a.bin")
        name, off, _ = vol.packs.index()[ids[-1]]
    pack = v / ".volsync" / "packs" / f"{name}.pack"
    os.truncate(pack, off)
    r = run("verify", v, "--json")
    assert r.code == 6, r
    assert any(f"block {ids[-1].hex()}: unreadable in pack {name}" in e
               for e in r.json["errors"]), r.json
    assert any("a.bin" in e or "/: directory listing" in e for e in r.json["errors"]), r.json


def test_prune_preserved(run, make_volume, tmp_path):
    """prune --preserved removes preserved snapshots and their blocks; the lineage stays."""
    v = make_volume(BASE)
    t1 = read_tree(v)
    snap(run, v)
    _fill(v, 0)
    snap(run, v)
    _fill(v, 1)
    assert run("revert", v, "1").code == 0
    assert len(listing(run, v)) == 3
    r = run("prune", v, "--preserved", "--json")
    assert r.code == 0, r
    assert len(r.json["preserved_removed"]) == 2
    assert r.json["bytes_freed"] >= 100_000
    rows = listing(run, v)
    assert [(x["number"], x["preserved"]) for x in rows] == [(1, False)]
    out = tmp_path / "out"
    assert run("restore", v, "1", out).code == 0
    assert_same_tree(out, t1)
    assert run("verify", v).code == 0


def test_prune_dry_run(run, make_volume):
    """prune --dry-run lists what would go and removes nothing."""
    v = make_volume(BASE)
    snap(run, v)
    _fill(v, 0)
    snap(run, v)
    r = run("prune", v, "--keep-last", "1", "--dry-run", "--json")
    assert r.code == 0 and r.json["removed"] == [1]
    assert len(listing(run, v)) == 2


@pytest.mark.parametrize("n", ["0", "-1"])
def test_prune_keep_last_zero_refused(run, make_volume, n):
    """prune --keep-last below 1 exits 1 and changes nothing."""
    v = make_volume(BASE)
    snap(run, v)
    r = run("prune", v, "--keep-last", n)
    assert r.code == 1, r
    assert len(listing(run, v)) == 1


# --- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [["snapshot"], ["snapshots"], ["status"], ["diff"], ["verify"],
                                 ["revert", "1"], ["prune", "--keep-last", "1"]])
def test_not_a_volume(run, tmp_path, cmd):
    """Commands on a directory that is not a volume (or does not exist) exit 1, one line."""
    plain = tmp_path / "plain"
    plain.mkdir()
    for target in (plain, tmp_path / "missing"):
        r = run(cmd[0], target, *cmd[1:])
        assert r.code == 1, r
        one_error_line(r)


@pytest.mark.parametrize("name", ["7", "nosuchlabel", "deadbeef", "latest", "abc"])
def test_bad_snap(run, make_volume, tmp_path, name):
    """An unknown SNAP exits 1 (also `latest` with no snapshots)."""
    v = make_volume(BASE)
    if name != "latest":
        snap(run, v)
    for cmd in (["restore", v, name, tmp_path / "o"], ["revert", v, name], ["diff", v, name]):
        r = run(*cmd)
        assert r.code == 1, r
        one_error_line(r)


def test_locked_volume_exit_3_names_pid(run, make_volume):
    """A volume locked by another volsync exits 3 naming the holder's pid; status shows it."""
    v = make_volume(BASE)
    holder = Volume.open(v)
    holder._lock.acquire()
    try:
        r = run("snapshot", v)
        assert r.code == 3, r
        assert str(os.getpid()) in r.err
        one_error_line(r)
        r = run("snapshot", v, "--json")
        assert r.code == 3 and r.json["code"] == 3 and str(os.getpid()) in r.json["error"]
        assert run("status", v, "--json").json["lock_holder"] == os.getpid()
        for cmd in (["revert", v, "latest"], ["prune", v, "--preserved"]):
            assert run(*cmd).code == 3
    finally:
        holder._lock.release()
    assert run("snapshot", v).code == 0


def test_wait_waits_for_lock(run, make_volume):
    """--wait SECONDS waits for the holder to release the lock, then succeeds."""
    v = make_volume(BASE)
    holder = Volume.open(v)
    holder._lock.acquire()
    timer = threading.Timer(0.3, holder._lock.release)
    timer.start()
    try:
        r = run("snapshot", v, "--wait", "30", "--json")
    finally:
        timer.join()
    assert r.code == 0, r
    assert r.json["number"] == 1


def test_json_errors_on_stdout(run, make_volume, tmp_path):
    """With --json, a failure prints one {"error", "code"} object on stdout."""
    r = run("snapshot", tmp_path / "missing", "--json")
    assert r.code == 1
    assert set(r.json) >= {"error", "code"} and r.json["code"] == 1
    assert len(r.out.strip().splitlines()) == 1
    v = make_volume(BASE)
    r = run("revert", v, "9", "--json")
    assert r.code == 1 and r.json["code"] == 1


@pytest.mark.parametrize("args", [["snapshot"], ["bogus-command"], ["init"],
                                  ["prune", "X", "--keep-last", "abc"],
                                  ["snapshot", "X", "--no-such-option"],
                                  ["restore", "X", "1"]])
def test_usage_errors_exit_2(run, args):
    """Malformed command lines are usage errors: exit 2."""
    r = run(*args)
    assert r.code == 2, r
    r = run(*args, "--json")
    assert r.code == 2, r


def test_help_and_version_exit_0(run):
    """--help and --version succeed."""
    assert run("--help").code == 0
    assert run("--version").code == 0
    assert run("snapshot", "--help").code == 0


def test_quiet_prints_nothing(run, make_volume):
    """--quiet prints nothing on success."""
    v = make_volume(BASE)
    r = run("snapshot", v, "--quiet")
    assert r.code == 0 and r.out == ""


def test_installed_program_runs(sh, tmp_path):
    """The real program runs as a subprocess, with the same exit codes."""
    v = tmp_path / "v"
    write_tree(v, BASE)
    assert sh("init", v).code == 0
    r = sh("snapshot", v, "--json")
    assert r.code == 0 and r.json["number"] == 1
    r = sh("snapshot", tmp_path / "nope")
    assert r.code == 1 and "Traceback" not in r.err
    assert sh("nope").code == 2


def test_relative_paths(run, make_volume, tmp_path, monkeypatch):
    """VOL and DIR may be relative paths."""
    v = make_volume(BASE)
    monkeypatch.chdir(tmp_path)
    assert run("snapshot", "vol").code == 0
    assert run("restore", "vol", "1", "out").code == 0
    assert_same_tree(tmp_path / "out", v)


def test_snapshot_unchanged_tree_is_cheap_and_equal(run, make_volume):
    """Two snapshots of an unchanged tree share the same root tree."""
    v = make_volume(BASE)
    a, b = snap(run, v), snap(run, v)
    vol = Volume.open(v)
    assert vol.snapshot(a["id"]).root == vol.snapshot(b["id"]).root


def test_status_text(run, make_volume):
    """status text shows mode, latest and changes."""
    v = make_volume(BASE)
    snap(run, v)
    (v / "zz").write_text("1")
    r = run("status", v)
    assert r.code == 0
    assert "read-write" in r.out and "zz" in r.out


def test_init_on_a_file_refused(run, tmp_path):
    """init on a path that is a regular file exits 1 with one line."""
    f = tmp_path / "file"
    f.write_text("x")
    r = run("init", f)
    assert r.code in (1, 2), r  # click may reject it as a usage error; never a traceback
    assert "Traceback" not in r.err
    assert f.read_text() == "x"


def test_restore_parent_missing_refused(run, make_volume, tmp_path):
    """restore into a DIR whose parent does not exist exits 1."""
    v = make_volume(BASE)
    snap(run, v)
    r = run("restore", v, "1", tmp_path / "no" / "such" / "dir")
    assert r.code == 1, r
    one_error_line(r)


def test_prune_keep_last_beyond_lineage_keeps_all(run, make_volume):
    """prune --keep-last N with N above the lineage length removes nothing."""
    v = make_volume(BASE)
    snap(run, v)
    snap(run, v)
    r = run("prune", v, "--keep-last", "5", "--json")
    assert r.code == 0 and r.json["removed"] == []
    assert [s["number"] for s in listing(run, v)] == [1, 2]


def test_revert_latest_with_live_changes(run, make_volume, tmp_path):
    """revert to latest discards live changes from the live tree but keeps them preserved;
    diff works from a preserved id."""
    v = make_volume(BASE)
    t1 = read_tree(v)
    snap(run, v)
    (v / "a.txt").write_text("edit")
    t_live = read_tree(v)
    r = run("revert", v, "latest", "--json")
    assert r.code == 0 and r.json["live_changes_preserved"] is True
    assert read_tree(v) == t1
    pres = [s for s in listing(run, v) if s["preserved"]]
    assert len(pres) == 1
    assert run("diff", v, pres[0]["id"], "1", "--json").json["modified"] == ["a.txt"]
    out = tmp_path / "out"
    assert run("restore", v, pres[0]["id"], out).code == 0
    assert read_tree(out) == t_live


def test_ambiguous_or_short_id_prefix_refused(run, make_volume, tmp_path):
    """An id prefix shorter than 8 characters is not accepted as SNAP."""
    v = make_volume(BASE)
    s = snap(run, v)
    assert run("restore", v, s["id"][:7], tmp_path / "o").code == 1
    assert run("restore", v, s["id"][:8].upper(), tmp_path / "o2").code == 0


def test_volume_named_through_a_symlink(run, make_volume, tmp_path):
    """Every command works when VOL is a symlink to the volume (e.g. /srv/current); revert
    rewrites the real live tree and leaves no pending journal."""
    v = make_volume(BASE)
    link = tmp_path / "current"
    link.symlink_to(v)
    t1 = read_tree(v)
    assert run("snapshot", link).code == 0
    (v / "a.txt").write_text("edit")
    r = run("revert", link, "1")
    assert r.code == 0, r
    assert link.is_symlink()
    assert read_tree(v) == t1
    assert run("status", link, "--json").json["pending"] is None
    assert run("verify", link).code == 0
    assert run("restore", link, "1", tmp_path / "out").code == 0
    assert read_tree(tmp_path / "out") == t1


def test_directory_removed_during_scan(run, make_volume, monkeypatch, tmp_path):
    """A directory deleted while a snapshot scans the tree does not fail the snapshot; the
    rest of the tree is captured."""
    import shutil

    v = make_volume({"gone": {"sub": {"f": "x"}}, "keep": "k", "z": {"y": "y"}})
    original = vtree.Scanner.scan_subdir

    def vanishing(self, rel, dfd, name):
        if rel == b"gone" and os.path.exists(v / "gone"):
            shutil.rmtree(v / "gone")
        return original(self, rel, dfd, name)

    monkeypatch.setattr(vtree.Scanner, "scan_subdir", vanishing)
    r = run("snapshot", v)
    assert r.code == 0, r
    monkeypatch.undo()
    out = tmp_path / "out"
    assert run("restore", v, "1", out).code == 0
    got = read_tree(out)
    assert got[b"keep"][1] == b"k" and got[b"z/y"][1] == b"y"
    assert not any(k.startswith(b"gone/") for k in got)
    assert run("verify", v).code == 0


def test_symlink_removed_during_scan(run, make_volume, monkeypatch, tmp_path):
    """A symlink deleted between its lstat and its readlink is left out, not a failure."""
    v = make_volume({"l": ("link", "target"), "f": "f"})
    real_readlink = os.readlink

    def vanishing_readlink(path, *a, dir_fd=None, **k):
        if os.fsdecode(path) == "l" and os.path.lexists(v / "l"):
            os.unlink(v / "l")
        return real_readlink(path, *a, dir_fd=dir_fd, **k)

    monkeypatch.setattr(os, "readlink", vanishing_readlink)
    r = run("snapshot", v)
    monkeypatch.undo()
    assert r.code == 0, r
    out = tmp_path / "out"
    assert run("restore", v, "1", out).code == 0
    assert sorted(os.listdir(out)) == ["f"]


def test_prune_gathers_its_live_set_in_eight_bytes_an_object(run, make_volume):
    """prune's live set holds each object's first eight bytes in one sorted array, not a
    Python set of ids (100-odd bytes each: gigabytes at tens of millions of blocks); the walk
    remembers trees and lists, not every block. The set still names every object of every
    snapshot, and the prune that uses it frees only the dead ones."""
    import tracemalloc

    from volsync import ops

    files = {f"d{d}": {f"f{f}": f"{d}/{f} ".encode() * 3 for f in range(200)}
             for d in range(100)}
    v = make_volume(files)
    snap(run, v)
    with opened(v) as vol:
        blocks = sum(1 for _ in vol.packs.index().items())
        cache = vol.load_statcache()  # read whole, as every command reads it: not measured
        vol.load_statcache = lambda: cache
        tracemalloc.start()
        try:
            live = ops.live_objects(vol)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(live) == blocks and blocks > 20_000
        assert all(object_id in live for object_id, _ in vol.packs.index().items())
    assert peak < 40 * blocks + (256 << 10), (peak, blocks)
    (v / "d3" / "f7").unlink()
    snap(run, v)
    r = run("prune", v, "--keep-last", "1", "--json")
    # the file's block, and the old trees of d3 and of the top
    assert r.code == 0 and r.json["blocks_freed"] == 3, r
    assert run("verify", v).code == 0
