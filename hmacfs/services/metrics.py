"""Metrics registry and the Prometheus text exposition format 0.0.4, standard library only.

Strategy: counters, gauges and histograms keyed by label values, each guarded by one
lock (increments are short); `render()` is a pure function of the registry's state.
Names follow Prometheus conventions (`_total` for counters, `_seconds`/`_bytes` units)
so `promtool check metrics` is clean. Every label has a small fixed set of values (method,
status code, protocol, result, check): never a path, an uploader or an address, whose
series would grow without bound in Prometheus.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import resource
import threading
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from .. import __version__

log = logging.getLogger("hmacfs")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Transfer sizes: 1 KiB to 16 GiB in steps of 4 (a chat photo, a voice note, a video, a disk image).
SIZE_BUCKETS = tuple(float(1024 * 4 ** i) for i in range(13))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class _Valued(_Metric):
    """One value per label set, or values read from `fn` at scrape time (process CPU, memory):
    a number when there are no labels, else an iterable of (label values, value) pairs."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 fn: Optional[Callable[[], Any]] = None) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}
        self._fn = fn

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def lines(self) -> list[str]:
        if self._fn is not None and not self.labelnames:
            return [f"{self.name} {_num(self._fn())}"]
        if self._fn is not None:
            return [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in self._fn()]
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Counter(_Valued):
    kind = "counter"


class SizedCounter(Counter):
    """A byte counter whose every increment is one transfer, also observed in a size histogram.

    Why: the handlers count each stored upload and each sent download with one `inc(size)`;
    recording the same number in `sizes` here keeps the total and the distribution from ever
    disagreeing, without a second call at every place a transfer is counted."""

    def __init__(self, name: str, help: str, sizes: Histogram) -> None:
        super().__init__(name, help)
        self.sizes = sizes

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        super().inc(amount, *labels)
        self.sizes.observe(amount)


class Gauge(_Valued):
    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        with self._lock:
            self._values[labels] = value

    def dec(self, amount: float = 1.0, *labels: str) -> None:
        self.inc(-amount, *labels)


class StampedCounter(Counter):
    """A counter that also records when it last moved, in `stamp` (seconds since the epoch).

    Why: "the janitor has not run for two intervals" is the alert an operator wants, and a
    rate of a counter cannot say when a stalled process last did something."""

    def __init__(self, name: str, help: str, stamp: Gauge) -> None:
        super().__init__(name, help)
        self.stamp = stamp

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        super().inc(amount, *labels)
        self.stamp.set(time.time())


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, help, labelnames)
        self.buckets = (*sorted(buckets), float("inf"))
        self._data: dict[tuple[str, ...], list[float]] = {}

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            data = self._data.get(labels)
            if data is None:
                data = self._data[labels] = [0.0] * (len(self.buckets) + 2)
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    data[i] += 1
                    break
            data[-2] += value
            data[-1] += 1

    def count(self, *labels: str) -> int:
        with self._lock:
            data = self._data.get(labels)
            return int(data[-1]) if data else 0

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        out = []
        for labels, data in items:
            cumulative = 0.0
            for i, bound in enumerate(self.buckets):
                cumulative += data[i]
                le = f'le="{_num(bound)}"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, labels, le)} {_num(cumulative)}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, labels)} {_num(data[-2])}")
            out.append(f"{self.name}_count{_labels(self.labelnames, labels)} {_num(data[-1])}")
        return out


class Registry:
    """A named set of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        return render(self._metrics)


def render(metrics: Iterable[_Metric]) -> str:
    """Text format 0.0.4: HELP and TYPE, then samples; a final newline."""
    out: list[str] = []
    for metric in metrics:
        out.extend(metric.header())
        out.extend(metric.lines())
    return "\n".join(out) + "\n"


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _open_fds() -> float:
    """Open file descriptors: the entries of /proc/self/fd (Linux), minus the one listing it."""
    try:
        return max(0, len(os.listdir("/proc/self/fd")) - 1)
    except OSError:
        return float("nan")


def _max_fds() -> float:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return float("inf") if soft == resource.RLIM_INFINITY else float(soft)


class ServerMetrics:
    """The metrics hmacfs exports; one instance per process."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        started = time.time()
        self.requests = r.add(Counter("hmacfs_http_requests_total", "HTTP requests by method and status.",
                                      ("method", "code")))
        self.request_seconds = r.add(Histogram("hmacfs_http_request_duration_seconds",
                                               "Time to handle an HTTP request.", ("method",)))
        self.uploads = r.add(Counter("hmacfs_uploads_total", "Files stored.", ("protocol",)))
        self.upload_errors = r.add(Counter("hmacfs_upload_errors_total", "Uploads refused or failed.",
                                           ("code",)))
        upload_sizes = Histogram("hmacfs_upload_size_bytes", "Size of each stored upload.", buckets=SIZE_BUCKETS)
        self.upload_bytes = r.add(SizedCounter("hmacfs_upload_bytes_total", "Bytes of stored uploads.",
                                               upload_sizes))
        r.add(upload_sizes)
        self.upload_seconds = r.add(Histogram("hmacfs_upload_duration_seconds", "Time to receive and store an upload."))
        self.downloads = r.add(Counter("hmacfs_downloads_total", "Downloads served (200 and 206).", ("code",)))
        download_sizes = Histogram("hmacfs_download_size_bytes",
                                   "Body bytes sent by each download (200 and 206; a HEAD sends 0).",
                                   buckets=SIZE_BUCKETS)
        self.download_bytes = r.add(SizedCounter("hmacfs_download_bytes_total", "Bytes sent in download bodies.",
                                                 download_sizes))
        r.add(download_sizes)
        self.download_seconds = r.add(Histogram("hmacfs_download_duration_seconds", "Time to send a download."))
        self.deletes = r.add(Counter("hmacfs_deletes_total", "Files deleted by signed DELETE."))
        self.auth_failures = r.add(Counter("hmacfs_auth_failures_total", "Requests refused by signature checks.",
                                           ("code",)))
        self.connections = r.add(Gauge("hmacfs_open_connections", "Client connections open now."))
        self.connections_refused = r.add(Counter("hmacfs_connections_refused_total",
                                                 "Connections refused at maxconnections."))
        self.uploads_active = r.add(Gauge("hmacfs_uploads_in_progress", "Uploads holding a worker now."))
        self.upload_queue = r.add(Gauge("hmacfs_upload_queue_length", "Uploads waiting for a worker."))
        r.add(Gauge("process_resident_memory_bytes", "Resident memory size in bytes.", fn=_rss_bytes))
        r.add(Counter("process_cpu_seconds_total", "User and system CPU time spent in seconds.", fn=_cpu_seconds))
        r.add(Gauge("process_start_time_seconds", "Start time of the process since the epoch in seconds.",
                    fn=lambda: started))
        r.add(Gauge("hmacfs_threads", "Python threads alive.", fn=lambda: threading.active_count()))
        r.add(Gauge("process_open_fds", "Number of open file descriptors.", fn=_open_fds))
        r.add(Gauge("process_max_fds", "Maximum number of open file descriptors.", fn=_max_fds))
        r.add(Gauge("hmacfs_build_info", "Always 1; the running hmacfs version and Python in labels.",
                    ("version", "python"), fn=lambda: [((__version__, platform.python_version()), 1.0)]))
        self.quota_refusals = r.add(Counter("hmacfs_quota_refusals_total", "Uploads refused by a quota.",
                                            ("quota",)))
        janitor_last = Gauge("hmacfs_janitor_last_run_timestamp_seconds",
                             "When the janitor last finished a run (0: not yet), since the epoch.")
        self.janitor_runs = r.add(StampedCounter("hmacfs_janitor_runs_total", "Janitor runs.", janitor_last))
        r.add(janitor_last)
        self.expired_removed = r.add(Counter("hmacfs_expired_files_removed_total",
                                             "Expired files removed (by the janitor or at a GET)."))
        self.tampered = r.add(Counter("hmacfs_encrypted_reads_failed_total",
                                      "Encrypted downloads cut because a segment failed authentication."))
        self.resumable_created = r.add(Counter("hmacfs_resumable_uploads_created_total",
                                               "Resumable uploads created (tus, ietf).", ("protocol",)))
        self.resumable_completed = r.add(Counter("hmacfs_resumable_uploads_completed_total",
                                                 "Resumable uploads committed (tus, ietf).", ("protocol",)))
        self.resumable_takeovers = r.add(Counter("hmacfs_resumable_takeovers_total",
                                                 "Requests that took an upload over from a stale one."))
        self.resumable_removed = r.add(Counter("hmacfs_resumable_uploads_expired_total",
                                               "Unfinished resumable uploads removed on expiry."))
        self.denied_requests = r.add(Counter("hmacfs_denied_requests_total",
                                             "Requests refused by allowips or denyips.", ("list",)))
        self.banned_requests = r.add(Counter("hmacfs_banned_requests_total",
                                             "Requests refused because their address is banned."))
        self.bans = r.add(Counter("hmacfs_bans_total", "Addresses banned after repeated auth failures."))
        self.ratelimited = r.add(Counter("hmacfs_ratelimited_total", "Requests refused by the rate limit (429).",
                                         ("scope",)))
        self.scans = r.add(Counter("hmacfs_virus_scans_total", "Virus scans by result (clean, infected, "
                                   "unscanned, too_large, error).", ("result",)))
        self.thumbnails = r.add(Counter("hmacfs_thumbnails_total", "Thumbnails by result (made, failed: a broken "
                                        "or hostile image, or ImageMagick's limits).", ("result",)))
        self.address_changes = r.add(Counter("hmacfs_network_address_changes_total",
                                             "Host addresses added or removed (networkevents).", ("kind",)))

    def watch_redis(self, health) -> None:
        """`hmacfs_redis_up`: what the last health-check ping said (services/redisconn.py)."""
        self.registry.add(Gauge("hmacfs_redis_up", "1 when the last Redis ping was answered (cluster mode).",
                                fn=lambda: 1.0 if health.up else 0.0))

    def watch_storage(self, app) -> None:
        """Gauges of the store and the metadata (no uploader in any label), read at most every
        few seconds however often /metrics is scraped: the sums are queries over whole tables,
        and they hold the metadata lock while they run."""
        r = self.registry
        snap = StorageSnapshot(app)
        r.add(Gauge("hmacfs_free_bytes", "Free bytes on the storage filesystem (for unprivileged users).",
                    fn=app.store.free_bytes))
        r.add(Gauge("hmacfs_stored_files", "Stored files and kept versions.", fn=lambda: snap.value("files")))
        r.add(Gauge("hmacfs_stored_bytes", "Logical bytes of stored files and kept versions.",
                    fn=lambda: snap.value("bytes")))
        r.add(Gauge("hmacfs_uploaders", "Uploaders with at least one stored file.",
                    fn=lambda: snap.value("uploaders")))
        if app.quotas is not None and app.quotas.total:
            r.add(Gauge("hmacfs_quota_global_bytes", "The global quota ([quotas] global).",
                        fn=lambda: app.quotas.total))
        if app.config.deduplication.enabled:
            r.add(Gauge("hmacfs_dedup_blobs", "Distinct contents in the blob store.", fn=lambda: snap.value("blobs")))
            r.add(Gauge("hmacfs_dedup_blob_bytes", "Bytes held once in the blob store (plaintext sizes).",
                        fn=lambda: snap.value("blob_bytes")))
            r.add(Gauge("hmacfs_dedup_logical_bytes", "Bytes of every reference to a blob, as if stored each time.",
                        fn=lambda: snap.value("logical")))
            r.add(Gauge("hmacfs_dedup_saved_bytes", "Bytes deduplication saves (logical minus held).",
                        fn=lambda: snap.value("logical") - snap.value("blob_bytes")))
        r.add(Gauge("hmacfs_ready_warm", "1 once the precache warm-up is done (or off).",
                    fn=lambda: 1.0 if app.warm.is_set() else 0.0))
        r.add(Gauge("hmacfs_resumable_uploads_in_progress", "Resumable uploads (tus, ietf) begun and not finished.",
                    fn=lambda: snap.value("partials")))
        # The pool and the readiness probe are built after this call: read them at scrape time.
        r.add(Gauge("hmacfs_upload_workers", "Upload workers in the pool (numworkers or the auto-adjusted count).",
                    fn=lambda: app.gate.workers))
        r.add(Gauge("hmacfs_upload_queue_capacity", "Uploads that may wait for a worker (uploadqueuesize).",
                    fn=lambda: app.gate.queue_size))
        r.add(Gauge("hmacfs_ready", "1 when every readiness check passes (what /ready answers 200 to).",
                    fn=lambda: 1.0 if app.readiness.ready() else 0.0))
        r.add(Gauge("hmacfs_ready_check", "Each readiness check: 1 passing, 0 failing.", ("check",),
                    fn=lambda: [((c.name,), 1.0 if c.ok else 0.0) for c in app.readiness.checks()]))

    def render(self) -> str:
        return self.registry.render()


class StorageSnapshot:
    """Storage totals from the metadata, computed once per `max_age` seconds."""

    def __init__(self, app, max_age: float = 5.0) -> None:
        self.app = app
        self.max_age = max_age
        self._at = -max_age
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self) -> dict[str, float]:
        """The totals; the last ones read while the metadata cannot answer (Redis away: a
        scrape must not wait for it, nor fail)."""
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self.max_age:
                self._at = now
                health = getattr(self.app, "redis_health", None)
                if health is None or health.up is not False:
                    try:
                        self._values = self._read()
                    except Exception as e:
                        log.debug("metrics: storage totals not read (%s); the last ones stand", e)
            return self._values

    def value(self, name: str) -> float:
        """One total (NaN until the metadata has answered once)."""
        return self.get().get(name, math.nan)

    def _read(self) -> dict[str, float]:
        meta = self.app.meta
        values = {"files": meta.total_files(), "bytes": meta.total_bytes(),
                  "uploaders": meta.uploader_count(), "partials": len(meta.partial_ids())}
        if self.app.config.deduplication.enabled:
            values["blobs"], values["blob_bytes"], values["logical"] = meta.blob_stats()
        return values
