"""Headless Chromium runs tus-js-client's browser bundle against hmacfs from another origin.

Why a browser: in a page every tus request is cross-origin (the web chat app and hmacfs are
on different hosts), so PATCH and HEAD with the tus/IETF headers each need a CORS preflight,
and the client can only resume if the browser lets it read Location and Upload-Offset
(Access-Control-Expose-Headers). Node cannot catch a gap there; only a browser enforces it.

The page (served by a small stdlib server on its own loopback port, like
test_cors_browser.py) builds a ~3 MB File in the page, uploads it in 512 KiB chunks and aborts
after two chunks; tus-js-client has stored the upload URL in localStorage. The page then
reloads itself, as a user who closed the tab and came back would; the fresh page finds the
upload with findPreviousUploads(), resumes it (HEAD, then PATCH from the server's offset),
downloads the file from hmacfs and reports its SHA-256 (crypto.subtle.digest). Once for tus
1.0.0 and once for each IETF draft mode of the pinned tus-js-client (tests/js/package.json).
"""
from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support import chromium
from tests.support.client import request, signed_put, url_path
from tests.support.hmacfs_proc import HmacfsProcess
from tests.support.tusjs import PACKAGE, need_pinned_tus_js

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

BUNDLE = PACKAGE / "dist" / "tus.min.js"
CHUNK = 512 * 1024
SIZE = 3 * 1024 * 1024 + 4321
ABORT_AFTER = 2  # chunks acknowledged before the first page aborts
SEED = 0x2545F491
MODES = ["tus-v1", "ietf-draft-05", "ietf-draft-03"]
Report = tuple[dict[str, Any], HmacfsProcess]  # what the pages saw, and the hmacfs they talked to

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>hmacfs tus-js-client check</title>
<script src="/tus.min.js"></script>
<body>
<script>
const cfg = %(config)s;
const step = new URLSearchParams(location.search).get("step") || "start";

// xorshift32, the same generator the test runs in Python: the page makes its own bytes.
function makeFile() {
  const words = new Uint32Array(Math.ceil(cfg.size / 4));
  let x = cfg.seed >>> 0;
  for (let i = 0; i < words.length; i++) {
    x = (x ^ (x << 13)) >>> 0;
    x = (x ^ (x >>> 17)) >>> 0;
    x = (x ^ (x << 5)) >>> 0;
    words[i] = x;
  }
  const bytes = new Uint8Array(words.buffer, 0, cfg.size);
  // Fixed name and date: tus-js-client's fingerprint must match after the reload.
  return new File([bytes], "holiday.bin", {type: "application/octet-stream", lastModified: 1700000000000});
}
async function sha256(blob) {
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return Array.from(new Uint8Array(digest), b => b.toString(16).padStart(2, "0")).join("");
}
const SENT = ["Upload-Offset", "Upload-Length", "Upload-Complete", "Upload-Draft-Interop-Version", "Tus-Resumable"];
const RECEIVED = ["Location", "Upload-Offset", "Upload-Length", "Upload-Complete", "Upload-Draft-Interop-Version",
                  "Tus-Resumable"];
function pick(get, names) {
  const out = {};
  for (const name of names) { const v = get(name); if (v !== null && v !== undefined) out[name] = String(v); }
  return out;
}
// One tus upload until it succeeds, fails, or `abortAfter` chunks were acknowledged.
function upload(file, mode, abortAfter, resume) {
  return new Promise(resolve => {
    const seen = {mode, requests: [], chunks: [], firstProgress: null};
    let up = null;
    const timer = setTimeout(() => resolve({...seen, outcome: "error", error: "no end within 40 s"}), 40000);
    const end = (outcome, extra = {}) => { clearTimeout(timer); resolve({...seen, outcome, url: up.url, ...extra}); };
    up = new tus.Upload(file, {
      endpoint: cfg.modes[mode].endpoint,
      protocol: mode,
      chunkSize: cfg.chunkSize,
      retryDelays: null,
      onBeforeRequest: req => {
        seen.requests.push({method: req.getMethod(), sent: pick(h => req.getHeader(h), SENT)});
      },
      onAfterResponse: (req, res) => {
        const entry = seen.requests.findLast(r => r.method === req.getMethod() && r.status === undefined);
        if (entry) { entry.status = res.getStatus(); entry.received = pick(h => res.getHeader(h), RECEIVED); }
      },
      onProgress: sent => { if (seen.firstProgress === null) seen.firstProgress = sent; },
      onChunkComplete: (size, accepted) => {
        seen.chunks.push(accepted);
        if (abortAfter && seen.chunks.length >= abortAfter) up.abort().then(() => end("aborted"));
      },
      onSuccess: () => end("success"),
      onError: err => end("error", {error: String(err)}),
    });
    if (!resume) { up.start(); return; }
    up.findPreviousUploads().then(previous => {
      seen.previous = previous.map(p => p.uploadUrl);
      if (previous.length) up.resumeFromPreviousUpload(previous[0]);
      up.start();
    }, err => end("error", {error: "findPreviousUploads: " + err}));
  });
}
async function report(body) {
  await fetch("/result", {method: "POST", body: JSON.stringify(body)});
}
async function main() {
  const out = {step, origin: location.origin, results: {}};
  try {
    const file = makeFile();
    if (step === "start") {
      localStorage.clear();
      out.inputSha = await sha256(file);
      for (const mode of Object.keys(cfg.modes)) out.results[mode] = await upload(file, mode, cfg.abortAfter, false);
      await report({...out, final: false});
      location.replace("/page.html?step=resume");  // the tab is closed and opened again
      return;
    }
    for (const mode of Object.keys(cfg.modes)) {
      const seen = await upload(file, mode, 0, true);
      try {
        const r = await fetch(cfg.modes[mode].getUrl, {cache: "no-store"});
        seen.download = {status: r.status, sha: await sha256(await r.blob())};
      } catch (e) {
        seen.download = {error: String(e)};
      }
      out.results[mode] = seen;
    }
  } catch (e) {
    out.exception = String(e && e.stack || e);
  }
  await report({...out, final: true});
}
main();
</script>
"""


def xorshift_bytes(size: int, seed: int) -> bytes:
    """The bytes the page generates (same xorshift32, little-endian words as Uint32Array on x86/ARM)."""
    x = seed
    words = bytearray()
    for _ in range((size + 3) // 4):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        words += x.to_bytes(4, "little")
    return bytes(words[:size])


def need_bundle() -> Path:
    """tus-js-client's browser bundle at the pinned version; skip (fail under HMACFS_REQUIRE_ALL=1)
    when `npm ci` has not run in tests/js."""
    need_pinned_tus_js(BUNDLE)
    return BUNDLE


class PageServer(chromium.PageServer):
    """Serves the page and tus-js-client's bundle, and collects the reports of both page loads."""

    def __init__(self, config: dict[str, Any], bundle: bytes) -> None:
        super().__init__(PageHandler, config)
        self.bundle = bundle
        self.reports: dict[str, dict[str, Any]] = {}
        self.finished = threading.Event()


class PageHandler(chromium.PageHandler):
    server: PageServer
    extra_headers = {"Cache-Control": "no-store"}

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path == "/page.html":
            self.send_page(PAGE)
        elif path == "/tus.min.js":
            self._send(200, "text/javascript; charset=utf-8", self.server.bundle)
        else:
            self._send(404, "text/plain", b"not here")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.reports[body.get("step", "?")] = body
        if body.get("final", True):
            self.server.finished.set()
        self._send(204, "text/plain", b"")


def file_path(mode: str) -> str:
    return f"browser-tus/{mode}/holiday.bin"


@pytest.fixture(scope="module")
def browser_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Report]:
    """Run both page loads once in Chromium against one hmacfs; every test reads a part of the reports."""
    chromium_bin = chromium.need_chromium()
    bundle = need_bundle().read_bytes()
    workdir = tmp_path_factory.mktemp("tusbrowser")
    hm = HmacfsProcess(workdir / "hmacfs")
    try:
        hm.start()
        config = {
            "size": SIZE, "seed": SEED, "chunkSize": CHUNK, "abortAfter": ABORT_AFTER,
            "modes": {mode: {"endpoint": hm.base_url + signed_put(hm.prefix, hm.secret, file_path(mode), SIZE),
                             "getUrl": hm.base_url + url_path(hm.prefix, file_path(mode))} for mode in MODES},
        }
        page = PageServer(config, bundle)
        with chromium.open_in_chromium(chromium_bin, page, workdir) as log_path:
            if not page.finished.wait(120):
                pytest.fail(f"the page did not finish within 120 s; reports: {json.dumps(page.reports)[-4000:]}"
                            + chromium.log_tails(log_path, hm))
            yield page.reports, hm
    finally:
        hm.close()


@pytest.fixture(scope="module")
def expected_sha() -> str:
    return hashlib.sha256(xorshift_bytes(SIZE, SEED)).hexdigest()


def _context(reports: dict[str, Any], hm: HmacfsProcess) -> str:
    return f"pages saw: {json.dumps(reports, indent=1)[-8000:]}\n--- hmacfs log ---\n{hm.log()[-3000:]}"


def test_page_generates_the_bytes_the_test_expects(browser_report: Report, expected_sha: str) -> None:
    """Guards the comparison itself: the in-page generator and the Python one agree."""
    reports, hm = browser_report
    assert reports.get("start", {}).get("inputSha") == expected_sha, _context(reports, hm)


@pytest.mark.parametrize("mode", MODES)
def test_first_page_creates_and_aborts_cross_origin(browser_report: Report, mode: str) -> None:
    """The POST (and its preflight) passes, the page can read Location (else tus-js-client has no URL)
    and the two PATCH answers' Upload-Offset."""
    reports, hm = browser_report
    assert reports.get("start", {}).get("origin") not in (None, hm.base_url), "the page must be cross-origin"
    seen = reports.get("start", {}).get("results", {}).get(mode, {})
    assert seen.get("outcome") == "aborted", _context(reports, hm)
    assert seen["chunks"] == [CHUNK * (i + 1) for i in range(ABORT_AFTER)], _context(reports, hm)
    creation = seen["requests"][0]
    assert (creation["method"], creation.get("status")) == ("POST", 201), _context(reports, hm)
    assert creation["received"].get("Location", "").startswith(hm.prefix + ".uploads/"), _context(reports, hm)
    assert seen["url"].startswith(hm.base_url + hm.prefix + ".uploads/"), _context(reports, hm)


@pytest.mark.parametrize("mode", MODES)
def test_reloaded_page_resumes_from_the_stored_url(browser_report: Report, mode: str) -> None:
    """After the reload tus-js-client finds the URL in localStorage and asks hmacfs (HEAD) where to go
    on: it continues at the acknowledged offset, not at 0, and never creates a second upload."""
    reports, hm = browser_report
    first = reports.get("start", {}).get("results", {}).get(mode, {})
    seen = reports.get("resume", {}).get("results", {}).get(mode, {})
    assert seen.get("outcome") == "success", _context(reports, hm)
    assert seen.get("previous") == [first.get("url")], _context(reports, hm)
    methods = [r["method"] for r in seen["requests"]]
    assert methods[0] == "HEAD" and "POST" not in methods, _context(reports, hm)
    offset = str(CHUNK * ABORT_AFTER)
    assert seen["requests"][0]["received"].get("Upload-Offset") == offset, _context(reports, hm)
    assert seen["requests"][1]["sent"].get("Upload-Offset") == offset, _context(reports, hm)
    assert seen["firstProgress"] == CHUNK * ABORT_AFTER, _context(reports, hm)
    assert seen["chunks"][-1] == SIZE, _context(reports, hm)


@pytest.mark.parametrize("mode", MODES)
def test_downloaded_bytes_match(browser_report: Report, expected_sha: str, mode: str) -> None:
    """What the page downloads (cross-origin GET) and what hmacfs stores are the bytes the page made."""
    reports, hm = browser_report
    seen = reports.get("resume", {}).get("results", {}).get(mode, {})
    assert seen.get("download") == {"status": 200, "sha": expected_sha}, _context(reports, hm)
    got = request(hm.port, "GET", url_path(hm.prefix, file_path(mode)))
    assert got.status == 200 and hashlib.sha256(got.body).hexdigest() == expected_sha
