"""GRO coalesce: merge IP packets of the same TCP/UDP flow into TUN "monster" frames with a virtio header.

Pure functions, no I/O. Public API:

- ``coalesce(packets, *, tcp=True, udp=True) -> list[Group]``: groups in write order. A group holds one or more
  of the input packets (``group.packets``). Packets join a flow's open group only if they can be cut back into
  exactly the same packets by the kernel:
  TCP: same 5-tuple, seq contiguous, same ack / window / urgent / TCP options / TOS / TTL (IPv6: traffic class,
  flow label, hop limit), flags exactly ACK (ACK|PSH allowed and closes the group), payload equal to the first
  one's (a smaller one is allowed and closes the group), IPv4 without options or fragmentation, IPv6 without
  extension headers. UDP: same 5-tuple and TOS/TTL, payload equal to the first one's (a smaller one closes).
  At most 65535 bytes of IP packet and 64 segments per group.
  Order within a flow is kept: when a packet cannot join its flow's open group, that group is closed and later
  packets of the flow start a new group after it. Different flows may be interleaved differently than given.
- ``frame_iov(group) -> list``: buffers to hand to ``os.writev`` on a vnet-header TUN: the virtio header then
  the packet (one packet: zero header, unchanged packet; several: NEEDS_CSUM + gso type + gso_size with the
  folded pseudo-header sum in the transport checksum field, followed by every member's payload).
"""

from __future__ import annotations

import struct

from .checksum import IPPROTO_TCP, IPPROTO_UDP, fold, ones_sum
from .vnet import GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, NEEDS_CSUM, ZERO_HDR
from .vnet import pack as pack_vnet

MAX_GROUP_BYTES = 65535
MAX_SEGMENTS = 64

TCP_ACK = 0x10
TCP_PSH = 0x08

_unpack_from = struct.unpack_from
_pack_into = struct.pack_into


class Group:
    """Packets written as one TUN frame. `kind` is a virtio GSO type (GSO_NONE for a lone packet)."""

    __slots__ = ("packets", "kind", "t", "hlen", "gso_size", "total", "next_seq", "sig", "psh")

    def __init__(self, packet, kind: int = GSO_NONE, t: int = 0, hlen: int = 0, gso_size: int = 0,
                 next_seq: int = 0, sig: object = None, psh: bool = False) -> None:
        self.packets = [packet]
        self.kind = kind
        self.t = t
        self.hlen = hlen
        self.gso_size = gso_size
        self.total = hlen + gso_size
        self.next_seq = next_seq
        self.sig = sig
        self.psh = psh


def coalesce(packets: list, *, tcp: bool = True, udp: bool = True) -> list[Group]:
    groups: list[Group] = []
    # Open groups per protocol, keyed by addresses + ports (one slice: the cheapest hashable flow key).
    open_tcp: dict[bytes, Group] = {}
    open_udp: dict[bytes, Group] = {}
    append = groups.append
    for pkt in packets:
        n = len(pkt)
        if n < 20:
            append(Group(pkt))
            continue
        b0 = pkt[0]
        version = b0 >> 4
        joinable = True
        if version == 4:
            t = (b0 & 0x0F) * 4
            proto = pkt[9]
            if proto != IPPROTO_TCP and proto != IPPROTO_UDP or n < t + 8 or t < 20:
                append(Group(pkt))
                continue
            if t == 20:
                key = bytes(pkt[12:24])
                if _unpack_from("!H", pkt, 2)[0] != n or pkt[6] & 0x3F or pkt[7]:
                    joinable = False  # fragments or length mismatch
                else:
                    ipsig = (pkt[6] & 0x40) << 16 | pkt[1] << 8 | pkt[8]  # DF, TOS, TTL: all must match
            else:
                key = bytes(pkt[12:20]) + bytes(pkt[t:t + 4])
                joinable = False  # IPv4 options
            kind = GSO_TCPV4 if proto == IPPROTO_TCP else GSO_UDP_L4
        elif version == 6:
            t = 40
            proto = pkt[6]
            if proto != IPPROTO_TCP and proto != IPPROTO_UDP or n < 48:
                append(Group(pkt))
                continue
            key = bytes(pkt[8:44])
            if _unpack_from("!H", pkt, 4)[0] != n - 40:
                joinable = False
            else:
                ipsig = _unpack_from("!I", pkt, 0)[0] << 8 | pkt[7]  # traffic class, flow label, hop limit
            kind = GSO_TCPV6 if proto == IPPROTO_TCP else GSO_UDP_L4
        else:
            append(Group(pkt))
            continue

        if proto == IPPROTO_TCP:
            open_groups = open_tcp
            if joinable and tcp and n >= t + 20:
                hlen = t + (pkt[t + 12] >> 4) * 4
                flags = pkt[t + 13]
                plen = n - hlen
                joinable = hlen >= t + 20 and plen > 0 and (flags == TCP_ACK or flags == TCP_ACK | TCP_PSH)
            else:
                joinable = False
            if joinable:
                seq = _unpack_from("!I", pkt, t + 4)[0]
                sig = (ipsig, bytes(pkt[t + 8:t + 13]) + bytes(pkt[t + 14:t + 16]) + bytes(pkt[t + 18:hlen]))
                psh = flags == TCP_ACK | TCP_PSH
                g = open_groups.get(key)
                if g is not None:
                    if (seq == g.next_seq and plen <= g.gso_size and g.sig == sig
                            and g.total + plen <= MAX_GROUP_BYTES and len(g.packets) < MAX_SEGMENTS):
                        g.packets.append(pkt)
                        g.total += plen
                        g.next_seq = (seq + plen) & 0xFFFFFFFF
                        if plen < g.gso_size or psh:
                            g.psh = psh
                            del open_groups[key]
                        continue
                    del open_groups[key]
                g = Group(pkt, kind, t, hlen, plen, (seq + plen) & 0xFFFFFFFF, sig, psh)
                append(g)
                if not psh:
                    open_groups[key] = g
                continue
        else:
            open_groups = open_udp
            if joinable and udp and _unpack_from("!H", pkt, t + 4)[0] == n - t and n > t + 8:
                plen = n - t - 8
                g = open_groups.get(key)
                if g is not None:
                    if (plen <= g.gso_size and g.sig == ipsig
                            and g.total + plen <= MAX_GROUP_BYTES and len(g.packets) < MAX_SEGMENTS):
                        g.packets.append(pkt)
                        g.total += plen
                        if plen < g.gso_size:
                            del open_groups[key]
                        continue
                    del open_groups[key]
                g = Group(pkt, kind, t, t + 8, plen, 0, ipsig)
                append(g)
                open_groups[key] = g
                continue
        # Not joinable: goes out alone, and its flow's open group must not grow past it.
        open_groups.pop(key, None)
        append(Group(pkt))
    return groups


def frame_iov(group: Group) -> list:
    packets = group.packets
    if len(packets) == 1:
        return [ZERO_HDR, packets[0]]
    t = group.t
    hlen = group.hlen
    header = bytearray(memoryview(packets[0])[:hlen])
    total = group.total
    l4_len = total - t
    if group.kind == GSO_UDP_L4:
        _pack_into("!HH", header, t + 4, l4_len, 0)
        csum_offset = 6
        proto = IPPROTO_UDP
    else:
        if group.psh:
            header[t + 13] |= TCP_PSH
        header[t + 16] = header[t + 17] = 0
        csum_offset = 16
        proto = IPPROTO_TCP
    if t == 20 and header[0] >> 4 == 4:
        _pack_into("!H", header, 2, total)
        header[10] = header[11] = 0
        _pack_into("!H", header, 10, ~ones_sum(header[:20]) & 0xFFFF)
        addr_sum = ones_sum(header[12:20])
    else:
        _pack_into("!H", header, 4, total - 40)
        addr_sum = ones_sum(header[8:40])
    _pack_into("!H", header, t + csum_offset, fold(addr_sum + proto + l4_len))
    iov = [pack_vnet(NEEDS_CSUM, group.kind, hlen, group.gso_size, t, csum_offset), header]
    for pkt in packets:
        iov.append(memoryview(pkt)[hlen:])
    return iov
