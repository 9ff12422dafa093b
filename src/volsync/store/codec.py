"""Checksummed msgpack envelopes for metadata files, with bounded decoding."""

from __future__ import annotations

from typing import Any

import msgpack
import xxhash

from ..errors import IntegrityError

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
        checker = msgpack.Unpacker(max_buffer_size=max(len(data), 1))
        checker.feed(data)
        checker.skip()
        if checker.tell() != len(data):
            raise ValueError("extra data")
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
        raise IntegrityError(f"{what}: undecodable ({type(exc).__name__})") from None


def seal(kind: str, payload: Any, version: int = FORMAT_VERSION) -> bytes:
    """Wrap a value as [magic, version, kind, body, xxh3-64 of body]."""
    body = pack(payload)
    return pack([MAGIC, version, kind, body, xxhash.xxh3_64_intdigest(body)])


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
    outer = unpack(data, what)
    if not (isinstance(outer, list) and len(outer) == 5 and outer[0] == MAGIC):
        raise IntegrityError(f"{what}: not a volsync {kind} file")
    _, got_version, got_kind, body, checksum = outer
    if got_version != version:
        raise IntegrityError(f"{what}: unsupported format version {got_version!r}")
    if got_kind != kind or not isinstance(body, bytes):
        raise IntegrityError(f"{what}: expected a {kind} file")
    if xxhash.xxh3_64_intdigest(body) != checksum:
        raise IntegrityError(f"{what}: checksum mismatch")
    return unpack(body, what)
