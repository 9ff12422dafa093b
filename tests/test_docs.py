"""The docs stay true: the CLI reference is the CLI's own help, every command is documented,
and the README's Quick start commands are the ones CI runs."""

from __future__ import annotations

import runpy
from pathlib import Path

from volsync.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_matches_help():
    # docs/cli.md is regenerated from --help (python docs/gen_cli.py > docs/cli.md)
    render = runpy.run_path(str(ROOT / "docs" / "gen_cli.py"))["render"]
    assert (ROOT / "docs" / "cli.md").read_text() == render()


def test_every_command_has_help_and_a_readme_mention():
    # each command has a docstring and appears in the README's command table
    readme = (ROOT / "README.md").read_text()
    for name, command in cli.commands.items():
        assert command.help, name
        assert f"volsync {name}" in readme, name


def test_ci_runs_the_readme_test_command():
    # .ci/run takes its command from the line after the README's test-command marker
    readme = (ROOT / "README.md").read_text().splitlines()
    at = readme.index("<!-- test-command -->")
    assert readme[at + 1] == "```sh" and "pytest" in readme[at + 2]
    assert "test-command" in (ROOT / ".ci" / "run").read_text()
