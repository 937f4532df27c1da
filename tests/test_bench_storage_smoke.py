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
from pathlib import Path

import pytest

from tests.support.benchtable import figures, run_quick, table_rows

VALUE = re.compile(r"^\S+ -?[\d,]+(\.\d+)?$")  # "dedup+enc 1,238"
RATIO = re.compile(r"^\d+\.\d\dx$")
PER_ROUND = re.compile(r"^\d+\.\d\d( \d+\.\d\d)*$")


@pytest.mark.bench
def test_quick_storage_benchmark_writes_a_complete_table(tmp_path: Path) -> None:
    text = run_quick("storage.py", tmp_path / "storage-results.md", timeout=120)
    for heading in ("## Medians", "## Client ceilings", "## RAM warm-up", "## Raw samples", "## Checks", "## Notes"):
        assert heading in text
    assert re.search(r"^- commit: [0-9a-f]{7,}", text, re.M)
    assert re.search(r"^- load average \(1/5/15 min\) at start: \S+ \S+ \S+; at end: ", text, re.M)

    body = figures(text, ("PUT, new content: dedup+enc vs plain", "PUT on dedup+enc: duplicate vs new content",
                          "GET: encrypted (dedup+enc) vs plain", "peak RSS, fresh dedup+enc server",
                          "peak RSS during"), VALUE, RATIO, PER_ROUND)
    targets = 0
    for row in body:
        if row[6]:
            assert re.fullmatch(r"(>=|<=) \d\.\dx: (PASS|MISS)", row[6]), row
            targets += 1
    assert targets == 4

    raw = table_rows(text, "| metric | series |")[2:]
    assert len(raw) == 2 * len(body) and all(re.fullmatch(r"[\d,.]+", row[2]) for row in raw), raw
    assert "every sample valid" in text
    assert "one inode" in text and "frees the blob" in text
