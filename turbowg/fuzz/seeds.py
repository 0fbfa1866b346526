"""Valid seed inputs for every fuzz target, made with the project's own encoders, in each target's layout.

`seeds(name)` returns a list of bytes; `write_corpus(root)` writes them as root/<target>/seed-NN (what
tests/fuzz_corpus/ holds). Deterministic except where the encoder draws a random nonce or secret.
"""

from __future__ import annotations

import array
import ipaddress
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

from turbowg.fuzz import targets as t

SEEDS: dict[str, Callable[[], list[bytes]]] = {}


def _seeds(name: str) -> Callable[[Callable[[], list[bytes]]], Callable[[], list[bytes]]]:
    def decorate(fn: Callable[[], list[bytes]]) -> Callable[[], list[bytes]]:
        SEEDS[name] = fn
        return fn

    return decorate


def seeds(name: str) -> list[bytes]:
    return SEEDS[name]()


def write_corpus(root: str | os.PathLike[str], names: list[str] | None = None) -> dict[str, int]:
    """Write seeds as root/<target>/seed-NN; returns how many per target."""
    written = {}
    for name in names or sorted(SEEDS):
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        items = seeds(name)
        for k, item in enumerate(items):
            (folder / f"seed-{k:02d}").write_bytes(item)
        written[name] = len(items)
    return written


def load_corpus(root: str | os.PathLike[str], name: str) -> list[bytes]:
    folder = Path(root) / name
    if not folder.is_dir():
        return []
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()]


# -------------------------------------------------------------------------------------------------------------


def _a_device():
    """Device A with peer B (the mirror of targets._device_b), for real datagrams towards B."""
    from turbowg.uapi.model import DeviceUpdate, PeerUpdate

    device = t.mod("device").Device(private_key=t.WG_A_PRIVATE, wall_clock=lambda: t.WALL + 1.0,
                                    clock=lambda: t.NOW)
    device.apply_update(DeviceUpdate(listen_port=t.A_ENDPOINT[1], peers=[PeerUpdate(
        public_key=t._wg_public(t.WG_B_PRIVATE), endpoint=t.B_ENDPOINT,
        allowed_ips=[ipaddress.ip_network(f"{t.B_V4}/32")])]), now=t.NOW)
    return device


@_seeds("wg_message")
def _wg_message() -> list[bytes]:
    from turbowg.noise.cookie import CookieChecker

    device = _a_device()
    (transmit,) = device.handle_tun_batch([t.ipv4_udp(t.A_V4, t.B_V4, b"hello")], t.NOW)
    initiation = bytes(transmit.datagrams[0])
    _hs, a_init, _gen = t._a_initiating()
    # A cookie reply addressed to the index of B's own initiation (drawn from random.Random(2), so the same in
    # every run); its MAC cannot match B's random ephemeral, so it exercises everything up to the AEAD.
    b_index = next(iter(t._device_b()._indices), 0)
    cookie = CookieChecker(t._wg_public(t.WG_A_PRIVATE)).create_reply(a_init, b_index, b"\xc0\x00\x02\x01\xca\x6c",
                                                                     t.NOW)
    transport = struct.pack("<IIQ", 4, 1234, 0) + bytes(32)
    return [
        b"\x00" + initiation,
        b"\x01" + initiation,  # under load: a cookie reply comes back
        b"\x02" + initiation,
        b"\x00" + cookie,
        b"\x00" + transport,
        b"\x04\x25" + initiation * 2,  # two initiations in one GRO read (stride 148)
        b"\x00" + bytes([2, 0, 0, 0]) + bytes(88),
        b"\x00" + bytes([3, 0, 0, 0]),
    ]


@_seeds("noise_handshake")
def _noise_handshake() -> list[bytes]:
    from turbowg.noise.cookie import CookieChecker, CookieGenerator
    from turbowg.noise.handshake import Handshake, consume_initiation, create_initiation, create_response

    a, b = t._identities()
    hs_a = Handshake(b.public_key, local=a)
    initiation = create_initiation(hs_a, t.A_INDEX, t.WALL, ephemeral_private=t.WG_A_EPHEMERAL)
    CookieGenerator(b.public_key).add_macs(initiation, t.NOW)
    hs_b = Handshake(a.public_key, local=b)
    consumed = consume_initiation(b, bytes(initiation), lambda key: hs_b, t.NOW)
    assert consumed is not None
    response = create_response(consumed, 0x55667788, ephemeral_private=t.WG_B_EPHEMERAL)
    CookieGenerator(a.public_key).add_macs(response, t.NOW)
    cookie = CookieChecker(b.public_key).create_reply(bytes(initiation), t.A_INDEX, b"\xc0\x00\x02\x01\xca\x6c",
                                                     t.NOW)
    return [bytes(initiation), bytes(response), cookie, bytes(initiation[:116]) + bytes(32)]


def _tcp4(seq: int, payload: bytes, flags: int = 0x10, ip_id: int = 1) -> bytes:
    total = 40 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ip_id, 0x4000, 64, 6, 0, bytes([10, 0, 0, 1]),
                     bytes([10, 0, 0, 2]))
    tcp = struct.pack("!HHIIBBHHH", 40000, 443, seq, 77, 5 << 4, flags, 512, 0, 0)
    return _fix_checksums(ip + tcp + payload)


def _udp6(payload: bytes) -> bytes:
    ip = struct.pack("!IHBB16s16s", 0x60000000, 8 + len(payload), 17, 64,
                     ipaddress.IPv6Address("fd00::1").packed, ipaddress.IPv6Address("fd00::2").packed)
    udp = struct.pack("!HHHH", 5000, 6000, 8 + len(payload), 0)
    return _fix_checksums(ip + udp + payload)


def _fix_checksums(packet: bytes) -> bytes:
    from turbowg.tun.checksum import checksum, ones_sum, pseudo_header_sum

    pkt = bytearray(packet)
    if pkt[0] >> 4 == 4:
        pkt[10:12] = b"\0\0"
        struct.pack_into("!H", pkt, 10, checksum(pkt[:20]))
        t4, proto, src, dst = 20, pkt[9], pkt[12:16], pkt[16:20]
    else:
        t4, proto, src, dst = 40, pkt[6], pkt[8:24], pkt[24:40]
    at = t4 + (16 if proto == 6 else 6)
    pkt[at:at + 2] = b"\0\0"
    l4 = pkt[t4:]
    value = ~ones_sum(l4, pseudo_header_sum(src, dst, proto, len(l4))) & 0xFFFF
    struct.pack_into("!H", pkt, at, value or (0xFFFF if proto == 17 else 0))
    return bytes(pkt)


@_seeds("tun_ingest")
def _tun_ingest() -> list[bytes]:
    from turbowg.tun import vnet

    payload = bytes(range(256)) * 12
    tcp = _tcp4(1000, payload)
    udp = _udp6(payload[:3000])
    plain = _tcp4(5, b"abc")
    partial = bytearray(plain)
    partial[36:38] = b"\x12\x34"
    return [
        b"\x00\x00\x00" + vnet.pack(vnet.NEEDS_CSUM, vnet.GSO_TCPV4, 40, 1400, 20, 16) + tcp,
        b"\x01\x02\x00" + vnet.pack(vnet.NEEDS_CSUM, vnet.GSO_TCPV4 | vnet.GSO_ECN, 40, 536, 20, 16) + tcp,
        b"\x00\x00\x00" + vnet.pack(vnet.NEEDS_CSUM, vnet.GSO_UDP_L4, 48, 1200, 40, 6) + udp,
        b"\x00\x00\x00" + vnet.pack(vnet.NEEDS_CSUM, vnet.GSO_NONE, 0, 0, 20, 16) + bytes(partial),
        b"\x00\x00\x00" + vnet.ZERO_HDR + plain,
        b"\x00\x00\x01" + vnet.pack(0, vnet.GSO_TCPV6, 60, 1000, 40, 16) + plain,
    ]


def _prefixed(packets: list[bytes]) -> bytes:
    return b"".join(len(p).to_bytes(2, "big") + p for p in packets)


@_seeds("tun_coalesce")
def _tun_coalesce() -> list[bytes]:
    seg = bytes(range(200)) * 7
    flow = [_tcp4(1000 + k * len(seg), seg, ip_id=k + 1) for k in range(4)]
    last = _tcp4(1000 + 4 * len(seg), seg[:300], flags=0x18, ip_id=5)
    udp = [_udp6(seg[:1200]) for _ in range(3)] + [_udp6(seg[:100])]
    return [
        b"\x03" + _prefixed(flow + [last]),
        b"\x03" + _prefixed(udp),
        b"\x03" + _prefixed([flow[0], udp[0], flow[1], udp[1], flow[2]]),
        b"\x01" + _prefixed(flow[:2] + [_tcp4(1, b"", flags=0x12)]),
        b"\x07" + _prefixed(flow),
    ]


@_seeds("aead_open")
def _aead_open() -> list[bytes]:
    from turbowg.noise.transport import PyAead

    packets = [t.ipv4_udp("10.0.0.1", "10.0.0.2", b"a" * 30), t.ipv4_udp("10.0.0.1", "10.0.0.2", b"b" * 5), b""]
    dst = bytearray(4096)
    sizes = array.array("i", [0]) * len(packets)
    n = PyAead(t.AEAD_KEY).seal_list(packets, dst, 0, 1420, t.AEAD_RECEIVER, 3, sizes, 0)
    sealed = bytes(dst[:n])
    first = sealed[:sizes[0]]
    stride = (sizes[0] - 16) // 4
    return [b"\x00\x00" + first, bytes([stride, 1]) + sealed[:2 * sizes[0]] if sizes[1] == sizes[0] else
            b"\x00\x01" + first, b"\x00\x00" + sealed[sizes[0]:sizes[0] + sizes[1]], b"\x00\x00" + first + first]


_UAPI_SET = (
    "private_key=e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a\n"
    "listen_port=12912\nfwmark=0\nreplace_peers=true\n"
    "public_key=b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33\n"
    "preshared_key=188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52\n"
    "replace_allowed_ips=true\nallowed_ip=192.168.4.4/32\n"
    "endpoint=[abcd:23::33%2]:51820\n"
    "public_key=58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376\n"
    "update_only=true\nendpoint=182.122.22.19:3233\npersistent_keepalive_interval=111\n"
    "replace_allowed_ips=true\nallowed_ip=192.168.4.6/32\nallowed_ip=fd00::/64\nprotocol_version=1\n"
    "public_key=662e14fd594556f522604703340351258903b64f35553763f19426ab2a515c58\n"
    "endpoint=5.152.198.39:51820\nremove=true"
)


@_seeds("uapi_set")
def _uapi_set() -> list[bytes]:
    return [_UAPI_SET.encode(), b"listen_port=0", b"public_key=" + b"ab" * 32 + b"\nallowed_ip=10.0.0.7/24"]


@_seeds("uapi_stream")
def _uapi_stream() -> list[bytes]:
    return [b"\x06get=1\n\n", b"\x10set=1\n" + _UAPI_SET.encode() + b"\n\nget=1\n\nstats=1\n\n",
            b"\x00set=1\r\nlisten_port=1\r\n\r\n", b"\x03bogus=1\n\n"]


@_seeds("wg_keys")
def _wg_keys() -> list[bytes]:
    from turbowg.noise.keys import encode_hex_key, encode_key

    key = bytes(range(32))
    return [encode_key(key).encode(), encode_hex_key(key).encode(), (" " + encode_key(bytes(32)) + "\n").encode()]


@_seeds("derp_keys")
def _derp_keys() -> list[bytes]:
    keys = t.mod("derp_keys")
    private = t.DERP_SERVER_PRIVATE
    return [json.dumps({"PrivateKey": keys.format_private_key(private)}, indent=2).encode() + b"\n",
            keys.format_public_key(keys.public_key(private)).encode(), (private.hex() + "\n").encode()]


@_seeds("relay_addr")
def _relay_addr() -> list[bytes]:
    return [b":443", b"[::1]:3340", b"10.0.0.1", b"8443", b"https://derp1.example.com:8443/derp",
            b"derp2.example.com", b"[2001:db8::1]:443", b"http://10.0.0.2"]


@_seeds("derp_frames")
def _derp_frames() -> list[bytes]:
    codec = t.mod("derp_codec")
    key = bytes(range(32))
    stream = b"".join([
        codec.encode_server_key(key), codec.encode_recv_packet(key, b"packet"), codec.encode_keep_alive(),
        codec.encode_peer_gone(key, 1), codec.encode_peer_present(key, "192.0.2.1", 41641, 1),
        codec.encode_ping(b"12345678"), codec.encode_pong(b"abcdefgh"), codec.encode_health("bad"),
        codec.encode_restarting(1000, 5000), codec.encode_send_packet(key, b"x" * 100),
        codec.encode_forward_packet(key, key, b"y"), codec.encode_note_preferred(True),
        codec.encode_close_peer(key), codec.encode_peer_present(key),
    ])
    return [b"\xff" + stream, b"\x06" + stream, b"\x00" + codec.encode_frame(0x77, b"future")]


def _info_body(info: bytes, rest: bytes = b"") -> bytes:
    return len(info).to_bytes(2, "big") + info + rest


@_seeds("derp_server")
def _derp_server() -> list[bytes]:
    codec = t.mod("derp_codec")
    key = bytes(range(32))
    info = codec.ClientInfo().to_json()
    mesh = codec.ClientInfo(mesh_key=t.DERP_MESH_KEY).to_json()
    steady = b"".join([codec.encode_send_packet(key, b"hello"), codec.encode_note_preferred(True),
                       codec.encode_ping(b"12345678"), codec.encode_keep_alive(), codec.encode_frame(0x42, b"?")])
    meshy = b"".join([codec.encode_forward_packet(key, key, b"p"), codec.encode_frame(codec.FrameType.WATCH_CONNS),
                      codec.encode_close_peer(key)])
    return [b"\x01\xff" + _info_body(info, steady), b"\x03\x07" + _info_body(mesh, meshy + steady),
            b"\x01\x00" + _info_body(b'{"version":2,"meshKey":"","CanAckPings":true,"IsProber":true}'),
            b"\x00\xff" + codec.encode_frame(codec.FrameType.CLIENT_INFO, key + bytes(60))]


@_seeds("derp_client")
def _derp_client() -> list[bytes]:
    codec = t.mod("derp_codec")
    key = bytes(range(32))
    steady = b"".join([codec.encode_recv_packet(key, b"data"), codec.encode_ping(b"12345678"),
                       codec.encode_peer_present(key, "2001:db8::1", 443, 3), codec.encode_health("")])
    info = codec.ServerInfo().to_json()
    return [b"\x01\xff" + _info_body(info, steady), b"\x01\x04" + _info_body(b'{"Version":2,"TokenBucketBytesPerSecond":0}'),
            b"\x00\xff" + codec.encode_server_key(key)]


@_seeds("relay_http")
def _relay_http() -> list[bytes]:
    codec = t.mod("derp_codec")
    upgrade = (b"GET /derp HTTP/1.1\r\nHost: derp.example.com\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n"
               b"User-Agent: tailscale\r\n\r\n")
    fast = b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n"
    key = bytes(range(32))
    return [
        b"\xff" + upgrade,
        b"\x04" + fast + codec.encode_client_info(key, bytes(64)),
        b"\xff" + b"GET /generate_204 HTTP/1.1\r\nX-Tailscale-Challenge: abc-123\r\n\r\n"
                  b"HEAD /derp/probe HTTP/1.1\r\n\r\nGET /robots.txt HTTP/1.0\r\n\r\n",
        b"\x09" + b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"\xff" + b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    ]


@_seeds("stun")
def _stun() -> list[bytes]:
    s = t.mod("stun")
    txid = bytes(range(1, 13))
    request = s.build_binding_request(txid)
    response = s.build_binding_response(txid, ipaddress.ip_address("192.0.2.7"), 41641)
    software = struct.pack("!HH", s.ATTR_SOFTWARE, 8) + b"tailnode"
    xor = s.encode_xor_mapped_address(txid, ipaddress.ip_address("2001:db8::9"), 3478)
    return [b"\x00" + request, b"\x00" + response, b"\x03" + txid + software, b"\x07" + txid + xor,
            b"\x05" + txid + struct.pack("!HH", s.ATTR_MAPPED_ADDRESS, 8) + bytes([0, 1, 0x1f, 0x90, 10, 0, 0, 1])]


@_seeds("handshake_screen")
def _handshake_screen() -> list[bytes]:
    """An initiation with a valid mac1 (for the target's key 0..31) and zero mac2, one with a bad mac1, a
    response, a cookie reply; alone, as a GRO run, truncated, from IPv4 and IPv6 sources, under load or not."""
    import hashlib

    key = bytes(range(32))

    def signed(kind: int, size: int) -> bytes:
        body = struct.pack("<I", kind) + bytes(range(size - 36))
        return body + hashlib.blake2s(body, digest_size=16, key=key).digest() + bytes(16)

    init, resp = signed(1, 148), signed(2, 92)
    bad = init[:-32] + bytes(32)
    cookie = struct.pack("<I", 3) + bytes(60)

    def slot(payload: bytes, seg: int = 0, flags: int = 0) -> bytes:
        return struct.pack("<HHH", len(payload), seg, flags) + payload

    return [b"\x00" + slot(init), b"\x04" + slot(init, flags=4), b"\x05" + slot(init) + slot(bad, flags=4),
            b"\x06" + slot(resp) + slot(cookie) + slot(init, flags=2),
            b"\x04" + slot(init * 3, seg=148, flags=1), b"\x03" + slot(init) + slot(resp) + slot(bad) + slot(cookie)]
