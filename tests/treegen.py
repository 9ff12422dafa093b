"""Seeded random live trees holding every kind of metadata a mirror must keep exactly as
`rsync -aHAXS --numeric-ids` would, and seeded random edits of them.

    gen = TreeGen(seed)                       # features: every one this process can make
    gen.populate(vol, outside_dir, entries=40)
    gen.edit(vol, outside_dir, ops=6)         # write, truncate, rename, chmod, setfacl, ...
    gen.outside                               # paths created OUTSIDE the volumes (link targets)
    gen.log                                   # one line per operation, for failure reports

Everything is addressed by bytes paths (names may be invalid UTF-8). The top-level `.volsync`
of a volume is never created, read or touched; `.volsync` below the top is a legal name and is
generated. Root-only features (ownership, trusted.* xattrs, device nodes) are left out when the
process is not root; ACLs are left out without `setfacl`.

Features (VOLSYNC_DIFF_FEATURES selects them: `all`, `basic`, `a,b,c`, or `all,-a,-b`):
  modes_special  setuid / setgid / sticky bits (also a setuid file owned by an ordinary uid)
  owners         random numeric uid/gid, many without a passwd entry (root only)
  xattrs         user.* extended attributes, binary and empty values
  xattrs_trusted trusted.* extended attributes, also on symlinks (root only)
  acls           POSIX access ACLs, and default ACLs on directories (needs setfacl)
  hardlinks      2-3 names of one file, in the same and in different directories
  outside_links  a file hard-linked to a file in a sibling "outside" directory
  sparse         files with holes (truncate/seek)
  fifos          named pipes
  devices        character and block device nodes (root only)
  odd_names      spaces, newline, leading dash, invalid UTF-8, 255-byte names, nested .volsync
  ns_times       nanosecond mtimes, before 1970 and after 2038 (else whole seconds, 2000-2030)
  root_meta      the volume root's own mode, mtime and xattrs
Regular files, directories, symlinks, plain modes and mtimes are always generated.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

IS_ROOT = os.geteuid() == 0
HAVE_SETFACL = shutil.which("setfacl") is not None
META = b".volsync"

ALL_FEATURES = frozenset({
    "modes_special", "owners", "xattrs", "xattrs_trusted", "acls", "hardlinks", "outside_links",
    "sparse", "fifos", "devices", "odd_names", "ns_times", "root_meta",
})
ROOT_ONLY = frozenset({"owners", "xattrs_trusted", "devices"})
# What format 1 (today's volsync) records: useful to debug the harness itself.
BASIC = frozenset({"odd_names", "ns_times"})

# uids/gids: root, system, ordinary, nobody, no passwd entry at all, beyond 2^31
OWNER_POOL = (0, 1, 1000, 12345, 54321, 65534, 3_000_000_000)


def _fs_supports_user_xattrs(where: Path) -> bool:
    probe = Path(where) / ".xattr-probe"
    try:
        probe.write_bytes(b"")
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def available_features(where: Path | None = None) -> frozenset:
    """Every feature this process can generate (on the filesystem holding `where`)."""
    feats = set(ALL_FEATURES)
    if not IS_ROOT:
        feats -= ROOT_ONLY
    if not HAVE_SETFACL:
        feats.discard("acls")
    if where is not None and not _fs_supports_user_xattrs(where):
        feats -= {"xattrs", "acls"}
    return frozenset(feats)


def parse_features(text: str | None) -> frozenset:
    """`all` (default), `basic`, `x,y` or `all,-x,-y` -> a feature set (unknown names raise)."""
    text = (text or "all").strip()
    out: set[str] = set()
    for word in [w.strip() for w in text.split(",") if w.strip()]:
        if word == "all":
            out |= ALL_FEATURES
        elif word == "basic":
            out |= BASIC
        elif word.startswith("-"):
            if word[1:] not in ALL_FEATURES:
                raise ValueError(f"unknown feature {word[1:]!r}; known: {sorted(ALL_FEATURES)}")
            out.discard(word[1:])
        else:
            if word not in ALL_FEATURES:
                raise ValueError(f"unknown feature {word!r}; known: {sorted(ALL_FEATURES)}")
            out.add(word)
    return frozenset(out)


def features_from_env(var: str = "VOLSYNC_DIFF_FEATURES") -> frozenset:
    return parse_features(os.environ.get(var))


def show(p: bytes | str) -> str:
    """A path as a readable, unambiguous string (newlines and invalid UTF-8 escaped)."""
    s = os.fsdecode(p) if isinstance(p, bytes) else p
    return repr(s)[1:-1]


def _b(p) -> bytes:
    return p if isinstance(p, bytes) else os.fsencode(os.fspath(p))


class TreeGen:
    """Builds and edits live trees; `rng` is a `random.Random(seed)`, so a seed replays."""

    def __init__(self, seed: int, features=None, *, big_sparse: bool = False,
                 unreadable_ok: bool = True, owner_pool=OWNER_POOL):
        self.seed = seed
        self.rng = random.Random(seed)
        feats = available_features() if features is None else frozenset(features)
        # never ask for what this process cannot do
        self.features = feats & available_features()
        self.big_sparse = big_sparse
        # unreadable_ok=False keeps u+r on files and u+rx on directories (for trees handed to
        # an unprivileged user, who must be able to read its own live tree)
        self.unreadable_ok = unreadable_ok and IS_ROOT
        self.owner_pool = owner_pool
        self.log: list[str] = []
        self.outside: list[bytes] = []
        self._outside_inodes: set[tuple[int, int]] = set()
        self._n = 0

    def has(self, feature: str) -> bool:
        return feature in self.features

    def _note(self, text: str) -> None:
        self.log.append(text)

    # --- walking ------------------------------------------------------------------------

    def entries(self, vol) -> list[tuple[bytes, os.stat_result]]:
        """(path, lstat) of everything below the volume root, top-level .volsync excluded,
        symlinks not followed; sorted, so a seed replays."""
        vol = _b(vol)
        out = []

        def walk(d: bytes, top: bool) -> None:
            try:
                names = sorted(os.listdir(d))
            except OSError:
                return
            for name in names:
                if top and name == META:
                    continue
                p = os.path.join(d, name)
                st = os.lstat(p)
                out.append((p, st))
                if stat.S_ISDIR(st.st_mode):
                    walk(p, False)

        walk(vol, True)
        return out

    def _dirs(self, vol) -> list[bytes]:
        return [_b(vol)] + [p for p, st in self.entries(vol) if stat.S_ISDIR(st.st_mode)]

    def _is_outside_linked(self, st: os.stat_result) -> bool:
        return (st.st_dev, st.st_ino) in self._outside_inodes

    # --- names, data, times ---------------------------------------------------------------

    def name(self, parent: bytes, vol: bytes) -> bytes:
        """A fresh name in `parent` (never `.volsync` at the top of the volume)."""
        while True:
            self._n += 1
            n = self._n
            r = self.rng.random()
            if self.has("odd_names") and r < 0.35:
                name = self.rng.choice([
                    b"with space %d" % n, b"new\nline%d" % n, b"-dash%d" % n,
                    b"\xff\xfeinvalid-utf8-%d" % n, b"caf\xc3\xa9-%d" % n, b".hidden%d" % n,
                    (b"long%d-" % n).ljust(255, b"x"), b"tab\tglob*?[%d]" % n,
                    b"back\\slash%d" % n, b" lead-and-trail-space%d " % n, b"--%d" % n,
                    META if parent != vol else b".volsync%d" % n,
                ])
            else:
                name = b"%s%d" % (self.rng.choice([b"f", b"d", b"data", b"x"]), n)
            if parent == vol and name == META:
                continue
            if not os.path.lexists(os.path.join(parent, name)):
                return name

    def data(self) -> bytes:
        rng = self.rng
        bs = rng.choice([4096, 16384, 65536])
        size = rng.choice([0, 1, 100, bs - 1, bs, bs + 1, 2 * bs, 3 * bs + 17,
                           rng.randrange(0, 200_000)])
        kind = rng.choice(["random", "random", "repeat", "zeros", "blocks"])
        if kind == "random":
            return rng.randbytes(size)
        if kind == "zeros":
            return bytes(size)
        if kind == "repeat":
            motif = rng.randbytes(rng.randint(1, 13))
            return (motif * (size // len(motif) + 1))[:size]
        blocks = [rng.randbytes(4096) for _ in range(rng.randint(1, 3))] + [bytes(4096)]
        out = b"".join(rng.choice(blocks) for _ in range(size // 4096 + 1))
        return out[:size]

    def mtime_ns(self) -> int:
        rng = self.rng
        if not self.has("ns_times"):
            return rng.randrange(946_684_800, 1_893_456_000) * 1_000_000_000
        sec = rng.choice([
            -rng.randrange(1, 2**31 - 1),           # 1901..1970
            rng.randrange(0, 2**31),                # 1970..2038
            2**31 + rng.randrange(0, 2**32),        # after 2038
            1_700_000_000 + rng.randrange(-10**6, 10**6),
            0, -1,
        ])
        return sec * 1_000_000_000 + rng.choice([0, 1, 999_999_999, rng.randrange(10**9)])

    def stamp(self, path: bytes) -> None:
        t = self.mtime_ns()
        os.utime(path, ns=(t, t), follow_symlinks=False)

    def file_mode(self) -> int:
        modes = [0o644, 0o600, 0o755, 0o640, 0o444, 0o400, 0o700, 0o666, 0o777, 0o000, 0o200]
        if self.has("modes_special"):
            modes += [0o4755, 0o2755, 0o6755, 0o1644, 0o4711, 0o2710, 0o7777, 0o4700]
        m = self.rng.choice(modes)
        if not self.unreadable_ok:
            m |= 0o600 if not IS_ROOT else 0o400
        return m

    def dir_mode(self) -> int:
        modes = [0o755, 0o700, 0o750, 0o711, 0o555, 0o777, 0o500, 0o000]
        if self.has("modes_special"):
            modes += [0o1777, 0o2775, 0o3777, 0o2750, 0o1755]
        m = self.rng.choice(modes)
        if not self.unreadable_ok:
            m |= 0o700 if not IS_ROOT else 0o500
        return m

    # --- metadata -----------------------------------------------------------------------

    def chown(self, path: bytes) -> None:
        if self.has("owners"):
            uid, gid = self.rng.choice(self.owner_pool), self.rng.choice(self.owner_pool)
            os.lchown(path, uid, gid)
            self._note(f"chown {uid}:{gid} {show(path)}")

    def chmod(self, path: bytes, mode: int) -> None:
        os.chmod(path, mode)  # after chown, which clears setuid/setgid
        self._note(f"chmod {mode:04o} {show(path)}")

    def xattr_value(self) -> bytes:
        rng = self.rng
        return rng.choice([b"", b"v", b"\x00\x01\xff\xfe binary\x00",
                           rng.randbytes(rng.randint(1, 600)), b"text value with spaces"])

    def set_xattrs(self, path: bytes, st: os.stat_result) -> None:
        rng = self.rng
        names = []
        if self.has("xattrs") and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            names += [b"user.a", b"user.empty", b"user.bin", b"user.with space",
                      b"user.k%d" % rng.randrange(9)]
        if self.has("xattrs_trusted"):
            names += [b"trusted.t", b"trusted.empty", b"trusted.k%d" % rng.randrange(9)]
        if not names:
            return
        for name in rng.sample(names, k=min(len(names), rng.randint(0, 3))):
            value = b"" if name.endswith(b".empty") else self.xattr_value()
            try:
                os.setxattr(path, name, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.E2BIG):
                    continue
                raise
            more = "..." if len(value) > 16 else ""
            self._note(f"setxattr {show(name)}={value[:16]!r}{more} {show(path)}")

    def setfacl(self, *args) -> None:
        subprocess.run(["setfacl", *args], check=True, capture_output=True)
        self._note("setfacl " + " ".join(show(_b(a)) for a in args))

    def set_acl(self, path: bytes, st: os.stat_result) -> None:
        if not self.has("acls") or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return
        rng = self.rng
        perm = lambda: rng.choice(["rwx", "r-x", "r--", "---", "rw-"])  # noqa: E731
        if rng.random() < 0.6:
            spec = [f"u:{rng.choice(self.owner_pool)}:{perm()}"]
            if rng.random() < 0.5:
                spec.append(f"g:{rng.choice(self.owner_pool)}:{perm()}")
            spec.append(f"m::{perm()}")
            self.setfacl("-m", ",".join(spec), path)
        if stat.S_ISDIR(st.st_mode) and rng.random() < 0.4:
            uid = rng.choice(self.owner_pool)
            self.setfacl("-d", "-m", f"u::rwx,g::r-x,o::---,u:{uid}:{perm()}", path)

    def decorate(self, path: bytes) -> None:
        """Owner, mode, xattrs, ACLs of a new entry (its mtime is stamped later)."""
        st = os.lstat(path)
        if self._is_outside_linked(st):
            return
        self.chown(path)
        if stat.S_ISREG(st.st_mode):
            self.chmod(path, self.file_mode())
        elif stat.S_ISDIR(st.st_mode):
            self.chmod(path, self.dir_mode())
        elif not stat.S_ISLNK(st.st_mode):
            self.chmod(path, self.rng.choice([0o644, 0o600, 0o666, 0o640]))
        if self.rng.random() < 0.5:
            self.set_xattrs(path, st)
        if self.rng.random() < 0.35:
            self.set_acl(path, st)

    # --- creating entries -----------------------------------------------------------------

    def kinds(self) -> list[str]:
        kinds = ["file"] * 6 + ["dir"] * 3 + ["emptydir", "symlink", "symlink"]
        for feature, kind, weight in (("sparse", "sparse", 1), ("fifos", "fifo", 1),
                                      ("devices", "device", 1), ("hardlinks", "hardlink", 2),
                                      ("outside_links", "outside_link", 1)):
            if self.has(feature):
                kinds += [kind] * weight
        return kinds

    def create(self, vol, outside, kind: str | None = None,
               parent: bytes | None = None) -> bytes | None:
        """Create one entry of `kind` (random if None) in `parent` (a random directory)."""
        vol, outside = _b(vol), _b(outside)
        rng = self.rng
        kind = kind or rng.choice(self.kinds())
        if parent is None:
            parent = rng.choice(self._dirs(vol))
        path = os.path.join(parent, self.name(parent, vol))
        if kind == "file":
            data = self.data()
            with open(path, "wb") as f:
                f.write(data)
            self._note(f"create file {show(path)} ({len(data)} bytes)")
        elif kind == "sparse":
            size = rng.choice([1, 4, 16]) << 20
            if self.big_sparse:
                size = 64 << 20
            with open(path, "wb") as f:
                offsets = sorted(rng.randrange(0, size - 8192) for _ in range(rng.randint(1, 4)))
                if rng.random() < 0.3:
                    offsets.insert(0, 0)
                for off in offsets:
                    f.seek(off)
                    f.write(rng.randbytes(rng.randint(1, 4096)))
                if rng.random() < 0.3:  # data up to the very end: no trailing hole
                    f.seek(size - 100)
                    f.write(rng.randbytes(100))
                f.truncate(size)
            self._note(f"create sparse {show(path)} ({size} bytes, data at {offsets})")
        elif kind in ("dir", "emptydir"):
            os.mkdir(path)
            self._note(f"mkdir {show(path)}")
            if kind == "dir":
                for _ in range(rng.randint(1, 3)):
                    sub = rng.choice(["file", "file", "symlink", "emptydir"])
                    self.create(vol, outside, sub, path)
        elif kind == "symlink":
            others = [p for p, _ in self.entries(vol)]
            choice = rng.choice(["relative", "absolute", "dangling", "dir", "odd"])
            if choice == "relative" and others:
                target = os.path.relpath(rng.choice(others), parent)
            elif choice == "dir":
                dirs = self._dirs(vol)
                target = os.path.relpath(rng.choice(dirs), parent)
            elif choice == "absolute":
                target = rng.choice([b"/etc/passwd", b"/nonexistent/abs/target", b"/", b"/tmp"])
            elif choice == "odd":
                target = rng.choice([b"\xff\xfe", b"a b\nc", b"../" * 40 + b"escape", b"x" * 1000])
            else:
                target = b"no-such-%d" % self._n
            os.symlink(target, path)
            self._note(f"symlink {show(path)} -> {show(target)}")
        elif kind == "fifo":
            os.mkfifo(path, 0o644)
            self._note(f"mkfifo {show(path)}")
        elif kind == "device":
            if rng.random() < 0.6:
                os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 3))
                self._note(f"mknod c 1 3 {show(path)}")
            else:
                major, minor = rng.choice([(7, 200), (8, 1), (259, 65536)])
                os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(major, minor))
                self._note(f"mknod b {major} {minor} {show(path)}")
        elif kind == "hardlink":
            files = [p for p, st in self.entries(vol) if stat.S_ISREG(st.st_mode)]
            if not files:
                return self.create(vol, outside, "file", parent)
            src = rng.choice(files)
            os.link(src, path)
            self._note(f"link {show(src)} {show(path)}")
            if rng.random() < 0.4:  # a third name, maybe in the same directory
                third = os.path.join(rng.choice([parent, os.path.dirname(src)]),
                                     self.name(parent, vol))
                if not os.path.lexists(third):
                    os.link(src, third)
                    self._note(f"link {show(src)} {show(third)}")
            return path
        elif kind == "outside_link":
            os.makedirs(outside, exist_ok=True)
            target = os.path.join(outside, b"outside-%d" % self._n)
            with open(target, "wb") as f:
                f.write(self.data() or b"outside")
            os.chmod(target, 0o640)
            if self.has("xattrs"):
                os.setxattr(target, b"user.outside", b"do not touch")
            t = self.mtime_ns()
            os.utime(target, ns=(t, t))
            os.link(target, path)
            st = os.lstat(target)
            self._outside_inodes.add((st.st_dev, st.st_ino))
            self.outside.append(target)
            self._note(f"link OUTSIDE {show(target)} {show(path)}")
            return path
        else:
            raise ValueError(kind)
        self.decorate(path)
        return path

    def populate(self, vol, outside, entries: int = 30) -> None:
        """Fill `vol` (created if needed) with about `entries` random entries, then give every
        entry (and, with root_meta, the root) a random mtime, deepest first."""
        vol = _b(vol)
        os.makedirs(vol, exist_ok=True)
        for _ in range(entries):
            self.create(vol, outside)
        self.finish(vol)

    def finish(self, vol) -> None:
        vol = _b(vol)
        if self.has("root_meta"):
            st = os.lstat(vol)
            os.chmod(vol, self.rng.choice([0o755, 0o750, 0o700, 0o2775, 0o1777, 0o711]))
            self._note(f"chmod root {os.lstat(vol).st_mode & 0o7777:04o}")
            self.set_xattrs(vol, st)
        for p, st in sorted(self.entries(vol), key=lambda e: -e[0].count(b"/")):
            if not self._is_outside_linked(st):
                self.stamp(p)
        if self.has("root_meta"):
            self.stamp(vol)

    # --- edits ----------------------------------------------------------------------------

    def edit(self, vol, outside, ops: int = 5) -> None:
        """`ops` random edits of the live tree of `vol` (top-level .volsync never touched)."""
        for _ in range(ops):
            self.edit_one(vol, outside)

    EDITS = ["write_part", "append", "overwrite", "replace_file", "truncate", "delete", "rename",
             "chmod", "chown", "xattr", "acl", "touch", "link", "unlink_link", "to_dir",
             "to_symlink", "dir_to_file", "create", "create", "root"]

    def edit_one(self, vol, outside) -> None:
        vol, outside = _b(vol), _b(outside)
        rng = self.rng
        op = rng.choice(self.EDITS)
        ents = self.entries(vol)
        files = [(p, st) for p, st in ents if stat.S_ISREG(st.st_mode)]
        own_files = [(p, st) for p, st in files if not self._is_outside_linked(st)]
        nonlinks = [(p, st) for p, st in ents if not self._is_outside_linked(st)]
        if op in ("write_part", "append", "overwrite", "truncate") and own_files:
            p, st = rng.choice(own_files)
            self._writable(p, st)
            with open(p, "r+b") as f:
                if op == "write_part":
                    off = rng.randrange(0, st.st_size + 1)
                    data = rng.randbytes(rng.randint(1, 9000))
                    f.seek(off)
                    f.write(data)
                    self._note(f"write {show(p)} at {off}, {len(data)} bytes")
                elif op == "append":
                    data = rng.randbytes(rng.randint(1, 70000))
                    f.seek(0, os.SEEK_END)
                    f.write(data)
                    self._note(f"append {show(p)} {len(data)} bytes")
                elif op == "overwrite":
                    data = self.data()
                    f.truncate(0)
                    f.write(data)
                    self._note(f"overwrite in place {show(p)} ({len(data)} bytes)")
                else:
                    size = rng.choice([0, st.st_size // 2, st.st_size + rng.randrange(1, 1 << 20)])
                    f.truncate(size)
                    self._note(f"truncate {show(p)} to {size}")
            self._restore_mode(p, st)
        elif op == "replace_file" and files:  # new inode under the old name (breaks links)
            p, st = rng.choice(files)
            tmp = os.path.join(os.path.dirname(p), b".tmp-replace-%d" % self._n)
            with open(tmp, "wb") as f:
                f.write(self.data())
            os.rename(tmp, p)
            self._note(f"replace by rename {show(p)}")
            self.decorate(p)
        elif op == "delete" and ents:
            p, st = rng.choice(ents)
            self._remove(p, st)
            self._note(f"delete {show(p)}")
        elif op == "rename" and ents:
            p, st = rng.choice(ents)
            dirs = [d for d in self._dirs(vol) if not (d + b"/").startswith(p + b"/")]
            parent = rng.choice(dirs)
            dest = os.path.join(parent, self.name(parent, vol))
            os.rename(p, dest)
            self._note(f"rename {show(p)} {show(dest)}")
        elif op == "chmod" and nonlinks:
            p, st = rng.choice(nonlinks)
            if stat.S_ISREG(st.st_mode):
                self.chmod(p, self.file_mode())
            elif stat.S_ISDIR(st.st_mode):
                self.chmod(p, self.dir_mode())
        elif op == "chown" and nonlinks and self.has("owners"):
            p, st = rng.choice(nonlinks)
            self.chown(p)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(p, stat.S_IMODE(st.st_mode))  # chown cleared setuid/setgid
        elif op == "xattr" and nonlinks:
            p, st = rng.choice(nonlinks)
            have = os.listxattr(p, follow_symlinks=False)
            removable = [n for n in have if not n.startswith("system.")]
            if removable and rng.random() < 0.5:
                n = rng.choice(sorted(removable))
                os.removexattr(p, n, follow_symlinks=False)
                self._note(f"removexattr {n} {show(p)}")
            else:
                self.set_xattrs(p, st)
        elif op == "acl" and nonlinks and self.has("acls"):
            p, st = rng.choice(nonlinks)
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                r = rng.random()
                if r < 0.25:
                    self.setfacl("-b", p)
                elif r < 0.4 and stat.S_ISDIR(st.st_mode):
                    self.setfacl("-k", p)
                else:
                    self.set_acl(p, st)
        elif op == "touch" and nonlinks:
            p, st = rng.choice(nonlinks)
            self.stamp(p)
            self._note(f"touch {show(p)}")
        elif op == "link" and self.has("hardlinks") and files:
            self.create(vol, outside, "hardlink")
        elif op == "unlink_link" and self.has("hardlinks"):
            linked = [(p, st) for p, st in files if st.st_nlink > 1]
            if linked:
                p, st = rng.choice(linked)
                os.unlink(p)
                self._note(f"unlink one name {show(p)}")
        elif op == "to_dir" and files:
            p, st = rng.choice(files)
            os.unlink(p)
            os.mkdir(p)
            self._note(f"file -> dir {show(p)}")
            self.decorate(p)
            if rng.random() < 0.5:
                self.create(vol, outside, "file", p)
        elif op == "to_symlink" and (files or ents):
            p, st = rng.choice(files or ents)
            self._remove(p, st)
            os.symlink(b"replaced-" + os.path.basename(p), p)
            self._note(f"-> symlink {show(p)}")
        elif op == "dir_to_file":
            dirs = [(p, st) for p, st in ents if stat.S_ISDIR(st.st_mode)]
            links = [(p, st) for p, st in ents if stat.S_ISLNK(st.st_mode)]
            if dirs or links:
                p, st = rng.choice(dirs + links)
                self._remove(p, st)
                with open(p, "wb") as f:
                    f.write(self.data())
                self._note(f"dir/symlink -> file {show(p)}")
                self.decorate(p)
        elif op == "root" and self.has("root_meta"):
            r = rng.random()
            if r < 0.3:
                self.chmod(vol, rng.choice([0o755, 0o750, 0o700, 0o2775, 0o1777]))
            elif r < 0.6:
                self.set_xattrs(vol, os.lstat(vol))
            self.stamp(vol)
            self._note("touch root")
        else:
            self.create(vol, outside)
            return
        # sometimes give the touched directory a chosen (ns, pre-1970, post-2038) mtime
        if rng.random() < 0.5:
            d = rng.choice(self._dirs(vol))
            self.stamp(d)
            self._note(f"touch {show(d)}")

    def _writable(self, p: bytes, st: os.stat_result) -> None:
        if not IS_ROOT and not st.st_mode & stat.S_IWUSR:
            os.chmod(p, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)

    def _restore_mode(self, p: bytes, st: os.stat_result) -> None:
        if not IS_ROOT and stat.S_IMODE(os.lstat(p).st_mode) != stat.S_IMODE(st.st_mode):
            os.chmod(p, stat.S_IMODE(st.st_mode))

    def _remove(self, p: bytes, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            for dirpath, dirnames, _ in os.walk(p):
                for d in dirnames:
                    full = os.path.join(dirpath, d)
                    if not os.path.islink(full):
                        os.chmod(full, 0o700)
            os.chmod(p, 0o700)
            shutil.rmtree(p)
        else:
            os.unlink(p)

    # --- one of everything ----------------------------------------------------------------

    def populate_every_kind(self, vol, outside) -> None:
        """A deterministic tree with one of every kind of entry and metadata this generator
        knows (restricted to self.features), plus a few random entries."""
        vol, outside = _b(vol), _b(outside)
        os.makedirs(vol, exist_ok=True)
        j = lambda *parts: os.path.join(vol, *parts)  # noqa: E731
        rng = self.rng

        def put(name, data: bytes, mode=0o644):
            with open(name, "wb") as f:
                f.write(data)
            os.chmod(name, mode)

        os.makedirs(j(b"nested", b"deeper", b"deepest"))
        os.mkdir(j(b"empty dir"))
        put(j(b"empty"), b"")
        put(j(b"one-block-4k"), rng.randbytes(4096))
        put(j(b"multi-block"), rng.randbytes(5 * 65536 + 3))
        put(j(b"zeros"), bytes(3 * 4096))
        put(j(b"repeated"), b"abc" * 40000)
        put(j(b"nested", b"deeper", b"deepest", b"leaf"), b"leaf\n", 0o600)
        put(j(b"readonly"), b"ro", 0o444)
        os.symlink(b"nested/deeper", j(b"link-to-dir"))
        os.symlink(b"../multi-block", j(b"nested", b"link-relative"))
        os.symlink(b"/etc/passwd", j(b"link-absolute"))
        os.symlink(b"does/not/exist", j(b"link-dangling"))
        if self.has("odd_names"):
            for name in (b"with space", b"new\nline", b"-leading-dash", b"\xff\xfe-invalid-utf8",
                         b"L" * 255, b"caf\xc3\xa9"):
                put(j(name), name)
            os.mkdir(j(b"nested", META))
            put(j(b"nested", META, b"not-the-store"), b"a nested .volsync is data")
        if self.has("sparse"):
            size = (64 << 20) if self.big_sparse else (16 << 20)
            with open(j(b"sparse"), "wb") as f:
                f.seek(size // 2)
                f.write(rng.randbytes(3000))
                f.seek(8192)
                f.write(b"early data")
                f.truncate(size)
            with open(j(b"sparse-all-hole"), "wb") as f:
                f.truncate(4 << 20)
        if self.has("modes_special"):
            put(j(b"setuid"), b"#!/bin/true\n", 0o644)
            put(j(b"setgid"), b"#!/bin/true\n", 0o644)
            put(j(b"sticky-file"), b"t", 0o644)
            os.mkdir(j(b"sticky-dir"))
            os.mkdir(j(b"setgid-dir"))
        if self.has("fifos"):
            os.mkfifo(j(b"fifo"), 0o640)
        if self.has("devices"):
            os.mknod(j(b"null-like"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
            os.mknod(j(b"block-dev"), stat.S_IFBLK | 0o600, os.makedev(7, 200))
        if self.has("hardlinks"):
            put(j(b"hl-a"), b"hard linked data\n" * 100)
            os.link(j(b"hl-a"), j(b"hl-b"))                       # same directory
            os.link(j(b"hl-a"), j(b"nested", b"hl-c"))            # another directory
            put(j(b"nested", b"pair-1"), b"pair")
            os.link(j(b"nested", b"pair-1"), j(b"nested", b"deeper", b"pair-2"))
        if self.has("outside_links"):
            self.create(vol, outside, "outside_link", vol)
        # ownership, then modes (chown clears setuid/setgid), xattrs, ACLs
        if self.has("owners"):
            os.lchown(j(b"multi-block"), 12345, 54321)
            os.lchown(j(b"nested"), 1000, 1000)
            os.lchown(j(b"link-absolute"), 3_000_000_000, 12345)
            if self.has("modes_special"):
                os.lchown(j(b"setuid"), 1000, 1000)               # setuid owned by ordinary uid
                os.lchown(j(b"setgid"), 0, 54321)
                os.lchown(j(b"setgid-dir"), 12345, 54321)
            if self.has("fifos"):
                os.lchown(j(b"fifo"), 65534, 65534)
        if self.has("modes_special"):
            os.chmod(j(b"setuid"), 0o4755)
            os.chmod(j(b"setgid"), 0o2755)
            os.chmod(j(b"sticky-file"), 0o1644)
            os.chmod(j(b"sticky-dir"), 0o1777)
            os.chmod(j(b"setgid-dir"), 0o2775)
        if self.has("xattrs"):
            os.setxattr(j(b"multi-block"), b"user.binary", b"\x00\x01\x02\xff")
            os.setxattr(j(b"multi-block"), b"user.empty", b"")
            os.setxattr(j(b"nested"), b"user.dir", b"on a directory")
            os.setxattr(j(b"empty"), b"user.big", rng.randbytes(1000))
        if self.has("xattrs_trusted"):
            os.setxattr(j(b"repeated"), b"trusted.secret", b"root only")
            os.setxattr(j(b"link-dangling"), b"trusted.on-symlink", b"x", follow_symlinks=False)
        if self.has("acls"):
            self.setfacl("-m", "u:12345:rwx,g:54321:r--,m::rwx", j(b"zeros"))
            self.setfacl("-m", "u:1000:r-x", j(b"nested"))
            self.setfacl("-d", "-m", "u::rwx,g::r-x,o::---,u:12345:rwx,g:1000:r-x", j(b"nested"))
        for _ in range(8):
            self.create(vol, outside)
        if self.has("root_meta"):
            os.chmod(vol, 0o2750)
            if self.has("xattrs"):
                os.setxattr(vol, b"user.root", b"the volume root's own xattr")
        # mtimes last, deepest first: ns, pre-1970, post-2038, on files, dirs and symlinks
        fixed = {b"multi-block": -100_000_000_123_456_789,       # 1966-10
                 b"link-dangling": 4_102_444_800_123_456_789,    # 2100, on a symlink
                 b"nested": 2**31 * 10**9 + 1,                   # just after 2038
                 } if self.has("ns_times") else {}
        for p, st in sorted(self.entries(vol), key=lambda e: -e[0].count(b"/")):
            if self._is_outside_linked(st):
                continue
            rel = os.path.relpath(p, vol)
            t = fixed.get(rel)
            if t is None:
                t = self.mtime_ns()
            os.utime(p, ns=(t, t), follow_symlinks=False)
        if self.has("root_meta"):
            t = 1_234_567_890_123_456_789 if self.has("ns_times") else 1_234_567_890 * 10**9
            os.utime(vol, ns=(t, t))
