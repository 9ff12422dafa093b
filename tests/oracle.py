"""rsync as the oracle: reference copies, tree comparison, and the state of files outside the
volumes.

    copy_tree(SRC, DST)              rsync -aHAXS --numeric-ids --exclude=/.volsync SRC/ DST/
    compare(EXPECTED, ACTUAL)        [] when equal, else rsync's itemized lines (plus the checks
                                     rsync cannot make: extra hard links, lost holes)
    outside_state(paths) / outside_changes(before, after)

The comparison is `rsync -aHAXS --numeric-ids -nic --delete --modify-window=-1
--exclude=/.volsync EXPECTED/ ACTUAL/`: -c compares content by checksum, -n changes nothing,
--modify-window=-1 makes rsync compare mtimes to the nanosecond (by default it ignores
sub-second differences), and the top-level .volsync of ACTUAL is neither compared nor deleted.
Both sides are read by the same process, so a check rsync cannot make for this user (owners,
devices, trusted.* when not root) is left out on both sides alike.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess

HAVE_RSYNC = shutil.which("rsync") is not None
# --modify-window=-1 on copies too: without it rsync takes mtimes equal to the second and then
# leaves a directory's fresh mtime in place when the source's lies in the same second
RSYNC = ["rsync", "-aHAXS", "--numeric-ids", "--modify-window=-1"]
COMPARE = RSYNC + ["-nic", "--delete"]
META = b".volsync"
# Triage only: VOLSYNC_ORACLE_SKIP_ROOT=1 drops rsync's line for the root directory itself
# (its mode, mtime, owner, xattrs), to see what else differs while root metadata is missing.
SKIP_ROOT = os.environ.get("VOLSYNC_ORACLE_SKIP_ROOT") == "1"


def _b(p) -> bytes:
    return p if isinstance(p, bytes) else os.fsencode(os.fspath(p))


def _slash(p) -> bytes:
    return _b(p).rstrip(b"/") + b"/"


def copy_tree(src, dst, exclude_meta: bool = True, prefix: list[str] | None = None) -> None:
    """A reference copy: what `rsync -aHAXS --numeric-ids` keeps of SRC's live tree (SRC's
    top-level .volsync left out)."""
    args = list(prefix or []) + RSYNC + (["--exclude=/.volsync"] if exclude_meta else [])
    p = subprocess.run(args + [_slash(src), _slash(dst)], capture_output=True)
    if p.returncode != 0:
        raise AssertionError(f"rsync copy {src} -> {dst} exited {p.returncode}:\n"
                             + p.stderr.decode(errors="replace"))
    _copy_acls(src, dst, exclude_meta)


ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")


def _copy_acls(src, dst, exclude_meta: bool) -> None:
    """Copy POSIX ACLs again, as raw xattrs: rsync 3.x -A gets some of them wrong when it
    creates a directory (seen: `group::r-x` with `mask::r-x` and a default ACL copied as
    `group::---`), while its comparison of exact copies is right. Setting an xattr changes
    ctime only, so the copy's mtimes stay."""
    src, dst = _b(src), _b(dst)
    items = [(b"", os.lstat(src))] + list(walk(src, exclude_meta))
    for rel, st in items:
        if stat.S_ISLNK(st.st_mode):
            continue
        s = os.path.join(src, rel) if rel else src
        d = os.path.join(dst, rel) if rel else dst
        try:
            names = set(os.listxattr(s, follow_symlinks=False))
            have = set(os.listxattr(d, follow_symlinks=False))
        except OSError:
            continue
        for name in ACL_XATTRS:
            if name in names:
                value = os.getxattr(s, name, follow_symlinks=False)
                if name not in have or os.getxattr(d, name, follow_symlinks=False) != value:
                    os.setxattr(d, name, value, follow_symlinks=False)
            elif name in have:
                os.removexattr(d, name, follow_symlinks=False)


def rsync_diff(expected, actual, exclude_meta: bool = True,
               prefix: list[str] | None = None) -> list[str]:
    """rsync's itemized differences EXPECTED -> ACTUAL (empty: equal). Raises if rsync fails."""
    args = list(prefix or []) + COMPARE + (["--exclude=/.volsync"] if exclude_meta else [])
    p = subprocess.run(args + [_slash(expected), _slash(actual)], capture_output=True)
    out = p.stdout.decode(errors="backslashreplace").splitlines()
    if p.returncode != 0:
        raise AssertionError(f"rsync compare exited {p.returncode} (expected 0):\n"
                             + p.stderr.decode(errors="replace") + "\n".join(out))
    lines = [line for line in out if line.strip()]
    if SKIP_ROOT:
        lines = [line for line in lines if not line.endswith(" ./")]
    return lines


def walk(root, exclude_meta: bool = True):
    """(relative path, lstat) of everything below root (not the root), symlinks not followed."""
    root = _b(root)
    stack = [b""]
    while stack:
        rel = stack.pop()
        d = os.path.join(root, rel) if rel else root
        for name in sorted(os.listdir(d)):
            if not rel and name == META and exclude_meta:
                continue
            r = os.path.join(rel, name) if rel else name
            st = os.lstat(os.path.join(root, r))
            yield r, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(r)


def link_groups(root, exclude_meta: bool = True) -> set[frozenset]:
    """Sets of names (2 or more) sharing one inode inside the tree."""
    by_inode: dict[tuple, list] = {}
    for rel, st in walk(root, exclude_meta):
        if not stat.S_ISDIR(st.st_mode):
            by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
    return {frozenset(v) for v in by_inode.values() if len(v) > 1}


def _show(p: bytes) -> str:
    return repr(os.fsdecode(p))[1:-1]


def link_problems(expected, actual, exclude_meta: bool = True) -> list[str]:
    """Hard links rsync -n cannot see: ACTUAL linking names that EXPECTED keeps apart."""
    want = link_groups(expected, exclude_meta)
    have = link_groups(actual, exclude_meta)
    out = []
    for group in sorted(have - want, key=sorted):
        names = ", ".join(_show(n) for n in sorted(group))
        out.append(f"LINKS  extra hard link group in actual: {names}")
    return out


SPARSE_MIN_SIZE = 1 << 20


def sparse_problems(expected, actual, exclude_meta: bool = True) -> list[str]:
    """Holes rsync -n cannot see: a file that is mostly holes in EXPECTED (an `rsync -S` copy)
    must not be mostly allocated in ACTUAL. Slack: twice the expected allocation plus 1 MiB
    (a block-granular writer allocates whole blocks around each piece of data)."""
    out = []
    expected, actual = _b(expected), _b(actual)
    for rel, st in walk(expected, exclude_meta):
        if not stat.S_ISREG(st.st_mode) or st.st_size < SPARSE_MIN_SIZE:
            continue
        want = st.st_blocks * 512
        if want > st.st_size // 4:
            continue
        try:
            got = os.lstat(os.path.join(actual, rel))
        except FileNotFoundError:
            continue  # rsync reports it
        if stat.S_ISREG(got.st_mode) and got.st_blocks * 512 > 2 * want + (1 << 20):
            out.append(f"SPARSE {_show(rel)}: {got.st_blocks * 512} bytes allocated of "
                       f"{got.st_size}; expected about {want} (holes not kept)")
    return out


def compare(expected, actual, exclude_meta: bool = True,
            prefix: list[str] | None = None) -> list[str]:
    """Everything that differs, as readable lines; [] when ACTUAL equals EXPECTED."""
    return (rsync_diff(expected, actual, exclude_meta, prefix)
            + link_problems(expected, actual, exclude_meta)
            + sparse_problems(expected, actual, exclude_meta))


# --- files outside the volumes -------------------------------------------------------------

def file_state(path) -> dict:
    st = os.lstat(path)
    h = hashlib.sha256()
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    try:
        xattrs = {n: os.getxattr(path, n, follow_symlinks=False)
                  for n in sorted(os.listxattr(path, follow_symlinks=False))}
    except OSError:
        xattrs = None
    return {"sha256": h.hexdigest(), "mode": oct(st.st_mode), "uid": st.st_uid,
            "gid": st.st_gid, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "nlink": st.st_nlink, "xattrs": xattrs}


def outside_state(paths, volumes=()) -> dict:
    """State of each outside file; with VOLUMES, also the names inside them that share its
    inode (`names`)."""
    out = {}
    for p in paths:
        try:
            out[_b(p)] = file_state(p)
        except FileNotFoundError:
            out[_b(p)] = None
    if volumes:
        wanted = {(os.lstat(p).st_dev, st["inode"]): st for p, st in out.items() if st}
        for st in wanted.values():
            st["names"] = []
        for vol in volumes:
            if not os.path.isdir(vol):
                continue
            for rel, lst in walk(vol):
                st = wanted.get((lst.st_dev, lst.st_ino))
                if st is not None:
                    st["names"].append(os.path.join(_b(vol), rel))
    return out


def outside_changes(before: dict, after: dict) -> list[str]:
    """What changed in the files outside the volumes. Content, mode, owner, mtime, inode and
    xattrs must never change. The names inside the volumes that share the inode may change
    (a name removed, replaced, or linked to another member of its hard-link group, as rsync
    -H does), and with them the link count and ctime, which the kernel sets on every link or
    unlink; a ctime change with the same names (or, without `names`, the same link count)
    means the inode was written to through a volume (chmod, chown, utime, setxattr...)."""
    out = []
    for path, old in before.items():
        new = after.get(path)
        if old is None or new is None:
            if old != new:
                out.append(f"OUTSIDE {_show(path)}: {'created' if old is None else 'deleted'}")
            continue
        for key in ("sha256", "mode", "uid", "gid", "mtime_ns", "inode", "xattrs"):
            if old[key] != new[key]:
                out.append(f"OUTSIDE {_show(path)}: {key} {old[key]!r} -> {new[key]!r}")
        relinked = old["nlink"] != new["nlink"] or old.get("names") != new.get("names")
        if old["ctime_ns"] != new["ctime_ns"] and not relinked:
            names = ", ".join(_show(n) for n in old.get("names", []))
            out.append(f"OUTSIDE {_show(path)}: ctime changed ({old['ctime_ns']} -> "
                       f"{new['ctime_ns']}) with the same link count ({old['nlink']})"
                       + (f" and the same names in the volumes: {names}" if names else ""))
    return out
