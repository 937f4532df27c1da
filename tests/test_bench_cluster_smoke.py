"""The cluster benchmark (bench/cluster.py) in its tiny mode, so that it does not rot.

Strategy: run the exact documented command (`--quick`: builds the zipapp, starts moto with
authentication on, redis-server, four hmacfs nodes and nginx, moves 24 MiB through hmacfs and
through boto3, one raw signed PUT/GET, then 1 s wrk runs against every arrangement, one round)
into a temp results file, and check only that it finished cleanly and wrote a complete,
well-formed report. No timing is asserted: numbers on a shared 2-core machine say nothing about
correctness (a MISS is a valid result); the harness's own checks (statuses, sizes, part counts,
sha256 of what was moved, objects gone after the DELETEs) fail the run when something is wrong.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.support.benchtable import figures, run_quick, table_rows

VALUE = re.compile(r"^.+ [\d,]+$")  # "hmacfs 87", "nginx -> 2 nodes 1,859"
RATIO = re.compile(r"^\d+\.\d{2}x$")
PER_ROUND = re.compile(r"^\d+\.\d{2}( \d+\.\d{2})*$")
TOOLS = ("nginx", "wrk", "redis-server", "moto_server")


@pytest.mark.bench
def test_quick_cluster_benchmark_writes_a_complete_table(tmp_path: Path) -> None:
    pytest.importorskip("boto3")
    missing = [t for t in TOOLS if shutil.which(t) is None and not (t == "moto_server" and _moto_importable())]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    text = run_quick("cluster.py", tmp_path / "cluster-results.md", timeout=150)
    for heading in ("## Figures", "## Ceilings: what moto allows", "## Where the CPU goes", "## Raw samples",
                    "## Checks", "## Notes"):
        assert heading in text
    assert re.search(r"^- commit: [0-9a-f]{7,}", text, re.M)
    assert re.search(r"^- load average \(1/5/15 min\) at start: \S+ \S+ \S+; at end: ", text, re.M)
    assert re.search(r"^- other processes: ", text, re.M)

    body = figures(text, ("24 MiB upload to S3 (moto): hmacfs vs boto3", "24 MiB download from S3 (moto)",
                          "S3 backend + Redis: two nodes vs one", "local backend (a copy of the file on each node's "
                          "disk) + Redis: two nodes vs one", "S3 backend + Redis: nginx -> 1 node vs",
                          "local backend + Redis: nginx -> 1 node vs"), VALUE, RATIO, PER_ROUND)
    assert len(body) == 6, body
    for row in body:
        assert re.fullmatch(r">= \d\.\d\dx: (PASS|MISS)|-", row[6]), row

    ceilings = table_rows(text, "| what | median |")[2:]
    assert len(ceilings) == 3 and all(re.fullmatch(r"[\d,]+ (MB/s|req/s)", row[1]) for row in ceilings), ceilings
    cpu = table_rows(text, "| arrangement | req/s |")[2:]
    assert len(cpu) == 7 and all("n/a" not in row[1] for row in cpu), cpu

    raw = table_rows(text, "| set | series |")[2:]
    assert raw and all(re.fullmatch(r"[\d,.]+(, [\d,.]+)*", row[2]) for row in raw), raw
    assert "no errors; every sample valid" in text
    assert "moto runs with request authentication on" in text and "sha256" in text and "parts" in text


def _moto_importable() -> bool:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True
