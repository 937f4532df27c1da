"""Range, conditional requests and Content-Disposition (RFC 9110, RFC 6266)."""
from __future__ import annotations

import re
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hmacfs.errors import HTTPError
from hmacfs.http import httpmsg
from hmacfs.http.httpmsg import MAX_RANGES, RANGE_MERGE_GAP, parse_ranges


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


GAP = RANGE_MERGE_GAP


@pytest.mark.parametrize("header, size, expected", [
    ("bytes=0-4", 10, [(0, 4)]),                                    # single
    ("bytes=5-", 10, [(5, 9)]), ("bytes=-3", 10, [(7, 9)]),         # open-ended, suffix
    ("bytes=-30", 10, [(0, 9)]), ("bytes=2-100", 10, [(2, 9)]),     # clamped to the file
    ("bytes=0-9,200-299,-10", 1000, [(0, 9), (200, 299), (990, 999)]),  # several
    ("bytes=0-9, 200-299 ,\t-10", 1000, [(0, 9), (200, 299), (990, 999)]),  # OWS around list elements
    ("BYTES=0-9,500-", 1000, [(0, 9), (500, 999)]),
    ("bytes=-10,500-599,0-9", 1000, [(0, 9), (500, 599), (990, 999)]),  # unsorted: sorted
    ("bytes=0-99,50-149", 1000, [(0, 149)]),                        # overlapping: merged
    ("bytes=0-99,100-199", 1000, [(0, 199)]),                       # adjacent: merged
    (f"bytes=0-99,{100 + GAP - 1}-299", 1000, [(0, 299)]),          # a gap under the limit: merged
    (f"bytes=0-99,{100 + GAP}-299", 1000, [(0, 99), (100 + GAP, 299)]),  # a gap at the limit: two parts
    ("bytes=0-9,5-5,100-", 1000, [(0, 9), (100, 999)]),             # contained
    ("bytes=0-9,5000-6000,-0", 1000, [(0, 9)]),                     # unsatisfiable ones dropped
    ("bytes=500-599,0-0", 1000, [(0, 0), (500, 599)]),
])
def test_parse_ranges(header: str, size: int, expected: list) -> None:
    assert parse_ranges(header, size) == expected


def spaced(count: int, width: int = 1) -> str:
    """`count` ranges far enough apart that none merges."""
    step = width + GAP + 20
    return "bytes=" + ",".join(f"{k * step}-{k * step + width - 1}" for k in range(count))


def test_range_count_is_bounded_after_merging() -> None:
    size = 100_000
    assert len(parse_ranges(spaced(MAX_RANGES), size)) == MAX_RANGES
    assert parse_ranges(spaced(MAX_RANGES + 1), size) is None  # the whole file, as nginx's max_ranges
    assert parse_ranges(spaced(50), size) is None
    tiny = "bytes=" + ",".join(f"{k}-{k}" for k in range(0, 1000, 2))  # 500 ranges, merged into one
    assert parse_ranges(tiny, size) == [(0, 998)]


def test_overlap_beyond_the_file_size_serves_the_whole_file() -> None:
    """Requested lengths (before merging) adding up to more than the file: 200 (CVE-2011-3192)."""
    assert parse_ranges("bytes=0-,0-", 1000) is None
    assert parse_ranges("bytes=0-599,400-999", 1000) is None
    assert parse_ranges("bytes=0-499,400-899", 1000) == [(0, 899)]  # 500 + 500 <= 1000: merged
    assert parse_ranges("bytes=" + ",".join(["0-99"] * 11), 1000) is None
    assert parse_ranges("bytes=" + ",".join(["0-99"] * 10), 1000) == [(0, 99)]


@pytest.mark.parametrize("header, size", [
    ("bytes=10-", 10), ("bytes=10-20, 30-", 10), ("bytes=-0", 10), ("bytes=-0,-0", 10), ("bytes=-1", 0),
    ("bytes=0-0,5-", 0), ("bytes=99999999999-,10-11", 10),
])
def test_all_unsatisfiable_is_416(header: str, size: int) -> None:
    with pytest.raises(HTTPError) as e:
        parse_ranges(header, size)
    assert e.value.status == 416 and e.value.headers["Content-Range"] == f"bytes */{size}"


@pytest.mark.parametrize("header", [
    None, "", "bytes", "bytes=", "bytes=,", "0-4", "items=0-1", "bytes:0-1", "bytes=0-1;2-3",
    "bytes=1-2,,", "bytes=1-2,,3-4", "bytes=,1-2", "bytes=1-2, ,3-4",          # empty list elements
    "bytes=x-1", "bytes=5-2", "bytes=0-1,5-2", "bytes=-", "bytes=0-1,-", "bytes=0--1", "bytes=-1-2",
    "bytes=1 0-20", "bytes=0-1 0", "bytes=0-1,2 0-30",                       # spaces inside numbers
    "bytes=\u00b2-", "bytes=0-\u0661", "bytes=\uff11-2", "bytes=\u00a00-1",  # non-ASCII digits or space
    "bytes=+1-2", "bytes=0x1-2", "bytes=1_0-20", "bytes=1.0-2",
    "bytes=" + "9" * 20 + "-", "bytes=0-" + "9" * 30, "bytes=" + "9" * 4400 + "-",  # huge numbers
    "bytes=0-1,-" + "9" * 20,
])
def test_malformed_ranges_are_ignored(header: Optional[str]) -> None:
    assert parse_ranges(header, 1000) is None
    assert httpmsg.parse_range(header, 1000) is None


def test_single_range_parser_agrees_with_parse_ranges() -> None:
    for header in ("bytes=0-4", "bytes=-3", "bytes=7-", " bytes = 2 - 3 "):
        assert [httpmsg.parse_range(header, 10)] == parse_ranges(header, 10)


@st.composite
def _range_requests(draw: st.DrawFn) -> tuple[int, list[tuple[str, int, int]]]:
    """A file size and range-specs mostly inside it (some past its end), short enough that
    merging, the part limit, overlap beyond the size and 416 are all reached often."""
    size = draw(st.one_of(st.integers(0, 300), st.integers(2000, 30000)))
    short = st.integers(0, max(1, size // 100))
    starts = {"int": st.integers(0, size + size // 8 + 2), "suffix": short,
              "open": st.integers(max(0, size - size // 10 - 5), size + 2)}  # resumes are near the end
    kinds = st.sampled_from(["int"] * 8 + ["open", "suffix"])
    specs = []
    for _ in range(draw(st.integers(1, 60))):
        kind = draw(kinds)
        specs.append((kind, draw(starts[kind]), draw(short) if kind == "int" else 0))
    return size, specs


def _spec_text(kind: str, a: int, n: int) -> str:
    return {"int": f"{a}-{a + n}", "open": f"{a}-", "suffix": f"-{a}"}[kind]


def _requested(kind: str, a: int, n: int, size: int) -> range:
    """The satisfiable bytes one spec asks for, by the RFC's definition (an oracle, not the parser)."""
    if kind == "suffix":
        return range(max(0, size - a), size if a else 0)
    return range(a, min(a + n + 1, size)) if kind == "int" else range(a, size)


def _map(size: int, ranges: list[range]) -> bytearray:
    """One byte per file byte: 1 where some range covers it."""
    covered = bytearray(size)
    for r in ranges:
        covered[r.start:r.stop] = b"\x01" * len(r)
    return covered


def _fill_small_holes(covered: bytearray) -> bytearray:
    """Also cover every hole between two covered bytes that is shorter than the merge gap."""
    out = bytearray(covered)
    for hole in re.finditer(rb"(?<=\x01)\x00+(?=\x01)", covered):
        if hole.end() - hole.start() < GAP:
            out[hole.start():hole.end()] = b"\x01" * (hole.end() - hole.start())
    return out


@settings(max_examples=400, deadline=None)
@given(_range_requests(), st.sampled_from([",", ", ", " ,\t"]))
def test_parse_ranges_property(request: tuple[int, list[tuple[str, int, int]]], sep: str) -> None:
    size, specs = request
    header = "bytes=" + sep.join(_spec_text(*spec) for spec in specs)
    asked = [_requested(*spec, size) for spec in specs]
    try:
        spans = parse_ranges(header, size)
    except HTTPError as e:
        assert e.status == 416 and not any(asked)
        return
    assert any(asked), "satisfiable ranges were refused"
    expected = _fill_small_holes(_map(size, asked))
    if spans is None:  # the whole file: only for heavy overlap or too many parts
        assert sum(map(len, asked)) > size or len(re.findall(rb"\x01+", expected)) > MAX_RANGES
        return
    assert sum(map(len, asked)) <= size and len(spans) <= MAX_RANGES
    assert spans == sorted(spans)
    for first, last in spans:
        assert type(first) is int and type(last) is int and 0 <= first <= last < size
    for (_, last), (first, _) in zip(spans, spans[1:]):
        assert first - last - 1 >= GAP  # disjoint, not adjacent, not within the merge gap
    # exactly the requested bytes, plus the small holes merged over
    assert _map(size, [range(first, last + 1) for first, last in spans]) == expected


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
