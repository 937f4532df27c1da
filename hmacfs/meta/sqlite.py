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

import logging
import os
import sqlite3
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from ..errors import StartupError, storage_full
from .record import BanRecord, FileRecord, PartialRecord, Usage, VersionRecord

log = logging.getLogger("hmacfs")
SQLITE_FULL = 13
MIN_SQLITE = (3, 24, 0)  # upserts (Debian 10 and later); no RETURNING, so Debian 11 (3.34) works
MAX_DB_PATH_BYTES = 504  # SQLite's unix VFS caps path names at 512 bytes, "-journal" included

SCHEMA_VERSION = 6
TOTAL = "\x00total"  # the usage row that counts every file (no uploader can be named so)
FILE_COLUMNS = ("path, size, content_type, sha256, created, mtime_ns, expires, uploader, version, blob, ref, "
                "encrypted, image, image_offset, object_key")
VERSION_COLUMNS = ("path, version, size, content_type, sha256, created, uploader, blob, location, encrypted, "
                   "object_key")
PARTIAL_COLUMNS = ("id, path, length, content_type, protocol, created, expires, file_expires, uploader, metadata, "
                   "grant_protocol, completed")

TABLES = """
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

# Version 2: dedup (blob, ref), versioning, encryption flag, quotas (usage kept by triggers).
V2 = """
ALTER TABLE files ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE files ADD COLUMN blob TEXT;
ALTER TABLE files ADD COLUMN ref INTEGER NOT NULL DEFAULT 0;
ALTER TABLE files ADD COLUMN encrypted INTEGER NOT NULL DEFAULT 0;
CREATE INDEX files_uploader ON files (uploader) WHERE uploader IS NOT NULL;
CREATE INDEX files_blob ON files (blob) WHERE blob IS NOT NULL;
CREATE TABLE versions (
    path TEXT NOT NULL,
    version INTEGER NOT NULL,
    size INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    uploader TEXT,
    blob TEXT,
    location TEXT,
    encrypted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (path, version)
);
CREATE INDEX versions_blob ON versions (blob) WHERE blob IS NOT NULL;
CREATE TABLE blobs (sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, refs INTEGER NOT NULL);
CREATE TABLE usage (uploader TEXT PRIMARY KEY, files INTEGER NOT NULL, bytes INTEGER NOT NULL);
CREATE TABLE upload_log (uploader TEXT NOT NULL, at REAL NOT NULL, size INTEGER NOT NULL);
CREATE INDEX upload_log_by ON upload_log (uploader, at);
INSERT INTO usage SELECT uploader, COUNT(*), SUM(size) FROM files WHERE uploader IS NOT NULL GROUP BY uploader;
INSERT INTO usage SELECT char(0) || 'total', COUNT(*), COALESCE(SUM(size), 0) FROM files;
"""

# Version 3: resumable uploads (tus and IETF) in progress; their bytes live in .hmacfs/partials/.
V3 = """
CREATE TABLE IF NOT EXISTS partials (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    length INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    protocol TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    file_expires REAL,
    uploader TEXT,
    metadata TEXT NOT NULL DEFAULT '',
    grant_protocol TEXT NOT NULL DEFAULT '',
    completed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS partials_expires ON partials (expires);
"""

# Version 4: bans after repeated authentication failures (policy/bans.py), kept across restarts.
V4 = """
CREATE TABLE IF NOT EXISTS bans (
    address TEXT PRIMARY KEY,
    until REAL NOT NULL,
    created REAL NOT NULL,
    failures INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS bans_until ON bans (until);
"""
BAN_COLUMNS = "address, until, created, failures, reason"

# Version 5: files packed into ISO 9660 images (hmacfs/iso.py): which image, at which byte.
V5 = """
ALTER TABLE files ADD COLUMN image TEXT;
ALTER TABLE files ADD COLUMN image_offset INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS files_image ON files (image) WHERE image IS NOT NULL;
"""

# Version 6: the S3 backend (storage/s3store.py) keeps each upload in an object of its own.
V6 = """
ALTER TABLE files ADD COLUMN object_key TEXT;
ALTER TABLE versions ADD COLUMN object_key TEXT;
"""

# Usage rows follow every insert, update and delete of files and versions, in the same
# transaction, whoever writes (the server or the `hmacfs files` tools).
_USAGE_TRIGGERS = "".join(f"""
CREATE TRIGGER IF NOT EXISTS {table}_usage_ins AFTER INSERT ON {table} BEGIN
    INSERT INTO usage SELECT u, 1, NEW.size FROM (SELECT char(0) || 'total' AS u UNION ALL
        SELECT NEW.uploader WHERE NEW.uploader IS NOT NULL) WHERE true
        ON CONFLICT(uploader) DO UPDATE SET files = files + 1, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER IF NOT EXISTS {table}_usage_del AFTER DELETE ON {table} BEGIN
    UPDATE usage SET files = files - 1, bytes = bytes - OLD.size
        WHERE uploader = char(0) || 'total' OR uploader = OLD.uploader;
END;
CREATE TRIGGER IF NOT EXISTS {table}_usage_upd AFTER UPDATE OF size, uploader ON {table} BEGIN
    UPDATE usage SET files = files - 1, bytes = bytes - OLD.size
        WHERE uploader = char(0) || 'total' OR uploader = OLD.uploader;
    INSERT INTO usage SELECT u, 1, NEW.size FROM (SELECT char(0) || 'total' AS u UNION ALL
        SELECT NEW.uploader WHERE NEW.uploader IS NOT NULL) WHERE true
        ON CONFLICT(uploader) DO UPDATE SET files = files + 1, bytes = bytes + excluded.bytes;
END;
""" for table in ("files", "versions"))


# Added after schema 2 shipped; an index changes no row, so it needs no new schema version.
VERSIONS_BY_LOCATION = "CREATE INDEX IF NOT EXISTS versions_location ON versions (location) WHERE location IS NOT NULL"


class SqliteMeta:
    """MetaStore on one SQLite file in WAL mode (shared with the `hmacfs files` tools)."""

    CACHE_SIZE = 1024

    def __init__(self, db_path: str, cache: bool = True) -> None:
        self.db_path = db_path
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise StartupError(f"the SQLite library is {sqlite3.sqlite_version}; hmacfs needs "
                               f"{'.'.join(map(str, MIN_SQLITE))} or newer (upserts)")
        if len(os.fsencode(db_path)) > MAX_DB_PATH_BYTES:
            raise StartupError(f"the storage path is too long: SQLite cannot open {db_path!r} "
                               f"({len(os.fsencode(db_path))} bytes, at most {MAX_DB_PATH_BYTES}); "
                               "choose a shorter storagepath")
        os.makedirs(os.path.dirname(db_path), exist_ok=True)
        self._cache: OrderedDict[str, FileRecord] = OrderedDict()
        self._cache_size = self.CACHE_SIZE if cache else 0
        self._cache_lock = threading.Lock()
        self._db_lock = threading.RLock()  # re-entered by the statements of a transaction
        self._undo: list[Callable[[], None]] = []
        try:
            self._db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # e.g. a filesystem without shared memory for the WAL index
                raise StartupError(f"metadata database {db_path!r}: SQLite could not use WAL mode "
                                   f"(got {mode!r}); put storagepath on a local filesystem")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA cache_size=-512")  # KiB; rows are small and hot ones are cached above
            self._migrate()
        except StartupError:
            self._db.close()
            raise
        except sqlite3.Error as e:
            raise StartupError(f"metadata database {db_path!r} cannot be opened for writing: {e}") from None

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION in one transaction; refuse a newer database."""
        found = self._db.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise StartupError(f"metadata database {self.db_path!r} was written by a newer hmacfs (schema "
                               f"{found}; this version reads up to {SCHEMA_VERSION}): upgrade hmacfs")
        if found == SCHEMA_VERSION:
            self._db.execute(VERSIONS_BY_LOCATION)
            return
        steps = (TABLES + V2 + _USAGE_TRIGGERS if found < 2 else "") + VERSIONS_BY_LOCATION + ";"
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(files)")}
        v5 = "" if "image" in columns else V5  # ALTER TABLE ADD COLUMN has no IF NOT EXISTS: run it once
        v6 = "" if "object_key" in columns else V6
        script = f"BEGIN IMMEDIATE;{steps}{V3}{V4}{v5}{v6}PRAGMA user_version = {SCHEMA_VERSION};COMMIT;"
        try:
            self._db.executescript(script)
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._db_lock:
            self._db.close()

    def _execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            with self._db_lock:
                return self._db.execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            if _is_full(e):
                raise storage_full() from e
            raise

    def _changes(self, sql: str, params: tuple = ()) -> int:
        """Run one statement; how many rows it inserted, changed or deleted."""
        try:
            with self._db_lock:
                return self._db.execute(sql, params).rowcount
        except sqlite3.OperationalError as e:
            if _is_full(e):
                raise storage_full() from e
            raise

    @contextmanager
    def transaction(self) -> Iterator[list[Callable[[], None]]]:
        """One write transaction (BEGIN IMMEDIATE: across processes too); nested calls join it.

        Yields a list for undo steps: when the transaction fails (its COMMIT included) they run,
        newest first, after the ROLLBACK but while the metadata lock is still held, so no other
        commit can see (or build on) what they undo. A failing step is logged, not raised."""
        with self._db_lock:
            if self._db.in_transaction:
                yield self._undo
                return
            self._undo = undo = []
            try:
                self._execute("BEGIN IMMEDIATE")
                yield undo
                self._execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLITE_FULL may have rolled it back already
                    self._db.execute("ROLLBACK")
                with self._cache_lock:
                    self._cache.clear()  # rows remembered inside the transaction never happened
                run_undo(undo)
                raise
            finally:
                self._undo = []

    # -- files ----------------------------------------------------------------------------------

    def get(self, path: str) -> Optional[FileRecord]:
        with self._cache_lock:
            record = self._cache.get(path)
            if record is not None:
                self._cache.move_to_end(path)
                return record
        rows = self._execute(f"SELECT {FILE_COLUMNS} FROM files WHERE path = ?", (path,))
        if not rows:
            return None
        record = _file(rows[0])
        self._remember(record)
        return record

    def _remember(self, record: FileRecord) -> None:
        if not self._cache_size:
            return
        if record.ref or record.image:  # the only trace of its file: always read fresh
            self._forget(record.path)  # nor keep what the path held before
            return
        with self._cache_lock:
            self._cache[record.path] = record
            self._cache.move_to_end(record.path)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _forget(self, path: str) -> None:
        with self._cache_lock:
            self._cache.pop(path, None)

    def put(self, record: FileRecord) -> None:
        """Insert or replace the row of `record.path`."""
        self._execute(
            f"INSERT INTO files ({FILE_COLUMNS}) VALUES ({', '.join('?' * 15)}) "
            "ON CONFLICT(path) DO UPDATE SET size = excluded.size, content_type = excluded.content_type, "
            "sha256 = excluded.sha256, created = excluded.created, mtime_ns = excluded.mtime_ns, "
            "expires = excluded.expires, uploader = excluded.uploader, version = excluded.version, "
            "blob = excluded.blob, ref = excluded.ref, encrypted = excluded.encrypted, image = excluded.image, "
            "image_offset = excluded.image_offset, object_key = excluded.object_key", _file_row(record))
        self._remember(record)

    def put_new(self, record: FileRecord) -> bool:
        """Insert the row unless the path has one; False when it has (a racing upload won)."""
        inserted = self._changes(
            f"INSERT INTO files ({FILE_COLUMNS}) VALUES ({', '.join('?' * 15)}) "
            "ON CONFLICT(path) DO NOTHING", _file_row(record))
        if inserted:
            self._remember(record)
        return bool(inserted)

    def take(self, path: str, expired_at: Optional[float] = None) -> Optional[FileRecord]:
        """Delete the row of `path` and return it as it was in the database (not the cache):
        whoever takes a row owns releasing what it pointed at, exactly once, even when another
        process (the `hmacfs files` tools) removed it first. With `expired_at`, only a row that
        is still expired then (a fresh upload in its place is left alone)."""
        self._forget(path)
        where, params = ("path = ?", (path,)) if expired_at is None else (
            "path = ? AND expires IS NOT NULL AND expires <= ?", (path, expired_at))
        with self.transaction():  # the row as read is the row deleted (BEGIN IMMEDIATE: across processes)
            rows = self._execute(f"SELECT {FILE_COLUMNS} FROM files WHERE {where}", params)
            if rows:
                self._execute(f"DELETE FROM files WHERE {where}", params)
        return _file(rows[0]) if rows else None

    def expired(self, now: float, limit: int = 1000) -> list[FileRecord]:
        rows = self._execute(f"SELECT {FILE_COLUMNS} FROM files WHERE expires IS NOT NULL AND expires <= ? "
                             "ORDER BY expires LIMIT ?", (now, limit))
        return [_file(row) for row in rows]

    def select(self, uploader: Optional[str] = None, prefix: Optional[str] = None,
               created_before: Optional[float] = None, limit: int = 1000, after: str = "") -> list[FileRecord]:
        """Rows matching every given selector, by path, `limit` at a time after the path `after`."""
        where, params = ["path > ?"], [after]
        if uploader is not None:
            where.append("uploader = ?")
            params.append(uploader)
        if prefix:
            where.append("substr(path, 1, ?) = ?")
            params += [len(prefix), prefix]
        if created_before is not None:
            where.append("created < ?")
            params.append(created_before)
        rows = self._execute(f"SELECT {FILE_COLUMNS} FROM files WHERE {' AND '.join(where)} ORDER BY path LIMIT ?",
                             (*params, limit))
        return [_file(row) for row in rows]

    def fresh(self, path: str) -> Optional[FileRecord]:
        """The row of `path` as the database has it now (not the cache): another process (`hmacfs
        iso pack`) may have moved the file into an image since the cached row was read."""
        self._forget(path)
        return self.get(path)

    def packed(self, image: Optional[str] = None, after: str = "", limit: int = 1000) -> list[FileRecord]:
        """Rows of files packed into ISO images (of `image` only, when given), by path."""
        where, params = "image IS NOT NULL AND path > ?", [after]
        if image is not None:
            where += " AND image = ?"
            params.append(image)
        rows = self._execute(f"SELECT {FILE_COLUMNS} FROM files WHERE {where} ORDER BY path LIMIT ?",
                             (*params, limit))
        return [_file(row) for row in rows]

    # -- blobs (deduplication) ------------------------------------------------------------------

    def blob_acquire(self, sha256: str, size: int) -> int:
        """One more reference to a blob (made at 1); returns the count after."""
        with self.transaction():
            self._execute("INSERT INTO blobs (sha256, size, refs) VALUES (?, ?, 1) ON CONFLICT(sha256) "
                          "DO UPDATE SET refs = refs + 1", (sha256, size))
            return self.blob_refs(sha256)

    def blob_release(self, sha256: str) -> int:
        """One reference less; the row goes at 0. Returns the count after (0: unreferenced)."""
        with self.transaction():
            self._execute("UPDATE blobs SET refs = refs - 1 WHERE sha256 = ?", (sha256,))
            refs = self.blob_refs(sha256)
            if refs <= 0:
                self._execute("DELETE FROM blobs WHERE sha256 = ?", (sha256,))
                return 0
            return refs

    def blob_refs(self, sha256: str) -> int:
        rows = self._execute("SELECT refs FROM blobs WHERE sha256 = ?", (sha256,))
        return int(rows[0][0]) if rows else 0

    def blob_counted_refs(self, sha256: str) -> int:
        """References found in files and versions (the janitor reconciles `refs` with this)."""
        rows = self._execute("SELECT (SELECT COUNT(*) FROM files WHERE blob = ?) + "
                             "(SELECT COUNT(*) FROM versions WHERE blob = ?)", (sha256, sha256))
        return int(rows[0][0])

    def set_blob_refs(self, sha256: str, size: int, refs: int) -> None:
        if refs <= 0:
            self._execute("DELETE FROM blobs WHERE sha256 = ?", (sha256,))
        else:
            self._execute("INSERT INTO blobs (sha256, size, refs) VALUES (?, ?, ?) ON CONFLICT(sha256) "
                          "DO UPDATE SET refs = excluded.refs", (sha256, size, refs))

    def blob_page(self, after: str = "", limit: int = 500) -> list[tuple[str, int, int]]:
        return [(r[0], int(r[1]), int(r[2])) for r in self._execute(
            "SELECT sha256, size, refs FROM blobs WHERE sha256 > ? ORDER BY sha256 LIMIT ?", (after, limit))]

    def blob_stats(self) -> tuple[int, int, int]:
        """(blobs, bytes held in blobs, logical bytes that reference them)."""
        rows = self._execute("SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(size * refs), 0) FROM blobs")
        return int(rows[0][0]), int(rows[0][1]), int(rows[0][2])

    # -- versions -------------------------------------------------------------------------------

    def versions(self, path: str) -> list[VersionRecord]:
        """Kept older versions of `path`, oldest first."""
        rows = self._execute(f"SELECT {VERSION_COLUMNS} FROM versions WHERE path = ? ORDER BY version", (path,))
        return [_version(row) for row in rows]

    def version_file_known(self, location: str) -> bool:
        """Does a version row name this file below the versions directory?"""
        return bool(self._execute("SELECT 1 FROM versions WHERE location = ? LIMIT 1", (location,)))

    def add_version(self, version: VersionRecord) -> None:
        self._execute(f"INSERT INTO versions ({VERSION_COLUMNS}) VALUES ({', '.join('?' * 11)})",
                      (version.path, version.version, version.size, version.content_type, version.sha256,
                       version.created, version.uploader, version.blob, version.location, int(version.encrypted),
                       version.object_key))

    def drop_versions(self, path: str, keep: int) -> list[VersionRecord]:
        """Remove all but the newest `keep` versions of `path`; returns the removed ones."""
        with self.transaction():
            kept = self.versions(path)
            gone = kept[:max(0, len(kept) - keep)]
            for v in gone:
                self._execute("DELETE FROM versions WHERE path = ? AND version = ?", (path, v.version))
        return gone

    # -- quotas ---------------------------------------------------------------------------------

    def usage(self, uploader: str) -> Usage:
        rows = self._execute("SELECT files, bytes FROM usage WHERE uploader = ?", (uploader,))
        files, size = rows[0] if rows else (0, 0)
        return Usage(uploader, int(files), int(size))

    def all_usage(self) -> list[Usage]:
        rows = self._execute("SELECT uploader, files, bytes FROM usage WHERE uploader != ? AND files > 0 "
                             "ORDER BY bytes DESC", (TOTAL,))
        return [Usage(r[0], int(r[1]), int(r[2])) for r in rows]

    def uploader_count(self) -> int:
        rows = self._execute("SELECT COUNT(*) FROM usage WHERE uploader != ? AND files > 0", (TOTAL,))
        return int(rows[0][0])

    def total_bytes(self) -> int:
        return self.usage(TOTAL).bytes

    def total_files(self) -> int:
        return self.usage(TOTAL).files

    def bytes_since(self, uploader: str, since: float) -> int:
        rows = self._execute("SELECT COALESCE(SUM(size), 0) FROM upload_log WHERE uploader = ? AND at >= ?",
                             (uploader, since))
        return int(rows[0][0])

    def log_upload(self, uploader: str, at: float, size: int) -> None:
        self._execute("INSERT INTO upload_log (uploader, at, size) VALUES (?, ?, ?)", (uploader, at, size))

    def prune_upload_log(self, before: float) -> None:
        self._execute("DELETE FROM upload_log WHERE at < ?", (before,))


    # -- resumable uploads in progress -----------------------------------------------------------

    def partial_put(self, record: PartialRecord) -> None:
        """Insert or replace the row of one resumable upload."""
        self._execute(f"INSERT OR REPLACE INTO partials ({PARTIAL_COLUMNS}) VALUES ({', '.join('?' * 12)})",
                      (record.id, record.path, record.length, record.content_type, record.protocol, record.created,
                       record.expires, record.file_expires, record.uploader, record.metadata, record.grant,
                       int(record.completed)))

    def partial_touch(self, upload_id: str, expires: float) -> None:
        """Move an upload's expiry on (no row is made if it was removed meanwhile)."""
        self._execute("UPDATE partials SET expires = ? WHERE id = ?", (expires, upload_id))

    def partial_get(self, upload_id: str) -> Optional[PartialRecord]:
        rows = self._execute(f"SELECT {PARTIAL_COLUMNS} FROM partials WHERE id = ?", (upload_id,))
        return _partial(rows[0]) if rows else None

    def partial_delete(self, upload_id: str) -> bool:
        return bool(self._changes("DELETE FROM partials WHERE id = ?", (upload_id,)))

    def partials_expired(self, now: float, limit: int = 1000) -> list[PartialRecord]:
        rows = self._execute(f"SELECT {PARTIAL_COLUMNS} FROM partials WHERE expires <= ? ORDER BY expires LIMIT ?",
                             (now, limit))
        return [_partial(row) for row in rows]

    def partial_ids(self) -> set[str]:
        return {row[0] for row in self._execute("SELECT id FROM partials")}


    # -- bans -------------------------------------------------------------------------------------

    def ban_put(self, ban: BanRecord) -> None:
        """Insert or replace the ban of `ban.address` (a renewed ban moves its end)."""
        self._execute(f"INSERT OR REPLACE INTO bans ({BAN_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                      (ban.address, ban.until, ban.created, ban.failures, ban.reason))

    def ban_get(self, address: str) -> Optional[BanRecord]:
        rows = self._execute(f"SELECT {BAN_COLUMNS} FROM bans WHERE address = ?", (address,))
        return BanRecord(*rows[0]) if rows else None

    def ban_remove(self, address: str) -> bool:
        return bool(self._changes("DELETE FROM bans WHERE address = ?", (address,)))

    def bans_active(self, now: float) -> list[BanRecord]:
        """Bans still in force at `now`, the longest-running first."""
        rows = self._execute(f"SELECT {BAN_COLUMNS} FROM bans WHERE until > ? ORDER BY until DESC, address",
                             (now,))
        return [BanRecord(*row) for row in rows]

    def bans_purge(self, now: float) -> int:
        """Remove bans that ended by `now`; returns how many."""
        return self._changes("DELETE FROM bans WHERE until <= ?", (now,))


def _partial(row: tuple) -> PartialRecord:
    return PartialRecord(*row[:11], completed=bool(row[11]))


def _file_row(r: FileRecord) -> tuple:
    return (r.path, r.size, r.content_type, r.sha256, r.created, r.mtime_ns, r.expires, r.uploader, r.version,
            r.blob, int(r.ref), int(r.encrypted), r.image, r.image_offset, r.object_key)


def _file(row: tuple) -> FileRecord:
    return FileRecord(*row[:10], ref=bool(row[10]), encrypted=bool(row[11]), image=row[12], image_offset=row[13],
                      object_key=row[14])


def _version(row: tuple) -> VersionRecord:
    return VersionRecord(*row[:9], encrypted=bool(row[9]), object_key=row[10])


def _is_full(error: sqlite3.OperationalError) -> bool:
    """SQLITE_FULL: the disk filled under the database (sqlite_errorcode exists from Python 3.11)."""
    code = getattr(error, "sqlite_errorcode", None)
    return code == SQLITE_FULL if code is not None else "is full" in str(error)


def run_undo(steps: list[Callable[[], None]]) -> None:
    """Undo steps, newest first; one that fails is logged and the others still run."""
    for step in reversed(steps):
        try:
            step()
        except Exception:
            log.exception("an undo step failed (the janitor or a restart cleans up what it left)")
