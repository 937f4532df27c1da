#!/usr/bin/env python3
"""Experiment, not a server: how fast can one Python thread serve small GETs with selectors?

docs/performance.md cites it: on the 2-core benchmark VM it served 58,000-66,600 req/s of a
4 KiB file at 64 and 256 keep-alive connections (wrk -t2), as fast as nginx, where
thread-per-connection servers (hmacfs, the stdlib baseline) stay at 4,000-7,500 because
their threads spend the time handing the GIL to each other. Per request it does the same
file work as hmacfs (open, fstat, pread, close); it parses nothing but the request line,
sends no extra headers and does no error handling, so it is a ceiling, not a target.

    python3 bench/evloop_prototype.py 18666 DIR &      # serves DIR/<p> at /upload/<p>
    wrk -t2 -c64 -d4s http://127.0.0.1:18666/upload/x/4k.bin
"""
from __future__ import annotations

import os
import selectors
import socket
import sys


def serve(port: int, root: str) -> None:
    """Accept and answer forever on 127.0.0.1:port, one thread, non-blocking sockets."""
    sel = selectors.DefaultSelector()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    pending: dict[socket.socket, bytes] = {}
    while True:
        for key, _ in sel.select():
            if key.data is None:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(conn, selectors.EVENT_READ, True)
            else:
                answer(key.fileobj, root, pending, sel)  # type: ignore[arg-type]


def answer(conn: socket.socket, root: str, pending: dict[socket.socket, bytes],
           sel: selectors.BaseSelector) -> None:
    """Read what arrived, answer every complete request head in it with the file."""
    try:
        data = conn.recv(65536)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if not data:
        sel.unregister(conn)
        conn.close()
        pending.pop(conn, None)
        return
    buf = pending.get(conn, b"") + data
    out = []
    while b"\r\n\r\n" in buf:
        head, buf = buf.split(b"\r\n\r\n", 1)
        path = head.split(b" ", 2)[1].decode()
        fd = os.open(os.path.join(root, path[len("/upload/"):]), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            body = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        out.append(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                   b"Content-Type: application/octet-stream\r\n\r\n" % len(body) + body)
    pending[conn] = buf
    if out:
        conn.sendall(b"".join(out))  # small responses: the socket buffer takes them at once


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
