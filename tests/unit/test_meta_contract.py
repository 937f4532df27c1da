"""One contract for both metadata backends: SqliteMeta (the reference) and RedisMeta.

Strategy: every test takes `meta`, a fresh store of each backend (Redis: a real
redis-server for the session, a key prefix per test), and states what the pipeline,
handlers and janitor rely on. Then a hypothesis state machine runs the same random
operations on both and compares every read after each step: usage accounting, blob
counts and paging must agree to the byte. Tests only Redis can fail (two nodes racing,
the cluster lock) come last.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hmacfs.errors import HTTPError, StartupError
from hmacfs.meta import redis as meta_redis
from hmacfs.meta import sqlite as meta_sqlite
from hmacfs.meta.record import BanRecord, FileRecord, PartialRecord, Usage, VersionRecord
from hmacfs.meta.redis import RedisMeta
from hmacfs.meta.sqlite import SqliteMeta
from tests.support.redisserver import RedisServer

CLIENT_OPTIONS = {"socket_timeout": 5, "socket_connect_timeout": 2, "health_check_interval": 10}


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.close()


def client_for(server: RedisServer, decode: bool = False) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=decode, **CLIENT_OPTIONS)


def redis_meta(server: RedisServer, prefix: str = "", decode: bool = False) -> RedisMeta:
    return RedisMeta(client_for(server, decode), prefix or f"t{uuid.uuid4().hex[:12]}:")


@pytest.fixture(params=["sqlite", "redis", "redis-str"])
def meta(request, tmp_path):
    """A fresh store of each backend (Redis with bytes replies and with decode_responses)."""
    if request.param == "sqlite":
        store = SqliteMeta(str(tmp_path / "m.sqlite3"))
    else:
        store = redis_meta(request.getfixturevalue("redis_server"), decode=request.param == "redis-str")
    yield store
    store.close()


def rec(path: str, size: int = 10, **kw) -> FileRecord:
    return FileRecord(path, size, kw.pop("content_type", "text/plain"), kw.pop("sha256", "ab" * 32),
                      kw.pop("created", 100.0), **kw)


def paths(rows) -> list[str]:
    return [r.path for r in rows]


# -- files ---------------------------------------------------------------------------------

def test_every_field_round_trips(meta) -> None:
    full = FileRecord("dir/é ü/x.bin", 2**40 + 3, "image/png", "ff" * 32, 1733000000.123456789,
                      mtime_ns=1733000000123456789, expires=1733000060.1, uploader="", version=7,
                      blob="b" * 64, ref=True, encrypted=True, image="/srv/iso/a.iso", image_offset=2048 * 9,
                      object_key="objects/2026/abc")
    bare = FileRecord("bare", 0, "application/octet-stream", "", 0.1)
    meta.put(full)
    meta.put(bare)
    assert meta.get(full.path) == full and meta.fresh(full.path) == full
    assert meta.get("bare") == bare and meta.get("bare").expires is None and meta.get("bare").object_key is None
    assert meta.get("missing") is None
    meta.put(FileRecord("int-created", 1, "t/p", "s", 5))  # SQLite's REAL affinity: an int comes back a float
    assert type(meta.fresh("int-created").created) is float  # (SqliteMeta.get may answer from its cache)


def test_put_replaces_and_put_new_refuses_a_taken_path(meta) -> None:
    assert meta.put_new(rec("p", 1, uploader="a"))
    assert not meta.put_new(rec("p", 2, uploader="b"))
    assert meta.get("p").size == 1 and meta.usage("b") == Usage("b", 0, 0)
    meta.put(rec("p", 3, uploader="b"))
    assert meta.get("p").size == 3
    assert (meta.usage("a").files, meta.usage("b")) == (0, Usage("b", 1, 3))
    assert (meta.total_files(), meta.total_bytes()) == (1, 3)


def test_put_new_racing_threads_one_wins(meta) -> None:
    for round_ in range(5):
        results: list[bool] = []
        barrier = threading.Barrier(6)

        def race(i: int, barrier=barrier, results=results, round_=round_) -> None:
            barrier.wait()
            results.append(meta.put_new(rec(f"race{round_}", i + 1, uploader=f"u{i}")))

        threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 5 + [True]
    assert meta.total_files() == 5


def test_take_removes_once_and_respects_expired_at(meta) -> None:
    meta.put(rec("a", 4, uploader="u", expires=50.0))
    meta.put(rec("b", 5))
    assert meta.take("a", expired_at=49.9) is None and meta.get("a") is not None  # not expired yet
    assert meta.take("b", expired_at=1e12) is None and meta.get("b") is not None  # never expires
    assert meta.take("a", expired_at=50.0) == rec("a", 4, uploader="u", expires=50.0)
    assert meta.take("a") is None and meta.expired(1e12) == []
    assert meta.take("b") == rec("b", 5) and meta.take("b") is None
    assert (meta.total_files(), meta.total_bytes(), meta.usage("u").files) == (0, 0, 0)


def test_expired_is_ordered_by_expiry_and_limited(meta) -> None:
    for i, e in enumerate([30.0, 10.0, 20.0, 40.0, None]):
        meta.put(rec(f"f{i}", expires=e))
    assert paths(meta.expired(30.0)) == ["f1", "f2", "f0"]
    assert paths(meta.expired(1e9, limit=2)) == ["f1", "f2"]
    assert meta.expired(9.9) == [] and meta.expired(100.0, limit=0) == []
    meta.put(rec("f1", expires=35.0))  # moved on: the index follows
    assert paths(meta.expired(36.0)) == ["f2", "f0", "f1"]


def test_select_filters_and_pages_by_path(meta) -> None:
    names = ["a/1", "a/2", "a/é", "ab", "a", "b/1", "b/2", "é/x", "~"]
    for i, name in enumerate(names):
        meta.put(rec(name, i, uploader="odd" if i % 2 else "even", created=float(i)))
    assert paths(meta.select()) == sorted(names)
    assert paths(meta.select(prefix="a/")) == ["a/1", "a/2", "a/é"]
    assert paths(meta.select(prefix="é")) == ["é/x"] and meta.select(prefix="zz") == []
    assert paths(meta.select(prefix="a", after="a/2")) == ["a/é", "ab"]
    assert paths(meta.select(prefix="b/", after="a")) == ["b/1", "b/2"]
    assert paths(meta.select(prefix="a/", after="b")) == []
    assert paths(meta.select(uploader="odd")) == sorted(n for i, n in enumerate(names) if i % 2)
    assert paths(meta.select(created_before=3.0)) == ["a/1", "a/2", "a/é"]
    assert paths(meta.select(uploader="even", created_before=5.0, prefix="a")) == ["a", "a/1", "a/é"]
    seen, after = [], ""
    while True:
        page = meta.select(limit=2, after=after)
        if not page:
            break
        seen += paths(page)
        after = page[-1].path
    assert seen == sorted(names)
    assert meta.select(limit=0) == []
    meta.put(rec("a/1", 1, uploader="even"))  # changes uploader: the per-uploader index follows
    assert "a/1" in paths(meta.select(uploader="even")) and "a/1" not in paths(meta.select(uploader="odd"))


def test_select_with_a_sparse_filter_pages_past_many_rows(meta) -> None:
    for i in range(250):
        meta.put(rec(f"p{i:03d}", created=1.0 if i in (7, 199, 248) else 50.0))
    assert paths(meta.select(created_before=2.0, limit=2)) == ["p007", "p199"]
    assert paths(meta.select(created_before=2.0)) == ["p007", "p199", "p248"]


def test_packed_lists_image_rows(meta) -> None:
    meta.put(rec("x/1", image="/i/a.iso", image_offset=4096))
    meta.put(rec("x/2", image="/i/b.iso"))
    meta.put(rec("x/3", image="/i/a.iso"))
    meta.put(rec("x/4"))
    assert paths(meta.packed()) == ["x/1", "x/2", "x/3"]
    assert paths(meta.packed("/i/a.iso")) == ["x/1", "x/3"]
    assert paths(meta.packed(after="x/1", limit=1)) == ["x/2"]
    meta.put(rec("x/1"))  # unpacked again
    assert paths(meta.packed("/i/a.iso")) == ["x/3"]
    meta.take("x/3")
    assert paths(meta.packed()) == ["x/2"]


# -- usage ---------------------------------------------------------------------------------

def test_usage_follows_files_and_versions(meta) -> None:
    meta.put(rec("a/x", 10, uploader="bob"))
    meta.put(rec("a/y", 5))
    meta.put(rec("a/x", 30, uploader="alice"))  # replaced: moves to alice
    meta.add_version(VersionRecord("a/x", 1, 7, "t/p", "s", 1.0, uploader="alice"))
    assert (meta.usage("bob").bytes, meta.usage("alice").bytes) == (0, 37)
    assert (meta.total_bytes(), meta.total_files()) == (42, 3)
    assert meta.all_usage() == [Usage("alice", 2, 37)] and meta.uploader_count() == 1
    assert meta.take("a/x") is not None and meta.take("a/x") is None
    meta.drop_versions("a/x", 0)
    assert (meta.usage("alice").files, meta.total_bytes(), meta.uploader_count(), meta.all_usage()) == (0, 5, 0, [])


def test_upload_log_sums_and_prunes(meta) -> None:
    meta.log_upload("u", 10.0, 5)
    meta.log_upload("u", 10.0, 5)  # same time and size: two entries
    meta.log_upload("u", 20.5, 7)
    meta.log_upload("v", 20.5, 100)
    assert (meta.bytes_since("u", 10.0), meta.bytes_since("u", 10.1), meta.bytes_since("u", 21.0)) == (17, 7, 0)
    meta.prune_upload_log(20.5)
    assert (meta.bytes_since("u", 0.0), meta.bytes_since("v", 0.0), meta.bytes_since("w", 0.0)) == (7, 100, 0)


# -- blobs ---------------------------------------------------------------------------------

def test_blob_references(meta) -> None:
    assert (meta.blob_acquire("h1", 100), meta.blob_acquire("h1", 999), meta.blob_acquire("h2", 5)) == (1, 2, 1)
    assert meta.blob_page() == [("h1", 100, 2), ("h2", 5, 1)] and meta.blob_page("h1", 1) == [("h2", 5, 1)]
    assert meta.blob_stats() == (2, 105, 205)
    assert (meta.blob_release("h1"), meta.blob_release("h1"), meta.blob_release("h1")) == (1, 0, 0)
    assert meta.blob_refs("h1") == 0 and meta.blob_stats() == (1, 5, 5)
    meta.set_blob_refs("h2", 5, 4)
    meta.set_blob_refs("h3", 7, 2)
    assert meta.blob_stats() == (2, 12, 34) and meta.blob_refs("h2") == 4
    meta.set_blob_refs("h2", 5, 0)
    assert meta.blob_page() == [("h3", 7, 2)] and meta.blob_stats() == (1, 7, 14)
    meta.put(rec("f", blob="h3"))
    meta.add_version(VersionRecord("f", 1, 7, "t/p", "s", 1.0, blob="h3"))
    meta.put(rec("g", blob="h3"))
    assert meta.blob_counted_refs("h3") == 3 and meta.blob_counted_refs("h9") == 0
    meta.put(rec("g"))
    meta.drop_versions("f", 0)
    assert meta.blob_counted_refs("h3") == 1


# -- versions ------------------------------------------------------------------------------

def test_versions_kept_oldest_first_and_dropped(meta) -> None:
    for n in (3, 1, 2, 10):
        meta.add_version(VersionRecord("p", n, n, "t/p", "s", float(n), uploader="u", location=f"loc/{n}",
                                       encrypted=n == 2, object_key=f"o{n}" if n > 2 else None))
    meta.add_version(VersionRecord("q", 1, 1, "t/p", "s", 1.0))
    with pytest.raises(Exception):  # noqa: B017 (SQLite: IntegrityError, Redis: ValueError)
        meta.add_version(VersionRecord("p", 2, 99, "t/p", "s", 1.0))
    got = meta.versions("p")
    assert [v.version for v in got] == [1, 2, 3, 10] and got[1].encrypted and got[3].object_key == "o10"
    assert got[0] == VersionRecord("p", 1, 1, "t/p", "s", 1.0, uploader="u", location="loc/1")
    assert meta.version_file_known("loc/2") and not meta.version_file_known("loc/4")
    assert [v.version for v in meta.drop_versions("p", 2)] == [1, 2]
    assert [v.version for v in meta.drop_versions("p", 5)] == [] and len(meta.versions("p")) == 2
    assert not meta.version_file_known("loc/2") and meta.usage("u") == Usage("u", 2, 13)
    assert meta.versions("none") == [] and meta.drop_versions("none", 0) == []


# -- partials and bans ---------------------------------------------------------------------

def test_partials(meta) -> None:
    p = PartialRecord("id1", "dir/f", 100, "text/plain", "tus", 1.5, 60.25, file_expires=999.5, uploader="u",
                      metadata="filename ZA==", grant="v2", completed=True)
    meta.partial_put(p)
    meta.partial_put(PartialRecord("id2", "dir/g", 5, "t/p", "ietf", 1.0, 30.0))
    assert meta.partial_get("id1") == p and meta.partial_get("nope") is None
    meta.partial_touch("id1", 20.125)
    meta.partial_touch("gone", 1.0)  # makes no row
    assert meta.partial_get("gone") is None and meta.partial_ids() == {"id1", "id2"}
    assert [r.id for r in meta.partials_expired(30.0)] == ["id1", "id2"]
    assert [r.id for r in meta.partials_expired(30.0, limit=1)] == ["id1"] and meta.partials_expired(20.0) == []
    assert meta.partial_get("id1").expires == 20.125
    assert meta.partial_delete("id1") and not meta.partial_delete("id1") and meta.partial_ids() == {"id2"}


def test_bans(meta) -> None:
    meta.ban_put(BanRecord("198.51.100.1", 200.0, 100.0, 10, "403 signature mismatch"))
    meta.ban_put(BanRecord("2001:db8::/64", 300.0, 100.0, 10))
    meta.ban_put(BanRecord("198.51.100.2", 150.0, 100.0, 10))
    meta.ban_put(BanRecord("198.51.100.0", 300.0, 100.0, 10))
    assert [b.address for b in meta.bans_active(160.0)] == ["198.51.100.0", "2001:db8::/64", "198.51.100.1"]
    assert meta.bans_active(300.0) == []  # until > now
    assert meta.ban_get("198.51.100.1") == BanRecord("198.51.100.1", 200.0, 100.0, 10, "403 signature mismatch")
    meta.ban_put(BanRecord("198.51.100.1", 400.0, 350.0, 5))
    assert meta.ban_get("198.51.100.1") == BanRecord("198.51.100.1", 400.0, 350.0, 5, "")
    assert meta.bans_purge(150.0) == 1 and meta.ban_get("198.51.100.2") is None
    assert meta.ban_remove("2001:db8::/64") and not meta.ban_remove("2001:db8::/64")


# -- transactions --------------------------------------------------------------------------

def test_a_failing_transaction_undoes_its_writes_then_runs_undo_newest_first(meta) -> None:
    meta.put(rec("keep", 3, uploader="u", expires=5.0))
    meta.blob_acquire("h", 10)
    order: list[str] = []
    with pytest.raises(KeyError), meta.transaction() as undo:
        meta.put(rec("new", 7, uploader="u"))
        meta.put(rec("keep", 9, uploader="v"))
        assert meta.get("new") is not None  # a transaction reads its own writes
        meta.blob_acquire("h", 10)
        meta.blob_acquire("h2", 1)
        meta.add_version(VersionRecord("keep", 1, 4, "t/p", "s", 1.0, location="l"))
        meta.partial_put(PartialRecord("pid", "x", 1, "t", "tus", 1.0, 2.0))
        meta.ban_put(BanRecord("1.2.3.4", 9.0, 1.0, 3))
        meta.log_upload("u", 1.0, 5)
        undo.append(lambda: order.append("first"))
        with meta.transaction() as inner:  # nested: joins
            assert inner is undo
            meta.take("keep")
            inner.append(lambda: order.append("second"))
        raise KeyError("boom")
    assert order == ["second", "first"]
    assert meta.get("new") is None and meta.get("keep") == rec("keep", 3, uploader="u", expires=5.0)
    assert paths(meta.expired(10.0)) == ["keep"] and paths(meta.select(uploader="u")) == ["keep"]
    assert (meta.usage("u"), meta.usage("v").files, meta.total_bytes()) == (Usage("u", 1, 3), 0, 3)
    assert meta.blob_page() == [("h", 10, 1)] and meta.blob_stats() == (1, 10, 10)
    assert meta.versions("keep") == [] and not meta.version_file_known("l")
    assert meta.partial_ids() == set() and meta.ban_get("1.2.3.4") is None and meta.bytes_since("u", 0.0) == 0


def test_a_transaction_commits_and_undo_steps_may_write(meta) -> None:
    with meta.transaction():
        meta.put(rec("a"))
        with meta.transaction():
            meta.put(rec("b"))
    assert paths(meta.select()) == ["a", "b"]
    with pytest.raises(ValueError), meta.transaction() as undo:
        meta.take("a")
        undo.append(lambda: meta.put(rec("undone", 1)))  # runs under the lock, after the rollback
        raise ValueError
    assert paths(meta.select()) == ["a", "b", "undone"]
    with pytest.raises(RuntimeError), meta.transaction():  # raised in a nested block: the outer rolls back
        meta.put(rec("c"))
        with meta.transaction():
            meta.put(rec("d"))
            raise RuntimeError
    assert paths(meta.select()) == ["a", "b", "undone"]


def test_a_transaction_holds_off_other_threads(meta) -> None:
    done = threading.Event()
    with meta.transaction():
        meta.put(rec("t", 1))
        writer = threading.Thread(target=lambda: (meta.put(rec("t", 2)), done.set()))
        writer.start()
        assert not done.wait(0.3)
        assert meta.get("t").size == 1
    writer.join(10)
    assert done.is_set() and meta.get("t").size == 2


# -- both backends, the same random operations ---------------------------------------------

PATHS = st.sampled_from(["a", "a/b", "a/c", "b", "é", "z/y"])
UPLOADERS = st.sampled_from([None, "", "alice", "bob"])
TIMES = st.sampled_from([1.0, 2.5, 3.0, 1e9, 0.1 + 0.2])
BLOBS = st.sampled_from([None, "h1", "h2"])


class SameAnswers(RuleBasedStateMachine):
    """SqliteMeta and RedisMeta given the same operations give the same answers."""

    server: RedisServer

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.stores = [SqliteMeta(str(Path(self.dir.name) / "m.sqlite3")), redis_meta(self.server)]
        self.version = 0

    def both(self, name: str, *args):
        got = []
        for store in self.stores:
            try:
                got.append(("ok", getattr(store, name)(*args)))
            except Exception:  # both must fail alike; the type is the backend's
                got.append(("error", None))
        assert got[0] == got[1], (name, args, got)
        return got[0][1]

    @rule(path=PATHS, size=st.integers(0, 2**40), uploader=UPLOADERS, expires=st.none() | TIMES,
          blob=BLOBS, image=st.sampled_from([None, "/i1", "/i2"]), new=st.booleans())
    def put(self, path, size, uploader, expires, blob, image, new) -> None:
        r = rec(path, size, uploader=uploader, expires=expires, blob=blob, image=image,
                object_key=f"k{size}" if size % 2 else None)
        self.both("put_new" if new else "put", r)

    @rule(path=PATHS, expired_at=st.none() | TIMES)
    def take(self, path, expired_at) -> None:
        self.both("take", path, expired_at)

    @rule(path=PATHS, size=st.integers(0, 10**6), uploader=UPLOADERS, blob=BLOBS, reuse=st.booleans())
    def add_version(self, path, size, uploader, blob, reuse) -> None:
        self.version += 0 if reuse else 1
        self.both("add_version", VersionRecord(path, self.version, size, "t/p", "s", 1.0, uploader=uploader,
                                               blob=blob, location=f"{path}/{self.version}"))

    @rule(path=PATHS, keep=st.integers(-1, 3))
    def drop_versions(self, path, keep) -> None:
        self.both("drop_versions", path, keep)

    @rule(sha=st.sampled_from(["h1", "h2", "h3"]), size=st.integers(0, 100), op=st.sampled_from(["acq", "rel", "set"]),
          refs=st.integers(-1, 3))
    def blobs(self, sha, size, op, refs) -> None:
        if op == "acq":
            self.both("blob_acquire", sha, size)
        elif op == "rel":
            self.both("blob_release", sha)
        else:
            self.both("set_blob_refs", sha, size, refs)

    @rule(uploader=st.sampled_from(["alice", "bob"]), at=TIMES, size=st.integers(0, 100), prune=st.none() | TIMES)
    def upload_log(self, uploader, at, size, prune) -> None:
        self.both("log_upload", uploader, at, size)
        if prune is not None:
            self.both("prune_upload_log", prune)

    @rule(pid=st.sampled_from(["p1", "p2", "p3"]), expires=TIMES, op=st.sampled_from(["put", "touch", "delete"]),
          completed=st.booleans())
    def partials(self, pid, expires, op, completed) -> None:
        if op == "put":
            record = PartialRecord(pid, "x/" + pid, 10, "t/p", "tus", 1.0, expires, completed=completed)
            self.both("partial_put", record)
        elif op == "touch":
            self.both("partial_touch", pid, expires)
        else:
            self.both("partial_delete", pid)

    @rule(address=st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::/64"]), until=TIMES,
          op=st.sampled_from(["put", "remove", "purge"]))
    def bans(self, address, until, op) -> None:
        if op == "put":
            self.both("ban_put", BanRecord(address, until, 1.0, 3, "why"))
        elif op == "remove":
            self.both("ban_remove", address)
        else:
            self.both("bans_purge", until)

    @rule(path=PATHS, size=st.integers(0, 100), uploader=UPLOADERS)
    def failed_transaction(self, path, size, uploader) -> None:
        """Writes inside a block that raises leave no trace in either backend."""
        for store in self.stores:
            with pytest.raises(LookupError), store.transaction():
                store.put(rec(path, size, uploader=uploader, blob="h1"))
                store.blob_acquire("h1", size)
                store.take("a")
                store.drop_versions(path, 0)
                raise LookupError

    @invariant()
    def reads_agree(self) -> None:
        for uploader in ("alice", "bob", "", "nobody"):
            self.both("usage", uploader)
            self.both("select", uploader)
            self.both("bytes_since", uploader, 2.0)
        for name in ("total_bytes", "total_files", "uploader_count", "blob_stats", "blob_page", "select", "packed"):
            self.both(name)
        usages = [store.all_usage() for store in self.stores]  # equal bytes may come in either order
        assert [u.bytes for u in usages[0]] == [u.bytes for u in usages[1]]
        assert sorted(usages[0], key=lambda u: u.uploader) == sorted(usages[1], key=lambda u: u.uploader)
        self.both("select", None, "a", None, 2, "a")
        self.both("packed", "/i1")
        self.both("select", None, None, 2.0)
        for name in ("partial_ids", "bans_active"):
            self.both(name, *(() if name == "partial_ids" else (2.0,)))
        found = [store.partials_expired(1e9) for store in self.stores]
        assert [p.expires for p in found[0]] == [p.expires for p in found[1]]  # ties: either order
        assert sorted(found[0], key=lambda p: p.id) == sorted(found[1], key=lambda p: p.id)
        self.both("partial_get", "p1")
        for sha in ("h1", "h2", "h3"):
            self.both("blob_counted_refs", sha)
        for path in ("a", "a/b", "é"):
            self.both("get", path)
            self.both("versions", path)
        for path in ("a", "a/b", "b", "é"):
            for n in range(1, min(self.version, 10) + 1):
                self.both("version_file_known", f"{path}/{n}")
        # equal expiry times may come in either order: compare the times, then the sets
        rows = [store.expired(1e9) for store in self.stores]
        assert [r.expires for r in rows[0]] == [r.expires for r in rows[1]]
        assert sorted(paths(rows[0])) == sorted(paths(rows[1]))

    def teardown(self) -> None:
        for store in self.stores:
            store.close()
        self.dir.cleanup()


def test_sqlite_and_redis_give_the_same_answers(redis_server) -> None:
    SameAnswers.server = redis_server
    machine = SameAnswers.TestCase
    machine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                suppress_health_check=list(HealthCheck))
    machine().runTest()


# -- Redis only: several nodes on one Redis ------------------------------------------------

def test_two_nodes_racing_put_new_one_wins(redis_server) -> None:
    prefix = f"race{uuid.uuid4().hex[:8]}:"
    nodes = [redis_meta(redis_server, prefix) for _ in range(4)]
    for round_ in range(20):
        results: list[bool] = []
        barrier = threading.Barrier(len(nodes))

        def race(node: RedisMeta, i: int, barrier=barrier, results=results, round_=round_) -> None:
            barrier.wait()
            results.append(node.put_new(rec(f"p{round_}", i + 1, uploader=f"u{i}")))

        threads = [threading.Thread(target=race, args=(n, i)) for i, n in enumerate(nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 3 + [True]
    assert nodes[0].total_files() == 20 and sum(u.files for u in nodes[1].all_usage()) == 20


def test_a_transaction_on_one_node_blocks_writes_from_another(redis_server) -> None:
    prefix = f"lock{uuid.uuid4().hex[:8]}:"
    a, b = redis_meta(redis_server, prefix), redis_meta(redis_server, prefix)
    done = threading.Event()
    with a.transaction():
        a.put(rec("x", 1, uploader="a"))
        writer = threading.Thread(target=lambda: (b.put(rec("x", 2, uploader="b")), done.set()))
        writer.start()
        assert not done.wait(0.5)  # b waits for a's transaction
        assert b.get("x").size == 1 and b.usage("b").files == 0
    writer.join(10)
    assert done.is_set() and a.get("x").size == 2 and a.usage("a").files == 0 and a.usage("b").files == 1
    # a failing transaction on b: a sees none of it afterwards
    with pytest.raises(OSError), b.transaction():
        b.take("x")
        raise OSError
    assert a.get("x").size == 2


def test_lock_wait_is_bounded_with_a_503(redis_server, monkeypatch) -> None:
    prefix = f"busy{uuid.uuid4().hex[:8]}:"
    a, b = redis_meta(redis_server, prefix), redis_meta(redis_server, prefix)
    monkeypatch.setattr(meta_redis, "LOCK_WAIT", 0.3)
    with a.transaction():
        with pytest.raises(HTTPError) as e:
            b.put(rec("x"))
        assert e.value.status == 503 and e.value.headers == {"Retry-After": "5"}
        with pytest.raises(HTTPError), b.transaction():
            pass
    b.put(rec("x"))
    assert a.get("x") is not None


def test_a_node_dying_in_a_transaction_is_rolled_back_by_the_next_writer(redis_server) -> None:
    prefix = f"dead{uuid.uuid4().hex[:8]}:"
    a, b = redis_meta(redis_server, prefix), redis_meta(redis_server, prefix)
    b.put(rec("old", 5, uploader="u"))
    block = a.transaction()
    block.__enter__()
    a.put(rec("half", 9, uploader="u"))
    a.take("old")
    a.close()  # "dies": no more renewals
    a.client.pexpire(prefix + "lock", 200)  # and its lock runs out as the TTL would
    started = time.monotonic()
    assert b.put_new(rec("other", 1))  # waits for the TTL, then rolls the journal back
    assert time.monotonic() - started >= 0.1
    assert b.get("half") is None and b.get("old") is not None
    assert (b.usage("u"), b.total_files()) == (Usage("u", 1, 5), 2)
    with pytest.raises(HTTPError) as e:  # the stalled node comes back: its lock is gone
        a.put(rec("late"))
    assert e.value.status == 503 and b.get("late") is None
    with pytest.raises(HTTPError):
        block.__exit__(None, None, None)  # its commit finds the lock lost


def test_a_long_transaction_keeps_its_lock(redis_server, monkeypatch) -> None:
    monkeypatch.setattr(meta_redis, "LOCK_TTL_MS", 300)
    monkeypatch.setattr(meta_redis, "RENEW_EVERY", 0.05)
    prefix = f"long{uuid.uuid4().hex[:8]}:"
    a, b = redis_meta(redis_server, prefix), redis_meta(redis_server, prefix)
    with a.transaction():
        a.put(rec("x", 1))
        time.sleep(1.0)  # > TTL: only the renewals keep it
        assert a.client.get(prefix + "lock") is not None
        a.put(rec("y", 1))
    assert paths(b.select()) == ["x", "y"]
    a.close()


def test_keys_stay_under_the_prefix(redis_server) -> None:
    tag = uuid.uuid4().hex[:8]
    one, two = redis_meta(redis_server, f"dep1{tag}:"), redis_meta(redis_server, f"dep2{tag}:")
    before = set(one.client.keys("*"))
    one.put(rec("a", 1, uploader="u", expires=1.0, image="/i", blob="h"))
    one.add_version(VersionRecord("a", 1, 1, "t/p", "s", 1.0, uploader="u", location="l"))
    one.blob_acquire("h", 1)
    one.log_upload("u", 1.0, 1)
    one.partial_put(PartialRecord("p", "a", 1, "t", "tus", 1.0, 2.0))
    one.ban_put(BanRecord("1.2.3.4", 2.0, 1.0, 1))
    with pytest.raises(ZeroDivisionError), one.transaction():
        one.put(rec("b"))
        1 / 0  # noqa: B018
    made = set(one.client.keys("*")) - before
    assert made and all(k.startswith(f"dep1{tag}:".encode()) for k in made)
    assert two.get("a") is None and two.total_files() == 0 and one.total_files() == 2  # the file and its version


def test_the_module_imports_without_redis_py() -> None:
    code = ("import sys; sys.modules['redis'] = None\n"
            "import hmacfs.meta.redis as m\n"
            "from hmacfs.errors import StartupError\n"
            "try:\n    m.RedisMeta(object())\nexcept StartupError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert "refused: [redis] needs the Python package redis" in out.stdout


def test_redis_schema_is_recorded_and_a_newer_one_is_refused(redis_server) -> None:
    meta = redis_meta(redis_server)
    meta.check_schema()
    assert int(meta.client.get(meta.prefix + "schema")) == meta_sqlite.SCHEMA_VERSION
    meta.client.set(meta.prefix + "schema", meta_sqlite.SCHEMA_VERSION + 1)
    with pytest.raises(StartupError, match="written by a newer hmacfs"):
        redis_meta(redis_server, meta.prefix).check_schema()
    meta.client.set(meta.prefix + "schema", 1)  # an older deployment's rows: upgraded in place
    meta.check_schema()
    assert int(meta.client.get(meta.prefix + "schema")) == meta_sqlite.SCHEMA_VERSION
