"""`python -m volsync`: the same entry point as the installed `volsync` script."""

from . import run

run()
