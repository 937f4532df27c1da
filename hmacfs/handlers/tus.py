"""tus 1.0.0 (tus.io resumable upload protocol): creation at a signed PUT URL, then HEAD, PATCH
and DELETE on the upload resource it names.

Extensions: creation, creation-with-upload, expiration, checksum (md5, sha1, sha256) and
termination. Not offered: creation-defer-length (the signature binds the length, so it must
be known at creation) and concatenation (each partial upload would need a signature for its
own length: it does not fit signed slots). Every response, errors included, carries
`Tus-Resumable`. A tus client pointed at the signed URL as its endpoint works unchanged.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Optional

from ..errors import HTTPError
from ..http.exchange import Exchange
from ..http.httpmsg import http_date
from ..http.uploadheaders import (
    CHECKSUM_ALGORITHMS,
    ChecksumError,
    is_media_type,
    metadata_text,
    parse_checksum,
    parse_count,
    parse_upload_metadata,
)
from ..meta.record import PartialRecord
from .partial import append_body, create_upload, current_offset, finish_upload, resource_path

if TYPE_CHECKING:
    from ..app import App

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload,expiration,checksum,termination"
OCTET_STREAM = "application/offset+octet-stream"
TYPE_KEYS = ("filetype", "type", "contentType")  # where tus clients put the file's media type


def discovery_headers(app: App) -> list[tuple[str, str]]:
    """What OPTIONS tells a tus client about this server."""
    return [("Tus-Resumable", TUS_VERSION), ("Tus-Version", TUS_VERSION), ("Tus-Extension", EXTENSIONS),
            ("Tus-Max-Size", str(app.config.uploads.maxuploadsize)),
            ("Tus-Checksum-Algorithm", ",".join(CHECKSUM_ALGORITHMS))]


@contextmanager
def _tus_response(extra: Optional[list[tuple[str, str]]] = None) -> Iterator[None]:
    """Errors carry Tus-Resumable (and `extra`, e.g. the Location of an upload already created)."""
    try:
        yield
    except HTTPError as err:
        err.headers = {"Tus-Resumable": TUS_VERSION, **dict(extra or ()), **err.headers}
        raise


def _require_version(ex: Exchange) -> None:
    if ex.req.headers.get("tus-resumable", "").strip() != TUS_VERSION:
        raise HTTPError(412, f"this server speaks tus {TUS_VERSION}", {"Tus-Version": TUS_VERSION})


def _checksum(ex: Exchange) -> Optional[tuple[str, bytes]]:
    try:
        return parse_checksum(ex.req.headers.get("upload-checksum"))
    except ChecksumError as e:
        raise HTTPError(400, str(e)) from None


def _has_body(ex: Exchange) -> bool:
    return ex.req.chunked or bool(ex.req.content_length)


def _alive(app: App) -> list[tuple[str, str]]:
    assert app.resumable is not None
    return [("Upload-Expires", http_date(time.time() + app.resumable.expiry))]


def handle_creation(app: App, ex: Exchange, signed_path: str) -> None:
    """POST to a signed URL: 201 with the upload's Location (and its first bytes, if sent)."""
    started = time.monotonic()
    headers = ex.req.headers
    created: list[tuple[str, str]] = []
    with _tus_response(created):
        _require_version(ex)
        if "upload-concat" in headers:
            raise HTTPError(400, "concatenation is not offered: each part would need its own signed length")
        if "upload-defer-length" in headers:
            raise HTTPError(400, "the signature binds the length: send Upload-Length (deferred lengths are not "
                                 "offered)")
        length = parse_count(headers.get("upload-length"))
        if length is None:
            raise HTTPError(400, "Upload-Length must be the upload's size in bytes (ASCII digits)")
        raw_metadata = headers.get("upload-metadata", "").strip()
        metadata = parse_upload_metadata(raw_metadata)
        if metadata is None:
            raise HTTPError(400, "Upload-Metadata must be comma-separated 'key base64value' pairs with unique keys")
        if _has_body(ex) and not is_media_type(headers.get("content-type"), OCTET_STREAM):
            raise HTTPError(415, f"data sent with the creation must be {OCTET_STREAM}")
        checksum = _checksum(ex)
        declared = next((t for t in (metadata_text(metadata, k) for k in TYPE_KEYS) if t), None)
        if not is_media_type(headers.get("content-type"), OCTET_STREAM) and headers.get("content-type"):
            declared = headers["content-type"]
        record = create_upload(app, ex, signed_path, length, "tus", declared, raw_metadata)
        created.append(("Location", resource_path(app, record.id)))
        offset = _write(app, ex, record, 0, checksum, started) if _has_body(ex) or length == 0 else 0
        ex.send(201, [("Tus-Resumable", TUS_VERSION), *created, ("Upload-Offset", str(offset)), *_alive(app)])


def _write(app: App, ex: Exchange, record: PartialRecord, offset: int, checksum: Optional[tuple[str, bytes]],
           started: float) -> int:
    """Append the body at `offset` as the upload's one writer, and commit it when whole; 409 with
    the right offset when the client's is not the upload's."""
    assert app.resumable is not None
    with app.resumable.writing(record, ex.sock, time.time()) as (record, attachment):
        current = app.resumable.offset(record)
        if offset != current:
            raise HTTPError(409, f"Upload-Offset is {offset}, the upload has {current} bytes",
                            {"Upload-Offset": str(current)})
        if record.completed:
            if ex.req.chunked or ex.req.content_length:
                raise HTTPError(400, "this upload is already complete", {"Upload-Offset": str(current)})
            return current
        try:
            offset = append_body(app, ex, record, attachment, current, checksum, app.config.uploads.chunksize)
        except HTTPError as err:  # e.g. a chunked body past chunksize: what it kept still counts
            err.headers.setdefault("Upload-Offset", str(app.resumable.offset(record)))
            raise
        if offset == record.length and not record.completed:
            finish_upload(app, record, attachment, started)
    return offset


def handle_resource(app: App, ex: Exchange, upload_id: str, method: str) -> None:
    """HEAD (the offset), PATCH (append), DELETE (termination) on an upload resource."""
    assert app.resumable is not None
    started = time.monotonic()
    with _tus_response([("Cache-Control", "no-store")] if method == "HEAD" else None):
        if method not in ("HEAD", "PATCH", "DELETE"):
            raise HTTPError(405, "method not allowed", {"Allow": "OPTIONS, HEAD, PATCH, DELETE"})
        _require_version(ex)
        record = app.resumable.find(upload_id, time.time())
        if method == "HEAD":
            with app.resumable.writing(record, ex.sock, time.time()) as (record, attachment):
                offset, finished = current_offset(app, record, attachment, started)
            headers = [("Tus-Resumable", TUS_VERSION), ("Upload-Offset", str(offset)),
                       ("Upload-Length", str(record.length)), ("Cache-Control", "no-store")]
            if record.metadata:
                headers.append(("Upload-Metadata", record.metadata))
            if not finished:
                headers.append(("Upload-Expires", http_date(record.expires)))
            ex.send(200, headers)
        elif method == "PATCH":
            if not is_media_type(ex.req.headers.get("content-type"), OCTET_STREAM):
                raise HTTPError(415, f"PATCH bodies must be {OCTET_STREAM}")
            offset = parse_count(ex.req.headers.get("upload-offset"))
            if offset is None:
                raise HTTPError(400, "Upload-Offset must be a byte count (ASCII digits)")
            offset = _write(app, ex, record, offset, _checksum(ex), started)
            ex.send(204, [("Tus-Resumable", TUS_VERSION), ("Upload-Offset", str(offset)),
                          *(_alive(app) if offset < record.length else [])])
        elif method == "DELETE":
            with app.resumable.writing(record, ex.sock, time.time()) as (record, _attachment):
                app.resumable.cancel(record)  # a committed file stays: deleting it needs a signed DELETE
            ex.send(204, [("Tus-Resumable", TUS_VERSION)])
