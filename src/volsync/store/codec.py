"""Checksummed msgpack envelopes for metadata files, with bounded decoding."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import msgpack
import xxhash

from ..errors import IntegrityError
from .fsutil import pwrite_all

MAGIC = "volsync"
FORMAT_VERSION = 2
FORMAT_1 = 1  # read only by `volsync upgrade`


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, what: str) -> Any:
    """Decode msgpack with memory bounded by the input size. unpackb bounds each declared
    length by the input size, but preallocates every array or map its header announces, so
    deep nesting of large claims (1,000 levels each claiming len(input) items) would take
    thousands of times the input. A first pass skips over the whole value without building
    anything, so only complete input (every announced item present) is decoded."""
    try:
        view = memoryview(data)
        limit = max(len(view), 1)
        checker = msgpack.Unpacker(_Chunks(view), read_size=min(limit, 1 << 20),
                                   max_buffer_size=limit)
        checker.skip()  # fed in chunks: the input is not copied whole
        if checker.tell() != len(view):
            raise ValueError("extra data")
        return msgpack.unpackb(view, raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
        raise IntegrityError(f"{what}: undecodable ({type(exc).__name__})") from None


class _Chunks:
    """A file-like view of a buffer, read a chunk at a time."""

    def __init__(self, view: memoryview):
        self.view, self.pos = view, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n < 0 else min(len(self.view), self.pos + n)
        chunk = bytes(self.view[self.pos:end])
        self.pos = end
        return chunk


def seal(kind: str, payload: Any, version: int = FORMAT_VERSION) -> bytes:
    """Wrap a value as [magic, version, kind, body, xxh3-64 of body]."""
    body = pack(payload)
    return pack([MAGIC, version, kind, body, xxhash.xxh3_64_intdigest(body)])


def write_sealed_map(fd: int, kind: str, count: int, items: Iterable[tuple[Any, Any]],
                     version: int = FORMAT_VERSION) -> None:
    """Write `seal(kind, dict(items))` into the new file `fd` an item at a time: the body is
    never whole in memory (a stat cache of a million files is tens of MB, and a sealed copy
    of it as many again). The body's length goes in last, at its place in the header (a
    4-byte bin length, which `open_sealed` and any msgpack decoder read)."""
    packer = msgpack.Packer(use_bin_type=True)
    head = packer.pack_array_header(5) + b"".join(map(packer.pack, (MAGIC, version, kind)))
    pwrite_all(fd, head + b"\xc6\0\0\0\0", 0)
    start = pos = len(head) + 5
    digest, batch = xxhash.xxh3_64(), []
    for chunk in _map_chunks(packer, count, items):
        batch.append(chunk)
        if len(batch) >= 4096 or chunk is None:
            data = b"".join(c for c in batch if c is not None)
            digest.update(data)
            pwrite_all(fd, data, pos)
            pos, batch = pos + len(data), []
    if pos - start >= 1 << 32:
        raise ValueError(f"{kind}: too large to seal")
    pwrite_all(fd, packer.pack(digest.intdigest()), pos)
    pwrite_all(fd, (pos - start).to_bytes(4, "big"), start - 4)


def _map_chunks(packer, count: int, items: Iterable[tuple[Any, Any]]
                ) -> Iterator[bytes | None]:
    """The packed map, a piece at a time, then None; exactly `count` items or an error."""
    yield packer.pack_map_header(count)
    written = 0
    for key, value in items:
        written += 1
        yield packer.pack(key) + packer.pack(value)
    if written != count:
        raise ValueError(f"{written} items where {count} were announced")
    yield None


def envelope_version(data: bytes) -> int | None:
    """The format version a sealed file was written with (None if it is not one)."""
    try:
        outer = unpack(data, "envelope")
    except IntegrityError:
        return None
    if isinstance(outer, list) and len(outer) == 5 and outer[0] == MAGIC \
            and isinstance(outer[1], int):
        return outer[1]
    return None


def open_sealed(data: bytes, kind: str, what: str, version: int = FORMAT_VERSION) -> Any:
    outer = _envelope(data)  # the body a view into `data`, not a copy (statcache: ~45 MB
    if outer is None:        # at a million files), where the layout is seal()'s own
        outer = unpack(data, what)
    if not (isinstance(outer, list) and len(outer) == 5 and outer[0] == MAGIC):
        raise IntegrityError(f"{what}: not a volsync {kind} file")
    _, got_version, got_kind, body, checksum = outer
    if got_version != version:
        raise IntegrityError(f"{what}: unsupported format version {got_version!r}")
    if got_kind != kind or not isinstance(body, bytes | memoryview):
        raise IntegrityError(f"{what}: expected a {kind} file")
    if xxhash.xxh3_64_intdigest(body) != checksum:
        raise IntegrityError(f"{what}: checksum mismatch")
    return unpack(body, what)


_BIN_LENGTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # msgpack bin 8/16/32: bytes of the length


def _envelope(data: bytes) -> list | None:
    """[magic, version, kind, body, checksum] read exactly as `seal` lays them out (a fixed
    array of 5, a bin body), the body as a memoryview of `data`; None for anything else,
    which the general decoder then reads (and names what is wrong with it)."""
    view = memoryview(data)
    try:
        head = msgpack.Unpacker(max_buffer_size=64)
        head.feed(view[:64])
        if head.read_array_header() != 5:
            return None
        items = [head.unpack() for _ in range(3)]
        pos = head.tell()
        size = _BIN_LENGTH.get(view[pos])
        if size is None:
            return None
        start = pos + 1 + size
        end = start + int.from_bytes(view[pos + 1:start], "big")
        checksum = unpack(view[end:], "envelope")
    except Exception:  # noqa: BLE001 - not seal()'s layout: the general decoder reports it
        return None
    if end > len(view) or type(checksum) is not int:
        return None
    return [*items, view[start:end], checksum]
