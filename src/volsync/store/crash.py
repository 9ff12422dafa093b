"""Test-only crash points: VOLSYNC_CRASH_AT="name:N" kills the process with os._exit at the
Nth passage of the named durable step (read once at start-up; unset in normal use)."""

from __future__ import annotations

import os

_SPEC = os.environ.get("VOLSYNC_CRASH_AT", "")
_NAME, _, _N = _SPEC.partition(":")
_TARGET = int(_N or "1") if _NAME else 0
_count = 0
CRASH_EXIT = 137


def crashpoint(name: str) -> None:
    """Mark a durable step; dies here when the test switch names it."""
    global _count
    if name != _NAME:
        return
    _count += 1
    if _count == _TARGET:
        os._exit(CRASH_EXIT)
