"""Guard rails of an admin's first week (issue 9, first part): a DST whose parent is missing
is a typo until --mkpath says otherwise; a label names one snapshot; verify's failure reaches
stderr, where a cron wrapper's alert looks."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import fingerprint, make_volume, ok, okj, sub, vs, write

REMOTE_PATH = f"{sys.executable} -m volsync"


def test_missing_parent_of_dst_is_refused_without_mkpath(tmp_path):
    a = make_volume(tmp_path / "A", {"f": "data"})
    typo = tmp_path / "mnt" / "backpu" / "data"
    for cmd in (["transfer"], ["resync"], ["transfer", "--dry-run"]):
        r = vs(*cmd, a, typo)
        assert r.code == 1 and "--mkpath" in r.err and r.err.count("\n") == 1, r
        assert not (tmp_path / "mnt").exists()
    ok("transfer", a, tmp_path / "B")  # the last component alone is created, as rsync does
    assert (tmp_path / "B" / "f").read_text() == "data"
    assert okj("transfer", a, typo, "--mkpath")["added"] == [1]
    assert (typo / "f").read_text() == "data"


def test_missing_parent_of_remote_dst_and_of_receive(tmp_path, rsh_shim):
    a = make_volume(tmp_path / "A", {"f": "data"})
    env = {"VOLSYNC_RSH": rsh_shim, "VOLSYNC_REMOTE_PATH": REMOTE_PATH}
    far = tmp_path / "far" / "x" / "B"
    r = sub("transfer", a, f"farhost:{far}", env_extra=env)
    assert r.code == 1 and "--mkpath" in r.err, r
    assert not (tmp_path / "far").exists()
    r = sub("transfer", a, f"farhost:{far}", "--mkpath", env_extra=env)
    assert r.code == 0 and (far / "f").read_text() == "data", r
    stream = tmp_path / "s.vs"
    with open(stream, "wb") as out:
        assert sub_stream(["send", a], stdout=out).returncode == 0
    target = tmp_path / "r" / "y" / "C"
    with open(stream, "rb") as inp:
        r = sub_stream(["receive", target], stdin=inp)
    assert r.returncode == 1 and b"--mkpath" in r.stderr and not (tmp_path / "r").exists()
    with open(stream, "rb") as inp:
        assert sub_stream(["receive", target, "--mkpath"], stdin=inp).returncode == 0
    assert (target / "f").read_text() == "data"


def sub_stream(args, stdin=None, stdout=None) -> subprocess.CompletedProcess:
    """The program as a subprocess with files as its stdin or stdout (send and receive)."""
    return subprocess.run([sys.executable, "-m", "volsync", *map(str, args)], stdin=stdin,
                          stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE, check=False)


def test_a_label_names_one_snapshot(tmp_path):
    v = make_volume(tmp_path / "V", {"f": "1"})
    first = okj("snapshot", v, "--label", "nightly")["number"]
    write(v, {"f": "2"})
    before = fingerprint(v)
    r = vs("snapshot", v, "--label", "nightly")
    assert r.code == 1 and f"already names snapshot {first}" in r.err, r
    assert fingerprint(v) == before
    assert okj("snapshot", v, "--label", "nightly-2")["label"] == "nightly-2"
    assert okj("diff", v, "nightly", "nightly-2")["modified"] == ["f"]


def test_verify_failure_is_on_stderr_too(tmp_path):
    v = make_volume(tmp_path / "V", {"f": os.urandom(100_000)})
    ok("snapshot", v)
    for pack in (v / ".volsync" / "packs").glob("*.pack"):
        data = bytearray(pack.read_bytes())
        data[len(data) // 2] ^= 0xFF
        pack.write_bytes(bytes(data))
    for extra in ([], ["--json"]):
        r = vs("verify", v, *extra)
        assert r.code == 6, r
        lines = [x for x in r.err.splitlines() if x.startswith("volsync: error: verify found")]
        assert len(lines) == 1 and str(v) in lines[0], r
