"""Module-scoped servers for the contract tests (one process serves many independent paths)."""
from __future__ import annotations

from typing import Iterator

import pytest

from tests.support.cluster import Backing
from tests.support.hmacfs_proc import HmacfsProcess


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    proc = HmacfsProcess(tmp_path_factory.mktemp("srv"), {
        "uploads": {"maxuploadsize": "1MB", "allowedextensions": []},
        "security": {"deletesecret": "del-secret", "previoussecrets": ["old-secret"]},
    }).start()
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def backing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backing]:
    """For the cluster tests: one moto (signatures checked) and one Redis per test module."""
    b = Backing(tmp_path_factory.mktemp("backing")).start()
    try:
        yield b
    finally:
        b.close()
