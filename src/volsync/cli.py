"""The command line: parse, call one engine function, render text or JSON. Exit codes are
mapped in one place (`main`), as listed in `volsync --help`."""

from __future__ import annotations

import functools
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import click

from . import __version__, cli_help, ops, retention, stream, sync
from .errors import BadArgument, Diverged, VolsyncError
from .model import DEFAULT_HASH, HASHES, FileWarning
from .plan import TransferPlan, lineage_picture
from .quoting import display_path, path_fields, quote_path
from .remote.address import RemoteAddress, parse_address
from .remote.client import RemoteEndpoint, RemoteOptions
from .remote.server import Refused, serve_stdio
from .remote.spawn import VALUED
from .render import (
    human_bytes,
    iso,
    ls_json,
    ls_line,
    snap_json,
    snap_ref,
    snapshot_table,
    warning_json,
    warning_text,
)
from .store.fsutil import atomic_write
from .store.volume import DEFAULT_BLOCK, Volume, preserved_names
from .tree import NotRestored, outermost, parse_path

EXIT_CODES = """\b
Exit codes:
  0  done (with --dry-run: the plan is possible)
  1  error: not a volume, unreadable path, I/O error, bad argument value
  2  usage error
  3  a volume is locked by another volsync process
  4  no common snapshot
  5  refused: it would diverge or overwrite changes; resync is the way
  6  integrity: a block or manifest failed its check
  7  done with warnings: a file kept changing or could not be read and was
     recorded otherwise (see stderr; --strict makes it an error, exit 1)"""
WARNINGS_EXIT = 7
SHOWN_WARNINGS = 20  # warning lines on stderr; the rest are counted (all are in --json)


class Output:
    """Where a command's result goes: one JSON object, or text unless --quiet."""

    def __init__(self, as_json: bool, quiet: bool):
        self.json = as_json
        self.quiet = quiet
        self.displays: list[ProgressDisplay] = []

    def emit(self, data: dict, text: str | Callable[[], str], err: bool = False) -> None:
        """The result: stdout, or stderr for `send` (whose stdout carries the stream)."""
        self.close_progress()  # erased before the result line
        if self.json:
            click.echo(json.dumps(data, sort_keys=True), err=err)
        elif not self.quiet:
            click.echo(_writable(text() if callable(text) else text), err=err)

    def lines(self, lines: Iterable[str]) -> None:
        """A text result printed as its lines come (a long listing streams); with --quiet
        they are still produced, so that an error on the way still ends the command."""
        batch: list[str] = []
        for line in lines:
            if not self.quiet:
                batch.append(line)
            if len(batch) >= LINES_PER_WRITE:
                click.echo(_writable("\n".join(batch)))
                batch = []
        if batch:
            click.echo(_writable("\n".join(batch)))

    def warn(self, message: str) -> None:
        if not self.quiet:
            click.echo(f"volsync: warning: {message}", err=True)

    def progress(self, label: str) -> ProgressDisplay | None:
        """A progress display on stderr when it is a terminal (never with --json or --quiet);
        cleared when the result is printed or the command fails."""
        if self.quiet or self.json or not sys.stderr.isatty():
            return None
        display = ProgressDisplay(label)
        self.displays.append(display)
        ctx = click.get_current_context(silent=True)
        if ctx is not None:  # also on an error or Ctrl-C, before its message is printed
            ctx.call_on_close(display.close)
        return display

    def close_progress(self) -> None:
        for display in self.displays:
            display.close()


LINES_PER_WRITE = 512


def _writable(text: str) -> str:
    """Text safe to write: a surrogate-escaped byte left anywhere prints as \\xNN instead of
    crashing the write (paths are quoted before they get here)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def write_stdout(data: bytes) -> None:
    """Bytes to stdout as they are (a stdout without a binary side, as in tests, gets them
    decoded)."""
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(data.decode("utf-8", "surrogateescape"))
        return
    sys.stdout.flush()
    buffer.write(data)


class ProgressDisplay:
    """rich's live progress on stderr: one line per step of the command (as the engine names
    them, `progress_step`; else one named for the command), with the bytes done and rate and,
    when the step's total is known, the total, percent and time left. Started at the first
    step or count; transient: the lines are erased when it closes."""

    def __init__(self, label: str):
        self.label = label
        self.bar = None  # a rich Progress, once started (None also when it cannot be shown)
        self.task = None
        self.closed = False

    def step(self, label: str, total: int | None = None, counted: bool = True) -> None:
        bar = self._started()
        if bar is None:
            return
        if self.task is not None:
            bar.stop_task(self.task)
        self.task = bar.add_task(label or self.label, total=total, counted=counted)

    def __call__(self, n: int) -> None:
        if self.task is None:  # a command that counts in one step, unnamed
            self.step("")
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def _started(self):
        if self.bar is None and not self.closed:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            console = Console(file=sys.stderr)
            if not console.is_interactive:  # TERM=dumb: no cursor movement to redraw with
                self.closed = True
                return None
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=10),
                                _counts_column(), console=console, transient=True,
                                redirect_stdout=False, redirect_stderr=False,
                                refresh_per_second=5)
            self.bar.start()
        return self.bar

    def close(self) -> None:
        """Erase the lines (idempotent)."""
        self.closed = True
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _counts_column():
    """The text after the bar: done and rate; with a total, done / total, percent, rate and
    time left; for a step done elsewhere, the time it has taken."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Counts(ProgressColumn):
        def render(self, task) -> Text:
            return Text(progress_text(task.completed, task.total, task.speed,
                                      task.time_remaining, task.elapsed,
                                      task.fields.get("counted", True)),
                        no_wrap=True, overflow="ellipsis")

    return Counts()


def progress_text(done: float, total: float | None, rate: float | None, left: float | None,
                  elapsed: float | None, counted: bool) -> str:
    if not counted:  # done on another machine: only the time it takes shows here
        return f"{_minutes(elapsed or 0)} elapsed"
    shown = human_bytes(int(done))
    speed = f"{human_bytes(int(rate or 0))}/s"
    if total is None:
        return f"{shown}  {speed}"
    percent = 100 * done / total if total else 100
    eta = f"{_minutes(left)} left" if left is not None else "-:-- left"
    return f"{shown} / {human_bytes(int(total))}  {percent:.0f}%  {speed}  {eta}"


def _minutes(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}:{s % 60:02d}"


def common_options(fn):
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
    @click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
    @functools.wraps(fn)
    def wrapper(*args, as_json, quiet, **kwargs):
        return fn(*args, out=Output(as_json, quiet), **kwargs)

    return wrapper


def wait_option(fn):
    return click.option("--wait", type=click.FloatRange(min=0), default=0.0, metavar="SECONDS",
                        help="Wait up to SECONDS for another volsync run's lock "
                             "(default: fail at once, exit 3).")(fn)


def strict_option(fn):
    return click.option("--strict", is_flag=True,
                        help="Fail (exit 1) on a file that keeps changing while read or cannot "
                             "be read, instead of recording its previous version (or, without "
                             "one, its last read bytes, or nothing) and exiting 7.")(fn)


def report_warnings(out: Output, warnings: tuple[FileWarning, ...] | list[FileWarning],
                    root: str | os.PathLike, omitted: int = 0) -> int:
    """One `volsync: warning:` line per file (at most SHOWN_WARNINGS, then a count), each
    with its full path (under `root`) quoted as git does. Returns how many there were."""
    base = os.fsencode(os.fspath(root)).rstrip(b"/")
    for w in warnings[:SHOWN_WARNINGS]:
        out.warn(f"{warning_text(w)}: {quote_path(base + b'/' + w.path)}")
    total = len(warnings) + omitted
    if total > SHOWN_WARNINGS:
        out.warn(f"{total - SHOWN_WARNINGS} more file(s) not captured as they are "
                 "(--json lists them)")
    return total


def warnings_json(warnings, omitted: int = 0) -> dict:
    data = {"warnings": [warning_json(w) for w in warnings]}
    return data | ({"warnings_omitted": omitted} if omitted else {})


def exit_if_warned(count: int) -> None:
    """Done, with warnings: the distinct exit status (errors have exited before)."""
    if count:
        sys.exit(WARNINGS_EXIT)


def dry_run_option(fn):
    return click.option("--dry-run", is_flag=True,
                        help="Print the plan and change nothing.")(fn)


def parse_size(text: str, what: str = "block size") -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in units:
            return int(t[:-1]) * units[t[-1]]
        return int(t)
    except ValueError:
        raise BadArgument(f"bad {what} {text!r}: use e.g. 64K or 1M") from None


# --- volumes on other machines ----------------------------------------------------------------

def remote_options(fn):
    fn = click.option("--remote-path", default=None, metavar="CMD",
                      help="The volsync program on the far side (default: volsync, or "
                           "VOLSYNC_REMOTE_PATH).")(fn)
    return click.option("--rsh", default=None, metavar="CMD",
                        help="The ssh command for remote volumes (default: ssh, or "
                             "VOLSYNC_RSH).")(fn)


def wire_options(fn):
    fn = click.option("--bwlimit", default=None, metavar="RATE",
                      help="Bytes per second on the wire, like 10M (smoothly paced).")(fn)
    return click.option("--compress", is_flag=True,
                        help="zstd on the wire (kept only where it makes a frame smaller).")(fn)


def remote_settings(rsh, remote_path, compress=False, bwlimit=None) -> RemoteOptions:
    rate = None
    if bwlimit is not None:
        rate = parse_size(bwlimit, "rate")
        if rate <= 0:
            raise BadArgument(f"bad rate {bwlimit!r}: it must be positive")
    return RemoteOptions.from_env(rsh, remote_path, compress, rate)


# the path arguments of the commands a remote VOL runs on the far side, as they are
SERVED = {"init": ("directory",), "snapshot": ("volume",), "snapshots": ("volume",),
          "status": ("volume",), "diff": ("volume",), "revert": ("volume",),
          "restore": ("volume", "directory"), "verify": ("volume",), "prune": ("volume",),
          "upgrade": ("volume",), "break": ("dst",), "holds": ("volume",),
          "release": ("volume",), "destroy": ("volume",), "ls": ("volume",), "cat": ("volume",),
          "df": ("volume",)}
SERVED_READ_ONLY = {"snapshots", "status", "diff", "verify", "holds", "ls", "cat", "df"}
OUT_BUFFER = 1 << 18  # a served command's stdout is sent on in pieces of about this size


def served(param: str):
    """A single-volume command whose VOL may be remote: then the whole command runs on the
    volume's machine (`volsync serve`), and its output and exit code come back as they are."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, rsh=None, remote_path=None, **kwargs):
            options = remote_settings(rsh, remote_path)
            click.get_current_context().find_root().obj["remote"] = options
            address = parse_address(kwargs[param])
            if address is None:
                return fn(*args, **kwargs)
            _run_remote(address, kwargs[param], options)

        return remote_options(wrapper)
    return deco


def _run_remote(address: RemoteAddress, text: str, options: RemoteOptions) -> None:
    argv = _remote_argv(click.get_current_context().find_root().obj["argv"], text, address.path)
    endpoint = RemoteEndpoint(address, options)
    try:
        code, err = endpoint.run(argv, write_stdout)
    finally:
        endpoint.close()
    sys.stderr.write(err)
    sys.exit(code)


def _remote_argv(argv: list[str], text: str, path: str) -> list[str]:
    """The command line to run on the far side: the address becomes its path there, and the
    options that only mean something here are dropped."""
    out: list[str] = []
    skip = replaced = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--rsh", "--remote-path"):
            skip = True
            continue
        if arg.startswith(("--rsh=", "--remote-path=")):
            continue
        if not replaced and i > 0 and arg == text and argv[i - 1] not in VALUED:
            out.append(path)
            replaced = True
            continue
        out.append(arg)
    return out


class _StdoutSink(io.RawIOBase):
    """A served command's stdout: every write is handed on as bytes (to the client)."""

    def __init__(self, write_out: Callable[[bytes], None]):
        super().__init__()
        self.write_out = write_out

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.write_out(bytes(data))
        return len(data)


def served_command(argv: list[str], check_path, read_only: bool,
                   write_out: Callable[[bytes], None]) -> tuple[int, str]:
    """`serve`'s side of a remote single-volume command: parse it as this CLI would, check
    every path it names against --restrict-to-path and --read-only, and run it, its stdout
    (text or bytes) handed to `write_out` as it is written; returns the exit code and the
    captured stderr."""
    import contextlib

    name = argv[0] if argv else ""
    if name not in SERVED:
        raise Refused(f"{name!r} cannot be run through volsync serve")
    command = cli.commands[name]
    try:
        ctx = command.make_context(name, list(argv[1:]), obj={"argv": argv})
    except click.ClickException as exc:
        return exc.exit_code, f"volsync: error: {exc.format_message()}\n"
    for param in SERVED[name]:
        value = ctx.params.get(param)
        if value is None or parse_address(value) is not None:
            raise Refused(f"{name}: {value!r} is not a path on this machine")
        check_path(value)
    if ctx.params.get("repair_from"):
        raise Refused("verify --repair-from runs where VOL is: run it on VOL's machine")
    if ctx.params.get("metrics_file"):
        raise Refused("status --metrics-file writes on VOL's machine: run it there, or "
                      "redirect 'status --prometheus' here")
    if read_only and name not in SERVED_READ_ONLY and not ctx.params.get("dry_run"):
        raise Refused(f"this server is read-only: {name} refused")
    out = io.TextIOWrapper(io.BufferedWriter(_StdoutSink(write_out), OUT_BUFFER),
                           encoding="utf-8", errors="backslashreplace")
    err = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            out.flush()
    return code, err.getvalue()


@click.group(epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="volsync")
def cli() -> None:
    """Keep read-only mirrors of directories up to date from a read-write source, fail over,
    and resynchronize by the newest common snapshot, moving only the blocks that differ."""


# --- single-volume commands -------------------------------------------------------------------

@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--block-size", default=None, metavar="SIZE",
              help="Block size, a power of two from 4K to 4M (default 64K).")
@click.option("--hash", "hash_name", type=click.Choice(sorted(HASHES)), default=DEFAULT_HASH,
              show_default=True,
              help="How blocks are named: blake3 (safe against crafted blocks) or xxh3-128 "
                   "(faster, for trusted data only). Volumes that share snapshots use one.")
@common_options
@served("directory")
def init(directory: str, block_size: str | None, hash_name: str, out: Output) -> None:
    """Make DIRECTORY a read-write volume in place, keeping its files."""
    size = parse_size(block_size) if block_size else DEFAULT_BLOCK
    vol = ops.init_volume(directory, size, hash_name)
    out.emit({"path": str(vol.root), "block_size": size, "mode": "read-write",
              "volume_id": vol.config.volume_id, "hash": hash_name},
             f"initialized volume {vol.root} (block size {human_bytes(size)}, {hash_name})")


@cli.command()
@click.argument("volume")
@click.option("--hash", "hash_name", type=click.Choice(sorted(HASHES)), default=None,
              help="How the converted volume names blocks (default: blake3, or the hash of "
                   "an interrupted upgrade being resumed). Upgrade a source and its mirrors "
                   "with the same one.")
@wait_option
@common_options
@served("volume")
def upgrade(volume: str, hash_name: str | None, wait: float, out: Output) -> None:
    """Convert a volume of an older format in place to the current one, crash-safe.

    Snapshot numbers and ids are kept, so a source and its mirror upgraded on their own still
    share their newest common snapshot. Killed at any point, the volume is left in the old
    or the new format; running it again completes it."""
    r = ops.upgrade(volume, hash_name, wait, out.progress("upgrade"))
    data = {"path": r.path, "status": r.status, "format": 2, "hash": r.hash,
            "snapshots": r.snapshots, "blocks": r.blocks, "holes": r.holes, "trees": r.trees}
    if r.status == "already":
        text = f"{r.path} is already a format-2 volume; nothing changed"
    elif r.status == "finished":
        text = f"finished the interrupted upgrade of {r.path} to format 2 ({r.hash})"
    else:
        text = (f"upgraded {r.path} to format 2 ({r.hash}): {r.snapshots} snapshot(s), "
                f"{r.blocks} blocks re-hashed ({r.holes} of zeros, now holes), "
                f"{r.trees} directories")
    out.emit(data, text)


@cli.command()
@click.argument("volume")
@click.option("--label", default=None, help="A label to name the snapshot by.")
@strict_option
@wait_option
@common_options
@served("volume")
def snapshot(volume: str, label: str | None, strict: bool, wait: float, out: Output) -> None:
    """Capture the live tree as the next snapshot; prints its number.

    A file that keeps changing while read, or cannot be read, is recorded as in the latest
    snapshot and named in a warning (exit 7), unless --strict."""
    if label is not None and (not label or label.isdigit() or label == "latest"):
        raise BadArgument(f"bad label {label!r}: it must not be empty, a number or 'latest'")
    vol = Volume.open(volume)
    snap, notes, warnings = ops.take_snapshot(vol, label, wait, out.progress("snapshot"),
                                              strict)
    for note in notes:
        out.warn(note)
    count = report_warnings(out, warnings, vol.root)
    out.emit(snap_ref(snap) | {"label": snap.label, "size": snap.size, "files": snap.files}
             | warnings_json(warnings),
             f"snapshot {snap.number} ({snap.id[:12]}): {snap.files} files, "
             f"{human_bytes(snap.size)}" + (f"; {count} warning(s)" if count else ""))
    exit_if_warned(count)


@cli.command()
@click.argument("volume")
@click.option("--all", "show_all", is_flag=True, help="Include preserved snapshots.")
@common_options
@served("volume")
def snapshots(volume: str, show_all: bool, out: Output) -> None:
    """List the lineage (number, id, created, label, size); --all adds preserved ones."""
    vol = Volume.open(volume)
    state = vol.state()
    rows = [(s, None) for s in vol.lineage(state)]
    if show_all:
        names = preserved_names(state)
        rows += [(s, names.get(s.id, "p?")) for s in vol.preserved(state)]
    out.emit({"snapshots": [snap_json(s, p) for s, p in rows]}, lambda: snapshot_table(rows))


@cli.command()
@click.argument("volume")
@click.option("--check-upstream", is_flag=True,
              help="Also ask an upstream on another machine how far behind a mirror is (an "
                   "upstream on this machine is always asked).")
@click.option("--prometheus", is_flag=True,
              help="Print metrics in the Prometheus text format instead.")
@click.option("--metrics-file", default=None, metavar="PATH",
              help="Also write the metrics to PATH, atomically (node-exporter's textfile "
                   "collector).")
@strict_option
@common_options
@served("volume")
def status(volume: str, check_upstream: bool, prometheus: bool, metrics_file: str | None,
           strict: bool, out: Output) -> None:
    """Mode, upstream, latest snapshot, live-tree changes since it, lock holder if any; for a
    mirror, when it was last updated and how far (snapshots, bytes) it is behind its upstream;
    the holds of mirrors on its snapshots.

    A file that keeps changing or cannot be read is compared as in the latest snapshot and
    named in a warning (exit 7), unless --strict."""
    vol = Volume.open(volume)
    st = ops.status(vol, strict)
    count = report_warnings(out, st.warnings, vol.root)
    lag = (sync.lag(str(vol.root), st.upstream, check_upstream,
                    click.get_current_context().find_root().obj["remote"])
           if st.mode == "read-only" and st.upstream else None)
    updated = (st.state.extra.get("last_update") or {}).get("time")
    holds = retention.holds(st.state)
    data = {
        "mode": st.mode, "upstream": st.upstream,
        "latest": st.latest.number if st.latest else None,
        "latest_id": st.latest.id if st.latest else None,
        "changed_paths": [display_path(c.path) for c in st.changed_paths],
        "changes": [{"status": c.status} | path_fields(c.path) for c in st.changed_paths],
        "lock_holder": st.lock_holder if st.lock_holder and st.lock_holder > 0 else None,
        "locked": bool(st.lock_holder), "pending": st.pending,
        "last_update": iso(updated) if isinstance(updated, float | int) else None,
        "seconds_since_update": (round(time.time() - updated, 3)
                                 if isinstance(updated, float | int) else None),
        "behind": lag.snapshots if lag else None,
        "behind_bytes": lag.bytes if lag else None,
        "behind_unknown": lag.why if lag else None,
        "holds": [{"mirror_id": h.mirror_id, "address": h.address, "updated": iso(h.time),
                   "snapshot_ids": list(h.snapshots)} for h in holds],
    } | warnings_json(st.warnings)
    metrics = status_metrics(str(vol.root), st, lag, updated, holds)
    if metrics_file:
        write_metrics(metrics_file, metrics)
    if prometheus:
        click.echo(metrics, nl=False)
        exit_if_warned(count)
        return

    def text() -> str:
        lines = [f"mode:     {st.mode}"]
        if st.upstream:
            behind = (f" ({lag.snapshots} snapshot(s), {human_bytes(lag.bytes)} behind)"
                      if lag and lag.snapshots is not None else "")
            lines.append(f"upstream: {st.upstream}{behind}")
            if updated:
                lines.append(f"updated:  {iso(updated)} (last successful transfer)")
        latest = (f"{st.latest.number} ({st.latest.id[:12]}, {iso(st.latest.created)})"
                  if st.latest else "none")
        lines.append(f"latest:   {latest}")
        lines.append(f"changes:  {len(st.changed_paths)} path(s) since the latest snapshot")
        lines += [f"  {c.status[0].upper()} {quote_path(c.path)}" for c in st.changed_paths[:50]]
        if len(st.changed_paths) > 50:
            lines.append(f"  ... and {len(st.changed_paths) - 50} more (see 'volsync diff')")
        holder = None
        if st.lock_holder:
            holder = (f"volsync process {st.lock_holder}" if st.lock_holder > 0
                      else "another process (no pid recorded)")
            lines.append(f"locked:   by {holder}")
        if st.pending and holder:  # the journal of a run that is still going
            lines.append(f"pending:  a {st.pending} step in progress ({holder})")
        elif st.pending:
            lines.append(f"pending:  an interrupted {st.pending} step; the next command "
                         "finishes it")
        for h in holds:
            lines.append(f"held:     by mirror {h.address} ({h.mirror_id[:12]})")
        if count:
            lines.append(f"warnings: {count} file(s) could not be read as they are (see "
                         "the warnings above)")
        return "\n".join(lines)

    out.emit(data, text)
    exit_if_warned(count)


def status_metrics(volume: str, st, lag, updated, holds) -> str:
    """The node-exporter textfile format: one gauge per fact, labelled by volume."""
    label = '{volume="' + volume.replace("\\", "\\\\").replace('"', '\\"').replace(
        "\n", "\\n") + '"}'
    facts = [
        ("volsync_read_only", "1 for a mirror, 0 for a source", int(st.mode == "read-only")),
        ("volsync_latest_snapshot_number", "number of the latest snapshot",
         st.latest.number if st.latest else None),
        ("volsync_latest_snapshot_timestamp_seconds", "when the latest snapshot was taken",
         st.latest.created if st.latest else None),
        ("volsync_last_update_timestamp_seconds", "last successful transfer into a mirror",
         updated),
        ("volsync_behind_snapshots", "upstream snapshots a mirror lacks",
         lag.snapshots if lag else None),
        ("volsync_behind_bytes", "bytes the next transfer would send", lag.bytes if lag else None),
        ("volsync_changed_paths", "live-tree paths changed since the latest snapshot",
         len(st.changed_paths)),
        ("volsync_locked", "1 while a volsync process holds the lock", int(bool(st.lock_holder))),
        ("volsync_pending_step", "1 while an interrupted step awaits the next command",
         int(bool(st.pending))),
        ("volsync_holds", "mirrors holding snapshots of this volume", len(holds)),
    ]
    lines = []
    for name, what, value in facts:
        if value is None:
            continue
        lines += [f"# HELP {name} {what}", f"# TYPE {name} gauge", f"{name}{label} {value}"]
    return "\n".join(lines) + "\n"


def write_metrics(path: str, text: str) -> None:
    """Write-then-rename (a temp name the textfile collector skips), so the collector never
    reads half a file."""
    target = Path(os.path.abspath(path))
    if not target.parent.is_dir():
        raise BadArgument(f"--metrics-file {path}: no such directory")
    try:
        atomic_write(target, text.encode())
    except OSError as exc:
        raise BadArgument(f"--metrics-file {path}: {exc.strerror}") from None


@cli.command()
@click.argument("volume")
@click.argument("a", required=False)
@click.argument("b", required=False)
@common_options
@served("volume")
def diff(volume: str, a: str | None, b: str | None, out: Output) -> None:
    """Paths added, modified, deleted: A to B, A to the live tree, or latest to the live tree.

    A line is 'A PATH',
    'M PATH' or 'D PATH' (a directory ends in '/'); a path with a control character, '"',
    '\\' or a byte beyond ASCII is quoted as git quotes it. In JSON, "changes" gives each path
    and, when it is not valid UTF-8, its exact bytes as "path_b64"."""
    changes = ops.diff(Volume.open(volume), a, b)
    data = {k: [display_path(c.path) for c in changes if c.status == k]
            for k in ("added", "modified", "deleted")}
    data["changes"] = [{"status": c.status} | path_fields(c.path) for c in changes]
    out.emit(data, lambda: "\n".join(f"{c.status[0].upper()} {quote_path(c.path)}"
                                     for c in changes) or "no changes")


@cli.command()
@click.argument("volume")
@click.argument("snap")
@dry_run_option
@wait_option
@common_options
@served("volume")
def revert(volume: str, snap: str, dry_run: bool, wait: float, out: Output) -> None:
    """Set the live tree and lineage back to SNAP. Later snapshots and unsnapshotted live
    changes become preserved snapshots; nothing is destroyed.

    SNAP may also be a preserved snapshot (pN, or its id): it comes back as a new latest
    snapshot of the lineage and as the live tree, the live changes it replaces preserved.
    That is the undo of a revert, or of a resync that took the volume's own work away."""
    plan, skipped = ops.revert(Volume.open(volume), snap, wait, dry_run, out.progress("revert"))
    preserved = [s.number for s in plan.preserve]
    data = {"reverted_to": snap_ref(plan.target), "preserved": preserved,
            "live_changes_preserved": plan.live_changed, "dry_run": dry_run,
            "not_restored": skipped.as_dict()}
    if plan.revived:
        data["added"] = snap_ref(plan.revived)
    verb = "would revert" if dry_run else "reverted"
    extra = " + live changes" if plan.live_changed else ""
    kept = f"; preserved: {' '.join(map(str, preserved)) or '-'}{extra}"
    if plan.revived:
        verb = "would bring back" if dry_run else "brought back"
        out.emit(data, f"{verb} preserved snapshot {plan.target.id[:12]} as snapshot "
                       f"{plan.revived.number} ({plan.revived.label}){kept}"
                       f"{not_restored_text(skipped)}")
        return
    out.emit(data, f"{verb} to snapshot {plan.target.number}{kept}{not_restored_text(skipped)}")


@cli.command()
@click.argument("volume")
@click.argument("snap")
@click.argument("directory", type=click.Path())
@click.option("--path", "paths", multiple=True, metavar="PATH",
              help="Restore only PATH (relative to the snapshot's top): a file, or a directory "
                   "with everything under it; repeatable. Only its blocks are read.")
@common_options
@served("volume")
def restore(volume: str, snap: str, directory: str, paths: tuple[str, ...], out: Output
            ) -> None:
    """Write the content of any snapshot (lineage or preserved), or only the paths given with
    --path, to a new directory.

    With --path, the directories that
    lead to each path are created with their recorded metadata, and a hard-linked file whose
    other names are not restored becomes a plain file. A path not in the snapshot is refused
    (exit 1) before anything is written."""
    s, skipped = ops.restore(Volume.open(volume), snap, directory, out.progress("restore"),
                             paths)
    chosen = outermost([parse_path(p) for p in paths])
    what = (", ".join(quote_path(p) for p in chosen) + " of snapshot") if chosen else "snapshot"
    out.emit({"snapshot": snap_ref(s), "path": os.path.abspath(directory),
              "paths": [display_path(p) for p in chosen], "not_restored": skipped.as_dict()},
             f"restored {what} {s.number} ({s.id[:12]}) to {quote_path(directory)}"
             f"{not_restored_text(skipped)}")


@cli.command()
@click.argument("volume")
@click.argument("snap")
@click.argument("path", required=False)
@click.option("--recursive/--no-recursive", default=True, show_default=True,
              help="List everything under PATH, or only what is directly in it.")
@common_options
@served("volume")
def ls(volume: str, snap: str, path: str | None, recursive: bool, out: Output) -> None:
    """List what is under PATH in snapshot SNAP (the whole snapshot without PATH), as
    'restic ls -l' does: type and permissions, owner and group (numeric), size, mtime (ISO,
    local time), path; a symlink also shows its target.

    PATH is relative to the snapshot's top (a file lists itself). Paths are quoted as in
    'volsync diff'. Only the directories listed are read. With --json: {"entries": [{"path",
    "type", "mode", "permissions", "uid", "gid", "size", "mtime_ns", ...}]}, "path_b64" beside
    a path that is not UTF-8."""
    s, entries = ops.list_snapshot(Volume.open(volume), snap, path, recursive)
    if out.json:
        out.emit({"snapshot": snap_ref(s), "entries": [ls_json(p, e) for p, e in entries]}, "")
    else:
        out.lines(ls_line(p, e) for p, e in entries)


@cli.command()
@click.argument("volume")
@click.argument("snap")
@click.argument("path")
@served("volume")
def cat(volume: str, snap: str, path: str) -> None:
    """Write one file of snapshot SNAP to stdout, byte for byte (holes come out as zeros).

    PATH is relative to the snapshot's top. Only the file's blocks are read, one at a time,
    each checked against its id (exit 6 where one fails, after the bytes before it). A
    directory or anything but a regular file is refused (exit 1). No --json: stdout carries the
    file."""
    for chunk in ops.file_content(Volume.open(volume), snap, path):
        write_stdout(chunk)
    sys.stdout.flush()


@cli.command()
@click.argument("volume")
@click.option("--repair-from", "repair_from", default=None, metavar="OTHER",
              help="Fetch good copies of bad or missing blocks from a related volume.")
@wait_option
@common_options
@served("volume")
def verify(volume: str, repair_from: str | None, wait: float, out: Output) -> None:
    """Re-hash every block, check every manifest and (mirror) the live tree."""
    options = click.get_current_context().find_root().obj.get("remote")
    with sync.opened(*([repair_from] if repair_from else []), options=options) as others:
        other = others[0] if others else None
        if other is not None:
            other.info("src")
        report = ops.verify(Volume.open(volume), other, wait, out.progress("verify"))
    data = {"ok": report.ok, "blocks_checked": report.blocks_checked, "errors": report.errors,
            "repaired": report.repaired, "unrepaired": report.notes}
    if not report.ok:
        data |= {"error": f"verify found {len(report.errors)} problem(s)", "code": 6}
    lines = [f"repaired: {r}" for r in report.repaired] + [f"not repaired: {n}" for n in report.notes]
    lines += [f"error: {e}" for e in report.errors]
    lines.append(f"{'ok' if report.ok else 'FAILED'}: {report.blocks_checked} blocks checked, "
                 f"{len(report.errors)} problem(s)")
    out.emit(data, "\n".join(lines))
    if not report.ok:  # also on stderr, where a cron wrapper's alert looks
        first = report.errors[0] if report.errors else ""
        click.echo(f"volsync: error: verify found {len(report.errors)} problem(s) in {volume}"
                   + (f"; first: {first}" if first else ""), err=True)
        sys.exit(6)


@cli.command()
@click.argument("volume")
@click.option("--keep-last", type=int, default=None, metavar="N",
              help="Keep the newest N lineage snapshots.")
@click.option("--keep", "keep", default=None, metavar="RULES",
              help="Keep by age, like hourly=24,daily=7,weekly=4,monthly=12 (also yearly): "
                   "the newest snapshot of each of the N newest hours, days, ...")
@click.option("--preserved", is_flag=True, help="Remove all preserved snapshots.")
@dry_run_option
@wait_option
@common_options
@served("volume")
def prune(volume: str, keep_last: int | None, keep: str | None, preserved: bool,
          dry_run: bool, wait: float, out: Output) -> None:
    """Drop lineage snapshots that no --keep-last/--keep rule keeps, and/or all preserved
    ones; free blocks no snapshot refers to. The latest snapshot is always kept, and so is
    every snapshot a mirror holds (see 'volsync holds')."""
    rules = retention.parse_keep(keep) if keep is not None else None
    r = retention.prune(Volume.open(volume), keep_last, preserved, wait, dry_run, rules)
    data = {"removed": [s.number for s in r.plan.remove],
            "preserved_removed": [s.id for s in r.plan.drop_preserved],
            "held": [s.number for s in r.plan.held],
            "blocks_freed": r.blocks_freed, "bytes_freed": r.bytes_freed, "dry_run": dry_run}
    verb, freed = ("would remove", "would free") if dry_run else ("removed", "freed")
    held = (f"; kept {len(r.plan.held)} held by a mirror ({_numbers(r.plan.held)})"
            if r.plan.held else "")
    out.emit(data, f"{verb} {len(r.plan.remove)} lineage and {len(r.plan.drop_preserved)} "
                   f"preserved snapshot(s){held}; {freed} {r.blocks_freed} blocks "
                   f"({human_bytes(r.bytes_freed)})")


def _numbers(snaps) -> str:
    return " ".join(str(s.number) for s in snaps)


@cli.command()
@click.argument("volume")
@common_options
@served("volume")
def holds(volume: str, out: Output) -> None:
    """List which mirror holds which snapshots of VOL: recorded by each transfer and resync
    from VOL, so that prune keeps the mirror's newest common snapshot."""
    vol = Volume.open(volume)
    state = vol.state()
    numbers = {s.id: s.number for s in vol.lineage(state)}
    names = preserved_names(state)
    rows = retention.holds(state)

    def name(snap_id: str) -> str:
        return str(numbers[snap_id]) if snap_id in numbers else names.get(snap_id, snap_id[:12])

    data = {"holds": [{"mirror_id": h.mirror_id, "address": h.address, "updated": iso(h.time),
                       "snapshots": [numbers.get(i) for i in h.snapshots],
                       "snapshot_ids": list(h.snapshots)} for h in rows]}
    lines = [f"{'MIRROR':12}  {'UPDATED':20}  {'HOLDS':10}  ADDRESS"]
    lines += [f"{h.mirror_id[:12]:12}  {iso(h.time):20}  "
              f"{' '.join(name(i) for i in h.snapshots) or '-':10}  {h.address}" for h in rows]
    out.emit(data, "\n".join(lines) if rows else "no holds")


@cli.command()
@click.argument("volume")
@common_options
@served("volume")
def df(volume: str, out: Output) -> None:
    """How much disk VOL takes: its live tree, and its store (.volsync/) with how much of the
    store is in extents shared with other files (on btrfs or XFS: reflinked with the live
    tree or other volumes; on ext4 nothing is shared). Reads only; takes no lock.

    Sizes are the blocks allocated, hard-linked files counted once. Shared is what the
    filesystem reports (FIEMAP) as extents other files also use, so unshared is about what
    deleting the store would free; btrfs counts an extent as shared whole when any part of it
    is used elsewhere (and frees it only when no part is)."""
    use = ops.disk_use(Volume.open(volume))
    store = use.store
    data = {"volume": use.path, "live_bytes": use.live_bytes, "store_bytes": store.allocated,
            "store_shared_bytes": store.shared, "store_unshared_bytes": store.unshared,
            "store_files": store.files, "filesystem": use.filesystem}
    ratio = (f" ({store.unshared / use.live_bytes:.2f} of the live tree)"
             if use.live_bytes else "")
    out.emit(data, f"{quote_path(use.path)}: live tree {human_bytes(use.live_bytes)}; store "
                   f"{human_bytes(store.allocated)} on disk, {human_bytes(store.shared)} of it "
                   f"shared with other files (the live tree, other volumes); unshared "
                   f"{human_bytes(store.unshared)}{ratio}; filesystem {use.filesystem}")


@cli.command()
@click.argument("volume")
@click.argument("mirror")
@wait_option
@common_options
@served("volume")
def release(volume: str, mirror: str, wait: float, out: Output) -> None:
    """Drop the hold of MIRROR (its volume id, a prefix of 8 or more, or its address as
    'volsync holds' shows it) on VOL's snapshots, for a mirror that is gone."""
    hold = retention.release(Volume.open(volume), mirror, wait)
    out.emit({"released": hold.mirror_id, "address": hold.address},
             f"released the hold of {hold.address} ({hold.mirror_id[:12]})")


@cli.command()
@click.argument("volume")
@click.argument("snap")
@click.option("--force", is_flag=True, help="Destroy it even if a mirror holds it.")
@dry_run_option
@wait_option
@common_options
@served("volume")
def destroy(volume: str, snap: str, force: bool, dry_run: bool, wait: float,
            out: Output) -> None:
    """Drop one snapshot, lineage or preserved, and free the blocks nothing else refers to.
    Refused for the lineage's latest snapshot, and (exit 5) for one a mirror holds unless
    --force."""
    vol = Volume.open(volume)
    r = retention.destroy(vol, ops.resolve(vol, snap), force, wait, dry_run)
    data = {"destroyed": snap_ref(r.snapshot), "name": r.name,
            "held_by": [h.mirror_id for h in r.held_by], "blocks_freed": r.blocks_freed,
            "bytes_freed": r.bytes_freed, "dry_run": dry_run}
    verb, freed = ("would destroy", "would free") if dry_run else ("destroyed", "freed")
    out.emit(data, f"{verb} snapshot {r.name} ({r.snapshot.id[:12]}); {freed} {r.blocks_freed} "
                   f"blocks ({human_bytes(r.bytes_freed)})")


# --- mirroring ----------------------------------------------------------------------------------

def not_restored_text(skipped: NotRestored) -> str:
    """What the process may not restore (not an error, as for cp -a), if anything."""
    if not skipped.total:
        return ""
    parts = [f"{n} {what}" for what, n in skipped.as_dict().items() if n]
    return f"\nnot restored (this process may not): {', '.join(parts)}"


def plan_json(plan: TransferPlan, dry_run: bool, src_snapshot=None) -> dict:
    common = plan.lineages.common
    return {
        "common": common.number if common else None,
        "common_id": common.id if common else None,
        "added": [s.number for s in plan.lineages.add],
        "removed": [s.number for s in plan.lineages.remove],
        "preserved": plan.preserved_numbers,
        "blocks_sent": plan.blocks, "objects_sent": len(plan.objects), "bytes_sent": plan.bytes,
        "baseline": plan.baseline, "dry_run": dry_run,
        "src_snapshot": src_snapshot.number if src_snapshot else None,
    }


def plan_text(plan: TransferPlan, src: str, dst: str, dry_run: bool, src_snapshot=None) -> str:
    common = plan.lineages.common
    lines = [lineage_picture(plan, "SRC", "DST")] if dry_run else []
    if src_snapshot:
        verb = "would snapshot" if dry_run else "snapshotted"
        lines.append(f"{verb} SRC's live changes as {src_snapshot.number}")
    if plan.baseline:
        lines.append(f"create {dst} as a new mirror of {src}")
    lines.append(f"newest common snapshot: {common.number if common else 'none'}")
    lines.append("add:      " + (" ".join(str(s.number) for s in plan.lineages.add) or "-"))
    if plan.kind == "resync":
        pres = [f"{s.number}'" for s in plan.lineages.remove]
        pres += [f"{plan.live_number}' (live changes)"] if plan.live_changed else []
        lines.append("preserve: " + (" ".join(pres) or "-"))
    lines.append(f"send:     {plan.blocks} blocks, {len(plan.objects)} objects, "
                 f"{human_bytes(plan.bytes)}")
    if dry_run:
        lines.append("(dry run: nothing changed)")
    return "\n".join(lines)


def source_root(text: str) -> str:
    """SRC as its warnings name it: an absolute path here, or the address of a remote one."""
    return text if parse_address(text) is not None else os.path.abspath(text)


def warnings_text(count: int) -> str:
    return (f"\nwarnings: {count} file(s) of SRC not captured as they are (see the warnings "
            "above)") if count else ""


def _run_mirror(engine, src: str, dst: str, no_snapshot: bool, dry_run: bool, wait: float,
                out: Output, options: RemoteOptions, mkpath: bool = False,
                strict: bool = False, confirm: sync.Confirm | None = None) -> None:
    """transfer and resync: one engine call, then its plan as JSON or text."""
    result = engine(src, dst, no_snapshot=no_snapshot, dry_run=dry_run, wait=wait,
                    progress=out.progress(engine.__name__), options=options, mkpath=mkpath,
                    strict=strict, confirm=confirm)
    snap = result.src_snapshot
    count = report_warnings(out, result.warnings, source_root(src), result.warnings_omitted)
    data = plan_json(result.plan, dry_run, snap) | {
        "not_restored": result.not_restored.as_dict(), "bytes_on_wire": result.bytes_on_wire,
    } | warnings_json(result.warnings, result.warnings_omitted)
    out.emit(data, lambda: plan_text(result.plan, src, dst, dry_run, snap)
             + not_restored_text(result.not_restored) + warnings_text(count))
    exit_if_warned(count)


def mirror_options(fn):
    for deco in reversed([
        click.argument("src"), click.argument("dst"),
        click.option("--no-snapshot", is_flag=True,
                     help="Do not snapshot SRC's live changes first."),
        click.option("--mkpath", is_flag=True,
                     help="Create DST's missing parent directories (else only DST itself)."),
        strict_option, dry_run_option, wait_option, wire_options, remote_options,
        common_options,
    ]):
        fn = deco(fn)
    return fn


@cli.command()
@mirror_options
def transfer(src, dst, no_snapshot, mkpath, strict, dry_run, wait, compress, bwlimit, rsh,
             remote_path, out) -> None:
    """Update mirror DST from SRC, sending only blocks DST lacks.

    Creates DST as a mirror if it does not exist or is an empty directory. Refuses (exit 5)
    when DST is read-write, was written to, or has snapshots SRC lacks; exit 4 when they share
    no snapshot. A file of SRC that keeps changing or cannot be read is sent as in SRC's
    latest snapshot, with a warning (exit 7), unless --strict."""
    _run_mirror(sync.transfer, src, dst, no_snapshot, dry_run, wait, out,
                remote_settings(rsh, remote_path, compress, bwlimit), mkpath, strict)


@cli.command()
@mirror_options
@click.option("--force", is_flag=True,
              help="Do not ask before a read-write DST's own snapshots or live changes leave "
                   "its lineage (they are kept as preserved snapshots).")
def resync(src, dst, no_snapshot, mkpath, strict, dry_run, wait, compress, bwlimit, rsh,
           remote_path, out, force) -> None:
    """Make DST a read-only, up-to-date mirror of SRC again after they diverged.

    DST reverts to the newest common snapshot; its later snapshots and live changes become
    preserved snapshots; SRC's newer snapshots are sent. After 'volsync break B', 'volsync
    resync B A' carries B's writes back to A (reverse resync). A file of SRC that keeps
    changing or cannot be read is sent as in SRC's latest snapshot, with a warning (exit 7),
    unless --strict.

    When DST is read-write and has work of its own to lose from its lineage (the wrong
    direction after a failover?), resync shows both lineages and asks on a terminal; with no
    terminal it refuses (exit 5) unless --force. 'volsync revert DST pN' undoes it."""
    _run_mirror(sync.resync, src, dst, no_snapshot, dry_run, wait, out,
                remote_settings(rsh, remote_path, compress, bwlimit), mkpath, strict,
                None if force else ask_takeover)


def ask_takeover(t: sync.Takeover) -> None:
    """Show what a resync would take out of a read-write DST's lineage; go on only if the
    user says so on a terminal."""
    own = " ".join(f"{s.number}'" for s in t.removed)
    what = " and ".join(filter(None, [own and f"its snapshot(s) {own}",
                                      t.live_changes and "its live changes"]))
    message = (f"{t.dst} is read-write: resync would take {what} out of its lineage (kept as "
               f"preserved snapshots) and make it a mirror of {t.src}")
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise Diverged(f"{message}; did you mean 'volsync resync {t.dst} {t.src}'? Pass "
                       "--force to go on")
    src_ids = {s.id for s in t.src_lineage}
    dst_line = " ".join(f"{s.number}" + ("" if s.id in src_ids else "'") for s in t.dst_lineage)
    src_line = " ".join(str(s.number) for s in t.src_lineage) or "(empty)"
    live = " + live changes" if t.live_changes else ""
    common = t.common.number if t.common else "none"
    click.echo(f"SRC     {src_line}\nDST     {dst_line or '(empty)'}{live}\n"
               f"common  {common}\n{message}.", err=True)
    if not click.confirm("Go on?", default=False, err=True):
        raise Diverged("resync cancelled; nothing changed")


@cli.command(name="break")
@click.argument("dst")
@wait_option
@common_options
@served("dst")
def break_(dst: str, wait: float, out: Output) -> None:
    """Failover: mirror DST becomes read-write at once, keeping its snapshots and live tree."""
    state, already = sync.break_mirror(dst, wait)
    former = state.extra.get("former_upstream")
    out.emit({"mode": state.mode, "former_upstream": former, "already_done": already},
             f"{dst} is {'already' if already else 'now'} read-write (was a mirror of {former})")


@cli.command(name="role-swap")
@click.argument("a")
@click.argument("b")
@click.option("--link", default=None, metavar="PATH",
              help="A symlink flipped atomically to point at the new read-write volume.")
@strict_option
@dry_run_option
@wait_option
@wire_options
@remote_options
@common_options
def role_swap(a: str, b: str, link: str | None, strict: bool, dry_run: bool, wait: float,
              compress: bool, bwlimit: str | None, rsh: str | None, remote_path: str | None,
              out: Output) -> None:
    """Planned switchover: A read-write with mirror B becomes B read-write with mirror A.

    A's last changes are snapshotted and sent to B first, so nothing is lost; a file of A
    that keeps changing or cannot be read is sent as in A's latest snapshot, with a warning
    (exit 7), unless --strict (then nothing changes)."""
    r = sync.role_swap(a, b, link, dry_run=dry_run, wait=wait, progress=out.progress("role-swap"),
                       options=remote_settings(rsh, remote_path, compress, bwlimit),
                       strict=strict)
    data = plan_json(r.sync.plan, dry_run, r.sync.src_snapshot) if r.sync else {}
    if r.sync:
        data["bytes_on_wire"] = r.sync.bytes_on_wire
    warned = (r.sync.warnings, r.sync.warnings_omitted) if r.sync else ((), 0)
    count = report_warnings(out, warned[0], source_root(a), warned[1])
    data |= {"read_write": r.read_write, "read_only": r.read_only,
             "link": link, "already_done": r.already_done, "dry_run": dry_run}
    data |= warnings_json(*warned)

    def text() -> str:
        lines = [plan_text(r.sync.plan, a, b, dry_run, r.sync.src_snapshot)] if r.sync else []
        verb = "would make" if dry_run else ("already" if r.already_done else "now")
        lines.append(f"{verb}: {b} read-write, {a} its read-only mirror"
                     + (f"; {link} -> {r.read_write}" if link else ""))
        return "\n".join(lines) + warnings_text(count)

    out.emit(data, text)
    exit_if_warned(count)


# --- other machines -----------------------------------------------------------------------------

@cli.command()
@click.option("--stdio", is_flag=True, help="Speak the protocol on stdin/stdout (for ssh).")
@click.option("--restrict-to-path", "restrict", multiple=True, metavar="PATH",
              help="Serve only volumes inside PATH (repeatable; compared as real paths).")
@click.option("--read-only", is_flag=True, help="Refuse every change.")
def serve(stdio: bool, restrict: tuple[str, ...], read_only: bool) -> None:
    """Speak the volsync protocol on stdin/stdout; ssh runs this on the far side.

    The example is a line of ~/.ssh/authorized_keys on the far side: a key that may only
    mirror into /srv/mirrors."""
    if not stdio:
        raise BadArgument("serve speaks only on stdin/stdout: pass --stdio")
    sys.exit(serve_stdio(list(restrict), read_only, served_command))


@cli.command()
@click.argument("src")
@click.option("--from", "base", default=None, metavar="SNAP",
              help="The snapshot the receiver has (default: send every snapshot).")
@click.option("--to", "to", default=None, metavar="SNAP", help="The last snapshot to send "
              "(default: latest).")
@wire_options
@remote_options
@common_options
def send(src: str, base: str | None, to: str | None, compress: bool, bwlimit: str | None,
         rsh: str | None, remote_path: str | None, out: Output) -> None:
    """Write a stream of SRC's snapshots after --from up to --to, with every block the
    receiver needs, to stdout; the summary goes to stderr."""
    if sys.stdout.isatty():
        raise BadArgument("send writes a binary stream: redirect stdout to a file or a pipe")
    r = stream.send(src, sys.stdout.buffer, base_name=base, to_name=to,
                    options=remote_settings(rsh, remote_path, compress, bwlimit),
                    progress=out.progress("send"))
    sys.stdout.buffer.flush()
    data = plan_json(r.plan, False) | {"bytes_on_wire": r.bytes_on_wire,
                                        "base": r.base.number if r.base else None}
    out.emit(data, lambda: f"sent snapshot(s) "
             f"{' '.join(str(s.number) for s in r.plan.lineages.add)}"
             f" after {r.base.number if r.base else 'nothing'}: {r.plan.blocks} blocks, "
             f"{human_bytes(r.plan.bytes)}", err=True)


@cli.command()
@click.argument("dst")
@click.option("--mkpath", is_flag=True,
              help="Create DST's missing parent directories (else only DST itself).")
@wait_option
@remote_options
@common_options
def receive(dst: str, mkpath: bool, wait: float, rsh: str | None, remote_path: str | None,
            out: Output) -> None:
    """Read a stream made by 'volsync send' on stdin and add its snapshots to DST (created
    as a mirror if missing or empty), as transfer would.

    Exit 4 when DST lacks the stream's base snapshot; exit 6 when the stream is damaged or
    cut short, and then nothing is committed."""
    if sys.stdin.isatty():
        raise BadArgument("receive reads a stream on stdin: pipe 'volsync send' into it")
    r = stream.receive(dst, sys.stdin.buffer, wait=wait, mkpath=mkpath,
                       options=remote_settings(rsh, remote_path), progress=out.progress("receive"))
    objects, size = r.received
    data = plan_json(r.plan, False) | {
        "objects_sent": objects, "bytes_sent": size,
        "bytes_on_wire": r.bytes_on_wire, "not_restored": r.not_restored.as_dict()}
    added = " ".join(str(s.number) for s in r.plan.lineages.add) or "nothing new"
    out.emit(data, lambda: f"received: {added}; stored {objects} objects, {human_bytes(size)}"
             + not_restored_text(r.not_restored))


for _name, _command in cli.commands.items():  # --help: an example, what SNAP may be, exit codes
    _command.epilog = "\n\n".join(filter(None, [cli_help.epilog(_name), EXIT_CODES]))


# --- entry point ----------------------------------------------------------------------------

def _error(message: str, code: int, as_json: bool, extra: dict | None = None) -> None:
    click.echo(f"volsync: error: {message}", err=True)
    if as_json:
        click.echo(json.dumps({"error": message, "code": code} | (extra or {}), sort_keys=True))


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every failure becomes one line on stderr and the contract's exit code."""
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    try:
        cli.main(args=args, prog_name="volsync", standalone_mode=False, obj={"argv": args})
    except VolsyncError as exc:
        extra = None
        if isinstance(exc, Diverged) and exc.common is not None:
            extra = {"common": exc.common, "src_only": list(exc.src_only),
                     "dst_only": list(exc.dst_only)}
        _error(str(exc), exc.code, as_json, extra)
        sys.exit(exc.code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        if as_json:
            click.echo(json.dumps({"error": exc.format_message(), "code": exc.exit_code}))
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):
            click.echo("volsync: interrupted", err=True)
            sys.exit(130)
        click.echo("volsync: aborted", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("volsync: interrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        where = f" ({exc.filename!r})" if exc.filename else ""
        _error(f"{exc.strerror or exc}{where}", 1, as_json)
        sys.exit(1)
    sys.exit(0)
