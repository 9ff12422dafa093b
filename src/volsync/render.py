"""Text and JSON renderings of engine results (no logic beyond formatting)."""

from __future__ import annotations

import datetime as dt

from .model import Snapshot


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


def snap_json(snap: Snapshot, preserved: bool) -> dict:
    return {"number": snap.number, "id": snap.id, "created": iso(snap.created),
            "label": snap.label, "preserved": preserved, "size": snap.size, "files": snap.files}


def snapshot_table(rows: list[tuple[Snapshot, bool]]) -> str:
    lines = [f"{'NUMBER':>6}  {'ID':12}  {'CREATED':20}  {'SIZE':>10}  LABEL"]
    for snap, preserved in rows:
        mark = "  (preserved)" if preserved else ""
        lines.append(f"{snap.number:>6}  {snap.id[:12]}  {iso(snap.created):20}  "
                     f"{human_bytes(snap.size):>10}  {snap.label or ''}{mark}")
    return "\n".join(lines)
