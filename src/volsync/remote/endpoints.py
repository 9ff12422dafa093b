"""Opening the endpoints of a command: a local path or a remote address."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

from ..endpoint import LocalEndpoint
from ..wire import ConnectionLost
from .address import parse_address
from .client import RemoteEndpoint, RemoteOptions

Endpoint = LocalEndpoint | RemoteEndpoint


def open_endpoint(text: str, options: RemoteOptions | None = None) -> Endpoint:
    """A local path or a remote address (ssh://... or HOST:PATH)."""
    address = parse_address(text)
    if address is None:
        return LocalEndpoint(text)
    return RemoteEndpoint(address, options or RemoteOptions.from_env())


@contextmanager
def opened(*texts: str, options: RemoteOptions | None = None) -> Iterator[list[Endpoint]]:
    """Endpoints for the command's volumes; remote sessions end (and release their locks)
    when the command does."""
    eps: list[Endpoint] = []
    try:
        for text in texts:
            eps.append(open_endpoint(text, options))
        yield eps
    finally:
        for ep in eps:
            if isinstance(ep, RemoteEndpoint):
                ep.close()


def wire_bytes(*eps: Endpoint) -> int:
    return sum(ep.bytes_on_wire for ep in eps if isinstance(ep, RemoteEndpoint))




@contextmanager
def receiving(dst: Endpoint) -> Iterator[None]:
    """Around DST's journalled step (begin ... finish): Ctrl-C or a lost connection keeps
    what was received (sealed) and the journal, so a rerun resumes from there (any other
    command undoes the step); any other failure, even in the commit, undoes it now."""
    try:
        yield
    except (KeyboardInterrupt, ConnectionLost):
        with suppress(Exception):
            dst.interrupted()
        raise
    except BaseException:
        with suppress(Exception):
            dst.undo()
        raise
