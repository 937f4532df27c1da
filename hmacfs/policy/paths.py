"""URL path rules: request target -> signed path, or a 400/404. Pure functions.

Strategy: split the raw request path on `/` *before* percent-decoding, so an encoded
slash can never create a segment boundary, then decode each segment as UTF-8 (raw
UTF-8 bytes in the request line, lowercase and uppercase escapes all decode alike) and
refuse anything that could name something other than a plain file below the storage
root: `.`/`..`, empty segments, NUL and control characters, backslashes, encoded
slashes, controls (C0, C1) and line separators (U+2028/2029), and any segment that
starts with a dot (`.hmacfs/` holds internal state).
"""
from __future__ import annotations

import unicodedata
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

from ..errors import HTTPError

MAX_SEGMENT_BYTES = 255   # NAME_MAX on Linux filesystems
MAX_PATH_BYTES = 4000     # below PATH_MAX with room for the storage root (a long root lowers it)
_REFUSED_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})  # C0/C1 controls, DEL, U+2028, U+2029
MAX_DEPTH = 64            # path segments; XMPP servers use 2 or 3


class Target(NamedTuple):
    """A parsed request target: raw path bytes and decoded query parameters."""

    raw_path: bytes
    query: dict[str, str]


def split_target(target: bytes) -> Target:
    """`/a/b?x=1` (or absolute-form `http://host/a/b?x=1`) -> raw path and query dict."""
    if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        after_scheme = target.index(b"//") + 2
        slash = target.find(b"/", after_scheme)
        target = target[slash:] if slash >= 0 else b"/"
    target, _, _fragment = target.partition(b"#")  # clients should not send one; never part of a name
    path, _, query = target.partition(b"?")
    return Target(path, parse_query(query))


def parse_query(query: bytes) -> dict[str, str]:
    """Decode `a=1&b=2`; the first occurrence of a name wins; undecodable values become ''."""
    out: dict[str, str] = {}
    if not query:
        return out
    for item in query.split(b"&"):
        if not item:
            continue
        name_b, _, value_b = item.partition(b"=")
        name = _decode_query_part(name_b)
        if name not in out:
            out[name] = _decode_query_part(value_b)
    return out


def _decode_query_part(part: bytes) -> str:
    return unquote_to_bytes(part.replace(b"+", b" ")).decode("utf-8", "replace")


def decode_segment(raw: bytes) -> str:
    """One path segment, percent-decoded as UTF-8 and checked; HTTPError 400 if unsafe."""
    data = unquote_to_bytes(raw)
    if len(data) > MAX_SEGMENT_BYTES:
        raise HTTPError(400, "path segment too long")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "path is not valid UTF-8") from None
    if not text:
        raise HTTPError(400, "empty path segment")
    if text in (".", ".."):
        raise HTTPError(400, "dot segments are not allowed")
    if text.startswith("."):
        raise HTTPError(400, "names starting with a dot are reserved")
    if "/" in text or "\\" in text:
        raise HTTPError(400, "encoded slash or backslash in path")
    if not text.isprintable() and any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in text):
        raise HTTPError(400, "control character or line separator in path")
    return text


def signed_path(raw_path: bytes, prefix: str, max_bytes: int = MAX_PATH_BYTES) -> str:
    """The signed path of a request under `prefix` (e.g. "/upload/"): decoded, no leading slash.

    404 when the path is outside the prefix or is the prefix itself (no listings);
    400 when a segment is unsafe; 414 when the path is longer than `max_bytes` (decoded,
    UTF-8) or deeper than MAX_DEPTH segments, before the filesystem would refuse it.
    """
    prefix_b = prefix.encode()
    if not raw_path.startswith(prefix_b):
        raise HTTPError(404, "not found")
    rest = raw_path[len(prefix_b):]
    if not rest:
        raise HTTPError(404, "not found")
    if len(rest) > 3 * max_bytes:  # a percent-escape is 3 bytes for 1
        raise HTTPError(414, "path too long")
    raw_segments = rest.split(b"/")
    if len(raw_segments) > MAX_DEPTH:
        raise HTTPError(414, f"path too deep (more than {MAX_DEPTH} segments)")
    path = "/".join(decode_segment(seg) for seg in raw_segments)
    if len(path.encode("utf-8")) > max_bytes:
        raise HTTPError(414, "path too long")
    return path


def extension_of(path: str) -> str:
    """Lowercase extension with its dot (".tar.gz" counts as ".gz"); "" when none."""
    name = path.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def extension_allowed(path: str, allowed: list[str], blocked: list[str]) -> bool:
    """Case-insensitive extension policy; an empty allow-list allows all. Multi-dot
    entries such as ".tar.gz" match the end of the name."""
    name = path.rsplit("/", 1)[-1].lower()

    def matches(entries: list[str]) -> bool:
        return any(name.endswith(e.lower() if e.startswith(".") else "." + e.lower()) for e in entries)

    if blocked and matches(blocked):
        return False
    return not allowed or matches(allowed)
