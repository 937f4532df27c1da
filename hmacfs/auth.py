"""Signature protocols: pure functions over strings and bytes, no sockets, no files.

Strategy: each protocol is a message builder (what exactly is signed) plus one shared
constant-time check over every configured key (current + previous, for rotation). The
`authorize_*` functions turn a request's facts into a grant or an `HTTPError`; the
handlers never look at MACs themselves. Message formats are those of the peers, see
shared/spec/protocol.md: Prosody mod_http_upload_external (v, v2), Metronome (token),
hmac-file-server 3.x (v3 + expires) and Prosody 0.12 mod_http_file_share (JWT HS256).
There are no fallback forms: a message without the size or the expiry does not verify.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .digits import parse_decimal
from .errors import HTTPError

DEFAULT_CONTENT_TYPE = "application/octet-stream"
QUERY_PROTOCOLS = ("v3", "v2", "token", "v")  # highest first: when several are given, it wins
MAX_EXPIRES_DIGITS = 12  # unix seconds: 10 digits until the year 2286


def mac_hex(key: bytes, message: bytes) -> str:
    """Lowercase hex HMAC-SHA256."""
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def message_v(path: str, size: int) -> bytes:
    """Prosody mod_http_upload_external v1 / ejabberd: `path + " " + size`."""
    return f"{path} {size}".encode()


def message_v2(path: str, size: int, content_type: str) -> bytes:
    """Prosody v2 and Metronome `token`: `path NUL size NUL content_type`."""
    return f"{path}\0{size}\0{content_type}".encode()


def message_v3(method: str, expires: int, full_path: str) -> bytes:
    """hmac-file-server 3.x v3: `METHOD LF expires LF /full/url/path` (prefix included)."""
    return f"{method}\n{expires}\n{full_path}".encode()


def message_delete_token(path: str, delete_secret: str) -> bytes:
    """Metronome's delete token: `path NUL deletesecret`."""
    return f"{path}\0{delete_secret}".encode()


def _any_key_signs(keys: Sequence[bytes], message: bytes, candidate: bytes, as_hex: bool) -> bool:
    """Constant-time check of `candidate` against the MAC under every key, without short-circuit,
    so timing says nothing about which key (if any) matched."""
    ok = False
    for key in keys:
        mac = hmac.new(key, message, hashlib.sha256)
        ok |= hmac.compare_digest(mac.hexdigest().encode() if as_hex else mac.digest(), candidate)
    return ok


def verify_mac(keys: Sequence[bytes], message: bytes, given: str) -> bool:
    """True if `given` (hex, any case) is the MAC of `message` under any key."""
    return _any_key_signs(keys, message, given.strip().lower().encode("ascii", "replace"), as_hex=True)


# --- JWT (HS256), as Prosody's util/jwt signs it -------------------------------------------------

MAX_TOKEN_BYTES = 8192
MAX_CLAIM_DIGITS = 18
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    """Decode unpadded base64url (the caller has checked the alphabet)."""
    if len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_CLAIM_DIGITS:
        raise ValueError("number too long")
    return int(digits)


def _bounded_float(text: str) -> float:
    value = float(text) if len(text) <= 2 * MAX_CLAIM_DIGITS else math.inf
    if not math.isfinite(value) or abs(value) >= 10.0 ** MAX_CLAIM_DIGITS:
        raise ValueError("number out of range")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _json_object(segment: str) -> dict:
    """A base64url JSON object with bounded numbers; ValueError for anything else."""
    try:
        value = json.loads(_unb64url(segment), parse_int=_bounded_int, parse_float=_bounded_float,
                           parse_constant=_no_constant)
    except (binascii.Error, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(str(e)) from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def jwt_encode(key: bytes, claims: Mapping[str, object]) -> str:
    """An HS256 JWT with the header Prosody uses."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    return f"{header}.{payload}.{_b64url(hmac.new(key, signing_input, hashlib.sha256).digest())}"


def jwt_decode(keys: Sequence[bytes], token: str) -> dict:
    """Verify an HS256 JWT against any key and return its claims; HTTPError 401 otherwise.

    Nothing in the token is parsed before its MAC verifies: the shape (three base64url
    segments, bounded length, ASCII only) is checked, then the HMAC-SHA256 over
    `header.payload`, and only then the header (`alg` must be HS256; `none` and every
    other algorithm are refused) and the claims (numbers bounded, no NaN/Infinity).
    """
    bearer = {"WWW-Authenticate": "Bearer"}
    token = token.strip()
    if len(token) > MAX_TOKEN_BYTES or not _JWT_SHAPE.fullmatch(token):
        raise HTTPError(401, "malformed bearer token", bearer)
    header_b64, payload_b64, signature_b64 = token.split(".")
    try:
        signature = _unb64url(signature_b64)
    except (ValueError, binascii.Error):
        raise HTTPError(401, "malformed bearer token", bearer) from None
    if _b64url(signature) != signature_b64:  # unused trailing bits set: one signature, one spelling
        raise HTTPError(401, "malformed bearer token", bearer)
    if not _any_key_signs(keys, f"{header_b64}.{payload_b64}".encode("ascii"), signature, as_hex=False):
        raise HTTPError(401, "bearer token signature mismatch", bearer)
    try:
        header = _json_object(header_b64)
        claims = _json_object(payload_b64)
    except ValueError:
        raise HTTPError(401, "malformed bearer token", bearer) from None
    if header.get("alg") != "HS256":
        raise HTTPError(401, "bearer token algorithm must be HS256", bearer)
    return claims


# --- Decisions ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class UploadGrant:
    """What a verified PUT may do: which protocol allowed it and what it bound."""

    protocol: str
    size: Optional[int] = None          # the signed size, when the protocol binds one
    content_type: Optional[str] = None  # the signed type (v2/token/JWT), else None
    file_expires: Optional[int] = None  # JWT `expires` claim: the file's own lifetime
    uploader: Optional[str] = None      # JWT `sub`

    def check_final_size(self, actual: int) -> None:
        """After the body (chunked bodies are counted as they arrive): it must have the signed size."""
        if self.size is not None and actual != self.size:
            raise HTTPError(413, f"body has {actual} bytes, the signed size is {self.size}")


@dataclass(frozen=True)
class RequestFacts:
    """What the auth decision needs from a request (already parsed and decoded)."""

    method: str
    signed_path: str            # decoded, prefix removed, no leading slash
    full_path: str              # decoded, with leading slash and prefix
    query: Mapping[str, str]
    authorization: str = ""
    content_type: Optional[str] = None
    content_length: Optional[int] = None  # None for a chunked body


def _v3(keys: Sequence[bytes], facts: RequestFacts, now: float, methods: Sequence[str]) -> None:
    expires = parse_decimal(facts.query.get("expires", ""), MAX_EXPIRES_DIGITS)
    if expires is None:
        raise HTTPError(403, "v3 needs an integer 'expires' parameter (unix seconds)")
    given = facts.query["v3"]
    if not any(verify_mac(keys, message_v3(m, expires, facts.full_path), given) for m in methods):
        raise HTTPError(403, "signature mismatch")
    if expires < now:
        raise HTTPError(410, "signed URL has expired")


def authorize_upload(keys: Sequence[bytes], jwt_keys: Sequence[bytes], facts: RequestFacts,
                     now: float) -> UploadGrant:
    """Decide a PUT (or tus creation) from its signature; HTTPError 400/401/403/410/413 otherwise."""
    protocol = next((p for p in QUERY_PROTOCOLS if p in facts.query), None)
    if protocol is None:
        scheme, _, token = facts.authorization.partition(" ")
        if scheme.lower() == "bearer":
            return _authorize_jwt(jwt_keys, facts, token, now)
        raise HTTPError(403, "no signature (expected v, v2, token, v3 or a bearer token)")
    if protocol == "v3":
        _v3(keys, facts, now, (facts.method,))
        return UploadGrant("v3")
    given = facts.query[protocol]
    ctype = facts.content_type or DEFAULT_CONTENT_TYPE
    if facts.content_length is None:
        # Their MAC binds a length known only once a chunked body has ended: accepting the
        # body first would be an unauthenticated write. Refused before any body byte.
        raise HTTPError(411, f"'{protocol}' signs the body length: send Content-Length "
                             "(chunked bodies need v3 or a bearer token)")
    size = facts.content_length
    message = message_v(facts.signed_path, size) if protocol == "v" else message_v2(facts.signed_path, size, ctype)
    if not verify_mac(keys, message, given):
        raise HTTPError(403, "signature mismatch")
    return UploadGrant(protocol, size=size, content_type=ctype if protocol != "v" else None)


def _authorize_jwt(keys: Sequence[bytes], facts: RequestFacts, token: str, now: float) -> UploadGrant:
    claims = jwt_decode(keys, token)
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise HTTPError(401, "bearer token has no 'exp' claim", {"WWW-Authenticate": "Bearer"})
    if exp < now:
        raise HTTPError(410, "bearer token has expired")
    slot, _, rest = facts.signed_path.partition("/")
    if not isinstance(claims.get("slot"), str) or claims["slot"] != slot:
        raise HTTPError(400, "URL path does not match the token's slot")
    filename = claims.get("filename")
    if isinstance(filename, str) and rest != filename:
        raise HTTPError(400, "URL path does not match the token's filename")
    size = claims.get("filesize")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise HTTPError(401, "bearer token has no valid 'filesize' claim", {"WWW-Authenticate": "Bearer"})
    if facts.content_length is not None and facts.content_length != size:
        raise HTTPError(413, f"Content-Length {facts.content_length} differs from the signed size {size}")
    expires = claims.get("expires")
    file_expires = int(expires) if isinstance(expires, (int, float)) and not isinstance(expires, bool) else None
    ctype = claims.get("filetype") if isinstance(claims.get("filetype"), str) else None
    sub = claims.get("sub") if isinstance(claims.get("sub"), str) else None
    return UploadGrant("jwt", size=size, content_type=ctype, file_expires=file_expires, uploader=sub)


def authorize_download(keys: Sequence[bytes], facts: RequestFacts, now: float) -> None:
    """GET/HEAD under `requiresignature`: a v3 signature for GET (HEAD also accepts its own)."""
    if "v3" not in facts.query:
        raise HTTPError(403, "this server requires a v3 signature for downloads")
    _v3(keys, facts, now, ("GET", "HEAD") if facts.method == "HEAD" else ("GET",))


def authorize_delete(keys: Sequence[bytes], delete_secret: str, facts: RequestFacts, now: float) -> str:
    """DELETE: v3 (method DELETE) or Metronome's delete token; returns the protocol used."""
    if "v3" in facts.query:
        _v3(keys, facts, now, ("DELETE",))
        return "v3"
    given = facts.query.get("token")
    if given is not None and delete_secret:
        if verify_mac(keys, message_delete_token(facts.signed_path, delete_secret), given):
            return "token"
        raise HTTPError(403, "signature mismatch")
    raise HTTPError(403, "no delete signature (expected v3 or a delete token)")


# --- Minting (the `sign` CLI verb and tests) ----------------------------------------------------

def sign_query(protocol: str, key: bytes, *, method: str, signed_path: str, full_path: str,
               size: Optional[int] = None, content_type: str = DEFAULT_CONTENT_TYPE,
               expires: Optional[int] = None, delete_secret: str = "") -> dict[str, str]:
    """Query parameters that make a request verify under `protocol`."""
    if protocol == "v3":
        if expires is None:
            raise ValueError("v3 needs an expiry time")
        return {"v3": mac_hex(key, message_v3(method, expires, full_path)), "expires": str(expires)}
    if method == "DELETE":
        if protocol != "token" or not delete_secret:
            raise ValueError("a signed DELETE needs v3, or token with a deletesecret")
        return {"token": mac_hex(key, message_delete_token(signed_path, delete_secret))}
    if size is None:
        raise ValueError(f"{protocol} signs the upload size: give it")
    if protocol == "v":
        return {"v": mac_hex(key, message_v(signed_path, size))}
    if protocol in ("v2", "token"):
        return {protocol: mac_hex(key, message_v2(signed_path, size, content_type))}
    raise ValueError(f"unknown protocol {protocol!r}")
