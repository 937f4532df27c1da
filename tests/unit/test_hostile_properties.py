"""Hostile-input properties: whatever bytes a client sends, the parsers answer with `HTTPError`.

Why: a client controls every byte of the request head, the chunked framing, the Range
header, the bearer token and the query string. Any other exception that escapes those
parsers (ValueError from `int()`, RecursionError from `json`, UnicodeError, IndexError...)
becomes a 500 and a logged traceback, and a parser that *accepts* something odd is worse:
two readers disagreeing about where a message ends is how requests are smuggled.

So each parser gets two kinds of input:
- arbitrary bytes/text (`st.binary()`, `st.text()`), which mostly probe the first check;
- near-valid structures (real request lines with random header lines, random
  Content-Length spellings, well-formed chunked bodies with random splits, signed JWTs
  with hostile JSON inside), which get past the first check and reach the deep code.

and the properties say more than "does not crash": accepted heads obey the framing
rules, a decoded chunked body is exactly the data that was encoded (whole or one byte
per read), ranges stay inside the file, signed paths stay plain names, JWT claims
round-trip. An oracle written here from the RFC text (not from the implementation)
decides the expected answer wherever one is cheap to state.

The second half (the security issue) states what an attacker must never get, whatever the
input: a signed path that, joined to the storage root, leaves it or reaches `.hmacfs/` or a
dot-name (and is the path decoded exactly once); a Range set that amplifies or half-honours a
malformed header; JWT claims other than exactly those signed (numbers out of bounds: 401); a
config document that crashes `from_dict` or `check-config` instead of a ConfigError, or sets a
NaN deadline; upload headers a tus HEAD would echo with controls in them; a clamd reply read as
"clean" that is not exactly `stream: OK` with its terminator.

Budget: a few hundred examples per property, the module runs in about 22 s on 2 cores;
HMACFS_PROPERTY_SCALE=N multiplies every example count for a longer hunt.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import math
import os
import re
import sys
import unicodedata
from typing import Optional, Union
from urllib.parse import quote, unquote_to_bytes

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from hmacfs import auth
from hmacfs import config as config_mod
from hmacfs.errors import ConfigError, HTTPError
from hmacfs.http import uploadheaders
from hmacfs.http.body import ChunkedBody
from hmacfs.http.head import RequestHead, parse_head, read_head
from hmacfs.http.httpmsg import MAX_RANGES, clean_content_type, parse_range, parse_ranges
from hmacfs.policy import paths
from hmacfs.services import clamav

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

SCALE = int(os.environ.get("HMACFS_PROPERTY_SCALE", "1"))  # e.g. 50 for a long hunt: 15,000 examples each
PROPS = settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAVY = settings(max_examples=120 * SCALE, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MAX_HEAD = 64 * 1024         # the default [server] maxheaderbytes
FIELD_LINE_LIMIT = 16 * 1024  # request line and field line limits (bytes, end of line included)
HEAD_STATUSES = {400, 414, 431, 501, 505}
TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")  # RFC 9110 token, lowercase
TOKEN_CHARS = "!#$%&'*+.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-"
KEY = b"secret"
P = "/upload/"


# --- helpers ------------------------------------------------------------------------------------

class OneByteReader:
    """A client that delivers one byte per read: `readinto` fills at most one byte and
    `readline` assembles its line from single-byte reads (what a socket trickle looks like)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _one(self) -> bytes:
        byte = self.data[self.pos:self.pos + 1]
        self.pos += len(byte)
        return byte

    def readinto(self, buf: Union[memoryview, bytearray]) -> int:
        if len(buf) == 0:
            return 0
        byte = self._one()
        if byte:
            buf[0] = byte[0]
        return len(byte)

    def readline(self, limit: int = -1) -> bytes:
        line = bytearray()
        while limit < 0 or len(line) < limit:
            byte = self._one()
            if not byte:
                break
            line += byte
            if byte == b"\n":
                break
        return bytes(line)

    def read(self) -> bytes:
        rest = self.data[self.pos:]
        self.pos = len(self.data)
        return rest


def drain(body: ChunkedBody, bufsize: int = 7) -> bytes:
    """Read a body to its end through a small fixed buffer, as the upload pipeline does."""
    buf, out = memoryview(bytearray(bufsize)), bytearray()
    while True:
        n = body.readinto(buf)
        if not n:
            return bytes(out)
        assert 0 < n <= bufsize
        out += buf[:n]


def parse(data: bytes, max_bytes: int = MAX_HEAD) -> Union[RequestHead, HTTPError, None]:
    """read_head over `data`: the head, the HTTPError, or None (end of stream / client closed).

    Anything else propagates and fails the calling property.
    """
    try:
        return read_head(io.BytesIO(data), max_bytes)
    except HTTPError as e:
        assert e.status in HEAD_STATUSES, e
        return e
    except ConnectionError:
        return None


def check_accepted_head(head: RequestHead) -> None:
    """What every accepted head must satisfy, whatever bytes it came from."""
    assert TOKEN_RE.fullmatch(head.method.lower())
    assert head.version in ("HTTP/1.0", "HTTP/1.1")
    assert head.target and not re.search(rb"[\x00-\x20\x7f]", head.target)
    for name, value in head.headers.items():
        assert TOKEN_RE.fullmatch(name), name          # lowercase tokens only
        assert not re.search(r"[\r\n\x00]", value), value
        assert not re.search(r"[\x01-\x08\x0a-\x1f\x7f]", value), value
    # framing is settled once, and never both ways (RFC 9112 6.1, 6.3)
    assert not (head.content_length is not None and head.chunked)
    assert not ("content-length" in head.headers and "transfer-encoding" in head.headers)
    if head.content_length is not None:
        assert 0 <= head.content_length < 10 ** 19
        assert re.fullmatch(r"[0-9]{1,19}", head.headers["content-length"])
        assert int(head.headers["content-length"]) == head.content_length
    else:
        assert "content-length" not in head.headers  # never silently ignored
    if head.chunked:
        assert head.version == "HTTP/1.1"
        assert head.headers["transfer-encoding"].lower() == "chunked"
    else:
        assert "transfer-encoding" not in head.headers
    if head.version == "HTTP/1.1":
        assert "host" in head.headers


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def signed_token(header: bytes, payload: bytes, key: bytes = KEY) -> str:
    """A JWT with arbitrary header/payload bytes and a *valid* HS256 MAC over them, so the
    decoder's JSON handling (which runs only after the MAC verifies) is reached."""
    signing_input = f"{b64url(header)}.{b64url(payload)}"
    mac = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


# --- strategies ---------------------------------------------------------------------------------

tokens = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12).map(str.encode)
eols = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"", b"\r\r\n", b"\n\r", b" \r\n"])
unicode_digits = st.sampled_from(["\u00b2", "\u0663", "\uff11", "\u0e53", "1\u00b2", "\U0001d7d9"])
number_texts = st.one_of(
    st.integers(0, 10 ** 25).map(str),
    st.sampled_from(["", " 5", "5 ", "+5", "-1", "-0", "0x10", "1_0", "5, 5", "5,5", "1e3", "9" * 19, "9" * 20,
                     "0" * 19 + "1", "9" * 4400, "9" * 5000, "\t7\t", "07", "\u00a05"]),
    unicode_digits,
    st.text(alphabet="0123456789 +-_x,.", max_size=22),
)
header_names = st.one_of(
    st.sampled_from([b"Host", b"host", b"HOST", b"Content-Length", b"content-length", b"CONTENT-LENGTH",
                     b"Transfer-Encoding", b"transfer-encoding", b"Range", b"Authorization", b"Expect",
                     b"Content-Type", b"If-Range", b"X-Pad", b"Content-Length ", b" Host", b"Host\x00",
                     b"Content_Length", b"", b"Conte\xc3\xa9nt-Length", b"\tHost"]),
    tokens,
    st.binary(max_size=8),
)
header_values = st.one_of(
    number_texts.map(lambda s: s.encode("utf-8")),
    st.sampled_from([b"chunked", b"Chunked", b"gzip, chunked", b"chunked, chunked", b"identity", b" chunked",
                     b"chunked\x00", b"chunked\r", b"bytes=0-5", b"bytes=-5", b"Bearer a.b.c", b"100-continue",
                     b"example.org", b"", b"a\x7fb", b"\x80\xff", b"v\x0bv"]),
    st.binary(max_size=30),
    st.text(max_size=20).map(lambda s: s.encode("utf-8")),
)
separators = st.sampled_from([b": ", b":", b" : ", b":\t", b"\t:", b"::", b"="])


@st.composite
def field_lines(draw: st.DrawFn) -> bytes:
    return draw(header_names) + draw(separators) + draw(header_values) + draw(eols)


VALID_FIELDS = [(b"Host", b"example.org"), (b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked"),
                (b"Range", b"bytes=0-5"), (b"Authorization", b"Bearer a.b.c"), (b"Content-Type", b"text/plain"),
                (b"Expect", b"100-continue"), (b"User-Agent", b"x/1 (\x80\xff)"), (b"Accept", b"*/*")]


@st.composite
def near_valid_heads(draw: st.DrawFn) -> bytes:
    """A valid head in which a few parts (about two on average) are swapped for hostile ones.

    Wholly random parts almost never make an accepted head (then the properties about
    accepted heads would test nothing): each part is valid unless a biased coin says otherwise.
    """
    def part(valid: st.SearchStrategy[bytes], hostile: st.SearchStrategy[bytes], percent: int = 5) -> bytes:
        return draw(hostile if draw(st.integers(0, 99)) < percent else valid)

    method = part(st.sampled_from([b"GET", b"PUT", b"HEAD", b"DELETE", b"OPTIONS"]),
                  st.one_of(st.sampled_from([b"get", b"G ET", b"", b"GET\x00", b"\xc3\xa4"]), tokens,
                            st.binary(max_size=5)))
    target = part(st.sampled_from([b"/upload/abc/file.txt", b"/upload/a/../b", b"/upload/%2e%2e/x", b"*",
                                   b"/health", b"http://h/upload/a/b?v=1#f", b"/upload/\xc3\xa4"]),
                  st.one_of(st.sampled_from([b"/upload/a b", b"/\x00", b"", b"/\x7f", b"/a\tb"]),
                            st.binary(max_size=30)))
    version = part(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]),
                   st.sampled_from([b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1", b"HTTP/1.10", b"HTTP/1",
                                    b"HTTP/\xd9\xa3.1", b"HTTP/0.9", b"HTTP/1.1\x00"]))
    sp = st.just(b" ")
    bad_sp = st.sampled_from([b"  ", b"\t", b"", b"\x0b"])
    eol = st.sampled_from([b"\r\n", b"\r\n", b"\n"])
    request_line = (part(st.just(b""), st.sampled_from([b"\r\n", b"\n", b"\r\n\r\n", b" \r\n"]))
                    + method + part(sp, bad_sp) + target + part(sp, bad_sp) + version + part(eol, eols))
    fields = []
    if draw(st.integers(0, 99)) >= 5:
        fields.append(VALID_FIELDS[0])
    fields += draw(st.lists(st.sampled_from(VALID_FIELDS[1:]), max_size=5))
    lines = b"".join(
        part(st.just(name), header_names) + part(st.just(b": "), separators)
        + part(st.just(value), st.one_of(header_values, number_texts.map(lambda t: t.encode("utf-8"))), 30)
        + part(eol, eols)
        for name, value in draw(st.permutations(fields)))
    if draw(st.integers(0, 99)) < 20:
        lines += draw(field_lines())
    end = part(eol, st.sampled_from([b"", b"\r", b" \r\n", b"\r\r\n", b"\t\r\n"]))
    return request_line + lines + end + draw(st.binary(max_size=16))


# --- request head -------------------------------------------------------------------------------

@PROPS
@given(st.one_of(st.binary(max_size=300), near_valid_heads()), st.sampled_from([MAX_HEAD, 64, 200, 1]))
@example(b"\r\n", MAX_HEAD)
@example(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", MAX_HEAD)
@example(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: " + "\u0663".encode() + b"\r\n\r\n", MAX_HEAD)
@example(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", MAX_HEAD)
def test_read_head_raises_only_http_errors(data: bytes, max_bytes: int) -> None:
    rfile = io.BytesIO(data)
    try:
        head = read_head(rfile, max_bytes)
    except HTTPError as e:
        assert e.status in HEAD_STATUSES, e
        return
    except ConnectionError:  # the stream ended inside a line or the head: "client closed"
        return
    if head is None:  # only when the stream ends before a request starts
        assert data in (b"", b"\r\n", b"\n")
        return
    check_accepted_head(head)
    consumed = data[:rfile.tell()]
    assert consumed.endswith((b"\n\r\n", b"\n\n")), consumed[-40:]  # stops right after the blank line
    if max_bytes >= FIELD_LINE_LIMIT:
        assert len(consumed) <= max_bytes + 4  # the budget (blank lines are not counted)


@PROPS
@given(st.one_of(st.binary(max_size=60), near_valid_heads().map(lambda h: h.split(b"\n", 1)[0] + b"\n")),
       st.lists(st.one_of(st.binary(max_size=40), field_lines()), max_size=6))
@example(b"GET / HTTP/1.1\r\n", [b"Host: a\nContent-Length: 5\r\n"])
def test_parse_head_over_arbitrary_lines_raises_only_http_errors(request_line: bytes, lines: list[bytes]) -> None:
    """parse_head directly, with lines read_fields would never produce (embedded LF, no EOL)."""
    try:
        head = parse_head(request_line, lines)
    except HTTPError as e:
        assert e.status in HEAD_STATUSES, e
        return
    check_accepted_head(head)


edge_bytes = st.lists(st.sampled_from(b" \t\x0b\x0c\r\x00\x1f\x7f\x85\xa0"), max_size=3).map(bytes)
control_heavy_bytes = st.one_of(
    st.binary(max_size=20),
    st.lists(st.one_of(st.integers(0, 0x20), st.sampled_from([0x7F, 0x80, 0xFF, 0x41])), max_size=12).map(bytes),
    st.tuples(edge_bytes, st.sampled_from([b"", b"a", b"a b", b"\x80"]), edge_bytes).map(b"".join),  # trimming
)


@PROPS
@given(control_heavy_bytes, control_heavy_bytes)
@example(b"", b"a\x0bb")
@example(b"", b"a\rb")
@example(b" ", b"a")
def test_field_line_oracle(name_tail: bytes, value: bytes) -> None:
    """RFC 9112 5 / RFC 9110 5.5, as a test oracle: a field line is accepted iff its name is a
    token (no space before the colon) and its trimmed value is HTAB / SP / VCHAR / obs-text only."""
    assume(b"\n" not in name_tail + value and b":" not in name_tail)
    head = parse(b"GET /upload/a/b HTTP/1.1\r\nHost: h\r\nX-" + name_tail + b": " + value + b"\r\n\r\n")
    trimmed = value.strip(b" \t")
    if re.fullmatch(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*", name_tail) and re.fullmatch(rb"[\t\x20-\x7e\x80-\xff]*",
                                                                                   trimmed):
        assert isinstance(head, RequestHead), head
        assert head.headers["x-" + name_tail.decode("ascii").lower()] == trimmed.decode("latin-1")
    else:
        assert isinstance(head, HTTPError) and head.status == 400, head


def _fields_of(names_values: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(name + b": " + value + b"\r\n" for name, value in names_values)


@PROPS
@given(st.one_of(number_texts.map(lambda s: s.encode("utf-8")), st.binary(max_size=24)),
       st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-length"]))
@example(b"\xd9\xa3", b"Content-Length")
@example(b"18446744073709551616", b"Content-Length")
def test_content_length_is_1_to_19_ascii_digits(value: bytes, name: bytes) -> None:
    """Oracle (RFC 9112 6.3 + the 19-digit bound): accepted iff the trimmed value is 1-19 ASCII digits."""
    assume(b"\n" not in value)
    head = parse(b"PUT /upload/a/b HTTP/1.1\r\nHost: h\r\n" + name + b": " + value + b"\r\n\r\n")
    trimmed = value.strip(b" \t")
    if re.fullmatch(rb"[0-9]{1,19}", trimmed):
        assert isinstance(head, RequestHead), head
        assert head.content_length == int(trimmed) and not head.chunked
    else:
        assert isinstance(head, HTTPError) and head.status == 400, head


@PROPS
@given(st.one_of(header_values, st.sampled_from([b"chunked", b"CHUNKED", b"\tchunked ", b"chunked;q=1"])),
       st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]), st.booleans())
def test_transfer_encoding_only_chunked_never_with_content_length(value: bytes, version: bytes,
                                                                   with_length: bool) -> None:
    assume(b"\n" not in value)
    extra = b"Content-Length: 5\r\n" if with_length else b""
    head = parse(b"PUT /upload/a/b " + version + b"\r\nHost: h\r\nTransfer-Encoding: " + value + b"\r\n"
                 + extra + b"\r\n")
    trimmed = value.strip(b" \t")
    valid_value = re.fullmatch(rb"[\t\x20-\x7e\x80-\xff]*", trimmed) is not None
    if not valid_value or with_length or version == b"HTTP/1.0":
        assert isinstance(head, HTTPError) and head.status == 400, head
    elif trimmed.lower() == b"chunked":
        assert isinstance(head, RequestHead) and head.chunked and head.content_length is None, head
    else:
        assert isinstance(head, HTTPError) and head.status == 501, head


SINGLE_FIELDS = ["Content-Length", "Transfer-Encoding", "Host", "Authorization", "Expect", "Content-Type",
                 "Range", "If-Range"]


@PROPS
@given(st.sampled_from(SINGLE_FIELDS), st.sampled_from([str.lower, str.upper, str.title, str]),
       st.integers(0, 3), st.sampled_from(["5", "chunked", "a", "bytes=0-1"]))
def test_framing_and_identity_fields_may_not_repeat(name: str, case, gap: int, value: str) -> None:
    first = f"{name}: {value}\r\n".encode()
    second = f"{case(name)}: {value}\r\n".encode()
    filler = b"X-Filler: 1\r\n" * gap
    host = b"" if name == "Host" else b"Host: h\r\n"
    head = parse(b"PUT /upload/a/b HTTP/1.1\r\n" + host + first + filler + second + b"\r\n")
    assert isinstance(head, HTTPError) and head.status == 400, head


SMUGGLED = [b"Content-Length: 44\r\n", b"Transfer-Encoding: chunked\r\n", b"\r\n",
            b"\r\nGET /upload/x HTTP/1.1\r\n", b"Host: evil\r\n"]


@HEAVY
@given(st.integers(-30, 30), st.sampled_from(SMUGGLED), st.booleans(), st.sampled_from([b"\r\n", b"\n"]))
@example(0, b"Content-Length: 44\r\n", True, b"\r\n")
def test_over_long_field_line_is_431_never_split(shift: int, smuggled: bytes, after_host: bool,
                                                 eol: bytes) -> None:
    """A field line longer than 16 KiB is refused whole: the bytes past the limit (placed so a
    parser that split the line would read them as a fresh header) never become a field."""
    pad = b"X-Pad: " + b"A" * (FIELD_LINE_LIMIT + 1 - len(b"X-Pad: ") + shift)
    line = pad + smuggled
    if not line.endswith(b"\n"):
        line += eol
    assume(line.index(b"\n") + 1 > FIELD_LINE_LIMIT)  # the *first* line is the over-long one
    host = b"Host: h\r\n"
    fields = host + line if after_host else line + host
    head = parse(b"PUT /upload/a/b HTTP/1.1\r\n" + fields + b"\r\n")
    assert isinstance(head, HTTPError) and head.status == 431, head


@HEAVY
@given(st.integers(-30, 30), st.sampled_from(SMUGGLED), st.sampled_from([b"\r\n", b"\n"]))
def test_over_long_request_line_is_414_never_split(shift: int, smuggled: bytes, eol: bytes) -> None:
    target = b"/upload/" + b"a" * (FIELD_LINE_LIMIT + 1 - len(b"GET /upload/") + shift)
    line = b"GET " + target + b" HTTP/1.1" + eol
    assume(len(line) > FIELD_LINE_LIMIT)
    head = parse(line + b"Host: h\r\n" + smuggled + b"\r\n")
    assert isinstance(head, HTTPError) and head.status == 414, head


@HEAVY
@given(st.integers(0, FIELD_LINE_LIMIT - len(b"X-Pad: \r\n")))
def test_field_lines_within_16_kib_are_accepted(n: int) -> None:
    """The other side of the limit, so the 431 property cannot pass by refusing everything."""
    head = parse(b"GET /upload/a/b HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"A" * n + b"\r\n\r\n")
    assert isinstance(head, RequestHead) and len(head.headers["x-pad"]) == n, head


safe_field = st.tuples(tokens.filter(lambda t: t.lower() not in {s.lower().encode() for s in SINGLE_FIELDS}),
                       st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=12)
                       .map(str.encode))


@PROPS
@given(st.lists(safe_field, max_size=6), st.sampled_from([b"GET", b"PUT", b"DELETE"]))
def test_http11_without_host_is_400_and_with_host_parses(fields: list[tuple[bytes, bytes]], method: bytes) -> None:
    without = parse(method + b" /upload/a/b HTTP/1.1\r\n" + _fields_of(fields) + b"\r\n")
    assert isinstance(without, HTTPError) and without.status == 400, without
    with_host = parse(method + b" /upload/a/b HTTP/1.1\r\n" + _fields_of([*fields, (b"Host", b"h")]) + b"\r\n")
    assert isinstance(with_host, RequestHead) and with_host.headers["host"] == "h", with_host
    http10 = parse(method + b" /upload/a/b HTTP/1.0\r\n" + _fields_of(fields) + b"\r\n")
    assert isinstance(http10, RequestHead), http10  # Host is an HTTP/1.1 rule


@PROPS
@given(st.lists(safe_field, max_size=6), st.binary(max_size=40))
def test_head_leaves_the_body_unread(fields: list[tuple[bytes, bytes]], body: bytes) -> None:
    rfile = io.BytesIO(b"PUT /upload/a/b HTTP/1.1\r\nHost: h\r\n" + _fields_of(fields) + b"\r\n" + body)
    head = read_head(rfile, MAX_HEAD)
    assert head is not None and rfile.read() == body


# --- chunked bodies -----------------------------------------------------------------------------

EXT_BYTES = [b"\t", b" ", b"=", b"a", b'"', b";", b"\x80", b"\xff", b"~"]


@st.composite
def chunk_extensions(draw: st.DrawFn) -> bytes:
    if not draw(st.booleans()):
        return b""
    ws = draw(st.sampled_from([b"", b" ", b"\t", b" \t "]))
    return ws + b";" + b"".join(draw(st.lists(st.sampled_from(EXT_BYTES), max_size=10)))


@st.composite
def chunked_encodings(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(data, its chunked encoding): random splits, hex case, leading zeros, extensions, trailers."""
    data = draw(st.binary(max_size=400))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=10)))
    bounds = [0, *cuts, len(data)]
    out = bytearray()
    for start, stop in zip(bounds, bounds[1:]):
        piece = data[start:stop]
        if not piece:
            continue  # a zero-size chunk is the last chunk
        size = format(len(piece), draw(st.sampled_from(["x", "X"]))).encode()
        zeros = draw(st.integers(0, 16 - len(size)))
        eol = draw(st.sampled_from([b"\r\n", b"\n"]))
        out += b"0" * zeros + size + draw(chunk_extensions()) + eol + piece + draw(st.sampled_from([b"\r\n", b"\n"]))
    out += b"0" * draw(st.integers(1, 16)) + draw(chunk_extensions()) + b"\r\n"
    for name, value in draw(st.lists(st.tuples(tokens, st.binary(max_size=8).map(
            lambda b: bytes(c for c in b if c == 9 or 0x20 <= c != 0x7f))), max_size=3)):
        out += name + b":" + value + draw(st.sampled_from([b"\r\n", b"\n"]))
    out += draw(st.sampled_from([b"\r\n", b"\n"]))
    return data, bytes(out)


@PROPS
@given(chunked_encodings(), st.binary(max_size=12), st.integers(1, 64), st.integers(0, 64))
def test_chunked_decodes_exactly_the_data(encoded: tuple[bytes, bytes], tail: bytes, bufsize: int,
                                          slack: int) -> None:
    data, wire = encoded
    for rfile in (io.BytesIO(wire + tail), OneByteReader(wire + tail)):
        body = ChunkedBody(rfile, len(data) + slack)
        assert drain(body, bufsize) == data
        assert body.complete and body.received == len(data)
        assert rfile.read() == tail  # the next request on the connection is left alone


@PROPS
@given(chunked_encodings(), st.integers(0, 400))
def test_chunked_limit_is_413_exactly_when_exceeded(encoded: tuple[bytes, bytes], limit: int) -> None:
    data, wire = encoded
    for rfile in (io.BytesIO(wire), OneByteReader(wire)):
        body = ChunkedBody(rfile, limit)
        if len(data) <= limit:
            assert drain(body) == data
            continue
        with pytest.raises(HTTPError) as e:
            drain(body)
        assert e.value.status == 413
        assert body.received <= limit


def _read_all_bounded(rfile: Union[io.BytesIO, OneByteReader], limit: int, bufsize: int) -> Optional[bytes]:
    body = ChunkedBody(rfile, limit)
    buf, out = memoryview(bytearray(bufsize)), bytearray()
    try:
        while True:
            n = body.readinto(buf)
            if not n:
                break
            out += buf[:n]
            assert len(out) <= limit
    except HTTPError as e:
        assert e.status in (400, 413), e
        assert len(out) <= limit
        return None
    assert body.complete and body.received == len(out) <= limit
    return bytes(out)


@st.composite
def mangled_chunked(draw: st.DrawFn) -> bytes:
    """A well-formed encoding with one edit: a byte flipped, inserted or removed, or cut short."""
    _data, wire = draw(chunked_encodings())
    if not wire:
        return wire
    i = draw(st.integers(0, len(wire) - 1))
    op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
    byte = bytes([draw(st.sampled_from([0, 9, 10, 13, 32, 43, 45, 48, 59, 95, 120, 255]))])
    if op == "flip":
        return wire[:i] + byte + wire[i + 1:]
    if op == "insert":
        return wire[:i] + byte + wire[i:]
    if op == "delete":
        return wire[:i] + wire[i + 1:]
    return wire[:i]


@PROPS
@given(st.one_of(st.binary(max_size=300), mangled_chunked()), st.integers(0, 300), st.integers(1, 32))
@example(b"1" * 5000 + b"\r\n", 10, 7)
@example(b"f" * 17 + b"\r\n", 10, 7)
def test_chunked_over_arbitrary_bytes_raises_only_400_or_413(wire: bytes, limit: int, bufsize: int) -> None:
    whole = _read_all_bounded(io.BytesIO(wire), limit, bufsize)
    trickled = _read_all_bounded(OneByteReader(wire), limit, bufsize)
    assert whole == trickled  # how the bytes arrive never changes the meaning


@PROPS
@given(st.text(alphabet="0123456789abcdefABCDEF", min_size=1, max_size=16), st.data())
def test_malformed_chunk_sizes_are_400(size: str, data: st.DataObject) -> None:
    form = data.draw(st.sampled_from(["0x", "+", "-", " ", "\t", "_", "17+", "inner_", "unicode"]))
    if form == "17+":
        bad = "0" * (17 - len(size)) + size if len(size) < 17 else size
    elif form == "inner_":
        i = data.draw(st.integers(1, max(1, len(size) - 1)))
        bad = size[:i] + "_" + size[i:]
    elif form == "unicode":
        bad = size + data.draw(unicode_digits)
    else:
        bad = form + size
    wire = bad.encode("utf-8") + b"\r\n" + b"x" * 32 + b"\r\n0\r\n\r\n"
    for rfile in (io.BytesIO(wire), OneByteReader(wire)):
        with pytest.raises(HTTPError) as e:
            drain(ChunkedBody(rfile, 1 << 62))
        assert e.value.status == 400


# --- Range and Content-Type ---------------------------------------------------------------------

def expected_range(first: Optional[int], last: Optional[int], size: int) -> Union[tuple[int, int], str, None]:
    """RFC 9110 14.1.2 / 14.2 for one `bytes=first-last` with ASCII numbers; "416" when unsatisfiable."""
    if first is None:
        if last is None:
            return None
        if last == 0 or size == 0:
            return "416"
        return max(0, size - last), size - 1
    if last is not None and last < first:
        return None
    if first >= size:
        return "416"
    return first, size - 1 if last is None else min(last, size - 1)


range_numbers = st.one_of(st.none(), st.integers(0, 10 ** 19 - 1), st.integers(0, 50))
sizes = st.one_of(st.integers(0, 100), st.integers(0, 2 ** 63))


def _range_of(header: Optional[str], size: int) -> Union[tuple[int, int], str, None]:
    try:
        span = parse_range(header, size)
    except HTTPError as e:
        assert e.status == 416, e
        assert e.headers.get("Content-Range") == f"bytes */{size}"
        return "416"
    if span is not None:
        first, last = span
        assert type(first) is int and type(last) is int
        assert 0 <= first <= last < size
    return span


@PROPS
@given(range_numbers, range_numbers, sizes, st.sampled_from(["bytes", "BYTES", " bytes "]),
       st.sampled_from(["", " ", "\t"]))
def test_range_oracle(first: Optional[int], last: Optional[int], size: int, unit: str, ws: str) -> None:
    header = f"{unit}={ws}{'' if first is None else first}{ws}-{ws}{'' if last is None else last}{ws}"
    assert _range_of(header, size) == expected_range(first, last, size)


range_parts = st.one_of(st.integers(0, 10 ** 6).map(str), unicode_digits, number_texts,
                        st.text(alphabet="0123456789-=, \t", max_size=8))


@PROPS
@given(st.one_of(
    st.text(max_size=60),
    st.builds(lambda u, a, b, c: f"{u}={a}-{b}{c}", st.sampled_from(["bytes", "Bytes", "items", "", "bytes "]),
              range_parts, range_parts, st.sampled_from(["", ",0-1", ", ", "-", "="])),
), sizes)
@example("bytes=\u00b2-", 10)
@example("bytes=-\u0663", 10)
@example("bytes=0-" + "9" * 5000, 10)
@example("bytes=" + "9" * 5000 + "-", 10)
@example("bytes=-" + "9" * 4400, 0)
def test_range_over_arbitrary_text_raises_only_416(header: str, size: int) -> None:
    span = _range_of(header, size)
    if not re.search(r"[0-9]", header):
        assert span is None  # Unicode digits ("\u00b2", "\u0663") are never numbers: the header is ignored


@PROPS
@given(st.one_of(
    st.none(),
    st.text(max_size=80),
    st.builds(lambda t, s, ps: f"{t}/{s}" + "".join(ps), st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=10),
              st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=10),
              st.lists(st.builds(lambda w, n, v: f"{w};{w}{n}={v}", st.sampled_from(["", " ", "\t"]),
                                 st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=6),
                                 st.one_of(st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=6),
                                           st.text(max_size=6).map(lambda s: f'"{s}"'))), max_size=3)),
))
@example('text/plain; q="a\r\nX-Injected: 1"')
@example("text/plain\x00")
@example('text/plain; q="\x7f"')
def test_clean_content_type_returns_no_control_characters(value: Optional[str]) -> None:
    cleaned = clean_content_type(value)
    if cleaned is None:
        return
    assert cleaned.isascii() and 0 < len(cleaned) <= 200
    # HTAB is the one control kept: RFC 9110 allows it as OWS and inside quoted-string
    assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", cleaned), repr(cleaned)
    main = cleaned.partition(";")[0]
    assert main == main.lower() and main.count("/") == 1
    assert clean_content_type(cleaned) == cleaned  # already clean: a fixed point


# --- JWT and upload decisions -------------------------------------------------------------------

def _decode(token: str, keys: Optional[list[bytes]] = None) -> Union[dict, HTTPError]:
    try:
        claims = auth.jwt_decode(keys if keys is not None else [b"other", KEY], token)
    except HTTPError as e:
        assert e.status == 401, e
        assert e.headers.get("WWW-Authenticate") == "Bearer"
        return e
    assert isinstance(claims, dict)
    return claims


@PROPS
@given(st.one_of(
    st.text(max_size=120),
    st.lists(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/.\u00e9\u0663 ",
                     max_size=30), min_size=1, max_size=5).map(".".join),
))
@example("a.b.c")
@example("\u0663.\u0663.\u0663")
@example("x" * 9000)
def test_jwt_decode_over_arbitrary_text_is_401(token: str) -> None:
    # without the key nothing can verify: every arbitrary token is refused
    assert isinstance(_decode(token), HTTPError)


NESTED = [b"[" * 5000, b"{\"a\":" * 1000, b"[" * 2500 + b"]" * 2500, b'{"a":' + b"[" * 2400 + b"]" * 2400 + b"}",
          b'{"alg":"HS256","x":' + b"[" * 2400 + b"]" * 2400 + b"}"]
json_junk = st.one_of(
    st.sampled_from(NESTED),
    st.sampled_from([b"", b"null", b"[]", b"1", b'"s"', b"{", b'{"alg":NaN}', b'{"a":Infinity}', b'{"a":1e999}',
                     b'{"a":' + b"9" * 5000 + b"}", b'{"a":-' + b"9" * 19 + b"}", b'{"a":1' + b"0" * 400 + b".5}",
                     b'{"a":"\\ud800"}', b'{"a":1}x', b"\xef\xbb\xbf{}", '{"a":1}'.encode("utf-16"),
                     '{"alg":"HS256"}'.encode("utf-32"), b'{"a":"\xff"}', b"\x00{}"]),
    st.binary(max_size=60),
)
jwt_headers = st.one_of(
    st.just(b'{"alg":"HS256","typ":"JWT"}'),
    st.builds(lambda alg: json.dumps({"alg": alg, "typ": "JWT"}).encode(),
              st.one_of(st.sampled_from(["none", "None", "HS512", "hs256", "HS256 ", "RS256", ""]), st.none(),
                        st.integers(), st.lists(st.just("HS256"), max_size=2))),
    json_junk,
)


@HEAVY
@given(jwt_headers, json_junk)
@example(b'{"alg":"HS256","typ":"JWT"}', b"[" * 5000)
@example(b"[" * 5000, b"{}")
@example(b'{"alg":"HS256","typ":"JWT"}', b'{"a":' + b"[" * 2400 + b"]" * 2400 + b"}")
def test_jwt_decode_with_valid_mac_over_hostile_json(header: bytes, payload: bytes) -> None:
    """The MAC verifies, so the JSON is parsed: 401 or a dict, never RecursionError/ValueError."""
    token = signed_token(header, payload)
    if len(token) > auth.MAX_TOKEN_BYTES:
        return  # refused by length before any parsing; covered by the arbitrary-text property
    result = _decode(token)
    if isinstance(result, dict):
        assert json.loads(header).get("alg") == "HS256"


@PROPS
@given(st.one_of(st.sampled_from(["none", "None", "NONE", "HS512", "HS384", "RS256", "ES256", "hs256", "HS256 ",
                                  " HS256", "HS256\x00", ""]),
                 st.text(max_size=8).filter(lambda s: s != "HS256"), st.none(), st.integers(), st.booleans()),
       st.booleans())
def test_jwt_alg_other_than_hs256_is_401_even_with_a_valid_mac(alg: object, with_typ: bool) -> None:
    header = {"alg": alg, "typ": "JWT"} if with_typ else {"alg": alg}
    token = signed_token(json.dumps(header).encode(), b'{"slot":"abc","exp":9999999999,"filesize":1}')
    result = _decode(token)
    assert isinstance(result, HTTPError), result


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10 ** 18) + 1, 10 ** 18 - 1),
                         st.floats(allow_nan=False, allow_infinity=False, min_value=-1e17, max_value=1e17),
                         st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)


@PROPS
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=8),
       st.binary(min_size=1, max_size=40))
def test_jwt_claims_round_trip_with_the_key_and_fail_without(claims: dict, other_key: bytes) -> None:
    token = auth.jwt_encode(KEY, claims)
    if len(token) > auth.MAX_TOKEN_BYTES:
        return
    assert _decode(token) == claims
    assert _decode(token, keys=[KEY]) == claims
    if other_key != KEY:
        assert isinstance(_decode(token, keys=[other_key]), HTTPError)
    header, payload, sig = token.split(".")
    tampered = f"{header}.{payload}.{'B' if sig[0] == 'A' else 'A'}{sig[1:]}"  # 6 whole bits of the MAC
    assert isinstance(_decode(tampered), HTTPError)


hostile_digits = st.one_of(number_texts, unicode_digits, st.just("9" * 4400), st.just("1" + "0" * 4400))
query_values = st.one_of(st.text(max_size=20), st.text(alphabet="0123456789abcdefABCDEF", max_size=64),
                         hostile_digits)
queries = st.dictionaries(st.one_of(st.sampled_from(["v", "v2", "v3", "token", "expires"]), st.text(max_size=4)),
                          query_values, max_size=5)
claim_values = st.one_of(json_scalars, st.sampled_from([True, False, -1, 0, 1, 10 ** 18 - 1, 1.5, -1e17, "5",
                                                         "abc", "file.txt", [], {}]))
jwt_claims = st.fixed_dictionaries({}, optional={
    "exp": st.one_of(claim_values, st.integers(0, 4 * 10 ** 9)),
    "slot": st.one_of(st.just("abc"), claim_values),
    "filename": st.one_of(st.just("file.txt"), claim_values),
    "filesize": st.one_of(st.integers(-5, 10 ** 12), claim_values),
    "expires": claim_values, "filetype": claim_values, "sub": claim_values,
})
authorizations = st.one_of(
    st.text(max_size=40),
    st.builds(lambda s, t: f"{s} {t}", st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", ""]),
              st.one_of(st.text(max_size=40), st.builds(lambda c: auth.jwt_encode(KEY, c), jwt_claims),
                        st.builds(lambda c: auth.jwt_encode(b"wrong", c), jwt_claims),
                        st.builds(signed_token, jwt_headers, json_junk).filter(lambda t: len(t) < 9000))),
)
UPLOAD_STATUSES = {400, 401, 403, 410, 411, 413}


@PROPS
@given(queries, authorizations, st.one_of(st.none(), st.text(alphabet=st.characters(max_codepoint=0xff),
                                                            max_size=30)),
       st.one_of(st.none(), st.integers(0, 10 ** 19 - 1)), st.sampled_from([0.0, 1.7e9, 4e9, 1e300]),
       st.sampled_from([[KEY], []]))
@example({"v3": "00", "expires": "\u0663" * 10}, "", None, 5, 0.0, [KEY])
@example({"v3": "00", "expires": "9" * 4400}, "", None, 5, 0.0, [KEY])
@example({"v": "00"}, "", None, None, 0.0, [KEY])
def test_authorize_upload_raises_only_http_errors(query: dict[str, str], authorization: str,
                                                  content_type: Optional[str], content_length: Optional[int],
                                                  now: float, jwt_keys: list[bytes]) -> None:
    facts = auth.RequestFacts(method="PUT", signed_path="abc/file.txt", full_path="/upload/abc/file.txt",
                              query=query, authorization=authorization, content_type=content_type,
                              content_length=content_length)
    try:
        grant = auth.authorize_upload([KEY], jwt_keys, facts, now)
    except HTTPError as e:
        assert e.status in UPLOAD_STATUSES, e
        return
    assert grant.protocol in ("v", "v2", "token", "v3", "jwt")
    if grant.protocol == "jwt":
        assert jwt_keys and isinstance(grant.size, int) and grant.size >= 0
        assert content_length is None or content_length == grant.size


@PROPS
@given(st.integers(0, 10 ** 11), st.sampled_from([1.7e9, 0.0]), st.text(alphabet="0123456789abcdef", min_size=1,
                                                                       max_size=64))
def test_v3_verifies_exactly_its_own_mac(expires: int, now: float, garbage: str) -> None:
    """The can-fail side of the property above: a correct v3 signature is granted, others are not."""
    good = auth.sign_query("v3", KEY, method="PUT", signed_path="abc/file.txt", full_path="/upload/abc/file.txt",
                           expires=expires)
    facts = auth.RequestFacts(method="PUT", signed_path="abc/file.txt", full_path="/upload/abc/file.txt",
                              query=good, content_length=5)
    if expires >= now:
        assert auth.authorize_upload([KEY], [], facts, now).protocol == "v3"
    else:
        with pytest.raises(HTTPError) as e:
            auth.authorize_upload([KEY], [], facts, now)
        assert e.value.status == 410
    assume(garbage != good["v3"])
    bad = auth.RequestFacts(method="PUT", signed_path="abc/file.txt", full_path="/upload/abc/file.txt",
                            query={**good, "v3": garbage}, content_length=5)
    with pytest.raises(HTTPError) as e:
        auth.authorize_upload([KEY], [], bad, now)
    assert e.value.status == 403


# --- request target -> signed path --------------------------------------------------------------

SAFE_SEGMENTS = [b"a", b"file.txt", b"a..b", b"a.", b"%c3%a4", b"\xc3\xa4", b"~", b"x" * 255, b"%41" * 85, b"+",
                 b"%20", b"a;b", b"a%3fb", b"%23", b"%25", b"\xef\xbc\x8e\xef\xbc\x8e", b"-"]
HOSTILE_SEGMENTS = [b".", b"..", b"%2e", b"%2E%2e", b".%2e", b"%2e.", b"%2f", b"%2F", b"a%2fb", b"%5c", b"%5C",
                    b"\\", b"a\\b", b"%00", b"a%00", b"%0a", b"%0D", b"%7f", b"%09", b"%c0%ae%c0%ae", b"%ff",
                    b"\xff", b"\xc3", b"", b".hidden", b"%2ehidden", b".hmacfs", b"x" * 256, b"%41" * 256, b"%",
                    b"%g1", b"a%", b"%%32%65", b"%e2%80%a8", b"a%e2%80%a9", b"%c2%85", b"%c2%9b"]


@st.composite
def hostile_targets(draw: st.DrawFn) -> bytes:
    """Plausible upload targets: safe segments, often with one hostile segment slipped in."""
    segs = draw(st.lists(st.one_of(st.sampled_from(SAFE_SEGMENTS),
                                   st.text(alphabet="abcXYZ019-_.~", min_size=1, max_size=8)
                                   .filter(lambda t: not t.startswith(".")).map(str.encode)),
                         min_size=1, max_size=6))
    if draw(st.integers(0, 99)) < 70:
        hostile = draw(st.one_of(st.sampled_from(HOSTILE_SEGMENTS), st.binary(max_size=6)))
        segs.insert(draw(st.integers(0, len(segs))), hostile)
    prefix = draw(st.sampled_from([b"/upload/", b"/upload/", b"/upload/", b"/upload", b"/UPLOAD/",
                                   b"http://h/upload/", b"HTTPS://h:1/upload/", b"//upload/", b"/"]))
    query = draw(st.sampled_from([b"", b"?v=1", b"?v3=ab&expires=1", b"?a=%ff&a=2&=&&", b"#frag", b"?%zz=%"]))
    return prefix + b"/".join(segs) + query


@PROPS
@given(st.one_of(st.binary(max_size=120), hostile_targets()), st.sampled_from([paths.MAX_PATH_BYTES, 300, 20]))
def test_target_to_signed_path_raises_only_http_errors(target: bytes, max_bytes: int) -> None:
    parsed = paths.split_target(target)  # no HTTPError either: anything is some (path, query)
    assert b"?" not in parsed.raw_path and b"#" not in parsed.raw_path
    for name, value in parsed.query.items():  # well-formed text (no lone surrogates)
        name.encode("utf-8")
        value.encode("utf-8")
    try:
        path = paths.signed_path(parsed.raw_path, P, max_bytes)
    except HTTPError as e:
        assert e.status in (400, 404, 414), e
        return
    segments = path.split("/")
    assert 0 < len(segments) <= paths.MAX_DEPTH
    assert len(path.encode("utf-8")) <= max_bytes
    for seg in segments:
        assert seg and not seg.startswith(".")  # no "", ".", ".." or hidden names
        assert "\\" not in seg and "\x00" not in seg
        # no C0/C1 control or DEL, no line/paragraph separator (a name is printed in logs and listings)
        assert not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in seg), repr(seg)
        assert len(seg.encode("utf-8")) <= paths.MAX_SEGMENT_BYTES
    # canonical: the path, re-encoded, is the path again (one name, one spelling)
    assert paths.signed_path(P.encode() + quote(path, safe="/").encode(), P, max_bytes) == path
    if target.startswith(b"/"):  # absolute-form names the same resource as origin-form
        assert paths.split_target(b"http://example.org" + target).raw_path == parsed.raw_path


def test_a_request_line_longer_than_the_head_budget_is_431() -> None:
    """maxheaderbytes bounds the request line too, even when no header line follows."""
    with pytest.raises(HTTPError) as e:
        read_head(io.BytesIO(b"GET /aaaaaaaaaaaaaaaaaaaaa HTTP/1.0\r\n\r\n"), 10)
    assert e.value.status == 431


# === Hostile input, part 2 (security issue): the store, JWT claims, config, resumable headers, clamd ===

# --- a signed path, joined to a store root, stays inside it ------------------------------------

STORE_ROOT = "/srv/hmacfs-store"
INTERNAL_DIR = ".hmacfs"
# Spellings of ".", "/" and "\" that some decoder somewhere turns into the real thing: double
# encoding, overlong UTF-8 (3- and 4-byte), IIS %u, fullwidth and compatibility forms, NUL tricks.
TRAVERSAL_PIECES = [
    b".", b"..", b"...", b"%2e", b"%2E", b"%2e%2e", b".%2e", b"%2e.", b"%252e", b"%252e%252e", b"%25%32%65",
    b"%2541", b"%25c3%25a4", b"%2561%2562",
    b"%c0%ae", b"%C0%AE", b"%e0%80%ae", b"%f0%80%80%ae", b"%c0%2e", b"%c1%9c", b"%c0%af", b"%e0%80%af",
    b"%u002e", b"%u2215", b"%uff0e", b"\xef\xbc\x8e", b"%ef%bc%8e", b"\xe2\x80\xa4", b"%e2%80%a4", b"\xef\xb9\x92",
    b"/", b"//", b"%2f", b"%2F", b"%252f", b"\\", b"%5c", b"%5C", b"%255c", b"%e2%88%95", b"%ef%bc%8f",
    b"%00", b"\x00", b"%0a", b"%0d", b"%09", b"%7f", b"%c2%85", b"%e2%80%a8", b".hmacfs", b"%2ehmacfs",
    b"hmacfs", b"uploads", b".uploads", b"meta.sqlite3", b"tmp", b"~", b"a", b"f.txt", b"%", b"%%", b"%g",
    b"%f", b";", b"?", b"#", b"%3f", b"%23", b"\xc3\xa4", b"%c3%a4", b"\xff", b"\xc3", b"%ff", b"%c3",
]
PREFIXES = ["/upload/", "/", "/a/b/"]


@st.composite
def traversal_targets(draw: st.DrawFn) -> tuple[bytes, str]:
    """(request target, URL prefix): pieces of traversal spellings glued together, under the
    prefix or not, in origin or absolute form."""
    prefix = draw(st.sampled_from(PREFIXES))
    body = b"".join(draw(st.lists(st.one_of(st.sampled_from(TRAVERSAL_PIECES), st.binary(max_size=3)),
                                  min_size=1, max_size=14)))
    lead = draw(st.sampled_from([prefix.encode(), prefix.encode(), prefix.encode() + b".hmacfs/", b"",
                                 b"/.hmacfs/", b"http://h" + prefix.encode(), prefix.encode().upper()]))
    return lead + body, prefix


def _inside_store(path: str) -> None:
    """The store's view: `path` joined to the root names an entry strictly below it, outside
    `.hmacfs/`, through no hidden directory, and exactly as spelled (nothing for a later
    normalisation to collapse)."""
    assert not os.path.isabs(path) and "\x00" not in path
    joined = os.path.join(STORE_ROOT, path)
    normal = os.path.normpath(joined)
    assert normal == joined, (path, normal)            # no "", ".", ".." or "//" left to collapse
    assert os.path.commonpath([STORE_ROOT, normal]) == STORE_ROOT and normal != STORE_ROOT
    parts = os.path.relpath(normal, STORE_ROOT).split(os.sep)
    assert parts[0] != INTERNAL_DIR, path
    assert not any(part.startswith(".") for part in parts), path


@PROPS
@given(st.one_of(traversal_targets(),
                 st.tuples(st.binary(max_size=80), st.sampled_from(PREFIXES)),
                 st.tuples(hostile_targets(), st.just(P))))
@example((b"/upload/%2e%2e/%2e%2e/etc/passwd", P))
@example((b"/upload/..%2f..%2fetc", P))
@example((b"/upload/%c0%ae%c0%ae/x", P))
@example((b"/upload/%252e%252e/x", P))
@example((b"/upload/%2561/x", P))
@example((b"/%2ehmacfs/meta.sqlite3", "/"))
@example((b"/.hmacfs/health", "/"))
@example((b"/upload/a\\..\\..\\x", P))
@example((b"/upload/a%00.txt", P))
@example((b"http://h/upload/%2e%2e%5c%2e%2e", P))
def test_a_signed_path_never_leaves_the_store_root(case: tuple[bytes, str]) -> None:
    """Whatever the target, a signed path (what the file handlers join to the storage root)
    names a file strictly below the root, never in `.hmacfs/` (metadata, temp files, uploads in
    progress) nor behind any dot-name; and it is the path's bytes decoded exactly once, so a
    doubly-encoded `%252e` is the literal name `%2e`, never a dot segment."""
    target, prefix = case
    raw_path = paths.split_target(target).raw_path
    try:
        path = paths.signed_path(raw_path, prefix)
    except HTTPError as e:
        assert e.status in (400, 404, 414), e
        return
    _inside_store(path)
    assert raw_path.startswith(prefix.encode())
    assert path == unquote_to_bytes(raw_path[len(prefix):]).decode("utf-8")  # one decoding, no more


@PROPS
@given(st.lists(st.one_of(st.sampled_from([s for s in SAFE_SEGMENTS if len(s) < 200]),
                          st.text(alphabet="abcXYZ019-_~ \u00e4\u4e2d\U0001f600", min_size=1, max_size=8)
                          .filter(lambda t: not t.startswith(".")).map(lambda t: quote(t).encode())),
                min_size=1, max_size=8),
       st.sampled_from(PREFIXES))
def test_plain_names_are_accepted_under_any_prefix(segments: list[bytes], prefix: str) -> None:
    """The other side: ordinary names are served, so the property above cannot pass by refusing all."""
    path = paths.signed_path(prefix.encode() + b"/".join(segments), prefix)
    _inside_store(path)
    assert path.count("/") == len(segments) - 1


def test_the_store_check_can_fail() -> None:
    """`_inside_store` itself refuses what a broken signed_path could return."""
    for bad in ["../x", "a/../../x", ".hmacfs/meta.sqlite3", "a/.git/config", "/etc/passwd", "a//b", "a/./b", ""]:
        with pytest.raises(AssertionError):
            _inside_store(bad)


# --- Range sets ---------------------------------------------------------------------------------

range_headers = st.one_of(
    st.text(max_size=60),
    st.builds(lambda unit, specs, sep: f"{unit}=" + sep.join(specs),
              st.sampled_from(["bytes", "BYTES", " bytes ", "bytes ", "items", ""]),
              st.lists(st.one_of(
                  st.builds(lambda a, b: f"{a}-{b}", st.one_of(st.integers(0, 2000).map(str), range_parts),
                            st.one_of(st.integers(0, 2000).map(str), range_parts, st.just(""))),
                  st.integers(0, 3000).map(lambda n: f"-{n}"), range_parts), min_size=1, max_size=40),
              st.sampled_from([",", ", ", " ,\t", ",,"])),
)


@PROPS
@given(range_headers, sizes)
@example("bytes=0-0," * 200 + "0-0", 10)
@example("bytes=" + ",".join(f"{i * 100}-{i * 100}" for i in range(17)), 2000)
@example("bytes=0-,0-,0-", 1000)
@example("bytes=-" + "9" * 19 + ",0-1", 10)
def test_range_sets_never_amplify(header: str, size: int) -> None:
    """Any Range header: None (whole file), 416, or sorted disjoint in-file spans, at most
    MAX_RANGES, adding up to no more than the file (a multipart body is never larger than the
    file plus the parts' headers: CVE-2011-3192); and it agrees with the single-range parser."""
    try:
        spans = parse_ranges(header, size)
    except HTTPError as e:
        assert e.status == 416 and e.headers.get("Content-Range") == f"bytes */{size}", e
        return
    single = _range_of(header, size)
    if spans is None:  # ignored, or too many parts / too much overlap (only possible with several specs)
        assert single is None, (single, header)
        return
    assert 1 <= len(spans) <= MAX_RANGES
    assert all(type(a) is int and type(b) is int and 0 <= a <= b < size for a, b in spans)
    assert all(spans[i][1] + 1 < spans[i + 1][0] for i in range(len(spans) - 1)), spans
    assert sum(b - a + 1 for a, b in spans) <= size
    if isinstance(single, tuple):  # one satisfiable range: both parsers say the same
        assert spans == [single]


@PROPS
@given(st.lists(st.tuples(st.integers(0, 500), st.integers(0, 50)), min_size=1, max_size=8),
       st.sampled_from(["x-1", "1-x", "\u00b2-3", "-", "5-2", "", "0x1-2", "1 2-3", "+1-2"]),
       st.integers(0, 8), st.integers(1, 1000))
def test_one_malformed_spec_spoils_the_whole_set(specs: list[tuple[int, int]], bad: str, at: int,
                                                  size: int) -> None:
    """RFC 9110 14.2: a Range that is not a valid ranges-specifier is ignored as a whole, never
    half-honoured (two readers picking different subsets of one header is a cache-poisoning
    tool)."""
    items = [f"{a}-{a + n}" for a, n in specs]
    items.insert(min(at, len(items)), bad)
    assert parse_ranges("bytes=" + ",".join(items), size) is None


# --- JWT: any claims, re-signed ----------------------------------------------------------------

def _claims_within_bounds(value: object) -> bool:
    """The decoder's documented number rule, from its docstring: integers of at most 18 digits,
    finite floats below 1e18 in magnitude, no NaN or Infinity, anywhere in the document."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, int):
        return len(str(abs(value))) <= auth.MAX_CLAIM_DIGITS
    if isinstance(value, float):
        return math.isfinite(value) and abs(value) < 10.0 ** auth.MAX_CLAIM_DIGITS
    if isinstance(value, list):
        return all(_claims_within_bounds(v) for v in value)
    return all(_claims_within_bounds(v) for v in value.values())  # type: ignore[union-attr]


any_json_scalars = st.one_of(st.none(), st.booleans(), st.text(max_size=10),
                             st.integers(-(10 ** 25), 10 ** 25), st.integers(-(10 ** 19), 10 ** 19),
                             st.floats(), st.sampled_from([10 ** 18 - 1, 10 ** 18, -(10 ** 18), 1e18, 9.99e17,
                                                           -0.0, 5e-324, 1.7976931348623157e308]))
any_json = st.recursive(any_json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=14)


@PROPS
@given(st.dictionaries(st.text(max_size=10), any_json, max_size=8), st.sampled_from(["", " ", "\t", "  "]))
@example({"exp": 10 ** 18}, "")
@example({"exp": float("nan")}, "")
@example({"a": [[[1e300]]]}, "")
def test_jwt_any_claims_re_signed_are_the_claims_or_401(claims: dict, pad: str) -> None:
    """A token with a valid MAC and *any* JSON claims: exactly those claims when every number is
    within the decoder's bounds, else 401 (never an OverflowError or a float('inf') expiry)."""
    header = b64url(b'{"alg":"HS256","typ":"JWT"}')
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())  # NaN/Infinity as JSON's extension
    token = f"{header}.{payload}"
    token += "." + b64url(hmac.new(KEY, token.encode(), hashlib.sha256).digest())
    if len(token) > auth.MAX_TOKEN_BYTES:
        return
    result = _decode(pad + token + pad)
    if _claims_within_bounds(claims):
        assert result == claims
    else:
        assert isinstance(result, HTTPError), result


b64url_segments = st.one_of(st.binary(max_size=40).map(b64url),
                            st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                                    min_size=1, max_size=45))
GOOD_JWT_HEADER = b64url(b'{"alg":"HS256","typ":"JWT"}')


@PROPS
@given(st.one_of(st.just(GOOD_JWT_HEADER), b64url_segments),
       st.one_of(st.builds(lambda c: b64url(json.dumps(c).encode()), jwt_claims), b64url_segments),
       b64url_segments)
def test_jwt_of_well_shaped_segments_without_the_key_is_401(header: str, payload: str, sig: str) -> None:
    """Tokens with the right shape (three base64url segments, any length, `len % 4 == 1`
    included), often a good header and plausible claims, but no valid MAC: always 401."""
    assume(sig != b64url(hmac.new(KEY, f"{header}.{payload}".encode(), hashlib.sha256).digest()))
    assert isinstance(_decode(f"{header}.{payload}.{sig}"), HTTPError)


# --- config: any TOML-like document ------------------------------------------------------------

def _known_names(section: str) -> list[str]:
    return sorted({name for (sect, name) in config_mod.INDEX if sect == section})


TOML_STRINGS = ["", "0", "-1", "1.5", "9" * 400, "9" * 400 + "PB", "9" * 400 + "s", "1e400", "100MB", "1.5GiB", "5 KB",
                "64KiB", "1h30m", "30d", "2Y", "1ns", "0.5s", "nan", "inf", "-5s", "127.0.0.1:8080", "[::1]:80",
                "::1", "[::1", "localhost:1", ":0", "99999", "8080", "true", "yes", "off", "a\x00b", "\u00b2",
                "\u0663s", "\uff11MB", "/tmp/x", "10.0.0.0/8", "fe80::/10", "::/0", "300.1.1.1/8", "HS256",
                "none", "debug", "INFO", "trace", "jwt", "firstsegment", "always", "local", "s3", "changeme",
                "*", "https://chat.example", "/upload/", "up load", "\U0001f4c1", "a,b,,c"]
toml_scalars = st.one_of(
    st.sampled_from(TOML_STRINGS), st.text(max_size=16),
    st.integers(-(2 ** 63), 2 ** 63 - 1), st.integers(-3, 70000),
    st.floats(), st.booleans(),
    st.datetimes(), st.dates(), st.times(),  # TOML has them, tomllib returns them
)
toml_values = st.one_of(toml_scalars, st.lists(toml_scalars, max_size=4),
                        st.dictionaries(st.text(max_size=6), toml_scalars, max_size=3))
LISTENS = ["127.0.0.1:8080", "8080", ":0", "[::1]:80", "localhost:1", "0.0.0.0:65535"]
SECRET_FILES = ("missing", "nul", "directory", "not-utf8", "good", "empty")


ENUMERATED = {"loglevel": ["debug", "INFO", "warn", "error"], "jwtalgorithm": ["HS256", "hs256"],
              "identity": ["jwt", "firstsegment"], "interimresponses": ["always", "direct", "never"],
              "backend": ["local"], "urlprefix": ["/upload/", "/", "up", "/a/b"], "listenport": LISTENS,
              "metricsport": LISTENS, "bindip": ["", "127.0.0.1", "::1"]}
CIDR_KEYS = frozenset({"trustedproxies", "allowips", "denyips"})


def valid_values(key: config_mod.Key) -> st.SearchStrategy:
    """A value of the right kind for `key`, so documents often get past every check and reach
    the derived values and the check-config rendering (wholly random values seldom do)."""
    if key.name in ENUMERATED:
        return st.sampled_from(ENUMERATED[key.name])
    if key.name in CIDR_KEYS:
        return st.lists(st.sampled_from(["10.0.0.0/8", "127.0.0.1", "::1", "fd00::/8", "192.0.2.1/32"]), max_size=3)
    number = st.one_of(st.integers(1, 10 ** 6), st.integers(1, 10 ** 13))
    return {
        "bool": st.one_of(st.booleans(), st.sampled_from(["true", "off", "yes"])),
        "int": st.integers(1, 100_000),
        "size": st.one_of(number, st.builds(lambda n, u: f"{n}{u}", st.integers(0, 5000),
                                            st.sampled_from(["", "B", "KB", "kib", "MB", "GiB", "T", " KB"])),
                          st.sampled_from(["1.5GiB", "0.5KB", "1.25MB"])),
        "optsize": st.one_of(st.just(""), number, st.sampled_from(["5GB", "100KiB"])),
        "duration": st.one_of(number, st.floats(0.001, 10 ** 7), st.sampled_from(["1h30m", "30s", "0.5s", "2Y", "4w",
                                                                               "90m", "1d12h", "250ms"])),
        "list": st.lists(st.text(alphabet="abc*:/.", min_size=1, max_size=8), max_size=3),
        "listen": st.sampled_from(LISTENS),
        "unixsocket": st.sampled_from([False, "/tmp/hmacfs-test.sock"]),
        "secret": st.text(min_size=1, max_size=20),
    }.get(key.kind, st.text(max_size=12))


@st.composite
def config_documents(draw: st.DrawFn) -> dict:
    """A parsed TOML document: known sections (any case) with known keys and aliases (and some
    unknown ones), values of the right kind or TOML-typed hostile ones, flat top-level keys; a
    secret is usually set so validation reaches the cross-key rules."""
    doc: dict = {}

    def value_for(section: str, name: str) -> object:
        key = config_mod.INDEX.get((section, config_mod.norm(name)))
        if key is not None and draw(st.integers(0, 3)) < 3:
            return draw(valid_values(key))
        return draw(toml_values)

    for section in draw(st.lists(st.sampled_from([*config_mod.SECTIONS, "logging", "networkresilience",
                                                  "Server", "SECURITY", "nosuchsection"]), max_size=6,
                                 unique=True)):
        base = config_mod.norm(section)
        names = draw(st.lists(st.one_of(st.sampled_from(_known_names(base) or ["key"]), st.text(max_size=8)),
                              max_size=6, unique=True))
        doc[section] = {name: value_for(base, name) for name in names}
    for name in draw(st.lists(st.sampled_from(_known_names("server")), max_size=3, unique=True)):
        doc.setdefault(name, value_for("server", name))
    if draw(st.integers(0, 9)) < 8:
        security = doc.setdefault("security", {})
        if isinstance(security, dict):
            security.setdefault("secret", "a-long-random-test-secret")
    if draw(st.integers(0, 9)) < 2:
        security = doc.setdefault("security", {})
        if isinstance(security, dict):
            security.pop("secret", None)
            security["secretfile"] = draw(st.sampled_from(SECRET_FILES))  # replaced by a real path below
    return doc


@pytest.fixture(scope="module")
def secret_files(tmp_path_factory) -> dict[str, str]:
    """Paths for `secretfile`: missing, with a NUL, a directory, not UTF-8, good, empty."""
    d = tmp_path_factory.mktemp("secretfiles")
    (d / "not-utf8").write_bytes(b"\xff\xfe secret")
    (d / "good").write_text("a-long-random-file-secret\n")
    (d / "empty").write_text("")
    return {"missing": str(d / "missing"), "nul": str(d / "a\x00b"), "directory": str(d),
            "not-utf8": str(d / "not-utf8"), "good": str(d / "good"), "empty": str(d / "empty")}


def _durations_and_sizes(cfg: config_mod.Config) -> list[tuple[str, object]]:
    return [(f"[{k.section}] {k.name}", getattr(cfg.sections[k.section], k.name)) for k in config_mod.SCHEMA
            if k.kind in ("duration", "size", "optsize")]


@HEAVY
@given(config_documents())
@example({"uploads": {"maxuploadsize": "9" * 400 + "PB"}, "security": {"secret": "a-long-random-test-secret"}})
@example({"security": {"secretfile": "nul"}})
@example({"security": {"secretfile": "not-utf8"}})
@example({"timeouts": {"readheadertimeout": float("nan")}, "security": {"secret": "a-long-random-test-secret"}})
@example({"timeouts": {"readtimeout": "9" * 400 + "s"}, "security": {"secret": "a-long-random-test-secret"}})
@example({"timeouts": {"idletimeout": "1ns"}, "security": {"secret": "a-long-random-test-secret"}})
def test_config_from_any_document_is_a_config_or_a_config_error(secret_files: dict[str, str], doc: dict) -> None:
    """`from_dict` over any document of the known shape: a Config or a ConfigError naming the
    problem, never another exception (which `hmacfs` would print as a traceback at start, and a
    SIGHUP reload would log as "config reload failed" with no key named). An accepted Config
    has non-negative, non-NaN limits (a NaN readheadertimeout would mean "never cut a silent
    client": `now > nan` is always false), and `check-config`'s rendering of it (secrets masked)
    reads back as the same settings."""
    security = doc.get("security")
    if isinstance(security, dict) and str(security.get("secretfile")) in secret_files:
        security["secretfile"] = secret_files[security["secretfile"]]
    try:
        cfg = config_mod.from_dict(doc, environ={})
    except ConfigError as e:
        assert str(e)
        return
    assert cfg.secrets and all(isinstance(s, bytes) for s in cfg.secrets)
    for name, value in _durations_and_sizes(cfg):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (name, value)
        assert value == value and value >= 0, (name, value)  # value == value: not NaN
    cfg.listen, cfg.metrics_listen, cfg.urlprefix  # noqa: B018 - derived values must not raise
    rendered = config_mod.render_effective(cfg)
    masked = {k.name for k in config_mod.SCHEMA if k.secret}
    reread = tomllib.loads("\n".join(line for line in rendered.splitlines()
                                     if line.partition(" = ")[0] not in masked))
    for key in config_mod.SCHEMA:  # the masked values, as they were
        if key.secret and not key.compat:
            reread[key.section][key.name] = getattr(cfg.sections[key.section], key.name)
    again = config_mod.from_dict(reread, environ={})
    for section in config_mod.SECTIONS:
        mine = {k.name: getattr(cfg.sections[section], k.name) for k in config_mod.SCHEMA
                if k.section == section and not k.secret and not k.compat}
        theirs = {name: getattr(again.sections[section], name) for name in mine}
        assert theirs == mine, section


# --- tus / IETF upload headers through the real head parser -------------------------------------

UPLOAD_FIELDS = [b"Upload-Metadata", b"Upload-Checksum", b"Upload-Offset", b"Upload-Length", b"Upload-Complete",
                 b"Upload-Incomplete", b"Upload-Draft-Interop-Version", b"Tus-Resumable"]
metadata_like = st.builds(
    lambda pairs, sep: sep.join(pairs),
    st.lists(st.one_of(
        st.builds(lambda k, v: k + b" " + v, st.sampled_from([b"filename", b"filetype", b"a", b"\xc3\xa4", b"k\x80"]),
                  st.one_of(st.binary(max_size=12).map(lambda b: base64.b64encode(b)), st.binary(max_size=8))),
        st.binary(max_size=10)), max_size=5),
    st.sampled_from([b",", b", ", b" , ", b",\t"]))


@PROPS
@given(st.lists(st.tuples(st.sampled_from(UPLOAD_FIELDS), st.one_of(metadata_like, st.binary(max_size=30),
                                                                    header_values)), min_size=1, max_size=5))
@example([(b"Upload-Metadata", b"filename ZmlsZQ==\x85")])
@example([(b"Upload-Metadata", b"filename\tZmlsZQ==")])
@example([(b"Upload-Metadata", b"a YQ==,\xa0b")])
@example([(b"Upload-Checksum", b"sha1 qvTGHdzF6KLavt4PO0gs2a6pQ00=\xa0")])
def test_upload_headers_from_any_bytes_through_the_head_parser(fields: list[tuple[bytes, bytes]]) -> None:
    """Arbitrary bytes in the resumable-upload fields, read by the real head parser (which keeps
    obs-text as latin-1): the head is refused with an HTTPError, or every parser answers its
    documented type. Upload-Metadata that parses is plain ASCII with no control character,
    because tus HEAD sends the stored value back verbatim as a response header."""
    assume(all(b"\n" not in v and b"\r" not in v for _, v in fields))
    wire = b"POST /upload/a/b HTTP/1.1\r\nHost: h\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"
    head = parse(wire)
    if not isinstance(head, RequestHead):
        return
    h = head.headers
    for name in ("upload-offset", "upload-length"):
        n = uploadheaders.parse_count(h.get(name))
        assert n is None or (type(n) is int and 0 <= n < 10 ** 15)
    for name in ("upload-complete", "upload-incomplete"):
        assert uploadheaders.parse_sf_boolean(h.get(name)) in (None, True, False)
    version = uploadheaders.parse_sf_integer(h.get("upload-draft-interop-version"))
    assert version is None or (type(version) is int and version >= 0)
    raw = h.get("upload-metadata", "").strip()  # what tus.py stores and echoes
    meta = uploadheaders.parse_upload_metadata(raw)
    if meta:
        assert raw.isascii() and not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", raw), repr(raw)  # HTAB is OWS
        assert all(k.isascii() and k.isprintable() and " " not in k and "," not in k for k in meta)
    try:
        checksum = uploadheaders.parse_checksum(h.get("upload-checksum"))
    except uploadheaders.ChecksumError:
        return
    if checksum is not None:
        algorithm, digest = checksum
        assert algorithm in uploadheaders.CHECKSUM_ALGORITHMS
        assert len(digest) == hashlib.new(algorithm).digest_size


# --- clamd replies ------------------------------------------------------------------------------

signature_names = st.one_of(
    st.sampled_from(["Eicar-Test-Signature", "Win.Test.EICAR_HDB-1", "Heuristics.Phishing.Email.SpoofedDomain",
                     "YARA.rule_name.UNOFFICIAL", "Sanesecurity.Foxhole.Zip_fs117.UNOFFICIAL", "a", "OK",
                     "Eicar Test FOUND"]),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=40),
)
terminators = st.sampled_from([b"\0", b"\n"])
clamd_junk = st.sampled_from([
    b"", b"\0", b"\n", b"stream: OK", b"stream:OK\0", b"stream:  OK\0", b"stream: ok\0", b"stream: OK \0",
    b"stream: OKAY\0", b"stream: OK\r\n", b"Stream: OK\0", b" stream: OK\0", b"stream: FOUND\0", b"stream:  FOUND\0",
    b"stream: \x00 FOUND\0", b"stream: x\nFOUND\0", b"stream: OK\0stream: Eicar FOUND\0",
    b"stream: Eicar FOUND\0stream: OK\0", b"stream: OK\nstream: OK\n",
    b"INSTREAM size limit exceeded. ERROR\0", b"stream: Can't allocate memory ERROR\0",
    b"stream: lstat() failed: No such file or directory. ERROR\0", b"UNKNOWN COMMAND\0", b"PONG\0",
    b"ClamAV 1.0.5/27000/Mon Jan  1 00:00:00 2024\0", b"stream: Eicar FOUND FOUND\0", b"stream: \x1b[2J FOUND\0",
    b"stream: Eicar\xe2\x80\xa8x FOUND\0", b"stream: \xff\xfe FOUND\0", b"stream: OK" + b"\0" * 3,
])


def _clamd_reply(reply: bytes) -> Union[object, str]:
    """parse_scan_reply's answer: its ScanResult, or "error" for ClamdError (nothing else may escape)."""
    try:
        result = clamav.parse_scan_reply(reply)
    except clamav.ClamdError:
        return "error"
    assert isinstance(result, clamav.ScanResult)
    return result


@PROPS
@given(st.one_of(st.binary(max_size=60), clamd_junk,
                 st.builds(lambda s, t: b"stream: " + s.encode("utf-8", "surrogatepass") + b" FOUND" + t,
                           st.text(max_size=20), terminators),
                 st.builds(lambda r, n: r[:n], clamd_junk, st.integers(0, 40)),
                 st.builds(lambda a, b: a + b, clamd_junk, st.binary(max_size=8))))
@example(b"stream: OK\0")
@example(b"stream: Eicar-Test-Signature FOUND\0")
def test_clamd_reply_is_clean_only_when_it_says_exactly_ok(reply: bytes) -> None:
    """Any bytes from the clamd socket: a ScanResult or ClamdError, never another exception, and
    fail-closed: a file is clean only if clamd said exactly `stream: OK` and ended its reply (a
    reply without its NUL or newline was cut short: clamd died while writing it).
    An infected verdict carries a non-blank printable signature (it goes into the 422 body and a
    log line) that clamd really sent between `stream: ` and ` FOUND`."""
    result = _clamd_reply(reply)
    if result == "error":
        return
    body = reply.rstrip(b"\0\n")
    if not result.infected:  # type: ignore[union-attr]
        assert body == b"stream: OK" and len(reply) > len(body), reply
        assert result.signature is None  # type: ignore[union-attr]
        return
    signature = result.signature  # type: ignore[union-attr]
    assert isinstance(signature, str) and signature.strip() and signature.isprintable(), repr(signature)
    assert body.startswith(b"stream: ") and body.endswith(b" FOUND"), reply
    assert b"\0" not in body and b"\n" not in body
    assert signature == body[len(b"stream: "):-len(b" FOUND")].decode("utf-8", "replace")


@PROPS
@given(signature_names, terminators)
def test_clamd_found_reply_names_its_signature(name: str, end: bytes) -> None:
    """The verdicts clamd really sends (NUL-terminated for z-commands, newline for n-commands)."""
    assert _clamd_reply(b"stream: " + name.encode() + b" FOUND" + end) == clamav.ScanResult(True, name)
    assert _clamd_reply(b"stream: OK" + end) == clamav.ScanResult(False, None)


@PROPS
@given(signature_names, terminators, st.data())
def test_clamd_reply_cut_short_is_never_clean(name: str, end: bytes, data: st.DataObject) -> None:
    """A FOUND reply cut anywhere (clamd killed mid-reply): an error or the same verdict, never
    clean; a reply carrying two verdicts is an error, whatever their order."""
    reply = b"stream: " + name.encode() + b" FOUND" + end
    cut = reply[:data.draw(st.integers(0, len(reply)))]
    result = _clamd_reply(cut)
    assert result == "error" or result.infected, (cut, result)  # type: ignore[union-attr]
    assert _clamd_reply(b"stream: OK" + end + reply) == "error"
    assert _clamd_reply(reply + b"stream: OK" + end) == "error"
