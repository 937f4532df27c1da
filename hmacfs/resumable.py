"""Resumable uploads: the one engine behind tus 1.0.0 and the IETF resumable-upload draft.

Strategy: both protocols are the same three moves on an upload resource (create it bound
to a signed slot, append at an offset, learn the offset), so the handlers only translate
headers and status codes and this module owns the mechanism:
- state: a row in the metadata store (`PartialRecord`), the bytes in an append-only file
  whose length is the offset (`storage/partials.py`): both survive kill -9 and restart;
- one writer per upload (`Writers`): requests for an upload take turns, and a newcomer
  takes over from a request still attached to a dead connection (a phone that moved from
  Wi-Fi to LTE) by shutting that connection down: the stale request stops at once,
  keeping every byte it had written, instead of holding the upload until its read timeout;
- the sha256 of the bytes so far is kept in memory between appends (rebuilt from the file
  once after a restart), so the last byte needs no second pass over the file;
- on the last byte the file goes through the same `UploadPipeline.commit` as a PUT
  (dedup, versioning, quotas; with encryption it is encrypted on the way): the partial
  file is hard-linked as the commit's temp file, so a 1 GiB upload is never copied, and a
  commit that fails (409, 507) leaves the partial whole for a retry.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional

from .errors import HTTPError, storage_full
from .http.uploadheaders import new_hash
from .meta import FileRecord, MetaStore
from .meta.record import PartialRecord
from .pipeline import SPACE_CHECK_BYTES, BodySource, Received, Upload, UploadPipeline
from .storage.local import LocalStore
from .storage.partials import UPLOAD_ID, PartialCorrupt, PartialFiles, new_upload_id

log = logging.getLogger("hmacfs")
TAKEOVER_WAIT = 30.0   # seconds a request waits for the upload's current writer to stop
STALE_AFTER = 1.0      # a holder whose body has sent nothing for this long is taken over
TAKEOVER_POLL = 0.1
ORPHAN_AGE = 3600.0    # a partial file without a row this old is a crash's leftover
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class UploadBusy(HTTPError):
    def __init__(self) -> None:
        super().__init__(423, "another request is writing this upload; retry", {"Retry-After": "1"})


class OffsetMismatch(HTTPError):
    """409: the client's offset is not the upload's (the handler adds the right Upload-Offset)."""

    def __init__(self, expected: int, provided: int) -> None:
        super().__init__(409, f"Upload-Offset is {provided}, the upload has {expected} bytes")
        self.expected = expected
        self.provided = provided


@dataclass
class Attachment:
    """In-memory state of one upload: its writer lock, the request holding it, the hash so far."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sock: Optional[socket.socket] = None
    reading: bool = False  # the holder is reading a request body (what a dead connection blocks)
    progress: float = 0.0  # when the holder last received body bytes (time.monotonic)
    digest: Any = None  # hashlib sha256 over bytes [0, digest_at)
    digest_at: int = -1
    lost: bool = False  # cluster mode: the shared lock lapsed, another node may write now (fencing)


class Writers:
    """One request at a time per upload; a newcomer cuts a stale holder's connection.

    Stale means reading a body that has stopped arriving (STALE_AFTER without a byte): the
    phone that moved networks. A holder still receiving bytes, committing or answering is
    waited for instead, so a request that sat unread in a connection's buffer while its
    client moved on cannot cut the request that resumed (it waits its turn, then finds the
    offset has moved: 409)."""

    def __init__(self, wait: float = TAKEOVER_WAIT, on_takeover: Optional[Callable[[], None]] = None) -> None:
        self.wait = wait
        self.on_takeover = on_takeover
        self._entries: dict[str, Attachment] = {}
        self._guard = threading.Lock()

    @contextmanager
    def hold(self, upload_id: str, sock: Optional[socket.socket]) -> Iterator[Attachment]:
        with self._guard:
            entry = self._entries.setdefault(upload_id, Attachment())
        if not entry.lock.acquire(blocking=False):
            self._take_over(upload_id, entry)
        entry.sock, entry.reading = sock, False
        try:
            yield entry
        finally:
            entry.sock, entry.reading = None, False
            entry.lock.release()

    def _take_over(self, upload_id: str, entry: Attachment) -> None:
        """Wait for the holder, cutting its connection once it is stale; 423 after `wait`."""
        deadline = time.monotonic() + self.wait
        cut = False
        while True:
            holder = entry.sock
            if not cut and holder is not None and entry.reading and time.monotonic() - entry.progress >= STALE_AFTER:
                cut = True
                log.info("upload %s…: a new request takes over from the one still attached", upload_id[:8])
                if self.on_takeover is not None:
                    self.on_takeover()
                try:
                    holder.shutdown(socket.SHUT_RDWR)  # its blocked read returns at once
                except OSError:
                    pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UploadBusy()
            if entry.lock.acquire(timeout=min(TAKEOVER_POLL, remaining)):
                return

    def busy(self, upload_id: str) -> bool:
        with self._guard:
            entry = self._entries.get(upload_id)
        return entry is not None and entry.lock.locked()

    def forget(self, upload_id: str) -> None:
        with self._guard:
            self._entries.pop(upload_id, None)


class _NoDigest:
    """A hash that is not kept (see `append`)."""

    def update(self, data: Any) -> None:
        pass

    def copy(self) -> _NoDigest:
        return self


_NO_DIGEST = _NoDigest()


class _BlocksBody:
    """A partial upload's plaintext read back as a body (to encrypt it on commit)."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self.blocks = blocks
        self.pending = memoryview(b"")
        self.received = 0

    def readinto(self, buf: memoryview) -> int:
        while not self.pending:
            block = next(self.blocks, None)
            if block is None:
                return 0
            self.pending = memoryview(block)
        n = min(len(buf), len(self.pending))
        buf[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        self.received += n
        return n


class ResumableUploads:
    """Create, find, append to, finish, cancel and sweep resumable uploads."""

    def __init__(self, files: PartialFiles, meta: MetaStore, pipeline: UploadPipeline, store: LocalStore,
                 expiry: float, writers: Optional[Writers] = None) -> None:
        self.files = files
        self.meta = meta
        self.pipeline = pipeline
        self.store = store
        self.expiry = expiry
        self.writers = writers or Writers()

    # -- life cycle -----------------------------------------------------------------------------

    def create(self, path: str, length: int, content_type: str, protocol: str, grant: str, now: float,
               file_expires: Optional[float] = None, uploader: Optional[str] = None,
               metadata: str = "") -> PartialRecord:
        record = PartialRecord(id=new_upload_id(), path=path, length=length, content_type=content_type,
                               protocol=protocol, created=now, expires=now + self.expiry,
                               file_expires=file_expires, uploader=uploader, metadata=metadata, grant=grant)
        try:
            self.files.create(record.id)  # the file first: a row never points at nothing
            self.meta.partial_put(record)
        except OSError as e:
            self.files.remove(record.id)
            if e.errno in _FULL_ERRNOS:
                raise storage_full() from None
            raise
        return record

    def find(self, upload_id: str, now: float, held: bool = False) -> PartialRecord:
        """The upload behind a resource id: 404 when unknown, 410 (and removed) when expired.
        An upload another request is writing is alive whatever its row says (the writer moves
        its expiry on when it is done): only its holder (`held`) or the sweep removes it."""
        record = self.meta.partial_get(upload_id) if UPLOAD_ID.fullmatch(upload_id) else None
        if record is None:
            raise HTTPError(404, "no such upload")
        if not held and self.writers.busy(upload_id):
            return record
        if record.expires <= now:
            self._drop(record)
            raise HTTPError(410, "this upload has expired")
        if not record.completed and self._size(upload_id) is None:
            self._drop(record)  # its bytes are gone (removed by hand): nothing to resume
            raise HTTPError(404, "no such upload")
        return record

    def offset(self, record: PartialRecord) -> int:
        if record.completed:
            return record.length
        size = self._size(record.id)
        if size is None:
            raise HTTPError(404, "no such upload")
        return size

    def _size(self, upload_id: str) -> Optional[int]:
        try:
            return self.files.size(upload_id)
        except PartialCorrupt as e:
            raise self._damaged(upload_id, e) from None

    @contextmanager
    def writing(self, record: PartialRecord, sock: Optional[socket.socket], now: float
                ) -> Iterator[tuple[PartialRecord, Attachment]]:
        """Exclusive use of the upload (taking over from a stale request); yields its record as
        it is once the turn came (it may have completed, or gone, meanwhile)."""
        with self.writers.hold(record.id, sock) as attachment:
            yield self.find(record.id, now, held=True), attachment

    def append(self, record: PartialRecord, attachment: Attachment, body: BodySource, buf: memoryview,
               now: float, checksum: Optional[tuple[str, bytes]] = None, reserve: int = 0) -> int:
        """Write `body` at the upload's current offset; returns the new offset.

        Every byte that arrives is kept, also when the body is cut off (the connection
        broke, or a newcomer took over) — unless a checksum was given: then the chunk can
        only be kept whole and verified, so a mismatch (460) or a cut discards it. More bytes
        than the upload's length: 413. Free space is checked as it grows (507)."""
        if record.completed:
            raise HTTPError(400, "this upload is already complete")
        start = self.offset(record)
        # The running hash serves only a commit by hard link; a commit that streams the bytes
        # (encryption, the S3 backend) hashes them then: reading [0, start) back here, on every
        # append that lands on another node than the last, would be wasted.
        digest = self._digest(record.id, attachment, start) if self.pipeline.links_partials else _NO_DIGEST
        saved = digest.copy() if checksum is not None else None
        check = new_hash(checksum[0]) if checksum is not None else None
        try:
            writer = self.files.open_at(record.id, start)
        except PartialCorrupt as e:
            raise self._damaged(record.id, e) from None
        writer.allowed = lambda: not attachment.lost  # an object chunk is not completed once the hold lapsed
        attachment.reading, attachment.progress = True, time.monotonic()
        fed = start  # the digest covers [0, fed)
        try:
            try:
                next_check = start + SPACE_CHECK_BYTES
                while True:
                    n = body.readinto(buf)
                    if not n:
                        break
                    if writer.offset + n > record.length:
                        raise HTTPError(413, f"the upload is {record.length} bytes; this append goes beyond")
                    attachment.progress = time.monotonic()
                    chunk = buf[:n]
                    writer.write(chunk)
                    digest.update(chunk)
                    fed += n
                    if check is not None:
                        check.update(chunk)
                    if writer.offset >= next_check:
                        next_check = writer.offset + SPACE_CHECK_BYTES
                        free = self.pipeline.free_bytes()  # None: a bucket
                        if free is not None and free - (record.length - writer.offset) < reserve:
                            raise storage_full()
                if check is not None and checksum is not None and check.digest() != checksum[1]:
                    raise HTTPError(460, f"the {checksum[0]} checksum of the appended bytes does not match")
                writer.sync()
            except BaseException as e:
                kept = writer.offset
                if saved is not None:  # unverifiable or wrong: the chunk goes, the offset stays
                    kept, digest = start, saved
                try:
                    writer.cut(kept)  # keep what arrived (sealed: the gathered bytes too)
                    writer.sync()
                except OSError as again:  # no room even for that: back to where this append began
                    writer.cut(start)
                    kept, digest = start, None  # the hash is rebuilt from the file when needed
                    e = again if not isinstance(e, OSError) else e
                kept = writer.offset  # what the store holds now (an object chunk that lost its hold: start)
                if saved is None and kept != fed:
                    digest = None  # it covers bytes that were not kept: rebuilt from the store when needed
                attachment.digest, attachment.digest_at = digest, kept
                if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
                    raise storage_full() from None
                raise e
            attachment.digest, attachment.digest_at = digest, writer.offset
        finally:
            attachment.reading = False
            writer.close()
            if writer.offset != start:
                self.meta.partial_touch(record.id, now + self.expiry)  # alive: expiry moves on (if still there)
        return writer.offset

    def finish(self, record: PartialRecord, attachment: Attachment, upload: Upload, buf: memoryview,
               now: float, reserve: int = 0,
               inspect: Optional[Callable[[int, Iterator[bytes]], None]] = None) -> FileRecord:
        """Commit a whole upload through the pipeline; the upload is then `completed` (kept so
        a client that missed the answer learns so from HEAD) and its partial file goes.
        `inspect` sees the assembled plaintext first (the virus scan) and may refuse it by
        raising: then nothing is committed, and what becomes of the partial is the caller's
        choice (an infected one is cancelled)."""
        size = self.offset(record)
        if size != record.length:
            raise HTTPError(400, f"the upload has {size} of {record.length} bytes")
        if inspect is not None:
            inspect(size, self._plaintext(record.id, size))
        if self.pipeline.links_partials and not self.files.is_sealed(record.id):
            sha256 = self._digest(record.id, attachment, size).hexdigest()
            temp = self.store.temp_name()
            os.link(self.files.path(record.id), temp)  # the commit consumes the link, never the partial
            received = Received(temp, size, sha256, False)
        else:  # encrypted on the way into the store (and out of a sealed partial), or into an object
            received = self.pipeline.receive(_BlocksBody(self._plaintext(record.id, size)), buf, reserve, size)
        stored = self.pipeline.commit(received, upload)
        self.meta.partial_put(replace(record, completed=True, expires=now + self.expiry))
        self.files.remove(record.id)
        attachment.digest, attachment.digest_at = None, -1
        return stored

    def cancel(self, record: PartialRecord) -> None:
        self._drop(record)

    def sweep(self, now: float) -> int:
        """Remove expired uploads (not one being written) and partial files without a row."""
        removed = 0
        for record in self.meta.partials_expired(now):
            if not self.writers.busy(record.id):
                self._drop(record)
                removed += 1
        for upload_id in self.files.orphans(self.meta.partial_ids(), ORPHAN_AGE):
            removed += self.files.remove(upload_id)
        return removed

    # -- internals ------------------------------------------------------------------------------

    def _plaintext(self, upload_id: str, upto: int) -> Iterator[bytes]:
        try:
            yield from self.files.read(upload_id, upto)
        except PartialCorrupt as e:
            raise self._damaged(upload_id, e) from None

    @staticmethod
    def _damaged(upload_id: str, error: PartialCorrupt) -> HTTPError:
        log.error("partial upload %s…: %s", upload_id[:8], error)
        return HTTPError(500, "the stored part of this upload is damaged or cannot be decrypted")

    def _drop(self, record: PartialRecord) -> None:
        self.files.remove(record.id)
        self.meta.partial_delete(record.id)
        self.writers.forget(record.id)

    def _digest(self, upload_id: str, attachment: Attachment, offset: int):
        """The running sha256 of bytes [0, offset): kept from the last append, or read back once
        (after a restart, or when another node wrote them)."""
        if attachment.digest is not None and attachment.digest_at == offset:
            return attachment.digest
        digest = hashlib.sha256()
        for block in self._plaintext(upload_id, offset):
            digest.update(block)
        attachment.digest, attachment.digest_at = digest, offset
        return digest



