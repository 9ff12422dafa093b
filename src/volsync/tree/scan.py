"""Scan a live tree into tree objects, reading only what the stat cache cannot vouch for.

The stat cache keeps, per directory, its tree id, size, file count and a key per name (for
files: size, mtime, ctime, inode, mode). An entry whose key matches is taken from the cached
tree without reading its data or its xattrs; a directory whose every key matches returns its
cached tree id. A metadata-only change (chmod, chown, setfattr, setfacl, touch) changes ctime,
so it is found without reading data. Everything below the root is reached through directory
fds opened with O_NOFOLLOW, so a directory swapped for a symlink is never followed.

Hard links: a regular file with more than one link is registered by inode in the order the
walk meets it (sorted, depth first: the order in which a live-tree write visits entries). A
group's key is the path of its first member; a group with one member inside the volume (the
other links are outside) records no link. Since that is known only at the end, directories
holding linked files are finished last (their trees are built then, children first).

A file that keeps changing over READ_ATTEMPTS reads, or a file or directory that cannot be
opened (EACCES, EPERM), stops a strict scan with an error naming it. Otherwise it is recorded
as its entry in the volume's latest snapshot if it has one (a busy file with none: the bytes
last read, possibly inconsistent; an unreadable one with none: left out), a `FileWarning` says
so, and its stat key is not kept, so the next scan reads it again. Before retrying a busy file,
a scan clones it (FICLONE into an unnamed temp file in `.volsync/tmp/`) where the filesystem
can, and reads the clone: a consistent copy, no warning. A failing read (EIO) is an error
either way.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import StoreAccessError, VolsyncError
from ..model import (
    BUSY,
    CURRENT,
    PREVIOUS,
    SKIPPED,
    UNREADABLE,
    BlockId,
    Entry,
    FileWarning,
    Kind,
    Tree,
)
from ..quoting import quote_path
from ..store.codec import pack
from ..store.crash import fault
from ..store.trees import META_NAME
from ..store.volume import Volume, packed_keys, unpacked_keys
from .meta import entry_path, read_xattrs
from .objects import Objects

RACY_NS = 50_000_000  # file timestamps lag the clock by at most one tick (<= 10 ms on Linux)
RACY_COARSE_NS = 2_000_000_000  # filesystems with whole-second (or 2 s) timestamps
READ_ATTEMPTS = 5
FILE_KEY, DIR_KEY, LINK_KEY, SPECIAL_KEY = 1, 2, 3, 4
ROOT_KEY_NAME = b""  # the volume root's own key, beside its entries' keys
SPECIAL_KINDS = {stat.S_IFIFO: Kind.FIFO, stat.S_IFCHR: Kind.CHR, stat.S_IFBLK: Kind.BLK}
SEEK_DATA, SEEK_HOLE = getattr(os, "SEEK_DATA", 3), getattr(os, "SEEK_HOLE", 4)
MAX_EXTENTS = 4096
UNREADABLE_ERRNOS = (errno.EACCES, errno.EPERM)
FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)

Progress = Callable[[int], None]


def is_racy(st: os.stat_result, scan_start: int) -> bool:
    """Can a later write leave this stat unchanged? A write sets mtime and ctime to the same
    timestamp, so a key whose mtime differs from its ctime (a file restored with its recorded
    mtime, chmod'ed or renamed since) never matches a later write. A key with mtime == ctime
    could, but only if the file was written within one timestamp tick of the scan's start:
    a file stamped earlier than that was last written before the scan began, and any later
    write gets a newer stamp. Linux stamps files from a clock that lags by at most a tick
    (<= 10 ms); a whole-second stamp suggests a coarse filesystem, given 2 s. A racy key is not
    kept, and the file is read again next time (git's "racy" rule)."""
    if st.st_mtime_ns != st.st_ctime_ns:
        return False
    window = RACY_COARSE_NS if st.st_mtime_ns % 1_000_000_000 == 0 else RACY_NS
    return st.st_mtime_ns >= scan_start - window


def stat_key(st: os.stat_result, scan_start: int, sub_id: bytes = b"") -> list | None:
    """The stat cache's key for any entry, or None when it cannot be trusted (racy)."""
    if is_racy(st, scan_start):
        return None
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return [FILE_KEY, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, mode]
    if stat.S_ISDIR(mode):
        return [DIR_KEY, mode, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, sub_id]
    if stat.S_ISLNK(mode):
        return [LINK_KEY, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return [SPECIAL_KEY, mode, st.st_rdev, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _same_inode_meta(old: list | None, new: list | None) -> bool:
    """Two directory keys that differ at most in their subtree id: the directory's own
    metadata (and so its xattrs) is unchanged."""
    return old is not None and new is not None and old[:5] == new[:5]


@dataclass
class ScanResult:
    root: BlockId
    size: int
    files: int
    cache: dict
    warnings: list[str] = field(default_factory=list)
    bytes_read: int = 0
    file_warnings: list[FileWarning] = field(default_factory=list)
    cache_changed: bool = True  # False: `cache` says what the loaded stat cache said


FS_ENCODING, FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


def _sorted_names(dfd: int) -> list[bytes]:
    """The names in the directory open at `dfd`, as bytes (os.fsencode's), sorted; none if
    it went away. (os.listdir makes no per-entry objects, unlike os.scandir.)"""
    try:
        names = os.listdir(dfd)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted([name.encode(FS_ENCODING, FS_ERRORS) for name in names])


def _same_keys(cached: dict | bytes, keys: dict) -> bool:
    """A directory's cached keys (packed, or a dict) are the keys a scan found now: those
    are in name order already (the root's own key, named b"", first), as `packed_keys`
    packs them, so they are packed as they are."""
    return cached == pack(keys) if isinstance(cached, bytes) else cached == keys


def _cache_differs(new: dict, old: dict) -> bool:
    """Does the stat cache a scan ends with say anything the loaded one did not (or was the
    loaded one written before keys were packed)?"""
    if new.keys() != old.keys() or any(isinstance(v[3], dict) for v in old.values()):
        return True
    return any(v is not old[rel] and (v[:3] != old[rel][:3]
                                      or packed_keys(v[3]) != packed_keys(old[rel][3]))
               for rel, v in new.items())


def _join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


@dataclass
class _Group:
    first: bytes
    count: int = 1


@dataclass
class _Pending:
    """A directory whose tree waits for the hard-link groups to be known."""

    entries: list[Entry]
    linked: dict[bytes, int]  # name -> inode of its group
    keys: dict
    size: int
    files: int
    meta: Entry | None


class Scanner:
    """One pass over a live tree, reading only what the stat cache cannot vouch for. With
    `trust_cache` False every file is read again (verify of a mirror's live tree). With
    `strict` False a busy or unreadable file is recorded otherwise, with a FileWarning.
    `old` is the stat cache to trust (default: the volume's, loaded).

    A directory taken whole from the cache is not looked up in the store as it is met: when
    the scan ends at the latest snapshot's root, every tree under it is that snapshot's, so
    stored; otherwise the cached trees are checked then, and if the store lost one the scan
    runs again without trusting the cache for it."""

    def __init__(self, volume: Volume, objects: Objects, progress: Progress | None = None,
                 trust_cache: bool = True, strict: bool = True, old: dict | None = None):
        self.volume = volume
        self.objects = objects
        self.fmt = volume.fmt
        self.block_size = volume.fmt.block_size
        self.zeros = bytes(self.block_size)
        if old is None:
            old = volume.load_statcache() if trust_cache else {}
        self.old = old
        self.new: dict = {}
        self.hits: list[tuple[bytes, bytes]] = []  # (rel, tree id) taken from the cache
        self.warnings: list[str] = []
        self.bytes_read = 0
        self.progress = progress
        self.scan_start = time.time_ns()
        self.groups: dict[int, _Group] = {}
        self.pending: dict[bytes, _Pending] = {}
        self.placeholders: dict[bytes, bytes] = {}  # rel -> placeholder id until finished
        self.root_dev = 0
        self.strict = strict
        self.file_warnings: list[FileWarning] = []
        self.kept: dict[bytes, tuple[Entry, int, int]] = {}  # rel -> previous entry, totals
        self.unlinked: set[int] = set()  # inodes recorded otherwise than read: no hard link
        self.previous_dirs: dict[bytes, dict[bytes, Entry]] = {}
        self.can_clone = True

    def run(self) -> ScanResult:
        result = self.walk()
        lost = self.lost_hits(result.root)
        if not lost:
            return result
        old = {rel: v for rel, v in self.old.items() if rel not in lost}
        return Scanner(self.volume, self.objects, self.progress, strict=self.strict,
                       old=old).run()

    def lost_hits(self, root: BlockId) -> set[bytes]:
        """The directories taken from the cache whose tree the store does not have (none
        when the scan found the latest snapshot's tree)."""
        if not self.hits or root == self.latest_root():
            return set()
        return {rel for rel, tree_id in self.hits if not self.objects.has(BlockId(tree_id))}

    def latest_root(self) -> BlockId | None:
        """The root of the volume's latest snapshot (None: none, or its record is bad)."""
        state = self.volume.state()
        if not state.lineage:
            return None
        try:
            return self.volume.snapshot(state.lineage[-1]).root
        except StoreAccessError:  # an OS limit reading the store: not damage
            raise
        except VolsyncError:
            return None

    def walk(self) -> ScanResult:
        fd = os.open(os.path.realpath(bytes(self.volume.root)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            st = os.fstat(fd)
            self.root_dev = st.st_dev
            tree_id, size, files = self.scan_dir(b"", fd, st)
        finally:
            os.close(fd)
        if self.pending:
            tree_id = self.finish_pending().get(b"", tree_id)
        return ScanResult(tree_id, size, files, self.new, self.warnings, self.bytes_read,
                          self.file_warnings, _cache_differs(self.new, self.old))

    # --- directories ---------------------------------------------------------------------
    def scan_dir(self, rel: bytes, dfd: int, own: os.stat_result) -> tuple[BlockId, int, int]:
        """Scan the directory open at `dfd` (whose own stat is `own`)."""
        cached = self.old.get(rel)
        keys: dict[bytes, list | None] = {}
        if not rel:
            keys[ROOT_KEY_NAME] = stat_key(own, self.scan_start)
        stats: list[tuple[bytes, os.stat_result]] = []
        sub: dict[bytes, tuple[BlockId, int, int]] = {}
        linked: dict[bytes, int] = {}
        listing = _sorted_names(dfd)
        for name in listing:
            if name == META_NAME and (not rel or self.nested_volume(rel, dfd)):
                continue
            try:
                st = os.lstat(name, dir_fd=dfd)
            except FileNotFoundError:
                continue
            except PermissionError as exc:  # a directory that may be listed, not searched
                if self.keep_previous(rel, name, exc, tuple(Kind)):
                    keys[name] = None
                    stats.append((name, None))
                continue
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                got = self.scan_subdir(_join(rel, name), dfd, name)
                if got is None:  # unreadable: its previous version kept, or left out
                    if _join(rel, name) in self.kept:
                        keys[name] = None
                        stats.append((name, st))
                    continue
                sub[name] = got
                keys[name] = stat_key(st, self.scan_start, sub[name][0])
            elif stat.S_ISSOCK(mode):
                self.warnings.append(f"skipped socket {quote_path(_join(rel, name))}")
                continue
            else:
                keys[name] = stat_key(st, self.scan_start)
                if stat.S_ISREG(mode) and st.st_nlink > 1 and st.st_dev == self.root_dev:
                    linked[name] = self.register_link(st.st_ino, _join(rel, name))
            stats.append((name, st))
        pending_sub = any(_join(rel, n) in self.placeholders for n in sub)
        if (cached and not linked and not pending_sub and None not in keys.values()
                and _same_keys(cached[3], keys)):
            self.hits.append((rel, cached[0]))
            self.new[rel] = cached
            return BlockId(cached[0]), cached[1], cached[2]
        return self.build_dir(rel, dfd, own, stats, keys, sub, cached, linked, pending_sub)

    def nested_volume(self, rel: bytes, dfd: int) -> bool:
        """Another volume's metadata below the root is never captured."""
        try:
            os.lstat(META_NAME + b"/config", dir_fd=dfd)
        except OSError:
            return False
        self.warnings.append(f"skipped the volume metadata of nested volume "
                             f"{quote_path(rel)} ({quote_path(_join(rel, META_NAME))})")
        return True

    def register_link(self, ino: int, path: bytes) -> int:
        group = self.groups.get(ino)
        if group is None:
            self.groups[ino] = _Group(path)
        else:
            group.count += 1
        return ino

    def scan_subdir(self, rel: bytes, dfd: int, name: bytes) -> tuple[BlockId, int, int] | None:
        """The directory's tree and totals; None when it cannot be opened (see
        `keep_previous`)."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in UNREADABLE_ERRNOS:
                parent, _, _ = rel.rpartition(b"/")
                self.keep_previous(parent, name, exc, (Kind.DIR,))
                return None
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            # removed or replaced since its lstat: captured as it was then, empty
            return self.objects.put_tree(Tree(())), 0, 0
        try:
            return self.scan_dir(rel, fd, os.fstat(fd))
        finally:
            os.close(fd)

    def build_dir(self, rel, dfd, own, stats, keys, sub, cached, linked, pending_sub
                  ) -> tuple[BlockId, int, int]:
        old_tree = self.cached_tree(cached)
        old_entries = {e.name: e for e in old_tree.entries}
        old_keys = unpacked_keys(cached[3]) if cached else {}
        entries: list[Entry] = []
        size = files = 0
        for name, st in stats:
            kept = self.kept.pop(_join(rel, name), None)
            if kept is not None:  # could not be read: its previous version
                entries.append(kept[0])
                size, files = size + kept[1], files + kept[2]
                continue
            old = old_entries.get(name)
            same = old is not None and old_keys.get(name) == keys[name] and keys[name] is not None
            if stat.S_ISDIR(st.st_mode):
                sub_id, sub_size, sub_files = sub[name]
                size, files = size + sub_size, files + sub_files
                xattrs = (old.xattrs if old is not None
                          and _same_inode_meta(old_keys.get(name), keys[name])
                          else read_xattrs(entry_path(dfd, name)))
                entries.append(_entry(name, Kind.DIR, st, 0, sub_id, xattrs))
                continue
            if same:
                entry = old.with_(link=None)
            else:
                got = self.read_entry(rel, dfd, name, st)
                if got is None:
                    continue
                entry, keys[name] = got
            if entry.kind is Kind.FILE:
                size, files = size + entry.size, files + 1
            entries.append(entry)
        meta = self.root_meta(dfd, own, cached, old_tree) if not rel else None
        names = {e.name for e in entries}
        keys = {k: v for k, v in keys.items() if k == ROOT_KEY_NAME or k in names}
        if linked or pending_sub:
            self.pending[rel] = _Pending(entries, linked, keys, size, files, meta)
            placeholder = self.placeholder(rel)
            return BlockId(placeholder), size, files
        tree_id = self.objects.put_tree(Tree(tuple(entries), meta))
        self.new[rel] = [tree_id, size, files, packed_keys(keys)]
        return tree_id, size, files

    def placeholder(self, rel: bytes) -> bytes:
        n = len(self.placeholders) + 1
        value = b"\xffpending" + n.to_bytes(8, "big")
        value = value.ljust(self.fmt.algo.size, b"\xff")
        self.placeholders[rel] = value
        return value

    def root_meta(self, dfd: int, own: os.stat_result, cached, old_tree: Tree) -> Entry:
        old_key = unpacked_keys(cached[3]).get(ROOT_KEY_NAME) if cached else None
        new_key = stat_key(own, self.scan_start)
        if old_tree.meta is not None and new_key is not None and old_key == new_key:
            xattrs = old_tree.meta.xattrs
        else:
            xattrs = read_xattrs(dfd)
        return _entry(b"", Kind.DIR, own, 0, b"", xattrs)

    def finish_pending(self) -> dict[bytes, BlockId]:
        """Build the trees that waited for the hard-link groups, children first."""
        final: dict[bytes, BlockId] = {}
        by_placeholder: dict[bytes, BlockId] = {}
        for rel, p in self.pending.items():  # insertion order: children before parents
            entries = []
            for e in p.entries:
                if e.kind is Kind.FILE and e.name in p.linked:
                    ino = p.linked[e.name]
                    group = self.groups[ino]
                    linked = group.count > 1 and ino not in self.unlinked
                    e = e.with_(link=group.first if linked else None)
                elif e.kind is Kind.DIR and e.ref in by_placeholder:
                    e = e.with_(ref=by_placeholder[e.ref])
                entries.append(e)
            keys = dict(p.keys)
            for name, key in keys.items():
                if key and key[0] == DIR_KEY and key[5] in by_placeholder:
                    keys[name] = key[:5] + [by_placeholder[key[5]]]
            tree_id = self.objects.put_tree(Tree(tuple(entries), p.meta))
            by_placeholder[self.placeholders[rel]] = tree_id
            final[rel] = tree_id
            self.new[rel] = [tree_id, p.size, p.files, packed_keys(keys)]
        return final

    def cached_tree(self, cached) -> Tree:
        if not cached:
            return Tree(())
        try:
            return self.objects.tree(BlockId(cached[0]))
        except StoreAccessError:  # an OS limit reading the store: not damage
            raise
        except VolsyncError:
            return Tree(())

    # --- entries -------------------------------------------------------------------------
    def read_entry(self, rel: bytes, dfd: int, name: bytes, st: os.stat_result
                   ) -> tuple[Entry, list | None] | None:
        """The entry and its stat key, or None when it vanished since its lstat."""
        mode = st.st_mode
        if stat.S_ISREG(mode):
            return self.read_file(rel, dfd, name, st.st_ino)
        path = entry_path(dfd, name)
        try:
            xattrs = read_xattrs(path)
            if stat.S_ISLNK(mode):
                target = os.readlink(name, dir_fd=dfd)
                return _entry(name, Kind.LINK, st, 0, target, xattrs), stat_key(st, self.scan_start)
        except FileNotFoundError:
            return None  # removed since its lstat: not in this snapshot
        kind = SPECIAL_KINDS[stat.S_IFMT(mode)]
        entry = _entry(name, kind, st, 0, b"", xattrs,
                       rdev=st.st_rdev if kind is not Kind.FIFO else 0)
        return entry, stat_key(st, self.scan_start)

    def read_file(self, rel: bytes, dfd: int, name: bytes, ino: int = 0
                  ) -> tuple[Entry, list | None] | None:
        """Hash (and store) a file's blocks; a file that changes while read is read again
        (from a clone, where the filesystem makes one), then recorded otherwise (`busy`)."""
        last = None
        for attempt in range(READ_ATTEMPTS):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP):
                    return None  # vanished or replaced by a link: not in this snapshot
                if exc.errno in UNREADABLE_ERRNOS:
                    return self.unreadable_file(rel, name, ino, exc)
                raise
            try:
                before = os.fstat(fd)
                if not stat.S_ISREG(before.st_mode):
                    return None
                if self.can_clone and (attempt == 1 or self.share_extents()):
                    cloned = self.read_clone(fd, name)
                    if cloned is not None:
                        return cloned
                ids, length = self.hash_blocks(fd, before.st_size)
                xattrs = read_xattrs(fd)
                after = os.fstat(fd)
            except SourceReadError as exc:  # say which file could not be read
                if exc.errno in UNREADABLE_ERRNOS:
                    return self.unreadable_file(rel, name, ino, exc)
                raise OSError(exc.errno, exc.strerror, self.full_path(_join(rel, name))) from None
            finally:
                os.close(fd)
            if _same_stat(before, after) and length == before.st_size:
                ref = self.objects.content_ref(ids)
                entry = _entry(name, Kind.FILE, before, length, ref, xattrs)
                return entry, stat_key(before, self.scan_start)
            last = (before, ids, length, xattrs)
        return self.busy_file(rel, name, ino, last)

    def share_extents(self) -> bool:
        """Whether a snapshot into aligned packs reads each changed file from a clone, whose
        blocks the packs then share (the clone is private: it cannot change after it is
        hashed). Asked only once a file must be read: a scan that reads none probes nothing."""
        return self.objects.write and self.volume.packs.aligned()

    def read_clone(self, fd: int, name: bytes) -> tuple[Entry, list | None] | None:
        """Read a copy-on-write clone of the open file (a consistent copy), or None when the
        filesystem cannot make one (then, unless the store shares extents, no clone is tried
        again in this scan)."""
        before = os.fstat(fd)
        clone = clone_file(fd, self.volume.tmp)
        if clone is None:
            # where the store shares extents, one file may refuse (btrfs nodatacow, a swap
            # file): it is read as it is; elsewhere no clone is tried again in this scan
            self.can_clone = self.share_extents()
            return None
        try:
            after = os.fstat(fd)
            ids, length = self.hash_blocks(clone, os.fstat(clone).st_size, private=True)
            xattrs = read_xattrs(fd)
        finally:
            try:
                self.objects.settle()  # the store's copies from the clone, before it closes
            finally:
                os.close(clone)
        entry = _entry(name, Kind.FILE, after, length, self.objects.content_ref(ids), xattrs)
        # the clone is the file as this stat describes only if nothing changed around it
        return entry, stat_key(after, self.scan_start) if _same_stat(before, after) else None

    def busy_file(self, rel: bytes, name: bytes, ino: int, last) -> tuple[Entry, None]:
        """A file that kept changing: an error when strict; else its previous version, or
        the bytes last read (possibly inconsistent)."""
        path = _join(rel, name)
        if self.strict:
            raise VolsyncError(f"{quote_path(path)}: file kept changing while being read; "
                               "try again later")
        self.unlinked.add(ino)
        old = self.previous(rel, name)
        if old is not None and old.kind is Kind.FILE:
            self.file_warnings.append(FileWarning(path, BUSY, PREVIOUS))
            return old.with_(link=None), None
        before, ids, length, xattrs = last
        self.file_warnings.append(FileWarning(path, BUSY, CURRENT))
        return _entry(name, Kind.FILE, before, length, self.objects.content_ref(ids), xattrs), None

    def unreadable_file(self, rel: bytes, name: bytes, ino: int, exc: OSError
                        ) -> tuple[Entry, None] | None:
        self.unlinked.add(ino)
        if not self.keep_previous(rel, name, exc, (Kind.FILE,)):
            return None
        entry, _, _ = self.kept.pop(_join(rel, name))
        return entry, None

    def keep_previous(self, rel: bytes, name: bytes, exc: OSError, kinds: tuple[Kind, ...]
                      ) -> bool:
        """An entry that cannot be opened: an error when strict; else its version in the
        latest snapshot (of one of `kinds`) goes to `self.kept` (True), or it is left out."""
        path = _join(rel, name)
        if self.strict:
            raise VolsyncError(f"cannot read {quote_path(self.full_path(path))}: "
                               f"{exc.strerror or exc}")
        old = self.previous(rel, name)
        if old is not None and old.kind in kinds:
            try:
                self.kept[path] = self.unlinked_previous(old)
            except StoreAccessError:  # an OS limit reading the store: not damage
                raise
            except VolsyncError:  # the old subtree cannot be read either
                old = None
        recorded = PREVIOUS if old is not None and old.kind in kinds else SKIPPED
        self.file_warnings.append(FileWarning(path, UNREADABLE, recorded))
        return recorded == PREVIOUS

    def unlinked_previous(self, old: Entry) -> tuple[Entry, int, int]:
        """A previous entry with its totals, without hard links (its group may have changed
        since): a directory's whole subtree, rewritten only where it had links."""
        if old.kind is not Kind.DIR:
            return old.with_(link=None), old.size if old.kind is Kind.FILE else 0, \
                int(old.kind is Kind.FILE)
        tree = self.objects.tree(BlockId(old.ref))
        entries, size, files = [], 0, 0
        for e in tree.entries:
            e, s, f = self.unlinked_previous(e)
            entries.append(e)
            size, files = size + s, files + f
        if tuple(entries) == tree.entries:
            return old, size, files
        return old.with_(ref=self.objects.put_tree(Tree(tuple(entries), tree.meta))), size, files

    def previous(self, rel: bytes, name: bytes) -> Entry | None:
        """The entry at rel/name in the volume's latest snapshot, if there is one."""
        return self.previous_dir(rel).get(name)

    def previous_dir(self, rel: bytes) -> dict[bytes, Entry]:
        if rel not in self.previous_dirs:
            tree_id = None
            if not rel:
                tree_id = self.latest_root()
            else:
                parent, _, name = rel.rpartition(b"/")
                entry = self.previous_dir(parent).get(name)
                tree_id = BlockId(entry.ref) if entry and entry.kind is Kind.DIR else None
            try:
                entries = self.objects.tree(tree_id).entries if tree_id else ()
            except StoreAccessError:  # an OS limit reading the store: not damage
                raise
            except VolsyncError:
                entries = ()
            self.previous_dirs[rel] = {e.name: e for e in entries}
        return self.previous_dirs[rel]

    def full_path(self, rel: bytes) -> bytes:
        return os.path.join(os.fsencode(self.volume.root), rel)

    def hash_blocks(self, fd: int, size: int, private: bool = False
                    ) -> tuple[list[BlockId], int]:
        """Read a file block by block; a block inside a hole is not read, and a block of
        zeros is a hole too: both become the hole id, nothing stored. A big file's blocks are
        hashed in batches on the hash pool while the next ones are read. A `private` file (a
        clone only this scan has) is named as where each new block's bytes are, so that the
        store may share them instead of copying."""
        ids: list[BlockId] = []
        hole = self.fmt.algo.hole
        bs = self.block_size
        extents = data_extents(fd, size)
        hasher = _BatchHasher(self.fmt.algo.digest, self.objects.put_block, ids,
                              parallel=size >= PARALLEL_MIN, src_fd=fd if private else None)
        length = 0
        offset = 0
        while True:
            if extents is not None and not _has_data(extents, offset, offset + bs):
                if offset >= size:
                    break
                n = min(bs, size - offset)
                ids.append(hole)
                length += n
                offset += n
                continue
            try:
                data = _read_block(fd, bs, offset)
            except OSError as exc:
                raise SourceReadError(exc.errno, exc.strerror) from None
            if not data:
                break
            if data == self.zeros[: len(data)]:
                ids.append(hole)
            else:
                hasher.add(data, offset)
            length += len(data)
            offset += len(data)
            self.bytes_read += len(data)
            if self.progress:
                self.progress(len(data))
            if len(data) < bs:
                break
        hasher.finish()
        return ids, length


PARALLEL_MIN = 4 << 20  # files from this size are hashed on the pool
BATCH_BYTES = 2 << 20
_pool: ThreadPoolExecutor | None = None


def _hash_pool() -> ThreadPoolExecutor:
    """Threads for hashing (the hash releases the GIL): one per core."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                   thread_name_prefix="volsync-hash")
    return _pool


class _BatchHasher:
    """Fills the hole-free slots of `ids` in file order: blocks are hashed in batches, up to
    one batch per core in flight while the reader goes on, and stored in order."""

    def __init__(self, digest, put, ids: list, parallel: bool, src_fd: int | None = None):
        self.digest = digest
        self.put = put
        self.src_fd = src_fd
        self.ids = ids
        self.parallel = parallel and (os.cpu_count() or 1) > 1
        self.batch: list[tuple[int, bytes, int]] = []  # (index, data, offset)
        self.batch_bytes = 0
        self.inflight: deque = deque()

    def add(self, data: bytes, offset: int) -> None:
        self.ids.append(None)
        if not self.parallel:
            self.store((len(self.ids) - 1, data, offset), self.digest(data))
            return
        self.batch.append((len(self.ids) - 1, data, offset))
        self.batch_bytes += len(data)
        if self.batch_bytes >= BATCH_BYTES:
            self.submit()

    def submit(self) -> None:
        if self.batch:
            blocks = [item[1] for item in self.batch]
            self.inflight.append((self.batch, _hash_pool().submit(_digests, self.digest, blocks)))
            self.batch, self.batch_bytes = [], 0
        while len(self.inflight) > (os.cpu_count() or 1):
            self.collect()

    def collect(self) -> None:
        items, future = self.inflight.popleft()
        for item, block_id in zip(items, future.result(), strict=True):
            self.store(item, block_id)

    def finish(self) -> None:
        self.submit()
        while self.inflight:
            self.collect()

    def store(self, item: tuple[int, bytes, int], block_id: bytes) -> None:
        index, data, offset = item
        self.ids[index] = BlockId(block_id)
        self.put(self.ids[index], data, None if self.src_fd is None else (self.src_fd, offset))


def _digests(digest, blocks: list[bytes]) -> list[bytes]:
    return [digest(b) for b in blocks]


def _same_stat(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (b.st_size, b.st_mtime_ns, b.st_ctime_ns)


def clone_file(fd: int, tmp_dir) -> int | None:
    """An fd of a copy-on-write clone of the open file, made by FICLONE into an unnamed
    temp file in `tmp_dir` (gone when closed, even after a crash); None where the filesystem
    (ext4, tmpfs, ...) or the temp directory cannot make one."""
    try:
        clone = os.open(tmp_dir, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError:
        return None
    try:
        fcntl.ioctl(clone, FICLONE, fd)
    except OSError:
        os.close(clone)
        return None
    return clone


def _entry(name: bytes, kind: Kind, st: os.stat_result, size: int, ref: bytes,
           xattrs: tuple, rdev: int = 0) -> Entry:
    mode = 0o777 if kind is Kind.LINK else stat.S_IMODE(st.st_mode)
    return Entry(name, kind, mode, st.st_uid, st.st_gid, st.st_mtime_ns, size, ref, xattrs,
                 None, rdev)


def data_extents(fd: int, size: int) -> list[tuple[int, int]] | None:
    """The file's data ranges by SEEK_DATA/SEEK_HOLE, or None when the filesystem cannot
    tell (or the file is too fragmented to be worth it): then every block is read."""
    extents = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # only a hole from here on
                raise
            end = os.lseek(fd, start, SEEK_HOLE)
            extents.append((start, end))
            if len(extents) > MAX_EXTENTS:
                return None
            offset = end
    except OSError:
        return None
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    if extents == [(0, size)] or (len(extents) == 1 and extents[0][0] == 0
                                  and extents[0][1] >= size):
        return None  # no holes: read everything
    return extents


def _has_data(extents: list[tuple[int, int]], start: int, end: int) -> bool:
    for a, b in extents:
        if a < end and b > start:
            return True
        if a >= end:
            return False
    return False


class SourceReadError(OSError):
    """Reading a live-tree file failed (as opposed to writing the store)."""


def _read_block(fd: int, size: int, offset: int) -> bytes:
    fault("read")
    data = os.pread(fd, size, offset)
    if 0 < len(data) < size:  # a short read before the end: keep reading
        parts = [data]
        got = len(data)
        while got < size and (more := os.pread(fd, size - got, offset + got)):
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


def scan(volume: Volume, write: bool = True, progress: Progress | None = None,
         trust_cache: bool = True, strict: bool = True) -> tuple[ScanResult, Objects]:
    objects = Objects(volume, write)
    return Scanner(volume, objects, progress, trust_cache, strict).run(), objects
