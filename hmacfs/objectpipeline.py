"""One upload's journey on the S3 backend: stream -> hash (+ encrypt) -> object -> checks -> row.

Strategy: the same seam as `pipeline.UploadPipeline` (receive, then commit; handlers and
the resumable engine cannot tell them apart), for a store where a file is an object the
metadata row names (storage/objects.py). `receive` streams the body into a new object of
its own while hashing it and feeding the virus scan, so nothing waits for the last byte
but the final part. `commit` is then metadata only, in one metadata transaction (with
Redis: one lock across every node): the signed size and scan checks, 409 when the path
is taken and versioning is off, the kept version (its object stays as it is), the quotas'
last check and the row. The object of an upload that does not become a file is deleted,
so a failed or losing upload leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING, Callable, Optional

from .meta import FileRecord, MetaStore
from .pipeline import BodySource, PathLocks, Received, Scan, Upload, _Sink, as_version, kept_number, pump
from .storage.blobs import blob_key
from .storage.local import PathConflict
from .storage.objects import ObjectBlobs, ObjectStore, WriterFile, bucket_failures, delete_released, release_object

if TYPE_CHECKING:
    from .storage.encrypted import Keyring

log = logging.getLogger("hmacfs")


class ObjectPipeline:
    """Receives upload bodies into objects and commits them as metadata rows."""

    links_partials = False  # a finished resumable upload is streamed into an object, never linked

    def __init__(self, objects: ObjectStore, meta: MetaStore, keep_versions: Optional[int] = None,
                 keyring: Optional[Keyring] = None, segment_size: int = 1024 * 1024,
                 locks: Optional[PathLocks] = None, blobs: Optional[ObjectBlobs] = None,
                 dedup: bool = False) -> None:
        self.objects = objects
        self.blobs = blobs  # blob objects: counted for new uploads with `dedup`, released always
        self.dedup = dedup and blobs is not None
        self.meta = meta
        self.keep_versions = keep_versions
        self.keyring = keyring
        self.segment_size = segment_size
        self.locks = locks or PathLocks()
        self.on_commit: list[Callable[[FileRecord], None]] = []

    def path_taken(self, path: str) -> bool:
        """Is there a file at `path` (by its row: on this backend the row is the file)?"""
        return self.meta.get(path) is not None

    def free_bytes(self) -> Optional[int]:
        """A bucket has no free-space figure: None (the minfreebytes check does not apply)."""
        return None

    def receive(self, body: BodySource, buf: memoryview, reserve: int = 0,
                expected: Optional[int] = None, scan: Optional[Scan] = None) -> Received:
        """Stream `body` into a new object through `buf`, hashing it (and handing each chunk to
        the virus scan). On any failure the object (or its multipart upload) is removed."""
        key = self.objects.new_key()
        digest = hashlib.sha256()
        with bucket_failures():
            writer = self.objects.writer(key)
        sink = _Sink(WriterFile(writer), self.keyring, self.segment_size)
        try:
            # the client's failures propagate as they are; the bucket's are a 503
            size = pump(body, buf, digest, scan, lambda chunk: _to_store(sink.write, chunk))
            _to_store(sink.finish)
            _to_store(writer.finish)
        except BaseException:
            sink.abort()
            _abort_quietly(writer, key)
            raise
        return Received("", size, digest.hexdigest(), self.keyring is not None, object_key=key)

    def commit(self, received: Received, upload: Upload,
               before_commit: Optional[Callable[[Received], None]] = None) -> FileRecord:
        """Make the received object the file at its path, or delete it (409 when the path is
        taken and versioning is off; whatever `before_commit` or the quotas raise)."""
        path = upload.signed_path
        gone: list[str] = []  # objects the transaction released: deleted once it has committed
        record = None
        try:
            if before_commit is not None:
                before_commit(received)
            blob = None
            if self.dedup and self.blobs is not None:  # the content's object is made before the shared lock
                blob = blob_key(received.sha256, received.encrypted)
                self.blobs.prepare(received.object_key or "", blob)
            with self.locks.hold(path):  # this node's uploads queue here, not on the shared lock
                record = self._commit(received, upload, gone, blob)
        finally:
            if record is not None:
                if record.object_key != received.object_key:
                    gone.append(received.object_key or "")  # its bytes are in the blob
                delete_released(self.objects, self.blobs, gone)
            elif not self._named(path, received.object_key or ""):
                # Not committed, or committed with its answer lost (a Redis timeout): the object
                # goes only when no row names it. What the transaction released was rolled back.
                self.objects.delete(received.object_key)
        for hook in self.on_commit:
            try:
                hook(record)
            except Exception:
                log.exception("after-commit job failed for %r", path)
        return record

    def _named(self, path: str, key: str) -> bool:
        """Does the row of `path` name `key`? Yes when that cannot be told (the sweep deletes an
        object no row names, later)."""
        try:
            current = self.meta.get(path)
        except Exception:
            return True
        return current is not None and current.object_key == key

    def _commit(self, received: Received, upload: Upload, gone: list[str], blob: Optional[str]) -> FileRecord:
        path = upload.signed_path
        with self.meta.transaction():
            current = self.meta.get(path)
            if current is not None and self.keep_versions is None:
                raise PathConflict(path)
            kept = as_version(current, kept_number(self.meta, current)) if current is not None else None
            key = received.object_key
            if self.blobs is not None and blob is not None:
                key = self.blobs.acquire(blob, received.size, received.object_key or "")
            record = FileRecord(path=path, size=received.size, content_type=upload.content_type,
                                sha256=received.sha256, created=time.time(), expires=upload.expires,
                                uploader=upload.uploader, version=kept.version + 1 if kept is not None else 1,
                                blob=blob, encrypted=received.encrypted, object_key=key)
            if upload.admit is not None:
                upload.admit(record)
            if kept is not None:
                self.meta.add_version(kept)
                self.meta.put(record)
                for old in self.meta.drop_versions(path, self.keep_versions or 0):
                    gone.extend(release_object(self.blobs, old.blob, old.object_key))
            elif not self.meta.put_new(record):
                raise PathConflict(path)
        return record


def _to_store(step: Callable, *args) -> None:
    """A step that talks to the bucket: its failure is the store's (503), not the client's."""
    with bucket_failures():
        step(*args)


def _abort_quietly(writer, key: str) -> None:
    try:
        writer.abort()
    except Exception as e:  # the sweep aborts what is left
        log.warning("object storage: could not abort the upload of %s (%s)", key, e)

