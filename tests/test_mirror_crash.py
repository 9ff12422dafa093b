"""Crash safety of transfer, resync and role-swap: a `volsync` subprocess is killed at a named
durable step (VOLSYNC_CRASH_AT="name:N", exit 137); afterwards both volumes verify, rerunning
the command completes, and the end state equals that of an uninterrupted run."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
from helpers import content, make_volume, ok, snap, sub, vs, write

from volsync.store.volume import Volume, is_volume

CRASHED = 137
CORE_POINTS = ["pack-data-durable", "pack-index-committed", "atomic-write-before-rename",
               "snapshot-record-written", "state-committed", "live-entry-written",
               "object-received"]
SWAP_POINTS = CORE_POINTS + ["role-swap-source-demoted", "role-swap-mirror-promoted",
                             "link-flipped"]
MODULES = ["volsync.sync", "volsync.endpoint", "volsync.tree.write", "volsync.store.fsutil", "volsync.store.volume",
           "volsync.store.packs"]


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


BASE = {"top.txt": "top\n", "big.bin": rnd(5 * 4096 + 100, 1), "d/one": "1", "d/two": rnd(300, 2),
        "d/e/deep": "deep", "d/e/f/deeper": rnd(9000, 3)}


def _base(root: Path) -> Path:
    a = make_volume(root / "A", BASE)
    os.symlink("d/one", a / "lnk")
    return a


def _edit(vol: Path, seed: int) -> None:
    big = bytearray((vol / "big.bin").read_bytes())
    big[4096 + 7] ^= 0xFF
    write(vol, {"big.bin": bytes(big), f"new-{seed}": rnd(5000, seed), "d/one": f"one-{seed}",
                "d/e/deep": None})


# --- scenarios: set up under root, return the command ---------------------------------------------

def sc_baseline(root: Path) -> list:
    a = _base(root)
    return ["transfer", a, root / "B"]


def sc_incremental(root: Path) -> list:
    a = _base(root)
    ok("transfer", a, root / "B")
    _edit(a, 10)
    return ["transfer", a, root / "B"]


def sc_resync(root: Path) -> list:
    a = _base(root)
    b = root / "B"
    ok("transfer", a, b)
    _edit(a, 20)
    snap(a)
    write(a, {"a-live": "a"})
    ok("break", b)
    _edit(b, 30)
    snap(b)
    write(b, {"b-live": "b", "d/two": None})
    return ["resync", a, b, "--force"]


def sc_reverse_resync(root: Path) -> list:
    a = _base(root)
    b = root / "B"
    ok("transfer", a, b)
    ok("break", b)
    _edit(b, 40)
    snap(b)
    write(b, {"more-on-b": rnd(4500, 41)})
    write(a, {"late-on-a": "never sent"})
    return ["resync", b, a, "--force"]


def sc_role_swap(root: Path) -> list:
    a = _base(root)
    b = root / "B"
    ok("transfer", a, b)
    _edit(a, 50)
    os.symlink(a, root / "current")
    return ["role-swap", a, b, "--link", root / "current"]


SCENARIOS = {"baseline": (sc_baseline, CORE_POINTS), "incremental": (sc_incremental, CORE_POINTS),
             "resync": (sc_resync, CORE_POINTS),
             "reverse-resync": (sc_reverse_resync, CORE_POINTS),
             "role-swap": (sc_role_swap, SWAP_POINTS)}


# --- observing ------------------------------------------------------------------------------------

def vol_summary(path: Path):
    if not is_volume(path):
        return None
    v = Volume.open(path)
    st = v.state()
    return {"mode": st.mode, "upstream": st.upstream, "journal": st.journal,
            "lineage": [v.snapshot(i).number for i in st.lineage],
            "preserved": sorted(v.snapshot(i).number for i in st.preserved),
            "content": content(path)}


def summary(root: Path) -> dict:
    link = root / "current"
    return {"A": vol_summary(root / "A"), "B": vol_summary(root / "B"),
            "link": os.readlink(link) if link.is_symlink() else None}


class Case:
    """A scenario built once in `root`, kept as a template and copied back to the same
    absolute path (volumes name their upstream by absolute path) for every run."""

    def __init__(self, base: Path, name: str):
        self.root = base / "case"
        self.tpl = base / f"tpl-{name}"
        setup, self.points = SCENARIOS[name]
        self.cmd = setup(self.root)
        self.root.rename(self.tpl)
        self.reset()
        self.counts = self._count_points()
        self.expected = summary(self.root)

    def reset(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)
        shutil.copytree(self.tpl, self.root, symlinks=True)

    def _count_points(self) -> dict[str, int]:
        """Run the command uninterrupted in-process, counting each crash point's passages."""
        import importlib

        counts: dict[str, int] = {}

        def count(name: str) -> None:
            counts[name] = counts.get(name, 0) + 1

        mods = [importlib.import_module(m) for m in MODULES]
        saved = [m.crashpoint for m in mods]
        try:
            for m in mods:
                m.crashpoint = count
            r = vs(*self.cmd)
        finally:
            for m, f in zip(mods, saved, strict=True):
                m.crashpoint = f
        assert r.code == 0, r.err
        return counts


_cases: dict[str, Case] = {}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    def get(name: str) -> Case:
        if name not in _cases:
            _cases[name] = Case(tmp_path_factory.mktemp(name), name)
        return _cases[name]

    yield get
    _cases.clear()


def check_after_crash(case: Case, name: str) -> None:
    root = case.root
    a, b = root / "A", root / "B"
    if name == "role-swap":
        sa, sb = (Volume.open(v).state() for v in (a, b))
        assert not (sa.mode == "read-write" and sb.mode == "read-write"), \
            "role-swap crash left two read-write volumes"
    for v in (a, b):
        if is_volume(v):
            r = vs("verify", v, "--json")
            assert r.code == 0 and r.json["ok"], f"verify {v.name}: {r.out} {r.err}"


PARAMS = [(name, point) for name, (_, points) in SCENARIOS.items() for point in points]


@pytest.mark.parametrize("name, point", PARAMS, ids=[f"{n}-{p}" for n, p in PARAMS])
def test_crash_then_rerun(cases, name, point):
    """Killed at `point` (first, middle and last passage): both volumes verify, the rerun
    completes, and the end state equals an uninterrupted run's."""
    case = cases(name)
    total = case.counts.get(point, 0)
    assert total >= 1, f"{name} never passes {point}"
    crashed = 0
    for n in sorted({1, (total + 1) // 2, total}):
        case.reset()
        r = sub(*case.cmd, env_extra={"VOLSYNC_CRASH_AT": f"{point}:{n}"})
        # how often files are rewritten depends on the stat cache's racy window (timing), so
        # a later passage may not come; the first always does
        assert r.code == CRASHED or (n > 1 and r.code == 0), f"{point}:{n}: exit {r.code} {r.err}"
        crashed += r.code == CRASHED
        check_after_crash(case, name)
        rerun = vs(*case.cmd)
        assert rerun.code == 0, f"rerun after {point}:{n}: {rerun.err}"
        assert summary(case.root) == case.expected, f"after {point}:{n} of {total}"
        for v in ("A", "B"):
            r = vs("verify", case.root / v, "--json")
            assert r.code == 0 and r.json["ok"], r.out
    assert crashed >= 1


def test_role_swap_crash_rerun_by_subprocess_is_idempotent(cases):
    """After a crash between demoting A and promoting B, the next run (a real subprocess)
    finishes the swap; a further run reports it already done and changes nothing."""
    case = cases("role-swap")
    case.reset()
    r = sub(*case.cmd, env_extra={"VOLSYNC_CRASH_AT": "role-swap-source-demoted:1"})
    assert r.code == CRASHED
    sa = Volume.open(case.root / "A").state()
    sb = Volume.open(case.root / "B").state()
    assert (sa.mode, sb.mode) == ("read-only", "read-only")
    r = sub(*case.cmd, "--json")
    assert r.code == 0, r.err
    assert summary(case.root) == case.expected
    r = sub(*case.cmd, "--json")
    assert r.code == 0 and r.json["already_done"]
    assert summary(case.root) == case.expected


@pytest.mark.parametrize("point", ["state-committed", "atomic-write-before-rename"])
def test_role_swap_killed_at_every_passage(cases, point):
    """role-swap killed at every metadata write never leaves two read-write volumes, and
    its rerun always ends in the swapped state."""
    case = cases("role-swap")
    total = case.counts[point]
    for n in range(1, total + 1):
        case.reset()
        r = sub(*case.cmd, env_extra={"VOLSYNC_CRASH_AT": f"{point}:{n}"})
        assert r.code in (CRASHED, 0), r.err
        check_after_crash(case, "role-swap")
        assert vs(*case.cmd).code == 0
        assert summary(case.root) == case.expected, f"after {point}:{n}"
