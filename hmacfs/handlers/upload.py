"""PUT: verify before reading the body, stream to a temp file, commit atomically, answer 201.

Order of checks (all before `100 Continue`, so a refused client never sends its body):
framing (400/411) -> signature (401/403/410/413) -> size limit (413) -> extension (415)
-> existing file (409) -> free space (507) -> worker slot (503).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional, Union
from urllib.parse import quote

from .. import auth, pipeline
from ..errors import HTTPError
from ..http.body import ChunkedBody, LengthBody
from ..http.exchange import Exchange
from ..http.httpmsg import clean_content_type, guess_type, strong_etag
from ..policy.paths import extension_allowed
from .common import auth_failures_counted, request_facts

if TYPE_CHECKING:
    from ..app import App


def body_framing(ex: Exchange) -> Optional[int]:
    """Content-Length of the body, or None for chunked; 400/411/501 for anything else."""
    headers = ex.req.headers
    te = headers.get("transfer-encoding")
    cl = headers.get("content-length")
    if te is not None:
        if cl is not None:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding (refused: request smuggling)")
        if te.strip().lower() != "chunked":
            raise HTTPError(501, f"unsupported Transfer-Encoding {te!r}")
        return None
    if cl is None:
        raise HTTPError(411, "Content-Length or chunked Transfer-Encoding required")
    cl = cl.strip()
    if not cl.isdigit() or len(cl) > 19:
        raise HTTPError(400, "invalid Content-Length")
    return int(cl)


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
    if app.store.exists(signed_path):
        raise HTTPError(409, "a file already exists at this path")
    if app.store.free_bytes() - (declared or 0) < cfg.server.minfreebytes:
        raise HTTPError(507, "not enough free space")

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
            received = pipeline.receive(app.store, body, buf)
        finally:
            ex.req.body_consumed = body.complete

        def check(r: pipeline.Received) -> None:
            with auth_failures_counted(app):
                grant.check_final_size(app.secrets, r.size)

        record = app.pipeline.commit(received, signed_path, content_type, grant.file_expires,
                                     grant.uploader, before_commit=check)
    return record, grant
