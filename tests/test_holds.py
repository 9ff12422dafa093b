"""Holds, retention and the resync guard (issue 9), through the CLI: a mirror's newest common
snapshot survives pruning on its source; `holds`, `release`, `destroy` and `prune --keep`; a
source is shared while it sends; a resync that would take a read-write DST's own work asks
first; preserved snapshots have names (pN) that commands take, and `revert DST pN` undoes.
Local and remote volumes alike."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from datetime import datetime

import pytest
from helpers import content, fingerprint, make_volume, ok, okj, sub, vs, write

from volsync.store.volume import Volume

REMOTE_PATH = f"{sys.executable} -m volsync"


def numbers(path) -> list[int]:
    vol = Volume.open(path)
    return [s.number for s in vol.lineage()]


def chain(tmp_path, snapshots: int = 3):
    """A with `snapshots` snapshots, mirrored to B."""
    a = make_volume(tmp_path / "A", {"f": "0"})
    ok("snapshot", a)
    for i in range(1, snapshots):
        write(a, {"f": str(i), f"g{i}": "x" * 5000})
        ok("snapshot", a)
    ok("transfer", a, tmp_path / "B")
    return a, tmp_path / "B"


# --- holds ---------------------------------------------------------------------------------

def test_transfer_records_a_hold_that_prune_keeps(tmp_path, capsys):
    a, b = chain(tmp_path)
    holds = okj("holds", a, capsys=capsys)["holds"]
    b_id = Volume.open(b).config.volume_id
    assert [(h["mirror_id"], h["snapshots"]) for h in holds] == [(b_id, [3])]
    assert holds[0]["address"] == str(b)
    write(a, {"f": "new"})
    ok("snapshot", a)
    write(a, {"f": "newer"})
    ok("snapshot", a)  # A: 1..5, B holds 3
    res = okj("prune", a, "--keep-last", "1", capsys=capsys)
    assert res["removed"] == [1, 2, 4] and res["held"] == [3]
    assert numbers(a) == [3, 5]
    r = ok("prune", a, "--keep-last", "1", "--dry-run")
    assert "held by a mirror (3)" in r.out
    # the next transfer is incremental from the held snapshot, not a new baseline
    res = okj("transfer", a, b, capsys=capsys)
    assert res["common"] == 3 and res["added"] == [5] and not res["baseline"]
    assert okj("holds", a, capsys=capsys)["holds"][0]["snapshots"] == [5]
    assert content(b) == content(a)


def test_release_drops_a_hold_and_destroy_respects_holds(tmp_path, capsys):
    a, b = chain(tmp_path)
    write(a, {"f": "later"})
    ok("snapshot", a)  # 4; B holds 3
    r = vs("destroy", a, "3")
    assert r.code == 5 and "held by mirror" in r.err and "--force" in r.err, r
    assert numbers(a) == [1, 2, 3, 4]
    assert vs("destroy", a, "4").code == 1  # the latest: the live tree's base
    res = okj("destroy", a, "2", capsys=capsys)
    assert res["destroyed"]["number"] == 2 and numbers(a) == [1, 3, 4]
    b_id = Volume.open(b).config.volume_id
    r = vs("release", a, "nosuchmirror")
    assert r.code == 1 and "no mirror" in r.err
    assert okj("release", a, b_id[:10], capsys=capsys)["released"] == b_id
    assert okj("holds", a, capsys=capsys)["holds"] == []
    assert okj("destroy", a, "3", capsys=capsys)["held_by"] == []
    assert numbers(a) == [1, 4]
    ok("verify", a)
    # with B's latest gone from A, B's later snapshots diverge from A's lineage (exit 5):
    # what the hold had prevented
    r = vs("transfer", a, b)
    assert r.code == 5 and "resync" in r.err, r


def test_destroy_force_and_dry_run(tmp_path, capsys):
    a, b = chain(tmp_path)
    write(a, {"f": "later"})
    ok("snapshot", a)
    before = fingerprint(a)
    assert okj("destroy", a, "3", "--force", "--dry-run", capsys=capsys)["dry_run"] is True
    assert fingerprint(a) == before
    res = okj("destroy", a, "3", "--force", capsys=capsys)
    assert res["held_by"] == [Volume.open(b).config.volume_id] and numbers(a) == [1, 2, 4]
    ok("verify", a)


def test_a_failover_turned_around_drops_the_stale_hold(tmp_path, capsys):
    a, b = chain(tmp_path)
    ok("break", b)
    write(b, {"f": "failover"})
    ok("snapshot", b)
    ok("resync", b, a)  # A has no work of its own after 3: no question asked
    a_id = Volume.open(a).config.volume_id
    assert okj("holds", a, capsys=capsys)["holds"] == []  # A is now B's mirror
    assert [h["mirror_id"] for h in okj("holds", b, capsys=capsys)["holds"]] == [a_id]


def test_holds_over_ssh(tmp_path, rsh_shim, capsys, monkeypatch):
    monkeypatch.setenv("VOLSYNC_RSH", rsh_shim)
    monkeypatch.setenv("VOLSYNC_REMOTE_PATH", REMOTE_PATH)
    a = make_volume(tmp_path / "A", {"f": "1"})
    ok("snapshot", a)
    far_b = f"farhost:{tmp_path / 'B'}"
    assert sub("transfer", a, far_b).code == 0
    holds = okj("holds", a, capsys=capsys)["holds"]
    assert holds[0]["address"] == far_b and holds[0]["snapshots"] == [1]
    # pull: the far source records the hold of the local mirror
    c = tmp_path / "C"
    assert sub("transfer", f"farhost:{a}", c).code == 0
    r = sub("holds", f"farhost:{a}", "--json")
    assert r.code == 0, r
    assert len(__import__("json").loads(r.out)["holds"]) == 2
    r = sub("release", f"farhost:{a}", far_b)
    assert r.code == 0 and "released" in r.out, r
    write(a, {"f": "2"})
    ok("snapshot", a)
    r = sub("destroy", f"farhost:{a}", "1")
    assert r.code == 5, r  # C still holds 1
    assert sub("destroy", f"farhost:{a}", "1", "--force").code == 0


# --- retention by age ----------------------------------------------------------------------

def test_prune_keep_grid(tmp_path, monkeypatch, capsys):
    v = make_volume(tmp_path / "V", {"f": "start"})
    base = datetime(2026, 3, 5, 12, 0).timestamp()  # a Thursday
    stamps = [base - d * 86400 - h * 3600 for d in range(20, -1, -1) for h in (5, 1)]
    real = time.time
    for i, when in enumerate(stamps):
        write(v, {"f": str(i)})
        monkeypatch.setattr(time, "time", lambda when=when: when)
        ok("snapshot", v)
        monkeypatch.setattr(time, "time", real)
    snaps = Volume.open(v).lineage()
    assert len(snaps) == 42
    res = okj("prune", v, "--keep", "daily=3,weekly=2", "--dry-run", capsys=capsys)
    kept = [s for s in snaps if s.number not in res["removed"]]
    days = {datetime.fromtimestamp(s.created).date() for s in kept}
    # the newest snapshot of each of the 3 newest days (Thu, Wed, Tue), and of each of the 2
    # newest weeks (Thu again, and the Sunday before)
    assert len(kept) == 4 and all(s.created == max(x.created for x in snaps
                                                   if datetime.fromtimestamp(x.created).date()
                                                   == datetime.fromtimestamp(s.created).date())
                                  for s in kept)
    assert len(days) == 4 and snaps[-1] in kept
    res = okj("prune", v, "--keep", "daily=3,weekly=2", "--keep-last", "5", capsys=capsys)
    assert [s.number for s in Volume.open(v).lineage()] == sorted(
        {s.number for s in kept} | {s.number for s in snaps[-5:]})
    for bad in ("daily", "fortnightly=2", "daily=x", ""):
        r = vs("prune", v, "--keep", bad)
        assert r.code == 1 and r.err.count("\n") == 1 and "--keep" in r.err, (bad, r)


# --- a source shared while it sends ------------------------------------------------------------

def test_source_snapshots_and_sends_again_while_it_sends_and_prune_waits(tmp_path, rsh_shim):
    a = make_volume(tmp_path / "A", {"big": os.urandom(6 << 20)})
    ok("snapshot", a)
    env = {"VOLSYNC_RSH": rsh_shim, "VOLSYNC_REMOTE_PATH": REMOTE_PATH}
    slow = subprocess.Popen(
        [sys.executable, "-m", "volsync", "transfer", str(a), f"farhost:{tmp_path / 'B'}",
         "--bwlimit", "1M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "B" / ".volsync" / "state").exists() \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        assert slow.poll() is None, "the transfer ended before the checks could run"
        write(a, {"g": "written during the send"})
        r = sub("snapshot", a)
        assert r.code == 0, r  # not locked out by the send
        r = sub("transfer", a, tmp_path / "C")
        assert r.code == 0, r  # a second transfer from A runs beside the first
        r = sub("prune", a, "--keep-last", "1")
        assert r.code == 3 and "sending from it" in r.err, r
        assert slow.poll() is None
    finally:
        _out, err = slow.communicate(timeout=60)
    assert slow.returncode == 0, err
    assert sub("verify", a).code == 0
    assert numbers(tmp_path / "B") == [1] and numbers(a) == [1, 2]
    assert numbers(tmp_path / "C") == [1, 2] and content(tmp_path / "C") == content(a)
    assert sub("verify", tmp_path / "C").code == 0
    r = sub("transfer", a, f"farhost:{tmp_path / 'B'}", env_extra=env)
    assert r.code == 0 and content(tmp_path / "B") == content(a), r


# --- the resync guard ---------------------------------------------------------------------------

def failed_over(tmp_path):
    """A mirrored to B; B broken and written to (snapshot 4 and live changes)."""
    a, b = chain(tmp_path)
    ok("break", b)
    write(b, {"f": "failover 1"})
    ok("snapshot", b)
    write(b, {"f": "failover 2 (live)"})
    return a, b


def test_resync_in_the_wrong_direction_is_refused_without_a_terminal(tmp_path, capsys):
    a, b = failed_over(tmp_path)
    before = fingerprint(b)
    for args in (("resync", a, b), ("resync", a, b, "--json")):
        r = vs(*args)
        assert r.code == 5 and "read-write" in r.err and "--force" in r.err, r
        assert f"volsync resync {b} {a}" in r.err
        assert fingerprint(b) == before
    dry = okj("resync", a, b, "--dry-run", capsys=capsys)
    assert dry["removed"] == [4] and fingerprint(b) == before
    # the intended direction asks nothing: A has no work of its own
    res = okj("resync", b, a, capsys=capsys)
    assert res["added"] == [4, 5]


def test_resync_force_then_revert_to_a_preserved_snapshot_undoes_it(tmp_path, capsys):
    a, b = failed_over(tmp_path)
    failover_tree = content(b)
    res = okj("resync", a, b, "--force", capsys=capsys)
    assert res["removed"] == [4] and res["preserved"] == [4, 5]
    rows = okj("snapshots", b, "--all", capsys=capsys)["snapshots"]
    preserved = [r for r in rows if r["preserved"]]
    assert sorted(r["name"] for r in preserved) == ["p1", "p2"]
    live = next(r["name"] for r in preserved if r["label"] == "live changes before resync")
    assert [r["name"] for r in rows if not r["preserved"]] == ["1", "2", "3"]
    table = ok("snapshots", b, "--all").out
    assert "p1" in table and "p2" in table and "(preserved; was 4)" in table
    # preserved names are taken by SNAP arguments
    ok("restore", b, live, tmp_path / "R")
    assert content(tmp_path / "R") == failover_tree
    assert vs("restore", b, "p9", tmp_path / "R2").code == 1
    # B is a mirror again: bringing a preserved snapshot back needs it read-write first
    r = vs("revert", b, live)
    assert r.code == 1 and "break" in r.err
    ok("break", b)
    res = okj("revert", b, live, capsys=capsys)
    assert res["added"]["number"] == 4
    assert content(b) == failover_tree and numbers(b) == [1, 2, 3, 4]
    assert okj("status", b, capsys=capsys)["changed_paths"] in (0, [])
    # the undo done, the writes go back the right way
    ok("resync", b, a)
    assert content(a) == failover_tree
    ok("verify", a)
    ok("verify", b)


def test_preserved_names_are_stable(tmp_path, capsys):
    v = make_volume(tmp_path / "V", {"f": "1"})
    ok("snapshot", v)
    for i in range(2, 5):
        write(v, {"f": str(i)})
        ok("snapshot", v)
    ok("revert", v, "3")  # 4 -> p1
    ok("revert", v, "2")  # 3 -> p2
    names = {r["id"]: r["name"] for r in okj("snapshots", v, "--all", capsys=capsys)["snapshots"]}
    ok("destroy", v, "p1")
    after = {r["id"]: r["name"] for r in okj("snapshots", v, "--all", capsys=capsys)["snapshots"]}
    assert {i: n for i, n in names.items() if i in after} == after  # p2 is still p2
    assert sorted(n for n in after.values() if n.startswith("p")) == ["p2"]


def _run_on_terminal(args, answer: bytes) -> tuple[int, bytes]:
    """The program with stdin and stderr on a pseudo-terminal; `answer` typed at its prompt."""
    main, side = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "volsync", *map(str, args)], stdin=side,
                            stderr=side, stdout=subprocess.PIPE, close_fds=True)
    os.close(side)
    seen = b""
    deadline = time.monotonic() + 60
    answered = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(main, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
            if not answered and b"Go on?" in seen:
                os.write(main, answer)
                answered = True
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(main)
    return proc.returncode, seen


@pytest.mark.parametrize("answer,code", [(b"n\n", 5), (b"y\n", 0)])
def test_resync_asks_on_a_terminal(tmp_path, answer, code):
    a, b = failed_over(tmp_path)
    before = fingerprint(b)
    rc, seen = _run_on_terminal(["resync", a, b], answer)
    assert rc == code, seen
    assert b"4'" in seen and b"live changes" in seen and b"common  3" in seen
    if code == 5:
        assert fingerprint(b) == before
    else:
        assert numbers(b) == [1, 2, 3] and content(b) == content(a)


# --- monitoring ---------------------------------------------------------------------------------

def test_status_reports_update_time_lag_holds_and_metrics(tmp_path, capsys):
    a, b = chain(tmp_path, 2)
    st = okj("status", b, capsys=capsys)
    assert st["last_update"] and st["seconds_since_update"] >= 0
    assert (st["behind"], st["behind_bytes"], st["holds"]) == (0, 0, [])
    write(a, {"new": os.urandom(20000)})
    ok("snapshot", a)
    st = okj("status", b, capsys=capsys)
    assert st["behind"] == 1 and st["behind_bytes"] >= 20000
    src = okj("status", a, capsys=capsys)
    assert [h["mirror_id"] for h in src["holds"]] == [Volume.open(b).config.volume_id]
    assert src["behind"] is None and src["last_update"] is None
    metrics = ok("status", b, "--prometheus").out
    label = '{volume="' + str(b) + '"}'
    assert f"volsync_behind_snapshots{label} 1\n" in metrics
    assert f"volsync_read_only{label} 1\n" in metrics
    assert "# TYPE volsync_last_update_timestamp_seconds gauge" in metrics
    for line in metrics.splitlines():  # the text format: comments or NAME{LABELS} VALUE
        assert line.startswith("# ") or (line.startswith("volsync_") and
                                         float(line.rsplit(" ", 1)[1]) >= 0), line
    target = tmp_path / "textfile" / "volsync.prom"
    assert vs("status", b, "--metrics-file", target).code == 1  # no such directory
    target.parent.mkdir()
    r = ok("status", b, "--metrics-file", target, "--json")
    assert r.json["behind"] == 1 and target.read_text() == metrics
    assert not [p for p in target.parent.iterdir() if p != target]


def test_status_of_a_mirror_whose_upstream_is_remote(tmp_path, rsh_shim, monkeypatch, capsys):
    monkeypatch.setenv("VOLSYNC_RSH", rsh_shim)
    monkeypatch.setenv("VOLSYNC_REMOTE_PATH", REMOTE_PATH)
    a = make_volume(tmp_path / "A", {"f": "1"})
    ok("snapshot", a)
    c = tmp_path / "C"
    assert sub("transfer", f"farhost:{a}", c).code == 0
    write(a, {"f": "2"})
    ok("snapshot", a)
    st = okj("status", c, capsys=capsys)
    assert st["behind"] is None and "--check-upstream" in st["behind_unknown"]
    st = okj("status", c, "--check-upstream", capsys=capsys)
    assert st["behind"] == 1 and st["behind_unknown"] is None
    r = sub("status", f"farhost:{c}", "--metrics-file", tmp_path / "m.prom")
    assert r.code != 0 and "--prometheus" in r.err and not (tmp_path / "m.prom").exists()
