"""Parse the human units the config uses: sizes ("5GB", "100KiB") and durations ("30d", "1h30m").

Sizes follow the seeds' Go server: KB/MB/GB/TB are powers of 1024 (as are KiB/MiB/...),
so "1GB" means the same here as in an existing hmac-file-server config.
"""
from __future__ import annotations

import re
from decimal import Decimal

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1024, "kib": 1024,
    "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1024**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1024**4, "tib": 1024**4,
    "p": 1024**5, "pb": 1024**5, "pib": 1024**5,
}
_SIZE_RE = re.compile(r"^\s*(\d{1,20}(?:\.\d{1,9})?)\s*([a-zA-Z]*)\s*$")  # bounded: no overflow

_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400,
    "w": 7 * 86400, "y": 365 * 86400,
}
MAX_FRACTION_DIGITS = 24  # what format_duration writes for any duration down to 1e-7 s (17 significant digits)
_DURATION_PART = re.compile(r"(\d{1,15}(?:\.\d{1,24})?)\s*(ns|us|ms|s|m|h|d|w|y)", re.IGNORECASE)
MAX_DURATION = 1000 * 365 * 86400.0  # a thousand years: beyond it a duration is a typo


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as "32MB", "1.5GiB", "4096"; ValueError if malformed."""
    if isinstance(value, bool):
        raise ValueError("a size, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("a size such as \"100MB\"")
    m = _SIZE_RE.match(value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("a size such as \"100MB\", \"5GB\", \"64KiB\" or a number of bytes")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(value: object) -> float:
    """Seconds from an int (seconds) or "3600s", "30m", "1h30m", "30d", "2Y", "4w"."""
    if isinstance(value, bool):
        raise ValueError("a duration, not a boolean")
    if isinstance(value, (int, float)):
        if not 0 <= value <= MAX_DURATION:  # also NaN: no deadline could ever pass
            raise ValueError("a duration between 0 and a thousand years")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("a duration such as \"30s\"")
    text = value.strip()
    if text.isascii() and text.isdigit():
        if len(text) > 15:
            raise ValueError("a duration between 0 and a thousand years")
        return float(text)
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if text[pos:m.start()].strip():
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
        pos = m.end()
    if pos == 0 or text[pos:].strip():
        raise ValueError("a duration such as \"3600s\", \"30m\", \"1h\", \"30d\", \"2Y\"")
    if total > MAX_DURATION:
        raise ValueError("a duration between 0 and a thousand years")
    return total


def format_size(n: int) -> str:
    """The shortest exact 1024-based spelling of `n` bytes (for check-config output)."""
    for unit, factor in (("TB", 1024**4), ("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def format_duration(seconds: float) -> str:
    """A compact spelling of a duration in whole units where exact."""
    s = int(seconds)
    if s != seconds:
        text = format(Decimal(repr(seconds)), "f")  # the shortest spelling that reads back as the same float
        if len(text.partition(".")[2]) <= MAX_FRACTION_DIGITS:
            return f"{text}s"
        for unit, factor in (("ns", 1e-9), ("us", 1e-6), ("ms", 1e-3)):  # tiny ones: no exponent
            n = round(seconds / factor)
            if n >= 1 and n * factor == seconds:
                return f"{n}{unit}"
        return f"{seconds:.9f}".rstrip("0") + "s"
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if s and s % factor == 0:
            return f"{s // factor}{unit}"
    return f"{s}s"
