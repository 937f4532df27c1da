"""hmacfs/services/clamav.py below the HTTP layer: the reply and address parsers, the raw clamd
client against a real clamd, and the Scanner/ScanSession policy (slots, limits, fail open or
closed) against a real clamd and against scripted fake ones.

Why both: the real clamd (Debian's clamav-daemon, started by tests/support/clamd.py with a
one-line EICAR database) proves the wire protocol (null-terminated z-commands, 4-byte
big-endian INSTREAM framing) is what clamd actually speaks; the fake ones produce the answers a
real clamd gives only under conditions too slow or awkward to arrange (a size-limit ERROR, a
reply that never ends, a connection closed without a verdict), which must all be treated as
"clamd failed" and never as "clean".
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional

import pytest

from hmacfs.errors import HTTPError
from hmacfs.services import clamav
from hmacfs.services.clamav import (
    ClamdClient,
    ClamdError,
    Scanner,
    ScanResult,
    parse_address,
    parse_scan_reply,
)
from tests.conftest import need_program
from tests.support.clamd import EICAR, EMBEDDED_SIGNATURE, SIGNATURE, ClamdProcess

# -- pure parts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, expected", [
    (b"stream: OK\0", ScanResult(False)),
    (b"stream: OK\n", ScanResult(False)),
    (b"stream: Eicar-Test-Signature.UNOFFICIAL FOUND\0",
     ScanResult(True, "Eicar-Test-Signature.UNOFFICIAL")),
    (b"stream: Win.Test.EICAR_HDB-1 FOUND\n", ScanResult(True, "Win.Test.EICAR_HDB-1")),
    (b"stream: Some Name With Spaces FOUND\0", ScanResult(True, "Some Name With Spaces")),
])
def test_parse_scan_reply_verdicts(reply: bytes, expected: ScanResult) -> None:
    assert parse_scan_reply(reply) == expected


@pytest.mark.parametrize("reply", [b"stream: OK", b"stream: OKBot", b"stream: Eicar FOUND", b""])
def test_a_reply_cut_short_is_never_clean(reply: bytes) -> None:
    """clamd closed before its terminator: `stream: OK` may be the start of `stream: OKBot FOUND`."""
    with pytest.raises(ClamdError):
        parse_scan_reply(reply)


@pytest.mark.parametrize("reply", [
    b"",
    b"\0",
    b"INSTREAM size limit exceeded. ERROR\0",  # what clamd says past StreamMaxLength
    b"stream: Can't allocate memory ERROR\0",
    b"stream: \0",
    b"stream: FOUND\0",  # no signature
    b"stream:  FOUND\0",  # a blank signature
    b"stream: OK extra\0",
    b"stream: ok\0",
    b"PONG\0",
    b"stream: OK\0stream: OK\0",  # two replies in one: not one verdict
    b"stream: Evil\x1b[2J FOUND\0",  # control characters must not reach the log or the 422 body
    b"stream: OK\nstream: Eicar FOUND\n",
    b"1: stream: OK\0",  # an IDSESSION-style reply: not what hmacfs asked for
])
def test_parse_scan_reply_refuses_anything_else(reply: bytes) -> None:
    with pytest.raises(ClamdError):
        parse_scan_reply(reply)


@pytest.mark.parametrize("spec, expected", [
    ("/run/clamav/clamd.ctl", "/run/clamav/clamd.ctl"),
    ("./clamd.sock", "./clamd.sock"),
    ("unix:/tmp/clamd.sock", "/tmp/clamd.sock"),
    ("  /padded.sock  ", "/padded.sock"),
    ("tcp://127.0.0.1:3310", ("127.0.0.1", 3310)),
    ("127.0.0.1:3310", ("127.0.0.1", 3310)),
    ("localhost:1", ("localhost", 1)),
    ("clamd.example:65535", ("clamd.example", 65535)),
    ("[::1]:3310", ("::1", 3310)),
    ("tcp://[2001:db8::5]:3310", ("2001:db8::5", 3310)),
])
def test_parse_address(spec: str, expected: clamav.Address) -> None:
    assert parse_address(spec) == expected


@pytest.mark.parametrize("spec", [
    "", "clamd", "clamd.sock", "localhost", "localhost:", ":3310", "tcp://:3310", "host:0", "host:65536",
    "host:http", "host:-1", "tcp://localhost", "[::1]",
    "unix:", "host:\u0663\u0663\u0661\u0660", "a b:33",
])
def test_parse_address_refuses_what_is_neither(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_address(spec)


# -- a real clamd -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdProcess]:
    """One clamd on a Unix socket and 127.0.0.1 TCP for the module (no test here stops it)."""
    proc = ClamdProcess(tmp_path_factory.mktemp("clamd"), tcp=True, program=need_program("clamd"))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(params=["unix", "tcp"])
def address(request: pytest.FixtureRequest, clamd: ClamdProcess) -> clamav.Address:
    return clamd.socket_path if request.param == "unix" else clamd.tcp_address


def instream(sock: socket.socket, data: bytes, frame: int) -> ScanResult:
    """Send `data` in frames of `frame` bytes, end the stream, read the verdict."""
    for start in range(0, len(data), frame):
        piece = data[start:start + frame]
        sock.sendall(struct.pack(">I", len(piece)) + piece)
    sock.sendall(struct.pack(">I", 0))
    return parse_scan_reply(clamav._read_reply(sock))


def test_client_ping_and_version(address: clamav.Address) -> None:
    client = ClamdClient(address, timeout=5)
    assert client.ping() is True
    assert client.version().startswith("ClamAV 1.")


@pytest.mark.parametrize("frame", [1, 7, 68])
def test_client_stream_finds_eicar_in_any_framing(address: clamav.Address, frame: int) -> None:
    """The verdict does not depend on how the bytes were cut into frames (clamd reassembles)."""
    sock = ClamdClient(address, timeout=5).stream()
    try:
        result = instream(sock, EICAR, frame)
    finally:
        sock.close()
    assert result.infected and result.signature is not None and result.signature.startswith(SIGNATURE), result


def test_client_stream_clean(address: clamav.Address) -> None:
    sock = ClamdClient(address, timeout=5).stream()
    try:
        assert instream(sock, os.urandom(300_000), 65536) == ScanResult(False)
    finally:
        sock.close()


def test_client_stream_past_stream_max_length_is_an_error_not_clean(tmp_path: Path) -> None:
    """clamd cuts a stream past StreamMaxLength with an ERROR line: that must not read as clean."""
    small = ClamdProcess(tmp_path / "small", max_length="1M", program=need_program("clamd")).start()
    try:
        sock = ClamdClient(small.socket_path, timeout=5).stream()
        try:
            with pytest.raises((ClamdError, OSError)):
                instream(sock, bytes(2 << 20), 256 << 10)
        finally:
            sock.close()
    finally:
        small.stop()


def test_client_unreachable_is_clamd_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (str(tmp_path / "missing.sock"), ("127.0.0.1", port)):
        client = ClamdClient(address, timeout=2)
        with pytest.raises(ClamdError, match="cannot reach clamd"):
            client.ping()
        with pytest.raises(ClamdError):
            client.stream()


# -- Scanner / ScanSession --------------------------------------------------------------------------


class Scans:
    """Stands in for ServerMetrics: counts `scans.inc(n, result)` per result."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.scans = self

    def inc(self, n: float, result: str) -> None:
        self.counts[result] += int(n)


def scanner(address: clamav.Address, workers: int = 2, extensions: tuple[str, ...] = (), max_size: int = 10 << 20,
            fail_open: bool = False, large_files: str = "reject") -> tuple[Scanner, Scans]:
    metrics = Scans()
    return Scanner(address, workers, extensions, max_size, fail_open, large_files, metrics, timeout=5), metrics


def all_slots_free(s: Scanner, workers: int) -> bool:
    """Every scan slot can be taken at once (then given back): none leaked."""
    taken = 0
    while taken < workers + 1 and s.slots.acquire(blocking=False):
        taken += 1
    for _ in range(taken):
        s.slots.release()
    return taken == workers


def test_session_fed_in_pieces_finds_eicar_and_frees_its_slot(clamd: ClamdProcess) -> None:
    s, metrics = scanner(clamd.socket_path)
    session = s.begin("a/eicar.bin", len(EICAR))
    assert session is not None
    for piece in (EICAR[:5], EICAR[5:40], EICAR[40:]):
        session.feed(memoryview(piece))
    with pytest.raises(HTTPError) as err:
        session.verdict()
    assert err.value.status == 422 and SIGNATURE in err.value.message
    assert metrics.counts == Counter(infected=1)
    assert all_slots_free(s, 2)


@pytest.fixture(scope="module")
def embedded_clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdProcess]:
    """A clamd that also finds the EICAR string inside a bigger file."""
    proc = ClamdProcess(tmp_path_factory.mktemp("clamd-embedded"), embedded=True, program=need_program("clamd"))
    proc.start()
    yield proc
    proc.stop()


@pytest.mark.parametrize("tail, infected", [(EICAR, True), (EICAR[:-1], False)], ids=["eicar", "one-byte-short"])
def test_session_sends_every_byte_of_a_big_chunk(embedded_clamd: ClamdProcess, tail: bytes, infected: bool) -> None:
    """A receive buffer larger than one frame (CHUNK) goes out as several frames, all of them:
    EICAR at its very end is found (and one byte short of it, nothing is)."""
    s, metrics = scanner(embedded_clamd.socket_path)
    data = os.urandom(3 * clamav.CHUNK + 12345) + tail
    session = s.begin("a/big.bin", None)
    assert session is not None
    session.feed(memoryview(data))
    if infected:
        with pytest.raises(HTTPError) as err:
            session.verdict()
        assert err.value.status == 422 and EMBEDDED_SIGNATURE in err.value.message
    else:
        session.verdict()
    assert session.sent == len(data)  # the sender thread framed all of it before the verdict
    assert metrics.counts == (Counter(infected=1) if infected else Counter(clean=1))
    assert all_slots_free(s, 2)


def test_scan_of_blocks_as_resumable_uploads_use_it(clamd: ClamdProcess) -> None:
    s, metrics = scanner(clamd.socket_path)
    s.scan("a/clean.bin", 6, [b"abc", b"def"])
    with pytest.raises(HTTPError) as err:
        s.scan("a/eicar.bin", len(EICAR), [EICAR[:10], EICAR[10:]])
    assert err.value.status == 422
    assert metrics.counts == Counter(clean=1, infected=1)
    assert all_slots_free(s, 2)


def test_extensions_choose_what_is_scanned(clamd: ClamdProcess) -> None:
    s, metrics = scanner(clamd.socket_path, extensions=(".exe", "scr"))
    assert s.begin("a/readme.txt", 68) is None
    assert s.wants("a/SETUP.EXE") and s.wants("a/x.scr") and not s.wants("a/exe") and not s.wants("a/x.exe.txt")
    assert metrics.counts == Counter()  # not scanned is not counted as a scan
    everything, _ = scanner(clamd.socket_path)
    assert everything.wants("a/readme.txt") and everything.wants("a/no-extension")


def test_declared_size_over_the_limit(clamd: ClamdProcess) -> None:
    """Known before the body: refused (413) or stored unscanned, per `largefiles`; no slot taken."""
    reject, counts = scanner(clamd.socket_path, workers=1, max_size=100)
    with pytest.raises(HTTPError) as err:
        reject.begin("a/big.bin", 101)
    assert err.value.status == 413
    assert counts.counts == Counter(too_large=1)
    session = reject.begin("a/exact.bin", 100)  # the limit itself is still scanned
    assert session is not None
    session.close()
    assert all_slots_free(reject, 1)
    store, counts = scanner(clamd.socket_path, workers=1, max_size=100, large_files="store")
    assert store.begin("a/big.bin", 101) is None
    assert counts.counts == Counter(unscanned=1)
    assert all_slots_free(store, 1)


@pytest.mark.parametrize("large_files, status, counted", [("reject", 413, "too_large"), ("store", None, "unscanned")])
def test_undeclared_size_over_the_limit(clamd: ClamdProcess, large_files: str, status: Optional[int],
                                        counted: str) -> None:
    """A chunked body only shows its size as it arrives: the verdict decides once it passed the limit."""
    s, counts = scanner(clamd.socket_path, workers=1, max_size=100, large_files=large_files)
    session = s.begin("a/chunked.bin", None)
    assert session is not None
    session.feed(memoryview(b"x" * 60))
    session.feed(memoryview(EICAR))  # past the limit: not sent, so not found either
    assert session.too_large and session.queued == 60
    if status is None:
        session.verdict()
    else:
        with pytest.raises(HTTPError) as err:
            session.verdict()
        assert err.value.status == status
    assert counts.counts == Counter({counted: 1})
    assert all_slots_free(s, 1)


@pytest.mark.parametrize("fail_open", [False, True])
def test_clamd_down_fails_closed_or_open(tmp_path: Path, fail_open: bool) -> None:
    s, counts = scanner(str(tmp_path / "nothing-here.sock"), workers=1, fail_open=fail_open)
    for _ in range(3):  # a leaked slot would make the second call wait SLOT_WAIT and then 503 "busy"
        if fail_open:
            assert s.begin("a/f.bin", 10) is None
        else:
            with pytest.raises(HTTPError) as err:
                s.begin("a/f.bin", 10)
            assert err.value.status == 503 and err.value.headers.get("Retry-After")
            assert "busy" not in err.value.message
    assert counts.counts == (Counter(unscanned=3) if fail_open else Counter(error=3))
    assert all_slots_free(s, 1)


def test_slots_bound_concurrent_scans(clamd: ClamdProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """numscanworkers = 1: a second scan waits for the first; past SLOT_WAIT it is a 503."""
    monkeypatch.setattr(clamav, "SLOT_WAIT", 0.3)
    s, counts = scanner(clamd.socket_path, workers=1)
    first = s.begin("a/1.bin", 3)
    assert first is not None
    t0 = time.monotonic()
    with pytest.raises(HTTPError) as err:
        s.begin("a/2.bin", 3)
    assert err.value.status == 503 and "busy" in err.value.message and err.value.headers.get("Retry-After")
    assert time.monotonic() - t0 >= 0.25
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(s.begin("a/3.bin", 3)))
    monkeypatch.setattr(clamav, "SLOT_WAIT", 10.0)
    waiter.start()
    time.sleep(0.2)
    assert not got, "the second scan started while the only slot was taken"
    first.feed(memoryview(b"abc"))
    first.verdict()
    waiter.join(5)
    assert len(got) == 1 and isinstance(got[0], clamav.ScanSession)
    got[0].close()
    assert counts.counts == Counter(clean=1)
    assert all_slots_free(s, 1)


def test_clamd_killed_mid_scan_is_503_not_clean(tmp_path: Path) -> None:
    own = ClamdProcess(tmp_path / "clamd", program=need_program("clamd")).start()
    try:
        s, counts = scanner(own.socket_path, workers=1)
        session = s.begin("a/f.bin", None)
        assert session is not None
        session.feed(memoryview(os.urandom(100_000)))
        own.kill()
        session.feed(memoryview(os.urandom(100_000)))
        with pytest.raises(HTTPError) as err:
            session.verdict()
        assert err.value.status == 503
        assert counts.counts == Counter(error=1)
        assert all_slots_free(s, 1)
        own.start()  # reconnects: each scan opens its own connection
        s.scan("a/g.bin", 3, [b"abc"])
        assert counts.counts == Counter(error=1, clean=1)
    finally:
        own.stop()


# -- scripted fake clamds ---------------------------------------------------------------------------


class FakeClamd:
    """A Unix-socket server that reads one INSTREAM to its end and then runs `answer(conn)`."""

    def __init__(self, path: Path, answer: Callable[[socket.socket], None]) -> None:
        self.path = str(path)
        self.answer = answer
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            buf = b""
            while b"\0" not in buf:
                buf += conn.recv(4096)
            buf = buf.split(b"\0", 1)[1]
            while True:  # frames until the zero length
                while len(buf) < 4:
                    buf += conn.recv(65536)
                (n,), buf = struct.unpack(">I", buf[:4]), buf[4:]
                if n == 0:
                    break
                while len(buf) < n:
                    buf += conn.recv(65536)
                buf = buf[n:]
            self.answer(conn)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.mark.parametrize("large_files, status, counted", [("reject", 413, "too_large"), ("store", None, "unscanned")])
def test_past_clamds_stream_limit_is_too_large_not_unavailable(tmp_path: Path, large_files: str,
                                                               status: Optional[int], counted: str) -> None:
    """clamd refuses a stream longer than its StreamMaxLength: no retry can help, so it is a file
    too large to scan (413, or stored unscanned), never a 503 (clamd is there and answering)."""
    fake = FakeClamd(tmp_path / "fake.sock", lambda c: c.sendall(b"INSTREAM size limit exceeded. ERROR\0"))
    try:
        s, counts = scanner(fake.path, workers=1, large_files=large_files)
        session = s.begin("a/f.bin", 3)
        assert session is not None
        session.feed(memoryview(b"abc"))
        if status is None:
            session.verdict()
        else:
            with pytest.raises(HTTPError) as err:
                session.verdict()
            assert err.value.status == status
        assert counts.counts == Counter({counted: 1})
        assert all_slots_free(s, 1)
    finally:
        fake.close()


@pytest.mark.parametrize("answer", [
    pytest.param(lambda c: c.sendall(b"stream: lstat() failed. ERROR\0"), id="error"),
    pytest.param(lambda c: None, id="closed-without-reply"),
    pytest.param(lambda c: c.sendall(b"A" * (clamav.MAX_REPLY + 100)), id="endless-reply"),
    pytest.param(lambda c: c.sendall(b"\x00\xff garbage\0"), id="garbage"),
])
@pytest.mark.parametrize("fail_open", [False, True])
def test_a_reply_that_is_no_verdict_is_a_failure(tmp_path: Path, answer: Callable[[socket.socket], None],
                                                 fail_open: bool) -> None:
    fake = FakeClamd(tmp_path / "fake.sock", answer)
    try:
        s, counts = scanner(fake.path, workers=1, fail_open=fail_open)
        session = s.begin("a/f.bin", 3)
        assert session is not None
        session.feed(memoryview(b"abc"))
        if fail_open:
            session.verdict()
            assert counts.counts == Counter(unscanned=1)
        else:
            with pytest.raises(HTTPError) as err:
                session.verdict()
            assert err.value.status == 503
            assert counts.counts == Counter(error=1)
        assert all_slots_free(s, 1)
    finally:
        fake.close()
