"""GET/HEAD: metadata, conditionals and ranges, then the bytes (sendfile, or decrypted segments).

A file without a metadata row (adopted prosody-filer store, or a crash between commit and
insert) is hashed once on first access and recorded, so ETags stay strong content hashes.
`?versions` lists the kept versions of a path (JSON) and `?version=N` serves one; an
expired file is a 410 (and is removed at once). Encrypted files are decrypted segment by
segment, only those a Range touches, each authenticated before a byte of it is sent; a
segment that fails later cuts the connection, so a client never takes altered bytes for
a complete download.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import time
from functools import partial
from typing import TYPE_CHECKING, Callable, Generator, Iterator, NamedTuple, Optional

from .. import auth
from ..digits import parse_decimal
from ..errors import HTTPError
from ..http.exchange import Exchange
from ..http.httpmsg import (
    clean_content_type,
    content_disposition,
    guess_type,
    http_date,
    not_modified,
    parse_ranges,
    range_applies,
    strong_etag,
)
from ..meta import FileRecord
from ..meta.record import VersionRecord
from ..pipeline import hash_fd, record_for_file, record_matches
from ..services.hotcache import Identity
from .common import auth_failures_counted, request_facts

if TYPE_CHECKING:
    from ..app import App

log = logging.getLogger("hmacfs")
IMMUTABLE_MAX_AGE = 31536000
DECRYPT_WAIT = 10.0  # seconds an encrypted download waits for a decryption slot before a 503
OBJECT_CACHE = "\x00object:"  # hot-cache keys of objects (no signed path holds a NUL)
REDIRECT_SECONDS = 300  # how long a presigned S3 URL given by `s3redirect` stays valid
READ_BLOCK = 256 * 1024  # bytes per read of a plain file sent as several ranges (no sendfile between part heads)


def expire_if_due(app: App, signed_path: str, record: Optional[FileRecord]) -> None:
    """410 (and removal, versions included) when the file's own expiry time has passed."""
    now = time.time()
    if record is not None and record.expires is not None and record.expires <= now:
        if app.catalog.remove(signed_path, expired_at=now):
            app.metrics.expired_removed.inc()
        raise HTTPError(410, "this file has expired")


def handle_get(app: App, ex: Exchange, signed_path: str) -> None:
    started = time.monotonic()
    if app.config.downloads.requiresignature:
        with auth_failures_counted(app):
            auth.authorize_download(app.secrets, request_facts(app, ex, signed_path, None), time.time())
    # In cluster mode a row seen before serves while Redis is away (services/lastseen.py).
    record = app.meta.get(signed_path) if app.last_seen is None else app.last_seen.read(signed_path, app.meta.get)
    expire_if_due(app, signed_path, record)
    query = ex.req.query
    if "thumbnail" in query:
        _serve_thumbnail(app, ex, signed_path, record)
    elif "versions" in query:
        _list_versions(app, ex, signed_path, record)
    elif "version" in query:
        _serve_version(app, ex, signed_path, record, query["version"])
    elif (record is not None and (record.ref or record.encrypted)) or not _serve_cached(app, ex, signed_path, record):
        _serve_opened(app, ex, signed_path, record)
    if ex.status in (200, 206):
        app.metrics.downloads.inc(1, str(ex.status))
        app.metrics.download_bytes.inc(ex.body_bytes)
        app.metrics.download_seconds.observe(time.monotonic() - started)


def _serve_cached(app: App, ex: Exchange, signed_path: str, record: Optional[FileRecord]) -> bool:
    """Serve a small plain file from the hot cache after one lstat; False on a miss. The bytes
    come from an earlier safe `open`; the lstat only confirms they are still that file's."""
    st = app.store.identity(signed_path)
    if st is None or st.st_size > app.hot.max_file or not record_matches(record, st):
        return False
    data = app.hot.get(signed_path, Identity.of(st))
    if data is None:
        return False
    assert record is not None
    _serve(app, ex, signed_path, record, st, data=data)
    return True


def _serve_opened(app: App, ex: Exchange, signed_path: str, record: Optional[FileRecord]) -> None:
    if record is not None and record.object_key:
        _serve_object(app, ex, signed_path, record)
        return
    if record is not None and record.image:
        _serve_packed(app, ex, signed_path, record)
        return
    opened = app.catalog.open_current(signed_path, record)
    if opened is None:
        if record is not None and record.ref:
            raise HTTPError(500, "the stored bytes of this file are missing")
        fresh = app.catalog.fresh(signed_path) if record is not None else None
        if fresh is not None and fresh.image:  # packed by `hmacfs iso pack` since the row was cached
            _serve_packed(app, ex, signed_path, fresh)
            return
        raise HTTPError(404, "not found")
    fd, st = opened
    try:
        if record is None or not (record.ref or record.encrypted):
            record = record_for_file(app.meta, signed_path, record, fd, st, app.keyring)
            if st.st_size <= app.hot.max_file and not record.encrypted:
                data = os.pread(fd, st.st_size, 0)
                app.hot.put(signed_path, Identity.of(st), data)
                _serve(app, ex, signed_path, record, st, data=data)
                return
        _serve(app, ex, signed_path, record, st, fd=fd)
    finally:
        os.close(fd)


def _serve_object(app: App, ex: Exchange, signed_path: str, record: FileRecord, cache: Optional[str] = None) -> None:
    """A file in the bucket (S3 backend): ranged GETs streamed through this node, or, with
    `s3redirect`, a 302 to a presigned URL that forces the type and disposition hmacfs would
    send (so an uploaded HTML or SVG file is still an attachment, never a page)."""
    assert record.object_key is not None and app.objects is not None
    if app.config.storage.s3redirect and not record.encrypted:
        content_type = served_type(record, signed_path)
        disposition = content_disposition(signed_path.rsplit("/", 1)[-1], content_type)
        url = app.objects.presign(record.object_key, REDIRECT_SECONDS, content_type, disposition)
        ex.send(302, [("Location", url), ("Cache-Control", "no-store")])
        return
    if not record.encrypted and record.size <= app.hot.max_file:
        # Objects are never overwritten (each upload has its own), so a small one's bytes can
        # be kept here for as long as the LRU keeps them: a hot file costs its row, not a GET.
        identity, cached_as = Identity(0, 0, record.size, 0), OBJECT_CACHE + record.object_key
        data = app.hot.get(cached_as, identity)
        if data is None:
            data = b"".join(app.objects.read(record.object_key, 0, record.size - 1)) if record.size else b""
            app.hot.put(cached_as, identity, data)
        _serve(app, ex, signed_path, record, object_stat(record), cache=cache, data=data)
        return
    _serve(app, ex, signed_path, record, object_stat(record), cache=cache,
           read=partial(app.objects.read, record.object_key))


def object_stat(record: FileRecord) -> os.stat_result:
    """What `_serve` needs of a stat for a file with no local inode: its size and mtime (the upload time)."""
    created = int(record.created)
    return os.stat_result((0o100644, 0, 0, 1, 0, 0, record.size, created, created, created),
                          {"st_mtime": record.created})


def _serve_packed(app: App, ex: Exchange, signed_path: str, record: FileRecord) -> None:
    """A file packed into an ISO image: its slice of the image, read (or sent) at the offset."""
    packed = app.catalog.open_packed(record)
    if packed is None:
        raise HTTPError(500, "the stored bytes of this file are missing")
    try:
        _serve(app, ex, signed_path, record, packed.st, fd=packed.fd, base=packed.offset)
    finally:
        os.close(packed.fd)


def _serve_version(app: App, ex: Exchange, signed_path: str, record: Optional[FileRecord], text: str) -> None:
    number = parse_decimal(text, 9)
    if number is None or number < 1:
        raise HTTPError(400, "version must be a positive whole number")
    if record is not None and number == record.version:
        _serve_opened(app, ex, signed_path, record)
        return
    version = next((v for v in app.meta.versions(signed_path) if v.version == number), None)
    if version is None:
        raise HTTPError(404, f"no version {number} of this file")
    if version.object_key:
        _serve_object(app, ex, signed_path, _as_record(version), cache="private, no-cache")
        return
    opened = app.catalog.open_version(version)
    if opened is None:
        raise HTTPError(500, "the stored bytes of this version are missing")
    fd, st = opened
    try:
        _serve(app, ex, signed_path, _as_record(version), st, fd=fd, cache="private, no-cache")
    finally:
        os.close(fd)


def _serve_thumbnail(app: App, ex: Exchange, signed_path: str, record: Optional[FileRecord]) -> None:
    """`?thumbnail`: the image's thumbnail (PNG or JPEG) with the file's own headers, Range and
    conditionals; 404 while there is none (not an image, not made yet, or thumbnails off)."""
    thumbnails = getattr(app, "thumbnails", None)
    if thumbnails is None or record is None:
        raise HTTPError(404, "no thumbnail")
    thumb = thumbnails.open(signed_path)
    if thumb is None:
        raise HTTPError(404, "no thumbnail (yet)")
    try:
        if thumb.encrypted:
            from ..storage.encrypted import EncryptedFileError, plaintext_digest

            if app.keyring is None:
                raise HTTPError(404, "no thumbnail")
            try:
                size, sha256 = plaintext_digest(thumb.fd, app.keyring, thumb.st.st_size)
            except EncryptedFileError as e:
                log.error("the thumbnail of %r does not decrypt (%s): not served", signed_path, e)
                raise HTTPError(404, "no thumbnail") from None
        else:
            size, sha256 = thumb.st.st_size, hash_fd(thumb.fd, thumb.st.st_size)  # small: hashed per request
        thumb_record = FileRecord(path=signed_path, size=size, content_type=thumb.content_type, sha256=sha256,
                                  created=thumb.st.st_mtime, encrypted=thumb.encrypted)
        # Revalidated each time: a new version of the path brings a new thumbnail at the same URL.
        _serve(app, ex, signed_path, thumb_record, thumb.st, fd=thumb.fd, cache="public, no-cache")
    finally:
        os.close(thumb.fd)


def _as_record(v: VersionRecord) -> FileRecord:
    return FileRecord(path=v.path, size=v.size, content_type=v.content_type, sha256=v.sha256, created=v.created,
                      uploader=v.uploader, version=v.version, blob=v.blob, encrypted=v.encrypted,
                      object_key=v.object_key)


def _list_versions(app: App, ex: Exchange, signed_path: str, record: Optional[FileRecord]) -> None:
    if record is None and app.store.stat(signed_path) is None:
        raise HTTPError(404, "not found")
    entries = [{"version": v.version, "size": v.size, "sha256": v.sha256, "content_type": v.content_type,
                "created": _iso(v.created), "current": False} for v in app.meta.versions(signed_path)]
    if record is not None:
        entries.append({"version": record.version, "size": record.size, "sha256": record.sha256,
                        "content_type": record.content_type, "created": _iso(record.created), "current": True})
    body = json.dumps({"path": signed_path, "versions": entries}, ensure_ascii=False).encode()
    ex.send(200, [("Cache-Control", "no-store")], body, "application/json")


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def ranges_on(app: App) -> bool:
    """Range requests (resuming and chunk-by-chunk downloading): off when either seed key says so."""
    downloads = app.config.downloads
    return downloads.resumabledownloadsenabled and downloads.chunkeddownloadsenabled


def _serve(app: App, ex: Exchange, signed_path: str, record: FileRecord, st: os.stat_result,
           fd: Optional[int] = None, data: Optional[bytes] = None, cache: Optional[str] = None,
           base: int = 0, read: Optional[Callable[[int, int], Generator[memoryview, None, None]]] = None) -> None:
    """Conditionals, Range and headers, then the body from `data` (small files), `fd`, the
    decrypted segments of `fd` (encrypted files), or `read(first, last)` (an object in the
    bucket). `base`: where the file starts in `fd` (a file packed into an ISO image; never
    encrypted)."""
    reader = _reader(app, signed_path, record, fd, st) if record.encrypted else None
    size = reader.plaintext_size if reader is not None else st.st_size
    headers = ex.req.headers
    etag = strong_etag(record.sha256)
    mtime = st.st_mtime
    if cache is None:
        if record.expires is not None:
            cache = f"public, max-age={max(0, int(record.expires - time.time()))}"
        else:
            cache = f"public, max-age={IMMUTABLE_MAX_AGE}, immutable"
    common = [("ETag", etag), ("Last-Modified", http_date(mtime)), ("Cache-Control", cache),
              ("Accept-Ranges", "bytes" if ranges_on(app) else "none")]
    if not_modified(headers.get("if-none-match"), headers.get("if-modified-since"), etag, mtime):
        ex.send(304, common)
        return
    content_type = served_type(record, signed_path)
    spans = None
    if ranges_on(app) and range_applies(headers.get("if-range"), etag, mtime):
        spans = parse_ranges(headers.get("range"), size)  # If-Range gates single and multiple ranges alike
    status, framing, body = _body_for(spans, size, content_type)
    filename = signed_path.rsplit("/", 1)[-1]
    common += [*framing, ("Content-Disposition", content_disposition(filename, content_type))]
    if reader is not None:
        _send_decrypted(app, ex, signed_path, status, common, reader, body)
    elif body.framed or read is not None:
        if read is None:
            read = partial(_slices, memoryview(data)) if data is not None else partial(_pread_blocks, fd, base=base)
        ex.send_stream(status, common, body.length, body.pieces(read))
    else:
        first, last = body.spans[0] if body.spans else (0, -1)
        if data is not None:
            ex.send(status, common, data[first:last + 1] if status == 206 else data)
        else:
            assert fd is not None
            ex.send_file(status, common, fd, base + first, last - first + 1)


def served_type(record: FileRecord, signed_path: str) -> str:
    """The Content-Type sent: the row's, re-checked on the way out (a row written by an older
    version may hold anything), else by extension; text gets its charset."""
    content_type = clean_content_type(record.content_type) or guess_type(signed_path)
    if content_type.startswith("text/") and "charset" not in content_type:
        content_type += "; charset=utf-8"
    return content_type


class Body(NamedTuple):
    """What a GET sends: spans of the file, each after its part head, then a trailer. The whole
    file or one range is a single span with no framing; several ranges make a multipart body."""

    spans: list[tuple[int, int]]
    heads: list[bytes]
    trailer: bytes = b""

    @property
    def framed(self) -> bool:
        return bool(self.trailer)

    @property
    def length(self) -> int:
        """Known before a byte is read: every response here carries Content-Length."""
        spanned = sum(last - first + 1 for first, last in self.spans)
        return sum(map(len, self.heads)) + spanned + len(self.trailer)

    def pieces(self, read: Callable[[int, int], Generator[memoryview, None, None]]) -> Iterator[memoryview]:
        """The body, span by span from `read(first, last)` (which yields at least one piece). A
        span's first piece is read before its head is yielded, so a file that fails at its first
        byte is still a clean error response rather than a cut one."""
        for head, (first, last) in zip(self.heads, self.spans):
            data = read(first, last)
            try:
                piece = next(data)
                if head:
                    yield memoryview(head)
                yield piece
                yield from data
            finally:
                data.close()  # ends a read in flight (encrypted) before the caller closes the fd
        if self.trailer:
            yield memoryview(self.trailer)


def single(spans: list[tuple[int, int]]) -> Body:
    """Zero or one span sent as it is."""
    return Body(spans, [b""] * len(spans))


def multipart(spans: list[tuple[int, int]], size: int, content_type: str, boundary: str) -> Body:
    """RFC 9110 14.6 framing: `--boundary`, the part's Content-Type and Content-Range, a blank
    line, the bytes; the CRLF after a part's bytes begins the next delimiter (RFC 2046 5.1.1)."""
    heads = [(("\r\n" if k else "") + f"--{boundary}\r\nContent-Type: {content_type}\r\n"
              f"Content-Range: bytes {first}-{last}/{size}\r\n\r\n").encode("latin-1")
             for k, (first, last) in enumerate(spans)]
    return Body(spans, heads, f"\r\n--{boundary}--\r\n".encode("latin-1"))


def _body_for(spans: Optional[list[tuple[int, int]]], size: int,
              content_type: str) -> tuple[int, list[tuple[str, str]], Body]:
    """Status, the headers that describe the body, and the body, for what `parse_ranges` said.
    The boundary is random (128 bits): an uploader cannot plant it in a file to forge parts."""
    if spans is None:
        return 200, [("Content-Type", content_type)], single([(0, size - 1)] if size else [])
    if len(spans) == 1:
        first, last = spans[0]
        return 206, [("Content-Type", content_type), ("Content-Range", f"bytes {first}-{last}/{size}")], single(spans)
    boundary = secrets.token_hex(16)
    return (206, [("Content-Type", f"multipart/byteranges; boundary={boundary}")],
            multipart(spans, size, content_type, boundary))


def _slices(view: memoryview, first: int, last: int) -> Generator[memoryview, None, None]:
    yield view[first:last + 1]


def _pread_blocks(fd: int, first: int, last: int, base: int = 0) -> Generator[memoryview, None, None]:
    """Bytes first..last of a plain file (starting at `base` in `fd`) in READ_BLOCK reads: memory
    stays bounded per part."""
    offset = first
    while offset <= last:
        chunk = os.pread(fd, min(READ_BLOCK, last + 1 - offset), base + offset)
        if not chunk:
            raise OSError("file shrank while being sent")
        yield memoryview(chunk)
        offset += len(chunk)


def _reader(app: App, signed_path: str, record: FileRecord, fd: Optional[int], st: os.stat_result):
    """The segment reader of an encrypted file whose size (taken from the file's length, so
    not authenticated by itself) agrees with its row; an empty one is authenticated whole."""
    from ..storage.encrypted import CorruptFile, SegmentReader, TamperedError, UnknownKey

    if app.keyring is None:
        log.error("%r is stored encrypted but [encryption] is off: it cannot be served", signed_path)
        raise HTTPError(500, "this file is stored encrypted and encryption is not configured")
    try:
        if record.object_key:  # in the bucket: each segment is a ranged GET
            reader = SegmentReader(app.objects.random_access(record.object_key), app.keyring)
        else:
            assert fd is not None
            reader = SegmentReader(fd, app.keyring, st.st_size)
        if reader.plaintext_size != record.size:
            raise CorruptFile(f"holds {reader.plaintext_size} bytes, its metadata says {record.size}")
        if reader.plaintext_size == 0:
            reader.verify_all()  # no segment would be read to send nothing
        return reader
    except TamperedError as e:
        app.metrics.tampered.inc()
        log.error("%r failed authentication (%s): refused", signed_path, e)
        raise HTTPError(500, "the stored file failed its integrity check") from None
    except UnknownKey as e:
        log.error("%r is encrypted under key %s, which is not in the keyfile", signed_path, e)
        raise HTTPError(500, "this file is encrypted under a key this server does not have") from None
    except CorruptFile as e:
        log.error("%r is not a valid encrypted file: %s", signed_path, e)
        raise HTTPError(500, "the stored file is damaged") from None


def _send_decrypted(app: App, ex: Exchange, signed_path: str, status: int, headers: list[tuple[str, str]],
                    reader, body: Body) -> None:
    """Every span of `body` decrypted segment by segment (the next read ahead), one or several
    ranges alike, while holding one of the bounded decryption slots."""
    from ..storage.encrypted import TamperedError

    def pieces() -> Iterator[memoryview]:
        try:
            yield from body.pieces(reader.iter_range_ahead)
        except TamperedError as e:
            app.metrics.tampered.inc()
            log.error("%r failed authentication (%s): %s", signed_path, e,
                      "download cut" if ex.responded else "refused")
            if ex.responded:
                ex.close_after = True
                raise ConnectionAbortedError("encrypted segment failed authentication") from None
            raise HTTPError(500, "the stored file failed its integrity check") from None

    if not app.decrypt_slots.acquire(timeout=DECRYPT_WAIT):  # two segment buffers per stream
        raise HTTPError(503, "too many encrypted downloads at once", {"Retry-After": "5"})
    stream = pieces()
    try:
        ex.send_stream(status, headers, body.length, stream)
    finally:
        stream.close()  # waits for a segment read in flight: the caller closes the fd next
        app.decrypt_slots.release()
