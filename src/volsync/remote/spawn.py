"""Starting ssh: the command line for an address, and an early start.

An ssh login and the far side's start-up take most of a short remote command (about 0.6 s on
loopback). `prestart` runs before the CLI's own modules load: it starts the ssh sessions the
command line will need, so that login and the far side's start overlap this side's start-up;
`take` hands a started session to the connection that asks for exactly that command line.
Sessions nobody takes are killed at exit (the far side sees its input close and exits). Only
the standard library and address.py are imported here, to keep this cheap."""

from __future__ import annotations

import atexit
import os
import shlex
import subprocess
from contextlib import suppress

from .address import RemoteAddress, parse_address

KEEPALIVE = ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
# options whose next argument is a value (never an address to connect to)
VALUED = {"--label", "--wait", "--keep-last", "--repair-from", "--block-size", "--hash",
          "--rsh", "--remote-path", "--link", "--from", "--to", "--bwlimit",
          "--restrict-to-path", "--path"}
NO_PRESTART = {"serve", "--help", "-h", "--version"}
# commands whose arguments after VOL name things inside a snapshot, never an address
ONE_ADDRESS = {"cat", "ls"}

_started: dict[tuple[str, ...], subprocess.Popen] = {}


def ssh_argv(address: RemoteAddress, rsh: str, remote_path: str) -> list[str]:
    """RSH [-o keepalives] [-p PORT] [-l USER] HOST 'REMOTE_PATH serve --stdio'."""
    argv = shlex.split(rsh) + KEEPALIVE
    if address.port:
        argv += ["-p", str(address.port)]
    if address.user:
        argv += ["-l", address.user]
    return argv + [address.host, f"{remote_path} serve --stdio"]


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0)


def take(argv: list[str]) -> subprocess.Popen | None:
    proc = _started.pop(tuple(argv), None)
    return proc if proc is not None and proc.poll() is None else None


def prestart(args: list[str]) -> None:
    """Start the sessions for the remote addresses among the command's arguments."""
    if not args or NO_PRESTART & set(args) or args[0] in NO_PRESTART:
        return
    rsh, remote_path = _option(args, "--rsh"), _option(args, "--remote-path")
    rsh = rsh or os.environ.get("VOLSYNC_RSH") or "ssh"
    remote_path = remote_path or os.environ.get("VOLSYNC_REMOTE_PATH") or "volsync"
    skip = False
    positional = 0
    for arg in args[1:]:
        if skip or arg.startswith("-"):
            skip = arg in VALUED
            continue
        positional += 1
        if args[0] in ONE_ADDRESS and positional > 1:
            break
        with suppress(Exception):  # any problem is found, and reported, later
            address = parse_address(arg)
            argv = ssh_argv(address, rsh, remote_path) if address else None
            if argv and tuple(argv) not in _started:
                _started[tuple(argv)] = start(argv)
    if _started:
        atexit.register(_kill_unused)


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return None


def _kill_unused() -> None:
    for proc in _started.values():
        try:
            proc.kill()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
    _started.clear()
