"""Frames on a byte pipe: what the ssh protocol and send/receive streams are made of.

A frame is a 5-byte header (payload length, big-endian u32; one flags byte) and a msgpack
payload, zstd-compressed when FLAG_ZSTD is set. Everything read is bounded before it is
allocated: a frame's length, its decompressed size and every msgpack container (a peer is
hostile input). `--compress` compresses each frame and keeps it compressed only when that
makes it smaller; `--bwlimit` paces frames by a token bucket refilled smoothly."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import BinaryIO

import msgpack

from .errors import IntegrityError, VolsyncError

HEADER = struct.Struct(">IB")
FLAG_ZSTD = 1
MAX_FRAME = 24 << 20  # a batch of objects (each at most 4 MiB) plus framing
MAX_ITEMS = 1 << 20  # entries in one msgpack array or map
BATCH_BYTES = 4 << 20  # objects per frame, by size
COMPRESS_MIN = 512  # smaller frames are sent as they are


class ConnectionLost(VolsyncError):
    """The peer went away or the pipe broke (exit 1)."""

    code = 1


class ProtocolError(IntegrityError):
    """The peer broke the protocol: a malformed or oversized message (exit 6)."""


class NotVolsync(VolsyncError):
    """The far side does not speak the volsync protocol at all (exit 1): a shell banner,
    another program, a version with nothing in common."""

    code = 1


def pack(message: object) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> object:
    try:
        return msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True,
            max_bin_len=MAX_FRAME, max_str_len=1 << 20,
            max_array_len=MAX_ITEMS, max_map_len=1 << 12, max_ext_len=0)
    except Exception as exc:  # noqa: BLE001 - every decoding failure is the peer's fault
        raise ProtocolError(f"malformed message ({type(exc).__name__}: {exc})") from None


class Pacer:
    """A token bucket refilled at `rate` bytes per second, 0.1 s deep: each frame waits for
    its own bytes, so the rate is smooth rather than a burst per pack."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.rate = rate
        self.depth = max(rate / 10, 1.0)
        self.tokens = self.depth
        self.clock, self.sleep = clock, sleep
        self.last = clock()

    def take(self, n: int) -> None:
        now = self.clock()
        self.tokens = min(self.depth, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        if self.tokens < 0:
            self.sleep(-self.tokens / self.rate)


class Channel:
    """Send and receive frames on two pipes, counting the bytes that crossed."""

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO, *, compress: bool = False,
                 bwlimit: int | None = None, peer: str = "peer"):
        self.rfile, self.wfile = rfile, wfile
        self.compress = compress
        self.pacer = Pacer(bwlimit) if bwlimit else None
        self.peer = peer
        self.bytes_out = 0
        self.bytes_in = 0
        self._zc = self._zd = None

    # --- sending ------------------------------------------------------------------------------
    def send(self, message: object) -> None:
        self.send_raw(pack(message))

    def send_raw(self, payload: bytes) -> None:
        flags = 0
        if self.compress and len(payload) >= COMPRESS_MIN:
            packed = self._compressor().compress(payload)
            if len(packed) < len(payload):
                payload, flags = packed, FLAG_ZSTD
        if len(payload) > MAX_FRAME:
            raise VolsyncError(f"internal: frame of {len(payload)} bytes is over the limit")
        frame = HEADER.pack(len(payload), flags) + payload
        if self.pacer:
            self.pacer.take(len(frame))
        try:
            self.wfile.write(frame)
        except (BrokenPipeError, ConnectionError, ValueError) as exc:
            raise ConnectionLost(f"connection to {self.peer} lost ({exc})") from None
        self.bytes_out += len(frame)

    def flush(self) -> None:
        try:
            self.wfile.flush()
        except (BrokenPipeError, ConnectionError, ValueError) as exc:
            raise ConnectionLost(f"connection to {self.peer} lost ({exc})") from None

    # --- receiving ----------------------------------------------------------------------------
    def recv(self) -> object:
        payload = self.recv_raw()
        if payload is None:
            raise ConnectionLost(f"connection to {self.peer} lost (end of stream)")
        return unpack(payload)

    def recv_raw(self, first: bool = False) -> bytes | None:
        """The next frame's payload, or None at a clean end of stream (between frames)."""
        head = self._read(HEADER.size, allow_eof=True)
        if head is None:
            return None
        length, flags = HEADER.unpack(head)
        if length > MAX_FRAME or flags & ~FLAG_ZSTD:
            if first:
                shown = head.decode("ascii", "replace").strip()
                raise NotVolsync(f"{self.peer} does not speak the volsync protocol "
                                 f"(it said {shown!r}...)")
            raise ProtocolError(f"frame from {self.peer} is too large or malformed "
                                f"({length} bytes, flags {flags})")
        payload = self._read(length)
        if flags & FLAG_ZSTD:
            payload = self._decompress(payload)
        return payload

    def _read(self, n: int, allow_eof: bool = False) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            try:
                chunk = self.rfile.read(n - got)
            except (ConnectionError, ValueError) as exc:
                raise ConnectionLost(f"connection to {self.peer} lost ({exc})") from None
            if not chunk:
                if allow_eof and got == 0:
                    return None
                raise ConnectionLost(f"connection to {self.peer} lost (cut in the middle of "
                                     "a frame)")
            chunks.append(chunk)
            got += len(chunk)
        self.bytes_in += n
        return b"".join(chunks)

    def _compressor(self):
        if self._zc is None:
            import zstandard
            self._zc = zstandard.ZstdCompressor(level=3)
        return self._zc

    def _decompress(self, payload: bytes) -> bytes:
        import zstandard
        if self._zd is None:
            self._zd = zstandard.ZstdDecompressor()
        try:
            size = zstandard.frame_content_size(payload)
            if size > MAX_FRAME:
                raise ProtocolError(f"compressed frame from {self.peer} claims {size} bytes")
            return self._zd.decompress(payload, max_output_size=MAX_FRAME)
        except zstandard.ZstdError as exc:
            raise ProtocolError(f"bad compressed frame from {self.peer}: {exc}") from None


def object_batches(objects, limit: int = BATCH_BYTES):
    """Group (id, data) pairs into lists of about `limit` bytes, one frame each."""
    batch, size = [], 0
    for object_id, data in objects:
        batch.append((bytes(object_id), bytes(data)))
        size += len(data) + 40
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
