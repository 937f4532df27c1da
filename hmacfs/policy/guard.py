"""The guard: whether a client may be served at all, decided once per request before dispatch.

Strategy: three checks in a fixed order, the cheapest and most final first:
1. IP lists: an address in `denyips` is refused (403); with a non-empty `allowips`, so is
   every address outside it;
2. bans: an address banned after repeated authentication failures is refused (403), even
   with a good signature (policy/bans.py);
3. the rate limit: one token bucket per address (policy/ratelimit.py), 429 + Retry-After.
   A verified JWT's `sub` is charged a bucket of its own once its token verified
   (`charge_uploader`), so one account cannot spread a flood over many addresses.
All three judge `req.client`, the one address the connection derived (the socket peer, or
the right-most untrusted hop that a trusted proxy forwarded: http/clientaddr.py), so a
client cannot step around them with a header, and the access log and the fail2ban line name
the same address. An IPv4-mapped IPv6 address counts as its IPv4 form; bans and buckets
count an IPv6 client by its /64, like the per-address connection cap.

Refused requests leave through the one error path (HTTPError), so they carry CORS and the
security headers, and the request's body is never read: nothing is stored.

Service endpoints on the main port (/health, /ready, the metrics path) pass the lists and
bans but take no token: a monitor polling them must not be cut off because an address it
shares (NAT) is busy uploading, and they cost next to nothing to answer. The metrics
listener (`metricsport`) is not guarded at all: it is the operator's port (keep it on
loopback or firewall it). A request with no IP address (a Unix socket without a forwarded
address) is not judged: there is no address to judge.

Authentication failures: the handlers mark the HTTPError of a failed signature check
(`mark_auth_failure`); the connection hands it to `auth_failed`, which writes the fail2ban
line (services/logs.py) and counts the failure toward a ban.
"""
from __future__ import annotations

import ipaddress
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from ..errors import HTTPError
from ..meta.record import BanStore
from ..services.logs import auth_log, log_auth_failure
from .bans import Bans, IPAddress, address_key, client_ip
from .ratelimit import TokenBuckets
from .shared import SharedBans, SharedTokenBuckets

log = logging.getLogger("hmacfs")

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    """CIDRs (or bare addresses) from the config, already validated there."""
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _within(ip: IPAddress, nets: Sequence[Network]) -> bool:
    return any(ip in net for net in nets)


def mark_auth_failure(err: HTTPError) -> None:
    """Tag a refusal by a signature check, for the connection to report (`is_auth_failure`)."""
    err.auth_failure = True  # type: ignore[attr-defined]


def is_auth_failure(err: BaseException) -> bool:
    return getattr(err, "auth_failure", False) is True


@dataclass(frozen=True)
class GuardSettings:
    """The guard's part of `[security]`; zero turns a check off."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    exempt: tuple[Network, ...] = ()   # never rate limited (ratelimitexempt)
    per_minute: int = 0                # requests per address (and per JWT sub) per minute
    ban_threshold: int = 0             # failures within ban_window that ban
    ban_window: float = 600.0
    ban_duration: float = 3600.0

    @classmethod
    def from_config(cls, config: Any) -> GuardSettings:
        sec = config.security
        return cls(allow=networks(sec.allowips), deny=networks(sec.denyips), exempt=networks(sec.ratelimitexempt),
                   per_minute=sec.maxrequestsperminute if sec.ratelimitingenabled else 0,
                   ban_threshold=sec.banthreshold if sec.banenabled else 0,
                   ban_window=sec.banwindow, ban_duration=sec.banduration)


def too_many(wait: float, whose: str) -> HTTPError:
    return HTTPError(429, f"too many requests from this {whose}: try again later",
                     {"Retry-After": str(max(1, math.ceil(wait)))})


class Guard:
    """IP lists, bans and rate limits over `req.client`; `metrics` is the ServerMetrics."""

    def __init__(self, settings: GuardSettings, store: BanStore, metrics: Any,
                 shared: Optional[tuple[Any, str]] = None) -> None:
        self.store = store
        self.shared = shared  # cluster mode: (Redis client, key prefix) for buckets and failure counts
        self.metrics = metrics
        self.settings = GuardSettings()
        self.by_address: Optional[TokenBuckets] = None
        self.by_uploader: Optional[TokenBuckets] = None
        self.bans: Optional[Bans] = None
        self.active = False
        self.configure(settings)

    def configure(self, s: GuardSettings) -> None:
        """Take settings (at start and on SIGHUP); buckets and failure counts survive unless
        their meaning changed, and bans in force always do (they live in the store)."""
        old = self.settings
        if not s.per_minute:
            self.by_address = self.by_uploader = None
        elif self.by_address is None or s.per_minute != old.per_minute:
            self.by_address, self.by_uploader = self._buckets("ip:", s.per_minute), self._buckets("sub:", s.per_minute)
        ban_rules = (s.ban_threshold, s.ban_window, s.ban_duration)
        if not s.ban_threshold:
            self.bans = None
        elif self.bans is None or ban_rules != (old.ban_threshold, old.ban_window, old.ban_duration):
            bans = (Bans(self.store, *ban_rules) if self.shared is None else
                    SharedBans(self.store, *ban_rules, self.shared[0], self.shared[1]))
            held = bans.load(time.time())
            if held:
                log.info("bans: %d address(es) banned (hmacfs bans list)", held)
            self.bans = bans
        self.settings = s
        self.active = bool(s.allow or s.deny or self.bans is not None or self.by_address is not None)

    def _buckets(self, kind: str, per_minute: int) -> TokenBuckets:
        if self.shared is None:
            return TokenBuckets(per_minute)
        client, prefix = self.shared
        return SharedTokenBuckets(client, f"{prefix}rate:{kind}", per_minute)

    def admit(self, client: str, service: bool = False) -> None:
        """Refuse `client` (HTTPError 403 or 429) or let it through; `service`: a service endpoint
        (lists and bans apply, the rate limit does not)."""
        if not self.active:
            return
        ip = client_ip(client)
        if ip is None:
            return
        s = self.settings
        if s.deny and _within(ip, s.deny):
            self.metrics.denied_requests.inc(1, "deny")
            raise HTTPError(403, "requests from your address are not accepted here")
        if s.allow and not _within(ip, s.allow):
            self.metrics.denied_requests.inc(1, "allow")
            raise HTTPError(403, "requests from your address are not accepted here")
        bans, buckets = self.bans, None if service else self.by_address
        if bans is None and buckets is None:
            return
        key = address_key(ip)
        if bans is not None and bans.banned(key, time.time()):
            self.metrics.banned_requests.inc()
            raise HTTPError(403, "your address is banned for a while after repeated authentication failures")
        if buckets is not None and not (s.exempt and _within(ip, s.exempt)):
            wait = buckets.take(key)
            if wait:
                self.metrics.ratelimited.inc(1, "address")
                raise too_many(wait, "address")

    def charge_uploader(self, uploader: Optional[str], client: str) -> None:
        """Once a JWT verified: one token from its `sub`'s bucket (429 when empty). Addresses in
        `ratelimitexempt` are not charged, here as in `admit`."""
        buckets = self.by_uploader
        if uploader is None or buckets is None:
            return
        ip = client_ip(client)
        exempt = self.settings.exempt
        if ip is not None and exempt and _within(ip, exempt):
            return
        wait = buckets.take(uploader)
        if wait:
            self.metrics.ratelimited.inc(1, "uploader")
            raise too_many(wait, "uploader")

    def auth_failed(self, client: str, method: str, raw_path: bytes, err: HTTPError) -> None:
        """A failed signature check: the fail2ban line, always; a count toward a ban when bans are on."""
        log_auth_failure(client, err.status, method, raw_path, err.message)
        bans = self.bans
        ip = client_ip(client)
        if bans is None or ip is None:
            return
        ban = bans.failed(address_key(ip), time.time(), f"{err.status} {err.message}")
        if ban is not None:
            self.metrics.bans.inc()
            auth_log.warning("ban client=%s until=%s after %d auth failures within %.0fs", ban.address,
                             time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ban.until)), ban.failures,
                             self.settings.ban_window)
