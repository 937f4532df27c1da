"""Facts every file handler derives from a request the same way."""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, ContextManager, Iterator, Optional

from ..auth import RequestFacts
from ..errors import HTTPError
from ..http.clientaddr import peer_key
from ..http.exchange import Exchange
from ..policy.guard import mark_auth_failure

if TYPE_CHECKING:
    from ..app import App


def request_facts(app: App, ex: Exchange, signed_path: str, content_length: Optional[int],
                  method: Optional[str] = None, content_type: Optional[str] = None) -> RequestFacts:
    """The facts a signature is checked against; a resumable upload's creation passes the
    slot's method (PUT), its total length and the type it declares instead of the request's."""
    req = ex.req
    return RequestFacts(method=method or req.method, signed_path=signed_path, full_path=app.prefix + signed_path,
                        query=req.query, authorization=req.headers.get("authorization", ""),
                        content_type=content_type if content_type is not None else req.headers.get("content-type"),
                        content_length=content_length)


AUTH_FAILURE_STATUSES = frozenset({400, 401, 403, 410})


def worker_slot(app: App, ex: Exchange, size_hint: Optional[int]) -> ContextManager[memoryview]:
    """An upload worker for this request: counted by the client's address (fairness), given
    up while queued when the client goes away."""
    client = ex.req.client
    return app.gate.slot(size_hint, None if client == "unix" else peer_key(client), ex.client_gone)


@contextmanager
def auth_failures_counted(app: App) -> Iterator[None]:
    """Count every signature check that refuses the request, and mark its error: the connection,
    which knows the client and the request line, reports it to the guard (the fail2ban line,
    bans), so handlers need not know about either."""
    try:
        yield
    except HTTPError as err:
        if err.status in AUTH_FAILURE_STATUSES:
            app.metrics.auth_failures.inc(1, str(err.status))
            mark_auth_failure(err)
        raise

