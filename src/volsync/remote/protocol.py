"""The volsync protocol's vocabulary: versions, methods and how values cross the wire.

Session: the server says HELLO first (so a shell that prints a banner is caught at once),
the client answers with its HELLO, and both use the highest version both know, ignoring
capabilities they do not know (rsync, git protocol v2). Then the client sends requests
`[method, {args}]` and the server answers each with `["ok", value]` or
`["err", code, message, extra]`; the server never sends a request of its own (borg's rule).
Object streams are frames `["objs", [[id, data], ...]]` ended by `["end", {}]`. A whole
command run on the far side (`run_stream`) sends its stdout as `["out", bytes]` frames while it
runs, then the usual answer with its exit code and stderr; the older `run` (kept for clients
that do not know `run_stream`) answers with the whole stdout as text.

Everything decoded here is checked: a peer is hostile input."""

from __future__ import annotations

from ..errors import Diverged, IntegrityError, VolsyncError
from ..model import (
    BUSY,
    CURRENT,
    HASHES,
    PREVIOUS,
    SKIPPED,
    UNREADABLE,
    FileWarning,
    Snapshot,
)
from ..plan import LiveFacts, VolumeInfo
from ..store.volume import snapshot_body, snapshot_from_body, valid_snapshot_id
from ..tree import NotRestored
from ..wire import ProtocolError

MAGIC = "volsync-protocol"
VERSIONS = (1,)
# "run_stream": a single-volume command's stdout comes back as it is written (see server.py)
# "file_warnings": snapshot_source(_dry) take `strict` and answer {"snapshot", "warnings",
# "omitted"} (a server without it fails on a busy or unreadable file, as --strict does)
CAPABILITIES = ("zstd", "bwlimit", "run", "file_warnings", "run_stream")
MAX_WARNINGS = 10_000  # file warnings in one answer; the rest are only counted
MAX_WARNING_PATH = 1 << 16

# methods that change nothing; a `serve --read-only` answers only these
READ_METHODS = frozenset({
    "open", "info", "lock", "release", "read", "export", "has", "inspect_live",
    "snapshot_record", "snapshot_source_dry", "would_change_source", "interrupted", "run",
    "run_stream", "bye", "share", "hold", "settle_hold",
})
WRITE_METHODS = frozenset({
    "create_mirror", "snapshot_source", "keep_live_changes", "begin", "receive",
    "add_snapshots", "materialize", "finish", "undo", "set_role", "clear_journal",
    "discard_new", "mark_updated",
})
METHODS = READ_METHODS | WRITE_METHODS


class RemoteError(VolsyncError):
    """An error the far side reported, with the exit code it would have had there."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def encode_error(exc: BaseException) -> list:
    code = exc.code if isinstance(exc, VolsyncError) else 1
    extra = {}
    if isinstance(exc, Diverged) and exc.common is not None:
        extra = {"common": exc.common, "src_only": list(exc.src_only),
                 "dst_only": list(exc.dst_only)}
    if isinstance(exc, OSError) and not isinstance(exc, VolsyncError):
        where = f" ({exc.filename!r})" if exc.filename else ""
        message = f"{exc.strerror or exc}{where}"
    else:
        message = str(exc) or type(exc).__name__
    return ["err", int(code), message[:4000], extra]


def decode_error(reply: list) -> VolsyncError:
    try:
        _, code, message, extra = reply
        code, message = int(code), printable(str(message)[:4000])
    except (TypeError, ValueError):
        return ProtocolError("malformed error reply from peer")
    if code not in (1, 3, 4, 5, 6):
        code = 1
    if code == 5 and isinstance(extra, dict) and "common" in extra:
        try:
            return Diverged(message, int(extra["common"]),
                            tuple(int(n) for n in extra["src_only"]),
                            tuple(int(n) for n in extra["dst_only"]))
        except (KeyError, TypeError, ValueError):
            pass
    if code == 6:
        return IntegrityError(message)
    return RemoteError(message, code)


def printable(text: str) -> str:
    """A peer's text on one line, without control characters (it cannot forge output)."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


# --- values ---------------------------------------------------------------------------------

def snap_out(snap: Snapshot | None) -> dict | None:
    return None if snap is None else snapshot_body(snap)


def snap_in(body: object, id_size: int) -> Snapshot | None:
    if body is None:
        return None
    if not isinstance(body, dict) or not valid_snapshot_id(body.get("id")):
        raise ProtocolError("malformed snapshot record from peer")
    return snapshot_from_body(body, body["id"], id_size)


def info_out(info: VolumeInfo) -> dict:
    return {"address": info.address, "exists": info.exists, "volume_id": info.volume_id,
            "hash": info.hash, "block_size": info.block_size, "mode": info.mode,
            "upstream": info.upstream, "upstream_id": info.upstream_id,
            "lineage": [snap_out(s) for s in info.lineage], "preserved": list(info.preserved),
            "journal": info.journal, "journal_peer": info.journal_peer,
            "parent_missing": info.parent_missing}


def info_in(body: object, address: str) -> VolumeInfo:
    try:
        if not body["exists"]:
            return VolumeInfo(address, False, parent_missing=body.get("parent_missing") is True)
        hash_name = body["hash"]
        if hash_name not in HASHES:
            raise ProtocolError(f"peer names blocks by an unknown hash {hash_name!r}")
        size = HASHES[hash_name].size
        lineage = tuple(snap_in(s, size) for s in body["lineage"])
        preserved = tuple(body["preserved"])
        if not all(map(valid_snapshot_id, preserved)):
            raise ProtocolError("malformed snapshot id from peer")
        return VolumeInfo(address, True, _opt_str(body["volume_id"]), hash_name,
                          int(body["block_size"]), _opt_str(body["mode"]),
                          _opt_str(body["upstream"]), _opt_str(body["upstream_id"]), lineage,
                          preserved, _opt_str(body["journal"]), _opt_str(body["journal_peer"]))
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("malformed volume description from peer") from None


def _opt_str(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ProtocolError("malformed volume description from peer")
    return value


def source_snapshot_out(snap: Snapshot | None, warnings: tuple[FileWarning, ...]) -> dict:
    """snapshot_source's answer: the snapshot taken (or None) and the scan's warnings, at
    most MAX_WARNINGS of them (the rest counted)."""
    sent = warnings[:MAX_WARNINGS]
    return {"snapshot": snap_out(snap),
            "warnings": [[w.path, w.problem, w.recorded] for w in sent],
            "omitted": len(warnings) - len(sent)}


def source_snapshot_in(body: object, id_size: int
                       ) -> tuple[Snapshot | None, tuple[FileWarning, ...], int]:
    if body is None:  # a read-only server: nothing snapshotted, nothing to say
        return None, (), 0
    try:
        items, omitted = body["warnings"], body["omitted"]
        if not (isinstance(items, list) and len(items) <= MAX_WARNINGS
                and isinstance(omitted, int) and 0 <= omitted < 1 << 62):
            raise ValueError
        warnings = tuple(_warning_in(item) for item in items)
        return snap_in(body["snapshot"], id_size), warnings, omitted
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("malformed snapshot answer from peer") from None


def _warning_in(item: object) -> FileWarning:
    if not (isinstance(item, list) and len(item) == 3):
        raise ValueError
    path, problem, recorded = item
    if not (isinstance(path, bytes) and 0 < len(path) <= MAX_WARNING_PATH
            and b"\0" not in path and not path.startswith(b"/")
            and problem in (BUSY, UNREADABLE) and recorded in (PREVIOUS, CURRENT, SKIPPED)):
        raise ValueError
    return FileWarning(path, problem, recorded)


def facts_out(facts: LiveFacts) -> list:
    return [facts.empty, facts.root_changed, facts.modified]


def facts_in(body: object) -> LiveFacts:
    if not (isinstance(body, list) and len(body) == 3 and all(isinstance(b, bool) for b in body)):
        raise ProtocolError("malformed live-tree facts from peer")
    return LiveFacts(*body)


def skipped_out(skipped: NotRestored) -> dict:
    return skipped.as_dict()


def skipped_in(body: object) -> NotRestored:
    out = NotRestored()
    if isinstance(body, dict):
        for key in ("ownership", "xattrs", "devices"):
            value = body.get(key, 0)
            if isinstance(value, int) and 0 <= value < 1 << 62:
                out.counts[key] += value
    return out


def ids_in(body: object, size: int) -> list:
    if not isinstance(body, list) or not all(isinstance(i, bytes) and len(i) == size
                                             for i in body):
        raise ProtocolError("malformed object ids from peer")
    return body


def unpack_checked(raw: bytes) -> object:
    from ..wire import unpack
    return unpack(raw)
