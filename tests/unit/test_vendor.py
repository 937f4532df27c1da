"""The tomli copy the zipapp carries for Python < 3.11: pinned, licensed, and reading TOML as tomllib does."""
from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

import pytest

from hmacfs._vendor import tomli as vendored

REPO = Path(__file__).resolve().parents[2]
# The pin hmacfs/_vendor/__init__.py documents; bump both together (its docstring says how).
VENDORED = {"tomli": "2.2.1"}


def test_the_pinned_version_with_its_licence() -> None:
    assert vendored.__version__ == VENDORED["tomli"]
    licence = (REPO / "hmacfs" / "_vendor" / "tomli" / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Taneli Hukkinen" in licence


@pytest.mark.skipif(sys.version_info < (3, 11), reason="compares with the stdlib tomllib")
def test_reads_what_tomllib_reads() -> None:
    """The shipped config and the TOML v1.0 corners a config may use parse to the same values, and
    what tomllib refuses the vendored copy refuses too (same language on every supported Python)."""
    import tomllib
    docs = [(REPO / "config.toml").read_text(),
            'a = 1_000\nb = 0x1f\nc = 1979-05-27T07:32:00Z\nd = """x\n  y"""\n[t]\ne = [1, [2, "3"]]\nf = {g = "h"}\n']
    for doc in docs:
        assert vendored.loads(doc) == tomllib.loads(doc)
    for bad in ("a = 1\na = 2\n", "x = {a = 1,}\n", "k = \n"):  # the second is TOML v1.1 only
        with pytest.raises(tomllib.TOMLDecodeError):
            tomllib.loads(bad)
        with pytest.raises(vendored.TOMLDecodeError):
            vendored.loads(bad)


def test_the_zipapp_carries_it_and_its_licence(tmp_path: Path) -> None:
    """Built from the checkout alone (offline), the archive holds the vendored sources and the licence
    byte for byte."""
    import subprocess
    out = tmp_path / "hmacfs.pyz"
    subprocess.run([sys.executable, str(REPO / "build_zipapp.py"), "-o", str(out)], check=True, timeout=60,
                   capture_output=True)
    with zipfile.ZipFile(out) as zf:
        for name in ("LICENSE", "__init__.py", "_parser.py", "_re.py", "_types.py"):
            local = (REPO / "hmacfs" / "_vendor" / "tomli" / name).read_bytes()
            assert hashlib.sha256(zf.read(f"hmacfs/_vendor/tomli/{name}")).digest() == hashlib.sha256(local).digest()
