#!/usr/bin/env python3
"""What virus scanning with clamd costs an upload, and whether it overlaps the transfer, in one run.

    python3 bench/scanning.py            # full: 200 MiB PUTs, 7 rounds, ~1 min on 2 cores
    python3 bench/scanning.py --quick    # 16 MiB, 1 round, ~5-10 s (tests/test_bench_scanning_smoke.py)

Why: with [clamav] on, hmacfs sends every chunk of an upload to clamd (zINSTREAM) while it
arrives, so that the verdict comes right after the last byte instead of after a second read
of the file. The issue asks for a 200 MB upload with scanning vs without, in one run, as a
ratio, with the time from the last body byte to the 201: if scanning followed the transfer,
that time would grow by the whole stream to clamd plus clamd's scan; overlapped, it grows only
by what clamd must do once it has the last byte (it scans the spooled stream then).

Strategy: one clamd, started exactly as the tests start it (tests/support/clamd.py: temp dir,
one-line signature databases, StreamMaxLength/MaxFileSize/MaxScanSize 250M so a 200 MiB
stream is really scanned, not waved through as too big), and two hmacfs from the same zipapp
side by side: "unscanned" (bench/resumable.py's server config) and "scanned" (the same plus
[clamav] at clamd's Unix socket, maxscansize 250MB). The database also holds a body signature
for the EICAR string anywhere in a file (ClamdProcess(embedded=True)), so the sanity check
can hide EICAR after the last byte of the 200 MiB file and prove that all of it reaches
clamd and is scanned, and so that clamd does per-byte matching work, not only a hash.
Every round PUTs the same random file to both servers, order alternating, RAM warmed before
each (storage.warm_memory), with bench/resumable.py's raw-socket client: it splits each PUT
into sending (until sendfile returned) and waiting (last body byte handed to the kernel -> the
201). Then clamd alone scans the same file from this process (INSTREAM, no hmacfs): its total
time is what a scan after the transfer would add at least, its time from the end of the
stream to the verdict is the part no overlap can hide. Each upload is checked: 201, the
stored file's size and sha256, the scan counted as clean in hmacfs_virus_scans_total.
Data and clamd's temp files live on /dev/shm when it has room; every process and temp file
goes at the end, also on failure or timeout.
"""
from __future__ import annotations

import argparse
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/support/clamd.py: clamd as the tests start it

import resumable
import storage
from lifecycle import BudgetExceeded, aborted, bench_parser, chosen_plan, handle_signals, stop_all, write_results
from storage import (
    checks_and_notes,
    choose_tmpdir,
    fs_of,
    human,
    loadavg,
    machine_info,
    make_random,
    note_disk,
    rotate,
    samples_section,
    warm_memory,
    warm_section,
    zipapp,
)

from tests.support.clamd import EICAR, EMBEDDED_SIGNATURE, ClamdProcess, clamd_program, command, instream

BENCH = Path(__file__).resolve().parent
MB = 1e6
PLAIN, SCANNED = "unscanned", "scanned"
CLAMD_MAX = "250M"  # StreamMaxLength, MaxFileSize, MaxScanSize
SCANS = re.compile(rb'^hmacfs_virus_scans_total\{result="(\w+)"\} (\S+)$', re.M)


@dataclass(frozen=True)
class Plan:
    """Sizes, rounds and time limit of one run."""

    mode: str
    rounds: int
    big: int  # bytes of every upload
    budget: float  # hard wall-clock limit, seconds
    warm: bool = True  # touch and free RAM before every timed PUT (see storage.warm_memory)

    @property
    def warm_bytes(self) -> int:
        """A quarter more than the file a timed PUT writes, plus slack for buffers."""
        return self.big + self.big // 4 + (64 << 20)


FULL = Plan("full", rounds=7, big=200 << 20, budget=600.0)
QUICK = Plan("quick", rounds=1, big=16 << 20, budget=120.0)


@dataclass(frozen=True)
class Row:
    """One line of the figures table: series `measured` against `against` in sample set `key`
    (the fields resumable.ratio_of reads); `target` (">=" | "<", threshold) or None."""

    key: str
    label: str
    unit: str
    measured: str
    against: str
    target: Optional[tuple[str, float]]
    fmt: str
    ratio_digits: int = 2


def rows(plan: Plan) -> list[Row]:
    big = human(plan.big)
    return [
        Row("put", f"{big} PUT: scanned vs unscanned", "MB/s", SCANNED, PLAIN, None, "{:,.0f}"),
        Row("wait", f"{big} PUT, last body byte sent to the 201: scanned vs unscanned", "ms", SCANNED, PLAIN,
            None, "{:,.1f}"),
        Row("overlap", f"{big} PUT, share of the stream to clamd that did not overlap the transfer: "
            "(extra wait with scanning - clamd's own end-of-stream-to-verdict time) / clamd's time to take the "
            "stream", "ms", "not overlapped", "stream", ("<", 0.5), "{:,.1f}"),
    ]


class ScanningHmacfs(resumable.ResumableHmacfs):
    """bench/resumable.py's hmacfs (zipapp; server CPU and the metrics port from /proc and its
    config) under its own name, with extra TOML tables. Its [uploads] chunksize change is of no
    consequence to a PUT."""

    def __init__(self, name: str, workdir: Path, pyz: Path, python: str, extra_toml: str = "") -> None:
        super().__init__(workdir, pyz, python)
        self.name = name
        self.extra_toml = extra_toml

    def scans(self) -> dict[str, float]:
        """hmacfs_virus_scans_total by result (empty when nothing was counted yet)."""
        port = self.metrics_port
        if port is None:
            raise resumable.Refused("no metricsport in the config")
        conn = resumable.Connection(port, timeout=30)
        try:
            resp = conn.request("GET", "/metrics", {"Connection": "close"})[0]
        finally:
            conn.close()
        resumable.expect(resp, 200, "GET /metrics")
        return {m.group(1).decode(): float(m.group(2)) for m in SCANS.finditer(resp.body)}


def clamav_toml(clamd: ClamdProcess) -> str:
    return ("[clamav]\nclamavenabled = true\n"
            f'clamavsocket = "{clamd.socket_path}"\nmaxscansize = "250MB"\n')


def cpu_seconds(proc_owner: object) -> float:
    """User + system CPU so far of the process behind an object with a `.proc` (hmacfs or clamd)."""
    return resumable.ResumableHmacfs.cpu_seconds(proc_owner)  # type: ignore[arg-type]  # reads only .proc


# ----------------------------------------------------------------------------- measurements


def blocks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(size):
            yield block


def put_with_tail(srv: ScanningHmacfs, path: str, src: Path, tail: bytes) -> resumable.Response:
    """PUT `src` followed by `tail` as one body (no copy of the big file), for the sanity check."""
    size = src.stat().st_size + len(tail)
    conn = resumable.Connection(srv.port)
    try:
        conn.send_head("PUT", storage.target(path, size), {"Content-Length": str(size),
                                                           "Content-Type": "application/octet-stream"})
        with open(src, "rb") as f:
            conn.send_body(f, 0, src.stat().st_size)
        conn.sock.sendall(tail)
        return conn.read_response("PUT")
    finally:
        conn.close()


def sanity_check(run: storage.Run, plain: ScanningHmacfs, scanned: ScanningHmacfs, clamd: ClamdProcess,
                 src: Path) -> str:
    """Untimed, before the rounds; returns clamd's version. The scanned server refuses EICAR (422
    naming the signature) and the run's own file with EICAR after its last byte (so clamd gets and
    scans every byte of a file this big: no size limit waves it through), the unscanned one stores
    it; both store the plain file; the scans are counted. A server that does not really scan must
    not pass for a fast one."""
    version = command(clamd.socket_path, b"VERSION").decode()
    eicar = run.root / "eicar.com"
    eicar.write_bytes(EICAR)
    r = put_with_tail(scanned, "check/eicar.com", eicar, b"")
    if r.status != 422 or b"Eicar-" not in r.body:
        raise RuntimeError(f"sanity check: EICAR to the scanned server got {r.status} {r.body[:200]!r}")
    r = put_with_tail(scanned, "check/hidden.bin", src, EICAR)
    if r.status != 422 or EMBEDDED_SIGNATURE.encode() not in r.body:
        raise RuntimeError(f"sanity check: {human(run.plan.big)} + EICAR at its end to the scanned server got "
                           f"{r.status} {r.body[:200]!r} instead of 422 naming {EMBEDDED_SIGNATURE}")
    r = put_with_tail(plain, "check/hidden.bin", src, EICAR)
    if r.status != 201:
        raise RuntimeError(f"sanity check: the unscanned server answered {r.status} {r.body[:200]!r}")
    resumable.remove(run, plain, "check/hidden.bin")  # type: ignore[arg-type]
    if scanned.scans() != {"infected": 2.0}:
        raise RuntimeError(f"sanity check: the scanned server counted {scanned.scans()} instead of 2 infected")
    if plain.scans():
        raise RuntimeError(f"sanity check: the unscanned server counted scans: {plain.scans()}")
    reply, _ = instream(clamd.socket_path, blocks(src))
    if reply != "stream: OK":
        raise RuntimeError(f"sanity check: clamd alone on the source file answered {reply!r}")
    eicar.unlink()
    run.checks += [
        f"clamd {version}, StreamMaxLength/MaxFileSize/MaxScanSize {CLAMD_MAX}; database: the EICAR file's MD5 "
        "(.hdb) and the EICAR string anywhere in a file (.ndb)",
        "the scanned server refuses EICAR with 422 naming the signature, and the run's "
        f"{human(run.plan.big)} random file with EICAR after its last byte with 422 naming "
        f"{EMBEDDED_SIGNATURE} (all of it reached clamd and was scanned); the unscanned server stores "
        "that file (201) and counts no scan",
        "every round: each PUT answers 201 and the stored file has the source's size and sha256 on disk "
        "(on the last round also through a GET); every scanned PUT adds one `clean` to "
        "hmacfs_virus_scans_total; clamd alone answers `stream: OK`",
        "after the rounds: nothing left in clamd's TemporaryDirectory",
    ]
    return version


def timed_put(run: storage.Run, r: int, srv: ScanningHmacfs, clamd: ClamdProcess, src: Path, want: str) -> None:
    """One timed PUT (RAM warmed first), checked and recorded under the server's name."""
    plan, last = run.plan, r == run.plan.rounds - 1
    path = f"{srv.name}/r{r}.bin"
    if plan.warm:
        run.add("warm_s", srv.name, warm_memory(plan.warm_bytes))
    before = srv.scans() if srv.name == SCANNED else {}
    cpu0, clamd0 = cpu_seconds(srv), cpu_seconds(clamd)
    try:
        res = resumable.put_upload(srv.port, path, src, plan.big)
    except (resumable.Refused, OSError) as e:
        run.fail(f"r{r} {srv.name} PUT: {e}")
        return
    cpu, clamd_cpu = cpu_seconds(srv) - cpu0, cpu_seconds(clamd) - clamd0
    problem = resumable.verify_stored(srv, path, plan.big, want, via_get=last)
    if srv.name == SCANNED:
        after = srv.scans()
        moved = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        if moved != {"clean": 1}:
            problem = problem or f"the scan was not counted as one clean: {before} -> {after}"
    if problem:
        run.fail(f"r{r} {srv.name}: {problem}")
    else:
        run.add("put", srv.name, plan.big / res.seconds / MB)
        run.add("wait", srv.name, res.waits[0] * 1000)
        for name, value in (("wall s", res.seconds), ("send s", res.sends[0]), ("hmacfs cpu s", cpu),
                            ("clamd cpu s", clamd_cpu)):
            run.add("parts", f"{srv.name} {name}", value)
        warm = f" (RAM warm-up {run.get('warm_s', srv.name)[-1]:.1f} s)" if plan.warm else ""
        print(f"  r{r} {srv.name:9s} {plan.big / res.seconds / MB:7,.0f} MB/s, {res.seconds:5.2f} s, send "
              f"{res.sends[0]:.2f} s, last byte -> 201 {res.waits[0] * 1000:7.1f} ms, hmacfs CPU {cpu:.2f} s, "
              f"clamd CPU {clamd_cpu:.2f} s{warm}", flush=True)
    resumable.remove(run, srv, path)  # type: ignore[arg-type]


def clamd_alone(run: storage.Run, r: int, clamd: ClamdProcess, src: Path) -> None:
    """clamd scanning the same file straight from this process: what a scan after the transfer costs."""
    cpu0 = cpu_seconds(clamd)
    t0 = time.perf_counter()
    reply, after_end = instream(clamd.socket_path, blocks(src))
    total = time.perf_counter() - t0
    if reply != "stream: OK":
        run.fail(f"r{r} clamd alone answered {reply!r}")
        return
    run.add("parts", "clamd alone s", total)
    run.add("parts", "clamd alone after end ms", after_end * 1000)
    run.add("parts", "clamd alone cpu s", cpu_seconds(clamd) - cpu0)
    print(f"  r{r} clamd alone: {total:.2f} s, end of stream -> verdict {after_end * 1000:.1f} ms", flush=True)


def phase_round(run: storage.Run, r: int, plain: ScanningHmacfs, scanned: ScanningHmacfs, clamd: ClamdProcess,
                src: Path, want: str) -> None:
    """Both servers (order alternating by round), then clamd alone; pairs the round's overlap figure."""
    for srv in rotate([plain, scanned], r):
        timed_put(run, r, srv, clamd, src, want)
    clamd_alone(run, r, clamd, src)
    scanned_waits, plain_waits = run.get("wait", SCANNED), run.get("wait", PLAIN)
    totals, after_end = run.get("parts", "clamd alone s"), run.get("parts", "clamd alone after end ms")
    if len(scanned_waits) == len(plain_waits) == len(totals) == r + 1:
        extra = scanned_waits[-1] - plain_waits[-1]
        run.add("overlap", "not overlapped", extra - after_end[-1])
        run.add("overlap", "stream", totals[-1] * 1000 - after_end[-1])


def spool_left(clamd: ClamdProcess, within: float = 3.0) -> list[str]:
    """What is still in clamd's TemporaryDirectory after `within` seconds (clamd answers a scan
    before it removes the stream's spool file, so an immediate look can find the last one)."""
    deadline = time.monotonic() + within
    while True:
        left = sorted(p.name for p in (clamd.workdir / "scantmp").iterdir())
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


# ----------------------------------------------------------------------------- report


def verdict(row: Row, ratio: Optional[float]) -> str:
    return "-" if row.target is None else resumable.verdict(row, ratio)  # type: ignore[arg-type]


def table(run: storage.Run) -> str:
    lines = ["| metric | unit | measured | against | ratio | per-round ratios | target |",
             "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for row in rows(run.plan):
        m, a, ratio, per = resumable.ratio_of(row, run)  # type: ignore[arg-type]
        d = row.ratio_digits
        lines.append(f"| {row.label} | {row.unit} | {row.measured} {'n/a' if m is None else row.fmt.format(m)} | "
                     f"{row.against} {'n/a' if a is None else row.fmt.format(a)} | "
                     f"{'n/a' if ratio is None else f'{ratio:.{d}f}x'} | "
                     f"{' '.join(f'{x:.{d}f}' for x in per) or 'n/a'} | {verdict(row, ratio)} |")
    return "\n".join(lines)


def _median(run: storage.Run, name: str, fmt: str) -> str:
    values = run.get("parts", name)
    return fmt.format(statistics.median(values)) if values else "n/a"


def time_table(run: storage.Run) -> list[str]:
    """Where the time of each PUT goes, and clamd alone on the same file (medians over rounds)."""
    out = [f"| | {SCANNED} | {PLAIN} | clamd alone |", "| --- | ---: | ---: | ---: |"]
    for label, name, alone, fmt in (
            ("wall time, connect to the 201 / to the verdict (s)", "wall s", "clamd alone s", "{:.2f}"),
            ("sending: request head + sendfile until it returned (s)", "send s", "", "{:.2f}"),
            ("hmacfs CPU, user + system (s)", "hmacfs cpu s", "", "{:.2f}"),
            ("clamd CPU, user + system (s)", "clamd cpu s", "clamd alone cpu s", "{:.2f}")):
        out.append(f"| {label} | {_median(run, f'{SCANNED} {name}', fmt)} | {_median(run, f'{PLAIN} {name}', fmt)} | "
                   f"{_median(run, alone, fmt) if alone else '-'} |")
    wait = {k: run.get("wait", k) for k in (SCANNED, PLAIN)}
    out.append(f"| waiting: last body byte sent to the 201 / end of stream to the verdict (ms) | "
               f"{statistics.median(wait[SCANNED]) if wait[SCANNED] else float('nan'):.1f} | "
               f"{statistics.median(wait[PLAIN]) if wait[PLAIN] else float('nan'):.1f} | "
               f"{_median(run, 'clamd alone after end ms', '{:.1f}')} |")
    return out


def report(run: storage.Run, info: dict[str, str], wall: float, loads: tuple[str, str], fs: str,
           context: str) -> str:
    plan = run.plan
    busy = max(float(x.split()[0]) if x != "?" else 0.0 for x in loads) >= 0.5
    out = ["# hmacfs virus-scanning benchmark results", "",
           f"Written by `python3 bench/scanning.py{' --quick' if plan.mode == 'quick' else ''}`; "
           "see `bench/README.md` (\"Virus scanning\").", "",
           f"- date: {info['date']}", f"- commit: {info['commit']}",
           f"- zipapp: {info.get('pyz', '?')}",
           f"- machine: {info['cpu']}",
           f"- kernel: {info['kernel']}", f"- Python: {info['python']}",
           f"- clamd: {info.get('clamd', '?')} ({info.get('clamd_path', '?')}), started by tests/support/clamd.py: "
           f"StreamMaxLength/MaxFileSize/MaxScanSize {CLAMD_MAX}, a one-line .hdb and a one-line .ndb "
           "(EICAR), TemporaryDirectory in the run's temp dir",
           f"- load average (1/5/15 min) at start: {loads[0]}; at end: {loads[1]}",
           "- other processes: " + ("were running (load average >= 0.5): figures are from a shared machine"
                                    if busy else "none significant (load average < 0.5)")
           + (f"; {context}" if context else ""),
           f"- mode: {plan.mode}, {plan.rounds} round(s) of {human(plan.big)}, server order alternating by round; "
           f"wall time {wall:.0f} s",
           f"- storage: {fs}; source file, both data dirs and clamd's temp files there",
           f"- servers: `{PLAIN}` = bench/resumable.py's hmacfs config; `{SCANNED}` = the same + `[clamav] "
           "clamavenabled = true`, `clamavsocket` = clamd's Unix socket, `maxscansize = \"250MB\"` "
           "(numscanworkers, failopen: defaults); both from the same zipapp, side by side",
           "- RAM warmed before every timed PUT: "
           + (f"yes, {human(plan.warm_bytes)} faulted in and freed just before (storage.warm_memory)"
              if plan.warm else "no (--no-warm)"), "",
           "## Figures", "", table(run), "",
           "MB/s = 10^6 bytes / s from connect to the 201 (bench/resumable.py's raw-socket client, sendfile "
           "body). \"Last body byte sent to the 201\": from sendfile returning (the last byte is in the "
           "client's socket buffer) to the response head; it also holds the server reading what the kernel "
           "still buffered. Overlap: clamd spools a zINSTREAM stream to a temp file and scans it when the stream "
           "ends, so its work after the end of the stream can never overlap a transfer, while taking the stream "
           "can. \"clamd alone\": this process streams the same file to the same clamd (1 MiB frames); \"stream\" "
           "= its connect to end of stream, the time a scan that followed the transfer would add on top. \"Not "
           "overlapped\" = the scanned PUT's extra wait (scanned - unscanned, same round) minus clamd alone's "
           "end-of-stream-to-verdict time: about 0 when hmacfs streams to clamd while the body arrives, about "
           "\"stream\" (ratio 1) when it would send the file after the transfer. Target < 0.5x; it can be "
           "slightly negative (two separate measurements). Medians over the rounds; per-round ratios pair the "
           "samples of one round.", "",
           "## Where the time goes (medians)", "", *time_table(run), "",
           "clamd alone's last row is the part of clamd's work no overlap can hide: the scanned PUT's "
           "extra wait should be about that. hmacfs hands each received chunk to a sender thread that "
           "streams it to clamd (at most four chunks queued), so receiving and streaming run side by side; "
           "on loopback, where this client sends faster than clamd takes a stream, the scanned PUT's "
           "\"sending\" still grows toward clamd alone's time to take the stream (compare the \"sending\" "
           "row with the Figures' \"stream\"), as the queue fills; a client slower than clamd would not see "
           "it.", ""]
    out += warm_section(run, "## RAM warm-up before the timed PUTs",
                        "Seconds per GiB to fault in and free the warm-up memory, per series, in order of rounds "
                        "(~1 s/GiB: warm RAM; 1.5-3.5 s/GiB: this VM's RAM had gone cold).")
    out += samples_section(run.samples)
    out += checks_and_notes(run)
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    return bench_parser("hmacfs: PUT with clamd scanning vs without (see bench/README.md)",
                        "16 MiB, 1 round, ~5-10 s", BENCH / "scanning-results.md", what="PUT").parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; exit 0 when every sample was valid, 1 when some failed, 2 on abort."""
    args = parse_args(argv)
    plan = chosen_plan(args, QUICK, FULL)
    program = clamd_program()
    if program is None:
        print("bench: clamd not found (Debian: apt-get install clamav-daemon)", file=sys.stderr)
        return 2
    handle_signals(plan.budget)
    started = time.perf_counter()
    load_start = loadavg()
    info = machine_info(args.python)
    # source + one stored file per server (+ a GET's) + clamd's spool of one stream + warm-up
    need = 5 * plan.big + plan.warm_bytes + (512 << 20)
    tmpdir = choose_tmpdir(args.tmpdir, need)
    signal.alarm(int(plan.budget))
    root = Path(tempfile.mkdtemp(prefix="hmacfs-bench-scanning-", dir=tmpdir))
    run = storage.Run(plan, root)  # type: ignore[arg-type]  # this benchmark's plan (same duck type)
    note_disk(run, tmpdir, root)
    clamd = ClamdProcess(root / "clamd", max_length=CLAMD_MAX, program=program, embedded=True)
    made: list[ScanningHmacfs] = []
    try:
        pyz, info["pyz"] = zipapp(args.pyz, args.python, root)
        clamd.start()
        info["clamd_path"] = program
        plain = ScanningHmacfs(PLAIN, root / "plain", pyz, args.python)
        scanned = ScanningHmacfs(SCANNED, root / "scanned", pyz, args.python, clamav_toml(clamd))
        made += [plain, scanned]
        print(f"bench: {plan.mode} mode, {plan.rounds} round(s) of {human(plan.big)}, temp dir {root}, "
              f"load {load_start}", flush=True)
        for s in made:
            print(f"  {s.name} ready in {s.start() * 1000:.0f} ms", flush=True)
        src = make_random(root / "source.bin", plan.big)
        want = resumable.file_sha256(src)
        info["clamd"] = sanity_check(run, plain, scanned, clamd, src)
        for r in range(plan.rounds):
            print(f"== round {r + 1}/{plan.rounds}", flush=True)
            phase_round(run, r, plain, scanned, clamd, src, want)
        left = spool_left(clamd)
        if left:
            run.fail(f"left in clamd's TemporaryDirectory: {', '.join(left)}")
        signal.alarm(0)
    except (BudgetExceeded, KeyboardInterrupt, SystemExit, Exception) as exc:
        print(f"--- clamd log tail ---\n{clamd.log()[-2000:]}", file=sys.stderr)
        return aborted(exc, *made, show_traceback=True)
    finally:
        stop_all(*made)
        clamd.stop()
        shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - started
    text = report(run, info, wall, (load_start, loadavg()), fs_of(root), args.context)
    return write_results(args.out, text, table(run), wall, run.failures)


if __name__ == "__main__":
    sys.exit(main())
