"""Deduplication, versioning, expiry, quotas and precaching against the real process.

Each feature is checked the way an operator would check it: through HTTP, on the disk
(`os.stat` link counts, blob files, the versions directory) and in the metrics.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from hmacfs import auth
from tests.support.client import put, raw, request, signed_v3, status_of, url_path


def blob_files(srv) -> list[Path]:
    return [p for p in (srv.storage / ".hmacfs" / "blobs").rglob("*") if p.is_file()]


def metric(srv, name: str) -> float:
    text = request(srv.metrics_port, "GET", "/metrics").body.decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} not exported"
    return values[0]


def get(srv, path: str, query: str = "", headers: dict | None = None):
    return request(srv.port, "GET", url_path(srv.prefix, path) + query, headers=headers)


def jwt_put(srv, path: str, data: bytes, sub: str, extra: dict | None = None, headers: dict | None = None):
    slot, _, name = path.partition("/")
    claims = {"exp": int(time.time()) + 300, "slot": slot, "filename": name, "filesize": len(data), "sub": sub,
              **(extra or {})}
    h = {"Authorization": "Bearer " + auth.jwt_encode(srv.secret.encode(), claims), **(headers or {})}
    return request(srv.port, "PUT", url_path(srv.prefix, path), data, h)


def wait_for(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# -- deduplication ---------------------------------------------------------------------------------

@pytest.fixture
def dedup(hmacfs_factory):
    return hmacfs_factory({"deduplication": {"enabled": True}, "uploads": {"maxuploadsize": "10MB"}})


def test_twenty_identical_uploads_occupy_one_blob(dedup) -> None:
    data = os.urandom(256 * 1024)
    paths = [f"{uuid.uuid4()}/same.bin" for _ in range(20)]
    for p in paths:
        assert put(dedup, p, data).status == 201
    blobs = blob_files(dedup)
    assert len(blobs) == 1
    st = os.stat(blobs[0])
    assert st.st_nlink == 21 and st.st_size == len(data)  # the blob and 20 paths: one inode, one copy
    assert {os.stat(dedup.storage / p).st_ino for p in paths} == {st.st_ino}
    assert metric(dedup, "hmacfs_dedup_blobs") == 1
    assert metric(dedup, "hmacfs_dedup_saved_bytes") == 19 * len(data)
    for p in paths[:19]:
        r = request(dedup.port, "DELETE", signed_v3(dedup.prefix, dedup.secret, p, "DELETE", int(time.time()) + 60))
        assert r.status == 204
    assert get(dedup, paths[19]).body == data  # deleting one path never harms another
    assert os.stat(blobs[0]).st_nlink == 2
    r = request(dedup.port, "DELETE", signed_v3(dedup.prefix, dedup.secret, paths[19], "DELETE", int(time.time()) + 60))
    assert r.status == 204
    assert blob_files(dedup) == []  # the last reference took the blob with it
    wait_for(lambda: metric(dedup, "hmacfs_dedup_blobs") == 0, "the gauge (refreshed every 5 s)")


def test_racing_uploads_and_deletes_of_one_content_lose_nothing(dedup) -> None:
    data = b"shared content " * 1000
    stable = [f"{uuid.uuid4()}/keep.bin" for _ in range(5)]
    for p in stable:
        assert put(dedup, p, data).status == 201
    churn = [f"{uuid.uuid4()}/churn.bin" for _ in range(24)]
    errors: list[str] = []

    def worker(mine: list[str]) -> None:
        for p in mine:
            if put(dedup, p, data).status != 201:
                errors.append(f"put {p}")
            r = request(dedup.port, "DELETE", signed_v3(dedup.prefix, dedup.secret, p, "DELETE",
                                                         int(time.time()) + 60))
            if r.status != 204:
                errors.append(f"delete {p}: {r.status}")

    threads = [threading.Thread(target=worker, args=(churn[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for p in stable:
        assert get(dedup, p).body == data
    blobs = blob_files(dedup)
    assert len(blobs) == 1 and os.stat(blobs[0]).st_nlink == 1 + len(stable)
    assert metric(dedup, "hmacfs_dedup_logical_bytes") == len(stable) * len(data)


def test_duplicate_upload_answers_201_with_the_same_etag(dedup) -> None:
    data = b"x" * 5000
    a, b = f"{uuid.uuid4()}/a.bin", f"{uuid.uuid4()}/b.bin"
    ra, rb = put(dedup, a, data), put(dedup, b, data)
    assert ra.status == rb.status == 201 and ra.header("ETag") == rb.header("ETag")
    assert put(dedup, a, data).status == 409  # dedup does not change the 409 rule


# -- versioning -----------------------------------------------------------------------------------

def test_versions_are_kept_pruned_listed_and_deleted(hmacfs_factory) -> None:
    srv = hmacfs_factory({"versioning": {"enableversioning": True, "maxversions": 2}})
    path = f"{uuid.uuid4()}/doc.txt"
    for n in range(1, 5):
        r = put(srv, path, f"content {n}".encode())
        assert r.status == 201, r
    assert get(srv, path).body == b"content 4"
    listing = json.loads(get(srv, path, "?versions").body)
    assert [(v["version"], v["current"]) for v in listing["versions"]] == [(2, False), (3, False), (4, True)]
    assert get(srv, path, "?version=3").body == b"content 3"
    assert get(srv, path, "?version=4").body == b"content 4"
    assert get(srv, path, "?version=1").status == 404  # pruned beyond maxversions
    assert get(srv, path, "?version=x").status == 400
    kept = [p for p in (srv.storage / ".hmacfs" / "versions").rglob("*") if p.is_file()]
    assert sorted(p.read_bytes() for p in kept) == [b"content 2", b"content 3"]
    r = request(srv.port, "DELETE", signed_v3(srv.prefix, srv.secret, path, "DELETE", int(time.time()) + 60))
    assert r.status == 204
    assert get(srv, path).status == 404 and get(srv, path, "?version=3").status == 404
    assert [p for p in (srv.storage / ".hmacfs" / "versions").rglob("*") if p.is_file()] == []


def test_versioning_with_dedup_keeps_blob_references(hmacfs_factory) -> None:
    srv = hmacfs_factory({"versioning": {"enableversioning": True, "maxversions": 1},
                          "deduplication": {"enabled": True}})
    path = f"{uuid.uuid4()}/v.bin"
    assert put(srv, path, b"one" * 100).status == 201
    assert put(srv, path, b"two" * 100).status == 201
    assert put(srv, path, b"one" * 100).status == 201  # back to the first content: its blob again
    assert get(srv, path).body == b"one" * 100 and get(srv, path, "?version=2").body == b"two" * 100
    assert len(blob_files(srv)) == 2
    request(srv.port, "DELETE", signed_v3(srv.prefix, srv.secret, path, "DELETE", int(time.time()) + 60))
    assert blob_files(srv) == []


def test_concurrent_versioned_puts_all_succeed_in_turn(hmacfs_factory) -> None:
    srv = hmacfs_factory({"versioning": {"enableversioning": True, "maxversions": 10}})
    path = f"{uuid.uuid4()}/race.txt"
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda i=i: statuses.append(put(srv, path, f"r{i:02d}".encode()).status))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [201] * 8
    listing = json.loads(get(srv, path, "?versions").body)["versions"]
    assert [v["version"] for v in listing] == list(range(1, 9))
    assert sorted(get(srv, path, f"?version={v['version']}").body for v in listing) == \
        sorted(f"r{i:02d}".encode() for i in range(8))


# -- expiry ---------------------------------------------------------------------------------------

def test_filettl_expires_files_and_the_janitor_removes_them(hmacfs_factory) -> None:
    srv = hmacfs_factory({"server": {"filettlenabled": True, "filettl": "2s", "cleanupinterval": "1s"},
                          "versioning": {"enableversioning": True, "maxversions": 3},
                          "deduplication": {"enabled": True}})
    read, unread = f"{uuid.uuid4()}/a.txt", f"{uuid.uuid4()}/b.txt"
    assert put(srv, read, b"one").status == 201 and put(srv, read, b"two").status == 201
    assert put(srv, unread, b"never read").status == 201
    assert get(srv, read).status == 200
    wait_for(lambda: not (srv.storage / unread).exists(), "the janitor to remove the unread file")
    assert get(srv, read).status in (404, 410)
    assert get(srv, unread).status == 404
    assert [p for p in (srv.storage / ".hmacfs" / "versions").rglob("*") if p.is_file()] == []
    assert blob_files(srv) == []
    assert metric(srv, "hmacfs_expired_files_removed_total") >= 2


def test_v3_upload_carries_its_own_expiry(hmacfs_factory) -> None:
    srv = hmacfs_factory({"server": {"cleanupinterval": "1s"}})
    path = f"{uuid.uuid4()}/short.txt"
    target = signed_v3(srv.prefix, srv.secret, path, "PUT", int(time.time()) + 60)
    r = request(srv.port, "PUT", target, b"soon gone", {"X-Hmacfs-Expires": str(int(time.time()) + 3)})
    assert r.status == 201
    assert get(srv, path).status == 200
    wait_for(lambda: get(srv, path).status != 200, "the file to expire")
    bad = request(srv.port, "PUT", signed_v3(srv.prefix, srv.secret, f"{uuid.uuid4()}/x.txt", "PUT",
                                             int(time.time()) + 60), b"x", {"X-Hmacfs-Expires": "\u00b2"})
    assert bad.status == 400


# -- quotas ---------------------------------------------------------------------------------------

def test_quota_per_jwt_sub_before_the_body(hmacfs_factory) -> None:
    srv = hmacfs_factory({"quotas": {"enabled": True, "peruser": 100}})
    assert jwt_put(srv, f"{uuid.uuid4()}/a.bin", b"a" * 60, "bob@example.org").status == 201
    assert jwt_put(srv, f"{uuid.uuid4()}/b.bin", b"b" * 60, "alice@example.org").status == 201
    slot = uuid.uuid4().hex
    token = auth.jwt_encode(srv.secret.encode(), {"exp": int(time.time()) + 60, "slot": slot, "filename": "c.bin",
                                                  "filesize": 60, "sub": "bob@example.org"})
    reply = raw(srv.port, (f"PUT {url_path(srv.prefix, slot + '/c.bin')} HTTP/1.1\r\nHost: x\r\n"
                           f"Authorization: Bearer {token}\r\nContent-Length: 60\r\nExpect: 100-continue\r\n"
                           "Connection: close\r\n\r\n").encode())
    assert status_of(reply) == 507 and b"100 Continue" not in reply and b"peruser quota" in reply
    assert b"bob@example.org" not in reply
    assert not (srv.storage / slot).exists()
    assert metric(srv, 'hmacfs_quota_refusals_total{quota="peruser"}') == 1
    srv.stop()
    srv.start()  # usage survives a restart
    assert jwt_put(srv, f"{uuid.uuid4()}/d.bin", b"d" * 60, "bob@example.org").status == 507
    assert jwt_put(srv, f"{uuid.uuid4()}/e.bin", b"e" * 40, "bob@example.org").status == 201


def test_quota_by_first_segment_as_ejabberd_sends_it(hmacfs_factory) -> None:
    srv = hmacfs_factory({"quotas": {"enabled": True, "peruser": 100, "identity": "firstsegment"}})
    user = "5d41402abc4b2a76b9719d911017c592aaaaaaaa"  # sha1(JID)-like
    assert put(srv, f"{user}/{uuid.uuid4().hex}/a.jpg", b"a" * 70).status == 201
    r = put(srv, f"{user}/{uuid.uuid4().hex}/b.jpg", b"b" * 70)
    assert r.status == 507 and b"peruser" in r.body
    assert put(srv, f"other{user[5:]}/{uuid.uuid4().hex}/c.jpg", b"c" * 70).status == 201
    # deleting frees the quota
    first = next((srv.storage / user).iterdir()).name
    path = f"{user}/{first}/a.jpg"
    request(srv.port, "DELETE", signed_v3(srv.prefix, srv.secret, path, "DELETE", int(time.time()) + 60))
    assert put(srv, f"{user}/{uuid.uuid4().hex}/d.jpg", b"d" * 70).status == 201


def test_perday_and_global_quotas(hmacfs_factory) -> None:
    srv = hmacfs_factory({"quotas": {"enabled": True, "perday": 100, "global": 250}})
    assert jwt_put(srv, f"{uuid.uuid4()}/a", b"a" * 80, "carol").status == 201
    assert request(srv.port, "DELETE", signed_v3(srv.prefix, srv.secret, "x/none", "DELETE",
                                                 int(time.time()) + 60)).status == 404
    r = jwt_put(srv, f"{uuid.uuid4()}/b", b"b" * 30, "carol")
    assert r.status == 507 and b"perday" in r.body  # 80 + 30 uploaded today, even after deletes
    assert jwt_put(srv, f"{uuid.uuid4()}/c", b"c" * 90, "dave").status == 201
    r = jwt_put(srv, f"{uuid.uuid4()}/d", b"d" * 90, "erin")
    assert r.status == 507 and b"global" in r.body  # 80 + 90 + 90 > 250
    assert r.header("X-Hmacfs-Quota") == "global"


def test_chunked_upload_over_quota_is_refused_at_commit(hmacfs_factory) -> None:
    srv = hmacfs_factory({"quotas": {"enabled": True, "global": 10}})
    path = f"{uuid.uuid4()}/c.txt"
    head = (f"PUT {signed_v3(srv.prefix, srv.secret, path, 'PUT', int(time.time()) + 60)} HTTP/1.1\r\nHost: x\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    assert status_of(raw(srv.port, head + b"10\r\n" + b"z" * 16 + b"\r\n0\r\n\r\n")) == 507
    assert not (srv.storage / path).exists()
    assert list((srv.storage / ".hmacfs" / "tmp").iterdir()) == []


# -- precaching -----------------------------------------------------------------------------------

def test_precaching_warms_in_the_background_and_ready_says_when(hmacfs_factory, tmp_path: Path) -> None:
    storage = tmp_path / "pre"
    for i in range(300):
        d = storage / f"u{i}" / "x"
        d.mkdir(parents=True)
        (d / "f.txt").write_text(str(i))
    srv = hmacfs_factory({"server": {"precaching": True, "storagepath": str(storage)}})
    wait_for(lambda: request(srv.port, "GET", "/ready").status == 200, "the warm-up")
    assert metric(srv, "hmacfs_ready_warm") == 1
    assert "precaching: 300 file(s)" in srv.log()
    assert get(srv, "u7/x/f.txt").body == b"7"


# -- metadata from a newer version ------------------------------------------------------------------

def test_metadata_from_a_newer_hmacfs_is_refused_clearly(hmacfs_factory) -> None:
    srv = hmacfs_factory()
    path = f"{uuid.uuid4()}/keep.txt"
    assert put(srv, path, b"kept").status == 201
    srv.stop()
    srv.sql("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError) as e:
        srv.start()
    assert "written by a newer hmacfs (schema 99" in str(e.value) and "Traceback" not in str(e.value)
    assert (srv.storage / path).read_bytes() == b"kept"  # nothing touched


def test_concurrent_uploads_of_one_uploader_cannot_all_slip_under_the_quota(hmacfs_factory) -> None:
    srv = hmacfs_factory({"quotas": {"enabled": True, "peruser": "1MB"}, "uploads": {"maxuploadsize": "10MB"},
                          "server": {"autoadjustworkers": False}, "workers": {"numworkers": 4}})
    statuses: list[int] = []
    data = b"q" * (900 * 1024)
    threads = [threading.Thread(target=lambda: statuses.append(
        jwt_put(srv, f"{uuid.uuid4()}/big.bin", data, "greedy@example.org").status)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(statuses) == [201, 507, 507, 507]
    assert metric(srv, "hmacfs_stored_bytes") == len(data)


def test_a_row_reset_to_version_1_does_not_clobber_kept_versions(hmacfs_factory) -> None:
    """`reindex` (or a lost row) can leave the current row at version 1 while versions are kept:
    the next versioned PUT numbers past them instead of overwriting version 1."""
    srv = hmacfs_factory({"versioning": {"enableversioning": True, "maxversions": 5}})
    path = f"{uuid.uuid4()}/doc.txt"
    for n in (1, 2):
        assert put(srv, path, f"content {n}".encode()).status == 201
    srv.stop()
    srv.sql("UPDATE files SET version = 1 WHERE path = ?", path)
    srv.start()
    assert put(srv, path, b"content 3").status == 201
    assert put(srv, path, b"content 4").status == 201
    assert get(srv, path, "?version=1").body == b"content 1"
    versions = json.loads(get(srv, path, "?versions").body)["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3, 4]
    assert [get(srv, path, f"?version={v['version']}").body for v in versions] == \
        [b"content 1", b"content 2", b"content 3", b"content 4"]


def test_janitor_removes_crash_leftovers_but_not_kept_versions(hmacfs_factory) -> None:
    """A version file whose row never committed (a crash) is removed once it is an hour old by
    ctime; a kept version, however old its content, stays. The janitor is run in-process on
    the server's store with its clock an hour and a minute ahead."""
    from hmacfs.catalog import Catalog
    from hmacfs.meta import SqliteMeta
    from hmacfs.services.janitor import Janitor
    from hmacfs.storage.local import LocalStore

    srv = hmacfs_factory({"versioning": {"enableversioning": True, "maxversions": 3}})
    path = f"{uuid.uuid4()}/doc.txt"
    assert put(srv, path, b"one").status == 201 and put(srv, path, b"two").status == 201
    versions = srv.storage / ".hmacfs" / "versions"
    kept = [p for p in versions.rglob("*") if p.is_file()]
    assert len(kept) == 1
    orphan = kept[0].parent / "99"
    orphan.write_bytes(b"left by a crash")
    srv.stop()
    store = LocalStore(str(srv.storage), lock=False)
    meta = SqliteMeta(str(srv.storage / ".hmacfs" / "meta.sqlite3"), cache=False)
    janitor = Janitor(store, meta, Catalog(store, meta), None, 3600, 3600)
    assert janitor.run_once(time.time()).orphans == 0  # too young: could be a commit in progress
    assert janitor.run_once(time.time() + 3660).orphans == 1
    assert not orphan.exists() and kept[0].read_bytes() == b"one"
    meta.close()
    store.close()
