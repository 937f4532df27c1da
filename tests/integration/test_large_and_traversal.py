"""1 GiB through the real process with bounded memory; traversal attempts that touch nothing outside the root."""
from __future__ import annotations

import hashlib
import os
import socket
import uuid
from pathlib import Path

import pytest

from tests.support.client import raw, request, signed_put, status_of, url_path

GIB = 1024**3


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def make_file(path: Path, size: int) -> str:
    block = os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def read_response_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


@pytest.mark.slow
def test_1gib_upload_and_download_with_flat_memory(hmacfs_factory, tmp_path: Path) -> None:
    srv = hmacfs_factory({"uploads": {"maxuploadsize": "2GB"}, "server": {"loglevel": "info"}})
    src = tmp_path / "big.bin"
    expected = make_file(src, GIB)
    path = f"{uuid.uuid4()}/big.bin"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=120) as s, open(src, "rb") as f:
        s.sendall(f"PUT {signed_put(srv.prefix, srv.secret, path, GIB)} HTTP/1.1\r\nHost: x\r\n"
                  f"Content-Length: {GIB}\r\n\r\n".encode())
        s.sendfile(f)
        head, _ = read_response_head(s)
        assert status_of(head) == 201
    src.unlink()
    digest = hashlib.sha256()
    received = 0
    with socket.create_connection(("127.0.0.1", srv.port), timeout=120) as s:
        s.sendall(f"GET {url_path(srv.prefix, path)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head, rest = read_response_head(s)
        assert status_of(head) == 200 and f"Content-Length: {GIB}".encode() in head
        digest.update(rest)
        received = len(rest)
        buf = bytearray(4 * 1024 * 1024)
        view = memoryview(buf)
        while received < GIB:
            n = s.recv_into(view)
            assert n, "connection closed early"
            digest.update(view[:n])
            received += n
    assert received == GIB and digest.hexdigest() == expected
    peak = peak_rss_mb(srv.proc.pid)
    assert peak < 80, f"server peak RSS {peak:.1f} MB"


def test_traversal_attempts_touch_nothing_outside(hmacfs, tmp_path: Path) -> None:
    outside = hmacfs.workdir / "outside.txt"
    outside.write_text("keep")
    before = {p: p.stat().st_mtime_ns for p in hmacfs.workdir.rglob("*") if p.is_file()}
    attempts = ["../outside.txt", "..%2foutside.txt", "%2e%2e/outside.txt", "a/%2e%2e/%2e%2e/outside.txt",
                "..%5coutside.txt", "%2e%2e%2f%2e%2e%2foutside.txt", ".%2e/outside.txt", "..\\outside.txt",
                "%c0%ae%c0%ae/outside.txt", ".hmacfs/meta.sqlite3", "a/../../outside.txt"]
    for a in attempts:
        for method in ("PUT", "GET", "DELETE"):
            req = (f"{method} /upload/{a}?v=00&v3=00&expires=9999999999 HTTP/1.1\r\nHost: x\r\n"
                   "Content-Length: 4\r\nConnection: close\r\n\r\nevil").encode()
            assert status_of(raw(hmacfs.port, req)) in (400, 403, 404), (method, a)
    # a signed upload whose *signed* path contains dot segments is still refused
    target = signed_put(hmacfs.prefix, hmacfs.secret, "../outside.txt", 4).replace("%2E", ".").replace("%2F", "/")
    assert status_of(raw(hmacfs.port, f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                                      "Connection: close\r\n\r\nevil".encode())) == 400
    assert outside.read_text() == "keep"
    after = {p: p.stat().st_mtime_ns for p in hmacfs.workdir.rglob("*") if p.is_file() and p in before}
    assert {p: m for p, m in after.items() if ".hmacfs" not in str(p) and p.name != "hmacfs.log"} == \
        {p: m for p, m in before.items() if ".hmacfs" not in str(p) and p.name != "hmacfs.log"}
    assert [p for p in hmacfs.storage.rglob("*") if ".hmacfs" not in str(p)] == []


def test_symlink_planted_in_storage_is_not_followed(hmacfs) -> None:
    secret_file = hmacfs.workdir / "secret.txt"
    secret_file.write_text("do not serve")
    (hmacfs.storage / "planted").mkdir()
    (hmacfs.storage / "planted" / "link.txt").symlink_to(secret_file)
    (hmacfs.storage / "dirlink").symlink_to(hmacfs.workdir)
    assert request(hmacfs.port, "GET", "/upload/planted/link.txt").status == 404
    assert request(hmacfs.port, "GET", "/upload/dirlink/secret.txt").status == 404
    r = request(hmacfs.port, "PUT", signed_put(hmacfs.prefix, hmacfs.secret, "dirlink/new.txt", 1), b"x")
    assert r.status == 403, r
    assert not (hmacfs.workdir / "new.txt").exists()
    assert "Traceback" not in hmacfs.log()
