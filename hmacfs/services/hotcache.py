"""Bytes of small, recently served files, each hit validated against a fresh lstat.

Strategy: with a thread per connection, a small GET is limited less by Python than by
the GIL changing hands at every blocking syscall (profiled: two thirds of the time in
the kernel, mostly task switches). Serving a cached small file needs one lstat instead
of open + fstat + pread + close. An entry is used only while the file's identity (inode,
size, mtime) is unchanged, so a file replaced or deleted outside hmacfs is never served
stale; hmacfs's own deletes drop the entry at once. Bounded in entry size and total bytes.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import NamedTuple, Optional

MAX_FILE = 64 * 1024
MAX_TOTAL = 4 * 1024 * 1024


class Identity(NamedTuple):
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class HotFiles:
    """An LRU of small file contents keyed by signed path."""

    def __init__(self, max_file: int = MAX_FILE, max_total: int = MAX_TOTAL) -> None:
        self.max_file = max_file
        self.max_total = max_total
        self._entries: OrderedDict[str, tuple[Identity, bytes]] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def get(self, path: str, identity: Identity) -> Optional[bytes]:
        with self._lock:
            entry = self._entries.get(path)
            if entry is None:
                return None
            if entry[0] != identity:
                self._drop(path)
                return None
            self._entries.move_to_end(path)
            return entry[1]

    def put(self, path: str, identity: Identity, data: bytes) -> None:
        if len(data) > self.max_file or len(data) != identity.size:
            return
        with self._lock:
            self._drop(path)
            self._entries[path] = (identity, data)
            self._total += len(data)
            while self._total > self.max_total:
                self._drop(next(iter(self._entries)))

    def discard(self, path: str) -> None:
        with self._lock:
            self._drop(path)

    def _drop(self, path: str) -> None:
        entry = self._entries.pop(path, None)
        if entry is not None:
            self._total -= len(entry[1])
