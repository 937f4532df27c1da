"""tus 1.0.0 resumable uploads against the real hmacfs process (the contract in the spec's
"Resumable uploads" sections).

Covered, each over HTTP as a client sees it and on the disk as an operator sees it:
- a real tus client (tuspy) pointed at a signed PUT URL: 50 MB in 5 MB chunks arrives
  byte-identical, the slot is then taken (PUT 409) and HEAD reports the upload finished;
- kill -9 of the server mid-upload: after a restart the same client state resumes at the
  offset it had reached (nothing re-sent from 0) and the file is byte-identical;
- checksum (460 keeps the offset, sha1/sha256/md5, unknown algorithm 400), termination,
  expiry by the request path (410) and by the janitor (the partial file disappears alone);
- the raw protocol: discovery (also for CORS), every refusal's status and headers,
  creation-with-upload, X-HTTP-Method-Override, unguessable resource URLs;
- a commit that fails (the slot was filled meanwhile) keeps the upload for a retry, and
  a resumed client is not told it finished: HEAD retries the commit and answers its error;
- broken connections: a PATCH cut off midway keeps every byte that arrived, and a new
  request takes over at once from one stalled on a dead connection;
- every signature protocol as a creation credential (v, v2/token with the declared type,
  v3 signed for PUT, Prosody-style JWT bearer);
- the commit path shared with PUT: deduplication, versioning, encryption at rest.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import requests
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError, TusUploadFailed
from tusclient.storage.filestorage import FileStorage

from hmacfs import auth
from tests.support.client import Response, put, request, signed_put, signed_v3, url_path
from tests.support.hmacfs_proc import HmacfsProcess

TUS_VERSION = "1.0.0"
OCTET = "application/offset+octet-stream"
MB = 1024 * 1024
RESOURCE = re.compile(r"/upload/\.uploads/([A-Za-z0-9_-]{32,})")  # >= 192 bits of base64url
EXTENSIONS = {"creation", "creation-with-upload", "expiration", "checksum", "termination"}


# -- servers ----------------------------------------------------------------------------------------

def serve(tmp_path_factory: pytest.TempPathFactory, name: str, config: dict[str, Any]) -> Iterator[HmacfsProcess]:
    """One server for a module-scoped fixture: independent tests share it (each uses its own slots)."""
    proc = HmacfsProcess(tmp_path_factory.mktemp(name), config).start()
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HmacfsProcess]:
    """Room for the 50 MB upload; 5 MB tus chunks fit under chunksize."""
    yield from serve(tmp_path_factory, "big", {"uploads": {"maxuploadsize": "100MB", "chunksize": "8MB"}})


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HmacfsProcess]:
    """chunksize 1MB so the per-request limit (413) is cheap to reach."""
    yield from serve(tmp_path_factory, "small", {"uploads": {"maxuploadsize": "10MB", "chunksize": "1MB"}})


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[HmacfsProcess]:
    """A server of the test's own, for tests that kill it."""
    proc = HmacfsProcess(tmp_path / "srv", {"uploads": {"maxuploadsize": "100MB", "chunksize": "8MB"}})
    try:
        yield proc.start()
    finally:
        proc.close()


@pytest.fixture
def patch_offsets(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The Upload-Offset of every PATCH tuspy sends (it calls `requests.patch`): what the client
    actually transmitted, not what it reports."""
    offsets: list[int] = []
    real_patch = requests.patch

    def recording_patch(target: str, **kwargs: Any) -> requests.Response:
        offsets.append(int(kwargs["headers"]["upload-offset"]))
        return real_patch(target, **kwargs)

    monkeypatch.setattr(requests, "patch", recording_patch)
    return offsets


# -- helpers ----------------------------------------------------------------------------------------

def slot(name: str = "file.bin") -> str:
    """A fresh upload slot, as an XMPP server hands out: `<random>/<name>`."""
    return f"{uuid.uuid4()}/{name}"


def tus(srv: HmacfsProcess, method: str, target: str, body: Optional[bytes] = None,
        headers: Optional[dict[str, str]] = None) -> Response:
    """A request speaking tus; every answer, errors included, must carry Tus-Resumable."""
    r = request(srv.port, method, target, body, {"Tus-Resumable": TUS_VERSION, **(headers or {})})
    assert r.header("Tus-Resumable") == TUS_VERSION, (method, target, r, dict(r.headers))
    return r


def create(srv: HmacfsProcess, path: str, length: int, body: Optional[bytes] = None, protocol: str = "v",
           content_type: str = "application/octet-stream", headers: Optional[dict[str, str]] = None) -> Response:
    """POST to the signed PUT URL of `path` (signed for `length`): tus creation."""
    h = {"Upload-Length": str(length)}
    if body is not None:
        h["Content-Type"] = OCTET
    h.update(headers or {})
    return tus(srv, "POST", signed_put(srv.prefix, srv.secret, path, length, protocol, content_type), body, h)


def location(r: Response) -> str:
    """The upload resource a 201 names: a path under the prefix, an unguessable id."""
    assert r.status == 201, r
    loc = r.header("Location")
    assert loc is not None and RESOURCE.fullmatch(loc), loc
    assert r.header("Upload-Expires"), "creation must say when an unfinished upload expires"
    return loc


def new_upload(srv: HmacfsProcess, path: str, length: int, **kwargs: Any) -> str:
    return location(create(srv, path, length, **kwargs))


def patch(srv: HmacfsProcess, loc: str, offset: int, body: bytes,
          headers: Optional[dict[str, str]] = None) -> Response:
    return tus(srv, "PATCH", loc, body, {"Content-Type": OCTET, "Upload-Offset": str(offset), **(headers or {})})


def head(srv: HmacfsProcess, loc: str) -> Response:
    return tus(srv, "HEAD", loc)


def offset_of(srv: HmacfsProcess, loc: str) -> int:
    r = head(srv, loc)
    assert r.status == 200, r
    return int(r.header("Upload-Offset") or -1)


def upload_whole(srv: HmacfsProcess, loc: str, data: bytes, chunk: int = MB) -> None:
    """Send all of `data` in PATCHes of `chunk` bytes, checking each acknowledged offset."""
    for start in range(0, len(data), chunk):
        r = patch(srv, loc, start, data[start:start + chunk])
        assert r.status == 204, r
        assert r.header("Upload-Offset") == str(min(start + chunk, len(data)))

def upload_whole_from(srv: HmacfsProcess, loc: str, data: bytes, start: int) -> None:
    """The rest of `data` from `start`, in PATCHes of at most 1 MiB."""
    for at in range(start, len(data), MB):
        assert patch(srv, loc, at, data[at:at + MB]).status == 204


def get(srv: HmacfsProcess, path: str, query: str = "") -> Response:
    return request(srv.port, "GET", url_path(srv.prefix, path) + query)


def partials_dir(srv: HmacfsProcess) -> Path:
    return srv.storage / ".hmacfs" / "partials"


def partial_names(srv: HmacfsProcess) -> set[str]:
    """The files of unfinished uploads (plain `<id>` or sealed `<id>.sealed`)."""
    d = partials_dir(srv)
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def partial_of(srv: HmacfsProcess, loc: str) -> set[str]:
    """The partial file(s) belonging to the upload at `loc`."""
    match = RESOURCE.fullmatch(loc)
    assert match is not None
    return {n for n in partial_names(srv) if n.split(".")[0] == match.group(1)}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def checksum(algorithm: str, data: bytes) -> str:
    return f"{algorithm} {b64(hashlib.new(algorithm, data).digest())}"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MB), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sha256(srv: HmacfsProcess, path: str) -> tuple[int, Optional[str], str]:
    """(status, ETag, sha256 of the body) of a GET, streamed: a 50 MB body is never held whole."""
    conn = srv.connection()
    try:
        conn.request("GET", url_path(srv.prefix, path))
        resp = conn.getresponse()
        h = hashlib.sha256()
        for block in iter(lambda: resp.read(MB), b""):
            h.update(block)
        return resp.status, resp.getheader("ETag"), h.hexdigest()
    finally:
        conn.close()


def random_file(directory: Path, size: int) -> Path:
    path = directory / f"payload-{size}.bin"
    with open(path, "wb") as f:
        for _ in range(size // MB):
            f.write(os.urandom(MB))
        f.write(os.urandom(size % MB))
    return path


def raw_exchange(srv: HmacfsProcess, head_bytes: bytes, timeout: float = 10) -> tuple[int, dict[str, str]]:
    """Send request headers only (no body) and read the answer's status line and headers: for
    refusals that must come before the body (a client need not send megabytes to learn 413)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as s:
        s.sendall(head_bytes)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"the server closed without an answer: {data!r}"
            data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- a real tus client ------------------------------------------------------------------------------

def test_tuspy_uploads_50mb_in_5mb_chunks(big: HmacfsProcess, tmp_path: Path, patch_offsets: list[int]) -> None:
    """The headline: an unmodified tus client, given the signed URL as its endpoint, uploads."""
    size = 50 * MB
    source = random_file(tmp_path, size)
    path = slot("big.bin")
    endpoint = big.base_url + signed_put(big.prefix, big.secret, path, size)
    with open(source, "rb") as stream:
        uploader = tus_client.TusClient(endpoint).uploader(file_stream=stream, chunk_size=5 * MB)
        uploader.upload()
    assert uploader.offset == size
    assert patch_offsets == list(range(0, size, 5 * MB))  # ten PATCHes, each acknowledged in full
    assert uploader.url is not None and uploader.url.startswith(big.base_url)
    loc = uploader.url[len(big.base_url):]
    assert RESOURCE.fullmatch(loc), loc  # tuspy joined the relative Location onto the signed URL's origin
    status, etag, digest = fetch_sha256(big, path)
    assert (status, digest) == (200, sha256_of(source))
    assert etag, "a finished upload is served with an ETag like any PUT"
    assert put(big, path, b"x").status == 409  # the slot is taken
    assert create(big, path, size).status == 409  # and a new creation for it is refused too
    r = head(big, loc)
    assert r.status == 200 and r.header("Upload-Offset") == r.header("Upload-Length") == str(size)
    assert partial_of(big, loc) == set(), "the partial file goes once the upload is committed"


# -- kill -9 and resume -----------------------------------------------------------------------------

def test_tuspy_resumes_after_kill_9_from_where_it_was(fresh: HmacfsProcess, tmp_path: Path,
                                                      patch_offsets: list[int]) -> None:
    """What resumable uploads are for: a crash of the server loses no acknowledged byte, and
    the client's stored URL brings it back to exactly the acknowledged offset."""
    size, chunk = 20 * MB + 12345, 5 * MB
    source = random_file(tmp_path, size)
    path = slot("resume.bin")
    endpoint = fresh.base_url + signed_put(fresh.prefix, fresh.secret, path, size)
    store_path = tmp_path / "tus-urls.json"

    def uploader() -> Any:
        """A client as it would be after an app restart: only the URL store survives."""
        return tus_client.TusClient(endpoint).uploader(file_path=str(source), chunk_size=chunk,
                                                       store_url=True, url_storage=FileStorage(str(store_path)))

    first = uploader()
    for _ in range(2):
        first.upload_chunk()
    sent = first.offset
    assert sent == 2 * chunk
    url = first.url
    fresh.kill()
    fresh.start()
    del patch_offsets[:]
    second = uploader()  # reads the stored URL and asks the server (HEAD) for the offset
    assert second.url == url
    assert second.offset == sent, "the server lost or invented bytes across kill -9"
    second.upload()
    assert patch_offsets == list(range(sent, size, chunk)), "a chunk was re-sent"
    status, _etag, digest = fetch_sha256(fresh, path)
    assert (status, digest) == (200, sha256_of(source))


# -- checksum ---------------------------------------------------------------------------------------

def test_checksum_mismatch_is_460_and_keeps_the_offset(small: HmacfsProcess) -> None:
    """A chunk damaged in transit must not become part of the file; the client resends it."""
    data = os.urandom(3 * 100_000)
    a, b, c = data[:100_000], data[100_000:200_000], data[200_000:]
    path = slot()
    loc = new_upload(small, path, len(data))
    wrong = b64(hashlib.sha1(b"not the chunk").digest())
    r = patch(small, loc, 0, a, {"Upload-Checksum": f"sha1 {wrong}"})
    assert r.status == 460, r
    assert offset_of(small, loc) == 0, "a chunk failing its checksum must be discarded"
    r = patch(small, loc, 0, a, {"Upload-Checksum": checksum("sha256", a)})
    assert (r.status, r.header("Upload-Offset")) == (204, str(len(a)))
    r = patch(small, loc, len(a), b, {"Upload-Checksum": checksum("md5", b)})
    assert (r.status, r.header("Upload-Offset")) == (204, str(len(a) + len(b)))
    for bad in (f"crc32 {b64(b'1234')}", "sha1", "sha1 !!notbase64!!", f"sha1 {b64(b'short')}"):
        r = patch(small, loc, len(a) + len(b), c, {"Upload-Checksum": bad})
        assert r.status == 400, (bad, r)
        assert offset_of(small, loc) == len(a) + len(b)
    r = patch(small, loc, len(a) + len(b), c, {"Upload-Checksum": checksum("sha1", c)})
    assert r.status == 204, r
    assert get(small, path).body == data


# -- termination ------------------------------------------------------------------------------------

def test_termination_frees_the_slot(small: HmacfsProcess) -> None:
    """A cancelled upload takes its bytes with it and leaves the slot usable."""
    path = slot()
    loc = new_upload(small, path, 1000)
    assert patch(small, loc, 0, b"a" * 400).status == 204
    assert partial_of(small, loc)
    r = tus(small, "DELETE", loc)
    assert r.status == 204, r
    assert head(small, loc).status == 404
    assert patch(small, loc, 400, b"b" * 600).status == 404
    assert partial_of(small, loc) == set(), "termination removes the bytes"
    assert get(small, path).status == 404
    again = new_upload(small, path, 1000)
    assert again != loc
    upload_whole(small, again, b"c" * 1000)
    assert get(small, path).body == b"c" * 1000


def test_termination_of_a_finished_upload_keeps_the_file(small: HmacfsProcess) -> None:
    """DELETE on the upload resource is no signed DELETE: a committed file stays."""
    path = slot()
    loc = new_upload(small, path, 10)
    upload_whole(small, loc, b"0123456789")
    assert tus(small, "DELETE", loc).status == 204
    assert head(small, loc).status == 404
    assert get(small, path).body == b"0123456789"


# -- expiry -----------------------------------------------------------------------------------------

EXPIRY = 2.0


def test_expired_upload_is_410_on_request_and_removed(tmp_path: Path) -> None:
    """Without the janitor (it would wake only after an hour), the request finds the upload
    expired: 410, and the bytes go with it."""
    srv = HmacfsProcess(tmp_path / "srv", {"uploads": {"resumableexpiry": "2s"},
                                           "server": {"cleanupinterval": "1h"}}).start()
    try:
        done_path = slot()
        done = new_upload(srv, done_path, 10)
        upload_whole(srv, done, b"0123456789")
        loc = new_upload(srv, slot(), 1000)
        assert patch(srv, loc, 0, b"x" * 100).status == 204
        assert partial_of(srv, loc)
        time.sleep(EXPIRY + 0.5)
        assert partial_of(srv, loc), "nothing but a request should have removed it yet"
        assert head(srv, loc).status == 410
        assert partial_of(srv, loc) == set()
        assert head(srv, loc).status == 404  # removed, so no longer known
        assert patch(srv, loc, 100, b"y").status == 404
        assert head(srv, done).status == 410  # a finished upload's record expires too ...
        assert get(srv, done_path).body == b"0123456789"  # ... never its file
    finally:
        srv.close()


def test_janitor_removes_an_abandoned_upload(tmp_path: Path) -> None:
    """Nobody asks about the upload again: the janitor alone deletes its bytes."""
    srv = HmacfsProcess(tmp_path / "srv", {"uploads": {"resumableexpiry": "2s"},
                                           "server": {"cleanupinterval": "1s"}}).start()
    try:
        done_path = slot()
        upload_whole(srv, new_upload(srv, done_path, 10), b"0123456789")  # expires first
        loc = new_upload(srv, slot(), 1000)
        assert patch(srv, loc, 0, b"x" * 100).status == 204
        assert partial_of(srv, loc)
        wait_for(lambda: not partial_of(srv, loc), "the janitor to remove the partial file", EXPIRY + 8)
        assert get(srv, done_path).body == b"0123456789", "the janitor must not take a committed file"
        assert head(srv, loc).status in (404, 410)
        metrics = request(srv.metrics_port, "GET", "/metrics").body.decode()
        assert re.search(r"^hmacfs_resumable_uploads_expired_total [1-9]", metrics, re.M), metrics
    finally:
        srv.close()


# -- the raw protocol -------------------------------------------------------------------------------

def test_options_advertises_tus(small: HmacfsProcess) -> None:
    loc = new_upload(small, slot(), 10)
    for target in (signed_put(small.prefix, small.secret, slot(), 10), loc):
        r = request(small.port, "OPTIONS", target, headers={"Origin": "https://chat.example"})
        assert r.status == 204, r
        assert r.header("Tus-Resumable") == TUS_VERSION
        assert r.header("Tus-Version") == TUS_VERSION
        assert set((r.header("Tus-Extension") or "").split(",")) == EXTENSIONS
        assert r.header("Tus-Max-Size") == str(10 * MB)
        assert set((r.header("Tus-Checksum-Algorithm") or "").split(",")) == {"md5", "sha1", "sha256"}
        assert OCTET in (r.header("Accept-Patch") or "")
        # a browser tus client (tus-js-client) must be allowed to send and read the tus headers
        assert {"post", "patch"} <= header_set(r, "Access-Control-Allow-Methods")
        assert {"tus-resumable", "upload-length", "upload-offset", "upload-metadata", "upload-checksum",
                "content-type", "x-http-method-override"} <= header_set(r, "Access-Control-Allow-Headers")
        assert {"location", "tus-resumable", "upload-offset", "upload-length", "upload-expires"} <= \
            header_set(r, "Access-Control-Expose-Headers")


def header_set(r: Response, name: str) -> set[str]:
    """A comma-separated header's items, lower-cased (header and method names compare so)."""
    return {item.strip().lower() for item in (r.header(name) or "").split(",")}


def test_version_mismatch_is_412(small: HmacfsProcess) -> None:
    path = slot()
    target = signed_put(small.prefix, small.secret, path, 10)
    r = tus(small, "POST", target, headers={"Tus-Resumable": "0.2.0", "Upload-Length": "10"})
    assert (r.status, r.header("Tus-Version")) == (412, TUS_VERSION)
    loc = new_upload(small, path, 10)
    r = tus(small, "HEAD", loc, headers={"Tus-Resumable": "0.2.0"})
    assert (r.status, r.header("Tus-Version")) == (412, TUS_VERSION)


@pytest.mark.parametrize("headers", [
    {},                                                          # no Upload-Length
    {"Upload-Length": "ten"},
    {"Upload-Length": "-1"},
    {"Upload-Defer-Length": "1"},                                # the signature binds the length
    {"Upload-Length": "10", "Upload-Defer-Length": "1"},
    {"Upload-Length": "10", "Upload-Concat": "partial"},         # concatenation not offered
    {"Upload-Length": "10", "Upload-Metadata": "filename !!notbase64!!"},
    {"Upload-Length": "10", "Upload-Metadata": f"name {b64(b'a')},name {b64(b'b')}"},  # duplicate key
    {"Upload-Length": "10", "Upload-Metadata": "bad key " + b64(b"x")},
    {"Upload-Length": "10", "Upload-Checksum": "crc32 AAAA"},
], ids=["missing-length", "length-not-digits", "negative-length", "defer-length", "length-and-defer",
        "concat", "metadata-bad-base64", "metadata-duplicate-key", "metadata-three-parts", "checksum-unknown"])
def test_malformed_creation_is_400_and_creates_nothing(small: HmacfsProcess, headers: dict[str, str]) -> None:
    before = partial_names(small)
    target = signed_put(small.prefix, small.secret, slot(), 10)
    r = request(small.port, "POST", target, headers={"Tus-Resumable": TUS_VERSION, **headers})
    assert r.status == 400, r
    assert r.header("Tus-Resumable") == TUS_VERSION
    assert partial_names(small) == before


def test_bad_signature_is_403_and_creates_nothing(small: HmacfsProcess) -> None:
    before = partial_names(small)
    path = slot()
    forged = url_path(small.prefix, path) + "?v=" + "0" * 64
    r = tus(small, "POST", forged, headers={"Upload-Length": "10"})
    assert r.status == 403, r
    unsigned = tus(small, "POST", url_path(small.prefix, path), headers={"Upload-Length": "10"})
    assert unsigned.status == 403, unsigned
    other = tus(small, "POST", signed_put(small.prefix, small.secret, path, 10), headers={"Upload-Length": "11"})
    assert other.status == 403, "Upload-Length is what v signs: another length must not verify"
    assert partial_names(small) == before


def test_creation_over_maxuploadsize_is_413(small: HmacfsProcess) -> None:
    before = partial_names(small)
    assert create(small, slot(), 10 * MB + 1).status == 413
    assert partial_names(small) == before


def test_patch_refusals(small: HmacfsProcess) -> None:
    """415, 400, 409 (with the right offset), 413 (chunksize, past the length), 404."""
    path = slot()
    length = 2 * MB
    loc = new_upload(small, path, length)
    assert patch(small, loc, 0, b"a" * 1000).status == 204
    r = tus(small, "PATCH", loc, b"b" * 10, {"Content-Type": "application/octet-stream", "Upload-Offset": "1000"})
    assert r.status == 415, r
    r = tus(small, "PATCH", loc, b"b" * 10, {"Content-Type": OCTET})
    assert r.status == 400, r  # no Upload-Offset
    r = patch(small, loc, 0, b"b" * 10)
    assert (r.status, r.header("Upload-Offset")) == (409, "1000")
    r = patch(small, loc, 5000, b"b" * 10)
    assert (r.status, r.header("Upload-Offset")) == (409, "1000")
    assert offset_of(small, loc) == 1000
    # the 413s are decided from the headers: no body needs to be sent to learn them
    status, headers = raw_exchange(small, (
        f"PATCH {loc} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nContent-Type: {OCTET}\r\n"
        f"Upload-Offset: 1000\r\nContent-Length: {MB + 1}\r\n\r\n").encode())
    assert (status, headers.get("tus-resumable")) == (413, TUS_VERSION), headers
    tail = new_upload(small, slot(), 100)
    status, headers = raw_exchange(small, (
        f"PATCH {tail} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nContent-Type: {OCTET}\r\n"
        f"Upload-Offset: 0\r\nContent-Length: 101\r\n\r\n").encode())
    assert (status, headers.get("tus-resumable")) == (413, TUS_VERSION), headers
    assert offset_of(small, loc) == 1000 and offset_of(small, tail) == 0
    unknown = small.prefix + ".uploads/" + "A" * 32
    assert head(small, unknown).status == 404
    assert patch(small, unknown, 0, b"x").status == 404


def test_creation_with_upload_and_method_override(small: HmacfsProcess) -> None:
    data = os.urandom(5000)
    path = slot()
    r = create(small, path, len(data), body=data[:1200])
    loc = location(r)
    assert r.header("Upload-Offset") == "1200"
    assert offset_of(small, loc) == 1200
    r = tus(small, "POST", loc, data[1200:3000], {"X-HTTP-Method-Override": "PATCH", "Content-Type": OCTET,
                                                  "Upload-Offset": "1200"})
    assert (r.status, r.header("Upload-Offset")) == (204, "3000")
    r = tus(small, "POST", loc, None, {"X-HTTP-Method-Override": "HEAD"})
    assert (r.status, r.header("Upload-Offset")) == (200, "3000")
    assert patch(small, loc, 3000, data[3000:]).status == 204
    assert get(small, path).body == data
    wrong = {"Upload-Checksum": checksum("sha1", b"something else")}
    r = create(small, slot(), 10, body=b"0123456789", headers=wrong)
    assert r.status == 460, "creation-with-upload checks the checksum of its body too"
    kept = r.header("Location")
    assert kept is not None and offset_of(small, kept) == 0, "the upload exists; only its first bytes went"
    r = create(small, slot(), 10, body=b"0123456789", headers={"Content-Type": "text/plain"})
    assert r.status == 415, "a creation body must be application/offset+octet-stream"
    empty = slot("empty.txt")
    r = create(small, empty, 0)
    assert (r.status, r.header("Upload-Offset")) == (201, "0")  # Upload-Length 0 completes at creation
    r = get(small, empty)
    assert (r.status, r.body) == (200, b"")


def test_head_and_locations(small: HmacfsProcess) -> None:
    """HEAD is never cached, echoes the metadata; two creations never share a URL."""
    metadata = f"filename {b64('résumé.pdf'.encode())},note"
    path = slot()
    first = create(small, path, 10, headers={"Upload-Metadata": metadata})
    second = create(small, path, 10)
    a, b = location(first), location(second)
    assert a != b
    r = head(small, a)
    assert r.status == 200
    assert r.header("Cache-Control") == "no-store"
    assert (r.header("Upload-Offset"), r.header("Upload-Length")) == ("0", "10")
    assert r.header("Upload-Metadata") == metadata
    assert r.header("Upload-Expires")
    missing = head(small, small.prefix + ".uploads/" + "B" * 32)
    assert missing.status == 404 and missing.header("Cache-Control") == "no-store"
    assert tus(small, "DELETE", b).status == 204


# -- a commit that fails ----------------------------------------------------------------------------

def test_a_failed_commit_keeps_the_upload_for_a_retry(small: HmacfsProcess) -> None:
    """The slot was filled by a plain PUT while the tus upload ran: the last PATCH gets the
    commit's 409, the other file is not overwritten, and the whole upload stays so that a
    retry (an empty PATCH at the end) commits it once the slot is free."""
    path = slot()
    data = os.urandom(3000)
    loc = new_upload(small, path, len(data))
    assert patch(small, loc, 0, data[:1000]).status == 204
    assert put(small, path, b"the other one").status == 201
    r = patch(small, loc, 1000, data[1000:])
    assert r.status == 409, r
    assert get(small, path).body == b"the other one"
    assert partial_of(small, loc), "the bytes stay for a retry"
    assert patch(small, loc, len(data), b"").status == 409  # still taken
    delete = signed_v3(small.prefix, small.secret, path, "DELETE", int(time.time()) + 60)
    assert request(small.port, "DELETE", delete).status == 204
    r = patch(small, loc, len(data), b"")
    assert (r.status, r.header("Upload-Offset")) == (204, str(len(data)))
    assert get(small, path).body == data
    assert partial_of(small, loc) == set()


def test_a_failed_commit_does_not_look_finished(small: HmacfsProcess, tmp_path: Path) -> None:
    """A tus client that resumes after the failed last PATCH asks HEAD for the offset; if that
    says "all bytes are there" it stops and reports success, though its file was never stored."""
    data = os.urandom(3000)
    source = tmp_path / "f.bin"
    source.write_bytes(data)
    path = slot()
    endpoint = small.base_url + signed_put(small.prefix, small.secret, path, len(data))
    store = FileStorage(str(tmp_path / "urls.json"))
    first = tus_client.TusClient(endpoint).uploader(file_path=str(source), chunk_size=1000, store_url=True,
                                                    url_storage=store)
    first.upload_chunk()
    assert put(small, path, b"the other one").status == 201
    with pytest.raises(TusUploadFailed):
        first.upload()  # the commit's 409
    try:
        resumed = tus_client.TusClient(endpoint).uploader(file_path=str(source), chunk_size=1000, store_url=True,
                                                          url_storage=store)
        resumed.upload()
        told_finished = True
    except TusCommunicationError:
        told_finished = False
    stored = get(small, path).body
    assert not (told_finished and stored != data), f"the client was told its upload finished; the slot holds " \
                                                   f"{stored[:20]!r}"


# -- connections that break -------------------------------------------------------------------------

def test_cut_off_patch_keeps_what_arrived(small: HmacfsProcess) -> None:
    """A phone losing its connection mid-chunk: the bytes that reached the server count."""
    data = os.urandom(2 * MB)
    sent = 300 * 1024
    path = slot()
    loc = new_upload(small, path, len(data))
    (name,) = partial_of(small, loc)
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as s:
        s.sendall((f"PATCH {loc} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nContent-Type: {OCTET}\r\n"
                   f"Upload-Offset: 0\r\nContent-Length: {MB}\r\n\r\n").encode() + data[:sent])
    # watch the disk, not HEAD: a HEAD now would take the upload over from the cut request
    wait_for(lambda: (partials_dir(small) / name).stat().st_size == sent, "the cut request's bytes on disk", 5)
    assert offset_of(small, loc) == sent
    r = patch(small, loc, sent, data[sent:sent + MB])
    assert r.status == 204, r
    upload_whole_from(small, loc, data, sent + MB)
    assert get(small, path).body == data


def test_a_new_request_takes_over_from_a_stalled_one(small: HmacfsProcess) -> None:
    """The phone moved from Wi-Fi to LTE: its old PATCH still holds the upload on a dead
    connection. A new HEAD must not wait for that request's read timeout: it cuts it off,
    and the bytes the old request wrote count."""
    data = os.urandom(MB)
    sent = 100 * 1024
    path = slot()
    loc = new_upload(small, path, len(data))
    with socket.create_connection(("127.0.0.1", small.port), timeout=10) as stalled:
        stalled.sendall((f"PATCH {loc} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nContent-Type: {OCTET}\r\n"
                         f"Upload-Offset: 0\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data[:sent])
        time.sleep(0.3)  # the phone goes silent (its bytes may still sit in the server's read buffer)
        started = time.monotonic()
        assert offset_of(small, loc) == sent  # the connection is still open: this is a takeover
        assert time.monotonic() - started < 5, "the new request waited for the stalled one"
    upload_whole_from(small, loc, data, sent)
    assert get(small, path).body == data
    metrics = request(small.metrics_port, "GET", "/metrics").body.decode()
    assert re.search(r"^hmacfs_resumable_takeovers_total [1-9]", metrics, re.M), metrics


# -- signature protocols ----------------------------------------------------------------------------

def jwt(srv: HmacfsProcess, path: str, size: int, filetype: str = "text/plain") -> str:
    """A bearer token as Prosody's mod_http_file_share mints it (HS256; slot, filename, filesize,
    filetype, exp), signed with the server's secret (no separate jwtsecret configured)."""
    slot_id, _, name = path.partition("/")
    claims = {"slot": slot_id, "filename": name, "filesize": size, "filetype": filetype,
              "exp": int(time.time()) + 300}
    return "Bearer " + auth.jwt_encode(srv.secret.encode(), claims)


def finish_and_check(srv: HmacfsProcess, created: Response, path: str, data: bytes) -> None:
    """Complete an upload the creation answer names, and find its bytes at the slot."""
    upload_whole(srv, location(created), data)
    got = get(srv, path)
    assert (got.status, got.body) == (200, data), got


def test_creation_signed_with_v(small: HmacfsProcess) -> None:
    path, data = slot(), os.urandom(1500)
    finish_and_check(small, create(small, path, len(data)), path, data)


@pytest.mark.parametrize("protocol", ["v2", "token"])
def test_creation_signed_with_a_content_type(small: HmacfsProcess, tmp_path: Path, protocol: str) -> None:
    """v2/token sign the type: tus clients declare it in Upload-Metadata `filetype`."""
    data = os.urandom(1500)
    path = slot("pic.png")
    target = signed_put(small.prefix, small.secret, path, len(data), protocol, "image/png")
    lying = tus(small, "POST", target, headers={"Upload-Length": str(len(data)),
                                                "Upload-Metadata": f"filetype {b64(b'text/plain')}"})
    assert lying.status == 403, "a declared type other than the signed one must not verify"
    untyped = tus(small, "POST", target, headers={"Upload-Length": str(len(data))})
    assert untyped.status == 403, "no declared type means application/octet-stream, which was not signed"
    source = tmp_path / "pic.png"
    source.write_bytes(data)
    with open(source, "rb") as stream:
        uploader = tus_client.TusClient(small.base_url + target).uploader(
            file_stream=stream, chunk_size=700, metadata={"filetype": "image/png", "filename": "pic.png"})
        uploader.upload()
    got = get(small, path)
    assert (got.status, got.body, got.header("Content-Type")) == (200, data, "image/png")


def test_creation_signed_with_v3_for_put(small: HmacfsProcess) -> None:
    path, data = slot(), os.urandom(1500)
    expires = int(time.time()) + 300
    r = tus(small, "POST", signed_v3(small.prefix, small.secret, path, "GET", expires),
            headers={"Upload-Length": str(len(data))})
    assert r.status == 403, "a URL signed for GET is no upload credential"
    r = tus(small, "POST", signed_v3(small.prefix, small.secret, path, "PUT", expires),
            headers={"Upload-Length": str(len(data))})
    finish_and_check(small, r, path, data)


def test_creation_with_a_jwt_bearer(small: HmacfsProcess, tmp_path: Path) -> None:
    data = os.urandom(1500)
    path = slot("note.txt")
    target = url_path(small.prefix, path)
    r = tus(small, "POST", target, headers={"Upload-Length": str(len(data) + 1),
                                            "Authorization": jwt(small, path, len(data))})
    assert r.status == 413, "Upload-Length must be the token's filesize"
    r = tus(small, "POST", target, headers={"Upload-Length": str(len(data)), "Authorization": "Bearer x.y.z"})
    assert r.status == 401, r
    source = tmp_path / "note.txt"
    source.write_bytes(data)
    with open(source, "rb") as stream:  # tuspy sends the bearer on every request, as a Prosody client would
        c = tus_client.TusClient(small.base_url + target, headers={"Authorization": jwt(small, path, len(data))})
        c.uploader(file_stream=stream, chunk_size=1000).upload()
    got = get(small, path)
    assert got.body == data
    assert (got.header("Content-Type") or "").startswith("text/plain"), "the token's filetype is the file's"


# -- the commit path --------------------------------------------------------------------------------

def blob_files(srv: HmacfsProcess) -> list[Path]:
    return [p for p in (srv.storage / ".hmacfs" / "blobs").rglob("*") if p.is_file()]


def test_dedup_shares_one_blob(tmp_path: Path) -> None:
    """A tus upload is committed like a PUT: the same bytes twice occupy one blob (the partial
    file, hard-linked into the commit, must not become a second copy)."""
    srv = HmacfsProcess(tmp_path / "srv", {"deduplication": {"enabled": True}}).start()
    try:
        data = os.urandom(2 * MB + 17)
        paths = [slot(), slot()]
        for path in paths:
            upload_whole(srv, new_upload(srv, path, len(data)), data)
            assert get(srv, path).body == data
        blobs = blob_files(srv)
        assert len(blobs) == 1, blobs
        st = os.stat(blobs[0])
        assert (st.st_nlink, st.st_size) == (3, len(data))  # the blob and two paths: one copy on disk
        assert {os.stat(srv.storage / p).st_ino for p in paths} == {st.st_ino}
    finally:
        srv.close()


def test_versioning_keeps_the_first_upload(tmp_path: Path) -> None:
    """With versioning, an existing file does not refuse the creation (409): it becomes a version."""
    srv = HmacfsProcess(tmp_path / "srv", {"versioning": {"enableversioning": True, "maxversions": 3}}).start()
    try:
        path = slot("doc.txt")
        first, second = b"first version " * 1000, b"second version " * 900
        upload_whole(srv, new_upload(srv, path, len(first)), first, 5000)
        upload_whole(srv, new_upload(srv, path, len(second)), second, 5000)  # no 409: the first is kept
        assert get(srv, path).body == second
        listing = json.loads(get(srv, path, "?versions").body)["versions"]
        assert [(v["version"], v["current"]) for v in listing] == [(1, False), (2, True)]
        assert get(srv, path, "?version=1").body == first
    finally:
        srv.close()


def test_encryption_stores_only_ciphertext(tmp_path: Path) -> None:
    """The hard-link shortcut of the commit must not bypass encryption at rest."""
    keys = tmp_path / "keys"
    keys.write_text(f"k1 {'11' * 32}\n")
    keys.chmod(0o600)
    srv = HmacfsProcess(tmp_path / "srv", {"encryption": {"enabled": True, "keyfile": str(keys)}}).start()
    try:
        block = b"PLAINTEXT-MARKER-" + bytes(range(256))
        data = (block * (2 * MB // len(block) + 1))[:2 * MB + 999]
        path = slot("secret.bin")
        loc = new_upload(srv, path, len(data))
        upload_whole(srv, loc, data, 700_000)  # chunks straddle the 1 MiB encryption segments
        on_disk = (srv.storage / path).read_bytes()
        assert on_disk[:8] == b"HMFSAEAD"
        assert b"PLAINTEXT-MARKER" not in on_disk
        assert get(srv, path).body == data
        assert partial_of(srv, loc) == set(), "no copy of the upload may stay behind"
    finally:
        srv.close()
