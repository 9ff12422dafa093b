"""A volume of many packs (each snapshot writes its own, and nothing prunes them) is read under
an ordinary limit of open files: the pool of open packs keeps volsync far below it. And when
the limit is hit anyway, the error says so, exit 1, never the exit 6 of damage."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys

import pytest

from helpers import argv_of, clean_env, content, make_volume, ok, write
from volsync.store.packpool import MAX_OPEN_PACKS
from volsync.store.volume import Volume

PACKS = 1100
STAGES = 11  # snapshots; each also writes a pack of its trees
NOFILE = 256


def limited(soft: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, soft))
    return preexec


def run_limited(*args, soft: int = NOFILE, env_extra: dict | None = None):
    p = subprocess.run([sys.executable, "-m", "volsync", *argv_of(args)], capture_output=True,
                       text=True, env=clean_env(env_extra), preexec_fn=limited(soft),
                       timeout=120, check=False)
    return p


def file_data(i: int) -> bytes:
    return f"file {i}\n".encode() * (i % 7 + 1)


def build(path, monkeypatch, packs: int = PACKS, stages: int = STAGES) -> None:
    """`packs` files, each stored in a pack of its own as a snapshot of one new file would
    store it, over `stages` snapshots (durability is no concern here: fsync is skipped)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)
    make_volume(path)
    per_stage = packs // stages
    for stage in range(stages):
        vol = Volume.open(path)
        with vol.locked():
            for i in range(stage * per_stage, (stage + 1) * per_stage):
                data = file_data(i)
                write(path, {f"d{i // 100}/f{i}": data})
                vol.packs.put(vol.fmt.algo.digest(data), data)
                vol.packs.flush()
        vol.packs.close()
        ok("snapshot", path)
    monkeypatch.undo()


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    path = tmp_path_factory.mktemp("many") / "A"
    with pytest.MonkeyPatch.context() as mp:
        build(path, mp)
    return path


def test_the_volume_has_more_packs_than_the_limit_allows_open(many):
    packs = list((many / ".volsync" / "packs").glob("*.pack"))
    assert len(packs) >= PACKS > 2 * NOFILE > 4 * MAX_OPEN_PACKS


def test_verify_transfer_restore_and_status_under_a_low_limit(many, tmp_path):
    expected = content(many)
    for args in (("verify", many), ("transfer", many, tmp_path / "B"),
                 ("restore", tmp_path / "B", "latest", tmp_path / "r"),
                 ("status", many, "--json")):
        p = run_limited(*args)
        assert p.returncode == 0, (args, p.stdout, p.stderr)
    assert content(tmp_path / "B") == expected  # the live tree the transfer wrote
    assert content(tmp_path / "r") == expected  # and what the mirror's store holds
    assert '"changed": false' in p.stdout or '"changes": []' in p.stdout, p.stdout


def test_too_few_open_files_is_exit_1_and_says_so(many):
    """Below what even the pool needs, reading the volume stops with the limit named."""
    p = run_limited("verify", many, soft=14)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "too many open files (ulimit -n 14)" in p.stderr, p.stderr
    assert "corrupt" not in p.stderr and "damage" not in p.stderr


def test_an_emfile_reading_a_pack_in_a_restore_is_exit_1(many, tmp_path, monkeypatch):
    """EMFILE from the first pack opened by a restore: exit 1, its message naming the limit."""
    from helpers import vs
    from volsync.store import packpool

    real = os.open

    def refusing(path, *args, **kwargs):
        if str(path).endswith(".pack"):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(packpool.os, "open", refusing)
    r = vs("restore", many, "latest", tmp_path / "r")
    monkeypatch.undo()
    assert r.code == 1, r
    assert "too many open files (ulimit -n" in r.err and "while opening pack" in r.err, r


@pytest.fixture(scope="module")
def some(tmp_path_factory):
    """Enough small packs for a prune to merge them (MERGE_SMALL_PACKS is 64)."""
    path = tmp_path_factory.mktemp("some") / "A"
    with pytest.MonkeyPatch.context() as mp:
        build(path, mp, packs=150, stages=3)
    return path


def pack_count(vol) -> int:
    return len(list((vol / ".volsync" / "packs").glob("*.pack")))


@pytest.mark.parametrize("crash", [None, "pack-index-committed:1", "pack-index-dropped:80"])
def test_prune_merges_the_small_packs_and_a_killed_merge_loses_nothing(some, tmp_path, crash):
    import shutil

    from helpers import vs
    vol = tmp_path / "A"
    shutil.copytree(some, vol, symlinks=True)
    assert pack_count(vol) > 150
    expected = content(vol)
    if crash:
        p = run_limited("prune", vol, "--keep-last", "100",
                        env_extra={"VOLSYNC_CRASH_AT": crash})
        assert p.returncode == 137, (p.stdout, p.stderr)
        assert vs("verify", vol).code == 0
        assert content(vol) == expected
    p = run_limited("prune", vol, "--keep-last", "100")  # keeps every snapshot
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert pack_count(vol) <= 65 if crash else pack_count(vol) == 1
    for args in (("verify", vol), ("restore", vol, "latest", tmp_path / "r")):
        p = run_limited(*args)
        assert p.returncode == 0, (args, p.stdout, p.stderr)
    assert content(tmp_path / "r") == expected
