"""Generate docs/cli.md from the CLI's own --help: python docs/gen_cli.py > docs/cli.md
(tests/test_docs.py fails when the file and the help drift apart)."""

from __future__ import annotations

import click

from volsync.cli import cli


def render() -> str:
    parts = [
        "# volsync command reference\n",
        "Generated from `volsync --help` by `python docs/gen_cli.py > docs/cli.md`; "
        "the contract these follow is [contract.md](contract.md).\n",
        "```\n" + _help(cli, "volsync") + "```\n",
    ]
    for name in sorted(cli.commands):
        parts.append(f"## volsync {name}\n")
        parts.append("```\n" + _help(cli.commands[name], f"volsync {name}") + "```\n")
    return "\n".join(parts)


def _help(command: click.Command, name: str) -> str:
    with click.Context(command, info_name=name, terminal_width=100, max_content_width=100,
                       help_option_names=["-h", "--help"]) as ctx:
        return command.get_help(ctx) + "\n"


if __name__ == "__main__":
    print(render(), end="")
