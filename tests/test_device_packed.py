"""The packed data path of the device core (handle_tun_packed / handle_udp_packed), sans-IO: two Devices back
to back, the packed output of one fed to the other as one UDP_GRO-like read, checked against the list-based
path (handle_tun_batch / handle_udp_batch) that the rest of the core tests use."""

from __future__ import annotations

import ipaddress
from array import array

from test_device_core import A_ENDPOINT, A_V4, A_V6, B_ENDPOINT, B_V4, B_V6, Pair, ipv4_packet, ipv6_packet

from turbowg.device import Device, PackedTransmit
from turbowg.noise.primitives import public_key
from turbowg.uapi.model import DeviceUpdate, PeerUpdate


def stage(packets: list[bytes], runs: list[list[int]] | None = None) -> tuple[bytearray, array, list[int]]:
    """Packets back to back plus a layout; runs default to one per packet."""
    buf = bytearray()
    layout = array("i")
    for p in packets:
        layout.extend([len(buf), len(p)])
        buf += p
    flat: list[int] = []
    for start, count in runs or [[k, 1] for k in range(len(packets))]:
        flat += [start, count]
    return buf, layout, flat


def messages(device: Device, item: PackedTransmit) -> list[bytes]:
    out = []
    pos = item.offset
    for k in range(item.sizes_start, item.sizes_start + item.count):
        size = device.tx_sizes[k]
        out.append(bytes(device.tx_buffer[pos:pos + size]))
        pos += size
    assert pos == item.offset + item.nbytes
    return out


def as_reads(grams: list[bytes]) -> tuple[bytearray, list[int]]:
    """Datagrams as reads: runs of equal size (a shorter one may end a run) become one GRO read each."""
    buf = bytearray()
    chunks: list[int] = []
    i = 0
    while i < len(grams):
        stride = len(grams[i])
        j = i + 1
        while j < len(grams) and len(grams[j]) <= stride:
            j += 1
            if len(grams[j - 1]) < stride:
                break
        start = len(buf)
        for g in grams[i:j]:
            buf += g
        chunks += [start, len(buf), stride]
        i = j
    return buf, chunks


def inner(device: Device, buf: bytearray, n: int) -> list[bytes]:
    layout = device.rx_layout
    return [bytes(buf[layout[2 * k]:layout[2 * k] + layout[2 * k + 1]]) for k in range(n)]


def test_packed_both_ways_matches_list_path() -> None:
    pair = Pair()
    pair.handshake()
    packets = [ipv4_packet(A_V4, B_V4, bytes([i]) * 1380) for i in range(10)]
    packets.append(ipv4_packet(A_V4, B_V4, b"tail"))
    packets.append(ipv6_packet(A_V6, B_V6, b"six" * 100))
    buf, layout, runs = stage(packets, [[0, 11], [11, 1]])
    packed, other = pair.a.handle_tun_packed(buf, layout, runs, pair.now)
    assert other == [] and len(packed) == 1 and packed[0].endpoint == B_ENDPOINT and packed[0].count == 12
    grams = messages(pair.a, packed[0])
    # The same bytes the list path makes, but for the counters (each message has its own).
    assert [len(g) for g in grams] == [32 + 1408] * 10 + [32 + 32, 32 + 352]
    rbuf, chunks = as_reads(grams)
    assert len(chunks) == 2 * 3  # ten full + the shorter 'tail' in one read, the v6 packet alone
    n, out = pair.b.handle_udp_packed(rbuf, chunks, [A_ENDPOINT, A_ENDPOINT], pair.now)
    assert out == [] and inner(pair.b, rbuf, n) == packets
    assert pair.b.counters["rx_source_not_allowed"] == 0
    # Replayed: every message refused, nothing written, counted.
    rbuf, chunks = as_reads(grams)
    n, _ = pair.b.handle_udp_packed(rbuf, chunks, [A_ENDPOINT, A_ENDPOINT], pair.now)
    assert n == 0 and pair.b.counters["rx_replay"] == 12
    # b -> a through the list path on b's side, packed on a's: both paths speak the same protocol.
    replies = [ipv4_packet(B_V4, A_V4, b"r" * 500)]
    grams = pair.datagrams(pair.b.handle_tun_batch(replies, pair.now), A_ENDPOINT)
    rbuf, chunks = as_reads(grams)
    n, _ = pair.a.handle_udp_packed(rbuf, chunks, [B_ENDPOINT], pair.now)
    assert inner(pair.a, rbuf, n) == replies
    # Byte counters agree with what crossed.
    assert pair.a_peer.tx_bytes >= sum(len(m) for m in messages(pair.a, packed[0]))


def test_packed_handshake_staging_and_confirmation() -> None:
    """Before any session the packed path stages (copies) the packets and starts a handshake; the
    handshake and the staged packets then cross through the packed receive path."""
    pair = Pair()
    first = [ipv4_packet(A_V4, B_V4, b"one"), ipv4_packet(A_V4, B_V4, b"two")]
    buf, layout, runs = stage(first)
    packed, initiation = pair.a.handle_tun_packed(buf, layout, runs, pair.now)
    assert packed == [] and [len(d) for d in pair.datagrams(initiation, B_ENDPOINT)] == [148]
    buf[:] = bytes(len(buf))  # the runtime reuses its stage: staged packets must be copies
    rbuf, chunks = as_reads(pair.datagrams(initiation, B_ENDPOINT))
    n, response = pair.b.handle_udp_packed(rbuf, chunks, [A_ENDPOINT], pair.now)
    assert n == 0 and [len(d) for d in pair.datagrams(response, A_ENDPOINT)] == [92]
    rbuf, chunks = as_reads(pair.datagrams(response, A_ENDPOINT))
    n, staged = pair.a.handle_udp_packed(rbuf, chunks, [B_ENDPOINT], pair.now)
    assert n == 0
    assert pair.b_peer.keypairs.next is not None and pair.b_peer.keypairs.current is None
    rbuf, chunks = as_reads(pair.datagrams(staged, B_ENDPOINT))
    n, _ = pair.b.handle_udp_packed(rbuf, chunks, [A_ENDPOINT] * (len(chunks) // 3), pair.now)
    assert inner(pair.b, rbuf, n) == first
    assert pair.b_peer.keypairs.current is not None and pair.b_peer.keypairs.next is None
    assert pair.b_peer.endpoint == A_ENDPOINT


def test_packed_receive_drops_and_counts_bad_input() -> None:
    pair = Pair()
    pair.handshake()
    good = [ipv4_packet(A_V4, B_V4, b"g" * 1000) for _ in range(3)]
    spoofed = ipv4_packet("10.9.9.9", B_V4, b"s" * 1000)  # a source b does not allow for a
    buf, layout, runs = stage([good[0], spoofed, good[1], good[2]])
    packed, _ = pair.a.handle_tun_packed(buf, layout, runs, pair.now)
    grams = messages(pair.a, packed[0])
    forged = bytearray(grams[2])
    forged[-1] ^= 0xFF
    junk = [b"\x09junk", b"\x01\x00", bytes(20)]
    rbuf, chunks = as_reads([grams[0], grams[1], bytes(forged), grams[3]])
    for j in junk:
        chunks += [len(rbuf), len(rbuf) + len(j), len(j)]
        rbuf += j
    endpoints = [A_ENDPOINT] * (len(chunks) // 3)
    n, out = pair.b.handle_udp_packed(rbuf, chunks, endpoints, pair.now)
    assert out == [] and inner(pair.b, rbuf, n) == [good[0], good[2]]
    counters = pair.b.counters
    assert counters["rx_source_not_allowed"] == 1
    assert counters["rx_decrypt_failed"] == 1
    assert counters["rx_unknown_type"] == 1 + 1  # type 9, and type 0 of the 20 zero bytes
    assert counters["rx_too_short"] == 1
    # The tunnel still works afterwards.
    buf, layout, runs = stage([good[0]])
    packed, _ = pair.a.handle_tun_packed(buf, layout, runs, pair.now)
    rbuf, chunks = as_reads(messages(pair.a, packed[0]))
    n, _ = pair.b.handle_udp_packed(rbuf, chunks, [A_ENDPOINT], pair.now)
    assert inner(pair.b, rbuf, n) == [good[0]]


def test_allowed_source_cache_follows_allowed_ips_changes() -> None:
    pair = Pair()
    pair.handshake()
    packet = ipv4_packet(A_V4, B_V4, b"p" * 200)

    def cross() -> int:
        buf, layout, runs = stage([packet])
        packed, _ = pair.a.handle_tun_packed(buf, layout, runs, pair.now)
        rbuf, chunks = as_reads(messages(pair.a, packed[0]))
        n, _ = pair.b.handle_udp_packed(rbuf, chunks, [A_ENDPOINT], pair.now)
        return n

    assert cross() == 1 and pair.b_peer.allowed_src == ipaddress.IPv4Address(A_V4).packed
    # Take 10.0.0.1 away from a on b: the cached source must not keep letting it in.
    pair.b.apply_update(DeviceUpdate(peers=[PeerUpdate(
        public_key=public_key(pair.a_key), replace_allowed_ips=True,
        allowed_ips=[ipaddress.ip_network("fd00::1/128")])]), now=pair.now)
    assert cross() == 0 and pair.b.counters["rx_source_not_allowed"] == 1


def test_packed_send_routes_per_peer_and_counts_unroutable() -> None:
    pair = Pair()
    pair.handshake()
    packets = [ipv4_packet(A_V4, "10.7.7.7", b"nowhere"), b"\x45" + bytes(5), ipv4_packet(A_V4, B_V4, b"ok")]
    buf, layout, runs = stage(packets)
    packed, _ = pair.a.handle_tun_packed(buf, layout, runs, pair.now)
    assert len(packed) == 1 and packed[0].count == 1
    assert pair.a.counters["tun_no_route"] == 1 and pair.a.counters["tun_too_short"] == 1


def test_interleaved_packets_to_two_peers_go_to_each_intact() -> None:
    """a has peers b (10.0.0.2) and c (10.0.0.3): one staged batch interleaving both is split per peer,
    in order, each peer's messages back to back in tx_buffer."""
    import random

    from turbowg.noise.primitives import generate_private_key

    pair = Pair()
    pair.handshake()
    c_key = generate_private_key()
    c = Device(private_key=c_key, wall_clock=pair.wall_clock, rng=random.Random(3))
    c_endpoint = ("192.0.2.3", 51822)
    c.apply_update(DeviceUpdate(listen_port=c_endpoint[1], peers=[PeerUpdate(
        public_key=public_key(pair.a_key), allowed_ips=[ipaddress.ip_network("10.0.0.1/32")])]), now=pair.now)
    pair.a.apply_update(DeviceUpdate(peers=[PeerUpdate(
        public_key=public_key(c_key), endpoint=c_endpoint,
        allowed_ips=[ipaddress.ip_network("10.0.0.3/32")])]), now=pair.now)
    # Handshake a <-> c through the packed paths.
    buf, layout, runs = stage([ipv4_packet(A_V4, "10.0.0.3", b"hi")])
    _, init = pair.a.handle_tun_packed(buf, layout, runs, pair.now)
    rbuf, chunks = as_reads(pair.datagrams(init, c_endpoint))
    _, resp = c.handle_udp_packed(rbuf, chunks, [A_ENDPOINT], pair.now)
    rbuf, chunks = as_reads(pair.datagrams(resp, A_ENDPOINT))
    _, staged = pair.a.handle_udp_packed(rbuf, chunks, [c_endpoint], pair.now)
    rbuf, chunks = as_reads(pair.datagrams(staged, c_endpoint))
    c.handle_udp_packed(rbuf, chunks, [A_ENDPOINT], pair.now)

    to_b = [ipv4_packet(A_V4, B_V4, bytes([i]) * 700) for i in range(6)]
    to_c = [ipv4_packet(A_V4, "10.0.0.3", bytes([100 + i]) * 700) for i in range(6)]
    mixed = [p for pair_ in zip(to_b, to_c, strict=True) for p in pair_] + to_b[:1] + to_b[:1]
    buf, layout, runs = stage(mixed)
    packed, other = pair.a.handle_tun_packed(buf, layout, runs, pair.now)
    assert other == [] and {item.endpoint for item in packed} == {B_ENDPOINT, c_endpoint}
    for item in packed:
        device, expected = (pair.b, to_b + to_b[:1] * 2) if item.endpoint == B_ENDPOINT else (c, to_c)
        rbuf, chunks = as_reads(messages(pair.a, item))
        n, _ = device.handle_udp_packed(rbuf, chunks, [A_ENDPOINT] * (len(chunks) // 3), pair.now)
        assert inner(device, rbuf, n) == expected
