"""systemd without libsystemd: socket activation (`sd_listen_fds`) and readiness (`sd_notify`).

Strategy: both protocols are a few environment variables and, for notify, one datagram, so
the standard library is enough and nothing here needs systemd to be present; outside systemd
every function is a no-op.

- Socket activation (sd_listen_fds(3)): systemd (or `systemd-socket-activate`) opens the
  listening sockets and passes them from fd 3 on, with `LISTEN_PID` (ours: the variables are
  not meant for a child that inherited them), `LISTEN_FDS` (how many) and optionally
  `LISTEN_FDNAMES` (colon-separated, from `FileDescriptorName=`). The first socket not named
  `metrics` serves the main listener; one named `metrics` serves the metrics listener.
  Binding happens before we start, so a restart loses no connection attempts and the unit
  may use privileged ports without the service having any capability.
- Readiness (sd_notify(3)): `NOTIFY_SOCKET` names a Unix datagram socket (a leading `@` is the
  abstract namespace); `READY=1` once we accept connections, `RELOADING=1` ... `READY=1` around
  a SIGHUP reload, `STOPPING=1` when draining starts, so `Type=notify` orders dependants on
  a server that really listens.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping, Optional

log = logging.getLogger("hmacfs")
LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
METRICS_NAME = "metrics"


def activation_fd(role: str, environ: Optional[Mapping[str, str]] = None,
                  pid: Optional[int] = None) -> Optional[int]:
    """The inherited listening fd for `role` ("main" or "metrics"), or None when not
    socket-activated (or no fd is meant for this role)."""
    env = os.environ if environ is None else environ
    try:
        if int(env.get("LISTEN_PID", "")) != (os.getpid() if pid is None else pid):
            return None
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return None
    if count < 1:
        return None
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    names += [""] * (count - len(names))
    for i in range(count):
        if (names[i] == METRICS_NAME) == (role == METRICS_NAME):
            return LISTEN_FDS_START + i
    return None


def activation_socket(role: str) -> Optional[socket.socket]:
    """The inherited listening socket for `role`, ready for `accept` (family and type come from
    the socket itself: TCP over IPv4 or IPv6, or a Unix stream socket)."""
    fd = activation_fd(role)
    if fd is None:
        return None
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise OSError(f"socket activation: fd {fd} is not a stream socket (ListenStream= is needed)")
    os.set_inheritable(fd, False)  # not to ImageMagick or any other child
    sock.setblocking(True)
    return sock


def notify(state: str, environ: Optional[Mapping[str, str]] = None) -> bool:
    """Send one sd_notify message (`KEY=value` lines); False when there is no NOTIFY_SOCKET or
    sending failed (never fatal: readiness reporting must not stop a server that works)."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False  # unset, or a vsock address, which we do not speak
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as e:
        log.debug("sd_notify to %s failed: %s", env.get("NOTIFY_SOCKET"), e)
        return False
    return True


def notify_reloading() -> bool:
    """`RELOADING=1` with the monotonic time systemd asks for (systemd.service(5), notify-reload)."""
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
