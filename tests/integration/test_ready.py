"""`/ready` against the real process: each check named, 503 when storage goes read-only, 200 again.

Why: a balancer keeps sending uploads to a node whose `/ready` says 200; a disk that went
read-only (an ext4 error remount, a full thin pool) must take the node out of rotation with
the failing check named, and put it back when the disk is writable again, without a
restart. Only a real read-only filesystem shows that (a tmpfs remounted `ro`); a refused
mount skips with the reason. The checks that need no mount (free space under the floor,
clamd unreachable, draining) are pinned on `Readiness` directly.
"""
from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hmacfs.services.readiness import Readiness
from tests.conftest import need_program
from tests.support.clamd import ClamdProcess
from tests.support.client import request
from tests.support.hmacfs_proc import HmacfsProcess
from tests.support.mounts import MountRefused, remount_ro, tmpfs

CHECKS = {"storage_writable", "free_space", "warmup", "not_draining"}


def ready(srv: HmacfsProcess) -> tuple[int, dict[str, Any]]:
    r = request(srv.port, "GET", "/ready")
    assert r.header("Content-Type") == "application/json" and r.header("Cache-Control") == "no-store"
    return r.status, json.loads(r.body)


def wait_ready(srv: HmacfsProcess, status: int, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        got, body = ready(srv)
        if got == status:
            return body
        assert time.monotonic() < deadline, (status, got, body)
        time.sleep(0.1)


def test_health_is_liveness_and_ready_lists_each_check(hmacfs: HmacfsProcess) -> None:
    status, body = ready(hmacfs)
    assert status == 200 and body["ready"] is True
    assert set(body["checks"]) == CHECKS  # no [clamav]: no clamd check
    assert all(c["ok"] and c["detail"] for c in body["checks"].values())
    head = request(hmacfs.port, "HEAD", "/ready")
    assert head.status == 200 and head.body == b""
    h = request(hmacfs.port, "GET", "/health")
    assert h.status == 200 and h.body == b"ok\n"


def test_ready_fails_on_read_only_storage_and_recovers(hmacfs: HmacfsProcess, tmp_path: Path) -> None:
    """Linux refuses to remount a filesystem read-only while a file on it is open for writing
    ("mount point is busy"), and a running server always holds its metadata database so. The
    read-only filesystem is therefore mounted over `.hmacfs/tmp`, where every upload is written
    first (and where the check writes its probe file): for uploads, that is the storage."""
    srv = hmacfs
    wait_ready(srv, 200)
    with tmpfs_or_skip(srv.storage / ".hmacfs" / "tmp", "1m") as tmp:
        wait_ready(srv, 200)  # the fresh tmpfs is writable
        try:
            remount_ro(tmp)
        except MountRefused as e:
            pytest.skip(f"remounting the tmpfs read-only was refused: {e}")
        body = wait_ready(srv, 503)
        assert body["ready"] is False
        failing = {name for name, c in body["checks"].items() if not c["ok"]}
        assert failing == {"storage_writable"}, body
        assert "Read-only file system" in body["checks"]["storage_writable"]["detail"]
        r = request(srv.port, "GET", "/ready")
        assert r.header("Retry-After") == "5"
        assert request(srv.port, "GET", "/health").status == 200  # alive: no restart wanted
        assert metric(srv, "hmacfs_ready") == 0
        assert metric(srv, 'hmacfs_ready_check{check="storage_writable"}') == 0

        done = subprocess.run(["mount", "-o", "remount,rw", str(tmp)], capture_output=True, text=True,
                              timeout=10, check=False)
        assert done.returncode == 0, done.stderr
        body = wait_ready(srv, 200)
        assert body["checks"]["storage_writable"]["ok"] is True
        assert metric(srv, "hmacfs_ready") == 1


def test_ready_follows_clamd_when_scanning_is_on(hmacfs_factory, tmp_path: Path) -> None:
    """With [clamav] on, a clamd that stops answering takes the node out (uploads would get 503
    or go unscanned), and its return puts it back; the check is cached for up to 5 s."""
    with ClamdProcess(tmp_path / "clamd", program=need_program("clamd")) as clamd:
        srv = hmacfs_factory({"clamav": {"clamavenabled": True, "clamavsocket": clamd.socket_path}})
        body = wait_ready(srv, 200)
        assert set(body["checks"]) == CHECKS | {"clamd"} and body["checks"]["clamd"]["detail"] == "PONG"
        clamd.kill()
        body = wait_ready(srv, 503, timeout=15)
        assert [n for n, c in body["checks"].items() if not c["ok"]] == ["clamd"], body
        clamd.restart()
        wait_ready(srv, 200, timeout=15)


def metric(srv: HmacfsProcess, sample: str) -> float:
    text = request(srv.metrics_port, "GET", "/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not exported")


class tmpfs_or_skip:
    """`tmpfs(...)`, skipping the test with the reason when mounting is refused."""

    def __init__(self, path: Path, size: str) -> None:
        self._cm = tmpfs(path, size)

    def __enter__(self) -> Path:
        try:
            return self._cm.__enter__()
        except MountRefused as e:
            pytest.skip(f"mounting a tmpfs was refused: {e}")

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


# -- the probe itself ------------------------------------------------------------------------------

def fake_app(tmp_path: Path, free: int = 10**9, floor: int = 0, scanner: Any = None) -> SimpleNamespace:
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    warm = threading.Event()
    warm.set()
    store = SimpleNamespace(tmp_dir=str(tmp), free_bytes=lambda: free)
    return SimpleNamespace(store=store, scanner=scanner, warm=warm, draining=False,
                           config=SimpleNamespace(server=SimpleNamespace(minfreebytes=floor)))


def by_name(readiness: Readiness) -> dict[str, Any]:
    return {c.name: c for c in readiness.checks()}


def test_free_space_below_the_floor_is_not_ready(tmp_path: Path) -> None:
    checks = by_name(Readiness(fake_app(tmp_path, free=10, floor=100)))  # type: ignore[arg-type]
    assert not checks["free_space"].ok and "10 bytes free" in checks["free_space"].detail
    assert checks["storage_writable"].ok
    assert by_name(Readiness(fake_app(tmp_path, free=100, floor=100)))["free_space"].ok  # type: ignore[arg-type]


def test_clamd_unreachable_and_draining_and_warming(tmp_path: Path) -> None:
    scanner = SimpleNamespace(client=SimpleNamespace(address=str(tmp_path / "no-clamd.sock")))
    app = fake_app(tmp_path, scanner=scanner)
    r = Readiness(app)  # type: ignore[arg-type]
    clamd = by_name(r)["clamd"]
    assert not clamd.ok and "no-clamd.sock" in clamd.detail
    app.draining = True
    app.warm.clear()
    failing = {c.name for c in r.checks() if not c.ok}
    assert failing == {"clamd", "not_draining", "warmup"} and not r.ready()


def test_storage_probe_runs_at_most_once_a_second(tmp_path: Path) -> None:
    now = [100.0]
    app = fake_app(tmp_path)
    r = Readiness(app, clock=lambda: now[0])  # type: ignore[arg-type]
    assert by_name(r)["storage_writable"].ok
    app.store.tmp_dir = str(tmp_path / "gone")  # a probe now would fail
    now[0] += 0.5
    assert by_name(r)["storage_writable"].ok  # cached
    now[0] += 0.6
    assert not by_name(r)["storage_writable"].ok
    assert list((tmp_path / "tmp").iterdir()) == []  # the probe file is removed
