"""volsync: snapshot mirroring of directories with resync by the newest common snapshot."""

__version__ = "0.2.0"


def run() -> None:
    """The `volsync` program. A Ctrl-C while the modules load (nothing started yet) exits 130
    at once, without a traceback; from then on it is handled like any interruption."""
    import os
    import signal

    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    from .cli import main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
