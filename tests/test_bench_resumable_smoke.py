"""The resumable-upload benchmark (bench/resumable.py) in its tiny mode, so that it does not rot.

Strategy: run the exact documented command (`--quick`: builds the zipapp, starts hmacfs,
64 MiB by tus in 4 MiB PATCHes and as one PUT, then a tus and an IETF upload broken at 50%
and resumed, one round) into a temp results file, then check only that it finished cleanly
and wrote a complete, well-formed table. No timing is asserted: numbers on a shared 2-core
machine say nothing about correctness (a MISS is a valid result); the harness's own checks
(every status and Upload-Offset, the stored file's size and sha256, no partial file left)
do fail the run when the protocols misbehave.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.benchtable import figures, run_quick, table_rows

VALUE = re.compile(r"^\S+ [\d,]+(\.\d+)?$")  # "tus 297", "sent 69.206"
RATIO = re.compile(r"^\d+\.\d{2,4}x$")
PER_ROUND = re.compile(r"^\d+\.\d{2,4}( \d+\.\d{2,4})*$")


@pytest.mark.bench
def test_quick_resumable_benchmark_writes_a_complete_table(tmp_path: Path) -> None:
    text = run_quick("resumable.py", tmp_path / "resumable-results.md", timeout=150)
    for heading in ("## Figures", "## Where the time goes", "## Broken uploads", "## Client ceilings",
                    "## RAM warm-up", "## Raw samples", "## Checks", "## Notes"):
        assert heading in text
    assert re.search(r"^- commit: [0-9a-f]{7,}", text, re.M)
    assert re.search(r"^- load average \(1/5/15 min\) at start: \S+ \S+ \S+; at end: ", text, re.M)
    assert re.search(r"^- other processes: ", text, re.M)

    body = figures(text, ("upload: tus (16 x 4 MiB PATCH, keep-alive) vs one PUT",
                          "tus upload broken at 50% and resumed",
                          "IETF draft (interop 6) upload broken at 50% and resumed"), VALUE, RATIO, PER_ROUND)
    for row in body:
        assert re.fullmatch(r"(>=|<) \d\.\d\dx: (PASS|MISS)", row[6]), row

    breaks = table_rows(text, "| protocol | round |")[2:]
    assert sorted(row[0] for row in breaks) == ["ietf", "tus"], breaks
    for row in breaks:
        sent_before, offset, attempts, moved, extra = (int(cell.replace(",", "")) for cell in row[2:7])
        assert sent_before == 32 << 20 and 0 <= offset <= 64 << 20 and attempts >= 1, row
        assert moved >= 64 << 20 and extra == moved - (64 << 20), row

    raw = table_rows(text, "| set | series |")[2:]
    assert raw and all(re.fullmatch(r"[\d,.]+", row[2]) for row in raw), raw
    assert "every sample valid" in text
    assert "409 with the right" in text and "sha256" in text
