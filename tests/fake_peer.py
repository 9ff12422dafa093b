#!/usr/bin/env python3
"""A hostile stand-in for `volsync serve --stdio`, for tests/test_remote_faults.py.

    fake_peer.py MODE [serve --stdio ...]

Used as VOLSYNC_REMOTE_PATH = "PYTHON fake_peer.py MODE", so the client runs
`PYTHON fake_peer.py MODE serve --stdio` on the "far side" (through the rsh shim).

Raw modes speak (or fail to speak) the framing by hand: 5-byte header (u32 big-endian length,
flags byte, 1 = zstd) and a msgpack payload. After their hostile frame they either exit
(MODE ends in "-exit") or, by default, keep reading the client's frames and never answer (a
silent peer that keeps the connection open; the client must not hang on it).

Wrapping modes ("wrap-...") run the real server (volsync.cli.main(["serve", "--stdio"]))
with one method of volsync.endpoint.LocalEndpoint patched to misbehave.
"""

from __future__ import annotations

import os
import random
import struct
import sys

import msgpack

HEADER = struct.Struct(">IB")
MAGIC = "volsync-protocol"
HELLO = ["hello", {"magic": MAGIC, "versions": [1], "caps": ["zstd"], "program": "fake"}]

out = inp = None  # fd 1 and fd 0, opened by raw_mode


def log(message: str) -> None:
    """Nothing on stderr by default: the client relays it, and tests count stderr lines."""
    if os.environ.get("FAKE_PEER_DEBUG"):
        sys.stderr.write(f"fake_peer: {message}\n")


def frame(payload: bytes, flags: int = 0, length: int | None = None) -> bytes:
    return HEADER.pack(len(payload) if length is None else length, flags) + payload


def send(message: object) -> None:
    out.write(frame(msgpack.packb(message, use_bin_type=True)))


def read_exact(n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = inp.read(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv() -> object:
    head = read_exact(HEADER.size)
    if head is None:
        sys.exit(0)
    length, _flags = HEADER.unpack(head)
    payload = read_exact(length)
    if payload is None:
        sys.exit(0)
    try:
        return msgpack.unpackb(payload, raw=False)
    except Exception:  # noqa: BLE001 - a fake; whatever came is ignored
        return None


def linger(exit_now: bool) -> None:
    """After the hostile frame: exit, or stay connected and never answer again."""
    if exit_now:
        sys.exit(0)
    while True:
        message = recv()
        log(f"ignored {str(message)[:80]}")


def zstd_header_claiming(size: int) -> bytes:
    """A zstd frame header whose Frame_Content_Size field (8 bytes) says `size`, followed by
    one empty raw last block (the frame itself is a lie)."""
    magic = struct.pack("<I", 0xFD2FB528)
    fhd = bytes([0xC0])  # FCS field 8 bytes, not single segment, no checksum, no dict
    window = bytes([0x58])
    fcs = struct.pack("<Q", size)
    block = bytes([0x01, 0x00, 0x00])  # last block, raw, size 0
    return magic + fhd + window + fcs + block


def zstd_bomb(size: int) -> bytes:
    """A small zstd frame that decompresses to `size` zero bytes, its size not in the header."""
    import zstandard

    return zstandard.ZstdCompressor(write_content_size=False).compress(bytes(size))


def random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63 - 1, -(2**63), rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice(["", "ok", "err", "hello", "blake3", "x" * 50, "\u00e9"])
    if kind == 4:
        return rng.randbytes(rng.choice([0, 1, 16, 32, 33]))
    if kind == 5:
        return rng.random()
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = ["exists", "hash", "block_size", "lineage", "preserved", "volume_id", "mode",
            "upstream", "upstream_id", "journal", "journal_peer", "address", "id", "number",
            "root", "created", "label", "size", "files", "origin"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(6))}


def info_like(rng: random.Random) -> object:
    """A volume description with one or two fields spoiled."""
    body = {"address": "x", "exists": True, "volume_id": "v" * 32, "hash": "blake3",
            "block_size": 65536, "mode": "read-write", "upstream": None, "upstream_id": None,
            "lineage": [], "preserved": [], "journal": None, "journal_peer": None}
    for _ in range(rng.randrange(1, 3)):
        body[rng.choice(list(body))] = random_value(rng, 1)
    if rng.random() < 0.5:
        body["lineage"] = [random_value(rng, 2) for _ in range(rng.randrange(1, 3))]
    return body


def raw_mode(mode: str) -> None:
    global out, inp
    out = os.fdopen(1, "wb", buffering=0)
    inp = os.fdopen(0, "rb", buffering=0)
    exit_now = mode.endswith("-exit")
    base = mode.removesuffix("-exit")
    if base == "banner":  # a login banner / shell rc output, then nothing volsync-like
        out.write(b"Welcome to Ubuntu 22.04.3 LTS (GNU/Linux 5.15.0-91-generic x86_64)\n"
                  b"Last login: Mon Jan  1 00:00:00 2024 from 10.0.0.1\n")
        linger(exit_now)
    if base == "short-banner":  # fewer bytes than a frame header
        out.write(b"hi\n")
        linger(exit_now)
    if base == "huge-first":  # the very first frame claims 4 GiB
        out.write(frame(b"\x00" * 16, length=0xFFFFFFFF))
        linger(exit_now)
    if base == "garbage-hello":  # framing fine, payload not msgpack
        out.write(frame(b"\xc1\xc1\xc1 not msgpack at all"))
        linger(exit_now)
    if base == "wrong-hello":  # msgpack fine, not a hello
        send(["hello", {"magic": "something-else", "versions": [1]}])
        linger(exit_now)
    if base == "future-hello":  # a hello with no version in common
        send(["hello", {"magic": MAGIC, "versions": [99, 100]}])
        linger(exit_now)
    # the rest: a valid hello, then the hostile answer to the client's first request
    send(HELLO)
    recv()  # the client's hello
    recv()  # its first request (open)
    if base == "huge-frame":  # a header claiming 4 GiB (u32 max)
        out.write(frame(b"\x00" * 64, length=0xFFFFFFFF))
    elif base == "over-cap-frame":  # just over the 24 MiB cap
        out.write(frame(b"\x00" * 64, length=(24 << 20) + 1))
    elif base == "bad-flags":
        out.write(frame(msgpack.packb(["ok", None]), flags=0x80))
    elif base == "garbage-msgpack":
        out.write(frame(b"\xc1\xc1\xc1\xc1garbage"))
    elif base == "array-bomb":  # array32 claiming 4G items
        out.write(frame(b"\xdd\xff\xff\xff\xff" + b"\x00" * 64))
    elif base == "bin-bomb":  # bin32 claiming 4 GiB
        out.write(frame(b"\x92\xa2ok\xc6\xff\xff\xff\xff" + b"\x00" * 64))
    elif base == "map-bomb":
        out.write(frame(b"\x92\xa2ok\xdf\xff\xff\xff\xff" + b"\x00" * 64))
    elif base == "deep-nesting":  # 200k nested arrays
        out.write(frame(b"\x91" * 200_000 + b"\xc0"))
    elif base == "trailing-bytes":  # a valid message followed by junk in the same frame
        out.write(frame(msgpack.packb(["ok", None]) + b"\x00\x01"))
    elif base == "cut-frame":  # a header promising 1 MiB, 10 bytes, then the end
        out.write(frame(b"\x00" * 10, length=1 << 20))
        sys.exit(0)
    elif base == "zstd-claims-huge":  # a zstd frame whose header claims 4 GiB
        out.write(frame(zstd_header_claiming(4 << 30), flags=1))
    elif base == "zstd-claims-over-cap":
        out.write(frame(zstd_header_claiming((24 << 20) + 1), flags=1))
    elif base == "zstd-bomb":  # no size in the header; 1 GiB of zeros in ~30 KiB
        out.write(frame(zstd_bomb(1 << 30), flags=1))
    elif base == "zstd-garbage":
        out.write(frame(b"\x28\xb5\x2f\xfd" + b"\xff" * 100, flags=1))
    elif base == "err-multiline":  # an error text with newlines and a terminal escape
        send(["err", 1, "no such volume\nvolsync: error: fake second line\x1b[2J\x1b[31m", {}])
    elif base.startswith("fuzz-reply"):  # seeded random structure as the reply to open
        rng = random.Random(int(base.rsplit("-", 1)[1]))
        body = info_like(rng) if rng.random() < 0.6 else random_value(rng)
        reply = ["ok", body] if rng.random() < 0.8 else ["err", random_value(rng),
                                                         random_value(rng), random_value(rng)]
        log(f"reply {reply!r}"[:300])
        send(reply)
    else:
        sys.stderr.write(f"fake_peer: unknown mode {mode}\n")
        sys.exit(2)
    linger(exit_now)


# --- wrapping the real server -----------------------------------------------------------------

def wrap_mode(mode: str, argv: list[str]) -> None:
    from volsync import endpoint
    from volsync.cli import main

    LocalEndpoint = endpoint.LocalEndpoint
    real_export, real_read, real_has = (LocalEndpoint.export, LocalEndpoint.read,
                                        LocalEndpoint.has)

    def flip(data: bytes) -> bytes:
        if not data:
            return b"\x00"
        b = bytearray(data)
        b[len(b) // 2] ^= 0x55
        return bytes(b)

    def export(self, ids):
        items = list(real_export(self, ids))
        if mode == "wrap-export-corrupt":  # the largest object (a file block) is damaged
            i = max(range(len(items)), key=lambda k: len(items[k][1]))
            items[i] = (items[i][0], flip(items[i][1]))
        elif mode == "wrap-export-swap":  # a real object, sent under another object's id
            if len(items) >= 2:
                items[0], items[1] = (items[0][0], items[1][1]), (items[1][0], items[0][1])
        elif mode == "wrap-export-last-corrupt":  # damage only the last object (a tree)
            items[-1] = (items[-1][0], flip(items[-1][1]))
        elif mode == "wrap-export-extra":  # an object nobody asked for
            items.insert(1, (bytes(len(items[0][0])), b"unasked"))
        elif mode == "wrap-export-missing":  # one object left out
            del items[len(items) // 2]
        elif mode == "wrap-export-short-id":  # an id of the wrong length
            items[0] = (items[0][0][:-1], items[0][1])
        yield from items

    def read(self, ids):
        answer = real_read(self, ids)
        if mode == "wrap-read-corrupt":  # trees and lists for planning, damaged
            answer = [flip(a) for a in answer]
        elif mode == "wrap-read-garbage":
            answer = [os.urandom(len(a)) for a in answer]
        return answer

    def has(self, ids):
        answer = real_has(self, ids)
        if mode == "wrap-has-short":
            return answer[:-1]
        if mode == "wrap-has-long":
            return answer + [True, True]
        if mode == "wrap-has-all":  # lies: claims every object
            return [True] * len(answer)
        return answer

    LocalEndpoint.export = export
    LocalEndpoint.read = read
    LocalEndpoint.has = has
    if mode == "wrap-read-short":  # one object asked for is not sent
        from volsync.remote import server

        def do_read(self, ids):
            ids = ids[:-1]
            self._stream(zip(ids, self.endpoint.read(ids), strict=True))

        server.Session.do_read = do_read
    if mode == "wrap-has-notbytes":
        from volsync.remote import server

        server.Session.do_has = lambda self, ids: [1] * len(ids)
    main(argv)


def main() -> None:
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode.startswith("wrap-"):
        wrap_mode(mode, argv)
    else:
        raw_mode(mode)


if __name__ == "__main__":
    main()
