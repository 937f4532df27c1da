"""IETF "Resumable Uploads for HTTP" (draft-ietf-httpbis-resumable-upload), interop versions 3-9:
what Apple's URLSession (iOS 17+, macOS 14+) and tus-js-client's IETF mode speak.

A PUT or POST to a signed upload URL with `Upload-Draft-Interop-Version` and the complete
marker gets `104 Upload Resumption Supported` with the upload resource's Location before the
body is read; if the connection breaks, the client asks that resource for its offset (HEAD)
and appends the rest (PATCH), or cancels (DELETE). What differs by version:
- v3 (draft -01) marks completeness with `Upload-Incomplete` (inverted), later ones with
  `Upload-Complete`; v3 acknowledges appends with 201, later ones with 204;
- from v6 (drafts -04/-05) a PATCH body must be `application/partial-upload`, and errors
  about offsets and lengths come as RFC 9457 problem details;
- from v7 `Upload-Limit`'s lifetime key is `max-age` (v6: `expires`).
Every response about an upload carries `Upload-Offset` (tus-js-client requires it) and echoes
the client's interop version. An unsupported version is an ordinary PUT.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Optional

from ..errors import HTTPError
from ..http.exchange import Exchange
from ..http.httpmsg import strong_etag
from ..http.uploadheaders import is_media_type, metadata_text, parse_sf_boolean, parse_sf_integer, parse_upload_metadata
from ..meta import FileRecord
from ..meta.record import PartialRecord
from .partial import append_body, create_upload, current_offset, finish_upload, resource_path
from .upload import file_location

if TYPE_CHECKING:
    from ..app import App

SUPPORTED_VERSIONS = frozenset(range(3, 10))
PARTIAL_UPLOAD = "application/partial-upload"
PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types#"
UPLOAD_HEADERS = ("upload-offset", "upload-complete", "upload-incomplete")


class Problem(HTTPError):
    """An error the draft names (RFC 9457 problem details from v6 on)."""

    def __init__(self, status: int, kind: str, message: str, **members: int) -> None:
        super().__init__(status, message)
        self.kind = kind
        self.members = members


def interop_version(headers: dict[str, str]) -> Optional[int]:
    """The client's interop version when we speak it; None (an ordinary request) otherwise."""
    version = parse_sf_integer(headers.get("upload-draft-interop-version"))
    return version if version in SUPPORTED_VERSIONS else None


def complete_marker(headers: dict[str, str], version: int) -> Optional[bool]:
    """Is this the upload's last part? None when the request does not say; 400 when malformed."""
    name = "upload-incomplete" if version == 3 else "upload-complete"
    raw = headers.get(name)
    if raw is None:
        return None
    value = parse_sf_boolean(raw)
    if value is None:
        raise HTTPError(400, f"{name} must be a structured-field boolean (?0 or ?1)")
    return not value if version == 3 else value


def completeness(version: int, complete: bool) -> tuple[str, str]:
    if version == 3:
        return "Upload-Incomplete", "?0" if complete else "?1"
    return "Upload-Complete", "?1" if complete else "?0"


def upload_limit(app: App, version: int, appends: bool = True) -> str:
    """Upload-Limit: the largest upload and (for resumption) the largest append (`chunksize`)."""
    limits = [f"max-size={app.config.uploads.maxuploadsize}"]
    if appends:
        limits.append(f"max-append-size={app.config.uploads.chunksize}")
        assert app.resumable is not None
        limits.append(f"{'expires' if version == 6 else 'max-age'}={int(app.resumable.expiry)}")
    return ", ".join(limits)


def _about(app: App, version: int, offset: int, complete: bool) -> list[tuple[str, str]]:
    return [("Upload-Draft-Interop-Version", str(version)), ("Upload-Offset", str(offset)),
            completeness(version, complete)]


@contextmanager
def _draft_errors(ex: Exchange, version: int, about: list[tuple[str, str]]) -> Iterator[None]:
    """Errors echo the version and what is known of the upload; from v6 the draft's named
    errors are problem details (a JSON body), before them plain text."""
    try:
        yield
    except Problem as err:
        headers = [*about, *err.headers.items()]
        if version < 6:
            raise HTTPError(err.status, err.message, dict(headers)) from None
        body = {"type": PROBLEM_TYPES + err.kind, "title": err.message, **err.members}
        ex.send(err.status, headers, json.dumps(body).encode(), "application/problem+json")
    except HTTPError as err:
        err.headers = {**dict(about), **err.headers}
        raise


def _declared_type(headers: dict[str, str], metadata: dict[str, bytes]) -> Optional[str]:
    ctype = headers.get("content-type")
    if ctype and not is_media_type(ctype, PARTIAL_UPLOAD):
        return ctype
    return metadata_text(metadata, "filetype") or metadata_text(metadata, "type")


def interim_allowed(app: App, ex: Exchange) -> bool:
    """May this connection get a 104? `interimresponses`: always, never, or (default) only when
    the client is connected directly: nginx (1.22 to at least 1.29) takes a 104 from its backend
    for the final response, then stops sending the request body; HAProxy forwards it right."""
    mode = app.config.uploads.interimresponses
    return mode == "always" or (mode == "direct" and not ex.req.via_proxy)


def wants_resumption(app: App, ex: Exchange, version: int) -> bool:
    """A PUT with the interop header becomes resumable only when it says (validly) whether it is
    complete and its total length can be known (a chunked body with no Upload-Length stays a PUT);
    a complete one only when it may get its 104 (without the Location, nobody could resume it)."""
    headers = ex.req.headers
    try:
        complete = complete_marker(headers, version)
    except HTTPError:  # an invalid field is ignored (the draft): without it, an ordinary PUT
        return False
    if complete is None:
        return False
    if complete and not interim_allowed(app, ex):
        return False
    return not (complete and ex.req.chunked and "upload-length" not in headers)


def handle_creation(app: App, ex: Exchange, signed_path: str, version: int) -> None:
    """PUT/POST with the complete marker: 104 + Location, the body into the upload, then 201."""
    started = time.monotonic()
    headers = ex.req.headers
    about: list[tuple[str, str]] = [("Upload-Draft-Interop-Version", str(version))]
    with _draft_errors(ex, version, about):
        complete = complete_marker(headers, version)
        if complete is None:
            raise HTTPError(400, f"{completeness(version, True)[0]} is required to create a resumable upload")
        declared_length = parse_sf_integer(headers["upload-length"]) if "upload-length" in headers else None
        if "upload-length" in headers and declared_length is None:
            raise HTTPError(400, "Upload-Length must be a byte count")
        body_length = None if ex.req.chunked else (ex.req.content_length or 0)
        length = _creation_length(complete, declared_length, body_length)
        metadata = parse_upload_metadata(headers.get("upload-metadata")) or {}
        record = create_upload(app, ex, signed_path, length, "ietf", _declared_type(headers, metadata),
                               headers.get("upload-metadata", "").strip())
        location = resource_path(app, record.id)
        about += [("Location", location), ("Upload-Offset", "0")]
        if interim_allowed(app, ex):
            ex.send_interim(104, [("Location", location), ("Upload-Draft-Interop-Version", str(version)),
                                  ("Upload-Limit", upload_limit(app, version, appends=False))])
        _append(app, ex, record, version, 0, complete, started, about, creation=True)


def _creation_length(complete: bool, declared: Optional[int], body: Optional[int]) -> int:
    """The upload's total: the body's when it is complete, else Upload-Length; both must agree."""
    if complete and body is not None:
        if declared is not None and declared != body:
            raise Problem(400, "inconsistent-upload-length", f"Upload-Length is {declared}, the body {body} bytes")
        return body
    if declared is None:
        raise HTTPError(400, "send Upload-Length: the signature binds the upload's size")
    if body is not None and body > declared:
        raise Problem(400, "inconsistent-upload-length", f"the body ({body} bytes) is longer than Upload-Length")
    return declared


def _append(app: App, ex: Exchange, record: PartialRecord, version: int, offset: int, complete: bool,
            started: float, about: list[tuple[str, str]], creation: bool = False) -> None:
    """Append the body at `offset` as the one writer; on the complete marker, commit and answer
    as a PUT would (201), else acknowledge with the new offset. The answer goes out after the
    upload is let go: a HEAD that follows at once must find it free, not take it over."""
    assert app.resumable is not None
    with app.resumable.writing(record, ex.sock, time.time()) as (record, attachment):
        current = app.resumable.offset(record)
        about[:] = [h for h in about if h[0] != "Upload-Offset"] + [("Upload-Offset", str(current))]
        if record.completed:
            if ex.req.chunked or ex.req.content_length or offset != record.length:
                raise Problem(400, "completed-upload", "this upload is already complete")
            reply = _complete_answer(app, record, version, app.meta.get(record.path))
        else:
            if offset != current:
                raise Problem(409, "mismatching-upload-offset", f"Upload-Offset is {offset}, the upload has "
                              f"{current} bytes", **{"expected-offset": current, "provided-offset": offset})
            if complete and ex.req.content_length is not None and current + ex.req.content_length != record.length:
                raise Problem(400, "inconsistent-upload-length", f"this part ends at "
                              f"{current + ex.req.content_length}, the upload is {record.length} bytes")
            new = append_body(app, ex, record, attachment, current, None,
                              None if creation else app.config.uploads.chunksize)
            about[:] = [h for h in about if h[0] != "Upload-Offset"] + [("Upload-Offset", str(new))]
            if complete:
                if new != record.length:
                    raise Problem(400, "inconsistent-upload-length", f"the upload has {new} of {record.length} bytes")
                reply = _complete_answer(app, record, version, finish_upload(app, record, attachment, started))
            else:
                headers = [*_about(app, version, new, False), ("Upload-Limit", upload_limit(app, version))]
                if creation:
                    headers.append(("Location", resource_path(app, record.id)))
                reply = (201 if creation or version == 3 else 204, headers)
    ex.send(*reply)


def _complete_answer(app: App, record: PartialRecord, version: int,
                     stored: Optional[FileRecord]) -> tuple[int, list[tuple[str, str]]]:
    """What a PUT of the whole file answers, with the draft's headers: 201, the file's Location."""
    headers = [*_about(app, version, record.length, True), ("Location", file_location(app, record.path))]
    if stored is not None and stored.path == record.path:
        headers.append(("ETag", strong_etag(stored.sha256)))
    return 201, headers


def handle_resource(app: App, ex: Exchange, upload_id: str, version: int, method: str) -> None:
    """HEAD (offset retrieval), PATCH (append), DELETE (cancellation) on an upload resource."""
    assert app.resumable is not None
    started = time.monotonic()
    headers = ex.req.headers
    about: list[tuple[str, str]] = [("Upload-Draft-Interop-Version", str(version))]
    with _draft_errors(ex, version, about):
        record = app.resumable.find(upload_id, time.time())
        about.append(("Upload-Offset", str(app.resumable.offset(record))))
        if method in ("HEAD", "DELETE") and any(h in headers for h in UPLOAD_HEADERS):
            raise HTTPError(400, f"{method} on an upload carries no Upload-Offset or completeness header")
        if method == "HEAD":
            with app.resumable.writing(record, ex.sock, time.time()) as (record, attachment):
                offset, finished = current_offset(app, record, attachment, started)
            ex.send(204, [*_about(app, version, offset, finished), ("Upload-Length", str(record.length)),
                          ("Upload-Limit", upload_limit(app, version)), ("Cache-Control", "no-store")])
        elif method == "PATCH":
            if version >= 6 and not is_media_type(headers.get("content-type"), PARTIAL_UPLOAD):
                raise HTTPError(415, f"from interop version 6 an append must be {PARTIAL_UPLOAD}")
            offset = parse_sf_integer(headers.get("upload-offset"))
            if offset is None:
                raise HTTPError(400, "Upload-Offset must be a byte count")
            complete = complete_marker(headers, version)
            if complete is None:
                raise HTTPError(400, f"{completeness(version, True)[0]} is required on an append")
            if "upload-length" in headers and parse_sf_integer(headers["upload-length"]) != record.length:
                raise Problem(400, "inconsistent-upload-length", f"this upload is {record.length} bytes")
            _append(app, ex, record, version, offset, complete, started, about)
        elif method == "DELETE":
            with app.resumable.writing(record, ex.sock, time.time()) as (record, _attachment):
                app.resumable.cancel(record)  # the slot is free again (a committed file stays)
            ex.send(204, [("Upload-Draft-Interop-Version", str(version))])
        else:
            raise HTTPError(405, "method not allowed", {"Allow": "OPTIONS, HEAD, PATCH, DELETE"})
