"""Odd file names through the real CLI: paths quoted as git quotes them in text (with their
exact bytes in JSON as `path_b64`) in diff and status."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import clean_env, ok, okj

from volsync.quoting import quote_path

# --- odd names ----------------------------------------------------------------------------------

ODD = {  # name -> as git quotes it (core.quotePath=true)
    b"new\nline": '"new\\nline"',
    b"D evil.txt\nD other": '"D evil.txt\\nD other"',
    b"tab\there": '"tab\\there"',
    b'quote"d': '"quote\\"d"',
    b"back\\slash": '"back\\\\slash"',
    b"bad\xff\xfe": '"bad\\377\\376"',
    b"caf\xc3\xa9": '"caf\\303\\251"',
    b"bell\x07\x1b\x7f": '"bell\\a\\033\\177"',
    b"plain name.txt": "plain name.txt",
}


def test_quote_path_matches_git(tmp_path):
    # the quoting is git's own: `git ls-files` with core.quotePath=true as the oracle
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "g"
    repo.mkdir()
    for name in ODD:
        with open(os.path.join(os.fsencode(repo), name), "wb") as f:
            f.write(b"x")
    env = clean_env({"GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)})
    subprocess.run(["git", "init", "-q"], cwd=repo, env=env, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
    listed = subprocess.run(["git", "-c", "core.quotePath=true", "ls-files"], cwd=repo,
                            env=env, check=True, capture_output=True).stdout.decode()
    assert sorted(listed.splitlines()) == sorted(quote_path(n) for n in ODD)
    assert all(quote_path(n) == shown for n, shown in ODD.items())


@pytest.fixture
def odd_vol(tmp_path) -> Path:
    """Snapshot 1 holds a.txt; snapshot 2 adds every ODD name as a file, and a directory
    with a newline in its name holding one of them."""
    v = tmp_path / "O"
    v.mkdir()
    (v / "a.txt").write_text("a")
    ok("init", v, "--block-size", "4K")
    ok("snapshot", v)
    root = os.fsencode(v)
    for i, name in enumerate(ODD):
        with open(os.path.join(root, name), "wb") as f:
            f.write(b"content %d\n" % i)
    os.mkdir(os.path.join(root, b"d\nir"))
    with open(os.path.join(root, b"d\nir", b"in\xffside"), "wb") as f:
        f.write(b"inside")
    ok("snapshot", v)
    return v


def expected_paths() -> dict[bytes, str]:
    return {n: s for n, s in ODD.items()} | {b"d\nir/": '"d\\nir/"',
                                             b"d\nir/in\xffside": '"d\\nir/in\\377side"'}


def check_json_paths(items: list[dict], want: set[bytes]) -> None:
    """Every path is there; path_b64 (present exactly when the bytes are not UTF-8) gives the
    exact bytes, the display text is their UTF-8 reading."""
    got = set()
    for item in items:
        if "path_b64" in item:
            raw = base64.b64decode(item["path_b64"])
            with pytest.raises(UnicodeDecodeError):
                raw.decode("utf-8")
            assert item["path"] == raw.decode("utf-8", "replace")
        else:
            raw = item["path"].encode("utf-8")
        got.add(raw)
    assert got == want


def test_odd_names_in_diff(odd_vol):
    # one line per change, never split, each path quoted; JSON keeps the exact bytes
    want = expected_paths()
    lines = ok("diff", odd_vol, "1", "2").out.splitlines()
    assert sorted(lines) == sorted(f"A {shown}" for shown in want.values())
    data = okj("diff", odd_vol, "1", "2")
    assert all(c["status"] == "added" for c in data["changes"])
    check_json_paths(data["changes"], set(want))
    assert data["added"] == [c["path"] for c in data["changes"]]
    # the live tree too (diff VOL A, status)
    os.unlink(os.path.join(os.fsencode(odd_vol), b"new\nline"))
    assert ok("diff", odd_vol).out == 'D "new\\nline"\n'
    assert '  D "new\\nline"' in ok("status", odd_vol).out.splitlines()
    st = okj("status", odd_vol)
    assert st["changed_paths"] == ["new\nline"]
    assert st["changes"] == [{"status": "deleted", "path": "new\nline"}]
