"""Body readers, fed whole and byte by byte (h11's habit)."""
from __future__ import annotations

import io

import pytest

from hmacfs.errors import HTTPError
from hmacfs.http.body import ChunkedBody, LengthBody


class Trickle(io.RawIOBase):
    """A stream that returns at most one byte per read, like a slow client."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.pos >= len(self.data):
            return 0
        b[0] = self.data[self.pos]
        self.pos += 1
        return 1


def drain(body) -> bytes:
    buf, out = memoryview(bytearray(7)), bytearray()
    while True:
        n = body.readinto(buf)
        if not n:
            return bytes(out)
        out += buf[:n]


CHUNKED = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT"


@pytest.mark.parametrize("wrap", [lambda d: io.BufferedReader(io.BytesIO(d)),
                                  lambda d: io.BufferedReader(Trickle(d), 1)])
def test_chunked_decodes_and_stops_at_end(wrap) -> None:
    rfile = wrap(CHUNKED)
    body = ChunkedBody(rfile, 100)
    assert drain(body) == b"hello world" and body.complete and body.received == 11
    assert rfile.read() == b"NEXT"  # the next request is left alone


@pytest.mark.parametrize("data, status", [
    (b"zz\r\nhello\r\n0\r\n\r\n", 400), (b"5\r\nhelloXX0\r\n\r\n", 400), (b"5\r\nhel", 400),
    (b"a\r\n0123456789\r\n0\r\n\r\n", 413), (b"1" * 5000 + b"\r\n", 400),
])
def test_chunked_errors(data, status) -> None:
    with pytest.raises(HTTPError) as e:
        drain(ChunkedBody(io.BufferedReader(io.BytesIO(data)), 9))
    assert e.value.status == status


def test_length_body_exact_and_truncated() -> None:
    rfile = io.BufferedReader(io.BytesIO(b"abcdefNEXT"))
    assert drain(LengthBody(rfile, 6)) == b"abcdef" and rfile.read() == b"NEXT"
    with pytest.raises(HTTPError) as e:
        drain(LengthBody(io.BufferedReader(io.BytesIO(b"abc")), 6))
    assert e.value.status == 400
