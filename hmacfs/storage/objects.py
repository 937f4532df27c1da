"""Stored files as objects in an S3-compatible bucket (`[storage] backend = "s3"`).

Strategy: every upload streams into an object of its own under `<s3prefix>objects/`, named
by 128 random bits, and the metadata row of the path names that object (`object_key`).
So a path is never overwritten in the bucket: bytes of an upload in progress are an
unfinished multipart upload (invisible) and then an object no row names yet (never
served); racing uploads to one path each finish their own object and the metadata
decides which becomes the file (the loser's object is deleted). Old versions keep their
objects as they are, with no copy. Objects no row names (a node killed between finishing
an object and writing its row) and multipart uploads nobody finished are swept after a
grace period (`sweep`).
"""
from __future__ import annotations

import logging
import secrets
import time
from typing import Callable, Generator, Optional

from ..errors import HTTPError
from .s3client import S3Client, S3Error
from .s3multipart import MultipartWriter

log = logging.getLogger("hmacfs")
READ_BLOCK = 256 * 1024  # bytes per read of an object's body on its way to the client
OBJECTS_DIR = "objects/"


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

    def new_key(self) -> str:
        return f"{self.prefix}{OBJECTS_DIR}{secrets.token_hex(16)}"

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

    def sweep(self, known: Callable[[str], bool], older_than: float, now: Optional[float] = None) -> int:
        """Delete objects under `objects/` that no row names and unfinished multipart uploads,
        both older than `older_than` seconds (an upload in flight is younger); returns how many."""
        now = time.time() if now is None else now
        removed = 0
        for info in self.client.list_objects(self.prefix + OBJECTS_DIR):
            if now - info.last_modified >= older_than and not known(info.key):
                self.delete(info.key)
                removed += 1
        for key, upload_id, initiated in self.client.list_multipart_uploads(self.prefix + OBJECTS_DIR):
            if now - initiated >= older_than:
                try:
                    self.client.abort_multipart(key, upload_id)
                    removed += 1
                except (S3Error, OSError) as e:
                    log.warning("object storage: could not abort an old multipart upload of %s (%s)", key, e)
        return removed

