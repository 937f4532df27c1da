"""Per-file metadata: the record type, the MetaStore protocol and its SQLite backend."""
from .record import FileRecord, MetaStore
from .sqlite import SqliteMeta

__all__ = ["FileRecord", "MetaStore", "SqliteMeta"]
