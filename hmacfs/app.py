"""The app factory: the one place where concrete backends are chosen and wired together.

Handlers see only `App`'s attributes (store, meta, pipeline, gate, metrics, secrets), so
a Redis metadata store or an S3 store plugs in here without touching them.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Optional, Union

from .catalog import Catalog
from .config import Config
from .errors import HTTPError, StartupError
from .handlers.delete import handle_delete
from .handlers.download import handle_get
from .handlers.partial import RESOURCE_DIR
from .handlers.resumable import handle_options, handle_post, handle_put, handle_resource
from .handlers.service import handle_health, handle_metrics, handle_ready
from .http.exchange import CorsPolicy
from .http.router import Router
from .meta import SqliteMeta
from .pipeline import PathLocks, UploadPipeline
from .policy.guard import Guard, GuardSettings
from .policy.paths import MAX_PATH_BYTES
from .policy.quotas import QuotaLimits
from .resumable import ResumableUploads, Writers
from .services.clamav import Scanner, parse_address, startup_check
from .services.hotcache import HotFiles
from .services.janitor import Janitor
from .services.lastseen import LastSeen
from .services.metrics import ServerMetrics
from .services.precache import precache
from .services.readiness import Readiness
from .services.workers import UploadGate, WorkerTuner
from .storage.blobs import BlobStore
from .storage.local import LocalStore
from .storage.partials import PartialFiles

if TYPE_CHECKING:
    from .objectpipeline import ObjectPipeline

log = logging.getLogger("hmacfs")


class App:
    """Everything a request handler may use, built from one Config."""

    def __init__(self, config: Config, metrics: Optional[ServerMetrics] = None) -> None:
        self.config = config
        self.prefix = config.urlprefix
        self.secrets = config.secrets
        self.jwt_secrets = config.jwt_secrets
        self.delete_secret = config.security.deletesecret
        self.store = LocalStore(config.server.storagepath)
        swept = self.store.sweep_temp()
        if swept:
            log.info("removed %d incomplete upload(s) left by a previous run", swept)
        # Cluster mode: shared state in Redis (metadata, bans, limits, the janitor's lease).
        self.redis = connect_redis(config) if config.redis.redisenabled else None
        if self.redis is not None:
            from .meta.redis import RedisMeta

            self.meta = RedisMeta(self.redis, config.redis.rediskeyprefix)
            try:
                self.meta.check_schema()
            except HTTPError as e:  # Redis not there yet: requests get 503 until it is
                log.warning("redis: not reachable at start (%s); requests that need shared state get 503 until "
                            "it is", e.__cause__ or e)
        else:
            self.meta = SqliteMeta(os.path.join(self.store.internal, "meta.sqlite3"))
        self.keyring = load_keyring(config) if config.encryption.enabled else None
        # The S3 backend: files are objects the rows name; the local store keeps the working state.
        self.objects = build_object_store(config) if config.storage.backend == "s3" else None
        dedup = config.deduplication
        self.blobs = (BlobStore(dedup.directory or os.path.join(self.store.internal, "blobs"), self.meta,
                                self.store.root) if dedup.enabled and self.objects is None else None)
        if self.blobs is not None and not self.blobs.linkable:
            log.warning("deduplication directory %s is on another filesystem than the store: paths are "
                        "recorded as references to their blob (no hard links)", self.blobs.directory)
        self.hot = HotFiles()
        self.last_seen = LastSeen() if self.redis is not None else None
        locks = PathLocks()  # commits and removals of one path take turns
        object_blobs = None
        if self.objects is not None:  # also with dedup off: rows written while it was on still count blobs
            from .storage.objects import ObjectBlobs

            object_blobs = ObjectBlobs(self.objects, self.meta)
        self.catalog = Catalog(self.store, self.meta, self.blobs, on_remove=self.hot.discard, locks=locks,
                               objects=self.objects, object_blobs=object_blobs)
        if self.last_seen is not None:
            self.catalog.on_remove.append(self.last_seen.forget)
        versioning = config.versioning
        keep_versions = versioning.maxversions if versioning.enableversioning else None
        self.pipeline: Union[UploadPipeline, ObjectPipeline]
        if self.objects is not None:
            from .objectpipeline import ObjectPipeline  # the S3 stack loads only when it is used

            self.pipeline = ObjectPipeline(self.objects, self.meta, keep_versions, self.keyring, locks=locks,
                                           blobs=object_blobs, dedup=dedup.enabled)
        else:
            self.pipeline = UploadPipeline(self.store, self.meta, self.blobs, keep_versions, self.keyring, locks=locks)
        if self.last_seen is not None:
            self.pipeline.on_commit.append(self.last_seen.remember)
        q = config.quotas
        self.quotas = QuotaLimits(q.peruser, q.perday, q.total, q.identity) if q.enabled else None
        self.file_ttl = config.server.filettl if config.server.filettlenabled else None
        self.metrics = metrics or ServerMetrics()
        self.metrics.watch_storage(self)
        uploads = config.uploads
        self.resumable = build_resumable(self) if uploads.resumableuploadsenabled else None
        clamav = config.clamav
        self.scanner = (Scanner(parse_address(clamav.clamavsocket), clamav.numscanworkers, clamav.scanfileextensions,
                                clamav.maxscansize, clamav.failopen, clamav.largefiles, self.metrics)
                        if clamav.clamavenabled else None)
        self.janitor = Janitor(self.store, self.meta, self.catalog, self.blobs, config.server.cleanupinterval,
                               max(config.timeouts.readtimeout, 60.0) + 60.0, self.metrics, self.resumable)
        self.janitor.objects, self.janitor.object_blobs = self.objects, object_blobs
        if self.redis is not None:
            from .services.redisconn import Lease

            self.janitor.lease = Lease(self.redis, config.redis.rediskeyprefix + "lease:janitor",
                                       config.server.cleanupinterval * 3)
        self.thumbnails = build_thumbnailer(self) if config.thumbnails.enabled else None
        if self.thumbnails is not None:  # made after each commit, removed with the file
            self.pipeline.on_commit.append(self.thumbnails.submit)
            self.catalog.on_remove.append(self.thumbnails.remove)
        self.warm = threading.Event()
        self.gate = UploadGate(config.workers.numworkers, config.workers.uploadqueuesize, self.metrics)
        # Sized now (from the machine with autoadjustworkers, else numworkers exactly), at SIGHUP,
        # and, when auto, while uploads keep queueing (services/workers.py).
        self.tuner = WorkerTuner(self.gate, config.server.autoadjustworkers, config.workers.numworkers,
                                 config.workers.uploadqueuesize)
        self.workers = self.gate.workers  # the start size (the encrypted-download slots below)
        # Encrypted downloads hold two segment buffers (2 MiB) each: bounded like uploads.
        self.decrypt_slots = threading.BoundedSemaphore(max(8, 2 * self.workers))
        self.cors = CorsPolicy(config.cors.allowedorigins)
        shared = (self.redis, config.redis.rediskeyprefix) if self.redis is not None else None
        self.guard = Guard(GuardSettings.from_config(config), self.meta, self.metrics, shared)  # lists, bans, limits
        self.redis_health = None
        if self.redis is not None:
            from .services.redisconn import RedisHealth

            self.redis_health = RedisHealth(self.redis, config.redis.redishealthcheckinterval)
            self.metrics.watch_redis(self.redis_health)
        self.draining = False
        self.readiness = Readiness(self)  # /ready and hmacfs_ready
        self.router = self._routes()

    def start_background(self) -> None:
        """The janitor, and the precache warm-up (listening does not wait for it)."""
        if self.redis_health is not None:
            self.redis_health.start()
        self.janitor.start()
        self.tuner.start()
        if self.thumbnails is not None:
            self.thumbnails.start()
        if self.scanner is not None:
            threading.Thread(target=startup_check, args=(self.scanner,), name="clamd-check", daemon=True).start()
        if self.config.server.precaching:
            threading.Thread(target=self._precache, name="precache", daemon=True).start()
        else:
            self.warm.set()

    def stop_background(self) -> None:
        if self.redis_health is not None:
            self.redis_health.stop()
        self.janitor.stop()
        self.tuner.stop()
        if self.thumbnails is not None:
            self.thumbnails.stop()

    def _precache(self) -> None:
        started = time.monotonic()
        try:
            files = precache(self.store, self.meta)
            log.info("precaching: %d file(s) and their directories warmed in %.1fs", files,
                     time.monotonic() - started)
        except Exception:
            log.exception("precaching failed (the server works without it)")
        finally:
            self.warm.set()

    def _routes(self) -> Router:
        router = Router(self.prefix, min(MAX_PATH_BYTES, self.store.max_path_bytes))
        router.add_service("/health", handle_health)
        router.add_service("/ready", handle_ready)
        if self.config.server.metricsenabled and self.metrics_on_main_port:
            router.add_service(self.config.server.metricspath, handle_metrics)
        router.add_file_route("PUT", handle_put)
        if self.resumable is not None:
            router.add_file_route("POST", handle_post)
            router.add_resource_route(self.prefix + RESOURCE_DIR, handle_resource)
        router.add_file_route("GET", handle_get)
        router.add_file_route("HEAD", handle_get)
        router.add_file_route("DELETE", handle_delete)
        router.add_file_route("OPTIONS", handle_options)
        return router

    @property
    def metrics_on_main_port(self) -> bool:
        ml = self.config.metrics_listen
        return ml is not None and ml.port == self.config.listen.port and not self.config.listen.unix_path

    def reload(self, config: Config) -> None:
        """SIGHUP: take new secrets (rotation); other changes need a restart and are reported."""
        self.secrets = config.secrets
        self.jwt_secrets = config.jwt_secrets
        self.delete_secret = config.security.deletesecret
        self.guard.configure(GuardSettings.from_config(config))  # IP lists, rate limits, ban rules
        if config.encryption.enabled and self.keyring is not None and config.encryption == self.config.encryption:
            try:  # a rotated keyfile: new uploads under its first key, every key readable
                self.keyring = self.pipeline.keyring = load_keyring(config)
                if self.resumable is not None:
                    self.resumable.files.keyring = self.keyring
            except StartupError as e:
                log.error("config reload: keeping the current keys: %s", e)
        # The pool: re-sized from the machine (auto), or to the new numworkers/uploadqueuesize.
        self.tuner.configure(config.server.autoadjustworkers, config.workers.numworkers,
                             config.workers.uploadqueuesize)
        changed = [s for s in config.sections if s not in ("security", "workers") and
                   config.sections[s] != self.config.sections[s]]
        if changed:
            log.warning("config reload: changes in %s take effect after a restart", ", ".join(sorted(changed)))
        log.info("config reloaded: %d secret(s) active", len(self.secrets))


def build_resumable(app: App) -> ResumableUploads:
    """The resumable-upload engine: partial bytes on local disk, or (S3 backend) as chunk
    objects any node can resume; one writer per upload in this process, or (Redis) in the
    whole cluster."""
    partials: Any
    if app.objects is not None:
        from .storage.objectpartials import ObjectPartials

        partials = ObjectPartials(app.objects, app.keyring)
    else:
        partials = PartialFiles(os.path.join(app.store.internal, "partials"), app.keyring)
    on_takeover = app.metrics.resumable_takeovers.inc
    writers: Writers
    if app.redis is not None:
        from .clusterwriters import ClusterWriters

        writers = ClusterWriters(app.redis, app.config.redis.rediskeyprefix, on_takeover=on_takeover)
    else:
        writers = Writers(on_takeover=on_takeover)
    return ResumableUploads(partials, app.meta, app.pipeline, app.store, app.config.uploads.resumableexpiry, writers)


def connect_redis(config: Config):
    """The Redis client of cluster mode (redis-py; a StartupError says how to get it)."""
    from .services.redisconn import connect

    r = config.redis
    return connect(r.redisaddr, r.redisdbindex, r.redispassword, r.rediscafile)


def build_object_store(config: Config):
    """The bucket of `[storage] backend = "s3"`, checked at start: a wrong endpoint, bucket or
    credential is a StartupError that names it (never the secret), not a 503 on every upload."""
    from .storage.objects import ObjectStore
    from .storage.s3client import S3Client, S3Error, S3Settings, resolve_credentials

    st = config.storage
    if config.thumbnails.enabled:
        raise StartupError("[thumbnails] enabled = true is not supported with backend = \"s3\" in this version: "
                           "turn it off or use backend = \"local\"")
    try:
        access, secret, token = resolve_credentials(st.s3accesskey, st.s3secretkey, os.environ,
                                                    st.s3credentialsfile or None)
        settings = S3Settings(endpoint=st.s3endpoint, bucket=st.s3bucket, region=st.s3region, access_key=access,
                              secret_key=secret, session_token=token, addressing=st.s3addressing,
                              ca_file=st.s3cafile or None)
    except ValueError as e:
        raise StartupError(f"[storage] S3: {e}") from None
    client = S3Client(settings)
    try:
        client.check_bucket()
    except (S3Error, OSError) as e:
        raise StartupError(f"[storage] S3 bucket {st.s3bucket!r} at {st.s3endpoint}: {e}") from None
    # Used as given ("hmacfs/" for a folder, "hmacfs-" for a name stem); a leading "/" is not part of a key.
    return ObjectStore(client, st.s3prefix.lstrip("/"), config.uploads.chunksize, st.s3partconcurrency)


def build_thumbnailer(app: App):
    """The thumbnailer, in its own directory (default `.hmacfs/thumbnails`): never one the
    store serves, since a thumbnail there would be reachable as an ordinary file."""
    from .services.thumbnails import Thumbnailer, parse_size

    settings = app.config.thumbnails
    directory = os.path.realpath(settings.directory or os.path.join(app.store.internal, "thumbnails"))
    root, internal = app.store.root, app.store.internal
    if (directory + os.sep).startswith(root + os.sep) and not (directory + os.sep).startswith(internal + os.sep):
        raise StartupError(f"[thumbnails] directory = {settings.directory!r} is inside the served storage: "
                           f"use a directory under {internal} or outside {root}")
    return Thumbnailer(app.store, app.meta, app.catalog, directory, parse_size(settings.size),
                       settings.thumbnailintervalscan, lambda: app.keyring, app.metrics)


def load_keyring(config: Config):
    """The encryption keys, or a StartupError that says what is wrong (never the key material)."""
    from .storage.aesgcm import CryptoUnavailable, load_libcrypto
    from .storage.encrypted import KeyfileError, load_keyfile

    try:
        load_libcrypto()
        keyring = load_keyfile(config.encryption.keyfile)
    except (CryptoUnavailable, KeyfileError) as e:
        raise StartupError(f"[encryption]: {e}") from None
    for warning in getattr(keyring, "warnings", ()):
        log.warning("[encryption] %s", warning)
    log.info("encryption at rest on: new files are written under key %r", keyring.current_id)
    return keyring
