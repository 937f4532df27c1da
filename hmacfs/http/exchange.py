"""One request/response exchange on a connection: the parsed request and the response writer.

Strategy: every response leaves through `Exchange.send*`, which adds the headers that
must be on *every* response (CORS, security headers, Date) and writes the status line,
headers and a small body in one `sendall`; large file bodies follow with `sendfile`.
Handlers never format HTTP themselves, so an error on any path still carries CORS (a 413
without it looks like a network error in a browser).
"""
from __future__ import annotations

import io
import os
import socket
import time
from typing import Iterable, Iterator, Optional, Protocol

from ..errors import HTTPError, reason
from .head import RequestHead
from .httpmsg import SECURITY_HEADERS, http_date

SMALL_FILE = 256 * 1024   # read and send with the headers in one write below this size
DRAIN_LIMIT = 64 * 1024   # an unread request body up to this size is read and dropped to keep the connection
EXPOSE_HEADERS = ("Location, Upload-Offset, Upload-Length, Upload-Expires, Upload-Metadata, Upload-Complete, "
                  "Upload-Incomplete, Upload-Limit, Upload-Draft-Interop-Version, Tus-Resumable, Tus-Version, "
                  "Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm, ETag, Content-Range, "
                  "Content-Length, Content-Disposition")
ALLOW_HEADERS = ("Authorization, Content-Type, Content-Range, Range, If-None-Match, If-Modified-Since, "
                 "If-Range, Tus-Resumable, Upload-Length, Upload-Metadata, Upload-Offset, "
                 "Upload-Checksum, Upload-Concat, Upload-Defer-Length, Upload-Complete, Upload-Incomplete, "
                 "Upload-Draft-Interop-Version, X-Requested-With, X-Hmacfs-Expires, "
                 "X-HTTP-Method-Override")
_MSG_MORE = getattr(socket, "MSG_MORE", 0)


class _DateCache:
    """`Date` changes once a second; formatting it per request is measurable at 10k req/s."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def get(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._text, self._second = http_date(now), now
        return self._text


DATE = _DateCache()


class Request:
    """One request: its parsed head, the client address and the stream its body comes from."""

    __slots__ = ("body_consumed", "chunked", "client", "content_length", "expect_continue", "headers",
                 "keep_alive", "method", "query", "raw_path", "rfile", "started", "target", "version", "via_proxy")

    def __init__(self, head: RequestHead, client: str, rfile: io.BufferedReader) -> None:
        self.method = head.method
        self.target = head.target
        self.version = head.version
        self.headers = head.headers
        self.content_length = head.content_length
        self.chunked = head.chunked
        self.client = client
        self.rfile = rfile
        self.started = time.monotonic()
        self.raw_path = b""
        self.query: dict[str, str] = {}
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.1":
            self.keep_alive = "close" not in conn
        else:
            self.keep_alive = "keep-alive" in conn
        self.expect_continue = self.headers.get("expect", "").lower() == "100-continue"
        self.body_consumed = not head.has_body
        self.via_proxy = False  # the peer is a trusted proxy or a Unix socket (set by the connection)


class CorsPolicy:
    """Which origins may read responses; `*` by default (signed URLs carry their own auth)."""

    def __init__(self, origins: Iterable[str]) -> None:
        self.origins = frozenset(origins)
        self.any = "*" in self.origins or not self.origins

    def headers(self, origin: Optional[str]) -> list[tuple[str, str]]:
        if self.any:
            allow = [("Access-Control-Allow-Origin", "*")]
        elif origin and origin in self.origins:
            allow = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        else:
            return [("Vary", "Origin")]
        return [*allow, ("Access-Control-Expose-Headers", EXPOSE_HEADERS)]

    def preflight(self, methods: str, max_age: int = 86400) -> list[tuple[str, str]]:
        return [("Access-Control-Allow-Methods", methods), ("Access-Control-Allow-Headers", ALLOW_HEADERS),
                ("Access-Control-Max-Age", str(max_age))]


def response_head(status: int, headers: list[tuple[str, str]], length: int, close: bool,
                  http10: bool = False) -> bytes:
    """Status line and headers of any response: the security headers are always there."""
    parts = [f"HTTP/1.1 {status} {reason(status)}\r\nDate: {DATE.get()}\r\nServer: hmacfs\r\n"]
    for name, value in SECURITY_HEADERS:
        parts.append(f"{name}: {value}\r\n")
    for name, value in headers:
        parts.append(f"{name}: {value}\r\n")
    if status != 304 and not (100 <= status < 200) and status != 204:
        parts.append(f"Content-Length: {length}\r\n")
    if close:
        parts.append("Connection: close\r\n")
    elif http10:
        parts.append("Connection: keep-alive\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1", "replace")


def error_body(err: HTTPError) -> bytes:
    return f"{err.status} {reason(err.status)}: {err.message}\n".encode("utf-8", "replace")


def refusal(err: HTTPError, cors: CorsPolicy, origin: Optional[str] = None) -> bytes:
    """A whole error response that ends the connection, for refusals made before a request
    could be parsed (malformed head, connection limits): the same CORS and security headers
    as every other response."""
    body = error_body(err)
    headers = [*cors.headers(origin), *err.headers.items(), ("Content-Type", "text/plain; charset=utf-8")]
    return response_head(err.status, headers, len(body), close=True) + body


class Lifecycle(Protocol):
    """Anything that says whether the server is shutting down (the App)."""

    draining: bool


class Exchange:
    """Writes the response to one request; remembers status and bytes for the access log."""

    def __init__(self, req: Request, sock: socket.socket, cors: CorsPolicy, lifecycle: Lifecycle) -> None:
        self.req = req
        self.sock = sock
        self.cors = cors
        self.lifecycle = lifecycle
        self.status = 0
        self.body_bytes = 0
        self.close_after = not req.keep_alive
        self.sent_continue = False

    @property
    def responded(self) -> bool:
        return self.status != 0

    def client_gone(self) -> bool:
        """Has the connection ended (the client closed it, or the watchdog shut it down)? A
        non-blocking peek: buffered body bytes mean it is still there."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def _head(self, status: int, headers: list[tuple[str, str]], length: int) -> bytes:
        if self.lifecycle.draining:  # checked at response time: a drain may begin mid-request
            self.close_after = True
        return response_head(status, [*self.cors.headers(self.req.headers.get("origin")), *headers], length,
                             close=self.close_after, http10=self.req.version == "HTTP/1.0")

    def send_continue(self) -> None:
        """`100 Continue`: the checks passed, the client may send the body now."""
        if self.req.expect_continue and not self.sent_continue and self.req.version == "HTTP/1.1":
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.sent_continue = True

    def send_interim(self, status: int, headers: list[tuple[str, str]]) -> None:
        """An informational (1xx) response before the final one, such as the resumable-upload
        draft's 104; HTTP/1.0 clients cannot take one and get none."""
        if self.req.version != "HTTP/1.1":
            return
        lines = [f"HTTP/1.1 {status} {reason(status)}\r\n", *(f"{n}: {v}\r\n" for n, v in headers), "\r\n"]
        self.sock.sendall("".join(lines).encode("latin-1", "replace"))

    def send(self, status: int, headers: Optional[list[tuple[str, str]]] = None, body: bytes = b"",
             content_type: Optional[str] = None) -> None:
        """A complete response with an in-memory body (suppressed for HEAD, 204, 304)."""
        hdrs = list(headers or ())
        if content_type:
            hdrs.append(("Content-Type", content_type))
        head = self._head(status, hdrs, len(body))
        self.status = status
        if self.req.method == "HEAD" or status in (204, 304):
            self.sock.sendall(head)
            return
        self.sock.sendall(head + body)
        self.body_bytes = len(body)

    def unread_body_forces_close(self) -> bool:
        """An unread body we cannot cheaply skip would be parsed as the next request: close instead."""
        req = self.req
        if req.body_consumed:
            return False
        if req.expect_continue and not self.sent_continue:
            return True  # the client may or may not send it now: its bytes cannot be framed
        return req.chunked or req.content_length is None or req.content_length > DRAIN_LIMIT

    def send_error(self, err: HTTPError) -> None:
        body = error_body(err)
        if self.unread_body_forces_close():
            self.close_after = True
        self.send(err.status, list(err.headers.items()), body, "text/plain; charset=utf-8")

    def send_stream(self, status: int, headers: list[tuple[str, str]], length: int,
                    pieces: Iterator[memoryview]) -> None:
        """Headers then `length` bytes produced by `pieces`. The first piece is produced before
        the headers go out, so an error there is still a clean error response; an error after
        that can only cut the connection (the client sees a short body, never a complete one)."""
        head = self._head(status, headers, length)
        if self.req.method == "HEAD":
            self.sock.sendall(head)
            self.status = status
            return
        first = next(pieces, b"")
        self.status = status
        try:
            self.sock.sendall(head + bytes(first))
            sent = len(first)
            for piece in pieces:
                self.sock.sendall(piece)
                sent += len(piece)
        except BaseException:
            self.close_after = True
            raise
        self.body_bytes = sent
        if sent != length:
            self.close_after = True
            raise ConnectionError(f"stream ended after {sent} of {length} bytes")

    def send_file(self, status: int, headers: list[tuple[str, str]], fd: int, offset: int, length: int) -> None:
        """Headers then `length` bytes of `fd` from `offset`: in one write when small, else sendfile."""
        head = self._head(status, headers, length)
        self.status = status
        if self.req.method == "HEAD":
            self.sock.sendall(head)
            return
        if length <= SMALL_FILE:
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise OSError("file shrank while being sent")
            self.sock.sendall(head + data)
            self.body_bytes = length
            return
        if _MSG_MORE:
            self.sock.sendall(head, _MSG_MORE)
        else:
            self.sock.sendall(head)
        with io.FileIO(os.dup(fd), "rb") as f:
            sent = self.sock.sendfile(f, offset, length)
        self.body_bytes = sent
        if sent != length:
            self.close_after = True
            raise ConnectionError("short sendfile: the file shrank or the client went away")
