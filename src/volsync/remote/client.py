"""The invoking side of a remote volume: the ssh process, and `RemoteEndpoint`, which offers
the engine the methods of `LocalEndpoint` by asking `volsync serve --stdio` on the far side.

The system's ssh client is run (so `~/.ssh/config`, agents and jump hosts apply), with
keepalives so that a dead network ends the command (exit 1) within about a minute instead of
hanging. The far side's stderr is shown as log lines."""

from __future__ import annotations

import os
import select
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from itertools import islice

from .. import __version__
from ..endpoint import ReceiveCount
from ..errors import BadArgument
from ..model import BlockId, FileWarning, Snapshot
from ..plan import LiveFacts, VolumeInfo
from ..tree import NotRestored, Progress
from ..wire import (
    HEADER,
    MAX_FRAME,
    Channel,
    ConnectionLost,
    NotVolsync,
    Pacer,
    ProtocolError,
    object_batches,
)
from . import protocol as p
from . import spawn
from .address import RemoteAddress

HELLO_TIMEOUT = float(os.environ.get("VOLSYNC_CONNECT_TIMEOUT") or 60)  # login included
BYE_TIMEOUT = 5.0
EXPORT_BATCH = 2048  # ids per export request (128 MiB of 64 KiB blocks)


@dataclass(frozen=True)
class RemoteOptions:
    rsh: str = "ssh"
    remote_path: str = "volsync"
    compress: bool = False
    bwlimit: int | None = None

    @classmethod
    def from_env(cls, rsh: str | None = None, remote_path: str | None = None,
                 compress: bool = False, bwlimit: int | None = None) -> RemoteOptions:
        return cls(rsh or os.environ.get("VOLSYNC_RSH") or "ssh",
                   remote_path or os.environ.get("VOLSYNC_REMOTE_PATH") or "volsync",
                   compress, bwlimit)


class Connection:
    """One ssh session running `volsync serve --stdio`."""

    def __init__(self, address: RemoteAddress, options: RemoteOptions):
        self.address = address
        try:
            rsh = shlex.split(options.rsh)
        except ValueError as exc:
            raise BadArgument(f"bad --rsh {options.rsh!r}: {exc}") from None
        if not rsh:
            raise BadArgument("--rsh is empty")
        argv = spawn.ssh_argv(address, options.rsh, options.remote_path)
        try:  # a session the program started while it loaded, or a new one
            self.proc = spawn.take(argv) or spawn.start(argv)
        except OSError as exc:
            raise BadArgument(f"cannot run {rsh[0]!r} for {address}: {exc.strerror}") from None
        self.stderr_tail: list[str] = []
        self.broken = False
        self._connected = threading.Event()  # lines before the hello are kept for the error
        self._relay = threading.Thread(target=self._relay_stderr, daemon=True)
        self._relay.start()
        rfile = os.fdopen(os.dup(self.proc.stdout.fileno()), "rb", buffering=1 << 20)
        wfile = os.fdopen(os.dup(self.proc.stdin.fileno()), "wb", buffering=1 << 20)
        self.proc.stdout.close()
        self.proc.stdin.close()
        self.rfd = rfile.fileno()
        self.ch = Channel(rfile, wfile, compress=options.compress, bwlimit=options.bwlimit,
                          peer=address.host)
        self._hello(options)

    def _relay_stderr(self) -> None:
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if not self._connected.is_set():
                self.stderr_tail = (self.stderr_tail + [line])[-5:]
                continue
            self._show(line)

    def _show(self, line: str) -> None:
        sys.stderr.write(f"volsync: {self.address.host}: {line}\n")
        sys.stderr.flush()

    def _read_hello(self, deadline: float) -> bytes | None:
        """The first frame's payload, read straight from the pipe with a deadline (the
        buffered channel takes over after it); None if the far side closed at once."""
        head = self._read_exact(HEADER.size, deadline)
        if head is None:
            return None
        length, flags = HEADER.unpack(head)
        if length > MAX_FRAME or flags:
            shown = p.printable(head.decode("ascii", "replace").strip())
            self.broken = True
            raise NotVolsync(f"{self.address.host} does not speak the volsync protocol "
                             f"(it said {shown!r}...)")
        payload = self._read_exact(length, deadline)
        if payload is None:
            raise self._failed("the connection closed during the handshake")
        return payload

    def _read_exact(self, n: int, deadline: float) -> bytes | None:
        buf = b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.rfd, n - len(buf))
            if not chunk:
                return None
            buf += chunk
        self.ch.bytes_in += n
        return buf

    def _failed(self, why: str) -> ConnectionLost:
        self.broken = True
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._relay.join(timeout=1)
        if code == 127:
            return ConnectionLost(f"{self.address.host}: the remote command was not found "
                                  "(is volsync installed there? see --remote-path)")
        detail = f"; {p.printable(self.stderr_tail[-1])}" if self.stderr_tail else ""
        exit_text = f" (ssh exited with {code})" if code is not None else ""
        return ConnectionLost(f"could not talk to volsync on {self.address.host}: "
                              f"{why}{exit_text}{detail}")

    def _hello(self, options: RemoteOptions) -> None:
        """The far side's HELLO, within HELLO_TIMEOUT (ssh's login included): a far side
        that says something else, or nothing, ends the command instead of hanging it."""
        try:
            raw = self._read_hello(time.monotonic() + HELLO_TIMEOUT)
            hello = p.unpack_checked(raw) if raw is not None else None
        except TimeoutError:
            raise self._failed(f"no answer within {HELLO_TIMEOUT:.0f} s") from None
        except ProtocolError:
            self.broken = True
            raise NotVolsync(f"{self.address.host} does not speak the volsync protocol") from None
        if raw is None:
            raise self._failed("the connection closed")
        if not (isinstance(hello, list) and len(hello) == 2 and hello[0] == "hello"
                and isinstance(hello[1], dict) and hello[1].get("magic") == p.MAGIC):
            self.broken = True
            raise NotVolsync(f"{self.address.host} does not speak the volsync protocol")
        versions = hello[1].get("versions")
        if not isinstance(versions, list) or not set(versions) & set(p.VERSIONS):
            self.broken = True
            raise NotVolsync(f"{self.address.host} speaks protocol versions {versions!r}; "
                             f"this volsync speaks {list(p.VERSIONS)}")
        self.caps = hello[1].get("caps") if isinstance(hello[1].get("caps"), list) else []
        self._connected.set()
        for line in self.stderr_tail:  # what the far side said while logging in
            self._show(line)
        self.ch.send(["hello", {"magic": p.MAGIC, "versions": list(p.VERSIONS),
                                "caps": list(p.CAPABILITIES), "program": __version__,
                                "compress": options.compress, "bwlimit": options.bwlimit}])
        self.ch.flush()

    @property
    def bytes_on_wire(self) -> int:
        return self.ch.bytes_in + self.ch.bytes_out

    # --- requests ---------------------------------------------------------------------------
    def call(self, method: str, **args) -> object:
        self.ch.send([method, args])
        self.ch.flush()
        return self._reply()

    def _recv(self) -> object:
        """The next message; after a lost or garbled one the session is not used again."""
        try:
            return self.ch.recv()
        except (ConnectionLost, ProtocolError):
            self.broken = True
            raise

    def call_streaming(self, method: str, on_out: Callable[[bytes], None], **args) -> object:
        """A request whose answer is preceded by ["out", bytes] frames, each handed to
        `on_out` as it comes (if `on_out` fails, as on a closed stdout, the session is not
        used again)."""
        self.ch.send([method, args])
        self.ch.flush()
        while True:
            reply = self._recv()
            if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == "out"):
                return self._answer(reply)
            if not isinstance(reply[1], bytes):
                self.broken = True
                raise ProtocolError(f"malformed output from {self.address.host}")
            try:
                on_out(reply[1])
            except BaseException:
                self.broken = True
                raise

    def _reply(self) -> object:
        return self._answer(self._recv())

    def _answer(self, reply: object) -> object:
        if isinstance(reply, list) and len(reply) == 2 and reply[0] == "ok":
            return reply[1]
        if isinstance(reply, list) and reply[:1] == ["err"] and len(reply) == 4:
            raise p.decode_error(reply)
        self.broken = True
        raise ProtocolError(f"unexpected reply from {self.address.host}")

    def stream(self, method: str, **args) -> Iterator[tuple[bytes, bytes]]:
        self.ch.send([method, args])
        self.ch.flush()
        while True:
            frame = self._recv()
            if not isinstance(frame, list) or not frame:
                self.broken = True
                raise ProtocolError(f"unexpected frame from {self.address.host}")
            if frame[0] == "end":
                return
            if frame[0] == "err" and len(frame) == 4:
                raise p.decode_error(frame)
            if frame[0] != "objs" or len(frame) != 2 or not isinstance(frame[1], list):
                self.broken = True
                raise ProtocolError(f"unexpected frame from {self.address.host}")
            for item in frame[1]:
                if not (isinstance(item, list) and len(item) == 2
                        and isinstance(item[0], bytes) and isinstance(item[1], bytes)):
                    self.broken = True
                    raise ProtocolError(f"malformed object from {self.address.host}")
                yield item[0], item[1]

    def push(self, objects: Iterable[tuple[bytes, bytes]]) -> object:
        """Send an object stream; stop early if the server already answered (an error)."""
        self.ch.send(["receive", {}])
        try:
            for batch in object_batches(objects):
                self.ch.send(["objs", batch])
                if select.select([self.rfd], [], [], 0)[0] and self.ch.rfile.peek(1):
                    break
        except ConnectionLost:
            raise
        except BaseException:
            # our source failed: end the stream so the session stays usable (for undo)
            with suppress(Exception):
                self.ch.send(["end", {"abort": True}])
                self.ch.flush()
                self._reply()
            raise
        self.ch.send(["end", {}])
        self.ch.flush()
        return self._reply()

    def close(self) -> None:
        """Say goodbye (briefly: a peer that broke the protocol is not waited for)."""
        with suppress(Exception):  # closing a session that is already gone
            if not self.broken and self.proc.poll() is None:
                self.ch.send(["bye", {}])
                self.ch.flush()
                if select.select([self.rfd], [], [], BYE_TIMEOUT)[0]:
                    self.ch.recv()
        for f in (self.ch.wfile, self.ch.rfile):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=0.1 if self.broken else 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._relay.join(timeout=2)


class RemoteEndpoint:
    """A volume on another machine, reached through one `Connection`."""

    is_local = False

    def __init__(self, address: RemoteAddress, options: RemoteOptions):
        self.remote = address
        self.address = str(address)
        self.options = options
        self._conn: Connection | None = None
        self._opened = False
        self.id_size = 0
        self.scan_warnings: tuple[FileWarning, ...] = ()  # of snapshot_source's far scan
        self.scan_warnings_omitted = 0

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            self._conn = Connection(self.remote, self.options)
        return self._conn

    @property
    def bytes_on_wire(self) -> int:
        return self._conn.bytes_on_wire if self._conn else 0

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _info(self, body: object) -> VolumeInfo:
        info = p.info_in(body, self.address)
        if info.exists:
            self.id_size = info.fmt.algo.size
        return info

    # --- facts and locking ------------------------------------------------------------------
    def info(self, role: str = "src") -> VolumeInfo:
        if not self._opened:
            self._opened = True
            return self._info(self.conn.call("open", path=os.fsencode(self.remote.path),
                                             role=role))
        return self._info(self.conn.call("info", role=role))

    def host_address(self) -> str:
        return self.address

    def create_mirror(self, upstream: str, upstream_id: str, hash_name: str,
                      block_size: int) -> None:
        self._info(self.conn.call("create_mirror", upstream=upstream, upstream_id=upstream_id,
                                  hash=hash_name, block_size=block_size))

    def lock(self, wait: float = 0.0, resume: bool = False) -> None:
        self.conn.call("lock", wait=wait, resume=resume)

    def release(self) -> None:
        if self._conn is not None and self._conn.proc.poll() is None:
            self.conn.call("release")

    def share(self, wait: float = 0.0) -> None:
        self.conn.call("share", wait=wait)

    def hold(self, mirror_id: str, address: str, snapshots: list[str]) -> bool:
        return bool(self.conn.call("hold", mirror_id=mirror_id, address=address,
                                   snapshots=list(snapshots)))

    def settle_hold(self, mirror_id: str, address: str, snapshots: list[str],
                    wait: float = 0.0) -> bool:
        return bool(self.conn.call("settle_hold", mirror_id=mirror_id, address=address,
                                   snapshots=list(snapshots), wait=wait))

    def mark_updated(self) -> None:
        self.conn.call("mark_updated")

    # --- the sending side -------------------------------------------------------------------
    def snapshot_source(self, dry_run: bool = False, progress: Progress | None = None,
                        strict: bool = True) -> Snapshot | None:
        """The far side snapshots; its file warnings come back (from a server without the
        "file_warnings" capability the scan is strict, as before)."""
        method = "snapshot_source_dry" if dry_run else "snapshot_source"
        self.scan_warnings, self.scan_warnings_omitted = (), 0
        if "file_warnings" not in self.conn.caps:
            return p.snap_in(self.conn.call(method), self.id_size)
        snap, self.scan_warnings, self.scan_warnings_omitted = p.source_snapshot_in(
            self.conn.call(method, strict=strict), self.id_size)
        return snap

    def read(self, ids: list[BlockId]) -> list[bytes]:
        got = dict(self.conn.stream("read", ids=[bytes(i) for i in ids]))
        try:
            return [got[bytes(i)] for i in ids]
        except KeyError:
            raise ProtocolError(f"{self.remote.host} did not send an object asked for") from None

    def export(self, ids: Iterable[BlockId]) -> Iterator[tuple[BlockId, bytes]]:
        ids = iter(ids)
        while chunk := [bytes(i) for i in islice(ids, EXPORT_BATCH)]:
            wanted = set(chunk)
            for object_id, data in self.conn.stream("export", ids=chunk):
                if object_id not in wanted:
                    raise ProtocolError(f"{self.remote.host} sent an object not asked for")
                wanted.discard(object_id)
                yield BlockId(object_id), data
            if wanted:
                raise ProtocolError(f"{self.remote.host} did not send every object asked for")

    def snapshot_record(self, snap_id: str) -> Snapshot:
        return p.snap_in(self.conn.call("snapshot_record", snap_id=snap_id), self.id_size)

    # --- the receiving side -----------------------------------------------------------------
    def has(self, ids: list[BlockId]) -> list[bool]:
        answer = self.conn.call("has", ids=[bytes(i) for i in ids])
        if not isinstance(answer, bytes) or len(answer) != len(ids):
            raise ProtocolError(f"{self.remote.host} answered 'has' wrongly")
        return [bool(b) for b in answer]

    def inspect_live(self) -> LiveFacts:
        return p.facts_in(self.conn.call("inspect_live"))

    @contextmanager
    def inspecting_live(self) -> Iterator[Callable[[], LiveFacts]]:
        """`inspect_live` asked now and answered when the yielded function is called: the far
        side scans while this side works on the other volume. A reply never read leaves the
        session out of step, so it is not used again."""
        self.conn.ch.send(["inspect_live", {}])
        self.conn.ch.flush()
        answered = False

        def facts() -> LiveFacts:
            nonlocal answered
            answered = True
            return p.facts_in(self.conn._reply())

        try:
            yield facts
        finally:
            if not answered:
                self.conn.broken = True

    def keep_live_changes(self, progress: Progress | None = None) -> Snapshot | None:
        return p.snap_in(self.conn.call("keep_live_changes"), self.id_size)

    def begin(self, kept: list[str]) -> None:
        self.conn.call("begin", kept=list(kept))

    def receive(self, objects: Iterable[tuple[bytes, bytes]],
                progress: Progress | None = None) -> ReceiveCount:
        def counted() -> Iterator[tuple[bytes, bytes]]:
            for object_id, data in objects:
                yield object_id, data
                if progress:
                    progress(len(data))

        reply = self.conn.push(counted())
        if not (isinstance(reply, dict) and isinstance(reply.get("objects"), int)
                and isinstance(reply.get("bytes"), int)):
            raise ProtocolError(f"malformed reply from {self.remote.host}")
        return ReceiveCount(reply["objects"], reply["bytes"])

    def add_snapshots(self, snaps: list[Snapshot]) -> None:
        self.conn.call("add_snapshots", snaps=[p.snap_out(s) for s in snaps])

    def materialize(self, target: BlockId, progress: Progress | None = None) -> NotRestored:
        return p.skipped_in(self.conn.call("materialize", target=bytes(target)))

    def finish(self, expect_lineage: list[str], common: str | None, added: list[str],
               removed: list[str], live: str | None, upstream: str, upstream_id: str) -> None:
        self.conn.call("finish", expect_lineage=list(expect_lineage), common=common,
                       added=list(added), removed=list(removed), live=live,
                       upstream=upstream, upstream_id=upstream_id)

    def undo(self) -> None:
        self.conn.call("undo")

    def discard_new(self) -> None:
        self.conn.call("discard_new")

    def interrupted(self) -> None:
        self.conn.call("interrupted")

    def set_role(self, mode: str, upstream: str | None, upstream_id: str | None,
                 journal: dict | None) -> None:
        self.conn.call("set_role", mode=mode, upstream=upstream, upstream_id=upstream_id,
                       journal=journal)

    def clear_journal(self) -> None:
        self.conn.call("clear_journal")

    # --- whole commands run on the far side -------------------------------------------------
    def run(self, argv: list[str], write_out: Callable[[bytes], None]) -> tuple[int, str]:
        """Run a whole command there: its stdout goes to `write_out` as it comes (bytes as
        they are), its exit code and stderr are returned. A far side too old for
        `run_stream` answers with its whole stdout as text."""
        streaming = "run_stream" in self.conn.caps
        if streaming:
            reply = self.conn.call_streaming("run_stream", write_out, argv=list(argv))
        else:
            reply = self.conn.call("run", argv=list(argv))
        if not (isinstance(reply, dict) and isinstance(reply.get("code"), int)
                and isinstance(reply.get("err"), str)
                and (streaming or isinstance(reply.get("out"), str))):
            raise ProtocolError(f"malformed reply from {self.remote.host}")
        if not streaming:
            write_out(reply["out"].encode("utf-8", "surrogateescape"))
        return reply["code"], reply["err"]


__all__ = ["Connection", "Pacer", "RemoteEndpoint", "RemoteOptions"]
