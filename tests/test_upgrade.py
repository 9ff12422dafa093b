"""`volsync upgrade`: format-1 volumes, made by the format-1 code itself (the commit before
format 2, pinned below), converted in place through the real CLI.

Checked: snapshots (numbers, ids, labels, preserved) and their content survive; `verify` is
clean; a source and its mirror upgraded on their own convert to identical trees and the next
transfer is incremental; every other command refuses a format-1 volume and changes nothing;
a kill at every crash point the upgrade passes leaves a format-1 or a format-2 volume that
verifies, and a rerun completes; a second upgrade changes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORMAT_1_COMMIT = "036cb5e023915cfa86e005398fe6aba3701fe95a"  # the last format-1 code
CRASHED = 137
NON_UTF8 = b"caf\xe9"


# --- running the old and the new code -------------------------------------------------------------

def _env(pythonpath: Path, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VOLSYNC_CRASH_AT", "VOLSYNC_CRASH_TRACE", "VOLSYNC_FAULT")}
    env["PYTHONPATH"] = str(pythonpath)
    env.update(extra or {})
    return env


class Run:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def json(self) -> dict:
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"Run(code={self.code}, out={self.out!r}, err={self.err!r})"


def _run(pythonpath: Path, args, env: dict | None = None) -> Run:
    argv = [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]
    p = subprocess.run([sys.executable, "-m", "volsync", *argv], capture_output=True, text=True,
                       errors="surrogateescape", env=_env(pythonpath, env), timeout=120,
                       check=False)
    return Run(p.returncode, p.stdout, p.stderr)


def new(*args, env: dict | None = None) -> Run:
    """This tree's volsync (format 2)."""
    return _run(ROOT / "src", args, env)


@pytest.fixture(scope="session")
def old_src(tmp_path_factory) -> Path:
    """The format-1 code, extracted from git once per session."""
    dest = tmp_path_factory.mktemp("format1-code")
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", FORMAT_1_COMMIT, "src"],
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"the format-1 code (commit {FORMAT_1_COMMIT[:12]}) is not available")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


@pytest.fixture(scope="session")
def old(old_src):
    """Run the format-1 volsync: old(*args) -> Run."""
    return lambda *args, env=None: _run(old_src, args, env)


# --- directory content ----------------------------------------------------------------------------

def content(root: Path) -> dict:
    """A tree's content as a comparable value (without .volsync/): kind, mode, data or
    target, and mtimes of files and symlinks."""
    out = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        rel_dir = os.path.relpath(dirpath, base)
        if rel_dir == b".":
            dirnames[:] = [d for d in dirnames if d != b".volsync"]
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path), st.st_mtime_ns)
            elif os.path.isdir(path):
                out[rel] = ("dir", st.st_mode & 0o7777)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", f.read(), st.st_mode & 0o7777, st.st_mtime_ns)
    return out


def meta_bytes(vol: Path, skip: tuple[str, ...] = ()) -> dict:
    """Every file under .volsync/ with its bytes (directories as None)."""
    out = {}
    meta = vol / ".volsync"
    for path in sorted(meta.rglob("*")):
        rel = str(path.relative_to(meta))
        if rel in skip:
            continue
        out[rel] = None if path.is_dir() else path.read_bytes()
    return out


def config_version(vol: Path) -> int:
    from volsync.store.codec import envelope_version

    return envelope_version((vol / ".volsync" / "config").read_bytes())


def snapshot_list(run, vol: Path) -> list[dict]:
    r = run("snapshots", vol, "--all", "--json")
    assert r.code == 0, r
    # ("name", pN for a preserved snapshot, is newer than the format-1 listings kept here)
    return [{k: v for k, v in s.items() if k != "name"} for s in r.json["snapshots"]]


# --- the format-1 volumes: built once per session, copied for each test ---------------------------

def _write(root: Path, rel: str | bytes, data: bytes, mode: int = 0o644) -> None:
    path = os.path.join(os.fsencode(root), os.fsencode(rel))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _rnd(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


@pytest.fixture(scope="session")
def fmt1(tmp_path_factory, old) -> dict:
    """A format-1 source SRC (lineage 1 "first", 2, 3 "tip"; another 3, "discarded",
    preserved by a revert) and its mirror MIR (lineage 1, 2, 3), with each snapshot's
    restored content and the snapshot lists, as the format-1 code reports them."""
    base = tmp_path_factory.mktemp("format1-volumes")
    src, mir = base / "src", base / "mir"
    files = {
        "a.txt": b"hello\n",
        "big.bin": _rnd(10 * 4096 + 123, 1),
        "zeros.bin": bytes(5 * 4096 + 100),  # every block of zeros: holes in format 2
        "mixed.bin": bytes(4096) + _rnd(4096, 2) + bytes(8192),
        "long.bin": _rnd(40 * 4096, 3),  # more than 32 blocks: a block-list object
        "sparse.bin": bytes(150 * 4096) + b"tail",  # two levels of lists, the first a hole
        "empty": b"",
        "d/e/deep.txt": b"deep\n",
        "d/private": b"secret\n",
        NON_UTF8: b"latin-1 name\n",
    }
    for rel, data in files.items():
        _write(src, rel, data, 0o600 if rel == "d/private" else 0o644)
    os.symlink("a.txt", src / "link")
    os.symlink("nowhere/at/all", src / "d" / "dangling")
    (src / "emptydir").mkdir()
    os.chmod(src / "d" / "e", 0o750)

    def ok(*args):
        r = old(*args)
        assert r.code == 0, r
        return r

    ok("init", src, "--block-size", "4K")
    ok("snapshot", src, "--label", "first")
    _write(src, "a.txt", b"hello again\n")
    ok("snapshot", src)
    ok("transfer", src, mir)
    _write(src, "d/e/deep.txt", b"changed, then reverted\n")
    ok("snapshot", src, "--label", "discarded")
    ok("revert", src, "2")
    big = bytearray(files["big.bin"])
    big[5 * 4096 : 5 * 4096 + 10] = b"X" * 10
    _write(src, "big.bin", bytes(big))
    ok("snapshot", src, "--label", "tip")
    ok("transfer", src, mir)
    snaps = {v: json.loads(ok("snapshots", v, "--all", "--json").out)["snapshots"]
             for v in (src, mir)}
    restored = {}
    for s in snaps[src]:
        dest = base / f"restore-{s['id']}"
        ok("restore", src, s["id"], dest)
        restored[s["id"]] = content(dest)
    assert [(s["number"], s["preserved"]) for s in snaps[src]] == \
        [(1, False), (2, False), (3, False), (3, True)]
    return {"src": src, "mir": mir, "snapshots": snaps, "restored": restored,
            "live": {v: content(v) for v in (src, mir)}}


def copy_volume(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True)
    return dest


@pytest.fixture
def src(fmt1, tmp_path) -> Path:
    return copy_volume(fmt1["src"], tmp_path / "src")


@pytest.fixture
def mir(fmt1, tmp_path) -> Path:
    return copy_volume(fmt1["mir"], tmp_path / "mir")


def check_upgraded(vol: Path, template: Path, fmt1: dict) -> None:
    """A format-2 volume with the template's snapshots, content and live tree."""
    assert config_version(vol) == 2
    assert not (vol / ".volsync" / "upgrade").exists()
    assert snapshot_list(new, vol) == fmt1["snapshots"][template]
    r = new("verify", vol, "--json")
    assert r.code == 0 and r.json["ok"], r
    assert content(vol) == fmt1["live"][template]


# --- 1. a volume's snapshots and content survive --------------------------------------------------

@pytest.mark.parametrize("hash_name", [None, "xxh3-128"])
def test_upgrade_keeps_snapshots_and_content(fmt1, src, tmp_path, hash_name):
    args = ["upgrade", src, "--json"] + (["--hash", hash_name] if hash_name else [])
    r = new(*args)
    assert r.code == 0, r
    j = r.json
    assert j["status"] == "upgraded" and j["format"] == 2
    assert j["hash"] == (hash_name or "blake3")
    assert j["snapshots"] == 4 and j["holes"] >= 2
    check_upgraded(src, fmt1["src"], fmt1)
    assert not (src / ".volsync" / "statcache").exists()
    for s in fmt1["snapshots"][fmt1["src"]]:
        dest = tmp_path / f"restore-{s['id']}"
        r = new("restore", src, s["id"], dest)
        assert r.code == 0, r
        assert content(dest) == fmt1["restored"][s["id"]], s
    # labels and numbers still name the same snapshots
    r = new("restore", src, "first", tmp_path / "by-label")
    assert r.code == 0 and content(tmp_path / "by-label") == \
        fmt1["restored"][fmt1["snapshots"][fmt1["src"]][0]["id"]]
    # a block of zeros became a hole: nothing stored for zeros.bin
    from volsync.model import HASHES
    from volsync.store.blocklist import block_ids
    from volsync.store.volume import Volume

    vol = Volume.open(src)
    try:
        assert vol.config.hash == (hash_name or "blake3")
        assert vol.config.block_size == 4096
        root = vol.tree(vol.lineage()[-1].root)
        assert root.meta is None
        by_name = {e.name: e for e in root.entries}
        assert all(e.uid is None and e.gid is None and e.xattrs == () for e in root.entries)
        hole = HASHES[vol.config.hash].hole
        zeros = by_name[b"zeros.bin"]
        assert set(block_ids(zeros.ref, zeros.size, vol.fmt, vol.packs.get)) == {hole}
        mixed = by_name[b"mixed.bin"]
        assert list(block_ids(mixed.ref, mixed.size, vol.fmt, vol.packs.get)).count(hole) == 3
    finally:
        vol.packs.close()
    # the upgraded volume is an ordinary format-2 volume: it snapshots and diffs
    assert new("status", src, "--json").json["changed_paths"] == []
    (src / "a.txt").write_bytes(b"after the upgrade\n")
    r = new("snapshot", src, "--json")
    assert r.code == 0 and r.json["number"] == 4, r
    r = new("diff", src, "tip", "4", "--json")
    assert r.code == 0 and r.json["modified"] == ["a.txt"], r


# --- 2. a source and its mirror, upgraded on their own --------------------------------------------

def test_source_and_mirror_upgraded_separately_stay_incremental(fmt1, src, mir):
    assert new("upgrade", mir, "--quiet").code == 0
    assert new("upgrade", src, "--quiet").code == 0
    check_upgraded(src, fmt1["src"], fmt1)
    check_upgraded(mir, fmt1["mir"], fmt1)

    from volsync.store.volume import Volume

    vs, vm = Volume.open(src), Volume.open(mir)
    try:  # converted from content alone: the same tree ids on both sides
        for s in vm.lineage():
            assert vs.snapshot(s.id).root == s.root
    finally:
        vs.packs.close()
        vm.packs.close()

    latest_common = fmt1["snapshots"][fmt1["mir"]][-1]
    big = bytearray((src / "big.bin").read_bytes())
    big[7 * 4096 + 1] ^= 0xFF  # one block changes
    (src / "big.bin").write_bytes(bytes(big))
    r = new("transfer", src, mir, "--json")
    assert r.code == 0, r
    j = r.json
    assert j["common"] == latest_common["number"] and j["common_id"] == latest_common["id"]
    assert j["added"] == [4] and not j["baseline"]
    assert j["blocks_sent"] == 1, j  # only the changed block: everything else was shared
    r = new("verify", mir, "--json")
    assert r.code == 0 and r.json["ok"], r
    assert (mir / "big.bin").read_bytes() == bytes(big)
    assert [s["id"] for s in snapshot_list(new, mir) if not s["preserved"]] == \
        [s["id"] for s in snapshot_list(new, src) if not s["preserved"]]


def test_mirror_upgraded_with_another_hash_is_refused_not_mixed(fmt1, src, mir):
    assert new("upgrade", src).code == 0
    assert new("upgrade", mir, "--hash", "xxh3-128").code == 0
    before = meta_bytes(mir, skip=("lock",))
    r = new("transfer", src, mir, "--json")
    assert r.code != 0, r
    assert meta_bytes(mir, skip=("lock",)) == before
    assert r.code == 1 and len(r.err.strip().splitlines()) == 1, r
    assert "hash" in r.err


# --- 3. other commands refuse a format-1 volume ---------------------------------------------------

def test_other_commands_refuse_format_1(fmt1, src, mir, tmp_path):
    before = {v: meta_bytes(v) for v in (src, mir)}
    live = {v: content(v) for v in (src, mir)}
    fresh = tmp_path / "fresh"
    commands = [
        ("snapshot", src), ("snapshots", src, "--all"), ("status", src), ("diff", src),
        ("restore", src, "1", tmp_path / "restored"), ("revert", src, "1"),
        ("verify", src), ("prune", src, "--keep-last", "1"), ("transfer", src, mir),
        ("transfer", src, fresh), ("resync", src, mir, "--force"), ("break", mir), ("verify", mir),
        ("role-swap", src, mir),
    ]
    for args in commands:
        r = new(*args)
        assert r.code == 1, (args, r)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and "volsync upgrade" in lines[0] and "format-1" in lines[0], \
            (args, r)
        assert "Traceback" not in r.err
        r = new(*args, "--json")
        assert r.code == 1 and r.json["code"] == 1 and "volsync upgrade" in r.json["error"]
    for v in (src, mir):
        assert meta_bytes(v) == before[v]
        assert content(v) == live[v]
    assert not (tmp_path / "restored").exists() and not fresh.exists()


def test_upgrade_refuses_what_is_not_a_format_1_volume(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for target in (plain, tmp_path / "missing"):
        r = new("upgrade", target, "--json")
        assert r.code == 1 and r.json["code"] == 1, r
    assert list(plain.iterdir()) == []


def test_damaged_format_1_volume_is_refused_unchanged(old, src):
    packs = sorted((src / ".volsync" / "packs").glob("*.pack"))
    data = bytearray(packs[0].read_bytes())
    data[len(data) // 2] ^= 0x01  # a bit flips in some block or tree
    packs[0].write_bytes(bytes(data))
    before = meta_bytes(src, skip=("lock",))
    r = new("upgrade", src, "--json")
    assert r.code == 6 and r.json["code"] == 6, r
    assert meta_bytes(src, skip=("lock",)) == before
    assert config_version(src) == 1
    assert old("verify", src).code == 6  # the format-1 code sees the same damage


# --- 4. crash safety: a kill at every crash point -------------------------------------------------

def test_kill_at_every_crash_point(fmt1, old, tmp_path):
    template = fmt1["src"]
    traced = copy_volume(template, tmp_path / "traced")
    trace = tmp_path / "trace"
    r = new("upgrade", traced, env={"VOLSYNC_CRASH_TRACE": str(trace)})
    assert r.code == 0, r
    passages = trace.read_text().split()
    assert {"upgrade-staged", "upgrade-committed", "upgrade-old-removed", "upgrade-moved",
            "upgrade-config-final", "pack-index-committed"} <= set(passages)
    from volsync.store.volume import Volume

    def roots(vol: Path) -> dict:
        v = Volume.open(vol)
        try:
            state = v.state()
            return {i: v.snapshot(i).root for i in state.lineage + state.preserved}
        finally:
            v.packs.close()

    want_roots = roots(traced)
    cases = []
    for name in dict.fromkeys(passages):
        cases += [(name, n) for n in range(1, passages.count(name) + 1)]
    seen_formats = set()
    for i, (name, n) in enumerate(cases):
        vol = copy_volume(template, tmp_path / f"case{i}")
        r = new("upgrade", vol, env={"VOLSYNC_CRASH_AT": f"{name}:{n}"})
        assert r.code == CRASHED, (name, n, r)
        version = config_version(vol)
        seen_formats.add(version)
        if version == 1:  # not committed: the format-1 code still sees an intact volume
            r = old("verify", vol)
            assert r.code == 0, (name, n, r)
            assert json.loads(old("snapshots", vol, "--all", "--json").out)["snapshots"] == \
                fmt1["snapshots"][template]
        else:  # committed: any format-2 command finishes the move first
            assert version == 2, (name, n)
            r = new("verify", vol)
            assert r.code == 0, (name, n, r)
            assert not (vol / ".volsync" / "upgrade").exists()
        r = new("upgrade", vol, "--json")
        assert r.code == 0, (name, n, r)
        check_upgraded(vol, template, fmt1)
        assert roots(vol) == want_roots, (name, n)
        shutil.rmtree(vol)
    assert seen_formats == {1, 2}


def test_interrupted_move_is_finished_by_any_command(fmt1, src):
    r = new("upgrade", src, env={"VOLSYNC_CRASH_AT": "upgrade-old-removed:1"})
    assert r.code == CRASHED, r
    assert not (src / ".volsync" / "packs").exists()  # the move is half done
    assert snapshot_list(new, src) == fmt1["snapshots"][fmt1["src"]]
    check_upgraded(src, fmt1["src"], fmt1)
    r = new("upgrade", src, "--json")
    assert r.code == 0 and r.json["status"] == "already", r


def test_interrupted_staging_is_resumed_with_its_hash(fmt1, src):
    r = new("upgrade", src, "--hash", "xxh3-128",
            env={"VOLSYNC_CRASH_AT": "upgrade-staged:1"})
    assert r.code == CRASHED, r
    assert config_version(src) == 1 and (src / ".volsync" / "upgrade").is_dir()
    staged_packs = {p.name for p in (src / ".volsync" / "upgrade" / "packs").iterdir()}
    r = new("upgrade", src, "--json")  # no --hash: the interrupted run's is resumed
    assert r.code == 0 and r.json["hash"] == "xxh3-128", r
    assert {p.name for p in (src / ".volsync" / "packs").iterdir()} == staged_packs
    check_upgraded(src, fmt1["src"], fmt1)


def test_damaged_staging_is_not_resumed(fmt1, src):
    r = new("upgrade", src, env={"VOLSYNC_CRASH_AT": "upgrade-staged:1"})
    assert r.code == CRASHED, r
    staged = sorted((src / ".volsync" / "upgrade" / "packs").glob("*.pack"))
    data = bytearray(staged[0].read_bytes())
    data[-1] ^= 0x01  # the last record's data rots before the rerun
    staged[0].write_bytes(bytes(data))
    r = new("upgrade", src, "--json")
    assert r.code == 0, r
    assert not {p.name for p in staged} & {p.name for p in (src / ".volsync" / "packs").iterdir()}
    check_upgraded(src, fmt1["src"], fmt1)


# --- 5. upgrading twice --------------------------------------------------------------------------

def test_upgrade_twice_changes_nothing(fmt1, src):
    assert new("upgrade", src).code == 0
    before = meta_bytes(src)
    r = new("upgrade", src)
    assert r.code == 0 and "already" in r.out, r
    r = new("upgrade", src, "--json")
    assert r.code == 0 and r.json["status"] == "already", r
    assert meta_bytes(src) == before
    check_upgraded(src, fmt1["src"], fmt1)


def test_pending_journal_is_carried_over_and_finished(fmt1, old, src):
    """A format-1 revert killed mid-way leaves {"op": "materialize"}: the format-2 code
    finishes it after the upgrade."""
    r = old("revert", src, "1", env={"VOLSYNC_CRASH_AT": "live-entry-written:1"})
    assert r.code == CRASHED, r
    r = new("upgrade", src)
    assert r.code == 0, r
    r = new("status", src, "--json")
    assert r.code == 0 and r.json["pending"] == "materialize", r
    r = new("verify", src)  # finishes the journal under the lock
    assert r.code == 0, r
    r = new("status", src, "--json")
    assert r.json["latest"] == 1 and r.json["changed_paths"] == [] and not r.json["pending"], r
    first = fmt1["snapshots"][fmt1["src"]][0]["id"]
    want = {k: v[:3] if v[0] == "file" else v for k, v in fmt1["restored"][first].items()}
    got = {k: v[:3] if v[0] == "file" else v for k, v in content(src).items()}
    assert got == want


def test_upgrade_reads_format_1_packs_through_a_bounded_pool(fmt1, src, monkeypatch):
    """The format-1 reader keeps no more packs open than a current store (here: one)."""
    from volsync import ops
    from volsync.store import packpool

    assert len(list((src / ".volsync" / "packs").glob("*.pack"))) > 1
    monkeypatch.setattr(packpool, "MAX_OPEN_PACKS", 1)
    ops.upgrade(str(src))
    monkeypatch.undo()
    check_upgraded(src, fmt1["src"], fmt1)
