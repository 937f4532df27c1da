"""The benchmark harness (bench/run.py) in its tiny mode, so that it does not rot.

Strategy: run the exact documented command (`--quick`, which builds the zipapp and starts
hmacfs, nginx and the stdlib baseline) into a temp results file, then check only that it
finished cleanly and wrote a well-formed table. No timing is asserted: numbers on a shared
2-core machine say nothing about correctness.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import need_program
from tests.support.benchtable import labelled_table, run_quick, table_rows

NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?$")
RATIO = re.compile(r"^\d+\.\d\dx$")


@pytest.mark.bench
def test_quick_benchmark_writes_a_complete_table(tmp_path: Path) -> None:
    need_program("nginx")
    need_program("wrk")
    text = run_quick("run.py", tmp_path / "results.md", timeout=240)
    for heading in ("## Medians", "## Large upload uses the same memory", "## Client ceilings",
                    "## Raw samples"):
        assert heading in text
    assert re.search(r"^- commit: \S+", text, re.M)
    assert re.search(r"^- nginx: nginx/\d", text, re.M)

    header, body = labelled_table(text, "| metric |", (
        "PUT", "GET", "4 KiB GET @64 conns", "4 KiB GET @256 conns", "4 KiB PUT @64 conns", "4 KiB PUT @256 conns",
        "concurrent PUT", "peak RSS", "start to first served request"))
    assert header[:7] == ["metric", "unit", "hmacfs", "nginx", "baseline", "hmacfs/nginx", "hmacfs/baseline"]
    for row in body:
        assert len(row) == len(header), row
        for cell in row[2:5]:
            assert NUMBER.match(cell), (row[0], cell)
        for cell in row[5:7]:
            assert RATIO.match(cell), (row[0], cell)

    mem = table_rows(text, "| upload | bytes |")[2:]
    assert len(mem) == 2 and all(NUMBER.match(row[2]) for row in mem), mem
    assert "every sample valid" in text
