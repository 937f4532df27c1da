"""Service endpoints: liveness, readiness and the Prometheus exposition.

`/health` answers 200 while the process serves requests at all (a liveness probe restarts
it otherwise, so it checks nothing that a restart would not fix). `/ready` lists its checks
(services/readiness.py) and answers 503 when one fails, so a balancer stops sending uploads
to a node whose disk went read-only. The metrics path may be guarded by an allow-list and
a bearer token (`metricsallowips`, `metricstoken`), on its own listener and on the main port.
"""
from __future__ import annotations

import functools
import hmac
import json
from typing import TYPE_CHECKING

from ..errors import HTTPError
from ..http.clientaddr import Network, in_networks, parse_networks
from ..http.exchange import Exchange
from ..services.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from ..app import App


def handle_health(app: App, ex: Exchange) -> None:
    ex.send(200, [("Cache-Control", "no-store")], b"ok\n", "text/plain; charset=utf-8")


def handle_ready(app: App, ex: Exchange) -> None:
    """200 when every check passes, else 503; the JSON body names each check either way."""
    checks = app.readiness.checks()
    ready = all(c.ok for c in checks)
    body = {"ready": ready, "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}}
    headers = [("Cache-Control", "no-store")]
    if not ready:  # a warm-up ends soon; anything else takes an operator or a restart
        only_warming = all(c.ok or c.name == "warmup" for c in checks)
        headers.append(("Retry-After", "1" if only_warming else "5"))
    ex.send(200 if ready else 503, headers, (json.dumps(body) + "\n").encode(), "application/json")


def handle_metrics(app: App, ex: Exchange) -> None:
    authorize_metrics(app, ex)
    ex.send(200, [("Cache-Control", "no-store")], app.metrics.render().encode(), METRICS_CONTENT_TYPE)


@functools.lru_cache(maxsize=4)
def _networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return parse_networks(cidrs)


def authorize_metrics(app: App, ex: Exchange) -> None:
    """403 for an address outside `metricsallowips`, then 401 without the `metricstoken`.

    The allow-list goes first so an address that may never scrape learns nothing about the
    token. Unix-socket peers have no address and pass the list (the socket's file mode is their
    gate). The token is compared in constant time on bytes and never logged or echoed."""
    server = app.config.server
    allowed = tuple(server.metricsallowips)
    client = ex.req.client
    if allowed and client != "unix" and not in_networks(client, _networks(allowed)):
        raise HTTPError(403, "metrics are not available to this address")
    token = server.metricstoken
    if token:
        scheme, _, given = ex.req.headers.get("authorization", "").strip().partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())):
            raise HTTPError(401, "a bearer token is needed for the metrics", {"WWW-Authenticate":
                                                                            'Bearer realm="hmacfs metrics"'})
