"""How a path inside a volume is shown: quoted as git does with core.quotePath=true in text,
and as a display string plus its exact bytes (base64) in JSON.

A name may hold any byte but '/' and NUL: a newline would split an output line (a name could
fake a "D evil.txt" line of `diff`) and invalid UTF-8 has no faithful text form. Every line of
text that names a path goes through `quote_path`."""

from __future__ import annotations

import base64
import os

# C escapes git uses; every other byte below 0x20, 0x7f and every byte >= 0x80 is \ooo
_NAMED = {0x07: "\\a", 0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0B: "\\v", 0x0C: "\\f",
          0x0D: "\\r", 0x22: '\\"', 0x5C: "\\\\"}


def _byte(b: int) -> str:
    if b in _NAMED:
        return _NAMED[b]
    if b < 0x20 or b >= 0x7F:
        return f"\\{b:03o}"
    return chr(b)


def _needs_quotes(raw: bytes) -> bool:
    return any(b < 0x20 or b >= 0x7F or b in (0x22, 0x5C) for b in raw)


def path_bytes(path: bytes | str) -> bytes:
    """A path's exact bytes (a str is one decoded by os.fsdecode, surrogates included)."""
    return path if isinstance(path, bytes) else os.fsencode(path)


def quote_path(path: bytes | str) -> str:
    """The path as is when every byte is printable ASCII other than '"' and '\\'; else in
    double quotes with C escapes (\\n, \\t, \\", \\\\, ...) and other bytes as 3-digit octal
    (\\303\\251 for 'é'), as `git -c core.quotePath=true` prints it. One line, always."""
    raw = path_bytes(path)
    if not _needs_quotes(raw):
        return raw.decode("ascii")
    return '"' + "".join(_byte(b) for b in raw) + '"'


def display_path(path: bytes | str) -> str:
    """A path as text for JSON: UTF-8, invalid bytes shown as U+FFFD."""
    return path_bytes(path).decode("utf-8", "replace")


def path_fields(path: bytes | str, key: str = "path") -> dict[str, str]:
    """JSON fields for a path: `key`, its display text, and `key_b64`, the exact bytes in
    base64, when they are not valid UTF-8."""
    raw = path_bytes(path)
    try:
        return {key: raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {key: display_path(raw), f"{key}_b64": base64.b64encode(raw).decode("ascii")}
