"""Quotas: who the uploader is, and whether one more upload fits. Pure decisions.

Strategy: the uploader is the identity the XMPP server vouches for: the JWT `sub`
(Prosody mod_http_file_share signs it) or, when configured, the first path segment
(ejabberd puts sha1(JID) there). The numbers (stored bytes per uploader, bytes uploaded
in the last 24 hours, stored bytes in all) come from the metadata; this module only
compares them, so the rules are unit-tested without a server. Over a quota is a 507 whose
body names the quota, decided before the body is read (and again at commit for chunked
bodies, whose size is known only then).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import HTTPError
from ..units import format_size

DAY = 86400.0


@dataclass(frozen=True)
class QuotaLimits:
    """Limits in bytes; 0 means no limit."""

    per_user: int = 0
    per_day: int = 0
    total: int = 0
    identity: str = "jwt"


@dataclass(frozen=True)
class Standing:
    """What is stored and uploaded now, from the metadata."""

    user_bytes: int = 0
    day_bytes: int = 0
    total_bytes: int = 0


def uploader_of(identity: str, jwt_sub: Optional[str], signed_path: str) -> Optional[str]:
    """The uploader to account a file to: the JWT `sub`, else the first segment when configured."""
    if jwt_sub:
        return jwt_sub
    if identity == "firstsegment" and "/" in signed_path:
        return signed_path.split("/", 1)[0]
    return None


def exceeded(limits: QuotaLimits, standing: Standing, size: int, has_uploader: bool) -> Optional[str]:
    """The name of the first quota that `size` more bytes would exceed, or None."""
    if has_uploader and limits.per_user and standing.user_bytes + size > limits.per_user:
        return "peruser"
    if has_uploader and limits.per_day and standing.day_bytes + size > limits.per_day:
        return "perday"
    if limits.total and standing.total_bytes + size > limits.total:
        return "global"
    return None


def refusal(quota: str, limits: QuotaLimits, standing: Standing, size: int) -> HTTPError:
    """The 507 for an exceeded quota, saying which one and by how much (never the uploader's id)."""
    limit, used = {"peruser": (limits.per_user, standing.user_bytes),
                   "perday": (limits.per_day, standing.day_bytes),
                   "global": (limits.total, standing.total_bytes)}[quota]
    what = {"peruser": "the uploader's storage quota", "perday": "the uploader's daily upload quota",
            "global": "the server's storage quota"}[quota]
    return HTTPError(507, f"{quota} quota exceeded: this upload ({size} bytes) would exceed {what} of "
                          f"{format_size(limit)} ({used} bytes used)", {"X-Hmacfs-Quota": quota})
