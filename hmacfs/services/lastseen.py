"""Rows this node read recently, used only while the shared metadata (Redis) is unreachable.

Strategy: in cluster mode the row is what maps a path to its bytes, so an outage of
Redis would stop every download. Objects in the bucket are never overwritten (each
upload has its own, storage/objects.py), so a row read a moment ago points at the bytes
the file had then, or at nothing (then the download is an error, never a mix). Downloads
therefore fall back to the last row seen for a path when Redis cannot answer: files this
node served or stored recently keep downloading through an outage. The price: a file
another node deleted or replaced during the outage may still be served as it was (its
object lives on as a kept version or a shared blob). Nothing else reads from here, and a
row this node saw removed is removed here too.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Optional

from ..errors import HTTPError
from ..meta import FileRecord

MAX_ROWS = 20_000


class LastSeen:
    """A bounded map path -> the row last read or written for it on this node."""

    def __init__(self, max_rows: int = MAX_ROWS) -> None:
        self.max_rows = max_rows
        self._rows: OrderedDict[str, FileRecord] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, record: FileRecord) -> None:
        with self._lock:
            self._rows[record.path] = record
            self._rows.move_to_end(record.path)
            while len(self._rows) > self.max_rows:
                self._rows.popitem(last=False)

    def forget(self, path: str) -> None:
        with self._lock:
            self._rows.pop(path, None)

    def read(self, path: str, get: Callable[[str], Optional[FileRecord]]) -> Optional[FileRecord]:
        """`get(path)`, remembered; when it fails with a 503 (shared state unavailable), the row
        last seen for the path instead (the 503 stands when there is none)."""
        try:
            record = get(path)
        except HTTPError as e:
            if e.status != 503:
                raise
            with self._lock:
                stale = self._rows.get(path)
            if stale is None:
                raise
            return stale
        if record is None:
            self.forget(path)
        else:
            self.remember(record)
        return record
