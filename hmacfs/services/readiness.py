"""Readiness: may a load balancer send this process traffic? Each check named, with a detail.

Strategy: `/ready` is polled often (every few seconds by each balancer, and by every
Prometheus scrape through `hmacfs_ready`), so the checks that touch the outside world are
cached: the storage write test runs at most once a second, the clamd `zPING` at most every
few seconds with a short timeout, and one thread refreshes a stale result while the others
keep using the last one. Liveness (`/health`) is a different question and checks nothing.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

from .clamav import ClamdClient, ClamdError

if TYPE_CHECKING:
    from ..app import App

WRITABLE_EVERY = 1.0   # seconds between storage write tests
CLAMD_EVERY = 5.0      # seconds between clamd pings
CLAMD_TIMEOUT = 1.0    # a clamd slower than this to answer PING is not ready to scan uploads
BUCKET_EVERY = 5.0     # seconds between HEAD requests to the S3 bucket (backend = "s3")


class Check(NamedTuple):
    name: str
    ok: bool
    detail: str


class _Cached:
    """The result of `probe` reused for `max_age` seconds; a probe never runs twice at once."""

    def __init__(self, probe: Callable[[], tuple[bool, str]], max_age: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.probe, self.max_age, self.clock = probe, max_age, clock
        self._at: Optional[float] = None
        self._value: tuple[bool, str] = (False, "not checked yet")
        self._lock = threading.Lock()

    def get(self) -> tuple[bool, str]:
        if self._at is not None and self.clock() - self._at < self.max_age:
            return self._value
        if not self._lock.acquire(blocking=self._at is None):
            return self._value  # another thread is refreshing: the last answer will do
        try:
            if self._at is None or self.clock() - self._at >= self.max_age:
                self._value, self._at = self.probe(), self.clock()
            return self._value
        finally:
            self._lock.release()


class Readiness:
    """The checks behind `/ready` and `hmacfs_ready`: storage writable, free space above
    `minfreebytes`, the bucket answering (S3 backend), clamd answering (when `[clamav]` is on),
    Redis answering (cluster mode), warm-up done, not draining."""

    def __init__(self, app: App, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self._writable = _Cached(self._probe_writable, WRITABLE_EVERY, clock)
        self._clamd = _Cached(self._probe_clamd, CLAMD_EVERY, clock)
        self._bucket = _Cached(self._probe_bucket, BUCKET_EVERY, clock)

    def checks(self) -> list[Check]:
        app = self.app
        out = [Check("storage_writable", *self._writable.get()), self._free_space()]
        if app.scanner is not None:
            out.append(Check("clamd", *self._clamd.get()))
        if getattr(app, "objects", None) is not None:  # the S3 backend: the bucket answers us
            out.append(Check("object_storage", *self._bucket.get()))
        health = getattr(app, "redis_health", None)
        if health is not None:  # pinged by its own thread every redishealthcheckinterval
            out.append(Check("redis", health.up, "answering" if health.up else "not answering (shared state)"))
        warm = app.warm.is_set()
        out.append(Check("warmup", warm, "done" if warm else "precaching in progress"))
        out.append(Check("not_draining", not app.draining, "shutting down" if app.draining else "serving"))
        return out

    def ready(self) -> bool:
        return all(c.ok for c in self.checks())

    def _probe_writable(self) -> tuple[bool, str]:
        """Create and remove a tiny file where uploads are written first (`.hmacfs/tmp`, on the
        storage filesystem): a read-only remount, a full inode table or lost permissions fail it."""
        try:
            fd, path = tempfile.mkstemp(prefix="ready-", dir=self.app.store.tmp_dir)
            os.close(fd)
            os.unlink(path)
        except OSError as e:
            return False, f"cannot create a file in the storage: {e.strerror or e}"
        return True, "a file was created and removed"

    def _free_space(self) -> Check:
        floor = self.app.config.server.minfreebytes
        try:
            free = self.app.store.free_bytes()
        except OSError as e:
            return Check("free_space", False, f"cannot read free space: {e.strerror or e}")
        return Check("free_space", free >= floor, f"{free} bytes free, minfreebytes {floor}")

    def _probe_bucket(self) -> tuple[bool, str]:
        objects = self.app.objects
        try:
            objects.client.check_bucket()  # type: ignore[union-attr]
        except Exception as e:  # S3Error (its text names no secret) or a socket error
            return False, str(e)
        return True, f"bucket {objects.client.settings.bucket} answers"  # type: ignore[union-attr]

    def _probe_clamd(self) -> tuple[bool, str]:
        client = ClamdClient(self.app.scanner.client.address, CLAMD_TIMEOUT)  # type: ignore[union-attr]
        try:
            if client.ping():
                return True, "PONG"
            return False, "clamd did not answer PONG"
        except (ClamdError, OSError) as e:
            return False, str(e)
