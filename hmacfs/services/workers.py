"""The bounded upload worker pool: `numworkers` uploads at once, `uploadqueuesize` waiting.

Strategy: connections get a thread each (ThreadingHTTPServer), but the expensive part, an
upload streaming to disk with a 1 MiB buffer, runs only under a worker slot. Beyond the
queue, a client gets 503 + Retry-After at once instead of an unbounded wait; the same
while the server drains for shutdown. The last quarter of the workers is kept for client
addresses that hold none, so a few addresses trickling bodies cannot take every worker
(until the read deadline cuts them), and a queued client that went away leaves the queue.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from ..errors import HTTPError

BUFFER_SIZE = 1024 * 1024
RETRY_AFTER = "5"
GONE_CHECK = 1.0  # seconds between looks at whether a queued client is still there


def auto_workers(cpus: Optional[int] = None) -> int:
    """Worker count from the machine: uploads are I/O bound, so several per CPU, within 4..64."""
    cpus = cpus or os.cpu_count() or 1
    return max(4, min(64, 4 * cpus))


class UploadGate:
    """Admission control for uploads, with a pool of reusable receive buffers."""

    def __init__(self, workers: int, queue_size: int, metrics=None) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self.metrics = metrics
        self.active = 0
        self.waiting = 0
        self.closed = False
        self._cond = threading.Condition()
        self._buffers: list[bytearray] = []
        self._owners: dict[str, int] = {}  # workers held per client address
        self.reserve = workers // 4  # free workers kept for clients that hold none

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.uploads_active.set(self.active)
            self.metrics.upload_queue.set(self.waiting)

    def _may_take(self, owner: Optional[str]) -> bool:
        """A free worker, and fairness: the last `reserve` free workers go only to clients (by
        address) that hold none, so clients holding workers with bodies that barely move (a
        slow-body attack from a few addresses) cannot starve everyone else."""
        free = self.workers - self.active
        if free <= 0:
            return False
        return owner is None or free > self.reserve or not self._owners.get(owner)

    @contextmanager
    def slot(self, size_hint: Optional[int] = None, owner: Optional[str] = None,
             gone: Optional[Callable[[], bool]] = None) -> Iterator[memoryview]:
        """Hold a worker for one upload; yields its receive buffer. 503 when full or draining.

        `owner` is the client's address (its /64 for IPv6) for the fairness rule; `gone` says
        whether the client went away (or the watchdog cut it): a waiter then leaves the queue at
        once instead of keeping its connection counted until a worker frees up. An upload known
        to be small gets a buffer of its own size instead of a pooled 1 MiB one, so many small
        concurrent uploads do not touch megabytes each.
        """
        busy = HTTPError(503, "server busy, retry later", {"Retry-After": RETRY_AFTER})
        with self._cond:
            if self.closed:
                raise HTTPError(503, "server is shutting down", {"Retry-After": RETRY_AFTER})
            if not self._may_take(owner):
                if self.waiting >= self.queue_size:
                    raise busy
                self.waiting += 1
                self._publish()
                try:
                    while not self._may_take(owner) and not self.closed:
                        self._cond.wait(GONE_CHECK if gone is not None else None)
                        if gone is not None and not self._may_take(owner) and gone():
                            raise ConnectionAbortedError("the client went away while waiting for a worker")
                finally:
                    self.waiting -= 1
                if self.closed:
                    self._publish()
                    raise HTTPError(503, "server is shutting down", {"Retry-After": RETRY_AFTER})
            self.active += 1
            if owner is not None:
                self._owners[owner] = self._owners.get(owner, 0) + 1
            small = size_hint is not None and size_hint < BUFFER_SIZE
            if small:
                buf = bytearray(max(size_hint or 0, 1))
            else:
                buf = self._buffers.pop() if self._buffers else bytearray(BUFFER_SIZE)
            self._publish()
        try:
            yield memoryview(buf)
        finally:
            with self._cond:
                self.active -= 1
                if owner is not None:
                    left = self._owners[owner] - 1
                    if left:
                        self._owners[owner] = left
                    else:
                        del self._owners[owner]
                if not small:
                    self._buffers.append(buf)
                self._publish()
                self._cond.notify_all()  # the rule differs per waiter: let each look again

    def close(self) -> None:
        """Refuse new uploads (those holding a slot finish); wake the queue so it gets 503."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
