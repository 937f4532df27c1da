"""Packed files in SQLite: the image columns (schema 5), `packed`, `fresh`, and the 4 -> 5 migration."""
from __future__ import annotations

import sqlite3
from dataclasses import replace

import pytest

from hmacfs.meta import sqlite as meta_sqlite
from hmacfs.meta.record import FileRecord, VersionRecord


def test_packed_rows_are_stored_listed_and_never_cached(tmp_path) -> None:
    m = meta_sqlite.SqliteMeta(str(tmp_path / "m.sqlite3"))
    plain = FileRecord("a/x", 3, "text/plain", "s", 1.0, uploader="alice")
    m.put(plain)
    m.put(FileRecord("a/y", 5, "text/plain", "t", 1.0))
    assert m.get("a/x") == plain and m.packed() == []
    m.put(replace(plain, image="/srv/iso/hmacfs-1.iso", image_offset=38 * 2048))
    assert [r.path for r in m.packed()] == ["a/x"] and m.packed(image="/other.iso") == []
    assert m.get("a/x").image_offset == 38 * 2048  # type: ignore[union-attr]
    assert m.usage("alice").bytes == 3  # packing moves bytes, not usage
    # another process packs a/y: the cached row is stale until `fresh` reads the database
    assert m.get("a/y").image is None  # type: ignore[union-attr]
    other = sqlite3.connect(tmp_path / "m.sqlite3")
    other.execute("UPDATE files SET image = '/i.iso', image_offset = 2048 WHERE path = 'a/y'")
    other.commit()
    other.close()
    assert m.get("a/y").image is None  # type: ignore[union-attr]
    assert m.fresh("a/y").image == "/i.iso" and m.get("a/y").image == "/i.iso"  # type: ignore[union-attr]
    m.close()


@pytest.mark.skipif(sqlite3.sqlite_version_info < (3, 35), reason="rolling a database back to schema 4 here "
                    "takes ALTER TABLE ... DROP COLUMN (SQLite 3.35); the migration itself needs only 3.24")
def test_a_schema_4_database_gains_the_image_columns_and_keeps_its_rows(tmp_path) -> None:
    path = tmp_path / "m.sqlite3"
    m = meta_sqlite.SqliteMeta(str(path))
    m.put(FileRecord("a/x", 3, "text/plain", "s", 1.0, uploader="alice"))
    m.close()
    db = sqlite3.connect(path)  # back to what hmacfs with schema 4 left
    db.executescript("DROP INDEX files_image; ALTER TABLE files DROP COLUMN image_offset; "
                     "ALTER TABLE files DROP COLUMN image; PRAGMA user_version = 4;")
    db.close()
    m = meta_sqlite.SqliteMeta(str(path))
    assert m._db.execute("PRAGMA user_version").fetchone()[0] == meta_sqlite.SCHEMA_VERSION
    assert m.get("a/x") == FileRecord("a/x", 3, "text/plain", "s", 1.0, uploader="alice")
    m.put(replace(m.get("a/x"), image="/i.iso", image_offset=4096))  # type: ignore[arg-type]
    m.close()
    m = meta_sqlite.SqliteMeta(str(path))  # and opening it again changes nothing
    assert m.get("a/x").image == "/i.iso" and m.usage("alice").bytes == 3  # type: ignore[union-attr]
    m.close()


@pytest.mark.skipif(sqlite3.sqlite_version_info < (3, 35), reason="rolling a database back to schema 5 here "
                    "takes ALTER TABLE ... DROP COLUMN (SQLite 3.35); the migration itself needs only 3.24")
def test_a_schema_5_database_gains_the_object_key_columns_and_keeps_its_rows(tmp_path) -> None:
    path = tmp_path / "m.sqlite3"
    m = meta_sqlite.SqliteMeta(str(path))
    m.put(FileRecord("a/x", 3, "text/plain", "s", 1.0, uploader="alice"))
    m.add_version(VersionRecord("a/x", 1, 2, "text/plain", "t", 0.5, location="v/1"))
    m.close()
    db = sqlite3.connect(path)  # back to what hmacfs with schema 5 left
    db.executescript("ALTER TABLE files DROP COLUMN object_key; ALTER TABLE versions DROP COLUMN object_key; "
                     "PRAGMA user_version = 5;")
    db.close()
    m = meta_sqlite.SqliteMeta(str(path))
    assert m._db.execute("PRAGMA user_version").fetchone()[0] == 6
    assert m.get("a/x") == FileRecord("a/x", 3, "text/plain", "s", 1.0, uploader="alice")
    assert m.versions("a/x") == [VersionRecord("a/x", 1, 2, "text/plain", "t", 0.5, location="v/1")]
    m.put(replace(m.get("a/x"), object_key="objects/ab"))  # type: ignore[arg-type]
    m.add_version(VersionRecord("a/x", 2, 2, "text/plain", "u", 0.7, object_key="objects/cd"))
    m.close()
    m = meta_sqlite.SqliteMeta(str(path))
    assert m.get("a/x").object_key == "objects/ab"  # type: ignore[union-attr]
    assert m.versions("a/x")[1].object_key == "objects/cd"
