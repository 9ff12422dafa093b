"""Write a tree into a live directory, safely, touching only what differs.

Rules (each is a bug found from outside once):
- Nothing is followed: every directory is reached through fds opened with O_NOFOLLOW, and a
  directory swapped for a symlink is replaced, never written through.
- A live file is changed in place (its differing blocks patched, or only its metadata set)
  only when it is a regular file with one link, still the inode the scan saw. Anything else
  (another name shares the inode, inside or outside the volume; a running program, ETXTBSY)
  gets a new file, written in `.volsync/tmp/` and renamed over the name.
- Temp files live only in `.volsync/tmp/`, volsync's own; nothing in the live tree is ever
  taken for a temp file.
- Ownership first, then xattrs, then mode, then mtime; a setuid/setgid bit stays only with
  the owner it belongs to. What the process may not restore is counted (`NotRestored`).
- Holes are never written: a new file skips them and is truncated to its size, a patched one
  gets them punched.
- Durability: on filesystems whose syncfs() reports errors (ext4, xfs, btrfs, tmpfs, ...)
  one syncfs() at the end, its failure an error; elsewhere (FUSE, NFS, unknown) each written
  file and each changed directory is fsynced.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from contextlib import suppress

from ..errors import IntegrityError
from ..model import BlockId, Entry, Format, Kind
from ..quoting import quote_path
from ..store.blocklist import zip_runs
from ..store.crash import crashpoint, fault
from ..store.fsutil import fsync
from ..store.trees import META_NAME
from ..store.volume import packed_keys, unpacked_keys
from .meta import NotRestored, apply_metadata, entry_path, loosen_for_writing
from .objects import Objects
from .scan import DIR_KEY, FILE_KEY, ROOT_KEY_NAME, _join, stat_key

Progress = Callable[[int], None]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
STRETCH_BLOCKS = 64  # a new file's blocks are written this many at a time, at most
SYNCFS_TRUSTED = {  # statfs f_type of filesystems whose syncfs reaches the disk and reports
    0xEF53,  # ext2/3/4
    0x58465342,  # xfs
    0x9123683E,  # btrfs
    0x01021994,  # tmpfs
    0xF2F52010,  # f2fs
    0x2FC12FC1,  # zfs
}
_libc = ctypes.CDLL(None, use_errno=True)


def fs_type(fd: int) -> int | None:
    """statfs(2)'s f_type of the filesystem holding fd (None if it cannot be read)."""
    buf = ctypes.create_string_buffer(256)
    try:
        if _libc.fstatfs(fd, buf) != 0:
            return None
    except AttributeError:
        return None
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], "little", signed=False)


def syncfs_trusted(fd: int) -> bool:
    return fs_type(fd) in SYNCFS_TRUSTED and hasattr(_libc, "syncfs")


def syncfs(fd: int) -> None:
    """Flush the filesystem holding fd; a failure is an error (never a silent sync())."""
    fault("fsync")
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs failed: {os.strerror(err)}")


def punch_hole(fd: int, offset: int, length: int) -> None:
    try:
        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           ctypes.c_long(offset), ctypes.c_long(length)) == 0:
            return
    except AttributeError:
        pass
    os.pwrite(fd, bytes(length), offset)  # cannot punch here: zeros, as a hole reads


class Materializer:
    """Bring a live directory from the tree it holds (`live`, from a scan) to `target`,
    writing only what differs, and keep the stat cache true for what it wrote. `tmp_fd` is
    the directory for temp files (`.volsync/tmp/`); None writes new files in place, for a
    directory that is new and private (restore)."""

    def __init__(self, objects: Objects, fmt: Format, cache: dict, tmp_fd: int | None,
                 progress: Progress | None = None):
        self.objects = objects
        self.fmt = fmt
        self.cache = cache
        self.tmp_fd = tmp_fd
        self.scan_start = time.time_ns()
        self.progress = progress
        self.bytes_written = 0
        self.skipped = NotRestored()
        self.per_file_sync = False
        self.root_fd = -1
        self.link_paths: dict[bytes, tuple[int, int]] = {}  # group key -> (dev, ino) written
        self.loosened: set[bytes] = set()  # directories given u+w for the write

    def run(self, root: bytes, live: BlockId | None, target: BlockId) -> dict:
        # the path the user named may be a symlink to the volume; below it nothing is followed
        root = os.path.realpath(root)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        self.root_fd = fd
        self.per_file_sync = not syncfs_trusted(fd)
        try:
            self.sync_dir(fd, b"", live, target)
            meta = self.objects.tree(target).meta
            if meta is not None and (live != target or b"" in self.loosened
                                     or meta != self.objects.tree(live).meta):
                apply_metadata(fd, meta, False, self.skipped, os.fstat(fd))
            if meta is not None:
                top = self.cache[b""]
                top[3] = {**unpacked_keys(top[3]),
                          ROOT_KEY_NAME: stat_key(os.fstat(fd), self.scan_start)}
            if self.per_file_sync:
                fsync(fd)
            else:
                syncfs(fd)
        finally:
            os.close(fd)
        return self.reachable_cache()

    # --- directories ---------------------------------------------------------------------
    def sync_dir(self, dfd: int, rel: bytes, live_id: BlockId | None, target_id: BlockId
                 ) -> tuple[int, int]:
        cached = self.cache.get(rel)
        if live_id == target_id and cached and cached[0] == target_id:
            return cached[1], cached[2]
        live = {e.name: e for e in self.objects.tree(live_id).entries}
        target = self.objects.tree(target_id).entries
        wanted = {e.name for e in target}
        if not rel and META_NAME in wanted:
            raise IntegrityError(f"tree {target_id.hex()}: names {META_NAME!r} at the top")
        changed = loosen_for_writing(dfd)
        if changed:  # the directory's own metadata is set again after its entries
            self.loosened.add(rel)
        for name in live:
            if name not in wanted:
                _remove(dfd, name)
                changed = True
        old_keys = unpacked_keys(cached[3]) if cached and cached[0] == live_id else {}
        keys: dict[bytes, list | None] = {}
        if not rel and ROOT_KEY_NAME in old_keys:
            keys[ROOT_KEY_NAME] = old_keys[ROOT_KEY_NAME]
        size = files = 0
        for entry in target:
            try:
                size, files, changed = self.sync_entry(dfd, rel, entry, live.get(entry.name),
                                                       old_keys.get(entry.name), keys,
                                                       size, files, changed)
            except OSError as exc:
                if exc.filename:
                    raise
                where = os.fsdecode(_join(rel, entry.name))
                raise OSError(exc.errno, exc.strerror, where) from None
        if changed and self.per_file_sync:
            fsync(dfd)
        self.cache[rel] = [target_id, size, files, packed_keys(keys)]
        return size, files

    def sync_entry(self, dfd: int, rel: bytes, entry: Entry, old: Entry | None,
                   old_key: list | None, keys: dict, size: int, files: int, changed: bool
                   ) -> tuple[int, int, bool]:
        """One entry of a directory; returns the updated (size, files, changed)."""
        if entry.kind is Kind.DIR:
            sub_size, sub_files, keys[entry.name] = self.sync_subdir(dfd, rel, entry, old)
            changed |= old is None or old.kind is not Kind.DIR
            return size + sub_size, files + sub_files, changed
        if old is not None and old == entry and old_key is not None \
                and self._unchanged(dfd, rel, entry, old_key):
            keys[entry.name] = old_key
        else:
            keys[entry.name] = self.write_entry(dfd, rel, entry, old)
            changed = True
        if entry.kind is Kind.FILE:
            size, files = size + entry.size, files + 1
        return size, files, changed

    def _unchanged(self, dfd: int, rel: bytes, entry: Entry, old_key: list) -> bool:
        """The live entry is as the scan saw it; a hard-link member also still shares the
        inode its group's first member has now (which this run may have replaced)."""
        if entry.link is None:
            return True
        try:
            st = os.lstat(entry.name, dir_fd=dfd)
        except FileNotFoundError:
            return False
        if old_key[0] != FILE_KEY or st.st_ino != old_key[4]:
            return False
        if entry.link == _join(rel, entry.name):
            self.link_paths[entry.link] = (st.st_dev, st.st_ino)
            return True
        return self.first_inode(entry.link) == (st.st_dev, st.st_ino)

    def first_inode(self, link: bytes) -> tuple[int, int] | None:
        """(dev, ino) of a hard-link group's first member, as written or found this run."""
        known = self.link_paths.get(link)
        if known is None:
            try:
                parent, name = self.open_parent(link)
            except OSError:
                return None  # not there (as it should be): link_member says why
            try:
                st = os.lstat(name, dir_fd=parent)
            except FileNotFoundError:
                return None
            finally:
                os.close(parent)
            known = self.link_paths[link] = (st.st_dev, st.st_ino)
        return known

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
            sub_size, sub_files = self.sync_dir(sub, _join(rel, name),
                                                BlockId(live_sub) if live_sub else None,
                                                BlockId(entry.ref))
            if (old is None or old.with_(ref=entry.ref) != entry or live_sub != entry.ref
                    or _join(rel, name) in self.loosened):
                apply_metadata(sub, entry, False, self.skipped, os.fstat(sub))
                if self.per_file_sync:
                    fsync(sub)
            st = os.fstat(sub)
        finally:
            os.close(sub)
        return sub_size, sub_files, stat_key(st, self.scan_start, entry.ref)

    # --- entries -------------------------------------------------------------------------
    def write_entry(self, dfd: int, rel: bytes, entry: Entry, old: Entry | None) -> list | None:
        if entry.kind is Kind.FILE:
            if entry.link is not None and entry.link != _join(rel, entry.name):
                return self.link_member(dfd, rel, entry)
            key = self.sync_file(dfd, entry, old)
            if entry.link is not None:
                st = os.lstat(entry.name, dir_fd=dfd)
                self.link_paths[entry.link] = (st.st_dev, st.st_ino)
            return key
        if entry.kind is Kind.LINK:
            return self.new_entry(dfd, entry, old)
        if old is not None and old.kind is entry.kind and old.rdev == entry.rdev:
            self.set_metadata_at(dfd, entry)  # a fifo or device: no data, no hard links
            return stat_key(os.lstat(entry.name, dir_fd=dfd), self.scan_start)
        return self.new_entry(dfd, entry, old)

    def sync_file(self, dfd: int, entry: Entry, old: Entry | None) -> list | None:
        """A regular file: in place when safe (one link, the inode the scan saw, not busy),
        else a new file renamed over the name."""
        fd = self.open_owned(dfd, entry.name, old)
        if fd is not None:
            try:
                if not old.same_content(entry):
                    if not self.patchable(entry, old):
                        raise _Replace()
                    wfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
                    try:
                        self.patch(wfd, entry, old)
                    finally:
                        os.close(wfd)
                apply_metadata(fd, entry, False, self.skipped, os.fstat(fd))
                if self.per_file_sync:
                    fsync(fd)
                crashpoint("live-entry-written")
                return stat_key(os.fstat(fd), self.scan_start)
            except _Replace:
                pass
            except OSError as exc:  # a running program, or not writable: a new file
                if exc.errno not in (errno.ETXTBSY, errno.EACCES, errno.EPERM):
                    raise
            finally:
                os.close(fd)
        return self.new_entry(dfd, entry, old)

    def open_owned(self, dfd: int, name: bytes, old: Entry | None) -> int | None:
        """An fd of the live file if volsync may change it in place: a regular file with
        one link (no other name, inside or outside the volume, shares it)."""
        if old is None or old.kind is not Kind.FILE or old.link is not None:
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOENT, errno.EISDIR, errno.EACCES):
                return None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            return None
        return fd

    def patchable(self, entry: Entry, old: Entry) -> bool:
        """Large files sharing most blocks with the live file get only the differing ones."""
        if old.size < 4 * self.fmt.block_size:
            return False
        same = sum(count for _, count, a, b in self._pieces(entry, old) if a == b)
        return same * 2 >= self.fmt.blocks_of(entry.size)

    def _pieces(self, entry: Entry, old: Entry):
        return zip_runs(self.objects.runs(entry.ref, entry.size),
                        self.objects.runs(old.ref, old.size))

    def patch(self, fd: int, entry: Entry, old: Entry) -> None:
        hole = self.fmt.algo.hole
        bs = self.fmt.block_size
        for start, count, block_id, old_id in self._pieces(entry, old):
            if block_id == old_id:
                continue
            if block_id == hole:
                end = min(entry.size, (start + count) * bs)
                punch_hole(fd, start * bs, end - start * bs)
            else:
                self.count(self.objects.copy_block(block_id, fd, start * bs))
        os.ftruncate(fd, entry.size)

    def new_entry(self, dfd: int, entry: Entry, old: Entry | None) -> list | None:
        """Create the entry under a temp name in .volsync/tmp/, complete with its metadata,
        then rename it over the name (a directory in the way is removed first)."""
        if self.tmp_fd is None:
            if old is not None:
                _remove(dfd, entry.name)
            self.create(dfd, entry.name, entry)
        else:
            tmp = b"w-" + secrets.token_hex(8).encode()
            try:
                if not self.create(self.tmp_fd, tmp, entry):
                    return None
            except BaseException:
                with suppress(OSError):  # a full disk: give the space back for the undo
                    os.unlink(tmp, dir_fd=self.tmp_fd)
                raise
            crashpoint("live-temp-written")
            if old is not None and old.kind is Kind.DIR:
                _remove(dfd, entry.name)
            os.rename(tmp, entry.name, src_dir_fd=self.tmp_fd, dst_dir_fd=dfd)
        crashpoint("live-entry-written")
        try:
            st = os.lstat(entry.name, dir_fd=dfd)
        except FileNotFoundError:
            return None
        # the key is taken after the rename, which changes ctime on some filesystems
        return stat_key(st, self.scan_start)

    def create(self, dfd: int, name: bytes, entry: Entry) -> bool:
        """Make `name` in dfd as the entry says; False when the process may not (devices)."""
        kind = entry.kind
        if kind is Kind.FILE:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                         dir_fd=dfd)
            try:
                self.write_content(fd, entry)
                apply_metadata(fd, entry, False, self.skipped, os.fstat(fd))
                if self.per_file_sync:
                    fsync(fd)
            finally:
                os.close(fd)
            return True
        if kind is Kind.LINK:
            os.symlink(entry.ref, name, dir_fd=dfd)
        elif kind is Kind.FIFO:
            os.mkfifo(name, 0o600, dir_fd=dfd)
        else:
            mode = stat.S_IFCHR if kind is Kind.CHR else stat.S_IFBLK
            try:
                os.mknod(name, mode | 0o600, entry.rdev, dir_fd=dfd)
            except PermissionError:
                self.skipped.add("devices")
                return False
        self.set_metadata_at(dfd, entry, name)
        return True

    def set_metadata_at(self, dfd: int, entry: Entry, name: bytes | None = None) -> None:
        path = entry_path(dfd, name or entry.name)
        apply_metadata(path, entry, entry.kind is Kind.LINK, self.skipped,
                       os.lstat(path))

    def write_content(self, fd: int, entry: Entry) -> None:
        """A new file's blocks, in stretches of consecutive blocks (one kernel copy where
        they lie one after another in a pack); holes are left unwritten."""
        hole = self.fmt.algo.hole
        bs = self.fmt.block_size
        stretch: list[BlockId] = []
        first = 0
        for start, block_id, count in self.objects.runs(entry.ref, entry.size):
            if stretch and (block_id == hole or len(stretch) == STRETCH_BLOCKS):
                self.count(self.objects.copy_blocks(stretch, fd, first * bs))
                stretch = []
            if block_id != hole:
                first = start if not stretch else first
                stretch.append(block_id)
            else:  # nothing to write, but that much of the file is done
                self.advance(min(entry.size, (start + count) * bs) - start * bs)
        if stretch:
            self.count(self.objects.copy_blocks(stretch, fd, first * bs))
        os.ftruncate(fd, entry.size)

    def link_member(self, dfd: int, rel: bytes, entry: Entry) -> list | None:
        """A hard-link member after its group's first: a link to the first member's inode
        (already written, as the walk meets the first member first)."""
        first_dir, first_name = self.open_first(rel, entry)
        try:
            st_first = os.lstat(first_name, dir_fd=first_dir)
            if not stat.S_ISREG(st_first.st_mode):
                raise IntegrityError(f"hard-link group {quote_path(entry.link)} names no "
                                     "regular file")
            try:
                st = os.lstat(entry.name, dir_fd=dfd)
                if (st.st_dev, st.st_ino) == (st_first.st_dev, st_first.st_ino):
                    return stat_key(st, self.scan_start)
            except FileNotFoundError:
                pass
            link_dir = self.tmp_fd if self.tmp_fd is not None else dfd
            tmp = b"l-" + secrets.token_hex(8).encode()
            os.link(first_name, tmp, src_dir_fd=first_dir, dst_dir_fd=link_dir,
                    follow_symlinks=False)
        finally:
            os.close(first_dir)
        try:
            st = os.lstat(entry.name, dir_fd=dfd)
            if stat.S_ISDIR(st.st_mode):
                _remove(dfd, entry.name)
        except FileNotFoundError:
            pass
        os.rename(tmp, entry.name, src_dir_fd=link_dir, dst_dir_fd=dfd)
        crashpoint("live-entry-written")
        self.advance(entry.size)  # its bytes were written once, for the group's first name
        return stat_key(os.lstat(entry.name, dir_fd=dfd), self.scan_start)

    def open_first(self, rel: bytes, entry: Entry) -> tuple[int, bytes]:
        """The directory fd and name of a group's first member, which the walk (names sorted,
        depth first) met before this member; a tree naming anything else is damage."""
        here = _join(rel, entry.name)
        if entry.link.split(b"/") >= here.split(b"/"):
            raise IntegrityError(f"{quote_path(here)}: hard-link group "
                                 f"{quote_path(entry.link)} names no earlier file")
        try:
            return self.open_parent(entry.link)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise IntegrityError(f"{quote_path(here)}: hard-link group "
                                 f"{quote_path(entry.link)} names no file") from exc
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise IntegrityError(f"{quote_path(here)}: hard-link group "
                                 f"{quote_path(entry.link)} passes through a symlink") from None

    def open_parent(self, path: bytes) -> tuple[int, bytes]:
        """An fd of the directory holding `path` (relative to the root), never following."""
        *parents, name = path.split(b"/")
        fd = os.dup(self.root_fd)
        try:
            for part in parents:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        return fd, name

    def count(self, n: int) -> None:
        self.bytes_written += n
        self.advance(n)

    def advance(self, n: int) -> None:
        """Progress in the files' bytes: written, or a hole or a hard link that needs none
        (a restore's total is its snapshot's size, every file's bytes)."""
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
            for name, key in unpacked_keys(entry[3]).items():
                if key and key[0] == DIR_KEY and name != ROOT_KEY_NAME:
                    todo.append(_join(rel, name))
        return out


class _Replace(Exception):
    """The live file cannot be changed in place: write a new one."""


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
