"""Request body readers: exact Content-Length and `Transfer-Encoding: chunked` (RFC 9112 7.1).

Both fill a caller's buffer (`readinto`) so an upload of any size moves through one
fixed buffer; both enforce a byte limit and report a body that ends early as a 400.
Chunk framing is strict (RFC 9112 7.1): the size is 1-16 hex digits (no `0x`, sign or
`_`), extensions hold no controls, and chunk data ends with exactly CRLF (or LF).
"""
from __future__ import annotations

import re
from typing import BinaryIO

from ..digits import parse_hex
from ..errors import HTTPError

MAX_CHUNK_LINE = 4096
# chunk-size [ BWS ";" chunk-ext ]; the extension is ignored but may hold no control bytes
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[\t\x20-\x7e\x80-\xff]*)?\r?\n")
_TRAILER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r?\n")


class BodyTruncated(HTTPError):
    """The client closed (or stalled past the timeout) before sending the whole body."""

    def __init__(self, got: int, expected: str) -> None:
        super().__init__(400, f"body ended early after {got} of {expected} bytes")


def _reader(rfile: BinaryIO, keep_partial: bool):
    """`readinto`, or with `keep_partial` one read at a time (`readinto1`): a buffered
    `readinto` fills the whole buffer, and when the connection then fails (a reset) the bytes
    it had already copied are lost with the exception. A resumable upload must keep them."""
    return getattr(rfile, "readinto1", rfile.readinto) if keep_partial else rfile.readinto


class LengthBody:
    """Exactly `length` bytes from `rfile`."""

    def __init__(self, rfile: BinaryIO, length: int, keep_partial: bool = False) -> None:
        self.rfile = rfile
        self._readinto = _reader(rfile, keep_partial)
        self.remaining = length
        self.length = length
        self.received = 0

    def readinto(self, buf: memoryview) -> int:
        if self.remaining == 0:
            return 0
        view = buf[:min(len(buf), self.remaining)]
        try:
            n = self._readinto(view)
        except OSError as e:  # timeouts and resets (socket.timeout is not TimeoutError before 3.10)
            raise BodyTruncated(self.received, str(self.length)) from e
        if not n:
            raise BodyTruncated(self.received, str(self.length))
        self.remaining -= n
        self.received += n
        return n

    @property
    def complete(self) -> bool:
        return self.remaining == 0


class ChunkedBody:
    """A chunked body, decoded; at most `limit` decoded bytes (413 beyond)."""

    def __init__(self, rfile: BinaryIO, limit: int, keep_partial: bool = False) -> None:
        self.rfile = rfile
        self._readinto = _reader(rfile, keep_partial)
        self.limit = limit
        self.chunk_left = 0
        self.received = 0
        self.done = False

    def _line(self) -> bytes:
        try:
            line = self.rfile.readline(MAX_CHUNK_LINE + 1)
        except OSError as e:  # timeouts and resets (socket.timeout is not TimeoutError before 3.10)
            raise BodyTruncated(self.received, "chunked") from e
        if not line:
            raise BodyTruncated(self.received, "chunked")
        if len(line) > MAX_CHUNK_LINE or not line.endswith(b"\n"):
            raise HTTPError(400, "chunk header line too long")
        return line

    def _next_chunk(self) -> None:
        m = _CHUNK_LINE.fullmatch(self._line())
        size = parse_hex(m.group(1)) if m else None
        if size is None:
            raise HTTPError(400, "malformed chunk size")
        if size == 0:
            while True:  # trailer fields, ignored (but well-formed)
                line = self._line()
                if line in (b"\r\n", b"\n"):
                    break
                if not _TRAILER_LINE.fullmatch(line):
                    raise HTTPError(400, "malformed trailer field")
            self.done = True
        elif self.received + size > self.limit:
            raise HTTPError(413, f"body exceeds {self.limit} bytes")
        self.chunk_left = size

    def readinto(self, buf: memoryview) -> int:
        if self.done:
            return 0
        if self.chunk_left == 0:
            self._next_chunk()
            if self.done:
                return 0
        view = buf[:min(len(buf), self.chunk_left)]
        try:
            n = self._readinto(view)
        except OSError as e:  # timeouts and resets (socket.timeout is not TimeoutError before 3.10)
            raise BodyTruncated(self.received, "chunked") from e
        if not n:
            raise BodyTruncated(self.received, "chunked")
        self.chunk_left -= n
        self.received += n
        if self.chunk_left == 0 and self._line() not in (b"\r\n", b"\n"):
            raise HTTPError(400, "chunk data longer than its size")
        return n

    @property
    def complete(self) -> bool:
        return self.done
