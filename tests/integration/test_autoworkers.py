"""Worker auto-adjust against the real server: sizes logged and exported, SIGHUP re-sizes,
sustained queueing grows the pool (services/workers.py WorkerTuner).

Why: the pool size is what decides how many uploads a host takes at once; an operator reads
it in the log and in `hmacfs_upload_workers`, and both must follow what the pool really is.
"""
from __future__ import annotations

import re
import signal
import socket
import time
from contextlib import ExitStack

from tests.support import toml_writer
from tests.support.client import request, signed_put

GROW_AFTER = 5.0  # WorkerTuner's default: seconds of queueing before a step up


def gauge(srv, name: str) -> float:
    text = request(srv.metrics_port, "GET", "/metrics").body.decode()
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def wait_log(srv, pattern: str, timeout: float = 10.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, srv.log())
        if found:
            return found
        assert time.monotonic() < deadline, f"no log line matching {pattern!r}:\n{srv.log()[-3000:]}"
        time.sleep(0.05)


def slow_upload(srv, n: int) -> socket.socket:
    """A signed PUT that sends its head and one byte of a 1 MB body, then holds its worker."""
    size = 1_000_000
    path = signed_put(srv.prefix, srv.secret, f"slow/{n}.bin", size)
    s = socket.create_connection((srv.host, srv.port), timeout=5)
    s.sendall(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
              "Content-Type: application/octet-stream\r\n\r\n".encode() + b"x")
    return s


def test_fixed_size_is_honoured_and_sighup_applies_a_new_one(hmacfs_factory) -> None:
    srv = hmacfs_factory({"server": {"autoadjustworkers": False}, "workers": {"numworkers": 3,
                                                                             "uploadqueuesize": 7}})
    wait_log(srv, r"upload workers \(start\): 3 \(numworkers\), queue 7")
    assert gauge(srv, "hmacfs_upload_workers") == 3 and gauge(srv, "hmacfs_upload_queue_capacity") == 7
    srv.config["workers"]["numworkers"] = 5
    srv.config_path.write_text(toml_writer.dumps(srv.config))
    srv.proc.send_signal(signal.SIGHUP)
    wait_log(srv, r"upload workers \(reload\): 5 \(numworkers\), queue 7")
    assert gauge(srv, "hmacfs_upload_workers") == 5


def test_auto_size_is_logged_exported_and_re_evaluated_on_sighup(hmacfs_factory) -> None:
    srv = hmacfs_factory({"server": {"autoadjustworkers": True}})
    start = int(wait_log(srv, r"upload workers \(start\): (\d+) auto-adjusted \(cpus").group(1))
    assert start >= 4 and gauge(srv, "hmacfs_upload_workers") == start
    srv.proc.send_signal(signal.SIGHUP)
    again = int(wait_log(srv, r"upload workers \(reload\): (\d+) auto-adjusted").group(1))
    assert again == start == gauge(srv, "hmacfs_upload_workers")  # the same machine: the same plan


def test_sustained_queueing_grows_the_pool(hmacfs_factory) -> None:
    srv = hmacfs_factory({"server": {"autoadjustworkers": True}})
    start = int(wait_log(srv, r"upload workers \(start\): (\d+) auto-adjusted").group(1))
    with ExitStack() as stack:
        # One address may hold all but the reserve (a quarter): the rest of these queue.
        for n in range(start + 2):
            stack.callback(stack.enter_context(slow_upload(srv, n)).close)
        deadline = time.monotonic() + 5
        while gauge(srv, "hmacfs_upload_queue_length") < 1:
            assert time.monotonic() < deadline, "the slow uploads never queued"
            time.sleep(0.05)
        grown = wait_log(srv, r"upload workers: (\d+) -> (\d+) \(uploads queued", timeout=GROW_AFTER + 10)
        old, new = int(grown.group(1)), int(grown.group(2))
        assert old == start and start < new <= start + max(1, start // 4)
        assert gauge(srv, "hmacfs_upload_workers") >= new
