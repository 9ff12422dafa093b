"""The examples of every command's --help, in one place (cli.py puts each in its command's
epilog, before the exit codes), and what a SNAP argument may be, for the commands that take
one. An entry for a command this build lacks is not used."""

from __future__ import annotations

EXAMPLES = {
    "init": "volsync init /srv/data\n"
            "volsync init /srv/images --block-size 1M",
    "upgrade": "volsync upgrade /srv/data",
    "snapshot": "volsync snapshot /srv/data --label before-upgrade",
    "snapshots": "volsync snapshots /srv/data --all",
    "status": "volsync status /srv/data\n"
              "volsync status backup@beta:/srv/mirrors/data --json",
    "diff": "volsync diff /srv/data            # latest snapshot -> live tree\n"
            "volsync diff /srv/data 12 latest  # snapshot 12 -> latest",
    "revert": "volsync revert /srv/data before-upgrade --dry-run",
    "restore": "volsync restore /srv/data 12 /tmp/data-12\n"
               "volsync restore /srv/data p2 /tmp/r --path etc/app.conf --path home/ann",
    "verify": "volsync verify /mnt/b/data\n"
              "volsync verify /mnt/b/data --repair-from /srv/data",
    "prune": "volsync prune /srv/data --keep-last 30 --dry-run\n"
             "volsync prune /srv/data --keep hourly=24,daily=7,weekly=4,monthly=12\n"
             "volsync prune /srv/data --preserved",
    "transfer": "volsync transfer /srv/data /mnt/b/data\n"
                "volsync transfer /srv/data backup@beta:/srv/mirrors/data --compress",
    "break": "volsync break /mnt/b/data        # the source /srv/data is lost",
    "resync": "volsync resync /mnt/b/data /srv/data  # after 'volsync break /mnt/b/data'\n"
              "volsync resync --force /mnt/b/data /srv/data  # in a script: no question",
    "role-swap": "volsync role-swap /mnt/b/data /srv/data --link /srv/current",
    "serve": 'command="volsync serve --stdio --restrict-to-path /srv/mirrors",restrict '
             "ssh-ed25519 AAAA... admin@alpha",
    "send": "volsync send /srv/data --from 7 | ssh backup volsync receive /srv/mirror\n"
            "volsync send /srv/data --from 12 > /mnt/usb/data.vss",
    "receive": "volsync receive /vault/data < /mnt/usb/data.vss",
    "cat": "volsync cat /srv/data 12 etc/app.conf > app.conf",
    "ls": "volsync ls /srv/data 12 etc\n"
          "volsync ls /srv/data latest --no-recursive --json",
    "holds": "volsync holds /srv/data",
    "df": "volsync df /srv/data\n"
          "volsync df backup@beta:/srv/mirrors/data --json",
    "release": "volsync release /srv/data 3f9a1c2e   # a mirror id (prefix) 'holds' lists",
    "destroy": "volsync destroy /srv/data 12 --dry-run\n"
               "volsync destroy /srv/data p1",
}

# the commands that name snapshots, and how their help names those arguments
SNAP_ARGUMENTS = {
    "revert": "SNAP is", "restore": "SNAP is", "diff": "A and B are each",
    "send": "SNAP (of --from and --to) is", "cat": "SNAP is", "ls": "SNAP is",
    "destroy": "SNAP is",
}

SNAP_WORDS = ("a lineage snapshot's number or label, 'latest', an id prefix (at least 8 hex "
              "characters), or a preserved snapshot's name pN (see 'volsync snapshots --all').")


def epilog(command: str) -> str:
    """The help text after the options: the example, then what SNAP may be (click keeps a
    paragraph led by \\b as it is and wraps the others)."""
    parts = []
    if command in EXAMPLES:
        lines = EXAMPLES[command].splitlines()
        parts.append("\b\n" + ("Examples:" if len(lines) > 1 else "Example:") + "\n"
                     + "\n".join(f"  {line}" for line in lines))
    if command in SNAP_ARGUMENTS:
        parts.append(f"{SNAP_ARGUMENTS[command]} {SNAP_WORDS}")
    return "\n\n".join(parts)
