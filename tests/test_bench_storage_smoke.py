"""The storage-feature benchmark (bench/storage.py) in its tiny mode, so that it does not rot.

Strategy: run the exact documented command (`--quick`: builds the zipapp, starts a plain and
a dedup+encryption hmacfs side by side, 16 MiB transfers, one round) into a temp results
file, then check only that it finished cleanly and wrote a complete, well-formed table. No
timing is asserted: numbers on a shared 2-core machine say nothing about correctness (a MISS
is a valid result); the harness's own checks (ciphertext on disk, one blob for a duplicate,
the blob freed by delete) do fail the run when a feature is not really on.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VALUE = re.compile(r"^\S+ -?[\d,]+(\.\d+)?$")  # "dedup+enc 1,238"
RATIO = re.compile(r"^\d+\.\d\dx$")
PER_ROUND = re.compile(r"^\d+\.\d\d( \d+\.\d\d)*$")


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
def test_quick_storage_benchmark_writes_a_complete_table(tmp_path: Path) -> None:
    out = tmp_path / "storage-results.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "storage.py"), "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    text = out.read_text()
    for heading in ("## Medians", "## Client ceilings", "## RAM warm-up", "## Raw samples", "## Checks", "## Notes"):
        assert heading in text
    assert re.search(r"^- commit: [0-9a-f]{7,}", text, re.M)
    assert re.search(r"^- load average \(1/5/15 min\) at start: \S+ \S+ \S+; at end: ", text, re.M)

    rows = table_rows(text, "| metric |")
    header, sep, body = rows[0], rows[1], rows[2:]
    assert header == ["metric", "unit", "measured", "against", "ratio", "per-round ratios", "target"]
    assert all(set(cell) <= set("-: ") for cell in sep)
    labels = [row[0] for row in body]
    for expected in ("PUT, new content: dedup+enc vs plain", "PUT on dedup+enc: duplicate vs new content",
                     "GET: encrypted (dedup+enc) vs plain", "peak RSS, fresh dedup+enc server",
                     "peak RSS during"):
        assert any(expected in label for label in labels), (expected, labels)
    targets = 0
    for row in body:
        assert len(row) == len(header), row
        assert VALUE.match(row[2]) and VALUE.match(row[3]), row
        assert RATIO.match(row[4]), row
        assert PER_ROUND.match(row[5]), row
        if row[6]:
            assert re.fullmatch(r"(>=|<=) \d\.\dx: (PASS|MISS)", row[6]), row
            targets += 1
    assert targets == 4

    raw = table_rows(text, "| metric | series |")[2:]
    assert len(raw) == 2 * len(body) and all(re.fullmatch(r"[\d,.]+", row[2]) for row in raw), raw
    assert "every sample valid" in text
    assert "one inode" in text and "frees the blob" in text
