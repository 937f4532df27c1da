#!/usr/bin/env python3
"""Benchmark hmacfs against Debian nginx and a stdlib ThreadingHTTPServer baseline (issue 4).

    python3 bench/run.py            # full run, ~5-6 min on 2 cores, writes bench/results.md
    python3 bench/run.py --quick    # tiny sizes, 1 round, < 1 min (what the smoke test runs)

Strategy: all three servers run side by side on loopback, each in its own temp dir, and
every measurement is interleaved and rotated (A B C, B C A, C A B ...) so that drift of the
machine (page cache, CPU boost, a noisy neighbour) hits all servers alike; the report gives
medians. Clients are raw sockets with sendfile/recv_into and wrk (with a pre-signed path
list for PUT), and their own ceilings are measured and printed, so a ratio is never a
client limit. Everything is bounded in time and cleaned up (processes by group id, temp
dirs with their 1 GiB files) on success, failure, Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import hmac
import os
import platform
import shutil
import signal
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
from lifecycle import BudgetExceeded, aborted, handle_signals, stop_all, write_results

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SECRET = "bench-secret"
WRK_THREADS = 2
MB = 1e6


@dataclass(frozen=True)
class Plan:
    """Sizes, rounds and durations of one run."""

    mode: str
    rounds: int
    big: int  # bytes of the big PUT/GET
    duration: int  # seconds per wrk run (wrk takes whole seconds)
    warmup: int  # seconds of wrk GET warm-up per server before the small-request runs
    c_count: int  # concurrent uploads
    c_size: int  # bytes per concurrent upload
    mem_small: int  # bytes of the small upload in the memory check
    mem_repeat: int  # the large upload is the big source file sent this many times
    big_rounds: int = 1  # rounds of the big PUT/GET (cheap, and the noisiest measurement)
    small: int = 4096
    conns: tuple[int, ...] = (64, 256)
    budget: float = 560.0  # hard wall-clock limit (seconds) for the whole run


FULL = Plan("full", rounds=3, big_rounds=5, big=1 << 30, duration=4, warmup=1, c_count=100, c_size=10_000_000,
            mem_small=10_000_000, mem_repeat=8, budget=570.0)
QUICK = Plan("quick", rounds=1, big=16 << 20, duration=1, warmup=1, c_count=100, c_size=200_000,
             mem_small=1_000_000, mem_repeat=4, budget=180.0)


@dataclass
class Metric:
    """One row of the table."""

    key: str
    label: str
    unit: str
    higher_is_better: bool
    fmt: str = "{:,.0f}"
    peak: bool = False  # aggregate rounds by max (a peak), not by median


@dataclass
class Run:
    """Everything measured in one run."""

    plan: Plan
    servers: list[servers.Server]
    root: Path
    mem_root: Path
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    ceilings: dict[str, list[float]] = field(default_factory=dict)
    memcheck: list[tuple[str, int, int, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: int = 0

    def add(self, key: str, server: str, value: float) -> None:
        self.samples.setdefault(key, {}).setdefault(server, []).append(value)

    def fail(self, message: str) -> None:
        self.failures += 1
        self.note("FAILED: " + message)

    def note(self, message: str) -> None:
        self.notes.append(message)
        print("  ! " + message, flush=True)


def human(n: int) -> str:
    """1073741824 -> '1 GiB', 10000000 -> '10 MB' (the unit the size was chosen in)."""
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("GB", 10**9), ("MB", 10**6),
                      ("kB", 10**3)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def metrics(plan: Plan) -> list[Metric]:
    """The table rows, labelled with this plan's sizes."""
    big = human(plan.big)
    c_max = plan.conns[-1]
    rows = [Metric("put_big", f"{big} PUT", "MB/s", True), Metric("get_big", f"{big} GET", "MB/s", True)]
    for verb in ("GET", "PUT"):
        for c in plan.conns:
            rows.append(Metric(f"{verb.lower()}_small_{c}", f"{human(plan.small)} {verb} @{c} conns",
                               "req/s", True))
    rows += [
        Metric("conc_mbps", f"{plan.c_count} x {human(plan.c_size)} concurrent PUT", "MB/s", True),
        Metric("conc_s", f"{plan.c_count} x {human(plan.c_size)} concurrent PUT, total", "s", False,
               "{:,.2f}"),
        Metric("rss_big", f"peak RSS during {big} PUT+GET", "MB", False, "{:,.1f}", peak=True),
        Metric(f"rss_get_{c_max}", f"peak RSS during {human(plan.small)} GET @{c_max} conns", "MB", False,
               "{:,.1f}", peak=True),
        Metric(f"rss_put_{c_max}", f"peak RSS during {human(plan.small)} PUT @{c_max} conns", "MB", False,
               "{:,.1f}", peak=True),
        Metric("rss_conc", f"peak RSS during {plan.c_count} concurrent PUTs", "MB", False, "{:,.1f}", peak=True),
        Metric("rss_max", "peak RSS over the whole run", "MB", False, "{:,.1f}", peak=True),
        Metric("startup_ms", "start to first served request", "ms", False, "{:,.0f}"),
    ]
    return rows


def rotate(items: list, r: int) -> list:
    """Round r's order: A B C, then B C A, then C A B."""
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------- wrk


def run_wrk(url: str, conns: int, duration: int, script: Path, args: list[str]) -> dict:
    """One wrk run; returns the JSON summary printed by the Lua done() hook plus req/s."""
    cmd = ["wrk", "-t", str(min(WRK_THREADS, conns)), "-c", str(conns), "-d", f"{duration}s",
           "--timeout", "10s", "-s", str(script), url]
    if args:
        cmd += ["--", *args]
    return clients.wrk_summary(cmd, duration)


def wrk_problem(summary: dict) -> Optional[str]:
    """Why a wrk sample is not valid (errors, wrapped path list), or None."""
    errs = {k: summary[k] for k in ("connect", "read", "write", "status", "timeout") if summary[k]}
    if summary.get("wrapped"):
        return "the pre-signed path list wrapped around (duplicate PUTs)"
    if summary["requests"] == 0:
        return "no requests completed"
    if sum(errs.values()) > 0.001 * summary["requests"]:
        return f"errors {errs} in {summary['requests']} requests"
    return None


def write_put_lists(base: Path, prefix: str, per_thread: int, size: int) -> None:
    """Pre-sign `per_thread` unique PUT targets for each wrk thread: base.<tid>."""
    mac = hmac.new(SECRET.encode(), digestmod=hashlib.sha256)
    for tid in range(WRK_THREADS):
        lines = []
        for i in range(per_thread):
            path = f"{prefix}/t{tid}/{i}.bin"
            h = mac.copy()
            h.update(f"{path} {size}".encode())
            lines.append(f"/upload/{path}?v={h.hexdigest()}\n")
        Path(f"{base}.{tid}").write_text("".join(lines))


# ----------------------------------------------------------------------------- phases


def phase_startup(run: Run) -> None:
    """Start every server `rounds` times (rotated); the last round's instances stay up."""
    print("== startup", flush=True)
    for r in range(run.plan.rounds):
        for s in rotate(run.servers, r):
            seconds = s.start()
            run.add("startup_ms", s.name, seconds * 1000)
            print(f"  r{r} {s.name:8s} ready in {seconds * 1000:7.1f} ms", flush=True)
        if r < run.plan.rounds - 1:
            for s in run.servers:
                s.stop()


def seed_small_file(run: Run, src: Path) -> str:
    """Upload the file that the small-GET runs fetch; returns its URL path."""
    path = "bench/small/4k.bin"
    for s in run.servers:
        res = clients.put_file(s.port, clients.put_target(SECRET, path, run.plan.small), src, timeout=30)
        got = clients.get_file(s.port, "/upload/" + path, timeout=30)
        if res.status != 201 or got.status != 200 or got.nbytes != run.plan.small:
            raise RuntimeError(f"{s.name}: seeding the small file gave PUT {res.status}, "
                               f"GET {got.status} with {got.nbytes} bytes")
    return "/upload/" + path


def phase_big(run: Run, src: Path) -> None:
    """Big PUT then GET of the same file, per server per round; peak RSS around both."""
    plan = run.plan
    print(f"== {human(plan.big)} PUT/GET", flush=True)
    ceiling_server = clients.CeilingServer(src)
    try:
        view = memoryview(bytearray(clients.RECV_BUF))
        for r in range(max(plan.rounds, plan.big_rounds)):
            got = clients.get_file(ceiling_server.port, "/", view=view)
            run.ceilings.setdefault("get_big", []).append(got.mb_per_s)
            res = clients.put_file(ceiling_server.port, "/", src)
            run.ceilings.setdefault("put_big", []).append(res.mb_per_s)
            for s in rotate(run.servers, r):
                path = f"bench/big/r{r}.bin"
                s.reset_peak()
                put = clients.put_file(s.port, clients.put_target(SECRET, path, plan.big), src)
                get = clients.get_file(s.port, "/upload/" + path, view=view)
                run.add("rss_big", s.name, s.peak_rss_bytes() / MB)
                if put.status == 201:
                    run.add("put_big", s.name, put.mb_per_s)
                else:
                    run.fail(f"{s.name} r{r}: big PUT returned {put.status}")
                if get.status == 200 and get.nbytes == plan.big:
                    run.add("get_big", s.name, get.mb_per_s)
                else:
                    run.fail(f"{s.name} r{r}: big GET returned {get.status} with {get.nbytes} bytes")
                print(f"  r{r} {s.name:8s} PUT {put.mb_per_s:8.1f} MB/s  GET {get.mb_per_s:8.1f} MB/s",
                      flush=True)
                (s.data / path).unlink(missing_ok=True)
    finally:
        ceiling_server.close()


def phase_small_get(run: Run, url_path: str) -> None:
    """wrk GET of one small file at each connection count, interleaved across servers."""
    plan = run.plan
    print(f"== {human(plan.small)} GET (wrk, {plan.duration:g} s per run)", flush=True)
    script = BENCH / "wrk_get.lua"
    for s in run.servers:  # warm-up: threads, caches, first-request paths
        run_wrk(f"http://{clients.HOST}:{s.port}{url_path}", plan.conns[0], plan.warmup, script, [])
    for c in plan.conns:
        for r in range(plan.rounds):
            for s in rotate(run.servers, r):
                s.reset_peak()
                summary = run_wrk(f"http://{clients.HOST}:{s.port}{url_path}", c, plan.duration, script, [])
                record_wrk(run, s, f"get_small_{c}", c, summary, r)


def phase_small_put(run: Run) -> None:
    """wrk PUT of unique pre-signed small files at each connection count."""
    plan = run.plan
    print(f"== {human(plan.small)} PUT (wrk + pre-signed paths, {plan.duration:g} s per run)", flush=True)
    script = BENCH / "wrk_put.lua"
    lists = run.root / "lists"
    lists.mkdir(exist_ok=True)
    nginx = next((s for s in run.servers if isinstance(s, servers.Nginx)), None)
    for c in plan.conns:
        # The generator's own ceiling against nginx's "return 201" sink sizes the path lists:
        # no server can go faster than the generator, so the lists can never wrap.
        probe = lists / f"probe_c{c}"
        write_put_lists(probe, f"probe/c{c}", 1000, plan.small)
        ceiling = 60000.0
        if nginx is not None:
            summary = run_wrk(f"http://{clients.HOST}:{nginx.sink_port}/", c, plan.duration, script,
                              [str(probe), str(plan.small)])
            ceiling = summary["rps"]
            run.ceilings.setdefault(f"put_small_{c}", []).append(ceiling)
            print(f"  generator ceiling @{c}: {ceiling:,.0f} req/s (nginx return-201 sink)", flush=True)
        per_thread = int(ceiling * (plan.duration + 1) * 1.3 / WRK_THREADS) + 1000
        for r in range(plan.rounds):
            base = lists / f"put_c{c}_r{r}"
            write_put_lists(base, f"w/c{c}r{r}", per_thread, plan.small)
            for s in rotate(run.servers, r):
                s.reset_peak()
                summary = run_wrk(f"http://{clients.HOST}:{s.port}/", c, plan.duration, script,
                                  [str(base), str(plan.small)])
                record_wrk(run, s, f"put_small_{c}", c, summary, r)
                shutil.rmtree(s.data / "w", ignore_errors=True)
            for tid in range(WRK_THREADS):
                Path(f"{base}.{tid}").unlink(missing_ok=True)


def record_wrk(run: Run, s: servers.Server, key: str, conns: int, summary: dict, r: int) -> None:
    """Keep a valid wrk sample and the peak RSS; note (and exclude) an invalid one."""
    problem = wrk_problem(summary)
    if problem:
        run.fail(f"{s.name} {key} r{r}: {problem}")
    else:
        run.add(key, s.name, summary["rps"])
    if conns == run.plan.conns[-1]:
        run.add(f"rss_{key.split('_', 1)[0]}_{conns}", s.name, s.peak_rss_bytes() / MB)
    print(f"  r{r} {s.name:8s} @{conns:<4d} {summary['rps']:10,.0f} req/s  p99 {summary['p99_us'] / 1000:7.1f} ms",
          flush=True)


def phase_concurrent(run: Run, src: Path) -> None:
    """c_count uploads of c_size bytes started at the same instant; wall time to the last 201."""
    plan = run.plan
    print(f"== {plan.c_count} x {human(plan.c_size)} concurrent PUT", flush=True)
    total = plan.c_count * plan.c_size
    for r in range(plan.rounds):
        for s in rotate(run.servers, r):
            targets = [clients.put_target(SECRET, f"conc/r{r}/{i}.bin", plan.c_size) for i in range(plan.c_count)]
            s.reset_peak()
            seconds, statuses = clients.concurrent_puts(s.port, targets, src, timeout=120)
            run.add("rss_conc", s.name, s.peak_rss_bytes() / MB)
            bad = [st for st in statuses if st != 201]
            if bad:
                run.fail(f"{s.name} r{r}: {len(bad)} of {plan.c_count} concurrent PUTs failed "
                         f"(statuses {sorted(set(bad))})")
            else:
                run.add("conc_s", s.name, seconds)
                run.add("conc_mbps", s.name, total / seconds / MB)
            print(f"  r{r} {s.name:8s} {seconds:6.2f} s  {total / seconds / MB:8.1f} MB/s", flush=True)
            shutil.rmtree(s.data / "conc", ignore_errors=True)


def phase_memcheck(run: Run, hmacfs: servers.Hmacfs, src_small: Path, src_big: Path) -> None:
    """A fresh hmacfs per upload: peak RSS after a small PUT vs after a very large one."""
    plan = run.plan
    print("== memory check: small vs large upload on a fresh hmacfs each", flush=True)
    st = os.statvfs(run.mem_root)
    room = st.f_bavail * st.f_frsize - (2 << 30)
    large_repeat = max(1, min(plan.mem_repeat, room // src_big.stat().st_size))
    if large_repeat < plan.mem_repeat:
        run.note(f"memory check: only room for {human(large_repeat * src_big.stat().st_size)} in {run.mem_root}")
    for label, src, repeat in (("small", src_small, 1), ("large", src_big, large_repeat)):
        size = src.stat().st_size * repeat
        hmacfs.start()
        try:
            before = hmacfs.peak_rss_bytes()
            hmacfs.reset_peak()
            res = clients.put_file(hmacfs.port, clients.put_target(SECRET, f"mem/{label}.bin", size), src,
                                   repeat=repeat, timeout=600)
            peak = hmacfs.peak_rss_bytes()
            if res.status != 201:
                run.fail(f"memory check {label}: PUT of {human(size)} returned {res.status}")
            run.memcheck.append((label, size, peak, res.mb_per_s))
            print(f"  {human(size):>8s}: RSS before {before / MB:.1f} MB, peak {peak / MB:.1f} MB, "
                  f"{res.mb_per_s:.0f} MB/s", flush=True)
        finally:
            hmacfs.stop()
            shutil.rmtree(hmacfs.data / "mem", ignore_errors=True)


# ----------------------------------------------------------------------------- report


def _cmd(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, cwd=REPO, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout + out.stderr).strip() or "?"


def machine_info(python: str) -> dict[str, str]:
    """What a reader needs to compare this run with another."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / (1 << 20):.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    commit = _cmd(["git", "rev-parse", "HEAD"])
    if not all(ch in "0123456789abcdef" for ch in commit) or len(commit) != 40:
        commit = "none (no commit yet)"
    dirty = _cmd(["git", "status", "--porcelain", "--untracked-files=no", "--", "hmacfs", "build_zipapp.py"])
    if commit != "none (no commit yet)" and dirty not in ("?", ""):
        commit += " + uncommitted changes in hmacfs/ or build_zipapp.py (the zipapp is built from the work tree)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "cpu": f"{cpu}, {os.cpu_count()} cores, {mem} RAM",
        "kernel": platform.release(),
        "python": _cmd([python, "-c", "import sys; print(sys.version.split()[0])"]),
        "nginx": _cmd(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": _cmd(["wrk", "-v"]).splitlines()[0].split(" [")[0],
    }


def fmt(metric: Metric, value: Optional[float]) -> str:
    return "n/a" if value is None else metric.fmt.format(value)


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


TARGETS: dict[str, tuple[str, float, str]] = {
    # key: (against, threshold, how) -- ratio >= threshold, or absolute MB below threshold
    "get_big": ("nginx", 1.0, "ratio"),
    "put_big": ("nginx", 0.9, "ratio"),
    "get_small_64": ("baseline", 1.5, "ratio"),
    "rss_big": ("", 40.0, "below"),
    "rss_get_256": ("", 40.0, "below"),
    "rss_put_256": ("", 40.0, "below"),
}


def target_cell(key: str, med: dict[str, Optional[float]]) -> str:
    """'>= 0.9x nginx: PASS' style verdict for the issue's targets."""
    if key not in TARGETS:
        return ""
    against, threshold, how = TARGETS[key]
    mine = med.get("hmacfs")
    if how == "below":
        verdict = "n/a" if mine is None else ("PASS" if mine < threshold else "MISS")
        return f"< {threshold:g} MB: {verdict}"
    other = med.get(against)
    verdict = "n/a" if mine is None or not other else ("PASS" if mine / other >= threshold else "MISS")
    return f">= {threshold:g}x {against}: {verdict}"


def table(run: Run) -> str:
    """The medians table (markdown) with ratios and target verdicts."""
    names = ["hmacfs", "nginx", "baseline"]
    lines = ["| metric | unit | hmacfs | nginx | baseline | hmacfs/nginx | hmacfs/baseline | target |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for m in metrics(run.plan):
        per = run.samples.get(m.key, {})
        med = {n: (max(per[n]) if m.peak and per.get(n) else median(per.get(n, []))) for n in names}
        better = "higher is better" if m.higher_is_better else "lower is better"
        lines.append(f"| {m.label} | {m.unit} ({better}) | " + " | ".join(fmt(m, med[n]) for n in names)
                     + f" | {ratio(med['hmacfs'], med['nginx'])} | {ratio(med['hmacfs'], med['baseline'])}"
                     + f" | {target_cell(m.key, med)} |")
    return "\n".join(lines)


def finish_rss_max(run: Run) -> None:
    """The whole-run peak of each server: the largest per-phase peak."""
    for s in run.servers:
        peaks = [v for key, per in run.samples.items() if key.startswith("rss_") and key != "rss_max"
                 for v in per.get(s.name, [])]
        if peaks:
            run.samples.setdefault("rss_max", {})[s.name] = [max(peaks)]


def report(run: Run, info: dict[str, str], wall: float) -> str:
    """The full results.md text."""
    plan = run.plan
    out = ["# hmacfs benchmark results", "",
           f"Written by `python3 bench/run.py{' --quick' if plan.mode == 'quick' else ''}`; "
           "see `bench/README.md` and `docs/performance.md`.", ""]
    out += [f"- date: {info['date']}", f"- commit: {info['commit']}", f"- machine: {info['cpu']}",
            f"- kernel: {info['kernel']}", f"- Python: {info['python']}", f"- nginx: {info['nginx']}",
            f"- wrk: {info['wrk']} ({WRK_THREADS} threads)",
            f"- mode: {plan.mode}, {plan.rounds} round(s) ({max(plan.rounds, plan.big_rounds)} for the "
            f"{human(plan.big)} transfers), servers interleaved and rotated each round; "
            f"wall time {wall:.0f} s",
            f"- storage: temp dir under {run.root.parent} ({_fs_of(run.root)}); sources, data dirs and "
            "nginx's client_body_temp_path all there", "",
            "## Medians", "", table(run), "",
            "Medians over the rounds, except peak RSS rows: the maximum over the rounds. MB = 10^6 bytes. "
            "Peak RSS is VmHWM from /proc, summed over the process tree (nginx: master + workers), reset "
            "with /proc/PID/clear_refs at the start of each measurement.", ""]
    out += ["## Large upload uses the same memory as a small one (hmacfs)", ""]
    if run.memcheck:
        out += ["| upload | bytes | hmacfs peak RSS (MB) | PUT MB/s |", "| --- | ---: | ---: | ---: |"]
        out += [f"| {human(size)} | {size:,} | {peak / MB:.1f} | {mbps:,.0f} |"
                for _label, size, peak, mbps in run.memcheck]
        out += ["", f"Each upload on a freshly started hmacfs (storage in {run.mem_root.parent}, "
                f"{_fs_of(run.mem_root)}); the large body is the {human(plan.big)} source file sent "
                f"{run.memcheck[-1][1] // plan.big} times back to back by sendfile as one request.", ""]
    else:
        out += ["not run (hmacfs not among the servers)", ""]
    out += ["## Client ceilings (the load generators are not the bottleneck)", "",
            "| client | ceiling (median) |", "| --- | ---: |"]
    names = {"put_big": f"{human(plan.big)} PUT, sendfile client -> separate process splicing to /dev/null",
             "get_big": f"{human(plan.big)} GET, {clients.GET_CLIENT} client <- separate sendfile process"}
    for key, values in run.ceilings.items():
        if key.startswith("put_small_"):
            label = f"{human(plan.small)} PUT @{key.rsplit('_', 1)[1]}, wrk + Lua path list -> nginx sink"
            unit = "req/s"
        else:
            label, unit = names[key], "MB/s"
        out.append(f"| {label} | {statistics.median(values):,.0f} {unit} |")
    out += ["", "## Raw samples", "", "| metric | server | samples (in order of rounds) |", "| --- | --- | --- |"]
    for m in metrics(plan):
        for name, values in run.samples.get(m.key, {}).items():
            out.append(f"| {m.label} | {name} | " + ", ".join(m.fmt.format(v) for v in values) + " |")
    out += ["", "## Notes", ""]
    out += [f"- {n}" for n in run.notes] or ["- no errors; every sample valid"]
    return "\n".join(out) + "\n"


def _fs_of(path: Path) -> str:
    """'ext4 on /dev/vda' for the filesystem holding `path` (from /proc/mounts)."""
    best = ("", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if str(path).startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"{best[1]} on {best[2]}"


# ----------------------------------------------------------------------------- main


def build_zipapp(python: str) -> Path:
    """python3 build_zipapp.py -> dist/hmacfs.pyz, and check that it starts (-version)."""
    subprocess.run([python, "build_zipapp.py"], cwd=REPO, check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    pyz = REPO / "dist" / "hmacfs.pyz"
    subprocess.run([python, str(pyz), "-version"], check=True, timeout=60, stdout=subprocess.DEVNULL)
    return pyz


def default_tmpdir(need: int) -> Optional[Path]:
    """/dev/shm when it has `need` bytes free, else None (the system temp dir).

    On this class of VM, ext4 metadata costs cap small-file PUTs at ~1,500/s for every server
    (nginx does ~28,000/s on tmpfs), which would hide the differences between the servers.
    """
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    return shm if st.f_bavail * st.f_frsize >= need else None


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="hmacfs vs nginx vs stdlib baseline (see bench/README.md)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 round, < 1 minute")
    ap.add_argument("--rounds", type=int, help="override the number of interleaved rounds")
    ap.add_argument("--duration", type=int, help="override seconds per wrk run")
    ap.add_argument("--servers", default="hmacfs,nginx,baseline",
                    help="comma-separated subset of hmacfs,nginx,baseline")
    ap.add_argument("--pyz", type=Path, help="use this zipapp instead of building dist/hmacfs.pyz")
    ap.add_argument("--python", default=sys.executable, help="interpreter for hmacfs and the baseline")
    ap.add_argument("--tmpdir", type=Path,
                    help="where the servers' data and the sources go (default: /dev/shm when it has room, "
                    "so results measure the servers rather than this machine's disk)")
    ap.add_argument("--mem-tmpdir", type=Path,
                    help="where the memory check's large upload goes (default: the system temp dir, on disk)")
    ap.add_argument("--out", type=Path, default=BENCH / "results.md", help="results file to write")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip (for debugging): big,get,put,conc,mem")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; exit 0 when every sample was valid, 1 when some failed, 2 on abort."""
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds or args.duration:
        plan = Plan(**{**plan.__dict__, "rounds": args.rounds or plan.rounds,
                       "big_rounds": args.rounds or plan.big_rounds, "duration": args.duration or plan.duration})
    wanted = [n.strip() for n in args.servers.split(",") if n.strip()]
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    for tool in (["nginx"] if "nginx" in wanted else []) + ["wrk"]:
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found on PATH (apt-get install {tool})", file=sys.stderr)
            return 2

    handle_signals(plan.budget)
    started = time.perf_counter()
    signal.alarm(int(plan.budget))
    tmpdir = args.tmpdir or default_tmpdir(3 * plan.big + (1 << 30))
    info = machine_info(args.python)  # before the build: the commit that is measured
    root = Path(tempfile.mkdtemp(prefix="hmacfs-bench-", dir=tmpdir))
    mem_root = Path(tempfile.mkdtemp(prefix="hmacfs-bench-mem-", dir=args.mem_tmpdir))
    run = Run(plan, [], root, mem_root)
    memcheck: Optional[servers.Hmacfs] = None
    try:
        makers = {
            "hmacfs": lambda: servers.Hmacfs(root / "hmacfs", (args.pyz or build_zipapp(args.python)).resolve(), SECRET,
                                             args.python),
            "nginx": lambda: servers.Nginx(root / "nginx"),
            "baseline": lambda: servers.Baseline(root / "baseline", args.python),
        }
        for name in wanted:
            if name not in makers:
                raise SystemExit(f"bench: unknown server {name!r}")
            run.servers.append(makers[name]())
        print(f"bench: {plan.mode} mode, servers {', '.join(wanted)}, temp dir {root}", flush=True)
        src_big = clients.make_source(root / "big.bin", plan.big)
        src_small = clients.make_source(root / "small.bin", plan.small)
        src_conc = clients.make_source(root / "conc.bin", plan.c_size)
        src_mem = clients.make_source(root / "mem.bin", plan.mem_small)

        phase_startup(run)
        small_url = seed_small_file(run, src_small)
        if "big" not in skip:
            phase_big(run, src_big)
        if "get" not in skip:
            phase_small_get(run, small_url)
        if "put" not in skip:
            phase_small_put(run)
        if "conc" not in skip:
            phase_concurrent(run, src_conc)
        for s in run.servers:
            s.stop()
        hmacfs = next((s for s in run.servers if isinstance(s, servers.Hmacfs)), None)
        if hmacfs is not None and "mem" not in skip:
            memcheck = servers.Hmacfs(mem_root / "hmacfs", hmacfs.pyz, SECRET, args.python)
            phase_memcheck(run, memcheck, src_mem, src_big)
        signal.alarm(0)
    except (BudgetExceeded, KeyboardInterrupt, SystemExit, Exception) as exc:
        return aborted(exc, *run.servers)
    finally:
        stop_all(*run.servers, memcheck)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(mem_root, ignore_errors=True)
    wall = time.perf_counter() - started
    finish_rss_max(run)
    text = report(run, info, wall)
    memory = "; ".join(f"{human(size)} upload peak RSS {peak / MB:.1f} MB" for _l, size, peak, _m in run.memcheck)
    return write_results(args.out, text, table(run), wall, run.failures,
                         summary=f"memory check: {memory}" if run.memcheck else "")


if __name__ == "__main__":
    sys.exit(main())
