#!/usr/bin/env python3
"""Build dist/hmacfs.pyz: one standard-library-only file that runs as `python3 hmacfs.pyz -config FILE`.

Reproducible: entries are sorted, timestamps fixed (SOURCE_DATE_EPOCH or 1980-01-01),
permissions normalised and no bytecode included, so the same source gives the same bytes.
Offline: everything comes from the checkout; third-party code the zipapp needs on old Pythons
(tomli, for Python < 3.11) is vendored under hmacfs/_vendor with its licence, which ships too.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHEBANG = b"#!/usr/bin/env python3\n"
MAIN = b"import sys\nfrom hmacfs.cli import main\nsys.exit(main())\n"


def _date_time() -> tuple[int, int, int, int, int, int]:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "315532800"))  # 1980-01-01, zip's minimum
    return time.gmtime(max(epoch, 315532800))[:6]


# Besides the Python sources: the licences of vendored code, which MIT requires to travel with it.
EXTRA_FILES = ("LICENSE",)


def sources(package: Path) -> list[Path]:
    """Every file of the package that ships: sources, and licence files (the vendored tomli's)."""
    return sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and (p.suffix == ".py" or p.name in EXTRA_FILES))


def build(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = _date_time()
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as raw:
        raw.write(SHEBANG)
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            entries = [("__main__.py", MAIN)]
            entries += [(p.relative_to(ROOT).as_posix(), p.read_bytes()) for p in sources(ROOT / "hmacfs")]
            for name, data in sorted(entries):
                info = zipfile.ZipInfo(name, date_time=stamp)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                info.create_system = 3
                zf.writestr(info, data, compresslevel=9)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-o", "--output", default=str(ROOT / "dist" / "hmacfs.pyz"))
    args = parser.parse_args()
    path = build(Path(args.output))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
