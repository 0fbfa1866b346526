"""Allowed-IPs table: longest-prefix match from an address to the peer that owns it.

The lookup runs once per packet in each direction, so it is built for Python's strengths:
one dict per prefix length holding masked integer addresses, scanned from the longest
length present, plus a bounded cache from address bytes to answer. Any change to the table
clears the cache.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, TypeVar

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
PeerT = TypeVar("PeerT")

# Cached answers kept before the cache is flushed; bounds memory for many destinations.
LOOKUP_CACHE_MAX = 8192


class _Family(Generic[PeerT]):
    """Prefixes of one address family: {prefix length: {masked address int: peer}}."""

    __slots__ = ("bits", "tables", "levels")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, PeerT]] = {}
        # (mask, table) pairs, longest prefix first; rebuilt when a length appears or empties.
        self.levels: tuple[tuple[int, dict[int, PeerT]], ...] = ()

    def mask(self, prefix_len: int) -> int:
        full = (1 << self.bits) - 1
        return full ^ (full >> prefix_len)

    def rebuild_levels(self) -> None:
        for length in [length for length, table in self.tables.items() if not table]:
            del self.tables[length]
        self.levels = tuple(
            (self.mask(length), self.tables[length]) for length in sorted(self.tables, reverse=True)
        )


def _normalize(network: IPNetwork | str) -> IPNetwork:
    """Accept a network object or text; host bits in text are cleared as wireguard-go does."""
    if isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return network  # network objects always hold a masked network address
    return ipaddress.ip_network(network, strict=False)


class AllowedIPs(Generic[PeerT]):
    """Maps IPv4/IPv6 prefixes to peers; `lookup` returns the peer of the longest match."""

    def __init__(self) -> None:
        self._v4: _Family[PeerT] = _Family(32)
        self._v6: _Family[PeerT] = _Family(128)
        self._by_peer: dict[PeerT, set[IPNetwork]] = {}
        self._cache: dict[bytes, PeerT | None] = {}

    def __len__(self) -> int:
        return sum(len(networks) for networks in self._by_peer.values())

    def _family(self, network: IPNetwork) -> _Family[PeerT]:
        return self._v4 if network.version == 4 else self._v6

    def insert(self, network: IPNetwork | str, peer: PeerT) -> None:
        """Route `network` to `peer`; a prefix already owned by another peer moves to this one."""
        network = _normalize(network)
        family = self._family(network)
        table = family.tables.get(network.prefixlen)
        new_length = table is None
        if table is None:
            table = family.tables[network.prefixlen] = {}
        key = int(network.network_address)
        previous = table.get(key)
        if previous is not None and previous is not peer:
            self._by_peer[previous].discard(network)
            if not self._by_peer[previous]:
                del self._by_peer[previous]
        table[key] = peer
        if new_length:
            family.rebuild_levels()
        self._by_peer.setdefault(peer, set()).add(network)
        self._cache.clear()

    def remove(self, network: IPNetwork | str, peer: PeerT) -> bool:
        """Remove `network` if `peer` owns it; returns whether something was removed."""
        network = _normalize(network)
        family = self._family(network)
        table = family.tables.get(network.prefixlen)
        key = int(network.network_address)
        if table is None or table.get(key) is not peer:
            return False
        del table[key]
        if not table:
            family.rebuild_levels()
        networks = self._by_peer[peer]
        networks.discard(network)
        if not networks:
            del self._by_peer[peer]
        self._cache.clear()
        return True

    def remove_by_peer(self, peer: PeerT) -> None:
        """Remove every prefix of `peer`."""
        networks = self._by_peer.pop(peer, None)
        if not networks:
            return
        for network in networks:
            family = self._family(network)
            del family.tables[network.prefixlen][int(network.network_address)]
        self._v4.rebuild_levels()
        self._v6.rebuild_levels()
        self._cache.clear()

    def entries_for_peer(self, peer: PeerT) -> list[IPNetwork]:
        """The prefixes of `peer`, IPv4 first, in address order."""
        networks = self._by_peer.get(peer, ())
        return sorted(networks, key=lambda n: (n.version, int(n.network_address), n.prefixlen))

    def lookup(self, addr: bytes) -> PeerT | None:
        """The peer owning the longest prefix containing `addr` (4 or 16 raw bytes), or None."""
        cache = self._cache
        try:
            return cache[addr]
        except KeyError:
            pass
        except TypeError:  # bytearray / writable memoryview: not hashable
            addr = bytes(addr)
            if addr in cache:
                return cache[addr]
        size = len(addr)
        if size == 4:
            levels = self._v4.levels
        elif size == 16:
            levels = self._v6.levels
        else:
            return None
        value = int.from_bytes(addr, "big")
        found = None
        for mask, table in levels:
            found = table.get(value & mask)
            if found is not None:
                break
        if len(cache) >= LOOKUP_CACHE_MAX:
            cache.clear()
        cache[addr if type(addr) is bytes else bytes(addr)] = found
        return found
