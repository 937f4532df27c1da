"""Cluster mode, the shared state: two hmacfs nodes on one moto S3 and one Redis, nginx in front.

Proven here over HTTP (and with the operator's CLI run on a node's config): a ban made on A
holds on B and `hmacfs bans remove` lifts it on both; one rate-limit bucket spans the nodes;
dedup spans nodes (one `blob.` object for one content, released with its last reference);
quotas add up across nodes (507 naming the quota); versions written on A and B are one
history, pruned in the bucket too; a tus upload and a broken IETF PUT begun on A finish on B,
and an unmodified tus client whose PATCHes nginx spreads over both nodes; `files list` and
`usage` see what was uploaded through every node.

The clients' addresses are sent in X-Forwarded-For straight to a node (127.0.0.1 is in the
nodes' `trustedproxies`) or through nginx; 127.0.0.1 itself is rate-limit exempt so the
tests that are not about limits are never limited.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from typing import Iterator, Optional

import pytest
from tusclient import client as tus_client

from hmacfs import auth
from tests.support.client import Response, put, request, signed_put, signed_v3, url_path
from tests.support.cluster import Backing, Cluster, wait_until
from tests.support.hmacfs_proc import REPO, HmacfsProcess
from tests.support.ietf_client import RawConnection, request_head

pytestmark = pytest.mark.timeout(120)

MB = 1024 * 1024
THRESHOLD = 3
PER_MINUTE = 30
QUOTA = 1024 * 1024  # "1MB" as hmacfs reads it (binary units): checked by the 507's body below
TUS = {"Tus-Resumable": "1.0.0"}
OCTET = "application/offset+octet-stream"


def cluster(backing: Backing, tmp_path_factory: pytest.TempPathFactory, name: str, config: dict,
            nginx: bool = True) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp(name), backing, config, name=name, nginx=nginx).start()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def guarded(backing: Backing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from cluster(backing, tmp_path_factory, "guard", {
        "security": {"banenabled": True, "banthreshold": THRESHOLD, "banwindow": "10m", "banduration": "1h",
                     "ratelimitingenabled": True, "maxrequestsperminute": PER_MINUTE,
                     "ratelimitexempt": ["127.0.0.1/32"]},
        "uploads": {"chunksize": "5MB", "maxuploadsize": "64MB"},
    })


@pytest.fixture(scope="module")
def shared(backing: Backing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Dedup and per-uploader quotas (the uploader is the first path segment)."""
    yield from cluster(backing, tmp_path_factory, "shared", {
        "deduplication": {"enabled": True},
        "quotas": {"enabled": True, "peruser": "1MB", "identity": "firstsegment"},
    }, nginx=False)


@pytest.fixture(scope="module")
def versioned(backing: Backing, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from cluster(backing, tmp_path_factory, "versions",
                       {"versioning": {"enableversioning": True, "maxversions": 2}}, nginx=False)


# -- helpers ------------------------------------------------------------------------------------------

def slot(name: str, owner: Optional[str] = None) -> str:
    return f"{owner or uuid.uuid4().hex}/{name}"


def get(srv, path: str, query: str = "", headers: Optional[dict] = None) -> Response:
    return request(srv.port, "GET", url_path(srv.prefix, path) + query, headers=headers)


def delete(srv, path: str) -> Response:
    return request(srv.port, "DELETE", signed_v3(srv.prefix, srv.secret, path, "DELETE", int(time.time()) + 60))


def from_addr(addr: str) -> dict[str, str]:
    return {"X-Forwarded-For": addr}


def good_put(srv, path: str, addr: str, data: bytes = b"hello") -> Response:
    return request(srv.port, "PUT", signed_put(srv.prefix, srv.secret, path, len(data)), data, from_addr(addr))


def bad_put(srv, path: str, addr: str, data: bytes = b"hello") -> Response:
    return request(srv.port, "PUT", signed_put(srv.prefix, "not-the-secret", path, len(data)), data, from_addr(addr))


def cli(srv: HmacfsProcess, *args: str) -> subprocess.CompletedProcess:
    """`python -m hmacfs -config <node config> ARGS`, as an operator runs it beside the nodes."""
    return subprocess.run([sys.executable, "-m", "hmacfs", "-config", str(srv.config_path), *args],
                          capture_output=True, text=True, cwd=srv.workdir, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def cli_json(srv: HmacfsProcess, *args: str):
    r = cli(srv, *args, "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stdout, r.stderr)
    return json.loads(r.stdout)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- 3. a ban made on A holds on B ---------------------------------------------------------------------

def test_ban_made_on_a_holds_on_b_and_cli_lifts_it_on_both(guarded: Cluster) -> None:
    addr = "10.3.0.1"
    a, b = guarded.a, guarded.b
    assert good_put(a, slot("before.txt"), addr).status == 201  # not banned yet
    statuses = [bad_put(a, slot(f"bad{i}.txt"), addr).status for i in range(THRESHOLD)]
    assert statuses == [403] * THRESHOLD, statuses

    refused = good_put(b, slot("after.txt"), addr)  # at once: B never saw this address
    assert refused.status == 403 and b"banned" in refused.body, (refused, guarded.logs())
    assert good_put(a, slot("after.txt"), addr).status == 403
    through = request(guarded.lb.port, "PUT", signed_put(guarded.lb.prefix, guarded.lb.secret, slot("lb.txt"), 5),
                      b"hello", from_addr(addr))
    assert through.status == 403 and b"banned" in through.body, through
    assert good_put(b, slot("other.txt"), "10.3.0.2").status == 201  # only that address

    for node in (a, b):  # the operator's CLI on either node's config sees the one ban
        bans = {entry["address"]: entry for entry in cli_json(node, "bans", "list")}
        assert addr in bans and bans[addr]["failures"] == THRESHOLD, bans
        assert "10.3.0.2" not in bans

    lifted = cli(b, "bans", "remove", addr)
    assert lifted.returncode == 0, (lifted.stdout, lifted.stderr)
    for node in (a, b):
        wait_until(lambda node=node: good_put(node, slot("lifted.txt"), addr).status == 201,
                   f"the lifted ban to stop holding on {node.port}", timeout=3, every=0.5)
    assert addr not in {entry["address"] for entry in cli_json(a, "bans", "list")}


def test_ban_reaches_a_node_that_just_let_the_address_in_within_a_second(guarded: Cluster) -> None:
    """B remembers "not banned" for an address for NEGATIVE_SECONDS (1 s, hmacfs/policy/shared.py)
    so that everyone else costs no Redis lookup: a ban made on A meanwhile holds on B from then on."""
    addr = "10.3.1.1"
    assert good_put(guarded.b, slot("seen.txt"), addr).status == 201  # B caches "not banned"
    assert [bad_put(guarded.a, slot(f"bad{i}.txt"), addr).status for i in range(THRESHOLD)] == [403] * THRESHOLD
    banned_at = time.monotonic()
    wait_until(lambda: good_put(guarded.b, slot("late.txt"), addr).status == 403, "the ban to reach B",
               timeout=1.5, every=0.1)
    assert time.monotonic() - banned_at <= 1.5
    assert good_put(guarded.b, slot("still.txt"), addr).status == 403


# -- 4. one rate-limit bucket spans the nodes ----------------------------------------------------------

def test_rate_limit_spans_nodes(guarded: Cluster) -> None:
    addr = "10.4.0.1"
    path = slot("limited.txt")
    assert put(guarded.a, path, b"limited").status == 201  # from 127.0.0.1: exempt
    statuses = [get(node, path, headers=from_addr(addr)).status
                for _ in range(PER_MINUTE // 2) for node in (guarded.a, guarded.b)]
    assert statuses == [200] * PER_MINUTE, statuses
    limited = get(guarded.b, path, headers=from_addr(addr))
    assert limited.status == 429, limited
    assert limited.header("Retry-After") and int(limited.header("Retry-After")) >= 1, dict(limited.headers)
    assert get(guarded.a, path, headers=from_addr(addr)).status == 429
    assert get(guarded.a, path, headers=from_addr("10.4.0.2")).status == 200  # another address has its own


# -- 6. dedup spans nodes ------------------------------------------------------------------------------

def test_dedup_spans_nodes_and_the_blob_goes_with_its_last_reference(shared: Cluster) -> None:
    data = os.urandom(200 * 1024)
    p1, p2 = slot("one.bin"), slot("two.bin")
    before_objects, before_blobs = set(shared.objects("object.")), set(shared.objects("blob."))
    assert put(shared.a, p1, data).status == 201
    assert put(shared.b, p2, data).status == 201

    def new(kind: str, before: set[str]) -> set[str]:
        return set(shared.objects(kind)) - before
    wait_until(lambda: not new("object.", before_objects), "no object. left beside the blob", timeout=10)
    blobs = new("blob.", before_blobs)
    assert len(blobs) == 1, blobs
    assert shared.get_object(blobs.pop()) == data

    assert delete(shared.a, p1).status == 204
    for node in (shared.a, shared.b):
        assert get(node, p1).status == 404
        got = get(node, p2)
        assert got.status == 200 and got.body == data
    assert len(new("blob.", before_blobs)) == 1

    assert delete(shared.b, p2).status == 204
    wait_until(lambda: not new("blob.", before_blobs), "the blob to go with its last reference", timeout=10)
    assert get(shared.a, p2).status == 404


# -- 7. quotas span nodes ------------------------------------------------------------------------------

def test_quota_adds_up_across_nodes(shared: Cluster) -> None:
    owner = uuid.uuid4().hex
    assert put(shared.a, slot("q1.bin", owner), os.urandom(600 * 1024)).status == 201
    assert put(shared.b, slot("q2.bin", owner), os.urandom(300 * 1024)).status == 201
    over = put(shared.a, slot("q3.bin", owner), os.urandom(200 * 1024))
    assert over.status == 507, (over, shared.logs())
    assert over.header("X-Hmacfs-Quota") == "peruser", dict(over.headers)
    assert b"peruser quota exceeded" in over.body and str(900 * 1024).encode() in over.body, over.body
    over_b = put(shared.b, slot("q4.bin", owner), os.urandom(200 * 1024))
    assert over_b.status == 507 and over_b.header("X-Hmacfs-Quota") == "peruser", over_b
    assert put(shared.b, slot("q5.bin", owner), os.urandom(100 * 1024)).status == 201  # what still fits
    assert put(shared.a, slot("q6.bin"), os.urandom(200 * 1024)).status == 201  # another uploader


# -- 8. versions written on both nodes are one history ------------------------------------------------

def test_versions_across_nodes_are_one_history_pruned_in_the_bucket(versioned: Cluster) -> None:
    """maxversions = 2 keeps the current content and two earlier versions (README), so the 4th
    PUT is the one that prunes version 1."""
    path = slot("doc.txt")
    contents = {n: f"content {n} ".encode() * 1000 for n in range(1, 5)}
    before = set(versioned.objects("object."))
    for n in range(1, 5):
        node = versioned.nodes[(n - 1) % 2]  # A, B, A, B
        r = put(node, path, contents[n])
        assert r.status == 201, (n, r, versioned.logs())
    for node in (versioned.a, versioned.b):
        listing = json.loads(get(node, path, "?versions").body)
        assert [(v["version"], v["current"]) for v in listing["versions"]] == [(2, False), (3, False), (4, True)]
        assert get(node, path, "?version=1").status == 404
        assert get(node, path, "?version=2").body == contents[2]
        assert get(node, path, "?version=3").body == contents[3]
        assert get(node, path).body == contents[4]
    wait_until(lambda: len(set(versioned.objects("object.")) - before) == 3, "v1's object to be deleted", timeout=10)
    kept = sorted(versioned.get_object(k) for k in set(versioned.objects("object.")) - before)
    assert kept == sorted([contents[2], contents[3], contents[4]])

    assert delete(versioned.b, path).status == 204
    wait_until(lambda: not set(versioned.objects("object.")) - before, "every version's object deleted", timeout=10)


# -- 11. resumable uploads begun on A continue on B ----------------------------------------------------

def tus(srv, method: str, target: str, body: Optional[bytes] = None, headers: Optional[dict] = None) -> Response:
    return request(srv.port, method, target, body, {**TUS, **(headers or {})})


def test_tus_upload_begun_on_a_continues_on_b(guarded: Cluster) -> None:
    a, b = guarded.a, guarded.b
    data = os.urandom(3 * MB + 123)
    half = len(data) // 2
    path = slot("tus.bin")
    created = tus(a, "POST", signed_put(a.prefix, a.secret, path, len(data)), headers={"Upload-Length": str(len(data))})
    assert created.status == 201, created
    location = created.header("Location")
    assert location and "/.uploads/" in location, created

    r = tus(a, "PATCH", location, data[:half], {"Content-Type": OCTET, "Upload-Offset": "0"})
    assert r.status == 204 and r.header("Upload-Offset") == str(half), r
    state = tus(b, "HEAD", location)
    assert state.status == 200 and state.header("Upload-Offset") == str(half), state
    assert state.header("Upload-Length") == str(len(data))
    assert get(b, path).status == 404  # nothing served before the last byte
    r = tus(b, "PATCH", location, data[half:], {"Content-Type": OCTET, "Upload-Offset": str(half)})
    assert r.status == 204 and r.header("Upload-Offset") == str(len(data)), (r, guarded.logs())

    got = get(a, path)
    assert got.status == 200 and sha(got.body) == sha(data)
    assert put(b, path, data).status == 409  # the slot is taken
    assert not guarded.objects("partial."), "chunk objects left after the commit"


def test_tuspy_through_nginx_spreads_patches_over_both_nodes(guarded: Cluster) -> None:
    """An unmodified tus client given the signed URL through nginx: its PATCHes land on both nodes."""
    data = os.urandom(6 * MB + 5)
    path = slot("tuspy.bin")
    lb = guarded.lb
    endpoint = lb.base_url + signed_put(lb.prefix, lb.secret, path, len(data))
    marks = [len(n.log()) for n in guarded.nodes]
    uploader = tus_client.TusClient(endpoint).uploader(file_stream=io.BytesIO(data), chunk_size=MB)
    uploader.upload()
    assert uploader.offset == len(data)

    def patched() -> list[int]:  # the access line is written just after the response
        return [len(re.findall(r'"PATCH /upload/\.uploads/\S+" 204 ', n.log()[m:]))
                for n, m in zip(guarded.nodes, marks)]
    # seven chunks (six of 1 MiB and the rest), each appended once, by one node or the other
    wait_until(lambda: sum(patched()) >= 7, "seven PATCHes in the nodes' access logs", timeout=15)
    assert sum(patched()) == 7 and all(count > 0 for count in patched()), \
        (patched(), [n.log()[-3000:] for n in guarded.nodes])
    for node in guarded.nodes:
        got = get(node, path)
        assert got.status == 200 and sha(got.body) == sha(data)


def untrusted_connection(port: int) -> RawConnection:
    """A client connection from 127.0.0.2, which is not in `trustedproxies`: a PUT from a trusted
    proxy gets no 104 (README), so the IETF client must come straight from elsewhere."""
    conn = RawConnection.__new__(RawConnection)
    conn.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
    conn.buffer = b""
    return conn


def test_ietf_put_cut_on_a_resumes_on_b(guarded: Cluster) -> None:
    a, b = guarded.a, guarded.b
    data = os.urandom(2 * MB + 77)
    half = len(data) // 2
    path = slot("ietf.bin")
    conn = untrusted_connection(a.port)
    conn.send(request_head("PUT", signed_put(a.prefix, a.secret, path, len(data)),
                           {"Upload-Draft-Interop-Version": "6", "Upload-Complete": "?1",
                            "Content-Length": str(len(data))}))
    interim = conn.read_response()
    assert interim.status == 104, interim
    location = interim.header("Location")
    assert location and location.startswith(a.prefix + ".uploads/"), interim
    conn.send(data[:half])
    time.sleep(0.3)
    conn.close()

    def offset_on_b() -> Optional[str]:
        with untrusted_connection(b.port) as c:
            c.send(request_head("HEAD", location, {"Upload-Draft-Interop-Version": "6", "Connection": "close"}))
            _, resp = c.read_final("HEAD")
        return resp.header("Upload-Offset") if resp.status == 204 else None
    wait_until(lambda: offset_on_b() == str(half), "B to report the bytes A received", timeout=10)

    with untrusted_connection(b.port) as c:
        fields = {"Upload-Draft-Interop-Version": "6", "Upload-Complete": "?1", "Upload-Offset": str(half),
                  "Content-Type": "application/partial-upload", "Content-Length": str(len(data) - half),
                  "Connection": "close"}
        c.send(request_head("PATCH", location, fields) + data[half:])
        _, done = c.read_final("PATCH")
    assert done.status == 201, (done, guarded.logs())
    got = get(a, path)
    assert got.status == 200 and sha(got.body) == sha(data)


# -- 16. the operator's CLI sees the shared state ------------------------------------------------------

def test_files_list_and_usage_count_uploads_of_every_node(shared: Cluster) -> None:
    owner = f"cli{uuid.uuid4().hex[:12]}"
    files = {slot(f"f{i}.bin", owner): os.urandom(10_000 + i) for i in range(5)}
    for i, (path, data) in enumerate(files.items()):
        assert put(shared.nodes[i % 2], path, data).status == 201
    jwt_slot = uuid.uuid4().hex
    claims = {"exp": int(time.time()) + 300, "slot": jwt_slot, "filename": "j.txt", "filesize": 3, "sub": owner}
    token = auth.jwt_encode(shared.b.secret.encode(), claims)
    jwt_path = f"{jwt_slot}/j.txt"
    r = request(shared.b.port, "PUT", url_path(shared.b.prefix, jwt_path), b"jwt",
                {"Authorization": "Bearer " + token})
    assert r.status == 201, r
    files[jwt_path] = b"jwt"

    for node in (shared.a, shared.b):
        rows = cli_json(node, "files", "list", "--uploader", owner)
        assert {row["path"]: (row["size"], row["sha256"]) for row in rows} == {
            p: (len(d), sha(d)) for p, d in files.items()}, rows
        assert {row["path"] for row in cli_json(node, "files", "list", "--prefix", owner + "/")} == \
            set(files) - {jwt_path}
        usage = cli_json(node, "usage")
        per = {u["uploader"]: (u["files"], u["bytes"]) for u in usage["uploaders"]}
        assert per[owner] == (len(files), sum(len(d) for d in files.values())), per
        assert usage["total"]["files"] >= len(files)
    text = cli(shared.a, "usage")
    assert text.returncode == 0 and owner in text.stdout, text
