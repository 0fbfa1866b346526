"""AllowedIPs against a brute-force longest-prefix-match reference."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from turbowg.device.allowedips import LOOKUP_CACHE_MAX, AllowedIPs

PEERS = ["p0", "p1", "p2", "p3"]


def reference_lookup(entries: dict, addr: bytes):
    address = ipaddress.ip_address(addr)
    best = None
    for network, peer in entries.items():
        if network.version == address.version and address in network:
            if best is None or network.prefixlen > best[0].prefixlen:
                best = (network, peer)
    return best[1] if best else None


# Addresses drawn from a small space so prefixes overlap often.
v4_addresses = st.builds(lambda hi, lo: bytes([10, hi, 0, lo]), st.integers(0, 3), st.integers(0, 255))
v6_addresses = st.builds(
    lambda hi, lo: ipaddress.IPv6Address("fd00::").packed[:14] + bytes([hi, lo]),
    st.integers(0, 3),
    st.integers(0, 255),
)
v4_networks = st.builds(
    lambda addr, plen: ipaddress.ip_network((addr, plen), strict=False), v4_addresses, st.integers(0, 32)
)
v6_networks = st.builds(
    lambda addr, plen: ipaddress.ip_network((addr, plen), strict=False),
    v6_addresses,
    st.sampled_from([0, 8, 64, 112, 118, 120, 124, 127, 128]),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.one_of(v4_networks, v6_networks), st.sampled_from(PEERS)),
        st.tuples(st.just("remove"), st.one_of(v4_networks, v6_networks), st.sampled_from(PEERS)),
        st.tuples(st.just("remove_by_peer"), st.none(), st.sampled_from(PEERS)),
        st.tuples(st.just("lookup"), st.one_of(v4_addresses, v6_addresses), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(operations, st.lists(st.one_of(v4_addresses, v6_addresses), max_size=20))
def test_matches_reference(ops, probes) -> None:
    table: AllowedIPs[str] = AllowedIPs()
    entries: dict = {}
    for op, arg, peer in ops:
        if op == "insert":
            table.insert(arg, peer)
            entries[arg] = peer
        elif op == "remove":
            removed = table.remove(arg, peer)
            assert removed == (entries.get(arg) == peer)
            if removed:
                del entries[arg]
        elif op == "remove_by_peer":
            table.remove_by_peer(peer)
            entries = {n: p for n, p in entries.items() if p != peer}
        else:
            assert table.lookup(arg) == reference_lookup(entries, arg)
    for addr in probes:
        assert table.lookup(addr) == reference_lookup(entries, addr)
        assert table.lookup(bytearray(addr)) == reference_lookup(entries, addr)
        assert table.lookup(memoryview(addr)) == reference_lookup(entries, addr)
    for peer in PEERS:
        assert set(table.entries_for_peer(peer)) == {n for n, p in entries.items() if p == peer}
    assert len(table) == len(entries)


def test_prefix_moves_to_new_peer_and_host_bits_cleared() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("10.0.0.0/8", "a")
    table.insert("10.1.2.3/8", "b")  # same prefix, host bits ignored
    assert table.entries_for_peer("a") == []
    assert table.entries_for_peer("b") == [ipaddress.ip_network("10.0.0.0/8")]
    assert table.lookup(bytes([10, 9, 9, 9])) == "b"
    assert table.lookup(bytes([11, 0, 0, 0])) is None
    assert table.lookup(b"\x00" * 5) is None


def test_default_routes_and_cache_invalidation() -> None:
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("0.0.0.0/0", "v4")
    table.insert("::/0", "v6")
    addr = bytes([192, 0, 2, 1])
    assert table.lookup(addr) == "v4"
    assert table.lookup(bytes(16)) == "v6"
    table.insert("192.0.2.0/24", "more")
    assert table.lookup(addr) == "more"  # cached answer was invalidated
    table.remove_by_peer("more")
    assert table.lookup(addr) == "v4"
    # The cache stays bounded under many distinct destinations.
    for i in range(LOOKUP_CACHE_MAX + 100):
        assert table.lookup(i.to_bytes(4, "big")) == "v4"
    assert len(table._cache) <= LOOKUP_CACHE_MAX


def test_remove_one_prefix_of_its_owner_only() -> None:
    """What `allowed_ip=-PREFIX` uses: the exact prefix, only if `peer` holds it (wireguard-go's Remove)."""
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("10.0.0.0/16", "a")
    table.insert("10.0.1.0/24", "a")
    table.insert("fd00::/64", "a")
    table.insert("10.9.0.0/16", "b")
    inside = bytes([10, 0, 1, 7])
    assert table.lookup(inside) == "a"  # cached
    assert not table.remove("10.9.0.0/16", "a")  # another peer's prefix
    assert not table.remove("10.0.0.0/8", "a") and not table.remove("10.0.0.0/24", "a")  # not exactly held
    assert table.remove("10.0.1.99/24", "a")  # host bits in text are cleared, as on insert
    assert not table.remove("10.0.1.0/24", "a")  # already gone
    assert table.lookup(inside) == "a"  # now through 10.0.0.0/16: the cached /24 answer was dropped
    assert table.remove(ipaddress.ip_network("10.0.0.0/16"), "a")
    assert table.lookup(inside) is None
    assert table.entries_for_peer("a") == [ipaddress.ip_network("fd00::/64")]
    assert table.entries_for_peer("b") == [ipaddress.ip_network("10.9.0.0/16")]
    assert table.remove("fd00::/64", "a") and table.entries_for_peer("a") == [] and len(table) == 1
    assert table.lookup(bytes([10, 9, 0, 1])) == "b"
