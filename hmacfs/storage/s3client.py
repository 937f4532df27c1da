"""An S3 client on `http.client`: signed requests, streamed bodies, reused connections.

Strategy: one `_request` signs (storage/sigv4.py), sends and classifies every call; the S3
operations above it are a few lines each, and the XML they read is parsed in storage/s3xml.py.
Connections are kept alive in a small pool (a 4 KiB GET should not pay a TCP or TLS handshake);
one that fails is dropped and the request sent once more on a fresh connection when that is
safe (idempotent and its body can be sent again: never a streamed upload). A GET's body is
handed to the caller as a stream and its connection returns to the pool only when read to the
end. Error bodies keep only Code and Message: S3 echoes the signature in SignatureDoesNotMatch,
and nothing here ever formats a secret or a signature into an exception.

Settings and credentials live in storage/s3config.py (re-exported here), multipart uploads with
bounded memory and concurrency in storage/s3multipart.py.
"""
from __future__ import annotations

import datetime
import hashlib
import http.client
import re
import ssl
import threading
from typing import IO, Any, Callable, Iterator, Mapping, Optional, TypeVar, Union
from urllib.parse import urlsplit

from . import s3xml, sigv4
from .s3config import S3Settings, choose_addressing, resolve_credentials
from .s3xml import ObjectInfo

__all__ = ["ObjectInfo", "S3Client", "S3Error", "S3Object", "S3Settings", "choose_addressing", "resolve_credentials"]

CHUNK = 1 << 20
MAX_COPY = 5 << 30  # the largest single CopyObject S3 accepts; above it, UploadPartCopy
COPY_PART = 512 << 20
_POOL_SIZE = 8
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AccessDenied",
                     "Forbidden"}  # Forbidden: a 403 without a body (HEAD), most often the credentials
_HEX64 = re.compile(r"\b[0-9a-f]{64}\b")
T = TypeVar("T")
Body = Union[bytes, bytearray, memoryview, IO[bytes]]


class S3Error(Exception):
    """A refused or failed S3 call: HTTP status (0 when no answer), S3 error Code and Message,
    and which operation on which key of which bucket at which endpoint."""

    def __init__(self, status: int, code: str, message: str, *, operation: str, key: Optional[str] = None,
                 endpoint: str = "", bucket: str = "") -> None:
        self.status, self.code, self.message = status, code, message
        self.operation, self.key, self.endpoint, self.bucket = operation, key, endpoint, bucket
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = f"{self.bucket}/{self.key}" if self.key is not None else self.bucket
        text = f"S3 {self.operation} {where} at {self.endpoint}: HTTP {self.status} {self.code}"
        if self.message:
            text += f": {self.message}"
        if self.code in _CREDENTIAL_CODES:
            text += " (the S3 server refused the credentials: check the access key, secret key and region)"
        return text


class S3Object:
    """The streamed body of a GET: `.status` (200 or 206), `.size` (the whole object's size),
    `.content_length` (bytes in this response), `.headers`; read with `readinto`/`read`, then
    `close()` (the connection is reused only when the body was read to its end)."""

    def __init__(self, client: S3Client, conn: http.client.HTTPConnection, response: http.client.HTTPResponse):
        self._client, self._conn, self._response = client, conn, response
        self.status = response.status
        self.headers = {k.lower(): v for k, v in response.getheaders()}
        self.content_length = client._read(s3xml.length, self.headers.get("content-length", "0"), "GetObject", None)
        self.size = self.content_length
        span = self.headers.get("content-range", "")
        if self.status == 206 and "/" in span and span.rsplit("/", 1)[1].strip().isdigit():
            self.size = int(span.rsplit("/", 1)[1])
        self.etag = self.headers.get("etag", "")
        self.content_type = self.headers.get("content-type")
        self._left = self.content_length

    def readinto(self, buffer: memoryview) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[: self._left]
        n = self._response.readinto(view)
        if n == 0:
            raise ConnectionError(f"S3 GET body ended {self._left} bytes early")
        self._left -= n
        return n

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._left
        data = self._response.read(min(n, self._left)) if self._left > 0 else b""
        self._left -= len(data)
        return data

    def close(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        if self._left == 0 and not self._response.will_close:
            self._response.read()
            self._client._release(conn)
        else:
            conn.close()

    def __enter__(self) -> S3Object:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class S3Client:
    """Object operations on one bucket (see the module docstring)."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        parts = urlsplit(settings.endpoint)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        default_port = parts.port is None or parts.port == (443 if self._https else 80)
        host_port = self._host if default_port else f"{self._host}:{self._port}"
        if ":" in self._host:  # IPv6 literal
            host_port = f"[{self._host}]" if default_port else f"[{self._host}]:{self._port}"
        self.addressing = choose_addressing(self._host, settings.bucket, settings.addressing)
        if self.addressing == "virtual":
            self._connect_host, self._http_host = f"{settings.bucket}.{self._host}", f"{settings.bucket}.{host_port}"
            self._prefix = ""
        else:
            self._connect_host, self._http_host = self._host, host_port
            self._prefix = "/" + sigv4.uri_encode(settings.bucket)
        self._ssl = None
        if self._https:
            self._ssl = ssl.create_default_context(cafile=settings.ca_file)
        self._pool: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    # -- connections ---------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        timeout = self.settings.timeout
        if self._https:
            return http.client.HTTPSConnection(self._connect_host, self._port, timeout=timeout, context=self._ssl)
        return http.client.HTTPConnection(self._connect_host, self._port, timeout=timeout)

    def _acquire(self) -> http.client.HTTPConnection:
        with self._lock:
            if self._pool:
                return self._pool.pop()
        return self._connect()

    def _release(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._pool) < _POOL_SIZE:
                self._pool.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the idle connections (open GET streams close their own)."""
        with self._lock:
            idle, self._pool = self._pool, []
        for conn in idle:
            conn.close()

    # -- one signed request --------------------------------------------------------------------

    def _path(self, key: Optional[str]) -> str:
        if key is None:
            return self._prefix or "/"
        return f"{self._prefix}/{sigv4.uri_encode(key, keep_slash=True)}"

    def _read(self, parse: Callable[[Any], T], raw: Any, operation: str, key: Optional[str]) -> T:
        """`parse(raw)`, an answer read; one no S3 server should give is an S3Error (502), never a
        ValueError or an XML ParseError that the layers above would not expect."""
        try:
            return parse(raw)
        except s3xml.MalformedReply as e:
            raise self._error(502, "MalformedReply", str(e), operation, key) from None

    def _error(self, status: int, code: str, message: str, operation: str, key: Optional[str]) -> S3Error:
        secret = self.settings.secret_key
        if secret and secret in message:
            message = message.replace(secret, "[secret]")
        message = _HEX64.sub("[hex]", message)
        return S3Error(status, code, message, operation=operation, key=key,
                       endpoint=self.settings.endpoint, bucket=self.settings.bucket)

    def prepare(self, method: str, key: Optional[str], query: list[tuple[str, str]], headers: Mapping[str, str],
                payload_hash: str, now: Optional[datetime.datetime] = None) -> tuple[str, dict[str, str]]:
        """(request target, headers to send) for one request on `key` (None: the bucket):
        Host, the caller's headers, X-Amz-* and Authorization. Sends nothing."""
        s = self.settings
        path = self._path(key)
        target = path + ("?" + sigv4.canonical_query(query) if query else "")
        added = sigv4.sign_headers(method, self._http_host, path, query, headers, payload_hash,
                                   access_key=s.access_key, secret_key=s.secret_key, region=s.region,
                                   session_token=s.session_token, now=now)
        return target, {"Host": self._http_host, **headers, **added}

    @property
    def base_url(self) -> str:
        """`scheme://host[:port]` as requests go out (with the bucket in the host when virtual)."""
        return f"{'https' if self._https else 'http'}://{self._http_host}"

    def _request(self, method: str, key: Optional[str], operation: str, *, query: Optional[list] = None,
                 headers: Optional[dict[str, str]] = None, body: Optional[Body] = None, length: Optional[int] = None,
                 stream: bool = False, ok: tuple[int, ...] = (200,)):
        """Send one request; return (status, headers, body bytes), or an S3Object when `stream`.
        Raises S3Error for a status not in `ok` or for a connection failure."""
        query = list(query or [])
        headers = dict(headers or {})
        streamed = body is not None and not isinstance(body, (bytes, bytearray, memoryview))
        if streamed:
            payload_hash, size = sigv4.UNSIGNED_PAYLOAD, length
        else:  # bytes-like bodies go out as they are: a 5 MiB part is never copied
            data = body
            payload_hash = hashlib.sha256(b"" if data is None else data).hexdigest()
            size = 0 if data is None else memoryview(data).nbytes
        target, all_headers = self.prepare(method, key, query, headers, payload_hash)
        if body is not None or method in ("PUT", "POST"):  # not signed, as botocore does not
            all_headers["Content-Length"] = str(size)
        retryable = not streamed and method in ("GET", "HEAD", "PUT", "DELETE")
        for attempt in (0, 1):
            # A request that must not be sent twice starts on a fresh connection, so a pooled one
            # the server has closed meanwhile cannot fail it half-way.
            conn = self._acquire() if retryable else self._connect()
            try:
                if streamed:
                    self._send_stream(conn, method, target, all_headers, body, length)
                else:
                    conn.request(method, target, body=data, headers=all_headers)
                response = conn.getresponse()
            except _ShortBody as exc:  # our side's fault: the server is still waiting, do not ask it
                conn.close()
                raise self._error(0, "IncompleteBody", str(exc), operation, key) from None
            except (OSError, http.client.HTTPException) as exc:
                # S3 may refuse an upload (bad signature, no such bucket) and close before taking
                # the whole body: its answer, if it arrived, says more than the broken pipe.
                response = _early_answer(conn) if streamed and isinstance(exc, OSError) else None
                if response is None:
                    conn.close()
                    if attempt == 0 and retryable:
                        continue
                    raise self._error(0, exc.__class__.__name__, str(exc), operation, key) from None
            break
        if response.status not in ok:
            raw = response.read(1 << 16) if method != "HEAD" else b""
            conn.close()
            parsed = s3xml.parse_error(raw) if raw else None
            code, message = parsed or (_status_code(response.status, key), response.reason)
            region = response.getheader("x-amz-bucket-region")
            if region and region != self.settings.region:
                message += f" (the bucket is in region {region}, not {self.settings.region})"
            raise self._error(response.status, code, message, operation, key)
        if stream:
            try:
                return S3Object(self, conn, response)
            except S3Error:  # an unreadable Content-Length: this connection cannot be reused
                conn.close()
                raise
        raw = response.read()
        resp_headers = {k.lower(): v for k, v in response.getheaders()}
        if response.will_close:
            conn.close()
        else:
            self._release(conn)
        return response.status, resp_headers, raw

    @staticmethod
    def _send_stream(conn: http.client.HTTPConnection, method: str, target: str, headers: dict[str, str],
                     body: IO[bytes], length: Optional[int]) -> None:
        if length is None or length < 0:
            raise ValueError("a streamed body needs its length")
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        buffer = bytearray(min(CHUNK, max(length, 1)))
        view = memoryview(buffer)
        left = length
        while left > 0:
            n = body.readinto(view[: min(left, len(buffer))]) if hasattr(body, "readinto") else None
            if n is None:
                chunk = body.read(min(left, CHUNK))
                n = len(chunk)
                view[:n] = chunk
            if not n:
                raise _ShortBody(f"the body ended {left} bytes before its declared length {length}")
            conn.send(view[:n])
            left -= n

    def _check_body_error(self, raw: bytes, operation: str, key: Optional[str]) -> None:
        """CompleteMultipartUpload and CopyObject may fail with 200 and an <Error> body."""
        parsed = s3xml.parse_error(raw)
        if parsed:
            raise self._error(200, parsed[0], parsed[1], operation, key)

    # -- operations ----------------------------------------------------------------------------

    def put_object(self, key: str, body: Body, length: int, content_type: Optional[str] = None) -> str:
        """Store `length` bytes under `key` in one PUT; returns the ETag. Bytes in memory are
        signed with their SHA-256; a file object is streamed in 1 MiB reads as UNSIGNED-PAYLOAD."""
        headers = {"Content-Type": content_type} if content_type else {}
        if isinstance(body, (bytes, bytearray, memoryview)) and len(body) != length:
            raise ValueError(f"body has {len(body)} bytes, length says {length}")
        _, resp, _ = self._request("PUT", key, "PutObject", headers=headers, body=body, length=length)
        return resp.get("etag", "")

    def create_multipart(self, key: str, content_type: Optional[str] = None) -> str:
        headers = {"Content-Type": content_type} if content_type else {}
        _, _, raw = self._request("POST", key, "CreateMultipartUpload", query=[("uploads", "")], headers=headers)
        return self._read(s3xml.parse_upload_id, raw, "CreateMultipartUpload", key)

    def upload_part(self, key: str, upload_id: str, number: int, data: Union[bytes, bytearray, memoryview]) -> str:
        query = [("partNumber", str(number)), ("uploadId", upload_id)]
        _, resp, _ = self._request("PUT", key, "UploadPart", query=query, body=data)
        return resp.get("etag", "")

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> str:
        body = s3xml.complete_body(parts)
        _, _, raw = self._request("POST", key, "CompleteMultipartUpload", query=[("uploadId", upload_id)], body=body)
        self._check_body_error(raw, "CompleteMultipartUpload", key)
        return self._read(s3xml.parse_etag_result, raw, "CompleteMultipartUpload", key)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Abort; an upload already gone (NoSuchUpload) counts as aborted."""
        try:
            self._request("DELETE", key, "AbortMultipartUpload", query=[("uploadId", upload_id)], ok=(200, 204))
        except S3Error as exc:
            if exc.code != "NoSuchUpload":
                raise

    def list_multipart_uploads(self, prefix: str = "") -> list[tuple[str, str, float]]:
        """[(key, upload id, initiated Unix time)] of the unfinished multipart uploads under prefix."""
        found: list[tuple[str, str, float]] = []
        markers: Optional[tuple[str, str]] = None
        while True:
            query = [("uploads", ""), ("prefix", prefix)]
            if markers:
                query += [("key-marker", markers[0]), ("upload-id-marker", markers[1])]
            _, _, raw = self._request("GET", None, "ListMultipartUploads", query=query)
            uploads, markers = self._read(s3xml.parse_list_uploads, raw, "ListMultipartUploads", None)
            found.extend(uploads)
            if not markers:
                return found

    def head_object(self, key: str) -> Optional[ObjectInfo]:
        """Size, ETag, type and mtime of `key`, or None when there is no such object."""
        try:
            _, resp, _ = self._request("HEAD", key, "HeadObject")
        except S3Error as exc:
            if exc.status == 404:
                return None
            raise
        size = self._read(s3xml.length, resp.get("content-length", "0"), "HeadObject", key)
        return ObjectInfo(key=key, size=size, etag=resp.get("etag", ""),
                          last_modified=s3xml.http_time(resp.get("last-modified", "")),
                          content_type=resp.get("content-type"))

    def get_object(self, key: str, start: Optional[int] = None, end: Optional[int] = None) -> S3Object:
        """Stream `key`, or the inclusive byte range start..end with 206 passthrough (end None:
        to the end; start None: the last `end` bytes, HTTP's suffix range).
        S3Error: 404 NoSuchKey, 416 InvalidRange."""
        headers = {}
        if start is not None or end is not None:
            headers["Range"] = f"bytes={'' if start is None else start}-{'' if end is None else end}"
        return self._request("GET", key, "GetObject", headers=headers, stream=True, ok=(200, 206))

    def delete_object(self, key: str) -> None:
        """Delete `key` (S3 answers 204 whether or not it existed)."""
        self._request("DELETE", key, "DeleteObject", ok=(200, 204))

    def copy_object(self, src_key: str, dst_key: str, *, max_single: int = MAX_COPY, part_size: int = COPY_PART) -> str:
        """Server-side copy; returns the new ETag. Up to `max_single` bytes (5 GiB, S3's limit)
        one CopyObject; above, a multipart upload of UploadPartCopy ranges of `part_size`."""
        source = f"{sigv4.uri_encode(self.settings.bucket)}/{sigv4.uri_encode(src_key, keep_slash=True)}"
        info = self.head_object(src_key)
        if info is None:
            raise self._error(404, "NoSuchKey", "the copy source does not exist", "CopyObject", src_key)
        if info.size <= max_single:
            _, _, raw = self._request("PUT", dst_key, "CopyObject", headers={"x-amz-copy-source": source})
            self._check_body_error(raw, "CopyObject", dst_key)
            return self._read(s3xml.parse_etag_result, raw, "CopyObject", dst_key)
        upload_id = self.create_multipart(dst_key, info.content_type)
        try:
            parts = []
            for number, offset in enumerate(range(0, info.size, part_size), start=1):
                last = min(offset + part_size, info.size) - 1
                query = [("partNumber", str(number)), ("uploadId", upload_id)]
                headers = {"x-amz-copy-source": source, "x-amz-copy-source-range": f"bytes={offset}-{last}"}
                _, _, raw = self._request("PUT", dst_key, "UploadPartCopy", query=query, headers=headers)
                self._check_body_error(raw, "UploadPartCopy", dst_key)
                parts.append((number, self._read(s3xml.parse_etag_result, raw, "UploadPartCopy", dst_key)))
            return self.complete_multipart(dst_key, upload_id, parts)
        except BaseException:
            self.abort_multipart(dst_key, upload_id)
            raise

    def list_objects(self, prefix: str = "", start_after: Optional[str] = None,
                     page_size: int = 1000) -> Iterator[ObjectInfo]:
        """Every object under `prefix` (after `start_after`), key order, ListObjectsV2 pages."""
        token: Optional[str] = None
        while True:
            query = [("list-type", "2"), ("prefix", prefix), ("max-keys", str(page_size)), ("encoding-type", "url")]
            if token:
                query.append(("continuation-token", token))
            elif start_after:
                query.append(("start-after", start_after))
            _, _, raw = self._request("GET", None, "ListObjectsV2", query=query)
            objects, token = self._read(s3xml.parse_list_objects, raw, "ListObjectsV2", None)
            yield from objects
            if not token:
                return

    def presign_get(self, key: str, expires_in: int, response_content_type: Optional[str] = None,
                    response_content_disposition: Optional[str] = None,
                    now: Optional[datetime.datetime] = None) -> str:
        """A URL that GETs `key` for `expires_in` seconds without credentials, optionally making
        S3 answer with the given Content-Type / Content-Disposition."""
        s = self.settings
        query = []
        if response_content_type:
            query.append(("response-content-type", response_content_type))
        if response_content_disposition:
            query.append(("response-content-disposition", response_content_disposition))
        path = self._path(key)
        signed = sigv4.presign_query("GET", self._http_host, path, query, expires_in, access_key=s.access_key,
                                     secret_key=s.secret_key, region=s.region, session_token=s.session_token, now=now)
        return f"{self.base_url}{path}?{signed}"

    def check_bucket(self) -> None:
        """HEAD the bucket; S3Error with a clear message when it is missing or refused. A HEAD
        answer has no body, so on a refusal one ListObjectsV2 asks for the S3 error code."""
        try:
            self._request("HEAD", None, "HeadBucket")
        except S3Error as exc:
            if exc.status == 404:
                raise self._error(404, "NoSuchBucket", "the bucket does not exist", "HeadBucket", None) from None
            if exc.status in (400, 403):
                self._request("GET", None, "ListObjectsV2", query=[("list-type", "2"), ("max-keys", "1")])
            raise


class _ShortBody(Exception):
    """A streamed body gave fewer bytes than announced."""


def _early_answer(conn: http.client.HTTPConnection) -> Optional[http.client.HTTPResponse]:
    """The response a server sent before it stopped reading our body, if any."""
    try:
        response = conn.getresponse()
    except (OSError, http.client.HTTPException):
        return None
    return response if response.status >= 300 else None


def _status_code(status: int, key: Optional[str]) -> str:
    """A Code for an answer without a body (HEAD)."""
    return {404: "NoSuchKey" if key is not None else "NoSuchBucket", 403: "Forbidden", 416: "InvalidRange",
            400: "BadRequest"}.get(status, f"HTTP{status}")

