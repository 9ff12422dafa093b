"""The tree layer: scan a live tree into tree objects, write a tree back safely, and compare
trees. Imports only the store."""

from .browse import KIND_NAMES, KIND_WORDS, file_chunks, lookup, outermost, parse_path, select, walk
from .diff import Change, diff_trees, live_differs
from .meta import PRIVILEGED, NotRestored
from .objects import Cancelled, Objects
from .scan import (
    RACY_COARSE_NS,
    RACY_NS,
    READ_ATTEMPTS,
    Progress,
    Scanner,
    ScanResult,
    SourceReadError,
    is_racy,
    scan,
)
from .write import Materializer

__all__ = [
    "KIND_NAMES",
    "KIND_WORDS",
    "PRIVILEGED",
    "RACY_COARSE_NS",
    "RACY_NS",
    "READ_ATTEMPTS",
    "Cancelled",
    "Change",
    "Materializer",
    "NotRestored",
    "Objects",
    "Progress",
    "ScanResult",
    "Scanner",
    "SourceReadError",
    "diff_trees",
    "file_chunks",
    "is_racy",
    "live_differs",
    "lookup",
    "outermost",
    "parse_path",
    "scan",
    "select",
    "walk",
]
