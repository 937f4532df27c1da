"""The Prometheus text format 0.0.4 as rendered, checked line by line."""
from __future__ import annotations

import re
import time

from hmacfs.services.metrics import Counter, Gauge, Histogram, ServerMetrics, render

SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\[\\n"])*",?)*\})? '
                    r'(-?[0-9.e+-]+|\+Inf|-Inf|NaN)$')


def check_exposition(text: str) -> dict[str, str]:
    """Validate 0.0.4 syntax; returns metric name -> type. Raises AssertionError on any bad line."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert len(line.split(" ", 3)) == 4, line
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped") and name not in types
            if kind == "counter":
                assert name.endswith("_total"), name
            types[name] = kind
        else:
            assert SAMPLE.match(line), line
            base = re.sub(r"_(bucket|sum|count)$", "", line.split("{")[0].split(" ")[0])
            assert base in types or line.split("{")[0].split(" ")[0] in types, line
    return types


def test_counter_and_histogram_render() -> None:
    c = Counter("x_total", "Things.", ("code",))
    c.inc(1, "200")
    c.inc(2, "200")
    h = Histogram("d_seconds", "Time.", buckets=(0.1, 1.0))
    h.observe(0.05)
    h.observe(0.5)
    h.observe(5)
    text = render([c, h])
    check_exposition(text)
    assert 'x_total{code="200"} 3' in text
    assert 'd_seconds_bucket{le="0.1"} 1' in text and 'd_seconds_bucket{le="1"} 2' in text
    assert 'd_seconds_bucket{le="+Inf"} 3' in text and "d_seconds_count 3" in text and "d_seconds_sum 5.55" in text


def test_label_values_are_escaped() -> None:
    c = Counter("y_total", "Y.", ("path",))
    c.inc(1, 'a"b\\c\nd')
    text = render([c])
    check_exposition(text)
    assert 'path="a\\"b\\\\c\\nd"' in text


def test_server_metrics_are_valid() -> None:
    m = ServerMetrics()
    m.requests.inc(1, "GET", "200")
    m.upload_seconds.observe(0.2)
    types = check_exposition(m.render())
    assert types["hmacfs_http_requests_total"] == "counter"
    assert types["hmacfs_upload_duration_seconds"] == "histogram"
    assert types["process_resident_memory_bytes"] == "gauge"


def test_sized_counter_keeps_total_and_histogram_together() -> None:
    m = ServerMetrics()
    m.upload_bytes.inc(5)
    m.upload_bytes.inc(5000)
    text = m.render()
    check_exposition(text)
    assert "hmacfs_upload_bytes_total 5005" in text
    assert 'hmacfs_upload_size_bytes_bucket{le="1024"} 1' in text and "hmacfs_upload_size_bytes_count 2" in text
    assert "hmacfs_upload_size_bytes_sum 5005" in text


def test_process_gauges_and_labelled_callbacks() -> None:
    m = ServerMetrics()
    text = m.render()
    fds = [line for line in text.splitlines() if line.startswith("process_open_fds ")]
    assert fds and float(fds[0].split()[1]) >= 3
    assert 'hmacfs_build_info{version="' in text
    g = Gauge("g_state", "State.", ("check",), fn=lambda: [(("a",), 1.0), (("b",), 0.0)])
    assert render([g]).splitlines()[2:] == ['g_state{check="a"} 1', 'g_state{check="b"} 0']


def test_janitor_runs_record_when_they_happened() -> None:
    m = ServerMetrics()
    assert "hmacfs_janitor_last_run_timestamp_seconds 0" in m.render()
    before = time.time()
    m.janitor_runs.inc()
    stamp = [line for line in m.render().splitlines() if line.startswith("hmacfs_janitor_last_run_timestamp_seconds ")]
    assert before <= float(stamp[0].split()[1]) <= time.time()
