#!/usr/bin/env python3
"""volsync scale benchmark: many files, many blocks, many snapshots, and space on disk.

    python bench/scale.py                                   # default: a few minutes
    python bench/scale.py --files 10000,100000 --blocks 256K --snapshots 200
    python bench/scale.py --files 1M --skip-blocks --skip-snapshots      # 1M files only
    python bench/scale.py --blocks 1M,4M --block-size 4K    # 4 and 16 GiB (stand for 64/256 GiB)
    python bench/scale.py --snapshots 1000 --skip-files --skip-blocks

Prints a markdown report: machine facts, the exact command line, one table of times and peak
RSS (volsync beside rsync, `cp -a` or `cat` where they have a counterpart), one table of
space on disk per GiB of live data. Every timed command is one subprocess, timed with
time.perf_counter after an untimed `sync`; its peak RSS is the ru_maxrss that os.wait4
returns for it (its own and its waited-for children's maximum). Warm page cache (nothing is
dropped: that needs root). Children run with RLIMIT_NOFILE lowered to --nofile (default 1024,
the usual `ulimit -n`). See bench/README.md. Stdlib only.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gendata
from run import compare_trees, first_line, human, machine_facts

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
BLOCK_FILE = 1 * GIB  # the many-blocks volume: files of up to 1 GiB (img-000.bin, ...)
SNAP_BASE_FILES = 100  # the many-snapshots volume: 100 small files, one rewritten per snapshot
CHANGE_SEED = 9_999  # the one changed file's new bytes


# Runs one command and writes "SECONDS MAXRSS_KIB ANON_KIB" to the file argv[1]. A child's
# ru_maxrss starts at the resident size of the process that forked it (Linux counts the forked
# copy of the parent's memory at exec), so the bench, whose own RSS grows to tens of MiB, does
# not fork the measured command itself: this small launcher (python -I -S, ~7 MiB) forks it,
# times it from fork to exit and takes its ru_maxrss from os.wait4 (the command's and its
# waited-for children's peak). ru_maxrss also counts pages of files the command mmaps (volsync
# maps its pack files): page cache, not memory of its own. So a thread also samples, every
# 20 ms, RssAnon (private memory) of the command and its descendants from /proc and keeps the
# largest sum. The launcher's own start-up is not in the time.
LAUNCHER = """
import os, sys, threading, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as e:
        os.write(2, f"{sys.argv[2]}: {e}\\n".encode())
        os._exit(127)
peak = [0]
done = threading.Event()

def tree(p):
    out = [p]
    try:
        for tid in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{tid}/children") as f:
                for c in f.read().split():
                    out += tree(int(c))
    except (OSError, ValueError):
        pass
    return out

def anon(p):
    try:
        with open(f"/proc/{p}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0

def sample():
    while not done.wait(0.02):
        peak[0] = max(peak[0], sum(anon(p) for p in tree(pid)))

threading.Thread(target=sample, daemon=True).start()
_, status, ru = os.wait4(pid, 0)
seconds = time.perf_counter() - t0
done.set()
with open(sys.argv[1], "w") as f:
    f.write(f"{seconds!r} {ru.ru_maxrss} {peak[0]}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


class CommandFailed(Exception):
    """A command exited non-zero or printed no JSON object where one was due."""


@dataclass
class Sample:
    argv: list[str]
    seconds: float
    rss_kib: int  # ru_maxrss
    anon_kib: int  # the largest sampled RssAnon (0: the command ended before a sample)
    stdout: str


@dataclass
class Row:
    ident: str
    what: str
    v: Sample | None = None  # the volsync command
    c_label: str = ""  # its counterpart, if any
    c: Sample | None = None
    v_bytes: int | None = None  # bytes for a GB/s figure beside volsync's time
    c_bytes: int | None = None
    result: str = ""  # a failure, or a note


@dataclass
class Space:
    what: str
    live: int  # apparent bytes of the live tree
    live_du: int  # du of the live tree alone
    vol_du: int  # du of the volume directory
    meta_du: int  # du of .volsync/


@dataclass
class Bench:
    args: argparse.Namespace
    work: str
    rows: list[Row] = field(default_factory=list)
    space: list[Space] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.volsync = shlex.split(self.args.volsync)
        self.floor = 0  # the peak RSS that `true` measures: the launcher's floor
        self.load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())

    # -- running commands ---------------------------------------------------------------

    def run(self, argv: list[str], timed: bool = True, cwd: str | None = None) -> Sample:
        """Run argv through the launcher (stdout to a file): its wall time and peak RSS;
        CommandFailed if it exits non-zero."""
        if timed:
            subprocess.run(["sync"], check=False)
        with (
            tempfile.TemporaryFile() as out,
            tempfile.TemporaryFile() as err,
            tempfile.NamedTemporaryFile("r") as res,
        ):
            launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, res.name]
            p = subprocess.run(
                [*launcher, *argv], stdout=out, stderr=err, cwd=cwd or self.work, check=False
            )
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
            measured = res.read().split()
        if p.returncode != 0 or len(measured) != 3:
            raise CommandFailed(
                f"`{shlex.join(argv)}` exited {p.returncode}:\n"
                f"{tail(stderr) or tail(stdout) or '(no output)'}"
            )
        seconds, rss_kib, anon_kib = float(measured[0]), int(measured[1]), int(measured[2])
        if timed:
            self.progress(
                f"{seconds:8.3f} s {rss_kib / 1024:7.1f} MiB (anon {anon_kib / 1024:6.1f})  "
                f"{shlex.join(argv)}"
            )
        return Sample(argv, seconds, rss_kib, anon_kib, stdout)

    def vs(self, *argv: str, timed: bool = True) -> tuple[dict, Sample]:
        """`volsync ARGV --json`: its JSON object and the sample."""
        s = self.run([*self.volsync, *argv, "--json"], timed=timed)
        try:
            obj = json.loads(s.stdout)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise CommandFailed(f"`{shlex.join(s.argv)}` printed no JSON object: {tail(s.stdout)}")
        return obj, s

    def progress(self, text: str) -> None:
        if not self.args.quiet:
            print(f"  {text}", file=sys.stderr, flush=True)

    def fail(self, row: Row, e: Exception) -> None:
        first = str(e).splitlines()
        row.result = "FAILED: " + (first[-1] if first else "?")[:200]
        self.errors.append(f"{row.ident} {row.what}: {e}")
        self.progress(f"FAILED: {e}")
        self.rows.append(row)

    def check_same(self, a: str, b: str, what: str) -> None:
        if self.args.no_check:
            return
        diff = compare_trees(a, b)
        if diff:
            raise CommandFailed(f"after {what}: {b} differs from {a}: {diff}")

    def du(self, path: str, live_only: bool = False) -> int:
        argv = ["du", "-sk", *(["--exclude=./.volsync"] if live_only else []), "."]
        return int(self.run(argv, timed=False, cwd=path).stdout.split()[0]) * KIB

    def record_space(self, what: str, vol: str) -> None:
        subprocess.run(["sync"], check=False)  # settle delayed allocation before counting
        live = sum(size for _, size in gendata.list_files(vol))
        meta = os.path.join(vol, gendata.METADATA_DIR)
        self.space.append(
            Space(what, live, self.du(vol, live_only=True), self.du(vol), self.du(meta))
        )

    def drop(self, path: str) -> None:
        if not self.args.keep:  # rm, not shutil.rmtree: as fast or faster on big trees
            subprocess.run(["rm", "-rf", "--", path], check=False)

    # -- many files ---------------------------------------------------------------------

    def files(self, n: int) -> None:
        base = os.path.join(self.work, f"files-{n}")
        data, src, dst, rdst = (os.path.join(base, x) for x in ("data", "src", "dst", "rdst"))
        t0 = time.perf_counter()
        info = gendata.generate(data, self.args.seed, small_files=n)
        self.notes.append(
            f"{n:,} small files: {human(info['bytes'])}, generated in "
            f"{time.perf_counter() - t0:.0f} s"
        )
        tag = f"{n:,} files"
        step = Row("F1", f"first `snapshot`, {tag} (`init` untimed)")
        try:
            step.c_label, step.c = "`cp -a` of the tree", self.run(["cp", "-a", data, src])
            self.vs("init", src, timed=False)
            _, step.v = self.vs("snapshot", src)
            self.rows.append(step)

            step = Row("F2", f"baseline `transfer` to a new local mirror, {tag}")
            step.c_label = "`rsync -a` into empty dir"
            step.c = self.run(["rsync", "-a", data + "/", rdst + "/"])
            _, step.v = self.vs("transfer", src, dst)
            self.check_same(src, dst, "baseline transfer")
            self.rows.append(step)

            step = Row("F3", f"no-change `transfer`, {tag}", c_label="no-change `rsync -a`")
            step.c = self.run(["rsync", "-a", data + "/", rdst + "/"])
            _, step.v = self.vs("transfer", src, dst)
            self.rows.append(step)

            step = Row("F4", f"no-change `status`, {tag}")
            _, step.v = self.vs("status", src)
            self.rows.append(step)

            step = Row("F5", f"`transfer` after 1 changed file, {tag}")
            step.c_label = "`rsync -a` after the same change"
            rel = gendata.list_files(data)[n // 2][0]
            for root in (data, src):  # the same new bytes, same size, mtime now
                size = os.path.getsize(os.path.join(root, rel))
                rng = gendata.content_rng(CHANGE_SEED, rel)
                gendata.write_random(os.path.join(root, rel), rng, size, 0)
            step.c = self.run(["rsync", "-a", data + "/", rdst + "/"])
            out, step.v = self.vs("transfer", src, dst)
            step.result = f"bytes_sent {human(out.get('bytes_sent'))}"
            self.check_same(src, dst, "transfer after 1 change")
            self.check_same(data, rdst, "rsync after 1 change")
            self.rows.append(step)

            step = Row("F6", f"`verify` of the mirror, {tag}")
            out, step.v = self.vs("verify", dst)
            if not out.get("ok"):
                raise CommandFailed(f"verify says not ok: {json.dumps(out)[:300]}")
            self.rows.append(step)
            self.record_space(f"{tag}: source volume", src)
            self.record_space(f"{tag}: mirror", dst)
        except CommandFailed as e:
            self.fail(step, e)
        finally:
            self.drop(base)

    # -- many blocks --------------------------------------------------------------------

    def blocks(self, n: int) -> None:
        bs = self.args.block_size
        total = n * bs
        base = os.path.join(self.work, f"blocks-{n}")
        src, dst, rdst = (os.path.join(base, x) for x in ("src", "dst", "rdst"))
        os.makedirs(src)
        t0 = time.perf_counter()
        left, i = total, 0
        while left:
            size = min(left, BLOCK_FILE)
            name = f"img-{i:03d}.bin"
            path = os.path.join(src, name)
            gendata.write_random(path, gendata.content_rng(self.args.seed, name), size)
            os.utime(path, (gendata.MTIME, gendata.MTIME))
            left -= size
            i += 1
        self.notes.append(
            f"{n:,} blocks of {human(bs)}: {i} file(s), {human(total)} of random bytes, "
            f"generated in {time.perf_counter() - t0:.0f} s"
        )
        tag = f"{n:,} blocks of {human(bs)} ({human(total)})"
        # rsync reads the volume's live tree, never its .volsync/ (which does not exist yet:
        # the rsync rows run first, and its copy is removed before volsync writes its mirror)
        rsync = ["rsync", "-a", "--exclude=/.volsync/", src + "/", rdst + "/"]
        step = Row("B0", f"`rsync -a` into empty dir, {tag} (for B3)")
        try:
            rs_full = self.run(rsync)
            rs_none = self.run(rsync)
            shutil.rmtree(rdst, ignore_errors=True)  # even with --keep: its disk is needed

            step = Row("B1", f"first `snapshot` (`init --block-size {bs}` untimed), {tag}")
            step.v_bytes = total
            self.vs("init", src, "--block-size", str(bs), timed=False)
            _, step.v = self.vs("snapshot", src)
            self.rows.append(step)

            step = Row("B2", f"baseline `transfer` to a new local mirror, {tag}", v_bytes=total)
            step.c_label, step.c, step.c_bytes = "`rsync -a` into empty dir", rs_full, total
            _, step.v = self.vs("transfer", src, dst)
            self.check_same(src, dst, "baseline transfer")
            self.rows.append(step)

            step = Row("B3", f"no-change `transfer`, {tag}", c_label="no-change `rsync -a`")
            step.c = rs_none
            _, step.v = self.vs("transfer", src, dst)
            self.rows.append(step)

            step = Row("B4", f"no-change `status`, {tag}")
            _, step.v = self.vs("status", src)
            self.rows.append(step)

            packs = sorted(glob.glob(os.path.join(dst, gendata.METADATA_DIR, "packs", "*.pack")))
            pack_bytes = sum(os.path.getsize(p) for p in packs)
            step = Row("B5", f"`verify` of the mirror, {tag}", v_bytes=total)
            step.c_label = f"`cat` of its {len(packs)} pack file(s) ({human(pack_bytes)})"
            step.c_bytes = pack_bytes
            cat = ["sh", "-c", "cat .volsync/packs/*.pack >/dev/null"]  # short progress line
            step.c = self.run(cat, cwd=dst)
            out, step.v = self.vs("verify", dst)
            if not out.get("ok"):
                raise CommandFailed(f"verify says not ok: {json.dumps(out)[:300]}")
            step.result = f"blocks_checked {out.get('blocks_checked', '?'):,}"
            self.rows.append(step)
            self.record_space(f"{tag}: source volume", src)
            self.record_space(f"{tag}: mirror", dst)
        except CommandFailed as e:
            self.fail(step, e)
        finally:
            self.drop(base)

    # -- many snapshots -----------------------------------------------------------------

    def snapshots(self, n: int) -> None:
        base = os.path.join(self.work, f"snapshots-{n}")
        src, dst = os.path.join(base, "src"), os.path.join(base, "dst")
        gendata.generate(src, self.args.seed, small_files=SNAP_BASE_FILES)
        listing = gendata.list_files(src)
        tag = f"{n:,} snapshots"
        step = Row(
            "N1", f"{tag}: sum of N `snapshot`s, each after 1 small file of {len(listing)} changed"
        )
        times, rss, anon, made = [], 0, 0, 0
        try:
            self.vs("init", src, timed=False)
            for k in range(n):
                rel, size = listing[k % len(listing)]
                path = os.path.join(src, rel)
                gendata.write_random(path, gendata.content_rng(k, rel), size, 0)
                _, s = self.vs("snapshot", src, timed=False)
                times.append(s.seconds)
                rss, anon = max(rss, s.rss_kib), max(anon, s.anon_kib)
                made += 1
                if k == 0 or (k + 1) % max(1, n // 10) == 0:
                    self.progress(f"snapshot {k + 1}/{n}: {s.seconds:.3f} s")
            step.v = Sample(["volsync", "snapshot"], sum(times), rss, anon, "")
            last = times[-10:]
            mean = sum(last) / len(last)
            step.result = f"each: first {times[0]:.3f} s, mean of last {len(last)} {mean:.3f} s"
            self.rows.append(step)
        except CommandFailed as e:
            self.fail(step, e)
            step.result = f"after {made} snapshot(s): " + step.result
        try:  # whether or not N1 made them all, and before N4 may fail
            self.record_space(f"{tag}: source volume before prune", src)
        except (CommandFailed, OSError) as e:
            self.errors.append(f"space of {src}: {e}")
        for ident, what, argv in (
            ("N2", f"`snapshots` (list), {tag}", ("snapshots", src)),
            ("N3", f"`verify`, {tag}", ("verify", src)),
            ("N4", f"baseline `transfer` to a new mirror, {tag}", ("transfer", src, dst)),
            ("N5", f"`prune --keep-last 10`, {tag}", ("prune", src, "--keep-last", "10")),
        ):
            step = Row(ident, what)
            try:
                out, step.v = self.vs(*argv)
                if ident == "N2":
                    step.result = f"{len(out.get('snapshots', []))} listed"
                elif ident == "N3" and not out.get("ok"):
                    raise CommandFailed(f"verify says not ok: {json.dumps(out)[:300]}")
                elif ident == "N4":
                    self.check_same(src, dst, "baseline transfer")
                self.rows.append(step)
            except CommandFailed as e:
                self.fail(step, e)
        try:
            self.record_space(f"{tag}: source volume after prune", src)
        except (CommandFailed, OSError) as e:
            self.errors.append(f"space of {src}: {e}")
        self.drop(base)

    # -- the report ---------------------------------------------------------------------

    def table(self) -> list[str]:
        head = [
            "#",
            "what",
            "volsync",
            "volsync peak RSS (anon)",
            "compared with",
            "its time",
            "its peak RSS (anon)",
            "ratio volsync/it",
            "notes",
        ]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            ratio = "—"
            if r.v and r.c and r.c.seconds > 0:
                ratio = f"{r.v.seconds / r.c.seconds:.2f}×"
            cells = [
                r.ident,
                r.what,
                timing(r.v, r.v_bytes),
                mib(r.v),
                r.c_label or "—",
                timing(r.c, r.c_bytes) if r.c else "—",
                mib(r.c),
                ratio,
                r.result,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    def space_table(self) -> list[str]:
        head = [
            "volume",
            "live data",
            "live tree on disk",
            "volume dir on disk",
            "of which .volsync/",
            "volume dir per GiB live",
            ".volsync/ per GiB live",
        ]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in self.space:
            per = GIB / s.live if s.live else 0.0
            cells = [
                s.what,
                human(s.live),
                human(s.live_du),
                human(s.vol_du),
                human(s.meta_du),
                human(s.vol_du * per) if s.live else "—",
                human(s.meta_du * per) if s.live else "—",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    def report(self, argv: list[str], started: str, elapsed: float, facts: list[str]) -> str:
        a = self.args
        fs = first_line(["stat", "-f", "-c", "%T", a.tmp]) or "unknown"
        out = ["# volsync scale benchmark", ""]
        out.append(f"- command: `{shlex.join(['python', sys.argv[0], *argv])}`")
        out.append(f"- started {started}, took {elapsed:.0f} s; work dir {self.work}")
        out += [f"- {fact}" for fact in facts]
        out.append(f"- filesystem of the work dir (`stat -f -c %T`): {fs}")
        out.append(f"- volsync: {volsync_version(self.volsync)}")
        out.append(f"- rsync: {first_line(['rsync', '--version'])}")
        out.append(
            "- one run of each command (no repeats); warm page cache (nothing dropped); an "
            "untimed `sync` before each timed command; peak RSS is the command's ru_maxrss "
            f"(os.wait4 in a small launcher), in MiB: `true` measures {self.floor / 1024:.1f} "
            "MiB, the floor of every figure; it counts the pages of mmapped files (volsync's "
            "packs) the command touched; (anon) is the largest RssAnon, private memory, of "
            "the command and its descendants, sampled every 20 ms from /proc (— when it ended "
            "before the first sample); children run with RLIMIT_NOFILE "
            + (f"{a.nofile} (`ulimit -n {a.nofile}`)" if a.nofile else "unchanged")
        )
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        out.append(
            f"- load average (1, 5, 15 min) at the start: {self.load_start}; at the end: {load} "
            f"({os.cpu_count()} CPUs): other work on the machine slows every row"
        )
        out += [f"- {note}" for note in self.notes]
        out += ["", *self.table(), ""]
        if self.space:
            out += [f"Space on disk ({fs}; `du -sk` after `sync`):", "", *self.space_table(), ""]
        if self.errors:
            out += ["## Errors", ""]
            for e in self.errors:
                out += ["```", e, "```"]
        return "\n".join(out) + "\n"


def timing(s: Sample | None, nbytes: int | None = None) -> str:
    if s is None:
        return "—"
    text = f"{s.seconds:.3f} s" if s.seconds < 10 else f"{s.seconds:.1f} s"
    if nbytes and s.seconds > 0:
        text += f" ({nbytes / 1e9 / s.seconds:.2f} GB/s)"
    return text


def mib(s: Sample | None) -> str:
    if s is None:
        return "—"
    anon = f"{s.anon_kib / 1024:.0f}" if s.anon_kib else "—"
    return f"{s.rss_kib / 1024:.0f} MiB ({anon})"


def tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def volsync_version(volsync: list[str]) -> str:
    version = first_line([*volsync, "--version"]) or f"`{shlex.join(volsync)}` did not run"
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = first_line(["git", "-C", top, "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", top, "status", "--porcelain", "--", "src"])
    return f"{version}, checkout {commit or '(no commit)'}" + (
        " with uncommitted changes in src/" if dirty else ""
    )


def counts(text: str, binary: bool) -> list[int]:
    """'10000,100k,1M' -> ints; K/M/G are 1024-based when binary, else 1000-based."""
    step = 1024 if binary else 1000
    units = {"K": step, "M": step**2, "G": step**3}
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        if not part:
            continue
        mult = units.get(part[-1], 1)
        n = int(float(part[:-1] if mult > 1 else part) * mult)
        if n < 1:
            raise argparse.ArgumentTypeError(f"not a positive count: {part}")
        out.append(n)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--files",
        default="10k,100k",
        help="small-file tree sizes, comma-separated, k/M = 1000-based (default 10k,100k; "
        "1M only when asked)",
    )
    p.add_argument(
        "--blocks",
        default="256K",
        help="many-blocks volume sizes in blocks, K/M = 1024-based (default 256K: 1 GiB at 4K; "
        "1M,4M = 4 and 16 GiB)",
    )
    p.add_argument(
        "--block-size",
        default="4K",
        help="block size of the many-blocks volume (`init --block-size`; default 4K)",
    )
    p.add_argument(
        "--snapshots", type=int, default=200, help="snapshots of the many-snapshots volume"
    )
    p.add_argument("--skip-files", action="store_true")
    p.add_argument("--skip-blocks", action="store_true")
    p.add_argument("--skip-snapshots", action="store_true")
    p.add_argument(
        "--nofile",
        type=int,
        default=1024,
        help="RLIMIT_NOFILE (soft) of every child, as `ulimit -n` (default 1024; 0: unchanged)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--volsync", default="volsync", help="the volsync command (default: volsync)")
    p.add_argument("--no-check", action="store_true", help="skip the untimed tree comparisons")
    p.add_argument("--tmp", default="/tmp", help="where the work dir volsync-scale-* is made")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--out", help="also write the markdown report to this file")
    args = p.parse_args(argv)
    try:
        files = [] if args.skip_files else counts(args.files, binary=False)
        blocks = [] if args.skip_blocks else counts(args.blocks, binary=True)
        args.block_size = gendata.parse_size(args.block_size)
    except (ValueError, argparse.ArgumentTypeError) as e:
        p.error(str(e))
    if args.block_size < 4096 or args.block_size & (args.block_size - 1):
        p.error("--block-size must be a power of two, at least 4K")
    if shutil.which(shlex.split(args.volsync)[0]) is None:
        p.error(f"`{args.volsync}` is not on PATH (pip install -e . first, or pass --volsync)")

    if args.nofile:  # this process's soft limit, inherited by every child (`ulimit -n`)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        soft = args.nofile if hard == resource.RLIM_INFINITY else min(args.nofile, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    work = tempfile.mkdtemp(prefix="volsync-scale-", dir=args.tmp)
    bench = Bench(args, work)
    facts = machine_facts(work)
    # peaks: a files section holds 4 trees (~22 KiB on disk per file, all four); a blocks
    # section holds the source and the mirror, each live data + packs (rsync's copy is gone)
    need = max([max(files, default=0) * 22 * KIB, max(blocks, default=0) * args.block_size * 4.2])
    free = shutil.disk_usage(work).free
    if free < need:
        bench.notes.append(f"WARNING: {human(free)} free in {work}, the run may need {human(need)}")
    try:
        bench.floor = bench.run(["true"], timed=False).rss_kib
    except CommandFailed as e:
        p.error(f"the launcher does not work here: {e}")
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    try:
        for n in files:
            bench.progress(f"[{n:,} files]")
            bench.files(n)
        for n in blocks:
            bench.progress(f"[{n:,} blocks]")
            bench.blocks(n)
        if not args.skip_snapshots and args.snapshots > 0:
            bench.progress(f"[{args.snapshots:,} snapshots]")
            bench.snapshots(args.snapshots)
    except KeyboardInterrupt:
        bench.errors.append("interrupted")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = bench.report(argv, started, time.perf_counter() - t0, facts)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
