"""A local mirror update scans DST's live tree in a forked child while SRC is snapshotted
(volsync/child.py, sync._snapshot_beside_scan). Each case runs the real CLI in a fresh
process (pytest's own workers run threads, where volsync forks no child), through a small
launcher that counts the forks and can change a module constant first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from helpers import (
    alive,
    clean_env,
    content,
    fingerprint,
    lineage,
    make_volume,
    ok,
    verify_clean,
    write,
)

LAUNCHER = textwrap.dedent("""
    import os, sys
    marks = sys.argv[1]
    real_fork = os.fork

    def fork():  # the parent notes each child's pid (a child killed at once writes nothing)
        pid = real_fork()
        if pid:
            with open(marks, "a") as f:
                f.write("f")
            with open(marks + ".pids", "a") as f:
                f.write(f"{pid} ")
        return pid

    os.fork = fork
    exec(sys.argv[2])
    from volsync.cli import main
    main(sys.argv[3:])
""")


def run(tmp_path: Path, *args, setup: str = "", env: dict | None = None) -> tuple[int, int, str]:
    """(exit code, forks made, stderr) of `volsync ARGS` run in a fresh process."""
    marks = tmp_path / f"forks-{time.monotonic_ns()}"
    p = subprocess.run([sys.executable, "-c", LAUNCHER, str(marks), setup, *map(str, args)],
                       capture_output=True, text=True, env=clean_env(env), timeout=120,
                       check=False)
    forks = len(marks.read_text()) if marks.exists() else 0
    return p.returncode, forks, p.stderr


def mirrored(tmp_path: Path) -> tuple[Path, Path]:
    a = make_volume(tmp_path / "A", {f"d{i}/f{j}": f"{i}-{j}\n" for i in range(5)
                                     for j in range(20)})
    ok("transfer", a, tmp_path / "B")
    return a, tmp_path / "B"


def test_mirror_update_scans_dst_in_a_child(tmp_path):
    a, b = mirrored(tmp_path)
    write(a, {"d1/f3": "changed\n", "new/file": b"x" * 50_000, "d2/f0": None})
    code, forks, err = run(tmp_path, "transfer", a, b)
    assert code == 0, err
    assert forks == 1
    assert content(b) == content(a) and lineage(b) == lineage(a)
    verify_clean(b)
    code, forks, err = run(tmp_path, "transfer", a, b)  # nothing to do: still one child
    assert (code, forks) == (0, 1), err
    assert lineage(b) == lineage(a) and len(lineage(a)) == 2


def test_without_a_child_the_result_is_the_same(tmp_path):
    runs = []
    for name, env in (("child", None), ("none", {"VOLSYNC_NO_CHILD": "1"})):
        a, b = mirrored(tmp_path / name)
        write(a, {"d1/f3": "changed\n", "new/file": b"x" * 50_000, "d2/f0": None})
        code, forks, err = run(tmp_path, "transfer", a, b, env=env)
        assert code == 0, err
        runs.append((forks, content(b), [n for n, _ in lineage(b)]))
    assert runs[0][0] == 1 and runs[1][0] == 0
    assert runs[0][1:] == runs[1][1:]


def test_failed_child_falls_back_to_scanning_here(tmp_path):
    """A child that dies (here: at once) costs only the scan done in the parent."""
    a, b = mirrored(tmp_path)
    write(a, {"d3/f1": "changed\n"})
    setup = "import os, volsync.child as c; c._run_child = lambda *a: os._exit(3)"
    code, forks, err = run(tmp_path, "transfer", a, b, setup=setup)
    assert (code, forks) == (0, 1), err
    assert content(b) == content(a)
    verify_clean(b)


def test_refused_transfer_leaves_src_as_it_was(tmp_path):
    """The mirror was written to: exit 5, and SRC keeps no snapshot and no stored object of
    its scan, even where the scan sealed several packs (a tiny pack size forces that)."""
    a, b = mirrored(tmp_path)
    write(b, {"d0/f0": "tampered\n"})
    write(a, {f"big/{i}": os.urandom(40_000) for i in range(12)})
    before = fingerprint(a), fingerprint(b)
    packs_before = sorted(os.listdir(a / ".volsync" / "packs"))
    setup = "import volsync.store.packs as p; p.PACK_TARGET = 64 << 10"
    code, forks, err = run(tmp_path, "transfer", a, b, setup=setup)
    assert code == 5 and forks == 1, err
    assert "modified" in err and "Traceback" not in err
    assert (fingerprint(a), fingerprint(b)) == before
    assert sorted(p for p in os.listdir(a / ".volsync" / "packs")
                  if not p.startswith("multi.midx")) == \
        sorted(p for p in packs_before if not p.startswith("multi.midx"))
    verify_clean(a)
    ok("snapshot", a)  # and the changes are still there to capture
    verify_clean(a)


def test_src_failure_stops_the_child(tmp_path):
    """SRC's scan fails (an unreadable file, strict): the command fails with its error and
    leaves no child process behind."""
    if os.geteuid() == 0:
        setup = ("import importlib; s = importlib.import_module('volsync.tree.scan')\n"
                 "def bad(self, rel, dfd, name, ino=0):\n"
                 "    raise PermissionError(13, 'Permission denied', name.decode())\n"
                 "s.Scanner.read_file = bad")
    else:
        setup = ""
    a, b = mirrored(tmp_path)
    write(a, {"secret": "x\n"})
    if not setup:
        (a / "secret").chmod(0)
    code, forks, err = run(tmp_path, "transfer", a, b, setup=setup)
    assert code != 0 and forks == 1 and "Traceback" not in err, err
    assert "Permission denied" in err
    pids = [int(x) for x in next(tmp_path.glob("forks-*.pids")).read_text().split()]
    assert len(pids) == 1 and not alive(pids[0])
    assert lineage(b) == lineage(a)
    verify_clean(b)


def test_child_dies_with_its_parent(tmp_path):
    """kill -9 of volsync takes its child with it (it would hold the volume locks)."""
    script = textwrap.dedent("""
        import sys, time
        from volsync.child import ReadingChild
        child = ReadingChild.start(lambda: time.sleep(60))
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                         env=clean_env())
    try:
        pid = int(p.stdout.readline())
        assert alive(pid)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid)
    finally:
        p.kill()


def test_child_hands_back_a_value_or_none(tmp_path):
    script = textwrap.dedent("""
        import os
        from volsync.child import ReadingChild
        big = ReadingChild.start(lambda: {b"k": os.urandom(1 << 20)})
        bad = ReadingChild.start(lambda: 1 / 0)
        got = big.result()
        print(len(got[b"k"]), bad.result())
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=clean_env(), timeout=60, check=False)
    assert p.stdout.split() == [str(1 << 20), "None"], p.stderr

