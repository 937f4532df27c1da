"""Encrypted files at rest: AES-256-GCM in independently authenticated segments, and the key ring.

Strategy: a download must be able to serve any byte range of a multi-GiB file without
decrypting the rest, and must never hand out a byte that was not authenticated. So the
plaintext is cut into fixed-size segments, each sealed on its own (fresh random nonce, own
tag), and everything that gives a segment its meaning goes into its associated data: the
whole header (format, key id, segment size and a random per-file id), the segment's index
and whether it is the last one. Reordering, dropping, duplicating or splicing segments
(even between two files under the same key), truncating or extending a file, and editing
the header all end in a failed tag (or earlier, in a header or length that does not parse).
This is the STREAM idea (Hoang, Reyhanitabar, Rogaway, Vizár, "Online Authenticated-Encryption
and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015) with the counter and last-segment flag in
the associated data and random nonces. Plaintext length is never stored: it follows from the file
length, which the final flag authenticates when the last segment is read. The writer keeps
one segment buffer and holds a full segment back until more data arrives, so it always knows
which segment is final without knowing the length up front (uploads may be chunked).
Segments are sealed and opened in place in that one buffer: the body is copied once (into
the buffer) on the way in and written from it, and on the way out read into it and
decrypted where it lies.

On-disk format (version 1; integers big-endian):

    header, 64 bytes:
       offset size
         0    8  magic b"HMFSAEAD"
         8    1  format version = 1
         9    1  key id length L (1..32)
        10   32  key id (ASCII [A-Za-z0-9._-], L bytes, then zero padding)
        42    4  segment size S in plaintext bytes (u32; 1 MiB by default; 4 KiB..16 MiB allowed)
        46   16  file id (16 random bytes: binds every segment to this file)
        62    2  reserved, zero
    segment i = 0..n-1:  nonce (12 random bytes) | ciphertext (S bytes; the last segment 0..S) | tag (16)
    AAD of segment i = the 64 header bytes || i as u64 || final flag as 1 byte (1 on the last segment, else 0)

An empty plaintext is one final segment with empty ciphertext, so a file cut back to its
header is detected. A plaintext that is an exact multiple of S ends with a full final segment
(never an extra empty one, and a reader refuses one). With n = ceil((file size - 64) / (S + 28)),
plaintext size = file size - 64 - n * 28; a file size that does not fit (nothing after the
header, or a last segment shorter than 28 bytes) is corrupt.

Random 96-bit nonces keep the chance of a repeat below 2**-32 for up to 2**32 segments under
one key (NIST SP 800-38D, 8.3): 4 PiB at the default segment size; rotate keys long before.

Keys: a keyfile holds lines `<key id> <key>` (key: 64 hex digits or standard base64 of 32
bytes); the first key is the current one, used for writing; every key listed can read. A
rotation puts the new key first and keeps the old ones until every file is rewritten
(decrypt with `SegmentReader`, encrypt with `SegmentWriter`).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import BinaryIO, Callable, Dict, Iterator, List, NamedTuple, Optional, Protocol, Sequence, Tuple, Union

from ..errors import StartupError
from .aesgcm import NONCE_SIZE, TAG_SIZE, AesGcm, InvalidTag

MAGIC = b"HMFSAEAD"
VERSION = 1
HEADER_SIZE = 64
OVERHEAD = NONCE_SIZE + TAG_SIZE  # 28 bytes per segment
DEFAULT_SEGMENT_SIZE = 1 << 20
MIN_SEGMENT_SIZE = 4 << 10
MAX_SEGMENT_SIZE = 16 << 20
KEY_ID_MAX = 32
FILE_ID_SIZE = 16

_HEADER = struct.Struct(">8sBB32sI16s2s")
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,32}")
_HEX64 = re.compile(r"[0-9A-Fa-f]+")
_HAS_PREADV = hasattr(os, "preadv")  # reads straight into the segment buffer

Buffer = Union[bytes, bytearray, memoryview]


class EncryptedFileError(Exception):
    """An encrypted file cannot be read as it is: the base of the three errors below."""


class CorruptFile(EncryptedFileError):
    """The header or the file's length does not follow the format (damaged, truncated, not ours)."""


class TamperedError(EncryptedFileError):
    """Segment `segment` failed authentication: altered, moved, cut, from another file, or another key."""

    def __init__(self, segment: int, detail: str = "failed authentication") -> None:
        super().__init__(f"segment {segment} {detail}")
        self.segment = segment


class UnknownKey(EncryptedFileError):
    """The file names a key id the key ring does not hold."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"key id {key_id!r} is not in the key ring")
        self.key_id = key_id


class KeyfileError(StartupError):
    """The keyfile cannot be read or parsed; the message gives the line, never key material."""


# -- the format: pure functions --

def valid_key_id(key_id: str) -> bool:
    """1 to 32 characters of [A-Za-z0-9._-]."""
    return isinstance(key_id, str) and _KEY_ID.fullmatch(key_id) is not None


def check_segment_size(segment_size: int) -> int:
    """`segment_size` if it is within 4 KiB..16 MiB, else ValueError."""
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(f"segment size must be {MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE} bytes, not {segment_size}")
    return segment_size


class Header(NamedTuple):
    key_id: str
    segment_size: int
    file_id: bytes
    raw: bytes  # the 64 bytes as stored: part of every segment's associated data


def build_header(key_id: str, segment_size: int, file_id: bytes) -> bytes:
    """The 64 header bytes."""
    if not valid_key_id(key_id):
        raise ValueError("key id must be 1 to 32 characters of A-Z a-z 0-9 . _ -")
    if len(file_id) != FILE_ID_SIZE:
        raise ValueError(f"file id must be {FILE_ID_SIZE} bytes")
    check_segment_size(segment_size)
    kid = key_id.encode("ascii")
    return _HEADER.pack(MAGIC, VERSION, len(kid), kid, segment_size, file_id, b"\0\0")


def parse_header(raw: bytes) -> Header:
    """The header fields, or CorruptFile saying what is wrong."""
    if len(raw) < HEADER_SIZE:
        raise CorruptFile(f"{len(raw)} bytes is shorter than the {HEADER_SIZE}-byte header")
    raw = bytes(raw[:HEADER_SIZE])
    magic, version, kid_len, kid, segment_size, file_id, reserved = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise CorruptFile("not an hmacfs encrypted file (bad magic)")
    if version != VERSION:
        raise CorruptFile(f"format version {version} is not supported (only {VERSION})")
    if not 1 <= kid_len <= KEY_ID_MAX:
        raise CorruptFile(f"key id length {kid_len} is out of range 1..{KEY_ID_MAX}")
    key_id = kid[:kid_len].decode("ascii", "replace")
    if not valid_key_id(key_id) or kid[kid_len:].strip(b"\0"):
        raise CorruptFile("the key id field is malformed")
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise CorruptFile(f"segment size {segment_size} is out of range")
    if reserved != b"\0\0":
        raise CorruptFile("reserved header bytes are not zero")
    return Header(key_id, segment_size, file_id, raw)


def segment_layout(file_size: int, segment_size: int) -> Tuple[int, int]:
    """(segment count, plaintext size) implied by a file's length, or CorruptFile."""
    body = file_size - HEADER_SIZE
    if body < OVERHEAD:
        raise CorruptFile(f"{file_size} bytes leaves no room for a segment after the header (truncated?)")
    stride = segment_size + OVERHEAD
    count = -(-body // stride)
    last = body - (count - 1) * stride
    if last < OVERHEAD:
        raise CorruptFile(f"a file of {file_size} bytes does not fit the segment layout (truncated?)")
    if last == OVERHEAD and count > 1:
        raise CorruptFile("an empty final segment after full ones is never written (extended?)")
    return count, body - count * OVERHEAD


def encrypted_size(plaintext_size: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The file size that stores `plaintext_size` bytes (the inverse of `segment_layout`)."""
    count = max(1, -(-plaintext_size // segment_size))
    return HEADER_SIZE + plaintext_size + count * OVERHEAD


def segment_aad(header: bytes, index: int, final: bool) -> bytes:
    """Associated data of segment `index`: header || index (u64) || final flag (1 byte)."""
    return header + struct.pack(">QB", index, 1 if final else 0)


# -- keys --

def decode_key(text: str) -> bytes:
    """32 key bytes from 64 hex digits or base64; ValueError says what is wrong, never the key."""
    if _HEX64.fullmatch(text):  # all hex digits: base64 of 32 bytes always ends in '='
        if len(text) != 64:
            raise ValueError(f"a hex key is 64 digits, this one is {len(text)}")
        return bytes.fromhex(text)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key is neither 64 hex digits nor valid base64") from None
    if len(key) != 32:
        raise ValueError(f"the base64 key decodes to {len(key)} bytes, 32 needed")
    return key


class Keyring:
    """Key id -> 32-byte key; the first is current (writes), all decrypt. repr() shows ids only."""

    def __init__(self, keys: Sequence[Tuple[str, bytes]], warnings: Sequence[str] = ()) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        self._keys: Dict[str, bytes] = {}
        for key_id, key in keys:
            if not valid_key_id(key_id) or key_id in self._keys or len(key) != 32:
                raise ValueError("key ids must be valid and distinct, keys 32 bytes")
            self._keys[key_id] = bytes(key)
        self.current_id: str = keys[0][0]
        self.warnings: List[str] = list(warnings)
        self._ciphers: Dict[str, AesGcm] = {}
        self._lock = threading.Lock()

    @property
    def ids(self) -> Tuple[str, ...]:
        return tuple(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __repr__(self) -> str:
        return f"Keyring(current={self.current_id!r}, ids={list(self._keys)!r})"

    def cipher(self, key_id: str) -> AesGcm:
        """The (cached, thread-safe) AES-GCM for `key_id`; UnknownKey if the ring lacks it."""
        with self._lock:
            cipher = self._ciphers.get(key_id)
            if cipher is None:
                key = self._keys.get(key_id)
                if key is None:
                    raise UnknownKey(key_id)
                cipher = self._ciphers[key_id] = AesGcm(key)
            return cipher


def parse_keyfile(text: str) -> Keyring:
    """The key ring in a keyfile's text; KeyfileError with the line number on any mistake."""
    keys: List[Tuple[str, bytes]] = []
    seen: Dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise KeyfileError(f"line {lineno}: expected '<key id> <key>', found {len(fields)} field(s)")
        key_id, encoded = fields
        if not valid_key_id(key_id):  # not echoed: it may be a key written in the wrong column
            raise KeyfileError(f"line {lineno}: a key id is 1 to 32 characters of A-Z a-z 0-9 . _ -")
        if key_id in seen:
            raise KeyfileError(f"line {lineno}: duplicate key id {key_id!r} (first on line {seen[key_id]})")
        try:
            key = decode_key(encoded)
        except ValueError as e:
            raise KeyfileError(f"line {lineno}: key {key_id!r}: {e}") from None
        seen[key_id] = lineno
        keys.append((key_id, key))
    if not keys:
        raise KeyfileError("no key found (expected lines '<key id> <key>')")
    return Keyring(keys)


def load_keyfile(path: str) -> Keyring:
    """parse_keyfile on a file. `.warnings` says if group or others may access it (log them)."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read()
    except OSError as e:
        raise KeyfileError(f"cannot read keyfile {path!r}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyfileError(f"keyfile {path!r} is not UTF-8 text") from None
    try:
        ring = parse_keyfile(text)
    except KeyfileError as e:
        raise KeyfileError(f"keyfile {path!r}: {e}") from None
    if mode & 0o077:
        ring.warnings.append(f"keyfile {path!r} is accessible by group or others (mode {mode & 0o777:03o}); "
                             "chmod 600 it")
    return ring


# -- writing --

def _write_all(f: BinaryIO, view: Buffer) -> None:
    view = memoryview(view)
    while view:
        n = f.write(view)
        if not n:
            raise OSError("write made no progress")
        view = view[n:]


class SegmentWriter:
    """Encrypts a stream into the format above, with the ring's current key.

    Writes the header at once; `write` as data arrives; `finish` seals the final segment and
    returns the plaintext size; `abort` waits for a seal in flight when the upload fails.
    The file is neither flushed to disk nor closed here. A full segment is sealed (encrypted
    and written) by a pool thread while the next one fills, so encryption overlaps receiving
    and hashing on another core; one seal is in flight at most, so segments land in order.
    Memory: two segment buffers (S + 28 bytes each), the second one only for files of more
    than one segment."""

    def __init__(self, f: BinaryIO, keyring: Keyring, segment_size: int = DEFAULT_SEGMENT_SIZE) -> None:
        self._size = check_segment_size(segment_size)
        self.key_id = keyring.current_id
        self._cipher = keyring.cipher(self.key_id)
        self._header = build_header(self.key_id, segment_size, secrets.token_bytes(FILE_ID_SIZE))
        self._f = f
        self._buf: Optional[memoryview] = memoryview(bytearray(NONCE_SIZE + segment_size + TAG_SIZE))
        self._spare: Optional[memoryview] = None
        self._in_flight: Optional[Future] = None
        self._fill = 0  # plaintext bytes waiting in the buffer
        self._index = 0
        self._total = 0
        _write_all(f, self._header)

    def write(self, data: Buffer) -> None:
        buf = self._buf
        if buf is None:
            raise ValueError("write after finish")
        src = memoryview(data).cast("B")
        size, pos = self._size, 0
        while pos < len(src):
            if self._fill == size:  # a full segment and more to come: it is not the last
                buf = self._hand_off()
            take = min(size - self._fill, len(src) - pos)
            start = NONCE_SIZE + self._fill
            buf[start:start + take] = src[pos:pos + take]
            self._fill += take
            pos += take

    def finish(self) -> int:
        """Seal the final segment (empty only if nothing was written); return the plaintext size."""
        if self._buf is None:
            raise ValueError("finish called twice")
        self._wait()
        self._seal(self._buf, self._fill, self._index, final=True)
        self._total += self._fill
        self._buf = self._spare = None
        return self._total

    def abort(self) -> None:
        """The upload failed: let a seal in flight end (its error is moot) before the file closes."""
        try:
            self._wait()
        except Exception:  # noqa: S110 - the upload's own error is what the caller reports
            pass
        self._buf = self._spare = None

    def _wait(self) -> None:
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            future.result()  # a write error (ENOSPC) surfaces here

    def _hand_off(self) -> memoryview:
        """Give the full buffer to a pool thread to seal; continue in the other one."""
        self._wait()
        full = self._buf
        assert full is not None
        self._in_flight = _pool().submit(self._seal, full, self._fill, self._index, False)
        self._index += 1
        self._total += self._fill
        self._fill = 0
        if self._spare is None:
            self._spare = memoryview(bytearray(len(full)))
        self._buf, self._spare = self._spare, full
        return self._buf

    def _seal(self, buf: memoryview, n: int, index: int, final: bool) -> None:
        nonce = secrets.token_bytes(NONCE_SIZE)
        buf[:NONCE_SIZE] = nonce
        end = NONCE_SIZE + n
        self._cipher.encrypt_into(buf[NONCE_SIZE:end + TAG_SIZE], nonce, buf[NONCE_SIZE:end],
                                  segment_aad(self._header, index, final))
        _write_all(self._f, buf[:end + TAG_SIZE])


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """Threads that seal segments ahead of writers and open them ahead of readers (the crypto
    and the I/O release the GIL, so this overlaps them with the request thread's work)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(2, min(8, 2 * (os.cpu_count() or 1))),
                                       thread_name_prefix="segments")
        return _POOL


# -- reading --

def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `offset`; the count read (short only at end of file)."""
    got = 0
    while got < len(view):
        if _HAS_PREADV:
            n = os.preadv(fd, [view[got:]], offset + got)
        else:  # pragma: no cover - macOS before 11
            chunk = os.pread(fd, len(view) - got, offset + got)
            n = len(chunk)
            view[got:got + n] = chunk
        if n == 0:
            break
        got += n
    return got


class RandomAccess(Protocol):
    """Bytes read at any offset, as an encrypted file held elsewhere than an fd offers them."""

    size: int

    def read_into(self, view: memoryview, offset: int) -> int: ...


class SegmentReader:
    """Random access to the plaintext of an encrypted file open at `fd` (the caller closes it).

    The header is checked at construction; segments are authenticated as they are read.
    `plaintext_size` follows from the file length and is authenticated once the last segment
    has been read: a truncated file fails there, while bytes served from earlier segments
    are always genuine and in place."""

    def __init__(self, fd: Union[int, RandomAccess], keyring: Keyring, file_size: Optional[int] = None) -> None:
        if isinstance(fd, int):
            if file_size is None:
                file_size = os.fstat(fd).st_size
            self._read_into: Callable[[memoryview, int], int] = partial(_pread_into, fd)
        else:  # an object in a bucket (storage/objects.py): ranged reads
            file_size = fd.size if file_size is None else file_size
            self._read_into = fd.read_into
        head = memoryview(bytearray(HEADER_SIZE))
        self._header = parse_header(bytes(head[:self._read_into(head, 0)]))
        self.key_id = self._header.key_id
        self.segment_size = self._header.segment_size
        self.segment_count, self.plaintext_size = segment_layout(file_size, self.segment_size)
        self._cipher = keyring.cipher(self.key_id)

    def iter_range(self, first: int, last: int, buf: Optional[bytearray] = None) -> Iterator[memoryview]:
        """Plaintext bytes first..last (inclusive), in pieces; only the segments they overlap are read.

        Each piece is authenticated before it is yielded and lives in `buf` (S + 28 bytes; one
        is allocated if None), so it is valid until the next piece is asked for."""
        if not 0 <= first <= last < self.plaintext_size:
            raise ValueError(f"range {first}-{last} is outside 0-{self.plaintext_size - 1}")
        view = self._buffer(buf)
        return self._pieces(first, last, view)

    def iter_range_ahead(self, first: int, last: int) -> Iterator[memoryview]:
        """Like `iter_range`, but the next segment is read and decrypted by a pool thread while
        the caller uses the current piece (two buffers). Close the iterator (or exhaust it)
        before closing the fd: closing waits for the read in flight."""
        if not 0 <= first <= last < self.plaintext_size:
            raise ValueError(f"range {first}-{last} is outside 0-{self.plaintext_size - 1}")
        return self._pieces_ahead(first, last, (self._buffer(None), self._buffer(None)))

    def _pieces_ahead(self, first: int, last: int, views: tuple[memoryview, memoryview]) -> Iterator[memoryview]:
        size = self.segment_size
        indices = range(first // size, last // size + 1)
        pending: Optional[Future] = _pool().submit(self._open, indices[0], views[0])
        try:
            for k, index in enumerate(indices):
                assert pending is not None
                future, pending = pending, None
                plain = future.result()  # TamperedError surfaces here, before the piece is used
                if k + 1 < len(indices):
                    pending = _pool().submit(self._open, indices[k + 1], views[(k + 1) % 2])
                base = index * size
                yield plain[max(first - base, 0):min(last - base + 1, len(plain))]
        finally:
            if pending is not None:  # stopped early: the read in flight must end before the fd closes
                try:
                    pending.result()
                except Exception:  # noqa: S110 - nobody will use that piece
                    pass

    def _pieces(self, first: int, last: int, view: memoryview) -> Iterator[memoryview]:
        size = self.segment_size
        for index in range(first // size, last // size + 1):
            plain = self._open(index, view)
            base = index * size
            yield plain[max(first - base, 0):min(last - base + 1, len(plain))]

    def verify_all(self, buf: Optional[bytearray] = None) -> None:
        """Authenticate every segment (TamperedError on the first that fails)."""
        view = self._buffer(buf)
        for index in range(self.segment_count):
            self._open(index, view)

    def _buffer(self, buf: Optional[bytearray]) -> memoryview:
        need = self.segment_size + OVERHEAD
        if buf is None:
            buf = bytearray(need)
        elif len(buf) < need:
            raise ValueError(f"the buffer must hold {need} bytes")
        return memoryview(buf)

    def _open(self, index: int, view: memoryview) -> memoryview:
        """Read segment `index` into `view` and decrypt it in place; its plaintext."""
        final = index == self.segment_count - 1
        size = self.segment_size
        length = (self.plaintext_size - index * size if final else size) + OVERHEAD
        stored = view[:length]
        if self._read_into(stored, HEADER_SIZE + index * (size + OVERHEAD)) != length:
            raise TamperedError(index, "is cut short (the file shrank while being read)")
        plain = stored[NONCE_SIZE:length - TAG_SIZE]
        try:
            self._cipher.decrypt_into(plain, stored[:NONCE_SIZE], stored[NONCE_SIZE:],
                                      segment_aad(self._header.raw, index, final))
        except InvalidTag:
            raise TamperedError(index) from None
        return plain


def plaintext_digest(fd: int, keyring: Keyring, file_size: Optional[int] = None) -> Tuple[int, str]:
    """(plaintext size, plaintext sha256) of an encrypted file; every segment is authenticated
    (for metadata rebuilt from an encrypted file: `hmacfs reindex`, a row lost in a crash)."""
    reader = SegmentReader(fd, keyring, file_size)
    digest = hashlib.sha256()
    if reader.plaintext_size:
        for piece in reader.iter_range(0, reader.plaintext_size - 1):
            digest.update(piece)
    else:
        reader.verify_all()
    return reader.plaintext_size, digest.hexdigest()
