"""The bounded upload worker pool: `numworkers` uploads at once, `uploadqueuesize` waiting.

Strategy: connections get a thread each (ThreadingHTTPServer), but the expensive part, an
upload streaming to disk with a 1 MiB buffer, runs only under a worker slot. Beyond the
queue, a client gets 503 + Retry-After at once instead of an unbounded wait; the same
while the server drains for shutdown.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

from ..errors import HTTPError

BUFFER_SIZE = 1024 * 1024
RETRY_AFTER = "5"


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

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.uploads_active.set(self.active)
            self.metrics.upload_queue.set(self.waiting)

    @contextmanager
    def slot(self, size_hint: Optional[int] = None) -> Iterator[memoryview]:
        """Hold a worker for one upload; yields its receive buffer. 503 when full or draining.

        An upload known to be small gets a buffer of its own size instead of a pooled 1 MiB
        one, so many small concurrent uploads do not touch megabytes each.
        """
        busy = HTTPError(503, "server busy, retry later", {"Retry-After": RETRY_AFTER})
        with self._cond:
            if self.closed:
                raise HTTPError(503, "server is shutting down", {"Retry-After": RETRY_AFTER})
            if self.active >= self.workers:
                if self.waiting >= self.queue_size:
                    raise busy
                self.waiting += 1
                self._publish()
                try:
                    while self.active >= self.workers and not self.closed:
                        self._cond.wait()
                finally:
                    self.waiting -= 1
                if self.closed:
                    self._publish()
                    raise HTTPError(503, "server is shutting down", {"Retry-After": RETRY_AFTER})
            self.active += 1
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
                if not small:
                    self._buffers.append(buf)
                self._publish()
                self._cond.notify()

    def close(self) -> None:
        """Refuse new uploads (those holding a slot finish); wake the queue so it gets 503."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
