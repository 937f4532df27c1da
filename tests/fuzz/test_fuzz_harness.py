"""Run the atheris harness (fuzz_head_router.py) briefly, as CI does: any crash fails the test.

Why a subprocess: libFuzzer owns the process (it exits when done, and on a crash it prints
the traceback and writes the input), and instrumentation must happen before hmacfs is
imported, which pytest has already done here.

Duration: HMACFS_FUZZ_SECONDS (default 15). Longer, on demand:
    HMACFS_FUZZ_SECONDS=600 .venv/bin/python -m pytest tests/fuzz
or run the script directly with any libFuzzer flags (see its docstring), e.g.
    .venv/bin/python tests/fuzz/fuzz_head_router.py -max_total_time=600
A failure shows the Python traceback and the last 3000 characters of libFuzzer's output (the input);
the crashing input is kept in the test's tmp_path as crash-<sha1>, replayable with
`.venv/bin/python tests/fuzz/fuzz_head_router.py <that file>`.
atheris is installed from requirements-test.txt on x86_64 only; without it the test is
skipped, or fails under HMACFS_REQUIRE_ALL=1.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hmacfs.app import App
from hmacfs.config import from_dict
from tests.conftest import REQUIRE_ALL

HARNESS = Path(__file__).with_name("fuzz_head_router.py")
REPO = Path(__file__).resolve().parents[2]
SECONDS = int(os.environ.get("HMACFS_FUZZ_SECONDS", "15"))


def _need_atheris() -> None:
    try:
        import atheris  # noqa: F401
    except ImportError as e:
        message = f"needs atheris (pip install -r requirements-test.txt; x86_64 only): {e}"
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.timeout(SECONDS + 120)
def test_fuzz_head_router(tmp_path: Path) -> None:
    _need_atheris()
    cmd = [sys.executable, str(HARNESS), f"-max_total_time={SECONDS}", "-rss_limit_mb=1024", "-timeout=30",
           "-print_final_stats=1", f"-artifact_prefix={tmp_path}{os.sep}", str(tmp_path / "corpus")]
    # one stream, unbuffered: atheris prints the Python traceback on stdout, libFuzzer its report on
    # stderr, and the assertion message shows them in order
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=SECONDS + 60, check=False)
    output = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:  # the traceback first (a long input's hex dump can push it out of the tail)
        start = output.rfind("=== Uncaught Python exception")
        traceback = output[start:start + 3000] + "\n...\n" if start >= 0 else ""
        pytest.fail(f"libFuzzer exit code {proc.returncode}:\n{traceback}{output[-3000:]}", pytrace=False)
    done = re.search(r"Done (\d+) runs", output)
    assert done and int(done.group(1)) > 1000, f"the harness barely ran:\n{output[-3000:]}"


# The layouts of the harness's ROUTERS, in its order: (urlprefix, metricspath on the main port, resumable)
LAYOUTS = [("/upload/", "/metrics", True), ("/", "/metrics", True), ("/a/b/", "/a/b/metrics", False)]


def _route_table(router) -> dict:
    """The same summary as the harness's route_table (that module cannot be imported here:
    atheris must instrument hmacfs before it is imported)."""
    return {"prefix": router.prefix,
            "services": {p.decode(): sorted(m) for p, (m, _h) in sorted(router.services.items())},
            "files": sorted(router.file_routes),
            "resources": [p.decode() for p, _h in router.resource_routes]}


@pytest.mark.timeout(120)
def test_the_harness_routes_are_the_apps(tmp_path: Path) -> None:
    """The harness fuzzes stub routers built the way App._routes builds the real one. If the app
    gains, loses or moves a route (a new service endpoint, a method, the upload resources), the
    stubs must follow, or the fuzzing silently stops covering it: compare both route tables."""
    _need_atheris()
    script = ("import json, fuzz_head_router as h; "
              "print(json.dumps([h.route_table(r) for r in h.ROUTERS]))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=HARNESS.parent, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=90, check=False)
    output = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, output[-3000:]
    stubs = json.loads(output.strip().splitlines()[-1])
    assert len(stubs) == len(LAYOUTS)
    for n, ((prefix, metrics_path, resumable), stub) in enumerate(zip(LAYOUTS, stubs)):
        config = from_dict({"server": {"listenport": "127.0.0.1:18080", "metricsport": "127.0.0.1:18080",
                                       "metricspath": metrics_path, "urlprefix": prefix,
                                       "storagepath": str(tmp_path / f"store{n}")},
                            "uploads": {"resumableuploadsenabled": resumable},
                            "security": {"secret": "a-long-random-test-secret"}}, environ={})
        app = App(config)
        try:
            assert _route_table(app.router) == stub, (prefix, metrics_path, resumable)
        finally:
            app.meta.close()
