"""What hmacfs knows about a stored file, and what the pipeline needs from a metadata backend.

Strategy: the file on disk is the truth about *whether* a file exists; the metadata row
says what it is. Three exceptions, all recorded in the row: a deduplicated file whose
blob could not be hard-linked at its path (`ref`: the row points at the blob), a file
packed into an ISO image (`image`: the row says where in which image), and old
versions (their bytes live under `.hmacfs/versions/`). The backends (SQLite here; Redis
in cluster mode) implement `MetaStore`; the pipeline and handlers use only that.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Optional, Protocol


@dataclass(frozen=True)
class FileRecord:
    """What hmacfs knows about one stored file (its current version)."""

    path: str
    size: int                  # plaintext bytes
    content_type: str
    sha256: str                # of the plaintext
    created: float
    mtime_ns: int = 0          # the file's mtime when the row was written: detects outside edits
    expires: Optional[float] = None
    uploader: Optional[str] = None
    version: int = 1           # number of this version (older ones are in `versions`)
    blob: Optional[str] = None  # sha256 of the blob holding the bytes, when deduplicated
    ref: bool = False          # no file at the path: the bytes are read from the blob
    encrypted: bool = False    # the bytes on disk are AES-GCM segments (storage/encrypted.py)
    # Packed into an ISO 9660 image by `hmacfs iso pack` (hmacfs/iso.py): no file at the path,
    # the bytes are `size` bytes at `image_offset` in the image file `image` (absolute path).
    image: Optional[str] = None
    image_offset: int = 0
    # On the S3 backend (storage/s3store.py): the object holding the bytes. Every upload gets
    # an object of its own, so a path is never overwritten in the bucket: this row says which
    # object is the file (None on the local backend, where the file is at its path).
    object_key: Optional[str] = None


@dataclass(frozen=True)
class VersionRecord:
    """An older version of a path, kept by versioning."""

    path: str
    version: int
    size: int
    content_type: str
    sha256: str
    created: float
    uploader: Optional[str] = None
    blob: Optional[str] = None
    location: Optional[str] = None  # file below the versions directory; None: read from the blob
    encrypted: bool = False
    object_key: Optional[str] = None  # S3 backend: the version's object (kept as it was, no copy)


@dataclass(frozen=True)
class PartialRecord:
    """A resumable upload (tus or IETF) not yet committed: its slot and what it will become.

    The bytes received so far live apart (storage/partials.py); their count is the offset.
    `completed` rows stay until they expire, so a client that lost the last response learns
    from HEAD that its upload is whole instead of starting again."""

    id: str
    path: str                   # the signed path the upload will be committed at
    length: int                 # the total size, bound by the signature
    content_type: str
    protocol: str               # "tus" or "ietf"
    created: float
    expires: float              # when an unfinished upload is removed (moves on with each append)
    file_expires: Optional[float] = None  # the file's own expiry from the grant (JWT claim, header)
    uploader: Optional[str] = None
    metadata: str = ""          # tus Upload-Metadata as received (echoed on HEAD)
    grant: str = ""             # which signature protocol created it (metrics)
    completed: bool = False


@dataclass(frozen=True)
class BanRecord:
    """An address shut out after repeated authentication failures (policy/bans.py).

    Kept in the metadata so a ban outlives a restart: an attacker must not get a fresh
    start by crashing or waiting out a deploy."""

    address: str               # what the guard keys on: an IPv4 address or an IPv6 /64
    until: float               # unix time the ban ends
    created: float
    failures: int              # failures that led to it (banthreshold at the time)
    reason: str = ""           # the last refusal, for `hmacfs bans list`


@dataclass(frozen=True)
class Usage:
    """Stored bytes and files of one uploader (current files and kept versions), logical sizes."""

    uploader: str
    files: int
    bytes: int


class BanStore(Protocol):
    """What the ban list needs from a metadata backend (policy/bans.py, `hmacfs bans`)."""

    def ban_put(self, ban: BanRecord) -> None: ...
    def ban_get(self, address: str) -> Optional[BanRecord]: ...
    def ban_remove(self, address: str) -> bool: ...
    def bans_active(self, now: float) -> list[BanRecord]: ...
    def bans_purge(self, now: float) -> int: ...


class MetaStore(BanStore, Protocol):
    """What the pipeline, the handlers and the janitor need from a metadata backend."""

    def get(self, path: str) -> Optional[FileRecord]: ...
    def put(self, record: FileRecord) -> None: ...
    def put_new(self, record: FileRecord) -> bool: ...
    def take(self, path: str, expired_at: Optional[float] = None) -> Optional[FileRecord]: ...
    def expired(self, now: float, limit: int = 1000) -> list[FileRecord]: ...
    def transaction(self) -> AbstractContextManager[list[Callable[[], None]]]: ...
    def blob_acquire(self, sha256: str, size: int) -> int: ...
    def blob_release(self, sha256: str) -> int: ...
    def versions(self, path: str) -> list[VersionRecord]: ...
    def add_version(self, version: VersionRecord) -> None: ...
    def drop_versions(self, path: str, keep: int) -> list[VersionRecord]: ...
    def usage(self, uploader: str) -> Usage: ...
    def total_bytes(self) -> int: ...
    def bytes_since(self, uploader: str, since: float) -> int: ...
    def log_upload(self, uploader: str, at: float, size: int) -> None: ...
    def partial_put(self, record: PartialRecord) -> None: ...
    def partial_touch(self, upload_id: str, expires: float) -> None: ...
    def partial_get(self, upload_id: str) -> Optional[PartialRecord]: ...
    def partial_delete(self, upload_id: str) -> bool: ...
    def partials_expired(self, now: float, limit: int = 1000) -> list[PartialRecord]: ...
    def partial_ids(self) -> set[str]: ...
    def fresh(self, path: str) -> Optional[FileRecord]: ...
    def packed(self, image: Optional[str] = None, after: str = "", limit: int = 1000) -> list[FileRecord]: ...
