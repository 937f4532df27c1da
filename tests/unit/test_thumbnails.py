"""The thumbnailer's pure decisions: which bytes are an image, which records are worth a look."""
from __future__ import annotations

import pytest

from hmacfs.meta import FileRecord
from hmacfs.services.thumbnails import may_be_image, parse_size, sniff


def record(path: str, content_type: str) -> FileRecord:
    return FileRecord(path=path, size=1, content_type=content_type, sha256="0" * 64, created=0.0)


@pytest.mark.parametrize("head, expected", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ("png", "png")),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", ("jpeg", "jpeg")),
    (b"GIF89a\x01\x00\x01\x00", ("gif", "png")),
    (b"GIF87a\x01\x00\x01\x00", ("gif", "png")),
    (b"RIFF\x10\x00\x00\x00WEBPVP8 ", ("webp", "png")),
    (b"RIFF\x10\x00\x00\x00WAVEfmt ", None),
    (b'<svg xmlns="http://www.w3.org/2000/svg">', None),
    (b"<?xml version='1.0'?><svg", None),
    (b"push graphic-context", None),  # MVG: ImageMagick's own script format
    (b"%!PS-Adobe-3.0", None),
    (b"", None),
])
def test_sniff_knows_four_formats_only(head: bytes, expected) -> None:
    assert sniff(head) == expected


@pytest.mark.parametrize("path, ctype, expected", [
    ("a/p.png", "image/png", True),
    ("a/p", "image/jpeg; charset=x", True),
    ("a/p.webp", "application/octet-stream", True),
    ("a/p.bin", "application/octet-stream", False),
    ("a/p.svg", "image/svg+xml", False),
    ("a/p.png", "image/svg+xml", False),
    ("a/p.png", "text/plain", False),
    ("a/p.jpg", "", True),
])
def test_may_be_image(path: str, ctype: str, expected: bool) -> None:
    assert may_be_image(record(path, ctype)) is expected


def test_parse_size() -> None:
    assert parse_size("200x200") == (200, 200)
    assert parse_size(" 320X240 ") == (320, 240)
    for bad in ("200", "x", "0x5", "5x0", "4097x10", "1.5x2", "-1x5", "ax b"):
        with pytest.raises(ValueError):
            parse_size(bad)
