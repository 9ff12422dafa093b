"""Interrupted runs as later commands see them: the journal's undo/redo, temp leftovers in
the live tree, dry runs over a pending step, and unreadable pack indexes under verify."""

from __future__ import annotations

import os

from helpers import content, make_volume, ok, okj, status, sub, verify_clean, write

CRASHED = 137


def crash(point: str, *args) -> None:
    r = sub(*args, env_extra={"VOLSYNC_CRASH_AT": point})
    assert r.code == CRASHED, r


def test_temp_leftover_stays_in_volsync_tmp_then_is_removed(tmp_path):
    # a live-tree write killed between writing a temp file and renaming it leaves the temp in
    # .volsync/tmp/ only (never in the live tree); the next command empties it
    a = make_volume(tmp_path / "A", {"f": "one", "big": os.urandom(300_000)})
    ok("transfer", a, tmp_path / "B")
    write(a, {"g": "new file", "big": os.urandom(300_000)})
    crash("live-temp-written:1", "transfer", a, tmp_path / "B")
    b = tmp_path / "B"
    assert os.listdir(b / ".volsync" / "tmp"), "the crash point is after a temp-file write"
    assert all("tmp" not in p for p in status(b)["changed_paths"])
    ok("transfer", a, b)
    assert not os.listdir(b / ".volsync" / "tmp")
    assert content(b) == content(a)
    verify_clean(b)


def test_dry_run_after_crashed_baseline_matches_the_run(tmp_path):
    # a baseline transfer killed after DST was created: the dry run gives the verdict and the
    # plan the real run then carries out
    a = make_volume(tmp_path / "A", {f"f{i}": os.urandom(20_000) for i in range(8)})
    crash("live-entry-written:3", "transfer", a, tmp_path / "B")
    plan = okj("transfer", a, tmp_path / "B", "--dry-run")
    done = okj("transfer", a, tmp_path / "B")
    for key in ("common", "added", "removed", "preserved"):
        assert plan[key] == done[key], key
    assert content(tmp_path / "B") == content(a)


def test_dry_run_after_crashed_resync_matches_the_run(tmp_path):
    # resync killed while writing DST's live tree: DST's live changes are already preserved,
    # so the dry run must not count them again
    a = make_volume(tmp_path / "A", {"f": "one", "g": os.urandom(100_000)})
    b = tmp_path / "B"
    ok("transfer", a, b)
    ok("break", b)
    write(b, {"h": "written on B"})
    write(a, {"f": "changed on A", "g": os.urandom(100_000)})
    crash("live-entry-written:1", "resync", a, b, "--force")
    plan = okj("resync", a, b, "--dry-run")
    done = okj("resync", a, b, "--force")
    for key in ("common", "added", "removed", "preserved"):
        assert plan[key] == done[key], key
    assert content(b) == content(a)
    verify_clean(b)


def test_unreadable_index_named_and_repaired(tmp_path):
    # a corrupt .idx file is named by verify; --repair-from rewrites its pack and exits 0
    a = make_volume(tmp_path / "A", {f"f{i}": os.urandom(50_000) for i in range(3)})
    b = tmp_path / "B"
    ok("transfer", a, b)
    idx = sorted((b / ".volsync" / "packs").glob("*.idx"))[0]
    data = bytearray(idx.read_bytes())
    data[30] ^= 0xFF
    idx.write_bytes(bytes(data))
    r = sub("verify", b, "--json")
    assert r.code == 6 and any(idx.name in e for e in r.json["errors"]), r
    r = sub("verify", b, "--repair-from", a, "--json")
    assert r.code == 0 and r.json["ok"], r
    assert not idx.exists()
    verify_clean(b)
    assert content(b) == content(a)


def test_an_empty_volsync_dir_is_an_interrupted_create(tmp_path):
    """Killed (or the power lost) between `.volsync/`'s mkdir and its marker's creation, a
    create leaves an empty `.volsync/`: it is an interrupted init, not a damaged volume, so
    rerunning the transfer to a new mirror, or the init, finishes the work."""
    a = make_volume(tmp_path / "A", {"f": b"data"})
    ok("snapshot", a)
    b = tmp_path / "B"
    (b / ".volsync").mkdir(parents=True)
    r = sub("status", b)
    assert r.code != 0 and "interrupted 'volsync init'" in r.err, r
    ok("transfer", a, b)
    assert content(b) == content(a)
    verify_clean(b)
    c = tmp_path / "C"
    (c / ".volsync").mkdir(parents=True)
    ok("init", c)
    verify_clean(c)
