"""Network events against the real server, in a network namespace this test makes: an address
removed and added back is logged and counted, and the server answers on it again.

Why: a listener bound to one address (`listenport = "10.9.0.1:8080"`) outlives that address
going away (a DHCP renewal, a VPN reconnecting, an interface bounced); what the operator needs
is to see it in the log and in `hmacfs_network_address_changes_total`, and the server to take
connections again once the address is back, without a restart.

Needs root and iproute2 (`ip netns`, veth; the `dummy` link type is not in every kernel).
Every `ip` and `curl` call is bounded; the namespace is always deleted.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.support.hmacfs_proc import HmacfsProcess

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("curl"),
                                reason="needs root, ip (iproute2) and curl")

ADDRESSES = {4: ("10.9.0.1", "10.9.0.1/24", "10.9.0.1"), 6: ("fd00::1", "fd00::1/64", "[fd00::1]")}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=10, capture_output=True)


class NetnsHmacfs(HmacfsProcess):
    """hmacfs run with `ip netns exec NS`, probed with curl inside the namespace."""

    def __init__(self, ns: str, *args, **kwargs) -> None:
        self.ns = ns
        super().__init__(*args, **kwargs)

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *super().command()]

    def curl(self, url: str) -> str:
        done = subprocess.run(["ip", "netns", "exec", self.ns, "curl", "-sS", "-g", "--max-time", "2", url],
                              capture_output=True, text=True, timeout=10)
        return done.stdout if done.returncode == 0 else ""

    def healthy(self) -> bool:
        return bool(self.curl(self.base_url + "/health"))

    def metric(self, sample: str) -> float:
        text = self.curl(f"http://127.0.0.1:{self.metrics_port}/metrics")
        return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " ")),
                    0.0)


def wait_for(what: str, check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def netns():
    name = f"hmacfs-{uuid.uuid4().hex[:8]}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ip("-n", name, "link", "set", "d0", "up")
        ip("-n", name, "link", "set", "d1", "up")
        ip("-n", name, "addr", "add", "10.9.0.1/24", "dev", "d0")
        ip("-n", name, "addr", "add", "fd00::1/64", "dev", "d0", "nodad")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=10, capture_output=True)


@pytest.mark.parametrize("version", [4, 6])
def test_an_address_that_goes_and_comes_back(netns: str, tmp_path: Path, version: int) -> None:
    address, cidr, host = ADDRESSES[version]
    srv = NetnsHmacfs(netns, tmp_path / "srv", {"server": {
        "listenport": f"{host}:8080", "metricsport": "127.0.0.1:9090", "networkevents": True}})
    srv.port, srv.metrics_port = 8080, 9090
    try:
        srv.start()
        wait_for("the watcher", lambda: "watching addresses (rtnetlink)" in srv.log())
        assert srv.curl(srv.base_url + "/health")

        ip("-n", netns, "addr", "del", cidr, "dev", "d0")
        wait_for("the removal logged", lambda: f"network event: address {address} removed on d0" in srv.log())
        assert srv.metric('hmacfs_network_address_changes_total{kind="removed"}') == 1
        assert not srv.curl(srv.base_url + "/health")  # no address, no answer

        ip("-n", netns, "addr", "add", cidr, "dev", "d0", *(["nodad"] if version == 6 else []))
        wait_for("the return logged", lambda: f"network event: address {address} added on d0" in srv.log())
        wait_for("the listener checked", lambda: re.search(r"still answers|listening again on", srv.log()))
        assert srv.metric('hmacfs_network_address_changes_total{kind="added"}') == 1
        assert wait_for("an answer on the address", lambda: srv.curl(srv.base_url + "/health"))
        assert srv.stop() == 0
    finally:
        srv.close()
