#!/usr/bin/env python3
"""What deduplication and encryption at rest cost hmacfs: throughput and memory, in one run.

    python3 bench/storage.py            # full: 1 GiB transfers, 5 rounds, ~2-3 min on 2 cores
    python3 bench/storage.py --quick    # 16 MiB transfers, 1 round, ~10 s (tests/test_bench_storage_smoke.py)

Why: the storage features put work on the hot path of every upload and download. With
[encryption] on, each byte is hashed (as always), AES-256-GCM sealed in 1 MiB segments and
written; each download is read, authenticated and decrypted in Python-driven segments
instead of going out by sendfile. [deduplication] promises no second pass: the sha256 is
known when the last byte arrives, so a duplicate is "just" a link to the existing blob. The
issue asks for four numbers, each a ratio taken in one run so that this noisy shared VM's
drift cancels:

1. 1 GiB PUT, dedup+enc / plain (new random content every round, so dedup never hits): >= 0.8
2. 1 GiB PUT on dedup+enc, duplicate / new content (the same bytes to a second path): >= 1.0
3. 1 GiB GET, encrypted / plain: >= 0.5
4. peak RSS of a fresh dedup+enc server, 1 GiB / 16 MiB PUT+GET: about 1 (flat; <= 1.1 here)

Strategy: two hmacfs servers from the same zipapp run side by side on loopback, "plain"
(bench/servers.py's default config) and "dedup+enc" (the same plus [deduplication] and
[encryption] with a 0600 keyfile, default segment size). Every round measures everything
once, servers in rotated order, so slow drift hits both alike; the table gives medians
(peaks: maxima) and every sample is listed. The clients are bench/clients.py's raw sockets
(sendfile out, splice to /dev/null in) and their ceilings are measured in the same rounds.
Before every timed PUT, RAM is warmed (see warm_memory): on this VM cold RAM, not the
server, would otherwise decide which PUT is faster.
Each measurement is checked, not just timed: statuses and byte counts, the stored file
really is ciphertext (format magic), the duplicate really is the same blob (same inode),
and a delete really frees the blob. Data lives on /dev/shm when it has room (this VM's
ext4 would measure the disk); every process and temp file goes at the end, also on failure.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import hmac
import mmap
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clients
import servers
from lifecycle import BudgetExceeded, aborted, bench_parser, chosen_plan, handle_signals, stop_all, write_results

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SECRET = "bench-secret"
MB = 1e6
MAGIC = b"HMFSAEAD"  # first bytes of every encrypted file (hmacfs/storage/encrypted.py)
PLAIN, ENC = "plain", "dedup+enc"


@dataclass(frozen=True)
class Plan:
    """Sizes, rounds and time limit of one run."""

    mode: str
    rounds: int
    big: int  # bytes of every timed transfer
    mem_small: int  # the small upload of the memory comparison (>= 1 MiB: the same buffers as a big one)
    budget: float  # hard wall-clock limit, seconds
    warm: bool = True  # touch and free RAM before every timed PUT (see warm_memory)

    @property
    def warm_bytes(self) -> int:
        """A quarter more than the largest file a timed PUT writes, plus slack for buffers."""
        return self.big + self.big // 4 + (64 << 20)


FULL = Plan("full", rounds=5, big=1 << 30, mem_small=16 << 20, budget=900.0)
QUICK = Plan("quick", rounds=1, big=16 << 20, mem_small=2 << 20, budget=150.0)


@dataclass(frozen=True)
class Row:
    """One line of the table: `measured` against `against` within sample set `key`."""

    key: str
    label: str
    unit: str
    measured: str
    against: str
    higher_is_better: bool
    target: Optional[tuple[str, float]]  # ("ge"|"le", threshold) on measured/against
    peak: bool = False  # aggregate by max over rounds (a high-water mark), not by median
    fmt: str = "{:,.0f}"


def rows(plan: Plan) -> list[Row]:
    big, small = human(plan.big), human(plan.mem_small)
    return [
        Row("put_new", f"{big} PUT, new content: dedup+enc vs plain", "MB/s", ENC, PLAIN, True, ("ge", 0.8)),
        Row("put_dup", f"{big} PUT on dedup+enc: duplicate vs new content", "MB/s", "duplicate", "new", True,
            ("ge", 1.0)),
        Row("get", f"{big} GET: encrypted (dedup+enc) vs plain", "MB/s", ENC, PLAIN, True, ("ge", 0.5)),
        Row("rss_fresh", f"peak RSS, fresh dedup+enc server: {big} vs {small} PUT+GET", "MB", "large", "small",
            False, ("le", 1.1), peak=True, fmt="{:,.1f}"),
        Row("rss_xfer", f"peak RSS during the {big} PUT+GET above: dedup+enc vs plain", "MB", ENC, PLAIN, False,
            None, peak=True, fmt="{:,.1f}"),
    ]


@dataclass
class Run:
    """Everything measured in one run."""

    plan: Plan
    root: Path
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: int = 0

    def add(self, key: str, name: str, value: float) -> None:
        self.samples.setdefault(key, {}).setdefault(name, []).append(value)

    def get(self, key: str, name: str) -> list[float]:
        return self.samples.get(key, {}).get(name, [])

    def fail(self, message: str) -> None:
        self.failures += 1
        self.notes.append("FAILED: " + message)
        print("  ! FAILED: " + message, flush=True)

    def note(self, message: str) -> None:
        self.notes.append(message)
        print("  ! " + message, flush=True)


def human(n: int) -> str:
    """1073741824 -> '1 GiB'."""
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n:,} B"


def rotate(items: list, r: int) -> list:
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


# ----------------------------------------------------------------------------- servers


class ConfiguredHmacfs(servers.Hmacfs):
    """servers.Hmacfs with its own name and extra TOML tables appended to the config it writes."""

    def __init__(self, name: str, workdir: Path, pyz: Path, python: str, extra_toml: str = "") -> None:
        super().__init__(workdir, pyz, SECRET, python)
        self.name = name
        self.extra_toml = extra_toml

    def configure(self) -> None:
        super().configure()
        if self.extra_toml:
            with open(self.config_path, "a") as f:
                f.write(self.extra_toml)

    def rss_bytes(self) -> int:
        """Current VmRSS of the server process (bytes)."""
        return _status_kib(self.proc.pid, "VmRSS") * 1024 if self.proc else 0

    def wipe(self) -> None:
        """Empty the data dir (server stopped): the next start is a fresh store."""
        shutil.rmtree(self.data, ignore_errors=True)
        self.data.mkdir()


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def write_keyfile(path: Path) -> Path:
    """A fresh one-key keyfile, mode 0600 from the moment it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"bench-1 {secrets.token_hex(32)}\n")
    return path


def dedup_enc_toml(keyfile: Path) -> str:
    """The tables that turn the features on; everything else (segment size: 1 MiB) is default."""
    return ("[deduplication]\nenabled = true\n"
            f'[encryption]\nenabled = true\nkeyfile = "{keyfile}"\n')


# ----------------------------------------------------------------------------- clients


def target(path: str, size: int) -> str:
    return clients.put_target(SECRET, path, size)


def _request(port: int, head: str, timeout: float) -> tuple[int, dict[str, str], bytes, socket.socket]:
    sock = socket.create_connection((clients.HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(head.encode())
    status, headers, rest = clients.read_head(sock)
    return status, headers, rest, sock


def delete(port: int, path: str, timeout: float = 120.0) -> int:
    """A v3-signed DELETE of /upload/<path> (METHOD LF expires LF full path); its status."""
    expires = int(time.time()) + 3600
    full = f"/upload/{path}"
    mac = hmac.new(SECRET.encode(), f"DELETE\n{expires}\n{full}".encode(), hashlib.sha256).hexdigest()
    status, _h, _r, sock = _request(port, f"DELETE {full}?v3={mac}&expires={expires} HTTP/1.1\r\n"
                                          f"Host: {clients.HOST}:{port}\r\nConnection: close\r\n\r\n", timeout)
    sock.close()
    return status


def get_sha256(port: int, path: str, timeout: float = 60.0) -> tuple[int, str]:
    """GET /upload/<path> and hash the body (untimed correctness check)."""
    status, headers, rest, sock = _request(port, f"GET /upload/{path} HTTP/1.1\r\nHost: {clients.HOST}:{port}\r\n"
                                                 "Connection: close\r\n\r\n", timeout)
    digest = hashlib.sha256(rest)
    want = int(headers.get("content-length", "0")) - len(rest)
    with sock:
        while want > 0:
            chunk = sock.recv(min(want, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            want -= len(chunk)
    return status, digest.hexdigest()


def make_random(path: Path, size: int) -> Path:
    """`size` incompressible bytes never seen before (a fresh random 1 MiB block, repeated).

    Dedup works on whole-file sha256, so a new block per file is enough to make it miss."""
    path.unlink(missing_ok=True)
    return clients.make_source(path, size)


def warm_memory(nbytes: int) -> float:
    """Fault in `nbytes` of anonymous memory and free it at once; returns the seconds it took.

    On this VM (Firecracker, virtio-balloon with free-page reporting) RAM the guest has not
    touched for a while is slow to touch again: writing 1 GiB to tmpfs took 0.4-0.6 s into
    recently freed pages and 2-3.8 s beyond them (measured: four 1 GiB files written in a row,
    0.53 / 2.01 / 3.63 / 3.37 s). The kernel hands out recently freed pages first, so without
    this whichever PUT runs first after some deletes gets fast pages and the next one slow
    ones: the order of the measurements, not the server, would decide a ratio. Freeing this
    ballast just before a timed PUT gives every PUT warm pages (the same four writes: 0.41-0.51 s).
    """
    t0 = time.perf_counter()
    block = bytes(1 << 20)
    ballast = mmap.mmap(-1, nbytes)
    try:
        for _ in range(nbytes // len(block)):
            ballast.write(block)
    finally:
        ballast.close()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- phases


def stored_bytes(top: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def put(run: Run, s: servers.Server, path: str, src: Path, what: str, series: str = "") -> Optional[float]:
    """Timed PUT; MB/s, or None (and a failure) unless it is a 201. With a `series` name (a PUT in
    the table) and warming on, RAM is warmed first and the cost is kept as sample warm_s/<series>."""
    size = src.stat().st_size
    if series and run.plan.warm:
        run.add("warm_s", series, warm_memory(run.plan.warm_bytes))
    res = clients.put_file(s.port, target(path, size), src, timeout=600)
    if res.status != 201:
        run.fail(f"{what}: PUT to {s.name} returned {res.status}")
        return None
    return res.mb_per_s


def get(run: Run, s: servers.Server, path: str, size: int, what: str) -> Optional[float]:
    """Timed GET; MB/s, or None (and a failure) unless it is a 200 with every byte."""
    res = clients.get_file(s.port, "/upload/" + path, timeout=600)
    if res.status != 200 or res.nbytes != size:
        run.fail(f"{what}: GET from {s.name} returned {res.status} with {res.nbytes:,} of {size:,} bytes")
        return None
    return res.mb_per_s


def _warm_note(run: Run, series: str) -> str:
    done = run.get("warm_s", series)
    return f" (RAM warm-up {done[-1]:.1f} s)" if run.plan.warm and done else ""


def remove(run: Run, s: servers.Server, paths: list[str]) -> None:
    for path in paths:
        status = delete(s.port, path)
        if status != 204:
            run.fail(f"DELETE {path} on {s.name} returned {status}")


def first_bytes(path: Path, n: int = len(MAGIC)) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def sanity_check(run: Run, plain: ConfiguredHmacfs, enc: ConfiguredHmacfs) -> None:
    """Untimed: both servers return what was stored; dedup+enc stores ciphertext, links duplicates to
    one blob and frees the blob with the last delete. A benchmark of a misconfigured server would
    otherwise look like a fast one."""
    src = run.root / "check.bin"
    src.write_bytes(os.urandom(3 * (1 << 20) + 12345))  # not a whole number of 1 MiB segments
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    for s in (plain, enc):
        for path in ("check/a.bin", "check/b.bin"):
            if put(run, s, path, src, "sanity check") is None:
                raise RuntimeError(f"sanity check: {s.name} refused an upload:\n{s.log_tail()}")
            status, got = get_sha256(s.port, path)
            if status != 200 or got != want:
                raise RuntimeError(f"sanity check: {s.name} returned {status} with sha256 {got[:12]}... "
                                   f"instead of {want[:12]}...")
    a, b = enc.data / "check/a.bin", enc.data / "check/b.bin"
    if first_bytes(plain.data / "check/a.bin") != first_bytes(src):
        raise RuntimeError("sanity check: the plain server does not store the bytes as sent")
    if first_bytes(a) != MAGIC:
        raise RuntimeError("sanity check: dedup+enc stored plaintext (encryption is not on)")
    if a.stat().st_ino != b.stat().st_ino:
        raise RuntimeError("sanity check: dedup+enc stored the same content twice (deduplication is not on)")
    blobs = enc.data / ".hmacfs" / "blobs"
    remove(run, plain, ["check/a.bin", "check/b.bin"])
    remove(run, enc, ["check/a.bin", "check/b.bin"])
    left = stored_bytes(blobs)
    if left:
        raise RuntimeError(f"sanity check: {left:,} bytes of blobs left after deleting every path")
    for s in (plain, enc):
        if "not implemented" in s.log_tail(20000):
            run.note(f"{s.name} logged 'not implemented' at start-up: {s.log_tail(500)!r}")
    src.unlink()
    run.checks += [
        f"{human(3 << 20)} + 12,345 B random file: PUT + GET through both servers, sha256 equal",
        "dedup+enc stores the HMFSAEAD format (checked again every round), plain stores the bytes as sent",
        "two paths with one content on dedup+enc are one inode (one blob; checked again every round)",
        "deleting both paths frees the blob (0 bytes left under .hmacfs/blobs; checked again every round)",
    ]


def measure_ceilings(run: Run, src: Path) -> None:
    """The clients against a process that costs nothing per byte: what they can do at most."""
    ceiling = clients.CeilingServer(src)
    try:
        size = src.stat().st_size
        res = clients.put_file(ceiling.port, "/", src, timeout=600)
        got = clients.get_file(ceiling.port, "/", timeout=600)
        if res.status == 201 and got.status == 200 and got.nbytes == size:
            run.add("ceiling", "put", res.mb_per_s)
            run.add("ceiling", "get", got.mb_per_s)
        else:
            run.note(f"client ceiling sample invalid: PUT {res.status}, GET {got.status} {got.nbytes:,} B")
    finally:
        ceiling.close()


def phase_put_get(run: Run, r: int, plain: ConfiguredHmacfs, enc: ConfiguredHmacfs) -> None:
    """1 and 3: new content to both servers (rotated), then GET of it from both (rotated)."""
    big = run.plan.big
    src = make_random(run.root / f"x{r}.bin", big)
    measure_ceilings(run, src)
    path = f"put/r{r}.bin"
    for s in (plain, enc):
        s.reset_peak()
    for s in rotate([plain, enc], r):
        mbps = put(run, s, path, src, f"r{r} new-content PUT", s.name)
        if mbps is not None:
            run.add("put_new", s.name, mbps)
            print(f"  r{r} PUT {s.name:10s} {mbps:8,.0f} MB/s{_warm_note(run, s.name)}", flush=True)
    if first_bytes(enc.data / path) != MAGIC:
        run.fail(f"r{r}: dedup+enc stored {path} unencrypted")
    for s in rotate([plain, enc], r):
        mbps = get(run, s, path, big, f"r{r} GET")
        if mbps is not None:
            run.add("get", s.name, mbps)
            print(f"  r{r} GET {s.name:10s} {mbps:8,.0f} MB/s", flush=True)
    for s in (plain, enc):
        run.add("rss_xfer", s.name, s.peak_rss_bytes() / MB)
        remove(run, s, [path])
    src.unlink()


def phase_duplicate(run: Run, r: int, enc: ConfiguredHmacfs) -> Path:
    """2: content X to path A (new), then X to path B (a duplicate); returns X for the memory phase."""
    src = make_random(run.root / f"y{r}.bin", run.plan.big)
    a, b = f"dup/r{r}/new.bin", f"dup/r{r}/duplicate.bin"
    new = put(run, enc, a, src, f"r{r} dedup new PUT", "new")
    dup = put(run, enc, b, src, f"r{r} dedup duplicate PUT", "duplicate")
    if new is not None and dup is not None:
        if (enc.data / a).stat().st_ino != (enc.data / b).stat().st_ino:
            run.fail(f"r{r}: the duplicate was stored as a second file, not linked to the blob")
        else:
            run.add("put_dup", "new", new)
            run.add("put_dup", "duplicate", dup)
            print(f"  r{r} PUT new       {new:8,.0f} MB/s{_warm_note(run, 'new')}, duplicate {dup:8,.0f} MB/s"
                  f"{_warm_note(run, 'duplicate')} ({dup / new:.2f}x)", flush=True)
    remove(run, enc, [a, b])
    left = stored_bytes(enc.data / ".hmacfs" / "blobs")
    if left:
        run.fail(f"r{r}: {left:,} bytes left under .hmacfs/blobs after deleting both paths")
    return src


def phase_memory(run: Run, r: int, mem: ConfiguredHmacfs, small_src: Path, big_src: Path) -> None:
    """4: a fresh dedup+enc server per size; VmHWM (reset after start-up) over PUT + GET."""
    for label, src in rotate([("small", small_src), ("large", big_src)], r):
        size = src.stat().st_size
        mem.wipe()
        mem.start()
        try:
            run.add("rss_idle", label, mem.rss_bytes() / MB)
            mem.reset_peak()
            ok = put(run, mem, "mem/file.bin", src, f"r{r} memory {label} PUT") is not None
            ok = ok and get(run, mem, "mem/file.bin", size, f"r{r} memory {label} GET") is not None
            peak = mem.peak_rss_bytes() / MB
            if ok:
                run.add("rss_fresh", label, peak)
            print(f"  r{r} memory {human(size):>8s}: idle {run.get('rss_idle', label)[-1]:.1f} MB, "
                  f"peak over PUT+GET {peak:.1f} MB", flush=True)
        finally:
            mem.stop()
            mem.wipe()


# ----------------------------------------------------------------------------- report


def _cmd(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, cwd=REPO, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout + out.stderr).strip() or "?"


def machine_info(python: str) -> dict[str, str]:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = "?"
    try:
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) / (1 << 20):.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    commit = _cmd(["git", "rev-parse", "--short", "HEAD"])
    dirty = _cmd(["git", "status", "--short", "--", "hmacfs"])
    if dirty not in ("?", ""):
        changed = ", ".join(line.split()[-1] for line in dirty.splitlines())
        commit += f" + uncommitted changes under hmacfs/ ({changed}; the zipapp is built from the work tree)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "cpu": f"{cpu}, {os.cpu_count()} cores, {mem} RAM",
        "kernel": platform.release(),
        "python": _cmd([python, "-c", "import sys; print(sys.version.split()[0])"]),
        "openssl": _cmd([python, "-c", "import ssl; print(ssl.OPENSSL_VERSION)"]),
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def aggregate(row: Row, name: str, run: Run) -> Optional[float]:
    values = run.get(row.key, name)
    if not values:
        return None
    return max(values) if row.peak else statistics.median(values)


def verdict(row: Row, ratio: Optional[float]) -> str:
    if row.target is None:
        return ""
    how, threshold = row.target
    sign = ">=" if how == "ge" else "<="
    if ratio is None:
        return f"{sign} {threshold:.1f}x: n/a"
    ok = ratio >= threshold if how == "ge" else ratio <= threshold
    return f"{sign} {threshold:.1f}x: {'PASS' if ok else 'MISS'}"


def per_round_ratios(row: Row, run: Run) -> list[float]:
    a, b = run.get(row.key, row.measured), run.get(row.key, row.against)
    return [x / y for x, y in zip(a, b) if y] if len(a) == len(b) else []


def _cell(row: Row, name: str, value: Optional[float]) -> str:
    return f"{name} {'n/a' if value is None else row.fmt.format(value)}"


def table(run: Run) -> str:
    lines = ["| metric | unit | measured | against | ratio | per-round ratios | target |",
             "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for row in rows(run.plan):
        m, a = aggregate(row, row.measured, run), aggregate(row, row.against, run)
        ratio = m / a if m is not None and a else None
        better = "higher is better" if row.higher_is_better else "lower is better"
        per = per_round_ratios(row, run)
        lines.append(f"| {row.label} | {row.unit} ({better}) | {_cell(row, row.measured, m)} | "
                     f"{_cell(row, row.against, a)} | "
                     f"{'n/a' if ratio is None else f'{ratio:.2f}x'} | "
                     f"{' '.join(f'{x:.2f}' for x in per) or 'n/a'} | {verdict(row, ratio)} |")
    return "\n".join(lines)


def report(run: Run, info: dict[str, str], wall: float, loads: tuple[str, str], fs: str) -> str:
    plan = run.plan
    out = ["# hmacfs storage-feature benchmark results", "",
           f"Written by `python3 bench/storage.py{' --quick' if plan.mode == 'quick' else ''}`; "
           "see `bench/README.md` and `docs/performance.md` (\"Storage features\").", "",
           f"- date: {info['date']}", f"- commit: {info['commit']}",
           f"- zipapp: {info.get('pyz', '?')} (the build is reproducible: same sources, same bytes)",
           f"- machine: {info['cpu']}",
           f"- kernel: {info['kernel']}", f"- Python: {info['python']}, {info['openssl']}",
           f"- load average (1/5/15 min) at start: {loads[0]}; at end: {loads[1]}",
           f"- mode: {plan.mode}, {plan.rounds} round(s), servers in rotated order each round; "
           f"wall time {wall:.0f} s",
           f"- storage: {fs}; sources and both data dirs there",
           "- servers: `plain` = bench/servers.py's hmacfs config; `dedup+enc` = the same + "
           "`[deduplication] enabled = true`, `[encryption] enabled = true` with a one-key 0600 keyfile "
           "(segment size: the default 1 MiB)",
           "- RAM warmed before every timed PUT: "
           + (f"yes, {human(plan.warm_bytes)} of anonymous memory faulted in and freed just before "
              "(see warm_memory in bench/storage.py and \"RAM warm-up\" below)"
              if plan.warm else "no (--no-warm)"), "",
           "## Medians", "", table(run), "",
           "Medians over the rounds; peak RSS rows: the maximum over the rounds. ratio = measured / against. "
           "MB = 10^6 bytes; MB/s from connect to the response (PUT: to the `201`, so the server's fsync "
           "counts). Per-round ratios pair the samples of one round (the interleaving makes these the "
           "steadiest figure on a noisy machine). Peak RSS = VmHWM of the server process, reset through "
           "/proc/PID/clear_refs before the measurement (\"fresh\": after start-up of a new process).", ""]
    idle = {k: statistics.median(v) for k, v in run.samples.get("rss_idle", {}).items() if v}
    if idle:
        out += ["RSS of the fresh dedup+enc server right after start-up (median): "
                + ", ".join(f"before the {k} upload {v:.1f} MB" for k, v in sorted(idle.items())) + ".", ""]
    out += ceilings_section(run)
    out += warm_section(run, "## RAM warm-up before the timed PUTs",
                        f"Seconds per GiB to fault in and free {human(plan.warm_bytes)} before each timed PUT, per "
                        "series, in order of rounds. About 1 s/GiB is warm RAM; 1.5-3.5 s/GiB means the VM's RAM had "
                        "gone cold, and a PUT without the warm-up would have paid that inside its timing.")
    out += ["## Raw samples", "", "| metric | series | samples (in order of rounds) |", "| --- | --- | --- |"]
    for row in rows(plan):
        for name in (row.measured, row.against):
            values = run.get(row.key, name)
            out.append(f"| {row.label} | {name} | " + (", ".join(row.fmt.format(v) for v in values) or "none")
                       + " |")
    out += checks_and_notes(run)
    return "\n".join(out) + "\n"


def ceilings_section(run: Run) -> list[str]:
    """The clients' ceilings measured in this run's rounds (none measured: no section)."""
    ceil = run.samples.get("ceiling", {})
    if not ceil:
        return []
    big = human(run.plan.big)
    labels = {"put": f"{big} PUT, sendfile client -> separate process splicing to /dev/null",
              "get": f"{big} GET, {clients.GET_CLIENT} <- separate sendfile process"}
    return ["## Client ceilings (same rounds)", "", "| client | median | samples |", "| --- | ---: | --- |",
            *(f"| {labels[k]} | {statistics.median(v):,.0f} MB/s | " + ", ".join(f"{x:,.0f}" for x in v) + " |"
              for k, v in ceil.items()),
            ""]


def warm_section(run: Run, heading: str, intro: str) -> list[str]:
    """What the RAM warm-ups cost, in s/GiB per series (warming off: no section)."""
    warm = run.samples.get("warm_s", {})
    if not warm:
        return []
    per_gib = (1 << 30) / run.plan.warm_bytes
    return [heading, "", intro, "", "| series | s/GiB |", "| --- | --- |",
            *(f"| {k} | " + ", ".join(f"{x * per_gib:.2f}" for x in v) + " |" for k, v in warm.items()),
            ""]


def samples_section(samples: dict[str, dict[str, list[float]]]) -> list[str]:
    """Every sample of a run, by set and series (the resumable and scanning reports)."""
    out = ["## Raw samples", "", "| set | series | samples (in order of rounds) |", "| --- | --- | --- |"]
    for key, series in samples.items():
        for name, values in series.items():
            out.append(f"| {key} | {name} | " + (", ".join(f"{v:,.3f}" for v in values) or "none") + " |")
    return out


def checks_and_notes(run: Run) -> list[str]:
    """The report's last two sections: what the sanity checks established, and every note and failure."""
    return ["", "## Checks", "",
            *([f"- {c}" for c in run.checks] or ["- none ran"]),
            "", "## Notes", "",
            *([f"- {n}" for n in run.notes] or ["- no errors; every sample valid"])]


# ----------------------------------------------------------------------------- main


def build_zipapp(python: str, out: Path) -> Path:
    """build_zipapp.py into this run's temp dir (not dist/: another session may be running it),
    then check that it starts."""
    subprocess.run([python, "build_zipapp.py", "-o", str(out)], cwd=REPO, check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    subprocess.run([python, str(out), "-version"], check=True, timeout=60, stdout=subprocess.DEVNULL)
    return out


def zipapp(given: Optional[Path], python: str, root: Path) -> tuple[Path, str]:
    """The zipapp to run (--pyz, or one built into the run's temp dir) and how the report names it."""
    pyz = given.resolve() if given else build_zipapp(python, root / "hmacfs.pyz")
    origin = f"--pyz {given}" if given else "built from the work tree"
    return pyz, f"{origin}, sha256 {hashlib.sha256(pyz.read_bytes()).hexdigest()[:16]}"


def free_bytes(path: Path) -> int:
    """Free space at `path`; for tmpfs also bounded by the RAM the kernel could give it."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if str(path).startswith("/dev/shm"):
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    free = min(free, int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            pass
    return free


def choose_tmpdir(requested: Optional[Path], need: int) -> Path:
    """--tmpdir, else /dev/shm when it has `need` bytes, else the system temp dir (disk)."""
    candidates = [requested] if requested is not None else [Path("/dev/shm"), Path(tempfile.gettempdir())]
    for c in candidates:
        try:
            if free_bytes(c) >= need:
                return c
        except OSError:
            continue
        print(f"bench: {c} has less than {need / 2**30:.1f} GiB free", file=sys.stderr)
    raise SystemExit(f"bench: no temp dir with {need / 2**30:.1f} GiB free (tried {', '.join(map(str, candidates))})")


def fs_of(path: Path) -> str:
    best = ("", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if str(path).startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"temp dir under {path.parent} ({best[1]} on {best[2]})"


def note_disk(run: Run, tmpdir: Path, root: Path) -> None:
    """Say in the report when the data is not on tmpfs: the figures then include the disk."""
    if not str(tmpdir).startswith("/dev/shm"):
        run.note(f"data on {tmpdir} ({fs_of(root)}), not tmpfs: figures include this machine's disk and fsyncs")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    return bench_parser("hmacfs: dedup + encryption vs plain storage (see bench/README.md)",
                        "16 MiB transfers, 1 round, ~10 s", BENCH / "storage-results.md",
                        what="PUT (to see this VM's cold-memory effect)", data="sources and data go",
                        context=False).parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; exit 0 when every sample was valid, 1 when some failed, 2 on abort."""
    args = parse_args(argv)
    plan = chosen_plan(args, QUICK, FULL)
    handle_signals(plan.budget)
    started = time.perf_counter()
    load_start = loadavg()
    info = machine_info(args.python)  # before the build: the commit that is measured
    # at most: one source + its copy on each server (phase 1), or source + blob + temp file (phase 2)
    need = 4 * plan.big + plan.warm_bytes + (512 << 20)
    tmpdir = choose_tmpdir(args.tmpdir, need)
    signal.alarm(int(plan.budget))
    root = Path(tempfile.mkdtemp(prefix="hmacfs-bench-storage-", dir=tmpdir))
    run = Run(plan, root)
    note_disk(run, tmpdir, root)
    made: list[ConfiguredHmacfs] = []
    try:
        pyz, info["pyz"] = zipapp(args.pyz, args.python, root)
        keyfile = write_keyfile(root / "keyfile")
        plain = ConfiguredHmacfs(PLAIN, root / "plain", pyz, args.python)
        enc = ConfiguredHmacfs(ENC, root / "dedup-enc", pyz, args.python, dedup_enc_toml(keyfile))
        mem = ConfiguredHmacfs(ENC, root / "mem", pyz, args.python, dedup_enc_toml(keyfile))
        made += [plain, enc, mem]
        print(f"bench: {plan.mode} mode, {plan.rounds} round(s) of {human(plan.big)}, temp dir {root}, "
              f"load {load_start}", flush=True)
        for s in (plain, enc):
            print(f"  {s.name} ready in {s.start() * 1000:.0f} ms", flush=True)
        sanity_check(run, plain, enc)
        small_src = make_random(root / "small.bin", plan.mem_small)
        for r in range(plan.rounds):
            print(f"== round {r + 1}/{plan.rounds}", flush=True)
            phase_put_get(run, r, plain, enc)
            big_src = phase_duplicate(run, r, enc)
            phase_memory(run, r, mem, small_src, big_src)
            big_src.unlink()
        signal.alarm(0)
    except (BudgetExceeded, KeyboardInterrupt, SystemExit, Exception) as exc:
        return aborted(exc, *made)
    finally:
        stop_all(*made)
        shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - started
    text = report(run, info, wall, (load_start, loadavg()), fs_of(root))
    return write_results(args.out, text, table(run), wall, run.failures)


if __name__ == "__main__":
    sys.exit(main())
