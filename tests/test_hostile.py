"""Hostile input: manifests crafted into a store (names '..', '.', with '/', with NUL, empty,
unsorted or repeated; symlinks pointing outside), and symlinks planted at volsync's own paths
and inside live trees. Nothing is read or written outside the volume, every refusal is a
clear exit code (6 for a bad manifest), never a traceback."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import msgpack
import pytest
from conftest import age_tree, read_tree, write_tree
from helpers import ok, vs

from volsync.model import Snapshot, digest_of
from volsync.ops import new_snapshot_id
from volsync.store.volume import Volume


def outside_view(base: Path, skip: set[str]) -> dict:
    """Every path under base except inside the named volumes, with content hashes and link
    targets: what must not change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(base):
        rel_dir = os.path.relpath(dirpath, base)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, base)
            if rel in skip:
                continue
            st = os.lstat(p)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir", st.st_mode)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", hashlib.sha256(f.read()).hexdigest(), st.st_mode,
                                st.st_mtime_ns)
    return out


PAYLOAD = b"ESCAPED\n"


def raw_tree(entries: list) -> bytes:
    return msgpack.packb(["T1", entries], use_bin_type=True)


def plant(vol_path: Path, root_entries: list, objects: list[bytes] = ()) -> Snapshot:
    """Store crafted objects and a root tree in a volume, and commit a snapshot of it into the
    lineage, through the store's own internals (what a malicious or buggy peer could send)."""
    vol = Volume.open(vol_path)
    with vol.locked():
        for data in objects:
            vol.packs.put(digest_of(data), data)
        root = raw_tree(root_entries)
        root_id = digest_of(root)
        vol.packs.put(root_id, root)
        state = vol.state()
        number = vol.snapshot(state.lineage[-1]).number + 1
        snap = Snapshot(new_snapshot_id(), number, time.time(), None, root_id, len(PAYLOAD), 1,
                        vol.config.volume_id)
        vol.write_snapshot(snap)
        vol.commit(state.with_(lineage=state.lineage + (snap.id,)))
    vol.packs.close()
    return snap


BLOCK = digest_of(PAYLOAD)
INNER = raw_tree([[b"escape", 1, 0o644, 0, len(PAYLOAD), BLOCK]])
INNER_ID = digest_of(INNER)

BAD_NAMES = [b"..", b".", b"/tmp/evil", b"../../outside", b"a/../../b", b"a\0b", b"", b"../"]


def hostile_trees() -> list[tuple[str, list]]:
    cases = []
    for name in BAD_NAMES:
        cases.append((f"dir {name!r}", [[name, 2, 0o755, 0, 0, INNER_ID]]))
        cases.append((f"file {name!r}", [[name, 1, 0o644, 0, len(PAYLOAD), BLOCK]]))
        cases.append((f"link {name!r}", [[name, 3, 0o777, 0, 0, b"../outside"]]))
    ok_entry = [b"ok", 1, 0o644, 0, len(PAYLOAD), BLOCK]
    cases.append(("repeated name", [ok_entry, ok_entry]))
    cases.append(("unsorted", [[b"zz", 1, 0o644, 0, len(PAYLOAD), BLOCK], ok_entry]))
    cases.append(("mode bits beyond 0o7777", [[b"m", 1, 0o104755, 0, len(PAYLOAD), BLOCK]]))
    cases.append(("symlink target with NUL", [[b"l", 3, 0o777, 0, 0, b"/etc\0passwd"]]))
    cases.append(("wrong field type", [[b"t", "1", 0o644, 0, len(PAYLOAD), BLOCK]]))
    cases.append(("dir ref not an id", [[b"d", 2, 0o755, 0, 0, b"../../etc"]]))
    return cases


@pytest.fixture
def world(tmp_path):
    """tmp/src: a read-write volume with one good snapshot; tmp/mir: its mirror;
    tmp/outside: a sentinel directory next to them."""
    src = tmp_path / "src"
    write_tree(src, {"a": "one", "dir": {"b": "two"}})
    age_tree(src)
    ok("init", src)
    ok("snapshot", src)
    ok("transfer", src, tmp_path / "mir")
    write_tree(tmp_path / "outside", {"keep": "sentinel", "sub": {"x": "y"}})
    return tmp_path


@pytest.mark.parametrize("label,entries", hostile_trees(), ids=[c[0] for c in hostile_trees()])
def test_hostile_manifest_refused_everywhere(world, label, entries):
    src, mir = world / "src", world / "mir"
    plant(src, entries, [PAYLOAD, INNER])
    live_src, live_mir = read_tree(src), read_tree(mir)
    before = outside_view(world, {"src", "mir"})

    # transfer (with and without snapshotting SRC first), into a new and an existing mirror
    for args in (["--no-snapshot"], []):
        r = vs("transfer", src, mir, *args)
        assert r.code == 6, (label, r)
        assert "error" in r.err and "Traceback" not in r.err
        assert read_tree(mir) == live_mir
        assert vs("verify", mir).code == 0
    r = vs("transfer", src, world / "new", "--no-snapshot")
    assert r.code == 6, (label, r)
    # restore to a new directory: refused, nothing left behind
    r = vs("restore", src, "2", world / "restored")
    assert r.code == 6, (label, r)
    assert not (world / "restored").exists()
    # revert to it and diff against it: refused (they must read the manifest), changing
    # nothing; verify names it
    lineage = vs("snapshots", src, "--all", "--json").json
    assert vs("revert", src, "2").code == 6
    assert vs("snapshots", src, "--all", "--json").json == lineage
    assert vs("diff", src, "1", "2").code == 6
    assert vs("verify", src).code == 6
    # nothing outside the volumes appeared or changed; the live trees are as they were
    after = outside_view(world, {"src", "mir", "new"})
    assert after == before, label
    assert read_tree(src) == live_src and read_tree(mir) == live_mir
    assert not list(world.rglob("escape"))
    if (world / "new").exists():
        assert read_tree(world / "new") == {}


def test_revert_to_a_hostile_snapshot_refused(world):
    src = world / "src"
    plant(src, [[b"..", 2, 0o755, 0, 0, INNER_ID]], [PAYLOAD, INNER])
    ok_tree = raw_tree([[b"fine", 1, 0o644, 0, len(PAYLOAD), BLOCK]])
    plant(src, msgpack.unpackb(ok_tree)[1], [PAYLOAD])
    before = outside_view(world, {"src", "mir"})
    live = read_tree(src)
    r = vs("revert", src, "2")
    assert r.code == 6, r
    assert read_tree(src) == live and outside_view(world, {"src", "mir"}) == before
    # the well-formed snapshot restores; the hostile one does not
    ok("restore", src, "3", world / "r3")
    assert read_tree(world / "r3") == {b"fine": ("file", PAYLOAD, 0o644)}
    assert vs("restore", src, "2", world / "r2").code == 6


def test_symlink_leaving_the_volume_is_written_never_followed(world):
    """A symlink is content: its target is stored and written back verbatim, never followed,
    even when the next snapshot puts a directory with files where it stood."""
    src, mir = world / "src", world / "mir"
    outside = str(world / "outside")
    plant(src, [[b"a", 1, 0o644, 0, len(PAYLOAD), BLOCK],
                [b"dir", 3, 0o777, 0, 0, outside.encode()]], [PAYLOAD])
    before = outside_view(world, {"src", "mir"})
    ok("transfer", src, mir, "--no-snapshot")
    assert os.readlink(mir / "dir") == outside
    ok("restore", src, "latest", world / "r")
    assert os.readlink(world / "r" / "dir") == outside
    # now a directory named like the link, holding a file: replaces the link, writes inside
    plant(src, [[b"dir", 2, 0o755, 0, 0, INNER_ID]], [PAYLOAD, INNER])
    ok("transfer", src, mir, "--no-snapshot")
    assert not (mir / "dir").is_symlink()
    assert (mir / "dir" / "escape").read_bytes() == PAYLOAD
    assert outside_view(world, {"src", "mir", "r"}) == before
    assert not (world / "outside" / "escape").exists()
    assert vs("verify", mir).code == 0


# --- symlinks planted at volsync's own paths --------------------------------------------------

def _victim(world: Path) -> Path:
    """An outside file that looks like volsync metadata (a copy of the mirror's)."""
    victim = world / "outside" / "victim"
    return victim


@pytest.mark.parametrize("which", ["lock", "state", "config", "statcache", "snapshot", "pack",
                                   "idx"])
def test_symlinked_metadata_file_is_not_followed(world, which):
    src, mir = world / "src", world / "mir"
    meta = src / ".volsync"
    targets = {
        "lock": meta / "lock",
        "state": meta / "state",
        "config": meta / "config",
        "statcache": meta / "statcache",
        "snapshot": next((meta / "snapshots").iterdir()),
        "pack": next((meta / "packs").glob("*.pack")),
        "idx": next((meta / "packs").glob("*.idx")),
    }
    path = targets[which]
    # the outside file holds the same bytes (a valid file, if volsync followed the link)
    victim = world / "outside" / f"victim-{which}"
    victim.write_bytes(path.read_bytes() if path.exists() else b"")
    os.chmod(victim, 0o644)
    path.unlink(missing_ok=True)
    os.symlink(victim, path)
    before = outside_view(world, {"src", "mir", "new"})
    codes = {}
    for args in (["verify", src], ["snapshot", src], ["status", src], ["snapshots", src],
                 ["transfer", src, mir], ["transfer", src, world / "new"],
                 ["verify", src, "--repair-from", mir], ["restore", src, "1", world / "r"]):
        r = vs(*args)
        codes[args[0] + (" repair" if "--repair-from" in args else "")] = r.code
        assert r.code in (0, 1, 3, 6), (which, args, r)
        if r.code:  # one line on stderr, or verify's report
            assert r.err.startswith("volsync: error:") or "FAILED" in r.out, (which, args, r)
    # nothing outside was written; a metadata symlink is refused (integrity) where the file
    # is needed, a stat cache behind a link is no cache
    assert outside_view(world, {"src", "mir", "new", "r"}) == before, codes
    if which == "lock":  # changing commands refuse; reading ones take no lock
        assert codes["snapshot"] == codes["transfer"] == codes["verify repair"] == 6, codes
    if which in ("state", "config", "snapshot"):
        assert codes["verify"] == 6 and codes["snapshot"] == 6, codes
    if which in ("pack", "idx"):
        assert codes["verify"] == 6, codes
    print(which, codes)


@pytest.mark.parametrize("which", ["packs", "snapshots", ".volsync"])
def test_symlinked_metadata_directory_is_refused(world, which):
    src, mir = world / "src", world / "mir"
    real = src / ".volsync" / which if which != ".volsync" else src / ".volsync"
    moved = world / "outside" / f"moved-{which.strip('.')}"
    os.rename(real, moved)
    os.symlink(moved, real)
    before = outside_view(world, {"src", "mir", "new"})
    for args in (["verify", src], ["snapshot", src], ["transfer", src, mir],
                 ["verify", src, "--repair-from", mir], ["status", src]):
        r = vs(*args)
        assert r.code == 6, (which, args, r)
        assert r.err.startswith("volsync: error:") or "FAILED" in r.out
    assert outside_view(world, {"src", "mir", "new"}) == before


def test_planted_temp_names_are_removed_not_followed(world):
    src, mir = world / "src", world / "mir"
    victim = world / "outside" / "keep"
    for where in (src / ".volsync", src / ".volsync" / "packs", src / ".volsync" / "snapshots"):
        os.symlink(victim, where / ".tmp-state-deadbeef")
    os.symlink(world / "outside", mir / ".volsync-tmp-0123456789ab")
    before = outside_view(world, {"src", "mir"})
    (src / "a").write_text("changed")
    ok("transfer", src, mir)
    assert outside_view(world, {"src", "mir"}) == before
    assert not list(src.rglob(".tmp-*"))
    assert os.path.islink(mir / ".volsync-tmp-0123456789ab") or not list(mir.glob(".volsync-tmp-*"))
    assert victim.read_text() == "sentinel"
    assert (mir / "a").read_text() == "changed"
    assert vs("verify", mir).code == 0


# --- symlinks inside live trees ----------------------------------------------------------------

def test_mirror_directory_swapped_for_outside_symlink(world):
    """A directory of a mirror replaced by a symlink to an outside directory: transfer refuses
    (the live tree was modified, exit 5) and verify names it (exit 6), reading nothing through
    it; resync puts a real directory back and writes nothing outside."""
    src, mir = world / "src", world / "mir"
    os.rename(mir / "dir", world / "moved-dir")
    os.symlink(world / "outside", mir / "dir")
    (src / "dir" / "b").write_text("new content")
    (src / "dir" / "sub").mkdir()
    (src / "dir" / "sub" / "deep").write_text("deep")
    before = outside_view(world, {"src", "mir"})
    r = vs("transfer", src, mir)
    assert r.code == 5, r
    r = vs("verify", mir, "--json")
    assert r.code == 6 and any("dir" in e for e in r.json["errors"]), r
    assert outside_view(world, {"src", "mir"}) == before
    r = vs("resync", src, mir)
    assert r.code == 0, r
    assert not (mir / "dir").is_symlink()
    assert (mir / "dir" / "b").read_text() == "new content"
    assert (mir / "dir" / "sub" / "deep").read_text() == "deep"
    assert outside_view(world, {"src", "mir"}) == before
    assert vs("verify", mir).code == 0
    # the swapped-in link was kept as a preserved snapshot (as a link, not what it pointed at)
    snaps = vs("snapshots", mir, "--all", "--json").json["snapshots"]
    kept = [s for s in snaps if s["preserved"]]
    assert kept
    ok("restore", mir, kept[-1]["id"], world / "kept")
    assert os.readlink(world / "kept" / "dir") == str(world / "outside")


def test_source_symlink_to_outside_directory_is_captured_as_link(world):
    src, mir = world / "src", world / "mir"
    os.symlink(world / "outside", src / "out")
    ok("transfer", src, mir)
    assert os.readlink(mir / "out") == str(world / "outside")
    assert not (mir / "out").resolve().is_relative_to(mir)  # a link, never a copy
    assert read_tree(mir) == read_tree(src)


def test_restore_into_symlink_refused(world):
    src = world / "src"
    os.symlink(world / "outside", world / "link-dest")
    before = outside_view(world, {"src", "mir"})
    r = vs("restore", src, "1", world / "link-dest")
    assert r.code == 1 and "exists" in r.err, r
    r = vs("restore", src, "1", world / "link-dest" / "sub")
    assert r.code == 1, r
    assert outside_view(world, {"src", "mir"}) == before
