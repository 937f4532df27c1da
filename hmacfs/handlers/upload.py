"""PUT: verify before reading the body, stream to a temp file, commit atomically, answer 201.

Order of checks (all before `100 Continue`, so a refused client never sends its body, and
nothing is written and no worker slot is held for a request that is not authorized):
framing (411; a chunked body only for v3 and JWT) -> signature (401/403/410/413) -> size
limit (413) -> extension (415) -> existing file (409; 403 through a symlink out of the root)
-> free space (507) -> worker slot (503). As the body arrives, the size limit and the free
space are enforced again (413/507), and the upload is committed whole or not at all.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional, Union
from urllib.parse import quote

from .. import auth, pipeline
from ..errors import HTTPError, storage_full
from ..http.body import ChunkedBody, LengthBody
from ..http.exchange import Exchange
from ..http.httpmsg import clean_content_type, guess_type, strong_etag
from ..policy.paths import extension_allowed
from ..storage.local import PathConflict
from .common import auth_failures_counted, request_facts

if TYPE_CHECKING:
    from ..app import App


def body_framing(ex: Exchange) -> Optional[int]:
    """Content-Length of the body, or None for chunked (the head parser validated both); 411 else."""
    req = ex.req
    if req.chunked:
        return None
    if req.content_length is None:
        raise HTTPError(411, "Content-Length or chunked Transfer-Encoding required")
    return req.content_length


def handle_put(app: App, ex: Exchange, signed_path: str) -> None:
    started = time.monotonic()
    try:
        record, grant = _put(app, ex, signed_path)
    except HTTPError as err:
        app.metrics.upload_errors.inc(1, str(err.status))
        raise
    app.metrics.uploads.inc(1, grant.protocol)
    app.metrics.upload_bytes.inc(record.size)
    app.metrics.upload_seconds.observe(time.monotonic() - started)
    location = app.prefix + quote(signed_path)
    ex.send(201, [("ETag", strong_etag(record.sha256)), ("Location", location)])


def _put(app: App, ex: Exchange, signed_path: str):
    cfg = app.config
    length = body_framing(ex)
    facts = request_facts(app, ex, signed_path, length)
    with auth_failures_counted(app):
        grant = auth.authorize_upload(app.secrets, app.jwt_secrets, facts, time.time())
    declared = length if length is not None else grant.size
    limit = cfg.uploads.maxuploadsize
    if declared is not None and declared > limit:
        raise HTTPError(413, f"upload of {declared} bytes exceeds the limit of {limit} bytes")
    if not extension_allowed(signed_path, cfg.uploads.allowedextensions, cfg.uploads.blockedextensions):
        raise HTTPError(415, "file extension not allowed")
    if app.store.exists(signed_path):  # OutsideRoot (403) when the parent leads out of the root
        raise PathConflict(signed_path)
    if app.store.free_bytes() - (declared or 0) < cfg.server.minfreebytes:
        raise storage_full()

    content_type = (clean_content_type(grant.content_type) or clean_content_type(facts.content_type)
                    or guess_type(signed_path))
    with app.gate.slot(declared) as buf:
        ex.send_continue()
        body: Union[LengthBody, ChunkedBody]
        if length is not None:
            body = LengthBody(ex.req.rfile, length)
        else:
            body = ChunkedBody(ex.req.rfile, grant.size if grant.size is not None else limit)
        try:
            received = pipeline.receive(app.store, body, buf, cfg.server.minfreebytes, declared)
        finally:
            ex.req.body_consumed = body.complete
        record = app.pipeline.commit(received, signed_path, content_type, grant.file_expires, grant.uploader,
                                     before_commit=lambda r: grant.check_final_size(r.size))
    return record, grant
