from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hmacfs.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize("text, n", [("5GB", 5 * 1024**3), ("32MB", 32 * 1024**2), ("100KiB", 102400),
                                     (4096, 4096), ("4096", 4096), ("1.5 GiB", 1610612736), ("1TB", 1024**4)])
def test_sizes(text, n) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text, s", [("3600s", 3600), ("30m", 1800), ("1h", 3600), ("30d", 2592000),
                                     ("2Y", 2 * 365 * 86400), ("4w", 28 * 86400), ("1h30m", 5400), (90, 90),
                                     ("720h", 2592000), ("250ms", 0.25)])
def test_durations(text, s) -> None:
    assert parse_duration(text) == s


@pytest.mark.parametrize("bad", ["5XB", "-1", "GB", True, "1.2.3MB"])
def test_bad_sizes(bad) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("bad", ["5x", "h", "1h junk", "", True, "-5s"])
def test_bad_durations(bad) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_formatting_roundtrips() -> None:
    for n in (0, 1, 1024, 5 * 1024**3, 12345):
        assert parse_size(format_size(n)) == n
    for s in (30, 3600, 86400 * 30, 90):
        assert parse_duration(format_duration(s)) == s


@given(st.floats(min_value=1e-7, max_value=1e9, allow_nan=False))
def test_a_formatted_duration_reads_back_as_the_same_float(seconds: float) -> None:
    """check-config prints durations that a config file can hold again, exactly (a fraction of
    17 significant digits used to be refused by the parser's 9-digit limit)."""
    assert parse_duration(format_duration(seconds)) == seconds
