"""Network events (`networkevents`): the host's addresses coming and going, logged and counted,
and a listener on a specific address made to listen again when its address returns.

Strategy: one thread reads an rtnetlink socket (stdlib `socket.AF_NETLINK`, NETLINK_ROUTE)
joined to the IPv4 and IPv6 address groups; the kernel sends an RTM_NEWADDR or RTM_DELADDR
message for each change, parsed by `parse_messages`, a pure function over the bytes
(rtnetlink(7): nlmsghdr, then ifaddrmsg, then rtattrs, each aligned to 4 bytes). Where
netlink is unavailable (not Linux, a seccomp filter, a sandbox), the same thread polls the
address set instead (`current_addresses`: /proc/net/if_inet6 and an ioctl per interface)
and reports the difference. Only addresses are watched, never routes or links: an address
is what a listener binds to.
"""
from __future__ import annotations

import fcntl
import ipaddress
import logging
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

log = logging.getLogger("hmacfs")

NETLINK_ROUTE = 0
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
RTM_NEWADDR, RTM_DELADDR = 20, 21
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL = 1, 2, 3
NLMSGHDR = struct.Struct("=IHHII")   # length, type, flags, sequence, port id
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
RTATTR = struct.Struct("=HH")        # length, type
SIOCGIFADDR = 0x8915
POLL_INTERVAL = 2.0


def _align(n: int) -> int:
    return (n + 3) & ~3


@dataclass(frozen=True)
class AddressEvent:
    """One address added to or removed from an interface."""

    kind: str       # "added" or "removed"
    family: int     # socket.AF_INET or socket.AF_INET6
    address: str    # in its canonical text form
    index: int = 0  # the interface index (0: unknown)
    prefixlen: int = 0

    @property
    def interface(self) -> str:
        try:
            return socket.if_indextoname(self.index) if self.index else "?"
        except OSError:  # gone with its address
            return f"#{self.index}"


def _attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    while offset + RTATTR.size <= end:
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size or offset + length > end:
            break  # malformed: keep what was read
        attrs.setdefault(kind, data[offset + RTATTR.size:offset + length])
        offset += _align(length)
    return attrs


def parse_messages(data: bytes) -> list[AddressEvent]:
    """The address changes in one datagram from the rtnetlink socket (other messages and
    truncated ones are skipped). IPv4 gives the local address in IFA_LOCAL (IFA_ADDRESS is
    the peer's on a point-to-point link); IPv6 gives only IFA_ADDRESS."""
    events: list[AddressEvent] = []
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            break
        end = offset + length
        body = offset + NLMSGHDR.size
        if kind in (RTM_NEWADDR, RTM_DELADDR) and body + IFADDRMSG.size <= end:
            family, prefixlen, _fl, _scope, index = IFADDRMSG.unpack_from(data, body)
            attrs = _attrs(data, body + IFADDRMSG.size, end)
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            size = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(family)
            if raw is not None and size is not None and len(raw) == size:
                events.append(AddressEvent("added" if kind == RTM_NEWADDR else "removed", family,
                                           socket.inet_ntop(family, raw), index, prefixlen))
        elif kind == NLMSG_DONE:
            break
        offset += _align(length)
    return events


def same_address(a: str, b: str) -> bool:
    """Whether two textual addresses are one (IPv6 has many spellings; a `%zone` is ignored)."""
    try:
        return ipaddress.ip_address(a.split("%")[0]) == ipaddress.ip_address(b.strip("[]").split("%")[0])
    except ValueError:
        return False


def parse_if_inet6(text: str) -> set[tuple[int, str]]:
    """(family, address) pairs from /proc/net/if_inet6 (32 hex digits, index, prefix, scope, flags, name)."""
    found = set()
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            try:
                found.add((socket.AF_INET6, str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))))
            except ValueError:
                continue
    return found


def current_addresses() -> set[tuple[int, str]]:
    """The host's addresses, without netlink: IPv6 from /proc/net/if_inet6, IPv4 by asking each
    interface for its (primary) address. The polling fallback compares two of these."""
    found: set[tuple[int, str]] = set()
    try:
        with open("/proc/net/if_inet6") as f:
            found |= parse_if_inet6(f.read())
    except OSError:
        pass
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for name in names:
            try:
                reply = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
            found.add((socket.AF_INET, socket.inet_ntoa(reply[20:24])))
    return found


def diff(before: set[tuple[int, str]], after: set[tuple[int, str]]) -> list[AddressEvent]:
    """Polled snapshots as events: what left, then what came."""
    return ([AddressEvent("removed", f, a) for f, a in sorted(before - after)] +
            [AddressEvent("added", f, a) for f, a in sorted(after - before)])


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a listener takes connections at (host, port): a TCP connect from here."""
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout):
            return True
    except OSError:
        return False


class AddressWatcher:
    """Reports address changes to `on_change` (from its own thread), logging and counting each."""

    def __init__(self, on_change: Callable[[AddressEvent], None], metrics=None,
                 poll_interval: float = POLL_INTERVAL) -> None:
        self.on_change = on_change
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.mode = ""
        self._stop = threading.Event()
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        # Addresses known now: the kernel repeats RTM_NEWADDR when an address only changes its
        # flags (IPv6 duplicate address detection done, a lifetime renewed); those are no change.
        self._known: set[tuple[int, str]] = set()

    def start(self) -> None:
        self._known = current_addresses()
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)  # type: ignore[attr-defined]
            sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            sock.settimeout(1.0)  # so stop() is seen within a second
            self._sock, self.mode = sock, "netlink"
        except (AttributeError, OSError) as e:
            self.mode = "polling"
            log.info("network events: rtnetlink unavailable (%s): polling addresses every %.0fs", e,
                     self.poll_interval)
        else:
            log.info("network events: watching addresses (rtnetlink)")
        self._thread = threading.Thread(target=self._run, name="netevents", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(3)
        if self._sock is not None:
            self._sock.close()

    def _run(self) -> None:
        if self._sock is not None:
            self._read_netlink(self._sock)
        else:
            self._poll()

    def _read_netlink(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as e:  # ENOBUFS: the kernel dropped messages; go on with the next ones
                log.warning("network events: %s", e)
                continue
            self._report(parse_messages(data))

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self._report(diff(self._known, current_addresses()))

    def _report(self, events: Iterable[AddressEvent]) -> None:
        for event in events:
            key = (event.family, event.address)
            if event.kind == "added":
                if key in self._known:
                    continue
                self._known.add(key)
            else:
                self._known.discard(key)
            log.info("network event: address %s %s on %s", event.address, event.kind, event.interface)
            if self.metrics is not None:
                self.metrics.address_changes.inc(1.0, event.kind)
            try:
                self.on_change(event)
            except Exception:  # one failed reaction must not stop the watching
                log.exception("network events: handling %s %s failed", event.kind, event.address)
