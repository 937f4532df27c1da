"""AWS Signature Version 4, as pure functions over str/bytes (no sockets, no clock unless asked).

Strategy: each step of the published algorithm is one function (canonical URI, query, headers,
canonical request, string to sign, signing key, signature), so every intermediate can be checked
against AWS's test-suite files (`.creq`, `.sts`, `.authz`) and against botocore's signer; two
thin compositions on top sign a request's headers (`sign_headers`) or build a presigned URL's
query (`presign_query`). Standard library `hmac`/`hashlib` only.

Two URI rules exist and both are supported (AWS General Reference, "Create a canonical
request"): S3 encodes the object key once and never normalises it (a key may hold `//` or
`..`), so the canonical URI equals the path on the wire; every other service normalises the
path and encodes the wire path once more ("double encoding"), which is what the generic
`aws-sig-v4-test-suite` vectors expect.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import posixpath
from typing import Iterable, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
Pairs = Iterable[Tuple[str, str]]
HeadersIn = Union[Mapping[str, str], Pairs]


def amz_date(when: datetime.datetime) -> str:
    """`YYYYMMDDTHHMMSSZ` in UTC: the X-Amz-Date form; its first 8 characters date the scope."""
    if when.tzinfo is not None:
        when = when.astimezone(datetime.timezone.utc)
    return when.strftime("%Y%m%dT%H%M%SZ")


def _utcnow() -> datetime.datetime:
    """The signing clock (one place, so tests can fix it)."""
    return datetime.datetime.now(datetime.timezone.utc)


def uri_encode(text: str, keep_slash: bool = False) -> str:
    """RFC 3986 percent-encoding of UTF-8 with upper-case hex: only `A-Za-z0-9-_.~` stay (and `/`
    when asked, for paths). `urllib.parse.quote` keeps exactly that unreserved set (Python 3.7+)."""
    return quote(text, safe="/" if keep_slash else "")


def _normalize_path(path: str) -> str:
    """Generic-service path normalisation (RFC 3986 section 5.2.4 dot segments, repeated slashes
    collapsed), keeping a trailing slash; S3 never does this."""
    if not path:
        return "/"
    normal = posixpath.normpath(path)
    normal = "/" + normal.lstrip("/")  # normpath keeps a leading '//' (POSIX), AWS does not
    if path.endswith("/") and not normal.endswith("/"):
        normal += "/"
    return normal


def canonical_uri(path: str, *, double_encode: bool = False, normalize: bool = False) -> str:
    """The CanonicalURI line from `path` as it goes on the wire (percent-encoded, `/` kept).

    S3 style (default, no double encoding): the path is decoded and encoded once again, so the
    result is the wire path in canonical form (`$` -> `%24`, upper-case hex) and a key's own `%`
    stays `%25`, never `%2525`. Generic style (`double_encode=True`): the wire path is encoded
    once more, so a `%` on the wire becomes `%25`, as the generic services and the
    `aws-sig-v4-test-suite` expect. `normalize` removes dot segments and repeated slashes first
    (generic services only: for S3 `a//b` and `..` are parts of a key)."""
    if normalize:
        path = _normalize_path(path)
    if not path.startswith("/"):
        path = "/" + path
    return uri_encode(path if double_encode else unquote(path), keep_slash=True)


def canonical_query(params: Pairs) -> str:
    """The CanonicalQueryString: decoded (name, value) pairs, each encoded (`/` too), sorted by
    encoded name then value; a parameter without a value is `name=`."""
    encoded = sorted((uri_encode(k), uri_encode(v)) for k, v in params)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _pairs(headers: HeadersIn) -> list[tuple[str, str]]:
    return list(headers.items()) if isinstance(headers, Mapping) else list(headers)


def canonical_headers(headers: HeadersIn) -> tuple[str, str]:
    """(CanonicalHeaders, SignedHeaders): names lower-cased and sorted, values trimmed with inner
    runs of whitespace folded to one space, repeated headers joined with `,` in their order."""
    merged: dict[str, list[str]] = {}
    for name, value in _pairs(headers):
        merged.setdefault(name.strip().lower(), []).append(" ".join(str(value).split()))
    names = sorted(merged)
    lines = "".join(f"{name}:{','.join(merged[name])}\n" for name in names)
    return lines, ";".join(names)


def canonical_request(method: str, uri: str, query: str, headers: str, signed: str, payload_hash: str) -> str:
    """Join the six parts; `headers` already ends with a newline, hence the blank line."""
    return f"{method.upper()}\n{uri}\n{query}\n{headers}\n{signed}\n{payload_hash}"


def credential_scope(date: str, region: str, service: str) -> str:
    """`YYYYMMDD/region/service/aws4_request`: binds the key to one day, region and service."""
    return f"{date[:8]}/{region}/{service}/aws4_request"


def string_to_sign(timestamp: str, scope: str, canonical: str) -> str:
    """Algorithm, timestamp, scope and the hex SHA-256 of the canonical request."""
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{timestamp}\n{scope}\n{digest}"


def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    """HMAC chain `AWS4`+secret -> date -> region -> service -> `aws4_request`: the secret itself
    never signs a request, and the derived key is only good for that day/region/service (so it
    is derived once a day, not four HMACs per request)."""
    return _signing_key(secret_key, date[:8], region, service)


@functools.lru_cache(maxsize=16)
def _signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    key = hmac.new(("AWS4" + secret_key).encode("utf-8"), date.encode("utf-8"), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def signature(key: bytes, to_sign: str) -> str:
    """The lower-case hex HMAC-SHA256 of the string to sign under the derived key."""
    return hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def authorization(access_key: str, scope: str, signed: str, sig: str) -> str:
    """The Authorization header value, in the `, `-separated form AWS and botocore emit."""
    return f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={sig}"


def sign_headers(
    method: str,
    host: str,
    path: str,
    query: Pairs,
    headers: HeadersIn,
    payload_hash: str,
    *,
    access_key: str,
    secret_key: str,
    region: str,
    service: str = "s3",
    session_token: Optional[str] = None,
    now: Optional[datetime.datetime] = None,
    content_sha256_header: bool = True,
    double_encode: bool = False,
    normalize: bool = False,
) -> dict[str, str]:
    """Sign a request in the Authorization header; returns the headers to add (`Host` is signed
    but left to the caller to send): `X-Amz-Date`, `X-Amz-Content-SHA256` (S3 requires it),
    `X-Amz-Security-Token` when there is a session token, and `Authorization`. `path` is the
    path as sent (see `canonical_uri`), `query` the decoded parameters, `payload_hash` the
    body's hex SHA-256 or `UNSIGNED-PAYLOAD`; every header given is signed."""
    stamp = amz_date(now or _utcnow())
    added = {"X-Amz-Date": stamp}
    if content_sha256_header:
        added["X-Amz-Content-SHA256"] = payload_hash
    if session_token:
        added["X-Amz-Security-Token"] = session_token
    all_headers = [("host", host), *_pairs(headers), *added.items()]
    lines, signed = canonical_headers(all_headers)
    uri = canonical_uri(path, double_encode=double_encode, normalize=normalize)
    creq = canonical_request(method, uri, canonical_query(query), lines, signed, payload_hash)
    scope = credential_scope(stamp, region, service)
    sig = signature(signing_key(secret_key, stamp, region, service), string_to_sign(stamp, scope, creq))
    added["Authorization"] = authorization(access_key, scope, signed, sig)
    return added


def presign_query(
    method: str,
    host: str,
    path: str,
    query: Pairs,
    expires_in: int,
    *,
    access_key: str,
    secret_key: str,
    region: str,
    service: str = "s3",
    session_token: Optional[str] = None,
    now: Optional[datetime.datetime] = None,
    signed_headers: Sequence[tuple[str, str]] = (),
) -> str:
    """The encoded query string of a presigned URL (AWS S3 API Reference, "Authenticating
    Requests: Using Query Parameters"): the operation's own parameters plus the X-Amz-* ones,
    signed over `UNSIGNED-PAYLOAD` with only `host` (and `signed_headers`) signed; the
    signature comes last. `expires_in` is 1 s .. 7 days, as S3 allows."""
    if not 1 <= expires_in <= 604800:
        raise ValueError("expires_in must be between 1 second and 7 days")
    stamp = amz_date(now or _utcnow())
    scope = credential_scope(stamp, region, service)
    lines, signed = canonical_headers([("host", host), *signed_headers])
    params = [
        *query,
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", f"{access_key}/{scope}"),
        ("X-Amz-Date", stamp),
        ("X-Amz-Expires", str(expires_in)),
        ("X-Amz-SignedHeaders", signed),
    ]
    if session_token:
        params.append(("X-Amz-Security-Token", session_token))
    cquery = canonical_query(params)
    creq = canonical_request(method, canonical_uri(path), cquery, lines, signed, UNSIGNED_PAYLOAD)
    sig = signature(signing_key(secret_key, stamp, region, service), string_to_sign(stamp, scope, creq))
    return f"{cquery}&X-Amz-Signature={sig}"
