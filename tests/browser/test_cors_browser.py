"""Headless Chromium uploads to hmacfs from a page on another origin (what web XMPP clients do).

The page is served by a tiny stdlib server on its own loopback port; its script PUTs a
real PNG to a pre-signed hmacfs URL with fetch() (a CORS preflight, since PUT with
image/png is not a "simple" request), shows the GET URL in an <img>, and tries two PUTs
that hmacfs refuses (413 over the size limit, 403 wrong MAC). The page must be able to
read those statuses: without CORS headers on error answers the browser hides them.
Last, a PUT with `Authorization: Bearer <JWT>` as Prosody's mod_http_file_share slots
carry it, which only works if the preflight allows that header.
The page POSTs what it saw back to its own server.
"""
from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import subprocess
import threading
import time
import urllib.parse
from typing import Any, Iterator

import pytest

from tests.conftest import need_program
from tests.support.hmacfs_proc import HmacfsProcess
from tests.xmpp.httpraw import jwt_hs256, png
from tests.xmpp.procs import stop_tree, tail

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

LIMIT = 64 * 1024
JWT_SLOT = "-browserSlot0123456789ab"  # 24 base64url characters; Prosody's may start with "-"
IMAGE = png(96, 64)
Report = tuple[dict[str, Any], HmacfsProcess]  # what the page saw, and the hmacfs it talked to
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>hmacfs CORS check</title>
<body>
<script>
const cfg = %(config)s;
async function put(url, body, extra = {}) {
  try {
    const headers = {"Content-Type": "image/png", ...extra};
    const r = await fetch(url, {method: "PUT", body, headers});
    return {status: r.status, etag: r.headers.get("ETag"), body: (await r.text()).slice(0, 200)};
  } catch (e) {
    return {error: String(e)};
  }
}
function showImage(url) {
  return new Promise(resolve => {
    const img = new Image();
    const timer = setTimeout(() => resolve({error: "image did not load in 20 s"}), 20000);
    img.onload = () => {
      clearTimeout(timer);
      resolve({width: img.naturalWidth, height: img.naturalHeight});
    };
    img.onerror = () => { clearTimeout(timer); resolve({error: "img onerror"}); };
    img.src = url;
    document.body.appendChild(img);
  });
}
async function main() {
  const seen = {origin: location.origin};
  try {
    const picture = await (await fetch("/image.png")).blob();
    seen.put = await put(cfg.putUrl, picture);
    seen.img = await showImage(cfg.getUrl);
    seen.tooBig = await put(cfg.bigUrl, new Uint8Array(cfg.bigSize));
    seen.badMac = await put(cfg.badUrl, picture);
    seen.jwt = await put(cfg.jwtUrl, picture, {"Authorization": cfg.jwtAuth});
  } catch (e) {
    seen.exception = String(e);
  }
  await fetch("/result", {method: "POST", body: JSON.stringify(seen)});
}
main();
</script>
"""


def sign_v2(hm: HmacfsProcess, path: str, size: int, secret: str = "") -> str:
    """A v2 upload URL for `path` (unescaped, below the prefix) and type image/png, as Prosody signs it."""
    message = f"{path}\0{size}\0image/png".encode()
    mac = hmac.new((secret or hm.secret).encode(), message, hashlib.sha256).hexdigest()
    return f"{hm.upload_base}{urllib.parse.quote(path)}?v2={mac}"


class PageServer(http.server.ThreadingHTTPServer):
    """Serves the test page and the PNG, and receives the page's report."""

    daemon_threads = True

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(("127.0.0.1", 0), PageHandler)
        self.config = config
        self.report: dict[str, Any] = {}
        self.reported = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/page.html"


class PageHandler(http.server.BaseHTTPRequestHandler):
    server: PageServer

    def do_GET(self) -> None:
        if self.path == "/page.html":
            page = PAGE % {"config": json.dumps(self.server.config)}
            self._send(200, "text/html; charset=utf-8", page.encode())
        elif self.path == "/image.png":
            self._send(200, "image/png", IMAGE)
        else:
            self._send(404, "text/plain", b"not here")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.report.update(json.loads(body))
        self.server.reported.set()
        self._send(204, "text/plain", b"")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass


@pytest.fixture(scope="module")
def browser_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Report]:
    """Run the page once in Chromium against one hmacfs; every test reads a part of the report."""
    chromium = need_program("chromium", "chromium-browser")
    workdir = tmp_path_factory.mktemp("browser")
    hm = HmacfsProcess(workdir / "hmacfs", {"uploads": {"maxuploadsize": LIMIT}})
    page: PageServer | None = None
    browser: subprocess.Popen | None = None
    try:
        hm.start()
        now = int(time.time())
        config = {
            "putUrl": sign_v2(hm, "browser/Bildschirmfoto (ä).png", len(IMAGE)),
            "getUrl": f"{hm.upload_base}{urllib.parse.quote('browser/Bildschirmfoto (ä).png')}",
            "bigUrl": sign_v2(hm, "browser/too-big.png", LIMIT + 1),
            "bigSize": LIMIT + 1,
            "badUrl": sign_v2(hm, "browser/other.png", len(IMAGE), secret="not-the-secret"),
            "jwtUrl": f"{hm.upload_base}{JWT_SLOT}/{urllib.parse.quote('Bild (ä).png')}",
            "jwtAuth": "Bearer " + jwt_hs256(hm.secret, {
                "sub": "alice@localhost", "iat": now, "exp": now + 300, "slot": JWT_SLOT,
                "filename": "Bild (ä).png", "filesize": len(IMAGE), "filetype": "image/png"}),
        }
        page = PageServer(config)
        threading.Thread(target=page.serve_forever, daemon=True).start()
        log_path = workdir / "chromium.log"
        with open(log_path, "ab") as log:
            browser = subprocess.Popen(
                [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile'}", page.url],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if not page.reported.wait(60):
            pytest.fail(f"the page reported nothing within 60 s\n--- chromium ---\n{tail(log_path, 4000)}"
                        f"\n--- hmacfs ---\n{hm.log()[-4000:]}")
        yield page.report, hm
    finally:
        stop_tree(browser)
        if page is not None:
            page.shutdown()
            page.server_close()
        hm.close()


def _context(report: dict[str, Any], hm: HmacfsProcess) -> str:
    return f"page saw: {json.dumps(report, indent=1)}\n--- hmacfs log ---\n{hm.log()[-3000:]}"


def test_cross_origin_put_then_img_renders(browser_report: Report) -> None:
    report, hm = browser_report
    assert report.get("put", {}).get("status") == 201, _context(report, hm)
    assert report["put"].get("etag"), "ETag not exposed to the page (Access-Control-Expose-Headers)"
    assert (hm.storage / "browser" / "Bildschirmfoto (ä).png").read_bytes() == IMAGE
    assert report.get("img") == {"width": 96, "height": 64}, _context(report, hm)


def test_413_status_is_readable_cross_origin(browser_report: Report) -> None:
    report, hm = browser_report
    assert report.get("tooBig", {}).get("status") == 413, _context(report, hm)
    assert not (hm.storage / "browser" / "too-big.png").exists()


def test_403_status_is_readable_cross_origin(browser_report: Report) -> None:
    report, hm = browser_report
    assert report.get("badMac", {}).get("status") == 403, _context(report, hm)
    assert not (hm.storage / "browser" / "other.png").exists()


def test_bearer_token_put_passes_the_preflight(browser_report: Report) -> None:
    """Converse.js & co. send the file_share slot's Authorization header cross-origin."""
    report, hm = browser_report
    assert report.get("jwt", {}).get("status") == 201, _context(report, hm)
    assert (hm.storage / JWT_SLOT / "Bild (ä).png").read_bytes() == IMAGE
