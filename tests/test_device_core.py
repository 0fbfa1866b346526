"""Two sans-IO Devices wired back to back: each one's transmits fed into the other's UDP input."""

from __future__ import annotations

import errno
import ipaddress
import os
import random
import struct

import pytest

from turbowg.device import Device, Transmit
from turbowg.noise.primitives import generate_private_key, public_key
from turbowg.uapi.model import DeviceUpdate, PeerUpdate, UAPIError

A_ENDPOINT = ("192.0.2.1", 51820)
B_ENDPOINT = ("2001:db8::2", 51821)
A_V4, B_V4 = "10.0.0.1", "10.0.0.2"
A_V6, B_V6 = "fd00::1", "fd00::2"


def ipv4_packet(src: str, dst: str, payload: bytes) -> bytes:
    header = bytearray(20)
    header[0] = 0x45
    struct.pack_into("!H", header, 2, 20 + len(payload))
    header[8] = 64
    header[9] = 17
    header[12:16] = ipaddress.IPv4Address(src).packed
    header[16:20] = ipaddress.IPv4Address(dst).packed
    return bytes(header) + payload


def ipv6_packet(src: str, dst: str, payload: bytes) -> bytes:
    header = bytearray(40)
    header[0] = 0x60
    struct.pack_into("!H", header, 4, len(payload))
    header[6] = 17
    header[7] = 64
    header[8:24] = ipaddress.IPv6Address(src).packed
    header[24:40] = ipaddress.IPv6Address(dst).packed
    return bytes(header) + payload


class Pair:
    """Device a (192.0.2.1, owns 10.0.0.1 and fd00::1) and b (2001:db8::2, 10.0.0.2, fd00::2)."""

    def __init__(self, psk: bytes | None = None) -> None:
        self.now = 1000.0
        # Wall clock follows the monotonic one (TAI64N timestamps must grow between handshakes).
        self.wall_offset = 1_700_000_000.25 - self.now
        self.a_key, self.b_key = generate_private_key(), generate_private_key()
        self.a = Device(private_key=self.a_key, wall_clock=self.wall_clock, rng=random.Random(1))
        self.b = Device(private_key=self.b_key, wall_clock=self.wall_clock, rng=random.Random(2))
        self.a.apply_update(
            DeviceUpdate(
                listen_port=A_ENDPOINT[1],
                peers=[
                    PeerUpdate(
                        public_key=public_key(self.b_key),
                        endpoint=B_ENDPOINT,
                        preshared_key=psk,
                        allowed_ips=[
                            ipaddress.ip_network("10.0.0.2/32"),
                            ipaddress.ip_network("fd00::2/128"),
                        ],
                    )
                ],
            ),
            now=self.now,
        )
        # b learns a's endpoint from a's handshake (roaming), so none is configured.
        self.b.apply_update(
            DeviceUpdate(
                listen_port=B_ENDPOINT[1],
                peers=[
                    PeerUpdate(
                        public_key=public_key(self.a_key),
                        preshared_key=psk,
                        allowed_ips=[
                            ipaddress.ip_network("10.0.0.1/32"),
                            ipaddress.ip_network("fd00::1/128"),
                        ],
                    )
                ],
            ),
            now=self.now,
        )
        self.a_peer = self.a.peers[public_key(self.b_key)]
        self.b_peer = self.b.peers[public_key(self.a_key)]

    def wall_clock(self) -> float:
        return self.now + self.wall_offset

    @staticmethod
    def datagrams(transmits: list[Transmit], endpoint: tuple[str, int]) -> list[bytes]:
        out = []
        for transmit in transmits:
            assert transmit.endpoint == endpoint
            out.extend(bytes(d) for d in transmit.datagrams)
        return out

    def a_to_b(self, transmits: list[Transmit], src=A_ENDPOINT, under_load=False):
        grams = self.datagrams(transmits, B_ENDPOINT)
        return self.b.handle_udp_batch([(g, src) for g in grams], self.now, under_load=under_load)

    def b_to_a(self, transmits: list[Transmit], under_load=False):
        grams = self.datagrams(transmits, A_ENDPOINT)
        return self.a.handle_udp_batch([(g, B_ENDPOINT) for g in grams], self.now, under_load=under_load)

    def handshake(self) -> None:
        """a sends a packet; the handshake completes and the packet arrives; b is confirmed."""
        first = ipv4_packet(A_V4, B_V4, b"hello")
        initiation = self.a.handle_tun_batch([first], self.now)
        assert [len(d) for d in self.datagrams(initiation, B_ENDPOINT)] == [148]
        tun_b, response = self.a_to_b(initiation)
        assert tun_b == []
        assert [len(d) for d in self.datagrams(response, A_ENDPOINT)] == [92]
        tun_a, staged = self.b_to_a(response)
        assert tun_a == []
        tun_b, nothing = self.a_to_b(staged)
        assert tun_b == [first]
        assert nothing == []


def test_handshake_and_ipv4_ipv6_both_ways() -> None:
    pair = Pair(psk=os.urandom(32))
    pair.handshake()
    assert pair.b_peer.endpoint == A_ENDPOINT
    packets = [
        ipv4_packet(A_V4, B_V4, b"x" * 100),
        ipv6_packet(A_V6, B_V6, b"y" * 1000),
        ipv4_packet(A_V4, B_V4, b""),
        ipv6_packet(A_V6, B_V6, b"z" * 1380),  # 1420 bytes: exactly the MTU
    ]
    transmits = pair.a.handle_tun_batch(packets, pair.now)
    assert len(transmits) == 1 and len(transmits[0].datagrams) == 4
    # Padding: plaintext rounded up to 16, capped at the MTU.
    assert [len(d) for d in transmits[0].datagrams] == [32 + 128, 32 + 1040, 32 + 32, 32 + 1420]
    tun_b, out = pair.a_to_b(transmits)
    assert tun_b == packets and out == []
    replies = [ipv4_packet(B_V4, A_V4, b"back"), ipv6_packet(B_V6, A_V6, b"back6" * 50)]
    tun_a, out = pair.b_to_a(pair.b.handle_tun_batch(replies, pair.now))
    assert tun_a == replies and out == []


def test_responder_confirms_on_first_data() -> None:
    pair = Pair()
    initiation = pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"1")], pair.now)
    _, response = pair.a_to_b(initiation)
    keypairs = pair.b_peer.keypairs
    assert keypairs.current is None and keypairs.next is not None
    # The responder may not send under an unconfirmed keypair: its packet waits (and, like
    # wireguard-go, it asks for a handshake of its own, which we do not deliver here).
    early = pair.b.handle_tun_batch([ipv4_packet(B_V4, A_V4, b"early")], pair.now)
    assert [len(d) for d in pair.datagrams(early, A_ENDPOINT)] == [148]
    assert len(pair.b_peer.staged) == 1
    assert pair.b.snapshot().peers[0].last_handshake_time_sec == 0
    _, staged = pair.b_to_a(response)
    pending = keypairs.next
    tun_b, released = pair.a_to_b(staged)
    assert keypairs.current is pending and keypairs.next is None
    snapshot = pair.b.snapshot().peers[0]
    assert (snapshot.last_handshake_time_sec, snapshot.last_handshake_time_nsec) == (
        1_700_000_000,
        250_000_000,
    )
    # The confirmed keypair lets the staged packet out.
    tun_a, _ = pair.b_to_a(released)
    assert tun_a == [ipv4_packet(B_V4, A_V4, b"early")]


def test_spoofed_inner_source_dropped() -> None:
    pair = Pair()
    pair.handshake()
    pair.a.allowed_ips.insert(ipaddress.ip_network("10.9.0.0/16"), pair.a_peer)  # route only on a
    spoofed = pair.a.handle_tun_batch([ipv4_packet("10.0.0.99", "10.9.0.1", b"spoof")], pair.now)
    # ... the inner source 10.0.0.99 is not among a's allowed IPs on b.
    tun_b, out = pair.a_to_b(spoofed)
    assert tun_b == [] and out == []
    assert pair.b.counters["rx_source_not_allowed"] == 1


def test_replayed_data_dropped_and_counted() -> None:
    pair = Pair()
    pair.handshake()
    transmits = pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"once")], pair.now)
    assert len(pair.a_to_b(transmits)[0]) == 1
    tun_b, out = pair.a_to_b(transmits)
    assert tun_b == [] and out == []
    assert pair.b.counters["rx_replay"] == 1


def test_malformed_datagrams_dropped_counted_unanswered() -> None:
    pair = Pair()
    pair.handshake()
    good = bytes(pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"ok")], pair.now)[0].datagrams[0])
    rng = random.Random(7)
    bad = (
        [
            b"",
            b"\x04\x00",
            good[:31],  # shorter than header + tag
            good[:-1],  # truncated: fails authentication
            good + b"\x00",  # oversized
            bytes([1]) + bytes(3) + os.urandom(143),  # initiation one byte short
            bytes([1]) + bytes(3) + os.urandom(148),  # initiation one byte long
            bytes([1]) + bytes(3) + os.urandom(144),  # right size, bad mac1
            bytes([2]) + bytes(3) + os.urandom(88),  # response, bad mac1
            bytes([3]) + bytes(3) + os.urandom(60),  # cookie reply to an unknown index
            bytes([5]) + bytes(3) + os.urandom(60),  # unknown type
            bytes([4, 0, 0, 1]) + good[4:],  # type word is 0x01000004
            struct.pack("<IIQ", 4, 0xDEADBEEF, 0) + bytes(32),  # unknown receiver index
        ]
        + [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300))) for _ in range(200)]
    )
    before_rx = pair.b_peer.rx_bytes
    tun_b, out = pair.b.handle_udp_batch([(d, A_ENDPOINT) for d in bad], pair.now)
    assert tun_b == [] and out == []
    assert sum(
        pair.b.counters[k] for k in pair.b.counters if k.startswith("rx_") and k != "rx_keepalive"
    ) == len(bad)
    for reason in (
        "rx_too_short",
        "rx_transport_too_short",
        "rx_decrypt_failed",
        "rx_handshake_bad_size",
        "rx_bad_mac1",
        "rx_unknown_index",
        "rx_unknown_type",
    ):
        assert pair.b.counters[reason] >= 1, reason
    assert pair.b_peer.rx_bytes == before_rx
    # The session still works afterwards.
    assert pair.a_to_b(pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"still")], pair.now))[0]


def test_handshake_from_unknown_key_dropped_silently() -> None:
    pair = Pair()
    stranger_key = generate_private_key()
    stranger = Device(private_key=stranger_key)
    stranger.apply_update(
        DeviceUpdate(
            peers=[
                PeerUpdate(
                    public_key=public_key(pair.b_key),
                    endpoint=B_ENDPOINT,
                    allowed_ips=[ipaddress.ip_network("10.0.0.0/24")],
                )
            ]
        ),
        now=pair.now,
    )
    initiation = stranger.handle_tun_batch([ipv4_packet("10.0.0.7", B_V4, b"hi")], pair.now)
    tun_b, out = pair.a_to_b(initiation, src=("198.51.100.7", 1234))
    assert tun_b == [] and out == []
    assert pair.b.counters["rx_initiation_rejected"] == 1


def test_under_load_cookie_reply_then_retry_with_mac2() -> None:
    pair = Pair()
    initiation = pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"load")], pair.now)
    tun_b, cookie = pair.a_to_b(initiation, under_load=True)
    assert tun_b == []
    assert [len(d) for d in pair.datagrams(cookie, A_ENDPOINT)] == [64]
    assert pair.b_peer.keypairs.next is None  # no state created without mac2
    pair.b_to_a(cookie)
    assert pair.a.counters["rx_cookie_reply"] == 1
    # Retry after REKEY_TIMEOUT: the new initiation carries mac2 and gets through.
    pair.now += 5.5
    retry = pair.a.tick(pair.now)
    assert [len(d) for d in pair.datagrams(retry, B_ENDPOINT)] == [148]
    tun_b, response = pair.a_to_b(retry, under_load=True)
    assert [len(d) for d in pair.datagrams(response, A_ENDPOINT)] == [92]
    _, staged = pair.b_to_a(response)
    assert pair.a_to_b(staged)[0] == [ipv4_packet(A_V4, B_V4, b"load")]


def test_roaming_updates_endpoint() -> None:
    pair = Pair()
    pair.handshake()
    moved = ("203.0.113.9", 40000)
    pair.a_to_b(pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"from afar")], pair.now), src=moved)
    assert pair.b_peer.endpoint == moved
    (transmit,) = pair.b.handle_tun_batch([ipv4_packet(B_V4, A_V4, b"follow")], pair.now)
    assert transmit.endpoint == moved
    # A forged packet from elsewhere does not move the peer.
    forged = bytearray(transmit.datagrams[0])
    forged[-1] ^= 1
    pair.b.handle_udp_batch([(bytes(forged), ("198.51.100.1", 1))], pair.now)
    assert pair.b_peer.endpoint == moved


def test_snapshot_counts_datagram_bytes() -> None:
    pair = Pair()
    sent_a = sent_b = 0
    initiation = pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"count")], pair.now)
    sent_a += sum(len(d) for t in initiation for d in t.datagrams)
    _, response = pair.a_to_b(initiation)
    sent_b += sum(len(d) for t in response for d in t.datagrams)
    _, staged = pair.b_to_a(response)
    sent_a += sum(len(d) for t in staged for d in t.datagrams)
    pair.a_to_b(staged)
    for size in (0, 1, 100, 1000):
        t = pair.a.handle_tun_batch([ipv6_packet(A_V6, B_V6, bytes(size))], pair.now)
        sent_a += sum(len(d) for x in t for d in x.datagrams)
        pair.a_to_b(t)
        t = pair.b.handle_tun_batch([ipv4_packet(B_V4, A_V4, bytes(size))], pair.now)
        sent_b += sum(len(d) for x in t for d in x.datagrams)
        pair.b_to_a(t)
    snap_a, snap_b = pair.a.snapshot().peers[0], pair.b.snapshot().peers[0]
    assert snap_a.tx_bytes == sent_a == snap_b.rx_bytes
    assert snap_b.tx_bytes == sent_b == snap_a.rx_bytes
    assert snap_a.endpoint == B_ENDPOINT and snap_b.endpoint == A_ENDPOINT


def test_no_route_and_bad_tun_packets_counted() -> None:
    pair = Pair()
    out = pair.a.handle_tun_batch(
        [ipv4_packet(A_V4, "10.1.1.1", b""), b"\x45" + bytes(10), b"\x70" + bytes(40)], pair.now
    )
    assert out == []
    assert pair.a.counters["tun_no_route"] == 1
    assert pair.a.counters["tun_too_short"] == 1
    assert pair.a.counters["tun_bad_packet"] == 1


def test_staged_queue_bounded() -> None:
    pair = Pair()
    packets = [ipv4_packet(A_V4, B_V4, i.to_bytes(2, "big")) for i in range(200)]
    pair.a.handle_tun_batch(packets, pair.now)
    assert len(pair.a_peer.staged) == 128
    assert pair.a.counters["staged_overflow"] == 72
    assert pair.a_peer.staged[0] == packets[72]  # the oldest were dropped


def test_apply_update_refusals_and_peer_lifecycle() -> None:
    pair = Pair()
    with pytest.raises(UAPIError) as info:
        pair.a.apply_update(
            DeviceUpdate(peers=[PeerUpdate(public_key=public_key(pair.b_key), protocol_version=2)])
        )
    assert info.value.errno == errno.EINVAL
    with pytest.raises(UAPIError):
        pair.a.apply_update(DeviceUpdate(peers=[PeerUpdate(public_key=b"short")]))
    with pytest.raises(UAPIError):
        pair.a.apply_update(DeviceUpdate(peers=[PeerUpdate(public_key=bytes(32), endpoint=("not-an-ip", 1))]))
    assert len(pair.a.peers) == 1  # nothing applied from refused updates
    # update_only does not create; replace_allowed_ips replaces; remove removes.
    other = public_key(generate_private_key())
    pair.a.apply_update(DeviceUpdate(peers=[PeerUpdate(public_key=other, update_only=True)]))
    assert other not in pair.a.peers
    pair.a.apply_update(
        DeviceUpdate(
            peers=[
                PeerUpdate(
                    public_key=public_key(pair.b_key),
                    replace_allowed_ips=True,
                    allowed_ips=[ipaddress.ip_network("10.5.0.0/16")],
                )
            ]
        )
    )
    assert pair.a.snapshot().peers[0].allowed_ips == [ipaddress.ip_network("10.5.0.0/16")]
    pair.a.apply_update(DeviceUpdate(peers=[PeerUpdate(public_key=public_key(pair.b_key), remove=True)]))
    assert pair.a.snapshot().peers == [] and len(pair.a.allowed_ips) == 0
    # listen_port / fwmark stored, bound port reported back.
    pair.a.apply_update(DeviceUpdate(listen_port=0, fwmark=7))
    pair.a.set_bound_port(43210)
    snap = pair.a.snapshot()
    assert (snap.listen_port, snap.fwmark, snap.private_key) == (43210, 7, pair.a_key)


def test_replace_peers_and_private_key_change() -> None:
    pair = Pair()
    pair.handshake()
    # Setting our private key to b's key drops the peer b (it would be ourselves).
    pair.a.apply_update(DeviceUpdate(private_key=pair.b_key))
    assert pair.a.peers == {}
    pair2 = Pair()
    pair2.handshake()
    new_key = generate_private_key()
    pair2.a.apply_update(DeviceUpdate(private_key=new_key), now=pair2.now)
    # Old session may not send: the next packet starts a handshake with the new identity.
    out = pair2.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"new id")], pair2.now)
    assert [len(d) for d in pair2.datagrams(out, B_ENDPOINT)] == [148]
    assert pair2.a_to_b(out) == ([], [])  # b does not know the new key
    pair2.a.apply_update(DeviceUpdate(replace_peers=True))
    assert pair2.a.peers == {} and pair2.a._indices == {}


def test_persistent_keepalive_switched_on_sends_now_and_repeats() -> None:
    pair = Pair()
    pair.handshake()
    # b answers a's data with a keepalive after 10 s, so a has heard back and keeps quiet.
    pair.b_to_a(pair.b.tick(pair.now + 10))
    queued = pair.a.apply_update(
        DeviceUpdate(peers=[PeerUpdate(public_key=public_key(pair.b_key), persistent_keepalive_interval=25)]),
        now=pair.now,
    )
    out = pair.a.tick(pair.now)  # the runtime ticks after every set to flush what it queued
    assert [bytes(d) for t in queued for d in t.datagrams] == [bytes(d) for t in out for d in t.datagrams]
    assert [len(d) for d in pair.datagrams(out, B_ENDPOINT)] == [32]
    tun_b, _ = pair.a_to_b(out)
    assert tun_b == [] and pair.b.counters["rx_keepalive"] == 1
    # Setting the same interval again is not a switch-on.
    pair.a.apply_update(
        DeviceUpdate(peers=[PeerUpdate(public_key=public_key(pair.b_key), persistent_keepalive_interval=25)]),
        now=pair.now,
    )
    assert pair.a.tick(pair.now) == []
    assert pair.a.tick(pair.now + 24.9) == []
    out = pair.a.tick(pair.now + 25)
    assert [len(d) for d in pair.datagrams(out, B_ENDPOINT)] == [32]


def test_zero_private_key_disables_handshakes() -> None:
    pair = Pair()
    pair.b.apply_update(DeviceUpdate(private_key=bytes(32)))
    assert pair.b.snapshot().private_key is None
    initiation = pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"x")], pair.now)
    assert pair.a_to_b(initiation) == ([], [])
    assert pair.b.counters["rx_handshake_no_private_key"] == 1
    # Nothing to initiate with either: the packet waits.
    assert pair.b.handle_tun_batch([ipv4_packet(B_V4, A_V4, b"y")], pair.now) == []
    pair.b.apply_update(DeviceUpdate(private_key=pair.b_key))
    pair.now += 6
    _, response = pair.a_to_b(pair.a.tick(pair.now))
    assert [len(d) for d in pair.datagrams(response, A_ENDPOINT)] == [92]


def test_under_load_cookie_over_ipv6_source_and_wrong_source_refused() -> None:
    pair = Pair()
    pair.b.apply_update(
        DeviceUpdate(peers=[PeerUpdate(public_key=public_key(pair.a_key), endpoint=A_ENDPOINT)]), now=pair.now
    )
    initiation = pair.b.handle_tun_batch([ipv4_packet(B_V4, A_V4, b"v6")], pair.now)
    tun_a, cookie = pair.b_to_a(initiation, under_load=True)  # arrives from 2001:db8::2
    assert [len(d) for t in cookie for d in t.datagrams] == [64]
    pair.a_to_b(cookie)
    pair.now += 5.5
    retry = pair.datagrams(pair.b.tick(pair.now), A_ENDPOINT)
    # The cookie is bound to b's address and port: from another port it does not count.
    _, other = pair.a.handle_udp_batch([(retry[0], ("2001:db8::2", 9999))], pair.now, under_load=True)
    assert [len(d) for t in other for d in t.datagrams] == [64]
    _, response = pair.a.handle_udp_batch([(retry[0], B_ENDPOINT)], pair.now, under_load=True)
    assert [len(d) for d in pair.datagrams(response, B_ENDPOINT)] == [92]
