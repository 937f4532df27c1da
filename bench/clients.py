"""Load-generating clients for the benchmark, built so that the client is never the bottleneck.

Strategy: raw sockets, no HTTP library. Upload bodies go out with `socket.sendfile` from a
file in the page cache (zero-copy on the client side, no Python loop per chunk); download
bodies are spliced to /dev/null (or drained with `recv_into` a 4 MiB buffer) and only
counted. `CeilingServer` runs the same clients against a process that costs nothing per
byte (sendfile out, splice to /dev/null in), and run.py measures wrk's PUT generator
against nginx's `return 201`, so the report shows each client's limit next to the servers'.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HOST = "127.0.0.1"
RECV_BUF = 4 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def sign_v(secret: str, signed_path: str, size: int) -> str:
    """The protocol's `v` MAC: HMAC-SHA256(secret, "<signed path> <size>"), lowercase hex."""
    return hmac.new(secret.encode(), f"{signed_path} {size}".encode(), hashlib.sha256).hexdigest()


def put_target(secret: str, signed_path: str, size: int) -> str:
    """Request target for a signed PUT of `size` bytes to /upload/<signed_path>."""
    return f"/upload/{signed_path}?v={sign_v(secret, signed_path, size)}"


@dataclass
class Result:
    """One HTTP exchange: status, body bytes moved, and wall time from connect to last byte."""

    status: int
    nbytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


def _connect(port: int, timeout: float) -> socket.socket:
    """A loopback connection with Nagle off (request heads are small writes)."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read a response head; returns (status, lower-cased headers, body bytes already read)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before the response head ({len(buf)} bytes)")
        buf += chunk
        if len(buf) > 1 << 20:
            raise ConnectionError("response head larger than 1 MiB")
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def _drain(sock: socket.socket, headers: dict[str, str], already: int, view: memoryview) -> int:
    """Receive the rest of a body (Content-Length, else until close); returns its total size."""
    got = already
    length = headers.get("content-length")
    want = int(length) if length is not None else None
    while want is None or got < want:
        n = sock.recv_into(view)
        if not n:
            break
        got += n
    return got


def put_file(port: int, target: str, src: Path, repeat: int = 1, timeout: float = 300.0,
             extra_headers: str = "") -> Result:
    """PUT `src` (sent `repeat` times back to back, via sendfile) as one body; time to response."""
    src_size = src.stat().st_size
    total = src_size * repeat
    head = (f"PUT {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: {total}\r\n"
            f"Content-Type: application/octet-stream\r\n{extra_headers}Connection: close\r\n\r\n")
    t0 = time.perf_counter()
    with _connect(port, timeout) as sock, open(src, "rb") as body:
        sock.sendall(head.encode())
        for _ in range(repeat):
            sent = sock.sendfile(body, 0, src_size)
            if sent != src_size:
                raise ConnectionError(f"sendfile sent {sent} of {src_size} bytes")
        status, headers, rest = read_head(sock)
        _drain(sock, headers, len(rest), memoryview(bytearray(65536)))
    return Result(status, total, time.perf_counter() - t0)


def get_file(port: int, target: str, timeout: float = 300.0,
             view: Optional[memoryview] = None) -> Result:
    """GET `target` and count the body bytes without keeping them.

    Linux + Python 3.10+: splice() socket -> pipe -> /dev/null, so the client copies nothing
    (on loopback the receiver's copy is the only copy left once the server uses sendfile, so
    a copying client would be what limits a fast server). Elsewhere: recv_into a reused
    4 MiB buffer.
    """
    t0 = time.perf_counter()
    with _connect(port, timeout) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
                     .encode())
        status, headers, rest = read_head(sock)
        if SPLICE and "content-length" in headers:
            nbytes = _splice_drain(sock, int(headers["content-length"]), len(rest), timeout)
        else:
            view = view if view is not None else memoryview(bytearray(RECV_BUF))
            nbytes = _drain(sock, headers, len(rest), view)
    return Result(status, nbytes, time.perf_counter() - t0)


SPLICE = hasattr(os, "splice") and sys.platform.startswith("linux")
GET_CLIENT = "splice() to /dev/null" if SPLICE else "recv_into a 4 MiB buffer"


def _splice_drain(sock: socket.socket, want: int, got: int, timeout: float) -> int:
    """Move `want - got` body bytes from the socket into /dev/null through a 1 MiB pipe."""
    rd, wr = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        try:
            fcntl.fcntl(wr, F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass  # the default 64 KiB pipe works, only slower
        fd = sock.fileno()  # non-blocking underneath, because the socket has a timeout
        while got < want:
            try:
                n = os.splice(fd, wr, min(want - got, 1 << 20))
            except BlockingIOError:
                if not select.select([fd], [], [], timeout)[0]:
                    raise TimeoutError(f"no body data for {timeout} s") from None
                continue
            if n == 0:
                break
            got += n
            while n:
                n -= os.splice(rd, null, n)
    finally:
        for f in (rd, wr, null):
            os.close(f)
    return got


def http_status(port: int, target: str, timeout: float = 2.0) -> int:
    """Status of one small GET (used for readiness polling)."""
    with _connect(port, timeout) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
                     .encode())
        return read_head(sock)[0]


def concurrent_puts(port: int, targets: list[str], src: Path, timeout: float = 300.0
                    ) -> tuple[float, list[int]]:
    """Start one uploader thread per target at the same instant; returns (wall seconds, statuses).

    Each thread connects, sends its head and sendfile()s the whole body; the clock runs from
    the common start to the last response. Failures show up as status 0.
    """
    statuses = [0] * len(targets)
    start = threading.Barrier(len(targets) + 1)

    def upload(i: int) -> None:
        try:
            start.wait(timeout)
            statuses[i] = put_file(port, targets[i], src, timeout=timeout).status
        except (OSError, threading.BrokenBarrierError, ValueError):
            statuses[i] = 0

    workers = [threading.Thread(target=upload, args=(i,), daemon=True) for i in range(len(targets))]
    for w in workers:
        w.start()
    start.wait(timeout)
    t0 = time.perf_counter()
    deadline = t0 + timeout
    for w in workers:
        w.join(max(0.0, deadline - time.perf_counter()))
    return time.perf_counter() - t0, statuses


class CeilingServer:
    """A separate process that costs (almost) nothing per byte, to measure the clients' limits.

    GET: the whole file `path` via sendfile. PUT: the body spliced to /dev/null, then 201.
    A process, not a thread, so that it does not share the client's GIL.
    """

    def __init__(self, path: Path) -> None:
        listener = socket.socket()
        listener.bind((HOST, 0))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        fd = listener.fileno()
        self.proc = subprocess.Popen([sys.executable, __file__, "--ceiling-server", str(path), str(fd)],
                                     pass_fds=[fd], start_new_session=True, stdout=subprocess.PIPE)
        listener.close()
        self.proc.stdout.readline()  # "ready": interpreter start-up must not count as transfer time

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()


def serve_ceiling_forever(path: Path, fd: int) -> None:
    """The CeilingServer child: one request per connection, GET sends `path`, PUT discards."""
    listener = socket.socket(fileno=fd)
    size = path.stat().st_size
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn, open(path, "rb") as body:
            conn.settimeout(60)
            try:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                if head.startswith(b"PUT "):
                    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
                    _splice_drain(conn, length, len(rest), 60)
                    conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                else:
                    conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
                                 .encode())
                    conn.sendfile(body, 0, size)
            except (OSError, AttributeError, ValueError):
                pass


def make_source(path: Path, size: int) -> Path:
    """Write a `size`-byte incompressible file (a repeated random 1 MiB block) once."""
    if path.exists() and path.stat().st_size == size:
        return path
    block = os.urandom(1 << 20)
    with open(path, "wb") as out:
        left = size
        while left:
            n = min(left, len(block))
            out.write(block[:n])
            left -= n
    return path


if __name__ == "__main__" and sys.argv[1:2] == ["--ceiling-server"]:
    serve_ceiling_forever(Path(sys.argv[2]), int(sys.argv[3]))


def wrk_summary(cmd: list[str], duration: float) -> dict:
    """Run a wrk command whose Lua script prints its summary as one `WRKJSON {...}` line
    (bench/wrk_get.lua, wrk_put.lua); that summary plus req/s."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            summary = json.loads(line[len("WRKJSON "):])
            summary["rps"] = summary["requests"] / (summary["duration_us"] / 1e6)
            return summary
    raise RuntimeError(f"wrk gave no summary (exit {out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
