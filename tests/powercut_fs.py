#!/usr/bin/env python3
"""powercut_fs: a test-only FUSE filesystem that simulates a power cut (like Jepsen's LazyFS).

It keeps everything in memory, in its own process, in two copies: the *live* state (what
programs see) and the *durable* state (what a disk would still hold after losing power).
On the command "cut" the live state is thrown away and replaced by a copy of the durable one;
the mount stays in place and usable.

Durability rules (the whole model):

* Regular files: fsync() or fdatasync() of an open file makes that inode's data, size and
  metadata (mode, uid, gid, atime/mtime/ctime, xattrs) durable, as they are at that moment.
  It makes no name durable.
* Directories: fsync() of a directory (os.open(dir, O_RDONLY | O_DIRECTORY), then fsync)
  makes its entry list (name -> inode) and its own metadata durable: whatever creates,
  unlinks, renames, symlinks, hard links, mkdir, rmdir and mknod did in that directory.
  A rename between two directories is an unlink in one and a link in the other, each made
  durable by its own directory's fsync: after a cut the file may show in both places (as
  hard links) or in neither. Should a directory thereby end up under two parents (or in a
  cycle), only the first entry met in a breadth-first walk from the root (names in sorted
  order) is kept: the shallowest one.
* An inode that is durably linked but never fsynced shows after a cut as it was created:
  its creation mode/owner/times, empty (a file of size 0, a directory with no entries).
  An inode fsynced earlier shows its last fsynced state.
* Symlinks, fifos, sockets and device nodes cannot be fsynced: their whole state (target,
  mode, owner, times, xattrs) becomes durable with every fsync of a directory linking them.
* Link counts are recomputed from the durable entries at the cut.
* sync(), syncfs() and close() make nothing durable: the FUSE kernel module does not pass
  sync/syncfs on to a (non-virtiofs) FUSE filesystem, so code that relies on them instead of
  fsync is not crash-safe there, and the tests must catch it.
* The filesystem starts empty, with its root (mode 0755, owned by the mounting user) durable.

What the caller must do around a cut: stop (e.g. SIGKILL) every process using the mount
first. File and directory handles opened before a cut fail with EIO afterwards (read, write,
fsync, readdir...), so a survivor cannot make pre-cut state durable; mmaps of such files are
undefined. A cut applies between two filesystem requests (each request is atomic). After
`cut()` returns, the kernel caches have been invalidated and new opens/stats see exactly the
durable state; inode numbers are never reused, so st_ino is stable across cuts.

Not implemented by this process (pyfuse3 has no handler for them; the kernel copes):
lseek SEEK_DATA/SEEK_HOLE (kernel's generic version: the whole file is data), copy_file_range
(the kernel copies through our read and write), fallocate (EOPNOTSUPP; glibc's
posix_fallocate then emulates it with writes, which needs an O_RDWR descriptor), flock and
POSIX locks (kept locally by the kernel: enough on one machine), atime updates on read, ACLs.
Writable shared mmaps are not supported across a cut. Attribute and entry cache timeouts
are 0, so every lookup and stat reaches this process (correct, a bit slow: fine for tests).

Usage:
  python tests/powercut_fs.py MOUNTPOINT --control SOCKET   (serves until unmounted)
  SOCKET is a unix socket path, or @name for the abstract namespace; send one line per
  connection: "ping", "cut" or "exit"; the answer is "ok ..." or "error ...".
From tests:
  with powercut_fs.mounted(tmp_path) as fs:   # fs.path is the mount point
      ...; fs.cut(); ...
Needs: Linux, /dev/fuse, fusermount3 (Debian: fuse3), the pip package pyfuse3 (Debian:
libfuse3-dev and pkg-config to build it).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import faulthandler
import functools
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path

try:  # only the serving process needs these; the client API is plain stdlib
    import pyfuse3
    import trio
except ImportError:  # pragma: no cover - reported by fuse_unavailable_reason()
    pyfuse3 = trio = None

ROOT = 1  # pyfuse3.ROOT_INODE


# --- the filesystem (runs in the child process) -------------------------------------------

class Node:
    """One inode. `entries` (dirs), `data` (regular files), `target` (symlinks)."""

    __slots__ = ("ino", "mode", "uid", "gid", "rdev", "atime", "mtime", "ctime", "xattrs",
                 "data", "target", "entries", "nlink", "parent", "born")

    def copy(self) -> Node:
        n = Node.__new__(Node)
        for s in Node.__slots__:
            setattr(n, s, getattr(self, s))
        n.xattrs = dict(self.xattrs)
        n.data = None if self.data is None else bytearray(self.data)
        n.entries = None if self.entries is None else dict(self.entries)
        return n

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _fail(code: int):
    raise pyfuse3.FUSEError(code)


class Handle:
    __slots__ = ("ino", "epoch", "listing")

    def __init__(self, ino, epoch):
        self.ino, self.epoch, self.listing = ino, epoch, []


class PowercutOps(pyfuse3.Operations if pyfuse3 else object):
    enable_writeback_cache = False  # writes reach us at once; nothing is buffered in the kernel

    def __init__(self):
        super().__init__()
        root = self._make(ROOT, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), ROOT)
        self.live = {ROOT: root}
        self.durable = {ROOT: root.copy()}
        self.dref = Counter()     # ino -> number of durable directory entries naming it
        self.lookups = Counter()  # kernel lookup counts (survive cuts)
        self.opens = Counter()    # open handles per ino
        self.handles: dict[int, Handle] = {}
        self.next_ino, self.next_fh, self.epoch = ROOT + 1, 1, 0

    # helpers
    @staticmethod
    def _make(ino, mode, uid, gid, parent, rdev=0, target=None) -> Node:
        n = Node.__new__(Node)
        now = time.time_ns()
        n.ino, n.mode, n.uid, n.gid, n.rdev = ino, mode, uid, gid, rdev
        n.atime = n.mtime = n.ctime = now
        n.xattrs, n.target, n.parent = {}, target, parent
        n.data = bytearray() if stat.S_ISREG(mode) else None
        n.entries = {} if stat.S_ISDIR(mode) else None
        n.nlink = 2 if stat.S_ISDIR(mode) else 1
        n.born = None
        n.born = n.copy()
        return n

    def _node(self, ino) -> Node:
        node = self.live.get(ino)
        if node is None:
            _fail(errno.ENOENT)
        return node

    def _dir(self, ino) -> Node:
        node = self._node(ino)
        if not node.is_dir:
            _fail(errno.ENOTDIR)
        return node

    def _handle(self, fh) -> Handle:
        h = self.handles.get(fh)
        if h is None or h.epoch != self.epoch:
            _fail(errno.EIO)  # opened before a cut: the "machine" it belonged to is gone
        return h

    def _attr(self, n: Node):
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.generation, a.entry_timeout, a.attr_timeout = n.ino, 0, 0, 0
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev = n.mode, n.nlink, n.uid, n.gid, n.rdev
        if n.data is not None:
            a.st_size = len(n.data)
        elif n.target is not None:
            a.st_size = len(n.target)
        else:
            a.st_size = 4096 if n.is_dir else 0
        a.st_blksize, a.st_blocks = 4096, (a.st_size + 511) // 512
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = n.atime, n.mtime, n.ctime
        return a

    @staticmethod
    def _touch(n: Node, mtime=True):
        n.ctime = time.time_ns()
        if mtime:
            n.mtime = n.ctime

    def _create(self, parent_ino, name, mode, ctx, rdev=0, target=None) -> Node:
        parent = self._dir(parent_ino)
        if name in parent.entries:
            _fail(errno.EEXIST)
        if len(name) > 255:
            _fail(errno.ENAMETOOLONG)
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        node = self._make(self.next_ino, mode, ctx.uid, gid, parent_ino, rdev, target)
        self.next_ino += 1
        self.live[node.ino] = node
        parent.entries[name] = node.ino
        if node.is_dir:
            parent.nlink += 1
        self._touch(parent)
        self.lookups[node.ino] += 1
        return node

    def _unref(self, node: Node):
        """Drop one live name of `node` (the entry itself is already gone)."""
        node.nlink = 0 if node.is_dir else node.nlink - 1
        self._touch(node, mtime=False)
        self._gc(node.ino)

    def _gc(self, ino):
        node = self.live.get(ino)
        if node and node.nlink == 0 and not self.lookups[ino] and not self.opens[ino]:
            del self.live[ino]
            if not self.dref[ino]:
                self._drop_durable(ino)

    def _drop_durable(self, ino):
        node = self.durable.pop(ino, None)
        for child in (node.entries or {}).values() if node else ():
            self._decref(child)

    def _decref(self, ino):
        self.dref[ino] -= 1
        if self.dref[ino] <= 0:
            del self.dref[ino]
            if ino not in self.live:
                self._drop_durable(ino)

    # lookups and attributes
    async def lookup(self, parent_inode, name, ctx):
        parent = self._dir(parent_inode)
        if name == b".":
            ino = parent_inode
        elif name == b"..":
            ino = parent.parent
        else:
            ino = parent.entries.get(name)
            if ino is None:
                _fail(errno.ENOENT)
        self.lookups[ino] += 1
        return self._attr(self._node(ino))

    async def forget(self, inode_list):
        for ino, n in inode_list:
            self.lookups[ino] -= n
            if self.lookups[ino] <= 0:
                del self.lookups[ino]
            self._gc(ino)

    async def getattr(self, inode, ctx):
        return self._attr(self._node(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fh is not None:
            self._handle(fh)
        n = self._node(inode)
        now = time.time_ns()
        if fields.update_size:
            if n.data is None:
                _fail(errno.EISDIR if n.is_dir else errno.EINVAL)
            size = attr.st_size
            if size < len(n.data):
                del n.data[size:]
            else:
                n.data.extend(bytes(size - len(n.data)))
            if not fields.update_mtime:
                n.mtime = now
        if fields.update_mode:
            n.mode = stat.S_IFMT(n.mode) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            n.uid = attr.st_uid
        if fields.update_gid:
            n.gid = attr.st_gid
        if fields.update_atime:
            n.atime = attr.st_atime_ns
        if fields.update_mtime:
            n.mtime = attr.st_mtime_ns
        n.ctime = attr.st_ctime_ns if fields.update_ctime else now
        return self._attr(n)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 24  # 64 GiB
        s.f_files = s.f_ffree = s.f_favail = 1 << 24
        s.f_namemax = 255
        return s

    # names
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._attr(self._create(parent_inode, name, mode, ctx, rdev=rdev))

    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._attr(self._create(parent_inode, name, stat.S_IFDIR | (mode & 0o7777), ctx))

    async def symlink(self, parent_inode, name, target, ctx):
        return self._attr(self._create(parent_inode, name, stat.S_IFLNK | 0o777, ctx,
                                       target=bytes(target)))

    async def readlink(self, inode, ctx):
        n = self._node(inode)
        if n.target is None:
            _fail(errno.EINVAL)
        return n.target

    async def link(self, inode, new_parent_inode, new_name, ctx):
        node, parent = self._node(inode), self._dir(new_parent_inode)
        if node.is_dir:
            _fail(errno.EPERM)
        if new_name in parent.entries:
            _fail(errno.EEXIST)
        parent.entries[new_name] = inode
        node.nlink += 1
        self._touch(node, mtime=False)
        self._touch(parent)
        self.lookups[inode] += 1
        return self._attr(node)

    async def unlink(self, parent_inode, name, ctx):
        parent = self._dir(parent_inode)
        ino = parent.entries.get(name)
        if ino is None:
            _fail(errno.ENOENT)
        if self.live[ino].is_dir:
            _fail(errno.EISDIR)
        del parent.entries[name]
        self._touch(parent)
        self._unref(self.live[ino])

    async def rmdir(self, parent_inode, name, ctx):
        parent = self._dir(parent_inode)
        ino = parent.entries.get(name)
        if ino is None:
            _fail(errno.ENOENT)
        node = self.live[ino]
        if not node.is_dir:
            _fail(errno.ENOTDIR)
        if node.entries:
            _fail(errno.ENOTEMPTY)
        del parent.entries[name]
        parent.nlink -= 1
        self._touch(parent)
        self._unref(node)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old, new = self._dir(parent_inode_old), self._dir(parent_inode_new)
        src = old.entries.get(name_old)
        if src is None:
            _fail(errno.ENOENT)
        dst = new.entries.get(name_new)
        snode = self.live[src]
        if flags & pyfuse3.RENAME_EXCHANGE:
            if dst is None:
                _fail(errno.ENOENT)
            old.entries[name_old], new.entries[name_new] = dst, src
            for ino, frm, to in ((src, old, new), (dst, new, old)):
                n = self.live[ino]
                if n.is_dir and frm is not to:
                    n.parent, frm.nlink, to.nlink = to.ino, frm.nlink - 1, to.nlink + 1
                self._touch(n, mtime=False)
            self._touch(old)
            self._touch(new)
            return
        if dst is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                _fail(errno.EEXIST)
            if dst == src:
                return
            dnode = self.live[dst]
            if snode.is_dir and not dnode.is_dir:
                _fail(errno.ENOTDIR)
            if dnode.is_dir and not snode.is_dir:
                _fail(errno.EISDIR)
            if dnode.is_dir and dnode.entries:
                _fail(errno.ENOTEMPTY)
        del old.entries[name_old]
        new.entries[name_new] = src
        if snode.is_dir and old is not new:
            snode.parent, old.nlink, new.nlink = new.ino, old.nlink - 1, new.nlink + 1
        self._touch(snode, mtime=False)
        self._touch(old)
        self._touch(new)
        if dst is not None:
            if self.live[dst].is_dir:
                new.nlink -= 1
            self._unref(self.live[dst])

    # files
    def _open(self, ino) -> int:
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.handles[fh] = Handle(ino, self.epoch)
        self.opens[ino] += 1
        return fh

    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        if flags & os.O_TRUNC and node.data:  # libfuse turns on atomic O_TRUNC
            node.data.clear()
            self._touch(node)
        return pyfuse3.FileInfo(fh=self._open(inode))  # not direct_io: mmap works

    async def create(self, parent_inode, name, mode, flags, ctx):
        node = self._create(parent_inode, name, stat.S_IFREG | (mode & 0o7777), ctx)
        return pyfuse3.FileInfo(fh=self._open(node.ino)), self._attr(node)

    def _data(self, fh) -> Node:
        node = self._node(self._handle(fh).ino)
        if node.data is None:
            _fail(errno.EINVAL)
        return node

    async def read(self, fh, off, size):
        return bytes(self._data(fh).data[off:off + size])

    async def write(self, fh, off, buf):
        node = self._data(fh)
        if off > len(node.data):
            node.data.extend(bytes(off - len(node.data)))
        node.data[off:off + len(buf)] = buf
        self._touch(node)
        return len(buf)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        h = self.handles.pop(fh, None)
        if h is not None:
            self.opens[h.ino] -= 1
            if self.opens[h.ino] <= 0:
                del self.opens[h.ino]
            self._gc(h.ino)

    async def fsync(self, fh, datasync):
        ino = self._handle(fh).ino
        self.durable[ino] = self._node(ino).copy()

    # directories
    async def opendir(self, inode, ctx):
        self._dir(inode)
        return self._open(inode)

    async def readdir(self, fh, start_id, token):
        h = self._handle(fh)
        if start_id == 0:
            h.listing = sorted(self._dir(h.ino).entries.items())
        for i in range(start_id, len(h.listing)):
            name, ino = h.listing[i]
            node = self.live.get(ino)
            if node is None:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(node), i + 1):
                break
            self.lookups[ino] += 1

    async def releasedir(self, fh):
        await self.release(fh)

    async def fsyncdir(self, fh, datasync):
        ino = self._handle(fh).ino
        node = self._dir(ino)
        prev = self.durable.get(ino)
        before = prev.entries if prev else {}
        for name, child in node.entries.items():
            cnode = self.live[child]
            if not (cnode.is_dir or stat.S_ISREG(cnode.mode)):
                self.durable[child] = cnode.copy()  # symlink, fifo...: all of it, now
            elif child not in self.durable:
                self.durable[child] = cnode.born.copy()  # never fsynced: as created
            if before.get(name) != child:
                self.dref[child] += 1
        self.durable[ino] = node.copy()
        for name, child in before.items():
            if node.entries.get(name) != child:
                self._decref(child)

    # xattrs
    async def setxattr(self, inode, name, value, ctx):
        n = self._node(inode)
        n.xattrs[bytes(name)] = bytes(value)
        self._touch(n, mtime=False)

    async def getxattr(self, inode, name, ctx):
        value = self._node(inode).xattrs.get(bytes(name))
        if value is None:
            _fail(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode, ctx):
        return list(self._node(inode).xattrs)

    async def removexattr(self, inode, name, ctx):
        n = self._node(inode)
        if n.xattrs.pop(bytes(name), None) is None:
            _fail(pyfuse3.ENOATTR)
        self._touch(n, mtime=False)

    # the power cut
    def cut(self) -> list:
        """Make the live state a copy of the durable one; return the kernel's stale names."""
        stale = [(d.ino, name) for d in self.live.values() if d.is_dir for name in d.entries]
        self.epoch += 1
        root = self.durable[ROOT].copy()
        root.parent, root.nlink = ROOT, 2
        new, dref, queue = {ROOT: root}, Counter(), deque([ROOT])
        while queue:
            d = new[queue.popleft()]
            for name in sorted(d.entries):
                c = d.entries[name]
                if c in new:
                    if new[c].is_dir:  # a second parent, or a cycle: keep the first one
                        del d.entries[name]
                        continue
                elif c in self.durable:
                    child = new[c] = self.durable[c].copy()
                    child.nlink = 0
                    if child.is_dir:
                        child.nlink, child.parent = 2, d.ino
                        queue.append(c)
                else:  # cannot happen: fsyncdir stores every child it links
                    del d.entries[name]
                    continue
                if new[c].is_dir:
                    d.nlink += 1
                else:
                    new[c].nlink += 1
                dref[c] += 1
        self.live, self.dref = new, dref
        self.durable = {ino: n.copy() for ino, n in new.items()}
        return stale

    def invalidate(self, stale):
        """Drop the kernel's cached names, attributes and pages (blocking: run in a thread)."""
        for parent, name in stale:
            if parent == ROOT or parent in self.lookups:
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_entry(parent, name)
        for ino in list(self.lookups) + [ROOT]:
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(ino)


def _sockaddr(control: str) -> str:
    return "\0" + control[1:] if control.startswith("@") else control


async def _control(ops: PowercutOps, control: str):
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if not control.startswith("@"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
    await sock.bind(_sockaddr(control))
    sock.listen(8)
    while True:
        conn, _ = await sock.accept()
        with conn:
            data = b""
            while not data.endswith(b"\n") and len(data) < 1024:
                chunk = await conn.recv(1024)
                if not chunk:
                    break
                data += chunk
            cmd = data.decode(errors="replace").strip()
            if cmd == "ping":
                reply = "ok"
            elif cmd == "cut":
                stale = ops.cut()
                await trio.to_thread.run_sync(ops.invalidate, stale)
                reply = f"ok {len(ops.live)} inodes"
            elif cmd == "exit":
                reply = "ok"
                pyfuse3.terminate()
            else:
                reply = f"error unknown command {cmd!r}"
            with contextlib.suppress(OSError):
                await conn.send((reply + "\n").encode())


async def _watch_parent(ppid: int):
    while os.getppid() == ppid:  # reparented: whoever started us is gone, and so are we
        await trio.sleep(0.5)
    pyfuse3.terminate()


async def _serve(ops: PowercutOps, control: str, exit_with_parent: bool):
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_control, ops, control)
        if exit_with_parent:
            nursery.start_soon(_watch_parent, os.getppid())

        async def on_signals():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for _ in sigs:
                    pyfuse3.terminate()
        nursery.start_soon(on_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def serve(mountpoint: str, control: str, debug=False, exit_with_parent=False) -> None:
    ops = PowercutOps()
    options = set(pyfuse3.default_options) | {"fsname=powercutfs", "subtype=powercut"}
    if os.geteuid() == 0:
        options.add("allow_other")
    if debug:
        options.add("debug")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks into the log, on ask
    pyfuse3.init(ops, mountpoint, options)
    try:
        trio.run(_serve, ops, control, exit_with_parent)
    finally:
        pyfuse3.close(unmount=True)
        if not control.startswith("@"):
            with contextlib.suppress(OSError):
                os.unlink(control)


# --- the client API (the test process) -----------------------------------------------------

def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def is_mounted(path) -> bool:
    """Whether `path` is a mount point (read from /proc/self/mountinfo: never blocks)."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == path for line in f)


def _fusermount_unmount(path) -> None:
    fm = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
    for args in ([fm, "-u", "-q", path], [fm, "-u", "-z", "-q", path]):
        if not is_mounted(path):
            return
        subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30, check=False)
    if is_mounted(path):
        subprocess.run(["umount", "-l", path], stdin=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30, check=False)


class PowercutFS:
    """A mounted powercut filesystem served by a child process."""

    def __init__(self, path: Path, control: str, proc: subprocess.Popen, log: Path):
        self.path, self.control, self.proc, self.log = path, control, proc, log

    def command(self, cmd: str, timeout: float = 60) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(_sockaddr(self.control))
            s.sendall(cmd.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                try:
                    chunk = s.recv(1024)
                except TimeoutError:
                    raise RuntimeError(f"powercut_fs {cmd!r}: no answer in {timeout} s; "
                                       f"where it waits:\n{self.stacks()}") from None
                if not chunk:
                    break
                reply += chunk
        reply_s = reply.decode().strip()
        if not reply_s.startswith("ok"):
            raise RuntimeError(f"powercut_fs {cmd!r}: {reply_s or 'no answer'}\n{self.log_text()}")
        return reply_s

    def cut(self) -> None:
        """Lose power: from now on the mount shows exactly the durable state. Kill every
        process that uses the mount before calling this."""
        self.command("cut")

    def stacks(self) -> str:
        """The server's Python stacks (faulthandler, into its log) and, where readable (as
        root), its threads' kernel stacks: what a hung command waits for."""
        out = []
        with contextlib.suppress(OSError):
            os.kill(self.proc.pid, signal.SIGUSR1)
            time.sleep(1)
        for task in sorted(Path(f"/proc/{self.proc.pid}/task").glob("*")):
            with contextlib.suppress(OSError):
                out.append(f"thread {task.name}:\n{(task / 'stack').read_text()}")
        return self.log_text() + "\n" + "\n".join(out)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def unmount(self) -> None:
        """Unmount (lazily if busy) and stop the server; safe to call twice."""
        mp = str(self.path)
        if self.proc.poll() is None:
            _fusermount_unmount(mp)  # lazily if busy: the server then serves on, so ask it
            stops = ((lambda: None, 1), (lambda: self.command("exit", timeout=5), 5),
                     (self.proc.kill, 5))
            for stop, wait in stops:
                with contextlib.suppress(OSError, RuntimeError):
                    stop()
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                self.proc.wait()
        _fusermount_unmount(mp)  # a server that died leaves a dead mount behind

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unmount()


def mount(mountpoint, log=None, timeout: float = 20, debug: bool = False) -> PowercutFS:
    """Mount an empty powercut filesystem on the directory `mountpoint` (created if needed)
    and return once it serves requests."""
    mp = Path(os.path.realpath(mountpoint))
    mp.mkdir(parents=True, exist_ok=True)
    log = Path(log) if log else mp.with_name(mp.name + ".powercut.log")
    control = f"@powercut-{os.getpid()}-{secrets.token_hex(6)}"
    args = [sys.executable, os.path.abspath(__file__), str(mp), "--control", control,
            "--exit-with-parent"]
    with open(log, "ab") as logf:
        proc = subprocess.Popen(args + (["--debug"] if debug else []), stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=logf, start_new_session=True)
    fs = PowercutFS(mp, control, proc, log)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            fs.unmount()
            raise RuntimeError(f"powercut_fs exited with {proc.returncode}:\n{fs.log_text()}")
        try:
            fs.command("ping", timeout=5)
            if is_mounted(mp):
                return fs
        except OSError:
            pass
        if time.monotonic() > deadline:
            fs.unmount()
            raise RuntimeError(f"powercut_fs did not mount within {timeout}s:\n{fs.log_text()}")
        time.sleep(0.02)


@contextlib.contextmanager
def mounted(base, name: str = "mnt", **kw):
    """`with mounted(tmp_path) as fs:` mounts on base/name, always unmounts at the end."""
    fs = mount(Path(base) / name, **kw)
    try:
        yield fs
    finally:
        fs.unmount()


@functools.lru_cache(maxsize=None)
def fuse_unavailable_reason() -> str | None:
    """None if a powercut filesystem can be mounted here, else why not (for pytest.skip)."""
    if not sys.platform.startswith("linux"):
        return "FUSE tests need Linux"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "no fusermount3 (Debian package fuse3)"
    if pyfuse3 is None:
        return "pyfuse3 is not installed (pip install pyfuse3; needs libfuse3-dev, pkg-config)"
    with tempfile.TemporaryDirectory(prefix="powercut-probe") as tmp:
        try:
            with mounted(tmp, timeout=20):
                pass
        except Exception as exc:  # noqa: BLE001 - any failure means: skip
            return f"cannot mount a FUSE filesystem here: {exc}"
    return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mountpoint")
    ap.add_argument("--control", required=True,
                    help="unix socket path, or @name (abstract); commands: ping, cut, exit")
    ap.add_argument("--debug", action="store_true", help="libfuse debug output on stderr")
    ap.add_argument("--exit-with-parent", action="store_true",
                    help="unmount and exit when the parent process dies")
    args = ap.parse_args(argv)
    if pyfuse3 is None:
        sys.exit("powercut_fs: pyfuse3 is not installed")
    serve(args.mountpoint, args.control, args.debug, args.exit_with_parent)


if __name__ == "__main__":
    main()
