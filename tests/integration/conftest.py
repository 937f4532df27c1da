"""Module-scoped servers for the contract tests (one process serves many independent paths)."""
from __future__ import annotations

import pytest

from tests.support.hmacfs_proc import HmacfsProcess


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    proc = HmacfsProcess(tmp_path_factory.mktemp("srv"), {
        "uploads": {"maxuploadsize": "1MB", "allowedextensions": []},
        "security": {"deletesecret": "del-secret", "previoussecrets": ["old-secret"]},
    }).start()
    yield proc
    proc.close()
