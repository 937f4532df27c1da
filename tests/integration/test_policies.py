"""Rows that need their own server configuration: extensions, free space, signed downloads,
file expiry, CORS origins, connection and worker limits, Unix and IPv6 listeners."""
from __future__ import annotations

import socket
import time
import uuid

import pytest

from hmacfs import auth
from tests.support.client import put, raw, request, signed_put, signed_v3, status_of, url_path, wait_for_gauge


def test_extension_policy_415_case_insensitive(hmacfs_factory) -> None:
    srv = hmacfs_factory({"uploads": {"allowedextensions": [".png", ".JPG"], "blockedextensions": [".exe"]}})
    assert put(srv, f"{uuid.uuid4()}/a.PNG", b"x").status == 201
    assert put(srv, f"{uuid.uuid4()}/b.jpg", b"x").status == 201
    r = put(srv, f"{uuid.uuid4()}/c.html", b"x")
    assert r.status == 415 and r.header("Access-Control-Allow-Origin") == "*"


def test_minfreebytes_507(hmacfs_factory) -> None:
    srv = hmacfs_factory({"server": {"minfreebytes": "1PB"}})
    path = f"{uuid.uuid4()}/a.txt"
    assert put(srv, path, b"x").status == 507 and not (srv.storage / path).exists()


def test_requiresignature_for_downloads(hmacfs_factory) -> None:
    srv = hmacfs_factory({"downloads": {"requiresignature": True}})
    path = f"{uuid.uuid4()}/a.txt"
    assert put(srv, path, b"data").status == 201
    assert request(srv.port, "GET", url_path(srv.prefix, path)).status == 403
    exp = int(time.time()) + 60
    r = request(srv.port, "GET", signed_v3(srv.prefix, srv.secret, path, "GET", exp))
    assert r.status == 200 and r.body == b"data"
    assert request(srv.port, "HEAD", signed_v3(srv.prefix, srv.secret, path, "GET", exp)).status == 200
    assert request(srv.port, "GET", signed_v3(srv.prefix, srv.secret, path, "GET", int(time.time()) - 1)).status == 410


def test_jwt_expires_claim_is_the_file_lifetime(hmacfs) -> None:
    slot, now = uuid.uuid4().hex, int(time.time())
    claims = {"exp": now + 300, "slot": slot, "filename": "f.txt", "filesize": 4, "expires": now + 2,
              "sub": "bob@localhost"}
    h = {"Authorization": "Bearer " + auth.jwt_encode(hmacfs.secret.encode(), claims)}
    target = url_path(hmacfs.prefix, f"{slot}/f.txt")
    assert request(hmacfs.port, "PUT", target, b"data", h).status == 201
    assert request(hmacfs.port, "GET", target).status == 200
    deadline = time.monotonic() + 10
    while request(hmacfs.port, "GET", target).status == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    statuses = [request(hmacfs.port, "GET", target).status for _ in range(2)]
    assert statuses[0] in (404, 410) and statuses[1] == 404
    assert not (hmacfs.storage / slot / "f.txt").exists()


def test_cors_origin_list(hmacfs_factory) -> None:
    srv = hmacfs_factory({"cors": {"allowedorigins": ["https://chat.example"]}})
    r = request(srv.port, "GET", "/upload/none/x.txt", headers={"Origin": "https://chat.example"})
    assert r.status == 404 and r.header("Access-Control-Allow-Origin") == "https://chat.example"
    assert r.header("Vary") == "Origin"
    r = request(srv.port, "GET", "/upload/none/x.txt", headers={"Origin": "https://evil.example"})
    assert r.header("Access-Control-Allow-Origin") is None


def test_worker_queue_full_503(hmacfs_factory) -> None:
    srv = hmacfs_factory({"server": {"autoadjustworkers": False},
                          "workers": {"numworkers": 1, "uploadqueuesize": 0}})
    path = f"{uuid.uuid4()}/slow.bin"
    hold = socket.create_connection(("127.0.0.1", srv.port))
    hold.sendall(f"PUT {signed_put(srv.prefix, srv.secret, path, 10)} HTTP/1.1\r\nHost: x\r\n"
                 "Content-Length: 10\r\n\r\nabc".encode())  # holds the only worker
    wait_for_gauge(srv, "hmacfs_uploads_in_progress", 1)
    r = put(srv, f"{uuid.uuid4()}/b.txt", b"x")
    assert r.status == 503 and r.header("Retry-After")
    hold.sendall(b"defghij")
    assert status_of(hold.recv(4096)) == 201
    hold.close()
    assert put(srv, f"{uuid.uuid4()}/c.txt", b"x").status == 201


def test_maxconnections_503(hmacfs_factory) -> None:
    srv = hmacfs_factory({"server": {"maxconnections": 2}})
    # The start-up probe's connection may not be reaped yet: with it, the second held one is refused.
    wait_for_gauge(srv, "hmacfs_open_connections", at_most=0)
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
    try:
        wait_for_gauge(srv, "hmacfs_open_connections", 2)
        resp = raw(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(resp) == 503 and b"Retry-After" in resp
        scrape = request(srv.metrics_port, "GET", "/metrics")  # a full main listener does not blind metrics
        assert scrape.status == 200 and b"hmacfs_connections_refused_total 1" in scrape.body
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if status_of(raw(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == 200:
            break
        time.sleep(0.1)
    else:
        pytest.fail("connections were not released")


def test_slow_headers_are_cut_off(hmacfs_factory) -> None:
    srv = hmacfs_factory({"timeouts": {"readheadertimeout": "1s"}})
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(b"GET /health HTTP/1.1\r\n")
    started = time.monotonic()
    try:
        while time.monotonic() - started < 8:
            s.sendall(b"X-Slow: y\r\n")  # a trickle that never finishes the headers
            time.sleep(0.2)
        pytest.fail("server kept a slow-header connection open for 8 s")
    except OSError:
        pass
    assert time.monotonic() - started < 5
    s.close()


def test_idle_keepalive_connection_closed(hmacfs_factory) -> None:
    srv = hmacfs_factory({"timeouts": {"idletimeout": "1s"}})
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(s.recv(4096)) == 200
    started = time.monotonic()
    assert s.recv(4096) == b""  # closed by the server
    assert time.monotonic() - started < 5
    s.close()


def test_unix_socket_listener(tmp_path, hmacfs_factory) -> None:
    sock_path = tmp_path / "hmacfs.sock"
    srv = hmacfs_factory({"server": {"unixsocket": str(sock_path)}})
    path = f"{uuid.uuid4()}/u.txt"
    conn = srv.connection()
    conn.request("PUT", signed_put(srv.prefix, srv.secret, path, 2), body=b"hi")
    assert conn.getresponse().status == 201
    conn.close()
    assert (srv.storage / path).read_bytes() == b"hi"
    assert srv.stop() == 0
    assert not sock_path.exists()  # removed at exit


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this machine")
def test_ipv6_listener(hmacfs_factory) -> None:
    from tests.support.hmacfs_proc import free_port
    srv = hmacfs_factory({"server": {"listenport": f"[::1]:{free_port()}"}})
    assert srv.base_url.startswith("http://[::1]:")
    path = f"{uuid.uuid4()}/six.txt"
    r = request(srv.port, "PUT", signed_put(srv.prefix, srv.secret, path, 2), b"v6", host="::1")
    assert r.status == 201
    assert request(srv.port, "GET", url_path(srv.prefix, path), host="::1").body == b"v6"
