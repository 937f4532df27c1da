"""DELETE (signed), OPTIONS (CORS preflight) and the service endpoints (health, readiness, metrics)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .. import auth
from ..errors import HTTPError
from ..exchange import Exchange
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .common import auth_failures_counted, request_facts

if TYPE_CHECKING:
    from ..app import App

FILE_METHODS = "OPTIONS, HEAD, GET, PUT, DELETE"


def handle_delete(app: App, ex: Exchange, signed_path: str) -> None:
    facts = request_facts(app, ex, signed_path, None)
    with auth_failures_counted(app):
        auth.authorize_delete(app.secrets, app.delete_secret, facts, time.time())
    if not app.store.delete(signed_path):
        app.meta.delete(signed_path)
        raise HTTPError(404, "not found")
    app.meta.delete(signed_path)
    app.hot.discard(signed_path)
    app.metrics.deletes.inc()
    ex.send(204)


def handle_options(app: App, ex: Exchange, signed_path: str) -> None:
    """CORS preflight: no authentication (browsers send none), never touches storage."""
    ex.send(204, [("Allow", FILE_METHODS), *ex.cors.preflight(FILE_METHODS)])


def handle_health(app: App, ex: Exchange) -> None:
    ex.send(200, [("Cache-Control", "no-store")], b"ok\n", "text/plain; charset=utf-8")


def handle_ready(app: App, ex: Exchange) -> None:
    if app.draining:
        raise HTTPError(503, "shutting down", {"Retry-After": "5"})
    handle_health(app, ex)


def handle_metrics(app: App, ex: Exchange) -> None:
    ex.send(200, [("Cache-Control", "no-store")], app.metrics.render().encode(), METRICS_CONTENT_TYPE)
