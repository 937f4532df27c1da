"""The real tus-js-client (npm, Node build) against a real hmacfs: resumable uploads as web and
Node apps do them, in tus 1.0.0 and in both IETF resumable-upload modes the client ships.

Why a real client: a server can satisfy its own reading of a protocol and still fail the client
everybody uses (a header it never sends, a status it does not accept). tus-js-client is pointed
at a signed PUT URL as its `endpoint`, exactly as an XMPP web client would, and every step the
tests check is something the client itself relies on: Location on creation, Upload-Offset on
HEAD and PATCH answers, 204 on termination.

Each phase runs in its own Node process (tests/js/tus_node.mjs): the resumed upload knows
nothing but the upload URL, like an app that restarts after a crash. The bytes are checked by
GETting the stored file and comparing SHA-256 with the input. The pinned client version lives
in tests/js/package.json / package-lock.json (installed by contrib/run-tests.sh with `npm ci`).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import need_program
from tests.support.client import Response, request, signed_put, url_path
from tests.support.hmacfs_proc import HmacfsProcess
from tests.support.tusjs import JS_DIR, need_pinned_tus_js, pinned_tus_js_version

pytestmark = [pytest.mark.timeout(180)]

DRIVER = JS_DIR / "tus_node.mjs"
CHUNK = 1024 * 1024
SIZE = 8 * CHUNK + 12345  # the last chunk is short, as with any real file
PROTOCOLS = ["tus-v1", "ietf-draft-05", "ietf-draft-03"]
# What a client sends on HEAD/DELETE in each mode (tus-js-client 4.3.1 lib/upload.js openRequest).
MODE_HEADERS = {
    "tus-v1": {"Tus-Resumable": "1.0.0"},
    "ietf-draft-05": {"Upload-Draft-Interop-Version": "6"},
    "ietf-draft-03": {"Upload-Draft-Interop-Version": "5"},
}


def need_tus_js() -> str:
    """The Node binary, once tus-js-client is installed at the pinned version; skip (or fail under
    HMACFS_REQUIRE_ALL=1) otherwise."""
    node = need_program("node", "nodejs")
    need_pinned_tus_js()
    return node


@pytest.fixture(scope="module")
def node() -> str:
    return need_tus_js()


@pytest.fixture(scope="module")
def hm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HmacfsProcess]:
    """One hmacfs for the module; every test uploads to its own path."""
    proc = HmacfsProcess(tmp_path_factory.mktemp("tusjs"), {"uploads": {"maxuploadsize": "64MB"}}).start()
    yield proc
    proc.close()


@dataclass(frozen=True)
class Payload:
    """The input: a file for the driver and its bytes for the comparison (kept out of failure reports)."""

    file: Path
    data: bytes = field(repr=False)


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Payload:
    """Random bytes (no dedup or compression shortcut can fake a match) in a file the driver reads."""
    data = os.urandom(SIZE)
    path = tmp_path_factory.mktemp("payload") / "input.bin"
    path.write_bytes(data)
    return Payload(path, data)


def drive(node: str, config: dict[str, Any]) -> dict[str, Any]:
    """Run one driver step; its JSON report, with what Node printed on stderr when it is not clean."""
    proc = subprocess.run([node, str(DRIVER)], input=json.dumps(config), capture_output=True, text=True,
                          timeout=120, cwd=JS_DIR)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"driver failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(lines[-1])
    if proc.stderr.strip():
        report["stderr"] = proc.stderr[-2000:]
    return report


def endpoint(hm: HmacfsProcess, path: str, size: int = SIZE, protocol: str = "v",
             content_type: str = "application/octet-stream") -> str:
    """The signed PUT URL an XMPP server hands out: tus-js-client's `endpoint`."""
    return hm.base_url + signed_put(hm.prefix, hm.secret, path, size, protocol, content_type)


def resource(hm: HmacfsProcess, url: str) -> str:
    """The path of an upload URL the client resolved; it must point at this server."""
    parts = urllib.parse.urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == hm.base_url, url
    assert parts.path.startswith(hm.prefix + ".uploads/"), url
    return parts.path


def head(hm: HmacfsProcess, url: str, mode: str) -> Response:
    return request(hm.port, "HEAD", resource(hm, url), headers=MODE_HEADERS[mode])


def stored(hm: HmacfsProcess, path: str) -> Response:
    return request(hm.port, "GET", url_path(hm.prefix, path))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def context(hm: HmacfsProcess, *reports: dict[str, Any]) -> str:
    return "\n".join(json.dumps(r, indent=1)[-6000:] for r in reports) + f"\n--- hmacfs log ---\n{hm.log()[-3000:]}"


def upload(node: str, file: Path, mode: str, **config: Any) -> dict[str, Any]:
    return drive(node, {"action": "upload", "file": str(file), "chunkSize": CHUNK, "protocol": mode, **config})


def check_complete(hm: HmacfsProcess, path: str, data: bytes, report: dict[str, Any]) -> None:
    """The client says done and the server serves exactly the input."""
    assert report["outcome"] == "success", context(hm, report)
    got = stored(hm, path)
    assert got.status == 200, context(hm, report)
    assert (len(got.body), sha(got.body)) == (len(data), sha(data)), "stored bytes differ from the input"


@pytest.mark.parametrize("mode", PROTOCOLS)
def test_abort_then_resume_from_the_upload_url(node: str, hm: HmacfsProcess, payload: Payload,
                                               mode: str) -> None:
    """Creation, three chunks, abort(); a new process resumes from the stored uploadUrl alone (HEAD, then
    PATCH from the server's offset, not from 0) and finishes; the file is the input, byte for byte."""
    file, data = payload.file, payload.data
    path = f"tusjs/resume-{mode}.bin"
    first = upload(node, file, mode, endpoint=endpoint(hm, path), abortAfterChunks=3)
    assert first["outcome"] == "aborted", context(hm, first)
    assert first["clientVersion"] == pinned_tus_js_version()
    assert first["chunks"] == [CHUNK, 2 * CHUNK, 3 * CHUNK], context(hm, first)
    creation = first["requests"][0]
    assert (creation["method"], creation["status"]) == ("POST", 201), context(hm, first)
    if mode != "tus-v1":  # the client really spoke the draft, not tus
        assert "Tus-Resumable" not in creation["sent"], creation
        assert creation["received"].get("Upload-Draft-Interop-Version") == MODE_HEADERS[mode][
            "Upload-Draft-Interop-Version"], creation

    probe = head(hm, first["url"], mode)
    assert probe.status in (200, 204), probe
    assert probe.header("Upload-Offset") == str(3 * CHUNK), "the server lost acknowledged chunks"
    assert stored(hm, path).status == 404, "an unfinished upload must not be served"

    second = upload(node, file, mode, endpoint=endpoint(hm, path), uploadUrl=first["url"])
    check_complete(hm, path, data, second)
    methods = [r["method"] for r in second["requests"]]
    assert methods[0] == "HEAD" and "POST" not in methods, f"did not resume: {methods}"
    assert second["firstProgress"] == 3 * CHUNK, context(hm, second)
    assert second["requests"][1]["sent"]["Upload-Offset"] == str(3 * CHUNK), context(hm, second)
    assert second["chunks"][-1] == SIZE
    if mode != "tus-v1":
        last = second["requests"][-1]
        assert (last["sent"].get("Upload-Complete"), last["received"].get("Upload-Complete")) == ("?1", "?1"), last

    done = head(hm, first["url"], mode)
    assert (done.header("Upload-Offset"), done.header("Upload-Length")) == (str(SIZE), str(SIZE)), done.headers


@pytest.mark.parametrize("mode", PROTOCOLS)
def test_connection_lost_mid_chunk_resumes_at_the_exact_byte(node: str, hm: HmacfsProcess,
                                                             payload: Payload, mode: str) -> None:
    """The third PATCH loses its connection after 300001 body bytes (a phone leaving Wi-Fi): the server
    keeps every byte that arrived, so the resumed upload continues from 2 MiB + 300001, not from a chunk
    boundary, and the result is still exactly the input."""
    file, data = payload.file, payload.data
    path = f"tusjs/cut-{mode}.bin"
    cut = 300001
    first = upload(node, file, mode, endpoint=endpoint(hm, path), cutInChunk=2, cutAfterBytes=cut)
    assert first["outcome"] == "aborted" and first["cutBodyBytes"] == cut, context(hm, first)
    assert first["chunks"] == [CHUNK, 2 * CHUNK], context(hm, first)

    probe = head(hm, first["url"], mode)
    assert probe.header("Upload-Offset") == str(2 * CHUNK + cut), context(hm, first)

    second = upload(node, file, mode, endpoint=endpoint(hm, path), uploadUrl=first["url"])
    check_complete(hm, path, data, second)
    assert second["firstProgress"] == 2 * CHUNK + cut, context(hm, second)


@pytest.mark.parametrize("mode,how", [("tus-v1", "Upload.terminate(url)"), ("ietf-draft-05", "abort(true)"),
                                      ("ietf-draft-03", "Upload.terminate(url)")])
def test_terminated_upload_is_gone_and_the_slot_is_free(node: str, hm: HmacfsProcess, payload: Payload,
                                                        mode: str, how: str) -> None:
    """Termination (tus-js-client needs exactly 204) removes the upload: HEAD answers 404, nothing is
    served at the file's path, and the same signed URL can start over and finish."""
    file, data = payload.file, payload.data
    path = f"tusjs/terminate-{mode}.bin"
    if how == "abort(true)":
        first = upload(node, file, mode, endpoint=endpoint(hm, path), abortAfterChunks=1, terminate=True)
        assert first["outcome"] == "aborted" and first["terminated"], context(hm, first)
        assert (first["requests"][-1]["method"], first["requests"][-1]["status"]) == ("DELETE", 204), context(hm, first)
    else:
        first = upload(node, file, mode, endpoint=endpoint(hm, path), abortAfterChunks=1)
        assert first["outcome"] == "aborted", context(hm, first)
        gone = drive(node, {"action": "terminate", "url": first["url"], "protocol": mode})
        assert gone["outcome"] == "terminated", context(hm, first, gone)

    assert head(hm, first["url"], mode).status == 404
    assert stored(hm, path).status == 404

    again = upload(node, file, mode, endpoint=endpoint(hm, path))
    check_complete(hm, path, data, again)
    assert again["requests"][0]["method"] == "POST"


@pytest.mark.parametrize("mode", PROTOCOLS)
@pytest.mark.parametrize("signed_type,metadata", [
    ("application/octet-stream", {"filename": "notes.bin"}),
    ("video/mp4", {"filename": "clip.mp4", "filetype": "video/mp4"}),
], ids=["no-filetype", "filetype"])
def test_creation_with_upload_under_a_v2_signature(node: str, hm: HmacfsProcess, payload: Payload,
                                                   mode: str, signed_type: str, metadata: dict[str, str]) -> None:
    """uploadDataDuringCreation puts the first chunk on the POST, whose Content-Type is then the
    protocol's framing type (application/offset+octet-stream for tus, application/partial-upload for
    draft-05), never the file's. A v2 slot binds the file's type: it comes from Upload-Metadata `filetype`
    or, without one, is application/octet-stream (the contract) -- and the file is served with it."""
    file, data = payload.file, payload.data
    path = f"tusjs/v2-{mode}-{metadata['filename']}"
    report = upload(node, file, mode, endpoint=endpoint(hm, path, protocol="v2", content_type=signed_type),
                    metadata=metadata, uploadDataDuringCreation=True)
    check_complete(hm, path, data, report)
    assert report["requests"][0]["method"] == "POST" and report["chunks"][0] == CHUNK, context(hm, report)
    assert stored(hm, path).header("Content-Type") == signed_type


@pytest.mark.parametrize("mode", PROTOCOLS)
def test_framing_type_never_becomes_the_file_type(node: str, hm: HmacfsProcess, payload: Payload,
                                                  mode: str) -> None:
    """With a `v` slot (no type signed) and no filetype metadata, a .png is served as image/png whether
    the first chunk rode on the POST or not: the POST's application/offset+octet-stream or
    application/partial-upload only frames the chunk and says nothing about the file."""
    file, data = payload.file, payload.data
    path = f"tusjs/framing-{mode}.png"
    report = upload(node, file, mode, endpoint=endpoint(hm, path), uploadDataDuringCreation=True)
    check_complete(hm, path, data, report)
    assert stored(hm, path).header("Content-Type") == "image/png"


def test_type_that_breaks_the_signature_is_refused_at_creation(node: str, hm: HmacfsProcess,
                                                               payload: Payload) -> None:
    """A filetype other than the one the slot was signed for: tus-js-client gets a readable 403 on the
    POST and nothing is created (no upload resource, no file)."""
    file = payload.file
    path = "tusjs/wrong-type.mp4"
    report = upload(node, file, "tus-v1", endpoint=endpoint(hm, path, protocol="v2", content_type="video/mp4"),
                    metadata={"filename": "wrong.png", "filetype": "image/png"})
    assert (report["outcome"], report.get("status")) == ("error", 403), context(hm, report)
    assert [r["method"] for r in report["requests"]] == ["POST"]
    assert stored(hm, path).status == 404
