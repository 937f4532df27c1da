"""Bans in SQLite: the table, its methods, and the migration of a schema 3 database."""
from __future__ import annotations

import sqlite3

from hmacfs.meta import sqlite as meta_sqlite
from hmacfs.meta.record import BanRecord, FileRecord


def test_bans_are_stored_listed_and_removed(tmp_path) -> None:
    m = meta_sqlite.SqliteMeta(str(tmp_path / "m.sqlite3"))
    m.ban_put(BanRecord("198.51.100.1", 200.0, 100.0, 10, "403 signature mismatch"))
    m.ban_put(BanRecord("2001:db8::/64", 300.0, 100.0, 10))
    m.ban_put(BanRecord("198.51.100.2", 150.0, 100.0, 10))
    assert [b.address for b in m.bans_active(160.0)] == ["2001:db8::/64", "198.51.100.1"]  # longest first
    assert m.ban_get("198.51.100.1") == BanRecord("198.51.100.1", 200.0, 100.0, 10, "403 signature mismatch")
    m.ban_put(BanRecord("198.51.100.1", 400.0, 350.0, 5))  # a renewed ban replaces the old one
    assert m.ban_get("198.51.100.1") == BanRecord("198.51.100.1", 400.0, 350.0, 5, "")
    assert m.bans_purge(160.0) == 1 and m.ban_get("198.51.100.2") is None
    assert m.ban_remove("2001:db8::/64") and not m.ban_remove("2001:db8::/64")
    m.close()
    reopened = meta_sqlite.SqliteMeta(str(tmp_path / "m.sqlite3"))
    assert [b.address for b in reopened.bans_active(0.0)] == ["198.51.100.1"]
    reopened.close()


def test_a_schema_3_database_gains_the_bans_table_and_keeps_its_rows(tmp_path) -> None:
    path = tmp_path / "m.sqlite3"
    m = meta_sqlite.SqliteMeta(str(path))
    m.put(FileRecord("a/x", 3, "text/plain", "s", 1.0, uploader="alice"))
    m.close()
    db = sqlite3.connect(path)  # back to what hmacfs with schema 3 left
    db.executescript("DROP TABLE bans; PRAGMA user_version = 3;")
    db.close()
    m = meta_sqlite.SqliteMeta(str(path))
    assert m._db.execute("PRAGMA user_version").fetchone()[0] == meta_sqlite.SCHEMA_VERSION == 6
    assert m.get("a/x") is not None and m.usage("alice").bytes == 3
    m.ban_put(BanRecord("198.51.100.1", 200.0, 100.0, 10))
    assert m.bans_active(0.0)[0].address == "198.51.100.1"
    m.close()
