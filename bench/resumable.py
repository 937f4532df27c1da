#!/usr/bin/env python3
"""What resumable uploads cost hmacfs next to a plain PUT, and what a resume saves, in one run.

    python3 bench/resumable.py            # full: 1 GiB in 32 MiB PATCHes, 3 rounds, ~1-2 min on 2 cores
    python3 bench/resumable.py --quick    # 64 MiB in 4 MiB PATCHes, 1 round, ~5-10 s
                                          # (tests/test_bench_resumable_smoke.py)

Why: tus 1.0.0 and the IETF resumable-upload draft exist so that a client on a bad network
never sends a big file twice. They are worth having only if (1) a healthy upload cut into
PATCHes is not much slower than the one PUT it replaces, and (2) a broken upload really goes
on from where the server stopped. The issue asks for two figures, each a ratio from one run
so that this shared VM's drift cancels:

1. 1 GiB by tus (creation POST, then 32 MiB PATCHes on one keep-alive connection) / the same
   1 GiB as one PUT, throughput: >= 0.9
2. an upload broken at 50% and resumed: the body bytes the client sent over all its requests /
   the file size: < 1.05, for tus (one PATCH with the whole file, cut) and for the IETF draft
   (interop version 6: a PUT with `Upload-Complete: ?1`, cut after its 104)

Strategy: one hmacfs from the zipapp (bench/servers.py's config, with [uploads] chunksize and
maxuploadsize raised to 2GB so that one PATCH may carry the whole rest of a resumed upload).
Every round measures tus and PUT back to back in alternating order, RAM warmed before each
(storage.warm_memory: on this VM cold pages, not the server, would otherwise pick the winner),
then breaks and resumes one upload per protocol. The tus client and the PUT client are the
same raw-socket code (`Connection`: request head, then `socket.sendfile` from a file in the
page cache), so the ratio compares the server's two paths, not two clients; it also splits
each request into "sending" (until sendfile returns) and "waiting" (last byte to the answer),
which, with the latency of a 1-byte PATCH, shows where a PATCH's extra time goes.
bench/clients.py's ceiling server measures how fast that client can be. A break is a plain
close() after sendfile returned half the body, and the client comes back at once (HEAD, then
one PATCH with the rest; again on a 409 or a cut connection, as real clients do): bytes still
in the socket buffers are either received or lost, and the report gives the offset the server
had next to what the client had sent (ratio = 1 + bytes sent more than once / size).

Each upload is checked, not just timed: statuses (201/204, 104 with a Location), every
Upload-Offset, a final HEAD with offset == length, the stored file's size and sha256 on disk,
on the last round a GET's sha256, and that no partial file is left. Data lives on /dev/shm
when it has room; every process and temp file goes at the end, also on failure or timeout.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clients
import storage
from lifecycle import BudgetExceeded, aborted, bench_parser, chosen_plan, handle_signals, stop_all, write_results
from storage import (
    ceilings_section,
    checks_and_notes,
    choose_tmpdir,
    fs_of,
    human,
    loadavg,
    machine_info,
    make_random,
    note_disk,
    rotate,
    samples_section,
    warm_memory,
    warm_section,
    zipapp,
)

BENCH = Path(__file__).resolve().parent
MB = 1e6
TUS = {"Tus-Resumable": "1.0.0"}
OCTET_OFFSET = "application/offset+octet-stream"
IETF_VERSION = "6"
PARTIAL_UPLOAD = "application/partial-upload"
UPLOADS_TOML = 'maxuploadsize = "2GB"\nchunksize = "2GB"\n'  # replaces servers.Hmacfs's maxuploadsize line
TIMEOUT = 600.0


@dataclass(frozen=True)
class Plan:
    """Sizes, rounds and time limit of one run."""

    mode: str
    rounds: int
    big: int  # bytes of every upload
    chunk: int  # bytes of each tus PATCH in figure 1
    budget: float  # hard wall-clock limit, seconds
    warm: bool = True  # touch and free RAM before every timed upload (see storage.warm_memory)

    @property
    def warm_bytes(self) -> int:
        """A quarter more than the file a timed upload writes, plus slack for buffers."""
        return self.big + self.big // 4 + (64 << 20)

    @property
    def patches(self) -> int:
        return -(-self.big // self.chunk)


FULL = Plan("full", rounds=3, big=1 << 30, chunk=32 << 20, budget=900.0)
QUICK = Plan("quick", rounds=1, big=64 << 20, chunk=4 << 20, budget=120.0)


@dataclass(frozen=True)
class Row:
    """One line of the figures table: series `measured` against `against` in sample set `key`."""

    key: str
    label: str
    unit: str
    measured: str
    against: str
    target: tuple[str, float]  # (">=" | "<", threshold) on measured / against
    fmt: str  # of the values
    ratio_digits: int  # of the ratios


def rows(plan: Plan) -> list[Row]:
    big, chunk = human(plan.big), human(plan.chunk)
    return [
        Row("upload", f"{big} upload: tus ({plan.patches} x {chunk} PATCH, keep-alive) vs one PUT", "MB/s",
            "tus", "PUT", (">=", 0.9), "{:,.0f}", 2),
        Row("resume_tus", f"{big} tus upload broken at 50% and resumed: bytes the client sent vs file size",
            "MB", "sent", "size", ("<", 1.05), "{:,.3f}", 4),
        Row("resume_ietf", f"{big} IETF draft (interop {IETF_VERSION}) upload broken at 50% and resumed: "
            "bytes the client sent vs file size", "MB", "sent", "size", ("<", 1.05), "{:,.3f}", 4),
    ]


@dataclass
class Break:
    """One upload broken at 50% and resumed."""

    protocol: str
    round: int
    size: int
    sent_before: int  # body bytes sendfile had handed to the kernel when the client closed
    server_offset: int  # what HEAD said afterwards
    moved: int  # body bytes the client sent over all requests
    seconds: float  # first connect to the final answer
    attempts: int  # HEAD + PATCH rounds the resume took (1 unless the cut request came back in between)
    location: str  # the upload resource
    takeovers: Optional[int] = None  # hmacfs_resumable_takeovers_total went up by this much (None: unread)
    upload_limit: str = ""

    @property
    def extra(self) -> int:
        """Bytes sent more than once: in flight at the break and lost, or sent again in a retry."""
        return self.moved - self.size

    @property
    def ratio(self) -> float:
        return self.moved / self.size


@dataclass
class Run(storage.Run):
    """storage.Run plus the details of each broken upload."""

    plan: Plan  # type: ignore[assignment]  # this benchmark's plan (same duck type where storage reads it)
    breaks: list[Break] = field(default_factory=list)


class Refused(Exception):
    """The server answered something else than the protocol promises."""


# ----------------------------------------------------------------------------- server


class ResumableHmacfs(storage.ConfiguredHmacfs):
    """bench/servers.py's hmacfs with [uploads] chunksize and maxuploadsize at 2GB.

    A config table cannot be appended twice (TOML), so the [uploads] line servers.Hmacfs
    writes is replaced; if that line ever changes, this fails loudly instead of measuring
    the default 32MB chunksize (every resumed PATCH would get 413)."""

    def __init__(self, workdir: Path, pyz: Path, python: str) -> None:
        super().__init__("hmacfs", workdir, pyz, python)

    def configure(self) -> None:
        super().configure()
        text = self.config_path.read_text()
        old = 'maxuploadsize = "20GB"\n'
        if old not in text:
            raise RuntimeError(f"servers.Hmacfs no longer writes {old.strip()!r}; update ResumableHmacfs")
        self.config_path.write_text(text.replace(old, UPLOADS_TOML))

    @property
    def metrics_port(self) -> Optional[int]:
        m = re.search(r'metricsport = "127\.0\.0\.1:(\d+)"', self.config_path.read_text())
        return int(m.group(1)) if m else None

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process so far (all its threads)."""
        if self.proc is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def takeovers(self) -> Optional[float]:
        """hmacfs_resumable_takeovers_total from /metrics (None when it cannot be read)."""
        port = self.metrics_port
        if port is None:
            return None
        try:
            conn = Connection(port, timeout=10)
            try:
                resp = conn.request("GET", "/metrics", {"Connection": "close"})[0]
            finally:
                conn.close()
        except (OSError, Refused):
            return None
        m = re.search(rb"^hmacfs_resumable_takeovers_total(?:\{[^}]*\})? (\S+)$", resp.body, re.M)
        return float(m.group(1)) if m and resp.status == 200 else None


# ----------------------------------------------------------------------------- client


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes = b""

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


class Connection:
    """One client connection that stays open across requests and counts the body bytes it sends.

    bench/clients.py's put_file opens a connection per request; tus is many requests on one,
    and a broken upload needs a client that can stop halfway through a body and read a 104
    before sending it. Bodies go out by socket.sendfile from a file (no copy in the client),
    heads are parsed by clients.read_head. Requests are never pipelined, so whatever follows
    a response head belongs to its body."""

    def __init__(self, port: int, timeout: float = TIMEOUT) -> None:
        self.port = port
        self.sock = socket.create_connection((clients.HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.body_bytes = 0

    def send_head(self, method: str, target: str, headers: dict[str, str]) -> None:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {clients.HOST}:{self.port}",
                 *(f"{name}: {value}" for name, value in headers.items()), "", ""]
        self.sock.sendall("\r\n".join(lines).encode("latin-1"))

    def send_body(self, src: BinaryIO, offset: int, count: int) -> int:
        """sendfile `count` bytes of `src` from `offset`; every byte handed to the kernel is counted,
        also when the connection breaks midway (socket.sendfile leaves the file positioned after
        the last byte it sent, also when it raises)."""
        src.seek(offset)
        try:
            sent = self.sock.sendfile(src, offset, count)
        except OSError:
            self.body_bytes += max(0, src.tell() - offset)
            raise
        self.body_bytes += sent
        if sent != count:
            raise ConnectionError(f"sendfile sent {sent:,} of {count:,} bytes")
        return sent

    def read_response(self, method: str) -> Response:
        """The next response, interim (1xx) ones included, with its Content-Length body."""
        status, headers, rest = clients.read_head(self.sock)
        length = 0 if status < 200 or status in (204, 304) or method == "HEAD" else \
            int(headers.get("content-length", "0"))
        body = bytearray(rest)
        while len(body) < length:
            chunk = self.sock.recv(min(length - len(body), 1 << 20))
            if not chunk:
                raise ConnectionError(f"connection closed after {len(body)} of {length} body bytes")
            body += chunk
        if len(body) != length:
            raise ConnectionError(f"{len(body) - length} unexpected bytes after a {status} response")
        return Response(status, headers, bytes(body))

    def request(self, method: str, target: str, headers: dict[str, str],
                body: Optional[tuple[BinaryIO, int, int]] = None) -> tuple[Response, float, float]:
        """Send a request (body: file, offset, count) and read its final response; returns it with
        the seconds spent sending and the seconds from the last body byte to the response head.
        An answer the server gave before taking the whole body (409, 413), then closing, is returned
        as the response."""
        t0 = time.perf_counter()
        try:
            self.send_head(method, target, headers)
            if body is not None:
                self.send_body(*body)
        except OSError as exc:
            try:
                early = self.read_response(method)
            except OSError:
                raise exc from None
            return early, time.perf_counter() - t0, 0.0
        t1 = time.perf_counter()
        resp = self.read_response(method)
        while resp.status < 200:
            resp = self.read_response(method)
        return resp, t1 - t0, time.perf_counter() - t1

    def close(self) -> None:
        self.sock.close()


def expect(resp: Response, status: int, what: str) -> Response:
    if resp.status != status:
        raise Refused(f"{what}: {resp.status} instead of {status}: {resp.body[:300]!r}")
    return resp


def header_int(resp: Response, name: str, what: str) -> int:
    value = resp.header(name)
    if not value.isdigit():
        raise Refused(f"{what}: {name} is {value!r}")
    return int(value)


@dataclass
class Transfer:
    """One timed upload: wall time and its per-request split."""

    seconds: float  # connect to the last answer
    sends: list[float]  # per body request: head + sendfile until it returned
    waits: list[float]  # per body request: last body byte to the response head
    create: float = 0.0  # tus: connect + creation POST
    location: str = ""
    reconnects: int = 0  # the server closed the keep-alive connection (should stay 0)


def tus_create(conn: Connection, path: str, size: int) -> str:
    """POST to the signed PUT URL: 201 with the upload's Location."""
    resp = conn.request("POST", storage.target(path, size),
                        {**TUS, "Upload-Length": str(size), "Content-Length": "0"})[0]
    expect(resp, 201, "tus creation POST")
    if not resp.header("location") or header_int(resp, "upload-offset", "tus creation") != 0:
        raise Refused(f"tus creation: Location {resp.header('location')!r}, "
                      f"Upload-Offset {resp.header('upload-offset')!r}")
    return resp.header("location")


def tus_patch_headers(offset: int, count: int) -> dict[str, str]:
    return {**TUS, "Upload-Offset": str(offset), "Content-Type": OCTET_OFFSET, "Content-Length": str(count)}


def tus_upload(port: int, path: str, src: Path, size: int, chunk: int) -> Transfer:
    """Figure 1's tus upload: creation, then PATCHes of `chunk` bytes on one connection."""
    sends: list[float] = []
    waits: list[float] = []
    reconnects = 0
    with open(src, "rb") as f:
        t0 = time.perf_counter()
        conn = Connection(port)
        try:
            location = tus_create(conn, path, size)
            create = time.perf_counter() - t0
            offset = 0
            while offset < size:
                n = min(chunk, size - offset)
                resp, sent, waited = conn.request("PATCH", location, tus_patch_headers(offset, n), (f, offset, n))
                expect(resp, 204, f"tus PATCH at {offset:,}")
                if header_int(resp, "upload-offset", "tus PATCH") != offset + n:
                    raise Refused(f"tus PATCH at {offset:,}: Upload-Offset {resp.header('upload-offset')}, "
                                  f"expected {offset + n:,}")
                offset += n
                sends.append(sent)
                waits.append(waited)
                if resp.header("connection").lower() == "close" and offset < size:
                    conn.close()
                    conn = Connection(port)
                    reconnects += 1
            seconds = time.perf_counter() - t0
        finally:
            conn.close()
    return Transfer(seconds, sends, waits, create, location, reconnects)


def put_upload(port: int, path: str, src: Path, size: int) -> Transfer:
    """Figure 1's PUT: the whole file as one body, with the same client code as the PATCHes."""
    with open(src, "rb") as f:
        t0 = time.perf_counter()
        conn = Connection(port)
        try:
            resp, sent, waited = conn.request(
                "PUT", storage.target(path, size),
                {"Content-Type": "application/octet-stream", "Content-Length": str(size)}, (f, 0, size))
            expect(resp, 201, "PUT")
            seconds = time.perf_counter() - t0
        finally:
            conn.close()
    return Transfer(seconds, [sent], [waited])


def small_request_latency(port: int, path: str, src: Path, n: int = 32) -> tuple[float, float]:
    """Median milliseconds of a 1-byte tus PATCH and of a HEAD, on one keep-alive connection.

    The fixed cost of one PATCH (parse, look-up, writer lock, open, write, fsync, the SQLite row,
    the answer) without the body: next to (tus - PUT) / PATCHes it tells whether that fixed cost
    is what a big tus upload loses, or the pause in the byte stream around it."""
    patches: list[float] = []
    heads: list[float] = []
    with open(src, "rb") as f:
        conn = Connection(port)
        try:
            location = tus_create(conn, path, n)
            for offset in range(n):
                resp, sent, waited = conn.request("PATCH", location, tus_patch_headers(offset, 1), (f, offset, 1))
                expect(resp, 204, "1-byte tus PATCH")
                patches.append(sent + waited)
                if offset < n - 1:  # the last PATCH commits the file
                    resp, sent, waited = conn.request("HEAD", location, dict(TUS))
                    expect(resp, 200, "tus HEAD")
                    heads.append(sent + waited)
        finally:
            conn.close()
    return statistics.median(patches[:-1]) * 1000, statistics.median(heads) * 1000


def tus_head(conn: Connection, location: str, size: int) -> int:
    """The upload's offset (tus HEAD: 200, Upload-Length must be `size`)."""
    resp = expect(conn.request("HEAD", location, dict(TUS))[0], 200, "tus HEAD")
    if header_int(resp, "upload-length", "tus HEAD") != size:
        raise Refused(f"tus HEAD: Upload-Length {resp.header('upload-length')}, expected {size:,}")
    return header_int(resp, "upload-offset", "tus HEAD")


RESUME_ATTEMPTS = 4


def resume(port: int, f: BinaryIO, size: int, head: Callable[[Connection], int],
           append: Callable[[Connection, int], Response]) -> tuple[int, int, int]:
    """After a break: on a new connection, HEAD for the offset, then one PATCH with the rest.

    As a real client does, this goes again (HEAD, PATCH) when the PATCH gets a 409 or loses its
    connection: the request that was cut can reach the server after this HEAD (its handler
    is scheduled late on a busy machine), so the HEAD may report an offset that moves on
    afterwards, and that late request may even take the upload over from the resumed PATCH.
    Returns (the first HEAD's offset, attempts, body bytes sent over all of them)."""
    first: Optional[int] = None
    sent = 0
    problem = ""
    for attempt in range(1, RESUME_ATTEMPTS + 1):
        conn = Connection(port)
        resp: Optional[Response] = None
        try:
            offset = head(conn)
            first = offset if first is None else first
            resp = append(conn, offset)
        except OSError as e:
            problem = f"{type(e).__name__}: {e}"
        finally:
            sent += conn.body_bytes
            conn.close()
        if resp is not None:
            if resp.status != 409:
                assert first is not None
                return first, attempt, sent
            problem = f"409 at offset {offset:,}"
    raise Refused(f"resume failed {RESUME_ATTEMPTS} times, last: {problem}")


def break_and_resume(protocol: str, port: int, src: Path, size: int, begin: Callable[[Connection], str],
                     head: Callable[[Connection, str], int],
                     append: Callable[[Connection, str, BinaryIO, int], Response]) -> Break:
    """An upload broken at 50% and resumed, timed from the first connect to the final answer.

    `begin` sends the request head that starts the upload on the first connection and returns
    the upload's URL; half the body follows and the connection is closed. Then `resume`, with
    `head` (the offset to go on from) and `append` (the rest from that offset) on the URL."""
    with open(src, "rb") as f:
        t0 = time.perf_counter()
        first = Connection(port)
        try:
            location = begin(first)
            first.send_body(f, 0, size // 2)
        finally:
            first.close()
        offset, attempts, sent = resume(port, f, size, lambda conn: head(conn, location),
                                        lambda conn, at: append(conn, location, f, at))
        seconds = time.perf_counter() - t0
    return Break(protocol, 0, size, first.body_bytes, offset, first.body_bytes + sent, seconds, attempts, location)


def tus_broken(port: int, path: str, src: Path, size: int) -> Break:
    """tus: one PATCH carrying the whole file, closed after half; then HEAD and PATCH the rest."""

    def begin(conn: Connection) -> str:
        location = tus_create(conn, path, size)
        conn.send_head("PATCH", location, tus_patch_headers(0, size))
        return location

    def head(conn: Connection, location: str) -> int:
        offset = tus_head(conn, location, size)
        if not 0 <= offset <= size:
            raise Refused(f"tus HEAD after the break: offset {offset:,} of {size:,}")
        return offset

    def append(conn: Connection, location: str, f: BinaryIO, offset: int) -> Response:
        resp = conn.request("PATCH", location, tus_patch_headers(offset, size - offset), (f, offset, size - offset))[0]
        if resp.status != 409:
            expect(resp, 204, "tus resumed PATCH")
            if header_int(resp, "upload-offset", "tus resumed PATCH") != size:
                raise Refused(f"tus resumed PATCH: Upload-Offset {resp.header('upload-offset')}")
        return resp

    return break_and_resume("tus", port, src, size, begin, head, append)


def ietf_headers(**extra: str) -> dict[str, str]:
    return {"Upload-Draft-Interop-Version": IETF_VERSION, **extra}


def ietf_head(conn: Connection, location: str, size: int) -> tuple[int, bool, str]:
    """(offset, complete, Upload-Limit) from an IETF HEAD (204; Upload-Length must be `size`)."""
    resp = expect(conn.request("HEAD", location, ietf_headers())[0], 204, "IETF HEAD")
    if header_int(resp, "upload-length", "IETF HEAD") != size:
        raise Refused(f"IETF HEAD: Upload-Length {resp.header('upload-length')}, expected {size:,}")
    complete = resp.header("upload-complete")
    if complete not in ("?0", "?1"):
        raise Refused(f"IETF HEAD: Upload-Complete {complete!r}")
    return header_int(resp, "upload-offset", "IETF HEAD"), complete == "?1", resp.header("upload-limit")


def ietf_broken(port: int, path: str, src: Path, size: int) -> Break:
    """IETF draft: a complete PUT, its 104's Location read, closed after half; HEAD; PATCH the rest."""
    limits: list[str] = []

    def begin(conn: Connection) -> str:
        conn.send_head("PUT", storage.target(path, size),
                       ietf_headers(**{"Upload-Complete": "?1", "Content-Type": "application/octet-stream",
                                       "Content-Length": str(size)}))
        interim = conn.read_response("PUT")
        expect(interim, 104, "IETF creation PUT (interim)")
        location = interim.header("location")
        if not location:
            raise Refused("IETF 104 without a Location")
        return location

    def head(conn: Connection, location: str) -> int:
        offset, complete, limit = ietf_head(conn, location, size)
        limits.append(limit)
        if complete or not 0 <= offset <= size:
            raise Refused(f"IETF HEAD after the break: offset {offset:,} of {size:,}, complete {complete}")
        return offset

    def append(conn: Connection, location: str, f: BinaryIO, offset: int) -> Response:
        resp = conn.request("PATCH", location, ietf_headers(**{
            "Content-Type": PARTIAL_UPLOAD, "Upload-Offset": str(offset), "Upload-Complete": "?1",
            "Content-Length": str(size - offset)}), (f, offset, size - offset))[0]
        if resp.status != 409:
            expect(resp, 201, "IETF resumed PATCH")
            if not resp.header("location").endswith("/upload/" + path):
                raise Refused(f"IETF resumed PATCH: Location {resp.header('location')!r} is not the file's")
        return resp

    brk = break_and_resume("ietf", port, src, size, begin, head, append)
    brk.upload_limit = limits[0]
    return brk


def check_finished(port: int, brk: Break) -> None:
    """A final HEAD on the resumed upload: offset == length (IETF: and complete). Untimed, and after
    the takeover count was read: a HEAD right after an IETF 201 can find the PATCH that answered
    still holding the upload (it answers before it lets go) and count as a takeover."""
    conn = Connection(port)
    try:
        if brk.protocol == "tus":
            if tus_head(conn, brk.location, brk.size) != brk.size:
                raise Refused("tus HEAD after the upload: offset != length")
        elif ietf_head(conn, brk.location, brk.size)[:2] != (brk.size, True):
            raise Refused("IETF HEAD after the upload: not complete at its length")
    finally:
        conn.close()


# ----------------------------------------------------------------------------- checks


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_stored(srv: ResumableHmacfs, path: str, size: int, want: str, via_get: bool) -> Optional[str]:
    """None when the server stored exactly the source under `path`, else what is wrong. Checks the
    file on disk (size, sha256) and, with `via_get`, what a GET returns."""
    stored = srv.data / path
    try:
        got_size = stored.stat().st_size
    except OSError as e:
        return f"{path} is not stored: {e}"
    if got_size != size:
        return f"{path} is {got_size:,} bytes, not {size:,}"
    if file_sha256(stored) != want:
        return f"{path} on disk has another sha256 than the source"
    if via_get:
        status, got = storage.get_sha256(srv.port, path, timeout=TIMEOUT)
        if status != 200 or got != want:
            return f"GET {path}: {status}, sha256 {got[:12]}... instead of {want[:12]}..."
    return None


def partial_bytes(srv: ResumableHmacfs) -> int:
    """Bytes under .hmacfs/partials: 0 once every upload is committed or deleted."""
    return storage.stored_bytes(srv.data / ".hmacfs" / "partials")


def remove(run: Run, srv: ResumableHmacfs, path: str) -> None:
    status = storage.delete(srv.port, path)
    if status != 204:
        run.fail(f"DELETE {path} returned {status}")


def sanity_check(run: Run, srv: ResumableHmacfs) -> None:
    """Untimed, before the rounds, with an odd-sized file (3 MiB + 12,345 B): tus in 1 MiB PATCHes,
    a PUT and both broken-and-resumed flows come back intact through GET; the server refuses a
    wrong offset (409 with the right one), so it really checks offsets; the HEAD's Upload-Limit
    shows the 2GB chunksize took effect; DELETE on an upload (termination) works; no partial file
    is left behind. A misconfigured server must not pass for a fast one."""
    size = 3 * (1 << 20) + 12345
    src = run.root / "check.bin"
    src.write_bytes(os.urandom(size))
    want = file_sha256(src)
    port = srv.port

    conn = Connection(port, timeout=60)
    try:
        location = tus_create(conn, "check/terminated.bin", size)
        opts = conn.request("OPTIONS", location, {})[0]
        if opts.header("tus-version") != "1.0.0" or "creation" not in opts.header("tus-extension"):
            raise RuntimeError(f"sanity check: OPTIONS answered {opts.status} {opts.headers}")
        with open(src, "rb") as f:
            wrong = conn.request("PATCH", location, tus_patch_headers(5, 1), (f, 0, 1))[0]
        if wrong.status != 409 or wrong.header("upload-offset") != "0":
            raise RuntimeError(f"sanity check: a PATCH at the wrong offset got {wrong.status} "
                               f"(Upload-Offset {wrong.header('upload-offset')!r}) instead of 409 with 0")
        gone = conn.request("DELETE", location, dict(TUS))[0]
        if gone.status != 204 or conn.request("HEAD", location, dict(TUS))[0].status != 404:
            raise RuntimeError(f"sanity check: tus DELETE answered {gone.status}, or the upload is still there")
    finally:
        conn.close()

    tus_upload(port, "check/tus.bin", src, size, 1 << 20)
    put_upload(port, "check/put.bin", src, size)
    ietf = ietf_broken(port, "check/ietf.bin", src, size)
    check_finished(port, ietf)
    check_finished(port, tus_broken(port, "check/tus-broken.bin", src, size))
    m = re.search(r"max-append-size=(\d+)", ietf.upload_limit)
    if not m or int(m.group(1)) < run.plan.big:
        raise RuntimeError(f"sanity check: Upload-Limit {ietf.upload_limit!r}: [uploads] chunksize is below "
                           f"{run.plan.big:,} (the config edit did not take)")
    for path in ("check/tus.bin", "check/put.bin", "check/ietf.bin", "check/tus-broken.bin"):
        problem = verify_stored(srv, path, size, want, via_get=True)
        if problem:
            raise RuntimeError("sanity check: " + problem)
        remove(run, srv, path)
    left = partial_bytes(srv)
    if left:
        raise RuntimeError(f"sanity check: {left:,} bytes left under .hmacfs/partials")
    if "not implemented" in srv.log_tail(20000):
        run.note(f"hmacfs logged 'not implemented': {srv.log_tail(500)!r}")
    src.unlink()
    run.checks += [
        "3 MiB + 12,345 B random file through tus in 1 MiB PATCHes, one PUT, and an IETF and a tus "
        "upload broken at 50% and resumed: GET returns it with the same sha256 each time",
        "OPTIONS offers tus 1.0.0 with creation; a PATCH at a wrong offset gets 409 with the right "
        "Upload-Offset; DELETE (termination) removes an upload (then HEAD 404)",
        f"IETF HEAD's Upload-Limit max-append-size >= {human(run.plan.big)} ([uploads] chunksize took effect)",
        "every round: each PATCH's 204 carries the expected Upload-Offset; tus creation 201 with Location; "
        "the IETF PUT gets a 104 with Location and its resumed PATCH a 201 with the file's Location; "
        "a final HEAD says offset == length (IETF: Upload-Complete ?1)",
        "every round: every stored file has the source's size and sha256 on disk; on the last round also "
        "through a GET; nothing is left under .hmacfs/partials after the round",
    ]


# ----------------------------------------------------------------------------- phases


def phase_throughput(run: Run, r: int, srv: ResumableHmacfs, src: Path, want: str) -> None:
    """Figure 1: tus and PUT of the same file, order alternating by round, RAM warmed before each."""
    plan, last = run.plan, r == run.plan.rounds - 1
    for kind in rotate(["tus", "PUT"], r):
        path = f"{kind.lower()}/r{r}.bin"
        if plan.warm:
            run.add("warm_s", kind, warm_memory(plan.warm_bytes))
        cpu0 = srv.cpu_seconds()
        try:
            if kind == "tus":
                res = tus_upload(srv.port, path, src, plan.big, plan.chunk)
            else:
                res = put_upload(srv.port, path, src, plan.big)
        except (Refused, OSError) as e:
            run.fail(f"r{r} {kind} upload: {e}")
            continue
        cpu = srv.cpu_seconds() - cpu0
        if kind == "tus":
            try:
                conn = Connection(srv.port)
                try:
                    final = tus_head(conn, res.location, plan.big)
                finally:
                    conn.close()
                if final != plan.big:
                    raise Refused(f"HEAD offset {final:,} != length {plan.big:,}")
            except (Refused, OSError) as e:
                run.fail(f"r{r} tus final HEAD: {e}")
                continue
            if res.reconnects:
                run.note(f"r{r}: the server closed the keep-alive connection {res.reconnects} time(s) during tus")
        problem = verify_stored(srv, path, plan.big, want, via_get=last)
        if problem:
            run.fail(f"r{r} {kind}: {problem}")
        else:
            mbps = plan.big / res.seconds / MB
            run.add("upload", kind, mbps)
            for name, value in (("wall s", res.seconds), ("send s", sum(res.sends)), ("wait s", sum(res.waits)),
                                ("last wait ms", res.waits[-1] * 1000), ("server cpu s", cpu)):
                run.add("parts", f"{kind} {name}", value)
            if kind == "tus":
                run.add("parts", "tus create ms", res.create * 1000)
                run.add("parts", "tus other waits ms", statistics.median(res.waits[:-1] or [0.0]) * 1000)
            warm = f" (RAM warm-up {run.get('warm_s', kind)[-1]:.1f} s)" if plan.warm else ""
            print(f"  r{r} {kind:3s} {mbps:8,.0f} MB/s, {res.seconds:6.2f} s, send {sum(res.sends):.2f} s, "
                  f"wait {sum(res.waits):.2f} s, server CPU {cpu:.2f} s{warm}", flush=True)
        remove(run, srv, path)
    try:
        patch_ms, head_ms = small_request_latency(srv.port, f"small/r{r}.bin", src)
    except (Refused, OSError) as e:
        run.fail(f"r{r} 1-byte PATCH latency: {e}")
    else:
        run.add("parts", "tus 1-byte PATCH ms", patch_ms)
        run.add("parts", "tus HEAD ms", head_ms)
        print(f"  r{r} 1-byte tus PATCH {patch_ms:.2f} ms, HEAD {head_ms:.2f} ms (medians)", flush=True)
        remove(run, srv, f"small/r{r}.bin")


def phase_resume(run: Run, r: int, srv: ResumableHmacfs, src: Path, want: str) -> None:
    """Figure 2: one upload per protocol broken at 50% and resumed (order alternating by round)."""
    plan, last = run.plan, r == run.plan.rounds - 1
    flows: dict[str, Callable[[int, str, Path, int], Break]] = {"tus": tus_broken, "ietf": ietf_broken}
    for proto in rotate(["tus", "ietf"], r):
        path = f"resume-{proto}/r{r}.bin"
        before = srv.takeovers()
        try:
            brk = flows[proto](srv.port, path, src, plan.big)
            after = srv.takeovers()
            check_finished(srv.port, brk)
        except (Refused, OSError) as e:
            run.fail(f"r{r} broken {proto} upload: {e}")
            continue
        brk.round = r
        brk.takeovers = None if before is None or after is None else round(after - before)
        problem = verify_stored(srv, path, plan.big, want, via_get=last)
        if problem:
            run.fail(f"r{r} broken {proto}: {problem}")
        else:
            run.breaks.append(brk)
            run.add(f"resume_{proto}", "sent", brk.moved / MB)
            run.add(f"resume_{proto}", "size", brk.size / MB)
            print(f"  r{r} {proto:4s} broken at {brk.sent_before:,} B: HEAD said {brk.server_offset:,} B, "
                  f"client sent {brk.moved:,} B (+{brk.extra:,}) = {brk.ratio:.4f} x size, "
                  f"{brk.seconds:.2f} s, {brk.attempts} attempt(s), takeovers {brk.takeovers}", flush=True)
        remove(run, srv, path)


# ----------------------------------------------------------------------------- report


def ratio_of(row: Row, run: Run) -> tuple[Optional[float], Optional[float], Optional[float], list[float]]:
    """(median measured, median against, their ratio, per-round ratios)."""
    a, b = run.get(row.key, row.measured), run.get(row.key, row.against)
    m = statistics.median(a) if a else None
    g = statistics.median(b) if b else None
    ratio = m / g if m is not None and g else None
    per = [x / y for x, y in zip(a, b) if y] if len(a) == len(b) else []
    return m, g, ratio, per


def verdict(row: Row, ratio: Optional[float]) -> str:
    how, threshold = row.target
    if ratio is None:
        return f"{how} {threshold:.2f}x: n/a"
    ok = ratio >= threshold if how == ">=" else ratio < threshold
    return f"{how} {threshold:.2f}x: {'PASS' if ok else 'MISS'}"


def table(run: Run) -> str:
    lines = ["| metric | unit | measured | against | ratio | per-round ratios | target |",
             "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for row in rows(run.plan):
        m, a, ratio, per = ratio_of(row, run)
        d = row.ratio_digits
        lines.append(f"| {row.label} | {row.unit} | {row.measured} {'n/a' if m is None else row.fmt.format(m)} | "
                     f"{row.against} {'n/a' if a is None else row.fmt.format(a)} | "
                     f"{'n/a' if ratio is None else f'{ratio:.{d}f}x'} | "
                     f"{' '.join(f'{x:.{d}f}' for x in per) or 'n/a'} | {verdict(row, ratio)} |")
    return "\n".join(lines)


def _median(run: Run, name: str, fmt: str) -> str:
    values = run.get("parts", name)
    return fmt.format(statistics.median(values)) if values else "n/a"


def time_table(run: Run) -> list[str]:
    """Where the time of a tus upload and of a PUT goes (medians over rounds)."""
    plan = run.plan
    out = ["| | tus | PUT |", "| --- | ---: | ---: |"]
    for label, name, fmt in (
            ("wall time, connect to the last answer (s)", "wall s", "{:.2f}"),
            ("sending: request heads + sendfile until it returned, summed (s)", "send s", "{:.2f}"),
            ("waiting: last body byte sent to the response head, summed (s)", "wait s", "{:.2f}"),
            ("of which the last request's wait (ms; the commit)", "last wait ms", "{:.1f}"),
            ("server CPU, user + system (s)", "server cpu s", "{:.2f}")):
        out.append(f"| {label} | {_median(run, 'tus ' + name, fmt)} | {_median(run, 'PUT ' + name, fmt)} |")
    out.append(f"| connect + creation POST (ms) | {_median(run, 'tus create ms', '{:.1f}')} | - |")
    out.append(f"| median wait of the other {plan.patches - 1} PATCHes (ms) | "
               f"{_median(run, 'tus other waits ms', '{:.1f}')} | - |")
    out.append(f"| requests | 1 + {plan.patches} | 1 |")
    out.append(f"| a 1-byte PATCH, request to answer (ms; median of 31, keep-alive) | "
               f"{_median(run, 'tus 1-byte PATCH ms', '{:.2f}')} | - |")
    out.append(f"| a HEAD, request to answer (ms; median of 31) | {_median(run, 'tus HEAD ms', '{:.2f}')} | - |")
    tus, put = run.get("parts", "tus wall s"), run.get("parts", "PUT wall s")
    out.append("")
    if tus and put and len(tus) == len(put):
        extra = [(t - p) / plan.patches * 1000 for t, p in zip(tus, put)]
        out.append(f"Extra time per PATCH, (tus - PUT) / {plan.patches}, per round: "
                   + ", ".join(f"{x:.1f} ms" for x in extra) + ".")
        out.append("")
    out.append("With sendfile, \"sending\" ends when the last byte is in the client's socket buffer, so "
               "\"waiting\" also holds the server reading what the kernel still buffered (a few MiB on "
               "loopback) before its per-request work (fsync of the partial file, the SQLite row, and on the "
               "last PATCH or the PUT the commit).")
    return out


def break_table(run: Run) -> list[str]:
    out = ["| protocol | round | client had sent when it closed | offset the (first) HEAD said | resume attempts | "
           "client sent in all | sent more than once | / size | takeovers | wall s |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for b in run.breaks:
        out.append(f"| {b.protocol} | {b.round + 1} | {b.sent_before:,} | {b.server_offset:,} | {b.attempts} | "
                   f"{b.moved:,} | {b.extra:,} | {b.ratio:.4f} | {'n/a' if b.takeovers is None else b.takeovers} | "
                   f"{b.seconds:.2f} |")
    return out


def report(run: Run, info: dict[str, str], wall: float, loads: tuple[str, str], fs: str, context: str) -> str:
    plan = run.plan
    busy = max(float(x.split()[0]) if x != "?" else 0.0 for x in loads) >= 0.5
    out = ["# hmacfs resumable-upload benchmark results", "",
           f"Written by `python3 bench/resumable.py{' --quick' if plan.mode == 'quick' else ''}`; "
           "see `bench/README.md` (\"Resumable uploads\").", "",
           f"- date: {info['date']}", f"- commit: {info['commit']}",
           f"- zipapp: {info.get('pyz', '?')}",
           f"- machine: {info['cpu']}",
           f"- kernel: {info['kernel']}", f"- Python: {info['python']}",
           f"- load average (1/5/15 min) at start: {loads[0]}; at end: {loads[1]}",
           "- other processes: " + ("were running (load average >= 0.5): figures are from a shared machine"
                                    if busy else "none significant (load average < 0.5)")
           + (f"; {context}" if context else ""),
           f"- mode: {plan.mode}, {plan.rounds} round(s) of {human(plan.big)}, tus in {human(plan.chunk)} PATCHes "
           f"(figure 1); tus/PUT order alternating by round; wall time {wall:.0f} s",
           f"- storage: {fs}; source file and data dir there (fsync costs next to nothing on tmpfs)",
           "- server: hmacfs from the zipapp, bench/servers.py's config with [uploads] "
           "`maxuploadsize = \"2GB\"`, `chunksize = \"2GB\"` (so one PATCH may carry the rest of a resumed "
           "upload); deduplication and encryption off",
           "- RAM warmed before every timed upload: "
           + (f"yes, {human(plan.warm_bytes)} faulted in and freed just before (storage.warm_memory)"
              if plan.warm else "no (--no-warm)"), "",
           "## Figures", "", table(run), "",
           "Upload: MB/s = 10^6 bytes / s from connect to the last answer (tus: the creation POST and every "
           "PATCH to the last 204; PUT: to the 201); medians over the rounds, ratio = tus / PUT. Broken "
           "uploads: every body byte the client handed to the kernel over all its requests (counted by the "
           "client; request heads, a few hundred bytes each, not counted) / the file size "
           "= 1 + (bytes sent more than once) / size. Per-round ratios pair the samples of one round.", "",
           "## Where the time goes (medians)", "", *time_table(run), "",
           "## Broken uploads: what the server kept", "", *break_table(run), "",
           "The client closes (FIN) right after sendfile returned half the body, then at once opens a new "
           "connection for HEAD and one PATCH with the rest; on a 409 or a lost connection it goes again (HEAD, "
           "PATCH), as a real client would (\"resume attempts\"). \"Sent more than once\" = client sent in "
           "all - size: bytes that were in the socket buffers at the break and that the server did not keep, "
           "plus whatever a second attempt re-sent. \"Takeovers\": how much `hmacfs_resumable_takeovers_total` "
           "went up during the flow: 1 when the HEAD found the cut request still attached (still reading what "
           "the kernel had buffered) and shut its connection down.", ""]
    out += ceilings_section(run)
    out += warm_section(run, "## RAM warm-up before the timed uploads",
                        "Seconds per GiB to fault in and free the warm-up memory, per series, in order of rounds "
                        "(~1 s/GiB: warm RAM; 1.5-3.5 s/GiB: this VM's RAM had gone cold).")
    out += samples_section(run.samples)
    out += checks_and_notes(run)
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    return bench_parser("hmacfs: tus/IETF resumable uploads vs PUT (see bench/README.md)",
                        "64 MiB in 4 MiB PATCHes, 1 round, ~5-10 s", BENCH / "resumable-results.md",
                        data="the source and data go").parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; exit 0 when every sample was valid, 1 when some failed, 2 on abort."""
    args = parse_args(argv)
    plan = chosen_plan(args, QUICK, FULL)
    handle_signals(plan.budget)
    started = time.perf_counter()
    load_start = loadavg()
    info = machine_info(args.python)  # before the build: the commit that is measured
    need = 3 * plan.big + plan.warm_bytes + (512 << 20)  # source + one stored file (+ its GET) + warm-up
    tmpdir = choose_tmpdir(args.tmpdir, need)
    signal.alarm(int(plan.budget))
    root = Path(tempfile.mkdtemp(prefix="hmacfs-bench-resumable-", dir=tmpdir))
    run = Run(plan, root)
    note_disk(run, tmpdir, root)
    srv: Optional[ResumableHmacfs] = None
    try:
        pyz, info["pyz"] = zipapp(args.pyz, args.python, root)
        srv = ResumableHmacfs(root / "server", pyz, args.python)
        print(f"bench: {plan.mode} mode, {plan.rounds} round(s) of {human(plan.big)} "
              f"({plan.patches} x {human(plan.chunk)} PATCHes), temp dir {root}, load {load_start}", flush=True)
        print(f"  hmacfs ready in {srv.start() * 1000:.0f} ms", flush=True)
        sanity_check(run, srv)
        src = make_random(root / "source.bin", plan.big)
        want = file_sha256(src)
        for r in range(plan.rounds):
            print(f"== round {r + 1}/{plan.rounds}", flush=True)
            storage.measure_ceilings(run, src)  # type: ignore[arg-type]
            phase_throughput(run, r, srv, src, want)
            phase_resume(run, r, srv, src, want)
            left = partial_bytes(srv)
            if left:
                run.fail(f"r{r}: {left:,} bytes left under .hmacfs/partials after the round")
        signal.alarm(0)
    except (BudgetExceeded, KeyboardInterrupt, SystemExit, Exception) as exc:
        return aborted(exc, srv, show_traceback=True)
    finally:
        stop_all(srv)
        shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - started
    text = report(run, info, wall, (load_start, loadavg()), fs_of(root), args.context)
    return write_results(args.out, text, table(run), wall, run.failures)


if __name__ == "__main__":
    sys.exit(main())
