"""Honest output (issue 9), through the real command line: `prune --dry-run` tells what the
real run frees; `status` tells a step still in progress from an interrupted one; every
command's --help has an example."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import clean_env, fingerprint, make_volume, ok, okj, snap, status, vs, write

from volsync.render import human_bytes

REMOTE_PATH = f"{sys.executable} -m volsync"


@pytest.fixture
def shim(monkeypatch, rsh_shim):
    monkeypatch.setenv("VOLSYNC_RSH", rsh_shim)
    monkeypatch.setenv("VOLSYNC_REMOTE_PATH", REMOTE_PATH)
    return rsh_shim


def where(path, remote: bool) -> str:
    return f"localhost:{path}" if remote else str(path)


# --- prune --dry-run --------------------------------------------------------------------------

def volume_with_garbage(path):
    """Four snapshots, each with a file of its own, and two preserved snapshots (a revert)."""
    v = make_volume(path, {"shared": os.urandom(30_000)})
    for i in range(4):
        write(v, {f"only{i}": os.urandom(40_000 + i)})
        if i:
            os.unlink(v / f"only{i - 1}")
        snap(v)
    write(v, {"unsnapshotted": os.urandom(20_000)})
    ok("revert", v, "2")  # 3, 4 and the live change become preserved
    return v


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
@pytest.mark.parametrize("args", [["--keep-last", "1"], ["--preserved"],
                                  ["--keep-last", "1", "--preserved"]],
                         ids=["keep-last", "preserved", "both"])
def test_prune_dry_run_frees_what_the_run_frees(tmp_path, shim, remote, args):
    v = volume_with_garbage(tmp_path / "V")
    before = fingerprint(v)
    dry = okj("prune", where(v, remote), *args, "--dry-run")
    assert fingerprint(v) == before  # nothing changed
    assert dry["dry_run"] and dry["blocks_freed"] > 0 and dry["bytes_freed"] > 40_000, dry
    text = ok("prune", where(v, remote), *args, "--dry-run").out
    assert (f"would free {dry['blocks_freed']} blocks ({human_bytes(dry['bytes_freed'])})"
            in text), text
    assert "would remove" in text and "freed" not in text
    real = okj("prune", where(v, remote), *args)
    assert (real["blocks_freed"], real["bytes_freed"]) == (dry["blocks_freed"],
                                                            dry["bytes_freed"])
    assert (real["removed"], real["preserved_removed"]) == (dry["removed"],
                                                            dry["preserved_removed"])
    again = okj("prune", where(v, remote), *args, "--dry-run")
    assert (again["blocks_freed"], again["bytes_freed"]) == (0, 0)


def test_prune_dry_run_of_nothing_to_free(tmp_path):
    v = make_volume(tmp_path / "V", {"f": os.urandom(10_000)})
    snap(v)
    r = ok("prune", v, "--keep-last", "5", "--dry-run")
    assert "would remove 0 lineage and 0 preserved snapshot(s); would free 0 blocks (0 B)" in r.out


# --- status while a transfer runs ---------------------------------------------------------------

def wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
def test_status_tells_a_running_step_from_an_interrupted_one(tmp_path, shim, remote):
    # a receive that has taken B's lock and announced its live-tree step (the journal) but
    # still waits for the rest of its stream: status says "in progress" and names the
    # process; once that process is gone (lock released, journal left), "interrupted"
    a = make_volume(tmp_path / "A", {"f": os.urandom(20_000)})
    snap(a)
    b = tmp_path / "B"
    ok("transfer", a, b)
    write(a, {f"g{i}": os.urandom(300_000) for i in range(8)})
    snap(a)
    stream = subprocess.run([sys.executable, "-m", "volsync", "send", str(a), "--from", "1"],
                            capture_output=True, env=clean_env(), check=True).stdout
    receiver = subprocess.Popen([sys.executable, "-m", "volsync", "receive", str(b)],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=clean_env())
    try:
        receiver.stdin.write(stream[: len(stream) // 2])
        receiver.stdin.flush()
        st = wait_for(lambda: (s := status(where(b, remote)))["pending"] and s)
        assert st["locked"] and st["lock_holder"] == receiver.pid, st
        text = ok("status", where(b, remote)).out
        assert (f"pending:  a materialize step in progress (volsync process {receiver.pid})"
                in text), text
        assert "interrupted" not in text
    finally:
        receiver.send_signal(signal.SIGKILL)
        receiver.wait()
        receiver.stdin.close()
    st = status(where(b, remote))
    assert st["pending"] == "materialize" and not st["locked"], st
    text = ok("status", where(b, remote)).out
    assert "pending:  an interrupted materialize step; the next command finishes it" in text
    assert "in progress" not in text
    r = vs("verify", b, "--json")  # the next command finishes (undoes) the step
    assert r.code == 0 and r.json["ok"], r
    assert status(b)["pending"] is None


# --- help -------------------------------------------------------------------------------------

def takes_snap(command) -> bool:
    """An argument or option named SNAP, or diff's A and B (snapshots too)."""
    return command.name == "diff" or any(
        (getattr(p, "metavar", None) or p.name.upper()) == "SNAP" for p in command.params)


def test_every_commands_help_has_an_example_naming_it():
    from volsync.cli import cli

    assert cli.commands, "no commands"
    for name in cli.commands:
        text = ok(name, "--help").out
        assert "Example" in text, name
        example = text.split("Example", 1)[1].split("Exit codes:")[0]
        assert f"volsync {name} " in example, (name, example)
        assert "Exit codes:" in text and "6  integrity" in text, name
    top = ok("--help").out
    assert "Exit codes:" in top and "Example" not in top  # the group keeps its exit codes


def test_help_says_what_snap_may_be():
    from volsync.cli import cli

    snap_commands = {name for name, command in cli.commands.items() if takes_snap(command)}
    assert {"revert", "restore", "diff", "send"} <= snap_commands
    for name in snap_commands:
        text = " ".join(ok(name, "--help").out.split())  # as one line, however it wraps
        for words in ("number or label", "'latest'", "id prefix (at least 8 hex characters)",
                      "preserved snapshot's name pN"):
            assert words in text, (name, words)


def test_every_example_names_its_command():
    # also the entries for commands other branches add (cat, ls, holds, release, destroy)
    from volsync.cli_help import EXAMPLES

    assert {"cat", "ls", "holds", "release", "destroy"} <= set(EXAMPLES)
    for name, example in EXAMPLES.items():
        assert all(f"volsync {name} " in line for line in example.splitlines()), name


# --- the contract in the repository ---------------------------------------------------------

def test_the_contract_is_in_the_repository():
    # README and the docs point to docs/contract.md, which holds the contract (with its exit
    # codes and JSON keys) and ends with what volsync added to it; nothing points outside
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    contract = (root / "docs" / "contract.md").read_text()
    assert contract.startswith("# volsync command-line contract")
    for heading in ("## Commands", "## Exit codes", "## JSON"):
        assert heading in contract, heading
    changes = contract.split("## Changes to the contract", 1)[1]
    assert "--mkpath" in changes and "exit 1" in changes
    assert "[docs/contract.md](docs/contract.md)" in (root / "README.md").read_text()
    docs = [root / "README.md", *(root / "docs").glob("*.md"), root / "docs" / "gen_cli.py"]
    assert not [p.name for p in docs if "../shared" in p.read_text()]


def test_the_quick_start_shows_the_scripts_closing_lines():
    # the README shows a short output, the closing line each example script prints, and says
    # how long the test command takes; the line .ci/run takes stays as it is
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    for script in ("quickstart", "failover-drill", "remote-drill"):
        text = (root / "examples" / f"{script}.sh").read_text()
        closing = re.findall(r'^echo "(.*: all steps passed.*)"$', text, re.MULTILINE)
        assert closing, script
        expected = closing[-1].replace("$RSH", "ssh")
        assert expected in quick, expected
    assert len([line for line in quick.splitlines() if "all steps passed" in line]) == 3
    assert "minutes" in quick.split("<!-- test-command -->")[0].rstrip().rsplit("\n\n", 1)[-1]
