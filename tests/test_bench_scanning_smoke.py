"""The virus-scanning benchmark (bench/scanning.py) in its tiny mode, so that it does not rot.

Strategy: run the exact documented command (`--quick`: builds the zipapp, starts clamd the way
the tests do and an unscanned and a scanned hmacfs side by side, one 16 MiB PUT to each, then
clamd alone on the same file) into a temp results file, then check only that it finished
cleanly and wrote a complete, well-formed table. No timing is asserted: numbers on a shared
2-core machine say nothing about correctness (a MISS is a valid result); the harness's own
checks (EICAR hidden after the file's last byte is found, every scan counted as clean, every
stored file's sha256) do fail the run when scanning is not really on.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import need_program
from tests.support.benchtable import figures, run_quick, table_rows

VALUE = re.compile(r"^[a-z ]+ -?[\d,]+(\.\d+)?$")  # "scanned 173", "not overlapped -1.5"
RATIO = re.compile(r"^-?\d+\.\d\dx$")
PER_ROUND = re.compile(r"^-?\d+\.\d\d( -?\d+\.\d\d)*$")


@pytest.mark.bench
def test_quick_scanning_benchmark_writes_a_complete_table(tmp_path: Path) -> None:
    need_program("clamd")
    text = run_quick("scanning.py", tmp_path / "scanning-results.md", timeout=150)
    for heading in ("## Figures", "## Where the time goes", "## RAM warm-up", "## Raw samples", "## Checks",
                    "## Notes"):
        assert heading in text
    assert re.search(r"^- commit: [0-9a-f]{7,}", text, re.M)
    assert re.search(r"^- load average \(1/5/15 min\) at start: \S+ \S+ \S+; at end: ", text, re.M)
    assert re.search(r"^- clamd: ClamAV 1\.\S+ \(", text, re.M)

    body = figures(text, ("16 MiB PUT: scanned vs unscanned", "last body byte sent to the 201",
                          "did not overlap the transfer"), VALUE, RATIO, PER_ROUND)
    assert [row[6] for row in body[:2]] == ["-", "-"], body
    assert re.fullmatch(r"< 0\.50x: (PASS|MISS)", body[2][6]), body[2]

    parts = table_rows(text, "| | scanned | unscanned | clamd alone |")[2:]
    assert len(parts) == 5 and all(re.fullmatch(r"[\d.]+|-", cell) for row in parts for cell in row[1:]), parts
    raw = table_rows(text, "| set | series |")[2:]
    assert raw and all(re.fullmatch(r"-?[\d,.]+", row[2]) for row in raw), raw
    assert "every sample valid" in text
    assert "Eicar-Embedded-Test" in text and "hmacfs_virus_scans_total" in text
