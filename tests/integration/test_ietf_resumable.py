"""The IETF resumable-upload draft (interop versions 3, 5, 6, 9) against the real server process.

Covered, over raw sockets (tests/support/ietf_client.py) because the draft's 104 and a body
cut off midway are what http.client cannot show:
- optimistic upload (Apple URLSession): PUT with the complete marker -> 104 (Location, echoed
  version) before the body; broken mid-body (FIN and RST) -> HEAD gives the offset that
  arrived, PATCH the rest -> 201 + ETag + the file's Location, identical bytes; also unbroken;
- the same across kill -9 and restart, broken and still attached when the server died;
- a stale connection (a phone that changed networks): another connection's HEAD/PATCH takes
  over at once (not after readtimeout), keeping the stale request's bytes and closing it;
  PATCHes never interleave, a stale offset gets 409 with the right Upload-Offset;
- 409 on a wrong offset (problem+json from v6, text/plain before);
- DELETE (204, then 404, the slot free again);
- ordinary PUTs: an unsupported version, or no completeness header -> 201 with no 104;
- tus-js-client's IETF mode: POST ?0 + Upload-Length, the signature bound to Upload-Length
  (403 and nothing created when it differs), PATCH ?0 then ?1; 400 without Upload-Length;
- bad input (malformed sf-booleans and sf-integers, wrong media type, lengths, a HEAD/DELETE with
  upload headers, a body on a completed upload): a 4xx each, the offset unchanged;
- 104 then 100 Continue before any body byte is sent.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import pytest

from tests.support.client import Response, request, signed_put, url_path
from tests.support.hmacfs_proc import HmacfsProcess
from tests.support.ietf_client import RawConnection, RawResponse, request_head

READ_TIMEOUT = 60  # far beyond how long any takeover may take, so a quick answer proves the takeover
CONFIG = {"timeouts": {"readtimeout": f"{READ_TIMEOUT}s"}, "uploads": {"maxuploadsize": "10MB"}}
SIZE = 64 * 1024
Factory = Callable[..., HmacfsProcess]  # conftest's hmacfs_factory: a server of its own, stopped after the test
PARTIAL_UPLOAD = "application/partial-upload"
MISMATCH = "#mismatching-upload-offset"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    """One server for the independent tests (each uses paths of its own)."""
    proc = HmacfsProcess(tmp_path_factory.mktemp("ietf"), CONFIG).start()
    yield proc
    proc.close()


# -- helpers ---------------------------------------------------------------------------------------


def fresh(name: str = "photo.bin") -> str:
    """A signed path no other test uses, so tests can share one server."""
    return f"{uuid.uuid4().hex}/{name}"


def payload(size: int = SIZE) -> bytes:
    """Random bytes: a shifted or duplicated chunk cannot go unnoticed in the final file."""
    return os.urandom(size)


def marker(version: int, complete: bool) -> tuple[str, str]:
    """The completeness header as the version spells it (v3 inverts it as Upload-Incomplete)."""
    if version == 3:
        return "Upload-Incomplete", "?0" if complete else "?1"
    return "Upload-Complete", "?1" if complete else "?0"


def ietf(version: int, complete: Optional[bool] = None, **extra: str) -> list[tuple[str, str]]:
    """The interop header, the completeness header (when given) and extra headers (`_` -> `-`)."""
    headers = [("Upload-Draft-Interop-Version", str(version))]
    if complete is not None:
        headers.append(marker(version, complete))
    headers += [(name.replace("_", "-"), value) for name, value in extra.items()]
    return headers


def exchange(srv: HmacfsProcess, method: str, target: str, headers: list[tuple[str, str]],
             body: bytes = b"") -> tuple[list[RawResponse], RawResponse]:
    """One request on its own connection: the interim responses, then the final one. Sends
    Content-Length for any method but HEAD (so an empty PATCH is framed too)."""
    fields = [*headers, ("Connection", "close")]
    if method != "HEAD":
        fields.append(("Content-Length", str(len(body))))
    with RawConnection(srv.port) as conn:
        conn.send(request_head(method, target, fields) + body)
        return conn.read_final(method)


def final(srv: HmacfsProcess, method: str, target: str, headers: list[tuple[str, str]],
          body: bytes = b"") -> RawResponse:
    """The final response of `exchange` (for requests whose interim responses do not matter)."""
    return exchange(srv, method, target, headers, body)[1]


def head(srv: HmacfsProcess, location: str, version: int) -> RawResponse:
    """Offset retrieval, as a client resuming after a break does it."""
    return final(srv, "HEAD", location, ietf(version))


def offset_of(response: RawResponse) -> int:
    value = response.header("Upload-Offset")
    assert value is not None, response
    return int(value)


def location_of(response: RawResponse) -> str:
    """The upload's URL from a 104 or a creation's 201."""
    location = response.header("Location")
    assert location is not None, response
    return location


def wait_for_offset(srv: HmacfsProcess, location: str, version: int, expected: int,
                    within: float = 5.0) -> RawResponse:
    """HEAD until the offset is `expected`: the server notices a broken connection a moment
    after the client broke it."""
    deadline = time.monotonic() + within
    while True:
        response = head(srv, location, version)
        if response.status == 204 and response.header("Upload-Offset") == str(expected):
            return response
        assert time.monotonic() < deadline, f"offset never became {expected}: {response}"
        time.sleep(0.05)


def patch(srv: HmacfsProcess, location: str, version: int, offset: int, body: bytes, complete: bool,
          **extra: str) -> RawResponse:
    """An append as each version's clients send it (from v6 as application/partial-upload)."""
    headers = ietf(version, complete, Upload_Offset=str(offset), **extra)
    if version >= 6 and not any(n.lower() == "content-type" for n, _ in headers):
        headers.append(("Content-Type", PARTIAL_UPLOAD))
    return final(srv, "PATCH", location, headers, body)


def begin_put(srv: HmacfsProcess, path: str, body: bytes, version: int,
              extra: Optional[list[tuple[str, str]]] = None) -> tuple[RawConnection, RawResponse]:
    """Send the head of an optimistic (complete) PUT and read its 104, before any body byte."""
    conn = RawConnection(srv.port)
    target = signed_put(srv.prefix, srv.secret, path, len(body))
    conn.send(request_head("PUT", target, [*ietf(version, True), ("Content-Length", str(len(body))),
                                           *(extra or [])]))
    interim = conn.read_response()
    assert interim.status == 104 and interim.reason == "Upload Resumption Supported", interim
    assert interim.header("Upload-Draft-Interop-Version") == str(version), interim
    location = interim.header("Location")
    assert location and location.startswith(srv.prefix + ".uploads/"), interim
    return conn, interim


def create_incomplete(srv: HmacfsProcess, path: str, total: int, version: int, first: bytes = b"",
                      method: str = "POST") -> RawResponse:
    """An upload created with the incomplete marker (tus-js-client's start): 201 + Location."""
    target = signed_put(srv.prefix, srv.secret, path, total)
    created = final(srv, method, target, ietf(version, False, Upload_Length=str(total)), first)
    assert created.status == 201 and created.header("Location"), created
    assert offset_of(created) == len(first), created
    return created


def get_file(srv: HmacfsProcess, path: str) -> Response:
    return request(srv.port, "GET", url_path(srv.prefix, path))


def assert_committed(srv: HmacfsProcess, response: RawResponse, path: str, body: bytes, version: int) -> None:
    """What a whole PUT answers (201, ETag, the file's Location, complete), and the file is `body`."""
    assert response.status == 201, response
    assert response.header("ETag"), response
    assert response.header("Location") == url_path(srv.prefix, path), response
    assert response.header("Upload-Draft-Interop-Version") == str(version), response
    assert (response.header(marker(version, True)[0])) == marker(version, True)[1], response
    stored = get_file(srv, path)
    assert stored.status == 200 and stored.body == body, (stored.status, len(stored.body))


def metric(srv: HmacfsProcess, name: str) -> float:
    """A sample of the server's /metrics (0 when absent: counters start unset)."""
    text = request(srv.metrics_port, "GET", "/metrics").body.decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split(" ", 1)[0] == name]
    return values[0] if values else 0.0


def partial_files(srv: HmacfsProcess) -> set[str]:
    """The bytes of unfinished uploads as the server keeps them (one file per upload)."""
    directory = srv.storage / ".hmacfs" / "partials"
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


def upload_id(location: str) -> str:
    return location.rsplit("/", 1)[1]


# -- 1. optimistic upload, broken and resumed --------------------------------------------------------


@pytest.mark.parametrize("version", [3, 5, 6, 9])
def test_broken_put_resumes_with_head_and_patch(srv: HmacfsProcess, version: int) -> None:
    path, body = fresh(), payload()
    half = len(body) // 2
    conn, interim = begin_put(srv, path, body, version)
    location = location_of(interim)
    conn.send(body[:half])
    conn.close()

    state = wait_for_offset(srv, location, version, half)
    assert state.header(marker(version, False)[0]) == marker(version, False)[1], state
    assert state.header("Cache-Control") == "no-store", state
    assert state.header("Upload-Draft-Interop-Version") == str(version), state
    assert state.header("Upload-Length") == str(len(body)), state
    assert get_file(srv, path).status == 404  # nothing is served before the last byte

    done = patch(srv, location, version, half, body[half:], complete=True)
    assert_committed(srv, done, path, body, version)
    assert offset_of(done) == len(body)


@pytest.mark.parametrize("version", [3, 5, 6, 9])
def test_unbroken_put_gets_104_then_201(srv: HmacfsProcess, version: int) -> None:
    path, body = fresh(), payload()
    conn, _interim = begin_put(srv, path, body, version)
    with conn:
        conn.send(body)
        interims, response = conn.read_final()
    assert interims == [], interims  # one 104 only (no Expect was sent, so no 100 either)
    assert_committed(srv, response, path, body, version)


def test_reset_mid_body_keeps_the_bytes_that_arrived(srv: HmacfsProcess) -> None:
    """A phone losing its network more often ends the connection with a reset (or a timeout)
    than with an orderly close; the bytes the server had received must count all the same."""
    path, body = fresh(), payload()
    half = len(body) // 2
    conn, interim = begin_put(srv, path, body, 6)
    location = location_of(interim)
    conn.send(body[:half])
    time.sleep(0.3)  # the bytes reach the server (loopback) before the reset does
    conn.reset()
    state = wait_for_offset(srv, location, 6, half)
    assert state.header("Upload-Complete") == "?0", state
    assert_committed(srv, patch(srv, location, 6, half, body[half:], complete=True), path, body, 6)


def test_read_timeout_mid_body_keeps_the_bytes_that_arrived(hmacfs_factory: Factory) -> None:
    """A dead connection nobody takes over is cut at readtimeout; its bytes count as well."""
    srv = hmacfs_factory({"timeouts": {"readtimeout": "1s"}})
    path, body = fresh(), payload()
    half = len(body) // 2
    conn, interim = begin_put(srv, path, body, 5)
    location = location_of(interim)
    with conn:
        conn.send(body[:half])
        assert conn.closed_by_server(within=10), "the server never cut the silent connection"
    state = head(srv, location, 5)
    assert state.status == 204 and offset_of(state) == half, state
    assert_committed(srv, patch(srv, location, 5, half, body[half:], complete=True), path, body, 5)


# -- 2. across kill -9 ---------------------------------------------------------------------------------


def test_resume_across_kill_9(hmacfs_factory: Factory) -> None:
    srv = hmacfs_factory(CONFIG)
    broken_path, broken = fresh(), payload()
    half = len(broken) // 2
    conn, interim = begin_put(srv, broken_path, broken, 6)
    broken_at = location_of(interim)
    conn.send(broken[:half])
    conn.close()
    wait_for_offset(srv, broken_at, 6, half)

    # a second upload still attached (client silent) when the server dies: whatever the server
    # reports after the restart must be a true prefix the client can resume from
    attached_path, attached = fresh(), payload()
    stuck, interim = begin_put(srv, attached_path, attached, 9)
    attached_at = location_of(interim)
    stuck.send(attached[:half])
    time.sleep(0.2)

    srv.kill()
    stuck.close()
    srv.start()

    state = head(srv, broken_at, 6)
    assert state.status == 204 and offset_of(state) == half, state
    assert_committed(srv, patch(srv, broken_at, 6, half, broken[half:], complete=True), broken_path, broken, 6)

    state = head(srv, attached_at, 9)
    assert state.status == 204, state
    resume_at = offset_of(state)
    assert 0 <= resume_at <= half, state
    done = patch(srv, attached_at, 9, resume_at, attached[resume_at:], complete=True)
    assert_committed(srv, done, attached_path, attached, 9)


# -- 3. a stale connection is taken over --------------------------------------------------------------


def test_new_connection_takes_over_from_a_stale_one(srv: HmacfsProcess) -> None:
    path, body = fresh(), payload()
    half = len(body) // 2
    takeovers_before = metric(srv, "hmacfs_resumable_takeovers_total")
    stale, interim = begin_put(srv, path, body, 6)
    location = location_of(interim)
    with stale:
        stale.send(body[:half])  # ... and then silence, the socket left open (the old network is gone)
        time.sleep(0.3)

        started = time.monotonic()
        state = head(srv, location, 6)
        took = time.monotonic() - started
        assert took < 5, f"HEAD waited {took:.1f}s for the stale request (readtimeout {READ_TIMEOUT}s)"
        assert state.status == 204 and offset_of(state) == half, state
        assert state.header("Upload-Complete") == "?0", state

        assert stale.closed_by_server(within=5), "the stale connection was left open"
        done = patch(srv, location, 6, half, body[half:], complete=True)
        assert_committed(srv, done, path, body, 6)
    assert metric(srv, "hmacfs_resumable_takeovers_total") >= takeovers_before + 1


def test_patches_take_turns_and_a_stale_offset_gets_409(srv: HmacfsProcess) -> None:
    """A: the PUT, stalled after half. B: PATCHes from A's offset without asking first (so it
    must wait for A's bytes to count), stalls after a quarter. C: PATCHes at the offset it last
    heard (stale) -> 409 with B's end. D: PATCHes the rest -> the file, in order, once."""
    path, body = fresh(), payload()
    half, quarter = len(body) // 2, len(body) // 4
    a, interim = begin_put(srv, path, body, 9)
    location = location_of(interim)
    with a:
        a.send(body[:half])
        time.sleep(0.3)
        with RawConnection(srv.port) as b:
            rest = body[half:]
            b.send(request_head("PATCH", location, [*ietf(9, True, Upload_Offset=str(half)),
                                                    ("Content-Type", PARTIAL_UPLOAD),
                                                    ("Content-Length", str(len(rest)))]))
            b.send(rest[:quarter])
            assert a.closed_by_server(within=5), "A's connection was left open after B took over"
            time.sleep(0.3)

            started = time.monotonic()
            c = patch(srv, location, 9, half, rest, complete=True)
            assert time.monotonic() - started < 5, "C waited for the stale B"
            assert c.status == 409, c
            assert offset_of(c) == half + quarter, c
            assert b.closed_by_server(within=5), "B's connection was left open after C took over"

    state = head(srv, location, 9)
    assert offset_of(state) == half + quarter, state
    done = patch(srv, location, 9, half + quarter, body[half + quarter:], complete=True)
    assert_committed(srv, done, path, body, 9)


# -- 4. wrong offset -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [3, 5, 6, 9])
def test_wrong_offset_is_409_with_the_right_offset(srv: HmacfsProcess, version: int) -> None:
    body = payload(4000)
    created = create_incomplete(srv, fresh(), len(body), version, body[:1000])
    location = location_of(created)
    for wrong in (0, 999, 1001, 3999):
        conflict = patch(srv, location, version, wrong, body[wrong:wrong + 500], complete=False)
        assert conflict.status == 409, conflict
        assert offset_of(conflict) == 1000, conflict
        assert conflict.header("Upload-Draft-Interop-Version") == str(version), conflict
        ctype = (conflict.header("Content-Type") or "").split(";")[0]
        if version >= 6:
            assert ctype == "application/problem+json", conflict
            problem = json.loads(conflict.body)
            assert problem["type"].endswith(MISMATCH), problem
            assert problem["expected-offset"] == 1000 and problem["provided-offset"] == wrong, problem
            assert problem.get("title"), problem
        elif version == 5:
            assert ctype == "text/plain", conflict
    assert offset_of(head(srv, location, version)) == 1000


# -- 5. cancellation ----------------------------------------------------------------------------------


def test_delete_frees_the_slot(srv: HmacfsProcess) -> None:
    path, body = fresh(), payload(3000)
    created = create_incomplete(srv, path, len(body), 6, body[:1000])
    location = location_of(created)
    assert any(name.startswith(upload_id(location)) for name in partial_files(srv))

    gone = final(srv, "DELETE", location, ietf(6))
    assert gone.status == 204, gone
    assert head(srv, location, 6).status == 404
    assert patch(srv, location, 6, 1000, body[1000:], complete=True).status == 404
    assert not any(name.startswith(upload_id(location)) for name in partial_files(srv))
    assert get_file(srv, path).status == 404  # cancelling commits nothing

    plain = request(srv.port, "PUT", signed_put(srv.prefix, srv.secret, path, len(body)), body)
    assert plain.status == 201, plain
    assert get_file(srv, path).body == body


# -- 6. ordinary PUTs --------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    [("Upload-Draft-Interop-Version", "2"), ("Upload-Complete", "?1")],
    [("Upload-Draft-Interop-Version", "99"), ("Upload-Complete", "?1")],
    [("Upload-Draft-Interop-Version", "2"), ("Upload-Incomplete", "?0")],
    [("Upload-Draft-Interop-Version", "6")],
    [("Upload-Draft-Interop-Version", "3")],
    [("Upload-Draft-Interop-Version", "6"), ("Upload-Complete", "?2")],
    [("Upload-Draft-Interop-Version", "3"), ("Upload-Incomplete", "true")],
], ids=["v2", "v99", "v2-incomplete-header", "v6-no-marker", "v3-no-marker", "v6-invalid-marker",
        "v3-invalid-marker"])
def test_ordinary_put_without_104(srv: HmacfsProcess, headers: list[tuple[str, str]]) -> None:
    path, body = fresh(), payload(5000)
    interims, response = exchange(srv, "PUT", signed_put(srv.prefix, srv.secret, path, len(body)), headers, body)
    assert interims == [], interims
    assert response.status == 201, response
    assert response.header("Upload-Draft-Interop-Version") is None, response  # not spoken to as a draft client
    assert get_file(srv, path).body == body


# -- 7. tus-js-client's IETF mode --------------------------------------------------------------------


@pytest.mark.parametrize("version", [3, 5, 6])
@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_incomplete_creation_then_two_patches(srv: HmacfsProcess, version: int, method: str) -> None:
    """tus-js-client (v5, v6) starts so; v3 is in for its other ack status (201, draft -01)."""
    path, body = fresh(), payload(6000)
    created = create_incomplete(srv, path, len(body), version, method=method)
    assert created.header(marker(version, False)[0]) == marker(version, False)[1], created
    assert created.header("Upload-Draft-Interop-Version") == str(version), created
    location = created.header("Location")
    assert location is not None and location.startswith(srv.prefix + ".uploads/"), created

    first = patch(srv, location, version, 0, body[:2500], complete=False)
    assert first.status == (201 if version == 3 else 204) and offset_of(first) == 2500, first
    assert first.header(marker(version, False)[0]) == marker(version, False)[1], first
    assert get_file(srv, path).status == 404
    done = patch(srv, location, version, 2500, body[2500:], complete=True)
    assert_committed(srv, done, path, body, version)


def test_creation_signature_binds_upload_length(srv: HmacfsProcess) -> None:
    path = fresh()
    before = partial_files(srv)
    wrong = signed_put(srv.prefix, srv.secret, path, 6001)
    refused = final(srv, "POST", wrong, ietf(6, False, Upload_Length="6000"))
    assert refused.status == 403, refused
    assert refused.header("Location") is None, refused
    assert partial_files(srv) == before
    assert srv.sql("SELECT count(*) FROM partials WHERE path = ?", path) == [(0,)]
    create_incomplete(srv, path, 6000, 6)  # the same request signed over 6000 is taken
    assert srv.sql("SELECT count(*) FROM partials WHERE path = ?", path) == [(1,)]


@pytest.mark.parametrize("version", [3, 6])
def test_incomplete_creation_without_length_is_400(srv: HmacfsProcess, version: int) -> None:
    path = fresh()
    before = partial_files(srv)
    refused = final(srv, "POST", signed_put(srv.prefix, srv.secret, path, 0), ietf(version, False), b"")
    assert refused.status == 400, refused
    assert refused.header("Location") is None, refused
    assert partial_files(srv) == before
    assert srv.sql("SELECT count(*) FROM partials WHERE path = ?", path) == [(0,)]


# -- 8. bad input -------------------------------------------------------------------------------------

# (what is wrong, header overrides of a PATCH that would otherwise append 1000 bytes at 1000, status);
# None removes a header. A tolerant parser would read most values as the right ones and append.
FULLWIDTH_1000 = "\uff11\uff10\uff10\uff10"
BAD_PATCHES = [
    ("sf-boolean ?2", {"Upload-Complete": "?2"}, 400),
    ("sf-boolean true", {"Upload-Complete": "true"}, 400),
    ("sf-boolean with an empty parameter", {"Upload-Complete": "?0;"}, 400),
    ("sf-boolean with an uppercase parameter key", {"Upload-Complete": "?0;Bad=1"}, 400),
    ("sf-boolean with a bad parameter value", {"Upload-Complete": "?0;a=@"}, 400),
    ("no completeness header", {"Upload-Complete": None}, 400),
    ("negative offset", {"Upload-Offset": "-1"}, 400),
    ("decimal offset", {"Upload-Offset": "1.5"}, 400),
    ("decimal offset of the right value", {"Upload-Offset": "1000.0"}, 400),
    ("fullwidth zero", {"Upload-Offset": "\uff10"}, 400),
    ("fullwidth digits of the right value", {"Upload-Offset": FULLWIDTH_1000}, 400),
    ("20 digits", {"Upload-Offset": "9" * 20}, 400),
    ("20 digits of the right value", {"Upload-Offset": "1000".zfill(20)}, 400),
    ("no offset", {"Upload-Offset": None}, 400),
    ("octet-stream at v6", {"Content-Type": "application/octet-stream"}, 415),
    ("no media type at v6", {"Content-Type": None}, 415),
    ("another Upload-Length", {"Upload-Length": "5999"}, 400),
    ("complete, short of the length", {"Upload-Complete": "?1"}, 400),
]


@pytest.fixture
def victim(srv: HmacfsProcess) -> tuple[str, bytes]:
    """A v6 upload with 1000 of 6000 bytes for one bad request to aim at (one each: a bad
    request that got through would otherwise fail every later case too)."""
    body = payload(6000)
    created = create_incomplete(srv, fresh(), len(body), 6, body[:1000])
    location = location_of(created)
    return location, body


@pytest.mark.parametrize(("what", "overrides", "status"), BAD_PATCHES, ids=[case[0] for case in BAD_PATCHES])
def test_bad_patch_is_refused_and_changes_nothing(srv: HmacfsProcess, victim: tuple[str, bytes], what: str,
                                                  overrides: dict[str, Optional[str]], status: int) -> None:
    location, body = victim
    assert offset_of(head(srv, location, 6)) == 1000
    fields = {"Upload-Draft-Interop-Version": "6", "Upload-Offset": "1000", "Upload-Complete": "?0",
              "Content-Type": PARTIAL_UPLOAD}
    fields.update(overrides)
    headers = [(name, value) for name, value in fields.items() if value is not None]
    refused = final(srv, "PATCH", location, headers, body[1000:2000])
    assert refused.status == status, (what, refused)
    assert refused.header("Upload-Draft-Interop-Version") == "6", refused
    after = head(srv, location, 6)
    assert after.status == 204 and offset_of(after) == 1000, (what, after)


def test_bad_patch_control_a_good_one_is_taken(srv: HmacfsProcess) -> None:
    """The same PATCH as the bad ones with nothing wrong (and a matching Upload-Length): taken,
    so each refusal above is about its one bad field."""
    body = payload(6000)
    created = create_incomplete(srv, fresh(), len(body), 6, body[:1000])
    location = location_of(created)
    ok = patch(srv, location, 6, 1000, body[1000:2000], complete=False, Upload_Length="6000")
    assert ok.status == 204 and offset_of(ok) == 2000, ok


@pytest.mark.parametrize(("method", "header"), [("HEAD", "Upload-Offset"), ("HEAD", "Upload-Complete"),
                                                 ("DELETE", "Upload-Offset"), ("DELETE", "Upload-Complete")])
def test_head_or_delete_with_upload_headers_is_400(srv: HmacfsProcess, victim: tuple[str, bytes], method: str,
                                                   header: str) -> None:
    location, _body = victim
    value = "1000" if header == "Upload-Offset" else "?0"
    refused = final(srv, method, location, [*ietf(6), (header, value)])
    assert refused.status == 400, refused
    after = head(srv, location, 6)
    assert after.status == 204 and offset_of(after) == 1000, after  # a refused DELETE deletes nothing


def test_completed_upload_refuses_more_bytes(srv: HmacfsProcess) -> None:
    path, body = fresh(), payload(3000)
    created = create_incomplete(srv, path, len(body), 9, body[:1000])
    location = location_of(created)
    assert_committed(srv, patch(srv, location, 9, 1000, body[1000:], complete=True), path, body, 9)

    for offset, complete in ((3000, True), (3000, False), (1000, True)):
        refused = patch(srv, location, 9, offset, b"more", complete=complete)
        assert refused.status == 400, (offset, complete, refused)
        assert json.loads(refused.body)["type"].endswith("#completed-upload"), refused
    again = patch(srv, location, 9, 3000, b"", complete=True)  # the client missed the answer: it is repeated
    assert_committed(srv, again, path, body, 9)
    state = head(srv, location, 9)
    assert state.status == 204 and offset_of(state) == 3000 and state.header("Upload-Complete") == "?1", state


# -- 9. the 104 comes before the body ---------------------------------------------------------------------


@pytest.mark.parametrize("version", [3, 6])
def test_104_and_100_continue_before_any_body_byte(srv: HmacfsProcess, version: int) -> None:
    path, body = fresh(), payload()
    conn, interim = begin_put(srv, path, body, version, [("Expect", "100-continue")])
    with conn:
        proceed = conn.read_response()
        assert proceed.status == 100, proceed
        assert conn.pending(0.3) == b"", "a final answer came before the body"
        conn.send(body)
        interims, response = conn.read_final()
    assert interims == [], interims
    assert_committed(srv, response, path, body, version)
    assert interim.header("Upload-Limit"), interim


def test_partials_directory_is_where_the_contract_says(srv: HmacfsProcess) -> None:
    """Guard for the checks above that look at <storage>/.hmacfs/partials: an upload in
    progress has a file there (else 'nothing created' would hold vacuously)."""
    body = payload(2000)
    created = create_incomplete(srv, fresh(), len(body), 6, body[:10])
    location = location_of(created)
    assert Path(srv.storage / ".hmacfs" / "partials").is_dir()
    assert any(name.startswith(upload_id(location)) for name in partial_files(srv))


# -- 10. behind a reverse proxy: the 104 only where it can arrive ---------------------------------------


@pytest.mark.parametrize("mode, trusted, expect_104", [
    ("direct", [], True),                    # a client connected directly
    ("direct", ["127.0.0.1/32"], False),     # through a trusted proxy (nginx cannot pass a 104)
    ("always", ["127.0.0.1/32"], True),      # HAProxy forwards it: the operator says so
    ("never", [], False),
])
def test_interim_responses_follow_the_setting(hmacfs_factory: Factory, mode: str, trusted: list[str],
                                              expect_104: bool) -> None:
    """`interimresponses` decides whether a complete PUT gets its 104. Without one it is an
    ordinary PUT (a Location nobody can read would only leave an unresumable upload behind);
    a creation by POST still works everywhere, since its 201 carries the Location."""
    proc = hmacfs_factory({**CONFIG, "uploads": {**CONFIG["uploads"], "interimresponses": mode},
                           "server": {"trustedproxies": trusted}})
    path, body = fresh(), payload(5000)
    interims, response = exchange(proc, "PUT", signed_put(proc.prefix, proc.secret, path, len(body)),
                                  ietf(6, True), body)
    assert [r.status for r in interims] == ([104] if expect_104 else []), interims
    assert response.status == 201, response
    assert (response.header("Upload-Draft-Interop-Version") == "6") == expect_104, response
    assert get_file(proc, path).body == body
    whole = payload(3000)
    created = create_incomplete(proc, fresh(), len(whole), 6, whole[:1000])
    done = final(proc, "PATCH", created.header("Location"),
                 ietf(6, True, Upload_Offset="1000", Content_Type=PARTIAL_UPLOAD), whole[1000:])
    assert done.status == 201, done
