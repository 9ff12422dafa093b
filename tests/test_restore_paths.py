"""Getting one file back, and odd file names, through the real CLI: `restore --path`, `cat`
and `ls` on local and remote volumes (rsh shim), and paths quoted as git quotes them in text
(with their exact bytes in JSON as `path_b64`) in diff, status, ls, restore and verify."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import argv_of, clean_env, content, ok, okj, opened, vs

from volsync.quoting import quote_path
from volsync.render import local_iso
from volsync.store.blocklist import block_ids
from volsync.tree import Objects, lookup

BS = 4096
REMOTE_PATH = f"{sys.executable} -m volsync"
HOST = "farhost"
DIR_MTIME = 1_500_000_000_123_456_789
SUB_MTIME = 1_400_000_000_000_000_007


def rnd(n: int, seed: int) -> bytes:
    import random
    return random.Random(seed).randbytes(n)


def sparse_bytes() -> bytes:
    """200 blocks (its block list is a list object): data in blocks 0 and 100 and a short
    tail, holes between."""
    data = bytearray(200 * BS + 123)
    data[0:BS] = rnd(BS, 7)
    data[100 * BS : 101 * BS] = rnd(BS, 8)
    data[-50:] = rnd(50, 9)
    return bytes(data)


FILES = {
    "top.txt": b"top\n",
    "dir/keep": b"keep",
    "dir/sub/file.txt": rnd(10_000, 1),
    "dir/sub/other.bin": rnd(9_000, 2),
    "elsewhere/big.bin": rnd(50_000, 3),
    "links/first": b"linked content\n",
    "empty": b"",
}


def write_sparse(path: Path, data: bytes) -> None:
    """Write only the non-zero blocks, so the file really has holes."""
    with open(path, "wb") as f:
        for i in range(0, len(data), BS):
            block = data[i : i + BS]
            if block.strip(b"\0"):
                f.seek(i)
                f.write(block)
        f.truncate(len(data))


@pytest.fixture
def vol(tmp_path) -> Path:
    """A volume with snapshot 1: nested directories with their own modes and mtimes, a
    hard-link group of three (first member links/first), a sparse file, a symlink to a
    directory, an empty file."""
    v = tmp_path / "V"
    for rel, data in FILES.items():
        (v / rel).parent.mkdir(parents=True, exist_ok=True)
        (v / rel).write_bytes(data)
    write_sparse(v / "sparse.img", sparse_bytes())
    (v / "zlinks").mkdir()
    os.link(v / "links" / "first", v / "zlinks" / "second")
    os.link(v / "links" / "first", v / "zlinks" / "third")
    os.symlink("dir", v / "ln")
    os.chmod(v / "dir" / "sub", 0o700)
    os.chmod(v / "dir", 0o750)
    os.utime(v / "dir" / "sub", ns=(SUB_MTIME, SUB_MTIME))
    os.utime(v / "dir", ns=(DIR_MTIME, DIR_MTIME))
    ok("init", v, "--block-size", "4K")
    ok("snapshot", v)
    return v


def run_bytes(*args, env: dict | None = None) -> tuple[int, bytes, str]:
    """A real `volsync` process, its stdout as bytes."""
    p = subprocess.run([sys.executable, "-m", "volsync", *argv_of(args)], capture_output=True,
                       env=clean_env(env), check=False, timeout=120)
    return p.returncode, p.stdout, p.stderr.decode(errors="replace")


def one_line_error(r, code: int = 1) -> str:
    assert r.code == code, r
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("volsync: error: "), r
    return lines[0]


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".volsync-restore-" in p.name]


# --- restore --path ---------------------------------------------------------------------------


def test_restore_path_of_a_file(vol, tmp_path):
    # only the file and the directories leading to it, those with their recorded metadata
    r = tmp_path / "R"
    res = okj("restore", vol, "1", r, "--path", "dir/sub/file.txt")
    assert res["paths"] == ["dir/sub/file.txt"] and res["snapshot"]["number"] == 1
    assert content(r) == {"dir": ("d", 0o750), "dir/sub": ("d", 0o700),
                          "dir/sub/file.txt": ("f", FILES["dir/sub/file.txt"], 0o644)}
    assert os.stat(r / "dir").st_mtime_ns == DIR_MTIME
    assert os.stat(r / "dir" / "sub").st_mtime_ns == SUB_MTIME
    assert leftovers(tmp_path) == []


def test_restore_path_of_a_directory(vol, tmp_path):
    # a directory with everything under it; a path inside a chosen one changes nothing
    r = tmp_path / "R"
    text = ok("restore", vol, "1", r, "--path", "dir/sub", "--path", "./dir/sub/file.txt/").out
    assert text.startswith("restored dir/sub of snapshot 1 ")
    assert content(r) == {"dir": ("d", 0o750), "dir/sub": ("d", 0o700),
                          "dir/sub/file.txt": ("f", FILES["dir/sub/file.txt"], 0o644),
                          "dir/sub/other.bin": ("f", FILES["dir/sub/other.bin"], 0o644)}
    # several paths, a symlink among them (restored as the link, not followed)
    r2 = tmp_path / "R2"
    ok("restore", vol, "1", r2, "--path", "top.txt", "--path", "ln", "--path", "empty")
    assert content(r2) == {"top.txt": ("f", b"top\n", 0o644), "ln": ("l", "dir"),
                           "empty": ("f", b"", 0o644)}


def test_restore_path_hard_link_partner_outside(vol, tmp_path):
    # the group's first member (links/first) is outside the selection: zlinks/second and
    # zlinks/third are tied to each other; alone, a member becomes a plain file
    r = tmp_path / "R"
    ok("restore", vol, "1", r, "--path", "zlinks")
    second, third = os.stat(r / "zlinks" / "second"), os.stat(r / "zlinks" / "third")
    assert second.st_ino == third.st_ino and second.st_nlink == 2
    assert (r / "zlinks" / "third").read_bytes() == FILES["links/first"]
    r2 = tmp_path / "R2"
    ok("restore", vol, "1", r2, "--path", "zlinks/third")
    st = os.stat(r2 / "zlinks" / "third")
    assert st.st_nlink == 1 and (r2 / "zlinks" / "third").read_bytes() == FILES["links/first"]
    assert content(r2).keys() == {"zlinks", "zlinks/third"}
    # the whole group chosen: one inode, as in the snapshot
    r3 = tmp_path / "R3"
    ok("restore", vol, "1", r3, "--path", "links", "--path", "zlinks/second")
    assert os.stat(r3 / "links" / "first").st_ino == os.stat(r3 / "zlinks" / "second").st_ino
    assert os.stat(r3 / "links" / "first").st_nlink == 2


def test_restore_path_of_a_sparse_file(vol, tmp_path):
    # the holes stay holes: only the data blocks are written
    r = tmp_path / "R"
    ok("restore", vol, "1", r, "--path", "sparse.img")
    assert (r / "sparse.img").read_bytes() == sparse_bytes()
    assert os.stat(r / "sparse.img").st_blocks * 512 <= 8 * BS


@pytest.mark.parametrize("path", ["dir/nope", "nope", "top.txt/x", "ln/sub",
                                  "dir/sub/file.txt/more"])
def test_restore_missing_path_writes_nothing(vol, tmp_path, path):
    # not in the snapshot (a symlink on the way is not followed): exit 1, one line naming it,
    # no DIR and no temp directory left
    r = tmp_path / "R"
    err = one_line_error(vs("restore", vol, "1", r, "--path", "top.txt", "--path", path))
    assert "snapshot 1 has no" in err and path.rstrip("/") in err
    assert not r.exists() and leftovers(tmp_path) == []
    j = vs("restore", vol, "1", r, "--path", path, "--json")
    assert j.code == 1 and j.json["code"] == 1 and "has no" in j.json["error"]


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "dir/../../x", "dir/..",
                                  "a\0b", ".", ""])
def test_restore_hostile_path_refused(vol, tmp_path, path):
    # '..', absolute paths, NUL and the top itself are refused before anything is written
    r = tmp_path / "R"
    err = one_line_error(vs("restore", vol, "1", r, "--path", path))
    assert "path" in err and "\0" not in err
    assert not r.exists() and leftovers(tmp_path) == []


def damage_first_block(vol: Path, rel: bytes) -> None:
    """Flip a byte in the first stored block of one file of the latest snapshot."""
    with opened(vol) as v:
        snap = v.snapshot(v.state().lineage[-1])
        entry = lookup(Objects(v, write=False), snap.root, rel, "test")
        first = next(iter(block_ids(entry.ref, entry.size, v.fmt, v.packs.get)))
        name, off, length = v.packs.index()[first]
    pack = vol / ".volsync" / "packs" / f"{name}.pack"
    data = bytearray(pack.read_bytes())
    data[off + length // 2] ^= 0x40
    pack.write_bytes(bytes(data))


def test_restore_path_reads_only_its_blocks(vol, tmp_path):
    # a damaged block of another file does not stop restore --path, cat or ls; a full
    # restore, and cat of the damaged file, fail with exit 6
    damage_first_block(vol, b"elsewhere/big.bin")
    r = tmp_path / "R"
    ok("restore", vol, "1", r, "--path", "dir/sub/file.txt", "--path", "sparse.img")
    assert (r / "dir" / "sub" / "file.txt").read_bytes() == FILES["dir/sub/file.txt"]
    code, out, _ = run_bytes("cat", vol, "1", "dir/sub/file.txt")
    assert code == 0 and out == FILES["dir/sub/file.txt"]
    assert ok("ls", vol, "1").out.count("\n") > 5
    assert one_line_error(vs("restore", vol, "1", tmp_path / "FULL"), 6)
    assert not (tmp_path / "FULL").exists() and leftovers(tmp_path) == []
    code, out, err = run_bytes("cat", vol, "1", "elsewhere/big.bin")
    assert code == 6 and out == b"" and "digest" in err, err


# --- cat ----------------------------------------------------------------------------------------


def test_cat_byte_for_byte(vol):
    # binary content, a file with holes (as zeros), an empty file, any SNAP form
    for snap in ("1", "latest"):
        code, out, err = run_bytes("cat", vol, snap, "sparse.img")
        assert code == 0 and out == sparse_bytes(), err
    assert run_bytes("cat", vol, "1", "dir/sub/other.bin")[1] == FILES["dir/sub/other.bin"]
    assert run_bytes("cat", vol, "1", "empty")[:2] == (0, b"")
    assert run_bytes("cat", vol, "1", "zlinks/third")[1] == FILES["links/first"]


@pytest.mark.parametrize("path, what", [("dir", "directory"), ("ln", "symlink"),
                                        ("", "directory"), (".", "directory")])
def test_cat_of_a_non_file_refused(vol, path, what):
    code, out, err = run_bytes("cat", vol, "1", path)
    assert code == 1 and out == b"" and what in err and len(err.strip().splitlines()) == 1


def test_cat_missing_and_bad_snapshot(vol):
    code, out, err = run_bytes("cat", vol, "1", "dir/none")
    assert code == 1 and out == b"" and "snapshot 1 has no dir/none" in err
    code, out, err = run_bytes("cat", vol, "9", "top.txt")
    assert code == 1 and out == b"" and "no snapshot '9'" in err


def test_cat_into_a_closed_pipe_is_quiet(tmp_path):
    # a reader that stops early (| head -c 10) ends cat without a traceback or message
    v = tmp_path / "V"
    v.mkdir()
    (v / "big").write_bytes(rnd(3 << 20, 4))
    ok("init", v, "--block-size", "64K")
    ok("snapshot", v)
    p = subprocess.Popen([sys.executable, "-m", "volsync", "cat", str(v), "1", "big"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    assert p.stdout.read(10) == rnd(3 << 20, 4)[:10]
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 1 and err == b"", err


# --- ls -----------------------------------------------------------------------------------------


def test_ls_text_and_json(vol):
    # one line per entry, depth first; type and mode, owner, size, local mtime, path
    text = ok("ls", vol, "1").out.splitlines()
    entries = okj("ls", vol, "1")["entries"]
    assert [e["path"] for e in entries] == [
        "dir", "dir/keep", "dir/sub", "dir/sub/file.txt", "dir/sub/other.bin", "elsewhere",
        "elsewhere/big.bin", "empty", "links", "links/first", "ln", "sparse.img", "top.txt",
        "zlinks", "zlinks/second", "zlinks/third"]
    assert len(text) == len(entries)
    st = os.stat(vol / "dir" / "sub" / "file.txt")
    assert text[3] == (f"-rw-r--r-- {st.st_uid:>6} {st.st_gid:>6} {10_000:>12} "
                       f"{local_iso(st.st_mtime_ns)} dir/sub/file.txt")
    assert re.fullmatch(r"drwxr-x--- +\d+ +\d+ +0 \S+ dir", text[0]), text[0]
    assert re.fullmatch(r"lrwxrwxrwx +\d+ +\d+ +3 \S+ ln -> dir", text[10]), text[10]
    by_path = {e["path"]: e for e in entries}
    f = by_path["dir/sub/file.txt"]
    assert f == {"path": "dir/sub/file.txt", "type": "file", "mode": 0o644,
                 "permissions": "-rw-r--r--", "uid": st.st_uid, "gid": st.st_gid,
                 "size": 10_000, "mtime_ns": st.st_mtime_ns}
    assert by_path["dir"]["type"] == "dir" and by_path["dir"]["mode"] == 0o750
    assert by_path["dir"]["mtime_ns"] == DIR_MTIME
    assert by_path["ln"]["type"] == "symlink" and by_path["ln"]["target"] == "dir"
    assert by_path["sparse.img"]["size"] == len(sparse_bytes())


def test_ls_under_a_path(vol):
    # PATH: what is under it (recursive by default, or one level); a file lists itself
    assert [line.split()[-1] for line in ok("ls", vol, "1", "dir").out.splitlines()] == [
        "dir/keep", "dir/sub", "dir/sub/file.txt", "dir/sub/other.bin"]
    shallow = okj("ls", vol, "latest", "dir/", "--no-recursive")["entries"]
    assert [e["path"] for e in shallow] == ["dir/keep", "dir/sub"]
    assert [e["path"] for e in okj("ls", vol, "1", "top.txt")["entries"]] == ["top.txt"]
    assert okj("ls", vol, "1", "dir/sub", "--no-recursive")["snapshot"]["number"] == 1
    one_line_error(vs("ls", vol, "1", "dir/none"))
    one_line_error(vs("ls", vol, "1", "../x"))
    one_line_error(vs("ls", vol, "1", "ln/sub"))  # a symlink is not followed


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


def test_odd_names_in_ls_restore_cat_verify(odd_vol, tmp_path):
    want = expected_paths()
    lines = ok("ls", odd_vol, "2").out.splitlines()
    entries = okj("ls", odd_vol, "2")["entries"]
    assert len(lines) == len(entries) == len(want) + 1  # and a.txt
    shown = {re.fullmatch(r"\S+ +\S+ +\S+ +\S+ \S+ (.*)", line).group(1) for line in lines}
    assert shown == {quote_path(p.rstrip(b"/")) for p in want} | {"a.txt"}
    check_json_paths(entries, {p.rstrip(b"/") for p in want} | {b"a.txt"})
    # restore and cat of a name with a newline and invalid UTF-8, given as argv bytes
    r = tmp_path / "R"
    res = ok("restore", odd_vol, "2", r, "--path", os.fsdecode(b"d\nir/in\xffside"))
    assert res.out.startswith('restored "d\\nir/in\\377side" of snapshot 2 ')
    assert len(res.out.strip().splitlines()) == 1
    with open(os.path.join(os.fsencode(r), b"d\nir", b"in\xffside"), "rb") as f:
        assert f.read() == b"inside"
    code, out, _ = run_bytes("cat", odd_vol, "2", os.fsdecode(b"bad\xff\xfe"))
    assert code == 0 and out == b"content 5\n"
    err = one_line_error(vs("cat", odd_vol, "2", "new\nline/x"))
    assert '"new\\nline/x"' in err
    # verify names a damaged file by its quoted path, on one line
    damage_first_block(odd_vol, b"D evil.txt\nD other")
    r = vs("verify", odd_vol)
    assert r.code == 6
    bad = [line for line in r.out.splitlines() if "block(s)" in line]
    assert len(bad) == 1 and '"D evil.txt\\nD other"' in bad[0], r.out


# --- remote volumes ---------------------------------------------------------------------------


def scp(path) -> str:
    return f"{HOST}:{os.fspath(path)}"


@pytest.fixture
def shim(monkeypatch, rsh_shim):
    monkeypatch.setenv("VOLSYNC_RSH", rsh_shim)
    monkeypatch.setenv("VOLSYNC_REMOTE_PATH", REMOTE_PATH)
    return rsh_shim


def test_remote_restore_path(shim, vol, tmp_path):
    # DIR is on the volume's machine; the same selection as locally
    r = tmp_path / "R"
    res = okj("restore", scp(vol), "1", r, "--path", "dir/sub/file.txt", "--path", "zlinks/third")
    assert res["paths"] == ["dir/sub/file.txt", "zlinks/third"]
    local = tmp_path / "L"
    ok("restore", vol, "1", local, "--path", "dir/sub/file.txt", "--path", "zlinks/third")
    assert content(r) == content(local)
    assert os.stat(r / "zlinks" / "third").st_nlink == 1
    err = one_line_error(vs("restore", scp(vol), "1", tmp_path / "X", "--path", "dir/nope"))
    assert "snapshot 1 has no dir/nope" in err and not (tmp_path / "X").exists()
    one_line_error(vs("restore", scp(vol), "1", tmp_path / "X", "--path", "../x"))
    assert leftovers(tmp_path) == []


def test_remote_cat(shim, vol, tmp_path):
    # bytes as they are, streamed (a file of several output frames), holes as zeros
    big = tmp_path / "big"
    big.mkdir()
    (big / "f").write_bytes(rnd(3 << 20, 6))
    ok("init", big, "--block-size", "64K")
    ok("snapshot", big)
    code, out, err = run_bytes("cat", scp(big), "1", "f")
    assert code == 0 and out == rnd(3 << 20, 6), err
    code, out, err = run_bytes("cat", scp(vol), "latest", "sparse.img")
    assert code == 0 and out == sparse_bytes(), err
    code, out, err = run_bytes("cat", f"ssh://{HOST}{vol}", "1", "dir")
    assert code == 1 and out == b"" and "directory" in err
    damage_first_block(vol, b"elsewhere/big.bin")
    code, out, err = run_bytes("cat", scp(vol), "1", "elsewhere/big.bin")
    assert code == 6 and out == b"" and len(err.strip().splitlines()) == 1, err


def test_remote_ls_and_diff_match_local(shim, vol, odd_vol):
    # the same text and JSON as on the machine itself, odd names included
    for args in (("ls", "1"), ("ls", "1", "dir", "--no-recursive"), ("ls", "1", "--json")):
        assert vs(args[0], scp(vol), *args[1:]) == vs(args[0], vol, *args[1:])
    for args in (("ls", "2"), ("ls", "2", "--json"), ("diff", "1", "2"),
                 ("diff", "1", "2", "--json")):
        here, there = vs(args[0], odd_vol, *args[1:]), vs(args[0], scp(odd_vol), *args[1:])
        assert there.code == 0 and (there.out, there.err) == (here.out, here.err)
    r = vs("ls", scp(vol), "1", "nope")
    assert r.code == 1 and r.out == "" and "snapshot 1 has no nope" in r.err


def test_remote_read_only_server_serves_ls_and_cat(shim, monkeypatch, vol, tmp_path):
    # ls and cat change nothing: a `serve --read-only` runs them; restore writes: refused
    monkeypatch.setenv("VOLSYNC_REMOTE_PATH", f"{REMOTE_PATH} serve --stdio --read-only #")
    assert [e["path"] for e in okj("ls", scp(vol), "1", "links")["entries"]] == ["links/first"]
    code, out, _ = run_bytes("cat", scp(vol), "1", "top.txt")
    assert code == 0 and out == b"top\n"
    r = vs("restore", scp(vol), "1", tmp_path / "R", "--path", "top.txt")
    assert r.code == 1 and "read-only" in r.err and not (tmp_path / "R").exists()


def test_remote_older_server_without_run_stream(shim, monkeypatch, vol):
    # a far side that does not offer run_stream answers `run` with its whole output as text
    from volsync.remote import client

    hello = client.Connection._hello

    def without_run_stream(self, options):
        hello(self, options)
        self.caps = [c for c in self.caps if c != "run_stream"]

    monkeypatch.setattr(client.Connection, "_hello", without_run_stream)
    assert vs("ls", scp(vol), "1") == vs("ls", vol, "1")
    assert vs("snapshots", scp(vol), "--json").json["snapshots"][0]["number"] == 1
