"""GSO split: cut a TUN "monster" packet (virtio gso_type TCPV4/TCPV6/UDP_L4) into wire-size IP packets.

Pure functions, no I/O. Public API:

- ``split(packet, gso_type, gso_size, csum_start, out) -> int``: append the segments (fresh ``bytearray``s,
  owned by the caller) to ``out`` and return how many were appended. Every segment gets its own IPv4 total
  length / incremented IPv4 ID / IPv4 header checksum (or IPv6 payload length), TCP sequence number advanced by
  the payload already sent (FIN and PSH kept only on the last segment, CWR only on the first) or UDP length,
  and a full transport checksum.
- ``finish_checksum(packet, csum_start, csum_offset) -> bytearray``: complete a NEEDS_CSUM partial checksum
  of a non-GSO packet (the field holds the pseudo-header sum; the result is the complemented sum from
  csum_start).

Malformed input raises ``MalformedPacket`` (a ``ValueError``); callers drop and count it.
"""

from __future__ import annotations

import struct

import numpy

from .checksum import IPPROTO_TCP, IPPROTO_UDP, checksum, ones_sum
from .checksum import fold as _fold
from .vnet import GSO_ECN, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4

# numpy sums every segment's payload in one vectorised pass (about 7x faster than one int per segment). Kept
# as a module attribute so that tests can set it to None and check the pure-Python sums against it.
_np = numpy
_np_add_reduce = numpy.add.reduce

TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_CWR = 0x80

_pack_into = struct.pack_into
_unpack_from = struct.unpack_from


class MalformedPacket(ValueError):
    """A packet whose headers do not describe itself consistently."""


def _transport_offset(pkt: memoryview, csum_start: int) -> int:
    version = pkt[0] >> 4
    if version == 4:
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < 20 or (csum_start and csum_start != ihl):
            raise MalformedPacket("bad IPv4 header length")
        return ihl
    if version == 6:
        offset = csum_start or 40
        if offset < 40:
            raise MalformedPacket("bad IPv6 transport offset")
        return offset
    raise MalformedPacket("not an IP packet")


def split(packet: bytes | bytearray | memoryview, gso_type: int, gso_size: int, csum_start: int,
          out: list) -> int:
    pkt = memoryview(packet)
    n = len(pkt)
    if n < 28:
        raise MalformedPacket("GSO packet too short")
    gso_type &= ~GSO_ECN
    version = pkt[0] >> 4
    if gso_type == GSO_TCPV4:
        if version != 4:
            raise MalformedPacket("TCPV4 GSO on a non-IPv4 packet")
        tcp = True
    elif gso_type == GSO_TCPV6:
        if version != 6:
            raise MalformedPacket("TCPV6 GSO on a non-IPv6 packet")
        tcp = True
    elif gso_type == GSO_UDP_L4:
        tcp = False
    else:
        raise MalformedPacket(f"unsupported GSO type {gso_type}")
    if gso_size <= 0:
        raise MalformedPacket("GSO size zero")
    t = _transport_offset(pkt, csum_start)
    v4 = version == 4
    if tcp:
        if n < t + 20:
            raise MalformedPacket("truncated TCP header")
        hlen = t + (pkt[t + 12] >> 4) * 4
        if hlen < t + 20 or hlen > n:
            raise MalformedPacket("bad TCP data offset")
        proto = IPPROTO_TCP
        csum_at = t + 16
    else:
        hlen = t + 8
        if hlen > n:
            raise MalformedPacket("truncated UDP header")
        proto = IPPROTO_UDP
        csum_at = t + 6
    if v4:
        if pkt[9] != proto:
            raise MalformedPacket("IPv4 protocol does not match the GSO type")
        addr_sum = ones_sum(pkt[12:20], proto)
    else:
        if t == 40 and pkt[6] != proto:
            raise MalformedPacket("IPv6 next header does not match the GSO type")
        addr_sum = ones_sum(pkt[8:40], proto)

    # Fields that differ per segment are zeroed in the template; their contribution to the IPv4 header and
    # transport checksums is added per segment as small integers (incremental checksums, RFC 1624 style).
    header = bytearray(pkt[:hlen])
    if v4:
        ip_id = _unpack_from("!H", header, 4)[0]
        header[2:6] = b"\0\0\0\0"
        header[10:12] = b"\0\0"
        ip_base = ones_sum(header[:t])
    if tcp:
        seq0 = _unpack_from("!I", header, t + 4)[0]
        flags0 = header[t + 13]
        header[t + 4:t + 8] = b"\0\0\0\0"
        header[t + 13] = 0
    else:
        header[t + 4:t + 6] = b"\0\0"
    header[csum_at:csum_at + 2] = b"\0\0"
    l4_base = ones_sum(header[t:hlen], addr_sum)
    payload_len = n - hlen
    longest = hlen + min(payload_len, gso_size)  # the first segment's length fields must fit 16 bits
    if (longest if v4 else longest - 40) > 0xFFFF:
        raise MalformedPacket("segment too long")
    count = max(1, -(-payload_len // gso_size))
    payload_sums = _payload_sums(pkt, hlen, n, gso_size, count)
    last = count - 1
    start = hlen
    for i in range(count):
        end = min(start + gso_size, n)
        seg = header + pkt[start:end]
        seg_len = len(seg)
        l4_len = seg_len - t
        if v4:
            seg_id = (ip_id + i) & 0xFFFF
            _pack_into("!HH", seg, 2, seg_len, seg_id)
            _pack_into("!H", seg, 10, ~_fold(ip_base + seg_len + seg_id) & 0xFFFF)
        else:
            _pack_into("!H", seg, 4, seg_len - 40)
        if tcp:
            seq = (seq0 + (start - hlen)) & 0xFFFFFFFF
            flags = flags0
            if i != last:
                flags &= ~(TCP_FIN | TCP_PSH)
            if i != 0:
                flags &= ~TCP_CWR
            seg[t + 13] = flags
            csum = ~_fold(l4_base + l4_len + payload_sums[i] + (seq >> 16) + (seq & 0xFFFF) + flags) & 0xFFFF
            _pack_into("!I", seg, t + 4, seq)
        else:
            csum = ~_fold(l4_base + l4_len + l4_len + payload_sums[i]) & 0xFFFF
            if csum == 0:
                csum = 0xFFFF  # UDP transmits a zero checksum as all ones
            _pack_into("!H", seg, t + 4, l4_len)
        _pack_into("!H", seg, csum_at, csum)
        out.append(seg)
        start = end
    return count


def _payload_sums(pkt: memoryview, hlen: int, n: int, gso_size: int, count: int) -> list[int]:
    """Per segment payload, a value congruent (mod 0xFFFF) to its ones' complement sum (odd tail zero-padded)."""
    full = (n - hlen) // gso_size
    if _np is not None and full > 1 and not gso_size & 1:
        # Little-endian words sum faster; a byte-swapped 16-bit sum is the sum times 256 (mod 0xFFFF).
        words = _np.frombuffer(pkt, dtype="<u2", count=full * gso_size // 2, offset=hlen)
        le_sums = words.reshape(full, gso_size // 2).sum(axis=1, dtype=_np.uint32).tolist()
        del words  # drop the buffer export before the caller releases `pkt`
        sums = [s << 8 for s in le_sums]
    else:
        sums = [ones_sum(pkt[hlen + i * gso_size:hlen + (i + 1) * gso_size]) for i in range(full)]
    if full < count:
        sums.append(ones_sum(pkt[hlen + full * gso_size:n]))
    return sums


def finish_checksum(packet: bytes | bytearray | memoryview, csum_start: int, csum_offset: int) -> bytearray:
    """Complete a partial (NEEDS_CSUM) checksum; returns a new bytearray."""
    n = len(packet)
    at = csum_start + csum_offset
    if at + 2 > n or csum_start >= n:
        raise MalformedPacket("checksum offsets beyond the packet")
    seg = bytearray(packet)
    if _np is not None:
        # One C reduction instead of a big-int conversion (~2 us instead of ~5.7 us for 1400 bytes).
        words = (n - csum_start) // 2
        le_sum = int(_np_add_reduce(_np.frombuffer(seg, dtype="<u2", count=words, offset=csum_start),
                                    dtype=_np.uint64))
        total = le_sum << 8  # byte-swapped 16-bit sums differ by a factor 256 (mod 0xFFFF)
        if (n - csum_start) & 1:
            total += seg[n - 1] << 8  # odd tail: high byte of a zero-padded big-endian word
        csum = ~_fold(total) & 0xFFFF
    else:
        l4 = memoryview(seg)[csum_start:]
        csum = checksum(l4)
        l4.release()
    if csum == 0 and csum_offset == 6:
        csum = 0xFFFF  # UDP transmits a zero checksum as all ones
    _pack_into("!H", seg, at, csum)
    return seg
