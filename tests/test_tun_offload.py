"""Pure tests of GSO split / GRO coalesce / checksums (no kernel): hypothesis round trips and refusals."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from turbowg.tun import vnet
from turbowg.tun.checksum import (
    checksum,
    fold,
    ipv4_header_ok,
    ones_sum,
    pseudo_header_sum,
    transport_checksum_ok,
)
from turbowg.tun.gro import coalesce, frame_iov
from turbowg.tun.gso import MalformedPacket, finish_checksum, split

TCP, UDP = 6, 17
ACK, PSH, FIN, CWR, SYN = 0x10, 0x08, 0x01, 0x80, 0x02

V4_SRC, V4_DST = bytes([10, 1, 2, 3]), bytes([10, 9, 8, 7])
V6_SRC, V6_DST = bytes.fromhex("fd000000000000000000000000000001"), bytes.fromhex("fd00000000000000000000000000beef")


def ip_header(v6: bool, proto: int, l4_len: int, *, ttl: int = 64, tos: int = 0, ip_id: int = 0x1234,
              src: bytes | None = None, dst: bytes | None = None) -> bytearray:
    if v6:
        return bytearray(struct.pack("!IHBB16s16s", (6 << 28) | (tos << 20) | 0x12345, l4_len, proto, ttl,
                                     src or V6_SRC, dst or V6_DST))
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + l4_len, ip_id, 0x4000, ttl, proto, 0,
                                src or V4_SRC, dst or V4_DST))
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return hdr


def addr_of(pkt: bytes | bytearray) -> tuple[bytes, bytes]:
    if pkt[0] >> 4 == 4:
        return bytes(pkt[12:16]), bytes(pkt[16:20])
    return bytes(pkt[8:24]), bytes(pkt[24:40])


def tcp_packet(v6: bool, payload: bytes, *, seq: int = 1000, ack: int = 5555, flags: int = ACK,
               window: int = 512, options: bytes = b"", sport: int = 40000, dport: int = 443, ttl: int = 64,
               tos: int = 0, ip_id: int = 0x1234, partial: bool = False, src: bytes | None = None) -> bytearray:
    """A TCP packet with a full checksum, or (partial=True) with the folded pseudo-header sum as the kernel
    hands a NEEDS_CSUM/GSO packet over."""
    assert len(options) % 4 == 0
    th = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (5 + len(options) // 4) << 4, flags,
                               window, 0, 0)) + options
    l4 = th + payload
    pkt = ip_header(v6, TCP, len(l4), ttl=ttl, tos=tos, ip_id=ip_id, src=src) + l4
    t = 40 if v6 else 20
    s, d = addr_of(pkt)
    psum = pseudo_header_sum(s, d, TCP, len(l4))
    value = fold(psum) if partial else checksum(memoryview(pkt)[t:], psum)
    struct.pack_into("!H", pkt, t + 16, value)
    return pkt


def udp_packet(v6: bool, payload: bytes, *, sport: int = 51820, dport: int = 51821, ttl: int = 64,
               partial: bool = False, src: bytes | None = None, dst: bytes | None = None) -> bytearray:
    l4 = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)) + payload
    pkt = ip_header(v6, UDP, len(l4), ttl=ttl, src=src, dst=dst) + l4
    t = 40 if v6 else 20
    s, d = addr_of(pkt)
    psum = pseudo_header_sum(s, d, UDP, len(l4))
    value = fold(psum) if partial else (checksum(memoryview(pkt)[t:], psum) or 0xFFFF)
    struct.pack_into("!H", pkt, t + 6, value)
    return pkt


def l4_layout(pkt: bytes | bytearray) -> tuple[int, int, int]:
    """(transport offset, protocol, checksum field offset in the packet) of an IPv4/IPv6 TCP or UDP packet."""
    if pkt[0] >> 4 == 4:
        t, proto = (pkt[0] & 0x0F) * 4, pkt[9]
    else:
        t, proto = 40, pkt[6]
    return t, proto, t + (6 if proto == UDP else 16)


def exact_l4_checksum(pkt: bytes | bytearray) -> int:
    """The one right value of the TCP/UDP checksum field: the complement of the ones' complement sum of the
    pseudo header and the transport header+payload with the field zeroed; UDP sends a computed 0 as 0xFFFF
    (RFC 768: 0 means "no checksum"), TCP keeps it 0. transport_checksum_ok cannot tell 0x0000 from 0xFFFF
    here (both sum to all ones), this can."""
    t, proto, at = l4_layout(pkt)
    l4 = bytearray(pkt[t:])
    l4[at - t:at - t + 2] = b"\0\0"
    s, d = addr_of(pkt)
    value = checksum(l4, pseudo_header_sum(s, d, proto, len(l4)))
    return 0xFFFF if proto == UDP and value == 0 else value


def assert_exact_checksum(pkt: bytes | bytearray) -> None:
    at = l4_layout(pkt)[2]
    got, want = struct.unpack_from("!H", pkt, at)[0], exact_l4_checksum(pkt)
    assert got == want, f"checksum field {got:#06x}, want {want:#06x}"


def zero_sum_payload(v6: bool, udp: bool, size: int, seed: int) -> bytes:
    """A payload of `size` bytes (even, >= 2) whose packet (default ports and addresses, seq 1000, ACK, as
    udp_packet/tcp_packet build it) has a computed checksum of exactly 0: its last word is the complement of
    the sum of everything else."""
    assert size >= 2 and size % 2 == 0
    body = bytearray(make_payload(size, seed))
    body[-2:] = b"\0\0"
    pkt = udp_packet(v6, bytes(body)) if udp else tcp_packet(v6, bytes(body))
    field = struct.unpack_from("!H", pkt, l4_layout(pkt)[2])[0]
    raw = 0 if udp and field == 0xFFFF else field  # udp_packet already turned a computed 0 into 0xFFFF
    body[-2:] = raw.to_bytes(2, "big")
    return bytes(body)


def gso_type_of(pkt: bytes | bytearray) -> int:
    proto = pkt[9] if pkt[0] >> 4 == 4 else pkt[6]
    if proto == UDP:
        return vnet.GSO_UDP_L4
    return vnet.GSO_TCPV4 if pkt[0] >> 4 == 4 else vnet.GSO_TCPV6


def frame_bytes(group) -> bytes:
    return b"".join(bytes(b) for b in frame_iov(group))


def tcp_fields(pkt: bytes | bytearray) -> tuple:
    t = 20 if pkt[0] >> 4 == 4 else 40
    return struct.unpack_from("!II", pkt, t + 4), pkt[t + 13], bytes(pkt[t + (pkt[t + 12] >> 4) * 4:])


payload_bytes = st.integers(min_value=0, max_value=2**32 - 1)  # seed of the payload pattern


def make_payload(size: int, seed: int) -> bytes:
    return (seed.to_bytes(4, "big") * (size // 4 + 1))[:size] if size else b""


# ---------------------------------------------------------------------------------------------------------
# checksum helper


@given(st.binary(max_size=3000))
def test_ones_sum_matches_word_loop(data: bytes) -> None:
    padded = data + b"\0" * (len(data) & 1)
    total = 0
    for i in range(0, len(padded), 2):
        total += (padded[i] << 8) | padded[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    assert ones_sum(data) == total  # exactly: 0 only for all zeros, 0xFFFF ("negative zero") otherwise
    # A buffer with its checksum appended sums to all ones.
    if len(data) % 2 == 0 and any(data):
        assert ones_sum(data + checksum(data).to_bytes(2, "big")) == 0xFFFF


def test_ones_sum_zero_and_negative_zero_are_distinct() -> None:
    """0x0000 and 0xFFFF are the same number modulo 0xFFFF, but not the same checksum."""
    assert ones_sum(b"") == 0 and ones_sum(bytes(10)) == 0 and ones_sum(bytes(10), 0) == 0
    assert ones_sum(b"\xff\xff") == 0xFFFF and ones_sum(b"\x80\x00\x7f\xff") == 0xFFFF
    assert ones_sum(b"\x00\x01", 0xFFFE) == 0xFFFF and ones_sum(b"\x00\x02", 0xFFFE) == 1
    assert fold(0) == 0 and fold(0xFFFF) == 0xFFFF and fold(0x1FFFE) == 0xFFFF and fold(0x10000) == 1
    assert checksum(b"\xff\xff") == 0 and checksum(bytes(4)) == 0xFFFF


def test_udp_zero_checksum_is_sent_as_all_ones_tcp_keeps_zero() -> None:
    """A UDP checksum that computes to 0 goes out as 0xFFFF (0 would mean "no checksum") from every path
    that completes one: finish_checksum, split (first segment), and the packet builders; a TCP checksum that
    computes to 0 stays 0."""
    for v6 in (False, True):
        t = 40 if v6 else 20
        body = zero_sum_payload(v6, True, 100, 7)
        full = udp_packet(v6, body)
        assert struct.unpack_from("!H", full, t + 6)[0] == 0xFFFF == exact_l4_checksum(full)
        done = finish_checksum(udp_packet(v6, body, partial=True), t, 6)
        assert struct.unpack_from("!H", done, t + 6)[0] == 0xFFFF
        assert bytes(done) == bytes(full)
        # A monster whose first 100-byte segment has that payload: that segment's field is 0xFFFF.
        monster = udp_packet(v6, body + make_payload(150, 3), partial=True)
        segs: list = []
        assert split(memoryview(monster), vnet.GSO_UDP_L4, 100, t, segs) == 3
        assert struct.unpack_from("!H", segs[0], t + 6)[0] == 0xFFFF
        for seg in segs:
            assert_exact_checksum(seg)
        # TCP: the same situation keeps 0x0000.
        tbody = zero_sum_payload(v6, False, 100, 7)
        tfull = tcp_packet(v6, tbody)
        assert struct.unpack_from("!H", tfull, t + 16)[0] == 0 == exact_l4_checksum(tfull)
        tdone = finish_checksum(tcp_packet(v6, tbody, partial=True), t, 16)
        assert struct.unpack_from("!H", tdone, t + 16)[0] == 0 and bytes(tdone) == bytes(tfull)


# ---------------------------------------------------------------------------------------------------------
# split then coalesce round trip


@settings(max_examples=150, deadline=None)
@given(v6=st.booleans(), udp=st.booleans(), gso_size=st.integers(min_value=1, max_value=1500),
       total=st.integers(min_value=1, max_value=60000), psh=st.booleans(),
       opts=st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(range(8)), b"\x01\x01\x01\x00"]),
       seq=st.integers(min_value=0, max_value=2**32 - 1), seed=payload_bytes)
def test_split_then_coalesce_round_trip(v6: bool, udp: bool, gso_size: int, total: int, psh: bool,
                                        opts: bytes, seq: int, seed: int) -> None:
    segments_needed = -(-total // gso_size)
    if segments_needed > 64:
        total = gso_size * 64 - (seed % gso_size)
    payload = make_payload(total, seed)
    if udp:
        monster = udp_packet(v6, payload, partial=True)
        hlen, csum_offset = (48 if v6 else 28), 6
    else:
        monster = tcp_packet(v6, payload, seq=seq, flags=ACK | (PSH if psh else 0), options=opts, partial=True)
        hlen, csum_offset = (40 if v6 else 20) + 20 + len(opts), 16
    t = 40 if v6 else 20
    segs: list = []
    count = split(memoryview(monster), gso_type_of(monster), gso_size, t, segs)
    assert count == len(segs) == -(-total // gso_size)
    assert b"".join(bytes(s[hlen:]) for s in segs) == payload
    for i, seg in enumerate(segs):
        assert transport_checksum_ok(seg)
        assert_exact_checksum(seg)
        if not v6:
            assert ipv4_header_ok(seg)
            assert struct.unpack_from("!H", seg, 2)[0] == len(seg)
            assert struct.unpack_from("!H", seg, 4)[0] == (0x1234 + i) & 0xFFFF
        else:
            assert struct.unpack_from("!H", seg, 4)[0] == len(seg) - 40
        if udp:
            assert struct.unpack_from("!H", seg, t + 4)[0] == len(seg) - t
        else:
            (seg_seq, _ack), flags, _ = tcp_fields(seg)
            assert seg_seq == (seq + i * gso_size) & 0xFFFFFFFF
            assert bool(flags & PSH) == (psh and i == count - 1)

    groups = coalesce(segs)
    assert len(groups) == 1
    frame = frame_bytes(groups[0])
    if count == 1:
        assert frame[:10] == vnet.ZERO_HDR
        assert frame[10:] == finish_checksum(monster, t, csum_offset)
        return
    flags, gso_type, hdr_len, size, csum_start, off = vnet.unpack_from(frame, 0)
    assert (flags, gso_type, hdr_len, size, csum_start, off) == (
        vnet.NEEDS_CSUM, gso_type_of(monster), hlen, gso_size, t, csum_offset)
    # Byte-identical to the monster the kernel produced (partial checksum included)...
    assert frame[10:] == monster
    # ...and once its checksum is completed it verifies, with exactly the right value.
    completed = finish_checksum(frame[10:], t, csum_offset)
    assert transport_checksum_ok(completed)
    assert_exact_checksum(completed)


@settings(max_examples=60, deadline=None)
@given(v6=st.booleans(), gso_size=st.integers(min_value=1, max_value=400),
       flags=st.sets(st.sampled_from([FIN, PSH, CWR]), max_size=3), seed=payload_bytes)
def test_split_moves_fin_psh_to_last_and_cwr_to_first(v6: bool, gso_size: int, flags: set, seed: int) -> None:
    f = ACK | sum(flags)
    monster = tcp_packet(v6, make_payload(gso_size * 3 + 1, seed), flags=f, partial=True)
    segs: list = []
    split(monster, gso_type_of(monster), gso_size, 40 if v6 else 20, segs)
    got = [tcp_fields(s)[1] for s in segs]
    assert got[0] == f & ~(FIN | PSH)
    assert all(g == ACK for g in got[1:-1])
    assert got[-1] == f & ~CWR


def test_split_rejects_malformed() -> None:
    monster = tcp_packet(False, b"x" * 3000, partial=True)
    for bad in (
        lambda: split(monster, vnet.GSO_TCPV6, 1000, 20, []),   # wrong family
        lambda: split(monster, vnet.GSO_TCPV4, 0, 20, []),      # zero gso_size
        lambda: split(monster[:30], vnet.GSO_TCPV4, 100, 20, []),  # truncated
        lambda: split(monster, 99, 100, 20, []),
        lambda: finish_checksum(monster[:25], 20, 16),
    ):
        try:
            bad()
        except MalformedPacket:
            continue
        raise AssertionError("malformed packet accepted")


def test_finish_checksum_for_plain_packets() -> None:
    for v6 in (False, True):
        t = 40 if v6 else 20
        for pkt, off in ((tcp_packet(v6, b"hello", flags=SYN, partial=True), 16),
                         (udp_packet(v6, b"hello world", partial=True), 6)):
            assert not transport_checksum_ok(pkt)
            done = finish_checksum(pkt, t, off)
            assert transport_checksum_ok(done)
            assert_exact_checksum(done)


# ---------------------------------------------------------------------------------------------------------
# coalesce refusals and ordering


def run_of(v6: bool, n: int, size: int = 100, seq: int = 1, **kw) -> list[bytearray]:
    return [tcp_packet(v6, bytes([i]) * size, seq=seq + i * size, **kw) for i in range(n)]


def sizes(groups) -> list[int]:
    return [len(g.packets) for g in groups]


def test_tcp_refusals() -> None:
    for v6 in (False, True):
        base = run_of(v6, 3)
        assert sizes(coalesce(base)) == [3]
        other_flow = tcp_packet(v6, b"z" * 100, seq=301, sport=1)
        assert sizes(coalesce(base[:2] + [other_flow])) == [2, 1]
        gap = tcp_packet(v6, b"z" * 100, seq=302)
        assert sizes(coalesce(base[:2] + [gap])) == [2, 1]
        for kw in ({"ack": 1}, {"window": 1}, {"ttl": 3}, {"tos": 4}, {"options": b"\x01\x01\x01\x00"},
                   {"flags": ACK | FIN}, {"flags": ACK | CWR}, {"flags": ACK | 0x20}):
            odd = tcp_packet(v6, b"z" * 100, seq=201, **kw)
            assert sizes(coalesce(base[:2] + [odd])) == [2, 1], kw
        bigger = tcp_packet(v6, b"z" * 101, seq=201)
        assert sizes(coalesce(base[:2] + [bigger])) == [2, 1]
        # after a smaller one nothing more joins
        smaller = tcp_packet(v6, b"z" * 50, seq=201)
        after = tcp_packet(v6, b"z" * 50, seq=251)
        assert sizes(coalesce(base[:2] + [smaller, after])) == [3, 1]
        # PSH closes the group, as the last member
        pushed = tcp_packet(v6, b"z" * 100, seq=201, flags=ACK | PSH)
        after = tcp_packet(v6, b"z" * 100, seq=301)
        groups = coalesce(base[:2] + [pushed, after])
        assert sizes(groups) == [3, 1]
        assert frame_bytes(groups[0])[10 + (40 if v6 else 20) + 13] & PSH
        # pure ACKs never join
        assert sizes(coalesce(run_of(v6, 3, size=0))) == [1, 1, 1]


def test_ipv4_options_and_fragments_are_not_coalesced() -> None:
    base = run_of(False, 3)
    frag = bytearray(base[2])
    frag[6] |= 0x20  # MF
    assert sizes(coalesce(base[:2] + [frag])) == [2, 1]
    assert sizes(coalesce([frag] + base[:2])) == [1, 2]


def test_size_limits() -> None:
    # 64 KiB of IP packet per monster
    big = run_of(False, 60, size=1400)
    groups = coalesce(big)
    assert sizes(groups) == [46, 14]
    assert all(g.total <= 65535 for g in groups)
    # at most 64 UDP segments
    small = [udp_packet(True, bytes([i]) * 10) for i in range(150)]
    assert sizes(coalesce(small)) == [64, 64, 22]


def test_udp_refusals() -> None:
    for v6 in (False, True):
        dgrams = [udp_packet(v6, b"a" * 300) for _ in range(3)]
        assert sizes(coalesce(dgrams)) == [3]
        assert sizes(coalesce(dgrams[:2] + [udp_packet(v6, b"a" * 301)])) == [2, 1]
        assert sizes(coalesce(dgrams[:2] + [udp_packet(v6, b"a" * 200), udp_packet(v6, b"a" * 200)])) == [3, 1]
        assert sizes(coalesce(dgrams[:2] + [udp_packet(v6, b"a" * 300, sport=9)])) == [2, 1]
        assert sizes(coalesce(dgrams[:2] + [udp_packet(v6, b"a" * 300, ttl=9)])) == [2, 1]
        assert sizes(coalesce(dgrams, udp=False)) == [1, 1, 1]
        assert sizes(coalesce(run_of(v6, 3), tcp=False)) == [1, 1, 1]
    # IPv4 DF differs: the kernel would give every segment the first one's DF, so they must not coalesce.
    plain = udp_packet(False, b"a" * 300)
    with_df = bytearray(plain)
    with_df[6] ^= 0x40  # flip DF
    with_df[10:12] = b"\0\0"
    with_df[10:12] = (~ones_sum(bytes(with_df[:20])) & 0xFFFF).to_bytes(2, "big")
    assert sizes(coalesce([plain, plain, bytes(with_df)])) == [2, 1]


def test_non_ip_and_garbage_pass_through_alone() -> None:
    junk = [b"", b"\x00" * 10, b"\x60" + b"\x00" * 5, bytes([0x45]) + b"\x00" * 30]
    groups = coalesce(junk)
    assert [g.packets[0] for g in groups] == junk
    assert [frame_bytes(g) for g in groups] == [vnet.ZERO_HDR + j for j in junk]


def flatten(groups) -> list:
    return [bytes(p) for g in groups for p in g.packets]


@settings(max_examples=120, deadline=None)
@given(plan=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["data", "ack", "psh", "small", "gap"])),
                     min_size=1, max_size=80))
def test_order_within_each_flow_is_kept(plan: list) -> None:
    """Random interleavings of four flows (2 TCP, 2 UDP) with disruptive packets: per flow, the packets come
    out of the groups in the order they went in, and every multi-packet group is a valid monster."""
    next_seq = {0: 1, 1: 1}
    packets = []
    for flow, kind in plan:
        size = {"small": 30, "ack": 0}.get(kind, 100)
        if flow < 2:
            if kind == "gap":
                next_seq[flow] += 7
            pkt = tcp_packet(flow == 1, bytes([len(packets) & 0xFF]) * size, seq=next_seq[flow],
                             flags=ACK | (PSH if kind == "psh" else 0))
            next_seq[flow] += size
        else:
            pkt = udp_packet(flow == 3, bytes([len(packets) & 0xFF]) * max(size, 1), sport=flow)
        packets.append(bytes(pkt))
    groups = coalesce(packets)
    out = flatten(groups)
    assert sorted(out) == sorted(packets)
    for flow_pkts in group_by_flow(packets).values():
        got = [p for p in out if p in set(flow_pkts)]
        assert got == flow_pkts
    # Group positions: within a flow, each group's packets follow the previous group's.
    for g in groups:
        if len(g.packets) > 1:
            frame = frame_bytes(g)
            _, gso_type, _, size, start, off = vnet.unpack_from(frame, 0)
            monster = frame[10:]
            segs: list = []
            split(monster, gso_type, size, start, segs)
            assert [bytes(s) for s in segs] == [fix_id(bytes(p), bytes(g.packets[0]), i)
                                                for i, p in enumerate(g.packets)]


def fix_id(pkt: bytes, first: bytes, i: int) -> bytes:
    """Segments get IPv4 IDs counting up from the first packet's; the fixtures all use one ID."""
    if pkt[0] >> 4 != 4:
        return pkt
    b = bytearray(pkt)
    struct.pack_into("!H", b, 4, (struct.unpack_from("!H", first, 4)[0] + i) & 0xFFFF)
    b[10:12] = b"\0\0"
    struct.pack_into("!H", b, 10, checksum(b[:20]))
    return bytes(b)


def group_by_flow(packets: list[bytes]) -> dict:
    flows: dict = {}
    for p in packets:
        t = 20 if p[0] >> 4 == 4 else 40
        key = (p[0] >> 4, addr_of(p), p[t:t + 4])
        flows.setdefault(key, []).append(p)
    return flows


def test_memoryview_inputs_give_the_same_frames() -> None:
    """The device core may hand over memoryviews into its buffers."""
    packets = run_of(False, 5) + run_of(True, 3) + [udp_packet(False, b"q" * 50) for _ in range(4)]
    as_bytes = [frame_bytes(g) for g in coalesce([bytes(p) for p in packets])]
    as_views = [frame_bytes(g) for g in coalesce([memoryview(p) for p in packets])]
    assert as_bytes == as_views and len(as_bytes) == 3
