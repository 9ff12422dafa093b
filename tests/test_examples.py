"""The README's first Quick start command runs these scripts; they check their own results
at every step and exit non-zero on any mismatch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["quickstart.sh", "failover-drill.sh"])
def test_example_script_passes(script):
    # run with this interpreter's volsync, so the test does not depend on PATH
    env = dict(os.environ, VOLSYNC=f"{sys.executable} -m volsync")
    r = subprocess.run(["bash", str(ROOT / "examples" / script)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
