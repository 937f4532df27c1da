"""The S3 backend's own layer against moto with signature checking on: one node without Redis
(SQLite metadata, as a single-machine deployment on a bucket runs), the chunk objects of
resumable uploads (plain and sealed), the sweep, and deduplicated blobs.

Strategy: the node is the real process; the storage classes are driven directly where the
point is what lands in the bucket, which is then listed with boto3 (a client no one here
wrote).
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from hmacfs.meta.sqlite import SqliteMeta
from hmacfs.storage.encrypted import parse_keyfile
from hmacfs.storage.objectpartials import ObjectPartials
from hmacfs.storage.objects import ObjectBlobs, ObjectStore
from hmacfs.storage.partials import PartialCorrupt, new_upload_id
from hmacfs.storage.s3client import S3Client, S3Settings
from tests.support.client import put, request, signed_v3
from tests.support.s3server import MotoS3

K1 = "11" * 32
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = MotoS3(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


def keys(moto: MotoS3) -> list[str]:
    found = moto.s3().list_objects_v2(Bucket=moto.bucket).get("Contents", [])
    return sorted(o["Key"] for o in found)


def body_of(moto: MotoS3, key: str) -> bytes:
    return moto.s3().get_object(Bucket=moto.bucket, Key=key)["Body"].read()


def s3_config(moto: MotoS3, prefix: str, **more) -> dict:
    return {"storage": {"backend": "s3", "s3endpoint": moto.endpoint, "s3bucket": moto.bucket, "s3prefix": prefix,
                        "s3accesskey": moto.access_key, "s3secretkey": moto.secret_key},
            "uploads": {"chunksize": "5MB"}, **more}


def object_store(moto: MotoS3, prefix: str) -> ObjectStore:
    client = S3Client(S3Settings(endpoint=moto.endpoint, bucket=moto.bucket, access_key=moto.access_key,
                                 secret_key=moto.secret_key))
    return ObjectStore(client, prefix, 5 * MiB, 2)


def test_one_node_on_a_bucket_without_redis(hmacfs_factory, moto, tmp_path: Path) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"k1 {K1}\n")
    keyfile.chmod(0o600)
    srv = hmacfs_factory(s3_config(moto, "solo-", versioning={"enableversioning": True, "maxversions": 1},
                                   encryption={"enabled": True, "keyfile": str(keyfile)}))
    first, second = os.urandom(6 * MiB + 11), b"second version, secret words"
    assert put(srv, "d/f.bin", first).status == 201
    assert put(srv, "d/f.bin", second).status == 201
    stored = [k for k in keys(moto) if k.startswith("solo-")]
    assert len(stored) == 2 and all(k.startswith("solo-object.") for k in stored)  # current + 1 version
    assert all(b"secret words" not in body_of(moto, k) for k in stored)  # encrypted at rest
    got = request(srv.port, "GET", srv.prefix + "d/f.bin")
    assert got.status == 200 and got.body == second
    span = {"Range": f"bytes={3 * MiB}-{3 * MiB + 99}"}
    old = request(srv.port, "GET", srv.prefix + "d/f.bin?version=1", headers=span)
    assert old.status == 206 and old.body == first[3 * MiB:3 * MiB + 100]
    expires = int(time.time()) + 60
    gone = request(srv.port, "DELETE", signed_v3(srv.prefix, srv.secret, "d/f.bin", "DELETE", expires))
    assert gone.status in (200, 204)
    assert [k for k in keys(moto) if k.startswith("solo-")] == []
    assert request(srv.port, "GET", srv.prefix + "d/f.bin").status == 404


def test_resumable_chunks_add_up_to_the_offset_and_read_back(moto) -> None:
    partials = ObjectPartials(object_store(moto, "rp-"))
    u1 = new_upload_id()
    partials.create(u1)
    markers = [k for k in keys(moto) if k.startswith(f"rp-partial.{u1}.0000000000000000.")]
    assert partials.size(u1) == 0 and len(markers) == 1
    first = os.urandom(6 * MiB)  # multipart (5 MiB parts) for the first append
    w = partials.open_at(u1, 0)
    w.write(memoryview(first))
    w.sync()
    w.close()
    w = partials.open_at(u1, len(first))
    w.write(memoryview(b"discarded"))
    w.cut(len(first))  # a checksum mismatch: back to where it began
    w.sync()
    w.close()
    assert partials.size(u1) == len(first)
    w = partials.open_at(u1, len(first))
    w.write(memoryview(b"tail"))
    w.cut(w.offset)  # a connection cut: every byte that arrived is kept
    w.sync()
    w.close()
    assert partials.size(u1) == len(first) + 4
    assert b"".join(partials.read(u1, len(first) + 4)) == first + b"tail"
    assert partials.orphans({u1}, -60) == [] and partials.orphans(set(), -60) == [u1]  # (any age)
    assert partials.remove(u1) is True and partials.size(u1) is None
    assert [k for k in keys(moto) if k.startswith("rp-")] == []


def test_a_chunk_that_lost_its_hold_is_not_kept(moto) -> None:
    partials = ObjectPartials(object_store(moto, "lost-"))
    partials.create("u2")
    w = partials.open_at("u2", 0)
    w.allowed = lambda: False  # another node holds the upload now
    w.write(memoryview(b"late bytes"))
    with pytest.raises(Exception) as caught:
        w.sync()
    assert getattr(caught.value, "status", None) == 423 and w.offset == 0
    w.close()
    assert partials.size("u2") == 0


def test_sealed_chunks_are_encrypted_and_authenticated(moto) -> None:
    store = object_store(moto, "sealed-")
    partials = ObjectPartials(store, parse_keyfile(f"k1 {K1}\n"))
    partials.create("u3")
    secret = b"attack at dawn " * 100_000  # 1.5 MB: two segments
    w = partials.open_at("u3", 0)
    w.write(memoryview(secret))
    w.sync()
    w.close()
    chunk = next(k for k in keys(moto) if k.startswith("sealed-partial.u3.0000000000000000.") and k.endswith(".sealed"))
    assert b"attack at dawn" not in body_of(moto, chunk)
    assert partials.size("u3") == len(secret)
    assert b"".join(partials.read("u3", len(secret))) == secret
    raw = bytearray(body_of(moto, chunk))
    raw[-40] ^= 1  # one bit in the last segment
    moto.s3().put_object(Bucket=moto.bucket, Key=chunk, Body=bytes(raw))
    with pytest.raises(PartialCorrupt):
        b"".join(partials.read("u3", len(secret)))


def test_the_sweep_removes_only_objects_unnamed_on_two_passes_and_stale_uploads(moto) -> None:
    store = object_store(moto, "sw-")
    named, orphan, late = store.new_key(), store.new_key(), store.new_key()
    for key in (named, orphan, late):
        store.client.put_object(key, b"x", 1)
    upload_id = store.client.create_multipart(store.new_key())
    now = time.time()
    assert store.unneeded(lambda key: key == named, 3600, now) == []  # first seen now
    assert store.abort_stale_uploads(86400, now) == 0
    # an hour on: `late` was committed meanwhile (a row names it now); `orphan` still unnamed
    assert store.unneeded(lambda key: key in (named, late), 3600, now + 3600) == [orphan]
    assert store.abort_stale_uploads(86400, now + 3600) == 0  # an upload may take hours
    assert store.abort_stale_uploads(86400, now + 86400) == 1
    assert all(u["UploadId"] != upload_id
               for u in moto.s3().list_multipart_uploads(Bucket=moto.bucket).get("Uploads", []))


def test_chunks_two_writers_finished_at_one_offset_make_one_chain(moto) -> None:
    """A writer whose hold lapsed as its last part went out, and the newcomer, both complete a
    chunk at the same offset: the same bytes of the same file. The chain that reaches furthest
    is taken (here the newcomer's two chunks, not the late 100..220 one); the bytes are whole."""
    partials = ObjectPartials(object_store(moto, "two-"))
    upload = new_upload_id()
    partials.create(upload)
    data = os.urandom(300)
    # the newcomer appended 100..150 and 150..300; the late writer's chunk is 100..220
    for start, end in ((0, 100), (100, 150), (150, 300), (100, 220)):
        w = partials.open_at(upload, start)
        w.write(memoryview(data[start:end]))
        w.sync()
        w.close()
    assert partials.size(upload) == 300
    assert b"".join(partials.read(upload, 300)) == data


def test_blobs_are_counted_and_go_with_their_last_reference(moto, tmp_path: Path) -> None:
    store = object_store(moto, "bl-")
    meta = SqliteMeta(str(tmp_path / "m.sqlite3"))
    blobs = ObjectBlobs(store, meta)
    content = b"same bytes"
    blob = hashlib.sha256(content).hexdigest()
    sources = []
    for _ in range(2):
        key = store.new_key()
        store.client.put_object(key, content, len(content))
        sources.append(key)
    copied = [blobs.prepare(sources[0], blob), blobs.prepare(sources[1], blob)]
    assert copied == [True, False]  # the second upload finds the content there
    with meta.transaction():
        assert blobs.acquire(blob, len(content), sources[0]) == f"bl-blob.{blob}"
        assert blobs.acquire(blob, len(content), sources[1]) == f"bl-blob.{blob}"
    assert body_of(moto, f"bl-blob.{blob}") == content
    with meta.transaction():
        assert blobs.release(blob) is None
    with pytest.raises(RuntimeError), meta.transaction():  # the last reference goes, then a rollback
        assert blobs.release(blob) == f"bl-blob.{blob}"
        raise RuntimeError("the commit failed")
    assert meta.blob_refs(blob) == 1 and f"bl-blob.{blob}" in keys(moto)  # the bytes were not deleted early
    with meta.transaction():
        last = blobs.release(blob)
    blobs.forget(last)
    assert f"bl-blob.{blob}" not in keys(moto)
    # a content counted anew finds its object even if a release deleted it in between
    with meta.transaction():
        assert blobs.acquire(blob, len(content), sources[1]) == f"bl-blob.{blob}"
    assert body_of(moto, f"bl-blob.{blob}") == content
    with meta.transaction():
        last = blobs.release(blob)
    with meta.transaction():
        blobs.acquire(blob, len(content), sources[1])  # counted again before the forget ran
    blobs.forget(last)
    assert body_of(moto, f"bl-blob.{blob}") == content  # kept: a row counts it
    meta.close()


def test_a_small_object_read_once_is_served_from_the_nodes_memory(hmacfs_factory, moto) -> None:
    """Objects are never overwritten, so a small hot file's bytes stay valid in the node's cache:
    once read, its GETs cost the row only. Shown by taking the object away behind the node's
    back: the cached file still serves; one never read is a 500 naming the missing bytes."""
    srv = hmacfs_factory(s3_config(moto, "hot-"))
    assert put(srv, "h/read.txt", b"read once").status == 201
    assert put(srv, "h/unread.txt", b"never read").status == 201
    assert request(srv.port, "GET", srv.prefix + "h/read.txt").body == b"read once"
    for key in [k for k in keys(moto) if k.startswith("hot-")]:
        moto.s3().delete_object(Bucket=moto.bucket, Key=key)
    again = request(srv.port, "GET", srv.prefix + "h/read.txt", headers={"Range": "bytes=5-8"})
    assert again.status == 206 and again.body == b"once"
    missing = request(srv.port, "GET", srv.prefix + "h/unread.txt")
    assert missing.status == 500 and b"missing" in missing.body


def test_ready_names_the_bucket_when_it_stops_answering(hmacfs_factory, tmp_path: Path) -> None:
    own = MotoS3(tmp_path / "moto").start()
    try:
        srv = hmacfs_factory(s3_config(own, ""))
        ready = request(srv.port, "GET", "/ready")
        assert ready.status == 200 and b'"object_storage": {"ok": true' in ready.body, ready.body
        own.stop()
        deadline = time.monotonic() + 15  # the bucket is asked at most every 5 s
        while (ready := request(srv.port, "GET", "/ready")).status != 503:
            assert time.monotonic() < deadline, ready.body
            time.sleep(0.3)
        assert b'"object_storage": {"ok": false' in ready.body and own.secret_key.encode() not in ready.body
    finally:
        own.stop()
