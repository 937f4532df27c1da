"""Hostile input, as raw bytes, against the real process ("Hostile input" in protocol.md).

Each class found when the core was attacked gets its raw request here. Every test checks
the answer's status, that the server still answers /health, that nothing was written
(no temp file, no target, nothing outside the root) and, at the end of the module, that
the log holds no traceback: a 4xx is the only acceptable outcome, never a 500 or a silent
drop.
"""
from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from hmacfs import auth
from tests.support.client import put, raw, request, signed_put, signed_v3, status_of, url_path
from tests.support.hmacfs_proc import HmacfsProcess

SECURITY = (b"X-Content-Type-Options: nosniff", b"Content-Security-Policy: default-src 'none'")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    proc = HmacfsProcess(tmp_path_factory.mktemp("hostile"), {
        "server": {"autoadjustworkers": False, "maxconnectionsperip": 16},
        "workers": {"numworkers": 2, "uploadqueuesize": 0},
        "uploads": {"maxuploadsize": "1MB"},
        "timeouts": {"readheadertimeout": "2s"},
    }).start()
    yield proc
    log = proc.log()
    proc.close()
    assert "Traceback" not in log and " 500 " not in log


def unharmed(srv) -> None:
    """The server answers, and no upload left anything behind."""
    assert request(srv.port, "GET", "/health").status == 200
    assert list((srv.storage / ".hmacfs" / "tmp").iterdir()) == []


def fresh(name: str = "f.txt") -> str:
    return f"{uuid.uuid4()}/{name}"


def v3_target(srv, path: str) -> str:
    return signed_v3(srv.prefix, srv.secret, path, "PUT", int(time.time()) + 60)


def responses(data: bytes) -> list[int]:
    """Every status line in a raw reply stream (pipelined responses included)."""
    return [int(line.split(b" ")[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


# -- 1. unauthenticated writes through chunked uploads ----------------------------------------

def test_stalled_unsigned_chunked_uploads_hold_nothing(srv) -> None:
    """Eight unsigned chunked PUTs (more than the 2 workers) get 411 at once, write nothing,
    and a signed PUT right after is served."""
    stalls = []
    try:
        for i in range(8):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(f"PUT {srv.prefix}stall{i}/f.bin?v=00 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                      "Expect: 100-continue\r\n\r\n".encode())
            stalls.append(s)
        for s in stalls:
            reply = s.recv(4096)
            assert status_of(reply) == 411 and b"100 Continue" not in reply
        assert put(srv, fresh(), b"x" * 4096).status == 201
    finally:
        for s in stalls:
            s.close()
    unharmed(srv)


def test_chunked_body_past_maxuploadsize_is_413_and_leaves_nothing(srv) -> None:
    path = fresh("big.bin")
    chunk = b"10000\r\n" + b"a" * 0x10000 + b"\r\n"
    head = f"PUT {v3_target(srv, path)} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(head)
        try:
            for _ in range(20):  # 1.25 MiB > maxuploadsize 1 MiB
                s.sendall(chunk)
        except OSError:
            pass  # the server may close after its 413
        reply = s.recv(4096)
    assert status_of(reply) == 413
    assert not (srv.storage / path).exists()
    unharmed(srv)


# -- 2. header smuggling: a long line is refused whole ------------------------------------------

def test_long_header_line_is_431_never_split(srv) -> None:
    path = fresh()
    smuggled = (f"PUT {signed_put(srv.prefix, srv.secret, path, 44)} HTTP/1.1\r\nHost: x\r\n"
                "Content-Length: 44\r\n\r\n" + "b" * 44)
    data = (f"GET {srv.prefix}none/x.txt HTTP/1.1\r\nHost: x\r\nX-Pad: " + "A" * 16385 +
            "Content-Length: 44\r\n\r\n" + smuggled).encode()
    reply = raw(srv.port, data)
    assert responses(reply) == [431]
    assert all(h in reply for h in SECURITY)
    assert not (srv.storage / path).exists()
    unharmed(srv)


# -- 3. numbers and tokens from unauthenticated input -------------------------------------------

# Header values reach the server as bytes (decoded as latin-1): b"\xb2" is the digit "²".
@pytest.mark.parametrize("value", [b"\xb2", "\u0663".encode(), b"1" * 25, b"+5", b"-1", b"5 5", b"0x10", b"1_0"])
def test_content_length_must_be_short_ascii_digits(srv, value: bytes) -> None:
    path = fresh()
    data = (f"PUT {signed_put(srv.prefix, srv.secret, path, 1)} HTTP/1.1\r\nHost: x\r\n".encode()
            + b"Content-Length: " + value + b"\r\n\r\nx")
    assert responses(raw(srv.port, data)) == [400]
    unharmed(srv)


@pytest.mark.parametrize("expires", ["\u00b2", "\u0661\u0667\u0660\u0660", "9" * 4400, "-1", "1e10"])
def test_v3_expires_must_be_ascii_digits(srv, expires: str) -> None:
    path = fresh()
    target = url_path(srv.prefix, path) + f"?v3=00&expires={quote(expires)}"
    r = request(srv.port, "PUT", target, b"x")
    assert r.status == 403
    unharmed(srv)


@pytest.mark.parametrize("value", ["bytes=\xb2-", "bytes=-\xb2", "bytes=" + "9" * 4400 + "-", "bytes=0-" + "9" * 30,
                                   "bytes=\u0661-\u0662".encode().decode("latin-1")])
def test_malformed_range_is_ignored(srv, value: str) -> None:
    path = fresh()
    assert put(srv, path, b"0123456789").status == 201
    r = request(srv.port, "GET", url_path(srv.prefix, path), headers={"Range": value})  # sent as latin-1 bytes
    assert r.status == 200 and r.body == b"0123456789"


@pytest.mark.parametrize("token", [
    "\u00e9\u00e9.\u00e9\u00e9.\u00e9\u00e9",
    auth._b64url(b'{"alg":"HS256"}') + ".\u00e9\u00e9." + auth._b64url(b"x" * 32),    # non-ASCII payload
    auth._b64url(b"[" * 5000) + "." + auth._b64url(b"{}") + ".AAAA",   # nested, MAC not valid
    "a" * 9000 + ".b.c",
    "x.y",
])
def test_hostile_bearer_tokens_are_401(srv, token: str) -> None:
    slot = uuid.uuid4().hex
    data = (f"PUT {url_path(srv.prefix, slot + '/f.txt')} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx").encode("latin-1")
    reply = raw(srv.port, data)
    assert responses(reply) == [401] and b"WWW-Authenticate: Bearer" in reply
    unharmed(srv)


def test_signed_jwt_with_absurd_claims_is_refused_cleanly(srv) -> None:
    """Even with a valid MAC (a bug in the signer), huge numbers and NaN are refused, not crashed on."""
    slot, key = uuid.uuid4().hex, srv.secret.encode()
    header = auth._b64url(b'{"alg":"HS256","typ":"JWT"}')
    for payload in (b'{"exp": 1e400, "slot": "%s", "filesize": 1}', b'{"exp": NaN, "slot": "%s", "filesize": 1}',
                    b'{"exp": 9999999999, "slot": "%s", "filesize": 1' + b"0" * 5000 + b"}"):
        body = auth._b64url(payload.replace(b"%s", slot.encode()))
        token = f"{header}.{body}.{auth._b64url(auth.hmac.new(key, f'{header}.{body}'.encode(), 'sha256').digest())}"
        r = request(srv.port, "PUT", url_path(srv.prefix, f"{slot}/f.txt"), b"x",
                    {"Authorization": f"Bearer {token}"})
        assert r.status == 401
    unharmed(srv)


# -- 5. filesystem limits ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["PUT", "GET"])
def test_too_deep_path_is_414(srv, method: str) -> None:
    path = "a/" * 1333 + "f.txt"
    target = url_path(srv.prefix, path) + ("?v=00" if method == "PUT" else "")
    r = request(srv.port, method, target, b"x" if method == "PUT" else None)
    assert r.status == 414
    assert not (srv.storage / "a").exists()
    unharmed(srv)


# -- 6. connections ------------------------------------------------------------------------------

def _wait_closed(s: socket.socket, seconds: float) -> bool:
    s.settimeout(seconds)
    try:
        return s.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def health_from_another_address(srv) -> int:
    """/health from 127.0.0.2 (the loopback range is all local): a client that is not the flood."""
    with socket.socket() as other:
        other.bind(("127.0.0.2", 0))
        other.settimeout(5)
        other.connect(("127.0.0.1", srv.port))
        other.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return status_of(other.recv(4096))


def test_silent_connection_is_cut_at_readheadertimeout(srv) -> None:
    """readheadertimeout is 2 s here, idletimeout the default hour."""
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        started = time.monotonic()
        assert _wait_closed(s, 8)
        assert time.monotonic() - started < 6


def test_one_address_cannot_take_every_connection(srv) -> None:
    """maxconnectionsperip = 16: the 17th silent socket from 127.0.0.1 gets a 503 with the
    security headers, while another address is still served."""
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(16)]
    try:
        deadline = time.monotonic() + 5
        while True:
            reply = raw(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            if status_of(reply) == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # the accept thread admits the held sockets in order
        assert status_of(reply) == 503 and b"Retry-After: 5" in reply
        assert all(h in reply for h in SECURITY)
        assert health_from_another_address(srv) == 200
    finally:
        for s in held:
            s.close()


def test_thousand_silent_sockets_from_one_address_do_not_block_others(hmacfs_factory) -> None:
    srv = hmacfs_factory()  # default caps: 1024 in all, 64 per address
    held = []
    try:
        for _ in range(1000):
            held.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        assert health_from_another_address(srv) == 200
        text = request(srv.metrics_port, "GET", "/metrics").body.decode()
        refused = [line for line in text.splitlines() if line.startswith("hmacfs_connections_refused_total ")]
        assert refused and float(refused[0].split()[1]) >= 900
    finally:
        for s in held:
            s.close()


def test_trusted_proxy_is_exempt_from_the_per_address_cap(hmacfs_factory) -> None:
    srv = hmacfs_factory({"server": {"maxconnectionsperip": 2, "trustedproxies": ["127.0.0.1/32"]}})
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]
    try:
        assert status_of(raw(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == 200
    finally:
        for s in held:
            s.close()


# -- 7. storage edges ----------------------------------------------------------------------------

def test_put_through_a_planted_symlink_creates_nothing_outside(srv, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "exists.txt").write_bytes(b"secret")
    link = f"lnk{uuid.uuid4().hex}"
    (srv.storage / link).symlink_to(outside)
    statuses = {put(srv, f"{link}/{name}", b"data").status
                for name in ("exists.txt", "missing.txt", "new/deeper/f.txt")}
    assert statuses == {403}  # the same answer whether or not something exists outside
    assert sorted(p.name for p in outside.iterdir()) == ["exists.txt"]
    assert (outside / "exists.txt").read_bytes() == b"secret"
    unharmed(srv)


def test_a_directory_swapped_for_a_symlink_after_use_leads_nowhere(srv, tmp_path: Path) -> None:
    """A directory that was already read through is replaced by a symlink to the outside: no
    read, delete or write may follow it (nothing is remembered as 'safe')."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keys").write_bytes(b"secret keys")
    (outside / "victim.txt").write_bytes(b"victim")
    d = f"swap{uuid.uuid4().hex}"
    assert put(srv, f"{d}/x.txt", b"x").status == 201
    assert request(srv.port, "GET", url_path(srv.prefix, f"{d}/x.txt")).status == 200
    (srv.storage / d).rename(srv.storage / f"{d}.old")
    (srv.storage / d).symlink_to(outside)
    assert request(srv.port, "GET", url_path(srv.prefix, f"{d}/keys")).status == 404
    assert request(srv.port, "HEAD", url_path(srv.prefix, f"{d}/keys")).status == 404
    target = signed_v3(srv.prefix, srv.secret, f"{d}/victim.txt", "DELETE", int(time.time()) + 60)
    r = request(srv.port, "DELETE", target)
    assert r.status == 404 and (outside / "victim.txt").read_bytes() == b"victim"
    assert put(srv, f"{d}/keys", b"overwrite?").status == 403
    assert sorted(p.name for p in outside.iterdir()) == ["keys", "victim.txt"]
    unharmed(srv)


def test_second_server_on_the_same_store_refuses_to_start(srv, tmp_path: Path) -> None:
    second = HmacfsProcess(tmp_path / "second", {"server": {"storagepath": str(srv.storage)}})
    try:
        with pytest.raises(RuntimeError) as e:
            second.start(timeout=10)
        assert "in use by another hmacfs process" in str(e.value)
        assert "Traceback" not in second.log()
    finally:
        second.close()
    unharmed(srv)


# -- 8. log forging ------------------------------------------------------------------------------

def test_access_log_escapes_controls_and_shows_utf8(srv) -> None:
    marker = uuid.uuid4().hex
    target = (srv.prefix.encode() + marker.encode() + b"/a\xc2\x85FORGED\xe2\x80\xa8x\xe2\x80\xa9y\x9b31m"
              + "/\u00e9t\u00e9.txt".encode())
    raw(srv.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    deadline = time.monotonic() + 5
    while marker not in srv.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in srv.log().splitlines() if marker in line]  # splitlines splits on U+2028/0x85 too
    assert len(lines) == 1, lines
    line = lines[0]
    assert "\\x85FORGED\\u2028x\\u2029y\\x9b31m/\u00e9t\u00e9.txt" in line
    assert not any(line.startswith("FORGED") for line in srv.log().splitlines())


# -- 9. lenient framing --------------------------------------------------------------------------

@pytest.mark.parametrize("size_line", [b"0x5", b"+5", b"0_5", b"-1", b" 5", b"5\x00", b"12345678901234567"])
def test_chunk_size_is_strict_hex(srv, size_line: bytes) -> None:
    path = fresh()
    head = f"PUT {v3_target(srv, path)} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    reply = raw(srv.port, head + size_line + b"\r\nhello\r\n0\r\n\r\n")
    assert responses(reply) == [400]
    assert not (srv.storage / path).exists()
    unharmed(srv)


def test_chunk_data_must_end_with_crlf(srv) -> None:
    path = fresh()
    head = f"PUT {v3_target(srv, path)} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    assert responses(raw(srv.port, head + b"5\r\nhello \r\n0\r\n\r\n")) == [400]
    assert not (srv.storage / path).exists()


@pytest.mark.parametrize("head", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",            # bare CR in a value
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",          # NUL in a value
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x1bb\r\n\r\n",          # ESC in a value
    b"GET /health HTTP/1.1\r\n\r\n",                                     # HTTP/1.1 without Host
    b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",               # two Hosts
    b"PUT /upload/a/b.txt HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # chunked on 1.0
    b"GET /he\x00alth HTTP/1.1\r\nHost: x\r\n\r\n",                      # NUL in the target
    b"GET  /health HTTP/1.1\r\nHost: x\r\n\r\n",                         # double space
])
def test_lenient_framing_is_400(srv, head: bytes) -> None:
    reply = raw(srv.port, head)
    assert responses(reply) == [400]
    assert all(h in reply for h in SECURITY)
    unharmed(srv)


def test_http10_without_host_is_served(srv) -> None:
    assert responses(raw(srv.port, b"GET /health HTTP/1.0\r\n\r\n")) == [200]


# -- 10. response hygiene ------------------------------------------------------------------------

@pytest.mark.parametrize("data,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /" + b"a" * 17000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
])
def test_early_errors_carry_security_headers_and_the_cors_policy(hmacfs_factory, data: bytes, status: int) -> None:
    srv = hmacfs_factory({"cors": {"allowedorigins": ["https://chat.example"]}})
    reply = raw(srv.port, data)
    assert responses(reply) == [status]
    assert all(h in reply for h in SECURITY)
    assert b"Access-Control-Allow-Origin" not in reply  # restricted origins: never "*"
    assert b"Connection: close" in reply


def test_stored_content_type_with_controls_is_not_echoed(srv) -> None:
    """A row written by an older version (the type is not signed under `v`) may hold anything:
    it is re-validated on the way out, and the type by extension is served instead."""
    path = fresh("note.txt")
    assert put(srv, path, b"hello").status == 201
    srv.stop()  # the server caches rows: edit the database while it is down
    srv.sql("UPDATE files SET content_type = ? WHERE path = ?", 'text/html; x="\x1b[2J\x00"', path)
    srv.start()
    r = request(srv.port, "GET", url_path(srv.prefix, path))
    assert r.status == 200 and r.body == b"hello"
    assert r.header("Content-Type") == "text/plain; charset=utf-8"
    assert r.header("Content-Disposition").startswith("inline")


def test_no_worker_is_held_while_an_unauthorized_client_stalls(srv) -> None:
    """A client that sends a head with a wrong MAC and then stalls its body holds no upload worker."""
    stalls = []
    try:
        for i in range(4):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(f"PUT {srv.prefix}w{i}/f.bin?v=00 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab".encode())
            stalls.append(s)
        for s in stalls:
            assert status_of(s.recv(4096)) == 403
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(put(srv, fresh(), b"y" * 100).status))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == [201, 201]
    finally:
        for s in stalls:
            s.close()
    unharmed(srv)
