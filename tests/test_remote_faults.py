"""Faults on the way to a volume on another machine, all through the real CLI (subprocesses):

1. hostile peers: VOLSYNC_REMOTE_PATH runs tests/fake_peer.py instead of volsync (a shell
   banner, a 4 GiB frame header, garbage msgpack, zstd bombs, random replies; or the real
   server with `export`, `read` or `has` made to lie). Each must end in one error line on
   stderr (no traceback), a contract exit code, bounded memory, and nothing committed;
2. SIGKILL of the client, the server and the ssh process at random moments of a push: the
   rerun completes, verifies, equals the source, and sends only what the far side lacks;
3. `receive` of a cut or damaged stream: exit 6, nothing committed, a good stream later works;
4. a remote disk that fills (a small tmpfs, as root): exit 1 with one line naming it, the
   mirror as it was, no leftovers.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import alive, clean_env, content, make_volume, ok, okj, opened, snap, vs, write

from volsync.store.volume import is_volume

HERE = Path(__file__).resolve().parent
FAKE = HERE / "fake_peer.py"
PY = sys.executable
REAL_REMOTE = f"{shlex.quote(PY)} -m volsync"
MEM_LIMIT_KIB = 300 * 1024  # ru_maxrss is in KiB on Linux
MIB = 1 << 20


# --- running the CLI as a process: exit code, output, peak memory ---------------------------

@dataclass
class Run:
    code: int | None  # None: killed by the test (timeout)
    out: bytes
    err: str
    maxrss_kib: int
    timed_out: bool

    @property
    def json(self) -> dict:
        import json

        return json.loads(self.out)

    def __repr__(self) -> str:
        return (f"Run(code={self.code}, timed_out={self.timed_out}, maxrss={self.maxrss_kib} "
                f"KiB, out={self.out[:300]!r}, err={self.err[:2000]!r})")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# Peak memory of the command: a forked child keeps its parent's high-water RSS across exec
# (Linux carries ru_maxrss over execve), so the command is started by a small launcher, not
# by this (large) test process; the launcher reports the command's wait4 rusage, which
# includes the children it waited for (the ssh stand-in and the far side).
LAUNCHER = """\
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def run_cli(*args, env: dict | None = None, stdin_path: Path | None = None,
            stdout_path: Path | None = None, timeout: float = 60) -> Run:
    """`python -m volsync ARGS` in its own session, with its peak memory (see LAUNCHER). On
    timeout the whole process group is killed and the run reported as timed out."""
    with contextlib.ExitStack() as stack:
        rss_file = stack.enter_context(tempfile.NamedTemporaryFile("r"))
        argv = [PY, "-c", LAUNCHER, rss_file.name, PY, "-m", "volsync",
                *[os.fspath(a) for a in args]]
        stdin = stack.enter_context(open(stdin_path, "rb")) if stdin_path else subprocess.DEVNULL
        out = (stack.enter_context(open(stdout_path, "wb")) if stdout_path
               else stack.enter_context(tempfile.TemporaryFile()))
        err = stack.enter_context(tempfile.TemporaryFile())
        proc = subprocess.Popen(argv, stdin=stdin, stdout=out, stderr=err,
                                env=clean_env(env), start_new_session=True)
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            _kill_group(proc.pid)

        timer = threading.Timer(timeout, expire)
        timer.start()
        try:
            _, status, _ = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        rss_file.seek(0)
        maxrss = int(rss_file.read() or 0)
        _kill_group(proc.pid)  # whatever the run left behind (a lingering fake peer)
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
        data = b""
        if not stdout_path:
            out.seek(0)
            data = out.read()
        return Run(None if timed_out.is_set() else proc.returncode, data, text, maxrss,
                   timed_out.is_set())


def assert_one_error_line(run: Run) -> str:
    """Exactly one non-empty line on stderr, `volsync: error: ...`, and no traceback."""
    assert "Traceback" not in run.err, run
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1, run
    assert lines[0].startswith("volsync: error: "), run
    return lines[0]


def assert_bounded(run: Run) -> None:
    assert run.maxrss_kib < MEM_LIMIT_KIB, run


def remote_env(rsh: str, remote_path: str, **extra: str) -> dict:
    return {"VOLSYNC_RSH": rsh, "VOLSYNC_REMOTE_PATH": remote_path, **extra}


def fake(mode: str) -> str:
    return f"{shlex.quote(PY)} {shlex.quote(str(FAKE))} {mode}"


# --- volumes --------------------------------------------------------------------------------

def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def observed(vol: Path) -> dict:
    """What a failed run must not change: the lineage and preserved snapshots (as
    `snapshots --all --json` prints them), the state (mode, upstream, journal, lineage; not
    the names of packs a receiver sealed for a rerun, `extra.received_packs`, nor the hold a
    source records before it sends, `extra.holds`) and the live tree with its mtimes."""
    if not is_volume(vol):
        return {"volume": False, "content": content(vol) if vol.exists() else None}
    with opened(vol) as v:
        st = v.state()
    extra = {k: val for k, val in st.extra.items() if k not in ("received_packs", "holds")}
    return {"volume": True, "snapshots": okj("snapshots", vol, "--all"),
            "state": (st.mode, st.upstream, st.upstream_id, st.lineage, st.preserved,
                      st.journal, extra),
            "content": content(vol, mtimes=True)}


def assert_verifies(vol: Path) -> None:
    r = vs("verify", vol, "--json")
    assert r.code == 0 and r.json["ok"], f"verify {vol}: {r}"


def assert_mirror_of(dst: Path, src: Path) -> None:
    assert_verifies(dst)
    assert content(dst, mtimes=True) == content(src, mtimes=True)


@pytest.fixture(scope="module")
def pair_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    a = make_volume(root / "A", {"top.txt": "top\n", "big.bin": rnd(300_000, 1),
                                 "d/one": "1", "d/e/deep": rnd(70_000, 2)}, block_size="64K")
    snap(a)
    ok("transfer", a, root / "M")
    write(a, {"new.bin": rnd(200_000, 3), "d/one": "one, changed", "top.txt": None})
    snap(a)
    return root


@pytest.fixture
def pair(tmp_path, pair_template):
    """A: a source with snapshots 1 and 2; M: a local mirror of A holding only snapshot 1
    (copies of one template; M's upstream names the template's A, the same volume id)."""
    for name in ("A", "M"):
        shutil.copytree(pair_template / name, tmp_path / name, symlinks=True)
    return tmp_path / "A", tmp_path / "M"


@pytest.fixture
def shim_env(monkeypatch, rsh_shim):
    """The rsh shim and the real remote volsync, for runs in this process."""
    monkeypatch.setenv("VOLSYNC_RSH", rsh_shim)
    monkeypatch.setenv("VOLSYNC_REMOTE_PATH", REAL_REMOTE)
    return remote_env(rsh_shim, REAL_REMOTE)


# --- 1. hostile peers -------------------------------------------------------------------------

# mode -> exit codes accepted. Garbage from the peer is a ProtocolError (an IntegrityError,
# exit 6); a peer that goes away mid-frame is a lost connection (exit 1).
RAW_MODES = {
    "banner-exit": (6, 1),
    "short-banner-exit": (1,),
    "huge-first-exit": (6, 1),
    "garbage-hello-exit": (6, 1),
    "wrong-hello-exit": (6, 1),
    "future-hello-exit": (6, 1),
    "huge-frame-exit": (6,),
    "over-cap-frame-exit": (6,),
    "bad-flags-exit": (6,),
    "garbage-msgpack-exit": (6,),
    "array-bomb-exit": (6,),
    "bin-bomb-exit": (6,),
    "map-bomb-exit": (6,),
    "deep-nesting-exit": (6,),
    "trailing-bytes-exit": (6,),
    "cut-frame": (1,),
    "zstd-claims-huge-exit": (6,),
    "zstd-claims-over-cap-exit": (6,),
    "zstd-bomb-exit": (6,),
    "zstd-garbage-exit": (6,),
    # the peer stays connected after its garbage: still answered at once
    "banner": (6, 1),
    "huge-frame": (6,),
}


PUSH_TOO = ["banner-exit", "huge-frame-exit", "garbage-msgpack-exit", "zstd-bomb-exit",
            "cut-frame"]  # the same client code; the hostile peer as DST


@pytest.mark.parametrize(("mode", "direction"), [(m, "pull") for m in RAW_MODES]
                         + [(m, "push") for m in PUSH_TOO])
def test_hostile_peer_raw(pair, rsh_shim, mode, direction):
    a, m = pair
    before_a, before_m = observed(a), observed(m)
    args = (["transfer", f"fakehost:{a}", m] if direction == "pull"
            else ["transfer", a, f"fakehost:{m}"])
    r = run_cli(*args, env=remote_env(rsh_shim, fake(mode)), timeout=30)
    assert not r.timed_out, r
    assert r.code in RAW_MODES[mode], r
    assert_one_error_line(r)
    assert_bounded(r)
    assert observed(a) == before_a
    assert observed(m) == before_m
    assert_verifies(m)


@pytest.mark.parametrize("seed", range(1, 17))
def test_hostile_peer_random_replies(pair, rsh_shim, seed):
    """The answer to `open` is a random (seeded) structure: a reply-shaped one with spoiled
    fields, or anything at all; never a traceback, always a contract code."""
    a, m = pair
    before = observed(m)
    r = run_cli("transfer", f"fakehost:{a}", m,
                env=remote_env(rsh_shim, fake(f"fuzz-reply-{seed}-exit")), timeout=30)
    assert not r.timed_out, r
    assert r.code in (1, 6), r
    assert_one_error_line(r)
    assert_bounded(r)
    assert observed(m) == before


def test_hostile_peer_error_text_is_one_line(pair, rsh_shim):
    """An error reply's text comes from the peer: it must not print as several lines (a
    forged `volsync: error:` line) or pass terminal escapes through."""
    a, m = pair
    r = run_cli("transfer", f"fakehost:{a}", m,
                env=remote_env(rsh_shim, fake("err-multiline-exit")), timeout=30)
    assert r.code == 1, r
    line = assert_one_error_line(r)
    assert "\x1b" not in line, r


@pytest.mark.parametrize("mode", ["garbage-msgpack", "zstd-bomb", "fuzz-reply-1"])
def test_hostile_peer_that_stays_silent_does_not_hang(pair, rsh_shim, mode):
    """After garbage the fake stays connected and never answers again (it only reads). The
    client has already found the peer broken; it must end at once, not wait for a reply to
    its closing `bye`."""
    a, m = pair
    before = observed(m)
    r = run_cli("transfer", f"fakehost:{a}", m, env=remote_env(rsh_shim, fake(mode)),
                timeout=10)
    assert not r.timed_out, f"still running after 10 s: {r}"
    assert r.code == 6, r
    assert_one_error_line(r)
    assert observed(m) == before


@pytest.mark.slow
def test_peer_that_prints_a_few_bytes_then_waits_does_not_hang(pair, rsh_shim):
    """A far side that prints three bytes and then waits for input (a wrong --remote-path, a
    shell rc that reads) never sends a hello: the client gives up on the handshake after
    VOLSYNC_CONNECT_TIMEOUT seconds (default 60, login included), exit 1, not wait forever."""
    a, m = pair
    r = run_cli("transfer", f"fakehost:{a}", m, env=remote_env(
        rsh_shim, fake("short-banner"), VOLSYNC_CONNECT_TIMEOUT="3"), timeout=40)
    assert not r.timed_out, f"no hello and no end within 40 s: {r}"
    assert r.code == 1, r
    assert_one_error_line(r)


# a pull from the real server with one endpoint method made to lie -> exit code
EXPORT_MODES = {
    "wrap-export-corrupt": 6,  # a block's data does not match its id
    "wrap-export-swap": 6,  # two real objects, each sent under the other's id
    "wrap-export-last-corrupt": 6,  # the snapshot's root tree damaged
    "wrap-export-extra": 6,  # an object not asked for
    "wrap-export-missing": 6,  # one object left out
    "wrap-export-short-id": 6,  # an id one byte short
    "wrap-read-corrupt": 6,  # trees read for planning damaged
    "wrap-read-garbage": 6,
    "wrap-read-short": 6,  # a tree asked for is not sent
}


@pytest.mark.parametrize("mode", list(EXPORT_MODES))
def test_pull_from_lying_server(pair, rsh_shim, shim_env, mode):
    a, m = pair
    before_a, before_m = observed(a), observed(m)
    r = run_cli("transfer", f"fakehost:{a}", m, env=remote_env(rsh_shim, fake(mode)),
                timeout=60)
    assert not r.timed_out, r
    assert r.code == EXPORT_MODES[mode], r
    assert_one_error_line(r)
    assert_bounded(r)
    assert observed(m) == before_m, "the local mirror changed"
    assert_verifies(m)
    assert observed(a) == before_a
    # the real server then pulls cleanly
    ok("transfer", f"fakehost:{a}", m)
    assert_mirror_of(m, a)


def test_pull_of_a_new_mirror_from_lying_server_leaves_nothing(tmp_path, pair, rsh_shim,
                                                               shim_env):
    """A pull into a new DST that fails on a bad object: no snapshot is committed there."""
    a, _ = pair
    dst = tmp_path / "fresh"
    r = run_cli("transfer", f"fakehost:{a}", dst,
                env=remote_env(rsh_shim, fake("wrap-export-corrupt")), timeout=60)
    assert r.code == 6, r
    assert_one_error_line(r)
    if is_volume(dst):
        assert okj("snapshots", dst, "--all")["snapshots"] == []
        assert content(dst) == {}
        assert_verifies(dst)
    ok("transfer", f"fakehost:{a}", dst)
    assert_mirror_of(dst, a)


HAS_MODES = ["wrap-has-short", "wrap-has-long", "wrap-has-notbytes", "wrap-has-all"]


@pytest.mark.parametrize("mode", HAS_MODES)
def test_push_to_server_answering_has_wrongly(pair, rsh_shim, mode):
    """`has` answered with a bitmap of the wrong length (or not bytes, or all yes): exit 6,
    neither volume changes."""
    a, m = pair
    before_a, before_m = observed(a), observed(m)
    r = run_cli("transfer", a, f"fakehost:{m}", env=remote_env(rsh_shim, fake(mode)),
                timeout=60)
    assert not r.timed_out, r
    assert r.code == 6, r
    assert_one_error_line(r)
    assert_bounded(r)
    assert observed(m) == before_m
    assert observed(a) == before_a
    assert_verifies(m)


# --- a hostile client against the real server ---------------------------------------------------

def _frame(payload: bytes, flags: int = 0, length: int | None = None) -> bytes:
    import struct

    return struct.pack(">IB", len(payload) if length is None else length, flags) + payload


def _msg(obj) -> bytes:
    import msgpack

    return _frame(msgpack.packb(obj, use_bin_type=True))


CLIENT_HELLO = ["hello", {"magic": "volsync-protocol", "versions": [1], "caps": ["zstd"],
                          "program": "test", "compress": False, "bwlimit": None}]


def _zstd_bomb() -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 30))


SERVER_INPUTS = {
    "banner": lambda: b"SSH-2.0-OpenSSH_9.6\r\nhello there, not volsync\n",
    "huge-frame": lambda: _msg(CLIENT_HELLO) + _frame(b"\0" * 32, length=0xFFFFFFFF),
    "garbage-msgpack": lambda: _msg(CLIENT_HELLO) + _frame(b"\xc1\xc1garbage"),
    "zstd-bomb": lambda: _msg(CLIENT_HELLO) + _frame(_zstd_bomb(), flags=1),
    "array-bomb": lambda: _msg(CLIENT_HELLO) + _frame(b"\xdd\xff\xff\xff\xff" + b"\0" * 64),
}


@pytest.mark.parametrize("what", list(SERVER_INPUTS))
def test_serve_rejects_hostile_client(tmp_path, what):
    stream = tmp_path / "in.bin"
    stream.write_bytes(SERVER_INPUTS[what]())
    r = run_cli("serve", "--stdio", stdin_path=stream, timeout=30)
    assert not r.timed_out, r
    assert r.code in (1, 6), r
    assert "Traceback" not in r.err, r
    assert len([x for x in r.err.splitlines() if x.strip()]) <= 1, r
    assert_bounded(r)


def test_serve_rejects_object_not_matching_its_id(tmp_path, pair):
    """A client pushing an object whose data does not match its id: the server answers
    exit-6 error, commits nothing, and the mirror verifies."""
    _, m = pair
    before = observed(m)
    blob = rnd(5000, 9)
    fake_id = bytes(32)
    requests = [CLIENT_HELLO, ["open", {"path": os.fsencode(m), "role": "dst"}],
                ["lock", {"wait": 0.0, "resume": True}], ["begin", {"kept": []}],
                ["receive", {}], ["objs", [[fake_id, blob]]], ["end", {}], ["undo", {}],
                ["bye", {}]]
    stream = tmp_path / "in.bin"
    stream.write_bytes(b"".join(_msg(x) for x in requests))
    out = tmp_path / "out.bin"
    r = run_cli("serve", "--stdio", stdin_path=stream, stdout_path=out, timeout=30)
    assert r.code == 0, r
    import msgpack

    replies = list(msgpack.Unpacker(_strip_headers(out.read_bytes()), raw=False))
    errors = [x for x in replies if isinstance(x, list) and x[:1] == ["err"]]
    assert any(e[1] == 6 and "digest" in e[2] for e in errors), replies
    assert observed(m) == before
    assert_verifies(m)


def _strip_headers(data: bytes):
    import io

    out, i = io.BytesIO(), 0
    while i + 5 <= len(data):
        n = int.from_bytes(data[i : i + 4], "big")
        assert data[i + 4] == 0
        out.write(data[i + 5 : i + 5 + n])
        i += 5 + n
    out.seek(0)
    return out


# --- 2. SIGKILL of the client, the server or the ssh process during a push ---------------------

def _procs() -> dict[int, tuple[int, list[str]]]:
    """pid -> (ppid, argv) of every process readable in /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        out[int(name)] = (ppid, argv)
    return out


def server_pids(mark: str) -> list[int]:
    """The `volsync serve --stdio` processes started with `-X mark` (not the shell that
    runs them, whose command line holds the mark inside one argument)."""
    return [pid for pid, (_, argv) in _procs().items()
            if mark in argv and "serve" in argv and "--stdio" in argv]


def rsh_pid(client: int) -> int | None:
    """The client's child that is the ssh process (the shim, or `sh -c` it became)."""
    for pid, (ppid, argv) in _procs().items():
        if ppid == client and argv and "volsync" not in " ".join(argv[:1]):
            return pid
    return None


def wait_gone(pids, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if alive(p)]
        time.sleep(0.02)
    return left


def pack_bytes(vol: Path) -> int:
    packs = vol / ".volsync" / "packs"
    if not packs.is_dir():
        return 0
    return sum(p.stat().st_size for p in packs.glob("*.pack"))


@pytest.fixture(scope="module")
def big_source(tmp_path_factory, rsh_shim):
    """A source of 16 MiB of random data in four files and a few small ones, snapshotted;
    the bytes a push of it sends, and how long an uninterrupted push (a process) takes."""
    root = tmp_path_factory.mktemp("kill") / "S"
    files = {f"f{i}.bin": rnd(4 * MIB, 100 + i) for i in range(4)}
    files.update({"small/a.txt": "a\n", "small/b.txt": rnd(3000, 7), "small/c/d": "d"})
    make_volume(root, files, block_size="64K")
    snap(root)
    t0 = time.monotonic()
    r = run_cli("transfer", root, f"testhost:{root.parent / 'probe'}", "--json",
                env=remote_env(rsh_shim, REAL_REMOTE))
    assert r.code == 0, r
    return root, r.json["bytes_sent"], time.monotonic() - t0


@dataclass
class KillOutcome:
    killed_run: Run | None
    landed: bool
    received: int  # pack bytes DST held after the kill


def push_and_kill(src: Path, dst_addr: str, dst: Path, env: dict, mark: str, target: str,
                  delay: float | None, after_bytes: int | None) -> KillOutcome:
    """Start `transfer SRC DST`, then SIGKILL `target` ("client", "server" or "rsh") once
    `delay` seconds passed since it appeared, or once DST's packs hold `after_bytes`."""
    argv = [PY, "-m", "volsync", "transfer", os.fspath(src), dst_addr, "--json"]
    err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=clean_env(env),
                            start_new_session=True)
    landed = False
    try:
        deadline = time.monotonic() + 30
        victim = None
        while victim is None and proc.poll() is None and time.monotonic() < deadline:
            if target == "client":
                victim = proc.pid
            elif target == "server":
                found = server_pids(mark)
                victim = found[0] if found else None
            else:
                victim = rsh_pid(proc.pid)
            if victim is None:
                time.sleep(0.002)
        start = time.monotonic()
        while victim is not None and proc.poll() is None and time.monotonic() < deadline:
            if delay is not None and time.monotonic() - start >= delay:
                break
            if after_bytes is not None and pack_bytes(dst) >= after_bytes:
                break
            time.sleep(0.002)
        if victim is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
                landed = True
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            out, _ = proc.communicate()
            pytest.fail(f"the transfer did not end after killing the {target}")
        # the far side of a killed client finds its end of the pipe closed and exits
        left = wait_gone(server_pids(mark), 30)
        assert not left, f"server {left} still running 30 s after the kill of the {target}"
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
    finally:
        _kill_group(proc.pid)
        err.close()
    run = Run(proc.returncode, out, text, 0, False)
    return KillOutcome(run, landed, pack_bytes(dst))


def check_killed_run(outcome: KillOutcome, target: str) -> None:
    run = outcome.killed_run
    if target == "client":
        assert run.code in (0, -signal.SIGKILL), run
        return
    if run.code == 0:
        return  # it finished before the kill (or, with the shim, did not need the killed sh)
    # a lost connection: exit 1, one line (remote stderr lines are relayed as `volsync: HOST:`)
    assert run.code == 1, run
    assert "Traceback" not in run.err, run
    errors = [x for x in run.err.splitlines() if x.startswith("volsync: error: ")]
    assert len(errors) == 1, run


def check_rerun(src: Path, dst_addr: str, dst: Path, env: dict, full: int,
                outcome: KillOutcome) -> dict:
    r = run_cli("transfer", src, dst_addr, "--json", env=env, timeout=60)
    assert r.code == 0, f"rerun after kill: {r}"
    assert_mirror_of(dst, src)
    sent = r.json["bytes_sent"]
    # what reached DST's pack files before the kill is kept (sealed, or adopted as the
    # records of a killed writer); the rerun sends at most the rest. Slack: record headers
    # and torn records at the tail.
    assert sent <= full - outcome.received + 2 * MIB, (sent, full, outcome.received)
    print(f"kill: landed={outcome.landed} exit={outcome.killed_run.code} "
          f"received={outcome.received} rerun sent={sent} of {full}")
    return r.json


def kill_env(rsh: str, mark: str) -> dict:
    return remote_env(rsh, f"{shlex.quote(PY)} -X {mark} -m volsync")


@pytest.mark.parametrize("target", ["client", "server", "rsh"])
def test_kill_during_push_then_rerun(tmp_path, big_source, rsh_shim, target):
    src, full, duration = big_source
    rng = random.Random(f"kill-{target}")
    # seeded random delays across the run (the client's from its start, the others' from
    # the moment their process appeared), and one kill once a third of the data arrived
    plans = [(rng.uniform(0.2, 1.0) * duration, None) for _ in range(2)]
    if target != "rsh":
        plans.append((None, full // 3))
    landed_after_data = 0
    for k, (delay, after) in enumerate(plans):
        dst = tmp_path / f"D{k}"
        mark = f"volsync_test_mark={uuid.uuid4().hex}"
        env = kill_env(rsh_shim, mark)
        addr = f"testhost:{dst}"
        outcome = push_and_kill(src, addr, dst, env, mark, target, delay, after)
        check_killed_run(outcome, target)
        if outcome.landed and outcome.received > full // 4:
            landed_after_data += 1
        if is_volume(dst):
            # the interrupted mirror is still a consistent volume
            assert_verifies(dst)
        result = check_rerun(src, addr, dst, env, full, outcome)
        if after is not None and outcome.landed and target != "rsh":
            assert outcome.received >= full // 3
            assert result["bytes_sent"] < full, result
    if target != "rsh":
        assert landed_after_data >= 1, "no kill landed after data arrived"


def test_kill_ssh_client_during_push_then_rerun(tmp_path, big_source, sshd):
    """With a real ssh: killing the ssh client cuts the connection for both sides (the shim's
    `sh` does not sit on the pipes, so killing it proves little)."""
    src, full, duration = big_source
    rng = random.Random("kill-ssh")
    plans = [(rng.uniform(0.2, 1.0) * duration, None), (None, full // 3)]
    for k, (delay, after) in enumerate(plans):
        dst = tmp_path / f"D{k}"
        mark = f"volsync_test_mark={uuid.uuid4().hex}"
        env = kill_env(sshd.rsh, mark)
        addr = sshd.url(str(dst))
        outcome = push_and_kill(src, addr, dst, env, mark, "rsh", delay, after)
        check_killed_run(outcome, "rsh")
        if after is not None and outcome.landed:
            assert outcome.killed_run.code == 1, outcome.killed_run
        result = check_rerun(src, addr, dst, env, full, outcome)
        if after is not None and outcome.landed:
            assert result["bytes_sent"] < full, result


def test_kill_server_during_pull_then_rerun(tmp_path, big_source, rsh_shim):
    """A pull (remote SRC, local DST) whose server dies once a third of the data arrived:
    exit 1, DST consistent; the rerun completes and, like a push's, sends only what DST does
    not hold yet (what it received and checked before the connection was lost is kept, as it
    is when the receiving side is remote or the client is killed)."""
    src, full, _ = big_source
    dst = tmp_path / "D"
    mark = f"volsync_test_mark={uuid.uuid4().hex}"
    env = kill_env(rsh_shim, mark)
    argv = [PY, "-m", "volsync", "transfer", f"testhost:{src}", os.fspath(dst), "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=clean_env(env), start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while (pack_bytes(dst) < full // 3 and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.002)
        servers = server_pids(mark)
        assert servers and proc.poll() is None, "the pull ended before a third arrived"
        received_before_kill = pack_bytes(dst)
        os.kill(servers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_group(proc.pid)
    assert proc.returncode == 1, err
    assert b"Traceback" not in err
    assert_verifies(dst)
    outcome = KillOutcome(None, True, pack_bytes(dst))
    print(f"pull: {received_before_kill} bytes in DST's packs at the kill, "
          f"{outcome.received} after the failed run")
    r = run_cli("transfer", f"testhost:{src}", dst, "--json", env=env, timeout=60)
    assert r.code == 0, r
    assert_mirror_of(dst, src)
    assert r.json["bytes_sent"] < full - full // 4, (r.json["bytes_sent"], full)


def test_kill_server_after_a_sealed_pack_then_rerun(tmp_path, rsh_shim):
    """Over 64 MiB the receiver seals a pack: a server killed after that keeps it, and the
    rerun sends less than the whole."""
    src = make_volume(tmp_path / "S", {f"f{i}.bin": rnd(12 * MIB, 200 + i) for i in range(6)},
                      block_size="1M")
    snap(src)
    full = okj("transfer", src, tmp_path / "probe", "--dry-run")["bytes_sent"]
    assert full > 64 * MIB
    dst = tmp_path / "D"
    mark = f"volsync_test_mark={uuid.uuid4().hex}"
    env = kill_env(rsh_shim, mark)
    addr = f"testhost:{dst}"
    outcome = push_and_kill(src, addr, dst, env, mark, "server", None, 66 * MIB)
    assert outcome.landed, outcome.killed_run
    check_killed_run(outcome, "server")
    assert any((dst / ".volsync" / "packs").glob("*.idx")), "no sealed pack after 64 MiB"
    result = check_rerun(src, addr, dst, env, full, outcome)
    assert result["bytes_sent"] <= full - 64 * MIB, result


# --- 3. receive: a cut or damaged stream ---------------------------------------------------------

@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    """A source with two snapshots; its full stream (snapshot 1), the incremental one (1->2),
    the same compressed, and a template mirror holding snapshot 1."""
    root = tmp_path_factory.mktemp("streams")
    src = make_volume(root / "S", {f"f{i}.bin": rnd(3 * MIB, 300 + i) for i in range(3)}
                      | {"t.txt": "text\n", "d/x": rnd(9000, 5)}, block_size="64K")
    snap(src)
    full, incr, incr_z = root / "full.vs", root / "incr.vs", root / "incr-z.vs"
    assert run_cli("send", src, "--to", "1", stdout_path=full).code == 0
    template = root / "T"
    assert run_cli("receive", template, stdin_path=full).code == 0
    after_1 = content(src, mtimes=True)
    write(src, {"f1.bin": rnd(3 * MIB, 999), "new.txt": "new\n", "d/x": None})
    snap(src)
    assert run_cli("send", src, "--from", "1", stdout_path=incr).code == 0
    assert run_cli("send", src, "--from", "1", "--compress", stdout_path=incr_z).code == 0
    return {"src": src, "full": full, "incr": incr, "incr-z": incr_z, "template": template,
            "after_1": after_1, "root": root}


def _damage(data: bytes, rng: random.Random, how: str) -> bytes:
    if how == "cut":
        return data[: rng.randrange(0, len(data))]
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
    return bytes(b)


def _body_start(data: bytes) -> int:
    """Offset of the first frame after the stream's header frame."""
    return 5 + int.from_bytes(data[:4], "big")


@pytest.mark.parametrize("kind", ["full", "incr", "incr-z"])
@pytest.mark.parametrize("how", ["cut", "flip", "flip-body"])
def test_receive_damaged_stream(tmp_path, streams, kind, how):
    """Cut at random offsets or with random bytes flipped (several seeds): exit 6, nothing
    committed, DST as it was; then the intact stream is received."""
    good = streams[kind].read_bytes()
    body = _body_start(good)
    seeds = 3
    for seed in range(seeds):
        rng = random.Random(f"{kind}-{how}-{seed}")
        if how == "flip-body":  # damage after the header: only the trailer digest catches some
            damaged = good[:body] + _damage(good[body:], rng, "flip")
        else:
            damaged = _damage(good, rng, how)
        if damaged == good:
            continue
        bad = tmp_path / f"bad-{seed}.vs"
        bad.write_bytes(damaged)
        dst = tmp_path / f"D{seed}"
        if kind != "full":
            shutil.copytree(streams["template"], dst, symlinks=True)
        before = observed(dst)
        r = run_cli("receive", dst, stdin_path=bad, timeout=60)
        what = f"{kind} stream, {how} (seed {seed}, {len(damaged)} of {len(good)} bytes)"
        assert r.code == 6, f"{what}: {r}"
        assert_one_error_line(r)
        assert_bounded(r)
        if kind == "full":
            # a new mirror: at most an empty volume, no snapshot committed
            if is_volume(dst):
                assert okj("snapshots", dst, "--all")["snapshots"] == [], what
                assert content(dst) == {}, what
                assert_verifies(dst)
        else:
            assert observed(dst) == before, what
            assert_verifies(dst)
        if seed < seeds - 1:
            continue  # DST is as it was: one good receive after the last damaged one will do
        r = run_cli("receive", dst, "--json", stdin_path=streams[kind], timeout=60)
        assert r.code == 0, f"{what}, then the intact stream: {r}"
        assert_verifies(dst)
        if kind == "full":
            assert content(dst, mtimes=True) == streams["after_1"]
        else:
            assert content(dst, mtimes=True) == content(streams["src"], mtimes=True)


def test_receive_stream_with_damaged_base_id_is_exit_6(tmp_path, streams):
    """One character of the incremental stream's base snapshot id changed (in the header): the
    stream is damaged (its trailer digest says so), which is exit 6, not "DST lacks the base
    snapshot" (exit 4, which sends an administrator off to make a full stream)."""
    good = streams["incr"].read_bytes()
    base_id = okj("snapshots", streams["src"])["snapshots"][0]["id"].encode()
    at = good.index(base_id, 0, _body_start(good))
    last = base_id[-1:]
    damaged = good[: at + len(base_id) - 1] + (b"0" if last != b"0" else b"1") + \
        good[at + len(base_id):]
    bad = tmp_path / "bad.vs"
    bad.write_bytes(damaged)
    dst = tmp_path / "D"
    shutil.copytree(streams["template"], dst, symlinks=True)
    before = observed(dst)
    r = run_cli("receive", dst, stdin_path=bad, timeout=60)
    assert observed(dst) == before
    assert_one_error_line(r)
    assert r.code == 6, r


# --- 4. a remote disk that fills -------------------------------------------------------------------

@contextlib.contextmanager
def small_disk(path: Path, size: str = "8m"):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       check=False, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        r = subprocess.run(["umount", str(path)], check=False, capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def assert_no_leftovers(disk: Path, dst: Path) -> None:
    """Only DST on the disk; inside it no temp file and no pack without its index."""
    assert sorted(os.listdir(disk)) == [dst.name], os.listdir(disk)
    if is_volume(dst):
        meta = dst / ".volsync"
        tmp = meta / "tmp"
        assert not tmp.exists() or not any(tmp.iterdir()), list(tmp.iterdir())
        packs = meta / "packs"
        orphans = [p.name for p in packs.glob("*.pack") if not p.with_suffix(".idx").exists()]
        assert not orphans, orphans
        stray = [p.name for p in meta.rglob("*") if ".tmp" in p.name or "volsync-" in p.name]
        assert not stray, stray


@pytest.mark.parametrize("existing", [True, False])
def test_remote_disk_fills(tmp_path, rsh_shim, existing):
    src = make_volume(tmp_path / "S", {"small.txt": "small\n", "s.bin": rnd(200_000, 11)},
                      block_size="64K")
    snap(src)
    env = remote_env(rsh_shim, REAL_REMOTE)
    with small_disk(tmp_path / "disk") as disk:
        dst = disk / "dst"
        addr = f"testhost:{dst}"
        if existing:
            r = run_cli("transfer", src, addr, env=env)
            assert r.code == 0, r
        write(src, {f"big{i}.bin": rnd(5 * MIB, 20 + i) for i in range(4)})
        snap(src)
        before = observed(dst)
        free_before = free_bytes(disk)
        r = run_cli("transfer", src, addr, env=env, timeout=60)
        assert r.code == 1, r
        line = assert_one_error_line(r)
        assert "No space left on device" in line, r
        print(f"disk full ({'existing' if existing else 'new'} DST): {line}")
        assert_bounded(r)
        if existing:
            assert observed(dst) == before
            assert_verifies(dst)
        elif is_volume(dst):
            assert okj("snapshots", dst, "--all")["snapshots"] == []
            assert content(dst) == {}
        assert_no_leftovers(disk, dst)
        # the space the failed run took is given back (nothing kept but sealed packs)
        assert free_bytes(disk) >= free_before - 256 * 1024, (free_bytes(disk), free_before)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        r = run_cli("transfer", src, addr, env=env, timeout=60)
        assert r.code == 0, r
        assert_mirror_of(dst, src)


def test_remote_disk_fills_while_writing_the_live_tree(tmp_path, rsh_shim):
    """The objects fit, the live tree does not: exit 1, the mirror as it was (its live tree
    back at its latest snapshot), verify ok; after space is freed, the rerun completes."""
    src = make_volume(tmp_path / "S", {"small.txt": "small\n"}, block_size="64K")
    snap(src)
    env = remote_env(rsh_shim, REAL_REMOTE)
    with small_disk(tmp_path / "disk", "8m") as disk:
        dst = disk / "dst"
        addr = f"testhost:{dst}"
        assert run_cli("transfer", src, addr, env=env).code == 0
        write(src, {"b1.bin": rnd(2 * MIB + 7000, 31), "b2.bin": rnd(2 * MIB, 32)})
        snap(src)
        before = observed(dst)
        r = run_cli("transfer", src, addr, env=env, timeout=60)
        assert r.code == 1, r
        line = assert_one_error_line(r)
        assert "No space left on device" in line, r
        print(f"disk full in the live-tree step: {line}")
        assert observed(dst) == before
        assert_verifies(dst)
        assert_no_leftovers(disk, dst)
        # more room: the rerun completes, sending nothing the mirror already holds durably
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        r = run_cli("transfer", src, addr, "--json", env=env, timeout=60)
        assert r.code == 0, r
        assert r.json["bytes_sent"] < 64 * 1024, r.json
        assert_mirror_of(dst, src)
