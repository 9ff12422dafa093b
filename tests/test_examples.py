"""The README's first Quick start command runs these scripts; they check their own results
at every step and exit non-zero on any mismatch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, **env_extra: str) -> subprocess.CompletedProcess:
    # run with this interpreter's volsync, so the test does not depend on PATH
    env = {k: v for k, v in os.environ.items()
           if k not in ("VOLSYNC_RSH", "VOLSYNC_REMOTE_PATH", "DRILL_HOST", "DRILL_STANDIN")}
    env |= {"VOLSYNC": f"{sys.executable} -m volsync"} | env_extra
    return subprocess.run(["bash", str(ROOT / "examples" / script)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("script", ["quickstart.sh", "failover-drill.sh"])
def test_example_script_passes(script):
    r = _run(script)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_remote_drill_over_real_ssh(sshd):
    # the remote drill through a real sshd on 127.0.0.1 (skipped when none can start, except in
    # CI): the ssh client, its options and a dropped ssh connection as an administrator has them
    # (README's first command runs it through ssh or the script's own stand-in for ssh)
    r = _run("remote-drill.sh", VOLSYNC_RSH=sshd.rsh, VOLSYNC_REMOTE_PATH=sshd.remote_path,
             DRILL_HOST=sshd.host)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "reaching 127.0.0.1 with VOLSYNC_RSH" in r.stdout
