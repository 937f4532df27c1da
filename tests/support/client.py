"""Test clients: http.client for ordinary requests, raw sockets for byte-exact ones."""
from __future__ import annotations

import http.client
import socket
import time
from typing import Optional
from urllib.parse import quote

from hmacfs import auth


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        return self.headers.get(name)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


def request(port: int, method: str, path: str, body: Optional[bytes] = None,
            headers: Optional[dict] = None, host: str = "127.0.0.1", timeout: float = 30) -> Response:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def raw(port: int, data: bytes, timeout: float = 10, read_all: bool = True) -> bytes:
    """Send bytes as they are, return everything the server sends until it closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_all:
                break
        return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def url_path(prefix: str, signed_path: str) -> str:
    return prefix + "/".join(quote(seg, safe="") for seg in signed_path.split("/"))


def signed_put(prefix: str, secret: str, signed_path: str, size: int, protocol: str = "v",
               content_type: str = "application/octet-stream") -> str:
    """URL path + query for a PUT signed with v/v2/token."""
    q = auth.sign_query(protocol, secret.encode(), method="PUT", signed_path=signed_path,
                        full_path=prefix + signed_path, size=size, content_type=content_type)
    return url_path(prefix, signed_path) + "?" + "&".join(f"{k}={v}" for k, v in q.items())


def signed_v3(prefix: str, secret: str, signed_path: str, method: str, expires: int) -> str:
    q = auth.sign_query("v3", secret.encode(), method=method, signed_path=signed_path,
                        full_path=prefix + signed_path, expires=expires)
    return url_path(prefix, signed_path) + "?" + "&".join(f"{k}={v}" for k, v in q.items())


def put(srv, signed_path: str, data: bytes, protocol: str = "v", content_type: Optional[str] = None,
        headers: Optional[dict] = None) -> Response:
    """Signed PUT against a running HmacfsProcess."""
    ctype = content_type or "application/octet-stream"
    target = signed_put(srv.prefix, srv.secret, signed_path, len(data), protocol, ctype)
    h = dict(headers or {})
    if content_type:
        h["Content-Type"] = content_type
    return request(srv.port, "PUT", target, data, h)


def gauge_value(srv, sample: str) -> float:
    """One sample's value in a scrape of the metrics endpoint (NaN when it is absent)."""
    text = request(srv.metrics_port, "GET", "/metrics").body.decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " ")]
    return values[0] if values else float("nan")


def wait_for_gauge(srv, sample: str, at_least: float = float("-inf"), at_most: float = float("inf")) -> None:
    """Poll the metrics endpoint until a gauge is within bounds (the server's own view of its state)."""
    deadline = time.monotonic() + 10
    while True:
        value = gauge_value(srv, sample)
        if at_least <= value <= at_most:
            return
        assert time.monotonic() < deadline, f"{sample} = {value}, never within [{at_least}, {at_most}]"
        time.sleep(0.02)
