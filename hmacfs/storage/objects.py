"""Stored files as objects in an S3-compatible bucket (`[storage] backend = "s3"`).

Strategy: every upload streams into an object of its own (`<s3prefix>object.<128 random
bits>`), and the metadata row of the path names that object (`object_key`). So a path is
never overwritten in the bucket: bytes of an upload in progress are an unfinished
multipart upload (invisible) and then an object no row names yet (never served); racing
uploads to one path each finish their own object and the metadata decides which becomes
the file (the loser's object is deleted). Old versions keep their objects as they are,
with no copy; deduplicated contents live once as `blob.<key>` (`ObjectBlobs`). Objects no
row names (a node killed between finishing an object and writing its row) and multipart
uploads nobody finished are swept after a grace period (`sweep`).
"""
from __future__ import annotations

import logging
import secrets
import time
from contextlib import contextmanager
from typing import Callable, Generator, Iterator, Optional

from ..errors import HTTPError
from ..meta import MetaStore
from .s3client import S3Client, S3Error
from .s3multipart import MultipartWriter

log = logging.getLogger("hmacfs")
READ_BLOCK = 256 * 1024  # bytes per read of an object's body on its way to the client
# Flat names, no '/' of their own: listings by these prefixes work on every S3-compatible
# server (some mis-sign list requests whose prefix has a '/').
OBJECT_PREFIX = "object."    # one per upload: object.<128 random bits in hex>
BLOB_PREFIX = "blob."        # deduplication: one per distinct content, blob.<blob key>
PARTIAL_PREFIX = "partial."  # unfinished resumable uploads (storage/objectpartials.py)


@contextmanager
def bucket_failures() -> Iterator[None]:
    """Calls to the bucket inside: S3 refusing us, or not answering, is a 503 (`unavailable`)."""
    try:
        yield
    except (S3Error, OSError) as e:
        raise unavailable(e) from None


def unavailable(error: Exception) -> HTTPError:
    """503 for a store that cannot be reached or refuses us; the log line says why (never a secret)."""
    log.error("object storage: %s", error)
    return HTTPError(503, "object storage is unavailable, retry later", {"Retry-After": "5"})


class ObjectStore:
    """The bucket (below `prefix`) as hmacfs uses it: new objects, ranged reads, deletes, sweeps."""

    def __init__(self, client: S3Client, prefix: str, part_size: int, concurrency: int) -> None:
        self.client = client
        self.prefix = prefix
        self.part_size = part_size
        self.concurrency = concurrency
        self._uploads_seen: dict[str, float] = {}  # multipart upload id -> when a sweep first listed it
        self._objects_seen: dict[str, float] = {}  # unnamed object key -> when a sweep first saw it so

    def new_key(self) -> str:
        return f"{self.prefix}{OBJECT_PREFIX}{secrets.token_hex(16)}"

    def writer(self, key: str, content_type: Optional[str] = None) -> MultipartWriter:
        """A writer that streams into `key` (multipart above `part_size`, parts in parallel)."""
        return MultipartWriter(self.client, key, self.part_size, self.concurrency, content_type)

    def read(self, key: str, first: int, last: int) -> Generator[memoryview, None, None]:
        """Bytes first..last of an object (one ranged GET), in READ_BLOCK pieces: memory stays
        bounded however large the range. A short body raises: the client must not take a cut
        download for a whole one."""
        try:
            response = self.client.get_object(key, first, last)
        except (S3Error, OSError) as e:
            if isinstance(e, S3Error) and e.status == 404:
                log.error("object storage: %s is missing (its metadata row is kept)", key)
                raise HTTPError(500, "the stored bytes of this file are missing") from None
            raise unavailable(e) from None
        try:
            remaining = last - first + 1
            while remaining > 0:
                chunk = response.read(min(READ_BLOCK, remaining))
                if not chunk:
                    raise OSError(f"object {key} ended {remaining} bytes early")
                remaining -= len(chunk)
                yield memoryview(chunk)
        finally:
            response.close()

    def delete(self, key: Optional[str]) -> None:
        """Delete an object no row needs any more; a failure is logged (the sweep retries)."""
        if not key:
            return
        try:
            self.client.delete_object(key)
        except (S3Error, OSError) as e:
            log.warning("object storage: could not delete %s (%s); the sweep removes it later", key, e)

    def presign(self, key: str, expires_in: int, content_type: str, disposition: str) -> str:
        """A URL the client fetches the object with directly (`s3redirect`), with the headers
        hmacfs would have sent (type and disposition) forced by the signed query."""
        return self.client.presign_get(key, expires_in, response_content_type=content_type,
                                       response_content_disposition=disposition)

    def random_access(self, key: str) -> ObjectRange:
        """The object read at any offset (an encrypted file's segments: storage/encrypted.py)."""
        with bucket_failures():
            info = self.client.head_object(key)
        if info is None:
            log.error("object storage: %s is missing (its metadata row is kept)", key)
            raise HTTPError(500, "the stored bytes of this file are missing")
        return ObjectRange(self, key, info.size)

    def unneeded(self, known: Callable[[str], bool], grace: float, now: Optional[float] = None) -> list[str]:
        """Upload and blob objects no row names (`known` says), first seen unnamed by a pass at
        least `grace` seconds ago and still unnamed now. Judged by when this node first saw
        them, not by `LastModified`: a multipart object's date can be when its upload began,
        hours before it was committed. The caller deletes them (a blob under the lock)."""
        now = time.time() if now is None else now
        seen, found = {}, []
        for info in self.client.list_objects(self.prefix):
            if not info.key[len(self.prefix):].startswith((OBJECT_PREFIX, BLOB_PREFIX)) or known(info.key):
                continue
            seen[info.key] = first = self._objects_seen.get(info.key, now)
            if now - first >= grace:
                found.append(info.key)
        self._objects_seen = seen
        return found

    def abort_stale_uploads(self, grace: float, now: Optional[float] = None) -> int:
        """Abort multipart uploads a pass first listed at least `grace` seconds ago (not by their
        `Initiated`: the server's clock, and some S3-compatible servers report a fixed date);
        `grace` must exceed the longest upload, as it may still be sending parts."""
        now = time.time() if now is None else now
        listed = self.client.list_multipart_uploads(self.prefix)
        seen = {upload_id: self._uploads_seen.get(upload_id, now) for _key, upload_id, _at in listed}
        self._uploads_seen = seen
        aborted = 0
        for key, upload_id, _initiated in listed:
            if now - seen[upload_id] >= grace:
                try:
                    self.client.abort_multipart(key, upload_id)
                    aborted += 1
                except (S3Error, OSError) as e:
                    log.warning("object storage: could not abort an old multipart upload of %s (%s)", key, e)
        return aborted


class WriterFile:
    """An object writer as the binary file the segment encrypter (storage/encrypted.py) writes to."""

    def __init__(self, writer: MultipartWriter) -> None:
        self.writer = writer

    def write(self, data) -> int:
        self.writer.write(memoryview(data))
        return len(data)


class ObjectRange:
    """An object read at any offset, one ranged GET per read."""

    def __init__(self, store: ObjectStore, key: str, size: int) -> None:
        self.store = store
        self.key = key
        self.size = size

    def read_into(self, view: memoryview, offset: int) -> int:
        if offset >= self.size or not len(view):
            return 0
        last = min(self.size, offset + len(view)) - 1
        got = 0
        for piece in self.store.read(self.key, offset, last):
            view[got:got + len(piece)] = piece
            got += len(piece)
        return got


class ObjectBlobs:
    """Deduplication on the bucket: one object per distinct content (`blob.<key>`), its
    references counted in the metadata like the local blob store's.

    A new content's object is copied from the upload's own object (a server-side copy)
    before the commit's metadata transaction, so the shared lock is not held while bytes
    move; the count is taken inside it. The object of a blob whose count reached 0 is deleted
    after that transaction committed, in a short one of its own that checks the count again."""

    def __init__(self, objects: ObjectStore, meta: MetaStore) -> None:
        self.objects = objects
        self.meta = meta

    def key(self, blob: str) -> str:
        return f"{self.objects.prefix}{BLOB_PREFIX}{blob}"

    def prepare(self, source_key: str, blob: str) -> bool:
        """Outside the transaction: the blob's object exists afterwards; True when this call copied it."""
        key = self.key(blob)
        with bucket_failures():
            if self.objects.client.head_object(key) is not None:
                return False
            self.objects.client.copy_object(source_key, key)
        return True

    def acquire(self, blob: str, size: int, source_key: str) -> str:
        """In the commit's transaction: one more reference; the blob object's key. A new count
        (1) makes sure the object is there: a release that committed just before may have
        deleted it (the upload's own object, its source, still exists)."""
        key = self.key(blob)
        if self.meta.blob_acquire(blob, size) == 1:
            with bucket_failures():
                if self.objects.client.head_object(key) is None:
                    self.objects.client.copy_object(source_key, key)
        return key

    def release(self, blob: str) -> Optional[str]:
        """In a transaction: one reference less; the blob object's key when it was the last
        (for `forget` once the transaction has committed: a rollback must find it there)."""
        return self.key(blob) if self.meta.blob_release(blob) == 0 else None

    def forget(self, key: str) -> None:
        """Delete a blob object whose last reference went, unless a row counts it again: the
        check and the delete are one transaction, so an upload counting it meanwhile keeps it."""
        with self.meta.transaction():
            if self.meta.blob_refs(key[len(self.objects.prefix + BLOB_PREFIX):]) == 0:
                self.objects.delete(key)


def release_object(blobs: Optional[ObjectBlobs], blob: Optional[str], key: Optional[str]) -> list[str]:
    """In a metadata transaction, for a row that is going: its blob reference is released, or
    its own object is listed; what comes back is deleted by `delete_released` once the
    transaction has committed (never before: a rollback brings the row back)."""
    if blob is not None and blobs is not None:
        last = blobs.release(blob)
        return [last] if last else []
    return [key] if key else []


def delete_released(objects: ObjectStore, blobs: Optional[ObjectBlobs], keys: list[str]) -> None:
    """After the commit: the objects `release_object` listed (a blob only if still unreferenced)."""
    for key in keys:
        if blobs is not None and key.startswith(objects.prefix + BLOB_PREFIX):
            try:
                blobs.forget(key)
            except Exception as e:  # Redis away: the sweep deletes an unreferenced blob later
                log.warning("object storage: blob %s not deleted now (%s); the sweep will", key, e)
        else:
            objects.delete(key)
