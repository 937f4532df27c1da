"""What every benchmark's main() does around its measurements (run.py, storage.py, resumable.py,
scanning.py, cluster.py): shared options and plan, signals, clean-up, the results file.

A run must end within its time budget and leave nothing behind, also on failure, Ctrl-C or a
SIGTERM/SIGHUP from whoever started it: the signals become exceptions (SystemExit, and
BudgetExceeded from the alarm) so that main()'s `finally` stops every server and removes the
temp dir. main() arms the handlers with `handle_signals`, starts the alarm itself where its
budget should start counting, and ends with `aborted` (exit status 2, with the servers' log
tails), `stop_all` (in its `finally`) and `write_results` (exit status 0 or 1).
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import servers


def bench_parser(description: str, quick: str, out: Path, what: str = "upload", data: str = "the data goes",
                 python_help: str = "interpreter that runs hmacfs", context: bool = True) -> argparse.ArgumentParser:
    """The options the rounds-and-plans benchmarks share (storage, resumable, scanning, cluster);
    a script adds its own to the parser this returns."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--rounds", type=int, help="override the number of rounds")
    ap.add_argument("--pyz", type=Path, help="use this zipapp instead of building one from the work tree")
    ap.add_argument("--python", default=sys.executable, help=python_help)
    ap.add_argument("--tmpdir", type=Path, help=f"where {data} (default: /dev/shm when it has room)")
    ap.add_argument("--no-warm", action="store_true", help=f"do not warm RAM before each timed {what}")
    if context:
        ap.add_argument("--context", default="", help="what else ran on the machine (written into the report)")
    ap.add_argument("--out", type=Path, default=out, help="results file to write")
    return ap


def chosen_plan(args: argparse.Namespace, quick: Any, full: Any, **changes: Any) -> Any:
    """The quick or full plan (a dataclass), with --rounds, --no-warm and the script's own changes
    (None: not given)."""
    plan = quick if args.quick else full
    given = {"rounds": args.rounds, **changes}
    return dataclasses.replace(plan, **{k: v for k, v in given.items() if v}, warm=not args.no_warm)


class BudgetExceeded(Exception):
    """The run took longer than its hard limit."""


def handle_signals(budget: float) -> None:
    """SIGTERM and SIGHUP exit (status 128 + signal number) through main()'s cleanup; SIGALRM, once
    the caller has started it with signal.alarm(int(budget)), raises BudgetExceeded."""

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    def on_alarm(_signum: int, _frame: object) -> None:
        raise BudgetExceeded(f"run exceeded its {budget:.0f} s budget")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)


def aborted(exc: BaseException, *running: Optional[servers.Server], show_traceback: bool = False) -> int:
    """A run that ended in `exc`: stop the alarm, print the log tail of each server that was started,
    with `show_traceback` the traceback of an unexpected error, and why the run ended; returns 2."""
    signal.alarm(0)
    for s in running:
        if s is not None and s.proc is not None:
            print(f"--- {s.name} log tail ---\n{s.log_tail(2000)}", file=sys.stderr)
    if show_traceback and not isinstance(exc, (BudgetExceeded, KeyboardInterrupt, SystemExit)):
        traceback.print_exc()
    print(f"bench: aborted: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 2


def stop_all(*running: Optional[servers.Server]) -> None:
    """Stop every server (None: never made); a failure to stop one is printed, and the rest go on."""
    for s in running:
        if s is None:
            continue
        try:
            s.stop()
        except Exception as exc:  # cleanup must go on
            print(f"bench: cleanup: {exc}", file=sys.stderr)


def write_results(out: Path, text: str, table: str, wall: float, failures: int, summary: str = "") -> int:
    """Write the report `text` to `out`, print the figures `table` (and a `summary` line), and
    return the exit status: 0 when every sample was valid, 1 when some failed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n" + table + "\n")
    if summary:
        print(summary)
    print(f"bench: wrote {out} in {wall:.0f} s; {failures} failed sample(s)")
    return 1 if failures else 0
