"""The per-connection loop: read a request head, dispatch it, write the response, repeat.

Strategy: `BaseHTTPRequestHandler` is kept for its socket set-up (TCP_NODELAY, buffered
reader, unbuffered writer) but its request parsing is replaced: it goes through
`email.parser` and costs more than the rest of a small GET. Ours reads the request line
and header lines with hard limits (line length, header count and bytes, a header
deadline enforced by the server's watchdog) and keeps the raw target bytes, so raw
UTF-8 request lines and percent-escapes decode exactly once, in `paths`.

Sockets stay in blocking mode: every time limit (idle, header, read, write) is a
deadline in the server's connection table, enforced by its watchdog. A socket timeout
would add a poll() before every recv and send, and per-call timeouts cannot bound a
client that trickles one byte at a time anyway.
"""
from __future__ import annotations

import logging
import re
import socket
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Optional

from ..errors import HTTPError, reason
from ..policy.paths import split_target
from ..services.logs import printable
from .clientaddr import client_address
from .exchange import Exchange, Request

if TYPE_CHECKING:
    from .server import ConnState, HmacfsServer

log = logging.getLogger("hmacfs")

MAX_REQUEST_LINE = 16 * 1024
MAX_HEADERS = 100
LINGER_SECONDS = 2.0
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class ConnectionHandler(BaseHTTPRequestHandler):
    """Serves the requests of one client connection."""

    server: HmacfsServer
    rbufsize = 16 * 1024  # request heads are small; bodies bypass it (readinto with larger buffers)
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        # TCP_NODELAY (no 40 ms delayed-ACK stall per response) exists only on TCP sockets.
        self.disable_nagle_algorithm = self.request.family != socket.AF_UNIX
        super().setup()

    def handle(self) -> None:
        conn = self.server.conns.register(self.connection)
        try:
            while self._serve_one(conn):
                pass
        finally:
            self.server.conns.unregister(conn)

    # -- reading --------------------------------------------------------------------------------

    def _read_head(self, conn: ConnState) -> Optional[tuple[bytes, list[bytes]]]:
        """Request line and header lines; None when the client closed or went idle."""
        timeouts = self.server.timeouts
        conn.idle(timeouts.idletimeout)
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if line in (b"\r\n", b"\n"):  # RFC 9112 2.2: ignore one empty line before a request
                line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        except (OSError, ValueError):
            return None
        if not line:
            return None
        conn.busy(min(timeouts.readheadertimeout, timeouts.readtimeout))
        if len(line) > MAX_REQUEST_LINE:
            raise HTTPError(414, "request line too long")
        lines: list[bytes] = []
        total = len(line)
        while True:
            h = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not h:
                raise ConnectionError("client closed during headers")
            if h in (b"\r\n", b"\n"):
                break
            total += len(h)
            if total > self.server.max_header_bytes or len(lines) >= MAX_HEADERS:
                raise HTTPError(431, "request headers too large")
            lines.append(h)
        return line, lines

    @staticmethod
    def _parse_head(line: bytes, lines: list[bytes]) -> tuple[str, bytes, str, dict[str, str]]:
        parts = line.rstrip(b"\r\n").split(b" ")
        if len(parts) != 3 or not parts[1]:
            raise HTTPError(400, "malformed request line")
        method_b, target, version_b = parts
        if not _TOKEN.match(method_b):
            raise HTTPError(400, "malformed method")
        if version_b not in (b"HTTP/1.1", b"HTTP/1.0"):
            if version_b.startswith(b"HTTP/"):
                raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
            raise HTTPError(400, "malformed request line")
        headers: dict[str, str] = {}
        for raw in lines:
            name, sep, value = raw.partition(b":")
            if not sep or not _TOKEN.match(name):  # also refuses obs-fold and space before ':'
                raise HTTPError(400, "malformed header line")
            key = name.decode("ascii").lower()
            text = value.strip().decode("latin-1")
            if key in headers:
                if key in ("content-length", "host", "authorization", "transfer-encoding"):
                    raise HTTPError(400, f"repeated {key} header")
                headers[key] += ", " + text
            else:
                headers[key] = text
        return method_b.decode("ascii"), target, version_b.decode("ascii"), headers

    # -- one exchange ---------------------------------------------------------------------------

    def _serve_one(self, conn: ConnState) -> bool:
        """Handle one request; True to keep the connection open for another."""
        server = self.server
        try:
            head = self._read_head(conn)
        except HTTPError as err:
            self._refuse_raw(err)
            return False
        except (OSError, ValueError):
            return False
        if head is None:
            return False
        try:
            method, target, version, headers = self._parse_head(*head)
        except HTTPError as err:
            self._refuse_raw(err)
            return False
        peer = self.client_address[0] if isinstance(self.client_address, tuple) else "unix"
        client = client_address(peer, headers, server.trusted_proxies)
        req = Request(method, target, version, headers, client, self.rfile)
        ex = Exchange(req, self.connection, server.app.cors, server.app)
        conn.busy(server.timeouts.readtimeout if req.has_body else server.timeouts.writetimeout)
        try:
            req.raw_path, req.query = split_target(target)
            server.router.dispatch(server.app, ex)
        except HTTPError as err:
            self._fail(ex, err)
        except (ConnectionError, TimeoutError, socket.timeout) as e:
            ex.close_after = True
            if not ex.responded:
                ex.status = 499  # client went away or stalled (nginx's convention, for the log)
            log.debug("connection from %s ended during a request: %s", client, e)
        except Exception:
            log.exception("internal error handling %s %s", method, printable(req.raw_path.decode("latin-1")))
            self._fail(ex, HTTPError(500, "internal server error"))
        finally:
            self._account(req, ex)
        return self._after(ex)

    def _fail(self, ex: Exchange, err: HTTPError) -> None:
        if ex.responded:
            ex.close_after = True
            return
        try:
            ex.send_error(err)
        except OSError:
            ex.close_after = True

    def _after(self, ex: Exchange) -> bool:
        """Decide whether the connection can carry another request."""
        req = ex.req
        if not req.body_consumed and not ex.close_after:
            if ex.unread_body_forces_close():
                ex.close_after = True
            else:
                try:
                    req.rfile.read(int(req.headers["content-length"]))
                    req.body_consumed = True
                except OSError:
                    ex.close_after = True
        if ex.close_after:
            if not req.body_consumed:
                self._linger()
            return False
        return not self.server.draining

    def _linger(self) -> None:
        """Half-close and discard what the client is still sending, briefly, so that it reads
        our error response instead of a connection reset (what Apache and nginx do)."""
        sock = self.connection
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(0.5)
            deadline = time.monotonic() + LINGER_SECONDS
            while time.monotonic() < deadline and sock.recv(65536):
                pass
        except OSError:
            pass

    def _refuse_raw(self, err: HTTPError) -> None:
        """An error before a request could be parsed: minimal response, then close."""
        body = f"{err.status} {reason(err.status)}: {err.message}\n".encode()
        head = (f"HTTP/1.1 {err.status} {reason(err.status)}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                "Access-Control-Allow-Origin: *\r\nX-Content-Type-Options: nosniff\r\n\r\n")
        try:
            self.connection.sendall(head.encode("latin-1") + body)
        except OSError:
            pass
        self.server.app.metrics.requests.inc(1, "invalid", str(err.status))

    def _account(self, req: Request, ex: Exchange) -> None:
        elapsed = time.monotonic() - req.started
        metrics = self.server.app.metrics
        method = req.method if req.method in ("GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS") \
            else "other"
        metrics.requests.inc(1, method, str(ex.status))
        metrics.request_seconds.observe(elapsed, method)
        # never the query string: it holds signatures
        self.server.access_log.record(req.client, req.method, req.raw_path, ex.status, ex.body_bytes, elapsed)

    def log_message(self, format: str, *args: object) -> None:
        log.debug(printable(format % args))
