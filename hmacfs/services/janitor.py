"""The janitor: removes what has outlived its purpose, in small batches, off the request path.

Strategy: one background thread wakes every `cleanupinterval` (and on demand) and does
bounded work per batch, each batch its own short metadata transaction, sleeping briefly
between batches so requests never wait long for the database:
- files past their expiry (`filettl`, the JWT `expires` claim, a v3 upload's own expiry),
  with their versions and blob references (GET already answers 410 for them);
- temp files of uploads abandoned longer than `readtimeout` (a crashed writer; the
  watchdog cuts stalled clients before that);
- upload-log rows older than a day (the per-day quota window);
- resumable uploads past `resumableexpiry` (unfinished ones with their bytes, finished ones'
  records), and partial files a crash left without a record;
- blob reference counts reconciled with the rows that reference them (a crash between a
  count and its row), and blob files that no row references.
Each run's counts go to the metrics and, when non-zero, to the log.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from ..storage.blobs import is_blob_file
from .periodic import run_every

if TYPE_CHECKING:
    from ..catalog import Catalog
    from ..meta.sqlite import SqliteMeta
    from ..resumable import ResumableUploads
    from ..storage.blobs import BlobStore
    from ..storage.local import LocalStore

log = logging.getLogger("hmacfs")
BATCH = 200
PAUSE = 0.05          # seconds between batches
ORPHAN_AGE = 3600.0   # a file without its row this old is a crash's leftover, not a commit in progress
DAY = 86400.0
OBJECT_SWEEP_EVERY = 3600.0  # S3 backend: objects no row names are looked for hourly (a pass reads every row)
OBJECT_GRACE = ORPHAN_AGE    # unnamed this long (by the sweeps' own clock): not a commit in progress
MULTIPART_GRACE = 86400.0    # an unfinished multipart upload this old is abandoned (a body may take hours)


@dataclass
class JanitorRun:
    """What one run removed or repaired."""

    expired: int = 0
    temp_files: int = 0
    orphans: int = 0
    blobs_removed: int = 0
    refs_fixed: int = 0
    partials: int = 0
    errors: list[str] = field(default_factory=list)

    def any(self) -> bool:
        return bool(self.expired or self.temp_files or self.orphans or self.blobs_removed or self.refs_fixed
                    or self.partials or self.errors)


class Janitor:
    """Periodic clean-up of one store."""

    def __init__(self, store: LocalStore, meta: SqliteMeta, catalog: Catalog, blobs: Optional[BlobStore],
                 interval: float, stale_temp_after: float, metrics=None, resumable: Optional[ResumableUploads] = None
                 ) -> None:
        self.store = store
        self.meta = meta
        self.catalog = catalog
        self.blobs = blobs
        self.interval = interval
        self.stale_temp_after = stale_temp_after
        self.metrics = metrics
        self.resumable = resumable
        # Cluster mode: a Redis lease (services/redisconn.Lease). Only its holder does the shared
        # work (expiry, the upload log, resumable records, blob counts), so it runs once in the
        # cluster; every node still sweeps its own temp files.
        self.lease = None
        self.objects = None  # the S3 backend's ObjectStore: objects no row names are swept too
        self.object_blobs = None  # and its ObjectBlobs
        self._objects_swept = 0.0
        self._named: Optional[set[str]] = None
        self.last_run: Optional[JanitorRun] = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = run_every(self.interval, self._pass, "janitor", self._stop, self._wake, "janitor run failed")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    def wake(self) -> None:
        self._wake.set()

    def _pass(self) -> None:
        self.run_once(shared=self.lease is None or self.lease.acquire())

    def run_once(self, now: Optional[float] = None, shared: bool = True) -> JanitorRun:
        """One pass; `shared`: also the work on shared state (this node holds the cluster's lease)."""
        now = time.time() if now is None else now
        run = JanitorRun()
        if shared:
            self._expire(now, run)
        self._sweep_temp(now, run)
        self._sweep_orphans(now, run)
        if shared:
            self.meta.prune_upload_log(now - DAY)
            if self.resumable is not None:
                run.partials = self.resumable.sweep(now)
            if self.blobs is not None:
                self._reconcile_blobs(run)
            if self.objects is not None and now - self._objects_swept >= OBJECT_SWEEP_EVERY:
                self._objects_swept = now
                run.orphans += self._sweep_bucket(now)
        self.last_run = run
        if self.metrics is not None:
            self.metrics.janitor_runs.inc()
            self.metrics.expired_removed.inc(run.expired)
            self.metrics.resumable_removed.inc(run.partials)
        if run.any():
            log.info("janitor: removed %d expired file(s), %d stale temp file(s), %d orphan(s), %d unreferenced "
                     "blob(s), %d expired resumable upload(s); fixed %d blob count(s)", run.expired, run.temp_files,
                     run.orphans, run.blobs_removed, run.partials, run.refs_fixed)
        return run

    def _sweep_bucket(self, now: float) -> int:
        """Objects no row names, first seen so by a pass OBJECT_GRACE ago (a blob only if still
        unreferenced under the lock), and multipart uploads first seen MULTIPART_GRACE ago."""
        from ..storage.objects import delete_released

        assert self.objects is not None
        self._named = None
        try:
            gone = self.objects.unneeded(self._object_named, OBJECT_GRACE, now)
        finally:
            self._named = None
        delete_released(self.objects, self.object_blobs, gone)
        return len(gone) + self.objects.abort_stale_uploads(MULTIPART_GRACE, now)

    def _object_named(self, key: str) -> bool:
        """Does a row need this object? Blobs by their count; upload objects by the rows' keys
        (gathered once per sweep: the rows do not index object keys)."""
        from ..storage.objects import BLOB_PREFIX

        assert self.objects is not None
        name = key[len(self.objects.prefix):]
        if name.startswith(BLOB_PREFIX):
            return self.meta.blob_refs(name[len(BLOB_PREFIX):]) > 0
        if self._named is None:
            self._named = named_objects(self.meta)
        return key in self._named

    def _expire(self, now: float, run: JanitorRun) -> None:
        while not self._stop.is_set():
            batch = self.meta.expired(now, BATCH)
            for record in batch:
                try:
                    if self.catalog.remove(record.path, expired_at=now):  # not a fresh upload in its place
                        run.expired += 1
                except OSError as e:
                    run.errors.append(f"{record.path}: {e}")
                    log.warning("janitor: could not remove expired %r: %s", record.path, e)
            if len(batch) < BATCH or run.errors:
                return
            time.sleep(PAUSE)

    def _sweep_temp(self, now: float, run: JanitorRun) -> None:
        try:
            names = os.listdir(self.store.tmp_dir)
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(self.store.tmp_dir, name)
            try:
                if now - os.lstat(path).st_mtime > self.stale_temp_after:
                    os.unlink(path)
                    run.temp_files += 1
            except FileNotFoundError:
                continue

    def _sweep_orphans(self, now: float, run: JanitorRun) -> None:
        """Files a crash left without a row: a version file linked before its row's transaction
        failed, a `.part` of a blob copy to another filesystem. Only those older than an hour
        (a commit in progress is seconds old)."""
        for dirpath, _dirs, files in os.walk(self.store.versions_dir):
            for name in files:
                path = os.path.join(dirpath, name)
                location = os.path.relpath(path, self.store.versions_dir)
                if _older(path, now, ORPHAN_AGE) and not self.meta.version_file_known(location):
                    _unlink(path, run)
        if self.blobs is not None:
            for dirpath, _dirs, files in os.walk(self.blobs.directory):
                for name in files:
                    path = os.path.join(dirpath, name)
                    if name.endswith(".part") and _older(path, now, ORPHAN_AGE):
                        _unlink(path, run)

    def _reconcile_blobs(self, run: JanitorRun) -> None:
        """Counts that disagree with the rows are set to the rows' count (a blob at 0 goes)."""
        assert self.blobs is not None
        after = ""
        while not self._stop.is_set():
            page = self.meta.blob_page(after, BATCH)
            for sha, size, _refs in page:
                with self.meta.transaction():  # commits write count and rows in one transaction
                    counted = self.meta.blob_counted_refs(sha)
                    if counted != self.meta.blob_refs(sha):
                        self.meta.set_blob_refs(sha, size, counted)
                        run.refs_fixed += 1
                        if counted == 0:
                            self._unlink_blob(sha, run)
            if len(page) < BATCH:
                break
            after = page[-1][0]
            time.sleep(PAUSE)
        self._remove_orphan_blob_files(run)

    def _remove_orphan_blob_files(self, run: JanitorRun) -> None:
        """Blob files without a row (a crash after the file, before the count): removed."""
        assert self.blobs is not None
        for dirpath, _dirs, files in os.walk(self.blobs.directory):
            for name in files:
                if not is_blob_file(self.blobs.directory, dirpath, name):
                    continue
                with self.meta.transaction():
                    if self.meta.blob_refs(name) == 0 and self.meta.blob_counted_refs(name) == 0:
                        self._unlink_blob(name, run, os.path.join(dirpath, name))

    def _unlink_blob(self, sha: str, run: JanitorRun, path: Optional[str] = None) -> None:
        assert self.blobs is not None
        try:
            os.unlink(path or self.blobs.path_of(sha))
            run.blobs_removed += 1
        except FileNotFoundError:
            pass


def named_objects(meta) -> set[str]:
    """Every object key a file or version row names (one pass over the metadata)."""
    named: set[str] = set()
    after = ""
    while True:
        page = meta.select(limit=1000, after=after)
        if not page:
            return named
        for record in page:
            if record.object_key:
                named.add(record.object_key)
            named.update(v.object_key for v in meta.versions(record.path) if v.object_key)
        after = page[-1].path


def _older(path: str, now: float, age: float) -> bool:
    """By ctime: a version file is a new link to an old inode (its mtime is the upload's), and
    making a link updates the inode's ctime."""
    try:
        return now - os.lstat(path).st_ctime > age
    except FileNotFoundError:
        return False


def _unlink(path: str, run: JanitorRun) -> None:
    try:
        os.unlink(path)
        run.orphans += 1
    except FileNotFoundError:
        pass
