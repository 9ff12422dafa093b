"""The stat cache on a scan that finds nothing changed: what it trusts and what it writes."""

from __future__ import annotations

import os
import time

from helpers import make_volume, ok

from volsync.store.codec import seal
from volsync.store.volume import Volume, unpacked_keys
from volsync.tree import scan


def _settled_volume(tmp_path):
    v = make_volume(tmp_path / "v", {"a": "alpha", "d/b": "beta", "d/e/c": "gamma"})
    time.sleep(0.1)  # past the racy window: the snapshot's keys are all trusted
    ok("snapshot", v)
    return v


def test_a_cached_tree_the_store_lost_is_scanned_again(tmp_path):
    """The cache names a tree the store does not have: the scan does not trust it and finds
    the same root as a scan that trusts nothing."""
    v = _settled_volume(tmp_path)
    vol = Volume.open(v)
    cache = vol.load_statcache()
    cache[b"d"] = [b"\x01" * len(cache[b"d"][0]), *cache[b"d"][1:]]
    vol.save_statcache(cache)
    trusted, _ = scan(Volume.open(v), write=False)
    fresh, _ = scan(Volume.open(v), write=False, trust_cache=False)
    assert trusted.root == fresh.root == vol.snapshot(vol.state().lineage[-1]).root


def test_an_unchanged_scan_says_its_cache_is_unchanged(tmp_path):
    v = _settled_volume(tmp_path)
    result, _ = scan(Volume.open(v), write=False)
    assert not result.cache_changed
    os.utime(v / "d" / "b", ns=(1, 1))
    result, _ = scan(Volume.open(v), write=False)
    assert result.cache_changed


def test_a_snapshot_of_an_unchanged_tree_does_not_rewrite_the_cache(tmp_path):
    v = _settled_volume(tmp_path)
    ok("snapshot", v)  # (a second snapshot of the same tree: the cache settles)
    before = os.stat(v / ".volsync" / "statcache")
    b = tmp_path / "b"
    ok("transfer", v, b)
    after = os.stat(v / ".volsync" / "statcache")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_cache_is_kept_with_each_directory_s_keys_packed(tmp_path):
    """On disk and in memory a directory's keys are one byte string; a cache written before
    (keys as maps) is still trusted, and rewritten packed by the next snapshot."""
    v = _settled_volume(tmp_path)
    vol = Volume.open(v)
    cache = vol.load_statcache()
    assert all(isinstance(value[3], bytes) for value in cache.values())
    unpacked = {rel: [*value[:3], unpacked_keys(value[3])] for rel, value in cache.items()}
    (v / ".volsync" / "statcache").write_bytes(seal("statcache", unpacked))
    result, _ = scan(Volume.open(v), write=False)
    assert result.cache_changed and result.root == vol.snapshot(vol.state().lineage[-1]).root
    assert result.bytes_read == 0  # every file taken from the old cache
