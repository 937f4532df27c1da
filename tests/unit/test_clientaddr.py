"""What the per-address connection cap counts (pure)."""
from __future__ import annotations

import pytest

from hmacfs.http.clientaddr import peer_key


@pytest.mark.parametrize("addr, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),            # a dual-stack listener's view of an IPv4 client
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # one client's /64 is one key
    ("::1", "::/64"),
    ("not an address", "not an address"),
])
def test_peer_key(addr: str, key: str) -> None:
    assert peer_key(addr) == key
