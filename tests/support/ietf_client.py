"""A raw HTTP/1.1 client for the IETF resumable-upload draft, over a plain socket.

Strategy: http.client swallows every 1xx but 100 and cannot stop halfway through a body,
yet the draft is exactly about those two things: the server's `104 Upload Resumption
Supported` (with the upload resource's Location) arrives before the body is read, and the
client may lose its connection mid-body. So this client writes the request head itself,
reads responses one at a time (interim ones included) and can stop sending, go silent with
the socket open (a phone that changed networks) or break the connection (FIN or RST).
"""
from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Optional, Union

Headers = Union[dict[str, str], list[tuple[str, str]]]


@dataclass
class RawResponse:
    """One response as read off the wire (an interim one has no body)."""

    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> Optional[str]:
        """The first value of a header (case-insensitive), None if absent."""
        wanted = name.lower()
        return next((v for n, v in self.headers if n.lower() == wanted), None)

    def __repr__(self) -> str:
        return f"<RawResponse {self.status} {self.reason} {self.headers} {self.body[:200]!r}>"


def request_head(method: str, target: str, headers: Headers, host: str = "127.0.0.1") -> bytes:
    """The request line and fields, CRLF-terminated, exactly as given (no header is added but Host)."""
    items = list(headers.items()) if isinstance(headers, dict) else list(headers)
    if not any(n.lower() == "host" for n, _ in items):
        items.insert(0, ("Host", host))
    lines = [f"{method} {target} HTTP/1.1", *(f"{n}: {v}" for n, v in items), "", ""]
    return "\r\n".join(lines).encode("utf-8")


class RawConnection:
    """One client connection; `read_response` returns the next response, interim ones included."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"server closed the connection; unparsed: {self.buffer[:200]!r}")
        self.buffer += chunk

    def read_response(self, method: str = "PUT") -> RawResponse:
        """The next response: status, headers and (for a final one) its Content-Length body."""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *fields = head.decode("latin-1").split("\r\n")
        _version, status, reason = [*status_line.split(" ", 2), ""][:3]
        headers = [(n.strip(), v.strip()) for n, v in (f.split(":", 1) for f in fields)]
        response = RawResponse(int(status), reason, headers)
        if response.status < 200 or response.status in (204, 304) or method == "HEAD":
            return response
        length = int(response.header("Content-Length") or 0)
        while len(self.buffer) < length:
            self._fill()
        response.body, self.buffer = self.buffer[:length], self.buffer[length:]
        return response

    def read_final(self, method: str = "PUT") -> tuple[list[RawResponse], RawResponse]:
        """All interim responses, then the final one."""
        interims = []
        while True:
            response = self.read_response(method)
            if response.status >= 200:
                return interims, response
            interims.append(response)

    def pending(self, wait: float = 0.3) -> bytes:
        """Whatever the server sent within `wait` seconds (b"" if nothing): shows that it did
        not answer early."""
        self.sock.settimeout(wait)
        try:
            self._fill()
        except (socket.timeout, ConnectionError):
            pass
        finally:
            self.sock.settimeout(10.0)
        data, self.buffer = self.buffer, b""
        return data

    def closed_by_server(self, within: float = 5.0) -> bool:
        """True when the server ends the connection (EOF or reset) within `within` seconds;
        anything it sends meanwhile is read and dropped."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                if not self.sock.recv(65536):
                    return True
            except socket.timeout:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
        return False

    def close(self) -> None:
        """An orderly close (FIN): the server reads EOF mid-body."""
        self.sock.close()

    def reset(self) -> None:
        """An abortive close (RST, via SO_LINGER 0): the server's read fails with ECONNRESET."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
