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
