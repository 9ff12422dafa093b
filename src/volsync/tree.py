"""Scan a live tree into tree objects; materialize a tree into a live directory, safely.

Scanning keeps a stat cache per directory (tree id, size, file count, and a key per name) so an
unchanged file (same size, mtime_ns, ctime_ns, inode, mode) is never read again and an
unchanged directory costs its stats only. Materializing walks the target and the current live
tree together through directory file descriptors opened with O_NOFOLLOW: a directory that was
swapped for a symlink is replaced, never written through.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .errors import VolsyncError
from .model import BlockId, Entry, Kind, digest_of
from .store.crash import crashpoint, fault
from .store.trees import EMPTY_TREE, EMPTY_TREE_ID, decode_tree, encode_tree
from .store.volume import META, Volume

RACY_NS = 50_000_000  # file timestamps lag the clock by at most one tick (<= 10 ms on Linux)
RACY_COARSE_NS = 2_000_000_000  # filesystems with whole-second (or 2 s) timestamps
READ_ATTEMPTS = 5
TMP_NAME = b".volsync-tmp-"  # materialize's temp names; never captured, removed on recovery
META_NAME = META.encode()
FILE_KEY, DIR_KEY, LINK_KEY = 1, 2, 3

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


def file_key(st: os.stat_result, scan_start: int) -> list | None:
    """The stat cache's key for a regular file, or None when it cannot be trusted (racy)."""
    if is_racy(st, scan_start):
        return None
    return [FILE_KEY, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
            stat.S_IMODE(st.st_mode)]


class Objects:
    """Trees and blocks for a scan or a materialize. With `write` False (a check that must
    change nothing), new trees live in memory and file blocks are hashed only. `source`, if
    given, is another volume read first (a transfer writes DST's live tree from SRC's store)."""

    def __init__(self, volume: Volume, write: bool = True, source: Volume | None = None,
                 checked_elsewhere: frozenset[BlockId] = frozenset()):
        self.volume = volume
        self.write = write
        self.overlay: dict[BlockId, bytes] = {}
        self.readers = (source.packs, volume.packs) if source else (volume.packs,)
        self.cancelled = False
        # blocks a concurrent step verifies (a failure there undoes this one): not re-hashed
        self.checked_elsewhere = checked_elsewhere

    def put_tree(self, entries: list[Entry]) -> BlockId:
        data = encode_tree(entries) if entries else EMPTY_TREE
        tree_id = digest_of(data)
        if self.write:
            self.volume.packs.put(tree_id, data)
        elif not self.volume.packs.has(tree_id):
            self.overlay[tree_id] = data
        return tree_id

    def tree(self, tree_id: BlockId | None) -> list[Entry]:
        if tree_id is None or tree_id == EMPTY_TREE_ID:
            return []
        return decode_tree(self.raw(tree_id), tree_id)

    def has(self, object_id: BlockId) -> bool:
        return (object_id == EMPTY_TREE_ID or object_id in self.overlay
                or any(packs.has(object_id) for packs in self.readers))

    def raw(self, tree_id: BlockId) -> bytes:
        data = self.overlay.get(tree_id)
        return data if data is not None else self._reader(tree_id).get(tree_id)

    def _reader(self, block_id: BlockId):
        for packs in self.readers:
            if packs.has(block_id):
                return packs
        return self.readers[-1]  # raises the missing-block IntegrityError

    def put_block(self, block_id: BlockId, data: bytes) -> None:
        if self.write:
            self.volume.packs.put(block_id, data)

    def copy_block(self, block_id: BlockId, fd: int, offset: int | None) -> int:
        """Write a verified block into a file (at `offset`, or at its position)."""
        if self.cancelled:
            raise Cancelled()
        verify = block_id not in self.checked_elsewhere
        return self._reader(block_id).copy_to(block_id, fd, offset, verify)


class Cancelled(Exception):
    """A concurrent step failed; this one stops where it is."""


@dataclass
class ScanResult:
    root: BlockId
    size: int
    files: int
    cache: dict
    warnings: list[str] = field(default_factory=list)
    bytes_read: int = 0
    strays: list[bytes] = field(default_factory=list)  # temp files a crashed run left


def _join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


class Scanner:
    """One pass over a live tree, reading only what the stat cache cannot vouch for."""

    def __init__(self, volume: Volume, objects: Objects, progress: Progress | None = None):
        self.volume = volume
        self.objects = objects
        self.block_size = volume.config.block_size
        self.old = volume.load_statcache()
        self.new: dict = {}
        self.warnings: list[str] = []
        self.bytes_read = 0
        self.progress = progress
        self.scan_start = time.time_ns()
        self.strays: list[bytes] = []

    def run(self) -> ScanResult:
        fd = os.open(os.path.realpath(bytes(self.volume.root)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            tree_id, size, files = self.scan_dir(b"", fd)
        finally:
            os.close(fd)
        return ScanResult(tree_id, size, files, self.new, self.warnings, self.bytes_read,
                          self.strays)

    def scan_dir(self, rel: bytes, dfd: int) -> tuple[BlockId, int, int]:
        """Scan the directory open at `dfd`. Everything below is reached through directory
        fds opened with O_NOFOLLOW, so a directory swapped for a symlink is never followed."""
        cached = self.old.get(rel)
        keys: dict[bytes, list | None] = {}
        stats: list[tuple[bytes, os.stat_result]] = []
        sub: dict[bytes, tuple[BlockId, int, int]] = {}
        try:
            with os.scandir(dfd) as it:
                listing = sorted(os.fsencode(e.name) for e in it)
        except (FileNotFoundError, NotADirectoryError):
            listing = []
        for name in listing:
            if not rel and name == META_NAME:
                continue
            if name.startswith(TMP_NAME):  # a crashed materialize's temp file
                self.strays.append(_join(rel, name))
                continue
            try:
                st = os.lstat(name, dir_fd=dfd)
            except FileNotFoundError:
                continue
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                sub[name] = self.scan_subdir(_join(rel, name), dfd, name)
                keys[name] = [DIR_KEY, stat.S_IMODE(mode), st.st_mtime_ns, sub[name][0]]
            elif stat.S_ISREG(mode):
                keys[name] = file_key(st, self.scan_start)
            elif stat.S_ISLNK(mode):
                keys[name] = [LINK_KEY, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            else:
                self.warnings.append(f"skipped special file {os.fsdecode(_join(rel, name))}")
                continue
            stats.append((name, st))
        # a cached tree the store lost (a repair that found no good copy) is no proof: build
        if (cached and cached[3] == keys and None not in keys.values()
                and self.objects.has(BlockId(cached[0]))):
            self.new[rel] = cached
            return BlockId(cached[0]), cached[1], cached[2]
        return self.build_dir(rel, dfd, stats, keys, sub, cached)

    def scan_subdir(self, rel: bytes, dfd: int, name: bytes) -> tuple[BlockId, int, int]:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            # removed or replaced since its lstat: captured as it was then, empty
            return self.objects.put_tree([]), 0, 0
        try:
            return self.scan_dir(rel, fd)
        finally:
            os.close(fd)

    def build_dir(self, rel, dfd, stats, keys, sub, cached) -> tuple[BlockId, int, int]:
        old_entries = self.cached_entries(cached)
        entries: list[Entry] = []
        size = files = 0
        for name, st in stats:
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                sub_id, sub_size, sub_files = sub[name]
                size, files = size + sub_size, files + sub_files
                entries.append(Entry(name, Kind.DIR, stat.S_IMODE(mode), st.st_mtime_ns, 0, sub_id))
                continue
            if stat.S_ISLNK(mode):
                try:
                    target = os.readlink(name, dir_fd=dfd)
                except OSError:
                    continue  # removed or replaced since its lstat: not in this snapshot
                entries.append(Entry(name, Kind.LINK, 0o777, st.st_mtime_ns, 0, target))
                continue
            old_key = cached[3].get(name) if cached else None
            entry = old_entries.get(name) if old_key is not None and old_key == keys[name] else None
            if entry is None:
                entry, keys[name] = self.read_file(rel, dfd, name)
            if entry is not None:
                entries.append(entry)
                size, files = size + entry.size, files + 1
        keys = {e.name: keys[e.name] for e in entries}
        tree_id = self.objects.put_tree(entries)
        self.new[rel] = [tree_id, size, files, keys]
        return tree_id, size, files

    def cached_entries(self, cached) -> dict[bytes, Entry]:
        if not cached:
            return {}
        try:
            return {e.name: e for e in self.objects.tree(BlockId(cached[0]))}
        except VolsyncError:
            return {}

    def read_file(self, rel: bytes, dfd: int, name: bytes) -> tuple[Entry | None, list | None]:
        """Hash (and store) a file's blocks; a file that changes while read is read again."""
        for _ in range(READ_ATTEMPTS):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP):
                    return None, None  # vanished or replaced by a link: not in this snapshot
                raise
            try:
                before = os.fstat(fd)
                if not stat.S_ISREG(before.st_mode):
                    return None, None
                ids, length = self.hash_blocks(fd)
                after = os.fstat(fd)
            except SourceReadError as exc:  # say which file could not be read
                path = os.path.join(os.fsencode(self.volume.root), _join(rel, name))
                raise OSError(exc.errno, exc.strerror, os.fsdecode(path)) from None
            finally:
                os.close(fd)
            same = (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
                after.st_size, after.st_mtime_ns, after.st_ctime_ns)
            if same and length == before.st_size:
                entry = Entry(name, Kind.FILE, stat.S_IMODE(before.st_mode), before.st_mtime_ns,
                              length, b"".join(ids))
                return entry, file_key(before, self.scan_start)
        shown = _join(rel, name).decode(errors="replace")
        raise VolsyncError(f"{shown}: file kept changing while being read; try again later")

    def hash_blocks(self, fd: int) -> tuple[list[bytes], int]:
        """Read a file block by block (each a fresh bytes object the store may keep)."""
        ids = []
        length = 0
        size = self.block_size
        while True:
            try:
                data = _read_block(fd, size)
            except OSError as exc:
                raise SourceReadError(exc.errno, exc.strerror) from None
            if not data:
                break
            block_id = digest_of(data)
            self.objects.put_block(block_id, data)
            ids.append(block_id)
            length += len(data)
            if self.progress:
                self.progress(len(data))
            if len(data) < size:
                break
        self.bytes_read += length
        return ids, length


class SourceReadError(OSError):
    """Reading a live-tree file failed (as opposed to writing the store)."""


def _read_block(fd: int, size: int) -> bytes:
    fault("read")
    data = os.read(fd, size)
    if 0 < len(data) < size:  # a short read before the end: keep reading
        parts = [data]
        got = len(data)
        while got < size and (more := os.read(fd, size - got)):
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


def scan(volume: Volume, write: bool = True, progress: Progress | None = None
         ) -> tuple[ScanResult, Objects]:
    objects = Objects(volume, write)
    return Scanner(volume, objects, progress).run(), objects


# --- materialize ------------------------------------------------------------------------------

def _syncfs(fd: int) -> None:
    fault("fsync")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) == 0:
            return
    except (OSError, AttributeError):
        pass
    os.sync()


class Materializer:
    """Bring a live directory from the tree it holds (`live`, from a scan) to `target`,
    writing only what differs, and keep the stat cache true for what it wrote."""

    def __init__(self, objects: Objects, block_size: int, cache: dict,
                 progress: Progress | None = None):
        self.objects = objects
        self.block_size = block_size
        self.cache = cache
        self.scan_start = time.time_ns()
        self.progress = progress
        self.bytes_written = 0

    def run(self, root: bytes, live: BlockId | None, target: BlockId) -> dict:
        # the path the user named may be a symlink to the volume; below it nothing is followed
        root = os.path.realpath(root)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            self.sync_dir(fd, b"", live, target)
            _syncfs(fd)
        finally:
            os.close(fd)
        return self.reachable_cache()

    def sync_dir(self, dfd: int, rel: bytes, live_id: BlockId | None, target_id: BlockId
                 ) -> tuple[int, int]:
        cached = self.cache.get(rel)
        if live_id == target_id and cached and cached[0] == target_id:
            return cached[1], cached[2]
        live = {e.name: e for e in self.objects.tree(live_id)}
        target = self.objects.tree(target_id)
        wanted = {e.name for e in target}
        for name, old in live.items():
            if name not in wanted:
                _remove(dfd, name)
        old_keys = cached[3] if cached and cached[0] == live_id else {}
        keys: dict[bytes, list | None] = {}
        size = files = 0
        for entry in target:
            old = live.get(entry.name)
            if entry.kind is Kind.DIR:
                sub_size, sub_files, keys[entry.name] = self.sync_subdir(dfd, rel, entry, old)
                size, files = size + sub_size, files + sub_files
            elif entry.kind is Kind.LINK:
                keys[entry.name] = self.sync_link(dfd, entry, old)
            else:
                keys[entry.name] = self.sync_file(dfd, entry, old, old_keys.get(entry.name))
                size, files = size + entry.size, files + 1
        self.cache[rel] = [target_id, size, files, keys]
        return size, files

    def sync_subdir(self, dfd: int, rel: bytes, entry: Entry, old: Entry | None):
        name = entry.name
        live_sub = old.ref if old is not None and old.kind is Kind.DIR else None
        if old is not None and live_sub is None:
            _remove(dfd, name)
        if live_sub is None:
            os.mkdir(name, 0o700, dir_fd=dfd)
        try:
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        except OSError as exc:  # swapped for a symlink or file since the scan: replace it
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            _remove(dfd, name)
            os.mkdir(name, 0o700, dir_fd=dfd)
            live_sub = None
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        try:
            sub_size, sub_files = self.sync_dir(sub, _join(rel, name), BlockId(live_sub) if live_sub else None,
                                                BlockId(entry.ref))
            os.fchmod(sub, entry.mode)
            os.utime(sub, ns=(entry.mtime_ns, entry.mtime_ns))
            st = os.fstat(sub)
        finally:
            os.close(sub)
        return sub_size, sub_files, [DIR_KEY, entry.mode, st.st_mtime_ns, entry.ref]

    def sync_link(self, dfd: int, entry: Entry, old: Entry | None) -> list:
        if not (old is not None and old.kind is Kind.LINK and old.ref == entry.ref):
            tmp = TMP_NAME + secrets.token_hex(6).encode()
            os.symlink(entry.ref, tmp, dir_fd=dfd)
            if old is not None and old.kind is Kind.DIR:
                _remove(dfd, entry.name)
            os.rename(tmp, entry.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.utime(entry.name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=dfd,
                 follow_symlinks=False)
        st = os.lstat(entry.name, dir_fd=dfd)
        crashpoint("live-entry-written")
        return [LINK_KEY, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def sync_file(self, dfd: int, entry: Entry, old: Entry | None, old_key) -> list | None:
        same_data = old is not None and old.kind is Kind.FILE and old.ref == entry.ref
        if same_data and old.mode == entry.mode and old.mtime_ns == entry.mtime_ns and old_key:
            return old_key
        if same_data or self.patchable(entry, old):
            try:
                fd = os.open(entry.name, os.O_WRONLY | os.O_NOFOLLOW, dir_fd=dfd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOENT, errno.EISDIR):
                    raise
                fd = None
            if fd is not None:
                if not same_data:
                    self.patch(fd, entry, old)
                return self.finish_file(fd, entry)
        return self.replace_file(dfd, entry, old)

    def patchable(self, entry: Entry, old: Entry | None) -> bool:
        """Large files sharing most blocks with the live file get only the differing ones."""
        if old is None or old.kind is not Kind.FILE or old.size < 4 * self.block_size:
            return False
        new_blocks, old_blocks = entry.blocks(), old.blocks()
        same = sum(1 for a, b in zip(new_blocks, old_blocks) if a == b)
        return same * 2 >= len(new_blocks)

    def patch(self, fd: int, entry: Entry, old: Entry) -> None:
        old_blocks = old.blocks()
        for i, block_id in enumerate(entry.blocks()):
            if i < len(old_blocks) and old_blocks[i] == block_id:
                continue
            self.count(self.objects.copy_block(block_id, fd, i * self.block_size))
        os.ftruncate(fd, entry.size)

    def replace_file(self, dfd: int, entry: Entry, old: Entry | None) -> list | None:
        tmp = TMP_NAME + secrets.token_hex(6).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
        try:
            for block_id in entry.blocks():
                self.count(self.objects.copy_block(block_id, fd, None))
            self.set_metadata(fd, entry)
        finally:
            os.close(fd)
        if old is not None and old.kind is Kind.DIR:
            _remove(dfd, entry.name)
        os.rename(tmp, entry.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        # the key is taken after the rename, which changes ctime on some filesystems
        return file_key(os.stat(entry.name, dir_fd=dfd, follow_symlinks=False), self.scan_start)

    def finish_file(self, fd: int, entry: Entry) -> list | None:
        try:
            self.set_metadata(fd, entry)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return file_key(st, self.scan_start)

    @staticmethod
    def set_metadata(fd: int, entry: Entry) -> None:
        os.fchmod(fd, entry.mode)
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        crashpoint("live-entry-written")


    def count(self, n: int) -> None:
        self.bytes_written += n
        if self.progress:
            self.progress(n)

    def reachable_cache(self) -> dict:
        """The cache entries of directories that exist in the result, nothing stale."""
        out: dict = {}
        todo = [b""]
        while todo:
            rel = todo.pop()
            entry = self.cache.get(rel)
            if entry is None:
                continue
            out[rel] = entry
            for name, key in entry[3].items():
                if key and key[0] == DIR_KEY:
                    todo.append(_join(rel, name))
        return out


def _remove(dfd: int, name: bytes) -> None:
    """Remove a name without following it: a link or file is unlinked, a directory removed
    through directory fds (shutil.rmtree's symlink-attack-resistant path)."""
    try:
        st = os.lstat(name, dir_fd=dfd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def remove_strays(root: bytes, strays: list[bytes]) -> None:
    """Delete temp files a crashed materialize left, reaching each through O_NOFOLLOW
    directory fds (a swapped-in symlink leads nowhere)."""
    for rel in strays:
        *parents, name = rel.split(b"/")
        fd = os.open(os.path.realpath(root), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parents:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = sub
            _remove(fd, name)
        except OSError:
            continue
        finally:
            os.close(fd)


def materialize(objects: Objects, root: bytes, live: BlockId | None, target: BlockId,
                cache: dict, block_size: int, progress: Progress | None = None) -> dict:
    return Materializer(objects, block_size, cache, progress).run(root, live, target)


# --- comparing trees --------------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    status: str  # "added", "modified" or "deleted"
    path: str
    kind: Kind


def diff_trees(objects: Objects, a: BlockId | None, b: BlockId | None,
               rel: bytes = b"") -> Iterator[Change]:
    """Paths that differ from tree a to tree b; equal subtrees are skipped by their id."""
    if a == b:
        return
    old = {e.name: e for e in objects.tree(a)}
    new = {e.name: e for e in objects.tree(b)}
    for name in sorted(old.keys() | new.keys()):
        x, y = old.get(name), new.get(name)
        path = _join(rel, name)
        shown = os.fsdecode(path)
        if x is not None and y is not None and x.kind == y.kind:
            if x.kind is Kind.DIR:
                if x.mode != y.mode:
                    yield Change("modified", shown + "/", Kind.DIR)
                yield from diff_trees(objects, BlockId(x.ref), BlockId(y.ref), path)
            elif (x.ref, x.mode, x.size) != (y.ref, y.mode, y.size):
                yield Change("modified", shown, y.kind)
            continue
        if x is not None:
            yield from _all(objects, x, path, "deleted")
        if y is not None:
            yield from _all(objects, y, path, "added")


def _all(objects: Objects, entry: Entry, path: bytes, status: str) -> Iterator[Change]:
    shown = os.fsdecode(path)
    if entry.kind is not Kind.DIR:
        yield Change(status, shown, entry.kind)
        return
    yield Change(status, shown + "/", Kind.DIR)
    for child in objects.tree(BlockId(entry.ref)):
        yield from _all(objects, child, _join(path, child.name), status)
