"""One upload's journey: stream -> hash -> temp file -> size check -> commit -> metadata.

Strategy: this is the seam where later capabilities plug in without touching the HTTP
handlers: virus scanning runs between the temp file and the commit, deduplication and
versioning replace `commit`, encryption wraps the temp writer, thumbnails hook after the
commit. The body source is anything with `readinto` (plain, chunked, tus PATCH).
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from .errors import HTTPError
from .meta import FileRecord, MetaStore
from .storage.local import LocalStore, OutsideRoot, PathConflict


class BodySource(Protocol):
    received: int

    def readinto(self, buf: memoryview) -> int: ...


@dataclass(frozen=True)
class Received:
    """A body safely on disk in a private temp file, not yet visible."""

    temp_path: str
    size: int
    sha256: str


def receive(store: LocalStore, body: BodySource, buf: memoryview) -> Received:
    """Stream `body` into a new temp file through `buf`, hashing as it goes; fsync at the end.

    On any failure the temp file is removed, so nothing partial survives.
    """
    f, temp_path = store.new_temp()
    digest = hashlib.sha256()
    size = 0
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
            os.fsync(f.fileno())
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
        """Make the upload visible at `signed_path` (409 if taken) and record its metadata."""
        try:
            if before_commit is not None:
                before_commit(received)
            st = os.stat(received.temp_path)
            self.store.commit(received.temp_path, signed_path)
        except PathConflict:
            self.store.discard_temp(received.temp_path)
            raise HTTPError(409, "a file already exists at this path") from None
        except OutsideRoot:
            self.store.discard_temp(received.temp_path)
            raise HTTPError(403, "this path leads outside the storage root") from None
        except BaseException:
            self.store.discard_temp(received.temp_path)
            raise
        record = FileRecord(path=signed_path, size=received.size, content_type=content_type,
                            sha256=received.sha256, created=time.time(), mtime_ns=st.st_mtime_ns,
                            expires=expires, uploader=uploader)
        self.meta.put(record)
        return record
