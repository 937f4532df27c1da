"""A real clamd (Debian's clamav-daemon) in a temp dir, for the virus-scanning tests and bench.

Strategy: the official signature databases are not available offline and take seconds to
load, so the DatabaseDirectory holds only a one-line `eicar.hdb` (the MD5 of the 68-byte
EICAR test file): clamd then starts in well under a second and flags exactly the EICAR
file, as `Eicar-Test-Signature.UNOFFICIAL` (ClamAV 1.4 marks signatures from custom
databases that way; match on the prefix). Optionally a one-line `.ndb` body signature adds
the EICAR string found anywhere in a file. Everything clamd writes (socket, pid, log, the
temp files of INSTREAM scans) stays in the temp dir, it runs in the foreground in its own
process group, and readiness is decided by clamd itself answering `zPING` with `PONG` over
the same socket hmacfs uses. A kill is a SIGKILL (what a crashed or OOM-killed daemon looks
like to hmacfs); the stale Unix socket it leaves is removed before the next start.

Standard library only, so bench/scanning.py can import it (no pytest, nothing from hmacfs:
the helper must not depend on the client it helps to test).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import BinaryIO, Iterable, Optional, Union

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_HDB = "44d88612fea8a8f36de82e1278abb02f:68:Eicar-Test-Signature\n"
Address = Union[str, tuple[str, int]]  # a Unix socket path or (host, port)
SIGNATURE = "Eicar-Test-Signature"  # prefix of what clamd reports (1.4 appends ".UNOFFICIAL")
# With `embedded=True`: the EICAR string anywhere in a file (a body signature, not a hash), so a
# test can hide it at the end of a big upload and prove every byte of the stream reached clamd.
EMBEDDED_NDB = f"Eicar-Embedded-Test:0:*:{EICAR.hex()}\n"
EMBEDDED_SIGNATURE = "Eicar-Embedded-Test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clamd_program() -> Optional[str]:
    """clamd's path: on PATH, or Debian's /usr/sbin (not on a non-root user's PATH)."""
    found = shutil.which("clamd")
    if found:
        return found
    return "/usr/sbin/clamd" if os.access("/usr/sbin/clamd", os.X_OK) else None


def command(address: Address, cmd: bytes, timeout: float = 2.0) -> bytes:
    """One null-terminated clamd command (`PING`, `VERSION`) on a fresh connection; the reply
    without its terminator. Raises OSError when clamd cannot be reached."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(b"z" + cmd + b"\0")
        reply = b""
        while not reply.endswith(b"\0"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.rstrip(b"\0")


def instream(address: Address, blocks: Iterable[bytes], timeout: float = 120.0) -> tuple[str, float]:
    """Scan `blocks` with zINSTREAM as a client of clamd would, without hmacfs in between; returns
    clamd's reply (without its terminator) and the seconds from the end of the stream (the
    zero-length frame) to that reply: clamd's own work after the last byte."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(b"zINSTREAM\0")
        for block in blocks:
            sock.sendall(struct.pack(">I", len(block)))
            sock.sendall(block)
        sock.sendall(struct.pack(">I", 0))
        ended = time.perf_counter()
        reply = b""
        while not reply.endswith(b"\0"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.rstrip(b"\0").decode("utf-8", "replace"), time.perf_counter() - ended


class ClamdProcess:
    """One clamd with its own config, database, socket(s), log and temp dir under `workdir`.

    `tcp=True` also listens on 127.0.0.1:<free port> (`tcp_address`) next to the Unix socket.
    `max_length` (a clamd size such as "200M") sets StreamMaxLength and also MaxFileSize and
    MaxScanSize, so that a stream up to that size is really scanned (clamd's defaults of 100M
    and 400M would silently pass a larger file as clean without looking at it).
    `embedded=True` adds the EMBEDDED_NDB body signature to the database.
    """

    def __init__(self, workdir: Path, tcp: bool = False, max_length: str = "200M",
                 program: Optional[str] = None, embedded: bool = False) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.program = program or clamd_program() or "clamd"
        self.socket_path = str(self.workdir / "clamd.sock")
        self.tcp_port = _free_port() if tcp else None
        self.max_length = max_length
        self.embedded = embedded
        self.config_path = self.workdir / "clamd.conf"
        self.log_path = self.workdir / "clamd.log"
        self.proc: Optional[subprocess.Popen] = None
        self._out: Optional[BinaryIO] = None
        self.starts = 0

    @property
    def tcp_address(self) -> tuple[str, int]:
        if self.tcp_port is None:
            raise ValueError("this clamd was made without tcp=True")
        return "127.0.0.1", self.tcp_port

    def write_config(self) -> None:
        """The database and clamd.conf (rewritten at every start; the settings stay the same)."""
        db = self.workdir / "db"
        db.mkdir(exist_ok=True)
        (db / "eicar.hdb").write_text(EICAR_HDB)
        if self.embedded:
            (db / "embedded.ndb").write_text(EMBEDDED_NDB)
        (self.workdir / "scantmp").mkdir(exist_ok=True)
        lines = [
            "Foreground yes",
            f"LocalSocket {self.socket_path}",
            "LocalSocketMode 666",
            "FixStaleSocket yes",
            f"DatabaseDirectory {db}",
            f"LogFile {self.log_path}",
            f"PidFile {self.workdir / 'clamd.pid'}",
            f"TemporaryDirectory {self.workdir / 'scantmp'}",
            f"StreamMaxLength {self.max_length}",
            f"MaxFileSize {self.max_length}",
            f"MaxScanSize {self.max_length}",
        ]
        if self.tcp_port is not None:
            lines += [f"TCPSocket {self.tcp_port}", "TCPAddr 127.0.0.1"]
        self.config_path.write_text("\n".join(lines) + "\n")

    def ping(self, timeout: float = 2.0) -> bool:
        """True when clamd answers zPING with PONG on its Unix socket (and on TCP when it has one)."""
        addresses: list[Address] = [self.socket_path]
        if self.tcp_port is not None:
            addresses.append(self.tcp_address)
        try:
            return all(command(a, b"PING", timeout) == b"PONG" for a in addresses)
        except OSError:
            return False

    def start(self, timeout: float = 30.0) -> ClamdProcess:
        """Start clamd and wait until it answers PONG; RuntimeError (with its log) otherwise."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("clamd is already running")
        self.write_config()
        self._remove_stale_socket()
        out = open(self.workdir / "clamd.out", "ab")  # noqa: SIM115 - lives as long as the process
        self._close_out()
        self._out = out
        self.proc = subprocess.Popen([self.program, "--config-file", str(self.config_path)], cwd=self.workdir,
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"clamd exited {self.proc.returncode}:\n{self.log()}")
            if self.ping(timeout=1.0):
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"clamd did not answer PING within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL (no cleanup by clamd, like a crash), wait for it, remove the stale socket."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
        self._remove_stale_socket()

    def restart(self, timeout: float = 30.0) -> ClamdProcess:
        """Kill (when running) and start again with the same socket(s)."""
        self.kill()
        return self.start(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait; SIGKILL when it does not exit in time. Safe to call twice."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._remove_stale_socket()
        self._close_out()

    close = stop

    def log(self) -> str:
        """clamd's log file and whatever it printed."""
        text = ""
        for path in (self.log_path, self.workdir / "clamd.out"):
            try:
                text += path.read_text(errors="replace")
            except FileNotFoundError:
                pass
        return text

    def _remove_stale_socket(self) -> None:
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def _close_out(self) -> None:
        out, self._out = self._out, None
        if out is not None:
            out.close()

    def __enter__(self) -> ClamdProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
