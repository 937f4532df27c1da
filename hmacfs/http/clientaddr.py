"""The client's address: the peer, or what a trusted reverse proxy says it forwarded for.

Strategy: `X-Forwarded-For` / `Forwarded` are believed only when the peer is in
`trustedproxies`, and then walked from the right, skipping further trusted hops, so a
client cannot spoof its address by sending the header itself (RFC 7239 section 8).
"""
from __future__ import annotations

import ipaddress
from typing import Mapping, Sequence, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def parse_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def in_networks(addr: str, networks: Sequence[Network]) -> bool:
    """Is `addr` (an IPv4-mapped IPv6 address counts as its IPv4 form) in any of `networks`?"""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def _forwarded_for(headers: Mapping[str, str]) -> list[str]:
    if "forwarded" in headers:
        hops = []
        for element in headers["forwarded"].split(","):
            for pair in element.split(";"):
                name, _, value = pair.strip().partition("=")
                if name.lower() == "for":
                    value = value.strip('"')
                    if value.startswith("["):
                        value = value[1:value.find("]")]
                    elif value.count(":") == 1:
                        value = value.split(":")[0]
                    hops.append(value)
        return hops
    return [h.strip() for h in headers.get("x-forwarded-for", "").split(",") if h.strip()]


def client_address(peer: str, headers: Mapping[str, str], trusted: Sequence[Network]) -> str:
    """The address to log, rate-limit and ban: the right-most untrusted hop."""
    if not trusted or not in_networks(peer, trusted):
        return peer
    for hop in reversed(_forwarded_for(headers)):
        if not in_networks(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer
    return peer


def peer_key(addr: str) -> str:
    """What the per-address connection cap counts: an IPv4 address (IPv4-mapped IPv6 included),
    or the /64 of an IPv6 one (a single client usually holds a whole /64)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
