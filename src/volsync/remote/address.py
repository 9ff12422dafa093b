"""Where a volume is: a local path, or `ssh://[USER@]HOST[:PORT]/PATH`, or the scp form
`[USER@]HOST:PATH` (a colon before the first `/`; `./a:b` is a local path)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BadArgument

_URL = re.compile(r"^ssh://(?:(?P<user>[^@/]+)@)?(?P<host>\[[^\]/]+\]|[^:/@]+)"
                  r"(?::(?P<port>\d+))?(?P<path>/.*)$")


@dataclass(frozen=True)
class RemoteAddress:
    host: str
    path: str
    user: str | None = None
    port: int | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text or f"{self.host}:{self.path}"


def parse_address(text: str) -> RemoteAddress | None:
    """The remote address `text` names, or None for a local path."""
    if text.startswith("ssh://"):
        m = _URL.match(text)
        if not m:
            raise BadArgument(f"bad address {text!r}: use ssh://[USER@]HOST[:PORT]/PATH")
        port = int(m["port"]) if m["port"] else None
        if port is not None and not 0 < port < 65536:
            raise BadArgument(f"bad address {text!r}: port out of range")
        return RemoteAddress(m["host"].strip("[]"), m["path"], m["user"], port, text)
    if text.startswith("[") and "]:" in text:  # [IPv6]:PATH or [USER@IPv6]... as ssh does
        host, _, path = text[1:].partition("]:")
        user, _, host = host.rpartition("@")
        if not host or not path or "/" in host:
            raise BadArgument(f"bad address {text!r}: use [HOST]:PATH")
        return RemoteAddress(host, path, user or None, None, text)
    head, sep, path = text.partition(":")
    if not sep or "/" in head or not head:
        return None
    user, at, host = head.rpartition("@")
    if not host or "\0" in text or (at and not user):
        raise BadArgument(f"bad address {text!r}: use [USER@]HOST:PATH")
    if not path:
        raise BadArgument(f"bad address {text!r}: no path after the colon")
    return RemoteAddress(host, path, user or None, None, text)


def is_remote(text: str) -> bool:
    return parse_address(text) is not None
