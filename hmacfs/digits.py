"""Numbers from the wire: ASCII digits only, bounded in length. Pure.

Strategy: Python's `str.isdigit` accepts Unicode digits ("²", "٣") that `int()` then
refuses, and `int()` itself refuses more than 4,300 digits with a ValueError: both used to
escape as 500s. Every number a client sends (Content-Length, chunk sizes, `expires`,
Range bounds, JWT claims) goes through these two functions instead, which answer None
for anything but a short run of ASCII digits, so the caller picks the 4xx.
"""
from __future__ import annotations

from typing import Optional, Union

_HEX = frozenset(b"0123456789abcdefABCDEF")
_DEC = frozenset(b"0123456789")


def _only(text: Union[str, bytes], alphabet: frozenset[int], max_digits: int) -> Optional[bytes]:
    if isinstance(text, str):
        if not text.isascii():
            return None
        text = text.encode("ascii")
    if not text or len(text) > max_digits or not all(c in alphabet for c in text):
        return None
    return text


def parse_decimal(text: Union[str, bytes], max_digits: int = 19) -> Optional[int]:
    """The value of 1..`max_digits` ASCII decimal digits, else None (no sign, no spaces)."""
    digits = _only(text, _DEC, max_digits)
    return None if digits is None else int(digits)


def parse_hex(text: Union[str, bytes], max_digits: int = 16) -> Optional[int]:
    """The value of 1..`max_digits` ASCII hex digits, else None (no `0x`, `+`, `_` or sign)."""
    digits = _only(text, _HEX, max_digits)
    return None if digits is None else int(digits, 16)
