"""One upload's journey: stream -> hash -> temp file -> size check -> commit -> metadata.

Strategy: this is the seam where later capabilities plug in without touching the HTTP
handlers: virus scanning runs between the temp file and the commit, deduplication and
versioning replace `commit`, encryption wraps the temp writer, thumbnails hook after the
commit. The body source is anything with `readinto` (plain, chunked, tus PATCH).
"""
from __future__ import annotations

import errno
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from .errors import storage_full
from .meta import FileRecord, MetaStore
from .storage.local import LocalStore

SPACE_CHECK_BYTES = 1024 * 1024  # free space is re-checked after every MiB received
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class BodySource(Protocol):
    received: int

    def readinto(self, buf: memoryview) -> int: ...


@dataclass(frozen=True)
class Received:
    """A body safely on disk in a private temp file, not yet visible."""

    temp_path: str
    size: int
    sha256: str


def receive(store: LocalStore, body: BodySource, buf: memoryview, reserve: int = 0,
            expected: Optional[int] = None) -> Received:
    """Stream `body` into a new temp file through `buf`, hashing as it goes; fsync at the end.

    Free space is re-checked as the body grows: once the bytes still to come (`expected`
    minus what arrived; 0 when unknown, as for chunked bodies) would leave less than
    `reserve` free, 507. A full disk (ENOSPC) is a 507 too. On any failure the temp file
    is removed, so nothing partial survives.
    """
    f, temp_path = store.new_temp()
    digest = hashlib.sha256()
    size = 0
    next_check = SPACE_CHECK_BYTES
    try:
        with f:
            while True:
                n = body.readinto(buf)
                if not n:
                    break
                chunk = buf[:n]
                digest.update(chunk)  # releases the GIL for large buffers
                view = chunk
                while view:
                    written = f.write(view)
                    view = view[written:]
                size += n
                if size >= next_check:
                    next_check = size + SPACE_CHECK_BYTES
                    to_come = expected - size if expected is not None else 0
                    if store.free_bytes() - to_come < reserve:
                        raise storage_full()
            os.fsync(f.fileno())
    except OSError as e:
        store.discard_temp(temp_path)
        if e.errno in _FULL_ERRNOS:
            raise storage_full() from None
        raise
    except BaseException:
        store.discard_temp(temp_path)
        raise
    return Received(temp_path, size, digest.hexdigest())


class UploadPipeline:
    """Commits received uploads into storage and metadata."""

    def __init__(self, store: LocalStore, meta: MetaStore) -> None:
        self.store = store
        self.meta = meta

    def commit(self, received: Received, signed_path: str, content_type: str,
               expires: Optional[float], uploader: Optional[str],
               before_commit: Optional[Callable[[Received], None]] = None) -> FileRecord:
        """Make the upload visible at `signed_path` (409 if taken, 403 through a symlink out of the
        root) with its metadata, or leave
        nothing: a metadata write that fails takes the file back out, so the slot stays free."""
        try:
            if before_commit is not None:
                before_commit(received)
            st = os.stat(received.temp_path)
            self.store.publish(received.temp_path, signed_path)
        except OSError as e:
            self.store.discard_temp(received.temp_path)
            if e.errno in _FULL_ERRNOS:
                raise storage_full() from None
            raise
        except BaseException:
            self.store.discard_temp(received.temp_path)
            raise
        record = FileRecord(path=signed_path, size=received.size, content_type=content_type,
                            sha256=received.sha256, created=time.time(), mtime_ns=st.st_mtime_ns,
                            expires=expires, uploader=uploader)
        try:
            self.meta.put(record)
        except BaseException:
            self.store.retract(received.temp_path, signed_path)
            raise
        self.store.discard_temp(received.temp_path)
        return record
