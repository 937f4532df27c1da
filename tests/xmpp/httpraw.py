"""HTTP helpers that send a URL byte for byte, plus the signatures XMPP servers compute.

Strategy: aiohttp (slixmpp's uploader) and urllib re-encode URLs; http.client sends the
request target as given, which is what proves hmacfs decodes Prosody's lowercase escapes.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import random
import ssl
import struct
import urllib.parse
import zlib
from dataclasses import dataclass
from typing import Optional


@dataclass
class Reply:
    """An HTTP response read in full."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes


def request(method: str, url: str, body: Optional[bytes] = None, headers: Optional[dict[str, str]] = None,
            timeout: float = 20.0, context: Optional[ssl.SSLContext] = None,
            source_address: Optional[tuple[str, int]] = None) -> Reply:
    """Send `method url` with the URL's path and query exactly as written (no re-encoding)."""
    parts = urllib.parse.urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=context, source_address=source_address)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout,
                                          source_address=source_address)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        given = {k.lower() for k in (headers or {})}
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None and "content-length" not in given:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body:
            # the server may answer (413, 403) before reading the body: go on and read its reply
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.send(body)
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def mac(secret: str, message: str) -> str:
    """HMAC-SHA256 hex, as Prosody, ejabberd and Metronome sign slots."""
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def prosody_quote(text: str) -> str:
    """Prosody's util.http.urlencode: everything but [A-Za-z0-9.~_-] as %xx with lowercase hex."""
    return "".join(chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) in ".~_-") else f"%{b:02x}"
                   for b in text.encode())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_hs256(secret: str, claims: dict) -> str:
    """A JWT as Prosody's util.jwt signs it (HS256, compact JSON)."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url(sig)}"


def jwt_claims(token: str) -> dict:
    """The (unverified) claims of a JWT, to read what the XMPP server put in a slot."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def png(width: int = 96, height: int = 64, seed: int = 363) -> bytes:
    """A real RGB PNG of noisy pixels (incompressible, so the body is tens of KB)."""
    rng = random.Random(seed)
    rows = b"".join(b"\x00" + bytes(rng.getrandbits(8) for _ in range(width * 3)) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 9))
            + chunk(b"IEND", b""))
