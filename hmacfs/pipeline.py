"""One upload's journey: stream -> hash (+ encrypt) -> temp file -> checks -> commit -> metadata.

Strategy: this is the seam every capability plugs into without touching the HTTP
handlers. `receive` hashes the plaintext while it streams (the sha256 is ready with the
last byte, so deduplication needs no second pass) and, with encryption on, writes AES-GCM
segments instead of plaintext. `commit` then runs the checks that need the whole body
(signed size, quotas; virus scanning later), makes the bytes visible in one atomic step
(a link; with deduplication a link to the content's blob; with versioning a rename over
the old name after keeping it as a version) and records the metadata. Whatever fails
after the bytes became visible takes them back out: an upload succeeds whole or leaves
nothing. The body source is anything with `readinto` (plain, chunked, tus PATCH).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Protocol

from .errors import HTTPError, storage_full
from .meta import FileRecord, MetaStore
from .meta.record import VersionRecord
from .meta.sqlite import run_undo
from .storage.blobs import LINK_LIMIT_ERRNOS, BlobStore, blob_key
from .storage.local import LocalStore, PathConflict

if TYPE_CHECKING:  # storage/encrypted.py (and libcrypto's binding) load only when encryption is on
    from .storage.encrypted import Keyring

log = logging.getLogger("hmacfs")
SPACE_CHECK_BYTES = 1024 * 1024  # free space is re-checked after every MiB received
UNLINK_LATER_BYTES = 64 * 1024 * 1024  # bigger temp files are unlinked after the response
ENCRYPTED_MAGIC = b"HMFSAEAD"  # storage/encrypted.MAGIC (that module loads only when encryption is on)
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class BodySource(Protocol):
    received: int

    def readinto(self, buf: memoryview) -> int: ...


class Scan(Protocol):
    """A virus scan fed while the body arrives (services/clamav.ScanSession)."""

    def feed(self, chunk: memoryview) -> None: ...


@dataclass(frozen=True)
class Received:
    """A body safely stored, not yet visible: in a private temp file, or (S3 backend,
    objectpipeline.py) in an object no row names yet."""

    temp_path: str
    size: int          # plaintext bytes
    sha256: str        # of the plaintext
    encrypted: bool = False
    object_key: Optional[str] = None


@dataclass(frozen=True)
class Upload:
    """What the request says about the file being committed."""

    signed_path: str
    content_type: str
    expires: Optional[float] = None
    uploader: Optional[str] = None
    admit: Optional[Callable[[FileRecord], None]] = None  # last check with the row (quotas), or an HTTPError


class _Sink:
    """Where received plaintext goes: the temp file as is, or through the segment encrypter."""

    def __init__(self, f, keyring: Optional[Keyring], segment_size: int) -> None:
        self.f = f
        self.writer = None
        if keyring is not None:
            from .storage.encrypted import SegmentWriter

            self.writer = SegmentWriter(f, keyring, segment_size)

    def write(self, chunk: memoryview) -> None:
        if self.writer is not None:
            self.writer.write(chunk)
            return
        view = chunk
        while view:
            written = self.f.write(view)
            view = view[written:]

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.finish()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def pump(body: BodySource, buf: memoryview, digest, scan: Optional[Scan], write: Callable[[memoryview], None],
         progress: Optional[Callable[[int], None]] = None) -> int:
    """Move `body` through `buf` chunk by chunk: hashed, handed to the virus scan (when there
    is one), then written; `progress(bytes so far)` after each chunk. Returns the byte count."""
    size = 0
    while True:
        n = body.readinto(buf)
        if not n:
            return size
        chunk = buf[:n]
        digest.update(chunk)  # releases the GIL for large buffers
        if scan is not None:
            scan.feed(chunk)
        write(chunk)
        size += n
        if progress is not None:
            progress(size)


class PathLocks:
    """One lock per path while anyone holds or waits for it (a count, not `locked()`): commits
    and removals of one path take turns (versioned writes each keep the one before)."""

    def __init__(self) -> None:
        self._locks: dict[str, list] = {}  # path -> [lock, holders and waiters]
        self._guard = threading.Lock()

    @contextmanager
    def hold(self, path: str) -> Iterator[None]:
        with self._guard:
            entry = self._locks.setdefault(path, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if not entry[1]:
                    del self._locks[path]


class UploadPipeline:
    """Receives upload bodies and commits them into storage and metadata."""

    def __init__(self, store: LocalStore, meta: MetaStore, blobs: Optional[BlobStore] = None,
                 keep_versions: Optional[int] = None, keyring: Optional[Keyring] = None,
                 segment_size: int = 1024 * 1024, locks: Optional[PathLocks] = None) -> None:
        self.store = store
        self.meta = meta
        self.blobs = blobs
        self.keep_versions = keep_versions  # None: versioning off (an existing path is a 409)
        self.keyring = keyring
        self.segment_size = segment_size
        self.locks = locks or PathLocks()
        # After-commit jobs (thumbnails): called with each committed record, outside the path
        # lock, for PUT, tus and IETF uploads alike; they must be quick and must not raise.
        self.on_commit: list[Callable[[FileRecord], None]] = []

    @property
    def links_partials(self) -> bool:
        """A finished plain resumable upload is committed by a hard link (no copy, no buffer)."""
        return self.keyring is None

    def path_taken(self, path: str) -> bool:
        """Is there a file at `path`? (OutsideRoot, a 403, when its parent leads out of the root.)"""
        return self.store.exists(path)

    def free_bytes(self) -> Optional[int]:
        return self.store.free_bytes()

    # -- receiving ------------------------------------------------------------------------------

    def receive(self, body: BodySource, buf: memoryview, reserve: int = 0,
                expected: Optional[int] = None, scan: Optional[Scan] = None) -> Received:
        """Stream `body` into a new temp file through `buf`, hashing as it goes (and handing each
        chunk to the virus scan, when there is one); fsync at the end.

        Free space is re-checked as the body grows: once the bytes still to come (`expected`
        minus what arrived; 0 when unknown, as for chunked bodies) would leave less than
        `reserve` free, 507. A full disk (ENOSPC) is a 507 too. On any failure the temp file
        is removed, so nothing partial survives.
        """
        store = self.store
        f, temp_path = store.new_temp()
        digest = hashlib.sha256()
        next_check = SPACE_CHECK_BYTES

        def check_space(size: int) -> None:
            nonlocal next_check
            if size >= next_check:
                next_check = size + SPACE_CHECK_BYTES
                to_come = expected - size if expected is not None else 0
                if store.free_bytes() - to_come < reserve:
                    raise storage_full()

        try:
            with f:
                sink = _Sink(f, self.keyring, self.segment_size)
                try:
                    size = pump(body, buf, digest, scan, sink.write, check_space)
                    sink.finish()
                except BaseException:
                    sink.abort()  # before the file closes: a segment may still be being written
                    raise
                os.fsync(f.fileno())
        except OSError as e:
            store.discard_temp(temp_path)
            if e.errno in _FULL_ERRNOS:
                raise storage_full() from None
            raise
        except BaseException:
            store.discard_temp(temp_path)
            raise
        return Received(temp_path, size, digest.hexdigest(), self.keyring is not None)

    # -- committing -----------------------------------------------------------------------------

    def commit(self, received: Received, upload: Upload,
               before_commit: Optional[Callable[[Received], None]] = None) -> FileRecord:
        """Make the upload visible at its path with its metadata, or leave nothing.

        409 when the path is taken and versioning is off; 403 through a symlink out of the
        root; 507 when the disk fills on the way (the bytes are taken back out).
        """
        path = upload.signed_path
        try:
            if before_commit is not None:
                before_commit(received)
            with self.locks.hold(path):  # commits and removals of one path take turns
                if self.keep_versions is None:
                    record = self._commit(received, upload, None)
                else:
                    record = self._commit(received, upload, self._current(path))
                    self._prune(path)
        except OSError as e:
            if e.errno in _FULL_ERRNOS:
                raise storage_full() from None
            raise
        finally:
            self.store.discard_temp(received.temp_path, later=received.size >= UNLINK_LATER_BYTES)
        for hook in self.on_commit:
            try:
                hook(record)
            except Exception:  # an after-commit job never fails the upload
                log.exception("after-commit job failed for %r", path)
        return record

    def _current(self, path: str) -> Optional[FileRecord]:
        """The record of what is at `path` now (rebuilt from the file if it has none), or None."""
        record = self.meta.get(path)
        if record is not None and (record.ref or self.store.stat(path) is not None):
            return record
        opened = self.store.open(path)
        if opened is None:
            return None
        fd, st = opened
        try:
            return record_for_file(self.meta, path, record, fd, st, self.keyring)
        finally:
            os.close(fd)

    def _commit(self, received: Received, upload: Upload, current: Optional[FileRecord]) -> FileRecord:
        """Place the bytes and write the rows; on any failure (a failed COMMIT included) undo
        what was done on disk, newest first.

        With deduplication (or quotas, whose last check and upload log must go with the row) the
        blob's count, the placement and the rows are one transaction, so a failure (the disk
        filling under the metadata included) rolls everything back, and the undo steps run
        under the metadata lock. Otherwise only the rows are, and the placement (a link and a
        directory fsync) stays outside the metadata lock.
        """
        local_undo: list[Callable[[], None]] = []
        try:
            atomic = self.blobs is not None or upload.admit is not None
            with self.meta.transaction() if atomic else nullcontext(local_undo) as undo:
                source, blob, ref = received.temp_path, None, False
                if self.blobs is not None:
                    blob = blob_key(received.sha256, received.encrypted)  # never mixes plain and encrypted
                    source, created = self.blobs.acquire(received.temp_path, blob, received.size)
                    ref = not self.blobs.linkable
                    if created:
                        undo.append(lambda: self.blobs.discard(blob))  # type: ignore[union-attr]
                kept = None
                if current is not None:
                    kept = self._keep_current(current)
                    undo.append(lambda: self._restore(current, kept))  # type: ignore[arg-type]
                ref = self._place(source, upload.signed_path, replace_existing=current is not None, ref=ref)
                if not ref and kept is None:
                    undo.append(lambda: self.store.retract(source, upload.signed_path))
                record = FileRecord(path=upload.signed_path, size=received.size, content_type=upload.content_type,
                                    sha256=received.sha256, created=time.time(),
                                    mtime_ns=0 if ref else os.stat(source).st_mtime_ns,
                                    expires=upload.expires, uploader=upload.uploader,
                                    version=kept.version + 1 if kept is not None else 1,
                                    blob=blob, ref=ref, encrypted=received.encrypted)
                if upload.admit is not None:
                    upload.admit(record)  # quotas: checked and logged with the row, in one transaction
                self._write_rows(record, kept)
        except BaseException:
            run_undo(local_undo)  # with dedup the transaction ran its steps under the metadata lock
            raise
        return record

    def _place(self, source: str, path: str, replace_existing: bool, ref: bool) -> bool:
        """Make `source` visible at `path`; returns True when it became a metadata `ref` instead
        (a blob that cannot be hard-linked there)."""
        if ref:
            if not replace_existing and self.store.exists(path):
                raise PathConflict(path)
            if replace_existing and self.store.stat(path) is not None:
                self.store.delete(path)  # a plain file replaced by a ref (kept as a version already)
            return True
        try:
            if replace_existing:
                self.store.replace(source, path)
            else:
                self.store.publish(source, path)
        except OSError as e:
            if self.blobs is None or e.errno not in LINK_LIMIT_ERRNOS:
                raise
            log.info("blob of %s cannot be linked at its path (%s): recorded as a reference",
                     path, os.strerror(e.errno or 0))
            return self._place(source, path, replace_existing, ref=True)
        return False

    def _write_rows(self, record: FileRecord, kept: Optional[VersionRecord]) -> None:
        """The row of a placed upload (with the version it replaced: one transaction)."""
        if kept is not None:
            with self.meta.transaction():
                self.meta.add_version(kept)
                self.meta.put(record)
        elif not self.meta.put_new(record):  # one statement: atomic by itself
            if not record.ref and self._stale_row(record.path):
                self.meta.put(record)  # a row left behind by a file deleted outside hmacfs
            else:
                raise PathConflict(record.path)

    def _stale_row(self, path: str) -> bool:
        old = self.meta.get(path)
        return old is not None and not old.ref

    # -- versioning -----------------------------------------------------------------------------

    def _keep_current(self, current: FileRecord) -> VersionRecord:
        """Hard-link the current file under the versions directory before it is replaced."""
        number = kept_number(self.meta, current)
        location = None
        if not current.ref:
            location = version_location(current.path, number)
            dest = os.path.join(self.store.versions_dir, location)
            os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
            try:
                os.unlink(dest)  # no row names it (numbers are past every kept one): a crash's leftover
            except FileNotFoundError:
                pass
            self.store.link_out(current.path, dest)
        return as_version(current, number, location)

    def _restore(self, current: Optional[FileRecord], kept: VersionRecord) -> None:
        """Put the kept version back at its path after a failed replacement."""
        if current is None or kept.location is None:
            return
        dest = os.path.join(self.store.versions_dir, kept.location)
        try:
            self.store.replace(dest, current.path)
            os.unlink(dest)
        except OSError:
            log.exception("could not restore %s after a failed versioned upload", current.path)

    def _prune(self, path: str) -> None:
        """Versions beyond `maxversions` go, their bytes and blob references with their rows."""
        with self.meta.transaction():
            for gone in self.meta.drop_versions(path, self.keep_versions or 0):
                remove_version_bytes(self.store, self.blobs, gone)


def kept_number(meta: MetaStore, current: FileRecord) -> int:
    """The number the current content is kept under: its row's, unless kept versions already
    use it (a row rebuilt by reindex says 1 while versions 1..n are kept): then one past them."""
    kept = [v.version for v in meta.versions(current.path)]
    return max(current.version, max(kept) + 1) if kept else current.version


def as_version(current: FileRecord, number: int, location: Optional[str] = None) -> VersionRecord:
    """The current file's row kept as version `number`: its bytes stay where they are (its blob,
    its object) or were moved to `location` below the versions directory."""
    return VersionRecord(path=current.path, version=number, size=current.size, content_type=current.content_type,
                         sha256=current.sha256, created=current.created, uploader=current.uploader,
                         blob=current.blob, location=location, encrypted=current.encrypted,
                         object_key=current.object_key)


def version_location(path: str, version: int) -> str:
    """Where version `version` of `path` lives below the versions directory (one folder a path)."""
    key = hashlib.sha256(path.encode()).hexdigest()
    return f"{key[:2]}/{key}/{version}"


def remove_version_bytes(store: LocalStore, blobs: Optional[BlobStore], version: VersionRecord) -> None:
    """Delete the bytes of a version whose row is gone (its file, and its blob reference)."""
    if version.location is not None:
        try:
            os.unlink(os.path.join(store.versions_dir, version.location))
        except FileNotFoundError:
            pass
    if version.blob is not None and blobs is not None:
        blobs.release(version.blob)


# -- metadata rebuilt from a file ------------------------------------------------------------------

HASH_BLOCK = 1024 * 1024


def hash_fd(fd: int, size: int) -> str:
    """sha256 of an open file's first `size` bytes (pread: the fd's offset is left alone)."""
    digest = hashlib.sha256()
    offset = 0
    while offset < size:
        block = os.pread(fd, min(HASH_BLOCK, size - offset), offset)
        if not block:
            break
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def record_for_file(meta: MetaStore, signed_path: str, record: Optional[FileRecord], fd: int,
                    st: os.stat_result, keyring: Optional[Keyring] = None) -> FileRecord:
    """A metadata row for a file that has none (adopted store, a crash between commit and
    record) or whose row is stale (changed outside hmacfs): hashed once, then recorded. An
    encrypted file is recognised by its header and hashed through its decrypted segments;
    without the keyring, or if it does not decrypt, it is a 500 and no row is written."""
    if record is not None and record_matches(record, st):
        return record
    size, sha256, encrypted = st.st_size, None, False
    if os.pread(fd, len(ENCRYPTED_MAGIC), 0) == ENCRYPTED_MAGIC:
        # Never recorded (or served) as plain bytes: without the key it is a clear 500, no row.
        if keyring is None:
            raise HTTPError(500, "this file is stored encrypted and encryption is not configured")
        from .storage.encrypted import EncryptedFileError, plaintext_digest

        try:
            size, sha256 = plaintext_digest(fd, keyring, st.st_size)
        except EncryptedFileError as e:
            log.error("%r is an encrypted file that does not decrypt (%s): not served", signed_path, e)
            raise HTTPError(500, "this file is encrypted under a key this server does not have, "
                                 "or is damaged") from None
        encrypted = True
    if sha256 is None:
        sha256 = hash_fd(fd, st.st_size)
    rebuilt = rebuilt_record(signed_path, record, st, size, sha256, encrypted)
    if record is None:  # hashing took a while: an upload may have written the row meanwhile
        return rebuilt if meta.put_new(rebuilt) else (meta.get(signed_path) or rebuilt)
    meta.put(rebuilt)
    return rebuilt


def rebuilt_record(signed_path: str, record: Optional[FileRecord], st: os.stat_result, size: int, sha256: str,
                   encrypted: bool) -> FileRecord:
    """The row for a file as found on disk: a new one (type by extension, created = mtime), or
    the old one with what the file now says (it is no longer a blob reference)."""
    if record is None:
        from .http.httpmsg import guess_type

        return FileRecord(path=signed_path, size=size, content_type=guess_type(signed_path), sha256=sha256,
                          created=st.st_mtime, mtime_ns=st.st_mtime_ns, encrypted=encrypted)
    return replace(record, size=size, sha256=sha256, mtime_ns=st.st_mtime_ns, blob=None, ref=False,
                   encrypted=encrypted)


def record_matches(record: Optional[FileRecord], st: os.stat_result) -> bool:
    """Is the row still about this file? Plain files: same size and mtime; encrypted ones (the
    size on disk is not the plaintext size): the same mtime."""
    if record is None:
        return False
    if record.encrypted:
        return record.mtime_ns == st.st_mtime_ns
    return record.size == st.st_size and record.mtime_ns in (0, st.st_mtime_ns)

