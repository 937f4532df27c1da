"""Start the real hmacfs process (from the checkout or the zipapp) on an ephemeral loopback port.

Strategy: the tests talk to hmacfs only over HTTP and signals, exactly as an XMPP server
or a browser would, so what they pin is the behaviour users see.
"""
from __future__ import annotations

import http.client
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from . import toml_writer

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SECRET = "test-secret-0123456789"


def free_port() -> int:
    """An unused loopback TCP port (small race window; fine for tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket."""

    def __init__(self, path: str, timeout: float = 30) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def merge(base: dict, extra: dict) -> dict:
    """Merge nested config dicts; sections in `extra` update those in `base`."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


class HmacfsProcess:
    """One hmacfs server process with its own temp dir, config, storage and log."""

    def __init__(self, workdir: Path, config: Optional[dict[str, Any]] = None,
                 secret: str = DEFAULT_SECRET, zipapp: Optional[Path] = None,
                 prefix: str = "/upload/") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.secret = secret
        self.zipapp = zipapp
        self.port = free_port()
        self.metrics_port = free_port()
        self.storage = self.workdir / "data"
        self.log_path = self.workdir / "hmacfs.log"
        self.config_path = self.workdir / "config.toml"
        base = {
            "server": {
                "listenport": f"127.0.0.1:{self.port}",
                "metricsport": f"127.0.0.1:{self.metrics_port}",
                "storagepath": str(self.storage),
                "urlprefix": prefix,
                "minfreebytes": "1MB",
                "loglevel": "debug",
                "pidfilepath": str(self.workdir / "hmacfs.pid"),
            },
            "security": {"secret": secret},
            "timeouts": {"shutdown": "10s"},
        }
        self.config = merge(base, config or {})
        self.port = int(str(self.config["server"]["listenport"]).rpartition(":")[2])  # a test may override it
        self.prefix = self.config["server"].get("urlprefix", prefix)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def host(self) -> str:
        """The address the server listens on (from `listenport`, which a test may override)."""
        listen = self.config["server"]["listenport"]
        host = listen.rpartition(":")[0]
        return host.strip("[]") or "127.0.0.1"

    @property
    def unix_socket(self) -> Optional[str]:
        sock = self.config["server"].get("unixsocket")
        return sock if isinstance(sock, str) and sock else None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def connection(self, timeout: float = 30) -> http.client.HTTPConnection:
        """An HTTP connection to the server, over TCP or its Unix socket."""
        if self.unix_socket:
            return UnixHTTPConnection(self.unix_socket, timeout=timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def healthy(self) -> bool:
        conn = self.connection(timeout=1)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    @property
    def upload_base(self) -> str:
        """The URL an XMPP server would use as its base_url / put_url (with trailing slash)."""
        return self.base_url + self.prefix

    def command(self) -> list[str]:
        entry = [str(self.zipapp)] if self.zipapp else ["-m", "hmacfs"]
        return [sys.executable, *entry, "-config", str(self.config_path)]

    def start(self, timeout: float = 15.0) -> HmacfsProcess:
        self.config_path.write_text(toml_writer.dumps(self.config))
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        env.pop("HMACFS_SECRET", None)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hmacfs exited {self.proc.returncode}:\n{self.log()}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"hmacfs did not become healthy:\n{self.log()}")

    def sql(self, statement: str, *params: object) -> list[tuple]:
        """Run one statement on the server's metadata database (stop the server first when
        writing: it caches rows), as an operator's sqlite3 shell would; returns the rows."""
        db = sqlite3.connect(self.storage / ".hmacfs" / "meta.sqlite3")
        try:
            rows = db.execute(statement, params).fetchall()
            db.commit()
            return rows
        finally:
            db.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> Optional[int]:
        """Send `sig` and wait; returns the exit code (kills on timeout)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.kill()
            if getattr(self, "_log", None):
                self._log.close()
