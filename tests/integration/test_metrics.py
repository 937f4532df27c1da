"""The metrics as Prometheus, an operator's dashboard and a stranger on the network see them.

Why: an exporter is only useful if Prometheus's own linter accepts a scrape taken after real
traffic, if each counter moves by exactly what happened (a counter that double-counts or
misses a code path misleads every alert built on it), and if the dashboard we ship asks only
for names the server really exports. The metrics listener may carry an allow-list and a
bearer token: both are checked on the separate listener and on the main port.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import Optional

import pytest

from tests.conftest import need_program
from tests.support.client import Response, put, request, signed_put, url_path, wait_for_gauge
from tests.support.hmacfs_proc import HmacfsProcess
from tests.support.redisserver import RedisServer
from tests.unit.test_metrics import check_exposition

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "contrib" / "grafana" / "hmacfs.json"
TUS = {"Tus-Resumable": "1.0.0"}
TOKEN = "scrape-token-0123456789abcdef"


def scrape(srv: HmacfsProcess, port: Optional[int] = None, headers: Optional[dict] = None) -> str:
    r = request(port or srv.metrics_port, "GET", "/metrics", headers=headers)
    assert r.status == 200, r
    assert r.header("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    return r.body.decode()


def samples(text: str) -> dict[str, float]:
    """Every sample line: `name{labels}` -> value."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def settled(srv: HmacfsProcess, sample: str, at_least: float) -> dict[str, float]:
    """A scrape taken once `sample` reached `at_least`: request counters move just after each
    response is sent, so the last request of a phase may not be counted at the first look."""
    deadline = time.monotonic() + 10
    while True:
        now = samples(scrape(srv))
        if now.get(sample, 0.0) >= at_least or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def delta(after: dict[str, float], before: dict[str, float], sample: str) -> float:
    return after.get(sample, 0.0) - before.get(sample, 0.0)


def promtool_check(text: str) -> subprocess.CompletedProcess:
    promtool = need_program("promtool")
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                          timeout=30, check=False)


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory):
    """One server that has seen every kind of traffic; tests read its scrapes. Deduplication is on
    so that its gauges (exported only then) are in the scrape the dashboard is checked against."""
    srv = HmacfsProcess(tmp_path_factory.mktemp("metrics"), {"uploads": {"maxuploadsize": "1KB"},
                                                             "deduplication": {"enabled": True}}).start()
    try:
        yield srv
    finally:
        srv.close()


def test_counters_move_by_what_happened_and_promtool_accepts_the_scrape(busy: HmacfsProcess) -> None:
    srv = busy
    before = samples(scrape(srv))
    put_reqs = 'hmacfs_http_requests_total{method="PUT",code="201"}'
    a, b = f"{uuid.uuid4()}/a.txt", f"{uuid.uuid4()}/b.bin"
    assert put(srv, a, b"12345").status == 201
    assert put(srv, b, b"x" * 700).status == 201
    assert put(srv, f"{uuid.uuid4()}/big.bin", b"y" * 2000).status == 413
    assert request(srv.port, "PUT", url_path(srv.prefix, a) + "?v=00", b"z").status == 403
    after = settled(srv, 'hmacfs_http_requests_total{method="PUT",code="403"}',
                    before.get('hmacfs_http_requests_total{method="PUT",code="403"}', 0) + 1)
    assert delta(after, before, 'hmacfs_uploads_total{protocol="v"}') == 2
    assert delta(after, before, "hmacfs_upload_bytes_total") == 705
    assert delta(after, before, "hmacfs_upload_size_bytes_count") == 2
    assert delta(after, before, "hmacfs_upload_size_bytes_sum") == 705
    assert delta(after, before, 'hmacfs_upload_size_bytes_bucket{le="1024"}') == 2
    assert delta(after, before, "hmacfs_upload_duration_seconds_count") == 2
    assert delta(after, before, 'hmacfs_upload_errors_total{code="413"}') == 1
    assert delta(after, before, 'hmacfs_upload_errors_total{code="403"}') == 1
    assert delta(after, before, 'hmacfs_auth_failures_total{code="403"}') == 1
    assert delta(after, before, put_reqs) == 2
    assert delta(after, before, 'hmacfs_http_requests_total{method="PUT",code="413"}') == 1

    before = after
    assert request(srv.port, "GET", url_path(srv.prefix, a)).body == b"12345"
    r = request(srv.port, "GET", url_path(srv.prefix, b), headers={"Range": "bytes=100-199"})
    assert r.status == 206 and len(r.body) == 100
    assert request(srv.port, "GET", url_path(srv.prefix, f"{uuid.uuid4()}/none")).status == 404
    after = settled(srv, 'hmacfs_http_requests_total{method="GET",code="404"}',
                    before.get('hmacfs_http_requests_total{method="GET",code="404"}', 0) + 1)
    assert delta(after, before, 'hmacfs_downloads_total{code="200"}') == 1
    assert delta(after, before, 'hmacfs_downloads_total{code="206"}') == 1
    assert delta(after, before, "hmacfs_download_bytes_total") == 105
    assert delta(after, before, "hmacfs_download_size_bytes_count") == 2
    assert delta(after, before, 'hmacfs_download_size_bytes_bucket{le="4"}') == 0
    assert delta(after, before, 'hmacfs_download_size_bytes_bucket{le="1024"}') == 2
    assert delta(after, before, "hmacfs_download_duration_seconds_count") == 2

    before = after
    path, body = f"{uuid.uuid4()}/t.bin", b"t" * 300
    created = request(srv.port, "POST", signed_put(srv.prefix, srv.secret, path, len(body)),
                      headers={**TUS, "Upload-Length": str(len(body))})
    assert created.status == 201, created
    wait_for_gauge(srv, "hmacfs_resumable_uploads_in_progress", 1)  # read from the metadata every 5 s
    patched = request(srv.port, "PATCH", created.header("Location"), body,
                      {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
    assert patched.status == 204, patched
    after = settled(srv, 'hmacfs_http_requests_total{method="PATCH",code="204"}', 1)
    assert delta(after, before, 'hmacfs_resumable_uploads_created_total{protocol="tus"}') == 1
    assert delta(after, before, 'hmacfs_resumable_uploads_completed_total{protocol="tus"}') == 1
    assert delta(after, before, 'hmacfs_uploads_total{protocol="v"}') == 1
    assert delta(after, before, "hmacfs_upload_bytes_total") == 300

    text = scrape(srv)
    types = check_exposition(text)
    done = promtool_check(text)
    assert done.returncode == 0 and done.stdout.strip() == "" and done.stderr.strip() == "", done
    values = samples(text)
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_start_time_seconds",
                 "process_open_fds", "process_max_fds", "hmacfs_threads", "hmacfs_upload_workers"):
        assert values[name] > 0, name
    assert abs(values["process_start_time_seconds"] - time.time()) < 600
    for name in ("hmacfs_open_connections", "hmacfs_uploads_in_progress", "hmacfs_upload_queue_length",
                 "hmacfs_free_bytes", "hmacfs_stored_files", "hmacfs_stored_bytes", "hmacfs_ready"):
        assert types[name] == "gauge", name
    assert values["hmacfs_stored_files"] >= 2 and values["hmacfs_ready"] == 1  # a snapshot up to 5 s old
    assert values['hmacfs_ready_check{check="storage_writable"}'] == 1
    labels = {m.group(1) for m in re.finditer(r'[{,]([a-z_]+)="', text)}
    assert labels <= {"method", "code", "protocol", "le", "quota", "list", "scope", "result", "check",
                      "version", "python"}, labels  # bounded sets only: never paths, users or addresses


def test_promtool_catches_lint_problems() -> None:
    """The check above is not vacuous: promtool does lint text like ours (testing-notes: 3)."""
    done = promtool_check("# TYPE hmacfs_things counter\nhmacfs_things 1\n")
    assert done.returncode == 3, done


def exported_names(text: str) -> set[str]:
    """Every series name a scrape may hold: TYPE names, plus the histogram suffixes."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


PROMQL_WORDS = {"sum", "rate", "irate", "increase", "histogram_quantile", "by", "without", "on", "ignoring",
                "max", "min", "avg", "count", "time", "clamp_min", "topk", "le", "and", "or", "unless",
                "offset", "delta", "deriv", "abs", "vector", "scalar", "group_left", "group_right", "bool"}


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords,
    label names inside braces, label names in by/without lists, durations or strings."""
    expr = re.sub(r'"(\\.|[^"\\])*"', '""', expr)     # label values
    expr = re.sub(r"\{[^}]*\}", "{}", expr)          # matchers (label names)
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)          # range durations, incl. $__rate_interval
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\w+", " ", expr)               # Grafana variables
    found = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word = m.group(0)
        following = expr[m.end():].lstrip()
        if word in PROMQL_WORDS or following.startswith("("):
            continue
        if re.fullmatch(r"\d.*", word):
            continue
        found.add(word)
    return found


def dashboard_exprs(doc: dict) -> list[str]:
    exprs = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    exprs.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    return exprs


@pytest.fixture(scope="module")
def clustered(tmp_path_factory: pytest.TempPathFactory):
    """A node in cluster mode (shared state in a real redis-server): its Redis gauges."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as redis_server:
        srv = HmacfsProcess(tmp_path_factory.mktemp("clustered"), {
            "redis": {"redisenabled": True, "redisaddr": f"127.0.0.1:{redis_server.port}",
                      "redishealthcheckinterval": "1s"}}).start()
        try:
            yield srv
        finally:
            srv.close()


def test_a_cluster_node_exports_redis_up_and_promtool_accepts_its_scrape(clustered: HmacfsProcess) -> None:
    assert put(clustered, f"{uuid.uuid4()}/a.txt", b"shared").status == 201
    wait_for_gauge(clustered, "hmacfs_redis_up", at_least=1)
    text = scrape(clustered)
    done = promtool_check(text)
    assert done.returncode == 0, done.stdout + done.stderr
    check_exposition(text)


def test_grafana_dashboard_names_only_exported_metrics(busy: HmacfsProcess, clustered: HmacfsProcess) -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["title"] and doc["panels"]
    exprs = dashboard_exprs(doc)
    assert len(exprs) >= 10
    exported = exported_names(scrape(busy)) | exported_names(scrape(clustered))
    used = set().union(*(metric_names_in(e) for e in exprs))
    assert used, exprs
    assert sorted(used - exported) == []
    assert {"hmacfs_http_requests_total", "hmacfs_upload_duration_seconds_bucket", "hmacfs_free_bytes",
            "hmacfs_upload_workers", "hmacfs_resumable_uploads_in_progress", "hmacfs_redis_up"} <= used


def test_metric_names_in_parses_promql() -> None:
    expr = ('histogram_quantile(0.95, sum by (le) (rate(hmacfs_upload_duration_seconds_bucket'
            '{instance=~"$instance"}[$__rate_interval]))) / on(instance) group_left hmacfs_upload_workers')
    assert metric_names_in(expr) == {"hmacfs_upload_duration_seconds_bucket", "hmacfs_upload_workers"}


# -- who may read the metrics ---------------------------------------------------------------------

def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refused(r: Response, status: int) -> None:
    assert r.status == status, r
    assert b"hmacfs_" not in r.body


def test_metrics_token_on_the_separate_listener(hmacfs_factory) -> None:
    srv = hmacfs_factory({"server": {"metricstoken": TOKEN}})
    r = request(srv.metrics_port, "GET", "/metrics")
    refused(r, 401)
    assert r.header("WWW-Authenticate").startswith("Bearer")
    refused(request(srv.metrics_port, "GET", "/metrics", headers=bearer(TOKEN[:-1] + "X")), 401)
    refused(request(srv.metrics_port, "GET", "/metrics", headers={"Authorization": f"Basic {TOKEN}"}), 401)
    refused(request(srv.metrics_port, "GET", "/metrics", headers=bearer(TOKEN + "0")), 401)
    check_exposition(scrape(srv, headers=bearer(TOKEN)))
    check_exposition(scrape(srv, headers={"Authorization": f"bearer  {TOKEN}"}))
    assert request(srv.metrics_port, "GET", "/health").status == 200  # liveness stays open
    time.sleep(0.2)  # the access log line of the last request
    assert TOKEN not in srv.log()


def test_metrics_token_and_allow_list_on_the_main_port(tmp_path: Path) -> None:
    """`metricsport` = `listenport`: the metrics path on the main port is guarded the same way."""
    main = HmacfsProcess(tmp_path / "mainport", {"server": {"metricstoken": TOKEN,
                                                            "metricsallowips": ["127.0.0.0/8", "::1/128"]}})
    main.config["server"]["metricsport"] = main.config["server"]["listenport"]
    main.start()
    try:
        refused(request(main.port, "GET", "/metrics"), 401)
        refused(request(main.port, "GET", "/.hmacfs/metrics", headers=bearer("wrong-token-0123456789")), 401)
        check_exposition(scrape(main, main.port, bearer(TOKEN)))
        assert request(main.port, "GET", "/health").status == 200
    finally:
        main.close()


def test_metrics_allow_list_refuses_other_addresses(hmacfs_factory) -> None:
    srv = hmacfs_factory({"server": {"metricsallowips": ["192.0.2.0/24"], "metricstoken": TOKEN}})
    refused(request(srv.metrics_port, "GET", "/metrics", headers=bearer(TOKEN)), 403)  # before the token
    assert request(srv.metrics_port, "GET", "/health").status == 200
