"""`python -m volsync`: the same entry point as the installed `volsync` script."""

from .cli import main

main()
