"""The ssh test infrastructure itself, without volsync: the `sshd` fixture logs in through
`sshd.rsh`, a forced-command server runs only its command, and the rsh shim runs the
"remote" command locally."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

SHIM = Path(__file__).with_name("rsh_shim.py")


def rsh_run(rsh: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*shlex.split(rsh), *args],
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_sshd_runs_a_command(sshd):
    r = rsh_run(sshd.rsh, sshd.host, "echo hello")
    assert r.returncode == 0, r
    assert r.stdout == "hello\n"
    assert sshd.rsh.startswith(("ssh -F /dev/null ", "/"))
    assert sshd.url("/srv/vol") == f"ssh://127.0.0.1:{sshd.port}/srv/vol"
    assert sshd.scp_address("/srv/vol") == "127.0.0.1:/srv/vol"
    assert sshd.known_hosts.read_text().startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 ")


def test_sshd_with_the_volsync_options(sshd):
    """The command line volsync builds: keepalive options, -p, -l, then HOST 'CMD'."""
    import getpass

    r = rsh_run(
        sshd.rsh,
        "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
        "-p", str(sshd.port), "-l", getpass.getuser(),
        sshd.host, "printf '%s' \"$SSH_CONNECTION\"; exit 3",
    )  # fmt: skip
    assert r.returncode == 3, r
    assert r.stdout.split()[-1] == str(sshd.port)


def test_sshd_remote_python_imports_volsync(sshd):
    """`REMOTE_PATH serve --stdio` will run as `sys.executable -m volsync` under sshd's bare
    environment: the package must import there."""
    r = rsh_run(sshd.rsh, sshd.host, f"{sshd.remote_path.split(' -m ')[0]} -c 'import volsync'")
    assert r.returncode == 0, r


def test_sshd_binary_stdio_round_trip(sshd):
    """The protocol is binary on stdin/stdout: bytes pass through unchanged."""
    data = bytes(range(256)) * 64
    r = subprocess.run(
        [*shlex.split(sshd.rsh), sshd.host, "cat"],
        check=False,
        input=data,
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == data


def test_forced_command_runs_whatever_is_asked(sshd_forced):
    server = sshd_forced('echo forced "$SSH_ORIGINAL_COMMAND"')
    r = rsh_run(server.rsh, server.host, "echo not this")
    assert r.returncode == 0, r
    assert r.stdout == "forced echo not this\n"
    r = rsh_run(server.rsh, server.host, "true")
    assert r.stdout == "forced true\n"


def test_forced_server_stops(sshd_forced):
    server = sshd_forced("true")
    server.stop()
    assert server.proc.poll() is not None
    server.stop()  # already dead: no error


def test_shim_runs_locally(tmp_path, monkeypatch):
    log = tmp_path / "shim.log"
    monkeypatch.setenv("RSH_SHIM_LOG", str(log))
    r = rsh_run(
        f"{sys.executable} {SHIM}", "-o", "X=1", "-p", "22", "-l", "u", "host", "echo", "hi"
    )
    assert r.returncode == 0, r
    assert r.stdout == "hi\n"
    r = rsh_run(f"{sys.executable} {SHIM}", "-Tq", "-oA=b", "-p2222", "me@h2", "exit 7")
    assert r.returncode == 7, r
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines == [
        {"host": "host", "port": "22", "user": "u", "command": "echo hi"},
        {"host": "h2", "port": "2222", "user": "me", "command": "exit 7"},
    ]


def test_shim_fixture_passes_binary_stdio(rsh_shim):
    data = bytes(range(256)) * 16
    r = subprocess.run(
        [*shlex.split(rsh_shim), "-x", "-T", "host", "cat"],
        check=False,
        input=data,
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == data


def test_shim_without_host_fails():
    r = rsh_run(f"{sys.executable} {SHIM}", "-p", "22")
    assert r.returncode == 255
    assert "no host" in r.stderr
