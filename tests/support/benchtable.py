"""The benchmarks' smoke tests (tests/test_bench_*.py): run one in its --quick mode, read its tables.

The asserts here are not rewritten by pytest (this is not a test module), so each carries the
values it compares in its message.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The figures table of bench/storage.py's and bench/resumable.py's reports.
FIGURES_HEADER = ["metric", "unit", "measured", "against", "ratio", "per-round ratios", "target"]


def run_quick(script: str, out: Path, timeout: float) -> str:
    """Run the documented command `python3 bench/<script> --quick` with its report going to `out`;
    it must exit 0 (else the tails of what it printed are the failure). Returns the report."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out.read_text()


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


def labelled_table(text: str, header_start: str, labels: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    """The header and the body rows of that table; its second row must be the separator, and each
    of `labels` must be part of the first cell of some body row."""
    rows = table_rows(text, header_start)
    header, sep, body = rows[0], rows[1], rows[2:]
    assert all(set(cell) <= set("-: ") for cell in sep), sep
    names = [row[0] for row in body]
    for expected in labels:
        assert any(expected in name for name in names), (expected, names)
    return header, body


def figures(text: str, labels: tuple[str, ...], value: re.Pattern[str], ratio: re.Pattern[str],
            per_round: re.Pattern[str]) -> list[list[str]]:
    """The body rows of the figures table (FIGURES_HEADER), with a row for each of `labels`; in every
    row the measured and the against cell match `value`, the ratio `ratio`, the per-round ratios
    `per_round`. The target column is left to the caller."""
    header, body = labelled_table(text, "| metric |", labels)
    assert header == FIGURES_HEADER, header
    for row in body:
        assert len(row) == len(header), row
        assert value.match(row[2]) and value.match(row[3]), row
        assert ratio.match(row[4]), row
        assert per_round.match(row[5]), row
    return body
