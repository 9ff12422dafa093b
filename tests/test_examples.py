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


def test_volsync_check_monitoring_script(tmp_path):
    """examples/volsync-check (examples/cron.md): quiet right after a no-change transfer (a
    quiet source must not look stale), alerts on age, on lag and on a broken-off mirror."""
    import time

    vs = [sys.executable, "-m", "volsync"]
    a, b, log = tmp_path / "A", tmp_path / "B", tmp_path / "alerts"
    a.mkdir()
    (a / "f").write_text("1")
    for args in (["init", a], ["snapshot", a], ["transfer", a, b]):
        subprocess.run([*vs, *map(str, args)], check=True, capture_output=True)
    alert = tmp_path / "alert.sh"
    alert.write_text(f'#!/bin/sh\necho "$*" >>{log}\n')
    alert.chmod(0o755)
    env = {"VOLSYNC": f"{sys.executable} -m volsync", "ALERT": str(alert)}

    def check(**extra: str) -> tuple[int, str]:
        log.unlink(missing_ok=True)
        r = subprocess.run(["bash", str(ROOT / "examples" / "volsync-check"), str(b)],
                           env=os.environ | env | extra, capture_output=True, text=True,
                           timeout=120)
        return r.returncode, log.read_text() if log.exists() else ""

    time.sleep(4)
    subprocess.run([*vs, "transfer", str(a), str(b)], check=True, capture_output=True)
    assert check(MAX_AGE="4") == (0, "")  # the no-change transfer just now counts
    time.sleep(4.5)
    code, alerts = check(MAX_AGE="4")
    assert code == 1 and "is stale" in alerts
    for i in range(3):
        (a / "f").write_text(str(i + 2))
        subprocess.run([*vs, "snapshot", str(a)], check=True, capture_output=True)
    code, alerts = check()
    assert code == 1 and "3 snapshot(s)" in alerts and "behind" in alerts
    subprocess.run([*vs, "break", str(b)], check=True, capture_output=True)
    code, alerts = check()
    assert code == 1 and "is read-write" in alerts
