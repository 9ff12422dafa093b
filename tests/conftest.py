"""Shared fixtures: run the CLI in-process (`run`) or as the installed program (`sh`), and
build / read back / compare directory trees described as plain dicts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cowfs import btrfs_dir, cow_dir, cow_mounts, xfs_dir  # noqa: F401  (fixtures)
from helpers import Result, sub, vs

META = b".volsync"


@pytest.fixture
def run(capsys):
    """Call `volsync.cli.main(args)` in-process, as the installed script does, and return
    its exit code and captured stdout/stderr."""
    return lambda *args: vs(*args, capsys=capsys)


def run_subprocess(*args, env: dict | None = None, timeout: float = 60) -> Result:
    """Run the real program (`python -m volsync`) in a child process."""
    return sub(*args, env_extra=env, timeout=timeout)


@pytest.fixture
def sh():
    """Run the installed volsync as a subprocess: sh(*args, env={...}) -> Result."""
    return run_subprocess


# --- trees as dicts -------------------------------------------------------------------------
#
# A spec maps a name (str or bytes) to:
#   bytes / str               a file with that content (mode 0o644)
#   ("file", data, mode)      a file with a mode
#   ("link", target)          a symlink (target str or bytes; never followed)
#   dict                      a directory (mode 0o755)
#   ("dir", mode, dict)       a directory with a mode


def _b(name) -> bytes:
    return name if isinstance(name, bytes) else os.fsencode(name)


def write_tree(root, spec: dict) -> None:
    """Create the entries of `spec` under `root` (which is created if needed)."""
    root = _b(os.fspath(root))
    os.makedirs(root, exist_ok=True)
    for name, value in spec.items():
        path = os.path.join(root, _b(name))
        if isinstance(value, dict):
            value = ("dir", 0o755, value)
        if isinstance(value, (bytes, str)):
            value = ("file", value, 0o644)
        kind = value[0]
        if kind == "file":
            data = value[1] if isinstance(value[1], bytes) else value[1].encode()
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, value[2])
        elif kind == "link":
            os.symlink(_b(value[1]), path)
        elif kind == "dir":
            os.makedirs(path, exist_ok=True)
            write_tree(path, value[2])
            os.chmod(path, value[1])
        else:
            raise ValueError(kind)


def read_tree(root, mtimes: bool = False) -> dict:
    """Everything under `root` except a top-level `.volsync`, as {relative bytes path:
    ("file", content, mode) | ("link", target) | ("dir", mode)}; with `mtimes`, each value
    also carries st_mtime_ns."""
    root = _b(os.fspath(root))
    out: dict = {}

    def walk(dirpath: bytes, rel: bytes) -> None:
        for name in sorted(os.listdir(dirpath)):
            if not rel and name == META:
                continue
            path = os.path.join(dirpath, name)
            r = rel + b"/" + name if rel else name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                value = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                value = ("dir", stat.S_IMODE(st.st_mode))
                walk(path, r)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    value = ("file", f.read(), stat.S_IMODE(st.st_mode))
            else:
                value = ("special", stat.S_IFMT(st.st_mode))
            out[r] = value + (st.st_mtime_ns,) if mtimes else value

    walk(root, b"")
    return out


def spec_to_flat(spec: dict, rel: bytes = b"") -> dict:
    """The read_tree() form of a spec (what writing it should give)."""
    out: dict = {}
    for name, value in spec.items():
        r = rel + b"/" + _b(name) if rel else _b(name)
        if isinstance(value, dict):
            value = ("dir", 0o755, value)
        if isinstance(value, (bytes, str)):
            value = ("file", value, 0o644)
        if value[0] == "file":
            data = value[1] if isinstance(value[1], bytes) else value[1].encode()
            out[r] = ("file", data, value[2])
        elif value[0] == "link":
            out[r] = ("link", _b(value[1]))
        else:
            out[r] = ("dir", value[1])
            out.update(spec_to_flat(value[2], r))
    return out


def assert_same_tree(a, b, mtimes: bool = False) -> None:
    """Two directories (or a directory and a read_tree dict) hold the same entries."""
    ta = a if isinstance(a, dict) else read_tree(a, mtimes)
    tb = b if isinstance(b, dict) else read_tree(b, mtimes)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key] == tb[key], key


def age_tree(root, seconds_ago: int = 100, start: int | None = None) -> None:
    """Set every mtime under `root` (not .volsync) into the past so the stat cache trusts them."""
    import time

    base = start if start is not None else int(time.time()) - seconds_ago
    root = _b(os.fspath(root))
    for dirpath, dirnames, filenames in os.walk(root, topdown=True):
        if dirpath == root and META in dirnames:
            dirnames.remove(META)
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (base, base), follow_symlinks=False)


@pytest.fixture
def make_volume(tmp_path, run):
    """make_volume(spec=None, name="vol", block_size=None) -> Path of a new volume."""

    def _make(spec: dict | None = None, name: str = "vol", block_size: str | None = None) -> Path:
        path = tmp_path / name
        if spec:
            write_tree(path, spec)
        args = ["init", path] + (["--block-size", block_size] if block_size else [])
        r = run(*args)
        assert r.code == 0, r
        return path

    return _make


# --- ssh: a throwaway sshd on 127.0.0.1, and a local stand-in for ssh -----------------------
#
# `sshd` (session): a server accepting a generated client key for the current user; pass
# `sshd.rsh` as --rsh / VOLSYNC_RSH and `sshd.remote_path` as --remote-path. `sshd_forced`:
# start(forced_command) -> a server whose key runs only that command. When sshd cannot run,
# the tests skip, unless VOLSYNC_REQUIRE_SSHD=1 (CI), where they fail. `rsh_shim`: an rsh
# value that runs the remote command locally through `sh -c` (see tests/rsh_shim.py).


def _sshd_unavailable(error: Exception):
    reason = f"cannot start a test sshd: {error}"
    if os.environ.get("VOLSYNC_REQUIRE_SSHD") == "1":
        pytest.fail(f"{reason} (VOLSYNC_REQUIRE_SSHD=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A running test sshd without a forced command (tests.sshd.SshServer)."""
    import subprocess

    from sshd import SshdError, start_sshd

    try:
        server = start_sshd(tmp_path_factory.mktemp("sshd"))
    except (SshdError, OSError, subprocess.SubprocessError) as e:
        _sshd_unavailable(e)
    with server:
        yield server


@pytest.fixture
def sshd_forced(tmp_path_factory):
    """start(forced_command) -> an SshServer whose client key always runs `forced_command`
    (with SSH_ORIGINAL_COMMAND set to what was asked); all are stopped at teardown."""
    import subprocess

    from sshd import SshdError, start_sshd

    servers = []

    def start(forced_command: str):
        try:
            server = start_sshd(tmp_path_factory.mktemp("sshd_forced"), forced_command)
        except (SshdError, OSError, subprocess.SubprocessError) as e:
            _sshd_unavailable(e)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def rsh_shim() -> str:
    """An rsh value (for --rsh / VOLSYNC_RSH) running the remote command locally."""
    import shlex
    import sys

    return shlex.join([sys.executable, str(Path(__file__).with_name("rsh_shim.py"))])
