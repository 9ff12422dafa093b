"""The `volsync` program: `python -m volsync` and the installed script both run `run`."""

import os
import signal
import sys


def run() -> None:
    """A Ctrl-C while the modules load (nothing started yet) exits 130 at once, without a
    traceback; from then on it is handled like any interruption (journal kept, exit 130)."""
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    from .remote.spawn import prestart

    prestart(sys.argv[1:])  # ssh logs in while the rest of the program loads
    from .cli import main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()


if __name__ == "__main__":
    run()
