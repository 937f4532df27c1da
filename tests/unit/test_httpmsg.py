"""Range, conditional requests and Content-Disposition (RFC 9110, RFC 6266)."""
from __future__ import annotations

import pytest

from hmacfs.errors import HTTPError
from hmacfs.http import httpmsg


@pytest.mark.parametrize("header, size, expected", [
    (None, 10, None), ("bytes=0-4", 10, (0, 4)), ("bytes=5-", 10, (5, 9)), ("bytes=-3", 10, (7, 9)),
    ("bytes=-30", 10, (0, 9)), ("bytes=2-100", 10, (2, 9)), ("bytes=0-0", 1, (0, 0)),
    ("items=0-1", 10, None), ("bytes=0-1,3-4", 10, None), ("bytes=x-1", 10, None), ("bytes=5-2", 10, None),
])
def test_parse_range(header, size, expected) -> None:
    assert httpmsg.parse_range(header, size) == expected


@pytest.mark.parametrize("header, size", [("bytes=10-", 10), ("bytes=10-20", 10), ("bytes=-0", 10), ("bytes=-1", 0)])
def test_unsatisfiable_range_is_416(header, size) -> None:
    with pytest.raises(HTTPError) as e:
        httpmsg.parse_range(header, size)
    assert e.value.status == 416 and e.value.headers["Content-Range"] == f"bytes */{size}"


def test_conditionals() -> None:
    etag, mtime = '"abc"', 1700000000.5
    assert httpmsg.not_modified('"abc"', None, etag, mtime)
    assert httpmsg.not_modified('W/"abc", "x"', None, etag, mtime)
    assert httpmsg.not_modified("*", None, etag, mtime)
    assert not httpmsg.not_modified('"x"', httpmsg.http_date(mtime + 10), etag, mtime)  # INM wins over IMS
    assert httpmsg.not_modified(None, httpmsg.http_date(mtime), etag, mtime)
    assert not httpmsg.not_modified(None, httpmsg.http_date(mtime - 10), etag, mtime)
    assert not httpmsg.not_modified(None, "garbage", etag, mtime)
    assert httpmsg.range_applies(None, etag, mtime)
    assert httpmsg.range_applies('"abc"', etag, mtime)
    assert not httpmsg.range_applies('W/"abc"', etag, mtime)
    assert httpmsg.range_applies(httpmsg.http_date(mtime), etag, mtime)
    assert not httpmsg.range_applies(httpmsg.http_date(mtime - 5), etag, mtime)


@pytest.mark.parametrize("ctype, disposition", [
    ("image/png", "inline"), ("image/svg+xml", "attachment"), ("text/html", "attachment"),
    ("text/plain; charset=utf-8", "inline"), ("video/mp4", "inline"), ("audio/ogg", "inline"),
    ("application/xml", "attachment"), ("application/javascript", "attachment"), ("text/xml", "attachment"),
])
def test_content_disposition(ctype, disposition) -> None:
    value = httpmsg.content_disposition("Bild \u00e4\"x\".png", ctype)
    assert value.startswith(disposition + ";")
    assert "filename*=UTF-8''Bild%20%C3%A4%22x%22.png" in value
    assert 'filename="Bild __x_.png"' in value


def test_clean_content_type() -> None:
    assert httpmsg.clean_content_type("Image/PNG") == "image/png"
    assert httpmsg.clean_content_type("text/plain; charset=utf-8") == "text/plain; charset=utf-8"
    for bad in ("", "text", "text/plain\r\nX: y", "a/b; c", None):
        assert httpmsg.clean_content_type(bad) is None


@pytest.mark.parametrize("name, expected", [("a.tar.gz", "application/gzip"), ("a.svgz", "application/gzip"),
                                            ("a.tar.xz", "application/x-xz"), ("a.png", "image/png"),
                                            ("noext", "application/octet-stream")])
def test_guess_type_lets_the_compression_win(name: str, expected: str) -> None:
    assert httpmsg.guess_type(name) == expected
