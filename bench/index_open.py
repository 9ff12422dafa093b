"""Time and peak memory of commands that open a big block index: `status` and a no-change
`transfer`, on a volume of SIZE random bytes cut into small blocks (many ids).

    python bench/index_open.py --size 1G --block-size 4K            # 262,144 blocks
    python bench/index_open.py --volsync "python -m volsync" --repeat 3

Each command runs in a child of a fresh Python process, whose RUSAGE_CHILDREN gives that
command's peak RSS alone. Stdlib only; works in /tmp/volsync-index-* (removed unless --keep).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
took = time.perf_counter() - start
print(code, took, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
FILE_SIZE = 64 << 20


def size_arg(text: str) -> int:
    unit = UNITS.get(text[-1:].upper())
    return int(text[:-1]) * unit if unit else int(text)


def measure(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS in KiB) of one command; raises if it failed."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], check=True,
                         capture_output=True, text=True).stdout.split()
    if out[0] != "0":
        raise SystemExit(f"{shlex.join(cmd)} exited {out[0]}")
    return float(out[1]), int(out[2])


def generate(root: Path, size: int) -> None:
    root.mkdir()
    for n in range(-(-size // FILE_SIZE)):
        with open(root / f"f{n}", "wb") as f:
            f.write(os.urandom(min(FILE_SIZE, size - n * FILE_SIZE)))


def run(volsync: list[str], work: Path, size: int, block_size: str, repeat: int) -> None:
    src, dst = work / "src", work / "dst"
    generate(src, size)
    setup = [("init", [*volsync, "init", "--block-size", block_size, str(src)]),
             ("snapshot", [*volsync, "snapshot", str(src)]),
             ("first transfer", [*volsync, "transfer", str(src), str(dst)])]
    rows = [(label, [measure(cmd)]) for label, cmd in setup]
    timed = [("status", [*volsync, "status", str(src)]),
             ("no-change transfer", [*volsync, "transfer", "--no-snapshot", str(src), str(dst)])]
    for label, cmd in timed:
        measure(cmd)  # warm: the page cache, and a first midx write by a lock holder
        rows.append((label, [measure(cmd) for _ in range(repeat)]))
    idx = len(list((src / ".volsync" / "packs").glob("*.idx")))
    print(f"{size / (1 << 30):.2f} GiB, {block_size} blocks ({size // size_arg(block_size):,}),"
          f" {idx} packs; median of {repeat}")
    print("| command | seconds | peak RSS MiB |\n|---|---|---|")
    for label, samples in rows:
        secs = statistics.median(s for s, _ in samples)
        rss = statistics.median(r for _, r in samples) / 1024
        print(f"| {label} | {secs:.2f} | {rss:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=size_arg, default=1 << 30)
    parser.add_argument("--block-size", default="4K")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--volsync", default="volsync", help="how to run the CLI")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="volsync-index-"))
    try:
        run(shlex.split(args.volsync), work, args.size, args.block_size, args.repeat)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
