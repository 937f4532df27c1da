"""The bounded upload worker pool: `numworkers` uploads at once, `uploadqueuesize` waiting.

Strategy: connections get a thread each (ThreadingHTTPServer), but the expensive part, an
upload streaming to disk with a 1 MiB buffer, runs only under a worker slot. Beyond the
queue, a client gets 503 + Retry-After at once instead of an unbounded wait; the same
while the server drains for shutdown. The last quarter of the workers is kept for client
addresses that hold none, so a few addresses trickling bodies cannot take every worker
(until the read deadline cuts them), and a queued client that went away leaves the queue.

With `autoadjustworkers` the pool is sized from the machine (`plan_workers`: CPUs and the
memory a worker may use, cgroup limits included) at start and at SIGHUP, and `WorkerTuner`
grows it a bounded step at a time while uploads keep queueing, then shrinks it back once
the queue has been idle a while. Off, `numworkers` and `uploadqueuesize` are used as given.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from ..errors import HTTPError
from .periodic import run_every

log = logging.getLogger("hmacfs")

BUFFER_SIZE = 1024 * 1024
RETRY_AFTER = "5"
GONE_CHECK = 1.0  # seconds between looks at whether a queued client is still there

MIN_WORKERS = 4      # a floor: four 1 MiB buffers fit any host that runs Python
START_CEILING = 64   # the start size from CPUs stops here (uploads are I/O bound)
MAX_WORKERS = 256    # the most sustained queueing may grow the pool to
PER_CPU = 4          # uploads wait on the network and the disk: several per CPU
# Memory one worker may cost: its 1 MiB buffer, the hash state, a thread's stack touched
# pages and the socket buffers, rounded up; and the share of available memory the pool may
# take at most (the rest is the page cache's, and other processes').
WORKER_MEMORY = 2 * BUFFER_SIZE
MEMORY_SHARE = 4     # at most a quarter of the available memory


@dataclass(frozen=True)
class Resources:
    """What the machine offers this process; None: unknown (or no limit)."""

    cpus: int
    mem_available: Optional[int] = None   # /proc/meminfo MemAvailable, bytes
    cgroup_memory: Optional[int] = None   # cgroup v2 memory.max minus memory.current, bytes
    cgroup_cpus: Optional[float] = None   # cgroup v2 cpu.max quota / period


@dataclass(frozen=True)
class WorkerPlan:
    """The start size of the pool and the most sustained queueing may grow it to."""

    start: int
    ceiling: int
    memory_bound: Optional[int]  # workers the memory allows (None: unknown)
    cpus: float


def plan_workers(res: Resources) -> WorkerPlan:
    """Pool size from CPUs and memory: `PER_CPU` per CPU (the cgroup quota counts when lower)
    within MIN_WORKERS..START_CEILING, and never more than a `1/MEMORY_SHARE` of the memory
    at hand (the lower of MemAvailable and the cgroup's room) pays for at `WORKER_MEMORY` each.
    The ceiling for growth under queueing is the memory bound itself (within MAX_WORKERS):
    a queued upload costs a thread and a socket, a running one its buffer."""
    cpus: float = max(1, res.cpus)
    if res.cgroup_cpus is not None and res.cgroup_cpus > 0:
        cpus = min(cpus, res.cgroup_cpus)
    by_cpu = max(1, math.ceil(cpus)) * PER_CPU
    known = [m for m in (res.mem_available, res.cgroup_memory) if m is not None]
    memory_bound = max(0, min(known)) // MEMORY_SHARE // WORKER_MEMORY if known else None
    start = min(by_cpu, START_CEILING)
    ceiling = MAX_WORKERS
    if memory_bound is not None:
        start = min(start, memory_bound)
        ceiling = min(ceiling, memory_bound)
    start = max(MIN_WORKERS, start)
    return WorkerPlan(start, max(start, ceiling), memory_bound, cpus)


def auto_workers(cpus: Optional[int] = None) -> int:
    """Worker count from the machine's CPUs alone (memory unknown): see `plan_workers`."""
    return plan_workers(Resources(cpus or os.cpu_count() or 1)).start


def parse_meminfo(text: str) -> Optional[int]:
    """MemAvailable from /proc/meminfo, in bytes (None when the kernel does not say)."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            try:
                return int(fields[1]) * (1024 if fields[2:3] == ["kB"] else 1)
            except (IndexError, ValueError):
                return None
    return None


def parse_memory_max(limit: str, current: str = "0") -> Optional[int]:
    """The room left under a cgroup v2 `memory.max` ("max": no limit), in bytes."""
    limit = limit.strip()
    if not limit or limit == "max":
        return None
    try:
        return max(0, int(limit) - int(current.strip() or 0))
    except ValueError:
        return None


def parse_cpu_max(text: str) -> Optional[float]:
    """CPUs a cgroup v2 `cpu.max` ("QUOTA PERIOD", or "max PERIOD") allows (None: no limit)."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100000
    except ValueError:
        return None
    return quota / period if period > 0 else None


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _own_cgroup(root: str) -> str:
    """This process's cgroup v2 directory (from /proc/self/cgroup "0::/path"), or the root."""
    for line in (_read("/proc/self/cgroup") or "").splitlines():
        if line.startswith("0::"):
            path = os.path.join(root, line[3:].strip().lstrip("/"))
            if os.path.isdir(path):
                return path
    return root


def machine_resources(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> Resources:
    """The CPUs this process may run on, MemAvailable and its cgroup v2 limits (cheap reads:
    each file that is missing just leaves its value unknown)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    meminfo = _read(os.path.join(proc, "meminfo"))
    group = _own_cgroup(cgroup_root)
    mem_max = _read(os.path.join(group, "memory.max"))
    cpu_max = _read(os.path.join(group, "cpu.max"))
    return Resources(cpus, parse_meminfo(meminfo) if meminfo else None,
                     parse_memory_max(mem_max, _read(os.path.join(group, "memory.current")) or "0")
                     if mem_max else None,
                     parse_cpu_max(cpu_max) if cpu_max else None)


class _Waiter:
    """An upload waiting in the queue: granted a worker directly by the one that lets go."""

    __slots__ = ("event", "granted", "owner")

    def __init__(self, owner: Optional[str]) -> None:
        self.owner = owner
        self.granted = False
        self.event = threading.Event()


class UploadGate:
    """Admission control for uploads, with a pool of reusable receive buffers.

    Waiters queue in arrival order and are handed a worker by whoever lets one go (no
    thundering herd: waking every waiter on every release cost 4x at 256 connections).
    Fairness: the last `reserve` free workers go only to client addresses holding none."""

    def __init__(self, workers: int, queue_size: int, metrics=None) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self.metrics = metrics
        self.active = 0
        self.closed = False
        self._lock = threading.Lock()
        self._buffers: list[bytearray] = []
        self._owners: dict[str, int] = {}  # workers held per client address
        self._queue: deque[_Waiter] = deque()
        self._queued_owners: dict[Optional[str], int] = {}  # waiters per address
        self.reserve = workers // 4  # free workers kept for clients that hold none
        self.queued_since: Optional[float] = None  # monotonic time the queue last became non-empty

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def resize(self, workers: int, queue_size: Optional[int] = None) -> None:
        """Change the pool size at run time (auto-adjust, SIGHUP), from any thread.

        Growing hands workers to the queue at once; shrinking takes no slot away from an upload
        holding one: the surplus just is not handed out again as those finish. Pooled buffers
        beyond the new size are let go, so a pool shrunk after a burst gives its memory back."""
        workers = max(1, workers)
        with self._lock:
            self.workers = workers
            self.reserve = workers // 4
            if queue_size is not None:
                self.queue_size = max(0, queue_size)
            del self._buffers[max(0, workers - self.active):]
            self._dispatch()
            self._publish()

    def queued_for(self, now: Optional[float] = None) -> float:
        """Seconds the queue has been non-empty without a break (0 when empty)."""
        since = self.queued_since
        if since is None:
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - since)

    def _publish(self) -> None:
        if self._queue and self.queued_since is None:
            self.queued_since = time.monotonic()
        elif not self._queue:
            self.queued_since = None
        if self.metrics is not None:
            self.metrics.uploads_active.set(self.active)
            self.metrics.upload_queue.set(len(self._queue))

    def _may_take(self, owner: Optional[str]) -> bool:
        """A free worker, and fairness: the last `reserve` free workers go only to clients (by
        address) that hold none, so clients holding workers with bodies that barely move (a
        slow-body attack from a few addresses) cannot starve everyone else."""
        free = self.workers - self.active
        if free <= 0:
            return False
        return owner is None or free > self.reserve or not self._owners.get(owner)

    def _take(self, owner: Optional[str]) -> None:
        self.active += 1
        if owner is not None:
            self._owners[owner] = self._owners.get(owner, 0) + 1

    def _unqueue(self, waiter: _Waiter) -> None:
        self._queue.remove(waiter)
        left = self._queued_owners[waiter.owner] - 1
        if left:
            self._queued_owners[waiter.owner] = left
        else:
            del self._queued_owners[waiter.owner]

    def _dispatch(self) -> None:
        """Hand free workers to the queue, oldest eligible waiter first (under the lock)."""
        while self._queue and self.workers - self.active > 0:
            if self.workers - self.active > self.reserve:
                waiter = self._queue[0]
            else:  # only addresses holding nothing may take the reserve: look only if one waits
                if not any(o is None or not self._owners.get(o) for o in self._queued_owners):
                    return
                waiter = next(w for w in self._queue if self._may_take(w.owner))
            self._unqueue(waiter)
            self._take(waiter.owner)
            waiter.granted = True
            waiter.event.set()

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
        self._acquire(owner, gone)
        small = size_hint is not None and size_hint < BUFFER_SIZE
        with self._lock:
            if small:
                buf = bytearray(max(size_hint or 0, 1))
            else:
                buf = self._buffers.pop() if self._buffers else bytearray(BUFFER_SIZE)
            self._publish()
        try:
            yield memoryview(buf)
        finally:
            with self._lock:
                self.active -= 1
                if owner is not None:
                    left = self._owners[owner] - 1
                    if left:
                        self._owners[owner] = left
                    else:
                        del self._owners[owner]
                if not small and len(self._buffers) < self.workers:
                    self._buffers.append(buf)
                self._dispatch()
                self._publish()

    def _acquire(self, owner: Optional[str], gone: Optional[Callable[[], bool]]) -> None:
        """Take a worker now, or queue for one (503 when the queue is full or the gate closed)."""
        with self._lock:
            if self.closed:
                raise HTTPError(503, "server is shutting down", {"Retry-After": RETRY_AFTER})
            if not self._queue and self._may_take(owner):
                self._take(owner)
                return
            if owner is not None and self._may_take(owner) and not self._owners.get(owner):
                self._take(owner)  # an address holding nothing may take a free reserved worker at once
                return
            if len(self._queue) >= self.queue_size:
                raise HTTPError(503, "server busy, retry later", {"Retry-After": RETRY_AFTER})
            waiter = _Waiter(owner)
            self._queue.append(waiter)
            self._queued_owners[owner] = self._queued_owners.get(owner, 0) + 1
            self._publish()
        while not waiter.event.wait(GONE_CHECK if gone is not None else None):
            if gone is not None and gone():
                with self._lock:
                    if not waiter.granted:
                        self._unqueue(waiter)
                        self._publish()
                        raise ConnectionAbortedError("the client went away while waiting for a worker")
        if not waiter.granted:  # woken by close()
            raise HTTPError(503, "server is shutting down", {"Retry-After": RETRY_AFTER})

    def close(self) -> None:
        """Refuse new uploads (those holding a slot finish); the queue gets 503 at once."""
        with self._lock:
            self.closed = True
            while self._queue:
                waiter = self._queue[0]
                self._unqueue(waiter)
                waiter.event.set()
            self._publish()


class WorkerTuner:
    """Re-sizes an UploadGate from the machine and from how the queue behaves (autoadjustworkers).

    Why these rules: a queue that stays non-empty for `grow_after` seconds means uploads wait
    on the pool, not on a burst; the pool then grows by a quarter (at least one) per check,
    never past the memory bound of the plan. Once nothing has queued for `shrink_after`
    seconds and the surplus is idle, it shrinks by the same step back to the start size: a
    quiet server holds no more buffers than the machine's own plan. Every change is logged.
    """

    def __init__(self, gate: UploadGate, enabled: bool, fixed: int = 4, queue_size: Optional[int] = None,
                 resources: Callable[[], Resources] = machine_resources, interval: float = 1.0,
                 grow_after: float = 5.0, shrink_after: float = 60.0) -> None:
        self.gate = gate
        self.resources = resources
        self.interval = interval
        self.grow_after = grow_after
        self.shrink_after = shrink_after
        self.enabled = enabled
        self.plan: Optional[WorkerPlan] = None
        self._idle_since: Optional[float] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.configure(enabled, fixed, queue_size, reason="start")

    def configure(self, enabled: bool, fixed: int, queue_size: Optional[int] = None, reason: str = "reload") -> int:
        """Size the pool now (start, SIGHUP): from the machine when enabled, else `fixed`
        workers exactly; `queue_size` waiting in both cases (None: unchanged). Returns the
        worker count."""
        with self._lock:
            self.enabled = enabled
            if not enabled:
                self.plan = None
                self.gate.resize(fixed, queue_size)
                log.info("upload workers (%s): %d (numworkers), queue %d", reason, fixed, self.gate.queue_size)
                return fixed
            res = self.resources()
            plan = self.plan = plan_workers(res)
            self.gate.resize(plan.start, queue_size)
            self._idle_since = None
            memory = min((m for m in (res.mem_available, res.cgroup_memory) if m is not None), default=None)
            log.info("upload workers (%s): %d auto-adjusted (cpus %g, memory available %s, bound %d), queue %d",
                     reason, plan.start, plan.cpus,
                     "unknown" if memory is None else f"{memory // BUFFER_SIZE} MiB", plan.ceiling,
                     self.gate.queue_size)
            return plan.start

    def step(self, now: Optional[float] = None) -> Optional[int]:
        """One look at the queue; returns the new worker count when it changed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            plan, gate = self.plan, self.gate
            if not self.enabled or plan is None or gate.closed:
                return None
            workers = gate.workers
            size = max(1, workers // 4)
            if gate.queued_for(now) >= self.grow_after and workers < plan.ceiling:
                self._idle_since = None
                new = min(plan.ceiling, workers + size)
                gate.resize(new)  # restarts the queue's clock: the next step waits `grow_after` again
                log.info("upload workers: %d -> %d (uploads queued for %.0fs; bound %d)",
                         workers, new, self.grow_after, plan.ceiling)
                return new
            new = max(plan.start, workers - size)
            if gate.waiting or workers <= plan.start or gate.active > new:
                self._idle_since = None
                return None
            if self._idle_since is None:
                self._idle_since = now
                return None
            if now - self._idle_since < self.shrink_after:
                return None
            gate.resize(new)
            self._idle_since = now
            log.info("upload workers: %d -> %d (queue idle for %.0fs)", workers, new, self.shrink_after)
            return new

    def start(self) -> None:
        # a failed step leaves the pool at its size; the server goes on
        self._thread = run_every(self.interval, self.step, "worker-tuner", self._stop,
                                 failure="worker auto-adjust failed")

    def stop(self) -> None:
        self._stop.set()
