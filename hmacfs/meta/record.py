"""What hmacfs knows about a stored file, and what handlers need from a metadata backend.

Strategy: the file on disk is the truth about *whether* a file exists; the metadata row
says what it is. The backends (SQLite here; Redis in cluster mode) implement `MetaStore`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol


@dataclass(frozen=True)
class FileRecord:
    """What hmacfs knows about one stored file."""

    path: str
    size: int
    content_type: str
    sha256: str
    created: float
    mtime_ns: int = 0          # the file's mtime when the row was written: detects outside edits
    expires: Optional[float] = None
    uploader: Optional[str] = None


class MetaStore(Protocol):
    """What handlers need from a metadata backend (SQLite here; Redis in cluster mode)."""

    def get(self, path: str) -> Optional[FileRecord]: ...
    def put(self, record: FileRecord) -> None: ...
    def delete(self, path: str) -> None: ...
    def expired(self, now: float, limit: int = 1000) -> list[FileRecord]: ...
