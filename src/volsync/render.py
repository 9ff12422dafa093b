"""Text and JSON renderings of engine results (no logic beyond formatting)."""

from __future__ import annotations

import datetime as dt
import os
import stat

from .model import BUSY, PREVIOUS, Entry, FileWarning, Kind, Snapshot
from .quoting import path_fields, quote_path
from .tree import KIND_NAMES


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def snap_ref(snap: Snapshot) -> dict:
    return {"number": snap.number, "id": snap.id}


def snap_json(snap: Snapshot, preserved_name: str | None) -> dict:
    """`name` is what SNAP arguments take: the number, or pN for a preserved snapshot."""
    return {"number": snap.number, "id": snap.id, "created": iso(snap.created),
            "label": snap.label, "preserved": preserved_name is not None,
            "name": preserved_name or str(snap.number), "size": snap.size, "files": snap.files}


def snapshot_table(rows: list[tuple[Snapshot, str | None]]) -> str:
    """Lineage rows by number; preserved rows by their name pN (their number repeats one of
    the lineage's, so it is shown only as where they were)."""
    lines = [f"{'NUMBER':>6}  {'ID':12}  {'CREATED':20}  {'SIZE':>10}  LABEL"]
    for snap, name in rows:
        mark = f"  (preserved; was {snap.number})" if name else ""
        lines.append(f"{name or snap.number:>6}  {snap.id[:12]}  {iso(snap.created):20}  "
                     f"{human_bytes(snap.size):>10}  {snap.label or ''}{mark}")
    return "\n".join(lines)


def warning_json(w: FileWarning) -> dict:
    """A file warning in JSON: `path` relative to the volume (shown as UTF-8, and its
    exact bytes as `path_b64` too when it is not UTF-8)."""
    return path_fields(w.path) | {"problem": w.problem, "recorded": w.recorded}


def warning_text(w: FileWarning) -> str:
    """What happened to the file, for `volsync: warning: <this>: <path>`."""
    if w.problem == BUSY:
        what = "file kept changing while being read"
        if w.recorded == PREVIOUS:
            return f"{what}; its previous version was recorded"
        return f"{what}; recorded as last read, possibly inconsistent"
    if w.recorded == PREVIOUS:
        return "cannot read it (permission denied); its previous version was kept"
    return "cannot read it (permission denied); left out"


# --- ls -------------------------------------------------------------------------------------------

FILE_TYPE_BITS = {Kind.FILE: stat.S_IFREG, Kind.DIR: stat.S_IFDIR, Kind.LINK: stat.S_IFLNK,
                  Kind.FIFO: stat.S_IFIFO, Kind.CHR: stat.S_IFCHR, Kind.BLK: stat.S_IFBLK}


def local_iso(mtime_ns: int) -> str:
    """An mtime as ISO 8601 in local time with its offset, to the second."""
    try:
        return dt.datetime.fromtimestamp(mtime_ns // 10**9).astimezone().isoformat()
    except (OverflowError, OSError, ValueError):  # beyond what this platform's clock shows
        return f"@{mtime_ns // 10**9}"


def permissions(entry: Entry) -> str:
    """Type and mode as `ls -l` shows them: drwxr-xr-x, -rwsr-xr-x, lrwxrwxrwx, ..."""
    return stat.filemode(FILE_TYPE_BITS[entry.kind] | entry.mode)


def entry_size(entry: Entry) -> int:
    """Bytes as lstat counts them: a file's length, a symlink's target's, else 0."""
    return len(entry.ref) if entry.kind is Kind.LINK else entry.size


def _shown_size(entry: Entry) -> str:
    if entry.kind in (Kind.CHR, Kind.BLK):
        return f"{os.major(entry.rdev)},{os.minor(entry.rdev)}"
    return str(entry_size(entry))


def ls_line(path: bytes, entry: Entry) -> str:
    """One entry as a line of `volsync ls` (an owner not recorded shows as '-')."""
    uid = "-" if entry.uid is None else str(entry.uid)
    gid = "-" if entry.gid is None else str(entry.gid)
    line = (f"{permissions(entry)} {uid:>6} {gid:>6} {_shown_size(entry):>12} "
            f"{local_iso(entry.mtime_ns)} {quote_path(path)}")
    if entry.kind is Kind.LINK:
        line += f" -> {quote_path(entry.ref)}"
    return line


def ls_json(path: bytes, entry: Entry) -> dict:
    """One entry of `volsync ls --json`; a symlink adds its target, a device its number."""
    out = path_fields(path) | {
        "type": KIND_NAMES[entry.kind], "mode": entry.mode, "permissions": permissions(entry),
        "uid": entry.uid, "gid": entry.gid, "size": entry_size(entry), "mtime_ns": entry.mtime_ns}
    if entry.kind is Kind.LINK:
        out |= path_fields(entry.ref, "target")
    if entry.kind in (Kind.CHR, Kind.BLK):
        out["rdev"] = entry.rdev
    return out
