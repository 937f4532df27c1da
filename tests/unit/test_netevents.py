"""The rtnetlink address-message parser and the polling fallback's helpers (services/netevents.py).

Why: the parser reads bytes from the kernel; these are messages captured from a real
`ip addr del/add` in a network namespace (IPv4 10.9.0.1/24 and IPv6 fd00::1/64 on interface
index 3), fed whole, concatenated, truncated and byte by byte.
"""
from __future__ import annotations

import socket

from hmacfs.services.netevents import (
    AddressEvent,
    AddressWatcher,
    diff,
    parse_if_inet6,
    parse_messages,
    same_address,
)

V4_DEL = bytes.fromhex("4c00000015000000976c0f6b012500000218800003000000080001000a090001080002000a090001070003006430"
                       "0000080008008000000014000600ffffffffffffffff2520140025201400")
V4_NEW = bytes.fromhex("4c00000014000000976c0f6b022500000218800003000000080001000a090001080002000a090001070003006430"
                       "0000080008008000000014000600ffffffffffffffffcb281400cb281400")
V6_DEL = bytes.fromhex("480000001500000000000000000000000a4082000300000014000100fd0000000000000000000000000000011400"
                       "0600ffffffffffffffff6c2114006c2114000800080082000000")
V6_NEW = bytes.fromhex("480000001400000000000000000000000a4082000300000014000100fd0000000000000000000000000000011400"
                       "0600ffffffffffffffffcc281400cc2814000800080082000000")


def test_captured_messages_parse() -> None:
    assert parse_messages(V4_DEL) == [AddressEvent("removed", socket.AF_INET, "10.9.0.1", 3, 24)]
    assert parse_messages(V4_NEW) == [AddressEvent("added", socket.AF_INET, "10.9.0.1", 3, 24)]
    assert parse_messages(V6_DEL) == [AddressEvent("removed", socket.AF_INET6, "fd00::1", 3, 64)]
    assert parse_messages(V6_NEW) == [AddressEvent("added", socket.AF_INET6, "fd00::1", 3, 64)]


def test_several_messages_in_one_datagram() -> None:
    events = parse_messages(V4_DEL + V4_NEW + V6_DEL + V6_NEW)
    assert [(e.kind, e.address) for e in events] == [("removed", "10.9.0.1"), ("added", "10.9.0.1"),
                                                    ("removed", "fd00::1"), ("added", "fd00::1")]


def test_truncated_and_garbage_input_never_raises() -> None:
    whole = V4_DEL + V6_NEW
    for n in range(len(whole)):
        events = parse_messages(whole[:n])
        assert len(events) <= 1  # only a complete first message counts
    assert parse_messages(whole[:len(V4_DEL)]) == parse_messages(V4_DEL)
    assert parse_messages(b"\xff" * 64) == []
    assert parse_messages(b"\x00" * 64) == []  # length 0: stop, not loop
    # a message that is not about addresses (RTM_NEWLINK = 16) is skipped
    other = bytearray(V4_NEW)
    other[4] = 16
    assert parse_messages(bytes(other) + V6_NEW) == parse_messages(V6_NEW)


def test_ipv4_prefers_the_local_address_over_the_peer() -> None:
    msg = bytearray(V4_NEW)
    msg[28:32] = bytes([192, 0, 2, 9])  # IFA_ADDRESS: the peer on a point-to-point link
    assert parse_messages(bytes(msg))[0].address == "10.9.0.1"


def test_same_address_across_spellings() -> None:
    assert same_address("fd00::1", "[fd00:0:0::1]")
    assert same_address("fe80::1", "fe80::1%eth0")
    assert not same_address("10.9.0.1", "10.9.0.2")
    assert not same_address("10.9.0.1", "localhost")


def test_polling_helpers() -> None:
    text = ("fd000000000000000000000000000001 03 40 00 80       d0\n"
            "00000000000000000000000000000001 01 80 10 80       lo\n")
    assert parse_if_inet6(text) == {(socket.AF_INET6, "fd00::1"), (socket.AF_INET6, "::1")}
    before = {(socket.AF_INET, "10.9.0.1"), (socket.AF_INET6, "fd00::1")}
    after = {(socket.AF_INET6, "fd00::1"), (socket.AF_INET, "10.9.0.2")}
    assert [(e.kind, e.address) for e in diff(before, after)] == [("removed", "10.9.0.1"), ("added", "10.9.0.2")]


def test_repeated_new_address_messages_are_one_change() -> None:
    """The kernel sends RTM_NEWADDR again when only an address's flags change."""
    seen: list[AddressEvent] = []
    watcher = AddressWatcher(seen.append)
    watcher._report(parse_messages(V6_NEW + V6_NEW))
    watcher._report(parse_messages(V6_DEL + V6_NEW))
    assert [e.kind for e in seen] == ["added", "removed", "added"]


def test_relisten_swaps_the_socket_under_a_running_accept_loop() -> None:
    """HmacfsServer.relisten: a fresh socket under the same descriptor, bound to the same
    address, while serve_forever keeps polling that descriptor (no restart of the loop)."""
    import socketserver
    import threading

    from hmacfs.http.server import HmacfsServer

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"hi")

    class Plain(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True
        relisten = HmacfsServer.relisten

    srv = Plain(("127.0.0.1", 0), Echo)
    port = srv.server_address[1]
    fd = srv.socket.fileno()
    loop = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    loop.start()
    try:
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                assert c.recv(2) == b"hi"
            srv.relisten()
            assert srv.socket.fileno() == fd and srv.server_address[1] == port
        with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
            assert c.recv(2) == b"hi"
    finally:
        srv.shutdown()
        srv.server_close()


def test_without_netlink_the_watcher_polls(monkeypatch) -> None:
    """Where AF_NETLINK is refused (a sandbox, a seccomp filter), address sets are compared."""
    import threading

    from hmacfs.services import netevents

    def refused(*_args, **_kwargs):
        raise OSError(97, "Address family not supported by protocol")

    snapshots = [{(socket.AF_INET, "10.9.0.1")}, {(socket.AF_INET, "10.9.0.2")}]
    monkeypatch.setattr(netevents.socket, "socket", refused)
    monkeypatch.setattr(netevents, "current_addresses", lambda: snapshots[0] if len(snapshots) > 1 else snapshots[-1])
    seen: list[AddressEvent] = []
    both = threading.Event()

    def on_change(event: AddressEvent) -> None:
        seen.append(event)
        if len(seen) == 2:
            both.set()

    watcher = AddressWatcher(on_change, poll_interval=0.05)
    watcher.start()
    try:
        assert watcher.mode == "polling"
        snapshots.pop(0)
        assert both.wait(3)
    finally:
        watcher.stop()
    assert [(e.kind, e.address) for e in seen] == [("removed", "10.9.0.1"), ("added", "10.9.0.2")]
