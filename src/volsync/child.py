"""A read-only piece of work run in a forked child process, beside the parent's own work.

A local transfer scans two live trees: SRC's (its snapshot, which writes SRC's store) and
DST's (which only reads). The scans are Python-bound, so threads would take turns on one
core; a forked child takes the other. Only work that writes nothing is ever given to a
child: if the parent dies (even by kill -9) the kernel kills the child too, and a child that
fails only costs the parent doing the work itself."""

from __future__ import annotations

import os
import pickle
import signal
import threading
from collections.abc import Callable
from contextlib import suppress

PR_SET_PDEATHSIG = 1  # linux/prctl.h
NO_CHILD_ENV = "VOLSYNC_NO_CHILD"  # set (to anything): the work runs in the parent


class ReadingChild:
    """A forked child computing one value, handed back pickled through a pipe."""

    def __init__(self, pid: int, fd: int):
        self.pid, self.fd = pid, fd

    @classmethod
    def start(cls, work: Callable[[], object]) -> ReadingChild | None:
        """Fork a child to run `work`; None where that is not safe or possible (no fork, or
        other threads running: a fork copies only the calling thread, and any lock another
        thread holds would stay held in the child)."""
        if (not hasattr(os, "fork") or os.environ.get(NO_CHILD_ENV)
                or threading.active_count() > 1):
            return None
        parent = os.getpid()
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            return None
        if pid == 0:  # pragma: no cover - the child's coverage is not collected
            os.close(r)
            _run_child(parent, work, w)
        os.close(w)
        return cls(pid, r)

    def result(self) -> object | None:
        """The child's value, waiting for it; None if it failed (the caller then does the
        work itself, which raises its error the usual way)."""
        if self.fd < 0:
            return None
        try:
            with open(self.fd, "rb", closefd=True) as f:
                data = f.read()
        finally:
            self.fd = -1
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        if os.waitstatus_to_exitcode(status) != 0:
            return None
        try:
            return pickle.loads(data)
        except Exception:  # noqa: BLE001 - our own child's bytes; cut short, redo here
            return None

    def cancel(self) -> None:
        """Stop and reap the child if its value was not taken (the parent failed first)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.pid:
            with suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            with suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0


def _run_child(parent: int, work: Callable[[], object], fd: int) -> None:  # pragma: no cover
    code = 1
    with suppress(BaseException):  # the parent redoes the work and reports its error
        _die_with_parent(parent)
        data = pickle.dumps(work(), protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        code = 0
    os._exit(code)  # no atexit handlers, no finalizers, no buffers flushed twice


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to kill this child when its parent dies, so it never outlives the
    locks the parent held; then check the parent did not die before the ask."""
    with suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
