"""Crash safety: kill snapshot, revert and prune at chosen durable steps (VOLSYNC_CRASH_AT)
or at random moments (SIGKILL); the volume must verify, a rerun must complete, and the trees
must be right."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_tree, write_tree

CRASHED = 137


def crash(sh, spec: str, *args):
    """Run the real program with a crash point armed."""
    return sh(*args, env={"VOLSYNC_CRASH_AT": spec})


def lineage_numbers(run, v) -> list[int]:
    r = run("snapshots", v, "--json")
    assert r.code == 0, r
    return [s["number"] for s in r.json["snapshots"]]


def all_snapshots(run, v) -> list[dict]:
    r = run("snapshots", v, "--all", "--json")
    assert r.code == 0, r
    return r.json["snapshots"]


def assert_restores(run, v, snap: str, expected: dict, tmp_path: Path) -> None:
    out = tmp_path / f"restore-{snap}-{len(os.listdir(tmp_path))}"
    r = run("restore", v, snap, out)
    assert r.code == 0, r
    assert read_tree(out, mtimes=True) == expected


def assert_clean_store(v: Path) -> None:
    """No crash leftovers once a writer has run: no temp files, every pack indexed."""
    meta = v / ".volsync"
    for d in (meta, meta / "packs", meta / "snapshots"):
        assert not [n for n in os.listdir(d) if n.startswith(".tmp-")], d
    packs = {p.stem for p in (meta / "packs").glob("*.pack")}
    idxs = {p.stem for p in (meta / "packs").glob("*.idx")}
    assert packs == idxs
    assert not [n for n in os.listdir(v) if n.startswith(".volsync.tmp")]


def assert_verify_ok(run, v) -> None:
    r = run("verify", v, "--json")
    assert r.code == 0, r
    assert r.json["ok"] is True


def tree_a() -> dict:
    return {
        "f1": b"one" * 1000,
        "big": bytes(range(256)) * 2000,
        "d": {"x": "x", "sub": {"y": b"y" * 70_000}, "l": ("link", "../f1")},
        "empty": {},
    }


def edit_to_b(v: Path) -> None:
    (v / "f1").write_bytes(b"changed one" * 500)
    with open(v / "big", "r+b") as f:
        f.seek(100_000)
        f.write(b"Z" * 5000)
    (v / "d" / "x").unlink()
    write_tree(v, {"newdir": {"n1": os.urandom(100_000), "n2": "n2"}, "added": "added"})
    os.symlink("/etc/passwd", v / "d" / "pw")


def edit_to_live(v: Path) -> None:
    (v / "added").write_text("live edit")
    (v / "newdir" / "n2").unlink()
    write_tree(v, {"live-only": os.urandom(30_000)})


# --- snapshot -------------------------------------------------------------------------------

SNAPSHOT_POINTS = [
    "pack-data-durable:1", "pack-index-committed:1",
    "atomic-write-before-rename:1", "atomic-write-before-rename:2",
    "atomic-write-before-rename:3", "atomic-write-before-rename:4",
    "snapshot-record-written:1", "state-committed:1",
]


@pytest.mark.parametrize("point", SNAPSHOT_POINTS)
def test_snapshot_crash_at_point(run, sh, make_volume, tmp_path, point):
    """A snapshot killed at a durable step leaves a volume that verifies; rerunning snapshot
    completes and the latest snapshot restores to the live tree."""
    v = make_volume(tree_a())
    t_a = read_tree(v, mtimes=True)
    assert run("snapshot", v).code == 0
    edit_to_b(v)
    t_b = read_tree(v, mtimes=True)
    r = crash(sh, point, "snapshot", v)
    if point.endswith(":1"):
        assert r.code == CRASHED, r  # the first passage of each point is always reached
    else:
        assert r.code in (0, CRASHED), r
    assert_verify_ok(run, v)
    before = lineage_numbers(run, v)
    assert before in ([1], [1, 2])
    r = run("snapshot", v, "--json")
    assert r.code == 0, r
    assert lineage_numbers(run, v) == before + [before[-1] + 1]
    assert_restores(run, v, "latest", t_b, tmp_path)
    assert_restores(run, v, "1", t_a, tmp_path)
    assert_verify_ok(run, v)
    assert_clean_store(v)
    assert read_tree(v, mtimes=True) == t_b  # a crashed snapshot never touches the live tree


def test_first_snapshot_crash(run, sh, make_volume, tmp_path):
    """A crash during a volume's very first snapshot leaves an empty, valid lineage."""
    v = make_volume(tree_a())
    t_a = read_tree(v, mtimes=True)
    for point in ("pack-index-committed:1", "snapshot-record-written:1"):
        r = crash(sh, point, "snapshot", v)
        assert r.code == CRASHED, r
        assert_verify_ok(run, v)
        assert lineage_numbers(run, v) == []
    assert run("snapshot", v).code == 0
    assert lineage_numbers(run, v) == [1]
    assert_restores(run, v, "1", t_a, tmp_path)


def _big_tree(v: Path, rng: random.Random) -> None:
    spec = {}
    for d in range(8):
        spec[f"dir{d}"] = {f"file{i}": rng.randbytes(rng.choice([0, 100, 5000, 40_000, 200_000]))
                           for i in range(40)}
    write_tree(v, spec)


def _churn(v: Path, rng: random.Random, round_: int) -> None:
    for _ in range(30):
        d = v / f"dir{rng.randrange(8)}"
        name = d / f"file{rng.randrange(60)}"
        if name.exists() and rng.random() < 0.3:
            name.unlink()
        else:
            name.write_bytes(rng.randbytes(rng.choice([10, 3000, 70_000])))
    write_tree(v, {f"round{round_}": {"r": rng.randbytes(150_000)}})


def test_snapshot_sigkill_at_random_moments(run, make_volume, tmp_path):
    """A snapshot of a bigger tree SIGKILLed at random moments: every time the volume verifies
    and keeps its lineage; the final rerun captures the live tree exactly."""
    rng = random.Random(20240611)
    v = make_volume()
    _big_tree(v, rng)
    assert run("snapshot", v).code == 0
    env = {k: val for k, val in os.environ.items() if k != "VOLSYNC_CRASH_AT"}
    for round_ in range(5):
        _churn(v, rng, round_)
        before = lineage_numbers(run, v)
        proc = subprocess.Popen([sys.executable, "-m", "volsync", "snapshot", str(v)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stderr.close()
        assert_verify_ok(run, v)
        after = lineage_numbers(run, v)
        assert after in (before, before + [before[-1] + 1])  # all or nothing
        if after != before:  # it finished before the kill: the new snapshot is whole
            assert_restores(run, v, "latest", read_tree(v, mtimes=True), tmp_path)
    t_live = read_tree(v, mtimes=True)
    assert run("snapshot", v).code == 0
    assert_restores(run, v, "latest", t_live, tmp_path)
    assert_verify_ok(run, v)
    assert_clean_store(v)


# --- revert ---------------------------------------------------------------------------------

def _revert_setup(run, make_volume):
    v = make_volume(tree_a())
    t_a = read_tree(v, mtimes=True)
    assert run("snapshot", v).code == 0
    edit_to_b(v)
    t_b = read_tree(v, mtimes=True)
    s2 = run("snapshot", v, "--json").json
    edit_to_live(v)
    t_live = read_tree(v, mtimes=True)
    return v, t_a, t_b, s2, t_live


REVERT_POINTS = [
    "snapshot-record-written:1", "state-committed:1", "state-committed:2",
    "live-entry-written:1", "live-entry-written:2", "live-entry-written:3",
    "live-entry-written:5", "live-entry-written:7",
    "atomic-write-before-rename:1", "atomic-write-before-rename:3",
    "atomic-write-before-rename:5", "atomic-write-before-rename:6",
]


@pytest.mark.parametrize("point", REVERT_POINTS)
def test_revert_crash_at_point(run, sh, make_volume, tmp_path, point):
    """A revert killed at any step: verify passes (finishing the journalled rewrite), a rerun
    completes, the live tree is the target, and the later snapshot and the live changes are
    preserved exactly once and restore correctly."""
    v, t_a, t_b, s2, t_live = _revert_setup(run, make_volume)
    r = crash(sh, point, "revert", v, "1")
    assert r.code in (0, CRASHED), r
    if point.startswith(("live-entry-written:1", "state-committed:1", "snapshot-record")):
        assert r.code == CRASHED, r
    assert_verify_ok(run, v)
    r = run("revert", v, "1")
    assert r.code == 0, r
    assert read_tree(v, mtimes=True) == t_a
    assert lineage_numbers(run, v) == [1]
    preserved = [s for s in all_snapshots(run, v) if s["preserved"]]
    assert len(preserved) == 2, preserved
    assert preserved[0]["id"] == s2["id"]
    assert_restores(run, v, s2["id"], t_b, tmp_path)
    assert_restores(run, v, preserved[1]["id"], t_live, tmp_path)
    assert run("status", v, "--json").json["changed_paths"] == []
    assert_verify_ok(run, v)
    assert_clean_store(v)


def test_revert_crash_then_other_command_finishes_it(run, sh, make_volume, tmp_path):
    """After a revert killed mid-rewrite, the next locking command (snapshot) first finishes
    the rewrite, so the new snapshot holds the reverted tree."""
    v, t_a, _, _, _ = _revert_setup(run, make_volume)
    r = crash(sh, "live-entry-written:2", "revert", v, "1")
    assert r.code == CRASHED, r
    assert run("status", v, "--json").json["pending"] == "materialize"
    r = run("snapshot", v, "--json")
    assert r.code == 0, r
    assert r.json["number"] == 2
    assert read_tree(v, mtimes=True) == t_a
    assert_restores(run, v, "2", t_a, tmp_path)
    assert run("status", v, "--json").json["pending"] is None


# --- prune ----------------------------------------------------------------------------------

def _prune_setup(run, make_volume):
    v = make_volume(tree_a())
    trees = {}
    for n in range(1, 5):
        write_tree(v, {f"u{n}": os.urandom(80_000)})
        if n > 1:
            (v / f"u{n - 1}").unlink()
        trees[n] = read_tree(v, mtimes=True)
        assert run("snapshot", v).code == 0
    write_tree(v, {"live": os.urandom(10_000)})
    assert run("revert", v, "4").code == 0  # one preserved snapshot (live changes)
    return v, trees


PRUNE_POINTS = [
    "state-committed:1", "pack-data-durable:1", "pack-index-committed:1",
    "pack-index-dropped:1", "atomic-write-before-rename:1", "atomic-write-before-rename:2",
]


@pytest.mark.parametrize("point", PRUNE_POINTS)
def test_prune_crash_at_point(run, sh, make_volume, tmp_path, point):
    """A prune killed at any step: verify passes, a rerun completes, the kept snapshots
    restore, and the garbage is freed in the end."""
    v, trees = _prune_setup(run, make_volume)
    size_before = sum(p.stat().st_size for p in (v / ".volsync" / "packs").glob("*.pack"))
    r = crash(sh, point, "prune", v, "--keep-last", "2", "--preserved")
    assert r.code in (0, CRASHED), r
    if point.endswith(":1"):
        assert r.code == CRASHED, r
    assert_verify_ok(run, v)
    numbers = lineage_numbers(run, v)
    assert numbers in ([1, 2, 3, 4], [3, 4])
    for n in numbers:
        assert_restores(run, v, str(n), trees[n], tmp_path)
    r = run("prune", v, "--keep-last", "2", "--preserved")
    assert r.code == 0, r
    assert lineage_numbers(run, v) == [3, 4]
    assert [s for s in all_snapshots(run, v) if s["preserved"]] == []
    for n in (3, 4):
        assert_restores(run, v, str(n), trees[n], tmp_path)
    assert_verify_ok(run, v)
    assert_clean_store(v)
    size_after = sum(p.stat().st_size for p in (v / ".volsync" / "packs").glob("*.pack"))
    assert size_after < size_before - 150_000
    assert read_tree(v, mtimes=True) == trees[4]
