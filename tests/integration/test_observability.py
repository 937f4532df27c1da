"""Metrics and logs of the real process, as Prometheus and a log shipper see them."""
from __future__ import annotations

import json
import time
import uuid

from tests.support.client import put, request, url_path
from tests.unit.test_metrics import check_exposition


def scrape(srv) -> str:
    r = request(srv.metrics_port, "GET", "/metrics")
    assert r.status == 200 and r.header("Content-Type").startswith("text/plain; version=0.0.4")
    return r.body.decode()


def value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_uploads_downloads_and_failures(hmacfs) -> None:
    before = scrape(hmacfs)
    path = f"{uuid.uuid4()}/m.txt"
    assert put(hmacfs, path, b"12345").status == 201
    assert request(hmacfs.port, "GET", url_path(hmacfs.prefix, path)).status == 200
    assert request(hmacfs.port, "PUT", url_path(hmacfs.prefix, path) + "?v=00", b"x").status == 403
    deadline = time.monotonic() + 5
    while True:  # request counters are updated just after each response is sent
        after = scrape(hmacfs)
        if value(after, 'hmacfs_http_requests_total{method="GET",code="200"}') >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    check_exposition(after)
    assert value(after, 'hmacfs_uploads_total{protocol="v"}') - value(before, 'hmacfs_uploads_total{protocol="v"}') == 1
    assert value(after, "hmacfs_upload_bytes_total") == 5
    assert value(after, 'hmacfs_downloads_total{code="200"}') == 1 and value(after, "hmacfs_download_bytes_total") == 5
    assert value(after, 'hmacfs_auth_failures_total{code="403"}') == 1
    assert value(after, "hmacfs_upload_duration_seconds_count") == 1
    assert value(after, "hmacfs_download_duration_seconds_count") == 1
    assert value(after, 'hmacfs_http_requests_total{method="PUT",code="201"}') == 1
    assert value(after, "process_resident_memory_bytes") > 1e6


def test_json_log_file(hmacfs_factory) -> None:
    srv = hmacfs_factory({"server": {"loggingjson": True, "logfile": "hmacfs-json.log"}})
    path = f"{uuid.uuid4()}/j.txt"
    assert put(srv, path, b"x").status == 201
    log_file = srv.workdir / "hmacfs-json.log"
    deadline = time.monotonic() + 5
    while "j.txt" not in (log_file.read_text() if log_file.exists() else ""):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    access = [r for r in records if r.get("method") == "PUT"]
    assert access and access[0]["status"] == 201 and access[0]["path"].endswith("/j.txt")
    assert access[0]["client"] == "127.0.0.1" and "v=" not in access[0]["path"] and access[0]["duration_ms"] >= 0
