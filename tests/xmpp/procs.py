"""Start and stop the real peer programs (Prosody, ejabberd, nginx, Chromium) in tests.

Strategy: every program runs in its own session (process group) with its files in a
temp dir, so a finalizer can always stop it and every helper it spawned; Erlang's
`erl_child_setup`/`inet_gethost` call setsid themselves, so we also collect descendants.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (read from /proc), so helpers in other sessions are found too."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def stop_tree(proc: Optional[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM the process group and all descendants, SIGKILL whatever is left after `timeout`."""
    if proc is None:
        return
    helpers = descendants(proc.pid)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    _signal_all(_alive(helpers), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(helpers) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_all(_alive(helpers), signal.SIGKILL)


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if not _is_zombie(p)]


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True once something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float,
               what: str, log: Callable[[], str]) -> None:
    """Poll `ready()` until it holds; fail early with the log if the process died, or at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log()[-6000:]}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s:\n{log()[-6000:]}")


def tail(path: Path, limit: int = 20000) -> str:
    """The end of a log file (empty if it does not exist yet)."""
    try:
        return path.read_text(errors="replace")[-limit:]
    except FileNotFoundError:
        return ""
