"""The benchmark harness (bench/run.py) in its tiny mode, so that it does not rot.

Strategy: run the exact documented command (`--quick`, which builds the zipapp and starts
hmacfs, nginx and the stdlib baseline) into a temp results file, then check only that it
finished cleanly and wrote a well-formed table. No timing is asserted: numbers on a shared
2-core machine say nothing about correctness.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need_program

REPO = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?$")
RATIO = re.compile(r"^\d+\.\d\dx$")


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


@pytest.mark.bench
def test_quick_benchmark_writes_a_complete_table(tmp_path: Path) -> None:
    need_program("nginx")
    need_program("wrk")
    out = tmp_path / "results.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    text = out.read_text()
    for heading in ("## Medians", "## Large upload uses the same memory", "## Client ceilings",
                    "## Raw samples"):
        assert heading in text
    assert re.search(r"^- commit: \S+", text, re.M)
    assert re.search(r"^- nginx: nginx/\d", text, re.M)

    rows = table_rows(text, "| metric |")
    header, sep, body = rows[0], rows[1], rows[2:]
    assert header[:7] == ["metric", "unit", "hmacfs", "nginx", "baseline", "hmacfs/nginx", "hmacfs/baseline"]
    assert all(set(cell) <= set("-: ") for cell in sep)
    labels = [row[0] for row in body]
    for expected in ("PUT", "GET", "4 KiB GET @64 conns", "4 KiB GET @256 conns", "4 KiB PUT @64 conns",
                     "4 KiB PUT @256 conns", "concurrent PUT", "peak RSS", "start to first served request"):
        assert any(expected in label for label in labels), (expected, labels)
    for row in body:
        assert len(row) == len(header), row
        for cell in row[2:5]:
            assert NUMBER.match(cell), (row[0], cell)
        for cell in row[5:7]:
            assert RATIO.match(cell), (row[0], cell)

    mem = table_rows(text, "| upload | bytes |")[2:]
    assert len(mem) == 2 and all(NUMBER.match(row[2]) for row in mem), mem
    assert "every sample valid" in text
