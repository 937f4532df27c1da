"""The app factory: the one place where concrete backends are chosen and wired together.

Handlers see only `App`'s attributes (store, meta, pipeline, gate, metrics, secrets), so
a Redis metadata store or an S3 store plugs in here without touching them.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from .config import Config
from .handlers.delete import handle_delete, handle_options
from .handlers.download import handle_get
from .handlers.service import handle_health, handle_metrics, handle_ready
from .handlers.upload import handle_put
from .http.exchange import CorsPolicy
from .http.router import Router
from .meta import SqliteMeta
from .pipeline import UploadPipeline
from .policy.paths import MAX_PATH_BYTES
from .services.hotcache import HotFiles
from .services.metrics import ServerMetrics
from .services.workers import UploadGate, auto_workers
from .storage.local import LocalStore

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
        self.meta = SqliteMeta(os.path.join(self.store.internal, "meta.sqlite3"))
        self.pipeline = UploadPipeline(self.store, self.meta)
        self.hot = HotFiles()
        self.metrics = metrics or ServerMetrics()
        self.workers = (auto_workers() if config.server.autoadjustworkers else config.workers.numworkers)
        self.gate = UploadGate(self.workers, config.workers.uploadqueuesize, self.metrics)
        self.cors = CorsPolicy(config.cors.allowedorigins)
        self.draining = False
        self.router = self._routes()

    def _routes(self) -> Router:
        router = Router(self.prefix, min(MAX_PATH_BYTES, self.store.max_path_bytes))
        router.add_service("/health", handle_health)
        router.add_service("/ready", handle_ready)
        if self.config.server.metricsenabled and self.metrics_on_main_port:
            router.add_service(self.config.server.metricspath, handle_metrics)
        router.add_file_route("PUT", handle_put)
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
        changed = [s for s in config.sections if s != "security" and
                   config.sections[s] != self.config.sections[s]]
        if changed:
            log.warning("config reload: changes in %s take effect after a restart", ", ".join(sorted(changed)))
        log.info("config reloaded: %d secret(s) active", len(self.secrets))
