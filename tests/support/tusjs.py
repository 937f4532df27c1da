"""The pinned tus-js-client in tests/js, as the Node tests (tests/integration/test_tus_js.py) and the
browser test (tests/browser/test_tus_browser.py) use it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest

from tests.conftest import REQUIRE_ALL
from tests.support.hmacfs_proc import REPO

JS_DIR = REPO / "tests" / "js"
PACKAGE = JS_DIR / "node_modules" / "tus-js-client"


def pinned_tus_js_version() -> str:
    """The version tests/js/package.json pins (exact, so the lock file decides what CI runs)."""
    return json.loads((JS_DIR / "package.json").read_text())["dependencies"]["tus-js-client"]


def need_pinned_tus_js(part: Optional[Path] = None) -> None:
    """Skip (or fail under HMACFS_REQUIRE_ALL=1) unless `npm ci` has installed tus-js-client in tests/js
    at the pinned version, with `part` of it when given: a stale node_modules would test a client
    nobody pinned."""
    manifest = PACKAGE / "package.json"
    installed = json.loads(manifest.read_text())["version"] if manifest.exists() else None
    if installed != pinned_tus_js_version() or (part is not None and not part.exists()):
        message = (f"needs tus-js-client {pinned_tus_js_version()} in {JS_DIR}/node_modules (found {installed}); "
                   f"run `npm ci` there (contrib/run-tests.sh does)")
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
