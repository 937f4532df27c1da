"""Start the real hmacfs process (from the checkout or the zipapp) on an ephemeral loopback port.

Strategy: the tests talk to hmacfs only over HTTP and signals, exactly as an XMPP server
or a browser would, so what they pin is the behaviour users see.

Every process started here registers its log (and the secrets of its config) in `RUN_LOGS`;
at the end of the test session tests/conftest.py scans them all with `scan_logs` for
secrets, MACs, JWTs and whole upload ids (tests/integration/test_log_secrets.py says why).
"""
from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional

from . import toml_writer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

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


# --- every log of the run, and what must never be in one -------------------------------------------

# Keys whose values are secrets (any section, spelled as config.py normalises them: lowercase, no `_`).
SECRET_KEYS = frozenset({"secret", "previoussecrets", "jwtsecret", "jwtkey", "deletesecret", "redispassword",
                         "s3accesskey", "s3secretkey", "metricstoken"})
# Shorter secrets cannot be searched for without matching ordinary text (a test's deletesecret "d"):
# they are left to the MAC and JWT patterns.
MIN_SECRET_CHARS = 6
LEAK_PATTERNS = (
    ("a 64-hex MAC after v=, v2=, v3= or token=",
     re.compile(r"(?<![A-Za-z0-9_])(?:v|v2|v3|token)=[0-9a-fA-F]{64}(?![0-9a-fA-F])")),
    ("a JWT", re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.")),
    ("a whole upload id after /.uploads/", re.compile(r"/\.uploads/[A-Za-z0-9_-]{32}")),
    ("a whole upload id after partials/", re.compile(r"partials/[A-Za-z0-9_-]{32}")),
)


class RunLog(NamedTuple):
    """One process's log files, its config file and the secrets its configs held when started."""

    logs: tuple[Path, ...]
    config_path: Path
    secrets: frozenset[str]


RUN_LOGS: list[RunLog] = []  # per Python process: under pytest-xdist, per worker


def _norm(key: str) -> str:
    return key.replace("_", "").lower()


def config_secrets(config: Any, base: Optional[Path] = None) -> set[str]:
    """Every secret a parsed config holds: secret-like keys at any depth, the contents of a
    `secretfile`, and the keys of an encryption `keyfile` (`<id> <hex>` lines)."""
    found: set[str] = set()
    if not isinstance(config, dict):
        return found
    for key, value in config.items():
        name = _norm(str(key))
        if isinstance(value, dict):
            found |= config_secrets(value, base)
        elif name in SECRET_KEYS:
            found.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str))
        elif name in ("secretfile", "keyfile") and isinstance(value, str) and value:
            path = Path(value) if base is None else base / value
            try:
                text = path.read_text(errors="replace")
            except (OSError, ValueError):
                continue
            found.update([text.strip()] if name == "secretfile" else
                         [w for line in text.splitlines() for w in line.split()[1:2]])
    return {s for s in found if len(s) >= MIN_SECRET_CHARS}


def _mask(secret: str) -> str:
    return f"{secret[:3]}...({len(secret)} chars)"


class LogLeak(NamedTuple):
    path: Path
    line: int
    what: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}: {self.excerpt}"


def scan_log(path: Path, secrets: Iterable[str]) -> list[LogLeak]:
    """Lines of one log holding a secret (named masked), a MAC, a JWT or a whole upload id."""
    leaks: list[LogLeak] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return leaks
    secrets = sorted(set(secrets), key=len, reverse=True)
    for number, line in enumerate(text.split("\n"), 1):
        hits = [(f"the secret {_mask(s)}", line.index(s), len(s)) for s in secrets if s in line]
        hits += [(what, m.start(), m.end() - m.start()) for what, pattern in LEAK_PATTERNS
                 for m in pattern.finditer(line)]
        for what, start, size in hits:  # the match itself shortened: the report is a log too
            shown = line[start:start + min(size, 14)] + ("..." if size > 14 else "")
            excerpt = f"{line[max(0, start - 60):start]}[{shown}]{line[start + size:start + size + 40]}"
            leaks.append(LogLeak(path, number, what, excerpt))
    return leaks


def scan_logs(run_logs: Iterable[RunLog] = ()) -> list[LogLeak]:
    """`scan_log` over every registered log (all of RUN_LOGS by default), with the secrets the
    process had at each start and those its config file holds now (a test may rewrite it and
    send SIGHUP)."""
    leaks: list[LogLeak] = []
    seen: set[Path] = set()
    for entry in list(run_logs) or list(RUN_LOGS):
        secrets = set(entry.secrets)
        try:
            secrets |= config_secrets(tomllib.loads(entry.config_path.read_text()), entry.config_path.parent)
        except (OSError, ValueError):
            pass
        for log in entry.logs:
            for path in sorted(log.parent.glob(log.name + "*")) if log.parent.is_dir() else []:
                if path not in seen and (path == log or re.fullmatch(r"\.\d+", path.name[len(log.name):])):
                    seen.add(path)
                    leaks += scan_log(path, secrets)
    return leaks


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
        self.register_logs()
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

    def register_logs(self) -> RunLog:
        """Record this process's logs (stdout/stderr and a configured `logfile`) and the secrets of
        its config as it starts, for the end-of-session scan."""
        logs = [self.log_path]
        logfile = self.config.get("server", {}).get("logfile")
        if isinstance(logfile, str) and logfile:
            logs.append(self.workdir / logfile)  # relative to the process's cwd, the workdir
        entry = RunLog(tuple(logs), self.config_path, frozenset(config_secrets(self.config, self.workdir)))
        if entry not in RUN_LOGS:
            RUN_LOGS.append(entry)
        return entry

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
