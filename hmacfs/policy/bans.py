"""Bans: an address that fails authentication `threshold` times within `window` is shut out
for `duration`, across restarts.

Strategy: failures are counted in memory (the last `threshold` times per address, in an
LRU table bounded like the rate limiter's, to MAX_TIMES times in all); a ban is kept in
memory for the per-request check and written through the metadata store (`BanStore`) so
it survives a restart. The store is the truth: `hmacfs bans remove` deletes the row while
the server runs, so a ban found in memory is confirmed against the store at most once per
`CONFIRM_SECONDS` per address before it refuses a request; the cost is one primary-key
lookup per banned address per second, and none at all for everyone else.

Addresses are keyed like the connection cap's `peer_key`: an IPv4 address, or the /64 of an
IPv6 one (a single client usually holds a whole /64 and could walk through it). Wall-clock
time throughout, since a ban's end is stored and must mean the same after a restart.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
from array import array
from collections import OrderedDict
from typing import Optional, Union

from ..meta.record import BanRecord, BanStore

log = logging.getLogger("hmacfs")

CONFIRM_SECONDS = 1.0   # how stale the memory of one ban may be before it refuses a request
MAX_TIMES = 1_000_000   # failure times remembered in all (8 MB of doubles, ~35 MB with the table)
SWEEP_SECONDS = 60.0    # at most this often, a new ban also drops ended ones from memory


IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def client_ip(text: str) -> Optional[IPAddress]:
    """The client's address as an object, an IPv4-mapped IPv6 address as its IPv4 form (as
    `in_networks` and `peer_key` take it); None for what is no IP address (a Unix socket)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_key(ip: IPAddress) -> str:
    """What bans and rate limits count, as the connection cap's `peer_key` does: an IPv4
    address, or the /64 of an IPv6 one."""
    if ip.version == 6:
        return str(ipaddress.ip_network((ip, 64), strict=False))
    return str(ip)


def ban_key(text: str) -> str:
    """What a ban is kept under, from an address or (for the command line) a network:
    `203.0.113.7` -> itself, `::ffff:203.0.113.7` -> `203.0.113.7`, `2001:db8::1` or
    `2001:db8::/64` -> `2001:db8::/64`. ValueError when `text` is neither, or a network
    wider than one ban (an IPv4 network, an IPv6 one wider than a /64)."""
    text = text.strip()
    if "/" in text:
        net = ipaddress.ip_network(text, strict=False)
        if net.prefixlen < (32 if net.version == 4 else 64):
            raise ValueError(f"{text!r} is wider than one ban (an IPv4 address or an IPv6 /64)")
        text = str(net.network_address)
    ip = client_ip(text)
    if ip is None:
        raise ValueError(f"{text!r} is not an IP address")
    return address_key(ip)


class FailureCounter:
    """Recent failure times per key; says when a key reaches `threshold` within `window` seconds."""

    def __init__(self, threshold: int, window: float, max_keys: Optional[int] = None) -> None:
        self.threshold = threshold
        self.window = window
        self.max_keys = max_keys or max(1000, MAX_TIMES // threshold)
        # The last `threshold` failure times of each key, least recently failed first; an array of
        # doubles is a fifth of a deque's size, and a flood of addresses fills `max_keys` of them.
        self._times: OrderedDict[str, array] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._times)

    def add(self, key: str, now: float) -> bool:
        """Count one failure; True when it is the `threshold`-th within `window` (the count restarts)."""
        with self._lock:
            times = self._times.get(key)
            if times is None:
                self._evict(now)
                times = self._times[key] = array("d")
            else:
                self._times.move_to_end(key)
            times.append(now)
            if len(times) > self.threshold:
                del times[0]
            if len(times) >= self.threshold and now - times[0] <= self.window:
                del self._times[key]
                return True
            return False

    def _evict(self, now: float) -> None:
        while self._times:
            oldest_key, times = next(iter(self._times.items()))
            if now - times[-1] > self.window or len(self._times) >= self.max_keys:
                del self._times[oldest_key]
            else:
                break


class Bans:
    """Active bans: in memory for the per-request check, in the store for restarts and the CLI."""

    def __init__(self, store: BanStore, threshold: int, window: float, duration: float) -> None:
        self.store = store
        self.duration = duration
        self.failures = FailureCounter(threshold, window)
        self._until: dict[str, float] = {}      # key -> end of its ban
        self._confirmed: dict[str, float] = {}  # key -> when the store last agreed
        self._swept = 0.0
        self._lock = threading.Lock()

    def load(self, now: float) -> int:
        """Take the bans in force from the store (at start); returns how many."""
        try:
            self.store.bans_purge(now)
            active = self.store.bans_active(now)
        except Exception:
            log.exception("bans: could not read the stored bans (starting with none)")
            return 0
        with self._lock:
            for ban in active:
                self._until[ban.address] = ban.until
                self._confirmed[ban.address] = now
        return len(active)

    def banned(self, key: str, now: float) -> bool:
        """Is `key` banned at `now`? Checks memory; a hit is confirmed with the store when stale."""
        until = self._until.get(key)
        if until is None:
            return False
        if until <= now:
            self._forget(key)
            return False
        if now - self._confirmed.get(key, 0.0) < CONFIRM_SECONDS:
            return True
        try:
            stored = self.store.ban_get(key)
        except Exception:
            log.exception("bans: could not confirm a ban with the store (keeping it)")
            return True
        if stored is None or stored.until <= now:  # lifted (`hmacfs bans remove`) or over
            self._forget(key)
            return False
        with self._lock:
            self._until[key], self._confirmed[key] = stored.until, now
        return True

    def failed(self, key: str, now: float, reason: str = "") -> Optional[BanRecord]:
        """Count an authentication failure of `key`; the new ban when this one makes it."""
        if not self.failures.add(key, now):
            return None
        ban = BanRecord(key, now + self.duration, now, self.failures.threshold, reason)
        with self._lock:
            self._until[key], self._confirmed[key] = ban.until, now
            if now - self._swept >= SWEEP_SECONDS:  # ended bans nobody asked about again
                self._swept = now
                for old in [k for k, end in self._until.items() if end <= now]:
                    del self._until[old]
                    self._confirmed.pop(old, None)
        try:
            self.store.bans_purge(now)
            self.store.ban_put(ban)
        except Exception:
            log.exception("bans: could not store the ban of %s (it holds until a restart)", key)
        return ban

    def _forget(self, key: str) -> None:
        with self._lock:
            self._until.pop(key, None)
            self._confirmed.pop(key, None)

    def active(self) -> int:
        return len(self._until)
