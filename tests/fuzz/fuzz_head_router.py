"""atheris (libFuzzer) harness: one byte string as a request, through the pure request pipeline.

Why: the hypothesis properties in tests/unit/test_hostile_properties.py explore the shapes we
thought of; coverage-guided fuzzing finds the ones we did not, by mutating inputs toward new
branches of hmacfs' own code (regex matches included: the RegEx and str hooks are on).

Pipeline per input, exactly as a connection would run it, minus sockets and the App:
    read_head -> split_target -> signed_path("/upload/")
    + parse_range and parse_ranges (Range) for a few file sizes, clean_content_type(Content-Type),
    + jwt_decode on a `Bearer` token, as sent and re-signed with the harness key (so the
      JSON inside is parsed: that only happens after the MAC verifies),
    + authorize_upload with the parsed query, path and headers,
    + the chunked body decoder when the head says `Transfer-Encoding: chunked`,
    + the resumable-upload header parsers (tus Upload-Offset/-Length/-Metadata/-Checksum, the
      IETF draft's structured-field Upload-Complete/-Incomplete and interop version),
    + the router: the app's routes (as hmacfs/app.py `_routes` adds them, with stub handlers
      that only record what was chosen) under three prefixes, dispatching the request's method
      and path through a minimal fake exchange. A file handler must get a safe signed path,
      a resource handler only an [A-Za-z0-9_-] name (never shown whole by the access log), a
      service handler only its exact path, and errors are only 400/404/405/414.
`HTTPError` (and ConnectionError from a head cut short) is the expected answer; any other
exception, or a broken invariant (an accepted head with two framings, a signed path with a
dot segment, a range outside the file...), is a crash: libFuzzer prints the traceback and
writes the input to `crash-<sha1>` (under -artifact_prefix).

Run:
    .venv/bin/python tests/fuzz/fuzz_head_router.py -max_total_time=600       # 10 minutes
    .venv/bin/python tests/fuzz/fuzz_head_router.py crash-<sha1>              # replay one input
    HMACFS_FUZZ_SECONDS=600 .venv/bin/python -m pytest tests/fuzz            # the CI test, longer
Any libFuzzer flag works (-jobs, -dict, -rss_limit_mb, ...). Without a corpus directory the
harness keeps one at $TMPDIR/hmacfs-fuzz-corpus (reused between runs; delete it freely);
an empty corpus directory is first filled with a few valid requests as seeds, and a
dictionary of HTTP tokens (written next to it as <corpus>.dict) is passed unless -dict is given.
"""
from __future__ import annotations

import base64
import email.utils  # noqa: F401 - compiles its patterns before the RegEx hook (see below)
import hashlib
import hmac
import io
import json.decoder  # noqa: F401 - idem
import mimetypes  # noqa: F401 - idem
import os
import re
import sys
import tempfile
import urllib.parse  # noqa: F401 - idem
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: hmacfs is not installed

# The RegEx hook wraps every pattern compiled from now on in a proxy whose methods take no
# `pos` argument; stdlib modules that call `pattern.match(s, pos)` (json.decoder does) must
# compile theirs first (hence the otherwise unused imports at the top). hmacfs itself only
# calls `fullmatch(s)`, so its patterns are hooked.
atheris.enabled_hooks.add("RegEx")  # before hmacfs compiles its patterns: libFuzzer learns them
atheris.enabled_hooks.add("str")
with atheris.instrument_imports(include=["hmacfs"]):
    from hmacfs import auth
    from hmacfs.errors import HTTPError
    from hmacfs.http.body import ChunkedBody
    from hmacfs.http.head import RequestHead, read_head
    from hmacfs.http.httpmsg import MAX_RANGES, clean_content_type, parse_range, parse_ranges
    from hmacfs.http.router import Router
    from hmacfs.http.uploadheaders import (
        ChecksumError,
        parse_checksum,
        parse_count,
        parse_sf_boolean,
        parse_sf_integer,
        parse_upload_metadata,
    )
    from hmacfs.policy.paths import MAX_PATH_BYTES, split_target
    from hmacfs.policy.paths import signed_path as to_signed_path

PREFIX = "/upload/"
MAX_HEAD = 64 * 1024
BODY_LIMIT = 64 * 1024
KEY = b"fuzz-secret"
HEAD_STATUSES = frozenset({400, 414, 431, 501, 505})
UPLOAD_STATUSES = frozenset({400, 401, 403, 410, 411, 413})


class InvariantBroken(Exception):
    """An accepted result that breaks a rule the parsers promise (a crash for libFuzzer)."""


def check(ok: bool, what: str) -> None:
    if not ok:
        raise InvariantBroken(what)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def check_head(head: RequestHead) -> None:
    check(head.version in ("HTTP/1.0", "HTTP/1.1"), f"version {head.version!r}")
    check(not (head.chunked and head.content_length is not None), "both Content-Length and chunked")
    check(not ("content-length" in head.headers and "transfer-encoding" in head.headers), "both framing fields")
    check(head.content_length is None or 0 <= head.content_length < 10 ** 19, f"length {head.content_length}")
    check(head.version == "HTTP/1.0" or "host" in head.headers, "HTTP/1.1 without Host")
    for name, value in head.headers.items():
        check(name == name.lower() and name.isascii() and ":" not in name, f"header name {name!r}")
        check(not any(c in value for c in "\r\n\x00"), f"control in header value {value!r}")


def check_path(path: str) -> None:
    for seg in path.split("/"):
        check(bool(seg) and not seg.startswith("."), f"unsafe segment in {path!r}")
        check("\\" not in seg and "\x00" not in seg, f"backslash or NUL in {path!r}")
    check(len(path.encode("utf-8")) <= 4000, "path longer than the limit")


def check_ranges(header: Optional[str], data_len: int) -> None:
    for size in (0, 1, 100, data_len, 2 ** 40):
        try:
            span = parse_range(header, size)
        except HTTPError as e:
            check(e.status == 416, f"Range error {e.status}")
            continue
        if span is not None:
            first, last = span
            check(0 <= first <= last < size, f"range {span} for size {size}")
        try:
            spans = parse_ranges(header, size)
        except HTTPError as e:
            check(e.status == 416, f"Range set error {e.status}")
            continue
        if spans is not None:  # sorted, disjoint, inside the file, bounded in count and total
            check(1 <= len(spans) <= MAX_RANGES, f"{len(spans)} ranges")
            check(all(0 <= a <= b < size for a, b in spans), f"ranges {spans} for size {size}")
            check(all(spans[i][1] + 1 < spans[i + 1][0] for i in range(len(spans) - 1)), f"overlap in {spans}")


def decode_jwt(token: str) -> Optional[dict]:
    try:
        claims = auth.jwt_decode([KEY], token)
    except HTTPError as e:
        check(e.status == 401, f"JWT error {e.status}")
        return None
    check(isinstance(claims, dict), "JWT claims not a dict")
    return claims


def check_bearer(authorization: str) -> None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return
    decode_jwt(token)
    parts = token.strip().split(".")
    if len(parts) == 3:  # the same header and payload with a valid MAC: reaches the JSON parser
        signing_input = f"{parts[0]}.{parts[1]}"
        if signing_input.isascii():
            mac = hmac.new(KEY, signing_input.encode("ascii"), hashlib.sha256).digest()
            decode_jwt(f"{signing_input}.{b64url(mac)}")


def check_upload_decision(head: RequestHead, path: str, query: dict[str, str]) -> None:
    facts = auth.RequestFacts(method=head.method, signed_path=path, full_path=PREFIX + path, query=query,
                              authorization=head.headers.get("authorization", ""),
                              content_type=head.headers.get("content-type"), content_length=head.content_length)
    try:
        auth.authorize_upload([KEY], [KEY], facts, 1.7e9)
    except HTTPError as e:
        check(e.status in UPLOAD_STATUSES, f"upload decision {e.status}")


def check_chunked(rfile: io.BytesIO) -> None:
    body = ChunkedBody(rfile, BODY_LIMIT)
    buf, total = memoryview(bytearray(512)), 0
    try:
        while True:
            n = body.readinto(buf)
            if not n:
                break
            total += n
            check(total <= BODY_LIMIT, "chunked body beyond its limit")
    except HTTPError as e:
        check(e.status in (400, 413), f"chunked error {e.status}")


def check_upload_headers(headers: dict[str, str]) -> None:
    for name in ("upload-offset", "upload-length"):
        n = parse_count(headers.get(name))
        check(n is None or 0 <= n < 10 ** 15, f"{name} {n}")
    version = parse_sf_integer(headers.get("upload-draft-interop-version"))
    check(version is None or 0 <= version < 10 ** 15, f"interop version {version}")
    for name in ("upload-complete", "upload-incomplete"):
        check(parse_sf_boolean(headers.get(name)) in (None, True, False), f"{name} not a boolean")
    metadata = parse_upload_metadata(headers.get("upload-metadata"))
    if metadata is not None:
        check(all(k and k.isascii() and " " not in k and "," not in k for k in metadata), "metadata key")
        check(all(isinstance(v, bytes) for v in metadata.values()), "metadata value")
    try:
        checksum = parse_checksum(headers.get("upload-checksum"))
    except ChecksumError:
        checksum = None
    check(checksum is None or checksum[0] in ("md5", "sha1", "sha256"), f"checksum {checksum}")


# --- the router ------------------------------------------------------------------------------------

ROUTER_STATUSES = frozenset({400, 404, 405, 414})
RESOURCE_DIR = ".uploads/"  # hmacfs/handlers/partial.py (not imported: it pulls in the whole app)


def _service(label: str) -> Callable[[object, SimpleNamespace], None]:
    def handler(_app: object, ex: SimpleNamespace) -> None:
        ex.chosen.append(("service", label, None))
    handler.label = label  # type: ignore[attr-defined]
    return handler


def _file(method: str) -> Callable[[object, SimpleNamespace, str], None]:
    return lambda _app, ex, path: ex.chosen.append(("file", method, path))


def _resource(_app: object, ex: SimpleNamespace, name: str) -> None:
    ex.chosen.append(("resource", None, name))


def build_router(prefix: str, metrics_path: Optional[str], resumable: bool) -> Router:
    """The routes hmacfs/app.py `App._routes` adds, in its order, with recording stubs
    (`metrics_path` None: metrics on their own port; `resumable` False: resumableuploadsenabled off).
    tests/fuzz/test_fuzz_harness.py checks this table against a real App's."""
    router = Router(prefix, MAX_PATH_BYTES)
    router.add_service("/health", _service("/health"))
    router.add_service("/ready", _service("/ready"))
    if metrics_path is not None:
        router.add_service(metrics_path, _service(metrics_path))
    router.add_file_route("PUT", _file("PUT"))
    if resumable:
        router.add_file_route("POST", _file("POST"))
        router.add_resource_route(prefix + RESOURCE_DIR, _resource)
    for method in ("GET", "HEAD", "DELETE", "OPTIONS"):
        router.add_file_route(method, _file(method))
    return router


def route_table(router: Router) -> dict:
    """What a router serves, comparable between the stubs and an App (handlers left out)."""
    return {"prefix": router.prefix,
            "services": {p.decode(): sorted(m) for p, (m, _h) in sorted(router.services.items())},
            "files": sorted(router.file_routes),
            "resources": [p.decode() for p, _h in router.resource_routes]}


def expected_services(router: Router) -> dict[bytes, str]:
    """Service paths by the rule in router.py's docstring, not read back from its table: always
    under /.hmacfs/, and at the bare path only when no file path could take it."""
    prefix = router.prefix or ""
    out = {}
    for label in {h.label for _m, h in router.services.values()}:
        out[("/.hmacfs" + label).encode()] = label
        if not label.startswith(prefix) and label + "/" != prefix:
            out[label.encode()] = label
    return out


ROUTERS = [build_router("/upload/", "/metrics", True),    # the default layout
           build_router("/", "/metrics", True),           # all under the prefix: services only in /.hmacfs/
           build_router("/a/b/", "/a/b/metrics", False)]  # metrics under the prefix, resumable uploads off
SERVICES = [expected_services(r) for r in ROUTERS]
RESOURCE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_router(router: Router, services: dict[bytes, str], method: str, raw_path: bytes,
                 query: dict[str, str]) -> None:
    ex = SimpleNamespace(req=SimpleNamespace(method=method, raw_path=raw_path, query=query), chosen=[])
    prefix = router.prefix or ""
    try:
        router.dispatch(None, ex)  # type: ignore[arg-type]
    except HTTPError as e:
        check(e.status in ROUTER_STATUSES, f"router error {e.status} for {raw_path!r}")
        check(not ex.chosen, "a handler ran and the router still raised")
        check(e.status != 405 or bool(e.headers.get("Allow")), "405 without Allow")
        check(raw_path not in services or e.status == 405, f"service path {raw_path!r} refused with {e.status}")
        return
    check(len(ex.chosen) == 1, f"{len(ex.chosen)} handlers ran")
    kind, label, value = ex.chosen[0]
    if kind == "service":
        check(services.get(raw_path) == label, f"service {label} at {raw_path!r}")
        return
    check(raw_path not in services, f"{raw_path!r} is a service path, routed as a {kind}")
    if kind == "resource":
        check(bool(RESOURCE_NAME.fullmatch(value)), f"resource name {value!r}")
        check(raw_path == (prefix + RESOURCE_DIR + value).encode(), f"resource {value!r} from {raw_path!r}")
        shown = router.log_path(raw_path)
        check(len(value) <= 8 or value.encode() not in shown, f"the access log shows a whole upload id: {shown!r}")
        return
    check(kind == "file" and label == method, f"{kind} route for {method}")
    check_path(value)
    check(to_signed_path(raw_path, prefix, router.max_path_bytes) == value, "file path is not the signed path")
    check(not value.startswith(RESOURCE_DIR.rstrip("/")), f"internal path {value!r}")
    joined = os.path.join("/store", value)
    check(os.path.normpath(joined) == joined and joined.startswith("/store/"), f"{value!r} leaves the root")


def check_routers(method: str, raw_path: bytes, query: dict[str, str]) -> None:
    for router, services in zip(ROUTERS, SERVICES):
        check_router(router, services, method, raw_path, query)


def TestOneInput(data: bytes) -> None:
    rfile = io.BytesIO(data)
    try:
        head = read_head(rfile, MAX_HEAD)
    except HTTPError as e:
        check(e.status in HEAD_STATUSES, f"head error {e.status}")
        return
    except ConnectionError:
        return
    if head is None:
        return
    check_head(head)
    target = split_target(head.target)
    check_routers(head.method, target.raw_path, target.query)
    try:
        path: Optional[str] = to_signed_path(target.raw_path, PREFIX)
    except HTTPError as e:
        check(e.status in (400, 404, 414), f"path error {e.status}")
        path = None
    if path is not None:
        check_path(path)
        check_upload_decision(head, path, target.query)
    check_ranges(head.headers.get("range"), len(data))
    ctype = clean_content_type(head.headers.get("content-type"))
    check(ctype is None or not any((ord(c) < 0x20 and c != "\t") or c == "\x7f" for c in ctype), "control in type")
    check_bearer(head.headers.get("authorization", ""))
    check_upload_headers(head.headers)
    if head.chunked:
        check_chunked(rfile)


def seeds() -> list[bytes]:
    """A few valid requests, one per path through the pipeline."""
    token = auth.jwt_encode(KEY, {"slot": "abc", "filename": "file.txt", "filesize": 5, "exp": 2 ** 31,
                                  "expires": 2 ** 31, "filetype": "text/plain", "sub": "a@example.org"})
    v3 = auth.sign_query("v3", KEY, method="PUT", signed_path="abc/file.txt", full_path="/upload/abc/file.txt",
                         expires=2 ** 31)
    return [
        b"PUT /upload/abc/file.txt?v=" + auth.mac_hex(KEY, auth.message_v("abc/file.txt", 5)).encode()
        + b" HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello",
        b"PUT /upload/abc/file.txt?v3=" + v3["v3"].encode() + b"&expires=" + v3["expires"].encode()
        + b" HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\nT: 1\r\n\r\n",
        b"PUT /upload/abc/file.txt HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer " + token.encode()
        + b"\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /upload/abc/%C3%A4%20(x).png HTTP/1.1\r\nHost: h\r\nRange: bytes=0-4\r\nIf-Range: \"x\"\r\n\r\n",
        b"GET http://h/upload/abc/file.txt?v3=00&expires=1#f HTTP/1.0\r\nRange: bytes=-5\r\n\r\n",
        b"\r\nHEAD /upload/a/b.txt HTTP/1.1\nHost: h\nExpect: 100-continue\n\n",
        b"POST /upload/abc/file.txt?v=" + auth.mac_hex(KEY, auth.message_v("abc/file.txt", 5)).encode()
        + b" HTTP/1.1\r\nHost: h\r\nTus-Resumable: 1.0.0\r\nUpload-Length: 5\r\n"
        b"Upload-Metadata: filename ZmlsZS50eHQ=,filetype dGV4dC9wbGFpbg==,empty\r\nContent-Length: 0\r\n\r\n",
        b"PATCH /upload/.uploads/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA HTTP/1.1\r\nHost: h\r\nTus-Resumable: 1.0.0\r\n"
        b"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
        b"Upload-Checksum: sha1 qvTGHdzF6KLavt4PO0gs2a6pQ00=\r\nContent-Length: 5\r\n\r\nhello",
        b"PUT /upload/abc/file.txt?v=" + auth.mac_hex(KEY, auth.message_v("abc/file.txt", 5)).encode()
        + b" HTTP/1.1\r\nHost: h\r\nUpload-Draft-Interop-Version: 6\r\nUpload-Complete: ?1;x=1\r\n"
        b"Upload-Incomplete: ?0\r\nUpload-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /.hmacfs/health HTTP/1.1\r\nHost: h\r\n\r\n",
        b"HEAD /metrics HTTP/1.0\r\n\r\n",
        b"DELETE /ready HTTP/1.1\r\nHost: h\r\n\r\n",
        b"HEAD /upload/.uploads/AbCdEfGh_-0123456789abcdefghijkl HTTP/1.1\r\nHost: h\r\nTus-Resumable: 1.0.0\r\n\r\n",
        b"OPTIONS /a/b/metrics HTTP/1.1\r\nHost: h\r\n\r\n",
        b"PATCH /upload/a/b.txt HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
    ]


DICTIONARY = ["HTTP/1.1", "HTTP/1.0", "\r\n", "\r\n\r\n", "Host: ", "Content-Length: ", "Transfer-Encoding: ",
              "chunked", "Range: ", "bytes=", "Authorization: ", "Bearer ", "Content-Type: ", "/upload/", "%2e",
              "%2f", "%5c", "%00", "%c3%a4", "..", "?v=", "?v3=", "&expires=", "&v2=", "&token=", "0x", ";",
              "eyJ", "eyJhbGciOiJIUzI1NiJ9", "http://", "#", "\t", "Tus-Resumable: 1.0.0", "Upload-Offset: ",
              "Upload-Length: ", "Upload-Metadata: ", "Upload-Checksum: ", "sha1 ", "sha256 ", "md5 ", "==",
              "Upload-Complete: ", "Upload-Incomplete: ", "Upload-Draft-Interop-Version: ", "?0", "?1", ";a=",
              "application/partial-upload", "application/offset+octet-stream", "/.hmacfs/", "/health", "/ready",
              "/metrics", "/.uploads/", "/a/b/", "OPTIONS", "PATCH", "DELETE", "POST", "HEAD"]


def _dict_file(path: Path) -> Path:
    def quoted(token: str) -> str:
        return '"' + "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else f"\\x{ord(c):02x}"
                             for c in token) + '"'
    path.write_text("".join(f"{quoted(t)}\n" for t in DICTIONARY), encoding="ascii")
    return path


def main() -> None:
    flags = [a for a in sys.argv[1:] if a.startswith("-")]
    inputs = [a for a in sys.argv[1:] if not a.startswith("-")]
    if not inputs:
        inputs = [os.path.join(tempfile.gettempdir(), "hmacfs-fuzz-corpus")]
    if not any(os.path.isfile(i) for i in inputs):  # fuzzing (not replaying crash files)
        corpus = Path(inputs[0])
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            for n, seed in enumerate(seeds()):
                (corpus / f"seed-{n}").write_bytes(seed)
        if not any(f.startswith("-dict=") for f in flags):
            flags.append(f"-dict={_dict_file(corpus.with_name(corpus.name + '.dict'))}")
    atheris.Setup([sys.argv[0], *flags, *inputs], TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
