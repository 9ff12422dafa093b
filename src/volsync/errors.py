"""Typed errors. Each kind carries the exit code of docs/contract.md."""

from __future__ import annotations


class VolsyncError(Exception):
    """Base of every error the CLI reports as one line and an exit code."""

    code = 1


class NotAVolume(VolsyncError):
    code = 1


class BadArgument(VolsyncError):
    code = 1


class VolumeLocked(VolsyncError):
    code = 3

    def __init__(self, path: str, pid: int | None, why: str = ""):
        holder = f"volsync process {pid}" if pid else "another process (no pid recorded)"
        super().__init__(f"volume {path} is locked by {holder}{why}")
        self.path = path
        self.pid = pid


class NoCommonSnapshot(VolsyncError):
    code = 4


class Diverged(VolsyncError):
    """Refused: going on would diverge or overwrite changes (resync is the way)."""

    code = 5

    def __init__(self, message: str, common: int | None = None,
                 src_only: tuple[int, ...] = (), dst_only: tuple[int, ...] = ()):
        super().__init__(message)
        self.common = common
        self.src_only = src_only
        self.dst_only = dst_only


class IntegrityError(VolsyncError):
    code = 6


class StoreAccessError(VolsyncError):
    """The OS refused to open, map or read a store file for a reason that is no damage: too
    many open files, out of memory, no permission. Exit 1, never 6: nothing is wrong with
    the data, and nothing may be repaired or thrown away because of it."""

    code = 1


class FormatTooOld(VolsyncError):
    """A volume of an older format: only `volsync upgrade` opens it."""

    code = 1
