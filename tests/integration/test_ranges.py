"""Several byte ranges (RFC 9110 14.6, 15.3.7) against the real process: one
`multipart/byteranges` 206 with an exact Content-Length, merged ranges as a plain 206, too
many or heavily overlapping ranges as the whole file, If-Range, HEAD, and the same from the
hot cache, from a file larger than one read block, and from an encrypted store.
"""
from __future__ import annotations

import email.parser
import email.policy
import http.client
import uuid
from pathlib import Path
from typing import Optional

import pytest

from hmacfs.http.httpmsg import MAX_RANGES, RANGE_MERGE_GAP
from tests.support.client import Response, put, raw, request, url_path
from tests.support.hmacfs_proc import HmacfsProcess

SEGMENT = 1024 * 1024  # plaintext bytes per encrypted segment
HEADER = 64
RECORD = SEGMENT + 28


def pattern(size: int) -> bytes:
    """Bytes whose every position is recognisable, so a misplaced part cannot pass."""
    return b"".join(i.to_bytes(4, "big") for i in range(size // 4 + 1))[:size]


@pytest.fixture(scope="module")
def files(srv) -> dict[str, tuple[str, bytes]]:
    """A small file (served from the hot cache) and one larger than a 256 KiB read block."""
    out = {}
    for name, size, ctype in (("small", 10_000, "text/plain"), ("large", 700_000, "application/octet-stream")):
        path = f"{uuid.uuid4()}/{name}.bin"
        data = pattern(size)
        assert put(srv, path, data, content_type=ctype).status == 201
        assert request(srv.port, "GET", url_path(srv.prefix, path)).body == data  # warms the hot cache
        out[name] = path, data
    return out


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    work = tmp_path_factory.mktemp("enc")
    keys = work / "keys"
    keys.write_text(f"k1 {'11' * 32}\n")
    keys.chmod(0o600)
    proc = HmacfsProcess(work / "srv", {"encryption": {"enabled": True, "keyfile": str(keys)},
                                        "uploads": {"maxuploadsize": "20MB"}}).start()
    yield proc
    proc.close()


def get(srv, path: str, rng: Optional[str] = None, method: str = "GET", **headers: str) -> Response:
    if rng is not None:
        headers["Range"] = rng
    return request(srv.port, method, url_path(srv.prefix, path), headers=headers)


def boundary_of(r: Response) -> bytes:
    ctype = r.header("Content-Type")
    assert ctype.startswith("multipart/byteranges; boundary="), ctype
    return ctype.split("boundary=", 1)[1].encode()


def parts_of(r: Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/byteranges body, parsed strictly by hand (RFC 2046 5.1.1)."""
    assert r.status == 206 and r.header("Content-Range") is None
    assert int(r.header("Content-Length")) == len(r.body)
    delimiter = b"--" + boundary_of(r)
    opening, closing = delimiter + b"\r\n", b"\r\n" + delimiter + b"--\r\n"
    assert r.body.startswith(opening) and r.body.endswith(closing)
    parts = []
    for chunk in r.body[len(opening):-len(closing)].split(b"\r\n" + delimiter + b"\r\n"):
        head, blank, data = chunk.partition(b"\r\n\r\n")
        assert blank, chunk[:200]
        fields = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n"))
        parts.append((fields, data))
    return parts


def check_parts(r: Response, data: bytes, spans: list[tuple[int, int]], ctype: Optional[str] = None) -> None:
    """Each part holds the bytes its Content-Range names, in the order expected."""
    parts = parts_of(r)
    assert [f["Content-Range"] for f, _ in parts] == [f"bytes {a}-{b}/{len(data)}" for a, b in spans]
    for (fields, body), (first, last) in zip(parts, spans):
        assert body == data[first:last + 1]
        assert set(fields) == {"Content-Type", "Content-Range"}
        if ctype is not None:
            assert fields["Content-Type"] == ctype


@pytest.mark.parametrize("name, spans", [
    ("small", [(0, 9), (5000, 5099)]),
    ("small", [(0, 0), (1000, 1999), (9990, 9999)]),
    ("large", [(10, 19), (100_000, 399_999), (650_000, 699_999)]),  # a part longer than a read block
    ("large", [(0, 299_999), (300_100, 300_100)]),
])
def test_several_ranges_are_one_multipart_206(srv, files, name: str, spans: list[tuple[int, int]]) -> None:
    path, data = files[name]
    r = get(srv, path, "bytes=" + ",".join(f"{a}-{b}" for a, b in spans))
    check_parts(r, data, spans, "text/plain; charset=utf-8" if name == "small" else "application/octet-stream")
    assert r.header("ETag") and r.header("Accept-Ranges") == "bytes" and r.header("Content-Disposition")


def test_suffix_open_and_unsorted_ranges(srv, files) -> None:
    path, data = files["small"]
    r = get(srv, path, "bytes=-100, 5000-5009, 0-9,9000-")
    check_parts(r, data, [(0, 9), (5000, 5009), (9000, 9999)])  # ascending; the suffix merged into 9000-


def test_content_length_is_every_byte_sent(srv, files) -> None:
    """Read to the close: nothing after the closing delimiter, nothing missing before it."""
    path, _ = files["large"]
    target = url_path(srv.prefix, path).encode()
    reply = raw(srv.port, b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                b"Range: bytes=1-2,300000-600000\r\n\r\n", timeout=30)
    head, _, body = reply.partition(b"\r\n\r\n")
    fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    assert head.startswith(b"HTTP/1.1 206 ") and int(fields[b"Content-Length"]) == len(body)
    assert body.endswith(b"--" + fields[b"Content-Type"].split(b"boundary=")[1] + b"--\r\n")


def test_keep_alive_after_a_multipart_response(srv, files) -> None:
    path, data = files["small"]
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        for _ in range(3):
            conn.request("GET", url_path(srv.prefix, path), headers={"Range": "bytes=0-9,500-509"})
            resp = conn.getresponse()
            r = Response(resp.status, resp.headers, resp.read())
            check_parts(r, data, [(0, 9), (500, 509)])
        conn.request("GET", url_path(srv.prefix, path))
        assert conn.getresponse().read() == data
    finally:
        conn.close()


def test_a_mime_parser_reads_the_same_parts(srv, files) -> None:
    path, data = files["small"]
    r = get(srv, path, "bytes=0-99,200-299,-50")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + r.header("Content-Type").encode() + b"\r\n\r\n" + r.body)
    parts = list(message.iter_parts())
    assert [p["Content-Range"] for p in parts] == [f"bytes {a}-{b}/{len(data)}" for a, b in
                                                   ((0, 99), (200, 299), (9950, 9999))]
    assert [p.get_content_type() for p in parts] == ["text/plain"] * 3


@pytest.mark.parametrize("rng, first, last", [
    ("bytes=0-99,50-149", 0, 149),                          # overlapping
    ("bytes=100-199,0-99", 0, 199),                         # adjacent, unsorted
    (f"bytes=0-9,{10 + RANGE_MERGE_GAP - 1}-199", 0, 199),  # a gap smaller than a part head
    ("bytes=0-9,99999-,-0", 0, 9),                          # the unsatisfiable ones dropped
])
def test_ranges_merged_into_one_are_a_plain_206(srv, files, rng: str, first: int, last: int) -> None:
    path, data = files["small"]
    r = get(srv, path, rng)
    assert r.status == 206 and r.body == data[first:last + 1]
    assert r.header("Content-Range") == f"bytes {first}-{last}/{len(data)}"
    assert r.header("Content-Type") == "text/plain; charset=utf-8"


def spaced(count: int) -> str:
    step = RANGE_MERGE_GAP + 100
    return "bytes=" + ",".join(f"{k * step}-{k * step}" for k in range(count))


def test_range_count_and_overlap_are_bounded(srv, files) -> None:
    path, data = files["small"]
    check_parts(get(srv, path, spaced(MAX_RANGES)), data, [(k * 180, k * 180) for k in range(MAX_RANGES)])
    for rng in (spaced(MAX_RANGES + 1), spaced(50), "bytes=0-,0-", "bytes=" + ",".join(["0-5999"] * 2)):
        r = get(srv, path, rng)
        assert r.status == 200 and r.body == data and r.header("Content-Range") is None, rng


@pytest.mark.parametrize("rng", ["bytes=20000-,30000-30001", "bytes=-0,-0", "bytes=10000-10000, 10001-"])
def test_all_unsatisfiable_is_416(srv, files, rng: str) -> None:
    path, data = files["small"]
    r = get(srv, path, rng)
    assert r.status == 416 and r.header("Content-Range") == f"bytes */{len(data)}"


@pytest.mark.parametrize("rng", ["bytes=0-1,,", "bytes=0-1,5-2", "bytes=0-1,\u00b2-3", "bytes=0-1,x", "bytes=0-1 2-3"])
def test_malformed_ranges_are_ignored(srv, files, rng: str) -> None:
    path, data = files["small"]
    r = get(srv, path, rng)
    assert r.status == 200 and r.body == data


def test_if_range_gates_several_ranges(srv, files) -> None:
    path, data = files["small"]
    whole = get(srv, path)
    etag, modified = whole.header("ETag"), whole.header("Last-Modified")
    rng = "bytes=0-9,500-509"
    check_parts(get(srv, path, rng, **{"If-Range": etag}), data, [(0, 9), (500, 509)])
    check_parts(get(srv, path, rng, **{"If-Range": modified}), data, [(0, 9), (500, 509)])
    for stale in ('"0123456789abcdef0123456789abcdef"', "W/" + etag, "Mon, 01 Jan 2001 00:00:00 GMT"):
        r = get(srv, path, rng, **{"If-Range": stale})
        assert r.status == 200 and r.body == data, stale


@pytest.mark.parametrize("name", ["small", "large"])
def test_head_with_several_ranges(srv, files, name: str) -> None:
    path, _ = files[name]
    rng = "bytes=0-9,300-399"
    head, got = get(srv, path, rng, method="HEAD"), get(srv, path, rng)
    assert head.status == 206 and head.body == b""
    assert head.header("Content-Length") == got.header("Content-Length")  # same-length boundaries
    assert head.header("Content-Type").startswith("multipart/byteranges; boundary=")
    assert head.header("Content-Type") != got.header("Content-Type")  # a fresh boundary each time


@pytest.mark.parametrize("key", ["resumabledownloadsenabled", "chunkeddownloadsenabled"])
def test_ranges_off_serves_the_whole_file(tmp_path: Path, key: str) -> None:
    """Either seed key turns Range off (resumed and chunk-by-chunk downloads alike)."""
    proc = HmacfsProcess(tmp_path / "off", {"downloads": {key: False}}).start()
    try:
        path, data = f"{uuid.uuid4()}/f.bin", pattern(1000)
        assert put(proc, path, data).status == 201
        for rng in ("bytes=0-9,500-509", "bytes=0-9"):
            r = get(proc, path, rng)
            assert r.status == 200 and r.body == data and r.header("Accept-Ranges") == "none"
    finally:
        proc.close()


# -- encrypted store: the parts come from decrypted, authenticated segments --

def download(srv, path: str, rng: str) -> tuple[Response, bool]:
    """The response and whether its body was complete (False when the server cut it)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request("GET", url_path(srv.prefix, path), headers={"Range": rng})
        resp = conn.getresponse()
        try:
            return Response(resp.status, resp.headers, resp.read()), True
        except http.client.IncompleteRead as e:
            return Response(resp.status, resp.headers, e.partial), False
    finally:
        conn.close()


@pytest.fixture(scope="module")
def secret_file(enc) -> tuple[str, bytes]:
    path, data = f"{uuid.uuid4()}/secret.bin", pattern(2 * SEGMENT + 300_000)
    assert put(enc, path, data).status == 201
    return path, data


@pytest.mark.parametrize("spans", [
    [(0, 9), (SEGMENT - 5, SEGMENT + 5)],                                 # the second across a segment edge
    [(100, 199), (5000, 5099), (SEGMENT * 2 + 10, SEGMENT * 2 + 299_999)],  # two parts in one segment
    [(0, SEGMENT * 2 + 100), (SEGMENT * 2 + 1000, SEGMENT * 2 + 1000)],
])
def test_encrypted_several_ranges(enc, secret_file, spans: list[tuple[int, int]]) -> None:
    path, data = secret_file
    r, complete = download(enc, path, "bytes=" + ",".join(f"{a}-{b}" for a, b in spans))
    assert complete
    check_parts(r, data, spans, "application/octet-stream")


def test_encrypted_merged_head_and_bounded(enc, secret_file) -> None:
    path, data = secret_file
    r, _ = download(enc, path, f"bytes={SEGMENT}-{SEGMENT + 99},{SEGMENT + 50}-{SEGMENT + 199}")
    assert r.status == 206 and r.body == data[SEGMENT:SEGMENT + 200]
    assert r.header("Content-Range") == f"bytes {SEGMENT}-{SEGMENT + 199}/{len(data)}"
    head = get(enc, path, "bytes=0-9,-10", method="HEAD")
    got, _ = download(enc, path, "bytes=0-9,-10")
    assert head.status == 206 and head.body == b"" and head.header("Content-Length") == got.header("Content-Length")
    check_parts(got, data, [(0, 9), (len(data) - 10, len(data) - 1)])
    r, _ = download(enc, path, spaced(MAX_RANGES + 1))
    assert r.status == 200 and r.body == data


def test_encrypted_tampered_part_is_refused_or_cut(enc) -> None:
    """A part whose segment fails authentication: a clean 500 if it is the first, else the
    body is cut short, so altered bytes never arrive as a complete multipart body."""
    path, data = f"{uuid.uuid4()}/tampered.bin", pattern(2 * SEGMENT + 1000)
    assert put(enc, path, data).status == 201
    with open(enc.storage / path, "r+b") as f:  # flip one byte in the second segment
        f.seek(HEADER + RECORD + 100)
        byte = f.read(1)
        f.seek(HEADER + RECORD + 100)
        f.write(bytes([byte[0] ^ 1]))
    r, complete = download(enc, path, f"bytes=0-9,{SEGMENT + 10}-{SEGMENT + 19}")
    assert r.status == 206 and not complete
    assert r.body.startswith(b"--" + boundary_of(r)) and data[:10] in r.body and data[SEGMENT + 10:SEGMENT + 20] \
        not in r.body
    r, complete = download(enc, path, f"bytes={SEGMENT + 10}-{SEGMENT + 19},{2 * SEGMENT}-{2 * SEGMENT + 9}")
    assert r.status == 500 and complete
    assert request(enc.port, "GET", "/health").status == 200
