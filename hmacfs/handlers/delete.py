"""DELETE (signed) on file URLs."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .. import auth
from ..errors import HTTPError
from ..http.exchange import Exchange
from .common import auth_failures_counted, request_facts

if TYPE_CHECKING:
    from ..app import App


def handle_delete(app: App, ex: Exchange, signed_path: str) -> None:
    facts = request_facts(app, ex, signed_path, None)
    with auth_failures_counted(app):
        auth.authorize_delete(app.secrets, app.delete_secret, facts, time.time())
    if not app.catalog.remove(signed_path):  # the file, its versions and its blob references
        raise HTTPError(404, "not found")
    app.metrics.deletes.inc()
    ex.send(204)

