"""`send` and `receive`: a volume's snapshots as a self-describing stream on a pipe, for the
machines that no ssh connects (`volsync send A | ... | volsync receive B`), as `zfs send`.

The stream is frames (wire.py):
1. a header: magic, version, the source volume's id, hash and block size, the base snapshot
   (its record, or none for a full stream) and the records of the snapshots it carries;
2. the objects those snapshots need beyond the base, children before the trees and lists
   naming them, in frames of about 4 MiB;
3. a trailer: the count of objects and a BLAKE3 digest of every frame before it.
`receive` stores objects as they come (each re-hashed against its id) but commits only
after the trailer verifies: a cut or damaged stream (exit 6) leaves DST as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import BinaryIO

import blake3

from .errors import BadArgument, IntegrityError, NoCommonSnapshot
from .model import HASHES, READ_ONLY, Snapshot, progress_step
from .ops import resolve_in
from .plan import (
    TRANSFER,
    TransferPlan,
    VolumeInfo,
    check_compatible,
    check_parent,
    missing_objects,
    plan_lineages,
    refusal,
)
from .remote.client import RemoteOptions
from .remote.endpoints import opened, receiving, wire_bytes
from .remote.protocol import snap_in, snap_out
from .store.idarray import IdSet, empty_objects
from .store.walk import missing_under
from .tree import NotRestored, Progress
from .wire import (
    Channel,
    ConnectionLost,
    NotVolsync,
    ProtocolError,
    object_batches,
    pack,
    unpack,
)

MAGIC = "volsync-stream"
VERSION = 1
MAX_SNAPSHOTS = 1 << 16


@dataclass(frozen=True)
class StreamResult:
    plan: TransferPlan
    base: Snapshot | None
    bytes_on_wire: int
    not_restored: NotRestored = field(default_factory=NotRestored)
    received: tuple[int, int] = (0, 0)  # objects and bytes the stream carried (receive)


class _Digesting(Channel):
    """A channel that hashes every payload it sends or receives (the trailer's digest)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.digest = blake3.blake3()

    def send_raw(self, payload: bytes) -> None:
        self.digest.update(payload)
        super().send_raw(payload)

    def recv_raw(self, first: bool = False) -> bytes | None:
        payload = super().recv_raw(first)
        if payload is not None:
            self.digest.update(payload)
        return payload


# --- send -----------------------------------------------------------------------------------

def send(src_text: str, out: BinaryIO, *, base_name: str | None = None,
         to_name: str | None = None, options: RemoteOptions | None = None,
         progress: Progress | None = None) -> StreamResult:
    """Write the stream of SRC's snapshots after `base_name` up to `to_name` to `out`."""
    options = options or RemoteOptions()
    with opened(src_text, options=options) as (src,):
        info = src.info("src")
        lineage = list(info.lineage)
        if not lineage:
            raise BadArgument(f"{src.address} has no snapshots to send")
        to = resolve_in(lineage, to_name, src.address) if to_name else lineage[-1]
        base = resolve_in(lineage, base_name, src.address) if base_name else None
        upto = lineage[: _index(lineage, to) + 1]
        if base is not None and base.number >= to.number:
            raise BadArgument(f"--from {base.number} is not before --to {to.number}")
        snaps = upto[_index(upto, base) + 1 :] if base else upto
        have = _objects_of(src, base, info) if base else frozenset()
        objects, blocks = missing_objects(src.read, lambda ids: [i in have for i in ids],
                                          [s.root for s in snaps], info.fmt)
        ch = _Digesting(None, out, compress=options.compress, bwlimit=options.bwlimit,
                        peer="stdout")
        size = objects.bytes
        header = pack({"version": VERSION, "volume_id": info.volume_id, "hash": info.hash,
                       "block_size": info.block_size, "source": src.address,
                       "base": snap_out(base), "snapshots": [snap_out(s) for s in snaps],
                       "objects": len(objects), "blocks": blocks, "bytes": size})
        progress_step(progress, "send", size)
        # the header has its own digest: a damaged one is refused before it is believed
        ch.send([MAGIC, header, blake3.blake3(header).digest()])

        def counted() -> Iterator:
            for object_id, data in src.export(objects.ids()):
                yield object_id, data
                if progress:
                    progress(len(data))

        count = 0
        for batch in object_batches(counted()):
            ch.send(["objs", batch])
            count += len(batch)
        ch.send(["end", {"count": count, "digest": ch.digest.digest()}])
        ch.flush()
        lineages = plan_lineages(TRANSFER, ([base] if base else []) + snaps,
                                 [base] if base else [])
        plan = TransferPlan(TRANSFER, lineages, tuple(upto), tuple([base] if base else ()),
                            objects, blocks, None, False, base is None)
        return StreamResult(plan, base, ch.bytes_out + wire_bytes(src))


def _index(lineage: list[Snapshot], snap: Snapshot) -> int:
    for i, s in enumerate(lineage):
        if s.id == snap.id:
            return i
    raise BadArgument(f"snapshot {snap.number} is not in the lineage")


def _objects_of(src, base: Snapshot, info: VolumeInfo) -> IdSet:
    """Every object under the base snapshot (the receiver has them all), as a compact set."""
    found, _ = missing_under([base.root], info.fmt, src.read, lambda ids: [False] * len(ids))
    return found.id_set()


# --- receive --------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamHeader:
    info: VolumeInfo  # the source, as the stream describes it
    base: Snapshot | None
    snapshots: tuple[Snapshot, ...]
    source: str
    blocks: int = 0  # file blocks the stream says it carries
    size: int | None = None  # the bytes of the objects it carries, as its header says


def read_header(ch: Channel) -> StreamHeader:
    try:
        raw = ch.recv_raw(first=True)
    except (ProtocolError, NotVolsync):
        raise IntegrityError("not a volsync stream") from None
    except ConnectionLost:
        raise IntegrityError("the stream is empty or cut short") from None
    if raw is None:
        raise IntegrityError("the stream is empty")
    try:
        head = unpack(raw)
    except ProtocolError:
        raise IntegrityError("not a volsync stream") from None
    if not (isinstance(head, list) and len(head) == 3 and head[0] == MAGIC
            and isinstance(head[1], bytes) and isinstance(head[2], bytes)):
        raise IntegrityError("not a volsync stream (or one of another version)")
    if blake3.blake3(head[1]).digest() != head[2]:
        raise IntegrityError("the stream's header is damaged; nothing committed")
    body = unpack(head[1])
    if not isinstance(body, dict):
        raise IntegrityError("stream header is malformed")
    if body.get("version") != VERSION:
        raise IntegrityError(f"stream version {body.get('version')!r} is not one this "
                             f"volsync reads ({VERSION})")
    try:
        hash_name, block_size = body["hash"], int(body["block_size"])
        if hash_name not in HASHES or not isinstance(body["volume_id"], str):
            raise ValueError
        size = HASHES[hash_name].size
        snaps = body["snapshots"]
        if not isinstance(snaps, list) or not 0 < len(snaps) <= MAX_SNAPSHOTS:
            raise ValueError
        snapshots = tuple(snap_in(s, size) for s in snaps)
        base = snap_in(body["base"], size)
        source = str(body.get("source") or "a stream")[:4096]
        blocks = int(body.get("blocks", 0))
        size = body.get("bytes")
        size = int(size) if isinstance(size, int) and size >= 0 else None
    except (KeyError, TypeError, ValueError):
        raise IntegrityError("stream header is malformed") from None
    numbers = [s.number for s in ([base] if base else []) + list(snapshots)]
    if numbers != sorted(set(numbers)):
        raise IntegrityError("stream header is malformed (snapshot numbers out of order)")
    info = VolumeInfo(source, True, body["volume_id"], hash_name, block_size, READ_ONLY,
                      lineage=(((base,) if base else ()) + snapshots))
    return StreamHeader(info, base, snapshots, source, blocks, size)


def _objects(ch: _Digesting, checked: dict) -> Iterator[tuple[bytes, bytes]]:
    """Objects until the trailer, which must count them and match the digest."""
    count = 0
    while True:
        expected = ch.digest.digest()
        try:
            frame = ch.recv()
        except ConnectionLost:
            raise IntegrityError("the stream was cut short; nothing committed") from None
        except ProtocolError as exc:
            raise IntegrityError(f"the stream is damaged ({exc}); nothing committed") from None
        if isinstance(frame, list) and len(frame) == 2 and frame[0] == "end":
            trailer = frame[1]
            if not (isinstance(trailer, dict) and trailer.get("count") == count
                    and trailer.get("digest") == expected):
                raise IntegrityError("the stream's trailer does not match what came before "
                                     "it (damaged); nothing committed")
            checked["ok"] = True
            return
        if not (isinstance(frame, list) and len(frame) == 2 and frame[0] == "objs"
                and isinstance(frame[1], list)):
            raise IntegrityError("the stream is damaged (unexpected frame); nothing committed")
        for item in frame[1]:
            if not (isinstance(item, list) and len(item) == 2
                    and isinstance(item[0], bytes) and isinstance(item[1], bytes)):
                raise IntegrityError("the stream is damaged (malformed object)")
            count += 1
            yield item[0], item[1]


def receive(dst_text: str, inp: BinaryIO, *, wait: float = 0.0,
            options: RemoteOptions | None = None, progress: Progress | None = None,
            mkpath: bool = False) -> StreamResult:
    """Add the stream's snapshots to DST, as `transfer` would; exit 4 when DST lacks the
    stream's base, exit 6 (nothing committed) when the stream is damaged or cut short."""
    ch = _Digesting(inp, None, peer="the stream")
    head = read_header(ch)
    with opened(dst_text, options=options) as (dst,):
        dst_info = dst.info("dst")
        check_compatible(head.info, dst_info)
        check_parent(dst_info, mkpath)
        if head.base is not None and head.base.id not in {s.id for s in dst_info.lineage}:
            raise NoCommonSnapshot(f"{dst.address} lacks the stream's base snapshot "
                                   f"{head.base.number} ({head.base.id[:12]})")
        if not dst_info.exists:
            dst.create_mirror(head.source, head.info.volume_id, head.info.hash,
                              head.info.block_size)
        try:
            with _lock_one(dst, wait):
                return _apply_stream(head, ch, dst, progress)
        except BaseException:
            if not dst_info.exists:  # nothing committed: not even the new mirror stays
                with suppress(Exception):
                    dst.discard_new()
            raise


class _lock_one:
    def __init__(self, ep, wait: float):
        self.ep, self.wait = ep, wait

    def __enter__(self):
        self.ep.lock(self.wait, resume=True)

    def __exit__(self, *exc):
        with suppress(Exception):
            self.ep.release()


def _apply_stream(head: StreamHeader, ch: _Digesting, dst, progress) -> StreamResult:
    dst_info = dst.info("dst")
    src_lineage = list(head.info.lineage)
    facts = dst.inspect_live()
    problem = refusal(TRANSFER, head.info, src_lineage, dst_info, facts)
    if problem is not None:
        raise problem
    lineages = plan_lineages(TRANSFER, src_lineage, list(dst_info.lineage))
    plan = TransferPlan(TRANSFER, lineages, tuple(src_lineage), tuple(dst_info.lineage),
                        empty_objects(HASHES[head.info.hash].size),
                        head.blocks, None, False, not dst_info.lineage)
    checked: dict = {}
    with receiving(dst):
        dst.begin([])
        progress_step(progress, "receive", head.size)
        count = dst.receive(_objects(ch, checked), progress)
        if not checked:
            raise IntegrityError("the stream ended without its trailer; nothing committed")
        if lineages.add:
            dst.add_snapshots(list(lineages.add))
            progress_step(progress, "write DST", counted=dst.is_local)
            skipped = dst.materialize(src_lineage[-1].root, progress)
        else:
            skipped = NotRestored()
        common = lineages.common
        dst.finish([s.id for s in dst_info.lineage], common.id if common else None,
                   [s.id for s in lineages.add], [], None, head.source, head.info.volume_id)
    return StreamResult(plan, head.base, ch.bytes_in + wire_bytes(dst), skipped,
                        (count.objects, count.bytes))


__all__ = ["receive", "send"]
