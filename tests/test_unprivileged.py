"""Restore and revert run by an unprivileged user (uid/gid 65534, no supplementary groups),
on snapshots made by root that record other owners, trusted.* xattrs, device nodes and
setuid/setgid files owned by other users.

Expected (contract, "Volume format and identity"): both exit 0; what the process may not restore
is left as `cp -a` leaves it and counted in the --json summary (`not_restored`, e.g.
{"ownership": n, "xattrs": n, "devices": n}: the exact key is still to be aligned); everything
else (content, modes, nanosecond mtimes, user.* xattrs, ACLs, hard links, holes, fifos) is
exact. The expected tree is the rsync reference copy of the snapshot, rewritten to what an
unprivileged `cp -a` would give (see `expected_unprivileged`), and compared with the oracle
run by root, so owners are compared too (every entry must belong to 65534:65534).
Never acceptable: a setuid/setgid entry whose owner/group is not the recorded one.

VOLSYNC_UNPRIV_KEEP=1 keeps the work directory (/tmp/volsync-unpriv-*) for inspection.

volsync runs as `setpriv --reuid=65534 --regid=65534 --clear-groups PYTHON -m volsync ...`;
the test finds a Python that user can run and import volsync with (this interpreter with the
package's directory on PYTHONPATH, else copies of volsync and its dependencies with a
same-version interpreter the user can read), and skips, saying why, when there is none.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import Result, argv_of, clean_env, vs
from oracle import HAVE_RSYNC, compare, copy_tree, outside_changes, outside_state, walk
from treegen import IS_ROOT, TreeGen

UID = GID = 65534
SETPRIV = shutil.which("setpriv")

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="needs root: snapshots are made by root, then "
                       "volsync runs as uid 65534"),
    pytest.mark.skipif(not HAVE_RSYNC, reason="rsync is not installed (it is the oracle)"),
    pytest.mark.skipif(SETPRIV is None, reason="setpriv (util-linux) is not installed"),
]

DROP = [SETPRIV or "setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups"]
PROBE = "import volsync.cli, sys; print(volsync.__file__)"


def _try_python(python: str, pythonpath: str, base: Path) -> tuple[bool, str]:
    env = clean_env({"PYTHONPATH": pythonpath, "HOME": str(base)})
    try:
        p = subprocess.run(DROP + [python, "-c", PROBE], env=env, cwd=base, capture_output=True,
                           text=True, timeout=60)
    except OSError as exc:
        return False, f"{python}: {exc}"
    return p.returncode == 0, f"{python} (PYTHONPATH={pythonpath}): {p.stderr.strip()[-300:]}"


DEPS_PROBE = """
import sys, sysconfig, volsync.cli
paths = sysconfig.get_paths()
std = {paths[k] for k in ("stdlib", "platstdlib")}
under = lambda f, dirs: any(f.startswith(p.rstrip("/") + "/") for p in dirs if p)
site = {paths[k] for k in ("purelib", "platlib")}
site |= {p for p in sys.path[1:] if p and not under(p + "/", std)}
for name, mod in list(sys.modules.items()):
    f = getattr(mod, "__file__", None)
    if "." in name or not f or (under(f, std) and not under(f, site)):
        continue
    print(f)
"""


def _find_python(base: Path) -> tuple[str, dict]:
    import volsync

    tried = []
    src = str(Path(volsync.__file__).resolve().parent.parent)
    good, why = _try_python(sys.executable, src, base)
    if good:
        return sys.executable, clean_env({"PYTHONPATH": src, "HOME": str(base)})
    tried.append(why)
    # copies of volsync and of every top-level module it imports from outside the standard
    # library (found by a child process that imports volsync.cli), where 65534 can read them
    lib = base / "pylib"
    lib.mkdir(exist_ok=True)
    p = subprocess.run([sys.executable, "-c", DEPS_PROBE], capture_output=True, text=True,
                       env=clean_env({"PYTHONPATH": src}), check=True)
    for f in p.stdout.split():
        f = Path(f).resolve()
        if f.name == "__init__.py":
            shutil.copytree(f.parent, lib / f.parent.name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(f, lib / f.name)
    for dirpath, dirnames, filenames in os.walk(lib):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, shutil.which(ver), f"/usr/bin/{ver}", f"/usr/local/bin/{ver}"]
    seen = set()
    for py in candidates:
        if not py or py in seen or not os.path.exists(py):
            continue
        seen.add(py)
        good, why = _try_python(py, str(lib), base)
        if good:
            return py, clean_env({"PYTHONPATH": str(lib), "HOME": str(base)})
        tried.append(why)
    pytest.skip(f"no Python that uid {UID} can run with volsync importable; tried:\n"
                + "\n".join(tried))


@pytest.fixture(scope="module")
def world():
    """A directory uid 65534 can reach (pytest's own tmp directories are mode 0700), and a
    runner of `volsync ARGS` as that user."""
    base = Path(tempfile.mkdtemp(prefix="volsync-unpriv-",
                                 dir=os.environ.get("VOLSYNC_UNPRIV_TMP", "/tmp")))
    os.chmod(base, 0o755)
    try:
        probe = subprocess.run(DROP + ["test", "-x", str(base)], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"uid {UID} cannot reach {base} (set VOLSYNC_UNPRIV_TMP)")
        python, env = _find_python(base)

        def run(*args) -> Result:
            try:
                p = subprocess.run(DROP + [python, "-m", "volsync", *argv_of(args)], env=env,
                                   cwd=base, capture_output=True, text=True,
                                   errors="surrogateescape", timeout=300)
            except subprocess.TimeoutExpired as exc:
                pytest.fail(f"volsync {' '.join(argv_of(args))} as uid {UID}: no exit within "
                            f"300 s\n{exc.stderr or ''}", pytrace=False)
            return Result(p.returncode, p.stdout, p.stderr)

        run.how = f"{' '.join(DROP)} {python} -m volsync (PYTHONPATH={env['PYTHONPATH']})"
        yield base, run
    finally:
        if os.environ.get("VOLSYNC_UNPRIV_KEEP") != "1":
            shutil.rmtree(base, ignore_errors=True)


# --- what an unprivileged cp -a leaves ------------------------------------------------------

def unprivileged_mode(mode: int, uid: int, gid: int) -> int:
    """Permission bits after an unprivileged restore of an entry recorded with MODE owned by
    UID:GID, as GNU `cp -a` run by uid 65534 leaves them (measured, coreutils 9.1): where it
    cannot give the entry its recorded owner and group (here: unless recorded as
    65534:65534), a file loses setuid, setgid and sticky (copy.c clears
    S_ISUID | S_ISGID | S_ISVTX when set_owner() fails) and a directory loses setuid and
    setgid but keeps its sticky bit."""
    m = stat.S_IMODE(mode)
    if (uid, gid) != (UID, GID):
        m &= ~(stat.S_ISUID | stat.S_ISGID)
        if not stat.S_ISDIR(mode):
            m &= ~stat.S_ISVTX
    return m


def _user_visible_xattr(name: str) -> bool:
    return name.startswith("user.") or name.startswith("system.posix_acl_")


def recorded_of(ref: Path) -> dict[bytes, os.stat_result]:
    """lstat of every entry of a reference copy (b"" is the root)."""
    out = {b"": os.lstat(ref)}
    out.update(dict(walk(ref, exclude_meta=False)))
    return out


def expected_unprivileged(ref: Path, dest: Path) -> None:
    """DEST = REF as uid 65534 may restore it: every entry owned by 65534:65534, special bits
    per `unprivileged_mode`, device nodes absent, only user.* xattrs (and ACLs) kept;
    content, mtimes, ACLs, hard links, holes, fifos exact."""
    copy_tree(ref, dest, exclude_meta=False)
    rec = recorded_of(dest)
    d = os.fsencode(dest)
    for rel, st in rec.items():
        p = os.path.join(d, rel) if rel else d
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            os.unlink(p)
            continue
        for name in os.listxattr(p, follow_symlinks=False):
            if not _user_visible_xattr(name):
                os.removexattr(p, name, follow_symlinks=False)
        os.lchown(p, UID, GID)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(p, unprivileged_mode(st.st_mode, st.st_uid, st.st_gid))
    for rel, st in rec.items():  # unlinking devices moved their directories' mtimes
        if stat.S_ISDIR(st.st_mode):
            p = os.path.join(d, rel) if rel else d
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def setid_violations(root: Path, recorded: dict, exclude_meta: bool) -> list[str]:
    """Setuid/setgid entries whose owner/group is not the recorded one."""
    out = []
    items = [(b"", os.lstat(root))] + list(walk(root, exclude_meta))
    for rel, st in items:
        if stat.S_ISLNK(st.st_mode) or not st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            continue
        rec = recorded.get(rel)
        name = repr(os.fsdecode(rel or b"."))
        if rec is None:
            out.append(f"SETID {name}: mode {stat.S_IMODE(st.st_mode):04o}, not in the snapshot")
            continue
        if st.st_mode & stat.S_ISUID and st.st_uid != rec.st_uid:
            out.append(f"SETID {name}: setuid, owner {st.st_uid}, recorded owner {rec.st_uid}")
        if st.st_mode & stat.S_ISGID and st.st_gid != rec.st_gid:
            out.append(f"SETID {name}: setgid, group {st.st_gid}, recorded group {rec.st_gid}")
    return out


def not_restored_problems(js: dict, recorded: dict, label: str) -> list[str]:
    """The --json summary counts what could not be restored."""
    nr = js.get("not_restored")
    if not isinstance(nr, dict):
        return [f"{label}: --json output has no `not_restored` object "
                f"(e.g. {{\"ownership\": n, \"xattrs\": n, \"devices\": n}}); it was: {js}"]
    want = {
        "ownership": sum((st.st_uid, st.st_gid) != (UID, GID) for st in recorded.values()),
        "devices": sum(stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                       for st in recorded.values()),
        "xattrs": 0,
    }
    return [f"{label}: not_restored[{key!r}] = {nr.get(key)!r}, expected "
            + (f"a positive count ({n} entries recorded that way)" if n else "0")
            for key, n in want.items() if key != "xattrs" and not _count_ok(nr.get(key), n)]


def _count_ok(value, n: int) -> bool:
    return isinstance(value, int) and (value > 0 if n else value == 0)


def xattr_count_problem(js: dict, ref: Path, label: str) -> list[str]:
    nr = js.get("not_restored")
    if not isinstance(nr, dict):
        return []
    n = 0
    for rel, _ in [(b"", None)] + list(walk(ref, exclude_meta=False)):
        p = os.path.join(os.fsencode(ref), rel) if rel else os.fsencode(ref)
        n += any(not _user_visible_xattr(x) for x in os.listxattr(p, follow_symlinks=False))
    if _count_ok(nr.get("xattrs"), n):
        return []
    return [f"{label}: not_restored['xattrs'] = {nr.get('xattrs')!r}, expected "
            + (f"a positive count ({n} entries carry trusted.* xattrs)" if n else "0")]


# --- the case -------------------------------------------------------------------------------

def build_case(base: Path, name: str) -> dict:
    """Volume A made by root: snapshot 1 of a tree with every kind of metadata (plus a
    setuid+setgid file owned by 65534:65534, whose bits must survive), snapshot 2 after
    edits, more live edits; then handed over to uid 65534 (everything chowned to it, devices
    and trusted.* xattrs, which that user could not have made, removed from the live tree)."""
    case = base / name
    case.mkdir()
    os.chmod(case, 0o755)
    A, outside = case / "A", case / "outside"
    gen = TreeGen(777, unreadable_ok=False)
    gen.populate_every_kind(A, outside)
    own = A / "setid-own"
    own.write_bytes(b"mine\n")
    os.lchown(own, UID, GID)
    os.chmod(own, 0o6755)
    r = vs("init", A, "--block-size", "4K")
    assert r.code == 0, r
    ref = case / "R1"
    copy_tree(A, ref)
    assert vs("snapshot", A).code == 0
    gen.edit(A, outside, 8)
    assert vs("snapshot", A).code == 0
    gen.edit(A, outside, 4)
    # hand-over to the user
    a = os.fsencode(A)
    items = [(b"", os.lstat(a))] + list(walk(a, exclude_meta=False))
    for rel, st in items:
        p = os.path.join(a, rel) if rel else a
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            os.unlink(p)
            continue
        for x in os.listxattr(p, follow_symlinks=False):
            if not _user_visible_xattr(x):
                os.removexattr(p, x, follow_symlinks=False)
        os.lchown(p, UID, GID)
    out = case / "out"
    out.mkdir()
    os.lchown(out, UID, GID)
    exp = case / "expected"
    expected_unprivileged(ref, exp)
    return {"A": A, "ref": ref, "expected": exp, "out": out, "gen": gen,
            "recorded": recorded_of(ref)}


def _report(label: str, r: Result, problems: list[str], gen: TreeGen, how: str = "") -> None:
    if problems:
        pytest.fail("\n".join([f"{label}: exit {r.code}", "ran: " + how,
                               "stdout: " + r.out.strip(),
                               "stderr: " + r.err.strip()[-2000:], "problems:", *problems,
                               "generator log (as root):", *("    " + g for g in gen.log)]),
                    pytrace=False)


def test_restore_as_unprivileged_user(world):
    base, run = world
    case = build_case(base, "restore")
    gen = case["gen"]
    before = outside_state(gen.outside, [case["A"]])
    dest = case["out"] / "r1"
    r = run("restore", case["A"], "1", dest, "--json")
    problems = outside_changes(before, outside_state(gen.outside, [case["A"]]))
    if r.code != 0:
        _report("volsync restore A 1 DIR as uid 65534", r, problems + ["exit code not 0"], gen,
                run.how)
    problems += not_restored_problems(r.json, case["recorded"], "restore")
    problems += xattr_count_problem(r.json, case["ref"], "restore")
    problems += setid_violations(dest, case["recorded"], exclude_meta=False)
    problems += compare(case["expected"], dest, exclude_meta=False)
    _report("volsync restore A 1 DIR as uid 65534", r, problems, gen, run.how)


def test_revert_as_unprivileged_user(world):
    base, run = world
    case = build_case(base, "revert")
    gen = case["gen"]
    before = outside_state(gen.outside, [case["A"]])
    r = run("revert", case["A"], "1", "--json")
    problems = outside_changes(before, outside_state(gen.outside, [case["A"]]))
    if r.code != 0:
        _report("volsync revert A 1 as uid 65534", r, problems + ["exit code not 0"], gen, run.how)
    problems += not_restored_problems(r.json, case["recorded"], "revert")
    problems += xattr_count_problem(r.json, case["ref"], "revert")
    problems += setid_violations(case["A"], case["recorded"], exclude_meta=True)
    problems += compare(case["expected"], case["A"])
    v = vs("verify", case["A"], "--json")
    if v.code != 0:
        problems.append(f"verify A after the revert (as root): exit {v.code} {v.out.strip()}")
    _report("volsync revert A 1 as uid 65534", r, problems, gen, run.how)
