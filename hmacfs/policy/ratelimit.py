"""Token buckets keyed by client address (or uploader): the rate limit's state, bounded in memory.

Strategy: a bucket holds up to `per_minute` tokens, so a client may spend its whole minute
in one burst (an XMPP client sharing an album), and refills continuously at `per_minute`
per 60 s; a request takes one token or is refused with the time until the next one. A
refused request takes nothing, so a client that keeps hammering is let through again at
the refill rate, never starved.

Each bucket is kept as one number, in the GCRA form of a token bucket (the ATM "generic
cell rate algorithm"): the time at which it will be full again. A request at `now` may
pass when that time is at most `(per_minute - 1) * interval` ahead, and moves it on by
one `interval` (60 s / per_minute). A bucket whose time has passed is full, the same as no
bucket, so buckets sit in an LRU table and full ones at its old end are dropped as new keys
arrive; a hard cap on keys bounds memory under a flood of distinct addresses (IPv6 makes
them cheap): about 20 MB at the cap. An evicted bucket comes back full: the error leans
towards letting a client through, never towards refusing one that did nothing.

Time is passed in (monotonic seconds) so the arithmetic is tested without sleeping.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Optional

MAX_KEYS = 100_000


class TokenBuckets:
    """One token bucket per key, `per_minute` tokens each."""

    def __init__(self, per_minute: int, max_keys: int = MAX_KEYS) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self.interval = 60.0 / per_minute             # seconds per token
        self.tolerance = (per_minute - 1) * self.interval  # how far ahead a full-again time may be
        self.max_keys = max_keys
        self._full_at: OrderedDict[str, float] = OrderedDict()  # key -> when full again, least recent first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._full_at)

    def take(self, key: str, now: Optional[float] = None) -> float:
        """0.0 when `key` may make a request now (one token is taken), else the seconds it must wait."""
        with self._lock:
            now = time.monotonic() if now is None else now
            full_at = self._full_at.get(key)
            if full_at is None:
                self._evict(now)
                full_at = now
            else:
                self._full_at.move_to_end(key)
                full_at = max(full_at, now)
            ahead = full_at - now
            if ahead > self.tolerance:
                self._full_at[key] = full_at
                return ahead - self.tolerance
            self._full_at[key] = full_at + self.interval
            return 0.0

    def _evict(self, now: float) -> None:
        """Drop full buckets from the old end, and the least recent ones while at the cap."""
        buckets = self._full_at
        while buckets:
            oldest_key, full_at = next(iter(buckets.items()))
            if full_at <= now or len(buckets) >= self.max_keys:
                del buckets[oldest_key]
            else:
                break
