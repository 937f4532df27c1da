"""A hand-written router: exact service paths first, then file routes under the URL prefix.

Service endpoints always exist under `/.hmacfs/` (a name no upload can take: dot segments
are refused), and also at `/health`, `/ready` and the metrics path when those lie outside
the prefix, so they can never shadow an uploaded file.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from ..errors import HTTPError
from ..policy.paths import MAX_PATH_BYTES, signed_path
from .exchange import Exchange

if TYPE_CHECKING:
    from ..app import App

ServiceHandler = Callable[["App", Exchange], None]
FileHandler = Callable[["App", Exchange, str], None]


class Router:
    """Maps (method, path) to a handler; raises 404/405 as HTTPError."""

    def __init__(self, prefix: Optional[str], max_path_bytes: int = MAX_PATH_BYTES) -> None:
        """`prefix=None`: a router with service endpoints only (the metrics listener);
        `max_path_bytes`: the longest signed path the store can hold (414 beyond)."""
        self.prefix = prefix
        self.max_path_bytes = max_path_bytes
        self.services: dict[bytes, tuple[frozenset[str], ServiceHandler]] = {}
        self.file_routes: dict[str, FileHandler] = {}

    def add_service(self, path: str, handler: ServiceHandler, methods: tuple[str, ...] = ("GET", "HEAD"),
                    also_unreserved: bool = True) -> None:
        """Serve `handler` at `/.hmacfs<path>`, and at `path` itself when outside the prefix."""
        paths = ["/.hmacfs" + path]
        if also_unreserved and (self.prefix is None or (not path.startswith(self.prefix)
                                                        and path + "/" != self.prefix)):
            paths.append(path)
        for p in paths:
            self.services[p.encode()] = (frozenset(methods), handler)

    def add_file_route(self, method: str, handler: FileHandler) -> None:
        self.file_routes[method] = handler

    def allowed_file_methods(self) -> str:
        return ", ".join(sorted(self.file_routes))

    def dispatch(self, app: App, ex: Exchange) -> None:
        req = ex.req
        service = self.services.get(req.raw_path)
        if service is not None:
            methods, handler = service
            if req.method not in methods:
                raise HTTPError(405, "method not allowed", {"Allow": ", ".join(sorted(methods))})
            handler(app, ex)
            return
        if self.prefix is None:
            raise HTTPError(404, "not found")
        path = signed_path(req.raw_path, self.prefix, self.max_path_bytes)  # 404 outside, 400 unsafe, 414
        file_handler: Optional[FileHandler] = self.file_routes.get(req.method)
        if file_handler is None:
            raise HTTPError(405, "method not allowed", {"Allow": self.allowed_file_methods()})
        file_handler(app, ex, path)
