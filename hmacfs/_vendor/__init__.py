"""Third-party code shipped inside hmacfs so that the single-file build runs with nothing installed.

Each package here is copied unmodified from a pinned upstream release, with its licence beside it,
and is imported only as a fallback (the stdlib module or an installed copy wins). ruff skips this
folder: it is upstream's code, not ours to restyle.

- `tomli/`: tomli 2.2.1 (MIT, Taneli Hukkinen), `src/tomli/*.py` and `LICENSE` from the PyPI sdist
  tomli-2.2.1.tar.gz, sha256 cd45e1dc79c835ce60f7404ec8119f2eb06d38b1deba146f07ced3bbc44505ff.
  Used by `hmacfs.config.read_toml` on Python < 3.11 when `tomli` is not installed. Pinned below
  2.4 on purpose: 2.2.1 parses TOML v1.0.0, the same language as `tomllib` on Python 3.11-3.14,
  so a config that loads on a Python 3.9 host loads on every other supported Python too (tomli
  2.4+ accepts TOML v1.1 syntax that `tomllib` before 3.15 rejects).

To update: download the new sdist with `pip download tomli==X --no-deps --no-binary :all:`, check
its sha256 against PyPI, copy `src/tomli/*.py` and `LICENSE` over, and update the lines above and
VENDORED in tests/unit/test_vendor.py.
"""
