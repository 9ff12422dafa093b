"""Test-only switches, read once at start-up and unset in normal use.

VOLSYNC_CRASH_AT="name:N" kills the process with os._exit at the Nth passage of the named
durable step. VOLSYNC_CRASH_TRACE=FILE appends the name of every passage to FILE, so a test
can enumerate every (name, N) a command goes through. VOLSYNC_FAULT="op:ERRNO:N" makes the Nth I/O call of kind `op` (write, fsync,
read) fail with that errno, once; "op:ERRNO:N+" makes it fail from the Nth call on.
"""

from __future__ import annotations

import errno
import os

_SPEC = os.environ.get("VOLSYNC_CRASH_AT", "")
_NAME, _, _N = _SPEC.partition(":")
_TARGET = int(_N or "1") if _NAME else 0
_count = 0
_TRACE = os.environ.get("VOLSYNC_CRASH_TRACE", "")
CRASH_EXIT = 137
POINTS = (
    "atomic-write-before-rename", "pack-data-durable", "pack-index-committed",
    "pack-index-dropped", "midx-written", "snapshot-record-written", "state-committed",
    "live-entry-written", "live-temp-written",
    "object-received", "role-swap-source-demoted", "role-swap-mirror-promoted", "link-flipped",
    "upgrade-staged", "upgrade-committed", "upgrade-old-removed", "upgrade-moved",
    "upgrade-config-final",
)

_FAULT_OP, _FAULT_ERRNO, _FAULT_FROM, _FAULT_STICKY = "", 0, 0, False
if spec := os.environ.get("VOLSYNC_FAULT", ""):
    _FAULT_OP, name, nth = spec.split(":")
    _FAULT_ERRNO = getattr(errno, name)
    _FAULT_STICKY = nth.endswith("+")
    _FAULT_FROM = int(nth.rstrip("+"))
_fault_calls = 0


def crashpoint(name: str) -> None:
    """Mark a durable step; dies here when the test switch names it."""
    global _count
    if _TRACE:
        with open(_TRACE, "a") as trace:
            trace.write(name + "\n")
    if name != _NAME:
        return
    _count += 1
    if _count == _TARGET:
        os._exit(CRASH_EXIT)


def fault(op: str) -> None:
    """Mark an I/O call; fails here when the test switch names it."""
    global _fault_calls
    if op != _FAULT_OP:
        return
    _fault_calls += 1
    if _fault_calls == _FAULT_FROM or (_FAULT_STICKY and _fault_calls > _FAULT_FROM):
        raise OSError(_FAULT_ERRNO, f"{os.strerror(_FAULT_ERRNO)} (injected {op} fault)")
