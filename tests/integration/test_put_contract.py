"""PUT rows of shared/spec/protocol.md against the real process."""
from __future__ import annotations

import time
import uuid

import pytest

from hmacfs import auth
from tests.support.client import put, raw, request, signed_put, signed_v3, status_of, url_path


def fresh(name: str = "file.txt") -> str:
    return f"{uuid.uuid4()}/{name}"


@pytest.mark.parametrize("protocol", ["v", "v2", "token"])
def test_put_then_get_roundtrip(srv, protocol: str) -> None:
    path = fresh("Bildschirmfoto 2026-11-21 um 10.00.00 (\u00e4).png")
    r = put(srv, path, b"\x89PNG data", protocol, content_type="image/png")
    assert r.status == 201, r
    assert (srv.storage / path).read_bytes() == b"\x89PNG data"
    g = request(srv.port, "GET", url_path(srv.prefix, path))
    assert g.status == 200 and g.body == b"\x89PNG data" and g.header("Content-Type") == "image/png"


def test_v_lowercase_hex_escapes_as_prosody_sends(srv) -> None:
    path = fresh("a (b).txt")
    mac = auth.mac_hex(srv.secret.encode(), auth.message_v(path, 3))
    target = srv.prefix + path.replace(" ", "%20").replace("(", "%28").replace(")", "%29").lower() + f"?v={mac}"
    assert request(srv.port, "PUT", target, b"abc").status == 201


def test_raw_utf8_request_line(srv) -> None:
    path = fresh("gr\u00fc\u00dfe.txt")
    mac = auth.mac_hex(srv.secret.encode(), auth.message_v(path, 2))
    req = f"PUT {srv.prefix}{path}?v={mac} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    assert status_of(raw(srv.port, req.encode("utf-8"))) == 201
    assert (srv.storage / path).read_bytes() == b"hi"


def test_v3_put_and_expired(srv) -> None:
    path = fresh()
    ok = signed_v3(srv.prefix, srv.secret, path, "PUT", int(time.time()) + 60)
    assert request(srv.port, "PUT", ok, b"data").status == 201
    old = signed_v3(srv.prefix, srv.secret, fresh(), "PUT", int(time.time()) - 1)
    assert request(srv.port, "PUT", old, b"data").status == 410


def test_previous_secret_still_verifies(srv) -> None:
    path = fresh()
    target = signed_put(srv.prefix, "old-secret", path, 2)
    assert request(srv.port, "PUT", target, b"hi").status == 201


def test_jwt_put_201_and_bad_tokens_401(srv) -> None:
    slot = uuid.uuid4().hex
    now = int(time.time())
    claims = {"sub": "alice@localhost", "iat": now, "exp": now + 300, "slot": slot, "filename": "f.txt",
              "filesize": 4, "filetype": "text/plain"}
    token = auth.jwt_encode(srv.secret.encode(), claims)
    target = url_path(srv.prefix, f"{slot}/f.txt")
    r = request(srv.port, "PUT", target, b"data", {"Authorization": "Bearer " + token})
    assert r.status == 201, r
    bad = auth.jwt_encode(b"wrong", claims)
    r = request(srv.port, "PUT", url_path(srv.prefix, f"{slot}x/f.txt"), b"data", {"Authorization": "Bearer " + bad})
    assert r.status == 401 and r.header("WWW-Authenticate") == "Bearer"
    r = request(srv.port, "PUT", target, b"data", {"Authorization": "Bearer garbage"})
    assert r.status == 401


def test_jwt_size_mismatch_413_and_expired_410(srv) -> None:
    slot, now = uuid.uuid4().hex, int(time.time())
    claims = {"exp": now + 300, "slot": slot, "filename": "f.txt", "filesize": 5}
    target = url_path(srv.prefix, f"{slot}/f.txt")
    h = {"Authorization": "Bearer " + auth.jwt_encode(srv.secret.encode(), claims)}
    assert request(srv.port, "PUT", target, b"data", h).status == 413
    h = {"Authorization": "Bearer " + auth.jwt_encode(srv.secret.encode(), {**claims, "exp": now - 5})}
    assert request(srv.port, "PUT", target, b"12345", h).status == 410


@pytest.mark.parametrize("case, expected", [
    ("no signature", 403), ("wrong mac", 403), ("wrong size", 403), ("over limit", 413),
])
def test_put_refusals(srv, case: str, expected: int) -> None:
    path = fresh()
    data = b"x" * 10
    if case == "no signature":
        target = url_path(srv.prefix, path)
    elif case == "wrong mac":
        target = url_path(srv.prefix, path) + "?v=" + "0" * 64
    elif case == "wrong size":
        target = signed_put(srv.prefix, srv.secret, path, 11)
    else:
        data = b"x" * (1024 * 1024 + 1)
        target = signed_put(srv.prefix, srv.secret, path, len(data))
    r = request(srv.port, "PUT", target, data)
    assert r.status == expected, r
    assert r.header("Access-Control-Allow-Origin") == "*"  # CORS on errors too
    assert not (srv.storage / path).exists()


def test_conflict_keeps_original(srv) -> None:
    path = fresh()
    assert put(srv, path, b"first").status == 201
    r = put(srv, path, b"other")
    assert r.status == 409 and (srv.storage / path).read_bytes() == b"first"


@pytest.mark.parametrize("target", [
    "/upload/../x.txt", "/upload/a/%2e%2e/%2e%2e/x.txt", "/upload/a%2fb.txt", "/upload/.hmacfs/meta.sqlite3",
    "/upload/a//b.txt", "/upload/a%00.txt", "/upload/a%5c..%5cb.txt",
])
def test_bad_paths_400(srv, target: str) -> None:
    resp = raw(srv.port, f"PUT {target}?v=00 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
               "Connection: close\r\n\r\nx".encode())
    assert status_of(resp) == 400


def test_411_without_length(srv) -> None:
    path = fresh()
    resp = raw(srv.port, f"PUT {signed_put(srv.prefix, srv.secret, path, 1)} HTTP/1.1\r\nHost: x\r\n"
               "Connection: close\r\n\r\n".encode())
    assert status_of(resp) == 411


CHUNKED_BODY = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"


def chunked_put(target: str, extra: str = "") -> bytes:
    return (f"PUT {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n{extra}"
            "Connection: close\r\n\r\n").encode() + CHUNKED_BODY


def test_chunked_body_accepted_for_v3(srv) -> None:
    path = fresh()
    target = signed_v3(srv.prefix, srv.secret, path, "PUT", int(time.time()) + 60)
    assert status_of(raw(srv.port, chunked_put(target))) == 201
    assert (srv.storage / path).read_bytes() == b"hello world"


def test_chunked_body_accepted_for_jwt_with_the_signed_length(srv) -> None:
    slot, now = uuid.uuid4().hex, int(time.time())
    for size, status in ((11, 201), (12, 413)):
        name = f"f{size}.txt"
        token = auth.jwt_encode(srv.secret.encode(), {"exp": now + 60, "slot": slot, "filename": name,
                                                      "filesize": size})
        resp = raw(srv.port, chunked_put(url_path(srv.prefix, f"{slot}/{name}"), f"Authorization: Bearer {token}\r\n"))
        assert status_of(resp) == status
        assert (srv.storage / slot / name).exists() == (status == 201)


@pytest.mark.parametrize("protocol", ["v", "v2", "token"])
def test_chunked_body_is_411_before_any_byte_for_length_signing_protocols(srv, protocol: str) -> None:
    path = fresh()
    target = signed_put(srv.prefix, srv.secret, path, 11, protocol)
    head = (f"PUT {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n"
            "\r\n").encode()
    resp = raw(srv.port, head)  # the body is never sent: the answer must come first, without 100
    assert status_of(resp) == 411 and b"100 Continue" not in resp
    assert not (srv.storage / path).exists()
    assert list((srv.storage / ".hmacfs" / "tmp").iterdir()) == []


def test_both_length_and_chunked_refused(srv) -> None:
    path = fresh()
    head = (f"PUT {signed_put(srv.prefix, srv.secret, path, 5)} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert status_of(raw(srv.port, head.encode())) == 400


def test_body_ends_early_stores_nothing(srv) -> None:
    path = fresh()
    head = f"PUT {signed_put(srv.prefix, srv.secret, path, 100)} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    import socket
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(head.encode() + b"only part")
        s.shutdown(socket.SHUT_WR)
        resp = s.recv(4096)
    assert resp == b"" or status_of(resp) == 400
    assert not (srv.storage / path).exists()
    assert list((srv.storage / ".hmacfs" / "tmp").iterdir()) == []


def test_expect_100_continue_refuses_before_body(srv) -> None:
    import socket
    path = fresh()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(f"PUT {url_path(srv.prefix, path)}?v=bad HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  "Expect: 100-continue\r\n\r\n".encode())
        first = s.recv(4096)  # the final status arrives without us sending a byte of body
    assert status_of(first) == 403
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(f"PUT {signed_put(srv.prefix, srv.secret, path, 5)} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  "Expect: 100-continue\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"hello")
        assert status_of(s.recv(4096)) == 201


def test_keep_alive_carries_several_requests(srv) -> None:
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    paths = [fresh() for _ in range(3)]
    for p in paths:
        conn.request("PUT", signed_put(srv.prefix, srv.secret, p, 3), body=b"abc")
        resp = conn.getresponse()
        assert resp.status == 201 and resp.read() == b""
    for p in paths:
        conn.request("GET", url_path(srv.prefix, p))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"abc"
    conn.close()


def test_small_refused_body_keeps_the_connection(srv) -> None:
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("PUT", url_path(srv.prefix, fresh()) + "?v=" + "0" * 64, body=b"small body")
    resp = conn.getresponse()
    assert resp.status == 403 and resp.getheader("Connection") != "close"
    resp.read()
    path = fresh()
    conn.request("PUT", signed_put(srv.prefix, srv.secret, path, 2), body=b"ok")  # same connection
    resp = conn.getresponse()
    assert resp.status == 201 and resp.getheader("Location") == url_path(srv.prefix, path)
    conn.close()
