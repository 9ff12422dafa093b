#!/usr/bin/env python3
"""Disk space of volumes on ext4, XFS and btrfs: what a source volume's store and a mirror
take per GiB of live data, beside `rsync -a` and `cp -a --reflink=auto` copies of the same
tree, with the wall time of each step.

    sudo python bench/space.py                 # 1 GiB data set on each filesystem (~3 min)
    sudo python bench/space.py --scale 0.1     # smoke run
    sudo python bench/space.py --fs xfs,btrfs --out space.md

For each filesystem (skipped, saying why, when its mkfs is missing or the mount fails) a
sparse image under --tmp is made and loop-mounted (ext4 too, so the three are alike), the
data set of bench/gendata.py is generated in it (untimed), then, each step timed with a
`sync` at its end (and an untimed `sync` before it):

    rsync -a SRC/ RSYNC/                 a plain copy
    cp -a --reflink=auto SRC CP          a copy sharing extents where the filesystem can
    volsync init SRC                     untimed
    volsync snapshot SRC                 the source volume's store
    volsync transfer SRC MIRROR          a mirror on the same filesystem (live tree + store)
    volsync snapshot SRC                 again, nothing changed
    volsync transfer SRC MIRROR          again, nothing to send

Space is measured twice: the filesystem's used blocks (statvfs) before and after each step,
and `volsync df --json` of the source and the mirror. Ratios are per GiB of live data (the
allocated bytes of the source's live tree). Needs root (loop mounts). Stdlib only. The
images are unmounted and deleted after each filesystem, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import gendata

GIB = 1 << 30
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}
PACKAGE = {"ext4": "e2fsprogs", "xfs": "xfsprogs", "btrfs": "btrfs-progs"}


class Failed(Exception):
    """A step failed (the message says which and why)."""


def tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin"):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


# --- loop mounts --------------------------------------------------------------------------------

MOUNTED: list[str] = []  # mount points to take down at exit, whatever happens


def unmount_all() -> None:
    while MOUNTED:
        where = MOUNTED.pop()
        if subprocess.run(["umount", where], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", where], capture_output=True, check=False)


def mount_image(kind: str, base: str, size: int) -> str:
    """A fresh `kind` filesystem on a sparse image in `base`, mounted at base/mnt."""
    mkfs = tool(MKFS[kind][0])
    if mkfs is None:
        raise Failed(f"{MKFS[kind][0]} is not installed (package {PACKAGE[kind]})")
    image, where = os.path.join(base, f"{kind}.img"), os.path.join(base, "mnt")
    with open(image, "wb") as f:
        f.truncate(size)
    os.mkdir(where)
    made = subprocess.run([mkfs, *MKFS[kind][1:], image], capture_output=True, text=True,
                          check=False)
    if made.returncode != 0:
        raise Failed(f"{MKFS[kind][0]} failed: {last_line(made.stderr + made.stdout)}")
    done = subprocess.run(["mount", "-t", kind, "-o", "loop", image, where],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise Failed(f"cannot loop-mount a {kind} image: {last_line(done.stderr + done.stdout)}")
    MOUNTED.append(where)
    return where


def used_bytes(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


# --- one filesystem -------------------------------------------------------------------------------

@dataclass
class Row:
    fs: str
    skipped: str = ""
    data_bytes: int = 0  # what gendata wrote (logical)
    live: int = 0  # allocated bytes of the source's live tree (df's live_bytes)
    used: dict[str, int] = field(default_factory=dict)  # statvfs delta of each step
    seconds: dict[str, float] = field(default_factory=dict)
    df_src: dict = field(default_factory=dict)
    df_mirror: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.volsync = shlex.split(args.volsync) if args.volsync else [sys.executable, "-m",
                                                                         "volsync"]
        self.env = dict(os.environ)
        if not args.volsync:  # this checkout's volsync
            self.env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [os.path.join(REPO, "src"), os.environ.get("PYTHONPATH")]))

    def run(self, argv: list[str], what: str) -> subprocess.CompletedProcess:
        p = subprocess.run(argv, capture_output=True, text=True, env=self.env, check=False)
        if p.returncode != 0:
            raise Failed(f"{what} exited {p.returncode}: {last_line(p.stderr + p.stdout)}")
        return p

    def step(self, row: Row, name: str, argv: list[str], at: str) -> subprocess.CompletedProcess:
        """Run one timed step (the command and a sync) and record its time and the filesystem
        blocks it took."""
        os.sync()
        before = used_bytes(at)
        t0 = time.perf_counter()
        p = self.run(argv, name)
        os.sync()
        row.seconds[name] = time.perf_counter() - t0
        row.used[name] = used_bytes(at) - before
        return p

    def df(self, vol: str) -> dict:
        return json.loads(self.run([*self.volsync, "df", vol, "--json"], "volsync df").stdout)

    def filesystem(self, kind: str) -> Row:
        row = Row(kind)
        base = tempfile.mkdtemp(prefix=f"volsync-space-{kind}-", dir=self.args.tmp)
        try:
            size = max(4 * GIB, int(self.args.scale * 10 * GIB))
            try:
                at = mount_image(kind, base, size)
            except Failed as e:
                row.skipped = str(e)
                return row
            self.measure(row, at)
        except Failed as e:
            row.errors.append(str(e))
        finally:
            unmount_all()
            shutil.rmtree(base, ignore_errors=True)
        return row

    def measure(self, row: Row, at: str) -> None:
        src, mirror = os.path.join(at, "src"), os.path.join(at, "mirror")
        self.log(f"{row.fs}: generating the data set (scale {self.args.scale})")
        row.data_bytes = gendata.generate(src, self.args.seed, self.args.scale)["bytes"]
        self.log(f"{row.fs}: rsync -a, cp -a --reflink=auto")
        self.step(row, "rsync", ["rsync", "-a", f"{src}/", os.path.join(at, "rsync")], at)
        self.step(row, "cp", ["cp", "-a", "--reflink=auto", src, os.path.join(at, "cp")], at)
        self.log(f"{row.fs}: volsync init, snapshot, transfer")
        os.sync()
        before = used_bytes(at)
        self.run([*self.volsync, "init", src], "volsync init")
        self.step(row, "snapshot", [*self.volsync, "snapshot", src], at)
        os.sync()
        row.used["source"] = used_bytes(at) - before  # init + snapshot: the store
        self.step(row, "transfer", [*self.volsync, "transfer", src, mirror], at)
        self.step(row, "snapshot again", [*self.volsync, "snapshot", src], at)
        self.step(row, "transfer again", [*self.volsync, "transfer", src, mirror], at)
        row.df_src, row.df_mirror = self.df(src), self.df(mirror)
        # settled: once the kernel drops the inodes from its cache, XFS frees the blocks it
        # had speculatively reserved past the end of the files being written (its background
        # scan does the same within minutes)
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        row.used["settled"] = used_bytes(at) - before
        row.live = row.df_src["live_bytes"]
        if not self.args.no_check and gendata.digest(src) != gendata.digest(mirror):
            raise Failed("the mirror's live tree differs from the source's")

    def log(self, text: str) -> None:
        if not self.args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- report -------------------------------------------------------------------------------------

def ratio(n: int, live: int) -> str:
    return f"{n / live:.2f}" if live else "-"


def report(rows: list[Row], args: argparse.Namespace, bench: Bench) -> str:
    which = "" if args.volsync else bench.run(
        [sys.executable, "-c", "import volsync; print(volsync.__file__)"], "python").stdout
    out = [
        "# volsync space on ext4, XFS and btrfs",
        "",
        f"`{' '.join(map(shlex.quote, sys.argv))}` on {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}; volsync "
        f"`{' '.join(bench.volsync)}`" + (f" ({which.strip()})" if which.strip() else "") + "; "
        f"each filesystem a sparse image loop-mounted from {args.tmp or tempfile.gettempdir()}.",
        "",
        ("Space per GiB of live data (the source's live tree as allocated). `fs`: the "
         "filesystem's used blocks (statvfs) taken by the step; `df`: `volsync df --json` "
         "(store = `.volsync/`; unshared = store not in extents shared with other files)."),
        "",
        ("| filesystem | live data GiB | source store: fs | source store: df | source store "
         "unshared: df | mirror: fs | mirror live+store: df | mirror store unshared: df | "
         "source store + mirror, settled: fs | rsync -a: fs | cp -a --reflink=auto: fs |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    timing = [
        "",
        "Wall time in seconds (each command and a `sync` after it; warm page cache).",
        "",
        ("| filesystem | volsync snapshot | volsync transfer | snapshot + transfer vs rsync -a "
         "| no-change snapshot | no-change transfer | rsync -a | cp -a --reflink=auto |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        if r.skipped:
            notes.append(f"- {r.fs}: skipped: {r.skipped}")
            continue
        if r.errors:
            notes.append(f"- {r.fs}: ERROR: {'; '.join(r.errors)}")
        if not r.live:
            continue
        s, m, u = r.df_src, r.df_mirror, r.used
        out.append(
            f"| {r.fs} | {r.live / GIB:.2f} | {ratio(u.get('source', 0), r.live)} | "
            f"{ratio(s['store_bytes'], r.live)} | {ratio(s['store_unshared_bytes'], r.live)} | "
            f"{ratio(u.get('transfer', 0), r.live)} | "
            f"{ratio(m['live_bytes'] + m['store_bytes'], r.live)} | "
            f"{ratio(m['store_unshared_bytes'], r.live)} | {ratio(u.get('settled', 0), r.live)} | "
            f"{ratio(u.get('rsync', 0), r.live)} | "
            f"{ratio(u.get('cp', 0), r.live)} |")
        t = {k: f"{v:.2f}" for k, v in r.seconds.items()}
        sec = r.seconds
        first = (f"{(sec['snapshot'] + sec['transfer']) / sec['rsync']:.2f}×"
                 if {"snapshot", "transfer", "rsync"} <= sec.keys() and sec["rsync"] else "-")
        timing.append(f"| {r.fs} | {t.get('snapshot', '-')} | {t.get('transfer', '-')} | "
                      f"{first} | {t.get('snapshot again', '-')} | "
                      f"{t.get('transfer again', '-')} | {t.get('rsync', '-')} | "
                      f"{t.get('cp', '-')} |")
    details = ["", "Raw figures (bytes):", ""]
    for r in rows:
        if r.live:
            details.append(f"- {r.fs}: data {r.data_bytes:,} (logical), live {r.live:,}; "
                           f"fs used by step {json.dumps(r.used)}; source df "
                           f"{json.dumps(r.df_src, sort_keys=True)}; mirror df "
                           f"{json.dumps(r.df_mirror, sort_keys=True)}")
    return "\n".join(out + timing + details + ([""] + notes if notes else [])) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fs", default="ext4,xfs,btrfs",
                    help="Filesystems to measure, comma-separated (default: ext4,xfs,btrfs).")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="Data set scale: 1.0 = 1 GiB (bench/gendata.py).")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--volsync", default=None, metavar="CMD",
                    help="How to run volsync (default: this Python's -m volsync, from this "
                         "checkout's src/).")
    ap.add_argument("--tmp", default=None, help="Where the images go (default: $TMPDIR or "
                                                "/tmp; needs about 6 GiB free at scale 1).")
    ap.add_argument("--no-check", action="store_true",
                    help="Skip comparing the mirror's live tree with the source's.")
    ap.add_argument("--quiet", action="store_true", help="No progress lines on stderr.")
    ap.add_argument("--out", default=None, help="Also write the report to this file.")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.fs.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in MKFS]
    if unknown:
        ap.error(f"unknown filesystem(s) {', '.join(unknown)}: use ext4, xfs, btrfs")
    if os.geteuid() != 0:
        print("bench/space.py: loop-mounting needs root", file=sys.stderr)
        return 1
    for name in ("rsync", "cp", "mount", "umount"):
        if tool(name) is None:
            print(f"bench/space.py: {name} is not installed", file=sys.stderr)
            return 1

    atexit.register(unmount_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` runs
    bench = Bench(args)
    rows = []
    try:
        for kind in kinds:
            rows.append(bench.filesystem(kind))
    finally:
        unmount_all()
    text = report(rows, args, bench)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 1 if any(r.errors for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
