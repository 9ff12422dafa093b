"""Metadata of live-tree entries: extended attributes (POSIX ACLs included), ownership,
modes and times, read and applied without following symlinks.

Entries are reached by a directory fd and a name; the path `/proc/self/fd/DFD/NAME` with
`follow_symlinks=False` names exactly that entry for the xattr calls that take no dir fd.
What the process may not restore (ownership when not root, devices, trusted./security.
attributes) is counted in `NotRestored` and is not an error, as for `cp -a`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from dataclasses import dataclass, field

from ..model import Entry, Kind

SKIPPED_ERRNOS = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM, errno.EACCES,
                  errno.E2BIG, errno.ERANGE)
PRIVILEGED = os.geteuid() == 0


def entry_path(dfd: int, name: bytes) -> bytes:
    return b"/proc/self/fd/%d/%s" % (dfd, name)


def read_xattrs(target: int | bytes) -> tuple[tuple[bytes, bytes], ...]:
    """Every extended attribute the process can read (an fd, or a path not followed)."""
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target) if follow else os.listxattr(target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in SKIPPED_ERRNOS + (errno.ENOENT,):  # ENOENT: gone since its lstat
            return ()
        raise
    out = []
    for name in names:
        try:
            value = (os.getxattr(target, name) if follow
                     else os.getxattr(target, name, follow_symlinks=False))
        except OSError as exc:
            if exc.errno in SKIPPED_ERRNOS + (errno.ENOENT,):
                continue
            raise
        out.append((os.fsencode(name), value))
    return tuple(sorted(out))


@dataclass
class NotRestored:
    """What a write could not restore because the process may not (counted, not errors)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, what: str) -> None:
        self.counts[what] += 1

    def as_dict(self) -> dict[str, int]:
        return {k: self.counts.get(k, 0) for k in ("ownership", "xattrs", "devices")}

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def apply_metadata(target: int | bytes, entry: Entry, is_link: bool, skipped: NotRestored,
                   current: os.stat_result) -> None:
    """Owner, then xattrs (chown clears file capabilities), then mode (which also sets the
    ACL mask), then mtime. `target` is an fd, or a path whose last component is not followed
    (symlinks, fifos, devices). A setuid/setgid bit is kept only if the owner it belongs to
    was restored."""
    follow = isinstance(target, int)
    owner_ok = _chown(target, entry, current, follow, skipped)
    if not is_link and not PRIVILEGED and not current.st_mode & stat.S_IWUSR:
        _chmod(target, stat.S_IMODE(current.st_mode) | stat.S_IWUSR, follow)  # for setxattr
    _set_xattrs(target, entry.xattrs, follow, skipped)
    if not is_link:
        mode = entry.mode
        if not owner_ok:  # as cp -a: no set-id bits, and no sticky bit on a non-directory
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
            if entry.kind is not Kind.DIR:
                mode &= ~stat.S_ISVTX
        _chmod(target, mode, follow)
    times = (entry.mtime_ns, entry.mtime_ns)
    if follow:
        os.utime(target, ns=times)
    else:
        os.utime(target, ns=times, follow_symlinks=False)


def _chmod(target, mode: int, follow: bool) -> None:
    if follow:
        os.fchmod(target, mode)
    else:
        os.chmod(target, mode, follow_symlinks=False)


def loosen_for_writing(dfd: int) -> bool:
    """A directory the process owns but may not write (mode 0o5xx): its owner may add the
    write bit, which the final metadata of the directory takes away again. Root needs none.
    Returns True when the mode was changed."""
    if PRIVILEGED:
        return False
    st = os.fstat(dfd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o300 == 0o300:
        return False
    os.fchmod(dfd, stat.S_IMODE(st.st_mode) | 0o300)
    return True


def _chown(target, entry: Entry, current: os.stat_result, follow: bool,
           skipped: NotRestored) -> bool:
    """True when the recorded owner and group are in place (or none were recorded)."""
    uid = -1 if entry.uid is None or entry.uid == current.st_uid else entry.uid
    gid = -1 if entry.gid is None or entry.gid == current.st_gid else entry.gid
    if uid == -1 and gid == -1:
        return True
    try:
        if follow:
            os.fchown(target, uid, gid)
        else:
            os.chown(target, uid, gid, follow_symlinks=False)
        return True
    except PermissionError:
        skipped.add("ownership")
        return False


def _set_xattrs(target, wanted: tuple[tuple[bytes, bytes], ...], follow: bool,
                skipped: NotRestored) -> None:
    have = dict(read_xattrs(target))
    want = dict(wanted)
    for name in have.keys() - want.keys():
        try:
            if follow:
                os.removexattr(target, name)
            else:
                os.removexattr(target, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in SKIPPED_ERRNOS:
                raise
            skipped.add("xattrs")
    # POSIX ACLs last: setting one rewrites the mode's permission bits (and may take away
    # the write permission the other attributes need)
    for name, value in sorted(wanted, key=lambda kv: kv[0].startswith(b"system.posix_acl")):
        if have.get(name) == value:
            continue
        try:
            if follow:
                os.setxattr(target, name, value)
            else:
                os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in SKIPPED_ERRNOS + (errno.EINVAL,):
                raise
            skipped.add("xattrs")
