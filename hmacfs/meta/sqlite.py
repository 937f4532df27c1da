"""Per-file metadata in SQLite (WAL): size, type, sha256, created, expires, uploader.

Strategy: the file on disk is the truth about *whether* a file exists; the metadata row
says what it is. A row may be missing (a crash between the commit and the insert, or an
adopted prosody-filer store): readers then rebuild it from the file (see handlers).

One connection, used under a lock, serves every thread. A connection per thread (the
obvious design) cost a database open per client connection and up to 2 MB of page
cache per thread, and concurrent writers met SQLite's busy handler, which *sleeps* with
growing back-off; each statement here takes microseconds, so serialising them is the
cheaper way. A small cache keeps hot rows off the database for downloads.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict
from typing import Optional

from ..errors import StartupError, storage_full
from .record import FileRecord

SQLITE_FULL = 13
MAX_DB_PATH_BYTES = 504  # SQLite's unix VFS caps path names at 512 bytes, "-journal" included

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    mtime_ns INTEGER NOT NULL DEFAULT 0,
    expires REAL,
    uploader TEXT
);
CREATE INDEX IF NOT EXISTS files_expires ON files (expires) WHERE expires IS NOT NULL;
"""


class SqliteMeta:
    """MetaStore on one SQLite file in WAL mode."""

    CACHE_SIZE = 1024

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        if len(os.fsencode(db_path)) > MAX_DB_PATH_BYTES:
            raise StartupError(f"the storage path is too long: SQLite cannot open {db_path!r} "
                               f"({len(os.fsencode(db_path))} bytes, at most {MAX_DB_PATH_BYTES}); "
                               "choose a shorter storagepath")
        os.makedirs(os.path.dirname(db_path), exist_ok=True)
        self._cache: OrderedDict[str, FileRecord] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._db_lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA cache_size=-512")  # KiB; rows are small and hot ones are cached above
            self._db.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise StartupError(f"metadata database {db_path!r} cannot be opened for writing: {e}") from None

    def _execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            with self._db_lock:
                return self._db.execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            if _is_full(e):
                raise storage_full() from e
            raise

    def get(self, path: str) -> Optional[FileRecord]:
        with self._cache_lock:
            record = self._cache.get(path)
            if record is not None:
                self._cache.move_to_end(path)
                return record
        rows = self._execute(
            "SELECT path, size, content_type, sha256, created, mtime_ns, expires, uploader "
            "FROM files WHERE path = ?", (path,))
        if not rows:
            return None
        record = FileRecord(*rows[0])
        self._remember(record)
        return record

    def _remember(self, record: FileRecord) -> None:
        with self._cache_lock:
            self._cache[record.path] = record
            self._cache.move_to_end(record.path)
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)

    def put(self, record: FileRecord) -> None:
        self._execute(
            "INSERT OR REPLACE INTO files (path, size, content_type, sha256, created, mtime_ns, "
            "expires, uploader) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (record.path, record.size, record.content_type, record.sha256, record.created,
             record.mtime_ns, record.expires, record.uploader))
        self._remember(record)

    def delete(self, path: str) -> None:
        with self._cache_lock:
            self._cache.pop(path, None)
        self._execute("DELETE FROM files WHERE path = ?", (path,))

    def expired(self, now: float, limit: int = 1000) -> list[FileRecord]:
        rows = self._execute(
            "SELECT path, size, content_type, sha256, created, mtime_ns, expires, uploader "
            "FROM files WHERE expires IS NOT NULL AND expires <= ? LIMIT ?", (now, limit))
        return [FileRecord(*row) for row in rows]


def _is_full(error: sqlite3.OperationalError) -> bool:
    """SQLITE_FULL: the disk filled under the database (sqlite_errorcode exists from Python 3.11)."""
    code = getattr(error, "sqlite_errorcode", None)
    return code == SQLITE_FULL if code is not None else "is full" in str(error)
