"""The virtio-net header that prefixes every TUN frame when IFF_VNET_HDR is on (10 bytes, no num_buffers).

Layout (host byte order, as the kernel's tun driver uses on little-endian hosts):
flags u8, gso_type u8, hdr_len u16, gso_size u16, csum_start u16, csum_offset u16.

- flags & NEEDS_CSUM: the transport checksum is partial: the field at csum_start + csum_offset holds the folded
  pseudo-header sum and the receiver must finish it over bytes [csum_start:].
- gso_type: NONE, TCPV4, TCPV6 or UDP_L4 (with ECN bit 0x80 possible): the packet is a "monster" to be cut into
  gso_size-byte payload segments.
"""

from __future__ import annotations

import struct

VNET_HDR_LEN = 10

NEEDS_CSUM = 1
DATA_VALID = 2

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3  # UFO, obsolete
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

_HDR = struct.Struct("=BBHHHH")
unpack_from = _HDR.unpack_from
pack_into = _HDR.pack_into

ZERO_HDR = bytes(VNET_HDR_LEN)


def pack(flags: int, gso_type: int, hdr_len: int, gso_size: int, csum_start: int, csum_offset: int) -> bytes:
    return _HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
