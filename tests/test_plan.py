"""The pure planner, in the notation of docs/resync.md: a lineage is drawn as a string of
snapshot tokens, "1 2 3 4 5' 6'", where the token is the snapshot's id and its leading digits
its number. Equal tokens in two lineages are the same snapshot (same id); 5 and 5' are not."""

from __future__ import annotations

import re

import pytest

from volsync.errors import Diverged, NoCommonSnapshot
from volsync.model import (
    BLAKE3,
    BlockId,
    Entry,
    Format,
    Kind,
    Snapshot,
    SnapshotId,
    Tree,
    newest_common,
)
from volsync.plan import (
    RESYNC,
    TRANSFER,
    LineagePlan,
    TransferPlan,
    lineage_picture,
    missing_objects,
    plan_lineages,
)
from volsync.store.blocklist import DIRECT_MAX, FANOUT, build_ref, content_objects
from volsync.store.idarray import empty_objects
from volsync.store.trees import decode_tree, empty_tree_id, encode_tree

ALGO = BLAKE3
EMPTY_TREE_ID = empty_tree_id(ALGO)

# --- notation -----------------------------------------------------------------------------------


def lin(picture: str) -> list[Snapshot]:
    """ "1 2 3 5'" -> snapshots numbered 1 2 3 5 whose ids are the tokens themselves."""
    out = []
    for token in picture.split():
        number = int(re.match(r"\d+", token).group())
        out.append(Snapshot(SnapshotId(token), number, 0.0, None, EMPTY_TREE_ID, 0, 0, "vol"))
    return out


def toks(snaps) -> str:
    return " ".join(s.id for s in snaps)


def plan(kind: str, src: str, dst: str) -> tuple[str | None, str, str]:
    p = plan_lineages(kind, lin(src), lin(dst))
    return (p.common.id if p.common else None, toks(p.add), toks(p.remove))


# --- newest_common ------------------------------------------------------------------------------


@pytest.mark.parametrize("src, dst, common", [
    ("", "", None),
    ("1 2 3", "", None),
    ("", "1 2 3", None),
    ("1 2 3", "1 2 3", "3"),
    ("1 2 3 4 5 6", "1 2 3 4 5' 6'", "4"),
    ("1 2 3", "1' 2' 3'", None),
    ("1 2 3", "1 2 3'", "2"),  # same number, different id: not common
    ("3 4 5", "1 2 3 4", "4"),  # SRC pruned its oldest snapshots
    ("1 3 5 7", "1 2 3 4 5", "5"),  # gaps from pruning on either side
    ("1 2 3 4", "4", "4"),  # DST pruned down to one snapshot
])
def test_newest_common_is_highest_numbered_shared_id(src, dst, common):
    """newest_common: the highest-numbered snapshot whose id is in both lineages."""
    got = newest_common(lin(src), lin(dst))
    assert (got.id if got else None) == common


def test_newest_common_compares_ids_not_numbers():
    """Two snapshot 5s with different ids are not common even if everything else matches."""
    a = lin("1 2 3 4 5")
    b = lin("1 2 3 4") + [Snapshot(SnapshotId("5x"), 5, 0.0, None, EMPTY_TREE_ID, 0, 0, "vol")]
    assert newest_common(a, b).id == "4"


# --- plan_lineages: transfer ----------------------------------------------------------------------


@pytest.mark.parametrize("src, dst, common, add", [
    ("1", "", None, "1"),  # baseline into an empty mirror
    ("1 2 3", "", None, "1 2 3"),
    ("1 2 3 4", "1 2", "2", "3 4"),  # incremental
    ("1 2 3", "1 2 3", "3", ""),  # nothing new
    ("1 3 4", "1 2 3", "3", "4"),  # DST's extra 2 lies before the common snapshot: fine
    ("3 4 5", "1 2 3", "3", "4 5"),  # SRC pruned 1 2
    ("", "", None, ""),
])
def test_transfer_plan_adds_src_snapshots_after_common(src, dst, common, add):
    """transfer: common = newest shared id; add = SRC's snapshots after it; nothing removed."""
    assert plan(TRANSFER, src, dst) == (common, add, "")


@pytest.mark.parametrize("src, dst, common, src_only, dst_only", [
    ("1 2 3 4 5 6", "1 2 3 4 5' 6'", 4, (5, 6), (5, 6)),
    ("1 2 3", "1 2 3 4'", 3, (), (4,)),  # DST ahead with its own snapshot
    ("1 2 3", "1 2 3'", 2, (3,), (3,)),  # same number, different id
    ("1 2", "1 2 3 4", 2, (), (3, 4)),  # DST has snapshots SRC lacks (SRC pruned/reverted)
])
def test_transfer_refuses_divergence_with_exit_5(src, dst, common, src_only, dst_only):
    """transfer: DST snapshots after the common one are divergence (Diverged, exit 5)
    carrying common, src_only and dst_only as numbers."""
    with pytest.raises(Diverged) as info:
        plan_lineages(TRANSFER, lin(src), lin(dst))
    exc = info.value
    assert exc.code == 5
    assert (exc.common, tuple(exc.src_only), tuple(exc.dst_only)) == (common, src_only, dst_only)
    assert "resync" in str(exc)


@pytest.mark.parametrize("kind", [TRANSFER, RESYNC])
@pytest.mark.parametrize("src, dst", [
    ("1 2 3", "1' 2' 3'"),  # unrelated, and would also count as diverged: 4 wins
    ("1 2", "5'"),
    ("", "1'"),  # SRC empty, DST not
    ("4 5", "1 2 3"),  # SRC pruned past everything DST has
])
def test_no_common_snapshot_exit_4_wins(kind, src, dst):
    """No shared id while DST has snapshots: NoCommonSnapshot (exit 4), even where
    divergence (exit 5) would also apply."""
    with pytest.raises(NoCommonSnapshot) as info:
        plan_lineages(kind, lin(src), lin(dst))
    assert info.value.code == 4
    assert not isinstance(info.value, Diverged)


# --- plan_lineages: resync -----------------------------------------------------------------------


@pytest.mark.parametrize("src, dst, common, add, remove", [
    ("1 2 3 4 5 6", "1 2 3 4 5' 6'", "4", "5 6", "5' 6'"),  # the picture of docs/resync.md
    ("1 2 3", "1 2 3 4' 5'", "3", "", "4' 5'"),  # DST ahead: its own ones leave
    ("1 2 3 4", "1 2", "2", "3 4", ""),  # plain catch-up, like transfer
    ("1 2 3", "1 2 3", "3", "", ""),
    ("1 2 3", "", None, "1 2 3", ""),  # baseline
    ("1 2 3 4 5", "1 2 3 4' 5'", "3", "4 5", "4' 5'"),  # same numbers, different ids
])
def test_resync_plan_removes_dst_only_snapshots(src, dst, common, add, remove):
    """resync: DST's snapshots after the common one leave (to be preserved), SRC's join."""
    assert plan(RESYNC, src, dst) == (common, add, remove)


def test_lineage_plan_keeps_snapshot_objects():
    """The plan carries the Snapshot values themselves, oldest first."""
    src, dst = lin("1 2 3 4"), lin("1 2 3'")
    p = plan_lineages(RESYNC, src, dst)
    assert p == LineagePlan(src[1], (src[2], src[3]), (dst[2],))


# --- missing_objects ----------------------------------------------------------------------------

BS = 4096
FMT = Format(ALGO, BS)
HOLE = ALGO.hole


def bid(tag: str) -> BlockId:
    """A fake block id of the format's size (file blocks are never re-hashed by the planner);
    "-" is the hole."""
    return HOLE if tag == "-" else BlockId(tag.encode().ljust(ALGO.size, b"."))


class Store:
    """Trees and block list objects by id, counting reads."""

    def __init__(self):
        self.trees: dict[BlockId, bytes] = {}
        self.lists: dict[BlockId, bytes] = {}
        self.reads: list[BlockId] = []

    def tree(self, *entries: Entry) -> BlockId:
        data = encode_tree(Tree(tuple(sorted(entries, key=lambda e: e.name))))
        tid = BlockId(ALGO.digest(data))
        self.trees[tid] = data
        return tid

    def ref(self, blocks: list[str]) -> bytes:
        """A file's content reference; past DIRECT_MAX blocks its list objects are stored."""
        return build_ref([bid(b) for b in blocks], FMT, self.lists.__setitem__)

    def read(self, oid: BlockId) -> bytes:
        self.reads.append(oid)
        return self.trees[oid] if oid in self.trees else self.lists[oid]


def entry(name: str, kind: Kind, mode: int, size: int, ref: bytes) -> Entry:
    return Entry(name.encode(), kind, mode, 0, 0, 0, size, ref)


def f(name: str, size: int, *blocks: str, store: Store | None = None) -> Entry:
    ref = store.ref(list(blocks)) if store else b"".join(bid(b) for b in blocks)
    return entry(name, Kind.FILE, 0o644, size, ref)


def d(name: str, tree: BlockId) -> Entry:
    return entry(name, Kind.DIR, 0o755, 0, tree)


def link(name: str, target: str) -> Entry:
    return entry(name, Kind.LINK, 0o777, 0, target.encode())


def run_missing(store: Store, have: set, roots: list[BlockId]):
    out, blocks = missing_objects(lambda ids: [store.read(i) for i in ids],
                                  lambda ids: [i in have for i in ids], roots, FMT)
    assert all(length > 0 for _, length in out[:blocks]) and len(out) >= blocks
    return list(out), blocks


def children(store: Store, oid: BlockId) -> list[BlockId]:
    """The objects a tree or list object names directly (holes are not objects)."""
    if oid in store.lists:
        data = store.lists[oid]
        return [k for k in (BlockId(data[i : i + ALGO.size])
                            for i in range(0, len(data), ALGO.size)) if k != HOLE]
    kids = []
    for e in decode_tree(store.trees[oid], oid, FMT).entries:
        if e.kind is Kind.DIR:
            kids.append(BlockId(e.ref))
        elif e.kind is Kind.FILE:
            if FMT.blocks_of(e.size) > DIRECT_MAX:
                kids += [] if e.ref == HOLE else [BlockId(e.ref)]
            else:
                kids += [k for k, _, _ in content_objects(e.ref, e.size, FMT, store.read)]
    return kids


def check_children_first(store: Store, out: list[tuple[BlockId, int]], have: set) -> None:
    """Every tree or list in the send list comes after every object it names that is also
    sent; every object it names is sent or held by DST."""
    pos = {oid: i for i, (oid, _) in enumerate(out)}
    for oid, i in pos.items():
        if oid in store.trees or oid in store.lists:
            for k in children(store, oid):
                if k in pos:
                    assert pos[k] < i, "a child is sent after its parent"
                else:
                    assert k in have or k == EMPTY_TREE_ID, "a needed child is not sent"


def test_missing_objects_sends_everything_children_first_with_lengths():
    """Baseline: every tree and block is sent once, children before parents, block lengths
    from the file size (last block short), the root last."""
    s = Store()
    sub = s.tree(f("x", 10000, "x1", "x2", "x3"), link("l", "../y"))
    root = s.tree(f("a", 5, "a1"), d("sub", sub), f("empty", 0))
    out, blocks = run_missing(s, set(), [root])
    lengths = dict(out)
    assert lengths[bid("x1")] == BS and lengths[bid("x2")] == BS and lengths[bid("x3")] == 1808
    assert lengths[bid("a1")] == 5
    assert lengths[sub] == len(s.trees[sub]) and lengths[root] == len(s.trees[root])
    assert blocks == 4
    assert len(out) == len(lengths) == 6  # 4 blocks + 2 trees, each once
    assert out[-1][0] == root
    check_children_first(s, out, set())


def test_missing_objects_skips_subtrees_dst_has():
    """A tree DST already has is skipped whole: not read, none of its blocks sent."""
    s = Store()
    big = s.tree(f("b", 3 * BS, "b1", "b2", "b3"))
    root = s.tree(d("big", big), f("new", 7, "n1"))
    out, blocks = run_missing(s, {big}, [root])
    assert [oid for oid, _ in out] == [bid("n1"), root]
    assert blocks == 1
    assert big not in s.reads


def test_missing_objects_skips_blocks_dst_has():
    """Blocks DST holds (e.g. from an older snapshot) are not sent; changed ones are."""
    s = Store()
    root = s.tree(f("f", 3 * BS, "k1", "CHANGED", "k3"))
    out, blocks = run_missing(s, {bid("k1"), bid("k3")}, [root])
    assert [oid for oid, _ in out] == [bid("CHANGED"), root]
    assert blocks == 1
    check_children_first(s, out, {bid("k1"), bid("k3")})


def test_missing_objects_sends_each_block_once():
    """A block shared by several files, directories and snapshots is sent once."""
    s = Store()
    sub1 = s.tree(f("a", BS, "same"), f("b", 2 * BS, "same", "same"))
    sub2 = s.tree(f("c", BS, "same"), f("d", 10, "other"))
    root1 = s.tree(d("s1", sub1), f("top", BS, "same"))
    root2 = s.tree(d("s1", sub1), d("s2", sub2))  # the next snapshot shares s1
    out, blocks = run_missing(s, set(), [root1, root2])
    ids = [oid for oid, _ in out]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted([bid("same"), bid("other"), sub1, sub2, root1, root2])
    assert blocks == 2
    assert s.reads.count(sub1) == 1
    check_children_first(s, out, set())


def test_missing_objects_identical_roots_and_empty_tree():
    """The same root twice is planned once; the empty tree is never sent."""
    s = Store()
    root = s.tree(f("a", 1, "a1"))
    out, _ = run_missing(s, set(), [root, root, EMPTY_TREE_ID])
    assert [oid for oid, _ in out] == [bid("a1"), root]
    out, blocks = run_missing(s, set(), [EMPTY_TREE_ID])
    assert len(out) == 0 and blocks == 0


def test_missing_objects_nothing_when_dst_has_root():
    """DST holding the root means nothing at all is sent."""
    s = Store()
    root = s.tree(f("a", 1, "a1"))
    assert run_missing(s, {root}, [root]) == ([], 0)


def test_missing_objects_deep_nesting_order():
    """Deep trees: every level strictly after its child level."""
    s = Store()
    t = s.tree(f("leaf", 3, "leaf"))
    chain = [t]
    for i in range(6):
        t = s.tree(d(f"d{i}", t), f(f"f{i}", 1, f"b{i}"))
        chain.append(t)
    out, blocks = run_missing(s, set(), [t])
    ids = [oid for oid, _ in out]
    assert [ids.index(c) for c in chain] == sorted(ids.index(c) for c in chain)
    assert blocks == 7
    check_children_first(s, out, set())


def test_missing_objects_sends_block_lists_after_their_blocks():
    """A file of more than DIRECT_MAX blocks: its blocks, then its list object (length one id
    per block), then the tree; lists are not counted as file blocks; holes are never sent."""
    s = Store()
    n = DIRECT_MAX + 8
    blocks = [f"L{i}" for i in range(n)]
    blocks[3] = "-"
    size = (n - 1) * BS + 100
    root = s.tree(f("big", size, *blocks, store=s), f("small", 5, "s1"))
    (list_id,) = s.lists
    out, count = run_missing(s, set(), [root])
    lengths = dict(out)
    assert lengths[list_id] == n * ALGO.size
    assert lengths[bid(f"L{n - 1}")] == 100 and lengths[bid("L0")] == BS
    assert HOLE not in lengths
    assert count == n - 1 + 1  # every block but the hole, and s1
    assert len(out) == count + 2  # plus the list and the tree
    assert out[-1][0] == root
    check_children_first(s, out, set())


def test_missing_objects_skips_lists_dst_has_unread():
    """A list object DST holds is skipped whole: not read, none of its blocks sent; a changed
    block of the file sends only the new list and the new block."""
    s = Store()
    n = DIRECT_MAX + 1
    old = [f"o{i}" for i in range(n)]
    new = old[:5] + ["CHANGED"] + old[6:]
    t1 = s.tree(f("big", n * BS, *old, store=s))
    (old_list,) = s.lists
    t2 = s.tree(f("big", n * BS, *new, store=s))
    (new_list,) = set(s.lists) - {old_list}
    have = {t1, old_list} | {bid(b) for b in old}
    out, count = run_missing(s, have, [t1, t2])
    assert [oid for oid, _ in out] == [bid("CHANGED"), new_list, t2]
    assert count == 1
    assert old_list not in s.reads and t1 not in s.reads
    s.reads.clear()
    assert run_missing(s, have | {new_list}, [t2]) == ([(t2, len(s.trees[t2]))], 0)
    assert new_list not in s.reads


def test_missing_objects_two_level_lists_and_all_hole_lists():
    """A file past FANOUT blocks has lists of lists (children first at every level); a list
    covering only holes is not stored, so not sent."""
    s = Store()
    n = FANOUT * 2 + 3
    blocks = ["-"] * FANOUT + [f"b{i}" for i in range(n - FANOUT)]
    root = s.tree(f("huge", n * BS, *blocks, store=s))
    assert len(s.lists) == 3  # two lists of blocks (the all-hole one is not stored), one above
    out, count = run_missing(s, set(), [root])
    ids = [oid for oid, _ in out]
    assert set(s.lists) <= set(ids) and HOLE not in ids
    assert count == n - FANOUT
    check_children_first(s, out, set())


# --- lineage_picture ----------------------------------------------------------------------------


def make_plan(src: str, dst: str, kind=RESYNC) -> TransferPlan:
    s, d_ = lin(src), lin(dst)
    lp = plan_lineages(kind, s, d_)
    return TransferPlan(kind, lp, tuple(s), tuple(d_), empty_objects(ALGO.size), 0, None, False,
                        not d_)


def picture_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


def test_lineage_picture_marks_dst_only_snapshots_with_prime():
    """The picture: SRC's numbers, DST's with a prime on those SRC lacks, the common one."""
    text = lineage_picture(make_plan("1 2 3 4 5 6", "1 2 3 4 5' 6'"), "SRC", "DST")
    assert picture_rows(text) == [
        ["SRC:", "1", "2", "3", "4", "5", "6"],
        ["DST:", "1", "2", "3", "4", "5'", "6'"],
        ["common:", "4"],
    ]


def test_lineage_picture_empty_and_no_common():
    """An empty DST is drawn as (empty) and the common snapshot as none."""
    text = lineage_picture(make_plan("1 2", "", TRANSFER), "SRC", "DST")
    assert picture_rows(text) == [["SRC:", "1", "2"], ["DST:", "(empty)"], ["common:", "none"]]


def test_lineage_picture_aligns_columns():
    """The lineages start in the same column whatever the names' lengths."""
    text = lineage_picture(make_plan("1 2", "1"), "a", "longer-name")
    lines = text.splitlines()
    starts = [len(line) - len(line.split(None, 1)[1]) for line in lines]
    assert len(set(starts)) == 1


def test_preserved_numbers_lists_removed_then_live():
    """The plan's preserved numbers: DST's snapshots leaving the lineage, then its live
    changes' snapshot number."""
    s, d_ = lin("1 2 3 4 5 6"), lin("1 2 3 4 5' 6'")
    lp = plan_lineages(RESYNC, s, d_)
    none = empty_objects(ALGO.size)
    p = TransferPlan(RESYNC, lp, tuple(s), tuple(d_), none, 0, 7, False, False)
    assert p.preserved_numbers == [5, 6, 7] and p.live_changed
    q = TransferPlan(RESYNC, lp, tuple(s), tuple(d_), none, 0, None, False, False)
    assert q.preserved_numbers == [5, 6] and not q.live_changed


def test_missing_objects_asks_a_remote_receiver_per_level_not_per_object():
    """Over ssh each question is a round trip: the planner asks `has` and `read` once per
    tree level with every id of that level (git's have/want), however many objects there
    are; a subtree DST holds is neither asked about below its top nor read."""
    store = Store()
    wide = [f(f"f{i}", 10, f"b{i}") for i in range(300)]
    deep = store.tree(*wide)
    mid = store.tree(d("deep", deep), *[f(f"g{i}", 10, f"c{i}") for i in range(50)])
    kept = store.tree(f("k", 10, "kept"))
    root = store.tree(d("mid", mid), d("kept", kept))
    calls = {"has": [], "read": []}

    def has(ids):
        calls["has"].append(len(ids))
        return [i == kept for i in ids]

    def read(ids):
        calls["read"].append(len(ids))
        return [store.read(i) for i in ids]

    out, blocks = missing_objects(read, has, [root], FMT)
    assert blocks == 350 and len(out) == 353  # three trees: root, mid, deep
    assert len(calls["has"]) <= 4 and len(calls["read"]) <= 4
    assert kept not in store.reads[1:] and bid("kept") not in {o for o, _ in out}
    check_children_first(store, out, {kept})


def _reference_children_first(roots, nodes):
    """The plain post-order (a `done` set, every node a (length, kind, children) tuple)."""
    out, done = [], set()
    for root in roots:
        if root not in nodes or root in done:
            continue
        stack = [(root, False)]
        while stack:
            object_id, expanded = stack.pop()
            if expanded:
                out.append((object_id, *nodes[object_id][:2]))
                continue
            if object_id in done:
                continue
            done.add(object_id)
            stack.append((object_id, True))
            stack.extend((c, False) for c in reversed(nodes[object_id][2])
                         if c in nodes and c not in done)
    return out


@pytest.mark.parametrize("seed", range(200))
def test_children_first_order_on_random_graphs(seed):
    """The post-order of the lists and trees forgets each node once met; the order is still
    the plain post-order's, shared subtrees and cycles (hostile trees) included."""
    import random

    from volsync.store.walk import _children_first

    r = random.Random(seed)
    ids = [bytes([i]) for i in range(r.randint(1, 40))]
    full, compact = {}, {}
    for i in ids:
        if r.random() < 0.2:
            continue  # DST holds it: not a node
        children = [r.choice(ids) for _ in range(r.randint(0, 6))]
        full[i] = compact[i] = (r.randint(1, 99), r.choice(["tree", "list"]), children)
    roots = [r.choice(ids) for _ in range(r.randint(1, 3))]
    assert _children_first(roots, compact) == _reference_children_first(roots, full)


def test_a_wide_level_asks_about_its_blocks_early_with_the_same_result(monkeypatch):
    """A level whose files name more block ids than RUNS_LIMIT asks about them before the
    level ends, even within one read of its trees (its memory stays bounded); what is sent is the same, each block once and
    children first, blocks DST holds left out."""
    from volsync.store import walk

    s = Store()
    n = FANOUT * 3 + 5
    big = [f"B{i % 200}" for i in range(n)]  # repeats: each still sent once
    files = [f(f"s{i}", 2 * BS, f"S{i}", f"B{i}") for i in range(40)]
    root = s.tree(f("big", n * BS, *big, store=s), *files)
    have = {bid("B7"), bid("S3")}
    whole = run_missing(s, have, [root])
    monkeypatch.setattr(walk, "RUNS_LIMIT", 64)
    monkeypatch.setattr(walk, "READ", 3)  # and the level's trees and lists read 3 at a time
    early = run_missing(s, have, [root])
    assert sorted(early[0]) == sorted(whole[0]) and early[1] == whole[1]
    ids = [oid for oid, _ in early[0]]
    assert len(ids) == len(set(ids)) and bid("B7") not in ids and bid("S3") not in ids
    check_children_first(s, early[0], have)
