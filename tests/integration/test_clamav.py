"""Virus scanning ([clamav]) against the real hmacfs process and a real clamd (Debian's
clamav-daemon), started per module by tests/support/clamd.py with a one-line EICAR database.

Covered, over HTTP as a client sees it, on the disk as an operator sees it, and in the log
and `hmacfs_virus_scans_total{result}` as monitoring sees it:
- EICAR refused with 422 naming the signature, and nothing of it kept (no file, no temp file,
  no upload resource) by every way in: a signed PUT, a chunked v3 PUT, tus (the last PATCH),
  the IETF draft's optimistic PUT; also with encryption at rest on (the scan must see the
  plaintext); clean files stored and served; over clamd's Unix socket and over TCP;
- the whole stream reaches clamd: the EICAR string hidden after 3 MiB (a body signature) is
  found by PUT, chunked PUT and tus, plain and encrypted; one byte short, the file is stored;
- `scanfileextensions`: only listed extensions are scanned (and only those are counted);
- `maxscansize` with `largefiles` = reject (413, before the body when the size is declared)
  or store (201, counted as unscanned);
- clamd killed with SIGKILL: between uploads and while one streams, with `failopen` off
  (503 + Retry-After, nothing stored) and on (stored, counted as unscanned); after clamd
  comes back the next upload is scanned again (hmacfs reconnects by itself);
- `numscanworkers`: with 1, a second upload waits for the scan slot before its
  100 Continue and succeeds once the first ends; with 2 it does not wait; an upload that
  ends without a verdict (client gone, body too large) gives its slot back;
- a resumable upload refused for want of clamd keeps its bytes and is scanned (committed or
  removed) on the client's next HEAD once clamd is back.

Larger than maxscansize is refused as early as its size is known (a tus creation), and a
stream past clamd's own StreamMaxLength counts as too large to scan, not as clamd down.
"""
from __future__ import annotations

import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from tests.conftest import need_program
from tests.support.clamd import EICAR, EMBEDDED_SIGNATURE, SIGNATURE, ClamdProcess
from tests.support.client import Response, put, request, signed_put, signed_v3, url_path
from tests.support.hmacfs_proc import HmacfsProcess
from tests.support.ietf_client import RawConnection, RawResponse, request_head

Factory = Callable[..., HmacfsProcess]  # conftest's hmacfs_factory: servers stopped after the test
TUS = {"Tus-Resumable": "1.0.0"}
OCTET_OFFSET = "application/offset+octet-stream"
CLEAN = b"just a harmless text file\n" * 10
SCANS = re.compile(r'^hmacfs_virus_scans_total\{result="(\w+)"\} (\S+)$', re.M)


# -- processes --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamdProcess]:
    """The clamd every server of this module uses, except in the tests that kill one (their own)."""
    proc = ClamdProcess(tmp_path_factory.mktemp("clamd"), tcp=True, program=need_program("clamd"))
    proc.start()
    yield proc
    proc.stop()


def scanning(socket_spec: str, **clamav: Any) -> dict[str, Any]:
    """A server config with [clamav] on at `socket_spec` plus the given [clamav] keys."""
    return {"clamav": {"clamavenabled": True, "clamavsocket": socket_spec, **clamav},
            "uploads": {"maxuploadsize": "20MB"}}


def serve(tmp_path_factory: pytest.TempPathFactory, name: str, config: dict[str, Any]) -> Iterator[HmacfsProcess]:
    proc = HmacfsProcess(tmp_path_factory.mktemp(name), config).start()
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, clamd: ClamdProcess) -> Iterator[HmacfsProcess]:
    """Scanning everything through clamd's Unix socket; the tests use paths of their own."""
    yield from serve(tmp_path_factory, "srv", scanning(clamd.socket_path))


# -- helpers ----------------------------------------------------------------------------------------


def slot(name: str = "file.bin") -> str:
    return f"{uuid.uuid4().hex}/{name}"


def scans(srv: HmacfsProcess) -> Counter[str]:
    """hmacfs_virus_scans_total by result, from the server's /metrics."""
    text = request(srv.metrics_port, "GET", "/metrics").body.decode()
    return Counter({m.group(1): int(float(m.group(2))) for m in SCANS.finditer(text)})


def counted(before: Counter[str], after: Counter[str]) -> Counter[str]:
    """The scans counted between two readings (results that did not move are left out)."""
    return Counter({k: after[k] - before[k] for k in after if after[k] != before[k]})


def temp_files(srv: HmacfsProcess) -> set[str]:
    tmp = srv.storage / ".hmacfs" / "tmp"
    return {p.name for p in tmp.iterdir()} if tmp.is_dir() else set()


def partial_files(srv: HmacfsProcess) -> set[str]:
    partials = srv.storage / ".hmacfs" / "partials"
    return {p.name for p in partials.iterdir()} if partials.is_dir() else set()


def get(srv: HmacfsProcess, path: str) -> Response:
    return request(srv.port, "GET", url_path(srv.prefix, path))


def assert_nothing_stored(srv: HmacfsProcess, path: str, temp_before: set[str]) -> None:
    """GET 404, no file (nor its slot directory) under the storage dir, no new temp file."""
    assert get(srv, path).status == 404
    assert not (srv.storage / path).exists()
    assert not (srv.storage / path).parent.exists()
    assert temp_files(srv) <= temp_before, temp_files(srv) - temp_before


def assert_infected(body: bytes) -> None:
    assert SIGNATURE.encode() in body, body


def assert_served(srv: HmacfsProcess, path: str, data: bytes) -> None:
    got = get(srv, path)
    assert got.status == 200 and got.body == data, got


def exchange(srv: HmacfsProcess, method: str, target: str, headers: list[tuple[str, str]],
             body: bytes = b"") -> tuple[list[RawResponse], RawResponse]:
    """One request on its own connection, read to its final response (interim ones kept)."""
    with RawConnection(srv.port, timeout=30) as conn:
        conn.send(request_head(method, target, [*headers, ("Connection", "close")]) + body)
        return conn.read_final(method)


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def v3_chunked_put(srv: HmacfsProcess, path: str, *pieces: bytes) -> RawResponse:
    target = signed_v3(srv.prefix, srv.secret, path, "PUT", int(time.time()) + 300)
    return exchange(srv, "PUT", target, [("Transfer-Encoding", "chunked")], chunked(*pieces))[1]


def tus_request(srv: HmacfsProcess, method: str, target: str, body: Optional[bytes] = None,
                headers: Optional[dict[str, str]] = None) -> Response:
    return request(srv.port, method, target, body, {**TUS, **(headers or {})})


def tus_upload(srv: HmacfsProcess, path: str, data: bytes, parts: int = 2) -> tuple[str, list[Response]]:
    """tus creation, then `data` in `parts` PATCHes; the resource URL and every PATCH's answer."""
    created = tus_request(srv, "POST", signed_put(srv.prefix, srv.secret, path, len(data)),
                          headers={"Upload-Length": str(len(data)), "Content-Length": "0"})
    assert created.status == 201, created
    location = created.header("Location")
    assert location, created
    answers = []
    step = -(-len(data) // parts)
    for start in range(0, len(data), step):
        answers.append(tus_request(srv, "PATCH", location, data[start:start + step],
                                   {"Content-Type": OCTET_OFFSET, "Upload-Offset": str(start)}))
    return location, answers


def ietf_put(srv: HmacfsProcess, path: str, data: bytes) -> tuple[list[RawResponse], RawResponse]:
    """The IETF draft's optimistic upload (interop 6): a complete PUT, its 104 first."""
    target = signed_put(srv.prefix, srv.secret, path, len(data))
    return exchange(srv, "PUT", target, [("Upload-Draft-Interop-Version", "6"), ("Upload-Complete", "?1"),
                                         ("Content-Length", str(len(data)))], data)


def begin_put(srv: HmacfsProcess, path: str, size: int) -> tuple[RawConnection, RawResponse]:
    """A signed PUT's head with `Expect: 100-continue`; returns the connection and the first answer."""
    conn = RawConnection(srv.port, timeout=30)
    conn.send(request_head("PUT", signed_put(srv.prefix, srv.secret, path, size),
                           [("Content-Length", str(size)), ("Expect", "100-continue")]))
    return conn, conn.read_response()


# -- EICAR by every way in --------------------------------------------------------------------------


def test_startup_logs_clamd_version(srv: HmacfsProcess) -> None:
    deadline = time.monotonic() + 5
    while "virus scanning with ClamAV" not in srv.log():
        assert time.monotonic() < deadline, srv.log()[-2000:]
        time.sleep(0.05)


def test_eicar_put_is_422_naming_the_signature_and_nothing_is_stored(srv: HmacfsProcess) -> None:
    path = slot("eicar.com")
    temp_before, before = temp_files(srv), scans(srv)
    r = put(srv, path, EICAR)
    assert r.status == 422, r
    assert_infected(r.body)
    assert_nothing_stored(srv, path, temp_before)
    assert counted(before, scans(srv)) == Counter(infected=1)
    lines = [line for line in srv.log().splitlines() if path in line and "infected" in line]
    assert len(lines) == 1 and SIGNATURE in lines[0] and "WARN" in lines[0].upper(), lines
    assert put(srv, path, CLEAN).status == 201, "a refused upload must leave its slot free"


def test_clean_put_is_stored_and_served(srv: HmacfsProcess) -> None:
    path = slot("notes.txt")
    before = scans(srv)
    assert put(srv, path, CLEAN).status == 201
    assert_served(srv, path, CLEAN)
    empty = slot()
    assert put(srv, empty, b"").status == 201  # an empty stream is a verdict too ("stream: OK")
    assert_served(srv, empty, b"")
    assert counted(before, scans(srv)) == Counter(clean=2)


def test_eicar_with_a_prefix_is_not_the_test_file(srv: HmacfsProcess) -> None:
    """The .hdb signature is the whole file's MD5: one byte more is another file. Proves the scan
    sees the exact bytes uploaded (not, say, the body with a chunk missing)."""
    path = slot()
    assert put(srv, path, b" " + EICAR).status == 201


def test_eicar_in_a_chunked_v3_put_is_422(srv: HmacfsProcess) -> None:
    path = slot("eicar.bin")
    temp_before, before = temp_files(srv), scans(srv)
    r = v3_chunked_put(srv, path, EICAR[:20], EICAR[20:21], EICAR[21:])
    assert r.status == 422, r
    assert_infected(r.body)
    assert_nothing_stored(srv, path, temp_before)
    clean = slot("clean.bin")
    assert v3_chunked_put(srv, clean, CLEAN[:100], CLEAN[100:]).status == 201
    assert_served(srv, clean, CLEAN)
    assert counted(before, scans(srv)) == Counter(infected=1, clean=1)


def test_eicar_by_tus_is_422_on_the_last_patch_and_the_upload_is_gone(srv: HmacfsProcess) -> None:
    path = slot("eicar.bin")
    temp_before, partials_before, before = temp_files(srv), partial_files(srv), scans(srv)
    location, answers = tus_upload(srv, path, EICAR, parts=3)
    assert [a.status for a in answers[:-1]] == [204, 204], answers
    assert answers[-1].status == 422, answers[-1]
    assert_infected(answers[-1].body)
    assert tus_request(srv, "HEAD", location).status == 404
    assert partial_files(srv) <= partials_before
    assert_nothing_stored(srv, path, temp_before)
    assert counted(before, scans(srv)) == Counter(infected=1)


def test_clean_tus_upload_is_scanned_and_committed(srv: HmacfsProcess) -> None:
    path = slot("clean.bin")
    before = scans(srv)
    location, answers = tus_upload(srv, path, CLEAN, parts=2)
    assert [a.status for a in answers] == [204, 204], answers
    assert_served(srv, path, CLEAN)
    assert tus_request(srv, "HEAD", location).header("Upload-Offset") == str(len(CLEAN))
    assert counted(before, scans(srv)) == Counter(clean=1)


def test_eicar_by_ietf_optimistic_put_is_422_and_the_upload_is_gone(srv: HmacfsProcess) -> None:
    path = slot("eicar.bin")
    temp_before, partials_before, before = temp_files(srv), partial_files(srv), scans(srv)
    interims, final = ietf_put(srv, path, EICAR)
    assert [i.status for i in interims] == [104], interims
    assert final.status == 422, final
    assert_infected(final.body)
    location = interims[0].header("Location")
    assert location
    head = exchange(srv, "HEAD", location, [("Upload-Draft-Interop-Version", "6")])[1]
    assert head.status == 404, head
    assert partial_files(srv) <= partials_before
    assert_nothing_stored(srv, path, temp_before)
    assert counted(before, scans(srv)) == Counter(infected=1)


def test_scanning_through_tcp(hmacfs_factory: Factory, clamd: ClamdProcess) -> None:
    host, port = clamd.tcp_address
    srv = hmacfs_factory(scanning(f"tcp://{host}:{port}"))
    r = put(srv, slot(), EICAR)
    assert r.status == 422, r
    assert_infected(r.body)
    assert put(srv, slot(), CLEAN).status == 201
    assert scans(srv) == Counter(infected=1, clean=1)


def test_encryption_at_rest_scans_the_plaintext(hmacfs_factory: Factory, clamd: ClamdProcess,
                                                tmp_path: Path) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"k1 {'ab' * 32}\n")
    keyfile.chmod(0o600)
    enc = hmacfs_factory({**scanning(clamd.socket_path), "encryption": {"enabled": True, "keyfile": str(keyfile)}})
    path = slot()
    temp_before = temp_files(enc)
    r = put(enc, path, EICAR)
    assert r.status == 422, r
    assert_infected(r.body)
    assert_nothing_stored(enc, path, temp_before)
    tus_path = slot()
    location, answers = tus_upload(enc, tus_path, EICAR, parts=2)
    assert answers[-1].status == 422, answers[-1]
    assert tus_request(enc, "HEAD", location).status == 404
    assert_nothing_stored(enc, tus_path, temp_before)
    clean = slot()
    assert put(enc, clean, CLEAN).status == 201
    assert (enc.storage / clean).read_bytes()[:8] == b"HMFSAEAD", "encryption is not on: the test proves nothing"
    assert_served(enc, clean, CLEAN)
    assert scans(enc) == Counter(infected=2, clean=1)


@pytest.mark.parametrize("encrypted", [False, True])
def test_every_byte_reaches_clamd(hmacfs_factory: Factory, tmp_path: Path, encrypted: bool) -> None:
    """The EICAR string hidden at the end of a 3 MiB upload (many receive buffers; with encryption
    a tus upload is read back from several sealed 1 MiB segments) is found by PUT, chunked PUT and
    tus alike: the scan sees the whole plaintext stream, in order. One byte short, it is stored."""
    clamd = ClamdProcess(tmp_path / "clamd", embedded=True, program=need_program("clamd")).start()
    try:
        config = scanning(clamd.socket_path)
        if encrypted:
            keyfile = tmp_path / "keys"
            keyfile.write_text(f"k1 {'cd' * 32}\n")
            keyfile.chmod(0o600)
            config["encryption"] = {"enabled": True, "keyfile": str(keyfile)}
        srv = hmacfs_factory(config)
        body = os.urandom(3 << 20)
        hidden = body + EICAR
        r = put(srv, slot(), hidden)
        assert r.status == 422 and EMBEDDED_SIGNATURE.encode() in r.body, r
        r2 = v3_chunked_put(srv, slot(), hidden[:1 << 20], hidden[1 << 20:])
        assert r2.status == 422 and EMBEDDED_SIGNATURE.encode() in r2.body, r2
        _, answers = tus_upload(srv, slot(), hidden, parts=3)
        assert answers[-1].status == 422 and EMBEDDED_SIGNATURE.encode() in answers[-1].body, answers[-1]
        across = body[:(1 << 20) - 30] + EICAR + body[:1000]  # across the first 1 MiB boundary
        _, answers = tus_upload(srv, slot(), across, parts=2)
        assert answers[-1].status == 422, answers[-1]
        harmless = slot()
        assert put(srv, harmless, body + EICAR[:-1]).status == 201
        _, answers = tus_upload(srv, slot(), body + EICAR[1:], parts=3)
        assert answers[-1].status == 204, answers[-1]
        assert scans(srv) == Counter(infected=4, clean=2)
        assert get(srv, harmless).body == body + EICAR[:-1]
    finally:
        clamd.stop()


# -- which files are scanned ------------------------------------------------------------------------


def test_scanfileextensions_scans_only_those(hmacfs_factory: Factory, clamd: ClamdProcess) -> None:
    srv = hmacfs_factory(scanning(clamd.socket_path, scanfileextensions=[".exe"]))
    txt = slot("eicar.txt")
    assert put(srv, txt, EICAR).status == 201
    assert_served(srv, txt, EICAR)
    assert scans(srv) == Counter(), "a file that is not scanned must not be counted as a scan"
    exe = slot("eicar.exe")
    r = put(srv, exe, EICAR)
    assert r.status == 422, r
    assert_infected(r.body)
    assert scans(srv) == Counter(infected=1)


def test_larger_than_maxscansize_rejected_before_the_body(hmacfs_factory: Factory, clamd: ClamdProcess) -> None:
    srv = hmacfs_factory(scanning(clamd.socket_path, maxscansize="1KB", largefiles="reject"))
    path = slot()
    temp_before = temp_files(srv)
    conn, first = begin_put(srv, path, 4096)
    try:
        assert first.status == 413, f"expected 413 instead of a 100 Continue: {first}"
    finally:
        conn.close()
    chunked_path = slot()
    r = v3_chunked_put(srv, chunked_path, os.urandom(800), os.urandom(800))  # no size up front: after the body
    assert r.status == 413, r
    for p in (path, chunked_path):
        assert_nothing_stored(srv, p, temp_before)
    small = put(srv, slot(), EICAR)  # smaller files are still scanned
    assert small.status == 422, small
    assert scans(srv) == Counter(too_large=2, infected=1)


def test_tus_creation_larger_than_maxscansize_is_refused_at_creation(hmacfs_factory: Factory,
                                                                     clamd: ClamdProcess) -> None:
    """Its length is known at creation, as a PUT's is from Content-Length: refuse it before any byte."""
    srv = hmacfs_factory(scanning(clamd.socket_path, maxscansize="1KB", largefiles="reject"))
    created = tus_request(srv, "POST", signed_put(srv.prefix, srv.secret, slot(), 4096),
                          headers={"Upload-Length": "4096", "Content-Length": "0"})
    assert created.status == 413, created
    assert partial_files(srv) == set()


def test_larger_than_maxscansize_stored_unscanned(hmacfs_factory: Factory, clamd: ClamdProcess) -> None:
    srv = hmacfs_factory(scanning(clamd.socket_path, maxscansize="1KB", largefiles="store"))
    path = slot()
    data = os.urandom(4096)
    assert put(srv, path, data).status == 201
    assert_served(srv, path, data)
    assert scans(srv) == Counter(unscanned=1)
    assert "stored unscanned" in srv.log()
    assert put(srv, slot(), EICAR).status == 422
    assert scans(srv) == Counter(unscanned=1, infected=1)


def test_upload_past_clamds_stream_limit_is_too_large_not_unavailable(hmacfs_factory: Factory,
                                                                       tmp_path: Path) -> None:
    clamd = ClamdProcess(tmp_path / "clamd", max_length="1M", program=need_program("clamd")).start()
    try:
        srv = hmacfs_factory(scanning(clamd.socket_path, largefiles="reject"))  # maxscansize: default 100MB
        r = put(srv, slot(), os.urandom(2 << 20))
        assert r.status == 413, r
        assert scans(srv) == Counter(too_large=1)
    finally:
        clamd.stop()


# -- clamd dies -------------------------------------------------------------------------------------


@pytest.fixture
def own_clamd(tmp_path: Path) -> Iterator[ClamdProcess]:
    """A clamd for one test, free to be killed."""
    proc = ClamdProcess(tmp_path / "clamd", program=need_program("clamd"))
    proc.start()
    yield proc
    proc.stop()


def test_clamd_killed_fail_closed_then_restarted(hmacfs_factory: Factory, own_clamd: ClamdProcess) -> None:
    srv = hmacfs_factory(scanning(own_clamd.socket_path, failopen=False))
    assert put(srv, slot(), EICAR).status == 422
    own_clamd.kill()
    path = slot()
    temp_before = temp_files(srv)
    conn, first = begin_put(srv, path, len(CLEAN))
    conn.close()
    assert first.status == 503 and first.header("Retry-After"), f"expected 503 instead of a 100 Continue: {first}"
    r = put(srv, path, CLEAN)
    assert r.status == 503, r
    assert r.header("Retry-After"), r
    assert_nothing_stored(srv, path, temp_before)
    assert scans(srv) == Counter(infected=1, error=2)
    own_clamd.start()
    again = put(srv, slot(), EICAR)
    assert again.status == 422, f"not scanned again after clamd came back: {again}"
    assert put(srv, path, CLEAN).status == 201
    assert scans(srv) == Counter(infected=2, error=2, clean=1)


def test_clamd_killed_fail_open_then_restarted(hmacfs_factory: Factory, own_clamd: ClamdProcess) -> None:
    srv = hmacfs_factory(scanning(own_clamd.socket_path, failopen=True))
    own_clamd.kill()
    path = slot()
    assert put(srv, path, CLEAN).status == 201
    assert_served(srv, path, CLEAN)
    assert scans(srv) == Counter(unscanned=1)
    own_clamd.start()
    r = put(srv, slot(), EICAR)
    assert r.status == 422, f"not scanned again after clamd came back: {r}"
    assert scans(srv) == Counter(unscanned=1, infected=1)


def test_resumable_upload_refused_while_clamd_is_down_is_scanned_on_the_next_head(
        hmacfs_factory: Factory, own_clamd: ClamdProcess) -> None:
    """A tus upload whose last PATCH got 503 keeps its bytes; once clamd is back, the client's HEAD
    commits it after a scan: the clean one is stored, the infected one is refused and removed."""
    srv = hmacfs_factory(scanning(own_clamd.socket_path, failopen=False))
    own_clamd.kill()
    clean_path, eicar_path = slot(), slot()
    clean_loc, clean_answers = tus_upload(srv, clean_path, CLEAN, parts=2)
    eicar_loc, eicar_answers = tus_upload(srv, eicar_path, EICAR, parts=2)
    for answers in (clean_answers, eicar_answers):
        assert [a.status for a in answers] == [204, 503], answers
        assert answers[-1].header("Retry-After"), answers[-1]
    assert get(srv, clean_path).status == 404 and get(srv, eicar_path).status == 404
    assert len(partial_files(srv)) == 2, "the bytes of an upload refused for want of a scanner must stay"
    own_clamd.start()
    head = tus_request(srv, "HEAD", clean_loc)
    assert head.status == 200 and head.header("Upload-Offset") == str(len(CLEAN)), head
    assert_served(srv, clean_path, CLEAN)
    assert tus_request(srv, "HEAD", eicar_loc).status == 422
    assert tus_request(srv, "HEAD", eicar_loc).status == 404
    assert get(srv, eicar_path).status == 404
    assert partial_files(srv) == set()
    assert scans(srv) == Counter(error=2, clean=1, infected=1)


@pytest.mark.parametrize("fail_open", [False, True])
def test_clamd_killed_while_an_upload_streams(hmacfs_factory: Factory, own_clamd: ClamdProcess,
                                              fail_open: bool) -> None:
    srv = hmacfs_factory(scanning(own_clamd.socket_path, failopen=fail_open))
    path = slot()
    data = os.urandom(4 << 20)
    temp_before = temp_files(srv)
    conn, first = begin_put(srv, path, len(data))  # the scan's clamd connection is open from here
    try:
        assert first.status == 100, first
        conn.send(data[:len(data) // 2])
        time.sleep(0.3)  # let the first half reach hmacfs (and clamd)
        own_clamd.kill()
        conn.send(data[len(data) // 2:])
        final = conn.read_final()[1]
    finally:
        conn.close()
    if fail_open:
        assert final.status == 201, final
        assert_served(srv, path, data)
        assert scans(srv) == Counter(unscanned=1)
    else:
        assert final.status == 503, final
        assert final.header("Retry-After"), final
        assert_nothing_stored(srv, path, temp_before)
        assert scans(srv) == Counter(error=1)
    own_clamd.start()
    assert put(srv, slot(), EICAR).status == 422


# -- scan slots -------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_numscanworkers_bounds_concurrent_scans(hmacfs_factory: Factory, clamd: ClamdProcess, workers: int) -> None:
    """Two slow uploads at once: with one scan worker the second gets its 100 Continue only when
    the first is done (and then succeeds); with two it starts at once."""
    srv = hmacfs_factory(scanning(clamd.socket_path, numscanworkers=workers))
    data = os.urandom(64 << 10)
    a_path, b_path = slot("a.bin"), slot("b.bin")
    a, a_first = begin_put(srv, a_path, len(data))
    b: Optional[RawConnection] = None
    try:
        assert a_first.status == 100, a_first
        a.send(data[:1000])  # a slow client: the upload (and its scan) stays open
        b = RawConnection(srv.port, timeout=30)
        b.send(request_head("PUT", signed_put(srv.prefix, srv.secret, b_path, len(data)),
                            [("Content-Length", str(len(data))), ("Expect", "100-continue")]))
        if workers == 1:
            early = b.pending(wait=0.7)
            assert early == b"", f"the second upload went ahead while the only scan slot was taken: {early!r}"
        else:
            assert b.read_response().status == 100  # while the first is still open
        a.send(data[1000:])
        assert a.read_final()[1].status == 201
        if workers == 1:
            assert b.read_response().status == 100
        b.send(data)
        assert b.read_final()[1].status == 201
    finally:
        a.close()
        if b is not None:
            b.close()
    assert_served(srv, a_path, data)
    assert_served(srv, b_path, data)
    assert scans(srv) == Counter(clean=2)


def test_a_failed_upload_gives_its_scan_slot_back(hmacfs_factory: Factory, clamd: ClamdProcess) -> None:
    """numscanworkers = 1: uploads that end without a verdict (the client goes away mid-body; the
    body passes maxuploadsize) must free the slot, or the next upload would wait for it and get 503."""
    config = scanning(clamd.socket_path, numscanworkers=1)
    config["uploads"] = {"maxuploadsize": "64KB"}
    srv = hmacfs_factory(config)
    conn, first = begin_put(srv, slot(), 32 << 10)
    assert first.status == 100, first
    conn.send(os.urandom(1000))
    conn.reset()  # gone mid-body
    over = v3_chunked_put(srv, slot(), os.urandom(40 << 10), os.urandom(40 << 10))
    assert over.status == 413, over
    for path in (slot(), slot()):  # a leaked slot: these would wait SLOT_WAIT (30 s) and time out
        r = request(srv.port, "PUT", signed_put(srv.prefix, srv.secret, path, len(EICAR)), EICAR, timeout=5)
        assert r.status == 422, r
        assert get(srv, path).status == 404
