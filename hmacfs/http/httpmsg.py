"""HTTP message rules for downloads: Range, conditionals, dates, types, disposition. Pure.

Strategy: every rule is a function of header strings and file facts (size, ETag, mtime),
so each RFC 9110 corner (section numbers cited inline) is unit-tested without a socket.
"""
from __future__ import annotations

import mimetypes
import re
import time
from email.utils import formatdate, parsedate_to_datetime
from typing import Optional
from urllib.parse import quote

from ..digits import parse_decimal
from ..errors import HTTPError

# Served inline (the browser may show them); everything else is an attachment. SVG, HTML,
# XML and scripts are never inline: with `nosniff` and the sandbox CSP they cannot run.
INLINE_TYPES = ("image/", "audio/", "video/")
INLINE_EXACT = frozenset({"text/plain"})
NEVER_INLINE = frozenset({"image/svg+xml"})

SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'; sandbox"),
    ("Referrer-Policy", "no-referrer"),
)

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # noqa: S105 - RFC 9110 token, not a password
_QUOTED = r'"[\t\x20\x21\x23-\x5b\x5d-\x7e]*"'  # qdtext only: no controls, quotes or backslashes
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}([ \t]*;[ \t]*{_TOKEN}=({_TOKEN}|{_QUOTED}))*")
MAX_RANGE_DIGITS = 19
MAX_RANGES = 16  # parts of one multipart/byteranges response, after merging; more: 200 (as nginx's max_ranges)
RANGE_MERGE_GAP = 80  # bytes: ranges closer than this are merged; a part's own headers cost about as much

_mimetypes = mimetypes.MimeTypes(filenames=())  # a fixed table: no host /etc/mime.types surprises
_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz",
               "compress": "application/x-compress", "br": "application/x-brotli"}


def http_date(ts: Optional[float] = None) -> str:
    """IMF-fixdate (RFC 9110 5.6.7)."""
    return formatdate(ts if ts is not None else time.time(), usegmt=True)


def parse_http_date(text: str) -> Optional[float]:
    """Seconds since the epoch, or None when the date is invalid (then the header is ignored)."""
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def clean_content_type(value: Optional[str]) -> Optional[str]:
    """A syntactically valid media type, lowercased type/subtype, else None."""
    if not value:
        return None
    value = value.strip(" \t")
    if len(value) > 200 or not _MEDIA_TYPE.fullmatch(value):
        return None
    main, sep, params = value.partition(";")
    return main.strip().lower() + (sep + params if sep else "")


def guess_type(path: str) -> str:
    """Content type by extension, application/octet-stream when unknown."""
    guessed, encoding = _mimetypes.guess_type(path, strict=False)
    if encoding is not None:  # "x.tar.gz" is a gzip file, not a tar file (the encoding wins)
        return _COMPRESSED.get(encoding, "application/octet-stream")
    return guessed or "application/octet-stream"


def content_disposition(filename: str, content_type: str) -> str:
    """`inline` only for types a browser shows without running code; RFC 6266 `filename*`."""
    base = content_type.split(";", 1)[0].strip().lower()
    inline = base not in NEVER_INLINE and (base.startswith(INLINE_TYPES) or base in INLINE_EXACT)
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\%' else "_" for c in filename)
    return (f"{'inline' if inline else 'attachment'}; filename=\"{fallback}\"; "
            f"filename*=UTF-8''{quote(filename, safe='')}")


def strong_etag(sha256_hex: str) -> str:
    """A strong ETag from the content hash (128 bits are plenty to identify content)."""
    return f'"{sha256_hex[:32]}"'


class _Ignored(ValueError):
    """The Range header is not a valid ranges-specifier: it is ignored and the whole file served."""


def _range_spec(spec: str, size: int) -> Optional[tuple[int, int]]:
    """One range-spec (RFC 9110 14.1.1) -> (first, last) inclusive, clamped to the file; None
    when it cannot be satisfied; `_Ignored` when it is malformed or invalid (last < first).
    OWS around the spec and its dash is tolerated; digits are ASCII only and bounded."""
    first_s, dash, last_s = spec.strip(" \t").partition("-")
    first_s, last_s = first_s.strip(" \t"), last_s.strip(" \t")
    first_n = parse_decimal(first_s, MAX_RANGE_DIGITS) if first_s else None
    last_n = parse_decimal(last_s, MAX_RANGE_DIGITS) if last_s else None
    if not dash or (first_s and first_n is None) or (last_s and last_n is None):
        raise _Ignored(spec)  # not ASCII digits, absurdly long, or no dash
    if first_n is None:  # suffix-range: the last n bytes
        if last_n is None:
            raise _Ignored(spec)
        return (max(0, size - last_n), size - 1) if last_n and size else None
    if last_n is not None and last_n < first_n:
        raise _Ignored(spec)  # an invalid int-range (RFC 9110 14.1.1)
    if first_n >= size:
        return None
    return first_n, size - 1 if last_n is None else min(last_n, size - 1)


def _range_specs(header: Optional[str], size: int) -> Optional[list[Optional[tuple[int, int]]]]:
    """Every range-spec of a `bytes` Range header in request order (None for an unsatisfiable
    one); None to ignore the header. An empty list element is treated as malformed: ignoring
    the header is always allowed (RFC 9110 14.2), and only a broken client sends one."""
    if not header:
        return None
    unit, eq, spec = header.strip(" \t").partition("=")
    if not eq or unit.strip(" \t").lower() != "bytes":
        return None
    try:
        return [_range_spec(item, size) for item in spec.split(",")]
    except _Ignored:
        return None


def _unsatisfiable(size: int) -> HTTPError:
    return HTTPError(416, "range not satisfiable", {"Content-Range": f"bytes */{size}"})


def parse_range(header: Optional[str], size: int) -> Optional[tuple[int, int]]:
    """A single byte range -> (first, last) inclusive; None to serve the whole file.

    RFC 9110 14.2: an unparseable Range, or one with several ranges (see `parse_ranges`), is
    ignored (200); a valid single range that cannot be satisfied is a 416.
    """
    specs = _range_specs(header, size)
    if specs is None or len(specs) != 1:
        return None
    if specs[0] is None:
        raise _unsatisfiable(size)
    return specs[0]


def coalesce(spans: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Sorted spans, those that overlap, touch, or have fewer than `gap` bytes between them
    merged into one (RFC 9110 15.3.7.2 allows it whatever order they were asked in)."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(spans):
        if merged and first - merged[-1][1] - 1 < gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def parse_ranges(header: Optional[str], size: int) -> Optional[list[tuple[int, int]]]:
    """The byte spans a Range header asks for, sorted and merged; None to serve the whole file (200).

    One span is a plain 206, several are one `multipart/byteranges` 206 (RFC 9110 14.6). The
    rules keep a hostile header from amplifying a response (CVE-2011-3192, "Apache Killer"):
    - unsatisfiable specs are dropped; if none is left: 416 with `Content-Range: bytes */size`;
    - malformed or invalid specs (non-ASCII or over-long digits, last < first, empty list
      elements, another unit) make the whole header ignored: 200 (RFC 9110 14.2 allows it);
    - if the requested lengths, before merging, add up to more than the file, the ranges
      overlap heavily: a broken or hostile client (RFC 9110 14.2 names it), sent the whole
      file, which is no more than it asked for (nginx and Apache httpd do the same);
    - overlapping, adjacent and nearly adjacent spans (fewer than RANGE_MERGE_GAP bytes apart,
      less than a part's own headers would cost) are merged, so parts are sorted and disjoint;
    - more than MAX_RANGES spans after merging: the header is ignored (nginx's max_ranges).
    So a multipart body is never larger than the file plus MAX_RANGES part headers. The parts
    go in ascending order, not request order: a client places each by its Content-Range.
    """
    specs = _range_specs(header, size)
    if specs is None:
        return None
    spans = [span for span in specs if span is not None]
    if not spans:
        raise _unsatisfiable(size)
    if sum(last - first + 1 for first, last in spans) > size:
        return None
    merged = coalesce(spans, RANGE_MERGE_GAP)
    return merged if len(merged) <= MAX_RANGES else None


def _etag_list_matches(header: str, etag: str, weak: bool) -> bool:
    header = header.strip()
    if header == "*":
        return True
    bare = etag[2:] if etag.startswith("W/") else etag
    for item in header.split(","):
        item = item.strip()
        if weak and item.startswith("W/"):
            item = item[2:]
        if item == (bare if weak else etag):
            return True
    return False


def not_modified(if_none_match: Optional[str], if_modified_since: Optional[str],
                 etag: str, mtime: float) -> bool:
    """RFC 9110 13.1.2/13.1.3: 304 for GET/HEAD? If-None-Match (weak compare) wins over IMS."""
    if if_none_match is not None:
        return _etag_list_matches(if_none_match, etag, weak=True)
    if if_modified_since is not None:
        since = parse_http_date(if_modified_since)
        return since is not None and int(mtime) <= since
    return False


def range_applies(if_range: Optional[str], etag: str, mtime: float) -> bool:
    """RFC 9110 13.1.5: honour Range only if If-Range (strong ETag or exact date) still holds."""
    if if_range is None:
        return True
    if_range = if_range.strip()
    if if_range.startswith(('"', "W/")):
        return if_range == etag  # strong comparison; a weak tag never matches
    since = parse_http_date(if_range)
    return since is not None and int(mtime) == since
