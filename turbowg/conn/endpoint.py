"""Endpoints: where a peer's datagrams go and come from, as the data plane names them.

An endpoint is ``(host, port)``: host a literal IPv4 or IPv6 address string, IPv4 peers as plain dotted
quads (turbowg/conn/udp.py un-maps ::ffff:a.b.c.d on receive and maps it back on send). A plain tuple on
purpose: it is a dict key on every packet batch, and the socket layer caches its sockaddr per endpoint.
"""

from __future__ import annotations

import ipaddress

Endpoint = tuple[str, int]


def canonical_endpoint(endpoint: Endpoint) -> Endpoint:
    """The one spelling of `endpoint` the data plane uses (v4-mapped IPv6 un-mapped, address normalised).
    Raises ValueError for a host that is not an IP address or a port outside 1..65535."""
    host, port = endpoint
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"endpoint host {host!r} is not an IP address") from None
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"endpoint port {port!r} out of range")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (str(address), port)


def cookie_source(endpoint: Endpoint) -> bytes:
    """Address bytes + big-endian port: what a WireGuard cookie is bound to (as wireguard-go)."""
    host, port = endpoint
    return ipaddress.ip_address(host).packed + port.to_bytes(2, "big")
