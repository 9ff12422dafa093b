"""Progress goes to stderr only when it is a terminal, and only once a run passes 1 s."""

from __future__ import annotations

import io

from volsync import cli


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_progress_when_stderr_is_not_a_terminal(monkeypatch):
    # scripts and cron logs never see progress lines
    monkeypatch.setattr(cli.sys, "stderr", io.StringIO())
    assert cli.Output(False, False).progress("transfer") is None


def test_no_progress_with_json_or_quiet(monkeypatch):
    # --json keeps stdout one object; --quiet prints nothing but errors
    monkeypatch.setattr(cli.sys, "stderr", FakeTerminal())
    assert cli.Output(True, False).progress("transfer") is None
    assert cli.Output(False, True).progress("transfer") is None


def test_progress_appears_after_one_second(monkeypatch):
    # a short run shows nothing; past 1 s a byte counter with a rate is drawn on stderr
    term = FakeTerminal()
    monkeypatch.setattr(cli.sys, "stderr", term)
    now = [100.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: now[0])
    tick = cli.Output(False, False).progress("transfer")
    tick(1 << 20)
    assert term.getvalue() == ""
    now[0] += 2.0
    tick(1 << 20)
    assert "transfer: 2.0 MiB" in term.getvalue() and "/s" in term.getvalue()
