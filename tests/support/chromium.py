"""Headless Chromium opening a test page that is served from an origin of its own (tests/browser).

The page comes from a small stdlib server on its own loopback port, so every request it makes
to hmacfs is cross-origin, as from a web chat client; it POSTs what it saw back to that server.
Chromium runs in a session of its own with a fresh profile, and is stopped with every helper
process it spawned.
"""
from __future__ import annotations

import contextlib
import http.server
import json
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

from tests.conftest import need_program
from tests.support.hmacfs_proc import HmacfsProcess
from tests.xmpp.procs import stop_tree, tail

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def need_chromium() -> str:
    """The Chromium binary; skip (or fail under HMACFS_REQUIRE_ALL=1) without one."""
    return need_program("chromium", "chromium-browser")


class PageServer(http.server.ThreadingHTTPServer):
    """Serves a test page (built from `config`) on a loopback port of its own, with `handler`."""

    daemon_threads = True

    def __init__(self, handler: type[PageHandler], config: dict[str, Any]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.config = config

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/page.html"


class PageHandler(http.server.BaseHTTPRequestHandler):
    """What the handlers of the page servers share: answers with a length, no request log."""

    server: PageServer
    extra_headers: dict[str, str] = {}  # sent with every answer

    def send_page(self, template: str) -> None:
        """The test page: `template` with the server's config as JSON in place of %(config)s."""
        page = template % {"config": json.dumps(self.server.config)}
        self._send(200, "text/html; charset=utf-8", page.encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in self.extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass


@contextlib.contextmanager
def open_in_chromium(chromium: str, page: PageServer, workdir: Path) -> Iterator[Path]:
    """Serve `page` from a thread and open its URL in headless Chromium (profile and log under
    `workdir`); yields the path of Chromium's log. On exit Chromium and everything it spawned
    are stopped, then the page server."""
    threading.Thread(target=page.serve_forever, daemon=True).start()
    browser: Optional[subprocess.Popen] = None
    try:
        log_path = workdir / "chromium.log"
        with open(log_path, "ab") as log:
            browser = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={workdir / 'profile'}", page.url],
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        yield log_path
    finally:
        stop_tree(browser)
        page.shutdown()
        page.server_close()


def log_tails(chromium_log: Path, hm: HmacfsProcess) -> str:
    """The ends of Chromium's and hmacfs's logs, for a failure message."""
    return f"\n--- chromium ---\n{tail(chromium_log, 4000)}\n--- hmacfs ---\n{hm.log()[-4000:]}"
