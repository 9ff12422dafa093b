"""A bounded pool of open packs, and how an OS error reading one is told from damage.

Each pack read keeps its descriptor (and, once a digest is checked in place, a read-only
mapping, which holds a second descriptor) open for the next read. At most MAX_OPEN_PACKS stay
open: opening one more closes the least recently used. A pack is used only inside
`with pool.use(name) as pack:`, which pins it: a pinned pack is never closed, so no descriptor
or mapping is closed (and its number reused by another file) while a read, a digest check or a
kernel copy is going on, in any thread.
"""

from __future__ import annotations

import errno
import mmap
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import IntegrityError, StoreAccessError, VolsyncError

MAX_OPEN_PACKS = 32  # packs kept open per store: 64 descriptors at most (a mapping dups its fd)

# errors that say the file or the disk under it is damaged or missing: the rest (EMFILE,
# ENFILE, ENOMEM, EACCES, ...) are the system's limits or settings, never damage
DAMAGE_ERRNOS = frozenset({errno.EIO, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP,
                           errno.ENXIO, errno.EBADMSG, errno.EUCLEAN, errno.ENODATA})


def is_damage(exc: OSError) -> bool:
    return exc.errno in DAMAGE_ERRNOS


def access_error(exc: OSError, doing: str) -> StoreAccessError:
    """The one-line error for an OS error that is not damage, naming the limit hit."""
    return StoreAccessError(f"{describe(exc)} while {doing}")


def pack_error(exc: OSError, doing: str, damage: str) -> VolsyncError:
    """`damage` (exit 6) for an error that means damage, else the limit or refusal (exit 1)."""
    return IntegrityError(damage) if is_damage(exc) else access_error(exc, doing)


def describe(exc: OSError) -> str:
    """An OS error in words, naming the limit (and its setting) when one was hit."""
    if exc.errno == errno.EMFILE:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return f"too many open files (ulimit -n {'unlimited' if soft < 0 else soft})"
    if exc.errno == errno.ENFILE:
        return f"the system's table of open files is full (fs.file-max {_sysctl('fs/file-max')})"
    if exc.errno == errno.ENOMEM:
        return ("out of memory or of memory mappings "
                f"(vm.max_map_count {_sysctl('vm/max_map_count')})")
    return exc.strerror or str(exc)


def _sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return "?"


class OpenPack:
    """One pack's descriptor and, once asked for, its read-only mapping."""

    __slots__ = ("_map", "_view", "doomed", "fd", "name", "users")

    def __init__(self, name: str, fd: int):
        self.name, self.fd = name, fd
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self.users = 0  # pins: uses in progress
        self.doomed = False  # dropped from the pool while pinned: closed by its last user

    @property
    def view(self) -> memoryview:
        """The whole pack, mapped (only valid inside the `use` that asked for it)."""
        assert self._view is not None, "use(name, mapped=True) maps the pack"
        return self._view

    def map(self) -> None:
        if self._view is not None:
            return
        doing = f"mapping pack {self.name}"
        try:
            size = os.fstat(self.fd).st_size
            if size == 0:
                self._view = memoryview(b"")
                return
            self._map = mmap.mmap(self.fd, size, prot=mmap.PROT_READ)
        except OSError as exc:
            raise pack_error(exc, doing, f"pack {self.name}: unreadable ({exc})") from None
        self._view = memoryview(self._map)

    def close(self) -> bool:
        """Unmap and close; False (and left open) while a slice of the mapping is alive."""
        if self._map is not None:
            try:
                self._view.release()
                self._map.close()
            except BufferError:
                self._view = memoryview(self._map)
                return False
            self._map = None
        self._view = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        return True


class PackPool:
    """Open packs of one directory, the least recently used closed past `cap`."""

    def __init__(self, directory: Path, cap: int | None = None):
        self.dir = directory
        self.cap = MAX_OPEN_PACKS if cap is None else cap
        self._open: OrderedDict[str, OpenPack] = OrderedDict()
        self._lingering: list[OpenPack] = []  # dropped, their mapping still referenced
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._open)

    @contextmanager
    def use(self, name: str, mapped: bool = False) -> Iterator[OpenPack]:
        """The pack, open (and mapped if asked) and pinned until the block ends."""
        pack = self._pin(name, mapped)
        try:
            yield pack
        finally:
            self._unpin(pack)

    def _pin(self, name: str, mapped: bool) -> OpenPack:
        with self._lock:
            pack = self._open.get(name)
            if pack is None:
                self._shrink(self.cap - 1)
                pack = OpenPack(name, self._open_fd(name))
                self._open[name] = pack
            else:
                self._open.move_to_end(name)
            if mapped:
                pack.map()
            pack.users += 1
            return pack

    def _open_fd(self, name: str) -> int:
        try:
            return os.open(self.dir / f"{name}.pack", os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise pack_error(exc, f"opening pack {name}",
                             f"pack {name}: unreadable ({exc})") from None

    def _unpin(self, pack: OpenPack) -> None:
        with self._lock:
            pack.users -= 1
            if pack.doomed and pack.users == 0 and not pack.close():
                self._lingering.append(pack)
            self._shrink(self.cap)

    def _shrink(self, limit: int) -> None:
        """Close least recently used packs until at most `limit` are open; pinned ones (and
        ones whose mapping is still referenced) stay, so the pool may briefly exceed it."""
        self._lingering = [p for p in self._lingering if not p.close()]
        for name, pack in list(self._open.items()):
            if len(self._open) <= limit:
                return
            if pack.users == 0 and pack.close():
                del self._open[name]

    def close(self, name: str) -> None:
        """Close one pack (about to be deleted or rewritten); a pinned one on its last unpin."""
        with self._lock:
            pack = self._open.pop(name, None)
            if pack is None:
                return
            if pack.users:
                pack.doomed = True
            elif not pack.close():
                self._lingering.append(pack)

    def close_all(self) -> None:
        for name in list(self._open):
            with suppress(OSError):
                self.close(name)
        with self._lock:
            self._lingering = [p for p in self._lingering if not p.close()]
