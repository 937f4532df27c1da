"""The Python baseline: a minimal stdlib ThreadingHTTPServer that serves GET from a directory
and writes PUT bodies to disk.

Why it exists: it is the least a stdlib server must do, so hmacfs must beat it clearly on
small requests (target: 4 KiB GET >= 1.5x this) to justify its own HTTP layer. It is a bare
BaseHTTPRequestHandler (no MIME guessing, Last-Modified or listings: SimpleHTTPRequestHandler
measured ~10% slower on 4 KiB GETs), so the bar is as high as a stdlib server sets it.

Two settings differ from the defaults, both so that the comparison measures the request
path rather than a known pitfall: TCP_NODELAY on every connection (keep-alive
responses written in two pieces otherwise stall ~40 ms on Nagle + delayed ACK) and a listen
backlog of 1024 instead of socketserver's 5 (bursts of connects otherwise wait in SYN retries).

Usage: python3 bench/baseline_server.py --port 8080 --root DIR
    GET /health -> 200; GET /upload/<p> -> DIR/<p>; PUT /upload/<p> -> writes DIR/<p> (201).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFIX = "/upload/"
CHUNK = 1 << 20
ROOT = "."


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive; GET copies the file to the socket, PUT streams the body to disk."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        """Turn off Nagle: headers and body go out in separate writes."""
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def local_path(self) -> str | None:
        """/upload/<p> -> ROOT/<p>; None for anything outside the prefix or with '..'."""
        path = self.path.split("?", 1)[0]
        if not path.startswith(PREFIX) or ".." in path.split("/"):
            return None
        return os.path.join(ROOT, path[len(PREFIX):])

    def do_GET(self) -> None:
        """Serve /health for readiness polling, and files under the prefix."""
        if self.path == "/health":
            self._reply(200, b"ok\n")
            return
        path = self.local_path()
        try:
            f = open(path, "rb") if path else None  # noqa: SIM115 - closed below
        except OSError:
            f = None
        if f is None:
            self._reply(404, b"not found\n")
            return
        with f:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            self.end_headers()
            shutil.copyfileobj(f, self.wfile)

    def do_PUT(self) -> None:
        """Stream the body to a temp name in pieces of up to 1 MiB, then rename into place."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._reply(411, b"length required\n")
            return
        target = self.local_path()
        if target is None or length < 0:
            self._reply(400, b"bad path\n")
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        temp = target + ".part"
        buf = memoryview(bytearray(min(length, CHUNK) or 1))
        left = length
        with open(temp, "wb") as out:
            while left:
                n = self.rfile.readinto(buf[: min(left, len(buf))])
                if not n:
                    break
                out.write(buf[:n])
                left -= n
        if left:
            os.unlink(temp)
            self.close_connection = True
            return
        os.replace(temp, target)
        self._reply(201, b"")

    def _reply(self, status: int, body: bytes) -> None:
        """A small complete response with Content-Length (keeps the connection usable)."""
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """No per-request logging: nginx runs with access_log off too."""


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a real listen backlog and quiet client disconnects."""

    request_queue_size = 1024
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients (wrk at the end of a run) reset connections; that is not news."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and serve until SIGTERM/SIGINT."""
    global ROOT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--root", required=True)
    args = ap.parse_args(argv)
    ROOT = args.root
    os.makedirs(ROOT, exist_ok=True)
    server = Server((args.bind, args.port), Handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(main())
