"""A throwaway redis-server (Debian's) on 127.0.0.1, for the Redis metadata and cluster tests.

Strategy: a free port, a temp dir holding everything the server writes, no persistence
(`--save ''`, no AOF) unless asked, foreground in its own process group so a stop never
reaches the test runner. Readiness is the server answering PING (raw RESP over a socket:
this helper must not depend on redis-py, the client under test). `restart()` keeps the
port, as a Redis restarted by systemd would; `kill()` is a SIGKILL (a crash).

Standard library only.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

START_WAIT = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process; `url` for clients, `start()`/`stop()`/`restart()`/`kill()`."""

    def __init__(self, directory: Optional[Path] = None, password: Optional[str] = None,
                 appendonly: bool = False, program: str = "redis-server", extra: tuple[str, ...] = ()) -> None:
        self.program = shutil.which(program) or program
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="hmacfs-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.appendonly = appendonly
        self.extra = list(extra)  # more server options, e.g. ("--appendfsync", "always")
        self.port = _free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [self.program, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.dir),
                "--logfile", str(self.dir / "redis.log"), "--daemonize", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log()[-2000:]}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {START_WAIT} s: {self.log()[-2000:]}")

    def ping(self) -> bool:
        """PING (after AUTH when a password is set) answered with +PONG."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                request = b""
                if self.password:
                    pw = self.password.encode()
                    request += b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw)
                sock.sendall(request + b"*1\r\n$4\r\nPING\r\n")
                reply = b""
                while b"PONG" not in reply and not reply.startswith(b"-") and len(reply) < 512:
                    chunk = sock.recv(512)
                    if not chunk:
                        break
                    reply += chunk
                return b"+PONG" in reply
        except OSError:
            return False

    def log(self) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")
        except OSError:
            return ""

    def _signal(self, sig: int, wait: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.resume()  # a paused server cannot handle its SIGTERM
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(wait)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM and wait: a clean shutdown (it does not save: no `--save`)."""
        self._signal(signal.SIGTERM)

    def pause(self) -> None:
        """SIGSTOP: a hung server (connections open, nothing answered) until `resume()`."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: what a crashed server looks like to its clients."""
        self._signal(signal.SIGKILL)

    def restart(self) -> RedisServer:
        """Stop and start again on the same port (and dir: with appendonly the data comes back)."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove the temp dir if this helper made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
