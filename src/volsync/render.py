"""Text and JSON renderings of engine results (no logic beyond formatting)."""

from __future__ import annotations

import base64
import datetime as dt

from .model import BUSY, PREVIOUS, FileWarning, Snapshot


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


_C_ESCAPES = {7: "a", 8: "b", 9: "t", 10: "n", 11: "v", 12: "f", 13: "r", 34: '"', 92: "\\"}


def quote_path(path: bytes) -> str:
    """A path as git shows it (core.quotePath): as it is, unless it holds a control byte,
    `"`, `\\` or a byte >= 0x80; then in double quotes with C escapes (\\n, \\t, \\", \\\\, ...)
    and the other such bytes in octal (\\303\\251)."""
    if not any(b < 0x20 or b >= 0x7F or b in (34, 92) for b in path):
        return path.decode("ascii")
    out = []
    for b in path:
        if b in _C_ESCAPES:
            out.append("\\" + _C_ESCAPES[b])
        elif b < 0x20 or b >= 0x7F:
            out.append(f"\\{b:03o}")
        else:
            out.append(chr(b))
    return '"' + "".join(out) + '"'


def warning_json(w: FileWarning) -> dict:
    """A file warning in JSON: `path` relative to the volume (its git-quoted form when it is
    not UTF-8, and then the exact bytes as `path_b64` too)."""
    try:
        data = {"path": w.path.decode("utf-8")}
    except UnicodeDecodeError:
        data = {"path": quote_path(w.path), "path_b64": base64.b64encode(w.path).decode()}
    return data | {"problem": w.problem, "recorded": w.recorded}


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
