"""Fixtures for the end-to-end XMPP tests: slow peers are started once per module and shared."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.support.hmacfs_proc import HmacfsProcess

Closer = Callable[[], None]


class Pool:
    """Builds each named setup on first use, keeps it for the module, stops everything at the end.

    A builder appends a closer for every process it starts *before* waiting for it, so a
    setup that fails half-way is still cleaned up; its error is remembered, so the other
    tests of that setup fail fast instead of starting the programs again.
    """

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp = tmp_path_factory
        self.closers: list[Closer] = []
        self.built: dict[str, object] = {}

    def get(self, name: str, builder: Callable[[Pool, str], object]) -> object:
        if name not in self.built:
            try:
                self.built[name] = builder(self, name)
            except Exception as err:  # remembered and re-raised for each test of this setup
                self.built[name] = err
        value = self.built[name]
        if isinstance(value, Exception):
            raise value
        return value

    def workdir(self, name: str) -> Path:
        return self.tmp.mktemp(name)

    def hmacfs(self, name: str, config: dict) -> HmacfsProcess:
        """A started hmacfs owned by the pool (closed at module end)."""
        proc = HmacfsProcess(self.workdir(f"hmacfs-{name}"), config)
        self.closers.append(proc.close)
        return proc.start()

    def close(self) -> None:
        errors = []
        for closer in reversed(self.closers):
            try:
                closer()
            except Exception as err:  # keep stopping the others
                errors.append(err)
        if errors:
            raise errors[0]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    p = Pool(tmp_path_factory)
    yield p
    p.close()
