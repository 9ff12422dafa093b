"""Mirroring through the command line: transfer, break, resync, role-swap and their refusals,
each as a small scenario checked against the contract (docs/contract.md)."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest
from helpers import (
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


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


FILES = {"a.txt": "alpha\n", "dir/b.bin": rnd(10_000, 1), "dir/sub/c": "c" * 100,
         "empty": b""}


def src_volume(tmp_path: Path, files=None, name: str = "A") -> Path:
    a = make_volume(tmp_path / name, FILES if files is None else files)
    os.symlink("dir/b.bin", a / "link")
    return a


@pytest.fixture
def pair(tmp_path):
    """A read-write volume A with a few files and its mirror B after one transfer."""
    a = src_volume(tmp_path)
    ok("transfer", a, tmp_path / "B")
    return a, tmp_path / "B"


def plan_of(d: dict) -> dict:
    return {k: d[k] for k in PLAN_KEYS}


# --- baseline ------------------------------------------------------------------------------------


@pytest.mark.parametrize("precreate", [False, True], ids=["missing-dir", "empty-dir"])
def test_baseline_transfer_creates_read_only_mirror(tmp_path, capsys, precreate):
    """transfer into a missing or empty directory creates a read-only mirror, upstream SRC,
    whose live tree equals SRC's and whose lineage is SRC's (same numbers and ids)."""
    a = src_volume(tmp_path)
    b = tmp_path / "B"
    if precreate:
        b.mkdir()
    res = okj("transfer", a, b, capsys=capsys)
    assert res["common"] is None and res["added"] == [1] and res["removed"] == []
    assert res["preserved"] == [] and res["blocks_sent"] >= 3 and res["bytes_sent"] > 10_000
    st = status(b)
    assert st["mode"] == "read-only" and st["upstream"] == str(a) and st["latest"] == 1
    assert st["changed_paths"] == []
    assert content(b) == content(a)
    assert lineage(b) == lineage(a) and len(lineage(a)) == 1
    verify_clean(b)


def test_baseline_transfer_subprocess_relative_paths(tmp_path):
    """A real `volsync transfer` with relative paths makes the mirror; status names SRC."""
    src_volume(tmp_path)
    r = sub("transfer", "A", "mirror/B", "--mkpath", "--json", cwd=tmp_path)  # mirror/ is new
    assert r.code == 0, r.err
    assert r.json["added"] == [1]
    st = sub("status", "mirror/B", "--json", cwd=tmp_path)
    assert st.json["upstream"] == str(tmp_path / "A") and st.json["mode"] == "read-only"
    assert content(tmp_path / "mirror/B") == content(tmp_path / "A")


def test_baseline_refuses_src_without_snapshots_and_no_snapshot(tmp_path):
    """transfer --no-snapshot from a volume with no snapshot has nothing to send (exit 1),
    and leaves no mirror behind."""
    a = src_volume(tmp_path)
    r = vs("transfer", a, tmp_path / "B", "--no-snapshot")
    assert r.code == 1
    assert lineage(a) == []


# --- incremental ---------------------------------------------------------------------------------


def test_incremental_transfer_sends_only_changed_blocks(tmp_path, capsys):
    """After a one-block change in a large file, only that block (and trees) is sent."""
    big = bytearray(rnd(64 * 4096, 7))
    a = make_volume(tmp_path / "A", {"big": bytes(big), "small": "s"})
    b = tmp_path / "B"
    first = okj("transfer", a, b, capsys=capsys)
    assert first["blocks_sent"] == 65
    big[10 * 4096 + 5] ^= 0xFF
    write(a, {"big": bytes(big)})
    res = okj("transfer", a, b, capsys=capsys)
    assert set(PLAN_KEYS) <= set(res)
    assert res["common"] == 1 and res["added"] == [2] and res["removed"] == []
    assert res["preserved"] == []
    assert res["blocks_sent"] == 1
    assert 4096 <= res["bytes_sent"] < first["bytes_sent"] // 20
    assert content(b) == content(a)
    assert [n for n, _ in lineage(b)] == [1, 2] and lineage(b) == lineage(a)


def test_no_change_transfer_sends_nothing(pair, capsys):
    """A transfer with nothing new adds no snapshot and sends 0 blocks and 0 bytes."""
    a, b = pair
    before = fingerprint(b), lineage(a), Volume.open(b).state()
    res = okj("transfer", a, b, capsys=capsys)
    assert res["added"] == [] and res["common"] == 1
    assert res["blocks_sent"] == 0 and res["bytes_sent"] == 0
    # only the time of the last update changes (status reports it)
    after = Volume.open(b).state()
    assert after.extra["last_update"]["time"] > before[2].extra["last_update"]["time"]
    assert (after.with_(extra={}), lineage(a)) == (before[2].with_(extra={}), before[1])
    assert {k for k in after.extra if k != "last_update"} == set()
    assert content(b) == before[0][1]


def _statcache_stat(vol: Path) -> tuple[int, int]:
    st = os.stat(Path(vol) / ".volsync" / "statcache")
    return st.st_ino, st.st_mtime_ns


def test_no_change_transfer_leaves_the_stat_caches_alone(pair, capsys):
    """Nothing changed: neither volume's stat cache is rewritten (no write, no fsync), yet
    DST records the time of its last update."""
    a, b = pair
    time.sleep(0.1)  # past the racy window: the next scan's keys are all trusted
    okj("transfer", a, b, capsys=capsys)
    caches = _statcache_stat(a), _statcache_stat(b)
    updated = Volume.open(b).state().extra["last_update"]["time"]
    res = okj("transfer", a, b, capsys=capsys)
    assert res["added"] == [] and res["blocks_sent"] == 0
    assert (_statcache_stat(a), _statcache_stat(b)) == caches
    assert Volume.open(b).state().extra["last_update"]["time"] > updated


def test_transfer_no_snapshot_sends_latest_only(pair, tmp_path):
    """--no-snapshot leaves SRC's live changes out: DST gets SRC's latest snapshot only."""
    a, b = pair
    write(a, {"a.txt": "changed\n", "new": "n"})
    snap(a)  # 2
    write(a, {"a.txt": "unsnapshotted\n"})
    res = okj("transfer", a, b, "--no-snapshot")
    assert res["added"] == [2] and res["src_snapshot"] is None
    assert [n for n, _ in lineage(a)] == [1, 2]
    assert (b / "a.txt").read_text() == "changed\n"
    assert content(b) == restored(a, "2", tmp_path / "r2")


def test_transfer_snapshots_src_live_changes_first(pair):
    """Without --no-snapshot, SRC's live changes become its next snapshot, then are sent."""
    a, b = pair
    write(a, {"dir/sub/c": None, "x": "x"})
    res = okj("transfer", a, b)
    assert res["src_snapshot"] == 2 and res["added"] == [2]
    assert content(b) == content(a) and lineage(a) == lineage(b)


# --- refusals: exit 5 and 4 ---------------------------------------------------------------------


def refuse(code: int, *args) -> dict:
    """Run with --json expecting `code`; the JSON error object names it."""
    r = vs(*args, "--json")
    assert r.code == code, f"{args}: {r.code} {r.out} {r.err}"
    assert r.json["code"] == code and r.json["error"]
    assert r.err.startswith("volsync: error:") and "Traceback" not in r.err
    return r.json


def test_transfer_refuses_read_write_dst(pair):
    """transfer into a read-write volume (a broken-off mirror) exits 5 and changes nothing."""
    a, b = pair
    ok("break", b)
    write(a, {"a.txt": "more\n"})
    before = fingerprint(a), fingerprint(b)
    refuse(5, "transfer", a, b)
    assert (fingerprint(a), fingerprint(b)) == before


def test_transfer_refuses_modified_mirror(pair):
    """transfer refuses (exit 5) when the mirror's live tree was written to; nothing changes,
    and SRC's live changes are not snapshotted either."""
    a, b = pair
    write(b, {"dir/sub/c": "tampered"})
    write(a, {"a.txt": "more\n"})
    before = fingerprint(a), fingerprint(b)
    refuse(5, "transfer", a, b)
    assert (fingerprint(a), fingerprint(b)) == before
    assert status(b)["changed_paths"] == ["dir/sub/c"]


def test_transfer_refuses_dst_with_snapshots_src_lacks(pair):
    """DST has a snapshot after the common one that SRC lacks (SRC reverted and went on):
    exit 5 naming common, src_only and dst_only; nothing changes."""
    a, b = pair
    write(a, {"a.txt": "two\n"})
    ok("transfer", a, b)  # B: 1 2
    ok("revert", a, "1")
    write(a, {"a.txt": "two-prime\n"})
    snap(a)  # A: 1 2'
    before = fingerprint(a), fingerprint(b)
    err = refuse(5, "transfer", a, b)
    assert (err["common"], err["src_only"], err["dst_only"]) == (1, [2], [2])
    assert "resync" in err["error"]
    assert (fingerprint(a), fingerprint(b)) == before


def test_transfer_refusal_subprocess(pair):
    """A real subprocess reports the refusal with exit 5 and one line on stderr."""
    a, b = pair
    write(b, {"new-on-mirror": "x"})
    r = sub("transfer", a, b)
    assert r.code == 5 and r.out == ""
    assert r.err.count("\n") == 1 and "resync" in r.err


def test_no_common_snapshot_exit_4(pair, tmp_path):
    """Two unrelated volumes: transfer into a non-empty mirror of another volume exits 4."""
    a, _b = pair
    x = make_volume(tmp_path / "X", {"x": "x"})
    c = tmp_path / "C"
    ok("transfer", x, c)
    before = fingerprint(c)
    refuse(4, "transfer", a, c)
    refuse(4, "resync", a, c)
    assert fingerprint(c) == before


def test_no_common_snapshot_non_volume_dir_exit_4(pair, tmp_path):
    """A non-empty directory that is not a volume is never overwritten: exit 4, untouched."""
    a, _ = pair
    d = tmp_path / "D"
    write(d, {"precious": "data"})
    before = content(d)
    refuse(4, "transfer", a, d)
    refuse(4, "resync", a, d)
    assert content(d) == before and not (d / ".volsync").exists()


def test_no_common_snapshot_wins_over_diverged(pair, tmp_path):
    """DST is read-write, modified and has its own snapshots, and shares no snapshot with
    SRC: exit 4, not 5."""
    a, _ = pair
    c = make_volume(tmp_path / "C", {"c": "c"})
    snap(c)
    write(c, {"c": "changed"})
    before = fingerprint(c)
    refuse(4, "transfer", a, c)
    assert fingerprint(c) == before


def test_no_common_snapshot_wins_for_fresh_volume_with_files(pair, tmp_path):
    """A just-initialised read-write volume holding files shares no snapshot with SRC and is
    not empty: exit 4 (which wins over the read-write refusal), for the run and the dry run."""
    a, _ = pair
    c = make_volume(tmp_path / "C", {"c": "mine"})
    before = fingerprint(c)
    for cmd in ("transfer", "resync"):
        refuse(4, cmd, a, c)
        refuse(4, cmd, a, c, "--dry-run")
    assert fingerprint(c) == before
    assert (c / "c").read_text() == "mine"


# --- cascade and fan-out -------------------------------------------------------------------------


def test_cascade_a_to_b_to_c(tmp_path):
    """A->B then B->C: read-only B is never snapshotted; C ends equal to A with A's lineage."""
    a = src_volume(tmp_path)
    b, c = tmp_path / "B", tmp_path / "C"
    ok("transfer", a, b)
    r = okj("transfer", b, c)
    assert r["src_snapshot"] is None and r["added"] == [1]
    for i in range(2):
        write(a, {"a.txt": f"round {i}\n", f"f{i}": rnd(5000, i)})
        ok("transfer", a, b)
        r = okj("transfer", b, c)
        assert r["src_snapshot"] is None and r["added"] == [i + 2]
    assert lineage(a) == lineage(b) == lineage(c)
    assert content(a) == content(b) == content(c)
    assert status(c)["upstream"] == str(b) and status(c)["mode"] == "read-only"
    r = okj("transfer", b, c)  # nothing new: B still not snapshotted
    assert r["added"] == [] and lineage(b) == lineage(a)


def test_fan_out_a_to_b_and_c(tmp_path):
    """A->B and A->C: both mirrors track A; the second transfer takes no new snapshot."""
    a = src_volume(tmp_path)
    b, c = tmp_path / "B", tmp_path / "C"
    ok("transfer", a, b)
    ok("transfer", a, c)
    write(a, {"dir/b.bin": rnd(10_000, 2)})
    assert okj("transfer", a, b)["added"] == [2]
    r = okj("transfer", a, c)
    assert r["src_snapshot"] is None and r["added"] == [2] and r["common"] == 1
    assert content(b) == content(c) == content(a)
    assert lineage(b) == lineage(c) == lineage(a)


# --- break ----------------------------------------------------------------------------------------


def test_break_makes_mirror_read_write_keeping_snapshots(pair):
    """break: the mirror becomes read-write at once with its snapshots and live tree."""
    a, b = pair
    before_lineage, before_content = lineage(b), content(b)
    r = okj("break", b)
    assert r["mode"] == "read-write" and r["former_upstream"] == str(a)
    st = status(b)
    assert st["mode"] == "read-write" and st["upstream"] is None
    assert lineage(b) == before_lineage and content(b) == before_content
    write(b, {"written-after-failover": "w"})
    assert snap(b)["number"] == 2
    assert okj("break", b)["already_done"]  # a rerun: already read-write, exit 0


# --- resync ----------------------------------------------------------------------------------------


def diverge(a: Path, b: Path, tmp_path: Path):
    """A->B at 1; A takes 2 3; B is broken off and takes 2' 3' plus live changes. Returns the
    content of B's 2', 3' and live tree, by snapshot id (live: None)."""
    write(a, {"a.txt": "A2\n"})
    snap(a)
    write(a, {"dir/b.bin": rnd(10_000, 3)})
    snap(a)
    ok("break", b)
    kept = {}
    write(b, {"a.txt": "B2\n", "b-only": "bo"})
    kept[snap(b)["id"]] = content(b)
    write(b, {"dir/sub/c": None})
    kept[snap(b)["id"]] = content(b)
    write(b, {"live-only": "unsnapshotted"})
    kept[None] = content(b)
    return kept


def test_resync_after_divergence_preserves_dst_work(pair, tmp_path):
    """resync A B: B's own snapshots and live changes become preserved snapshots restorable
    with their old content; B ends a read-only mirror equal to A's latest."""
    a, b = pair
    kept = diverge(a, b, tmp_path)
    res = okj("resync", a, b, "--force")
    assert (res["common"], res["added"], res["removed"]) == (1, [2, 3], [2, 3])
    assert res["preserved"] == [2, 3, 4]
    st = status(b)
    assert st["mode"] == "read-only" and st["upstream"] == str(a) and st["changed_paths"] == []
    assert lineage(b) == lineage(a) and content(b) == content(a)
    pres = preserved(b)
    assert [n for n, _ in pres] == [2, 3, 4]
    live_id = pres[-1][1]
    for i, (_, sid) in enumerate(pres):
        want = kept[sid] if sid in kept else kept[None]
        assert sid in kept or sid == live_id
        assert restored(b, sid, tmp_path / f"r{i}") == want
    verify_clean(b)
    # and it is a working mirror again
    write(a, {"after": "resync"})
    assert okj("transfer", a, b)["added"] == [4]
    assert content(b) == content(a)


def test_resync_without_divergence_is_a_transfer(pair):
    """resync of a mirror that is merely behind just adds SRC's snapshots, preserving none."""
    a, b = pair
    write(a, {"n": "n"})
    res = okj("resync", a, b)
    assert (res["common"], res["added"], res["removed"], res["preserved"]) == (1, [2], [], [])
    assert content(b) == content(a) and preserved(b) == []


def test_reverse_resync_carries_failover_writes_back(pair, tmp_path):
    """After `break B`, `resync B A` carries B's writes to A; A's own late writes are kept as
    preserved snapshots; then `role-swap B A` hands the read-write role back to A."""
    a, b = pair
    ok("break", b)
    write(b, {"failover-write": "fw", "a.txt": "from B\n"})
    snap(b)
    write(b, {"more": "m"})  # live, snapshotted by the resync itself
    write(a, {"late-on-a": "lost?"})  # A's write that never reached B
    a_live = content(a)
    res = okj("resync", b, a, "--force")
    assert res["common"] == 1 and res["added"] == [2, 3] and res["preserved"] == [2]
    assert content(a) == content(b)
    st = status(a)
    assert st["mode"] == "read-only" and st["upstream"] == str(b)
    assert lineage(a) == lineage(b)
    (_, late_id), = preserved(a)
    assert restored(a, late_id, tmp_path / "late") == a_live
    okj("role-swap", b, a)
    assert status(a)["mode"] == "read-write" and status(b)["mode"] == "read-only"
    assert status(b)["upstream"] == str(a)
    write(a, {"back-home": "1"})
    ok("transfer", a, b)
    assert content(a) == content(b)
    verify_clean(a)
    verify_clean(b)


# --- role-swap --------------------------------------------------------------------------------------


def test_role_swap_hands_over_with_nothing_lost(pair, tmp_path):
    """role-swap A B: A's last changes are snapshotted and sent; B read-write, A a mirror of
    B; the --link symlink points at B; a rerun is a no-op."""
    a, b = pair
    link = tmp_path / "current"
    os.symlink(a, link)
    write(a, {"last-minute": "x", "a.txt": "final\n"})
    a_content = content(a)
    res = okj("role-swap", a, b, "--link", link)
    assert res["added"] == [2] and res["src_snapshot"] == 2 and not res["already_done"]
    assert content(b) == a_content == content(a)
    sa, sb = status(a), status(b)
    assert sb["mode"] == "read-write" and sb["upstream"] is None
    assert sa["mode"] == "read-only" and sa["upstream"] == str(b)
    assert os.readlink(link) == str(b)
    assert lineage(a) == lineage(b)
    before = fingerprint(a), fingerprint(b), os.readlink(link)
    again = okj("role-swap", a, b, "--link", link)
    assert again["already_done"]
    assert (fingerprint(a), fingerprint(b), os.readlink(link)) == before
    # the new direction works
    write(b, {"on-b": "b"})
    ok("transfer", b, a)
    assert content(a) == content(b)
    verify_clean(a)


def test_role_swap_refusals_change_nothing(pair, tmp_path):
    """role-swap refuses: A not read-write (1), B read-write (5), B not A's mirror (1), a
    --link that is not a symlink (1), A == B (1); none of them changes anything."""
    a, b = pair
    x = make_volume(tmp_path / "X", {"x": "x"})
    c = tmp_path / "C"
    ok("transfer", x, c)
    regular = tmp_path / "regular-file"
    regular.write_text("not a link")
    write(a, {"pending": "p"})
    vols = (a, b, c, x)
    before = [fingerprint(v) for v in vols]
    refuse(1, "role-swap", c, a)  # C is a mirror (of X), not a source
    refuse(1, "role-swap", a, c)  # C mirrors X, not A
    refuse(1, "role-swap", a, b, "--link", regular)
    refuse(1, "role-swap", a, a)
    assert [fingerprint(v) for v in vols] == before
    assert regular.read_text() == "not a link"
    snap(a)
    before = [fingerprint(v) for v in vols]
    refuse(1, "role-swap", b, a)  # B is a mirror that is behind A, not a source
    assert [fingerprint(v) for v in vols] == before
    ok("break", b)
    before = [fingerprint(v) for v in vols]
    refuse(5, "role-swap", a, b)  # both read-write
    assert [fingerprint(v) for v in vols] == before


def test_role_swap_in_the_direction_already_in_place_is_a_no_op(pair):
    """role-swap B A when A already is read-write with up-to-date mirror B: already done,
    nothing changes."""
    a, b = pair
    before = fingerprint(a), fingerprint(b)
    assert okj("role-swap", b, a)["already_done"]
    assert (fingerprint(a), fingerprint(b)) == before


# --- dry runs ---------------------------------------------------------------------------------------


def assert_dry_then_real(args: list, vols: list[Path]) -> tuple[dict, dict]:
    """The dry run changes nothing and prints the plan that the real run then reports."""
    before = [fingerprint(v) if v.exists() else None for v in vols]
    dry = okj(*args, "--dry-run")
    assert [fingerprint(v) if v.exists() else None for v in vols] == before
    assert dry["dry_run"] is True
    real = okj(*args)
    assert plan_of(dry) == plan_of(real)
    return dry, real


def test_dry_run_transfer_baseline_and_incremental(tmp_path):
    """transfer --dry-run: baseline (DST not created) and incremental with SRC live changes
    (the would-be snapshot is counted) plan exactly what the run does."""
    a = src_volume(tmp_path)
    b = tmp_path / "B"
    dry, real = assert_dry_then_real(["transfer", a, b], [a, b])
    assert real["added"] == [1] and dry["bytes_sent"] > 0
    write(a, {"dir/b.bin": rnd(10_000, 9), "z": "z"})
    dry, real = assert_dry_then_real(["transfer", a, b], [a, b])
    assert real["added"] == [2] and dry["src_snapshot"] == real["src_snapshot"] == 2
    assert real["blocks_sent"] >= 3


def test_dry_run_resync_counts_preserved(pair, tmp_path):
    """resync --dry-run plans the same removals, preserved snapshots (live changes included)
    and bytes as the run, and changes neither volume."""
    a, b = pair
    diverge(a, b, tmp_path)
    _dry, real = assert_dry_then_real(["resync", a, b, "--force"], [a, b])
    assert real["preserved"] == [2, 3, 4] and real["removed"] == [2, 3]


def test_dry_run_role_swap(pair):
    """role-swap --dry-run plans the same transfer as the swap and changes nothing."""
    a, b = pair
    write(a, {"final": "f"})
    _dry, real = assert_dry_then_real(["role-swap", a, b], [a, b])
    assert real["added"] == [2] and status(b)["mode"] == "read-write"


def test_dry_run_revert(pair):
    """revert --dry-run reports the same target and preserved snapshots as the revert."""
    a, _ = pair
    for i in range(2):
        write(a, {"r": str(i)})
        snap(a)
    write(a, {"r": "live"})
    before = fingerprint(a)
    dry = okj("revert", a, "1", "--dry-run")
    assert fingerprint(a) == before
    real = okj("revert", a, "1")
    for k in ("reverted_to", "preserved", "live_changes_preserved"):
        assert dry[k] == real[k]
    assert real["preserved"] == [2, 3] and real["live_changes_preserved"]


def test_dry_run_text_shows_lineage_picture(tmp_path):
    """The dry-run text draws both lineages with primes and the common snapshot."""
    a = make_volume(tmp_path / "A", {"f": "0"})
    b = tmp_path / "B"
    for i in range(1, 5):
        write(a, {"f": str(i)})
        snap(a)
    ok("transfer", a, b)
    ok("break", b)
    for i in (5, 6):
        write(a, {"f": f"a{i}"})
        snap(a)
        write(b, {"f": f"b{i}"})
        snap(b)
    r = ok("resync", a, b, "--dry-run")
    rows = [line.split() for line in r.out.splitlines()]
    assert ["SRC:", "1", "2", "3", "4", "5", "6"] in rows
    assert ["DST:", "1", "2", "3", "4", "5'", "6'"] in rows
    assert ["common:", "4"] in rows
    assert "dry run" in r.out
    assert status(b)["mode"] == "read-write"


# --- integrity and safety ------------------------------------------------------------------------------


def test_corrupt_src_block_stops_transfer_exit_6(pair):
    """A flipped byte in a SRC pack stops the transfer with exit 6; DST is unchanged."""
    a, b = pair
    marker = b"UNIQUE-MARKER-" * 50
    packs_before = set((a / ".volsync/packs").glob("*.pack"))
    write(a, {"new.bin": marker + rnd(3000, 5)})
    snap(a)
    new_packs = set((a / ".volsync/packs").glob("*.pack")) - packs_before
    for p in new_packs:
        data = bytearray(p.read_bytes())
        at = data.find(marker)
        if at >= 0:
            data[at + 100] ^= 0x01
            p.write_bytes(bytes(data))
            break
    else:
        pytest.fail("marker not found in the new pack")
    before = fingerprint(b)
    err = refuse(6, "transfer", a, b)
    assert "digest" in err["error"] or "corrupt" in err["error"]
    assert fingerprint(b) == before
    # no stray pack data left behind
    assert all(p.with_suffix(".idx").exists() for p in (b / ".volsync/packs").glob("*.pack"))


@pytest.mark.parametrize("bad_name", [b"..", b".", b"x/../../escape", b""])
def test_manifest_with_unsafe_name_refused_exit_6(pair, tmp_path, bad_name):
    """A snapshot whose tree names '..' (or '.', a path, empty) is refused with exit 6 and
    nothing is written outside DST."""
    from volsync.model import Entry, Kind, Snapshot, Tree
    from volsync.ops import new_snapshot_id
    from volsync.store.trees import encode_tree

    a, b = pair
    vol = Volume.open(a)
    digest = vol.fmt.algo.digest
    with vol.locked():
        payload = b"escaped!"
        blk = digest(payload)
        vol.packs.put(blk, payload)
        inner = encode_tree(Tree((Entry(b"escape", Kind.FILE, 0o644, 0, 0, 0, len(payload),
                                        blk),)))
        inner_id = digest(inner)
        vol.packs.put(inner_id, inner)
        root = encode_tree(Tree((Entry(bad_name, Kind.DIR, 0o755, 0, 0, 0, 0, inner_id),)))
        root_id = digest(root)
        vol.packs.put(root_id, root)
        state = vol.state()
        s = Snapshot(new_snapshot_id(), 2, 0.0, None, root_id, len(payload), 1,
                     vol.config.volume_id)
        vol.write_snapshot(s)
        vol.commit(state.with_(lineage=state.lineage + (s.id,)))
    def outside_dst() -> dict:  # (A's state records B's hold before the send)
        return {k: v for k, v in content(tmp_path).items() if k != "A/.volsync/state"}

    outside = outside_dst()
    before = fingerprint(b)
    refuse(6, "transfer", a, b, "--no-snapshot")
    assert fingerprint(b) == before
    assert outside_dst() == outside
    assert not (tmp_path / "escape").exists()


def test_symlink_in_place_of_directory_is_replaced_on_resync(pair, tmp_path):
    """A symlink planted in a mirror where a directory was is replaced by the directory on
    resync; the link's target outside DST is untouched."""
    a, b = pair
    outside = tmp_path / "outside"
    write(outside, {"b.bin": "outside-data", "sub/c": "outside-c"})
    before_outside = content(outside)
    shutil.rmtree(b / "dir")
    os.symlink(outside, b / "dir")
    write(a, {"dir/b.bin": "new-from-a", "dir/sub/c": "new-c"})
    ok("resync", a, b)
    assert content(outside) == before_outside
    assert not (b / "dir").is_symlink() and (b / "dir").is_dir()
    assert content(b) == content(a)


def test_symlink_swapped_in_during_transfer_is_not_followed(pair, tmp_path, monkeypatch):
    """A directory swapped for a symlink after the transfer scanned the mirror, just before
    its live tree is written, is replaced, never written through."""
    import volsync.tree as tree_mod

    a, b = pair
    outside = tmp_path / "outside"
    write(outside, {"b.bin": "outside-data"})
    before_outside = content(outside)
    real_run = tree_mod.Materializer.run
    planted = []

    def plant_then_run(self, root, *args, **kwargs):
        if root == bytes(b) and not planted:
            shutil.rmtree(b / "dir")
            os.symlink(outside, b / "dir")
            planted.append(True)
        return real_run(self, root, *args, **kwargs)

    monkeypatch.setattr(tree_mod.Materializer, "run", plant_then_run)
    write(a, {"dir/b.bin": "new-from-a", "dir/new": "n"})
    ok("transfer", a, b)
    assert planted
    assert content(outside) == before_outside
    assert not (b / "dir").is_symlink()
    assert content(b) == content(a)


# --- status, locks, arguments ---------------------------------------------------------------------


def test_status_of_mirror_shows_upstream_and_behind(pair, capsys):
    """status of a mirror names its upstream and how many snapshots it is behind."""
    a, b = pair
    for i in range(2):
        write(a, {"s": str(i)})
        snap(a)
    st = status(b)
    assert st["upstream"] == str(a) and st["behind"] == 2 and st["latest"] == 1
    assert st["behind_bytes"] > 0 and st["behind_unknown"] is None
    text = ok("status", b, capsys=capsys).out
    assert str(a) in text and "2 snapshot(s)" in text and "behind" in text
    assert "read-only" in text
    ok("transfer", a, b)
    st = status(b)
    assert st["behind"] == 0 and st["behind_bytes"] == 0


@pytest.mark.parametrize("which", ["src", "dst"])
def test_locked_volume_exit_3(pair, which):
    """A lock held on either volume stops transfer with exit 3 naming the process."""
    a, b = pair
    write(a, {"x": "x"})
    held = Volume.open(a if which == "src" else b)
    before = fingerprint(a), fingerprint(b)
    with held.locked():
        r = vs("transfer", a, b, "--json")
        assert r.code == 3 and r.json["code"] == 3
        assert str(os.getpid()) in r.err
        assert status(a if which == "src" else b)["lock_holder"] == os.getpid()
    assert (fingerprint(a), fingerprint(b)) == before
    ok("transfer", a, b)


def test_transfer_holds_both_locks(pair, monkeypatch):
    """While a transfer copies data, DST is locked by it, and SRC is held by its readers'
    lock only (snapshots and other transfers from it go on; prune waits)."""
    import fcntl

    import volsync.sync as sync_mod

    def current_holder(path):  # a shared holder shows only to an exclusive probe
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return int(open(path).read().split()[0])
        finally:
            os.close(fd)
        return None

    a, b = pair
    seen = []
    real_copy = sync_mod._copy_and_write

    def spy(plan, src, dst, progress):
        seen.append((Volume.open(a).lock_holder(), Volume.open(b).lock_holder(),
                     current_holder(a / ".volsync" / "readers")))
        return real_copy(plan, src, dst, progress)

    monkeypatch.setattr(sync_mod, "_copy_and_write", spy)
    write(a, {"y": "y"})
    ok("transfer", a, b)
    assert seen == [(None, os.getpid(), os.getpid())]
    assert Volume.open(a).lock_holder() is None and Volume.open(b).lock_holder() is None
    assert current_holder(a / ".volsync" / "readers") is None


def test_src_equals_dst_exit_1(pair, tmp_path):
    """transfer/resync/role-swap of a volume onto itself, however spelled (symlink, '..'),
    is a bad argument (exit 1), not a lock held by itself (3); dry runs too."""
    a, _ = pair
    alias = tmp_path / "alias"
    os.symlink(a, alias)
    before = fingerprint(a)
    for cmd in ("transfer", "resync", "role-swap"):
        for other in (a, str(a) + "/.", alias, tmp_path / "B" / ".." / "A"):
            refuse(1, cmd, a, other)
            refuse(1, cmd, a, other, "--dry-run")
    assert fingerprint(a) == before


def test_not_a_volume_src_exit_1(tmp_path):
    """A SRC that is not a volume is exit 1 with a message, no traceback."""
    (tmp_path / "plain").mkdir()
    refuse(1, "transfer", tmp_path / "plain", tmp_path / "B")
    assert not (tmp_path / "B").exists()


def test_preserved_snapshot_back_in_lineage_is_listed_once(pair, tmp_path):
    """A snapshot preserved by a revert that a resync brings back into the lineage is a
    lineage snapshot again: listed once, restorable by id, and kept by prune --preserved."""
    a, b = pair
    write(a, {"a.txt": "two\n"})
    ok("transfer", a, b)  # A, B: 1 2
    ok("revert", a, "1")  # A: 1, preserved 2
    ok("resync", b, a)  # A: 1 2 again, mirror of B
    ids = [s["id"] for s in okj("snapshots", a, "--all")["snapshots"]]
    assert len(ids) == len(set(ids)) == 2
    assert lineage(a) == lineage(b) and preserved(a) == []
    two = lineage(a)[1][1]
    assert restored(a, two, tmp_path / "r")["a.txt"][1] == b"two\n"
    ok("prune", a, "--preserved")
    assert lineage(a) == lineage(b)
    verify_clean(a)


def test_mtime_only_drift_on_mirror_is_a_modification(pair):
    """A mirror whose files were only touched (or whose directory got a file created and
    removed again) no longer stands in exactly for its source: status and verify say so,
    transfer refuses (exit 5), and resync repairs it."""
    a, b = pair
    os.utime(b / "a.txt", ns=(1, 1))
    (b / "dir" / "scratch").write_text("x")
    (b / "dir" / "scratch").unlink()
    assert status(b)["changed_paths"] == ["a.txt", "dir/"]
    assert vs("verify", b).code == 6
    write(a, {"a.txt": "next\n"})
    refuse(5, "transfer", a, b)
    assert okj("resync", a, b)["added"] == [2]
    assert content(b) == content(a)
    verify_clean(b)
    write(b, {"a.txt": "real change\n"})
    assert status(b)["changed_paths"] == ["a.txt"]
    refuse(5, "transfer", a, b)
