"""The per-connection loop: read a request head, dispatch it, write the response, repeat.

Strategy: `BaseHTTPRequestHandler` is kept for its socket set-up (TCP_NODELAY, buffered
reader, unbuffered writer) but its request parsing is replaced: it goes through
`email.parser`, costs more than the rest of a small GET and is lenient where it must
not be. Ours is `head`: strict RFC 9112 parsing with hard limits (line length, header
count and bytes), under a header deadline enforced by the server's watchdog; it keeps
the raw target bytes, so raw UTF-8 request lines and percent-escapes decode exactly
once, in `paths`.

Sockets stay in blocking mode: every time limit (idle, header, read, write) is a
deadline in the server's connection table, enforced by its watchdog. A socket timeout
would add a poll() before every recv and send, and per-call timeouts cannot bound a
client that trickles one byte at a time anyway.
"""
from __future__ import annotations

import logging
import socket
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Optional

from ..errors import HTTPError
from ..policy.guard import is_auth_failure
from ..policy.paths import split_target
from ..services.logs import printable, printable_path
from .clientaddr import client_address, in_networks
from .exchange import Exchange, Request, refusal
from .head import MAX_REQUEST_LINE, RequestHead, parse_head, read_fields, read_line

if TYPE_CHECKING:
    from .server import ConnState, HmacfsServer

log = logging.getLogger("hmacfs")

LINGER_SECONDS = 2.0


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
        conn = self.server.conns.claim(self.connection)
        first = True
        try:
            while self._serve_one(conn, first):
                first = False
        finally:
            self.server.conns.unregister(conn)

    # -- reading --------------------------------------------------------------------------------

    def _read_head(self, conn: ConnState, first: bool) -> Optional[RequestHead]:
        """The next request head; None when the client closed or stayed silent past its deadline.

        A new connection gets `readheadertimeout` for its whole first head (a silent socket is
        cut then); between keep-alive requests it may idle for `idletimeout`, and once a
        request's first line has arrived the rest of the head must follow within
        `readheadertimeout`.
        """
        timeouts = self.server.timeouts
        conn.idle(timeouts.readheadertimeout if first else timeouts.idletimeout)
        try:
            line = read_line(self.rfile, MAX_REQUEST_LINE, 414)
            if line in (b"\r\n", b"\n"):  # RFC 9112 2.2: ignore one empty line before a request
                line = read_line(self.rfile, MAX_REQUEST_LINE, 414)
        except (OSError, ValueError):
            return None
        if not line:
            return None
        if first:
            conn.in_request = True  # the first head keeps the deadline it was given
        else:
            conn.busy(min(timeouts.readheadertimeout, timeouts.readtimeout))
        return parse_head(line, read_fields(self.rfile, self.server.max_header_bytes - len(line)))

    # -- one exchange ---------------------------------------------------------------------------

    def _serve_one(self, conn: ConnState, first: bool) -> bool:
        """Handle one request; True to keep the connection open for another."""
        server = self.server
        try:
            head = self._read_head(conn, first)
        except HTTPError as err:
            self._refuse_raw(err)
            return False
        except (OSError, ValueError):
            return False
        if head is None:
            return False
        peer = self.client_address[0] if isinstance(self.client_address, tuple) else "unix"
        client = client_address(peer, head.headers, server.trusted_proxies)
        req = Request(head, client, self.rfile)
        req.via_proxy = peer == "unix" or in_networks(peer, server.trusted_proxies)
        ex = Exchange(req, self.connection, server.app.cors, server.app)
        conn.busy(server.timeouts.readtimeout if head.has_body else server.timeouts.writetimeout)
        # IP lists, bans and rate limits (policy/guard.py); not on the metrics listener, whose
        # router has no file routes (prefix None): that port is the operator's.
        guard = server.app.guard if server.router.prefix is not None else None
        try:
            req.raw_path, req.query = split_target(head.target)
            if guard is not None:
                guard.admit(client, service=req.raw_path in server.router.services)
            server.router.dispatch(server.app, ex)
        except HTTPError as err:
            if guard is not None and is_auth_failure(err):
                guard.auth_failed(client, req.method, server.router.log_path(req.raw_path), err)
            self._fail(ex, err)
        except (ConnectionError, TimeoutError, socket.timeout) as e:
            ex.close_after = True
            if not ex.responded:
                ex.status = 499  # client went away or stalled (nginx's convention, for the log)
            log.debug("connection from %s ended during a request: %s", client, e)
        except Exception:
            log.exception("internal error handling %s %s", head.method, printable_path(req.raw_path))
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
                    req.rfile.read(req.content_length or 0)
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
        """An error before a request could be parsed: the whole response, then a lingering close
        (the client may still be sending the rest of its head)."""
        self.server.app.metrics.requests.inc(1, "invalid", str(err.status))
        try:
            self.connection.sendall(refusal(err, self.server.app.cors))
        except OSError:
            return
        self._linger()

    def _account(self, req: Request, ex: Exchange) -> None:
        elapsed = time.monotonic() - req.started
        metrics = self.server.app.metrics
        method = req.method if req.method in ("GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS") \
            else "other"
        metrics.requests.inc(1, method, str(ex.status))
        metrics.request_seconds.observe(elapsed, method)
        # never the query string (it holds signatures), nor a whole upload resource name
        self.server.access_log.record(req.client, req.method, self.server.router.log_path(req.raw_path), ex.status,
                                      ex.body_bytes, elapsed)

    def log_message(self, format: str, *args: object) -> None:
        log.debug(printable(format % args))
