"""Measure two denial-of-service scenarios against a real hmacfs process on loopback.

Why it exists: the throughput harness (bench/run.py) only measures well-behaved clients.
This script pins, before and after a fix, what a few cheap hostile clients can do:

1. "chunked stall": unsigned chunked PUTs that send one chunk and then stall. Do they tie
   up the upload workers (so a signed upload waits) and write unauthenticated bytes to disk?
2. "silent sockets": N connections that never send a byte. Does /health still answer from
   another source address and from the same one, and are the sockets cut at
   `readheadertimeout`?

Usage: python3 bench/hostile.py --repo DIR [--json]   (DIR: a checkout of hmacfs; stdlib only,
loopback only, every wait bounded).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

SECRET = "bench-secret-0123456789"
STALLS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml(doc: dict[str, dict[str, Any]]) -> str:
    out = []
    for section, body in doc.items():
        out.append(f"[{section}]")
        out += [f"{k} = {json.dumps(v)}" for k, v in body.items()]  # JSON strings/ints/bools are TOML
    return "\n".join(out) + "\n"


class Server:
    """One hmacfs process in a fresh temp dir; a context manager that always cleans up."""

    def __init__(self, repo: Path, extra: dict[str, dict[str, Any]]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hmacfs-hostile-"))
        self.port, self.storage = free_port(), self.dir / "data"
        config: dict[str, dict[str, Any]] = {
            "server": {"listenport": f"127.0.0.1:{self.port}", "metricsport": f"127.0.0.1:{free_port()}",
                       "storagepath": str(self.storage), "minfreebytes": "1MB", "loglevel": "info"},
            "security": {"secret": SECRET},
        }
        for section, body in extra.items():
            config.setdefault(section, {}).update(body)
        (self.dir / "config.toml").write_text(toml(config))
        env = dict(os.environ, PYTHONPATH=str(repo), PYTHONUNBUFFERED="1")
        env.pop("HMACFS_SECRET", None)
        self.log = open(self.dir / "hmacfs.log", "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen([sys.executable, "-m", "hmacfs", "-config", str(self.dir / "config.toml")],
                                     cwd=self.dir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.stop_note = ""

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.proc.poll() is None:
            if health(self.port, timeout=1)[0].startswith("200"):
                return self
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"hmacfs did not become healthy: {(self.dir / 'hmacfs.log').read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.stop_note = f"exit {self.proc.wait(15)}"
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                self.stop_note = "killed after 15 s"
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def timed(conn: http.client.HTTPConnection, method: str, url: str, body: bytes = b"") -> tuple[str, float]:
    """(status line or error, latency in ms) of one request; the connection is closed after it."""
    t0 = time.monotonic()
    try:
        conn.request(method, url, body=body or None, headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        resp.read()
        status = f"{resp.status} {resp.reason}"
    except (OSError, http.client.HTTPException) as e:
        status = f"timeout after {conn.timeout:g} s" if isinstance(e, socket.timeout) else type(e).__name__
    finally:
        conn.close()
    return status, (time.monotonic() - t0) * 1000


def health(port: int, source: str = "127.0.0.1", timeout: float = 10) -> tuple[str, float]:
    """GET /health from a socket bound to the given source address."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    return timed(conn, "GET", "/health")


def signed_put(port: int, size: int = 4096, timeout: float = 20) -> tuple[str, float]:
    """A new 4 KiB upload signed with protocol v: HMAC-SHA256(secret, "<path> <size>")."""
    path = f"{uuid.uuid4()}/ok.bin"
    mac = hmac.new(SECRET.encode(), f"{path} {size}".encode(), hashlib.sha256).hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    return timed(conn, "PUT", f"/upload/{path}?v={mac}", os.urandom(size))


def read_for(sock: socket.socket, seconds: float) -> tuple[bytes, bool]:
    """Everything the peer sends within `seconds`, and whether it is still open."""
    data, deadline = b"", time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            break
        except OSError:
            return data, False
        if not chunk:
            return data, False
        data += chunk
    return data, True


def dir_bytes(path: Path) -> int:
    """Sum of the sizes of the files directly in `path` (files may vanish while we look)."""
    total = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(path) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat().st_size if entry.is_file() else 0
    return total


def chunked_stall(repo: Path) -> dict[str, Any]:
    with Server(repo, {"server": {"autoadjustworkers": False}, "workers": {"numworkers": 8}}) as srv:
        socks, answers, still_open = [], {}, 0
        try:
            for i in range(STALLS):
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
                socks.append(s)
                s.sendall(f"PUT /upload/stall{i}/f.bin?v=00 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                          "Expect: 100-continue\r\n\r\n".encode())
                data, is_open = read_for(s, 1.0)
                first = data.split(b"\r\n", 1)[0].decode(errors="replace")[9:] or "(nothing)"
                answers[first] = answers.get(first, 0) + 1
                with contextlib.suppress(OSError):
                    if is_open:
                        s.sendall(b"1000\r\n" + os.urandom(4096) + b"\r\n")
                        still_open += 1
            time.sleep(0.5)
            tmp_bytes = dir_bytes(srv.storage / ".hmacfs" / "tmp")
            status, ms = signed_put(srv.port)
            tmp_after = dir_bytes(srv.storage / ".hmacfs" / "tmp")
        finally:
            for s in socks:
                s.close()
    return {"stall_answers": answers, "stalls_sent_chunk": still_open, "tmp_bytes": tmp_bytes,
            "tmp_bytes_after_put": tmp_after, "put_status": status, "put_ms": round(ms, 1), "stop": srv.stop_note}


def poll_closed(socks: list[socket.socket], marks: tuple[float, ...], t0: float, out: dict[str, int]) -> None:
    """Count sockets the server closed (EOF/reset) by each mark (seconds after t0)."""
    sel, closed = selectors.DefaultSelector(), 0
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    for mark in marks:
        while (left := t0 + mark - time.monotonic()) > 0 and closed < len(socks):
            for key, _ in sel.select(timeout=min(left, 0.5)):
                try:
                    if key.fileobj.recv(65536):
                        continue  # the server answered something; only EOF/reset counts as closed
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                sel.unregister(key.fileobj)
                closed += 1
        out[f"closed_by_{mark:g}s"] = closed
    sel.close()


def silent_sockets(repo: Path, n: int) -> dict[str, Any]:
    with Server(repo, {"timeouts": {"readheadertimeout": "5s"}}) as srv:
        socks: list[socket.socket] = []
        failed, deadline = 0, time.monotonic() + 60
        try:
            while len(socks) + failed < n and time.monotonic() < deadline:
                try:
                    socks.append(socket.create_connection(("127.0.0.1", srv.port), 3, ("127.0.0.1", 0)))
                except OSError:
                    failed += 1
            t0 = time.monotonic()
            closed: dict[str, int] = {}
            poller = threading.Thread(target=poll_closed, args=(socks, (1, 6, 20), t0, closed), daemon=True)
            poller.start()
            time.sleep(0.5)  # let the server accept the backlog
            other = health(srv.port, "127.0.0.2")
            same = health(srv.port, "127.0.0.1")
            poller.join(30)
        finally:
            for s in socks:
                s.close()
    return {"n": n, "opened": len(socks), "connect_failed": failed,
            "health_127.0.0.2": other[0], "health_127.0.0.2_ms": round(other[1], 1),
            "health_127.0.0.1": same[0], "health_127.0.0.1_ms": round(same[1], 1), **closed, "stop": srv.stop_note}


def table(results: dict[str, Any]) -> str:
    s1 = results["chunked_stall"]
    rows = [("chunked stall", "answers to the 8 unsigned chunked PUTs", json.dumps(s1["stall_answers"])),
            ("", "stalls still open, chunk sent", s1["stalls_sent_chunk"]),
            ("", "bytes in .hmacfs/tmp during stalls", f"{s1['tmp_bytes']} (after PUT: {s1['tmp_bytes_after_put']})"),
            ("", "signed 4 KiB PUT", f"{s1['put_status']} in {s1['put_ms']} ms"),
            ("", "server stop", s1["stop"])]
    for r in results["silent_sockets"]:
        name = f"silent sockets N={r['n']}"
        rows += [(name, "opened / connect failed", f"{r['opened']} / {r['connect_failed']}"),
                 ("", "GET /health from 127.0.0.2", f"{r['health_127.0.0.2']} in {r['health_127.0.0.2_ms']} ms"),
                 ("", "GET /health from 127.0.0.1", f"{r['health_127.0.0.1']} in {r['health_127.0.0.1_ms']} ms"),
                 ("", "closed by server after 1 s / 6 s / 20 s",
                  f"{r.get('closed_by_1s')} / {r.get('closed_by_6s')} / {r.get('closed_by_20s')}"),
                 ("", "server stop", r["stop"])]
    widths = [max(len(str(row[i])) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, type=Path, help="hmacfs checkout to run (PYTHONPATH)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    repo = args.repo.resolve()
    results: dict[str, Any] = {"repo": str(repo), "chunked_stall": chunked_stall(repo), "silent_sockets": []}
    first = silent_sockets(repo, 1000)
    results["silent_sockets"].append(first)
    if first["health_127.0.0.2"].startswith("200") and first["health_127.0.0.1"].startswith("200"):
        results["silent_sockets"].append(silent_sockets(repo, 1100))
    print(table(results))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
