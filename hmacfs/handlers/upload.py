"""PUT: verify before reading the body, stream to a temp file, commit atomically, answer 201.

Order of checks (all before `100 Continue`, so a refused client never sends its body, and
nothing is written and no worker slot is held for a request that is not authorized):
framing (411; a chunked body only for v3 and JWT) -> signature (401/403/410/413) -> size
limit (413) -> extension (415) -> existing file (409; 403 through a symlink out of the root)
-> free space (507) -> quotas (507 naming the quota) -> worker slot (503) -> virus scanner
(413 too large to scan, 503 clamd down). As the body arrives, the size limit and the free
space are enforced again (413/507) and every chunk also goes to clamd; the verdict comes
right after the last byte (422 when infected), and the upload is committed whole or not at
all. With versioning on, an existing file is kept as a version instead of a 409.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union
from urllib.parse import quote

from .. import auth, pipeline
from ..auth import MAX_EXPIRES_DIGITS
from ..digits import parse_decimal
from ..errors import HTTPError, storage_full
from ..http.body import ChunkedBody, LengthBody
from ..http.exchange import Exchange
from ..http.httpmsg import clean_content_type, guess_type, strong_etag
from ..meta import FileRecord
from ..policy.paths import extension_allowed
from ..policy.quotas import DAY, Standing, exceeded, refusal, uploader_of
from ..storage.local import PathConflict
from .common import auth_failures_counted, request_facts, worker_slot

if TYPE_CHECKING:
    from ..app import App


def body_framing(app: App, ex: Exchange) -> Optional[int]:
    """Content-Length of the body, or None for chunked (the head parser validated both); 411 else
    (also for chunked when `chunkeduploadsenabled` is off)."""
    req = ex.req
    if req.chunked:
        if not app.config.uploads.chunkeduploadsenabled:
            raise HTTPError(411, "chunked request bodies are turned off here: send Content-Length")
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
    count_upload(app, grant.protocol, record.size, started)
    ex.send(201, [("ETag", strong_etag(record.sha256)), ("Location", file_location(app, signed_path))])


def count_upload(app: App, protocol: str, size: int, started: float) -> None:
    app.metrics.uploads.inc(1, protocol)
    app.metrics.upload_bytes.inc(size)
    app.metrics.upload_seconds.observe(time.monotonic() - started)


def file_location(app: App, signed_path: str) -> str:
    return app.prefix + quote(signed_path)


@dataclass(frozen=True)
class Admission:
    """An upload the server agreed to take: what its signature granted and what the file will be."""

    grant: auth.UploadGrant
    declared: Optional[int]         # its size, when known before the body
    content_type: str
    file_expires: Optional[float]   # its own expiry from the grant or the request (the TTL comes at commit)
    uploader: Optional[str]


def admit_upload(app: App, ex: Exchange, signed_path: str, length: Optional[int], method: Optional[str] = None,
                 content_type: Optional[str] = None) -> Admission:
    """Every check an upload passes before a body byte is read (see the module docstring);
    `length` is what the signature binds (the body's, or a resumable upload's total)."""
    cfg = app.config
    facts = request_facts(app, ex, signed_path, length, method, content_type)
    now = time.time()
    with auth_failures_counted(app):
        grant = auth.authorize_upload(app.secrets, app.jwt_secrets, facts, now)
    app.guard.charge_uploader(grant.uploader, ex.req.client)  # the rate limit per JWT sub (429)
    declared = length if length is not None else grant.size
    limit = cfg.uploads.maxuploadsize
    if declared is not None and declared > limit:
        raise HTTPError(413, f"upload of {declared} bytes exceeds the limit of {limit} bytes")
    if not extension_allowed(signed_path, cfg.uploads.allowedextensions, cfg.uploads.blockedextensions):
        raise HTTPError(415, "file extension not allowed")
    # OutsideRoot (403) when the parent leads out of the root; with versioning a file there is kept
    if app.pipeline.path_taken(signed_path) and app.pipeline.keep_versions is None:
        raise PathConflict(signed_path)
    free = app.pipeline.free_bytes()  # None: a bucket, which has no such figure
    if free is not None and free - (declared or 0) < cfg.server.minfreebytes:
        raise storage_full()
    uploader = uploader_of(cfg.quotas.identity, grant.uploader, signed_path)
    check_quotas(app, uploader, declared or 0, now)
    return Admission(grant=grant, declared=declared,
                     content_type=(clean_content_type(grant.content_type) or clean_content_type(facts.content_type)
                                   or guess_type(signed_path)),
                     file_expires=explicit_expiry(grant, ex.req.headers.get("x-hmacfs-expires")),
                     uploader=uploader)


def pipeline_upload(app: App, signed_path: str, content_type: str, file_expires: Optional[float],
                    uploader: Optional[str], now: float) -> pipeline.Upload:
    """What the commit needs: the file's expiry (the TTL counts from now), and the quotas'
    last check with the real size inside the commit's transaction."""
    ttl = app.file_ttl
    candidates = [t for t in (now + ttl if ttl is not None else None, file_expires) if t is not None]

    def admit(record: FileRecord) -> None:
        """In the commit's transaction: the quotas once more with the real size (concurrent
        uploads of one uploader cannot all slip under them), and the per-day log."""
        check_quotas(app, uploader, record.size, now)
        if uploader is not None and app.quotas is not None and app.quotas.per_day:
            app.meta.log_upload(uploader, now, record.size)

    return pipeline.Upload(signed_path=signed_path, content_type=content_type,
                           expires=min(candidates) if candidates else None, uploader=uploader,
                           admit=admit if app.quotas is not None else None)


def _put(app: App, ex: Exchange, signed_path: str):
    length = body_framing(app, ex)
    admitted = admit_upload(app, ex, signed_path, length)
    grant, declared = admitted.grant, admitted.declared
    upload = pipeline_upload(app, signed_path, admitted.content_type, admitted.file_expires, admitted.uploader,
                             time.time())
    with worker_slot(app, ex, declared) as buf:
        scan = app.scanner.begin(signed_path, declared) if app.scanner is not None else None  # 413/503 first
        try:
            ex.send_continue()
            body = request_body(ex, grant.size if grant.size is not None else app.config.uploads.maxuploadsize)
            try:
                received = app.pipeline.receive(body, buf, app.config.server.minfreebytes, declared, scan)
            finally:
                ex.req.body_consumed = body.complete

            def last_checks(r: pipeline.Received) -> None:
                grant.check_final_size(r.size)
                if scan is not None:
                    scan.verdict()  # 422 when infected: nothing is stored

            record = app.pipeline.commit(received, upload, last_checks)
        finally:
            if scan is not None:
                scan.close()
    return record, grant


def request_body(ex: Exchange, chunked_limit: int) -> Union[LengthBody, ChunkedBody]:
    """The body reader: exactly Content-Length bytes, or a chunked body of at most `chunked_limit`."""
    if ex.req.chunked:
        return ChunkedBody(ex.req.rfile, chunked_limit)
    return LengthBody(ex.req.rfile, ex.req.content_length or 0)


def check_quotas(app: App, uploader: Optional[str], size: int, now: float) -> None:
    """507 naming the quota when `size` more bytes would exceed one (nothing is read or stored)."""
    limits = app.quotas
    if limits is None:
        return
    standing = Standing(
        user_bytes=app.meta.usage(uploader).bytes if uploader and limits.per_user else 0,
        day_bytes=app.meta.bytes_since(uploader, now - DAY) if uploader and limits.per_day else 0,
        total_bytes=app.meta.total_bytes() if limits.total else 0)
    quota = exceeded(limits, standing, size, uploader is not None)
    if quota is not None:
        app.metrics.quota_refusals.inc(1, quota)
        raise refusal(quota, limits, standing, size)


def explicit_expiry(grant: auth.UploadGrant, header: Optional[str]) -> Optional[float]:
    """The file's own expiry, apart from the global TTL: the earlier of the JWT `expires` claim
    and, for v3 uploads (whose URL already chose the path and the time), an `X-Hmacfs-Expires`
    header."""
    candidates = []
    if grant.file_expires is not None:
        candidates.append(float(grant.file_expires))
    if header is not None and grant.protocol == "v3":
        at = parse_decimal(header.strip(), MAX_EXPIRES_DIGITS)
        if at is None:
            raise HTTPError(400, "X-Hmacfs-Expires must be a unix time in whole seconds")
        candidates.append(float(at))
    return min(candidates) if candidates else None
