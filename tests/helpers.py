"""Shared test helpers: run the CLI in-process or as a subprocess, open a volume for a check,
build volumes, and read a directory's content (the live tree without `.volsync/`) as a
comparable value."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from volsync.cli import main
from volsync.store.volume import Volume

META = ".volsync"


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> dict:
        return json.loads(self.out)

    def __repr__(self) -> str:  # shown by pytest when an assert fails
        return f"Result(code={self.code}, out={self.out!r}, err={self.err!r})"


def argv_of(args) -> list[str]:
    return [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]


def _code(exc: SystemExit) -> int:
    c = exc.code
    return 0 if c is None else (c if isinstance(c, int) else 1)


def vs(*args, capsys=None) -> Result:
    """Run `volsync ARGS` in-process (volsync.cli.main raises SystemExit with the exit code).
    With `capsys`, output is captured through pytest's fixture, else through StringIO."""
    argv = argv_of(args)
    if capsys is not None:
        capsys.readouterr()
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = _code(exc)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = _code(exc)
    return Result(code, out.getvalue(), err.getvalue())


def ok(*args, capsys=None) -> Result:
    """Run and insist on exit 0."""
    r = vs(*args, capsys=capsys)
    assert r.code == 0, f"volsync {' '.join(map(str, args))} -> {r.code}\n{r.out}\n{r.err}"
    return r


def okj(*args, capsys=None) -> dict:
    """Run with --json, insist on exit 0, return the decoded object."""
    return ok(*args, "--json", capsys=capsys).json


def clean_env(extra: dict | None = None) -> dict:
    """This process's environment without the test-only switches, plus `extra`."""
    env = dict(os.environ)
    for key in ("VOLSYNC_CRASH_AT", "VOLSYNC_CRASH_TRACE", "VOLSYNC_FAULT"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def sub(*args, env_extra: dict | None = None, cwd=None, timeout: float = 60) -> Result:
    """Run `volsync ARGS` as a real subprocess (`python -m volsync` of this interpreter)."""
    p = subprocess.run([sys.executable, "-m", "volsync", *argv_of(args)], capture_output=True,
                       text=True, errors="surrogateescape", env=clean_env(env_extra),
                       check=False, cwd=cwd, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


@contextlib.contextmanager
def opened(path: Path):
    """A volume opened in-process, its pack files closed afterwards (a Volume keeps up to
    MAX_OPEN_PACKS packs open, a descriptor and a mapping each, until it is closed)."""
    vol = Volume.open(path)
    try:
        yield vol
    finally:
        vol.packs.close()


# --- directory content -----------------------------------------------------------------------

def write(root: Path, files: dict[str, bytes | str | None]) -> None:
    """Write files under root (None deletes); parent directories are created."""
    for rel, data in files.items():
        p = Path(root) / rel
        if data is None:
            if p.is_symlink() or p.is_file():
                p.unlink()
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            data = data.encode()
        p.write_bytes(data)


def content(root: Path | str, mtimes: bool = False) -> dict[str, tuple]:
    """Every path under root except the top-level .volsync: ('f', bytes, mode) for files,
    ('l', target) for symlinks, ('d', mode) for directories; with `mtimes`, each also ends
    with its mtime_ns (what a snapshot records, so equal means "unchanged" to volsync)."""
    root = Path(root)
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != META]
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("f", Path(p).read_bytes(), stat.S_IMODE(st.st_mode))
            if mtimes:
                out[rel] += (st.st_mtime_ns,)
        # do not descend into symlinked directories (os.walk does not by default)
    return out


def files_only(c: dict[str, tuple]) -> dict[str, bytes]:
    return {k: v[1] for k, v in c.items() if v[0] == "f"}


def diff_lists(j: dict) -> dict[str, list[str]]:
    """The added/modified/deleted lists of diff's JSON (its "changes" list says the same with
    each path's exact bytes)."""
    return {k: j[k] for k in ("added", "modified", "deleted")}


def snapshots(vol, all_: bool = True) -> list[dict]:
    args = ["snapshots", vol] + (["--all"] if all_ else [])
    return okj(*args)["snapshots"]


def lineage(vol) -> list[tuple[int, str]]:
    return [(s["number"], s["id"]) for s in snapshots(vol, all_=False)]


def preserved(vol) -> list[tuple[int, str]]:
    return [(s["number"], s["id"]) for s in snapshots(vol) if s["preserved"]]


def status(vol) -> dict:
    return okj("status", vol)


def restored(vol, snap, dest: Path) -> dict[str, tuple]:
    """Content of snapshot `snap` of `vol`, via `volsync restore` into a fresh directory."""
    ok("restore", vol, snap, dest)
    return content(dest)


def state_bytes(vol: Path) -> dict[str, bytes]:
    """The volume's state file and snapshot record names: a fingerprint of its metadata."""
    meta = Path(vol) / META
    out = {"state": (meta / "state").read_bytes()}
    for p in sorted((meta / "snapshots").iterdir()):
        out["snap/" + p.name] = p.read_bytes()
    for p in sorted((meta / "packs").glob("*.idx")):
        out["idx/" + p.name] = p.read_bytes()
    return out


def fingerprint(vol: Path) -> tuple:
    """Metadata plus live-tree content: equal before and after means nothing changed."""
    return state_bytes(vol), content(vol)


def make_volume(path: Path, files: dict[str, bytes | str] | None = None,
                block_size: str = "4K") -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write(path, files or {})
    ok("init", path, "--block-size", block_size)
    return path


def snap(vol, label: str | None = None) -> dict:
    args = ["snapshot", vol] + (["--label", label] if label else [])
    return okj(*args)


def verify_clean(vol) -> None:
    r = vs("verify", vol, "--json")
    assert r.code == 0 and r.json["ok"], f"verify {vol}: {r.out}{r.err}"


def alive(pid: int) -> bool:
    """The process is running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return False
    return stat_line[stat_line.rindex(b")") + 2 :][:1] != b"Z"
