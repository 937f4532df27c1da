"""Virus scanning with clamd, streamed while the upload arrives, decided before the commit.

Strategy: a raw clamd socket client (Unix or TCP) speaking the null-terminated commands
`zPING`, `zVERSION` and `zINSTREAM` (chunks framed by a 4-byte big-endian length, ended by
a zero length). A scan is a `ScanSession` opened before the body is read: every chunk the
pipeline receives is also sent to clamd, so the verdict arrives right after the last byte
instead of after a second read of the file. Each scan has its own connection, so a clamd
restart costs nothing but the scans that were running. `numscanworkers` bounds the scans in
flight. The verdict is applied by the pipeline's last check before the commit: an infected
upload is a 422 naming the signature, and nothing is stored. When clamd cannot be reached
(or fails mid-scan) the upload gets 503 + Retry-After, unless `failopen`: then it is stored
and counted as unscanned.
"""
from __future__ import annotations

import logging
import queue
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from ..errors import HTTPError
from ..policy.paths import extension_allowed

log = logging.getLogger("hmacfs")
CHUNK = 256 * 1024           # most bytes sent to clamd in one frame (clamd's default StreamMaxLength is 25 MB)
FEED_AHEAD = 4               # received chunks that may wait for the sender thread (a few MiB per scan)
TIMEOUT = 60.0               # seconds for one socket operation with clamd (connect, send, the verdict)
SLOT_WAIT = 30.0             # seconds an upload waits for a free scan worker before a 503
MAX_REPLY = 4096
Address = Union[str, tuple[str, int]]


class ClamdError(Exception):
    """clamd could not be reached, or answered something that is not a verdict."""


class StreamTooLong(ClamdError):
    """clamd refused the stream as longer than its StreamMaxLength."""


@dataclass(frozen=True)
class ScanResult:
    infected: bool
    signature: Optional[str] = None


def parse_scan_reply(reply: bytes) -> ScanResult:
    """clamd's answer to one INSTREAM: `stream: OK` or `stream: <signature> FOUND`, ended by NUL
    or newline; anything else (an `ERROR`, a size limit, garbage, a reply cut short: `stream: OK`
    may be the start of `stream: OKBot FOUND`) is a ClamdError."""
    if not reply.endswith((b"\0", b"\n")):
        raise ClamdError("clamd's reply was cut short")
    text = reply[:-1].decode("utf-8", "replace")
    if text.startswith("INSTREAM size limit exceeded"):
        raise StreamTooLong(text)
    if "\0" in text or "\n" in text or not text.startswith("stream: "):
        raise ClamdError(f"unexpected clamd reply {text[:200]!r}")
    verdict = text[len("stream: "):]
    if verdict == "OK":
        return ScanResult(False)
    if verdict.endswith(" FOUND") and len(verdict) > len(" FOUND"):
        signature = verdict[:-len(" FOUND")]
        if signature.strip() and all(c.isprintable() for c in signature):
            return ScanResult(True, signature)
    raise ClamdError(f"unexpected clamd reply {text[:200]!r}")


def parse_address(spec: str) -> Address:
    """`clamavsocket`: a Unix socket path, or `tcp://host:port` / `host:port` (IPv6 in brackets)."""
    text = spec.strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://"):]
    elif text.startswith(("/", ".", "unix:")):
        path = text[len("unix:"):] if text.startswith("unix:") else text
        if not path:
            raise ValueError(f"{spec!r}: the Unix socket path is empty")
        return path
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if (not sep or not (port.isascii() and port.isdigit()) or len(port) > 5 or not 0 < int(port) < 65536
            or not host or any(c.isspace() for c in host)):
        raise ValueError(f"{spec!r}: expected a Unix socket path or host:port")
    return host, int(port)


def _connect(address: Address, timeout: float) -> socket.socket:
    try:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
            return sock
        return socket.create_connection(address, timeout=timeout)
    except OSError as e:
        raise ClamdError(f"cannot reach clamd at {address}: {e}") from None


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith((b"\0", b"\n")):
        chunk = sock.recv(MAX_REPLY)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REPLY:
            raise ClamdError("clamd's reply is too long")
    if not data:
        raise ClamdError("clamd closed the connection without a reply")
    return data


class ClamdClient:
    """The commands hmacfs uses; every call opens its own connection."""

    def __init__(self, address: Address, timeout: float = TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout

    def _command(self, command: bytes) -> str:
        sock = _connect(self.address, self.timeout)
        try:
            sock.sendall(b"z" + command + b"\0")
            return _read_reply(sock).rstrip(b"\0\n").decode("utf-8", "replace")
        except OSError as e:
            raise ClamdError(f"clamd at {self.address}: {e}") from None
        finally:
            sock.close()

    def ping(self) -> bool:
        return self._command(b"PING") == "PONG"

    def version(self) -> str:
        return self._command(b"VERSION")

    def stream(self) -> socket.socket:
        """A connection in INSTREAM mode, ready for chunks."""
        sock = _connect(self.address, self.timeout)
        try:
            sock.sendall(b"zINSTREAM\0")
        except OSError as e:
            sock.close()
            raise ClamdError(f"clamd at {self.address}: {e}") from None
        return sock


class ScanSession:
    """One upload's scan: `feed` every plaintext chunk as it arrives, then `verdict`.

    A thread of its own sends the chunks to clamd (a few chunks ahead at most), so receiving
    the upload and streaming it to clamd run side by side instead of taking turns. `feed`
    never raises: a clamd failure is remembered and decided by `verdict` (so a scan problem
    never cuts an upload mid-body without an answer). `close` ends it either way."""

    def __init__(self, scanner: Scanner, sock: socket.socket, path: str) -> None:
        self.scanner = scanner
        self.sock: Optional[socket.socket] = sock
        self.path = path
        self.queued = 0
        self.sent = 0
        self.failure: Optional[str] = None
        self.too_large = False
        self._chunks: queue.Queue[Optional[bytes]] = queue.Queue(FEED_AHEAD)
        self._sender: Optional[threading.Thread] = threading.Thread(target=self._send_all, name="clamd-feed",
                                                                    daemon=True)
        self._sender.start()

    def feed(self, chunk: memoryview) -> None:
        if self._sender is None or self.failure is not None or self.too_large:
            return
        if self.queued + len(chunk) > self.scanner.max_size:
            self.too_large = True
            return
        self.queued += len(chunk)
        self._chunks.put(bytes(chunk))  # a copy: the caller's buffer is reused; waits when FEED_AHEAD are queued

    def _send_all(self) -> None:
        """The sender thread: frames chunks to clamd until the None that ends the stream."""
        while True:
            chunk = self._chunks.get()
            if chunk is None:
                return
            if self.failure is not None or self.too_large or self.sock is None:
                continue  # drain: nothing more goes to clamd
            try:
                for start in range(0, len(chunk), CHUNK):
                    piece = chunk[start:start + CHUNK]
                    self.sock.sendall(struct.pack(">I", len(piece)))
                    self.sock.sendall(piece)
                self.sent += len(chunk)
            except OSError as e:
                self.failure = f"clamd connection failed mid-scan: {e}"
                self._why_closed()

    def _stop_sender(self) -> None:
        """Every queued chunk sent (or dropped after a failure), the thread gone."""
        if self._sender is not None:
            self._chunks.put(None)
            self._sender.join()
            self._sender = None

    def _why_closed(self) -> None:
        """clamd closes a stream longer than its StreamMaxLength after saying so: read that."""
        try:
            assert self.sock is not None
            self.sock.settimeout(1.0)
            parse_scan_reply(_read_reply(self.sock))
        except StreamTooLong:
            self.too_large, self.failure = True, None
            log.warning("virus scan: clamd's StreamMaxLength is below [clamav] maxscansize (%d bytes): "
                        "raise it, or lower maxscansize", self.scanner.max_size)
        except (OSError, ClamdError):
            pass

    def feed_all(self, blocks: Iterable[bytes]) -> None:
        for block in blocks:
            self.feed(memoryview(block))

    def verdict(self) -> None:
        """Nothing when the upload may be stored; HTTPError 422 (infected), 413 (too large to
        scan, when such files are refused) or 503 (clamd failed and `failopen` is off)."""
        scanner = self.scanner
        try:
            self._stop_sender()
            if not self.too_large and self.failure is None:
                try:
                    assert self.sock is not None
                    self.sock.sendall(struct.pack(">I", 0))
                    result = parse_scan_reply(_read_reply(self.sock))
                except StreamTooLong:
                    self.too_large = True  # clamd's StreamMaxLength: as any file too large to scan
                except (OSError, ClamdError) as e:
                    self.failure = str(e)
                else:
                    scanner.found(self.path, result)
                    return
            if self.too_large:
                scanner.refuses(self.path, scanner.max_size + 1)
                scanner.unscanned(self.path, "larger than maxscansize")
                return
            scanner.failed(self.path, self.failure)
        finally:
            self.close()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)  # a sender blocked on a stuck clamd returns at once
        except OSError:
            pass
        self._stop_sender()
        sock.close()
        self.scanner.slots.release()


class Scanner:
    """The `[clamav]` policy: which uploads are scanned, how many at once, what a failure means."""

    def __init__(self, address: Address, workers: int, extensions: Iterable[str], max_size: int, fail_open: bool,
                 large_files: str = "reject", metrics=None, timeout: float = TIMEOUT) -> None:
        self.client = ClamdClient(address, timeout)
        self.extensions = list(extensions)
        self.max_size = max_size
        self.fail_open = fail_open
        self.large_files = large_files
        self.metrics = metrics
        self.slots = threading.BoundedSemaphore(max(1, workers))

    def wants(self, signed_path: str) -> bool:
        """`scanfileextensions` empty: every file; else only those extensions."""
        return not self.extensions or extension_allowed(signed_path, self.extensions, [])

    def refuses(self, signed_path: str, size: int) -> None:
        """413 for a file that will be too large to scan, when such files are refused: as soon as
        its size is known (a PUT's Content-Length, a resumable upload's length at creation)."""
        if self.wants(signed_path) and size > self.max_size and self.large_files == "reject":
            self.count("too_large")
            raise HTTPError(413, f"files larger than {self.max_size} bytes cannot be scanned here")

    def begin(self, signed_path: str, size: Optional[int]) -> Optional[ScanSession]:
        """A scan for an upload about to be received, or None when it is not scanned (its
        extension is not listed; too large and such files are stored unscanned; clamd down
        and `failopen`). 413/503 when it cannot be taken at all."""
        if not self.wants(signed_path):
            return None
        if size is not None and size > self.max_size:
            self.refuses(signed_path, size)
            self.unscanned(signed_path, "larger than maxscansize")
            return None
        if not self.slots.acquire(timeout=SLOT_WAIT):
            raise HTTPError(503, "every virus scanner is busy, retry later", {"Retry-After": "5"})
        try:
            sock = self.client.stream()
        except ClamdError as e:
            self.slots.release()
            self.failed(signed_path, str(e))
            return None
        return ScanSession(self, sock, signed_path)

    def scan(self, signed_path: str, size: int, blocks: Iterable[bytes]) -> None:
        """Scan a whole file given as blocks (a resumable upload, assembled); raises as `verdict`."""
        session = self.begin(signed_path, size)
        if session is None:
            return
        try:
            session.feed_all(blocks)
        except BaseException:
            session.close()
            raise
        session.verdict()

    # -- outcomes -------------------------------------------------------------------------------

    def count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.scans.inc(1, result)

    def found(self, path: str, result: ScanResult) -> None:
        if not result.infected:
            self.count("clean")
            return
        self.count("infected")
        log.warning("virus scan: %r is infected (%s): refused, nothing stored", path, result.signature)
        raise HTTPError(422, f"the upload is infected: {result.signature}")

    def unscanned(self, path: str, why: str) -> None:
        self.count("unscanned")
        log.warning("virus scan: %r stored unscanned (%s)", path, why)

    def failed(self, path: str, why: Optional[str]) -> None:
        if self.fail_open:
            self.unscanned(path, f"clamd failed, failopen: {why}")
            return
        self.count("error")
        log.error("virus scan: %r refused: %s", path, why)
        raise HTTPError(503, "the virus scanner is unavailable, retry later", {"Retry-After": "30"})


def startup_check(scanner: Scanner) -> None:
    """Log clamd's version at start (a missing clamd is not fatal: each scan decides)."""
    try:
        log.info("virus scanning with %s at %s", scanner.client.version(), scanner.client.address)
    except ClamdError as e:
        log.warning("virus scanning on, but %s (%s)", e,
                    "uploads are stored unscanned" if scanner.fail_open else "uploads get 503 until it is back")

