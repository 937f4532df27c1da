"""Parsers for the headers of resumable uploads (tus 1.0.0 and the IETF draft): pure functions.

Every one takes the header's text and returns a value or None (the caller answers 400);
none raises on hostile input. Numbers are ASCII digits of bounded length (`digits`), a
structured-field boolean is exactly `?0` or `?1` (RFC 8941 4.2.8, parameters allowed and
ignored), Upload-Metadata is a comma-separated list of `key base64` pairs with unique keys,
and a checksum names a supported algorithm with a digest of the right length.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Optional

from ..digits import parse_decimal

MAX_NUMBER_DIGITS = 15  # RFC 8941 sf-integer: at most 15 digits (also far beyond any file size)
CHECKSUM_ALGORITHMS = ("md5", "sha1", "sha256")  # advertised in this order in Tus-Checksum-Algorithm
_DIGEST_SIZES = {"md5": 16, "sha1": 20, "sha256": 32}
_OWS = " \t"
# RFC 8941 parameters after an item: ;key[=value], values kept simple (token, integer, boolean, string)
_SF_PARAMS = re.compile(r'(?:[ \t]*;[ \t]*[a-z*][a-z0-9_.*-]*(?:=(?:\?[01]|-?[0-9]{1,15}(?:\.[0-9]{1,3})?|'
                        r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"|:[A-Za-z0-9+/=]*:|'
                        r'[A-Za-z*][!#$%&\'*+.^_`|~:/0-9A-Za-z-]*))?)*')
_METADATA_KEY = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")  # ASCII, no space or comma
MAX_METADATA_PAIRS = 64


def parse_count(value: Optional[str]) -> Optional[int]:
    """Upload-Offset / Upload-Length / Content-Length-like counts: ASCII digits, at most 15."""
    if value is None:
        return None
    return parse_decimal(value.strip(_OWS), MAX_NUMBER_DIGITS)


def parse_sf_boolean(value: Optional[str]) -> Optional[bool]:
    """A structured-field boolean item (`?1` / `?0`, optional parameters); None if not one."""
    if value is None:
        return None
    text = value.strip(" ")
    if len(text) < 2 or text[0] != "?" or text[1] not in "01":
        return None
    if text[2:] and not _SF_PARAMS.fullmatch(text[2:]):
        return None
    return text[1] == "1"


def parse_sf_integer(value: Optional[str]) -> Optional[int]:
    """A non-negative structured-field integer item (parameters allowed and ignored)."""
    if value is None:
        return None
    text = value.strip(" ")
    end = 0
    while end < len(text) and text[end] in "0123456789":
        end += 1
    if end == 0 or (text[end:] and not _SF_PARAMS.fullmatch(text[end:])):
        return None
    return parse_decimal(text[:end], MAX_NUMBER_DIGITS)


def parse_upload_metadata(value: Optional[str]) -> Optional[dict[str, bytes]]:
    """tus Upload-Metadata: `key base64value` pairs, comma-separated; a key alone means an empty
    value. None when malformed (bad key, bad base64, a duplicate key, too many pairs)."""
    if value is None or not value.strip(_OWS):
        return {}
    pairs = value.split(",")
    if len(pairs) > MAX_METADATA_PAIRS:
        return None
    result: dict[str, bytes] = {}
    for pair in pairs:
        parts = pair.strip(_OWS).split(" ")
        if len(parts) > 2 or not _METADATA_KEY.fullmatch(parts[0]) or parts[0] in result:
            return None
        decoded = b""
        if len(parts) == 2:
            try:
                decoded = base64.b64decode(parts[1].encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError, ValueError):
                return None
            if base64.b64encode(decoded).decode("ascii") != parts[1]:
                return None  # non-canonical padding bits: one value, one spelling
        result[parts[0]] = decoded
    return result


def metadata_text(metadata: dict[str, bytes], key: str) -> Optional[str]:
    """A metadata value as text (UTF-8), or None when absent or not UTF-8."""
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class ChecksumError(ValueError):
    """Upload-Checksum names an algorithm we do not support (tus: 400), or is malformed."""


def parse_checksum(value: Optional[str]) -> Optional[tuple[str, bytes]]:
    """tus Upload-Checksum `algorithm base64digest` -> (algorithm, digest); None when absent.
    ChecksumError when malformed or the algorithm is not one of CHECKSUM_ALGORITHMS."""
    if value is None:
        return None
    parts = value.strip(_OWS).split(" ")
    if len(parts) != 2:
        raise ChecksumError("Upload-Checksum must be '<algorithm> <base64 digest>'")
    algorithm = parts[0].lower()
    if algorithm not in _DIGEST_SIZES:
        raise ChecksumError(f"checksum algorithm not supported (use one of {', '.join(CHECKSUM_ALGORITHMS)})")
    try:
        digest = base64.b64decode(parts[1].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ChecksumError("Upload-Checksum digest is not base64") from None
    if base64.b64encode(digest).decode("ascii") != parts[1]:  # Python 3.9 takes surplus padding
        raise ChecksumError("Upload-Checksum digest is not canonical base64")
    if len(digest) != _DIGEST_SIZES[algorithm]:
        raise ChecksumError(f"a {algorithm} digest has {_DIGEST_SIZES[algorithm]} bytes")
    return algorithm, digest


def new_hash(algorithm: str):
    """A hashlib object for a checksum algorithm (md5 and sha1 are not used for security here)."""
    return hashlib.new(algorithm, usedforsecurity=False)


def is_media_type(value: Optional[str], expected: str) -> bool:
    """Content-Type is `expected` (case-insensitive), parameters allowed."""
    if value is None:
        return False
    return value.split(";", 1)[0].strip(_OWS).lower() == expected
