"""A hand-written router: exact service paths first, then file routes under the URL prefix.

Service endpoints always exist under `/.hmacfs/` (a name no upload can take: dot segments
are refused), and also at `/health`, `/ready` and the metrics path when those lie outside
the prefix, so they can never shadow an uploaded file.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import HTTPError
from ..policy.paths import MAX_PATH_BYTES, signed_path
from .exchange import Exchange

if TYPE_CHECKING:
    from ..app import App

_RESOURCE_NAME = re.compile(rb"[A-Za-z0-9_-]{1,64}")
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
        self.resource_routes: list[tuple[bytes, FileHandler]] = []

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

    def add_resource_route(self, path_prefix: str, handler: FileHandler) -> None:
        """Every method on `path_prefix<name>` goes to `handler` with the name (ASCII letters,
        digits, `-` and `_`; 404 otherwise): resources that are not files, such as uploads in
        progress. The prefix must be one no file path can take (a dot segment)."""
        self.resource_routes.append((path_prefix.encode(), handler))

    def log_path(self, raw_path: bytes) -> bytes:
        """The path as the access log may show it: a resource name is a capability (like a
        signature, which the log never shows), so only its first 8 characters are kept."""
        for resource_prefix, _handler in self.resource_routes:
            if raw_path.startswith(resource_prefix) and len(raw_path) > len(resource_prefix) + 8:
                return raw_path[:len(resource_prefix) + 8] + b"..."
        return raw_path

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
        for resource_prefix, resource_handler in self.resource_routes:
            if req.raw_path.startswith(resource_prefix):
                name = req.raw_path[len(resource_prefix):]
                if not _RESOURCE_NAME.fullmatch(name):
                    raise HTTPError(404, "not found")
                resource_handler(app, ex, name.decode("ascii"))
                return
        path = signed_path(req.raw_path, self.prefix, self.max_path_bytes)  # 404 outside, 400 unsafe, 414
        file_handler: Optional[FileHandler] = self.file_routes.get(req.method)
        if file_handler is None:
            raise HTTPError(405, "method not allowed", {"Allow": self.allowed_file_methods()})
        file_handler(app, ex, path)
