"""Crash safety under real SIGKILL at random moments: 100 kills of a baseline transfer and 100
of a diverged resync, on a few MiB of data, each followed by the pass criteria of
bench/crash_sweep.py (the same engine, run there on hundreds of MiB):

  * `volsync verify` passes on every volume, before and after the rerun;
  * rerunning the command exits 0;
  * the end state (modes, upstreams, journal, lineage and preserved snapshots by number, tree
    root and old id, live trees with modes and mtimes) equals an uninterrupted run's: no
    snapshot that existed before is lost, DST's diverged snapshot and live changes are
    preserved, the mirror's live tree is SRC's latest;
  * no temp file is left.

Each kill: the scenario's template is copied back, the command starts in a forked child (no
interpreter start-up, so the whole delay window falls on the command's work) and os.kill
sends SIGKILL after a delay drawn uniformly from [0, 1.2 x the uninterrupted run's
duration] (the shortest of three). The seed is fixed (VOLSYNC_SWEEP_SEED overrides it); timing still varies from run
to run, which is the point: over many CI runs the kills land everywhere.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import crash_sweep as cs

KILLS = 100
SIZE = 4 << 20
SEED = int(os.environ.get("VOLSYNC_SWEEP_SEED", "1"))
BUILDERS = {"transfer": cs.sc_transfer, "resync": cs.sc_resync}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILDERS))
def test_random_sigkill_sweep(tmp_path, name):
    case = cs.Case(tmp_path, name, BUILDERS[name](SIZE, SEED), fork=True, timings=3)
    stats = cs.sweep(case, KILLS, random.Random(SEED))
    phases = ", ".join(f"{n} {p}" for p, n in sorted(stats.phases.items(), key=lambda kv: -kv[1]))
    print(f"{name}: {stats.kills} kills, {stats.landed} landed, {stats.survived} survived "
          f"({phases})")
    assert not stats.problems, "\n".join(stats.problems[:10])
    assert stats.survived == stats.kills == KILLS
    # the delays cover the run: many kills land (a loaded machine shifts the mix), and some
    # land inside DST's live-tree step
    assert stats.landed >= KILLS // 4, stats.phases
    assert stats.phases.get("DST live-tree step pending", 0) >= 1, stats.phases
