"""Shared fixtures: real hmacfs processes in temp dirs on loopback."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support.hmacfs_proc import HmacfsProcess, scan_logs

REQUIRE_ALL = os.environ.get("HMACFS_REQUIRE_ALL") == "1"


def need_program(*names: str) -> str:
    """Return the first program found on PATH; skip (or fail under HMACFS_REQUIRE_ALL=1)."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    message = f"needs {' or '.join(names)} on PATH (installed by contrib/run-tests.sh)"
    if REQUIRE_ALL:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log():
    """After the last test, every log written by an hmacfs process of this session (each
    HmacfsProcess registers its own: under pytest-xdist each worker checks its own) is scanned
    for the secrets of its config, 64-hex MACs after v=/v2=/v3=/token=, JWTs and whole upload
    ids. Any hit fails the session, naming file, line and what matched: a log is read by more
    people than the secret is meant for, and ends up in tickets and backups."""
    yield
    leaks = scan_logs()
    if leaks:
        shown = "\n".join(str(leak) for leak in leaks[:50])
        more = f"\n... and {len(leaks) - 50} more" if len(leaks) > 50 else ""
        pytest.fail(f"{len(leaks)} secret(s) in hmacfs logs of this run:\n{shown}{more}", pytrace=False)


@pytest.fixture
def hmacfs_factory(tmp_path: Path):
    """Start hmacfs processes: `hmacfs_factory(config_overrides, **kwargs)`; all stopped after the test."""
    started: list[HmacfsProcess] = []

    def make(config: dict | None = None, name: str = "hmacfs", **kwargs) -> HmacfsProcess:
        proc = HmacfsProcess(tmp_path / f"{name}{len(started)}", config, **kwargs)
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        proc.close()


@pytest.fixture
def hmacfs(hmacfs_factory) -> HmacfsProcess:
    """One hmacfs with the default test config."""
    return hmacfs_factory()
