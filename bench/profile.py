#!/usr/bin/env python3
"""Profile a running hmacfs under one benchmark load with py-spy, and summarise the hot spots.

    .venv/bin/pip install py-spy
    python3 bench/profile.py get4k            # wrk 4 KiB GET @64 for 8 s
    python3 bench/profile.py put1g --gil      # 1 GiB PUTs; only samples that hold the GIL
    python3 bench/profile.py put4k --keep /tmp/prof   # keep the raw stacks (flamegraph input)

Strategy: the same zipapp, config and clients as bench/run.py, so a hot spot found here is
one the benchmark pays for. py-spy samples the process from outside (no code change, no
instrumentation overhead in the server); the raw collapsed stacks are reduced to two
tables: self time (where the CPU is) and inclusive time (which call path pays for it).
Idle threads (blocked in recv, accept, waiting for the GIL) are not sampled unless --idle.
"""
from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clients
import run as bench
import servers

SCENARIOS = ("get4k", "put4k", "get1g", "put1g", "conc")


def find_py_spy() -> str:
    """py-spy from PATH or the repo's .venv."""
    for candidate in (shutil.which("py-spy"), str(bench.REPO / ".venv" / "bin" / "py-spy")):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")


def load(scenario: str, server: servers.Hmacfs, root: Path, seconds: int, stop: threading.Event) -> str:
    """Drive `scenario` against the server for about `seconds`; returns a one-line result."""
    if scenario == "get4k":
        src = clients.make_source(root / "small.bin", 4096)
        clients.put_file(server.port, clients.put_target(bench.SECRET, "p/4k.bin", 4096), src)
        s = bench.run_wrk(f"http://127.0.0.1:{server.port}/upload/p/4k.bin", 64, seconds,
                          bench.BENCH / "wrk_get.lua", [])
        return f"{s['rps']:,.0f} req/s"
    if scenario == "put4k":
        base = root / "list"
        bench.write_put_lists(base, "w", 60000 * seconds // bench.WRK_THREADS, 4096)
        s = bench.run_wrk(f"http://127.0.0.1:{server.port}/", 64, seconds, bench.BENCH / "wrk_put.lua",
                          [str(base), "4096"])
        return f"{s['rps']:,.0f} req/s, {s['status']} non-2xx"
    src = clients.make_source(root / "big.bin", 1 << 30)
    results = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline and not stop.is_set():
        path = f"b/{i}.bin"
        if scenario == "get1g":
            if i == 0:
                clients.put_file(server.port, clients.put_target(bench.SECRET, path, 1 << 30), src)
            res = clients.get_file(server.port, "/upload/b/0.bin")
        elif scenario == "put1g":
            res = clients.put_file(server.port, clients.put_target(bench.SECRET, path, 1 << 30), src)
            (server.data / path).unlink(missing_ok=True)
        else:
            csrc = clients.make_source(root / "conc.bin", 10_000_000)
            targets = [clients.put_target(bench.SECRET, f"c{i}/{k}.bin", 10_000_000) for k in range(100)]
            secs, _ = clients.concurrent_puts(server.port, targets, csrc)
            res = clients.Result(201, 100 * 10_000_000, secs)
            shutil.rmtree(server.data / f"c{i}", ignore_errors=True)
        results.append(res.mb_per_s)
        i += 1
    return "MB/s per transfer: " + ", ".join(f"{r:,.0f}" for r in results)


def summarise(raw: Path, top: int) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_s)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        total += count
        self_t[frames[-1]] += count
        for frame in set(frames):
            incl[frame] += count
    if not total:
        return "no samples (was the server busy?)"
    out = [f"{total} samples", "", "self time (where the CPU is):"]
    out += [f"  {n / total:6.1%}  {frame}" for frame, n in self_t.most_common(top)]
    out += ["", "inclusive time (what pays for it):"]
    out += [f"  {n / total:6.1%}  {frame}" for frame, n in incl.most_common(top)]
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="py-spy profile of hmacfs under a benchmark load")
    ap.add_argument("scenario", choices=SCENARIOS)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--gil", action="store_true", help="only samples of the thread holding the GIL")
    ap.add_argument("--idle", action="store_true", help="include idle threads")
    ap.add_argument("--lines", action="store_true", help="per source line instead of per function")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--pyz", type=Path, help="zipapp to profile (default: build dist/hmacfs.pyz)")
    ap.add_argument("--keep", type=Path, help="directory to copy the raw collapsed stacks to")
    args = ap.parse_args(argv)
    py_spy = find_py_spy()
    pyz = (args.pyz or bench.build_zipapp(sys.executable)).resolve()
    root = Path(tempfile.mkdtemp(prefix="hmacfs-prof-", dir=bench.default_tmpdir(3 << 30)))
    server = servers.Hmacfs(root / "hmacfs", pyz, bench.SECRET)
    spy: Optional[subprocess.Popen] = None
    try:
        server.start()
        raw = root / f"{args.scenario}.txt"
        cmd = [py_spy, "record", "--pid", str(server.proc.pid), "--format", "raw", "--nonblocking",
               "--rate", str(args.rate), "--duration", str(args.seconds + 1), "-o", str(raw)]
        cmd += [] if args.lines else ["--function"]
        cmd += ["--gil"] if args.gil else []
        cmd += ["--idle"] if args.idle else []
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        stop = threading.Event()
        result = load(args.scenario, server, root, args.seconds, stop)
        spy.wait(args.seconds + 60)
        print(f"# hmacfs under {args.scenario} ({'GIL holder only' if args.gil else 'all busy threads'}): "
              f"{result}\n")
        print(summarise(raw, args.top))
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(raw, args.keep / raw.name)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait(10)
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
