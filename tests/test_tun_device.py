"""Real TUN devices inside a throwaway network namespace: offload negotiation, GSO reads split, GRO writes
delivered to real sockets, deletion detection."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import os
import select
import socket
import struct
import time
import uuid
from collections.abc import Iterator

import pytest
from test_tun_offload import tcp_packet, udp_packet

from turbowg.testing.marks import needs_netns
from turbowg.testing.netns import namespace_pair, ns_run
from turbowg.tun.checksum import ipv4_header_ok, transport_checksum_ok
from turbowg.tun.device import TunError, TunGone, open_tun

pytestmark = [needs_netns, pytest.mark.netns]

CLONE_NEWNET = 0x40000000
SOL_UDP, UDP_SEGMENT = 17, 103
TUN_IP, PEER_IP = "10.88.0.1", "10.88.0.2"
TUN_IP6, PEER_IP6 = "fd88::1", "fd88::2"
_libc = ctypes.CDLL(None, use_errno=True)


# Asked of the kernel directly, not of turbowg: a raw TUN fd with vnet headers, offered USO (Linux >= 6.2).
_TUNSETIFF, _TUNSETOFFLOAD = 0x400454CA, 0x400454D0
_IFF_TUN, _IFF_NO_PI, _IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
_TUN_F_CSUM, _TUN_F_USO4, _TUN_F_USO6 = 0x01, 0x20, 0x40


@functools.cache
def kernel_offers_uso(ns: str) -> bool:
    """True if this kernel's TUN accepts TUN_F_USO4|USO6 (call inside namespace `ns`: it makes a throwaway
    TUN there)."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        name = ("tp" + uuid.uuid4().hex[:8]).encode()
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name, _IFF_TUN | _IFF_NO_PI | _IFF_VNET_HDR))
        try:
            fcntl.ioctl(fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_USO4 | _TUN_F_USO6)
        except OSError:
            return False
        return True
    finally:
        os.close(fd)


def require_uso(ns: str, dev) -> None:
    """Skip, saying why, on a kernel without UDP segmentation offload on TUN; where the kernel has it, the
    device must have negotiated it (a silent fall back to no USO fails here)."""
    if not kernel_offers_uso(ns):
        pytest.skip("kernel TUN refuses TUN_F_USO4/6 (before Linux 6.2): UDP GSO/GRO on the TUN not tested")
    assert dev.gro_udp and dev.offloads & (_TUN_F_USO4 | _TUN_F_USO6), \
        f"the kernel offers USO but the device negotiated offloads {dev.offloads:#x}"


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run this thread inside network namespace `ns` (TUNs and sockets created now live there)."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns failed")
        try:
            yield
        finally:
            assert _libc.setns(home, CLONE_NEWNET) == 0
    finally:
        os.close(home)
        os.close(target)


@pytest.fixture
def tun_ns():
    """(namespace, TunDevice) with the TUN at 10.88.0.1/24, up."""
    with namespace_pair("tt") as pair, inside(pair.a):
        name = "tt" + uuid.uuid4().hex[:8]
        dev = open_tun(name, vnet_hdr=True, mtu=1500)
        dev.set_up()
        ns_run(pair.a, "ip", "addr", "add", f"{TUN_IP}/24", "dev", name)
        ns_run(pair.a, "ip", "-6", "addr", "add", f"{TUN_IP6}/64", "dev", name, "nodad")
        try:
            yield pair.a, dev
        finally:
            dev.close()


def read_until(dev, want: int, timeout: float = 5.0, accept=lambda p: True) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        select.select([dev], [], [], 0.2)
        batch: list = []
        for _ in range(64):
            if dev.read_batch(batch) == 0:
                break
        got.extend(p for p in batch if accept(p))
    return got


def is_udp_to(port: int):
    def match(p) -> bool:
        if p[0] >> 4 == 4:
            return p[9] == 17 and struct.unpack_from("!H", p, 22)[0] == port
        return p[6] == 17 and struct.unpack_from("!H", p, 42)[0] == port
    return match


def test_offloads_negotiated_and_visible_to_ethtool(tun_ns) -> None:
    ns, dev = tun_ns
    assert dev.vnet_hdr and dev.offloads & 0x07 == 0x07
    assert dev.gro_tcp
    assert dev.mtu == 1500
    features = ns_run(ns, "ethtool", "-k", dev.name).stdout
    assert "tx-checksumming: on" in features
    assert "tcp-segmentation-offload: on" in features
    dev.set_mtu(1420)
    assert dev.mtu == 1420
    with pytest.raises(ValueError):
        dev.set_mtu(10)


def test_udp_segmentation_offload_negotiated_and_visible_to_ethtool(tun_ns) -> None:
    ns, dev = tun_ns
    require_uso(ns, dev)
    assert "tx-udp-segmentation: on" in ns_run(ns, "ethtool", "-k", dev.name).stdout


@pytest.mark.parametrize("v6", [False, True])
def test_udp_gso_send_is_read_as_split_datagrams(tun_ns, v6: bool) -> None:
    ns, dev = tun_ns
    family, peer, t = (socket.AF_INET6, PEER_IP6, 40) if v6 else (socket.AF_INET, PEER_IP, 20)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        payload = b"".join(bytes([i]) * 1000 for i in range(10)) + b"tail"
        sock.sendmsg([payload], [(SOL_UDP, UDP_SEGMENT, struct.pack("H", 1000))], 0, (peer, 7777))
        got = read_until(dev, 11, accept=is_udp_to(7777))
    assert len(got) == 11
    assert b"".join(bytes(p[t + 8:]) for p in got) == payload
    for p in got:
        assert transport_checksum_ok(p)
        assert v6 or ipv4_header_ok(p)
        assert struct.unpack_from("!H", p, t + 4)[0] == len(p) - t
    require_uso(ns, dev)  # USO on: the kernel handed us one monster that read_batch cut up
    assert dev.counters["read_frames"] < dev.counters["read_packets"]


def syn_ack_for(syn: bytes, isn: int) -> bytearray:
    sport, dport, seq = struct.unpack_from("!HHI", syn, 20)
    mss = b"\x02\x04\x05\xb4"  # 1460
    pkt = tcp_packet(False, b"", seq=isn, ack=seq + 1, flags=0x12, window=65535, options=mss,
                     sport=dport, dport=sport, src=socket.inet_aton(PEER_IP))
    return rewrite_dst(pkt, syn[12:16])


def rewrite_dst(pkt: bytearray, dst: bytes) -> bytearray:
    """tcp_packet/udp_packet build with fixed addresses; rebuild checksums for the real ones."""
    from turbowg.tun.checksum import checksum, pseudo_header_sum

    pkt[16:20] = dst
    pkt[10:12] = b"\0\0"
    struct.pack_into("!H", pkt, 10, checksum(pkt[:20]))
    proto = pkt[9]
    at = 20 + (16 if proto == 6 else 6)
    pkt[at:at + 2] = b"\0\0"
    value = checksum(memoryview(pkt)[20:], pseudo_header_sum(pkt[12:16], pkt[16:20], proto, len(pkt) - 20))
    struct.pack_into("!H", pkt, at, value or (0xFFFF if proto == 17 else 0))  # only UDP sends 0 as 0xFFFF
    return pkt


def test_tcp_syn_checksum_completed_then_tso_stream_split_and_gro_writes_delivered(tun_ns) -> None:
    _ns, dev = tun_ns
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with client:
        client.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            client.connect((PEER_IP, 8443))
        syns = read_until(dev, 1, accept=lambda p: p[0] == 0x45 and p[9] == 6 and p[33] & 0x02)
        assert syns, "no SYN seen on the TUN"
        syn = bytes(syns[0])
        assert transport_checksum_ok(syn) and ipv4_header_ok(syn)  # NEEDS_CSUM completed by read_batch
        isn = 7_000_000
        dev.write_batch([syn_ack_for(syn, isn)])
        select.select([], [client], [], 3)
        assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0

        # Kernel -> TUN: a large send leaves as TSO monsters; read_batch cuts them to MSS-sized segments.
        data = bytes(range(256)) * 400  # 102400 bytes
        client.setblocking(True)
        client.settimeout(2)
        sent = client.send(data)
        client_seq = struct.unpack_from("!I", syn, 24)[0] + 1
        segs = read_until(dev, 10, accept=lambda p: p[9] == 6 and len(p) > 52)
        assert len(segs) >= 10
        stream = bytearray()
        for p in segs:
            assert transport_checksum_ok(p) and ipv4_header_ok(p)
            assert len(p) <= 1500
            seq = struct.unpack_from("!I", p, 24)[0]
            if seq == client_seq + len(stream):
                stream += p[20 + (p[32] >> 4) * 4:]
        assert len(stream) >= 10 * 1400 and bytes(stream) == data[:len(stream)] and len(stream) <= sent
        assert dev.counters["read_frames"] < dev.counters["read_packets"]  # at least one monster was split

        # TUN -> kernel: 40 in-order segments from the peer, coalesced into monsters, reach the socket intact.
        frames_before = dev.counters["write_frames"]
        reply = [bytes([i]) * 1000 for i in range(40)]
        pkts = [rewrite_dst(tcp_packet(False, chunk, seq=isn + 1 + i * 1000, ack=client_seq, window=65535,
                                       sport=8443, dport=struct.unpack_from("!H", syn, 20)[0],
                                       src=socket.inet_aton(PEER_IP)), syn[12:16])
                for i, chunk in enumerate(reply)]
        dev.write_batch(pkts)
        assert dev.counters["write_frames"] - frames_before < 40  # coalesced
        received = bytearray()
        deadline = time.monotonic() + 5
        while len(received) < 40000 and time.monotonic() < deadline:
            received += client.recv(65536)
        assert bytes(received) == b"".join(reply)


@pytest.mark.parametrize("v6", [False, True])
def test_udp_gro_writes_arrive_in_order(tun_ns, v6: bool) -> None:
    ns, dev = tun_ns
    family, local, peer = (socket.AF_INET6, TUN_IP6, PEER_IP6) if v6 else (socket.AF_INET, TUN_IP, PEER_IP)
    rx = socket.socket(family, socket.SOCK_DGRAM)
    with rx:
        rx.bind((local, 0))
        rx.settimeout(2)
        port = rx.getsockname()[1]
        payloads = [i.to_bytes(2, "big") * 600 for i in range(50)] + [b"short"]
        src, dst = socket.inet_pton(family, peer), socket.inet_pton(family, local)
        pkts = [udp_packet(v6, p, sport=5555, dport=port, src=src, dst=dst) for p in payloads]
        dev.write_batch(pkts)
        got = [rx.recv(65536) for _ in payloads]
    assert got == payloads
    assert dev.counters["write_errors"] == 0
    require_uso(ns, dev)  # UDP GRO writes need USO on the TUN
    assert dev.counters["write_frames"] < len(payloads)


@contextlib.contextmanager
def udp_sink() -> Iterator[tuple[socket.socket, object]]:
    """A UDP socket at the TUN's address, and a maker of IPv4 packets from the peer to it."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx:
        rx.bind((TUN_IP, 0))
        rx.settimeout(2)
        port = rx.getsockname()[1]
        src, dst = socket.inet_aton(PEER_IP), socket.inet_aton(TUN_IP)
        yield rx, lambda payloads: [udp_packet(False, p, dport=port, src=src, dst=dst) for p in payloads]


def test_batch_larger_than_the_write_buffer_is_written_in_order(tun_ns, monkeypatch) -> None:
    import turbowg.tun.device as device_mod

    monkeypatch.setattr(device_mod, "WRITE_MAX_BYTES", 5000)  # ~4 packets per coalesce pass
    ns, dev = tun_ns
    with udp_sink() as (rx, packets_for):
        payloads = [i.to_bytes(2, "big") * 500 for i in range(30)]
        dev.write_batch(packets_for(payloads))
        got = [rx.recv(65536) for _ in payloads]
    assert got == payloads
    assert dev.counters["write_packets"] == 30 and dev.counters["write_errors"] == 0
    require_uso(ns, dev)  # UDP GRO writes need USO on the TUN
    assert 30 / 5 <= dev.counters["write_frames"] < 30


def test_without_vnet_header_and_deletion_detected() -> None:
    with namespace_pair("tt") as pair, inside(pair.a):
        name = "tt" + uuid.uuid4().hex[:8]
        dev = open_tun(name, vnet_hdr=False)
        with dev:
            assert not dev.vnet_hdr and dev.offloads == 0 and not dev.gro_tcp
            dev.set_up()
            ns_run(pair.a, "ip", "addr", "add", f"{TUN_IP}/24", "dev", name)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"ping" * 100, (PEER_IP, 9999))
                got = read_until(dev, 1, accept=is_udp_to(9999))
            assert got and bytes(got[0][28:]) == b"ping" * 100 and transport_checksum_ok(got[0])
            assert dev.exists()
            ns_run(pair.a, "ip", "link", "del", name)
            assert not dev.exists()
            with pytest.raises(TunGone):
                dev.read_batch([])


def test_opens_existing_persistent_tun_and_refuses_busy_one() -> None:
    with namespace_pair("tt") as pair, inside(pair.a):
        name = "tt" + uuid.uuid4().hex[:8]
        ns_run(pair.a, "ip", "tuntap", "add", "dev", name, "mode", "tun")
        index = socket.if_nametoindex(name)
        with open_tun(name) as dev:
            assert dev.ifindex == index and dev.vnet_hdr and dev.exists()
            with pytest.raises(TunError, match="already attached"):
                open_tun(name)


def test_bad_names_are_clear_errors() -> None:
    for bad in ("", "x" * 16, "a/b", "a b"):
        with pytest.raises(ValueError):
            open_tun(bad)


def test_refused_gro_write_turns_gro_off_and_rewrites_uncoalesced(tun_ns, monkeypatch, caplog) -> None:
    """Older kernels refuse coalesced writes with EINVAL. Here the kernel's refusal is real: coalesced frames
    get a checksum offset beyond the packet, which tun rejects with EINVAL; lone packets are untouched."""
    import turbowg.tun.device as device_mod

    real_coalesce = device_mod.fast.coalesce

    def broken_coalesce(src, layout, count, dst, frames, tcp, udp):
        nframes = real_coalesce(src, layout, count, dst, frames, tcp, udp)
        for j in range(nframes):
            off = frames[2 * j]
            if dst[off + 1]:  # a GSO frame: point its checksum beyond the packet
                struct.pack_into("=H", dst, off + 8, 60000)
        return nframes

    monkeypatch.setattr(device_mod.fast, "coalesce", broken_coalesce)
    _ns, dev = tun_ns
    with udp_sink() as (rx, packets_for):
        payloads = [i.to_bytes(2, "big") * 500 for i in range(30)]
        with caplog.at_level("WARNING", logger="turbowg.tun.device"):
            dev.write_batch(packets_for(payloads[:20]))
            dev.write_batch(packets_for(payloads[20:]))
        got = [rx.recv(65536) for _ in payloads]
    assert got == payloads
    assert not dev.gro_tcp and not dev.gro_udp
    assert dev.counters["gro_disabled"] == 1 and dev.counters["write_packets"] == 30
    assert sum("GRO turned off" in r.getMessage() for r in caplog.records) == 1
