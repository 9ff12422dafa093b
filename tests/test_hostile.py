"""Hostile input: manifests crafted into a store (names '..', '.', with '/', with NUL, empty,
unsorted or repeated; symlinks pointing outside), and symlinks planted at volsync's own paths
and inside live trees. Nothing is read or written outside the volume, every refusal is a
clear exit code (6 for a bad manifest), never a traceback."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
from conftest import age_tree, read_tree, write_tree
from helpers import ok, sub, vs

from volsync.model import BLAKE3, Kind, Snapshot
from volsync.ops import new_snapshot_id
from volsync.store.blocklist import DIRECT_MAX
from volsync.store.trees import MAX_XATTR_VALUE
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


def raw_tree(entries: list, root: list | None = None) -> bytes:
    """A format-2 tree object, encoded by hand (no validation on the way in)."""
    return msgpack.packb(["T2", entries, root], use_bin_type=True)


def entry(name, kind: Kind | int, mode: int, size: int = 0, ref: bytes = b"", uid=0, gid=0,
          mtime: int = 0, xattrs: list | None = None, link=None, rdev: int = 0) -> list:
    """A raw format-2 tree entry: [name, kind, mode, uid, gid, mtime_ns, size, ref, xattrs,
    link, rdev] (any field may be given a wrong type)."""
    return [name, int(kind) if isinstance(kind, Kind) else kind, mode, uid, gid, mtime, size,
            ref, xattrs if xattrs is not None else [], link, rdev]


def file_entry(name, **kw) -> list:
    return entry(name, Kind.FILE, 0o644, len(PAYLOAD), BLOCK, **kw)


def dir_entry(name, ref=None, **kw) -> list:
    return entry(name, Kind.DIR, 0o755, 0, INNER_ID if ref is None else ref, **kw)


def link_entry(name, target: bytes, **kw) -> list:
    return entry(name, Kind.LINK, 0o777, 0, target, **kw)


ROOT_META = [0o755, 0, 0, 0, []]  # a snapshot's top directory carries the root's metadata


def plant(vol_path: Path, root_entries: list, objects: list[bytes] = (),
          root_meta: list | None = ROOT_META) -> Snapshot:
    """Store crafted objects and a root tree in a volume, and commit a snapshot of it into the
    lineage, through the store's own internals (what a malicious or buggy peer could send)."""
    vol = Volume.open(vol_path)
    with vol.locked():
        digest = vol.fmt.algo.digest
        for data in objects:
            vol.packs.put(digest(data), data)
        root = raw_tree(root_entries, root_meta)
        root_id = digest(root)
        vol.packs.put(root_id, root)
        state = vol.state()
        number = vol.snapshot(state.lineage[-1]).number + 1
        snap = Snapshot(new_snapshot_id(), number, time.time(), None, root_id, len(PAYLOAD), 1,
                        vol.config.volume_id)
        vol.write_snapshot(snap)
        vol.commit(state.with_(lineage=state.lineage + (snap.id,)))
    vol.packs.close()
    return snap


ALGO = BLAKE3  # the volumes below are created with the default hash
digest_of = ALGO.digest
BLOCK = digest_of(PAYLOAD)
INNER = raw_tree([entry(b"escape", Kind.FILE, 0o644, len(PAYLOAD), BLOCK)])
INNER_ID = digest_of(INNER)
BS = 64 << 10  # the default block size
LISTED = (DIRECT_MAX + 1) * BS  # a file this big refers to its blocks through a list object

BAD_NAMES = [b"..", b".", b"/tmp/evil", b"../../outside", b"a/../../b", b"a\0b", b"", b"../"]


def hostile_trees() -> list[tuple[str, list, list | None]]:
    cases = []
    for name in BAD_NAMES:
        cases.append((f"dir {name!r}", [dir_entry(name)]))
        cases.append((f"file {name!r}", [file_entry(name)]))
        cases.append((f"link {name!r}", [link_entry(name, b"../outside")]))
    ok_entry = file_entry(b"ok")
    cases.append(("repeated name", [ok_entry, ok_entry]))
    cases.append(("unsorted", [file_entry(b"zz"), ok_entry]))
    cases.append(("mode bits beyond 0o7777", [entry(b"m", Kind.FILE, 0o104755, len(PAYLOAD),
                                                    BLOCK)]))
    cases.append(("symlink target with NUL", [link_entry(b"l", b"/etc\0passwd")]))
    cases.append(("wrong field type", [entry(b"t", "1", 0o644, len(PAYLOAD), BLOCK)]))
    cases.append(("wrong owner type", [file_entry(b"t", uid="0")]))
    cases.append(("negative owner", [file_entry(b"t", gid=-1)]))
    cases.append(("dir ref not an id", [dir_entry(b"d", b"../../etc")]))
    cases.append(("format-1 length id", [entry(b"f", Kind.FILE, 0o644, len(PAYLOAD),
                                               BLOCK[:16])]))
    cases.append(("huge claimed size, one block", [entry(b"f", Kind.FILE, 0o644, 2**62, BLOCK)]))
    # format 2's new fields
    for path in (b"../outside/keep", b"a/../../outside", b"/etc/passwd", b"..", b"a/./b", b""):
        cases.append((f"hard-link group {path!r}", [file_entry(b"a"), file_entry(b"b", link=path)]))
    cases.append(("hard-link group on a dir", [dir_entry(b"d", link=b"a")]))
    cases.append(("top-level .volsync dir", [dir_entry(b".volsync")]))
    cases.append(("top-level .volsync file", [file_entry(b".volsync")]))
    cases.append(("top-level .volsync link", [link_entry(b".volsync", b"../outside")]))
    cases.append(("xattr name with NUL", [file_entry(b"x", xattrs=[[b"user.a\0b", b"v"]])]))
    cases.append(("xattr value oversized",
                  [file_entry(b"x", xattrs=[[b"user.a", b"v" * (MAX_XATTR_VALUE + 1)]])]))
    cases.append(("xattrs unsorted", [file_entry(b"x", xattrs=[[b"user.b", b""],
                                                               [b"user.a", b""]])]))
    cases.append(("xattr not a pair", [file_entry(b"x", xattrs=[[b"user.a"]])]))
    cases.append(("root xattr name with NUL", [file_entry(b"x")],
                  [0o755, 0, 0, 0, [[b"trusted.a\0", b""]]]))
    cases.append(("device with content", [entry(b"null", Kind.CHR, 0o666, len(PAYLOAD), BLOCK,
                                                rdev=os.makedev(1, 3))]))
    cases.append(("device with a size", [entry(b"null", Kind.BLK, 0o666, 4096, b"",
                                               rdev=os.makedev(1, 3))]))
    cases.append(("fifo with content", [entry(b"p", Kind.FIFO, 0o666, 0, BLOCK)]))
    cases.append(("device number on a file", [file_entry(b"f", rdev=os.makedev(1, 3))]))
    for label, ids in LIST_CASES.items():
        cases.append((f"block list {label}", [entry(b"big", Kind.FILE, 0o644, LISTED,
                                                    digest_of(ids))]))
    cases.append(("top-level .volsync, no root metadata", [dir_entry(b".volsync")], None))
    cases.append(("top-level .volsync file, no root metadata", [file_entry(b".volsync")], None))
    return [c if len(c) == 3 else (*c, ROOT_META) for c in cases]


# a list object of the wrong length for the file's size (it needs DIRECT_MAX + 1 ids)
LIST_CASES = {
    "one id short": BLOCK * DIRECT_MAX,
    "one id long": BLOCK * (DIRECT_MAX + 2),
    "cut inside an id": BLOCK * (DIRECT_MAX + 1) + BLOCK[:5],
    "empty": b"",
}
HOSTILE_OBJECTS = [PAYLOAD, INNER, *LIST_CASES.values()]
# cases whose trees are well-formed but whose content (a file's block list) is not: found where
# the content is read (transfer, restore, revert, verify), not by diff
CONTENT_CASES = {"huge claimed size, one block", *(f"block list {k}" for k in LIST_CASES)}


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


@pytest.mark.parametrize("label,entries,root_meta", hostile_trees(),
                         ids=[c[0] for c in hostile_trees()])
def test_hostile_manifest_refused_everywhere(world, label, entries, root_meta):
    src, mir = world / "src", world / "mir"
    plant(src, entries, HOSTILE_OBJECTS, root_meta)
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
    # diff reads every tree; a file's block list is content it compares by id, not reads
    d = vs("diff", src, "1", "2")
    if label in CONTENT_CASES:
        assert d.code in (0, 6) and "Traceback" not in d.err, (label, d)
    else:
        assert d.code == 6, (label, d)
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
    plant(src, [dir_entry(b"..")], [PAYLOAD, INNER])
    ok_tree = raw_tree([file_entry(b"fine")])
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
    plant(src, [file_entry(b"a"), link_entry(b"dir", outside.encode())], [PAYLOAD])
    before = outside_view(world, {"src", "mir"})
    ok("transfer", src, mir, "--no-snapshot")
    assert os.readlink(mir / "dir") == outside
    ok("restore", src, "latest", world / "r")
    assert os.readlink(world / "r" / "dir") == outside
    # now a directory named like the link, holding a file: replaces the link, writes inside
    plant(src, [dir_entry(b"dir")], [PAYLOAD, INNER])
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
    # symlinks planted at volsync's temp names (.tmp-* in its metadata directories, anything in
    # .volsync/tmp/) are removed by the next lock holder, never followed or written through;
    # names like temp files in the live tree are user data, captured and mirrored
    src, mir = world / "src", world / "mir"
    victim = world / "outside" / "keep"
    for where in (src / ".volsync", src / ".volsync" / "packs", src / ".volsync" / "snapshots"):
        os.symlink(victim, where / ".tmp-state-deadbeef")
    for vol in (src, mir):
        tmp = vol / ".volsync" / "tmp"
        os.symlink(victim, tmp / "w-0123456789abcdef")
        os.symlink(world / "outside", tmp / "l-0123456789abcdef")
        (tmp / "d-leftover").mkdir()
        os.symlink(world / "outside", tmp / "d-leftover" / "inner")
    write_tree(src, {".volsync-tmp-0123456789ab": "user data",
                     "dir": {".volsync-tmp-x": "deeper", "sub": {".volsync-tmp-y": "deepest"}}})
    before = outside_view(world, {"src", "mir"})
    (src / "a").write_text("changed")
    ok("transfer", src, mir)
    assert outside_view(world, {"src", "mir"}) == before
    assert not list(src.rglob(".volsync/**/.tmp-*"))
    assert list((src / ".volsync" / "tmp").iterdir()) == []
    assert list((mir / ".volsync" / "tmp").iterdir()) == []
    assert victim.read_text() == "sentinel" and (world / "outside" / "sub" / "x").exists()
    assert (mir / "a").read_text() == "changed"
    assert (mir / ".volsync-tmp-0123456789ab").read_text() == "user data"
    assert (mir / "dir" / ".volsync-tmp-x").read_text() == "deeper"
    assert (mir / "dir" / "sub" / ".volsync-tmp-y").read_text() == "deepest"
    assert read_tree(mir) == read_tree(src)
    assert vs("verify", mir).code == 0 and vs("verify", src).code == 0


LINK_GROUP_CASES = {
    "through a symlink": [link_entry(b"a", b"../outside"), file_entry(b"b", link=b"a/keep")],
    "a symlink": [link_entry(b"a", b"../outside/keep"), file_entry(b"b", link=b"a")],
    "a later member": [file_entry(b"a", link=b"b"), file_entry(b"b", link=b"b")],
    "a directory": [dir_entry(b"a"), file_entry(b"b", link=b"a")],
    "a missing path": [file_entry(b"b", link=b"zz")],
}


@pytest.mark.parametrize("label", list(LINK_GROUP_CASES))
def test_hard_link_group_naming_no_earlier_file_is_refused(world, label):
    # a hard-link group whose path names a symlink, a path through a symlink, a directory, a
    # missing path or a later member is a bad manifest (exit 6); whatever happens, nothing
    # outside is linked to, read or written
    src, mir = world / "src", world / "mir"
    keep = world / "outside" / "keep"
    plant(src, LINK_GROUP_CASES[label], HOSTILE_OBJECTS)
    before = outside_view(world, {"src", "mir", "r"})
    live_mir = read_tree(mir)
    t = vs("transfer", src, mir, "--no-snapshot")
    r = vs("restore", src, "latest", world / "r")
    assert "Traceback" not in t.err + r.err, (t, r)
    assert outside_view(world, {"src", "mir", "r"}) == before
    assert os.stat(keep).st_nlink == 1 and keep.read_text() == "sentinel"
    if t.code != 0:
        assert read_tree(mir) == live_mir
    assert (t.code, r.code) == (6, 6), (t, r)
    assert not (world / "r").exists()


@pytest.mark.parametrize("command", ["restore", "transfer"])
def test_huge_all_hole_file_does_not_hang(world, command):
    # a manifest claiming a file of 2**62 bytes that is all holes (its ref the hole id: no list
    # object to read) is written sparse in bounded time or refused, never iterated block by block
    src = world / "src"
    plant(src, [entry(b"huge", Kind.FILE, 0o644, 2**62, ALGO.hole)], [PAYLOAD])
    before = outside_view(world, {"src", "mir", "r"})
    args = (["restore", src, "latest", world / "r"] if command == "restore"
            else ["transfer", src, world / "mir", "--no-snapshot"])
    try:
        r = sub(*args, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"volsync {command} of a 2**62-byte sparse file ran for over 60 s")
    assert r.code in (0, 1, 6) and "Traceback" not in r.err, r
    assert outside_view(world, {"src", "mir", "r"}) == before


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
