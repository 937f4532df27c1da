"""Cluster mode, the bytes: two hmacfs nodes on one moto S3 (signatures checked) and one Redis,
nginx in front (tests/support/cluster.py).

Proven here, against real processes on loopback: an upload on A downloads on B and through
nginx byte for byte (whole, Range, HEAD; multipart above the 5 MB part size and a tiny one);
the bytes live in `object.<hex>` objects, never under the path; an upload cut mid-body leaves
no object, no row and no unfinished multipart upload; racing PUTs to one path on A and B give
one 201 and one 409, and the loser's object is deleted; encryption at rest on S3 (ciphertext
in the bucket, plaintext and exact ranges on the other node); `s3redirect` (a 302 to a
presigned URL that forces the type and disposition hmacfs would send).

The clusters of this module share one Backing (moto + Redis), each with its own bucket and
Redis key prefix; the tests use paths of their own, so they share the clusters.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Iterator

import pytest

from tests.support.client import put, request, signed_put, url_path
from tests.support.cluster import Backing, Cluster, wait_until
from tests.support.ietf_client import RawConnection, request_head

pytestmark = pytest.mark.timeout(120)

MB = 1024 * 1024
K1 = "11" * 32


@pytest.fixture(scope="module")
def plain(backing: Backing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("plain"), backing, {"uploads": {"chunksize": "5MB", "maxuploadsize": "64MB"}},
                name="plain").start()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def encrypted(backing: Backing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    w = tmp_path_factory.mktemp("enc")
    keys = w / "keys"
    keys.write_text(f"k1 {K1}\n")
    keys.chmod(0o600)
    c = Cluster(w, backing, {"uploads": {"chunksize": "5MB", "maxuploadsize": "64MB"},
                             "encryption": {"enabled": True, "keyfile": str(keys)}},
                name="enc", nginx=False).start()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def redirecting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """moto with auth off: with auth on, moto 5.2 answers 500 to every presigned URL
    (tests/support/s3server.py), so the presigned GET can only be fetched from this one."""
    w = tmp_path_factory.mktemp("redirect")
    b = Backing(w / "backing", auth=False).start()
    try:
        c = Cluster(w, b, {"storage": {"s3redirect": True}}, name="redirect", nginx=False).start()
        try:
            yield c
        finally:
            c.close()
    finally:
        b.close()


def slot(name: str) -> str:
    return f"{uuid.uuid4().hex}/{name}"


def get(srv, path: str, headers: dict | None = None, method: str = "GET"):
    return request(srv.port, method, url_path(srv.prefix, path), headers=headers)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- 1. upload on A, download on B and through nginx -------------------------------------------------

@pytest.mark.parametrize("size", [1, 7 * MB + 12345], ids=["tiny", "multipart"])
def test_upload_on_a_downloads_on_b_and_through_nginx(plain: Cluster, size: int) -> None:
    data = os.urandom(size)
    path = slot("file.bin")
    before = set(plain.objects())
    r = put(plain.a, path, data)
    assert r.status == 201, (r, plain.logs())

    for srv in (plain.b, plain.lb, plain.a):
        got = get(srv, path)
        assert got.status == 200, got
        assert len(got.body) == size and sha(got.body) == sha(data)
    head = get(plain.b, path, method="HEAD")
    assert head.status == 200 and head.body == b"" and head.header("Content-Length") == str(size), head
    if size > 1:
        first, last = 5 * MB - 10, 5 * MB + 9  # across the first part boundary
        ranged = get(plain.b, path, {"Range": f"bytes={first}-{last}"})
        assert ranged.status == 206, ranged
        assert ranged.body == data[first:last + 1]
        assert ranged.header("Content-Range") == f"bytes {first}-{last}/{size}"
        tail = get(plain.lb, path, {"Range": "bytes=-7"})
        assert tail.status == 206 and tail.body == data[-7:]
    else:
        ranged = get(plain.b, path, {"Range": "bytes=0-0"})
        assert ranged.status == 206 and ranged.body == data

    new = set(plain.objects()) - before
    assert len(new) == 1, new
    (key,) = new
    assert key.startswith("object."), key
    assert not any(path.split("/")[0] in k for k in plain.objects()), "bytes stored under the path"
    assert plain.get_object(key) == data
    assert plain.multipart_uploads() == []


def test_upload_through_nginx_downloads_on_both_nodes(plain: Cluster) -> None:
    data = os.urandom(6 * MB + 1)
    path = slot("via-lb.bin")
    r = put(plain.lb, path, data)
    assert r.status == 201, r
    for srv in (plain.a, plain.b):
        got = get(srv, path)
        assert got.status == 200 and sha(got.body) == sha(data)


def test_upload_cut_mid_body_leaves_no_object_no_row_no_multipart(plain: Cluster) -> None:
    """12 MiB announced, 6 MiB sent (more than one 5 MB part), then the client closes."""
    size = 12 * MB
    data = os.urandom(size)
    path = slot("cut.bin")
    before = set(plain.objects())
    conn = RawConnection(plain.a.port)
    target = signed_put(plain.a.prefix, plain.a.secret, path, size)
    conn.send(request_head("PUT", target, {"Content-Length": str(size), "Content-Type": "application/octet-stream"}))
    conn.send(data[:6 * MB])
    # the first 5 MB part is on its way to the bucket: a multipart upload exists, to be aborted
    wait_until(lambda: len(plain.multipart_uploads()) == 1, "the cut upload's multipart upload to begin")
    time.sleep(0.2)
    conn.close()

    wait_until(lambda: path.split("/")[0] in plain.a.log(), "the node to log the end of the cut request",
               timeout=15)
    wait_until(lambda: plain.multipart_uploads() == [], "the cut upload's multipart upload to be aborted", timeout=15)
    assert set(plain.objects()) == before
    for srv in (plain.a, plain.b, plain.lb):
        assert get(srv, path).status == 404
    # the slot is still free: the same signed PUT works afterwards
    assert put(plain.b, path, data).status == 201
    assert sha(get(plain.a, path).body) == sha(data)


# -- 2. racing PUTs to one path on A and B -----------------------------------------------------------

def test_racing_puts_one_201_one_409_and_the_losers_object_is_deleted(plain: Cluster) -> None:
    paths = [slot(f"race{i}.bin") for i in range(10)]
    payloads = {(p, n): os.urandom(512 * 1024 + i) for i, p in enumerate(paths) for n in (0, 1)}
    results: dict[tuple[str, int], int] = {}
    before = set(plain.objects())

    def racer(path: str, n: int, barrier: threading.Barrier) -> None:
        barrier.wait(timeout=10)
        results[(path, n)] = put(plain.nodes[n], path, payloads[(path, n)]).status

    for path in paths:
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=racer, args=(path, n, barrier)) for n in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    winners = {}
    for path in paths:
        statuses = sorted(results[(path, n)] for n in (0, 1))
        assert statuses == [201, 409], (path, statuses, plain.logs())
        winners[path] = next(n for n in (0, 1) if results[(path, n)] == 201)
    for path, n in winners.items():
        want = sha(payloads[(path, n)])
        assert sha(get(plain.a, path).body) == want and sha(get(plain.b, path).body) == want

    def new_objects() -> set[str]:
        return set(plain.objects("object.")) - before
    wait_until(lambda: len(new_objects()) == len(paths), "exactly one object per raced path", timeout=10)
    stored = sorted(sha(plain.get_object(k)) for k in new_objects())
    assert stored == sorted(sha(payloads[(p, n)]) for p, n in winners.items())
    assert plain.multipart_uploads() == []


# -- 9. encryption at rest on S3 ---------------------------------------------------------------------

def test_encrypted_object_holds_no_plaintext_and_other_node_decrypts(encrypted: Cluster) -> None:
    pattern = b"plaintext that must not reach the bucket %06d\n"
    data = b"".join(pattern % i for i in range(3 * MB // len(pattern) + 1))[:3 * MB + 77]
    path = slot("secret.txt")
    before = set(encrypted.objects())
    r = put(encrypted.a, path, data)
    assert r.status == 201, (r, encrypted.logs())
    (key,) = set(encrypted.objects()) - before
    stored = encrypted.get_object(key)
    assert b"plaintext that must not" not in stored
    assert len(stored) > len(data)  # nonces and tags

    got = get(encrypted.b, path)
    assert got.status == 200 and got.body == data
    first, last = MB + 4321, 2 * MB - 5  # inside the 2nd MiB (segment)
    ranged = get(encrypted.b, path, {"Range": f"bytes={first}-{last}"})
    assert ranged.status == 206 and ranged.body == data[first:last + 1]
    across = get(encrypted.a, path, {"Range": f"bytes={2 * MB - 3}-{2 * MB + 2}"})
    assert across.status == 206 and across.body == data[2 * MB - 3:2 * MB + 3]


def test_encrypted_multipart_upload_round_trips(encrypted: Cluster) -> None:
    data = os.urandom(11 * MB + 3)
    path = slot("big.enc.bin")
    assert put(encrypted.b, path, data).status == 201
    got = get(encrypted.a, path)
    assert got.status == 200 and sha(got.body) == sha(data)
    assert encrypted.multipart_uploads() == []


# -- 10. s3redirect -----------------------------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # urllib calls it with its own arguments
        return None


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=10) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


@pytest.mark.parametrize(("name", "ctype", "disposition"), [
    ("page.html", "text/html; charset=utf-8", "attachment"),
    ("pic.png", "image/png", "inline"),
])
def test_s3redirect_302_to_presigned_url_with_hmacfs_headers(redirecting: Cluster, name: str, ctype: str,
                                                            disposition: str) -> None:
    data = b"<html><script>alert(1)</script></html>" if name.endswith(".html") else os.urandom(70000)
    path = slot(name)
    assert put(redirecting.a, path, data, content_type=ctype.split(";")[0]).status == 201
    r = get(redirecting.b, path)
    assert r.status == 302, r
    location = r.header("Location") or ""
    assert location.startswith(redirecting.backing.s3.endpoint + "/"), location
    assert "X-Amz-Signature=" in location and "X-Amz-Expires=" in location, location
    status, headers, body = fetch(location)
    assert status == 200 and body == data, (status, headers)
    assert headers["content-type"] == ctype, headers
    assert headers["content-disposition"] == f"{disposition}; filename=\"{name}\"; filename*=UTF-8''{name}", headers
