"""The stat cache's "racy" rule: which stat keys may be trusted on the next scan."""

from __future__ import annotations

import os

from volsync.tree import RACY_COARSE_NS, RACY_NS, is_racy

NOW = 1_800_000_000_123_456_789


def st(mtime_ns: int, ctime_ns: int) -> os.stat_result:
    # 10 visible fields, then float atime/mtime/ctime, then atime_ns, mtime_ns, ctime_ns
    return os.stat_result((0o100644, 1, 1, 1, 0, 0, 10, 0, 0, 0, 0.0, 0.0, 0.0,
                           0, mtime_ns, ctime_ns))


def test_mtime_differing_from_ctime_is_never_racy():
    # a later write sets both to one stamp, so it cannot reproduce this pair
    assert not is_racy(st(NOW, NOW + 1), NOW)


def test_recent_write_is_racy_old_write_is_not():
    # mtime == ctime within one tick of the scan start: the file may change again unseen
    assert is_racy(st(NOW - RACY_NS // 2, NOW - RACY_NS // 2), NOW)
    assert is_racy(st(NOW + 5, NOW + 5), NOW)
    assert not is_racy(st(NOW - 2 * RACY_NS, NOW - 2 * RACY_NS), NOW)


def test_whole_second_stamps_get_the_coarse_window():
    # a filesystem with whole-second timestamps may lag by up to its granularity
    whole = (NOW // 1_000_000_000 - 1) * 1_000_000_000
    assert is_racy(st(whole, whole), NOW)
    old = whole - RACY_COARSE_NS
    assert not is_racy(st(old, old), NOW)


def test_same_size_rewrite_right_after_snapshot_is_seen(run, make_volume, tmp_path):
    # a file written just before a snapshot and rewritten (same size) right after is read
    # again by the next snapshot, not trusted from the cache
    v = make_volume({"f": "aaaa"})
    (v / "f").write_text("bbbb")
    assert run("snapshot", v).code == 0
    (v / "f").write_text("cccc")
    assert run("snapshot", v).code == 0
    out = tmp_path / "out"
    assert run("restore", v, "latest", out).code == 0
    assert (out / "f").read_text() == "cccc"
