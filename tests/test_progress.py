"""Progress: on stderr, only when stderr is a terminal and neither --json nor --quiet is given;
each step's bytes done, and where the plan knows it the total, percent, rate and time left;
erased before the result line. The CLI runs as a real process with stderr on a pseudo-terminal
(the `pty` module); the terminal's final screen is replayed from what was written to it."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

from helpers import argv_of, clean_env, make_volume, ok, okj, snap, sub, write

from volsync import cli
from volsync.render import human_bytes

REMOTE_PATH = f"{sys.executable} -m volsync"
CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def on_terminal(*args, stdout_too: bool = False, stdin=subprocess.DEVNULL,
                stdout=None, env_extra: dict | None = None) -> tuple[int, str, str]:
    """Run `volsync ARGS` with stderr (and, with stdout_too, stdout) on a pseudo-terminal of
    24x120. Returns the exit code, stdout (when not on the terminal) and all the terminal got."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = clean_env({"TERM": "xterm"} | (env_extra or {}))
    for name in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS"):
        env.pop(name, None)
    out = slave if stdout_too else (stdout if stdout is not None else subprocess.PIPE)
    p = subprocess.Popen([sys.executable, "-m", "volsync", *argv_of(args)], stdin=stdin,
                         stdout=out, stderr=slave, env=env)
    os.close(slave)
    shown = b""
    try:
        while select.select([master], [], [], 120)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed its end
                break
            if not chunk:
                break
            shown += chunk
        printed = p.stdout.read().decode() if p.stdout else ""
        code = p.wait(timeout=120)
    finally:
        os.close(master)
    return code, printed, shown.decode(errors="replace")


def screen(written: str) -> list[str]:
    """The lines a terminal shows after `written` (what rich uses: CR, LF, cursor up, erase
    line; other control sequences change nothing seen), blank ones left out."""
    lines, row, col = [""], 0, 0
    i = 0
    while i < len(written):
        m = CSI.match(written, i)
        if m:
            arg, op = m.groups()
            if op == "A":
                row = max(0, row - int(arg or 1))
            elif op == "K":
                lines[row] = "" if arg == "2" else lines[row][:col]
            i = m.end()
            continue
        ch = written[i]
        i += 1
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            if row == len(lines):
                lines.append("")
        elif ch >= " ":
            line = lines[row].ljust(col)
            lines[row] = line[:col] + ch + line[col + 1:]
            col += 1
    return [line.rstrip() for line in lines if line.strip()]


def plain(written: str) -> str:
    """What was drawn, control sequences taken out (every frame, erased ones too)."""
    return CSI.sub("", written)


def diverged(tmp_path: Path) -> tuple[Path, Path]:
    """A source A, its mirror B broken off and written to (the failover of issue 9)."""
    a = make_volume(tmp_path / "A", {f"f{i}": os.urandom(40_000) for i in range(10)})
    snap(a)
    ok("transfer", a, tmp_path / "B")
    b = tmp_path / "B"
    ok("break", b)
    write(b, {f"new/g{i}": os.urandom(70_000) for i in range(5)})
    write(b, {"f1": os.urandom(49)})
    return a, b


# --- no progress where it does not belong ---------------------------------------------------

def test_no_progress_when_stderr_is_not_a_terminal(monkeypatch, tmp_path):
    # scripts and cron logs never see progress lines: a real run with stderr on a pipe
    monkeypatch.setattr(cli.sys, "stderr", io.StringIO())
    assert cli.Output(False, False).progress("transfer") is None
    a, b = diverged(tmp_path)
    r = sub("resync", b, a)
    assert r.code == 0 and r.err == "", r
    assert "send:" in r.out


def test_no_progress_with_json_or_quiet(monkeypatch, tmp_path):
    # --json keeps stdout one object; --quiet prints nothing but errors: on a terminal too
    monkeypatch.setattr(cli.sys, "stderr", FakeTerminal())
    assert cli.Output(True, False).progress("transfer") is None
    assert cli.Output(False, True).progress("transfer") is None
    a = make_volume(tmp_path / "A", {"f": os.urandom(300_000)})
    code, out, shown = on_terminal("transfer", a, tmp_path / "B", "--json")
    assert code == 0 and shown == "", shown
    assert okj("status", tmp_path / "B")["mode"] == "read-only" and '"bytes_sent"' in out
    write(a, {"g": os.urandom(100_000)})
    code, out, shown = on_terminal("transfer", a, tmp_path / "B", "--quiet")
    assert (code, out, shown) == (0, "", "")


# --- progress on a terminal -------------------------------------------------------------------

def test_resync_progress_shows_the_plans_total_and_is_erased(tmp_path):
    # issue 9: a resync's progress said 49 B when 358.8 KiB were sent (the bytes hashed by the
    # snapshot before it were the last figure drawn). Now each step has its line; the sending
    # step counts the plan's bytes of the plan's total, the figure the result line reports.
    a, b = diverged(tmp_path)
    planned = okj("resync", b, a, "--dry-run")["bytes_sent"]
    total = human_bytes(planned)
    code, out, shown = on_terminal("resync", b, a)
    assert code == 0, (out, shown)
    assert out.splitlines()[-1].endswith(total), out  # the result line: "send: ..., TOTAL"
    drawn = plain(shown)
    assert "snapshot SRC" in drawn and "scan DST" in drawn
    assert f"{total} / {total}  100%" in drawn, drawn  # the sending step, done
    assert "/s" in drawn and "left" in drawn
    assert screen(shown) == [], screen(shown)  # nothing left on the terminal
    assert "\x1b" not in out and "left" not in out  # stdout: the result only


def test_progress_is_erased_before_the_result_line(tmp_path):
    # stdout and stderr on one terminal, as an administrator runs it: the screen afterwards
    # shows the result and no progress line
    a = make_volume(tmp_path / "A", {f"f{i}": os.urandom(100_000) for i in range(8)})
    code, _, shown = on_terminal("transfer", a, tmp_path / "B", stdout_too=True)
    assert code == 0
    shown_lines = screen(shown)
    assert shown_lines[0].startswith("snapshotted SRC's live changes as 1"), shown_lines
    assert shown_lines[-1].startswith("send:"), shown_lines
    assert not any("left" in line or "━" in line for line in shown_lines), shown_lines
    sent = shown_lines[-1].rsplit(", ", 1)[1]
    assert f"{sent} / {sent}  100%" in plain(shown)  # it was drawn, then erased


def test_an_error_erases_the_progress_before_its_message(tmp_path):
    # a run failing after its progress began (a stream cut short: exit 6) leaves only its
    # one-line error on the terminal
    a = make_volume(tmp_path / "A", {f"f{i}": os.urandom(50_000) for i in range(6)})
    snap(a)
    stream = tmp_path / "a.vss"
    with open(stream, "wb") as f:
        assert subprocess.run([sys.executable, "-m", "volsync", "send", str(a)], stdout=f,
                              stderr=subprocess.DEVNULL, env=clean_env(), check=False).returncode == 0
    with open(stream, "r+b") as f:
        f.truncate(stream.stat().st_size // 2)
    with open(stream, "rb") as f:
        code, _, shown = on_terminal("receive", tmp_path / "B", stdin=f, stdout_too=True)
    assert code == 6
    lines = screen(shown)
    assert len(lines) == 1 and lines[0].startswith("volsync: error:"), lines
    assert "receive" in plain(shown).split("volsync: error:")[0]  # drawn first, then erased


def test_verify_and_restore_show_bytes_of_a_total(tmp_path):
    a = make_volume(tmp_path / "A", {f"f{i}": os.urandom(60_000) for i in range(5)})
    with open(a / "sparse", "wb") as f:  # a hole counts as done without being written
        f.truncate(3 << 20)
        f.write(b"x" * 1000)
    os.link(a / "f0", a / "f0-again")  # a hard link's bytes are written once
    size = snap(a)["size"]
    code, out, shown = on_terminal("restore", a, "latest", tmp_path / "R")
    assert code == 0 and out.startswith("restored snapshot 1"), out
    total = human_bytes(size)
    assert "write files" in plain(shown) and f"{total} / {total}  100%" in plain(shown)
    assert screen(shown) == []
    packs = sum(p.stat().st_size for p in (a / ".volsync" / "packs").glob("*.pack"))
    code, out, shown = on_terminal("verify", a)
    assert code == 0 and out.startswith("ok:"), out
    total = human_bytes(packs)
    assert "check blocks" in plain(shown) and f"{total} / {total}  100%" in plain(shown)
    assert screen(shown) == []


def test_send_and_receive_show_the_streams_total(tmp_path):
    a = make_volume(tmp_path / "A", {f"f{i}": os.urandom(50_000) for i in range(6)})
    snap(a)
    stream = tmp_path / "a.vss"
    with open(stream, "wb") as f:
        code, _, shown = on_terminal("send", a, stdout=f)
    assert code == 0
    summary = screen(shown)
    assert len(summary) == 1 and summary[0].startswith("sent snapshot(s) 1"), summary
    total = summary[0].rsplit(", ", 1)[1]
    assert "send" in plain(shown) and f"{total} / {total}  100%" in plain(shown), shown
    with open(stream, "rb") as f:
        code, out, shown = on_terminal("receive", tmp_path / "B", stdin=f)
    assert code == 0 and out.startswith("received: 1"), out
    assert "receive" in plain(shown) and f"{total} / {total}  100%" in plain(shown)
    assert screen(shown) == []


def test_progress_of_a_push_to_a_remote_mirror(tmp_path, rsh_shim):
    # the far side's work is not counted here (its step shows the time it takes); the bytes
    # sent to it are, of the plan's total
    a = make_volume(tmp_path / "A", {f"f{i}": os.urandom(50_000) for i in range(6)})
    env = {"VOLSYNC_RSH": rsh_shim, "VOLSYNC_REMOTE_PATH": REMOTE_PATH}
    code, out, shown = on_terminal("transfer", a, f"localhost:{tmp_path / 'B'}", env_extra=env)
    assert code == 0, (out, shown)
    total = out.splitlines()[-1].rsplit(", ", 1)[1]
    assert f"{total} / {total}  100%" in plain(shown), shown
    assert screen(shown) == []


def test_role_swap_progress(tmp_path):
    # role-swap sends A's last changes to B first: that step shows the plan's total
    a = make_volume(tmp_path / "A", {"f": os.urandom(100_000)})
    ok("transfer", a, tmp_path / "B")
    write(a, {f"g{i}": os.urandom(80_000) for i in range(4)})
    code, out, shown = on_terminal("role-swap", a, tmp_path / "B")
    assert code == 0, (out, shown)
    sent = next(line for line in out.splitlines() if line.startswith("send:"))
    total = sent.rsplit(", ", 1)[1]
    assert f"{total} / {total}  100%" in plain(shown), shown
    assert screen(shown) == []
