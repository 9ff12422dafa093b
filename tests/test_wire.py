"""Frames: size caps before allocation, zstd kept only where it shrinks a frame, and the
bandwidth limit as a smooth token bucket (a fake clock: no test asserts real timings)."""

from __future__ import annotations

import io
import os
import struct

import pytest

from volsync.wire import (
    FLAG_ZSTD,
    MAX_FRAME,
    Channel,
    ConnectionLost,
    NotVolsync,
    Pacer,
    ProtocolError,
)


def roundtrip(message, compress: bool) -> tuple[object, bytes]:
    out = io.BytesIO()
    Channel(None, out, compress=compress).send(message)
    raw = out.getvalue()
    return Channel(io.BytesIO(raw), None).recv(), raw


def test_compression_is_kept_only_where_it_shrinks_the_frame():
    text = ["objs", [[b"i" * 32, b"abc" * 100_000]]]
    noise = ["objs", [[b"i" * 32, os.urandom(300_000)]]]
    got, raw = roundtrip(text, compress=True)
    assert got == text and raw[4] == FLAG_ZSTD and len(raw) < 10_000
    got, raw = roundtrip(noise, compress=True)
    assert got == noise and raw[4] == 0  # random data: sent as it is
    got, raw = roundtrip(text, compress=False)
    assert got == text and raw[4] == 0


def test_sizes_are_checked_before_anything_is_allocated():
    huge = struct.pack(">IB", MAX_FRAME + 1, 0)
    with pytest.raises(ProtocolError):
        Channel(io.BytesIO(huge), None).recv()
    with pytest.raises(NotVolsync):  # the first frame: "not volsync", e.g. a shell banner
        Channel(io.BytesIO(b"Welcome to host\n"), None).recv_raw(first=True)
    with pytest.raises(ProtocolError):  # unknown flags
        Channel(io.BytesIO(struct.pack(">IB", 1, 0x80) + b"x"), None).recv()
    with pytest.raises(ConnectionLost):  # cut in the middle of a frame
        Channel(io.BytesIO(struct.pack(">IB", 100, 0) + b"x" * 10), None).recv()


def test_a_compressed_frame_cannot_claim_more_than_the_cap():
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(bytes(MAX_FRAME + 1024))
    frame = struct.pack(">IB", len(bomb), FLAG_ZSTD) + bomb
    with pytest.raises(ProtocolError):
        Channel(io.BytesIO(frame), None).recv()


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_bwlimit_paces_every_frame_smoothly():
    clock = FakeClock()
    pacer = Pacer(1_000_000, clock=clock, sleep=clock.sleep)
    for _ in range(100):
        pacer.take(100_000)  # 10 MB at 1 MB/s
    assert 9.5 <= clock.now <= 10.5
    # no burst: after the first 0.1 s bucket, every frame waits about its own share
    assert max(clock.slept) <= 0.11 and len(clock.slept) >= 95


def test_bwlimit_does_not_save_up_idle_time():
    clock = FakeClock()
    pacer = Pacer(1_000_000, clock=clock, sleep=clock.sleep)
    clock.now += 60  # a minute of idling
    for _ in range(20):
        pacer.take(100_000)
    assert clock.now - 60 >= 1.8  # at most one 0.1 s bucket is ever saved up
