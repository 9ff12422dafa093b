"""`volsync serve --stdio`: one session per connection, serving one volume's `LocalEndpoint`.

The server answers requests from an allowlist and never asks anything itself. It refuses a
volume outside `--restrict-to-path` (compared as resolved real paths, so `..` and symlinks
cannot escape) and, with `--read-only`, every change. The volume's lock is held by this
process, so it is released when the connection drops; an interrupted transfer keeps what was
received (sealed) and its journal, as a crash would, and the rerun resumes it."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import __version__
from ..endpoint import LocalEndpoint
from ..errors import BadArgument, VolsyncError
from ..model import HASHES, READ_ONLY, READ_WRITE, BlockId
from ..store.fsutil import nearest_real
from ..wire import Channel, ConnectionLost, ProtocolError, object_batches
from . import protocol as p

# a whole command: (argv, check_path, read_only, write_stdout) -> (exit code, stderr)
RunCommand = Callable[[list[str], Callable[[str], str], bool, Callable[[bytes], None]],
                      tuple[int, str]]
EXPORT_MAX_IDS = 1 << 16
OUT_CHUNK = 1 << 20  # stdout bytes per "out" frame


class Refused(VolsyncError):
    code = 1


def resolve_inside(path: str, restrict: list[str]) -> str:
    """The absolute path a peer names, refused unless its real path (the nearest existing
    parent's, plus the rest) lies inside one of `restrict`."""
    if "\0" in path or not path:
        raise Refused("bad path from peer")
    absolute = os.path.abspath(path)
    if not restrict:
        return absolute
    real = nearest_real(Path(absolute))  # abspath has already taken out '..' and '.'
    for allowed in restrict:
        top = os.path.realpath(allowed)
        if real == top or real.startswith(top.rstrip(os.sep) + os.sep):
            return absolute
    raise Refused(f"{path} is outside the paths this server may use "
                  f"({', '.join(restrict)})")


class Session:
    def __init__(self, channel: Channel, restrict: list[str], read_only: bool,
                 run_command: RunCommand | None):
        self.ch = channel
        self.restrict = restrict
        self.read_only = read_only
        self.run_command = run_command
        self.endpoint: LocalEndpoint | None = None
        self.id_size = 0
        self.begun = False

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        self.ch.send(["hello", {"magic": p.MAGIC, "versions": list(p.VERSIONS),
                                "caps": list(p.CAPABILITIES), "program": __version__}])
        self.ch.flush()
        self._hello(self.ch.recv())
        try:
            while True:
                request = self.ch.recv()
                if not (isinstance(request, list) and len(request) == 2
                        and isinstance(request[0], str) and isinstance(request[1], dict)):
                    raise ProtocolError("malformed request")
                method, args = request
                if method == "bye":
                    self.ch.send(["ok", None])
                    self.ch.flush()
                    return 0
                self._answer(method, args)
        except ConnectionLost:
            return 1  # the client went away: the endpoint is left as a crash leaves it
        finally:
            if self.endpoint is not None:
                if self.begun:
                    self.endpoint.interrupted()
                self.endpoint.release()

    def _hello(self, hello: object) -> None:
        if not (isinstance(hello, list) and len(hello) == 2 and hello[0] == "hello"
                and isinstance(hello[1], dict) and hello[1].get("magic") == p.MAGIC):
            raise ProtocolError("peer does not speak the volsync protocol")
        body = hello[1]
        versions = body.get("versions")
        if not isinstance(versions, list) or not set(versions) & set(p.VERSIONS):
            raise ProtocolError("no protocol version in common with the client")
        caps = body.get("caps") if isinstance(body.get("caps"), list) else []
        if "zstd" in caps and body.get("compress") is True:
            self.ch.compress = True
        rate = body.get("bwlimit")
        if isinstance(rate, int) and rate > 0:
            from ..wire import Pacer
            self.ch.pacer = Pacer(rate)

    def _answer(self, method: str, args: dict) -> None:
        try:
            if method not in p.METHODS:
                raise ProtocolError(f"unknown request {method!r}")
            if method == "snapshot_source" and self.read_only:
                method = "snapshot_source_read_only"
            elif self.read_only and method in p.WRITE_METHODS:
                raise Refused(f"this server is read-only: {method} refused")
            if method not in ("open", "run", "run_stream") and self.endpoint is None:
                raise ProtocolError("no volume opened")
            result = getattr(self, "do_" + method)(**args)
            if method in ("read", "export"):
                return  # streamed, ended by its own frame
            self.ch.send(["ok", result])
        except ConnectionLost:
            raise
        except TypeError as exc:
            self.ch.send(p.encode_error(ProtocolError(f"bad arguments to {method}: {exc}")))
        except (VolsyncError, OSError) as exc:
            self.ch.send(p.encode_error(exc))
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here is reported, not a crash
            traceback.print_exc(file=sys.stderr)
            self.ch.send(p.encode_error(VolsyncError(f"internal error on the server: {exc!r}")))
        self.ch.flush()

    # --- requests ---------------------------------------------------------------------------
    def do_open(self, path: bytes, role: str) -> dict:
        if self.endpoint is not None:
            raise ProtocolError("a session serves one volume")
        if not isinstance(path, bytes) or role not in ("src", "dst"):
            raise ProtocolError("bad open request")
        where = resolve_inside(os.fsdecode(path), self.restrict)
        self.endpoint = LocalEndpoint(where)
        return self.do_info(role)

    def do_info(self, role: str = "src") -> dict:
        info = self.endpoint.info(role)
        if info.exists:
            self.id_size = HASHES[info.hash].size
        return p.info_out(info)

    def do_create_mirror(self, upstream: str, upstream_id: str, hash: str, block_size: int
                         ) -> dict:
        if hash not in HASHES or not isinstance(block_size, int):
            raise ProtocolError("bad create request")
        self.endpoint.create_mirror(str(upstream), str(upstream_id), hash, block_size)
        return self.do_info("dst")

    def do_lock(self, wait: float, resume: bool) -> None:
        self.endpoint.lock(min(float(wait), 86400.0), bool(resume), shared=self.read_only)

    def do_release(self) -> None:
        self.endpoint.release()

    def do_share(self, wait: float) -> None:
        self.endpoint.share(min(float(wait), 86400.0))

    def do_hold(self, mirror_id: str, address: str, snapshots: list) -> bool:
        if self.read_only:  # a pull through a read-only server records no hold
            return False
        return self.endpoint.hold(*_hold_args(mirror_id, address, snapshots))

    def do_settle_hold(self, mirror_id: str, address: str, snapshots: list,
                       wait: float) -> bool:
        if self.read_only:
            return False
        return self.endpoint.settle_hold(*_hold_args(mirror_id, address, snapshots),
                                         min(float(wait), 86400.0))

    def do_mark_updated(self) -> None:
        self.endpoint.mark_updated()

    def do_snapshot_source(self, strict: bool | None = None) -> dict | None:
        """strict None: a client without "file_warnings" (just the snapshot, strict)."""
        return self._source_snapshot(False, strict)

    def do_snapshot_source_read_only(self, strict: bool | None = None) -> None:
        """A read-only server sends what is snapshotted; unsnapshotted changes refuse."""
        if self.endpoint.would_change_source():
            raise Refused(f"{self.endpoint.root} has changes that are not snapshotted and "
                          "this server is read-only: snapshot it there, or pass --no-snapshot")

    def do_snapshot_source_dry(self, strict: bool | None = None) -> dict | None:
        return self._source_snapshot(True, strict)

    def _source_snapshot(self, dry_run: bool, strict: bool | None) -> dict | None:
        if strict is not None and not isinstance(strict, bool):
            raise ProtocolError("bad snapshot_source request")
        ep = self.endpoint
        snap = ep.snapshot_source(dry_run=dry_run, strict=strict is not False)
        if strict is None:
            return p.snap_out(snap)
        return p.source_snapshot_out(snap, ep.scan_warnings)

    def do_would_change_source(self) -> bool:
        return self.endpoint.would_change_source()

    def do_read(self, ids: list) -> None:
        ids = p.ids_in(ids, self.id_size)
        self._stream(zip(ids, self.endpoint.read(ids), strict=True))

    def do_export(self, ids: list) -> None:
        ids = p.ids_in(ids, self.id_size)
        if len(ids) > EXPORT_MAX_IDS:
            raise ProtocolError("too many ids in one request")
        self._stream(self.endpoint.export(ids))

    def _stream(self, objects: Iterator[tuple[BlockId, bytes]]) -> None:
        try:
            for batch in object_batches(objects):
                self.ch.send(["objs", batch])
        except (VolsyncError, OSError) as exc:
            self.ch.send(p.encode_error(exc))
            self.ch.flush()
            return
        self.ch.send(["end", {}])
        self.ch.flush()

    def do_has(self, ids: list) -> bytes:
        ids = p.ids_in(ids, self.id_size)
        return bytes(self.endpoint.has([BlockId(i) for i in ids]))

    def do_inspect_live(self) -> list:
        return p.facts_out(self.endpoint.inspect_live())

    def do_keep_live_changes(self) -> dict | None:
        return p.snap_out(self.endpoint.keep_live_changes())

    def do_begin(self, kept: list) -> None:
        self.endpoint.begin([_snap_id(i) for i in kept])
        self.begun = True

    def do_receive(self) -> dict:
        """Objects until ["end"]; after an error the rest is read and dropped, so the
        client learns of it by its next read and the session goes on."""
        self._ended = False
        try:
            count = self.endpoint.receive(self._incoming())
        except (VolsyncError, OSError):
            if not self._ended:
                self._drain()
            raise
        return {"objects": count.objects, "bytes": count.bytes}

    def _incoming(self) -> Iterator[tuple[bytes, bytes]]:
        while True:
            frame = self.ch.recv()
            if isinstance(frame, list) and len(frame) == 2 and frame[0] == "end":
                self._ended = True
                if isinstance(frame[1], dict) and frame[1].get("abort"):
                    raise Refused("the sending side stopped; nothing committed")
                return
            if not (isinstance(frame, list) and len(frame) == 2 and frame[0] == "objs"
                    and isinstance(frame[1], list)):
                raise ProtocolError("malformed object frame")
            for item in frame[1]:
                if not (isinstance(item, list) and len(item) == 2
                        and isinstance(item[0], bytes) and isinstance(item[1], bytes)):
                    raise ProtocolError("malformed object in frame")
                yield item[0], item[1]

    def _drain(self) -> None:
        while True:
            frame = self.ch.recv()
            if isinstance(frame, list) and frame[:1] == ["end"]:
                return

    def do_add_snapshots(self, snaps: list) -> None:
        self.endpoint.add_snapshots([p.snap_in(s, self.id_size) for s in snaps])

    def do_materialize(self, target: bytes) -> dict:
        return p.skipped_out(self.endpoint.materialize(BlockId(p.ids_in([target],
                                                                         self.id_size)[0])))

    def do_finish(self, expect_lineage: list, common: str | None, added: list, removed: list,
                  live: str | None, upstream: str, upstream_id: str) -> None:
        self.endpoint.finish([_snap_id(i) for i in expect_lineage],
                             None if common is None else _snap_id(common),
                             [_snap_id(i) for i in added], [_snap_id(i) for i in removed],
                             None if live is None else _snap_id(live), str(upstream),
                             str(upstream_id))
        self.begun = False

    def do_undo(self) -> None:
        self.endpoint.undo()
        self.begun = False

    def do_discard_new(self) -> None:
        self.endpoint.discard_new()

    def do_interrupted(self) -> None:
        self.endpoint.interrupted()

    def do_set_role(self, mode: str, upstream: str | None, upstream_id: str | None,
                    journal: dict | None) -> None:
        if mode not in (READ_ONLY, READ_WRITE):
            raise ProtocolError("bad mode")
        if journal is not None and not (isinstance(journal, dict) and len(journal) < 8):
            raise ProtocolError("bad journal")
        self.endpoint.set_role(mode, upstream, upstream_id, journal)

    def do_clear_journal(self) -> None:
        self.endpoint.clear_journal()

    def do_snapshot_record(self, snap_id: str) -> dict:
        return p.snap_out(self.endpoint.snapshot_record(_snap_id(snap_id)))

    def do_run(self, argv: list) -> dict:
        """A whole command, its stdout answered at the end as text (for older clients)."""
        out = bytearray()
        code, err = self._run(argv, out.extend)
        return {"code": code, "out": out.decode("utf-8", "replace"), "err": err}

    def do_run_stream(self, argv: list) -> dict:
        """A whole command, its stdout sent as it is written, bytes as they are, in
        ["out", bytes] frames (`cat` of a big file needs no more memory than a frame)."""
        def send(data: bytes) -> None:
            for start in range(0, len(data), OUT_CHUNK):
                self.ch.send(["out", bytes(data[start : start + OUT_CHUNK])])

        code, err = self._run(argv, send)
        return {"code": code, "err": err}

    def _run(self, argv: object, write_out: Callable[[bytes], None]) -> tuple[int, str]:
        if (self.run_command is None or not isinstance(argv, list)
                or not all(isinstance(a, str) for a in argv)):
            raise ProtocolError("bad run request")
        return self.run_command(argv, lambda path: resolve_inside(path, self.restrict),
                                self.read_only, write_out)


def _hold_args(mirror_id: object, address: object, snapshots: object
               ) -> tuple[str, str, list[str]]:
    if not (isinstance(mirror_id, str) and len(mirror_id) <= 128 and isinstance(address, str)
            and len(address) <= 4096 and isinstance(snapshots, list) and len(snapshots) <= 8):
        raise ProtocolError("malformed hold")
    return mirror_id, address, [_snap_id(s) for s in snapshots]


def _snap_id(value: object) -> str:
    from ..store.volume import valid_snapshot_id
    if not valid_snapshot_id(value):
        raise ProtocolError("malformed snapshot id from peer")
    return value


def serve_stdio(restrict: list[str], read_only: bool, run_command: RunCommand | None) -> int:
    """Speak the protocol on stdin/stdout. Anything else writing to stdout would corrupt the
    stream, so fd 1 is kept for the protocol and sys.stdout points at stderr."""
    for path in restrict:
        if not os.path.isdir(path):
            raise BadArgument(f"--restrict-to-path {path}: no such directory")
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    rfile = os.fdopen(os.dup(0), "rb", buffering=1 << 20)
    wfile = os.fdopen(out_fd, "wb", buffering=1 << 20)
    channel = Channel(rfile, wfile, peer="client")
    try:
        return Session(channel, restrict, read_only, run_command).run()
    except ProtocolError as exc:
        print(f"volsync serve: {exc}", file=sys.stderr)
        return 6
    finally:
        try:
            wfile.flush()
        except OSError:
            pass
