"""hmacfs under systemd, as far as a container without a running systemd can show it:
socket activation through `systemd-socket-activate` (the same LISTEN_* protocol PID 1 uses),
sd_notify to a datagram socket the test binds, and the shipped units read by
`systemd-analyze verify` and `security --offline`.

What this cannot show: the sandbox itself (DynamicUser, ProtectSystem=..., the system call
filter) being applied, which needs PID 1. `verify` checks the unit syntax, every directive
name and value, and that ExecStart's program exists; `security --offline` scores the
hardening as written.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from hmacfs.services.systemd import activation_fd
from tests.conftest import need_program
from tests.support import toml_writer
from tests.support.client import put, request, signed_put, url_path
from tests.support.hmacfs_proc import REPO, HmacfsProcess, free_port

UNITS = REPO / "contrib" / "systemd"


def test_activation_fd_follows_the_protocol() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "metrics:http"}
    assert activation_fd("main", env, pid=42) == 4 and activation_fd("metrics", env, pid=42) == 3
    assert activation_fd("main", env, pid=43) is None  # inherited by a child: not ours
    assert activation_fd("main", {"LISTEN_PID": "42", "LISTEN_FDS": "1"}, pid=42) == 3
    assert activation_fd("metrics", {"LISTEN_PID": "42", "LISTEN_FDS": "1"}, pid=42) is None
    assert activation_fd("main", {"LISTEN_PID": "42", "LISTEN_FDS": "0"}, pid=42) is None
    assert activation_fd("main", {"LISTEN_PID": "x", "LISTEN_FDS": "1"}, pid=42) is None
    assert activation_fd("main", {}, pid=42) is None


def test_units_verify_and_are_hardened(tmp_path: Path) -> None:
    analyze = need_program("systemd-analyze")
    for unit in ("hmacfs.service", "hmacfs.socket"):
        shutil.copy(UNITS / unit, tmp_path / unit)
    units = [str(tmp_path / "hmacfs.service"), str(tmp_path / "hmacfs.socket")]
    run = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values ("..., ignoring"): any line about our units fails.
    complaints = [line for line in (run.stdout + run.stderr).splitlines() if "hmacfs." in line]
    assert run.returncode == 0 and not complaints, run.stdout + run.stderr

    # A planted mistake is seen, so the check above is not vacuous.
    bad = tmp_path / "bad" / "hmacfs.service"
    bad.parent.mkdir()
    bad.write_text((UNITS / "hmacfs.service").read_text().replace("ProtectHome=yes", "ProtectHome=maybe"))
    run = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "ProtectHome" in run.stderr or "protect home" in run.stderr.lower()

    text = (UNITS / "hmacfs.service").read_text()
    for directive in ("DynamicUser=yes", "StateDirectory=hmacfs", "ProtectSystem=strict", "ProtectHome=yes",
                      "PrivateTmp=yes", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n",
                      "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
                      "SystemCallFilter=@system-service", "MemoryDenyWriteExecute=yes", "LockPersonality=yes",
                      "Type=notify", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert directive in text, directive
    run = subprocess.run([analyze, "security", "--offline=true", "--no-pager", units[0]],
                         capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for hmacfs.service: ([\d.]+)", run.stdout)
    assert score and float(score.group(1)) <= 2.0, run.stdout[-2000:] + run.stderr


def _activated(tmp_path: Path, listen: str, config: dict) -> tuple[HmacfsProcess, subprocess.Popen]:
    """hmacfs under systemd-socket-activate, which holds `listen` until the first connection."""
    activate = need_program("systemd-socket-activate")
    srv = HmacfsProcess(tmp_path / "srv", config)
    srv.config_path.write_text(toml_writer.dumps(srv.config))
    srv.register_logs()
    srv._log = open(srv.log_path, "ab")  # noqa: SIM115 - closed by srv.close()
    srv.proc = subprocess.Popen(
        [activate, "-l", listen, "-E", f"PYTHONPATH={REPO}", "-E", "PYTHONUNBUFFERED=1",
         sys.executable, "-m", "hmacfs", "-config", str(srv.config_path)],
        cwd=srv.workdir, stdout=srv._log, stderr=subprocess.STDOUT, start_new_session=True)
    return srv, srv.proc


def _wait_healthy(srv: HmacfsProcess, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    # The first connection makes systemd-socket-activate exec hmacfs; the start line follows the accept.
    while not (srv.healthy() and "hmacfs serving" in srv.log()):
        assert proc.poll() is None, srv.log()
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.1)


def test_socket_activation_serves_and_drains(tmp_path: Path) -> None:
    port = free_port()
    # listenport is the very port the activator holds: binding it ourselves would fail
    # (EADDRINUSE), so serving at all proves the inherited socket is used.
    srv, proc = _activated(tmp_path, f"127.0.0.1:{port}", {"server": {"listenport": f"127.0.0.1:{port}"}})
    try:
        _wait_healthy(srv, proc)
        assert f"hmacfs serving 127.0.0.1:{port}" in srv.log()
        name = f"{uuid.uuid4()}/act.txt"
        assert put(srv, name, b"activated").status == 201
        got = request(port, "GET", url_path(srv.prefix, name))
        assert got.status == 200 and got.body == b"activated"
        # The activator exec'd hmacfs in its own process: SIGTERM reaches the server itself.
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert b"hmacfs" in f.read()

        # SIGTERM drains: an upload in flight finishes, then the process exits 0.
        body = b"d" * 200_000
        target = signed_put(srv.prefix, srv.secret, f"{uuid.uuid4()}/drain.bin", len(body))
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                      + body[:100_000])
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None, "exited with a transfer in flight"
            s.sendall(body[100_000:])
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 201"), reply
        assert proc.wait(20) == 0
        assert "stopped" in srv.log()
    finally:
        srv.close()


def test_socket_activation_on_a_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "act.sock")
    srv, proc = _activated(tmp_path, path, {"server": {"unixsocket": path}})
    try:
        _wait_healthy(srv, proc)
        assert f"hmacfs serving unix:{path}" in srv.log()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert os.path.exists(path)  # the activator's socket: not ours to remove
    finally:
        srv.close()


# The kernel's own W^X switch (prctl PR_SET_MDWE, Linux 6.3+; kept across fork and exec), which
# refuses what MemoryDenyWriteExecute= refuses with seccomp: write+execute mappings.
MDWE_LAUNCHER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0 or libc.prctl(66, 0, 0, 0, 0) != 1:
    sys.exit(77)
os.execv(sys.executable, [sys.executable, "-m", "hmacfs", *sys.argv[1:]])
"""


class MdweProcess(HmacfsProcess):
    def command(self) -> list[str]:
        return [sys.executable, "-c", MDWE_LAUNCHER, "-config", str(self.config_path)]


def test_serves_and_encrypts_without_writable_executable_memory(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes in the unit: hmacfs, including AES-GCM through ctypes and
    libcrypto, must need no memory both writable and executable."""
    probe = subprocess.run([sys.executable, "-c", MDWE_LAUNCHER.split("os.execv")[0]])
    if probe.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    keys = tmp_path / "keys"
    keys.write_text("k1 " + "11" * 32 + "\n")
    keys.chmod(0o600)
    srv = MdweProcess(tmp_path / "srv", {"encryption": {"enabled": True, "keyfile": str(keys)}})
    try:
        srv.start()
        assert b"\0-m\0hmacfs\0" in Path(f"/proc/{srv.proc.pid}/cmdline").read_bytes()  # the launcher exec'd it
        name = f"{uuid.uuid4()}/wx.bin"
        assert put(srv, name, b"w^x" * 1000).status == 201
        got = request(srv.port, "GET", url_path(srv.prefix, name))
        assert got.status == 200 and got.body == b"w^x" * 1000
        stored = [p.read_bytes() for p in srv.storage.rglob("wx.bin")]
        assert stored and all(b"w^x" not in data for data in stored)  # encrypted at rest
        assert srv.stop() == 0
    finally:
        srv.close()


@pytest.fixture
def notify_socket(monkeypatch):
    """A NOTIFY_SOCKET in the abstract namespace (as `@name`), as systemd may pass it."""
    name = f"hmacfs-notify-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield sock
    sock.close()


def test_sd_notify_ready_reload_stopping(hmacfs_factory, notify_socket) -> None:
    srv = hmacfs_factory()
    ready = notify_socket.recv(4096).decode()  # sent once the listeners accept
    assert "READY=1" in ready.split("\n") and f"MAINPID={srv.proc.pid}" in ready and srv.healthy()
    srv.proc.send_signal(signal.SIGHUP)
    assert notify_socket.recv(4096).decode().startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert notify_socket.recv(4096).decode() == "READY=1"
    srv.proc.send_signal(signal.SIGTERM)
    assert notify_socket.recv(4096).decode() == "STOPPING=1"
    assert srv.proc.wait(20) == 0
