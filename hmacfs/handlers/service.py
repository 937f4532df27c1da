"""Service endpoints: liveness, readiness and the Prometheus exposition."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import HTTPError
from ..http.exchange import Exchange
from ..services.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from ..app import App


def handle_health(app: App, ex: Exchange) -> None:
    ex.send(200, [("Cache-Control", "no-store")], b"ok\n", "text/plain; charset=utf-8")


def handle_ready(app: App, ex: Exchange) -> None:
    """Ready for traffic: not draining, and the precache warm-up (when on) is done."""
    if app.draining:
        raise HTTPError(503, "shutting down", {"Retry-After": "5"})
    if not app.warm.is_set():
        raise HTTPError(503, "warming up (precaching)", {"Retry-After": "1"})
    handle_health(app, ex)


def handle_metrics(app: App, ex: Exchange) -> None:
    ex.send(200, [("Cache-Control", "no-store")], app.metrics.render().encode(), METRICS_CONTENT_TYPE)
