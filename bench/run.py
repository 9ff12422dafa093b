#!/usr/bin/env python3
"""volsync benchmark: volumes (init, snapshot) and mirroring (transfer, resync) against
cp -a, rsync and (when on PATH) restic, on the same generated data, side by side.

    python bench/run.py                          # full: 1 GiB set, 100,000 small files, 3 repeats
    python bench/run.py --scale 0.05 --repeat 1  # smoke run, well under a minute
    python bench/run.py --out results.md         # also write the markdown report to a file
    python bench/run.py --skip-volumes --skip-mirror --skip-small-files  # only the sparse rows
    python bench/run.py --remote --size 100M     # only the remote rows, over ssh (remote.py)

Prints a markdown report: machine facts, the exact command line, then one table of medians
with ratios and PASS/MISS against the project's targets. See bench/README.md for each row.
Stdlib only; every timed command is a subprocess timed with time.perf_counter.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gendata

MIB = 1024 * 1024
GIB = 1024 * MIB
SMALL_FILES_FULL = 100_000
# Seeds of the mutations, offsets from --seed: the incremental change (made identically on
# every tool's source), then the two sides of the diverged resync case.
SEED_INCR, SEED_DST, SEED_SRC = 101, 202, 303
# rsync's incremental update; --stats for its "Literal data" (bytes it had to send)
RSYNC_DELTA = ["rsync", "-a", "--delete", "--no-whole-file", "--inplace", "--stats"]


class CommandFailed(Exception):
    """A command exited non-zero, broke the JSON contract, or left a wrong result."""


@dataclass
class Done:
    argv: list[str]
    seconds: float
    stdout: str
    stderr: str


def need(obj: dict, key: str, command: str):
    """The contract's JSON field ``key`` of ``command``'s output, or CommandFailed."""
    if key not in obj:
        raise CommandFailed(f"`volsync {command} --json` lacks {key!r}: {json.dumps(obj)[:300]}")
    return obj[key]


def tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class Bench:
    def __init__(self, args: argparse.Namespace, work: str) -> None:
        self.args = args
        self.work = work
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.volsync = shlex.split(args.volsync)
        self.have_volsync = shutil.which(self.volsync[0]) is not None
        self.restic = shutil.which("restic")
        self.master = os.path.join(work, "data")
        self.small = os.path.join(work, "small")
        self.sparse = os.path.join(work, "sparse")  # its own source dir: one sparse image
        self.sparse_info: dict = {}
        self.hash = None  # the block hash volumes get from `init` (its --json "hash")
        self.data_files = self.data_bytes = 0
        if args.skip_small_files:
            self.small_files = 0
        elif args.small_files is not None:
            self.small_files = args.small_files
        else:
            self.small_files = max(1, round(SMALL_FILES_FULL * args.scale))
        self.small_bytes = 0
        self.facts = machine_facts(work)  # before the work dir goes: df -T needs it

    # -- running commands ---------------------------------------------------------------

    def run(self, argv: list[str], key: str | None = None, env: dict | None = None) -> Done:
        """Run argv; time it (plus a `sync` with --include-sync); record under key if given."""
        t0 = time.perf_counter()
        p = subprocess.run(
            argv, check=False, capture_output=True, text=True, env=env, cwd=self.work
        )
        if self.args.include_sync:
            subprocess.run(["sync"], check=True)
        seconds = time.perf_counter() - t0
        if p.returncode != 0:
            raise CommandFailed(
                f"`{shlex.join(argv)}` exited {p.returncode}:\n"
                f"{tail(p.stderr) or tail(p.stdout) or '(no output)'}"
            )
        if key:
            self.samples[key].append(seconds)
        self.progress(f"{seconds:8.3f} s  {shlex.join(argv)}")
        return Done(argv, seconds, p.stdout, p.stderr)

    def vs(self, *argv: str, key: str | None = None) -> tuple[dict, float]:
        """Run `volsync ARGV --json`; return its JSON object (the contract: one, on stdout)."""
        done = self.run([*self.volsync, *argv, "--json"])
        try:
            obj = json.loads(done.stdout)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise CommandFailed(
                f"`{shlex.join(done.argv)}` exited 0 but stdout is not one JSON "
                f"object:\n{tail(done.stdout) or '(empty)'}"
            )
        if key:
            self.samples[key].append(done.seconds)
        return obj, done.seconds

    def progress(self, text: str) -> None:
        if not self.args.quiet:
            print(f"  {text}", file=sys.stderr, flush=True)

    def path(self, name: str) -> str:
        return os.path.join(self.work, name)

    def rm(self, *names: str) -> None:
        for name in names:
            shutil.rmtree(self.path(name), ignore_errors=True)

    def mutate(self, name: str, seed: int) -> gendata.Mutation:
        m = gendata.mutate(self.path(name), self.args.seed + seed)
        self.progress(
            f"mutated {name} (seed {self.args.seed + seed}): {m.bytes_changed:,} bytes changed"
        )
        return m

    def check_same(self, a: str, b: str, what: str) -> None:
        """Fail unless the live trees of a and b (without .volsync) are byte-identical."""
        if self.args.no_check:
            return
        diff = compare_trees(self.path(a), self.path(b))
        if diff:
            raise CommandFailed(f"after {what}: {b} differs from {a}: {diff}")

    def check_mode(self, vol: str, mode: str, what: str) -> None:
        if self.args.no_check:
            return
        status, _ = self.vs("status", vol)
        if status.get("mode") != mode:
            raise CommandFailed(
                f"after {what}: `volsync status {vol}` says mode "
                f"{status.get('mode')!r}, expected {mode!r}"
            )

    def check_preserved(self, vol: str, what: str) -> None:
        """DST's own snapshot after the common one must survive a resync as a preserved one."""
        if self.args.no_check:
            return
        listing, _ = self.vs("snapshots", vol, "--all")
        if not any(s.get("preserved") for s in need(listing, "snapshots", "snapshots")):
            raise CommandFailed(
                f"after {what}: `volsync snapshots {vol} --all` lists no "
                f"preserved snapshot: {json.dumps(listing)[:300]}"
            )

    def phase(self, title: str, body: Callable[[int], None], cleanup: tuple[str, ...]) -> None:
        for rep in range(self.args.repeat):
            self.progress(f"[{title} {rep + 1}/{self.args.repeat}]")
            try:
                body(rep)
            except CommandFailed as e:
                self.errors.append(f"{title}, repeat {rep + 1}: {e}")
                self.progress(f"FAILED: {e}")
            finally:
                self.rm(*cleanup)

    # -- the benchmarks -----------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        if not (a.skip_volumes and a.skip_mirror):
            t0 = time.perf_counter()
            info = gendata.generate(self.master, self.args.seed, self.args.scale)
            self.data_files, self.data_bytes = info["files"], info["bytes"]
            self.notes.append(f"generated the data set in {time.perf_counter() - t0:.1f} s")
        if not a.skip_sparse:
            os.makedirs(self.sparse)
            self.sparse_info = gendata.sparse_image(
                os.path.join(self.sparse, gendata.SPARSE_NAME), self.args.seed
            )
            os.utime(self.sparse, (gendata.MTIME, gendata.MTIME))
            self.samples["sp_data"].append(self.sparse_info["data"])
        if self.small_files and not a.skip_volumes:
            t0 = time.perf_counter()
            info = gendata.generate(self.small, self.args.seed, small_files=self.small_files)
            self.small_bytes = info["bytes"]
            self.notes.append(f"generated the small-file tree in {time.perf_counter() - t0:.1f} s")

    def volumes(self, rep: int) -> None:
        self.run(["cp", "-a", "data", "vol"], key="cp")
        self.run(["rsync", "-a", "data/", "vol/"], key="rsync_nochange")
        if not self.have_volsync:
            return
        out, t_init = self.vs("init", "vol", key="v_init")
        self.hash = out.get("hash", self.hash)
        _, t_snap = self.vs("snapshot", "vol", key="v_snap1")
        self.samples["v_first"].append(t_init + t_snap)
        self.vs("snapshot", "vol", key="v_snap_nochange")
        m = self.mutate("vol", SEED_INCR)
        self.samples["v_changed"].append(m.bytes_changed)
        self.vs("snapshot", "vol", key="v_snap_mutated")

    def small_tree(self, rep: int) -> None:
        self.run(["cp", "-a", "small", "svol"], key="s_cp")
        self.run(["rsync", "-a", "small/", "svol/"], key="s_rsync_nochange")
        if not self.have_volsync:
            return
        _, t_init = self.vs("init", "svol", key="s_init")
        _, t_snap = self.vs("snapshot", "svol", key="s_snap1")
        self.samples["s_first"].append(t_init + t_snap)
        self.vs("snapshot", "svol", key="s_snap_nochange")

    def rsync_mirror(self, rep: int) -> None:
        self.run(["rsync", "-a", "data/", "rdst/"], key="rsync_full")
        self.run(["cp", "-a", "data", "rsrc"])
        m = self.mutate("rsrc", SEED_INCR)
        self.samples["r_changed"].append(m.bytes_changed)
        done = self.run([*RSYNC_DELTA, "rsrc/", "rdst/"], key="rsync_delta")
        literal = re.search(r"Literal data: ([\d,.]+)", done.stdout)
        if literal:
            self.samples["rsync_literal"].append(int(re.sub(r"[,.]", "", literal.group(1))))
        self.check_same("rsrc", "rdst", "rsync delta")

    def restic_backup(self, rep: int) -> None:
        env = dict(
            os.environ,
            RESTIC_REPOSITORY=self.path("restic-repo"),
            RESTIC_PASSWORD="volsync-bench",
            RESTIC_CACHE_DIR=self.path("restic-cache"),
        )
        self.run([self.restic, "init"], env=env)
        self.run(["cp", "-a", "data", "rsrc"])
        self.run([self.restic, "backup", "--quiet", "rsrc"], key="restic_initial", env=env)
        self.mutate("rsrc", SEED_INCR)
        self.run([self.restic, "backup", "--quiet", "rsrc"], key="restic_incr", env=env)

    def volsync_mirror(self, rep: int) -> None:
        self.run(["cp", "-a", "data", "src"])
        out, _ = self.vs("init", "src", key="m_init")
        self.hash = out.get("hash", self.hash)
        self.vs("transfer", "src", "dst", key="m_full")
        self.check_same("src", "dst", "baseline transfer")
        self.check_mode("dst", "read-only", "baseline transfer")

        m = self.mutate("src", SEED_INCR)
        self.samples["m_changed"].append(m.bytes_changed)
        self.samples["m_changed_64k"].append(m.bytes_changed_64k_blocks)
        out, _ = self.vs("transfer", "src", "dst", key="m_incr")
        self.samples["m_incr_sent"].append(need(out, "bytes_sent", "transfer"))
        self.check_same("src", "dst", "incremental transfer")

        self.vs("break", "dst", key="m_break")
        self.mutate("dst", SEED_DST)
        self.vs("snapshot", "dst")  # the failed-over side writes and snapshots on its own
        m = self.mutate("src", SEED_SRC)  # left unsnapshotted: resync snapshots it first
        self.samples["m_resync_changed"].append(m.bytes_changed)
        out, _ = self.vs("resync", "src", "dst", key="m_resync")
        self.samples["m_resync_sent"].append(need(out, "bytes_sent", "resync"))
        self.check_same("src", "dst", "resync")
        self.check_mode("dst", "read-only", "resync")
        self.check_preserved("dst", "resync")

    def du_kib(self, name: str, live_only: bool = False) -> int:
        """`du -sk` of a work-dir path in KiB; live_only leaves out its top .volsync/."""
        argv = ["du", "-sk", *(["--exclude=" + gendata.METADATA_DIR] if live_only else []), name]
        return int(self.run(argv).stdout.split()[0])

    def sparse_mirror(self, rep: int) -> None:
        """S1-S3: one 1 GiB sparse image holding 4 MiB, baseline transfer vs rsync -aS / -a."""
        data = self.sparse_info["data"]
        self.run(["cp", "-a", "sparse", "spsrc"])  # cp keeps holes (--sparse=auto)
        subprocess.run(["sync"], check=True)
        src_du = self.du_kib("spsrc") * 1024
        if rep == 0:
            self.samples["sp_src_du"].append(src_du)
        if src_du > 2 * data:
            raise CommandFailed(
                f"`cp -a` of the sparse image uses {human(src_du)} on disk for {human(data)} of "
                "data: this filesystem (or cp) does not keep holes, the S rows mean nothing here"
            )
        self.run(["rsync", "-aS", "spsrc/", "sprsync/"], key="sp_rsync_S")
        self.run(["rsync", "-a", "spsrc/", "spplain/"], key="sp_rsync_plain")
        subprocess.run(["sync"], check=True)  # settle delayed allocation before counting
        self.samples["sp_rsync_S_du"].append(self.du_kib("sprsync") * 1024)
        self.samples["sp_rsync_plain_du"].append(self.du_kib("spplain") * 1024)
        self.rm("spplain")  # 1 GiB of written zeros: free it at once
        if not self.have_volsync:
            return
        out, _ = self.vs("init", "spsrc")  # untimed, as in M1; the transfer snapshots SRC
        self.hash = out.get("hash", self.hash)
        out, _ = self.vs("transfer", "spsrc", "spdst", key="sp_transfer")
        self.samples["sp_sent"].append(need(out, "bytes_sent", "transfer"))
        subprocess.run(["sync"], check=True)
        self.samples["sp_live_du"].append(self.du_kib("spdst", live_only=True) * 1024)
        self.samples["sp_all_du"].append(self.du_kib("spdst") * 1024)
        self.check_same("spsrc", "spdst", "sparse baseline transfer")
        self.check_mode("spdst", "read-only", "sparse baseline transfer")
        self.check_sparse("spdst", data, "sparse baseline transfer")

    def check_sparse(self, vol: str, data: int, what: str) -> None:
        """Fail unless the mirror's image kept its holes: allocated below half of its length
        and below twice the data (whether it meets ~1.1x is S2's target, not a check)."""
        if self.args.no_check:
            return
        path = os.path.join(self.path(vol), gendata.SPARSE_NAME)
        st = os.stat(path)
        allocated = st.st_blocks * 512
        if allocated >= min(st.st_size // 2, 2 * data):
            raise CommandFailed(
                f"after {what}: {vol}/{gendata.SPARSE_NAME} is not sparse: {allocated:,} bytes "
                f"allocated for {st.st_size:,} bytes holding {data:,} bytes of data"
            )

    def run_all(self) -> None:
        self.setup()
        if not self.have_volsync:
            self.errors.append(
                f"`{self.args.volsync}` is not on PATH: volsync rows not run "
                "(pip install -e . first, or pass --volsync)"
            )
        if not self.args.skip_volumes:
            self.phase("volumes", self.volumes, ("vol",))
            if self.small_files:
                self.phase("small files", self.small_tree, ("svol",))
        self.rm("small")  # free its space before the mirror phase, the one with the peak
        if not self.args.skip_mirror:
            self.phase("rsync mirror", self.rsync_mirror, ("rsrc", "rdst"))
            if self.restic:
                self.phase("restic", self.restic_backup, ("rsrc", "restic-repo", "restic-cache"))
            if self.have_volsync:
                self.phase("volsync mirror", self.volsync_mirror, ("src", "dst"))
        self.rm("data")  # not needed any more: keep the sparse phase's peak low
        if not self.args.skip_sparse:
            self.phase(
                "sparse image",
                self.sparse_mirror,
                ("spsrc", "spdst", "sprsync", "spplain"),
            )

    # -- the report ---------------------------------------------------------------------

    def med(self, key: str) -> float | None:
        values = self.samples.get(key)
        return statistics.median(values) if values else None

    def rows(self) -> list[list[str]]:
        a = self.args
        full = a.scale == 1.0
        not_judged = f"not judged at --scale {a.scale:g}"

        def fmt(text, value, speed):
            return text(value, speed) if text is seconds else text(value)

        size = f"{human(self.data_bytes)} ({self.data_files:,} files)"
        rows: list[list[str]] = []

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
            """One table row; ok(v, ratio) decides PASS/MISS, judged=False says why not."""
            v, c = self.med(v_key), self.med(c_key) if c_key else None
            ratio = v / c if v is not None and c else None
            if v is None:
                result = "ERROR" if self.have_volsync else "not run"
            elif ok is None:
                result = ""
            elif judged is not True:
                result = judged or not_judged
            elif c_key and ratio is None:
                result = "no comparison"
            else:
                result = "PASS" if ok(v, ratio) else "MISS"
            rows.append(
                [
                    ident,
                    what,
                    fmt(v_text, v, speed),
                    f"{c_label}: {fmt(c_text, c, speed)}" if c_label else "—",
                    f"{ratio:.2f}×" if ratio is not None else "—",
                    target,
                    result,
                ]
            )

        def skipped(ident, what, why):
            rows.append([ident, what, f"skipped: {why}", "—", "—", "", ""])

        speed = self.data_bytes
        if a.skip_volumes:
            skipped("V1–V5", "volume benchmarks", "--skip-volumes")
        else:
            row(
                "V1",
                f"`init` + first `snapshot` ({self.hash or 'default hash'}), {size}",
                "v_first",
                "`cp -a`",
                "cp",
                "< 3 s",
                lambda v, r: v < 3.0,
                speed,
                judged=full,
            )
            row("V1a", "  of which `init`", "v_init", None, None)
            row("V1b", "  of which first `snapshot`", "v_snap1", None, None, speed=speed)
            row(
                "V2",
                "no-change `snapshot`",
                "v_snap_nochange",
                "no-change `rsync -a`",
                "rsync_nochange",
                "< 0.3 s",
                lambda v, r: v < 0.3,
                judged=full,
            )
            row(
                "V3",
                f"`snapshot` after mutate ({human(self.med('v_changed'))} changed)",
                "v_snap_mutated",
                None,
                None,
            )
        if not self.small_files:
            skipped("V4–V5", "small-file tree", "--skip-small-files")
        elif not a.skip_volumes:
            small = f"{self.small_files:,} small files ({human(self.small_bytes)})"
            row("V4", f"`init` + first `snapshot`, {small}", "s_first", "`cp -a`", "s_cp")
            row(
                "V5",
                f"no-change `snapshot`, {small}",
                "s_snap_nochange",
                "no-change `rsync -a`",
                "s_rsync_nochange",
                "< 3 s",
                lambda v, r: v < 3.0,
                judged=self.small_files == SMALL_FILES_FULL
                or f"not judged at {self.small_files:,} files",
            )
        if a.skip_mirror:
            skipped("M1–M7", "mirror benchmarks", "--skip-mirror")
        else:
            self.mirror_rows(row, skipped, size, speed)
        if a.skip_sparse:
            skipped("S1–S3", "sparse image", "--skip-sparse")
        else:
            self.sparse_rows(row)
        return rows

    def sparse_rows(self, row) -> None:
        info = self.sparse_info
        data, ideal = info["data"], info["data_64k_blocks"]
        image = (
            f"{human(info['size'])} sparse image, {human(data)} of data in "
            f"{len(info['extents'])} extents"
        )
        row(
            "S1",
            f"baseline `transfer SRC DST` (incl. first snapshot), {image}",
            "sp_transfer",
            "`rsync -aS` into empty dir",
            "sp_rsync_S",
            "≤ 1× rsync -aS",
            lambda v, r: r <= 1.0,
        )
        row(
            "S1a",
            "  `transfer` bytes_sent",
            "sp_sent",
            "data",
            "sp_data",
            v_text=human,
            c_text=lambda c: f"{human(c)} (in whole 64 KiB blocks: {human(ideal)})",
        )
        plain = human(self.med("sp_rsync_plain_du"))
        rsync_s = human(self.med("sp_rsync_S_du"))
        src = human(self.med("sp_src_du"))
        row(
            "S2",
            "  mirror's live tree on disk (`du -sk`, without .volsync/)",
            "sp_live_du",
            "data",
            "sp_data",
            "≤ 1.1× data",
            lambda v, r: r <= 1.1,
            v_text=human,
            c_text=lambda c: (
                f"{human(c)} (in whole 64 KiB blocks: {human(ideal)}; `rsync -aS` copy: "
                f"{rsync_s}; `rsync -a` copy: {plain}; SRC (`cp -a`): {src})"
            ),
        )
        row(
            "S3",
            "  whole mirror directory on disk (`du -sk`, with .volsync/)",
            "sp_all_du",
            "data",
            "sp_data",
            v_text=human,
            c_text=human,
        )

    def mirror_rows(self, row, skipped, size, speed) -> None:
        row(
            "M1",
            f"baseline `transfer SRC DST` (incl. first snapshot), {size}",
            "m_full",
            "`rsync -a` into empty dir",
            "rsync_full",
            "≤ 1× rsync",
            lambda v, r: r <= 1.0,
            speed,
        )
        row(
            "M2",
            f"incremental `transfer` after mutate ({human(self.med('m_changed'))} changed)",
            "m_incr",
            "`rsync -a --delete --no-whole-file --inplace`",
            "rsync_delta",
            "≤ 0.5× rsync",
            lambda v, r: r <= 0.5,
        )
        blocks, literal = human(self.med("m_changed_64k")), human(self.med("rsync_literal"))
        row(
            "M3",
            "incremental `transfer` bytes_sent",
            "m_incr_sent",
            "bytes changed",
            "m_changed",
            "≤ 1.5× changed",
            lambda v, r: r <= 1.5,
            v_text=human,
            c_text=lambda c: (
                f"{human(c)} (in whole 64 KiB blocks: {blocks}; rsync literal data: {literal})"
            ),
        )
        row(
            "M4",
            "`resync SRC DST` after `break DST`, both sides mutated",
            "m_resync",
            "baseline `transfer`",
            "m_full",
            "≤ 0.1× baseline",
            lambda v, r: r <= 0.1,
        )
        row(
            "M4a",
            "  `resync` bytes_sent",
            "m_resync_sent",
            "SRC bytes changed",
            "m_resync_changed",
            v_text=human,
            c_text=human,
        )
        row("M5", "`break DST`", "m_break", None, None)
        if self.restic:
            row(
                "M6",
                "baseline `transfer` vs `restic backup` (initial)",
                "m_full",
                "`restic backup`",
                "restic_initial",
                speed=speed,
            )
            row(
                "M7",
                "incremental `transfer` vs `restic backup` (incremental)",
                "m_incr",
                "`restic backup`",
                "restic_incr",
            )
        else:
            skipped("M6–M7", "restic backup initial / incremental", "`restic` not on PATH")

    def table(self) -> list[str]:
        header = [
            "#",
            "benchmark",
            "volsync (median)",
            "compared with (median)",
            "ratio",
            "target",
            "result",
        ]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(r) + " |" for r in self.rows()]

    def report(self, argv: list[str], started: str, elapsed: float) -> str:
        a = self.args
        out = ["# volsync benchmark", ""]
        out.append(f"- command: `{shlex.join(['python', sys.argv[0], *argv])}`")
        out.append(
            f"- started {started}, took {elapsed:.0f} s; medians of {a.repeat} "
            f"repeat(s); work dir {self.work}"
        )
        out += [f"- {fact}" for fact in self.facts]
        out.append(f"- volsync: {self.volsync_version()}")
        out.append(
            f"- rsync: {first_line(['rsync', '--version'])}; "
            f"cp: {first_line(['cp', '--version'])}; "
            f"restic: {first_line([self.restic, 'version']) if self.restic else 'not on PATH (skipped)'}"
        )
        data = (
            f"{self.data_files:,} files, {human(self.data_bytes)} (of which `disk.img` "
            f"{human(round(gendata.IMAGE_SIZE * a.scale) // 4096 * 4096)})"
            if self.data_files
            else "data set not generated (--skip-volumes and --skip-mirror)"
        )
        if self.small_files and not a.skip_volumes:
            data += f"; small-file tree {self.small_files:,} files, {human(self.small_bytes)}"
        if self.sparse_info:
            extents = ", ".join(f"{human(n)} at {off:,}" for off, n in self.sparse_info["extents"])
            data += (
                f"; sparse image (not scaled) {human(self.sparse_info['size'])} holding "
                f"{human(self.sparse_info['data'])}: {extents}"
            )
        out.append(f"- data (seed {a.seed}, scale {a.scale:g}): {data}")
        if self.hash:
            out.append(f"- volumes made by `volsync init` name blocks with {self.hash}")
        out.append(
            "- every tool reads the same generated bytes (copied with `cp -a`); the page "
            "cache is warm for all tools alike (nothing is dropped); times "
            + ("include" if a.include_sync else "exclude")
            + " a `sync` after each command"
        )
        out += [f"- {note}" for note in self.notes]
        out += ["", *self.table(), ""]
        if a.repeat > 1 or a.raw:
            out += ["<details><summary>all samples</summary>", "", "```"]
            out += [
                f"{k}: {', '.join(f'{v:,}' if isinstance(v, int) else f'{v:.4f}' for v in vs)}"
                for k, vs in sorted(self.samples.items())
            ]
            out += ["```", "</details>", ""]
        if self.errors:
            out += ["## Errors", ""]
            for e in self.errors:
                out += ["```", e, "```"]
        return "\n".join(out) + "\n"

    def volsync_version(self) -> str:
        if not self.have_volsync:
            return f"`{self.args.volsync}` not on PATH"
        version = first_line([*self.volsync, "--version"]) or "(no --version)"
        top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = first_line(["git", "-C", top, "rev-parse", "--short", "HEAD"])
        dirty = first_line(["git", "-C", top, "status", "--porcelain", "--", "src"])
        return f"{version}, checkout {commit or '(no commit)'}" + (
            " with uncommitted changes in src/" if dirty else ""
        )


def compare_trees(a: str, b: str) -> str | None:
    """None if the trees (without ROOT/.volsync) hold the same paths and bytes, else why not."""
    la, lb = gendata.list_files(a), gendata.list_files(b)
    if la != lb:
        only_a = sorted(set(la) - set(lb))[:3]
        only_b = sorted(set(lb) - set(la))[:3]
        return f"paths/sizes differ: only in first {only_a}, only in second {only_b}"
    for rel, _ in la:
        with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
            while True:
                ca, cb = fa.read(MIB), fb.read(MIB)
                if ca != cb:
                    return f"content of {rel} differs"
                if not ca:
                    break
    return None


def seconds(value: float | None, nbytes: int | None = None) -> str:
    if value is None:
        return "—"
    text = f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if nbytes and value > 0:
        text += f" ({nbytes / MIB / value:,.0f} MiB/s)"
    return text


def human(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def first_line(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (p.stdout.strip().splitlines() or [""])[0] if p.returncode == 0 else ""


def machine_facts(path: str) -> list[str]:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
        mem = f", {kib / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    fs = "unknown"
    df = subprocess.run(["df", "-T", path], check=False, capture_output=True, text=True)
    if df.returncode == 0 and len(df.stdout.splitlines()) > 1:
        fields = df.stdout.splitlines()[1].split()
        fs = f"{fields[1]} ({fields[0]}, {int(fields[4]) // 1024 // 1024} GiB free)"
    machine = (
        f"machine: {os.cpu_count()} CPUs (nproc {first_line(['nproc'])}), {cpu}{mem}, "
        f"{platform.system()} {platform.release()}"
    )
    python = (
        f"python {platform.python_version()} ({sys.executable}); filesystem of the work "
        f"dir (`df -T`): {fs}"
    )
    return [machine, python]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--remote" in argv:  # the remote rows have their own script and options
        import remote

        rest = [a for a in argv if a != "--remote"]
        return remote.main(rest, invoked=[sys.argv[0], "--remote"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--remote",
        action="store_true",
        help="run only the remote rows (R0-R5: over ssh to a test sshd on 127.0.0.1) with "
        "bench/remote.py and its options (--size, --repeat, ...; see remote.py --help)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="data set size: 1.0 = 512 MiB of files + 512 MiB disk.img (also scales "
        "the small-file tree: 100,000 × scale files)",
    )
    p.add_argument("--repeat", type=int, default=3, help="repeats; the table shows medians")
    p.add_argument("--seed", type=int, default=1, help="data set seed (mutations derive from it)")
    p.add_argument("--out", help="also write the markdown report to this file")
    p.add_argument(
        "--small-files",
        type=int,
        metavar="N",
        help="files in the small-file tree (default 100,000 × scale)",
    )
    p.add_argument("--skip-small-files", action="store_true", help="skip the small-file tree")
    p.add_argument("--skip-volumes", action="store_true", help="skip the volume benchmarks")
    p.add_argument("--skip-mirror", action="store_true", help="skip the mirror benchmarks")
    p.add_argument("--skip-sparse", action="store_true", help="skip the sparse-image rows (S1-S3)")
    p.add_argument(
        "--volsync",
        default="volsync",
        help="the volsync command, split like a shell would (default: volsync)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the untimed checks that DST's live tree equals SRC's after each transfer/resync",
    )
    p.add_argument(
        "--include-sync",
        action="store_true",
        help="run `sync` after every command, inside its timing",
    )
    p.add_argument("--tmp", default="/tmp", help="where the work dir volsync-bench-* is made")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--raw", action="store_true", help="list every sample even with --repeat 1")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    if args.scale <= 0 or args.repeat < 1:
        p.error("--scale must be positive and --repeat at least 1")

    work = tempfile.mkdtemp(prefix="volsync-bench-", dir=args.tmp)
    bench = Bench(args, work)
    # peak: the source data + two volumes (live tree + block store each), + the small tree;
    # the sparse phase runs after the data set is gone: its peak is `rsync -a`'s 1 GiB of zeros
    need = max(
        5.2 * GIB * args.scale + bench.small_files * 4096 * 1.2,
        0 if args.skip_sparse else gendata.SPARSE_SIZE * 1.1,
    )
    free = shutil.disk_usage(work).free
    if free < need:
        bench.notes.append(f"WARNING: {human(free)} free in {work}, the run may need {human(need)}")
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    try:
        bench.run_all()
    except KeyboardInterrupt:
        bench.errors.append("interrupted")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = bench.report(argv, started, time.perf_counter() - t0)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
