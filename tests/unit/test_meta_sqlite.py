"""SqliteMeta refuses what it cannot work with, at start and with a clear message."""
from __future__ import annotations

import pytest

from hmacfs.errors import StartupError
from hmacfs.meta import sqlite as meta_sqlite


def test_an_old_sqlite_library_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(meta_sqlite.sqlite3, "sqlite_version_info", (3, 23, 1))
    monkeypatch.setattr(meta_sqlite.sqlite3, "sqlite_version", "3.23.1")
    with pytest.raises(StartupError, match=r"3\.23\.1; hmacfs needs 3\.24\.0 or newer"):
        meta_sqlite.SqliteMeta(str(tmp_path / "m.sqlite3"))
    assert not (tmp_path / "m.sqlite3").exists()


def test_usage_follows_files_and_versions(tmp_path) -> None:
    """The triggers keep per-uploader and total usage in step with every insert, update and delete."""
    from hmacfs.meta.record import FileRecord, VersionRecord

    m = meta_sqlite.SqliteMeta(str(tmp_path / "m.sqlite3"))
    m.put(FileRecord("a/x", 10, "t/p", "s", 1.0, uploader="bob"))
    m.put(FileRecord("a/y", 5, "t/p", "s", 1.0))
    m.put(FileRecord("a/x", 30, "t/p", "s", 1.0, uploader="alice"))  # replaced: moves to alice
    m.add_version(VersionRecord("a/x", 1, 7, "t/p", "s", 1.0, uploader="alice"))
    assert (m.usage("bob").bytes, m.usage("alice").bytes, m.total_bytes(), m.total_files()) == (0, 37, 42, 3)
    assert m.take("a/x") is not None and m.take("a/x") is None  # taken once
    m.drop_versions("a/x", 0)
    assert (m.usage("alice").files, m.total_bytes(), m.uploader_count()) == (0, 5, 0)
    m.close()
