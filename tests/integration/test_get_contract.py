"""GET/HEAD, DELETE and OPTIONS rows of shared/spec/protocol.md against the real process."""
from __future__ import annotations

import hashlib
import time
import uuid

import pytest

from hmacfs import auth
from tests.support.client import put, raw, request, signed_v3, status_of, url_path

CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"


@pytest.fixture(scope="module")
def stored(srv):
    path = f"{uuid.uuid4()}/report \u00e4.txt"
    data = bytes(range(256)) * 40  # 10240 bytes
    assert put(srv, path, data, content_type="text/plain").status == 201
    return path, data


def test_get_headers(srv, stored) -> None:
    path, data = stored
    r = request(srv.port, "GET", url_path(srv.prefix, path))
    assert r.status == 200 and r.body == data
    assert r.header("Content-Length") == str(len(data))
    assert r.header("ETag") == '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    assert r.header("Last-Modified") and r.header("Accept-Ranges") == "bytes"
    assert r.header("X-Content-Type-Options") == "nosniff" and r.header("Content-Security-Policy") == CSP
    assert r.header("Content-Disposition") == ("inline; filename=\"report _.txt\"; "
                                               "filename*=UTF-8''report%20%C3%A4.txt")
    assert r.header("Access-Control-Allow-Origin") == "*" and "ETag" in r.header("Access-Control-Expose-Headers")


def test_head_has_headers_no_body(srv, stored) -> None:
    path, data = stored
    r = request(srv.port, "HEAD", url_path(srv.prefix, path))
    assert r.status == 200 and r.body == b"" and r.header("Content-Length") == str(len(data))


@pytest.mark.parametrize("rng, status, first, last", [
    ("bytes=0-9", 206, 0, 9), ("bytes=10000-", 206, 10000, 10239), ("bytes=-5", 206, 10235, 10239),
    ("bytes=0-0,5-6", 206, 0, 6),
])
def test_ranges(srv, stored, rng, status, first, last) -> None:
    path, data = stored
    r = request(srv.port, "GET", url_path(srv.prefix, path), headers={"Range": rng})
    assert r.status == status and r.body == data[first:last + 1]
    if status == 206:
        assert r.header("Content-Range") == f"bytes {first}-{last}/{len(data)}"


def test_unsatisfiable_range_416(srv, stored) -> None:
    path, data = stored
    r = request(srv.port, "GET", url_path(srv.prefix, path), headers={"Range": "bytes=99999-"})
    assert r.status == 416 and r.header("Content-Range") == f"bytes */{len(data)}"


def test_conditional_304_and_if_range(srv, stored) -> None:
    path, data = stored
    first = request(srv.port, "GET", url_path(srv.prefix, path))
    etag, lm = first.header("ETag"), first.header("Last-Modified")
    r = request(srv.port, "GET", url_path(srv.prefix, path), headers={"If-None-Match": etag})
    assert r.status == 304 and r.body == b"" and r.header("ETag") == etag
    assert request(srv.port, "GET", url_path(srv.prefix, path), headers={"If-Modified-Since": lm}).status == 304
    r = request(srv.port, "GET", url_path(srv.prefix, path), headers={"Range": "bytes=0-1", "If-Range": etag})
    assert r.status == 206
    r = request(srv.port, "GET", url_path(srv.prefix, path), headers={"Range": "bytes=0-1", "If-Range": '"old"'})
    assert r.status == 200 and r.body == data


@pytest.mark.parametrize("ctype, disposition", [
    ("text/html", "attachment"), ("image/svg+xml", "attachment"), ("image/png", "inline"),
    ("application/xhtml+xml", "attachment"),
])
def test_active_content_never_inline(srv, ctype, disposition) -> None:
    path = f"{uuid.uuid4()}/x.bin"
    assert put(srv, path, b"<script>alert(1)</script>", protocol="v2", content_type=ctype).status == 201
    r = request(srv.port, "GET", url_path(srv.prefix, path))
    assert r.header("Content-Disposition").startswith(disposition)
    assert r.header("Content-Security-Policy") == CSP and r.header("X-Content-Type-Options") == "nosniff"


@pytest.mark.parametrize("target", ["/upload/", "/upload", "/upload/nonexistent/file.txt", "/elsewhere",
                                    "/upload/.hmacfs/tmp"])
def test_missing_dirs_and_internal_never_served(srv, stored, target) -> None:
    status = request(srv.port, "GET", target).status
    assert status in (400, 404)
    directory = url_path(srv.prefix, stored[0].split("/")[0])
    assert request(srv.port, "GET", directory).status == 404  # a directory is never listed


def test_options_preflight_without_auth(srv) -> None:
    r = request(srv.port, "OPTIONS", "/upload/any/thing.png",
                headers={"Origin": "http://chat.example", "Access-Control-Request-Method": "PUT"})
    assert r.status == 204
    methods = r.header("Access-Control-Allow-Methods")
    assert all(m in methods for m in ("OPTIONS", "HEAD", "GET", "PUT"))
    assert "Authorization" in r.header("Access-Control-Allow-Headers")
    assert "Content-Type" in r.header("Access-Control-Allow-Headers")
    assert int(r.header("Access-Control-Max-Age")) > 0 and r.header("Access-Control-Allow-Origin") == "*"


def test_delete_v3_and_metronome_token(srv) -> None:
    a, b = f"{uuid.uuid4()}/a.txt", f"{uuid.uuid4()}/b.txt"
    assert put(srv, a, b"a").status == 201 and put(srv, b, b"b").status == 201
    exp = int(time.time()) + 60
    assert request(srv.port, "DELETE", url_path(srv.prefix, a)).status == 403
    assert request(srv.port, "DELETE", signed_v3(srv.prefix, srv.secret, a, "GET", exp)).status == 403
    assert request(srv.port, "DELETE", signed_v3(srv.prefix, srv.secret, a, "DELETE", exp)).status == 204
    assert not (srv.storage / a).exists() and not (srv.storage / a).parent.exists()
    assert request(srv.port, "GET", url_path(srv.prefix, a)).status == 404
    assert request(srv.port, "DELETE", signed_v3(srv.prefix, srv.secret, a, "DELETE", exp)).status == 404
    token = auth.mac_hex(srv.secret.encode(), auth.message_delete_token(b, "del-secret"))
    assert request(srv.port, "DELETE", url_path(srv.prefix, b) + f"?token={token}").status == 204


def test_method_not_allowed(srv) -> None:
    r = request(srv.port, "PATCH", "/upload/a/b.txt", b"x")
    assert r.status == 405 and "PUT" in r.header("Allow")


def test_malformed_requests(srv) -> None:
    assert raw(srv.port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert status_of(raw(srv.port, b"GET / HTTP/2.0\r\n\r\n")) == 505
    assert status_of(raw(srv.port, b"GET /x HTTP/1.1\r\nBad Header\r\n\r\n")) == 400
    assert status_of(raw(srv.port, b"GET /x HTTP/1.1\r\n" + b"X-A: " + b"a" * 70000 + b"\r\n\r\n")) in (414, 431)
    many = b"".join(b"X-%d: y\r\n" % i for i in range(150))
    assert status_of(raw(srv.port, b"GET /x HTTP/1.1\r\n" + many + b"\r\n")) == 431


def test_health_and_ready(srv) -> None:
    assert request(srv.port, "GET", "/health").body == b"ok\n"
    assert request(srv.port, "GET", "/.hmacfs/health").status == 200
    assert request(srv.port, "GET", "/ready").status == 200
    assert request(srv.metrics_port, "GET", "/health").status == 200


def test_small_file_changed_outside_hmacfs_is_never_served_stale(srv) -> None:
    import os
    path = f"{uuid.uuid4()}/hot.txt"
    assert put(srv, path, b"first").status == 201
    for _ in range(3):  # warm the small-file cache
        assert request(srv.port, "GET", url_path(srv.prefix, path)).body == b"first"
    tmp = srv.storage / (path + ".new")
    tmp.write_bytes(b"second!")
    os.replace(tmp, srv.storage / path)  # an operator replaces the file by hand
    r = request(srv.port, "GET", url_path(srv.prefix, path))
    assert r.body == b"second!" and r.header("ETag") == '"' + hashlib.sha256(b"second!").hexdigest()[:32] + '"'
    os.unlink(srv.storage / path)
    assert request(srv.port, "GET", url_path(srv.prefix, path)).status == 404


def test_deleted_small_file_is_gone_at_once(srv) -> None:
    path = f"{uuid.uuid4()}/gone.txt"
    assert put(srv, path, b"x").status == 201
    assert request(srv.port, "GET", url_path(srv.prefix, path)).status == 200
    exp = int(time.time()) + 60
    assert request(srv.port, "DELETE", signed_v3(srv.prefix, srv.secret, path, "DELETE", exp)).status == 204
    assert request(srv.port, "GET", url_path(srv.prefix, path)).status == 404
