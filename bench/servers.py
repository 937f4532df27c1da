"""The three servers under test, each started in its own temp dir on loopback.

Strategy: every server is one process group started by us (start_new_session), so stop()
can always end it and everything it forked by its group id, even after a failure. Every
start picks fresh ports, so a restart never trips over TIME_WAIT or a slow previous exit.
Memory is read from /proc: VmHWM summed over the process and its descendants (nginx master
+ workers); writing "5" to /proc/PID/clear_refs resets the high-water mark between phases.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import clients

BENCH = Path(__file__).resolve().parent


def free_port() -> int:
    """An unused loopback port (tiny race window between close and the server's bind)."""
    with socket.socket() as s:
        s.bind((clients.HOST, 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """`pid` and all its live descendants (processes, not threads)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree = [pid]
    for p in tree:
        tree.extend(children.get(p, []))
    return tree


def _status_kib(pid: int, field: str) -> int:
    """A `field:  N kB` value from /proc/PID/status (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Server:
    """Common lifecycle: start (timed to the first served /health), stop, memory probes."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data = workdir / "data"
        self.data.mkdir(exist_ok=True)
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = workdir / "server.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def configure(self) -> None:
        """Pick ports and write config files before each start."""
        self.port = free_port()

    def start(self, timeout: float = 30.0) -> float:
        """Start the process; returns seconds from spawn to the first 200 on /health."""
        self.configure()
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if clients.http_status(self.port, "/health", timeout=1.0) == 200:
                    return time.perf_counter() - t0
            except OSError:
                pass
            if time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.002)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL it if it has not exited within `timeout`."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # stragglers in the group (e.g. nginx workers after a master SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc else []

    def reset_peak(self) -> None:
        """Reset VmHWM of every process of this server to its current RSS."""
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def peak_rss_bytes(self) -> int:
        """Sum of VmHWM over the process tree (bytes)."""
        return sum(_status_kib(pid, "VmHWM") for pid in self.pids()) * 1024

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""


class Hmacfs(Server):
    """hmacfs from the zipapp with a TOML config; signature required on PUT."""

    name = "hmacfs"

    def __init__(self, workdir: Path, pyz: Path, secret: str, python: str = sys.executable) -> None:
        super().__init__(workdir)
        self.pyz = pyz
        self.secret = secret
        self.python = python
        self.config_path = workdir / "config.toml"

    def configure(self) -> None:
        super().configure()
        self.config_path.write_text(
            "[server]\n"
            f'listenport = "127.0.0.1:{self.port}"\n'
            f'metricsport = "127.0.0.1:{free_port()}"\n'
            f'storagepath = "{self.data}"\n'
            'minfreebytes = "1MB"\n'
            'loglevel = "warn"\n'
            "maxconnectionsperip = 0\n"  # every benchmark client connects from 127.0.0.1
            "[security]\n"
            f'secret = "{self.secret}"\n'
            "[uploads]\n"
            'maxuploadsize = "20GB"\n'
            "[timeouts]\n"
            'shutdown = "5s"\n')

    def command(self) -> list[str]:
        return [self.python, str(self.pyz), "-config", str(self.config_path)]


class Nginx(Server):
    """Debian nginx with its own prefix, config and temp paths; WebDAV PUT; sendfile on."""

    name = "nginx"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.sink_port = 0
        self.conf = workdir / "nginx.conf"

    def configure(self) -> None:
        super().configure()
        self.sink_port = free_port()
        text = (BENCH / "nginx.conf.template").read_text()
        for key, value in {"@PREFIX@": str(self.workdir), "@DATA@": str(self.data),
                           "@PORT@": str(self.port), "@SINK_PORT@": str(self.sink_port)}.items():
            text = text.replace(key, value)
        self.conf.write_text(text)
        self.make_temp_dirs()

    def make_temp_dirs(self) -> None:
        """The temp paths nginx wants below its prefix (it runs unprivileged in the run's dir)."""
        for sub in ("client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp"):
            (self.workdir / sub).mkdir(exist_ok=True)

    def command(self) -> list[str]:
        return ["nginx", "-p", str(self.workdir), "-c", str(self.conf),
                "-e", str(self.workdir / "error.log"), "-g", "daemon off;"]

    def log_tail(self, n: int = 4000) -> str:
        try:
            err = (self.workdir / "error.log").read_text(errors="replace")[-n:]
        except FileNotFoundError:
            err = ""
        return super().log_tail(n) + err


class Baseline(Server):
    """bench/baseline_server.py: stdlib ThreadingHTTPServer + TCP_NODELAY."""

    name = "baseline"

    def __init__(self, workdir: Path, python: str = sys.executable) -> None:
        super().__init__(workdir)
        self.python = python

    def command(self) -> list[str]:
        return [self.python, str(BENCH / "baseline_server.py"), "--port", str(self.port),
                "--root", str(self.data)]
