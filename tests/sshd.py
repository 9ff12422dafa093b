"""A throwaway OpenSSH server on 127.0.0.1 for testing volsync over ssh.

`start_sshd(workdir)` generates a host key and a client key in `workdir`, writes an
sshd_config that accepts only that client key (for the user running the tests), starts
`sshd -D -e` on a free high port and waits until a real `ssh ... true` logs in. The returned
`SshServer` carries everything a test needs:

    server.rsh           value for `--rsh` / VOLSYNC_RSH (ssh with the key, the known_hosts
                         file, BatchMode, `-F /dev/null` and `-p PORT`)
    server.remote_path   value for `--remote-path` / VOLSYNC_REMOTE_PATH: the tests' Python
                         running `-m volsync`
    server.host, .port, .key, .known_hosts, .proc, .log
    server.scp_address(path) -> "127.0.0.1:PATH"   (the port comes from `rsh`)
    server.url("/abs/path")  -> "ssh://127.0.0.1:PORT/abs/path"
    server.ssh(command)      runs a command through `rsh` (a CompletedProcess)

With `forced_command`, the authorized_keys line is `command="...",restrict KEY`: whatever the
client asks for, sshd runs the forced command (with SSH_ORIGINAL_COMMAND set).

Running as root in a container, sshd needs its privilege separation directory (/run/sshd,
created here when missing) and an absolute path to itself (it re-executes itself); the
`sshd` user must exist (the openssh-server package creates it). The sshd child environment
is minimal (no PYTHONPATH, cwd is the home directory), so when `python -m volsync` is not
importable there by itself, the config gets `SetEnv PYTHONPATH=<dir holding volsync>`.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

HOST = "127.0.0.1"
BIND_ATTEMPTS = 5
READY_TIMEOUT = 10.0


class SshdError(RuntimeError):
    """The test sshd could not be started (missing binaries, bind failure, login refused)."""


def _which(name: str, *fallbacks: str) -> str | None:
    found = shutil.which(name)
    if found:
        return os.path.abspath(found)
    for path in fallbacks:
        if os.access(path, os.X_OK):
            return path
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _q(value) -> str:
    """A value for sshd_config, double-quoted (sshd_config accepts quoted arguments)."""
    text = os.fspath(value)
    if '"' in text or "\n" in text:
        raise SshdError(f"cannot put {text!r} in sshd_config")
    return f'"{text}"'


def _volsync_pythonpath() -> str | None:
    """The directory that makes `import volsync` work (the parent of the package directory),
    or None when volsync is not importable here."""
    try:
        spec = importlib.util.find_spec("volsync")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    return str(pkg_dir.resolve().parent)


def _import_check_command() -> str:
    return f"{shlex.quote(sys.executable)} -c 'import volsync'"


def _importable_in_bare_env() -> bool:
    """Whether `sys.executable -c 'import volsync'` works in an environment like the one
    sshd gives a session (no PYTHONPATH, cwd = home). Used to decide SetEnv PYTHONPATH for
    servers with a forced command, where we cannot ask through ssh."""
    home = os.path.expanduser("~")
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "USER": os.environ.get("USER", ""),
        "LANG": "C.UTF-8",
    }
    try:
        r = subprocess.run(
            [sys.executable, "-c", "import volsync"],
            check=False,
            env=env,
            cwd=home if os.path.isdir(home) else "/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


# Learned from the first non-forced server (a real ssh login), reused for forced servers.
_needs_pythonpath: bool | None = None


class SshServer:
    def __init__(
        self,
        workdir: Path,
        proc: subprocess.Popen,
        port: int,
        key: Path,
        known_hosts: Path,
        config: Path,
        log: Path,
        ssh_bin: str,
        forced_command: str | None,
        pythonpath: str | None,
    ):
        self.workdir = workdir
        self.proc = proc
        self.host = HOST
        self.port = port
        self.key = key
        self.known_hosts = known_hosts
        self.config = config
        self.log = log
        self.forced_command = forced_command
        self.pythonpath = pythonpath  # set in the sessions via SetEnv, or None
        self.remote_path = f"{sys.executable} -m volsync"
        self.rsh_argv = [
            ssh_bin,
            "-F", "/dev/null",
            "-i", str(key),
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "LogLevel=ERROR",
            "-p", str(port),
        ]  # fmt: skip
        # "ssh" as the brief spells it when it is on PATH, else the absolute path found
        program = "ssh" if shutil.which("ssh") else ssh_bin
        self.rsh = shlex.join([program, *self.rsh_argv[1:]])

    def scp_address(self, path) -> str:
        return f"{self.host}:{os.fspath(path)}"

    def url(self, path) -> str:
        text = os.fspath(path)
        if not text.startswith("/"):
            raise ValueError(f"url() needs an absolute path, not {text!r}")
        return f"ssh://{self.host}:{self.port}{text}"

    def ssh(
        self, command: str, timeout: float = 30, check: bool = False, **kwargs
    ) -> subprocess.CompletedProcess:
        """Run `command` on the server through `rsh` (text mode, output captured)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(
            [*self.rsh_argv, self.host, command], check=check, timeout=timeout, **kwargs
        )

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        proc = self.proc
        if proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(timeout=10)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        else:
            proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SshServer(port={self.port}, pid={self.proc.pid}, workdir={str(self.workdir)!r})"


def _keygen(keygen: str, path: Path, comment: str) -> None:
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    r = subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        raise SshdError(f"ssh-keygen failed for {path}: {r.stderr.strip()}")


def _authorized_keys_line(pubkey: str, forced_command: str | None) -> str:
    if forced_command is None:
        return f"restrict {pubkey}\n"
    if "\n" in forced_command:
        raise SshdError("a forced command cannot contain a newline")
    escaped = forced_command.replace("\\", "\\\\").replace('"', '\\"')
    return f'command="{escaped}",restrict {pubkey}\n'


def _write_config(workdir: Path, port: int, pythonpath: str | None) -> Path:
    lines = [
        f"ListenAddress {HOST}",
        f"Port {port}",
        f"HostKey {_q(workdir / 'host_ed25519')}",
        f"PidFile {_q(workdir / 'sshd.pid')}",
        f"AuthorizedKeysFile {_q(workdir / 'authorized_keys')}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "StrictModes no",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "HostbasedAuthentication no",
        "X11Forwarding no",
        "AllowAgentForwarding no",
        "AllowTcpForwarding no",
        "PermitTunnel no",
        "PrintMotd no",
        "PrintLastLog no",
        "UseDNS no",
        "PermitUserEnvironment no",
        "AcceptEnv none",
        "ClientAliveInterval 0",
        "MaxStartups 100:30:200",
        "MaxSessions 100",
        "LogLevel ERROR",
    ]
    if pythonpath is not None:
        lines.append(f"SetEnv {_q('PYTHONPATH=' + pythonpath)}")
    config = workdir / "sshd_config"
    config.write_text("\n".join(lines) + "\n")
    return config


def _ensure_privsep_dir() -> None:
    """Root sshd refuses to start without its privilege separation directory (/run/sshd on
    Debian); containers usually lack it since no init script ran."""
    if os.geteuid() != 0:
        return
    path = "/run/sshd"
    if not os.path.isdir(path):
        try:
            os.makedirs(path, mode=0o755, exist_ok=True)
            os.chmod(path, 0o755)
        except OSError as e:
            raise SshdError(f"cannot create the privilege separation directory {path}: {e}")


def _sshd_answers(port: int) -> bool:
    """Whether an ssh server greets on the port (its "SSH-2.0-..." banner): a bare accepted
    connection is not enough, another program may hold the port."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as s:
            s.settimeout(2.0)
            banner = b""
            while b"\n" not in banner and len(banner) < 256:
                chunk = s.recv(256)
                if not chunk:
                    break
                banner += chunk
            return banner.startswith(b"SSH-")
    except OSError:
        return False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _launch(
    sshd_bin: str, config: Path, log: Path, pidfile: Path, port: int
) -> subprocess.Popen | None:
    """Start sshd and wait until it accepts connections. None when it exited (e.g. the port
    was taken between choosing and binding); raises on timeout."""
    pidfile.unlink(missing_ok=True)
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [sshd_bin, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
        )
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        # sshd writes its PidFile once its listening socket is bound (so it is ours, not
        # another program's that took the port meanwhile); then it must greet.
        if _read_pid(pidfile) == proc.pid and _sshd_answers(port):
            return proc
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise SshdError(f"sshd did not accept connections on port {port} within {READY_TIMEOUT} s")


def _start(workdir: Path, forced_command: str | None, pythonpath: str | None) -> SshServer:
    sshd_bin = _which("sshd", "/usr/sbin/sshd", "/usr/local/sbin/sshd")
    ssh_bin = _which("ssh", "/usr/bin/ssh")
    keygen = _which("ssh-keygen", "/usr/bin/ssh-keygen")
    missing = [
        n for n, p in (("sshd", sshd_bin), ("ssh", ssh_bin), ("ssh-keygen", keygen)) if not p
    ]
    if missing:
        raise SshdError(f"not installed: {', '.join(missing)} (openssh-server / openssh-client)")
    assert sshd_bin and ssh_bin and keygen
    _ensure_privsep_dir()

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = workdir / "host_ed25519"
    client_key = workdir / "client_ed25519"
    if not host_key.exists():
        _keygen(keygen, host_key, "volsync-test-host")
    if not client_key.exists():
        _keygen(keygen, client_key, "volsync-test-client")
    pubkey = client_key.with_name(client_key.name + ".pub").read_text().strip()
    host_pub = host_key.with_name(host_key.name + ".pub").read_text().split()
    (workdir / "authorized_keys").write_text(_authorized_keys_line(pubkey, forced_command))
    os.chmod(workdir / "authorized_keys", 0o600)

    log = workdir / "sshd.log"
    failures = []
    for _ in range(BIND_ATTEMPTS):
        port = _free_port()
        config = _write_config(workdir, port, pythonpath)
        test = subprocess.run(
            [sshd_bin, "-t", "-f", str(config)],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if test.returncode != 0:
            raise SshdError(f"sshd rejects its config {config}: {test.stderr.strip()}")
        start = log.stat().st_size if log.exists() else 0
        proc = _launch(sshd_bin, config, log, workdir / "sshd.pid", port)
        if proc is not None:
            break
        with open(log, "rb") as f:
            f.seek(start)
            failures.append(f"port {port}: {f.read().decode(errors='replace').strip()}")
    else:
        raise SshdError("sshd failed to start:\n" + "\n".join(failures))

    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"[{HOST}]:{port} {host_pub[0]} {host_pub[1]}\n")
    return SshServer(
        workdir,
        proc,
        port,
        client_key,
        known_hosts,
        config,
        log,
        ssh_bin,
        forced_command,
        pythonpath,
    )


def _login_check(server: SshServer, command: str) -> subprocess.CompletedProcess:
    try:
        return server.ssh(command, timeout=30)
    except subprocess.TimeoutExpired:
        raise SshdError(
            f"ssh {command!r} to the test sshd did not finish in 30 s"
            f"\nsshd log:\n{server.log_text().strip()}"
        ) from None


def start_sshd(workdir: Path, forced_command: str | None = None) -> SshServer:
    """Start a test sshd in `workdir` (created if needed); raise SshdError when it cannot
    run or (without a forced command) a real ssh login or `python -c 'import volsync'` over
    ssh fails. Stop it with .stop() or use it as a context manager."""
    global _needs_pythonpath
    pythonpath = _volsync_pythonpath()

    if forced_command is not None:
        need = _needs_pythonpath
        if need is None:
            need = pythonpath is not None and not _importable_in_bare_env()
        return _start(workdir, forced_command, pythonpath if need else None)

    server = _start(workdir, None, None)
    try:
        r = _login_check(server, "true")
        if r.returncode != 0:
            raise SshdError(
                f"ssh login to the test sshd failed (exit {r.returncode}): {r.stderr.strip()}"
                f"\nsshd log:\n{server.log_text().strip()}"
            )
        if pythonpath is None:  # volsync not importable here: nothing to check or fix
            return server
        r = _login_check(server, _import_check_command())
        if r.returncode == 0:
            _needs_pythonpath = False
            return server
    except BaseException:
        server.stop()
        raise
    # `python -m volsync` does not work in sshd's bare environment: restart with PYTHONPATH.
    server.stop()
    server = _start(workdir, None, pythonpath)
    try:
        r = _login_check(server, _import_check_command())
        if r.returncode != 0:
            raise SshdError(
                f"{sys.executable} cannot import volsync over ssh even with "
                f"PYTHONPATH={pythonpath}: {r.stderr.strip()}"
            )
    except BaseException:
        server.stop()
        raise
    _needs_pythonpath = True
    return server
