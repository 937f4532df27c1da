"""Request body readers: exact Content-Length and `Transfer-Encoding: chunked` (RFC 9112 7.1).

Both fill a caller's buffer (`readinto`) so an upload of any size moves through one
fixed buffer; both enforce a byte limit and report a body that ends early as a 400.
"""
from __future__ import annotations

from typing import BinaryIO

from ..errors import HTTPError

MAX_CHUNK_LINE = 4096


class BodyTruncated(HTTPError):
    """The client closed (or stalled past the timeout) before sending the whole body."""

    def __init__(self, got: int, expected: str) -> None:
        super().__init__(400, f"body ended early after {got} of {expected} bytes")


class LengthBody:
    """Exactly `length` bytes from `rfile`."""

    def __init__(self, rfile: BinaryIO, length: int) -> None:
        self.rfile = rfile
        self.remaining = length
        self.length = length
        self.received = 0

    def readinto(self, buf: memoryview) -> int:
        if self.remaining == 0:
            return 0
        view = buf[:min(len(buf), self.remaining)]
        try:
            n = self.rfile.readinto(view)
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

    def __init__(self, rfile: BinaryIO, limit: int) -> None:
        self.rfile = rfile
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
        size_text = self._line().split(b";", 1)[0].strip()
        try:
            if not size_text or len(size_text) > 16:
                raise ValueError
            size = int(size_text, 16)
        except ValueError:
            raise HTTPError(400, "malformed chunk size") from None
        if size == 0:
            while self._line().strip():  # trailer fields, ignored
                pass
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
            n = self.rfile.readinto(view)
        except OSError as e:  # timeouts and resets (socket.timeout is not TimeoutError before 3.10)
            raise BodyTruncated(self.received, "chunked") from e
        if not n:
            raise BodyTruncated(self.received, "chunked")
        self.chunk_left -= n
        self.received += n
        if self.chunk_left == 0 and self._line().strip():
            raise HTTPError(400, "chunk data longer than its size")
        return n

    @property
    def complete(self) -> bool:
        return self.done
