#!/usr/bin/env python3
"""volsync benchmark over ssh: remote mirroring (transfer, resync) against rsync over the same
ssh command, on the same generated data, side by side in one run.

    python bench/remote.py                      # the 1 GiB data set, 1 run after a warm-up
    python bench/remote.py --size 100M          # quick run (about a minute)
    python bench/run.py --remote --size 100M    # the same, through run.py
    python bench/remote.py --py-spy /tmp/prof   # also profile every volsync client and server

The far side is a real OpenSSH server on 127.0.0.1 started by tests/sshd.py (its own host and
client keys, a free port), so every command pays a real ssh login, key exchange and cipher, and
`volsync serve --stdio` runs as a separate process under sshd, exactly as on another machine;
only the network is loopback. rsync gets the same ssh command with `-e`. The "remote"
directories are ordinary directories in the work dir, so they are checked directly.

Prints a markdown report like bench/run.py's: machine facts, the exact command line, then one
table with ratios and PASS/MISS against the targets. See bench/README.md, "Remote (ssh)".
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import gendata
from run import (
    GIB,
    MIB,
    SEED_DST,
    SEED_INCR,
    Bench,
    CommandFailed,
    first_line,
    human,
    need,
    seconds,
)

HOST = "127.0.0.1"
# rsync over ssh: the baseline copy into an empty directory (--stats: its byte counts), the
# incremental one the brief names (--delete so that it mirrors deletions as volsync does), and
# the incremental one bench/run.py's M2 uses (--inplace: no temporary copy of changed files)
RSYNC_FULL = ["rsync", "-a", "--stats"]
RSYNC_NOCHANGE = ["rsync", "-a", "--delete", "--stats"]
RSYNC_DELTA = ["rsync", "-a", "--delete", "--no-whole-file", "--stats"]
RSYNC_DELTA_INPLACE = [*RSYNC_DELTA, "--inplace"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONTENDED = 0.10  # other programs took more than this share of the CPUs during a command
PY_SPY_RATE = 200  # samples a second; --idle: waits count too (wall time); --threads: per thread
PY_SPY_ARGS = ["-f", "raw", "-r", str(PY_SPY_RATE), "--idle", "--threads"]
SSH_TRANSFERRED = re.compile(r"Transferred: sent (\d+), received (\d+) bytes")


# the rows of the CPU table: (row, sample key, what)
CPU_ROWS = [
    ("R0a", "ssh_true", "`ssh HOST true`"),
    ("R0b", "ssh_version", "`ssh HOST volsync --version`"),
    ("R1", "v_full", "volsync baseline `transfer`"),
    ("R1", "rsync_full", "rsync baseline"),
    ("R1z", "z_full", "volsync baseline `transfer --compress`"),
    ("R2", "v_incr", "volsync incremental `transfer`"),
    ("R2", "rsync_delta", "rsync incremental"),
    ("R2b", "rsync_inplace", "rsync incremental `--inplace`"),
    ("R4", "v_resync", "volsync `resync`"),
    ("R4b", "v_break", "volsync `break`"),
    ("R4c", "v_far_snap", "volsync `snapshot` (far side)"),
    ("R5", "v_nochange", "volsync no-change `transfer`"),
    ("R5", "rsync_nochange", "rsync no-change"),
]


def rsync_stat(text: str, label: str) -> int | None:
    m = re.search(rf"{label}: ([\d,.]+)", text)
    return int(re.sub(r"[,.]", "", m.group(1))) if m else None


def ssh_bytes(stderr: str) -> int | None:
    """Bytes the ssh client moved over TCP (sent + received, encrypted, with ssh's own
    framing and key exchange), from the "Transferred:" lines LogLevel=VERBOSE makes it print."""
    found = SSH_TRANSFERRED.findall(stderr)
    return sum(int(s) + int(r) for s, r in found) if found else None


class RemoteBench(Bench):
    """The R rows. Reuses Bench's command runner, checks, phases and mutation helpers."""

    def __init__(self, args: argparse.Namespace, work: str) -> None:
        super().__init__(args, work)
        self.srv = None
        self.rsh = ""  # the ssh command given to both volsync (--rsh) and rsync (-e)
        self.remote_path = ""
        self.far = os.path.join(work, "far")  # the far side's directories
        self.profiles: list[str] = []
        # per timed command: CPU seconds (here, far side, whole machine) while it ran
        self.cpu: dict[str, list[tuple[float, float, float]]] = collections.defaultdict(list)
        self.last_cpu = (0.0, 0.0, 0.0)
        self.idle_waits = self.idle_timeouts = 0

    # -- the far side -------------------------------------------------------------------

    def start_sshd(self) -> None:
        from sshd import start_sshd

        self.srv = start_sshd(os.path.join(self.work, "sshd"))
        # the fixture's ssh command, with LogLevel=VERBOSE instead of ERROR: ssh then prints
        # "Transferred: sent N, received M bytes" at exit, the same byte count for both tools
        self.rsh = shlex.join(
            "LogLevel=VERBOSE" if a == "LogLevel=ERROR" else a for a in shlex.split(self.srv.rsh)
        )
        self.remote_path = self.args.remote_path or self.srv.remote_path
        os.makedirs(self.far)

    def addr(self, name: str) -> str:
        return self.srv.scp_address(os.path.join(self.far, name))

    def far_name(self, name: str) -> str:
        """A far-side directory as a work-dir relative name (for check_same, mutate, rm)."""
        return os.path.join("far", name)

    def remote_opts(self, key: str | None) -> list[str]:
        remote_path = self.remote_path
        if self.args.py_spy and key:
            remote_path = self.py_spy_server(key)
        return ["--rsh", self.rsh, "--remote-path", remote_path]

    def py_spy_server(self, key: str) -> str:
        """A script (on the far side, which is this machine) that runs the far side's volsync
        under `py-spy record`. py-spy prints to its stdout, which is the protocol's pipe: it
        gets stderr instead, and the volsync it starts gets the real stdout back (fd 3)."""
        out = os.path.join(self.args.py_spy, f"{key}-server.txt")
        script = os.path.join(self.work, "sshd", f"py-spy-{key}.sh")
        with open(script, "w") as f:
            f.write(
                "#!/bin/sh\nexec 3>&1 1>&2\n"
                f"exec {shlex.quote(self.py_spy)} record {shlex.join(PY_SPY_ARGS)} -o {shlex.quote(out)} -- "
                'sh -c \'exec 1>&3 3>&-; exec "$0" "$@"\' '
                f'{self.remote_path} "$@"\n'
            )
        os.chmod(script, 0o755)
        return script

    def rvs(self, *argv: str, key: str | None = None) -> tuple[dict, float, str]:
        """`volsync ARGV --json --rsh ... --remote-path ...`: (JSON, seconds, stderr)."""
        prefix = []
        if self.args.py_spy and key:
            out = os.path.join(self.args.py_spy, f"{key}-client.txt")
            prefix = [self.py_spy, "record", *PY_SPY_ARGS, "-o", out, "--"]
            self.profiles.append(key)
        done = self.run(
            [*prefix, *self.volsync, *argv, "--json", *self.remote_opts(key)], timed=key is not None
        )
        stdout = done.stdout
        if prefix:  # py-spy's own lines share volsync's stdout
            stdout = "\n".join(ln for ln in stdout.splitlines() if not ln.startswith("py-spy>"))
        try:
            obj = json.loads(stdout)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise CommandFailed(
                f"`{shlex.join(done.argv)}` exited 0 but stdout is not one JSON object:\n"
                f"{done.stdout[-500:] or '(empty)'}"
            )
        if key:
            self.samples[key].append(done.seconds)
            self.cpu[key].append(self.last_cpu)
        return obj, done.seconds, done.stderr

    # -- CPU accounting -----------------------------------------------------------------

    def run(
        self,
        argv: list[str],
        key: str | None = None,
        env: dict | None = None,
        timed: bool | None = None,
    ):
        """Bench.run, also noting the CPU time used here (this script's children: the client
        and its ssh, or rsync and its ssh), on the far side (sshd's sessions: sshd and the
        server it runs) and by the whole machine while the command ran. Before a timed
        command (untimed): `sync`, so that no command pays for writing back what an earlier
        step (a `cp -a`, rsync's unsynced copy) left dirty; then, with --wait-idle, a wait
        until the other programs on the machine leave its CPUs idle."""
        if key is not None if timed is None else timed:
            subprocess.run(["sync"], check=False)
            self.wait_idle()
        before = self.cpu_marks()
        done = super().run(argv, key, env)
        self.settle_far()
        self.last_cpu = tuple(b - a for a, b in zip(before, self.cpu_marks()))
        if key:
            self.cpu[key].append(self.last_cpu)
        return done

    def wait_idle(self) -> None:
        """Up to --wait-idle seconds, until the machine is at least 90% idle for 1 s."""
        deadline = time.monotonic() + self.args.wait_idle
        waited = False
        while time.monotonic() < deadline:
            start = machine_busy()
            time.sleep(1.0)
            if (machine_busy() - start) < 0.1 * (os.cpu_count() or 1):
                break
            waited = True
        else:
            if self.args.wait_idle > 0:
                self.idle_timeouts += 1
        if waited:
            self.idle_waits += 1

    def cpu_marks(self) -> tuple[float, float, float]:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime, self.far_cpu(), machine_busy()

    def far_cpu(self) -> float:
        """CPU seconds of sshd's finished sessions: the listener reaps each session's process,
        which reaped its own children (the privilege-separated sshd, the remote command), so
        their times add up in the listener's cutime + cstime."""
        if self.srv is None:
            return 0.0
        try:
            with open(f"/proc/{self.srv.proc.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            return 0.0
        return (int(fields[13]) + int(fields[14])) / CLK_TCK

    def settle_far(self, timeout: float = 3.0) -> None:
        """Wait (untimed) until sshd has reaped the command's session, so its CPU is counted."""
        if self.srv is None:
            return
        path = f"/proc/{self.srv.proc.pid}/task/{self.srv.proc.pid}/children"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(path) as f:
                    if not f.read().strip():
                        return
            except OSError:
                return
            time.sleep(0.01)

    def check_far_mode(self, name: str, mode: str, what: str) -> None:
        if self.args.no_check:
            return
        status, _, _ = self.rvs("status", self.addr(name))
        if status.get("mode") != mode:
            raise CommandFailed(
                f"after {what}: `volsync status {self.addr(name)}` says mode "
                f"{status.get('mode')!r}, expected {mode!r}"
            )

    # -- the benchmarks -----------------------------------------------------------------

    def setup(self) -> None:
        t0 = time.perf_counter()
        info = gendata.generate(self.master, self.args.seed, self.args.scale)
        self.data_files, self.data_bytes = info["files"], info["bytes"]
        self.notes.append(f"generated the data set in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        self.start_sshd()
        self.notes.append(
            f"test sshd on {HOST}:{self.srv.port} (tests/sshd.py) started in "
            f"{time.perf_counter() - t0:.1f} s"
        )

    def warm_up(self) -> None:
        """Untimed: one of everything first, so that no timed command pays for the first ssh
        login, the first Python start-up on either side (cold .pyc and shared libraries) or
        the first read of the data. The R0 rows then time the fixed costs alone."""
        self.progress("[warm-up]")
        ssh = shlex.split(self.rsh)
        remote_version = f"{self.remote_path} --version"
        for _ in range(2):
            self.run([*ssh, HOST, "true"])
            self.run([*ssh, HOST, remote_version])
            self.run([*self.volsync, "--version"])
        for path in self.data_paths():  # read every byte once: the page cache is warm for all
            with open(path, "rb") as f:
                while f.read(8 * MIB):
                    pass
        os.makedirs(self.path("warm"))
        for i in range(20):
            with open(os.path.join(self.path("warm"), f"f{i}"), "wb") as f:
                f.write(os.urandom(100_000))
        self.vs("init", "warm")
        self.rvs("transfer", "warm", self.addr("warm"))
        self.rvs("transfer", "warm", self.addr("warm"))
        self.run([*RSYNC_FULL, "-e", self.rsh, "warm/", self.addr("rwarm") + "/"])
        self.rm("warm", self.far_name("warm"), self.far_name("rwarm"))
        for rep in range(self.args.repeat):  # R0: the fixed costs of any remote command
            self.run([*ssh, HOST, "true"], key="ssh_true")
            self.run([*ssh, HOST, remote_version], key="ssh_version")
            self.run([*self.volsync, "--version"], key="local_version")

    def data_paths(self) -> list[str]:
        return [os.path.join(self.master, rel) for rel, _ in gendata.list_files(self.master)]

    def rsync_remote(self, rep: int) -> None:
        rsh = ["-e", self.rsh]
        self.run(["cp", "-a", "data", "rsrc"])
        done = self.run([*RSYNC_FULL, *rsh, "rsrc/", self.addr("rdst") + "/"], key="rsync_full")
        self.record_rsync(done, "rsync_full")
        self.check_same("rsrc", self.far_name("rdst"), "rsync baseline")
        done = self.run(
            [*RSYNC_NOCHANGE, *rsh, "rsrc/", self.addr("rdst") + "/"], key="rsync_nochange"
        )
        self.record_rsync(done, "rsync_nochange")
        self.run(["cp", "-a", self.far_name("rdst"), self.far_name("rdst2")])  # for --inplace
        m = self.mutate("rsrc", SEED_INCR)
        self.samples["r_changed"].append(m.bytes_changed)
        done = self.run([*RSYNC_DELTA, *rsh, "rsrc/", self.addr("rdst") + "/"], key="rsync_delta")
        self.record_rsync(done, "rsync_delta")
        self.check_same("rsrc", self.far_name("rdst"), "rsync incremental")
        done = self.run(
            [*RSYNC_DELTA_INPLACE, *rsh, "rsrc/", self.addr("rdst2") + "/"], key="rsync_inplace"
        )
        self.record_rsync(done, "rsync_inplace")
        self.check_same("rsrc", self.far_name("rdst2"), "rsync --inplace incremental")

    def record_rsync(self, done, key: str) -> None:
        sent = rsync_stat(done.stdout, "Total bytes sent")
        received = rsync_stat(done.stdout, "Total bytes received")
        if sent is not None and received is not None:
            self.samples[f"{key}_stats"].append(sent + received)
        literal = rsync_stat(done.stdout, "Literal data")
        if literal is not None:
            self.samples[f"{key}_literal"].append(literal)
        on_tcp = ssh_bytes(done.stderr)
        if on_tcp is not None:
            self.samples[f"{key}_ssh"].append(on_tcp)

    def record_volsync(self, out: dict, stderr: str, key: str, command: str) -> None:
        self.samples[f"{key}_wire"].append(need(out, "bytes_on_wire", command))
        self.samples[f"{key}_sent"].append(need(out, "bytes_sent", command))
        on_tcp = ssh_bytes(stderr)
        if on_tcp is not None:
            self.samples[f"{key}_ssh"].append(on_tcp)

    def volsync_remote(self, rep: int) -> None:
        dst = self.addr("dst")
        self.run(["cp", "-a", "data", "src"])
        out, _ = self.vs("init", "src")  # untimed, as M1: the transfer snapshots SRC
        self.hash = out.get("hash", self.hash)

        out, _, err = self.rvs("transfer", "src", dst, key="v_full")  # R1
        self.record_volsync(out, err, "v_full", "transfer")
        self.check_same("src", self.far_name("dst"), "baseline transfer")
        self.check_far_mode("dst", "read-only", "baseline transfer")

        out, _, err = self.rvs("transfer", "src", dst, key="v_nochange")  # R5
        self.record_volsync(out, err, "v_nochange", "transfer")

        m = self.mutate("src", SEED_INCR)  # R2, R3
        self.samples["v_changed"].append(m.bytes_changed)
        self.samples["v_changed_64k"].append(m.bytes_changed_64k_blocks)
        out, _, err = self.rvs("transfer", "src", dst, key="v_incr")
        self.record_volsync(out, err, "v_incr", "transfer")
        self.check_same("src", self.far_name("dst"), "incremental transfer")

        self.rvs("break", dst, key="v_break")  # R4: failover to the far mirror...
        m = self.mutate(self.far_name("dst"), SEED_DST)  # ...which is written there
        self.samples["v_far_changed"].append(m.bytes_changed)
        self.rvs("snapshot", dst, key="v_far_snap")
        out, _, err = self.rvs("resync", dst, "src", key="v_resync")  # carry the writes back
        self.record_volsync(out, err, "v_resync", "resync")
        self.check_same(self.far_name("dst"), "src", "resync")
        self.check_mode("src", "read-only", "resync")

    def volsync_compress(self, rep: int) -> None:
        self.run(["cp", "-a", "data", "zsrc"])
        self.vs("init", "zsrc")
        out, _, err = self.rvs("transfer", "--compress", "zsrc", self.addr("zdst"), key="z_full")
        self.record_volsync(out, err, "z_full", "transfer")
        self.check_same("zsrc", self.far_name("zdst"), "--compress baseline transfer")

    def run_all(self) -> None:
        self.setup()
        if not self.have_volsync:
            self.errors.append(
                f"`{self.args.volsync}` is not on PATH: volsync rows not run "
                "(pip install -e . first, or pass --volsync)"
            )
        try:
            if self.have_volsync:
                self.warm_up()
            self.phase(
                "rsync over ssh",
                self.rsync_remote,
                ("rsrc", self.far_name("rdst"), self.far_name("rdst2")),
            )
            if self.have_volsync:
                self.phase("volsync over ssh", self.volsync_remote, ("src", self.far_name("dst")))
                if not self.args.skip_compress:
                    self.phase(
                        "volsync --compress over ssh",
                        self.volsync_compress,
                        ("zsrc", self.far_name("zdst")),
                    )
        finally:
            if self.srv is not None:
                self.srv.stop()

    # -- the report ---------------------------------------------------------------------

    def rows(self) -> list[list[str]]:
        full = self.args.scale == 1.0
        rows: list[list[str]] = []
        size = f"{human(self.data_bytes)} ({self.data_files:,} files)"
        speed = self.data_bytes

        def row(
            ident,
            what,
            v_key,
            c_label,
            c_key,
            target="",
            ok=None,
            speed=None,
            judged=True,
            v_text=seconds,
            c_text=seconds,
        ):
            v, c = self.med(v_key), self.med(c_key) if c_key else None
            ratio = v / c if v is not None and c else None
            if v is None:
                result = "ERROR" if self.have_volsync else "not run"
            elif ok is None:
                result = ""
            elif judged is not True:
                result = judged or f"not judged at --size {human(self.data_bytes)}"
            elif c_key and ratio is None:
                result = "no comparison"
            else:
                result = "PASS" if ok(v, ratio) else "MISS"

            def fmt(text, value):
                return text(value, speed) if text is seconds else text(value)

            rows.append(
                [
                    ident,
                    what,
                    fmt(v_text, v),
                    f"{c_label}: {fmt(c_text, c)}" if c_label else "—",
                    f"{ratio:.2f}×" if ratio is not None else "—",
                    target,
                    result,
                ]
            )

        row("R0a", "floor: `ssh HOST true` (one ssh login)", "ssh_true", None, None)
        row(
            "R0b",
            "floor: `ssh HOST volsync --version` (login + Python start-up there)",
            "ssh_version",
            None,
            None,
        )
        row("R0c", "floor: `volsync --version` here (Python start-up)", "local_version", None, None)
        row(
            "R1",
            f"baseline `transfer SRC {HOST}:DST` (incl. first snapshot), {size}",
            "v_full",
            "`rsync -a -e ssh` into empty dir",
            "rsync_full",
            "≤ 1× rsync",
            lambda v, r: r <= 1.0,
            speed=speed,
        )
        row(
            "R1a",
            "  baseline bytes_on_wire",
            "v_full_wire",
            "rsync total bytes sent+received",
            "rsync_full_stats",
            v_text=human,
            c_text=human,
        )
        row(
            "R1b",
            "  baseline bytes on TCP (ssh's count, both tools)",
            "v_full_ssh",
            "rsync",
            "rsync_full_ssh",
            v_text=human,
            c_text=human,
        )
        if self.args.skip_compress:
            rows.append(
                [
                    "R1z",
                    "baseline `transfer --compress`",
                    "skipped: --skip-compress",
                    "—",
                    "—",
                    "",
                    "",
                ]
            )
        else:
            row(
                "R1z",
                "baseline `transfer --compress` (data does not compress)",
                "z_full",
                "R1 (no --compress)",
                "v_full",
                speed=speed,
            )
            row(
                "R1za",
                "  `--compress` bytes_on_wire",
                "z_full_wire",
                "R1 bytes_on_wire",
                "v_full_wire",
                v_text=human,
                c_text=human,
            )
        changed = human(self.med("v_changed"))
        row(
            "R2",
            f"incremental `transfer` after mutate ({changed} changed)",
            "v_incr",
            "`rsync -a --delete --no-whole-file -e ssh`",
            "rsync_delta",
            "≤ 0.5× rsync",
            lambda v, r: r <= 0.5,
        )
        row(
            "R2b", "  the same", "v_incr", "`rsync` as R2 with `--inplace` (as M2)", "rsync_inplace"
        )
        ideal = human(self.med("v_changed_64k"))
        literal = human(self.med("rsync_delta_literal"))
        sent = human(self.med("v_incr_sent"))
        row(
            "R3",
            "incremental bytes_on_wire",
            "v_incr_wire",
            "bytes changed",
            "v_changed",
            "≤ 1.1× changed",
            lambda v, r: r <= 1.1,
            v_text=human,
            c_text=lambda c: (
                f"{human(c)} (in whole 64 KiB blocks: {ideal}; volsync "
                f"bytes_sent: {sent}; rsync literal data: {literal})"
            ),
        )
        row(
            "R3b",
            "  incremental bytes_on_wire",
            "v_incr_wire",
            "rsync total bytes sent+received",
            "rsync_delta_stats",
            "≤ 1× rsync",
            lambda v, r: r <= 1.0,
            v_text=human,
            c_text=human,
        )
        row(
            "R3c",
            "  incremental bytes on TCP (ssh's count, both tools)",
            "v_incr_ssh",
            "rsync",
            "rsync_delta_ssh",
            v_text=human,
            c_text=human,
        )
        far_changed = human(self.med("v_far_changed"))
        row(
            "R4",
            f"`resync {HOST}:DST SRC` after `break`, {far_changed} written on DST",
            "v_resync",
            "R1 baseline `transfer`",
            "v_full",
            "≤ 0.1× baseline",
            lambda v, r: r <= 0.1,
        )
        row(
            "R4a",
            "  `resync` bytes_on_wire",
            "v_resync_wire",
            "bytes written on DST",
            "v_far_changed",
            v_text=human,
            c_text=human,
        )
        row("R4b", f"  `break {HOST}:DST`", "v_break", None, None)
        row("R4c", f"  `snapshot {HOST}:DST` of those writes", "v_far_snap", None, None)
        row(
            "R5",
            "no-change `transfer` right after R1",
            "v_nochange",
            "no-change `rsync -a --delete -e ssh`",
            "rsync_nochange",
            "< 0.5 s",
            lambda v, r: v < 0.5,
            judged=full,
        )
        row(
            "R5a",
            "  no-change bytes_on_wire",
            "v_nochange_wire",
            "rsync total bytes sent+received",
            "rsync_nochange_stats",
            v_text=human,
            c_text=human,
        )
        return rows

    def report(self, argv: list[str], started: str, elapsed: float) -> str:
        a = self.args
        out = ["# volsync benchmark: remote volumes over ssh", ""]
        out.append(f"- command: `{shlex.join(['python', *self.args.invoked, *argv])}`")
        out.append(
            f"- started {started}, took {elapsed:.0f} s; "
            + (f"medians of {a.repeat} runs" if a.repeat > 1 else "one run of each")
            + f" after an untimed warm-up; work dir {self.work}"
        )
        out += [f"- {fact}" for fact in self.facts]
        out.append(f"- volsync: {self.volsync_version()}")
        ssh_version = subprocess.run(
            ["ssh", "-V"], check=False, capture_output=True, text=True
        ).stderr
        out.append(f"- rsync: {first_line(['rsync', '--version'])}; ssh: {ssh_version.strip()}")
        out.append(
            f"- far side: sshd on {HOST} (tests/sshd.py), `volsync serve --stdio` run as "
            f"`{self.remote_path} serve --stdio`; both tools use the ssh command "
            f"`{self.rsh}` (volsync `--rsh`, rsync `-e`); one ssh connection per command, "
            "no connection sharing"
        )
        out.append(
            f"- data (seed {a.seed}, --size {human(self.data_bytes)}): {self.data_files:,} "
            f"files (of which `disk.img` "
            f"{human(round(gendata.IMAGE_SIZE * a.scale) // 4096 * 4096)}); "
            f"the change is bench/run.py's mutation (seed {a.seed + SEED_INCR})"
        )
        if self.hash:
            out.append(f"- volumes made by `volsync init` name blocks with {self.hash}")
        out.append(
            "- byte counts: volsync's bytes_on_wire (its frames, both directions), rsync's "
            '--stats "Total bytes sent" + "Total bytes received" (its protocol, both '
            'directions), and for both the ssh client\'s own "Transferred: sent, received" '
            "(LogLevel=VERBOSE): encrypted bytes on the TCP connection, key exchange included"
        )
        if a.py_spy:
            out.append(
                f"- **profiled with py-spy** (`--py-spy {a.py_spy}`): volsync times include "
                "py-spy's sampling and are not benchmark numbers"
            )
        out += [f"- {note}" for note in self.notes]
        if a.wait_idle:
            out.append(
                f"- `--wait-idle {a.wait_idle:g}`: waited for an idle machine before "
                f"{self.idle_waits} timed command(s); gave up waiting {self.idle_timeouts} time(s)"
            )
        contended = self.contended()
        if contended:
            out.append(
                f"- **WARNING**: other programs took more than {CONTENDED:.0%} of the CPUs "
                f"while these ran: {', '.join(contended)} (see the CPU table): their times "
                "are not this tool's alone; rerun on a quiet machine (or with --wait-idle)"
            )
        header = [
            "#",
            "benchmark",
            "volsync (median)",
            "compared with (median)",
            "ratio",
            "target",
            "result",
        ]
        out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(r) + " |" for r in self.rows()]
        out.append("")
        out += self.cpu_table()
        if a.repeat > 1 or a.raw:
            out += ["<details><summary>all samples</summary>", "", "```"]
            out += [
                f"{k}: {', '.join(f'{v:,}' if isinstance(v, int) else f'{v:.4f}' for v in vs)}"
                for k, vs in sorted(self.samples.items())
            ]
            out += ["```", "</details>", ""]
        if a.py_spy:
            out += self.profile_report()
        if self.errors:
            out += ["## Errors", ""]
            for e in self.errors:
                out += ["```", e, "```"]
        return "\n".join(out) + "\n"

    def cpu_table(self) -> list[str]:
        """Where the CPU went during each timed command (medians): here, far side, the rest."""
        if not self.cpu:
            return []
        out = [
            (
                "CPU seconds during each timed command (medians). *here*: the command and its "
                "ssh client (this script's children); *far side*: sshd's session (sshd, and the "
                "`volsync serve` or `rsync --server` it ran); *rest of the machine*: all other "
                "busy CPU time meanwhile (other programs on this machine: it should be near 0); "
                f"{os.cpu_count()} CPUs, so the wall time can hold {os.cpu_count()} CPU-s a "
                "second. With --py-spy, py-spy's own CPU counts on the side it samples."
            ),
            "",
            (
                "| row | command | wall | CPU here | CPU far side | rest of the machine "
                "| share of the machine's CPUs the rest took |"
            ),
            "|---|---|---|---|---|---|---|",
        ]
        for row, key, what in CPU_ROWS:
            if key not in self.cpu:
                continue
            here, far, busy = (statistics.median(v[i] for v in self.cpu[key]) for i in range(3))
            rest = max(0.0, busy - here - far)
            wall = self.med(key)
            share = rest / (wall * (os.cpu_count() or 1)) if wall else 0.0
            flag = " **contended**" if share > CONTENDED else ""
            out.append(
                f"| {row} | {what} | {seconds(wall)} | {here:.2f} s | {far:.2f} s | "
                f"{rest:.2f} s | {share:.0%}{flag} |"
            )
        return out + [""]

    def contended(self) -> list[str]:
        """Sample keys during which other programs took more than CONTENDED of the CPUs."""
        bad = []
        for _, key, _ in CPU_ROWS:
            for here, far, busy in self.cpu.get(key, []):
                wall = self.med(key)
                if (
                    wall
                    and max(0.0, busy - here - far) / (wall * (os.cpu_count() or 1)) > CONTENDED
                ):
                    bad.append(key)
                    break
        return bad

    @property
    def py_spy(self) -> str:
        return shutil.which("py-spy") or "py-spy"

    def profile_report(self) -> list[str]:
        """Where each profiled command spent its wall time, client and server side."""
        out = ["## Profiles (py-spy, raw collapsed stacks)", ""]
        for key in dict.fromkeys(self.profiles):
            for side in ("client", "server"):
                for path in sorted(glob.glob(os.path.join(self.args.py_spy, f"{key}-{side}*.txt"))):
                    out += [
                        f"### {key} {side}: `{path}`",
                        "",
                        "```",
                        *summarize(path, PY_SPY_RATE),
                        "```",
                        "",
                    ]
        return out


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting for I/O)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def summarize(path: str, rate: int, top: int = 12) -> list[str]:
    """Where one process spent its wall time, from a py-spy raw file recorded with --idle and
    --threads: per thread, the functions with the most samples on the stack (inclusive) and
    at its top (self), in seconds (samples / rate). Threads that only waited are one line."""
    threads: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    names: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            head, *frames = stack.split(";")
            tid, _, name = head.partition(": ")  # "thread (TID)" or "thread (TID): NAME"
            if name:
                names[tid] = name
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in frames]
            threads[tid].append((frames, int(count)))
    if not threads:
        return ["(no samples)"]
    lines = []
    for tid, stacks in sorted(threads.items(), key=lambda kv: -sum(n for _, n in kv[1])):
        name = names.get(tid, tid)
        total = sum(n for _, n in stacks)
        inclusive: collections.Counter = collections.Counter()
        own: collections.Counter = collections.Counter()
        for frames, n in stacks:
            for fr in set(frames):
                inclusive[fr] += n
            own[frames[-1] if frames else "(no frame)"] += n
        busiest, n_busiest = own.most_common(1)[0]
        if name != "MainThread" and n_busiest > 0.9 * total:
            lines.append(f"{name}: {total / rate:.2f} s, {n_busiest / total:.0%} in {busiest}")
            continue
        lines.append(f"{name}: {total / rate:.2f} s")
        # inclusive: volsync's own functions, without the spine every sample shares
        mine = [
            (fr, n) for fr, n in inclusive.most_common() if "(volsync/" in fr and n < 0.95 * total
        ]
        lines.append("  inclusive (volsync functions):")
        lines += [f"    {n / rate:7.2f} s {n / total:6.1%}  {fr}" for fr, n in mine[:top]]
        lines.append("  self:")
        lines += [f"    {n / rate:7.2f} s {n / total:6.1%}  {fr}" for fr, n in own.most_common(top)]
    return lines


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return ", ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None, invoked: list[str] | None = None) -> int:
    """`invoked`: how the report shows the script ([run.py, --remote] when run.py hands over)."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    size_opts = p.add_mutually_exclusive_group()
    size_opts.add_argument(
        "--size",
        default="1G",
        help="data set size, like 100M or 1G (default 1G: bench/run.py's full set); "
        "half files, half disk.img",
    )
    size_opts.add_argument(
        "--scale", type=float, help="the size as bench/run.py's --scale (1.0 = 1G)"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs after the warm-up (default 1); the table shows medians",
    )
    p.add_argument("--seed", type=int, default=1, help="data set seed (mutations derive from it)")
    p.add_argument("--out", help="also write the markdown report to this file")
    p.add_argument(
        "--volsync",
        default="volsync",
        help="the volsync command here, split like a shell would (default: volsync)",
    )
    p.add_argument(
        "--remote-path",
        help="the volsync command on the far side (default: this "
        "Python's `-m volsync`, as tests/sshd.py sets up)",
    )
    p.add_argument("--skip-compress", action="store_true", help="skip the --compress row (R1z)")
    p.add_argument(
        "--py-spy",
        metavar="DIR",
        help="run every timed volsync command, and its far-side server, under "
        "`py-spy record -f raw` writing DIR/KEY-client.txt and DIR/KEY-server.txt, "
        "and add a summary of each to the report (times are then not benchmarks)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each timed command, wait up to SECONDS until the machine's "
        "CPUs are at least 90%% idle for a second (default 0: do not wait)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the untimed checks that DST's live tree equals SRC's",
    )
    p.add_argument("--tmp", default="/tmp", help="where the work dir volsync-remote-* is made")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--raw", action="store_true", help="list every sample even with --repeat 1")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    try:
        size = round(args.scale * GIB) if args.scale else gendata.parse_size(args.size)
    except ValueError:
        p.error(f"--size {args.size!r}: use a size like 100M or 1G")
    if size < 16 * MIB or args.repeat < 1:
        p.error("--size must be at least 16M and --repeat at least 1")
    # the options Bench reads (bench/run.py), for the parts shared with it
    args.scale = size / GIB
    args.skip_small_files, args.small_files, args.include_sync = True, None, False
    args.invoked = invoked or [sys.argv[0]]
    if args.py_spy:
        args.py_spy = os.path.abspath(args.py_spy)
        os.makedirs(args.py_spy, exist_ok=True)

    work = tempfile.mkdtemp(prefix="volsync-remote-", dir=args.tmp)
    bench = RemoteBench(args, work)
    # peak, the volsync phase: the data set + SRC and DST (each a live tree + its block store)
    need_bytes = 5.3 * size
    free = shutil.disk_usage(work).free
    if free < need_bytes:
        bench.notes.append(
            f"WARNING: {human(free)} free in {work}, the run may need {human(need_bytes)}"
        )
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    load_before = loadavg()
    try:
        bench.run_all()
    except KeyboardInterrupt:
        bench.errors.append("interrupted")
    except Exception as exc:  # noqa: BLE001 - sshd did not start and the like: reported
        bench.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    bench.notes.append(
        f"load average (1, 5, 15 min) at the start {load_before}, at the end {loadavg()}: "
        "everything here shares the CPUs with whatever else runs on the machine"
    )
    text = bench.report(argv, started, time.perf_counter() - t0)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
