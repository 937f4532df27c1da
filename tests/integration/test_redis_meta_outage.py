"""RedisMeta when Redis goes away, hangs or restarts: 503 + Retry-After, then recovery by itself.

Strategy: a real redis-server per test (tests/support/redisserver.py), a RedisMeta on a
client configured as the app should configure it (CLIENT_OPTIONS), and every public method
called while the server is stopped, then paused (SIGSTOP: connections stay open, nothing
answers), then back on the same port. The same RedisMeta object must work again: redis-py
reconnects on the next command and re-loads the Lua scripts Redis forgot (NOSCRIPT).
"""
from __future__ import annotations

import time

import pytest
import redis

from hmacfs.errors import HTTPError
from hmacfs.meta import redis as meta_redis
from hmacfs.meta.record import BanRecord, FileRecord, PartialRecord, VersionRecord
from hmacfs.meta.redis import RedisMeta
from tests.support.redisserver import RedisServer

CLIENT_OPTIONS = {"socket_timeout": 1, "socket_connect_timeout": 1, "health_check_interval": 10}
ROW = FileRecord("dir/a.txt", 5, "text/plain", "ab" * 32, 100.0, expires=200.0, uploader="u")

CALLS = {
    "get": lambda m: m.get("dir/a.txt"),
    "fresh": lambda m: m.fresh("dir/a.txt"),
    "check_schema": lambda m: m.check_schema(),
    "put": lambda m: m.put(ROW),
    "put_new": lambda m: m.put_new(ROW),
    "take": lambda m: m.take("dir/a.txt"),
    "expired": lambda m: m.expired(1e9),
    "select": lambda m: m.select(),
    "packed": lambda m: m.packed(),
    "blob_acquire": lambda m: m.blob_acquire("h", 1),
    "blob_release": lambda m: m.blob_release("h"),
    "blob_refs": lambda m: m.blob_refs("h"),
    "blob_counted_refs": lambda m: m.blob_counted_refs("h"),
    "set_blob_refs": lambda m: m.set_blob_refs("h", 1, 2),
    "blob_page": lambda m: m.blob_page(),
    "blob_stats": lambda m: m.blob_stats(),
    "versions": lambda m: m.versions("dir/a.txt"),
    "version_file_known": lambda m: m.version_file_known("x"),
    "add_version": lambda m: m.add_version(VersionRecord("dir/a.txt", 99, 1, "t/p", "s", 1.0)),
    "drop_versions": lambda m: m.drop_versions("dir/a.txt", 0),
    "usage": lambda m: m.usage("u"),
    "all_usage": lambda m: m.all_usage(),
    "uploader_count": lambda m: m.uploader_count(),
    "total_bytes": lambda m: m.total_bytes(),
    "total_files": lambda m: m.total_files(),
    "bytes_since": lambda m: m.bytes_since("u", 0.0),
    "log_upload": lambda m: m.log_upload("u", 1.0, 1),
    "prune_upload_log": lambda m: m.prune_upload_log(0.0),
    "partial_put": lambda m: m.partial_put(PartialRecord("p", "x", 1, "t", "tus", 1.0, 2.0)),
    "partial_touch": lambda m: m.partial_touch("p", 3.0),
    "partial_get": lambda m: m.partial_get("p"),
    "partial_delete": lambda m: m.partial_delete("p"),
    "partials_expired": lambda m: m.partials_expired(1e9),
    "partial_ids": lambda m: m.partial_ids(),
    "ban_put": lambda m: m.ban_put(BanRecord("192.0.2.1", 9.0, 1.0, 3)),
    "ban_get": lambda m: m.ban_get("192.0.2.1"),
    "ban_remove": lambda m: m.ban_remove("192.0.2.1"),
    "bans_active": lambda m: m.bans_active(0.0),
    "bans_purge": lambda m: m.bans_purge(0.0),
}


def test_every_public_method_is_in_the_list() -> None:
    public = {n for n in dir(RedisMeta) if not n.startswith("_") and callable(getattr(RedisMeta, n))}
    assert public - set(CALLS) == {"transaction", "close"}


@pytest.fixture
def server(tmp_path):
    srv = RedisServer(tmp_path / "redis").start()
    yield srv
    srv.close()


def meta_on(srv: RedisServer, **options) -> RedisMeta:
    return RedisMeta(redis.Redis.from_url(srv.url, **{**CLIENT_OPTIONS, **options}), "out:")


def assert_503(call, meta: RedisMeta, within: float, name: str = "") -> None:
    started = time.monotonic()
    with pytest.raises(HTTPError, match="503") as e:
        call(meta)
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "5"}, name
    assert "Redis" in e.value.message and time.monotonic() - started < within


def test_stopped_then_restarted_redis(server) -> None:
    meta = meta_on(server)
    meta.put(ROW)
    server.stop()
    for name, call in CALLS.items():
        assert_503(call, meta, within=3.0, name=name)
    with pytest.raises(HTTPError) as e, meta.transaction():
        pass
    assert e.value.status == 503
    server.start()  # same port, empty (no persistence): the same object works again
    assert meta.get(ROW.path) is None and meta.put_new(ROW) and meta.get(ROW.path) == ROW
    for call in CALLS.values():
        call(meta)
    with meta.transaction():
        meta.put(ROW)
    assert meta.total_files() >= 1


def test_hung_redis_answers_503_within_the_socket_timeout(server) -> None:
    meta = meta_on(server)
    meta.put(ROW)
    server.pause()
    try:
        assert_503(CALLS["get"], meta, within=4.0)
        assert_503(CALLS["put_new"], meta, within=4.0)
    finally:
        server.resume()
    assert meta.get(ROW.path) == ROW


def test_redis_dying_inside_a_transaction(tmp_path, monkeypatch) -> None:
    """With persistence, a transaction cut off by a crash is rolled back when Redis returns:
    its lock runs out and the next writer restores the journal it left."""
    monkeypatch.setattr(meta_redis, "LOCK_TTL_MS", 500)
    srv = RedisServer(tmp_path / "redis", appendonly=True, extra=("--appendfsync", "always")).start()
    try:
        meta = meta_on(srv)
        meta.put(ROW)
        undone: list[str] = []
        with pytest.raises(HTTPError) as e, meta.transaction() as undo:
            undo.append(lambda: undone.append("undo"))
            meta.put(FileRecord("half", 1, "t/p", "s", 1.0, uploader="u"))
            meta.take(ROW.path)
            srv.kill()
            meta.put(FileRecord("never", 1, "t/p", "s", 1.0))
        assert e.value.status == 503 and undone == ["undo"]
        srv.start()
        assert meta.get("half") is not None  # the half-done transaction as persisted...
        time.sleep(0.6)  # ...until its lock expires
        meta.put_new(FileRecord("next", 1, "t/p", "s", 1.0))  # the next writer rolls it back
        assert meta.get("half") is None and meta.get(ROW.path) == ROW and meta.get("never") is None
        assert (meta.usage("u").files, meta.total_files()) == (1, 2)
    finally:
        srv.close()


def test_password_protected_redis(tmp_path) -> None:
    srv = RedisServer(tmp_path / "redis", password="s3cret pass").start()
    try:
        meta = meta_on(srv)
        assert meta.put_new(ROW) and meta.get(ROW.path) == ROW
        srv.restart()
        assert meta.get(ROW.path) is None and meta.put_new(ROW)
        wrong = RedisMeta(redis.Redis(host="127.0.0.1", port=srv.port, password="wrong", **CLIENT_OPTIONS))
        assert_503(CALLS["get"], wrong, within=15.0)  # redis-py retries a refused AUTH with back-off
    finally:
        srv.close()
