"""One error catalog: an exception that carries its HTTP status.

Policy and storage code raise `HTTPError`; exactly one place (the response writer) turns it
into a response, adding CORS and security headers and counting it. Anything else that
escapes a handler is a bug: it is logged with a traceback and becomes a 500.
"""
from __future__ import annotations

from http import HTTPStatus
from typing import Mapping, Optional


class HTTPError(Exception):
    """A request failed with `status`; `message` is safe to show the client (no secrets)."""

    def __init__(self, status: int, message: str = "",
                 headers: Optional[Mapping[str, str]] = None) -> None:
        self.status = int(status)
        self.message = message or reason(status)
        self.headers = dict(headers or {})
        super().__init__(f"{self.status} {self.message}")


def storage_full() -> HTTPError:
    """507: the disk (or the space it must keep free) cannot take this upload."""
    return HTTPError(507, "not enough free space to store this upload")


def reason(status: int) -> str:
    """The standard reason phrase (with tus's 460, the resumable-upload draft's 104 and a fallback)."""
    if status == 460:
        return "Checksum Mismatch"
    if status == 104:  # draft-ietf-httpbis-resumable-upload (not in http.HTTPStatus)
        return "Upload Resumption Supported"
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and the value."""


class StartupError(Exception):
    """The server cannot start (storage not writable, store in use, ...); the message says why."""
