"""Internet checksums (RFC 1071) for IPv4 headers and TCP/UDP over IPv4/IPv6.

Pure functions; no I/O. The ones' complement sum of a buffer is computed by reading the whole buffer as one
big-endian integer and reducing it modulo 0xFFFF: 2**16 == 1 (mod 0xFFFF), so the remainder equals the sum of
the 16-bit words folded with end-around carry. That runs in C over the whole payload, which is far faster than
summing words in a Python loop.

Sums are returned in 0..0xFFFF where 0xFFFF is the ones' complement "negative zero" of a non-zero buffer.
"""

from __future__ import annotations

IPPROTO_TCP = 6
IPPROTO_UDP = 17

_from_bytes = int.from_bytes


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Ones' complement sum of `data` (odd lengths padded with a zero byte) plus `initial`, folded to 16 bits."""
    value = _from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    value += initial
    if value == 0:
        return 0
    folded = value % 0xFFFF
    return folded if folded else 0xFFFF


def fold(value: int) -> int:
    """Fold an unbounded non-negative sum to 16 bits with end-around carry."""
    if value == 0:
        return 0
    folded = value % 0xFFFF
    return folded if folded else 0xFFFF


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The value to store in a checksum field: the complement of the ones' complement sum."""
    return ~ones_sum(data, initial) & 0xFFFF


def pseudo_header_sum(src: bytes | memoryview, dst: bytes | memoryview, proto: int, length: int) -> int:
    """Unfolded-safe sum of the TCP/UDP pseudo header (IPv4 or IPv6 addresses; `length` is the L4 length)."""
    return ones_sum(src, ones_sum(dst, proto + length))


def ipv4_header_checksum(header: bytes | bytearray | memoryview) -> int:
    """Checksum of an IPv4 header whose checksum field is zero."""
    return ~ones_sum(header) & 0xFFFF


def transport_checksum_ok(packet: bytes | bytearray | memoryview) -> bool:
    """True if the TCP or UDP checksum of a complete IPv4/IPv6 packet (no IPv6 extension headers) verifies."""
    mv = memoryview(packet)
    version = mv[0] >> 4
    if version == 4:
        ihl = (mv[0] & 0x0F) * 4
        proto = mv[9]
        src, dst, l4 = mv[12:16], mv[16:20], mv[ihl:]
    elif version == 6:
        proto = mv[6]
        src, dst, l4 = mv[8:24], mv[24:40], mv[40:]
    else:
        return False
    if proto == IPPROTO_UDP and l4[6] == 0 and l4[7] == 0 and version == 4:
        return True  # IPv4 UDP may carry no checksum
    return ones_sum(l4, pseudo_header_sum(src, dst, proto, len(l4))) == 0xFFFF


def ipv4_header_ok(packet: bytes | bytearray | memoryview) -> bool:
    mv = memoryview(packet)
    ihl = (mv[0] & 0x0F) * 4
    return ones_sum(mv[:ihl]) == 0xFFFF
