"""The stored files as a whole: where a path's bytes are, and removing a path with all it owns.

Strategy: a path's bytes are a plain file at the path (possibly a hard link to a dedup
blob), or, for a `ref` record, the blob itself, or, for a record packed by `hmacfs iso
pack`, a slice of an ISO 9660 image (`open_packed`); older versions live under
`.hmacfs/versions/`. Downloads, DELETE, expiry (GET and the janitor) and the `hmacfs
files` tools all go through this one place, so removing a file always takes its
versions and blob references with it, in the order that a crash cannot turn into a
resurrected file: the bytes at the path first, then the rows, then what only rows pointed at.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

from .meta import FileRecord, MetaStore
from .meta.record import VersionRecord
from .pipeline import PathLocks, remove_version_bytes
from .storage.blobs import BlobStore
from .storage.local import LocalStore

if TYPE_CHECKING:
    from .storage.objects import ObjectBlobs, ObjectStore

log = logging.getLogger("hmacfs")

Opened = tuple[int, os.stat_result]
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class Packed(NamedTuple):
    """A packed file's bytes: `st.st_size` bytes at `offset` in the image open at `fd`. `st` is
    the image's stat with the file's own size and mtime, so Last-Modified and the ETag of a
    file stay what they were before it was packed."""

    fd: int
    st: os.stat_result
    offset: int


class Catalog:
    """Locating and removing stored files across the store, the blobs and the metadata."""

    def __init__(self, store: LocalStore, meta: MetaStore, blobs: Optional[BlobStore] = None,
                 on_remove: Optional[Callable[[str], None]] = None, locks: Optional[PathLocks] = None,
                 objects: Optional[ObjectStore] = None, object_blobs: Optional[ObjectBlobs] = None) -> None:
        self.locks = locks or PathLocks()
        self.objects = objects  # the S3 backend: rows name objects (storage/objects.py)
        self.object_blobs = object_blobs
        self.store = store
        self.meta = meta
        self.blobs = blobs
        # Called with each removed path, after its lock is released: the hot-file cache drops
        # it, the thumbnailer deletes its thumbnail. Every removal comes through here.
        self.on_remove: list[Callable[[str], None]] = [on_remove] if on_remove is not None else []
        self._missing_logged: set[str] = set()
        self._lock = threading.Lock()

    def open_current(self, path: str, record: Optional[FileRecord]) -> Optional[Opened]:
        """(fd, stat) of the bytes of `path` (the file, or the blob of a `ref` record), or None;
        None too for a packed record: its bytes are a slice of an image (`open_packed`)."""
        if record is not None and record.image:
            return None
        if record is not None and record.ref:
            return self._open_blob(path, record.blob)
        return self.store.open(path)

    def open_packed(self, record: FileRecord) -> Optional[Packed]:
        """The image slice holding a packed file, checked against the row (the image must hold
        the whole slice); None, logged once, when the image is gone or too short."""
        assert record.image is not None
        try:
            fd = os.open(record.image, os.O_RDONLY | os.O_CLOEXEC | _O_NOFOLLOW)
        except OSError:
            self.missing(record.path, f"ISO image {record.image}")
            return None
        st = os.fstat(fd)
        if record.image_offset + record.size > st.st_size:
            os.close(fd)
            self.missing(record.path, f"its bytes in ISO image {record.image} (the image is truncated)")
            return None
        mtime_ns = record.mtime_ns or int(record.created * 1e9)
        fields = list(st[:10])
        fields[6], fields[8] = record.size, mtime_ns // 10**9
        view = os.stat_result(fields, {"st_mtime": mtime_ns / 1e9, "st_mtime_ns": mtime_ns})
        return Packed(fd, view, record.image_offset)

    def fresh(self, path: str) -> Optional[FileRecord]:
        """The row of `path` from the database itself: a file missing at its path may have been
        packed into an image by `hmacfs iso pack` (another process) since its row was cached."""
        return self.meta.fresh(path)

    def open_version(self, version: VersionRecord) -> Optional[Opened]:
        if version.location is None:
            return self._open_blob(version.path, version.blob)
        try:
            fd = os.open(os.path.join(self.store.versions_dir, version.location), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.missing(version.path, f"version {version.version}")
            return None
        return fd, os.fstat(fd)

    def _open_blob(self, path: str, sha256: Optional[str]) -> Optional[Opened]:
        opened = self.blobs.open(sha256) if self.blobs is not None and sha256 else None
        if opened is None:
            self.missing(path, f"blob {sha256}")
        return opened

    def missing(self, path: str, what: str) -> None:
        """Bytes the metadata promises are gone: log it once per path (the request gets a 500)."""
        with self._lock:
            if path in self._missing_logged or len(self._missing_logged) > 10000:
                return
            self._missing_logged.add(path)
        log.error("stored bytes missing for %r: %s is not on disk (metadata kept; restore it or delete the path)",
                  path, what)

    def remove(self, path: str, expired_at: Optional[float] = None) -> bool:
        """Remove `path`, its versions and its blob references; False when nothing was there
        (with `expired_at`: when the path holds no file that is still expired then).

        Under the path's lock (an upload to the same path waits), in one metadata transaction:
        the rows are taken from the database (not a cache, so a reference is released exactly
        once even if another process removed the path first), the file is moved out of the
        served tree, and the blob references and version files go. Only the unlink of the
        moved file, which can take a while for a big one, happens after the transaction."""
        with self.locks.hold(path):
            with self.meta.transaction():
                record = self.meta.take(path, expired_at)
                if expired_at is not None and record is None:
                    return False
                versions = self.meta.drop_versions(path, 0)
                if self.objects is not None:  # the bucket: objects go once no row names them
                    from .storage.objects import release_object

                    rows = [(record.blob, record.object_key)] if record is not None else []
                    gone = [key for blob, key in rows + [(v.blob, v.object_key) for v in versions]
                            for key in release_object(self.object_blobs, blob, key)]
                    trash = None
                else:
                    trash = self.store.detach(path)
                    if record is not None and record.blob is not None and self.blobs is not None:
                        self.blobs.release(record.blob)
                    for version in versions:
                        remove_version_bytes(self.store, self.blobs, version)
            if trash is not None:
                self.store.discard_temp(trash)
            if self.objects is not None:
                from .storage.objects import delete_released

                delete_released(self.objects, self.object_blobs, gone)
        for hook in self.on_remove:
            try:
                hook(path)
            except Exception:  # the file is gone already: a hook's failure must not say otherwise
                log.exception("after-removal job failed for %r", path)
        # A packed file's bytes stay in its image (images are written once): the row was its only trace.
        rowed = record is not None and (record.ref or bool(record.image) or bool(record.object_key))
        return trash is not None or rowed or bool(versions)
