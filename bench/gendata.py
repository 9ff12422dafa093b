#!/usr/bin/env python3
"""Deterministic benchmark data for volsync: generate a tree, mutate it, digest it.

Every byte comes from ``random.Random`` seeded with a string naming the seed and the file,
so the same seed gives the same bytes on every machine and Python 3.11+ (string seeds are
hashed with SHA-512, independent of PYTHONHASHSEED). The content is incompressible and no
two 64 KiB blocks (at any alignment) are equal, so neither compression nor deduplication can
flatter a tool.

    python bench/gendata.py generate ROOT [--seed 1] [--scale 1.0]
    python bench/gendata.py generate ROOT --small-files 100000
    python bench/gendata.py mutate ROOT --seed 2 [--fraction 0.006]
    python bench/gendata.py digest ROOT
    python bench/gendata.py blocks ROOT [--block-size 65536]
    python bench/gendata.py sparse FILE [--seed 1]     # 1 GiB sparse image holding 4 MiB

Stdlib only. Paths named ``.volsync`` at the top of ROOT (a volume's metadata) are never
touched, counted or digested.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

KIB = 1024
MIB = 1024 * KIB
CHUNK = 256 * KIB  # randbytes is fastest around this size
METADATA_DIR = ".volsync"

# The full-scale data set: 512 MiB of files plus a 512 MiB image.
FILES_TOTAL = 512 * MIB
IMAGE_SIZE = 512 * MIB
IMAGE_NAME = "disk.img"
MIN_FILE, MAX_FILE = 1 * KIB, 8 * MIB
# size = MIN * (MAX/MIN) ** (u ** SKEW): log-uniform for SKEW 1; 2.8 skews towards small
# files so that 512 MiB is about 1,450 files (median ~4 KiB, a long tail up to 8 MiB).
SKEW = 2.8
DIRS = (
    "",
    "docs",
    "docs/2023",
    "docs/2024/q1",
    "docs/2024/q2",
    "src/lib/core",
    "src/lib/util",
    "src/app",
    "media/photos/raw",
    "media/photos/edited",
    "media/video",
    "home/alice",
    "home/bob/projects/alpha",
    "home/bob/projects/beta",
    "var/log",
    "var/db",
)
EXTENSIONS = (".dat", ".bin", ".txt", ".jpg", ".log", ".db", ".pdf")
# Generated files get this fixed, old mtime (2020-01-01) so that any later change, even in the
# same second, is visible to tools comparing whole-second mtimes (rsync's default quick check).
MTIME = 1_577_836_800
# The sparse image: 1 GiB long, 4 MiB of data in a few scattered extents, the rest holes.
SPARSE_SIZE = 1024 * MIB
SPARSE_DATA = 4 * MIB
SPARSE_EXTENTS = 4
SPARSE_NAME = "sparse.img"
FS_BLOCK = 4 * KIB  # extents start and end on 4 KiB boundaries, as a filesystem allocates
SMALL_PER_DIR = 100  # small-file trees: 100 files per leaf dir, 50 leaf dirs per top dir
SMALL_DIRS_PER_TOP = 50


def content_rng(seed: int, name: str) -> random.Random:
    """The generator for one file's bytes: independent of every other file and of order."""
    return random.Random(f"volsync-bench:{seed}:{name}")


def write_random(path: str, rng: random.Random, size: int, offset: int | None = None) -> None:
    """Write ``size`` random bytes to ``path``: a new file, or in place at ``offset``."""
    with open(path, "wb" if offset is None else "r+b") as f:
        if offset is not None:
            f.seek(offset)
        left = size
        while left > 0:
            n = min(CHUNK, left)
            f.write(rng.randbytes(n))
            left -= n


def file_sizes(seed: int, total: int) -> list[int]:
    """Sizes between 1 KiB and 8 MiB, skewed log-uniform, summing exactly to ``total``."""
    rng = random.Random(f"volsync-bench:{seed}:sizes")
    sizes: list[int] = []
    left = total
    ratio = MAX_FILE / MIN_FILE
    while left > 0:
        size = min(left, int(MIN_FILE * ratio ** (rng.random() ** SKEW)))
        if left - size < MIN_FILE and sizes:  # never leave a runt: fold it into this file
            size = left
        sizes.append(size)
        left -= size
    return sizes


def file_plan(seed: int, scale: float) -> list[tuple[str, int]]:
    """(relative path, size) of every file of the data set, the image last."""
    sizes = file_sizes(seed, round(FILES_TOTAL * scale))
    rng = random.Random(f"volsync-bench:{seed}:names")
    plan = []
    for i, size in enumerate(sizes):
        d = rng.choice(DIRS)
        name = f"f{i:05d}{rng.choice(EXTENSIONS)}"
        plan.append((f"{d}/{name}" if d else name, size))
    image = round(IMAGE_SIZE * scale) // (4 * KIB) * (4 * KIB)
    if image:
        plan.append((IMAGE_NAME, image))
    return plan


def small_file_plan(seed: int, count: int) -> Iterator[tuple[str, int]]:
    """(relative path, size) of ``count`` files of 1-4 KiB, 100 per directory, two levels."""
    rng = random.Random(f"volsync-bench:{seed}:small")
    for i in range(count):
        leaf, j = divmod(i, SMALL_PER_DIR)
        top, sub = divmod(leaf, SMALL_DIRS_PER_TOP)
        yield f"s{top:03d}/d{sub:02d}/file{j:02d}.dat", rng.randint(1 * KIB, 4 * KIB)


def generate(root: str, seed: int = 1, scale: float = 1.0, small_files: int = 0) -> dict:
    """Create the data set in ``root`` (absent or empty). Returns counts and bytes."""
    if os.path.exists(root) and os.listdir(root):
        raise SystemExit(f"gendata: {root} exists and is not empty")
    os.makedirs(root, exist_ok=True)
    plan = small_file_plan(seed, small_files) if small_files else file_plan(seed, scale)
    made: set[str] = set()
    files = total = 0
    for rel, size in plan:
        path = os.path.join(root, rel)
        parent = os.path.dirname(path)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        write_random(path, content_rng(seed, rel), size)
        os.utime(path, (MTIME, MTIME))
        files += 1
        total += size
    return {"root": root, "files": files, "bytes": total}


def sparse_image(
    path: str,
    seed: int = 1,
    size: int = SPARSE_SIZE,
    data: int = SPARSE_DATA,
    extents: int = SPARSE_EXTENTS,
) -> dict:
    """Create ``path``: ``size`` bytes of holes holding ``data`` random bytes in ``extents``.

    Deterministic for a seed: extent lengths (4 KiB multiples, summing to ``data``) and
    offsets (4 KiB-aligned, one extent at a random place in each of ``extents`` equal
    segments, so they never touch) come from the seed; the file is made with ftruncate, so
    nothing else is allocated. Returns the extents and the bytes of the 64 KiB blocks they touch.
    """
    rng = random.Random(f"volsync-bench:{seed}:sparse")
    units = data // FS_BLOCK
    cuts = sorted(rng.sample(range(1, units), extents - 1))
    lengths = [(b - a) * FS_BLOCK for a, b in zip([0, *cuts], [*cuts, units])]
    segment = size // extents // FS_BLOCK * FS_BLOCK
    if max(lengths) > segment:
        raise ValueError("sparse_image: data does not fit its segments")
    with open(path, "wb") as f:
        f.truncate(size)
    placed = []
    for k, length in enumerate(lengths):
        off = k * segment + rng.randrange(0, (segment - length) // FS_BLOCK + 1) * FS_BLOCK
        write_random(path, content_rng(seed, f"sparse:{k}"), length, off)
        placed.append((off, length))
    os.utime(path, (MTIME, MTIME))
    return {
        "path": path,
        "size": size,
        "data": sum(lengths),
        "extents": placed,
        "data_64k_blocks": sum(_touched_blocks(o, n, size) for o, n in placed),
    }


def list_files(root: str) -> list[tuple[str, int]]:
    """(relative path with '/', size) of every regular file, sorted; skips ROOT/.volsync."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root and METADATA_DIR in dirnames:
            dirnames.remove(METADATA_DIR)
        dirnames.sort()
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                out.append((os.path.relpath(path, root).replace(os.sep, "/"), st.st_size))
    out.sort()
    return out


@dataclass
class Mutation:
    """What ``mutate`` did. ``bytes_changed`` is new content written (overwrites + new files)."""

    seed: int
    tree_bytes: int
    bytes_changed: int = 0
    bytes_deleted: int = 0
    # bytes of the 64 KiB-aligned blocks the writes touched: what an ideal fixed-64K tool sends
    bytes_changed_64k_blocks: int = 0
    files_modified: int = 0
    files_new: int = 0
    files_deleted: int = 0
    image_regions: int = 0
    image_bytes: int = 0


def _touched_blocks(offset: int, length: int, file_size: int, block: int = 64 * KIB) -> int:
    first, last = offset // block, (offset + length - 1) // block
    return min((last + 1) * block, file_size) - first * block


def mutate(root: str, seed: int, fraction: float = 0.006, file_fraction: float = 0.01) -> Mutation:
    """Change about ``fraction`` of the tree's bytes, deterministically for a tree and seed.

    About ``file_fraction`` of the files (at least three) are touched: ~70% overwritten in
    place (whole file up to 128 KiB, else a 64-512 KiB region), ~15% deleted, ~15% new files
    added (4 KiB-1 MiB, no larger than the largest file). The rest of the byte budget goes to scattered, non-overlapping 256 KiB-1 MiB
    overwrites of ``disk.img`` at unaligned offsets. File sizes of existing files never change.
    """
    rng = random.Random(f"volsync-bench:mutate:{seed}")
    listing = list_files(root)
    tree_bytes = sum(size for _, size in listing)
    m = Mutation(seed=seed, tree_bytes=tree_bytes)
    image = next((size for rel, size in listing if rel == IMAGE_NAME), None)
    files = [(rel, size) for rel, size in listing if rel != IMAGE_NAME]

    if files:
        touch = max(3, round(file_fraction * len(files)))
        n_new = n_del = max(1, touch * 15 // 100)
        n_mod = max(1, touch - n_new - n_del)
        chosen = rng.sample(files, min(len(files), n_mod + n_del))
        for rel, size in chosen[:n_mod]:
            if size <= 128 * KIB:
                off, length = 0, size
            else:
                length = min(size, rng.randint(64 * KIB, 512 * KIB))
                off = rng.randrange(0, size - length + 1)
            if length:
                write_random(os.path.join(root, rel), content_rng(seed, f"mod:{rel}"), length, off)
            m.files_modified += 1
            m.bytes_changed += length
            m.bytes_changed_64k_blocks += _touched_blocks(off, length, size) if length else 0
        for rel, size in chosen[n_mod:]:
            os.unlink(os.path.join(root, rel))
            m.files_deleted += 1
            m.bytes_deleted += size
        cap = min(1 * MIB, max(4 * KIB, max(size for _, size in files)))  # new files' size cap
        for i in range(n_new):
            parent = os.path.dirname(rng.choice(files)[0])
            rel = f"{parent}/new-s{seed}-{i:03d}.bin" if parent else f"new-s{seed}-{i:03d}.bin"
            size = int(4 * KIB * (cap / (4 * KIB)) ** rng.random())  # log-uniform, 4 KiB up
            write_random(os.path.join(root, rel), content_rng(seed, f"new:{rel}"), size)
            m.files_new += 1
            m.bytes_changed += size
            m.bytes_changed_64k_blocks += size

    if image:
        budget = max(256 * KIB, round(fraction * tree_bytes) - m.bytes_changed)
        lengths = []
        while budget > 0:
            length = min(budget, rng.randint(256 * KIB, 1 * MIB))
            lengths.append(max(length, 64 * KIB))
            budget -= length
        segment = image // len(lengths)  # one region per segment: they never overlap
        path = os.path.join(root, IMAGE_NAME)
        for k, length in enumerate(lengths):
            length = min(length, segment)
            off = k * segment + rng.randrange(0, segment - length + 1)
            write_random(path, content_rng(seed, f"img:{k}"), length, off)
            m.image_regions += 1
            m.image_bytes += length
            m.bytes_changed += length
            m.bytes_changed_64k_blocks += _touched_blocks(off, length, image)
    return m


def digest(root: str) -> str:
    """SHA-256 over every file's path, size and bytes (sorted; ROOT/.volsync skipped)."""
    h = hashlib.sha256()
    for rel, size in list_files(root):
        h.update(f"{rel}\0{size}\0".encode())
        with open(os.path.join(root, rel), "rb") as f:
            while chunk := f.read(MIB):
                h.update(chunk)
    return h.hexdigest()


def duplicate_blocks(root: str, block: int = 64 * KIB) -> tuple[int, int]:
    """(blocks, duplicated blocks) over block-aligned full blocks of every file."""
    seen: set[bytes] = set()
    blocks = dups = 0
    for rel, _ in list_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            while len(chunk := f.read(block)) == block:
                key = hashlib.blake2b(chunk, digest_size=16).digest()
                blocks += 1
                if key in seen:
                    dups += 1
                seen.add(key)
    return blocks, dups


def parse_size(text: str) -> int:
    units = {"K": KIB, "M": MIB, "G": 1024 * MIB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="create the data set in ROOT (absent or empty)")
    g.add_argument("root")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--scale", type=float, default=1.0, help="1.0 = 512 MiB files + 512 MiB image")
    g.add_argument(
        "--small-files",
        type=int,
        default=0,
        metavar="N",
        help="instead create N files of 1-4 KiB in nested directories",
    )
    mu = sub.add_parser("mutate", help="change ~0.6%% of ROOT's bytes; prints a JSON report")
    mu.add_argument("root")
    mu.add_argument("--seed", type=int, required=True)
    mu.add_argument("--fraction", type=float, default=0.006)
    d = sub.add_parser("digest", help="print a SHA-256 of ROOT's paths and bytes")
    d.add_argument("root")
    b = sub.add_parser("blocks", help="count duplicate aligned blocks (expect 0)")
    b.add_argument("root")
    b.add_argument("--block-size", default="64K")
    sp = sub.add_parser("sparse", help="create a 1 GiB sparse image holding 4 MiB of data")
    sp.add_argument("path")
    sp.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    if args.cmd == "generate":
        if args.scale <= 0 or not math.isfinite(args.scale):
            p.error("--scale must be positive")
        info = generate(args.root, args.seed, args.scale, args.small_files)
        info["seconds"] = round(time.perf_counter() - t0, 3)
        print(json.dumps(info))
    elif args.cmd == "mutate":
        print(json.dumps(asdict(mutate(args.root, args.seed, args.fraction))))
    elif args.cmd == "sparse":
        if os.path.exists(args.path):
            raise SystemExit(f"gendata: {args.path} exists")
        print(json.dumps(sparse_image(args.path, args.seed)))
    elif args.cmd == "digest":
        print(digest(args.root))
    else:
        blocks, dups = duplicate_blocks(args.root, parse_size(args.block_size))
        print(json.dumps({"blocks": blocks, "duplicates": dups}))
        return 1 if dups else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
