"""Rate limits, failure counts and bans shared by every node through Redis (cluster mode).

Strategy: the same decisions as ratelimit.py and bans.py, with their state in Redis so a
client cannot multiply its allowance by the number of nodes, and a ban made on one node
holds on all. Each decision is one Lua script (atomic; its clock is Redis's `TIME`, so
nodes with skewed clocks agree). When Redis is unreachable the node falls back to its
own in-memory state rather than refusing everyone: limits then hold per node until Redis
is back, and bans already known keep holding.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

from ..meta.record import BanStore
from .bans import Bans, FailureCounter
from .ratelimit import TokenBuckets

log = logging.getLogger("hmacfs")
NEGATIVE_SECONDS = 1.0   # an address Redis said is not banned is asked again after this long
MAX_NEGATIVE = 100_000

TAKE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local full_at = tonumber(redis.call('GET', KEYS[1]) or now)
if full_at < now then full_at = now end
local ahead = full_at - now
if ahead > tolerance then return tostring(ahead - tolerance) end
local next_full = full_at + interval
redis.call('SET', KEYS[1], tostring(next_full), 'PX', math.ceil((next_full - now) * 1000) + 1000)
return '0'
"""

FAIL_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n >= tonumber(ARGV[2]) then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""


class Breaker:
    """After Redis failed, skip it for a moment: a hung Redis costs one request one socket
    timeout per check, not every request each of its checks (the node decides alone meanwhile)."""

    PAUSE = 2.0

    def __init__(self) -> None:
        self._until = 0.0

    def open(self) -> bool:
        return time.monotonic() < self._until

    def tripped(self) -> None:
        self._until = time.monotonic() + self.PAUSE


class SharedTokenBuckets(TokenBuckets):
    """TokenBuckets (the same GCRA arithmetic) kept in Redis; the local buckets are the fallback."""

    def __init__(self, client: Any, prefix: str, per_minute: int) -> None:
        super().__init__(per_minute)
        self.client = client
        self.prefix = prefix
        self._take = client.register_script(TAKE_SCRIPT)
        self._warned = 0.0
        self.breaker = Breaker()

    def take(self, key: str, now: Optional[float] = None) -> float:
        if self.breaker.open():
            return super().take(key, now)
        try:
            wait = float(self._take(keys=[self.prefix + key], args=[repr(self.interval), repr(self.tolerance)]))
        except Exception as e:
            self.breaker.tripped()
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.warning("rate limit: Redis unavailable (%s); limiting per node until it is back", e)
            return super().take(key, now)
        return wait


class SharedFailureCounter(FailureCounter):
    """Authentication failures per address counted in Redis, in a window that starts at the
    first failure (fixed, not sliding: one Redis key per address, which expires by itself)."""

    def __init__(self, client: Any, prefix: str, threshold: int, window: float) -> None:
        super().__init__(threshold, window)
        self.client = client
        self.prefix = prefix
        self._fail = client.register_script(FAIL_SCRIPT)
        self.breaker = Breaker()

    def add(self, key: str, now: float) -> bool:
        if self.breaker.open():
            return super().add(key, now)
        try:
            return bool(self._fail(keys=[self.prefix + key], args=[int(self.window * 1000), self.threshold]))
        except Exception as e:
            self.breaker.tripped()
            log.warning("bans: Redis unavailable (%s); counting failures on this node", e)
            return super().add(key, now)


class SharedBans(Bans):
    """Bans whose check also asks the store (Redis) about addresses this node has not banned
    itself: a ban made on another node holds here within one request."""

    def __init__(self, store: BanStore, threshold: int, window: float, duration: float,
                 client: Any, prefix: str) -> None:
        super().__init__(store, threshold, window, duration)
        self.failures = SharedFailureCounter(client, prefix + "fail:", threshold, window)
        self._clear: dict[str, float] = {}  # key -> when the store last said "not banned"
        self.breaker = Breaker()
        self._clear_lock = threading.Lock()

    def banned(self, key: str, now: float) -> bool:
        if key in self._until:
            return super().banned(key, now)
        if now - self._clear.get(key, -NEGATIVE_SECONDS) < NEGATIVE_SECONDS or self.breaker.open():
            return False
        try:
            stored = self.store.ban_get(key)
        except Exception:
            self.breaker.tripped()
            return False  # Redis away: the bans this node knows still hold (above)
        if stored is None or stored.until <= now:
            with self._clear_lock:
                if len(self._clear) >= MAX_NEGATIVE:
                    self._clear.clear()
                self._clear[key] = now
            return False
        with self._lock:
            self._until[key], self._confirmed[key] = stored.until, now
        return True
