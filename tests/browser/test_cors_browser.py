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
import json
import threading
import time
import urllib.parse
from typing import Any, Iterator

import pytest

from tests.support import chromium
from tests.support.hmacfs_proc import HmacfsProcess
from tests.xmpp.httpraw import jwt_hs256, png

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

LIMIT = 64 * 1024
JWT_SLOT = "-browserSlot0123456789ab"  # 24 base64url characters; Prosody's may start with "-"
IMAGE = png(96, 64)
Report = tuple[dict[str, Any], HmacfsProcess]  # what the page saw, and the hmacfs it talked to

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


class PageServer(chromium.PageServer):
    """Serves the test page and the PNG, and receives the page's report."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(PageHandler, config)
        self.report: dict[str, Any] = {}
        self.reported = threading.Event()


class PageHandler(chromium.PageHandler):
    server: PageServer

    def do_GET(self) -> None:
        if self.path == "/page.html":
            self.send_page(PAGE)
        elif self.path == "/image.png":
            self._send(200, "image/png", IMAGE)
        else:
            self._send(404, "text/plain", b"not here")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.report.update(json.loads(body))
        self.server.reported.set()
        self._send(204, "text/plain", b"")


@pytest.fixture(scope="module")
def browser_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Report]:
    """Run the page once in Chromium against one hmacfs; every test reads a part of the report."""
    chromium_bin = chromium.need_chromium()
    workdir = tmp_path_factory.mktemp("browser")
    hm = HmacfsProcess(workdir / "hmacfs", {"uploads": {"maxuploadsize": LIMIT}})
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
        with chromium.open_in_chromium(chromium_bin, page, workdir) as log_path:
            if not page.reported.wait(60):
                pytest.fail("the page reported nothing within 60 s" + chromium.log_tails(log_path, hm))
            yield page.report, hm
    finally:
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
