"""Shared state on a real redis-server: limits, failure counts, bans, the janitor's lease, the
health check and the resumable-upload lock, each seen from two "nodes" (two clients, two
objects, as two processes would hold them), and what each does while Redis is away.

Strategy: every piece is built exactly as app.py builds it, on its own key prefix, against
one session redis-server; the outage tests stop and restart it. Timings use the pieces'
own constants, shortened where they are parameters.
"""
from __future__ import annotations

import socket
import subprocess
import threading
import time
import uuid

import pytest

from hmacfs.clusterwriters import ClusterWriters
from hmacfs.errors import HTTPError
from hmacfs.meta.redis import RedisMeta
from hmacfs.policy.shared import SharedBans, SharedFailureCounter, SharedTokenBuckets
from hmacfs.resumable import UploadBusy
from hmacfs.services.redisconn import Lease, RedisHealth, connect
from tests.support.client import put, request
from tests.support.redisserver import RedisServer
from tests.support.redisserver import _free_port as free_port


@pytest.fixture(scope="module")
def server():
    srv = RedisServer(appendonly=True).start()
    yield srv
    srv.close()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}:"


def node(srv: RedisServer):
    """A client configured as a node's (services/redisconn.connect)."""
    return connect(f"127.0.0.1:{srv.port}", 0)


def test_rate_limit_buckets_are_shared_by_nodes(server, prefix) -> None:
    a = SharedTokenBuckets(node(server), prefix, per_minute=6)
    b = SharedTokenBuckets(node(server), prefix, per_minute=6)
    waits = [(a if i % 2 else b).take("198.51.100.7") for i in range(6)]
    assert waits == [0.0] * 6  # the burst: per_minute requests, over both nodes together
    wait = a.take("198.51.100.7")
    assert 0 < wait <= 10.5  # one token every 10 s
    assert b.take("198.51.100.7") > 0
    assert a.take("203.0.113.9") == 0.0  # another address has its own bucket


def test_rate_limit_falls_back_to_the_node_while_redis_is_away(server, prefix) -> None:
    buckets = SharedTokenBuckets(connect("127.0.0.1:1", 0), prefix, per_minute=2)  # nothing listens there
    assert [buckets.take("192.0.2.1") for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("192.0.2.1") > 0  # still limited: by this node's own buckets


def test_failures_counted_on_both_nodes_make_one_ban(server, prefix) -> None:
    a = SharedFailureCounter(node(server), prefix, threshold=3, window=60)
    b = SharedFailureCounter(node(server), prefix, threshold=3, window=60)
    assert [a.add("192.0.2.5", 0), b.add("192.0.2.5", 0)] == [False, False]
    assert a.add("192.0.2.5", 0) is True  # the third, wherever it happened
    assert b.add("192.0.2.5", 0) is False  # the count started again


def test_failure_window_expires_in_redis(server, prefix) -> None:
    counter = SharedFailureCounter(node(server), prefix, threshold=2, window=0.3)
    assert counter.add("192.0.2.6", 0) is False
    time.sleep(0.5)
    assert counter.add("192.0.2.6", 0) is False  # the first failure's window is over


def test_a_ban_made_on_one_node_holds_on_the_other_and_lifts_on_both(server, prefix) -> None:
    client_a, client_b = node(server), node(server)
    meta_a, meta_b = RedisMeta(client_a, prefix), RedisMeta(client_b, prefix)
    bans_a = SharedBans(meta_a, 2, 60, 3600, client_a, prefix)
    bans_b = SharedBans(meta_b, 2, 60, 3600, client_b, prefix)
    now = time.time()
    assert bans_b.banned("192.0.2.9", now) is False
    assert bans_a.failed("192.0.2.9", now) is None
    assert bans_b.failed("192.0.2.9", now) is not None  # A's failure and B's make the ban
    assert bans_a.banned("192.0.2.9", now + 1.5) is True  # A never banned it itself
    meta_a.ban_remove("192.0.2.9")  # `hmacfs bans remove`
    assert bans_b.banned("192.0.2.9", now + 1.5 + 6) is False  # B re-reads its own ban after CONFIRM_SECONDS
    assert bans_a.banned("192.0.2.9", now + 1.5 + 6) is False


def test_the_janitor_lease_has_one_holder_and_lapses_when_it_stops_renewing(server, prefix) -> None:
    a = Lease(node(server), prefix + "lease", ttl=1.0)
    b = Lease(node(server), prefix + "lease", ttl=1.0)
    assert a.acquire() is True and b.acquire() is False
    assert a.acquire() is True  # renewed by its holder
    time.sleep(1.3)
    assert b.acquire() is True and a.acquire() is False  # A stopped renewing: B took it
    b.release()
    assert a.acquire() is True


def test_health_check_follows_redis_down_and_up(tmp_path) -> None:
    srv = RedisServer(appendonly=True).start()
    try:
        changes: list[bool] = []
        health = RedisHealth(node(srv), 0.2, on_change=changes.append)
        assert health.check() is True
        srv.stop()
        assert health.check() is False
        srv.start()
        deadline = time.monotonic() + 10
        while not health.check():
            assert time.monotonic() < deadline, "the health check never saw Redis back"
            time.sleep(0.1)
        assert changes == [True, False, True]
    finally:
        srv.close()


# -- the resumable-upload lock across nodes ------------------------------------------------------

def holder_socket() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair()


def test_a_second_node_waits_for_the_upload_lock_and_gets_it_when_released(server, prefix) -> None:
    a = ClusterWriters(node(server), prefix, wait=5)
    b = ClusterWriters(node(server), prefix, wait=5)
    released = threading.Event()
    order: list[str] = []

    def hold_on_a() -> None:
        with a.hold("u1", None):
            order.append("a")
            released.wait(5)
            time.sleep(0.3)
            order.append("a done")

    t = threading.Thread(target=hold_on_a)
    t.start()
    while not order:
        time.sleep(0.01)
    assert b.busy("u1") is True  # B sees A's hold through Redis
    released.set()
    with b.hold("u1", None):
        order.append("b")
    t.join(5)
    assert order == ["a", "a done", "b"]
    assert b.busy("u1") is False


def test_a_stale_holder_on_another_node_is_cut_and_the_newcomer_proceeds(server, prefix) -> None:
    a = ClusterWriters(node(server), prefix, wait=10)
    b = ClusterWriters(node(server), prefix, wait=10)
    ours, peer = holder_socket()
    cut = threading.Event()

    def stale_append_on_a() -> None:
        with a.hold("u2", ours) as entry:
            entry.reading, entry.progress = True, time.monotonic() - 5  # a body that stopped arriving
            try:
                ours.recv(1)  # blocks until the takeover shuts the socket down
            except OSError:
                pass
            cut.set()

    t = threading.Thread(target=stale_append_on_a)
    t.start()
    time.sleep(0.2)
    started = time.monotonic()
    with b.hold("u2", None):
        took = time.monotonic() - started
    t.join(5)
    assert cut.is_set() and took < 4  # well before A's lock would lapse by itself
    ours.close()
    peer.close()


def test_a_live_holder_on_another_node_is_waited_for_then_423(server, prefix) -> None:
    a = ClusterWriters(node(server), prefix, wait=10)
    b = ClusterWriters(node(server), prefix, wait=1.0)
    inside, done = threading.Event(), threading.Event()

    def receiving_on_a() -> None:
        with a.hold("u3", None) as entry:
            inside.set()
            while not done.is_set():  # bytes keep arriving: not stale
                entry.reading, entry.progress = True, time.monotonic()
                time.sleep(0.05)

    t = threading.Thread(target=receiving_on_a)
    t.start()
    inside.wait(5)
    with pytest.raises(UploadBusy), b.hold("u3", None):
        pass
    done.set()
    t.join(5)


def test_a_holder_whose_lock_lapsed_is_marked_lost_and_cut(server, prefix) -> None:
    client = node(server)
    a = ClusterWriters(client, prefix, ttl=1.5)
    ours, peer = holder_socket()
    with a.hold("u4", ours) as entry:
        client.delete(prefix + "upload-lock:u4")  # as if it lapsed while this node stalled
        deadline = time.monotonic() + 5
        while not entry.lost:
            assert time.monotonic() < deadline, "the lapsed lock was never noticed"
            time.sleep(0.05)
        with pytest.raises(OSError):
            ours.send(b"x" * 1_000_000)  # shut down
    ours.close()
    peer.close()


def test_the_upload_lock_gives_503_while_redis_is_away(prefix) -> None:
    writers = ClusterWriters(connect("127.0.0.1:1", 0), prefix, wait=1)
    with pytest.raises(HTTPError) as caught, writers.hold("u5", None):
        pass
    assert caught.value.status == 503 and caught.value.headers["Retry-After"]


# -- TLS -----------------------------------------------------------------------------------------

def make_tls_files(d) -> tuple[str, str, str]:
    """A private CA and a server certificate for 127.0.0.1 (openssl, as an operator would)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=hmacfs test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "srv.pem",
        "-days", "2", "-extfile", "ext")
    return str(d / "ca.pem"), str(d / "srv.pem"), str(d / "srv.key")


def test_a_node_on_a_tls_redis_checks_its_certificate(hmacfs_factory, tmp_path) -> None:
    ca, cert, key = make_tls_files(tmp_path)
    tls_port = free_port()
    srv = RedisServer(tmp_path / "redis", extra=("--tls-port", str(tls_port), "--tls-cert-file", cert,
                                                 "--tls-key-file", key, "--tls-ca-cert-file", ca,
                                                 "--tls-auth-clients", "no")).start()
    try:
        redis_cfg = {"redisenabled": True, "redisaddr": f"rediss://127.0.0.1:{tls_port}/0",
                     "redishealthcheckinterval": "1s"}
        trusted = hmacfs_factory({"redis": {**redis_cfg, "rediscafile": ca}})
        assert put(trusted, "tls/a.txt", b"over TLS").status == 201
        assert request(trusted.port, "GET", trusted.prefix + "tls/a.txt").body == b"over TLS"
        assert srv_keys(srv, "hmacfs:file")  # the row went to this Redis, through TLS
        untrusted = hmacfs_factory({"redis": redis_cfg})  # the system's CAs do not know ours
        refused = put(untrusted, "tls/b.txt", b"x")
        assert refused.status == 503 and refused.headers.get("retry-after")
        assert "certificate verify failed" in untrusted.log()
    finally:
        srv.close()


def srv_keys(srv: RedisServer, key: str) -> list:
    import redis

    return redis.Redis(host="127.0.0.1", port=srv.port).hkeys(key)


def test_a_hung_redis_costs_the_limits_one_timeout_then_they_decide_alone(server, prefix) -> None:
    """SIGSTOP: connections stay open and nothing answers. The first check waits one socket
    timeout; the next ones, for a moment, go straight to the node's own buckets and counts."""
    from hmacfs.services.redisconn import SOCKET_TIMEOUT

    buckets = SharedTokenBuckets(node(server), prefix, per_minute=100)
    counter = SharedFailureCounter(node(server), prefix, threshold=5, window=60)
    assert buckets.take("192.0.2.20") == 0.0 and counter.add("192.0.2.20", 0) is False  # connected
    server.pause()
    try:
        started = time.monotonic()
        assert buckets.take("192.0.2.20") == 0.0
        assert SOCKET_TIMEOUT - 0.5 < time.monotonic() - started < SOCKET_TIMEOUT + 2
        started = time.monotonic()
        for _ in range(20):
            buckets.take("192.0.2.20")
        assert time.monotonic() - started < 0.5  # the breaker is open: no waiting on Redis
    finally:
        server.resume()
    time.sleep(buckets.breaker.PAUSE + 0.1)
    assert buckets.take("192.0.2.21") == 0.0 and not buckets.breaker.open()  # Redis again
