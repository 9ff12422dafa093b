"""Bit rot: every kind of file in .volsync/ damaged (bit flips at sampled offsets, truncation,
zeroed ranges, deletion) in a source with four snapshots and in its mirror (three snapshots).

For every case: `verify` exits 6 (the stat cache is advisory: verify ignores it and exits 0,
and a snapshot taken over a damaged cache is still exact), names the snapshots and paths a
damaged block or tree belongs to, and changes nothing; `transfer` out of the damaged volume
never passes a bad object on (DST verifies clean, and either holds the exact content or is
unchanged, exit 6); `verify --repair-from OTHER` repairs everything OTHER has (verify clean
afterwards, every snapshot restores exactly) and says what it could not repair (exit 6)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import age_tree, read_tree, spec_to_flat, write_tree
from helpers import ok, vs

from volsync.model import BLAKE3, Kind
from volsync.store.blocklist import DIRECT_MAX, content_objects
from volsync.store.packs import PACK_HEADER, record_struct
from volsync.store.trees import empty_tree_id
from volsync.store.volume import Volume

ALGO = BLAKE3  # the volumes below use the default hash
RECORD = record_struct(ALGO)
EMPTY_TREE_ID = empty_tree_id(ALGO)
BS = 4096

FIXED_MTIME = 1_600_000_000
SEED = 20240607
FLIPS = 20  # sampled bit flips per damaged file (per pack file: spread over its regions)


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --- running the CLI in-process ---------------------------------------------------------------

# --- the template: SRC with snapshots 1-4, MIR a mirror holding 1-3 ---------------------------

SPEC1 = {
    "a.txt": "alpha\n",
    "empty": "",
    "big.bin": rnd(5 * 4096 + 100, 1),
    # more than DIRECT_MAX blocks: its block ids live in a list object (a hole among them)
    "huge.bin": rnd(20 * BS, 10) + bytes(2 * BS) + rnd((DIRECT_MAX - 2) * BS + 77, 11),
    "dir": {"sub": {"x.txt": rnd(3000, 2)}, "link": ("link", "../a.txt"), "e": {}},
    # two identical directories share one tree object: damage to it must name both paths
    "copy1": {"f.bin": rnd(5000, 3)},
    "copy2": {"f.bin": rnd(5000, 3)},
}


def _snap(vol: Path) -> None:
    age_tree(vol, start=FIXED_MTIME)
    ok("snapshot", vol)


@dataclass
class Template:
    base: Path
    expected: dict[str, dict[int, dict]]  # volume -> snapshot number -> read_tree() content
    refs: dict[str, dict[bytes, set[tuple[int, str]]]]  # volume -> object id -> (number, path)
    lists: set[bytes]  # block list objects (of huge.bin)
    unique: set[bytes]  # objects only SRC has (snapshot 4)
    unique_records: set[str]  # snapshot record ids only SRC has


def _walk_refs(vol: Path) -> tuple[dict, dict, set]:
    v = Volume.open(vol)
    assert v.fmt.algo is ALGO and v.fmt.block_size == BS
    refs: dict[bytes, set] = defaultdict(set)
    lists: set[bytes] = set()

    def walk(tree_id: bytes, rel: str, number: int) -> None:
        refs[tree_id].add((number, rel or "/"))
        for e in v.tree(tree_id).entries:
            path = f"{rel}/{os.fsdecode(e.name)}" if rel else os.fsdecode(e.name)
            if e.kind is Kind.DIR:
                walk(e.ref, path, number)
            elif e.kind is Kind.FILE:
                for b, _, is_list in content_objects(e.ref, e.size, v.fmt, v.packs.get):
                    refs[b].add((number, path))
                    if is_list:
                        lists.add(b)

    numbers = {}
    for snap in v.lineage():
        walk(snap.root, "", snap.number)
        numbers[snap.id] = snap.number
    v.packs.close()
    return dict(refs), numbers, lists


@pytest.fixture(scope="module", autouse=True)
def packed_layout():
    """The damage cases are placed by the packed layout's records (the aligned layout, used
    on XFS and btrfs, has its own cases in test_aligned_packs.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VOLSYNC_PACK_LAYOUT", "packed")
        yield


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Template:
    base = tmp_path_factory.mktemp("bitrot-template")
    src, mir = base / "src", base / "mir"
    write_tree(src, SPEC1)
    ok("init", src, "--block-size", "4K")
    expected = {1: spec_to_flat(SPEC1)}
    _snap(src)
    # 2: one block of big.bin and one of huge.bin change (a new list object), a file is added
    big = bytearray(SPEC1["big.bin"])
    big[4096:4200] = rnd(104, 4)
    (src / "big.bin").write_bytes(big)
    huge = bytearray(SPEC1["huge.bin"])
    huge[3 * BS : 3 * BS + 50] = rnd(50, 12)
    (src / "huge.bin").write_bytes(huge)
    (src / "dir" / "new.txt").write_bytes(rnd(2000, 5))
    _snap(src)
    # 3: a file removed, another added
    (src / "a.txt").unlink()
    (src / "c.txt").write_bytes(rnd(7000, 6))
    _snap(src)
    ok("transfer", src, mir)
    # 4: only SRC has it
    (src / "only4.bin").write_bytes(rnd(9000, 7))
    (src / "dir" / "sub" / "x.txt").write_bytes(rnd(3100, 8))
    huge[30 * BS : 30 * BS + 50] = rnd(50, 13)  # a list object only SRC has
    (src / "huge.bin").write_bytes(huge)
    _snap(src)
    expected_src = {}
    for n in (1, 2, 3, 4):
        out = base / f"restore{n}"
        ok("restore", src, n, out)
        expected_src[n] = read_tree(out)
        shutil.rmtree(out)
    assert expected_src[1] == expected[1]
    assert read_tree(mir) == expected_src[3]
    refs_src, rec_src, lists_src = _walk_refs(src)
    refs_mir, rec_mir, lists_mir = _walk_refs(mir)
    unique = set(refs_src) - set(refs_mir)
    assert unique and set(refs_mir) <= set(refs_src)
    # huge.bin's list objects: one per version, the last only in SRC
    assert len(lists_src) == 3 and len(lists_mir) == 2 and lists_src - lists_mir <= unique
    return Template(base, {"src": expected_src, "mir": {n: expected_src[n] for n in (1, 2, 3)}},
                    {"src": refs_src, "mir": refs_mir}, lists_src, unique,
                    set(rec_src) - set(rec_mir))


# --- damage -----------------------------------------------------------------------------------

@dataclass
class Damage:
    kind: str  # flip / truncate / zero / delete
    offset: int = 0
    length: int = 0
    bit: int = 0
    region: str = ""  # for packs: magic / header / data

    def apply(self, path: Path) -> None:
        if self.kind == "delete":
            path.unlink()
            return
        data = bytearray(path.read_bytes())
        if self.kind == "flip":
            data[self.offset] ^= 1 << self.bit
        elif self.kind == "truncate":
            del data[self.offset:]
        elif self.kind == "zero":
            data[self.offset : self.offset + self.length] = bytes(
                len(data[self.offset : self.offset + self.length]))
        path.write_bytes(bytes(data))

    def __str__(self) -> str:
        return f"{self.kind}@{self.offset}" + (f"+{self.length}" if self.length else "") + (
            f" bit {self.bit}" if self.kind == "flip" else "") + (
            f" ({self.region})" if self.region else "")


def pack_records(path: Path) -> list[tuple[bytes, int, int, int]]:
    """(id, header offset, data offset, length) of each record."""
    data = path.read_bytes()
    out, pos = [], len(PACK_HEADER)
    while pos < len(data):
        block_id, length = RECORD.unpack_from(data, pos)
        out.append((block_id, pos, pos + RECORD.size, length))
        pos += RECORD.size + length
    return out


def generic_damages(size: int, rng: random.Random, flips: int = FLIPS) -> list[Damage]:
    offsets = sorted(rng.sample(range(size), min(flips, size)))
    cases = [Damage("flip", o, bit=rng.randrange(8)) for o in offsets]
    cases += [Damage("truncate", 0), Damage("truncate", size // 2), Damage("truncate", size - 1)]
    start = rng.randrange(size // 2)
    cases += [Damage("zero", start, length=min(64, size - start)), Damage("zero", 0, length=size)]
    cases.append(Damage("delete"))
    return cases


def pack_damages(path: Path, rng: random.Random) -> list[Damage]:
    records = pack_records(path)
    size = path.stat().st_size
    cases = []
    for _ in range(2):
        cases.append(Damage("flip", rng.randrange(len(PACK_HEADER)), bit=rng.randrange(8),
                            region="magic"))
    for _ in range(6):  # the record header: id bytes or length bytes
        _, head, _, _ = rng.choice(records)
        cases.append(Damage("flip", head + rng.randrange(RECORD.size), bit=rng.randrange(8),
                            region="header"))
    for _ in range(FLIPS - len(cases)):
        _, _, data, length = rng.choice([r for r in records if r[3]])
        cases.append(Damage("flip", data + rng.randrange(length), bit=rng.randrange(8),
                            region="data"))
    _, head, data, length = rng.choice(records)
    cases += [Damage("truncate", data + length // 2, region="data"),
              Damage("truncate", head + 3, region="header"),
              Damage("truncate", size - 1, region="data"),
              Damage("zero", data + length // 4, length=min(100, length // 2) or 1, region="data"),
              Damage("zero", head, length=RECORD.size, region="header"),
              Damage("delete")]
    return cases


def list_damages(path: Path, lists: set[bytes], rng: random.Random) -> list[Damage]:
    """Damage aimed at the block list objects (of huge.bin) a pack holds: their data flipped
    or zeroed, their record header flipped."""
    cases = []
    for block_id, head, data, length in pack_records(path):
        if block_id not in lists:
            continue
        cases += [Damage("flip", data + rng.randrange(length), bit=rng.randrange(8),
                         region="list"),
                  Damage("zero", data + rng.randrange(length // 2), length=ALGO.size,
                         region="list"),
                  Damage("flip", head + rng.randrange(RECORD.size), bit=rng.randrange(8),
                         region="list header")]
    return cases


def hit_records(path: Path, d: Damage, data_only: bool = False) -> list[bytes]:
    """Ids of the records whose header or data (or only data) the damage touches (a pack)."""
    if d.kind == "delete" or d.region == "magic":
        return [] if data_only and d.kind != "delete" else [r[0] for r in pack_records(path)]
    lo = d.offset
    hi = d.offset + (d.length or 1) if d.kind != "truncate" else 1 << 62
    return [r[0] for r in pack_records(path)
            if (r[2] if data_only else r[1]) < hi and lo < r[2] + r[3]]


def file_kind(rel: str) -> str:
    if rel.endswith(".pack"):
        return "pack"
    if rel.endswith(".idx"):
        return "idx"
    if rel.endswith(".midx"):
        return "midx"  # derived from the .idx files, like the statcache: verify ignores it
    return rel.split("/")[0]


def all_cases(template: Template) -> list[tuple[str, str, Damage]]:
    rng = random.Random(SEED)
    cases = []
    for vol in ("src", "mir"):
        meta = template.base / vol / ".volsync"
        files = ["config", "state", "statcache"]
        files += [f"snapshots/{p.name}" for p in sorted((meta / "snapshots").iterdir())]
        files += [f"packs/{p.name}" for p in sorted((meta / "packs").iterdir())]
        for rel in files:
            path = meta / rel
            kind = file_kind(rel)
            if kind == "pack":
                damages = pack_damages(path, rng) + list_damages(path, template.lists, rng)
            else:
                # several records or indexes: fewer flips each, at least FLIPS per kind
                n = FLIPS if kind in ("config", "state", "statcache") else 8
                damages = generic_damages(path.stat().st_size, rng, n)
            cases += [(vol, rel, d) for d in damages]
    return cases


# --- checking ---------------------------------------------------------------------------------

def fingerprint(vol: Path) -> dict[str, str]:
    """Every file of the volume's metadata (not the lock) and live tree, hashed."""
    out = {}
    for p in sorted(vol.rglob("*")):
        rel = str(p.relative_to(vol))
        if rel == ".volsync/lock" or p.is_dir():
            continue
        out[rel] = os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def named(errors: list[str], number: int, path: str) -> bool:
    """The path is named in that snapshot, or a directory above it whose listing is lost
    (nothing below a lost tree can be named)."""
    parts = path.split("/")
    above = ["/"] + ["/".join(parts[:i]) for i in range(1, len(parts))] if path != "/" else []
    return any(f"snapshot {number} (" in e and (
        f"): {path}: " in e or any(f"): {a}: directory listing" in e or f"): {a}: tree" in e
                                   for a in above)) for e in errors)


STATS: Counter = Counter()


def lineage_numbers(vol: Path) -> list[int]:
    return [s["number"] for s in ok("snapshots", vol, "--json").json["snapshots"]]


def check_case(template: Template, root: Path, vol_name: str, rel: str, d: Damage) -> None:
    shutil.copytree(template.base / "src", root / "src", symlinks=True)
    shutil.copytree(template.base / "mir", root / "mir", symlinks=True)
    vol = root / vol_name
    other = root / ("mir" if vol_name == "src" else "src")
    target = vol / ".volsync" / rel
    kind = file_kind(rel)
    hit = hit_records(target, d) if kind == "pack" else []
    hit_data = hit_records(target, d, data_only=True) if kind == "pack" else []
    pack_ids = [r[0] for r in pack_records(target.with_suffix(".pack"))] if kind in ("pack", "idx") else []
    d.apply(target)
    before_vol, before_other = fingerprint(vol), fingerprint(other)
    label = f"{vol_name}/{rel} {d}"
    key = (kind, d.kind)
    STATS[key + ("tried",)] += 1

    # 1. verify detects it (exit 6), names what is hit, and changes nothing
    r = vs("verify", vol, "--json")
    if kind in ("statcache", "midx"):
        assert r.code == 0, (label, r)
    else:
        assert r.code == 6, (label, r)
        STATS[key + ("detected",)] += 1
        errors = r.json.get("errors", [r.json["error"]])
        assert errors, label
        refs = template.refs[vol_name]
        must_name = hit if kind == "pack" else pack_ids if kind == "idx" else []
        for obj in must_name:
            if obj == EMPTY_TREE_ID:  # implicit: never read from the store
                continue
            for number, path in refs.get(obj, ()):
                assert named(errors, number, path), (label, number, path, errors)
        if kind == "snapshots":
            assert any(rel.split("/")[1][:12] in e for e in errors), (label, errors)
    assert fingerprint(vol) == before_vol and fingerprint(other) == before_other, label

    # 2. transfer out of the damaged volume never passes a bad object on
    new = root / "new"
    t = vs("transfer", vol, new, "--json")
    assert t.code in (0, 6), (label, t)
    # NEW needs every object: a record whose data is hit cannot be sent (the empty tree is
    # implicit, never read)
    must_fail = kind in ("config", "state", "snapshots") or (
        kind == "pack" and d.kind in ("flip", "zero") and set(hit_data) - {EMPTY_TREE_ID})
    if must_fail:
        assert t.code == 6, (label, t)
    if new.exists() and (new / ".volsync").exists():
        assert vs("verify", new).code == 0, label
        if t.code == 0:
            latest = lineage_numbers(new)[-1]
            assert read_tree(new) == template.expected[vol_name][latest], label
        else:
            assert lineage_numbers(new) == [] and read_tree(new) == {}, label
    STATS[key + ("transfer-new-refused",)] += t.code == 6
    if vol_name == "src":
        shutil.copytree(other, root / "mir2", symlinks=True)
        t = vs("transfer", vol, root / "mir2")
        STATS[key + ("transfer-mirror-refused",)] += t.code == 6
        assert t.code in (0, 6), (label, t)
        assert vs("verify", root / "mir2").code == 0, label
        if t.code == 0:
            assert read_tree(root / "mir2") == template.expected["src"][4], label
        else:
            assert lineage_numbers(root / "mir2") == [1, 2, 3], label
            assert read_tree(root / "mir2") == template.expected["src"][3], label
    assert fingerprint(other) == before_other, label

    # 3. repair from the other volume: everything it has comes back, verified
    rep = vs("verify", vol, "--repair-from", other, "--json")
    assert rep.code in (0, 6), (label, rep)
    assert fingerprint(other) == before_other, label
    if kind in ("config", "state"):
        assert rep.code == 6, (label, rep)
        return
    lost_unique = vol_name == "src" and (
        # a record's data lost for good (a damaged header is got round through the index)
        (kind == "pack" and d.kind != "flip" and set(hit_data) & template.unique)
        or (kind == "snapshots" and rel.split("/")[1] in template.unique_records))
    may_lose = vol_name == "src" and kind == "pack" and set(hit) & template.unique
    if rep.code == 0:
        assert not lost_unique, (label, rep)
        STATS[key + ("repaired",)] += 1
        assert vs("verify", vol).code == 0, label
        # verify re-hashed every object of every snapshot; restore the first and the latest
        for number, content in list(template.expected[vol_name].items())[::3]:
            out = root / f"r{number}"
            ok("restore", vol, number, out)
            assert read_tree(out) == content, (label, number)
        assert read_tree(vol) == template.expected[vol_name][max(template.expected[vol_name])]
    else:
        assert lost_unique or may_lose, (label, rep)
        STATS[key + ("unrepairable",)] += 1
        body = rep.json
        assert body["unrepaired"] or any("snapshot" in e for e in body["errors"]), (label, body)
        for note in body["unrepaired"]:  # only what the other volume never had
            what, name = note.split()[0], note.split(":")[0].split()[-1]
            if what == "block":
                assert bytes.fromhex(name) in template.unique, (label, note)
            else:
                assert name in template.unique_records, (label, note)
        assert vs("verify", vol).code == 6, label


@pytest.fixture
def no_fsync(monkeypatch):
    """Durability is not under test here: skip the flushes to disk (hundreds of runs)."""
    import volsync.tree.write

    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)
    monkeypatch.setattr(volsync.tree.write, "syncfs", lambda fd: None)


def test_every_damage_is_detected_and_repaired(template, tmp_path, no_fsync):
    cases = all_cases(template)
    assert len(cases) >= 300
    # every list object of both volumes is damaged (3 in SRC, 2 in MIR)
    assert sum(d.region == "list" and d.kind == "flip" for _, _, d in cases) == 5
    for i, (vol_name, rel, d) in enumerate(cases):
        root = tmp_path / f"c{i}"
        root.mkdir()
        check_case(template, root, vol_name, rel, d)
        shutil.rmtree(root)
    report = defaultdict(dict)
    for (kind, dkind, what), n in sorted(STATS.items()):
        report[f"{kind}/{dkind}"][what] = n
    print("\nbit rot cases:", json.dumps(report, indent=1))
    for (kind, dkind, what), n in STATS.items():
        if what == "tried" and kind not in ("statcache", "midx"):
            assert STATS[(kind, dkind, "detected")] == n


def test_damaged_statcache_never_makes_a_wrong_snapshot(template, tmp_path, no_fsync):
    """The stat cache is advisory: damaged, lost or replaced by garbage, the next snapshot
    still captures the live tree exactly (files are read again)."""
    rng = random.Random(SEED + 1)
    for i, d in enumerate(generic_damages((template.base / "src/.volsync/statcache").stat().st_size,
                                          rng)):
        root = tmp_path / f"s{i}"
        shutil.copytree(template.base / "src", root, symlinks=True)
        (root / "dir" / "sub" / "x.txt").write_bytes(b"changed, same mtime")
        age_tree(root, start=FIXED_MTIME)
        d.apply(root / ".volsync" / "statcache")
        ok("snapshot", root)
        assert vs("verify", root).code == 0
        out = tmp_path / f"s{i}-restored"
        ok("restore", root, "latest", out)
        assert read_tree(out) == read_tree(root)


def _record_of(vol: Path, obj: bytes) -> tuple[Path, int, int]:
    """(pack path, data offset, length) of the stored object."""
    for pack in sorted((vol / ".volsync" / "packs").glob("*.pack")):
        for block_id, _, data, length in pack_records(pack):
            if block_id == obj:
                return pack, data, length
    raise AssertionError("object not stored")


def _refs_at(template: Template, vol: str, path: str) -> list[bytes]:
    return [o for o, where in template.refs[vol].items() if any(p == path for _, p in where)]


def test_shared_block_named_in_every_snapshot_and_repaired(template, tmp_path, no_fsync):
    shutil.copytree(template.base, tmp_path / "t", symlinks=True)
    src, mir = tmp_path / "t" / "src", tmp_path / "t" / "mir"
    # the block of copy1/f.bin and copy2/f.bin (one tree shared by both directories)
    obj = _refs_at(template, "src", "copy1/f.bin")[0]
    pack, off, _ = _record_of(src, obj)
    Damage("flip", off + 10, bit=3).apply(pack)
    r = vs("verify", src)
    assert r.code == 6
    for n in (1, 2, 3, 4):
        for path in ("copy1/f.bin", "copy2/f.bin"):
            assert f"snapshot {n} (" in r.out and named(r.out.splitlines(), n, path), (n, path, r)
    rep = vs("verify", src, "--repair-from", mir)
    assert rep.code == 0, rep
    assert f"repaired: block {obj.hex()} fetched from {mir}" in rep.out
    assert rep.out.strip().splitlines()[-1].startswith("ok:")
    assert vs("verify", src).code == 0


def test_block_only_the_damaged_volume_had_is_reported_unrepaired(template, tmp_path, no_fsync):
    shutil.copytree(template.base, tmp_path / "t", symlinks=True)
    src, mir = tmp_path / "t" / "src", tmp_path / "t" / "mir"
    only = _refs_at(template, "src", "only4.bin")
    good = _refs_at(template, "src", "c.txt")
    for obj in (only[0], good[0]):
        pack, off, length = _record_of(src, obj)
        Damage("zero", off, length=length).apply(pack)
    rep = vs("verify", src, "--repair-from", mir, "--json")
    assert rep.code == 6, rep
    body = rep.json
    assert body["repaired"] == [f"block {good[0].hex()} fetched from {mir}"]
    assert body["unrepaired"] == [f"block {only[0].hex()}: no good copy in {mir}"]
    assert any(e.startswith("snapshot 4 (") and "only4.bin: 1 block(s)" in e
               for e in body["errors"]), body
    assert not any("c.txt" in e for e in body["errors"]), body
    # the lost block stays named by later verifies; everything else restores
    assert vs("verify", src).code == 6
    ok("restore", src, 3, tmp_path / "r3")
    assert read_tree(tmp_path / "r3") == template.expected["src"][3]
    assert vs("restore", src, 4, tmp_path / "r4").code == 6
    assert not (tmp_path / "r4").exists()


def test_damaged_block_list_named_in_every_snapshot_and_repaired(template, tmp_path, no_fsync):
    # a big file's block list object damaged: verify names the file in every snapshot that
    # uses that list, transfer refuses to pass it on, and repair fetches a good copy
    shutil.copytree(template.base, tmp_path / "t", symlinks=True)
    src, mir = tmp_path / "t" / "src", tmp_path / "t" / "mir"
    shared = [o for o in template.lists if o in template.refs["mir"]]
    for obj in shared:
        pack, off, length = _record_of(src, obj)
        assert length == -(-len(SPEC1["huge.bin"]) // BS) * ALGO.size  # one list: every id
        Damage("flip", off + length // 2, bit=5).apply(pack)
    r = vs("verify", src, "--json")
    assert r.code == 6, r
    errors = r.json["errors"]
    for obj in shared:
        for number, path in template.refs["src"][obj]:
            assert path == "huge.bin" and any(
                e.startswith(f"snapshot {number} (") and "huge.bin: block list" in e
                for e in errors), (number, errors)
    assert not any("snapshot 4 (" in e and "huge.bin" in e for e in errors), errors
    t = vs("transfer", src, tmp_path / "new")
    assert t.code == 6, t
    rep = vs("verify", src, "--repair-from", mir, "--json")
    assert rep.code == 0, rep
    assert sorted(rep.json["repaired"]) == sorted(f"block {o.hex()} fetched from {mir}"
                                                  for o in shared)
    assert vs("verify", src).code == 0
    for number in (1, 2, 4):
        ok("restore", src, number, tmp_path / f"r{number}")
        assert read_tree(tmp_path / f"r{number}") == template.expected["src"][number]
