"""The resumable-upload header parsers (hmacfs/http/uploadheaders.py), case by case and by property.

Why: every value these parsers read comes straight from a client (tus and IETF resumable-upload
requests), and the handlers answer 400 on None. So each parser must (1) give the documented
value for what the protocols allow, (2) answer None, never a wrong value, for near misses a
sloppy parser would accept (Unicode digits, signs, hex, 16+ digits, non-canonical base64,
duplicate keys), and (3) raise nothing at all on hostile text, except parse_checksum, whose
ChecksumError is its documented "400" answer. The last properties run the values through the
real request-head reader fed one byte (or a random number of bytes) per read, as a slow
client's socket delivers them, and check the parsers see the same thing as when fed whole.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import re
from typing import Optional, Union

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hmacfs.errors import HTTPError
from hmacfs.http.head import RequestHead, read_head
from hmacfs.http.uploadheaders import (
    CHECKSUM_ALGORITHMS,
    MAX_METADATA_PAIRS,
    ChecksumError,
    is_media_type,
    metadata_text,
    new_hash,
    parse_checksum,
    parse_count,
    parse_sf_boolean,
    parse_sf_integer,
    parse_upload_metadata,
)

SCALE = int(os.environ.get("HMACFS_PROPERTY_SCALE", "1"))
PROPS = settings(max_examples=200 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAVY = settings(max_examples=100 * SCALE, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KEY_CHARS = "!#$%&'*+.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-"
OCTET = "application/offset+octet-stream"
PARTIAL = "application/partial-upload"
DIGEST_SIZES = {"md5": 16, "sha1": 20, "sha256": 32}
ASCII_COUNT = re.compile(r"[0-9]{1,15}", re.ASCII)  # the oracle for parse_count / sf-integers


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- parse_count ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("0", 0), ("1", 1), ("007", 7), ("123456789012345", 123456789012345), ("999999999999999", 10**15 - 1),
    (" 42", 42), ("42 ", 42), ("\t42\t", 42), (" \t 5 \t ", 5),
])
def test_parse_count_accepts_ascii_digits_with_ows(text: str, expected: int) -> None:
    """Upload-Offset/Upload-Length are plain ASCII digits; OWS around them is what HTTP allows."""
    assert parse_count(text) == expected


@pytest.mark.parametrize("text", [
    None, "", " ", "\t", "-1", "+1", "-0", "0x10", "1e3", "1.0", "1_000", "1 000", "1,000", "12a", "a12",
    "1234567890123456",  # 16 digits: beyond RFC 8941 and any file size
    "9" * 5000,          # int() would refuse this with a ValueError (CVE-2020-10735 limit)
    "\uff11\uff12",      # fullwidth digits: str.isdigit() says yes, the wire says no
    "\u0661\u0662",      # Arabic-Indic digits
    "\u00b2",            # superscript two: isdigit() but not int()-able
    "\u0968",            # Devanagari two
    "\n5", "5\n", "5\r", "\x005", "\u00a05", "5\u2003",  # whitespace that is not OWS
])
def test_parse_count_refuses_anything_but_short_ascii_digits(text: Optional[str]) -> None:
    """A sign, a radix, a separator or a non-ASCII digit is a 400, never a number."""
    assert parse_count(text) is None


@PROPS
@given(st.integers(0, 10**15 - 1))
def test_parse_count_round_trips(n: int) -> None:
    assert parse_count(str(n)) == n


@PROPS
@given(st.text(max_size=30))
@example("\uff15")
@example(" 1 ")
@example("1" * 16)
def test_parse_count_agrees_with_the_oracle(text: str) -> None:
    """parse_count is exactly 'OWS, 1..15 ASCII digits, OWS' and int() of those digits."""
    core = text.strip(" \t")
    expected = int(core) if ASCII_COUNT.fullmatch(core) else None
    assert parse_count(text) == expected


# --- parse_sf_boolean ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("?1", True), ("?0", False), (" ?1", True), ("?0 ", False), ("  ?1  ", True),
    ("?1;a=1", True), ("?0;a=1", False), ("?1;a", True), ("?1;a;b", True), ("?1;a=?0", True),
    ("?1;a=-5", True), ("?1;a=1.5", True), ('?1;a="text"', True), ('?1;a=""', True), ("?1;a=tok", True),
    ("?1;a=tok/x:y", True), ("?1;*a=1", True), ("?1;a-b_c.d*=1", True), ("?1; a=1", True),
])
def test_parse_sf_boolean_valid(text: str, expected: bool) -> None:
    """RFC 8941 4.2.8: `?1`/`?0`, leading/trailing SP discarded, parameters allowed and ignored."""
    assert parse_sf_boolean(text) is expected


@pytest.mark.parametrize("text", [
    None, "", " ", "?", "?2", "?01", "?10", "1", "0", "true", "false", "??1", "? 1", "?1?0",
    "?1,?0",           # a list, not an item
    "?1;A=1",          # parameter keys are lowercase
    "?1;1a=1",         # a key starts with lcalpha or *
    "?1;a=",           # no value after '='
    "?1;a=1;",         # a dangling ';'
    "?1 x",            # junk after the item
    "\t?1",            # RFC 8941 discards leading SP only
    "?1\t",
    "\uff1f1",         # fullwidth question mark
    "?\u0661",         # Arabic-Indic one
    '?1;a="\u00e9"',   # sf-string is printable ASCII only
    "?1;a=1234567890123456",  # an sf-integer has at most 15 digits
])
def test_parse_sf_boolean_invalid(text: Optional[str]) -> None:
    """Anything that is not exactly one boolean item is None (the handler's 400)."""
    assert parse_sf_boolean(text) is None


@pytest.mark.parametrize("text", ['?1;a="x\\"y"', '?1;a="back\\\\slash"', "?1;a=:YQ==:", "?1;a=:cHJldGVuZA==:"])
def test_parse_sf_boolean_accepts_every_rfc8941_parameter_value(text: str) -> None:
    """RFC 8941 3.1.2: a parameter value is any bare item, including a string with `\\"`/`\\\\`
    escapes and a byte sequence; the docstring says parameters are 'allowed and ignored'."""
    assert parse_sf_boolean(text) is True


sf_keys = st.from_regex(r"[a-z*][a-z0-9_.*-]{0,6}", fullmatch=True)
sf_values = st.one_of(
    st.sampled_from(["?0", "?1"]),
    st.integers(-(10**15) + 1, 10**15 - 1).map(str),
    st.tuples(st.integers(-(10**12) + 1, 10**12 - 1), st.integers(0, 999)).map(lambda t: f"{t[0]}.{t[1]}"),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters='"\\'),
            max_size=8).map(lambda s: f'"{s}"'),
    st.from_regex(r"[A-Za-z*][!#$%&'*+.^_`|~:/0-9A-Za-z-]{0,8}", fullmatch=True),
)
sf_params = st.lists(st.tuples(sf_keys, st.one_of(st.none(), sf_values)), max_size=4).map(
    lambda ps: "".join(f";{k}" if v is None else f";{k}={v}" for k, v in ps))


@PROPS
@given(st.booleans(), sf_params, st.text(" ", max_size=2), st.text(" ", max_size=2))
def test_parse_sf_boolean_with_random_parameters(value: bool, params: str, lead: str, trail: str) -> None:
    """`?0`/`?1` followed by any valid parameters (and SP around) is that boolean."""
    assert parse_sf_boolean(f"{lead}?{int(value)}{params}{trail}") is value


# --- parse_sf_integer ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("0", 0), ("7", 7), ("007", 7), ("999999999999999", 10**15 - 1), (" 3 ", 3),
    ("3;a=1", 3), ("3;a", 3), ('3;a="b";c=?1', 3), ("3;a=tok", 3),
])
def test_parse_sf_integer_valid(text: str, expected: int) -> None:
    """Upload-Offset/Upload-Length/the interop version (IETF): an sf-integer item, parameters ignored."""
    assert parse_sf_integer(text) == expected


@pytest.mark.parametrize("text", [
    None, "", " ", "-1", "-0", "+1", "0x10", "1.5", "1e3", "1_0", "1,2", "?1", "a", "1a", "1 2",
    "1234567890123456", "9" * 5000, "\uff11", "\u0661", "1\u0661", "3;A=1", "3;", "\t3",
])
def test_parse_sf_integer_invalid(text: Optional[str]) -> None:
    """Negative (an offset never is), decimal, signed, non-ASCII or over-long: None."""
    assert parse_sf_integer(text) is None


@PROPS
@given(st.integers(0, 10**15 - 1), sf_params)
def test_parse_sf_integer_round_trips_with_parameters(n: int, params: str) -> None:
    assert parse_sf_integer(f"{n}{params}") == n


# --- parse_upload_metadata / metadata_text -------------------------------------------------------

@pytest.mark.parametrize("text", [None, "", " ", "\t", " \t "])
def test_empty_metadata_is_an_empty_dict(text: Optional[str]) -> None:
    """No metadata is not malformed metadata: {} (the handler must not answer 400)."""
    assert parse_upload_metadata(text) == {}


@pytest.mark.parametrize("text, expected", [
    ("filename d29ybGQucG5n", {"filename": b"world.png"}),
    ("filename d29ybGQucG5n,is_confidential", {"filename": b"world.png", "is_confidential": b""}),
    ("a YQ==, b Yg==", {"a": b"a", "b": b"b"}),
    ("a YQ==\t,\tb Yg==", {"a": b"a", "b": b"b"}),
    ("key", {"key": b""}),
    ("key ", {"key": b""}),
    ("a YWI=", {"a": b"ab"}),
    ("a YWJj", {"a": b"abc"}),
    ("a AP8=", {"a": b"\x00\xff"}),
    ("a +/+/", {"a": b"\xfb\xff\xbf"}),  # the standard alphabet
    ("A YQ==,a Yg==", {"A": b"a", "a": b"b"}),  # keys are case-sensitive
    ("!#$%&'*+.^_`|~-09AZaz YQ==", {"!#$%&'*+.^_`|~-09AZaz": b"a"}),
    ("k" * 128 + " YQ==", {"k" * 128: b"a"}),
])
def test_parse_upload_metadata_valid(text: str, expected: dict[str, bytes]) -> None:
    """tus 1.0.0: comma-separated `key base64` pairs; a key alone is an empty value."""
    assert parse_upload_metadata(text) == expected


@pytest.mark.parametrize("text", [
    "a YQ==,a Yg==",    # duplicate key: which one counts would be a guess
    "a,a",
    "a YR==",           # non-canonical padding bits: 'YR==' also decodes to b'a'
    "a YWJ=",           # 'YWI=' is the canonical spelling of b'ab'
    "a YQ",             # unpadded
    "a YQ=",
    "a Y",
    "a -_-_",           # the URL-safe alphabet is not tus's
    "a YQ==\n",         # a newline inside base64 (validate=True)
    "a  YQ==",          # two spaces: three parts
    "a YQ== YQ==",
    "a\tYQ==",          # the separator is exactly one SP
    "a,,b", ",", "a,", ",a",
    "\u043a\u043b\u044e\u0447 YQ==",  # a Cyrillic key
    "caf\u00e9 YQ==",   # latin-1 (obs-text) in the key
    "a \u00c0\u00c1==",  # non-ASCII base64
    "a b=c",
    "a:b YQ==", "a/b YQ==", "a=b YQ==", "(a) YQ==", "a\"b YQ==", "a@b YQ==",  # separators are not key chars
    "k" * 129 + " YQ==",
])
def test_parse_upload_metadata_malformed(text: str) -> None:
    """Malformed metadata is None (400), never a partial dict."""
    assert parse_upload_metadata(text) is None


def test_metadata_pair_limit_is_inclusive() -> None:
    """64 pairs are fine, 65 are refused (bounded work and memory per request)."""
    keys = [f"k{i}" for i in range(MAX_METADATA_PAIRS + 1)]
    ok = parse_upload_metadata(",".join(f"{k} YQ==" for k in keys[:MAX_METADATA_PAIRS]))
    assert ok is not None and len(ok) == MAX_METADATA_PAIRS
    assert parse_upload_metadata(",".join(f"{k} YQ==" for k in keys)) is None
    assert parse_upload_metadata("a," * 5000 + "a") is None  # many commas: refused before looking at pairs


@pytest.mark.parametrize("meta, key, expected", [
    ({"name": "r\u00e9sum\u00e9.pdf".encode()}, "name", "r\u00e9sum\u00e9.pdf"),
    ({"name": b""}, "name", ""),
    ({"name": b"\xff\xfe"}, "name", None),   # not UTF-8
    ({"name": b"\xc3"}, "name", None),       # truncated UTF-8 sequence
    ({"name": b"a"}, "other", None),
    ({}, "name", None),
    ({"Name": b"a"}, "name", None),          # case-sensitive
])
def test_metadata_text(meta: dict[str, bytes], key: str, expected: Optional[str]) -> None:
    """A metadata value as text: UTF-8 or None (the caller then ignores it)."""
    assert metadata_text(meta, key) == expected


metadata_dicts = st.dictionaries(st.text(KEY_CHARS, min_size=1, max_size=20), st.binary(max_size=40),
                                 max_size=MAX_METADATA_PAIRS)


@st.composite
def encoded_metadata(draw: st.DrawFn) -> tuple[dict[str, bytes], str]:
    """(a dict, one of its valid Upload-Metadata spellings: OWS around commas, `key` or `key ` for b'')."""
    meta = draw(metadata_dicts)
    parts = []
    for key, value in meta.items():
        if value:
            parts.append(f"{key} {b64(value)}")
        else:
            parts.append(key + draw(st.sampled_from(["", " "])))
    separators = draw(st.lists(st.sampled_from([",", ", ", " ,", "\t,\t", " , "]),
                               min_size=len(parts), max_size=len(parts)))
    text = "".join(p + s for p, s in zip(parts, separators))[:-len(separators[-1])] if parts else ""
    return meta, text


@PROPS
@given(encoded_metadata())
@example(({"a": b""}, "a"))
@example(({"a": b"\x00"}, "a AA=="))
def test_metadata_round_trips(case: tuple[dict[str, bytes], str]) -> None:
    """Whatever a tus client encodes (keys from the token alphabet, any bytes, standard base64)
    parses back to exactly the same dict."""
    meta, text = case
    assert parse_upload_metadata(text) == meta


@PROPS
@given(metadata_dicts.filter(bool), st.data())
def test_metadata_with_a_repeated_key_is_refused(meta: dict[str, bytes], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(meta)))
    text = ",".join(f"{k} {b64(v)}" for k, v in meta.items()) + f",{key} {b64(b'x')}"
    assert parse_upload_metadata(text) is None


@PROPS
@given(st.binary(min_size=1, max_size=30), st.data())
def test_metadata_refuses_every_non_canonical_spelling(value: bytes, data: st.DataObject) -> None:
    """Flipping padding bits that decoders ignore gives another spelling of the same bytes: refused."""
    canonical = b64(value)
    pad = canonical.count("=")
    if pad == 0:
        return
    last = canonical[-pad - 1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    spare_bits = 4 if pad == 2 else 2
    index = alphabet.index(last)
    flip = data.draw(st.integers(1, (1 << spare_bits) - 1))
    other = canonical[:-pad - 1] + alphabet[index ^ flip] + "=" * pad
    assert base64.b64decode(other) == value  # the same bytes...
    assert parse_upload_metadata(f"k {other}") is None  # ...but not the one spelling
    assert parse_upload_metadata(f"k {canonical}") == {"k": value}


# --- parse_checksum ------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", CHECKSUM_ALGORITHMS)
def test_parse_checksum_valid(algorithm: str) -> None:
    """`<algorithm> <base64 digest>` -> (algorithm, raw digest), the algorithm case-insensitive."""
    digest = hashlib.new(algorithm, b"hello").digest()
    assert parse_checksum(f"{algorithm} {b64(digest)}") == (algorithm, digest)
    assert parse_checksum(f" {algorithm.upper()} {b64(digest)}\t") == (algorithm, digest)


def test_parse_checksum_absent_is_none() -> None:
    assert parse_checksum(None) is None


def test_checksum_algorithms_and_hashes_agree() -> None:
    """The advertised list (Tus-Checksum-Algorithm) is what new_hash can compute, at the sizes checked."""
    assert CHECKSUM_ALGORITHMS == ("md5", "sha1", "sha256")
    for name in CHECKSUM_ALGORITHMS:
        h = new_hash(name)
        h.update(b"x")
        assert h.digest() == hashlib.new(name, b"x").digest() and len(h.digest()) == DIGEST_SIZES[name]


SHA1_B64 = b64(hashlib.sha1(b"x").digest())


@pytest.mark.parametrize("text", [
    "", " ", "sha1", f"sha1  {SHA1_B64}", f"sha1 {SHA1_B64} extra", f"sha1\t{SHA1_B64}",
    f"crc32 {SHA1_B64}", f"sha512 {b64(bytes(64))}", f"sha-1 {SHA1_B64}", f"SHA_256 {b64(bytes(32))}",
    f"sha256 {SHA1_B64}",           # a sha1-sized digest for sha256
    f"md5 {SHA1_B64}",
    f"sha1 {SHA1_B64[:-1]}",         # padding missing
    "sha1 !!!!", "sha1 \u00e9\u00e9\u00e9\u00e9", "\u0455ha1 " + SHA1_B64,  # Cyrillic dze, not s
    f"sha1 {SHA1_B64.replace('=', '')}==",
])
def test_parse_checksum_malformed_raises_checksum_error(text: str) -> None:
    """Malformed or unsupported: ChecksumError (the tus 400), never None (which means 'no checksum')."""
    with pytest.raises(ChecksumError):
        parse_checksum(text)


def test_checksum_error_is_a_value_error() -> None:
    """Handlers may catch it as ValueError; it must never be confused with an HTTPError."""
    assert issubclass(ChecksumError, ValueError) and not issubclass(ChecksumError, HTTPError)


# --- is_media_type -------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (OCTET, True), ("Application/Offset+Octet-Stream", True), (f" {OCTET} ", True), (f"{OCTET};a=b", True),
    (f"{OCTET} ; charset=utf-8", True), (f"\t{OCTET}\t;x", True),
    (None, False), ("", False), (";", False), ("application/octet-stream", False), (OCTET + "x", False),
    ("x" + OCTET, False), (f"{OCTET}, text/plain", False), (f"{OCTET}\n", False), (PARTIAL, False),
])
def test_is_media_type(value: Optional[str], expected: bool) -> None:
    """Content-Type is the expected type whatever the case and parameters; nothing looser."""
    assert is_media_type(value, OCTET) is expected


def test_is_media_type_partial_upload() -> None:
    assert is_media_type("application/partial-upload; x=1", PARTIAL)
    assert not is_media_type(OCTET, PARTIAL)


# --- hostile text: documented type or None, nothing raised ---------------------------------------

hostile_text = st.one_of(
    st.text(max_size=60),
    st.text(st.sampled_from("?01;=a \t,\"\\:*-.+/=\uff11\u0661"), max_size=30),
    st.text(st.sampled_from(KEY_CHARS[:20] + " ,=+/Yg\u00e9"), max_size=60),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),  # what the head parser produces
)


@PROPS
@given(hostile_text)
@example("?1;a=" + "9" * 5000)
@example("9" * 5000 + ";a")
@example("k " + "=" * 5000)
@example(",".join(["a"] * 70))
def test_parsers_return_their_type_or_none_on_any_text(text: str) -> None:
    """(a) For any text each parser answers its documented type or None and raises nothing."""
    count = parse_count(text)
    assert count is None or (type(count) is int and 0 <= count < 10**15)
    sf_int = parse_sf_integer(text)
    assert sf_int is None or (type(sf_int) is int and 0 <= sf_int < 10**15)
    sf_bool = parse_sf_boolean(text)
    assert sf_bool is None or type(sf_bool) is bool
    meta = parse_upload_metadata(text)
    assert meta is None or (type(meta) is dict and len(meta) <= MAX_METADATA_PAIRS
                            and all(type(k) is str and type(v) is bytes for k, v in meta.items()))
    for key in (meta or {}):
        value = metadata_text(meta or {}, key)
        assert value is None or type(value) is str
    assert metadata_text({"k": text.encode("utf-8", "surrogatepass")}, "k") in (None, text)
    assert type(is_media_type(text, OCTET)) is bool
    try:
        checksum = parse_checksum(text)
    except ChecksumError:
        return
    assert checksum is not None
    algorithm, digest = checksum
    assert algorithm in CHECKSUM_ALGORITHMS and type(digest) is bytes and len(digest) == DIGEST_SIZES[algorithm]


@PROPS
@given(st.binary(max_size=40))
def test_metadata_text_never_raises_on_any_bytes(raw: bytes) -> None:
    try:
        expected: Optional[str] = raw.decode("utf-8")
    except UnicodeDecodeError:
        expected = None
    assert metadata_text({"k": raw}, "k") == expected


# --- fed byte by byte ----------------------------------------------------------------------------

class SplitRaw(io.RawIOBase):
    """A socket-like raw stream: each read returns at most the next size from `sizes` (1 when
    they run out), as a client trickling its request does. The server reads the head through a
    BufferedReader over such a stream (socket.makefile), so that is how these tests read it too."""

    def __init__(self, data: bytes, sizes: Optional[list[int]] = None) -> None:
        self.data, self.pos, self.sizes = data, 0, list(sizes or [])
        self.reads = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.pos >= len(self.data):
            return 0
        size = self.sizes.pop(0) if self.sizes else 1
        n = min(size, len(b), len(self.data) - self.pos)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        self.reads += 1
        return n


def read(wire: bytes, sizes: Optional[list[int]] = None, trickle: bool = True) -> Union[RequestHead, int, None]:
    """read_head over `wire`: the head, the HTTPError's status, or None (client closed)."""
    rfile = io.BufferedReader(SplitRaw(wire, sizes), 1) if trickle else io.BytesIO(wire)
    try:
        return read_head(rfile, 64 * 1024)
    except HTTPError as e:
        return e.status
    except ConnectionError:
        return None


def parsed(head: RequestHead) -> tuple:
    """What the resumable handlers would make of the head's upload headers."""
    h = head.headers
    try:
        checksum: object = parse_checksum(h.get("upload-checksum"))
    except ChecksumError:
        checksum = "ChecksumError"
    return (parse_count(h.get("upload-offset")), parse_sf_integer(h.get("upload-offset")),
            parse_upload_metadata(h.get("upload-metadata")), checksum,
            parse_sf_boolean(h.get("upload-complete")), parse_sf_boolean(h.get("upload-incomplete")),
            is_media_type(h.get("content-type"), OCTET))


ows = st.text(" \t", max_size=2)
field_value_bytes = st.binary(max_size=30).map(lambda b: bytes(c for c in b if c == 9 or (c >= 0x20 and c != 0x7F)))


@st.composite
def upload_heads(draw: st.DrawFn) -> tuple[bytes, dict]:
    """A PATCH head carrying Upload-Offset/-Metadata/-Checksum/-Complete with valid values (and the
    values they stand for), or now and then a random value in one of them."""
    offset = draw(st.integers(0, 10**15 - 1))
    meta, meta_text = draw(encoded_metadata())
    algorithm = draw(st.sampled_from(CHECKSUM_ALGORITHMS))
    digest = draw(st.binary(min_size=DIGEST_SIZES[algorithm], max_size=DIGEST_SIZES[algorithm]))
    complete = draw(st.booleans())
    values = {
        b"Upload-Offset": str(offset).encode(),
        b"Upload-Metadata": meta_text.encode(),
        b"Upload-Checksum": f"{draw(st.sampled_from([algorithm, algorithm.upper()]))} {b64(digest)}".encode(),
        b"Upload-Complete": f"?{int(complete)}{draw(sf_params)}".encode(),
        b"Content-Type": OCTET.encode(),
    }
    expected = {"offset": offset, "metadata": meta, "checksum": (algorithm, digest), "complete": complete}
    if draw(st.integers(0, 9)) < 3:  # a random value somewhere: both readings must still agree
        name = draw(st.sampled_from(sorted(values)))
        values[name] = draw(field_value_bytes)
        expected = {}
    names = draw(st.permutations(sorted(values)))
    lines = b"".join(n + b":" + draw(ows).encode() + values[n] + draw(ows).encode() + draw(
        st.sampled_from([b"\r\n", b"\n"])) for n in names)
    wire = b"PATCH /upload/.uploads/" + b"A" * 32 + b" HTTP/1.1\r\nHost: h\r\n" + lines + b"\r\n"
    return wire, expected


@HEAVY
@given(upload_heads(), st.binary(max_size=20))
def test_head_read_one_byte_at_a_time_gives_the_same_upload_headers(case: tuple[bytes, dict], body: bytes) -> None:
    """(c) The upload headers read from a one-byte-per-read socket are those read whole, and the
    parsers make the same of them; for valid values they are exactly what the client encoded."""
    wire, expected = case
    whole = read(wire + body, trickle=False)
    trickled = read(wire + body)
    assert trickled == whole
    if not isinstance(whole, RequestHead):
        assert not expected, whole  # only a random value may make the head unreadable
        return
    assert parsed(trickled) == parsed(whole)  # type: ignore[arg-type]
    if expected:
        offset, sf_offset, meta, checksum, complete, incomplete, octet = parsed(whole)
        assert (offset, sf_offset) == (expected["offset"], expected["offset"])
        assert meta == expected["metadata"]
        assert checksum == expected["checksum"]
        assert complete is expected["complete"] and incomplete is None and octet is True


@HEAVY
@given(upload_heads(), st.lists(st.integers(1, 64), max_size=40))
def test_head_read_in_random_pieces_gives_the_same_upload_headers(case: tuple[bytes, dict],
                                                                   sizes: list[int]) -> None:
    """(c) Whatever sizes the socket's reads come in, the head (and so every parsed value) is the same."""
    wire, _expected = case
    whole = read(wire, trickle=False)
    pieces = read(wire, sizes)
    assert pieces == whole
    if isinstance(whole, RequestHead):
        assert parsed(pieces) == parsed(whole)  # type: ignore[arg-type]


@PROPS
@given(st.one_of(st.integers(0, 10**15 - 1).map(str), encoded_metadata().map(lambda c: c[1]),
                 st.booleans().map(lambda b: f"?{int(b)};a=1"), st.text(max_size=40)),
       st.lists(st.integers(0, 200), max_size=8))
def test_a_value_rejoined_from_any_split_parses_the_same(value: str, cuts: list[int]) -> None:
    """(c) The parsers take whole values: splitting a value's bytes anywhere (even inside a UTF-8
    sequence) and joining them back, as a reader assembling a line does, changes nothing."""
    raw = value.encode("utf-8", "surrogatepass")
    bounds = [0, *sorted(c % (len(raw) + 1) for c in cuts), len(raw)]
    rejoined = b"".join(raw[a:b] for a, b in zip(bounds, bounds[1:])).decode("utf-8", "surrogatepass")

    def results(text: str) -> tuple:
        try:
            checksum: object = parse_checksum(text)
        except ChecksumError:
            checksum = "ChecksumError"
        return (parse_count(text), parse_sf_integer(text), parse_sf_boolean(text),
                parse_upload_metadata(text), checksum, is_media_type(text, OCTET))

    assert results(rejoined) == results(value)


def test_one_byte_reader_really_trickles() -> None:
    """The reader used above must deliver one byte per read, or the properties prove nothing."""
    wire = b"PATCH /x HTTP/1.1\r\nHost: h\r\nUpload-Offset: 5\r\n\r\n"
    raw = SplitRaw(wire)
    head = read_head(io.BufferedReader(raw, 1), 1024)
    assert head is not None and head.headers["upload-offset"] == "5"
    assert raw.reads == len(wire)


def test_repeated_upload_headers_are_joined_and_then_refused_or_merged() -> None:
    """A repeated Upload-Offset is joined with ', ' by the head parser, which no count parser
    accepts; repeated Upload-Metadata lines merge like one comma-separated list (RFC 9110 5.3)."""
    wire = (b"PATCH /x HTTP/1.1\r\nHost: h\r\nUpload-Offset: 5\r\nUpload-Offset: 5\r\n"
            b"Upload-Metadata: a YQ==\r\nUpload-Metadata: b Yg==\r\nUpload-Complete: ?1\r\nUpload-Complete: ?1\r\n\r\n")
    head = read(wire)
    assert isinstance(head, RequestHead)
    assert parse_count(head.headers["upload-offset"]) is None
    assert parse_sf_integer(head.headers["upload-offset"]) is None
    assert parse_sf_boolean(head.headers["upload-complete"]) is None
    assert parse_upload_metadata(head.headers["upload-metadata"]) == {"a": b"a", "b": b"b"}
