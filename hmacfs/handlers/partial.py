"""What tus and the IETF draft do alike with an upload resource, so each protocol's handler
only translates headers and status codes: create the resource from a signed upload slot
(the same checks as a PUT, against the total length), append a request body under a worker
slot, commit on the last byte, and name the resource's URL.

The resource lives at `<urlprefix>.uploads/<id>`: under the prefix, so a reverse proxy that
forwards the prefix forwards it too, and under a name no upload can take (names starting
with a dot are refused). Its URL is the capability: requests on it need no signature.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator, Optional, Union

from ..errors import HTTPError
from ..http.body import ChunkedBody, LengthBody
from ..http.exchange import Exchange
from ..meta import FileRecord
from ..meta.record import PartialRecord
from ..resumable import Attachment
from .common import worker_slot
from .upload import admit_upload, count_upload, pipeline_upload

if TYPE_CHECKING:
    from ..app import App

RESOURCE_DIR = ".uploads/"


def resource_path(app: App, upload_id: str) -> str:
    return app.prefix + RESOURCE_DIR + upload_id


def create_upload(app: App, ex: Exchange, signed_path: str, length: int, protocol: str,
                  declared_type: Optional[str], metadata: str = "") -> PartialRecord:
    """A new upload resource for a signed slot: the signature is checked against `length` (the
    whole upload's), with the slot's method (PUT) and the type the client declares. Never the
    request's own Content-Type when nothing is declared: on a creation it only frames the first
    bytes (application/offset+octet-stream, application/partial-upload)."""
    try:
        admitted = admit_upload(app, ex, signed_path, length, method="PUT", content_type=declared_type or "")
        if app.scanner is not None:
            app.scanner.refuses(signed_path, length)  # too large to scan: refused now, not after every byte
    except HTTPError as err:
        app.metrics.upload_errors.inc(1, str(err.status))
        raise
    assert app.resumable is not None
    record = app.resumable.create(signed_path, length, admitted.content_type, protocol, admitted.grant.protocol,
                                  time.time(), admitted.file_expires, admitted.uploader, metadata)
    app.metrics.resumable_created.inc(1, protocol)
    return record


def append_body(app: App, ex: Exchange, record: PartialRecord, attachment: Attachment, offset: int,
                checksum: Optional[tuple[str, bytes]] = None, per_request: Optional[int] = None) -> int:
    """Append the request's body (Content-Length or chunked) at `offset`; returns the new offset.
    At most `per_request` bytes (`chunksize`: 413 beyond) and never past the upload's length."""
    req = ex.req
    remaining = record.length - offset
    if req.chunked:
        if not app.config.uploads.chunkeduploadsenabled:
            raise HTTPError(411, "chunked request bodies are turned off here: send Content-Length")
    elif not req.content_length:
        return offset
    size = req.content_length
    if size is not None and per_request is not None and size > per_request:
        raise HTTPError(413, f"one append may carry at most {per_request} bytes (chunksize); send smaller parts")
    if size is not None and size > remaining:
        raise HTTPError(413, f"{size} more bytes would pass the upload's length of {record.length}")
    limit = min(remaining, per_request) if per_request is not None else remaining
    body: Union[LengthBody, ChunkedBody] = (ChunkedBody(req.rfile, limit, keep_partial=True) if req.chunked
                                            else LengthBody(req.rfile, size or 0, keep_partial=True))
    assert app.resumable is not None
    with worker_slot(app, ex, size) as buf:
        ex.send_continue()
        try:
            return app.resumable.append(record, attachment, body, buf, time.time(), checksum,
                                        app.config.server.minfreebytes)
        finally:
            req.body_consumed = body.complete


def finish_upload(app: App, record: PartialRecord, attachment: Attachment, started: float) -> FileRecord:
    """Commit a whole upload exactly like a PUT (dedup, versioning, quotas, encryption)."""
    assert app.resumable is not None
    now = time.time()
    upload = pipeline_upload(app, record.path, record.content_type, record.file_expires, record.uploader, now)
    scanner = app.scanner

    def scan(size: int, blocks: Iterator[bytes]) -> None:
        if scanner is None:
            return
        try:
            scanner.scan(record.path, size, blocks)  # the assembled file, before the commit
        except HTTPError as err:
            if err.status in (413, 422):  # infected or too large to scan: its bytes are of no use
                app.resumable.cancel(record)  # type: ignore[union-attr]
            raise

    try:
        if app.pipeline.links_partials:  # committed by a hard link: no buffer needed
            stored = app.resumable.finish(record, attachment, upload, memoryview(bytearray(0)), now, inspect=scan)
        else:
            with app.gate.slot(record.length) as buf:
                stored = app.resumable.finish(record, attachment, upload, buf, now, app.config.server.minfreebytes,
                                              inspect=scan)
    except HTTPError as err:
        app.metrics.upload_errors.inc(1, str(err.status))
        raise
    count_upload(app, record.grant, stored.size, started)
    app.metrics.resumable_completed.inc(1, record.protocol)
    return stored


def current_offset(app: App, record: PartialRecord, attachment: Attachment, started: float) -> tuple[int, bool]:
    """(offset, finished) for HEAD. An upload whose bytes are all there but whose commit failed
    (a file took the path, a quota) is committed again first: its HEAD must not look like a
    finished upload's, so the client sees the commit's error instead of a success."""
    assert app.resumable is not None
    offset = app.resumable.offset(record)
    if offset == record.length and not record.completed:
        finish_upload(app, record, attachment, started)
    return offset, offset == record.length

