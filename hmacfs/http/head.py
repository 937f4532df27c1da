"""The request head, read and parsed strictly (RFC 9112). Pure over a byte stream.

Strategy: one place decides what a request head means, so no later reader can disagree
with it (disagreement between two parsers is what request smuggling exploits):
- every line must end inside its limit: a line that does not is refused whole (414 for
  the request line, 431 for a field line), never split into two lines;
- field values may hold only HTAB, SP, visible ASCII and obs-text: a bare CR, NUL or any
  other control is a 400 (RFC 9112 2.2, RFC 9110 5.5);
- message framing is settled here, once: Content-Length as bounded ASCII digits, only the
  `chunked` transfer coding, never both, never chunked on HTTP/1.0 (RFC 9112 6.1, 6.3);
- HTTP/1.1 needs exactly one Host (RFC 9112 3.2); framing and identity fields may not repeat.
Everything raises `HTTPError`; nothing else escapes for any input bytes (a property test
and an atheris harness feed it arbitrary bytes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO, Optional

from ..digits import parse_decimal
from ..errors import HTTPError

MAX_REQUEST_LINE = 16 * 1024
MAX_FIELD_LINE = 16 * 1024
MAX_FIELDS = 100
MAX_CONTENT_LENGTH_DIGITS = 19
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")        # raw UTF-8 bytes are accepted (some clients send them)
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")  # no CR, LF, NUL or other controls
_SINGLE = frozenset({"content-length", "transfer-encoding", "host", "authorization", "expect",
                     "content-type", "range", "if-range"})


@dataclass(frozen=True)
class RequestHead:
    """A parsed request head. Header names are lowercase; repeated list fields are comma-joined."""

    method: str
    target: bytes
    version: str
    headers: dict[str, str]
    content_length: Optional[int]  # None: no Content-Length field
    chunked: bool                  # Transfer-Encoding: chunked

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


def _strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\r\n"):
        return line[:-2]
    return line[:-1]  # a bare LF ends a line too (RFC 9112 2.2 allows recipients to accept it)


def read_line(rfile: BinaryIO, limit: int, too_long: int) -> bytes:
    """One line of at most `limit` bytes; HTTPError(`too_long`) beyond; b"" at end of stream.

    A line cut short by the end of the stream raises ConnectionError (nothing to answer).
    """
    line = rfile.readline(limit + 1)
    if len(line) > limit:
        raise HTTPError(too_long, "request line too long" if too_long == 414 else "header line too long")
    if line and not line.endswith(b"\n"):
        raise ConnectionError("client closed in the middle of a line")
    return line


def read_fields(rfile: BinaryIO, budget: int) -> list[bytes]:
    """Header field lines up to the empty line, `budget` bytes in all (431 beyond)."""
    if budget < 0:  # the request line alone took more than the whole head may have
        raise HTTPError(431, "request headers too large")
    lines: list[bytes] = []
    while True:
        line = read_line(rfile, min(MAX_FIELD_LINE, max(budget, 2)), 431)
        if not line:
            raise ConnectionError("client closed during the headers")
        if line in (b"\r\n", b"\n"):
            return lines
        budget -= len(line)
        if budget < 0 or len(lines) >= MAX_FIELDS:
            raise HTTPError(431, "request headers too large")
        lines.append(line)


def parse_request_line(line: bytes) -> tuple[str, bytes, str]:
    """`METHOD SP target SP HTTP/1.x` -> (method, target, version); 400/505 otherwise."""
    parts = _strip_eol(line).split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HTTPError(400, "malformed method")
    if not _TARGET.fullmatch(target):
        raise HTTPError(400, "malformed request target")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if re.fullmatch(rb"HTTP/\d\.\d", version):
            raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise HTTPError(400, "malformed request line")
    return method.decode("ascii"), target, version.decode("ascii")


def parse_fields(lines: list[bytes]) -> dict[str, str]:
    """Field lines -> {lowercase name: value}; 400 on any malformed or forbidden repetition."""
    headers: dict[str, str] = {}
    for raw in lines:
        name, sep, value = _strip_eol(raw).partition(b":")
        if not sep or not _TOKEN.fullmatch(name):  # also refuses obs-fold and space before ':'
            raise HTTPError(400, "malformed header line")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise HTTPError(400, "control character in a header value")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        if key in headers:
            if key in _SINGLE:
                raise HTTPError(400, f"repeated {key} header")
            headers[key] += ", " + text
        else:
            headers[key] = text
    return headers


def parse_head(request_line: bytes, field_lines: list[bytes]) -> RequestHead:
    """The whole head: request line, fields, Host and body framing rules."""
    method, target, version = parse_request_line(request_line)
    headers = parse_fields(field_lines)
    if version == "HTTP/1.1" and "host" not in headers:
        raise HTTPError(400, "HTTP/1.1 request without a Host header")
    te = headers.get("transfer-encoding")
    cl = headers.get("content-length")
    length: Optional[int] = None
    if te is not None:
        if cl is not None:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding (refused: request smuggling)")
        if version == "HTTP/1.0":
            raise HTTPError(400, "Transfer-Encoding on an HTTP/1.0 request")
        if te.lower() != "chunked":
            raise HTTPError(501, "only the chunked transfer coding is supported")
    elif cl is not None:
        length = parse_decimal(cl, MAX_CONTENT_LENGTH_DIGITS)
        if length is None:
            raise HTTPError(400, "invalid Content-Length")
    return RequestHead(method, target, version, headers, length, te is not None)


def read_head(rfile: BinaryIO, max_bytes: int) -> Optional[RequestHead]:
    """Read and parse one request head (None when the stream ends before a request starts)."""
    line = read_line(rfile, MAX_REQUEST_LINE, 414)
    if line in (b"\r\n", b"\n"):  # RFC 9112 2.2: ignore one empty line before a request
        line = read_line(rfile, MAX_REQUEST_LINE, 414)
    if not line:
        return None
    return parse_head(line, read_fields(rfile, max_bytes - len(line)))
