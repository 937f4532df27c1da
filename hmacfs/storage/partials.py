"""The bytes of resumable uploads in progress: one append-only file each, in `.hmacfs/partials/`.

Strategy: the file itself tells the upload's offset (as in tusd's file store), so an upload
survives kill -9 and restart with nothing else to reconcile: every append is written
through, fsync'd when its request ends, and bytes that must be taken back (a checksum
mismatch) are truncated away. The directory is inside the store's internal directory, on
the same filesystem, so a finished plain upload is committed by a hard link, never a copy,
and nothing in it is ever served. Names are the upload ids (192 random bits, base64url).

With encryption at rest on, unfinished uploads are encrypted too (`<id>.sealed`): each
append is sealed as one AES-GCM record, so the bytes of an abandoned upload never lie on
disk in the clear either. Format (integers big-endian):

    header, 64 bytes: magic b"HMFSPART" | version 1 | key id length L | key id (32 bytes,
                      zero-padded) | 16 random bytes (binds records to this file) | 6 zero bytes
    record: plaintext length n (u32) | nonce (12 random bytes) | ciphertext (n) | tag (16)
    AAD of a record: the header || its plaintext offset (u64) || n (u32)

The offset is the sum of the complete records' lengths; a record cut short by a crash is
not counted and is truncated away before the next append. A record moved, repeated or
altered fails its tag (its offset is in the AAD). On commit the plaintext is read back and
encrypted into the store's segment format (storage/encrypted.py).
"""
from __future__ import annotations

import os
import re
import secrets
import struct
import time
from typing import TYPE_CHECKING, Iterator, Optional

from .local import fsync_dir, unlink_if_present

if TYPE_CHECKING:
    from .encrypted import Keyring

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{32}")
SEALED = ".sealed"
MAGIC = b"HMFSPART"
HEADER_SIZE = 64
RECORD_HEAD = struct.Struct(">I")
NONCE_SIZE = 12
TAG_SIZE = 16
READ_BLOCK = 1 << 20
RECORD_BYTES = 1 << 20  # plaintext gathered into one sealed record at most


class PartialCorrupt(Exception):
    """A sealed partial file that does not parse or authenticate."""


def new_upload_id() -> str:
    """192 random bits: the upload resource's URL is its capability."""
    return secrets.token_urlsafe(24)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


class PartialWriter:
    """Appends to one partial file from its current offset; `cut` takes this writer's bytes back.

    Sealed files gather small reads into records of up to RECORD_BYTES (a body read in tiny
    pieces must not cost 32 bytes of framing per piece); `sync` seals what is gathered first,
    so bytes that arrived are kept whatever ends the request."""

    def __init__(self, fd: int, offset: int, position: int, header: Optional[bytes] = None,
                 keyring: Optional[Keyring] = None) -> None:
        self.fd = fd
        self.offset = offset                      # plaintext bytes, gathered ones included
        self.start, self._start_position = offset, position
        self._header = header
        self._cipher = None
        self._sealed_offset = offset              # plaintext bytes already in records
        self._pending = bytearray()
        if header is not None:
            assert keyring is not None
            self._cipher = keyring.cipher(_key_id(header))

    def write(self, chunk: memoryview) -> None:
        if self._cipher is None:
            _write_all(self.fd, chunk)
        else:
            self._pending += chunk
            if len(self._pending) >= RECORD_BYTES:
                self._seal()
        self.offset += len(chunk)

    def _seal(self) -> None:
        if not self._pending or self._cipher is None or self._header is None:
            return
        n = len(self._pending)
        nonce = os.urandom(NONCE_SIZE)
        sealed = self._cipher.encrypt(nonce, self._pending, self._header + struct.pack(">QI", self._sealed_offset, n))
        _write_all(self.fd, memoryview(RECORD_HEAD.pack(n) + nonce + sealed))
        self._sealed_offset += n
        self._pending = bytearray()

    def cut(self, offset: int) -> None:
        """Back to the offset this writer started at, or keep everything up to now."""
        if offset == self.offset:
            self._seal()
            return
        if offset != self.start:
            raise ValueError("a writer can only go back to where it started")
        self._pending = bytearray()
        os.ftruncate(self.fd, self._start_position)
        os.lseek(self.fd, self._start_position, os.SEEK_SET)
        self.offset = self._sealed_offset = offset

    def sync(self) -> None:
        self._seal()
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class PartialFiles:
    """Create, measure, append to, read back and remove the files of unfinished uploads."""

    def __init__(self, directory: str, keyring: Optional[Keyring] = None) -> None:
        self.directory = directory
        self.keyring = keyring  # new uploads are sealed under its current key when set
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _name(self, upload_id: str) -> str:
        if not UPLOAD_ID.fullmatch(upload_id):
            raise ValueError("not an upload id")
        return os.path.join(self.directory, upload_id)

    def path(self, upload_id: str) -> str:
        """The upload's file (sealed or plain, whichever exists; the plain name if neither)."""
        plain = self._name(upload_id)
        return plain + SEALED if os.path.lexists(plain + SEALED) else plain

    def is_sealed(self, upload_id: str) -> bool:
        return self.path(upload_id).endswith(SEALED)

    def create(self, upload_id: str) -> None:
        path = self._name(upload_id) + (SEALED if self.keyring is not None else "")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_NOFOLLOW, 0o600)
        try:
            if self.keyring is not None:
                _write_all(fd, memoryview(_build_header(self.keyring.current_id)))
                os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.directory)

    def size(self, upload_id: str) -> Optional[int]:
        """Bytes received so far (plaintext); None when the file is gone."""
        try:
            fd = self._open(upload_id, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return self._measure(upload_id, fd)[0]
        finally:
            os.close(fd)

    def open_at(self, upload_id: str, offset: int) -> PartialWriter:
        """A writer at the file's end, which must be `offset`; a record a crash left incomplete
        is cut first. FileNotFoundError when gone."""
        fd = self._open(upload_id, os.O_RDWR)
        try:
            found, end = self._measure(upload_id, fd)
            if found != offset:
                raise ValueError(f"the upload has {found} bytes, not {offset}")
            os.ftruncate(fd, end)
            os.lseek(fd, end, os.SEEK_SET)
            header = os.pread(fd, HEADER_SIZE, 0) if self.is_sealed(upload_id) else None
            return PartialWriter(fd, offset, end, header, self.keyring)
        except BaseException:
            os.close(fd)
            raise

    def read(self, upload_id: str, upto: int) -> Iterator[bytes]:
        """The plaintext of the first `upto` bytes, in blocks (authenticated, for sealed files)."""
        fd = self._open(upload_id, os.O_RDONLY)
        try:
            if not self.is_sealed(upload_id):
                done = 0
                while done < upto:
                    block = os.pread(fd, min(READ_BLOCK, upto - done), done)
                    if not block:
                        raise PartialCorrupt("shorter than its offset")
                    done += len(block)
                    yield block
                return
            header = os.pread(fd, HEADER_SIZE, 0)
            cipher = self._cipher_for(header)
            done = 0
            for position, n in _records(fd, os.fstat(fd).st_size):
                if done >= upto:
                    return
                raw = os.pread(fd, NONCE_SIZE + n + TAG_SIZE, position + RECORD_HEAD.size)
                try:
                    plain = cipher.decrypt(raw[:NONCE_SIZE], raw[NONCE_SIZE:], header + struct.pack(">QI", done, n))
                except Exception as e:  # InvalidTag (aesgcm): altered, moved or repeated
                    raise PartialCorrupt(f"record at byte {position} does not authenticate") from e
                take = plain[:upto - done]
                done += len(take)
                yield take
            if done < upto:
                raise PartialCorrupt("shorter than its offset")
        finally:
            os.close(fd)

    def remove(self, upload_id: str) -> bool:
        plain = self._name(upload_id)
        removed = [unlink_if_present(path) for path in (plain, plain + SEALED)]
        return any(removed)

    def orphans(self, known: set[str], older_than: float) -> list[str]:
        """Uploads with a file but no row (a crash between creating the file and its row), last
        written more than `older_than` seconds ago."""
        cutoff = time.time() - older_than
        found = []
        for name in os.listdir(self.directory):
            upload_id = name[:-len(SEALED)] if name.endswith(SEALED) else name
            if upload_id in known or not UPLOAD_ID.fullmatch(upload_id):
                continue
            try:
                if os.stat(os.path.join(self.directory, name), follow_symlinks=False).st_mtime < cutoff:
                    found.append(upload_id)
            except FileNotFoundError:
                continue
        return found

    # -- internals ------------------------------------------------------------------------------

    def _open(self, upload_id: str, flags: int) -> int:
        return os.open(self.path(upload_id), flags | _O_CLOEXEC | _O_NOFOLLOW)

    def _measure(self, upload_id: str, fd: int) -> tuple[int, int]:
        """(plaintext offset, file position after the last complete record)."""
        size = os.fstat(fd).st_size
        if not self.is_sealed(upload_id):
            return size, size
        if size < HEADER_SIZE or os.pread(fd, len(MAGIC), 0) != MAGIC:
            raise PartialCorrupt("not a sealed partial upload")
        offset, end = 0, HEADER_SIZE
        for position, n in _records(fd, size):
            offset += n
            end = position + RECORD_HEAD.size + NONCE_SIZE + n + TAG_SIZE
        return offset, end

    def _cipher_for(self, header: bytes):
        if self.keyring is None:
            raise PartialCorrupt("this upload was encrypted and encryption is off")
        from .encrypted import UnknownKey

        try:
            return self.keyring.cipher(_key_id(header))
        except UnknownKey as e:
            raise PartialCorrupt(f"encrypted under key {e}, which is not in the keyfile") from None


def _build_header(key_id: str) -> bytes:
    raw = key_id.encode("ascii")
    return MAGIC + bytes([1, len(raw)]) + raw.ljust(32, b"\0") + secrets.token_bytes(16) + bytes(6)


def _key_id(header: bytes) -> str:
    if len(header) != HEADER_SIZE or header[:8] != MAGIC or header[8] != 1 or not 1 <= header[9] <= 32:
        raise PartialCorrupt("not a sealed partial upload header")
    return header[10:10 + header[9]].decode("ascii", "replace")


def _records(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(position, plaintext length) of each complete record after the header."""
    position = HEADER_SIZE
    while position + RECORD_HEAD.size <= size:
        (n,) = RECORD_HEAD.unpack(os.pread(fd, RECORD_HEAD.size, position))
        end = position + RECORD_HEAD.size + NONCE_SIZE + n + TAG_SIZE
        if end > size:
            return  # cut short by a crash: not part of the upload
        yield position, n
        position = end
