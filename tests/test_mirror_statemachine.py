"""A random walk over three volumes: writes, snapshots, transfers, breaks, resyncs, role-swaps
and reverts, valid and invalid, checked against a small model of modes, upstreams and
lineages. Invariants: a failed command changes nothing; a clean live tree equals its latest
snapshot's content; every snapshot that ever existed stays restorable with its content."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from helpers import content as _content
from helpers import fingerprint, make_volume, okj, vs
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from volsync.store.volume import Volume, is_volume

N = 3


def content(path):
    """Content with mtimes: equal to a snapshot's recording exactly when volsync sees no
    change (a write undone by a delete at the top level is no change, in a subdirectory it
    changes the directory's mtime)."""
    return _content(path, mtimes=True)

VOL = st.integers(0, N - 1)
PATHS = ["f1", "f2", "d/f3", "d/e/f4"]
RO, RW = "read-only", "read-write"


def _strip(c: dict) -> dict:
    return {k: v[:-1] for k, v in c.items()}


class Model:
    """What we expect of one volume."""

    def __init__(self):
        self.mode = RW
        self.upstream: int | None = None
        self.lineage: list[str] = []
        self.preserved: list[str] = []
        self.broken = False  # was once turned from a mirror into a source by `break`


class MirrorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="volsync-sm-"))
        self.paths = [self.tmp / f"V{i}" for i in range(N)]
        self.model: dict[int, Model] = {}
        self.snap_content: dict[str, dict] = {}
        # volumes whose live tree was written since volsync last wrote or captured it: even
        # when the content is back as it was, directory mtimes moved (a change volsync sees)
        self.touched: set[int] = set()
        self.counter = 0
        make_volume(self.paths[0], {"f1": "initial"})
        self.model[0] = Model()
        self._snapshot_ok(0)

    def teardown(self):
        try:
            self._check_all_restorable()
            for i, m in self.model.items():
                if m.mode == RW or not self.dirty(i):
                    r = vs("verify", self.paths[i], "--json")
                    assert r.code == 0 and r.json["ok"], r.out
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # --- helpers ------------------------------------------------------------------------------

    def exists(self, i: int) -> bool:
        return i in self.model

    def dirty(self, i: int) -> bool:
        """The live tree differs from the latest snapshot: its content, or the mtimes of
        directories written in since (a file created and deleted again)."""
        return (i in self.touched
                or content(self.paths[i]) != self.snap_content[self.model[i].lineage[-1]])

    def modified(self, i: int) -> bool:
        """Changed as transfer counts it: anything, mtimes included."""
        return self.dirty(i)

    def expect_preserved(self, i: int, leaving: list[str], live_kept: bool, live) -> None:
        """Preserved = earlier ones not (back) in the lineage, then those leaving it, then the
        live changes (whose id we learn here), each once."""
        m = self.model[i]
        known = [x for x in dict.fromkeys(m.preserved + leaving) if x not in m.lineage]
        disk = list(Volume.open(self.paths[i]).state().preserved)
        assert disk[: len(known)] == known
        assert len(disk) == len(known) + (1 if live_kept else 0)
        if live_kept:
            self.snap_content[disk[-1]] = live
        m.preserved = disk

    def all_fingerprints(self):
        return {i: fingerprint(p) if p.exists() else None for i, p in enumerate(self.paths)}

    def run(self, *args) -> object:
        return vs(*args, "--json")

    def expect_failure(self, want: int, *args) -> None:
        before = self.all_fingerprints()
        r = self.run(*args)
        assert r.code == want, f"{args}: want {want}, got {r.code}: {r.out} {r.err}"
        assert r.json["code"] == want
        assert self.all_fingerprints() == before, f"{args} failed but changed something"

    def _snapshot_ok(self, i: int) -> None:
        live = content(self.paths[i])
        self.touched.discard(i)
        res = okj("snapshot", self.paths[i])
        self.model[i].lineage.append(res["id"])
        self.snap_content[res["id"]] = live

    def _transfer_code(self, s: int, d: int) -> int:
        """The exit code transfer s d must give, from the model alone."""
        if not self.exists(s) or s == d:
            return 1
        if not self.exists(d):
            return 0
        ms, md = self.model[s], self.model[d]
        src_ids = set(ms.lineage)
        shared = [k for k, x in enumerate(md.lineage) if x in src_ids]
        if not shared:
            return 4
        if shared[-1] != len(md.lineage) - 1 or md.mode == RW or self.modified(d):
            return 5
        return 0

    def _resync_code(self, s: int, d: int) -> int:
        if not self.exists(s) or s == d:
            return 1
        if not self.exists(d):
            return 0
        if not set(self.model[s].lineage) & set(self.model[d].lineage):
            return 4
        return 0

    def _apply_mirror(self, kind: str, s: int, d: int, args: list,
                      no_snapshot: bool = False) -> None:
        """Run a transfer or resync expected to succeed and update the model."""
        src_live = content(self.paths[s])
        ms = self.model[s]
        src_snapshots = ms.mode == RW and self.dirty(s) and not no_snapshot
        dst_live = dst_dirty = dst_modified = None
        if self.exists(d):
            dst_live, dst_dirty = content(self.paths[d]), self.dirty(d)
            dst_modified = self.modified(d)
        res = okj(*args)
        self.touched.discard(d)
        if src_snapshots:
            self.touched.discard(s)
            new = Volume.open(self.paths[s]).state().lineage[-1]
            assert new not in ms.lineage and res["src_snapshot"] is not None
            ms.lineage.append(new)
            self.snap_content[new] = src_live
        else:
            assert res["src_snapshot"] is None
        md = self.model.setdefault(d, Model())
        leaving = []
        if md.lineage:
            src_ids = set(ms.lineage)
            common = max(k for k, x in enumerate(md.lineage) if x in src_ids)
            leaving = md.lineage[common + 1:]
            assert kind == "resync" or not (leaving or dst_modified)
        md.lineage = list(ms.lineage)
        self.expect_preserved(d, leaving, kind == "resync" and bool(dst_dirty), dst_live)
        md.mode, md.upstream = RO, s
        # DST's live tree now equals SRC's latest snapshot (mtimes too, unless nothing was
        # to be done), and DST verifies clean
        latest = self.snap_content[ms.lineage[-1]]
        assert _strip(content(self.paths[d])) == _strip(latest)
        if res["added"] or res["preserved"]:
            assert content(self.paths[d]) == latest
        r = vs("verify", self.paths[d], "--json")
        assert r.code == 0 and r.json["ok"], r.out

    # --- rules --------------------------------------------------------------------------------

    @rule(i=VOL, p=st.sampled_from(PATHS), size=st.sampled_from([0, 5, 40, 5000]))
    def write_file(self, i, p, size):
        """Users write (on a mirror too: that is a change transfer must not overwrite)."""
        if not self.exists(i):
            return
        self.counter += 1
        data = (f"{self.counter}:".encode() * (size // 3 + 1))[: max(size, len(str(self.counter)) + 1)]
        target = self.paths[i] / p
        if target.exists() and target.read_bytes() == data:
            data += b"!"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        self.touched.add(i)

    @rule(i=VOL, k=st.integers(0, 50))
    def delete_file(self, i, k):
        if not self.exists(i):
            return
        files = sorted(p for p, v in content(self.paths[i]).items() if v[0] == "f")
        if not files:
            return
        (self.paths[i] / files[k % len(files)]).unlink()
        self.touched.add(i)

    @rule(i=VOL)
    def snapshot(self, i):
        if not self.exists(i) or self.model[i].mode == RO:
            self.expect_failure(1, "snapshot", self.paths[i])
        else:
            self._snapshot_ok(i)

    @rule(s=VOL, d=VOL, no_snapshot=st.booleans())
    def transfer(self, s, d, no_snapshot):
        """SRC's possible new snapshot never is in DST, so it does not change the outcome."""
        args = ["transfer", self.paths[s], self.paths[d]] + (["--no-snapshot"] if no_snapshot else [])
        code = self._transfer_code(s, d)
        if code:
            self.expect_failure(code, *args)
            return
        src_live = content(self.paths[s])
        self._apply_mirror("transfer", s, d, args, no_snapshot)
        assert content(self.paths[s]) == src_live  # SRC's live tree is never touched

    @rule(s=VOL, d=VOL)
    def resync(self, s, d):
        args = ["resync", self.paths[s], self.paths[d], "--force"]
        code = self._resync_code(s, d)
        if code:
            self.expect_failure(code, *args)
        else:
            self._apply_mirror("resync", s, d, args)

    @rule(i=VOL)
    def break_(self, i):
        if self.exists(i) and self.model[i].mode == RW and self.model[i].broken:
            # a rerun of a break that is done: already read-write, exit 0, nothing changes
            before = self.all_fingerprints()
            assert okj("break", self.paths[i])["already_done"]
            assert self.all_fingerprints() == before
            return
        if not self.exists(i) or self.model[i].mode == RW:
            self.expect_failure(1, "break", self.paths[i])
            return
        okj("break", self.paths[i])
        self.model[i].mode, self.model[i].upstream = RW, None
        self.model[i].broken = True

    @rule(a=VOL, b=VOL)
    def role_swap(self, a, b):
        args = ["role-swap", self.paths[a], self.paths[b]]
        if not self.exists(a) or not self.exists(b) or a == b:
            self.expect_failure(1, *args)
            return
        ma, mb = self.model[a], self.model[b]
        if (ma.mode == RO and ma.upstream == b and mb.mode == RW
                and ma.lineage[-1:] == mb.lineage[-1:]):
            before = self.all_fingerprints()
            assert okj(*args)["already_done"]
            assert self.all_fingerprints() == before
            return
        if ma.mode != RW:
            code = 1
        elif mb.mode != RO:
            code = 5
        elif mb.upstream != a:
            code = 1
        else:
            code = self._transfer_code(a, b)
        if code:
            self.expect_failure(code, *args)
            return
        self._apply_mirror("transfer", a, b, args)
        ma.mode, ma.upstream = RO, b
        mb.mode, mb.upstream = RW, None
        assert content(self.paths[a]) == content(self.paths[b])

    @rule(i=VOL, k=st.integers(0, 50))
    def revert(self, i, k):
        if not self.exists(i) or self.model[i].mode == RO:
            return
        m = self.model[i]
        target = k % len(m.lineage)
        live, dirty = content(self.paths[i]), self.dirty(i)
        res = okj("revert", self.paths[i], m.lineage[target])
        self.touched.discard(i)
        later = m.lineage[target + 1:]
        assert len(res["preserved"]) == len(later)
        assert res["live_changes_preserved"] == dirty
        m.lineage = m.lineage[: target + 1]
        self.expect_preserved(i, later, dirty, live)

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def disk_matches_model(self):
        for i, p in enumerate(self.paths):
            assert is_volume(p) == self.exists(i)
            if not self.exists(i):
                continue
            m = self.model[i]
            state = Volume.open(p).state()
            assert state.mode == m.mode
            want_up = str(self.paths[m.upstream]) if m.upstream is not None else None
            assert state.upstream == want_up
            assert list(state.lineage) == m.lineage
            assert list(state.preserved) == m.preserved
            assert state.journal is None

    @invariant()
    def status_agrees_with_model(self):
        """status lists changes when the live tree's content left the latest snapshot's,
        and none when it was not written since."""
        for i, m in self.model.items():
            changed = vs("status", self.paths[i], "--json").json["changed_paths"]
            recorded = self.snap_content[m.lineage[-1]]
            if not self.dirty(i):
                assert not changed
            elif _strip(content(self.paths[i])) != _strip(recorded):
                assert changed

    @invariant()
    def every_snapshot_still_held(self):
        held = set()
        for m in self.model.values():
            held.update(m.lineage, m.preserved)
        assert set(self.snap_content) <= held

    def _check_all_restorable(self):
        for n, (sid, want) in enumerate(self.snap_content.items()):
            holder = next(i for i, m in self.model.items() if sid in m.lineage + m.preserved)
            dest = self.tmp / f"restore-{n}"
            r = vs("restore", self.paths[holder], sid, dest)
            assert r.code == 0, r.err
            assert content(dest) == want, f"snapshot {sid} restored wrong from V{holder}"
            shutil.rmtree(dest)


MirrorMachine.TestCase.settings = settings(
    max_examples=20, stateful_step_count=15, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestMirrorStateMachine = MirrorMachine.TestCase
