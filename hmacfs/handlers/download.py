"""GET/HEAD: metadata, conditionals and ranges, then the bytes via sendfile.

A file without a metadata row (adopted prosody-filer store, or a crash between commit and
insert) is hashed once on first access and recorded, so ETags stay strong content hashes.
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import TYPE_CHECKING, Optional

from .. import auth
from ..errors import HTTPError
from ..http.exchange import Exchange
from ..http.httpmsg import (
    clean_content_type,
    content_disposition,
    guess_type,
    http_date,
    not_modified,
    parse_range,
    range_applies,
    strong_etag,
)
from ..meta import FileRecord
from ..services.hotcache import Identity
from .common import auth_failures_counted, request_facts

if TYPE_CHECKING:
    from ..app import App

HASH_BLOCK = 1024 * 1024
IMMUTABLE_MAX_AGE = 31536000


def hash_fd(fd: int, size: int) -> str:
    """sha256 of an open file's first `size` bytes (pread: the fd's offset is left alone)."""
    digest = hashlib.sha256()
    offset = 0
    while offset < size:
        block = os.pread(fd, min(HASH_BLOCK, size - offset), offset)
        if not block:
            break
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def current_record(app: App, signed_path: str, record: Optional[FileRecord], fd: int,
                   st: os.stat_result) -> FileRecord:
    """The metadata row, rebuilt from the file if missing or stale (changed outside hmacfs)."""
    if record is not None and _record_matches(record, st):
        return record
    rebuilt = FileRecord(path=signed_path, size=st.st_size,
                         content_type=record.content_type if record else guess_type(signed_path),
                         sha256=hash_fd(fd, st.st_size), created=record.created if record else st.st_mtime,
                         mtime_ns=st.st_mtime_ns, expires=record.expires if record else None,
                         uploader=record.uploader if record else None)
    app.meta.put(rebuilt)
    return rebuilt


def expire_if_due(app: App, signed_path: str, record: Optional[FileRecord]) -> None:
    """410 (and delete) when the file's own expiry time has passed."""
    if record is not None and record.expires is not None and record.expires <= time.time():
        app.store.delete(signed_path)
        app.meta.delete(signed_path)
        app.hot.discard(signed_path)
        raise HTTPError(410, "this file has expired")


def _record_matches(record: Optional[FileRecord], st: os.stat_result) -> bool:
    return record is not None and record.size == st.st_size and record.mtime_ns in (0, st.st_mtime_ns)


def handle_get(app: App, ex: Exchange, signed_path: str) -> None:
    started = time.monotonic()
    if app.config.downloads.requiresignature:
        with auth_failures_counted(app):
            auth.authorize_download(app.secrets, request_facts(app, ex, signed_path, None), time.time())
    record = app.meta.get(signed_path)
    expire_if_due(app, signed_path, record)
    if not _serve_cached(app, ex, signed_path, record):
        _serve_opened(app, ex, signed_path, record)
    if ex.status in (200, 206):
        app.metrics.downloads.inc(1, str(ex.status))
        app.metrics.download_bytes.inc(ex.body_bytes)
        app.metrics.download_seconds.observe(time.monotonic() - started)


def _serve_cached(app: App, ex: Exchange, signed_path: str, record: Optional[FileRecord]) -> bool:
    """Serve a small file from the hot cache after one lstat; False on a miss."""
    st = app.store.stat(signed_path)
    if st is None or st.st_size > app.hot.max_file or not _record_matches(record, st):
        return False
    data = app.hot.get(signed_path, Identity.of(st))
    if data is None:
        return False
    _serve(app, ex, signed_path, record, st, data=data)
    return True


def _serve_opened(app: App, ex: Exchange, signed_path: str, record: Optional[FileRecord]) -> None:
    opened = app.store.open(signed_path)
    if opened is None:
        raise HTTPError(404, "not found")
    fd, st = opened
    try:
        record = current_record(app, signed_path, record, fd, st)
        if st.st_size <= app.hot.max_file:
            data = os.pread(fd, st.st_size, 0)
            app.hot.put(signed_path, Identity.of(st), data)
            _serve(app, ex, signed_path, record, st, data=data)
        else:
            _serve(app, ex, signed_path, record, st, fd=fd)
    finally:
        os.close(fd)


def _serve(app: App, ex: Exchange, signed_path: str, record: FileRecord, st: os.stat_result,
           fd: Optional[int] = None, data: Optional[bytes] = None) -> None:
    """Conditionals, Range and headers, then the body from `data` (small files) or `fd`."""
    headers = ex.req.headers
    etag = strong_etag(record.sha256)
    mtime = st.st_mtime
    if record.expires is not None:
        cache = f"public, max-age={max(0, int(record.expires - time.time()))}"
    else:
        cache = f"public, max-age={IMMUTABLE_MAX_AGE}, immutable"
    common = [("ETag", etag), ("Last-Modified", http_date(mtime)), ("Cache-Control", cache),
              ("Accept-Ranges", "bytes" if app.config.downloads.resumabledownloadsenabled else "none")]
    if not_modified(headers.get("if-none-match"), headers.get("if-modified-since"), etag, mtime):
        ex.send(304, common)
        return
    # re-checked on the way out: a row written by an older version may hold anything
    content_type = clean_content_type(record.content_type) or guess_type(signed_path)
    if content_type.startswith("text/") and "charset" not in content_type:
        content_type += "; charset=utf-8"
    filename = signed_path.rsplit("/", 1)[-1]
    common += [("Content-Type", content_type), ("Content-Disposition", content_disposition(filename, content_type))]
    size = st.st_size
    span = None
    if app.config.downloads.resumabledownloadsenabled and range_applies(headers.get("if-range"), etag, mtime):
        span = parse_range(headers.get("range"), size)
    status, first, last = 200, 0, size - 1
    if span is not None:
        status, (first, last) = 206, span
        common.append(("Content-Range", f"bytes {first}-{last}/{size}"))
    if data is not None:
        ex.send(status, common, data[first:last + 1] if span is not None else data)
    else:
        assert fd is not None
        ex.send_file(status, common, fd, first, last - first + 1)
