"""volsync: snapshot mirroring of directories with resync by the newest common snapshot."""

__version__ = "0.2.0"
