"""Crash and signal behaviour of the real process: races, kill -9, SIGTERM drain, SIGHUP reload."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

from tests.support.client import put, request, signed_put, status_of, url_path, wait_for_gauge


def visible_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and ".hmacfs" not in p.relative_to(root).parts]


def test_racing_puts_one_201_rest_409(hmacfs) -> None:
    path = f"{uuid.uuid4()}/race.bin"
    bodies = [bytes([i]) * 200_000 for i in range(12)]
    statuses: list[int] = []
    barrier = threading.Barrier(len(bodies))

    def racer(body: bytes) -> None:
        barrier.wait()
        statuses.append(put(hmacfs, path, body).status)

    threads = [threading.Thread(target=racer, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(statuses) == [201] + [409] * (len(bodies) - 1), statuses
    stored = (hmacfs.storage / path).read_bytes()
    assert stored in bodies  # exactly one whole body, never a mix
    assert request(hmacfs.port, "GET", url_path(hmacfs.prefix, path)).body == stored


def _start_partial_upload(srv, path: str, size: int, sent: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    s.sendall(f"PUT {signed_put(srv.prefix, srv.secret, path, size)} HTTP/1.1\r\nHost: x\r\n"
              f"Content-Length: {size}\r\n\r\n".encode() + b"a" * sent)
    deadline = time.monotonic() + 10
    tmp = srv.storage / ".hmacfs" / "tmp"
    while time.monotonic() < deadline:  # wait until the server is streaming into its temp file
        if any(p.stat().st_size > 0 for p in tmp.iterdir()):
            return s
        time.sleep(0.02)
    raise AssertionError("upload did not start")


def test_kill_9_mid_upload_leaves_nothing_and_restart_is_clean(hmacfs_factory) -> None:
    srv = hmacfs_factory()
    path = f"{uuid.uuid4()}/big.bin"
    s = _start_partial_upload(srv, path, 10_000_000, 3_000_000)
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(10)
    s.close()
    assert not (srv.storage / path).exists() and visible_files(srv.storage) == []
    leftovers = list((srv.storage / ".hmacfs" / "tmp").iterdir())
    assert leftovers, "the temp file is where the partial bytes went"
    srv.start()  # same storage, same config
    assert list((srv.storage / ".hmacfs" / "tmp").iterdir()) == []  # swept at start
    assert request(srv.port, "GET", url_path(srv.prefix, path)).status == 404
    assert put(srv, path, b"fresh").status == 201  # the name is free, nothing half-written holds it


def test_sigterm_during_upload_completes_then_exits_0(hmacfs_factory) -> None:
    srv = hmacfs_factory()
    path = f"{uuid.uuid4()}/drain.bin"
    size = 5_000_000
    s = _start_partial_upload(srv, path, size, 3_000_000)
    idle = socket.create_connection(("127.0.0.1", srv.port), timeout=10)  # an idle keep-alive client
    wait_for_gauge(srv, "hmacfs_open_connections", 2)  # accepted: still in the backlog it would get a reset
    srv.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while True:  # once draining, the listener is closed: new connections are refused
        try:
            request(srv.port, "GET", "/health", timeout=2)
        except OSError:
            break
        assert time.monotonic() < deadline, "still accepting connections 10 s after SIGTERM"
        time.sleep(0.05)
    assert idle.recv(100) == b""  # idle connections are closed at once
    s.sendall(b"a" * (size - 3_000_000))
    reply = s.recv(4096)
    assert status_of(reply) == 201 and b"Connection: close" in reply
    assert srv.proc.wait(15) == 0
    assert (srv.storage / path).stat().st_size == size
    assert not Path(srv.config["server"]["pidfilepath"]).exists()  # pidfile removed at exit


def test_sigterm_grace_time_bounds_a_stalled_upload(hmacfs_factory) -> None:
    srv = hmacfs_factory({"timeouts": {"shutdown": "1s"}})
    path = f"{uuid.uuid4()}/stalled.bin"
    s = _start_partial_upload(srv, path, 5_000_000, 2_000_000)
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(15) == 0
    assert time.monotonic() - started < 6
    s.close()
    assert not (srv.storage / path).exists()


def test_sighup_reloads_secrets(hmacfs_factory) -> None:
    srv = hmacfs_factory()
    pid = int(Path(srv.config["server"]["pidfilepath"]).read_text())
    assert pid == srv.proc.pid
    text = srv.config_path.read_text().replace(srv.secret, "rotated-secret-0123456789")
    srv.config_path.write_text(text)
    os.kill(pid, signal.SIGHUP)
    new_path = f"{uuid.uuid4()}/n.txt"
    target = signed_put(srv.prefix, "rotated-secret-0123456789", new_path, 1)
    deadline = time.monotonic() + 10
    while request(srv.port, "PUT", target, b"x").status != 201:
        assert time.monotonic() < deadline, "new secret not taken"
        time.sleep(0.1)
    assert put(srv, f"{uuid.uuid4()}/o.txt", b"x").status == 403  # the old secret is gone
    assert "config reloaded" in srv.log()


def test_logs_never_contain_signatures(hmacfs) -> None:
    path = f"{uuid.uuid4()}/secret-check.txt"
    target = signed_put(hmacfs.prefix, hmacfs.secret, path, 1)
    mac = target.split("v=")[1]
    assert request(hmacfs.port, "PUT", target, b"x").status == 201
    assert request(hmacfs.port, "PUT", url_path(hmacfs.prefix, path) + "?v=" + "f" * 64, b"x").status == 403
    deadline = time.monotonic() + 10
    while hmacfs.log().count("secret-check.txt") < 2:  # access lines are written after the response
        assert time.monotonic() < deadline, hmacfs.log()
        time.sleep(0.05)
    log = hmacfs.log()
    assert "secret-check.txt" in log and mac not in log and "f" * 64 not in log and hmacfs.secret not in log
