"""The bytes of unfinished resumable uploads as objects in the bucket, so any node can resume them.

Strategy: the same interface as `PartialFiles` (storage/partials.py), with an upload's
bytes as a chain of chunk objects instead of one append-only file: each append streams
into a new object named by the offset it starts at and a token of its own
(`<prefix>partial.<id>.<offset>.<token>`), and becomes visible only when that append ends
(a multipart upload completes, or one PUT), keeping every byte that arrived. The offset is
therefore what the chain of chunks adds up to: no state beside the bytes, nothing to go
out of step, and a node killed mid-append leaves an unfinished multipart upload
(invisible, swept later) rather than a wrong offset. A new upload starts with an empty
chunk at offset 0, so "no chunk" means the upload's bytes are gone. Listings use no '/'
in their prefix (some S3-compatible servers mis-sign those).

Appends take turns: the resumable engine holds the upload's writer lock (shared through
Redis across nodes) while one runs, and a writer that sees its hold lapsed does not
complete its chunk. Should one complete all the same (its hold lapsed while the last
part was on its way), its chunk and the newcomer's start at the same offset and hold the
same bytes of the same file; the chain takes the longest at each offset.
"""
from __future__ import annotations

import logging
import re
import secrets
import time
from typing import TYPE_CHECKING, Iterator, Optional

from ..errors import HTTPError
from .objects import PARTIAL_PREFIX, ObjectRange, ObjectStore, WriterFile, bucket_failures, unavailable
from .partials import UPLOAD_ID, PartialCorrupt
from .s3client import S3Error

if TYPE_CHECKING:
    from .encrypted import Keyring

log = logging.getLogger("hmacfs")
OFFSET_DIGITS = 16
SEALED = ".sealed"  # a chunk stored as AES-GCM segments (storage/encrypted.py)
SEGMENT_SIZE = 1 << 20
_CHUNK = re.compile(re.escape(PARTIAL_PREFIX) + r"([A-Za-z0-9_-]+)\.(\d{16})\.[0-9a-f]{8}(\.sealed)?\Z")


class ObjectChunkWriter:
    """One append: streams into a new chunk object that starts at `start` (AES-GCM segments,
    as a stored file's, when encryption is on: unfinished uploads are encrypted at rest too)."""

    def __init__(self, objects: ObjectStore, key: str, start: int, keyring: Optional[Keyring] = None) -> None:
        self.objects = objects
        self.key = key
        self.start = self.offset = start
        with bucket_failures():
            self._writer = objects.writer(key)
        self._sealer = None
        if keyring is not None:
            from .encrypted import SegmentWriter

            self._sealer = SegmentWriter(WriterFile(self._writer), keyring, SEGMENT_SIZE)
        self._done = False
        self.allowed = lambda: True  # the engine's check that it still holds the upload (fencing)

    def write(self, chunk: memoryview) -> None:
        with bucket_failures():
            (self._sealer or self._writer).write(chunk)
        self.offset += len(chunk)

    def cut(self, offset: int) -> None:
        """Keep everything written so far, or nothing (back to `start`)."""
        if offset == self.offset:
            return
        if offset != self.start:
            raise ValueError("a writer can only go back to where it started")
        self._abort()
        self.offset = offset

    def sync(self) -> None:
        """Make the chunk visible (its bytes are then part of the upload's offset)."""
        if self._done:
            return
        if self.offset == self.start:  # nothing to keep: no empty chunk beside the marker
            self._abort()
            return
        if not self.allowed():
            self._abort()
            raise HTTPError(423, "another request took this upload over; ask for its offset and go on",
                            {"Retry-After": "1"})
        try:
            if self._sealer is not None:
                self._sealer.finish()
            self._writer.finish()
        except (S3Error, OSError) as e:
            self._abort()
            raise unavailable(e) from None
        self._done = True

    def close(self) -> None:
        if not self._done:
            self._abort()

    def _abort(self) -> None:
        if self._done:
            return
        self._done = True
        self.offset = self.start  # what the store holds of this append: nothing
        try:
            if self._sealer is not None:
                self._sealer.abort()
            self._writer.abort()
        except Exception as e:  # an unfinished multipart upload is swept later
            log.warning("object storage: could not abort chunk %s (%s)", self.key, e)


class ObjectPartials:
    """Resumable uploads' bytes in the bucket (the `PartialFiles` interface)."""

    def __init__(self, objects: ObjectStore, keyring: Optional[Keyring] = None) -> None:
        self.objects = objects
        self.keyring = keyring  # new chunks are encrypted while it is set (SIGHUP may rotate it)

    def _key(self, upload_id: str, offset: int, sealed: bool = False) -> str:
        """A new chunk's name: its offset, and a token of its own, so two writers never share one."""
        suffix = SEALED if sealed else ""
        return (f"{self.objects.prefix}{PARTIAL_PREFIX}{upload_id}.{offset:0{OFFSET_DIGITS}d}."
                f"{secrets.token_hex(4)}{suffix}")

    def _chunks(self, upload_id: str) -> list[tuple[int, int, str, int]]:
        """(start, plaintext size, key, stored size) of the upload's chunks, in order (503 when
        the bucket cannot be listed; PartialCorrupt for a sealed chunk of an impossible size)."""
        found = []
        with bucket_failures():
            for info in self.objects.client.list_objects(f"{self.objects.prefix}{PARTIAL_PREFIX}{upload_id}."):
                match = _CHUNK.fullmatch(info.key[len(self.objects.prefix):])
                if match and match.group(1) == upload_id:
                    size = info.size
                    if match.group(3):
                        size = _plaintext_size(info.key, info.size)
                    found.append((int(match.group(2)), size, info.key, info.size))
        return sorted(found)

    def is_sealed(self, upload_id: str) -> bool:
        return False

    def create(self, upload_id: str) -> None:
        with bucket_failures():
            self.objects.client.put_object(self._key(upload_id, 0), b"", 0)

    def _chain(self, upload_id: str) -> Optional[list[tuple[int, int, str, int]]]:
        """The chunks that make the upload's bytes: the chain from offset 0 that reaches
        furthest. A chunk another writer finished at an offset already covered (its hold had
        lapsed as it completed) holds the same bytes of the same file as the chunk beside
        it, so whichever chain is taken the bytes are right. None when there is no chunk."""
        chunks = self._chunks(upload_id)
        if not chunks:
            return None
        by_start: dict[int, list[tuple[int, int, str, int]]] = {}
        for chunk in chunks:
            if chunk[1]:  # the empty creation marker adds nothing
                by_start.setdefault(chunk[0], []).append(chunk)
        reach: dict[int, int] = {}  # offset -> the furthest end a chain from it reaches
        take: dict[int, tuple[int, int, str, int]] = {}  # offset -> the chunk that chain takes there
        for start in sorted(by_start, reverse=True):  # every end beyond a start is settled first
            for chunk in by_start[start]:
                end = start + chunk[1]
                if reach.get(end, end) > reach.get(start, start):
                    reach[start], take[start] = reach.get(end, end), chunk
        chain, offset = [], 0
        while offset in take:
            chain.append(take[offset])
            offset += take[offset][1]
        return chain

    def size(self, upload_id: str) -> Optional[int]:
        chain = self._chain(upload_id)
        return None if chain is None else sum(size for _start, size, _key, _stored in chain)

    def open_at(self, upload_id: str, offset: int) -> ObjectChunkWriter:
        keyring = self.keyring
        return ObjectChunkWriter(self.objects, self._key(upload_id, offset, keyring is not None), offset, keyring)

    def read(self, upload_id: str, upto: int) -> Iterator[bytes]:
        done = 0
        for start, size, key, stored in self._chain(upload_id) or []:
            if done >= upto:
                return
            if start != done:
                raise PartialCorrupt(f"chunk {key} starts at {start}, expected {done}")
            take = min(size, upto - done)
            if take:
                yield from self._read_chunk(key, stored, take)
            done += take
        if done < upto:
            raise PartialCorrupt("shorter than its offset")

    def _read_chunk(self, key: str, stored: int, take: int) -> Iterator[bytes]:
        """The first `take` plaintext bytes of one chunk (authenticated, for a sealed one)."""
        if not key.endswith(SEALED):
            for piece in self.objects.read(key, 0, take - 1):
                yield bytes(piece)
            return
        from .encrypted import EncryptedFileError, SegmentReader

        if self.keyring is None:
            raise PartialCorrupt("a chunk is encrypted and [encryption] is off")
        try:
            reader = SegmentReader(ObjectRange(self.objects, key, stored), self.keyring)
            for piece in reader.iter_range(0, take - 1):
                yield bytes(piece)
        except EncryptedFileError as e:
            raise PartialCorrupt(f"chunk {key} does not authenticate ({e})") from None

    def remove(self, upload_id: str) -> bool:
        chunks = self._chunks(upload_id)
        for _start, _size, key, _stored in chunks:
            self.objects.delete(key)
        return bool(chunks)

    def orphans(self, known: set[str], older_than: float) -> list[str]:
        """Uploads with chunks but no row, whose newest chunk is older than `older_than` seconds."""
        cutoff = time.time() - older_than
        newest: dict[str, float] = {}
        try:
            for info in self.objects.client.list_objects(self.objects.prefix + PARTIAL_PREFIX):
                match = _CHUNK.fullmatch(info.key[len(self.objects.prefix):])
                if match and UPLOAD_ID.fullmatch(match.group(1)):
                    newest[match.group(1)] = max(newest.get(match.group(1), 0.0), info.last_modified)
        except (S3Error, OSError) as e:
            log.warning("object storage: could not list partial uploads (%s)", e)
            return []
        return [upload_id for upload_id, at in newest.items() if upload_id not in known and at < cutoff]


def _plaintext_size(key: str, stored: int) -> int:
    from .encrypted import CorruptFile, segment_layout

    try:
        return segment_layout(stored, SEGMENT_SIZE)[1]
    except CorruptFile as e:
        raise PartialCorrupt(f"chunk {key}: {e}") from None
