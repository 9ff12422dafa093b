#!/usr/bin/env python3
"""A stand-in for ssh (usable as --rsh / VOLSYNC_RSH) that runs the "remote" command locally.

    rsh_shim.py [ssh options...] HOST COMMAND...

ssh's options are parsed the way ssh's getopt does: an option taking a value (-o -p -l -i -F
and ssh's other ones: -B -b -c -D -E -e -I -J -L -m -O -P -Q -R -S -W -w) takes the rest of
its argument or the next argument (`-p 22`, `-p22`, `-oX=1`); other letters are lone flags
(-T -q -x -n -4 -v ..., also clustered as `-Tq`); `--` ends the options. The next argument
is the host (`user@host` is accepted) and the rest, joined by spaces as ssh does, is run by
`sh -c` in the current directory with this process's environment.

When RSH_SHIM_LOG names a file, one JSON line per call is appended to it:
    {"host": "127.0.0.1", "port": "22", "user": "u", "command": "..."}
(port and user are null when not given; the last -p / -l wins.)

Only the standard library is used; run it as `sys.executable rsh_shim.py` so the shebang
does not matter.
"""

import json
import os
import sys
from typing import NoReturn

# ssh's options that take an argument (OpenSSH 9.x getopt string)
WITH_VALUE = set("BbcDEeFIiJLlmOoPpQRSWw")


def fail(message: str) -> NoReturn:
    sys.stderr.write(f"rsh_shim: {message}\n")
    sys.exit(255)  # what ssh exits with on its own errors


def parse(argv: list) -> tuple:
    port = user = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        j = 1
        while j < len(arg):
            letter = arg[j]
            if letter in WITH_VALUE:
                if j + 1 < len(arg):
                    value = arg[j + 1 :]
                else:
                    i += 1
                    if i >= len(argv):
                        fail(f"option -{letter} needs a value")
                    value = argv[i]
                if letter == "p":
                    port = value
                elif letter == "l":
                    user = value
                break
            j += 1
        i += 1
    if i >= len(argv):
        fail("no host given")
    host = argv[i]
    if "@" in host:
        at_user, host = host.rsplit("@", 1)
        user = user or at_user
    return host, port, user, argv[i + 1 :]


def main() -> None:
    host, port, user, rest = parse(sys.argv[1:])
    command = " ".join(rest)
    log = os.environ.get("RSH_SHIM_LOG")
    if log:
        record = {"host": host, "port": port, "user": user, "command": command}
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    if not command:
        fail("no command given (an interactive session is not supported)")
    sys.stdout.flush()
    os.execvp("sh", ["sh", "-c", command])


if __name__ == "__main__":
    main()
