"""Property test: random trees and edit sequences with snapshots, reverts and restores."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from conftest import read_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volsync import ops, retention
from volsync.store.volume import Volume

NAMES = st.sampled_from([b"a", b"b", b"c", b"d d", b"\xff", b"e.txt"])
PATHS = st.lists(NAMES, min_size=1, max_size=3)
CONTENT = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=3), st.integers(0, 5000)),
)

EDITS = st.one_of(
    st.tuples(st.just("write"), PATHS, CONTENT),
    st.tuples(st.just("append"), PATHS, st.binary(min_size=1, max_size=300)),
    st.tuples(st.just("mkdir"), PATHS),
    st.tuples(st.just("rm"), PATHS),
    st.tuples(st.just("symlink"), PATHS, st.sampled_from([b"a", b"../b", b"/etc/passwd", b"x/y"])),
    st.tuples(st.just("chmod"), PATHS, st.sampled_from([0o600, 0o644, 0o755, 0o700])),
    st.tuples(st.just("age")),
)
OPS = st.one_of(EDITS, st.tuples(st.just("snapshot")))


class Player:
    """Applies edit operations to a live tree, ignoring ones that do not fit it."""

    def __init__(self, root: Path):
        self.root = bytes(root)
        self.clock = int(time.time()) - 10_000

    def path(self, parts: list[bytes]) -> bytes:
        return os.path.join(self.root, *parts)

    def apply(self, op) -> None:
        kind = op[0]
        if kind == "age":
            # distinct old mtimes each time, so the stat cache is trusted and exercised
            self.clock += 7
            for dirpath, dirnames, filenames in os.walk(self.root):
                if dirpath == self.root and b".volsync" in dirnames:
                    dirnames.remove(b".volsync")
                for n in dirnames + filenames:
                    os.utime(os.path.join(dirpath, n), (self.clock, self.clock),
                             follow_symlinks=False)
            return
        path = self.path(op[1])
        parent = os.path.dirname(path)
        if not os.path.isdir(parent) or os.path.islink(parent):
            return
        if kind in ("write", "append"):
            if os.path.isdir(path) and not os.path.islink(path):
                return
            if os.path.islink(path):
                os.unlink(path)
            with open(path, "ab" if kind == "append" else "wb") as f:
                f.write(op[2])
        elif kind == "mkdir":
            if not os.path.lexists(path):
                os.mkdir(path)
        elif kind == "rm":
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
        elif kind == "symlink":
            if not os.path.lexists(path):
                os.symlink(op[2], path)
        elif kind == "chmod" and os.path.lexists(path) and not os.path.islink(path):
            os.chmod(path, op[2])


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops_list=st.lists(OPS, min_size=1, max_size=40), revert_pick=st.integers(0, 1000),
       final_edits=st.lists(EDITS, max_size=4))
def test_snapshots_restore_and_revert(ops_list, revert_pick, final_edits):
    """Every snapshot restores to exactly the tree it captured; revert to any lineage
    snapshot gives that tree; what revert took out stays restorable as preserved snapshots;
    verify stays clean throughout."""
    with tempfile.TemporaryDirectory(prefix="volsync-prop-") as tmp:
        tmp = Path(tmp)
        root = tmp / "vol"
        vol = Volume.create(root, block_size=4096)
        player = Player(root)
        captured: dict[str, dict] = {}  # snapshot id -> tree at that moment

        def take():
            snap, _, _ = ops.take_snapshot(vol)
            captured[snap.id] = read_tree(root, mtimes=True)

        for op in ops_list:
            if op[0] == "snapshot":
                take()
            else:
                player.apply(op)
        take()
        for op in final_edits:
            player.apply(op)
        live_before = read_tree(root, mtimes=True)

        def check_restores(ids):
            for i, sid in enumerate(ids):
                out = tmp / f"restore-{sid}-{i}-{len(os.listdir(tmp))}"
                ops.restore(vol, sid, str(out))
                assert read_tree(out, mtimes=True) == captured[sid], sid
                shutil.rmtree(out)

        state = vol.state()
        assert list(state.lineage) == list(captured)
        check_restores(state.lineage)
        assert ops.verify(vol).ok

        # revert to a lineage snapshot
        lineage = list(state.lineage)
        target = lineage[revert_pick % len(lineage)]
        plan, _ = ops.revert(vol, target)
        assert read_tree(root, mtimes=True) == captured[target]
        after = vol.state()
        keep = lineage[: lineage.index(target) + 1]
        assert list(after.lineage) == keep
        taken_out = lineage[len(keep):]
        assert list(after.preserved[: len(taken_out)]) == taken_out
        extra = list(after.preserved[len(taken_out):])
        assert len(extra) == (1 if plan.live_changed else 0)
        for sid in extra:  # the unsnapshotted live changes
            captured[sid] = live_before
        check_restores(list(after.preserved))
        # the live-changes snapshot holds what the live tree was (mtimes of files included)
        assert ops.verify(vol).ok
        assert not ops.live_changes(vol)[0]

        # the lineage continues; a new snapshot after revert restores too
        player.apply(("write", [b"after-revert"], b"new data"))
        take()
        check_restores(list(vol.state().lineage))

        # prune the preserved snapshots: the lineage still restores, verify stays clean
        retention.prune(vol, keep_last=None, preserved=True)
        assert vol.state().preserved == ()
        check_restores(list(vol.state().lineage))
        assert ops.verify(vol).ok
