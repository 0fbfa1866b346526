"""Fuzz targets: one function per parser that sees hostile bytes, registered by name in `TARGETS`.

A target takes any `bytes` and returns normally when every property holds. It catches exactly the errors the
parser documents (ValueError / MalformedPacket / FrameError / ProtocolError / UAPIError / StunError / ...);
anything else escaping is a finding, and so is a `PropertyFailure` (a broken round trip, the C accelerator
disagreeing with its Python fallback, unbounded output, a result of the wrong shape).

Structured targets read their first byte(s) as a small header (mode flags, a stride, a split point), so that
mutations of the rest reach the deep parser (e.g. a ClientInfo JSON sealed with the right key, STUN attributes
behind a valid header). `turbowg.fuzz.seeds` makes valid inputs in the same layout.

Imports of modules that are moving between packages (the device core, the relay) are resolved in one place:
`_MODULES` below lists the candidate paths, newest first.

Why one file (~990 lines): it is one registry, `TARGETS`: one short function per parser, each independent
of the others; `turbowg.fuzz.seeds` mirrors it target by target.
"""

from __future__ import annotations

import array
import asyncio
import functools
import importlib
import ipaddress
import os
import random
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

# -------------------------------------------------------------------------------------------------------------
# Registry


class PropertyFailure(AssertionError):
    """A fuzzed input broke a property (not an exception of the parser itself)."""


def check(condition: object, message: str) -> None:
    if not condition:
        raise PropertyFailure(message)


@dataclass(frozen=True)
class Target:
    name: str
    fn: Callable[[bytes], None]
    parsers: str  # what it drives, module:function
    summary: str


TARGETS: dict[str, Target] = {}


def _register(name: str, parsers: str) -> Callable[[Callable[[bytes], None]], Callable[[bytes], None]]:
    def decorate(fn: Callable[[bytes], None]) -> Callable[[bytes], None]:
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        TARGETS[name] = Target(name, fn, parsers, summary)
        return fn

    return decorate


def get(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise KeyError(f"unknown fuzz target {name!r}; known: {', '.join(sorted(TARGETS))}") from None


# -------------------------------------------------------------------------------------------------------------
# Moving modules: candidate import paths, newest first (the only place to edit after a rename).

_MODULES: dict[str, tuple[str, ...]] = {
    "device": ("turbowg.device",),
    "replay": ("turbowg.device.replay",),
    "derp_codec": ("turbowg.derp.codec",),
    "derp_keys": ("turbowg.derp.keys",),
    "client_proto": ("turbowg.derp.client_proto",),
    "server_proto": ("turbowg.relay.server_proto", "turbowg.derp.server_proto"),
    "relay_server": ("turbowg.relay.server", "turbowg.derp.server"),
    "relay_http": ("turbowg.relay.http", "turbowg.derp.http"),
    "stun": ("turbowg.relay.stun", "turbowg.derp.stun"),
    "mesh": ("turbowg.relay.mesh", "turbowg.derp.mesh"),
    "relay_app": ("turbowg.relay.app", "turbowg.derp.app"),
}


@functools.cache
def mod(key: str):  # noqa: ANN201 - a module
    """The module for `key`, from the first candidate path that exists."""
    last: Exception | None = None
    for path in _MODULES[key]:
        try:
            return importlib.import_module(path)
        except ModuleNotFoundError as exc:
            if exc.name is None or not path.startswith(exc.name):
                raise  # the module exists but something it imports does not
            last = exc
    raise ImportError(f"none of {_MODULES[key]} can be imported") from last


# -------------------------------------------------------------------------------------------------------------
# Fixed keys and clocks (every target is deterministic for a given input)

WG_A_PRIVATE = bytes(range(1, 33))
WG_B_PRIVATE = bytes(range(101, 133))
WG_A_EPHEMERAL = bytes(range(201, 233))
WG_B_EPHEMERAL = bytes(range(51, 83))
A_INDEX = 0x11223344
NOW = 1000.0
WALL = 1_700_000_000.5
A_ENDPOINT = ("192.0.2.1", 51820)
B_ENDPOINT = ("198.51.100.2", 51821)
A_V4, B_V4 = "10.0.0.1", "10.0.0.2"
AEAD_KEY = bytes(range(7, 39))
AEAD_RECEIVER = 5
DERP_SERVER_PRIVATE = bytes(range(150, 182))
DERP_CLIENT_PRIVATE = bytes(range(11, 43))
DERP_MESH_KEY = "ab" * 32
DERP_NONCE = bytes(24)


def ipv4_udp(src: str, dst: str, payload: bytes) -> bytes:
    header = bytearray(28)
    header[0] = 0x45
    struct.pack_into("!H", header, 2, 28 + len(payload))
    header[8] = 64
    header[9] = 17
    header[12:16] = ipaddress.IPv4Address(src).packed
    header[16:20] = ipaddress.IPv4Address(dst).packed
    struct.pack_into("!HHH", header, 20, 4000, 5000, 8 + len(payload))
    return bytes(header) + payload


@functools.cache
def _wg_public(private: bytes) -> bytes:
    from turbowg.noise.primitives import public_key

    return public_key(private)


# -------------------------------------------------------------------------------------------------------------
# WireGuard: the device's receive classification


def _device_b():
    """Device B with peer A configured and B's own initiation to A in flight (so an index exists)."""
    from turbowg.uapi.model import DeviceUpdate, PeerUpdate

    device = mod("device").Device(private_key=WG_B_PRIVATE, wall_clock=lambda: WALL, clock=lambda: NOW,
                                  rng=random.Random(2))
    device.apply_update(DeviceUpdate(listen_port=B_ENDPOINT[1], peers=[PeerUpdate(
        public_key=_wg_public(WG_A_PRIVATE), endpoint=A_ENDPOINT,
        allowed_ips=[ipaddress.ip_network(f"{A_V4}/32")])]), now=NOW)
    device.handle_tun_batch([ipv4_udp(B_V4, A_V4, b"x")], NOW)
    return device


@functools.cache
def _b_mac1_key() -> bytes:
    from turbowg.noise.cookie import CookieChecker

    return CookieChecker(_wg_public(WG_B_PRIVATE)).mac1_key


WG_FLAG_UNDER_LOAD = 1
WG_FLAG_FIX_MAC1 = 2
WG_FLAG_STRIDE = 4


@_register("wg_message", "turbowg.device Device.handle_udp_packed (message classification, handshake, cookie)")
def wg_message(data: bytes) -> None:
    """UDP datagrams into a device: byte 0 = flags (1 under load, 2 recompute mac1, 4 GRO stride in byte 1)."""
    if not data:
        return
    flags = data[0]
    if flags & WG_FLAG_STRIDE and len(data) >= 2:
        stride, payload = max(1, data[1]) * 4, bytearray(data[2:])
    else:
        payload = bytearray(data[1:])
        stride = max(1, len(payload))
    if flags & WG_FLAG_FIX_MAC1 and len(payload) >= 32:
        from turbowg.noise.primitives import mac

        payload[-32:-16] = mac(_b_mac1_key(), bytes(payload[:-32]))
    device = _device_b()
    n_in = max(1, -(-len(payload) // stride))
    count, transmits = device.handle_udp_packed(payload, [0, len(payload), stride], [A_ENDPOINT], NOW,
                                                bool(flags & WG_FLAG_UNDER_LOAD))
    check(count == 0, f"{count} inner packets out of a device that has no session")
    sent = [d for t in transmits for d in t.datagrams]
    check(len(sent) <= n_in + 1, f"{len(sent)} datagrams answered {n_in}")
    check(all(len(d) in (32, 64, 92, 148) for d in sent), f"odd datagram sizes {[len(d) for d in sent]}")
    check(all(v >= 0 for v in device.counters.values()), "negative counter")


# -------------------------------------------------------------------------------------------------------------
# Noise: consume_initiation / consume_response / cookie replies


@functools.cache
def _identities():
    from turbowg.noise.handshake import LocalIdentity

    return LocalIdentity(WG_A_PRIVATE), LocalIdentity(WG_B_PRIVATE)


def _a_initiating():
    """A's handshake towards B in INITIATION_CREATED (fixed ephemeral), the initiation (macs added) and A's
    cookie generator (which then expects a reply to that initiation)."""
    from turbowg.noise.cookie import CookieGenerator
    from turbowg.noise.handshake import Handshake, create_initiation

    a, b = _identities()
    hs = Handshake(b.public_key, local=a)
    msg = create_initiation(hs, A_INDEX, WALL, ephemeral_private=WG_A_EPHEMERAL)
    generator = CookieGenerator(b.public_key)
    generator.add_macs(msg, NOW)
    return hs, bytes(msg), generator


@_register("noise_handshake", "turbowg.noise.handshake consume_initiation/consume_response, "
                              "turbowg.noise.cookie CookieGenerator.consume_reply, CookieChecker.check_mac1/2")
def noise_handshake(data: bytes) -> None:
    """The same bytes as an initiation to B, a response to A's initiation, and a cookie reply to A."""
    from turbowg.noise.cookie import CookieChecker
    from turbowg.noise.handshake import (
        Handshake,
        HandshakeState,
        begin_session,
        consume_initiation,
        consume_response,
        create_response,
    )

    a, b = _identities()
    hs_b = Handshake(a.public_key, local=b)
    got = consume_initiation(b, data, lambda key: hs_b if key == a.public_key else None, NOW)
    check(got is None or (got is hs_b and got.state is HandshakeState.INITIATION_CONSUMED),
          "consume_initiation returned something odd")
    if got is not None:
        create_response(got, 7, ephemeral_private=WG_B_EPHEMERAL)
        begin_session(got)

    hs_a, _initiation, generator = _a_initiating()
    got = consume_response(a, data, lambda index: hs_a if index == A_INDEX else None)
    check(got is None or (got is hs_a and got.state is HandshakeState.RESPONSE_CONSUMED),
          "consume_response returned something odd")
    if got is not None:
        keys = begin_session(got)
        check(keys.is_initiator and keys.local_index == A_INDEX, "session keys of the wrong side")

    ok = generator.consume_reply(data, NOW)
    check(ok in (True, False), "consume_reply is not a bool")
    check(ok == generator.has_cookie, "a cookie stored without a valid reply (or the reverse)")
    checker = CookieChecker(b.public_key)
    check(checker.check_mac1(data) in (True, False), "check_mac1 is not a bool")
    checker.create_reply(_initiation, A_INDEX, b"\xc0\x00\x02\x01\xca\x6c", NOW)  # sets a secret
    check(checker.check_mac2(data, b"\xc0\x00\x02\x01\xca\x6c", NOW) in (True, False), "check_mac2 is not a bool")


# -------------------------------------------------------------------------------------------------------------
# TUN offload: vnet_hdr / GSO split (ingest) and the GRO coalescer, C against Python

_FILL = 0xA5
_DST_SIZE = 256 << 10
_LAYOUT_ENTRIES = 4096


def _run(fn: Callable[[], object]) -> tuple[str, object]:
    try:
        return "ok", fn()
    except (ValueError, BufferError) as exc:  # the documented errors of ingest / coalesce
        return "raise", type(exc).__name__


def _c_equals_python(
    what: str, table_name: str, fns: tuple[Callable[..., object], Callable[..., object]], dst_size: int,
    table_len: int, call: Callable[[Callable[..., object], bytearray, array.array], object],
) -> tuple[tuple[str, object], bytearray, array.array]:
    """Runs `call(fn, dst, table)` for the Python then the C `fns`, each on fresh buffers filled with marker
    values (so a byte written by one and not the other shows); outcome, dst and table must all agree.
    Returns the Python side's (outcome, dst, table)."""
    results = []
    for fn in fns:
        dst = bytearray([_FILL]) * dst_size
        table = array.array("i", [-7]) * table_len
        outcome = _run(lambda fn=fn, dst=dst, table=table: call(fn, dst, table))
        results.append((outcome, dst, table))
    (py, py_dst, py_table), (c, c_dst, c_table) = results
    check(py == c, f"C {what} {c} != Python {py}")
    check(py_dst == c_dst, f"C and Python {what} wrote different bytes")
    check(py_table == c_table, f"C and Python {what} wrote different {table_name}")
    return results[0]


def _normalize(packet: bytes) -> bytes:
    """A packet with the fields a GSO split rewrites (IPv4 ID and header checksum, TCP/UDP checksum) zeroed."""
    pkt = bytearray(packet)
    if len(pkt) < 20:
        return bytes(pkt)
    version = pkt[0] >> 4
    if version == 4:
        t, proto = (pkt[0] & 0x0F) * 4, pkt[9]
        pkt[4:6] = pkt[10:12] = b"\0\0"
    elif version == 6 and len(pkt) >= 40:
        t, proto = 40, pkt[6]
    else:
        return bytes(pkt)
    at = t + 16 if proto == 6 else t + 6 if proto == 17 else -1
    if at >= 0 and at + 2 <= len(pkt):
        pkt[at:at + 2] = b"\0\0"
    return bytes(pkt)


def _ingest_all(frames: list[bytes]) -> list[bytes]:
    """Every frame through the Python ingest: the packets the TUN reader would hand on."""
    from turbowg.tun import fast

    out: list[bytes] = []
    for frame in frames:
        dst = bytearray(len(frame) * 2 + (64 << 10))
        layout = array.array("i", bytes(8 * (len(frame) + 2)))
        count, _ = fast.ingest_py(frame, len(frame), dst, 0, layout, 0)
        out += [bytes(dst[layout[2 * k]:layout[2 * k] + layout[2 * k + 1]]) for k in range(count)]
    return out


def _joined_with_layout(packets: list[bytes]) -> tuple[bytes, array.array]:
    """The packets back to back, and the (offset, length) int pairs coalesce reads them by."""
    layout = array.array("i")
    pos = 0
    for p in packets:
        layout += array.array("i", [pos, len(p)])
        pos += len(p)
    return b"".join(packets), layout


def _coalesce_py(packets: list[bytes], tcp: bool, udp: bool) -> list[bytes]:
    from turbowg.tun import fast

    src, layout = _joined_with_layout(packets)
    dst = bytearray(len(src) + 10 * len(packets) + 64)
    frames = array.array("i", bytes(8 * max(1, len(packets))))
    n = fast.coalesce_py(src, layout, len(packets), dst, frames, tcp, udp)
    return [bytes(dst[frames[2 * j]:frames[2 * j] + frames[2 * j + 1]]) for j in range(n)]


def _check_gro_round_trip(packets: list[bytes], tcp: bool, udp: bool) -> None:
    """GRO then GSO gives the packets back (up to order across flows, IP IDs and checksums)."""
    again = _ingest_all(_coalesce_py(packets, tcp, udp))
    check(sorted(map(_normalize, again)) == sorted(map(_normalize, packets)),
          f"GRO+GSO round trip changed the packets ({len(packets)} in, {len(again)} out)")


@_register("tun_ingest", "turbowg.tun.fast ingest (C) vs ingest_py (gso.split, gso.finish_checksum, vnet)")
def tun_ingest(data: bytes) -> None:
    """A TUN read (virtio header + packet): bytes 0-2 = dst offset/8, layout index, frame_len trim; C == Python."""
    from turbowg.tun import fast

    if len(data) < 3:
        return
    dst_off, idx, trim = data[0] * 8, data[1] % 8, data[2] % 4
    frame = data[3:]
    frame_len = max(0, len(frame) - trim)
    py, py_dst, py_layout = _c_equals_python(
        "ingest", "layouts", (fast.ingest_py, fast.ingest), _DST_SIZE, 2 * _LAYOUT_ENTRIES,
        lambda fn, dst, layout: fn(frame, frame_len, dst, dst_off, layout, idx))
    if py[0] != "ok":
        return
    count, next_off = py[1]
    check(1 <= count <= max(1, frame_len) and dst_off <= next_off <= _DST_SIZE, f"odd ingest result {py[1]}")
    packets = [bytes(py_dst[py_layout[2 * k]:py_layout[2 * k] + py_layout[2 * k + 1]])
               for k in range(idx, idx + count)]
    check(sum(map(len, packets)) == next_off - dst_off, "layout does not add up to next_off")
    check(all(len(p) <= frame_len - 10 for p in packets), "a segment longer than the frame's packet")
    from turbowg.tun import vnet

    if count > 1 and vnet.unpack_from(frame, 0)[1] & ~vnet.GSO_ECN in (vnet.GSO_TCPV4, vnet.GSO_TCPV6):
        _check_gro_round_trip(packets, True, True)


def _split_packets(body: bytes) -> list[bytes]:
    """Length-prefixed (2 bytes, big-endian) packets; the last one takes what is left."""
    packets = []
    pos = 0
    while pos + 2 <= len(body) and len(packets) < 256:
        n = int.from_bytes(body[pos:pos + 2], "big")
        packets.append(body[pos + 2:pos + 2 + n])
        pos += 2 + n
    return packets


GRO_TCP, GRO_UDP, GRO_SMALL_DST = 1, 2, 4


@_register("tun_coalesce", "turbowg.tun.fast coalesce (C) vs coalesce_py (gro.coalesce, gro.frame_iov)")
def tun_coalesce(data: bytes) -> None:
    """IP packets into GRO: byte 0 = flags (1 tcp, 2 udp, 4 small dst), then 2-byte-length-prefixed packets."""
    from turbowg.tun import fast

    if not data:
        return
    flags = data[0]
    tcp, udp = bool(flags & GRO_TCP), bool(flags & GRO_UDP)
    packets = _split_packets(data[1:])
    src, layout = _joined_with_layout(packets)
    room = len(src) + 10 * len(packets) + 64
    if flags & GRO_SMALL_DST:
        room //= 2
    py, _dst, _frames = _c_equals_python(
        "coalesce", "frame tables", (fast.coalesce_py, fast.coalesce), room, 2 * max(1, len(packets)),
        lambda fn, dst, frames: fn(src, layout, len(packets), dst, frames, tcp, udp))
    if py[0] != "ok":
        return
    n = py[1]
    check(0 <= n <= len(packets) and (n > 0) == bool(packets), f"{n} frames from {len(packets)} packets")
    if not flags & GRO_SMALL_DST:
        _check_gro_round_trip([bytes(p) for p in packets], tcp, udp)


# -------------------------------------------------------------------------------------------------------------
# Transport AEAD: C Aead against PyAead


@_register("aead_open", "turbowg.noise.transport Aead (C) vs PyAead: open_batch and seal_list")
def aead_open(data: bytes) -> None:
    """Datagrams opened in place by both AEADs: byte 0 = stride (0: one datagram), byte 1 = out index."""
    from turbowg.noise import transport

    if len(data) < 2:
        return
    stride = 16 + data[0] * 4 if data[0] else max(1, len(data) - 2)
    out_idx = data[1] % 4
    body = data[2:]
    replay_py = mod("replay").ReplayWindow
    impls = [(transport.PyAead, replay_py)]
    if transport.HAVE_C:
        impls.append((transport.Aead, transport.CReplayWindow))
    else:
        impls.append((transport.PyAead, replay_py))
    results = []
    for aead, replay in impls:
        buf = bytearray(body)
        out = array.array("i", [-3]) * 64
        result = aead(AEAD_KEY).open_batch(buf, 0, len(buf), stride, AEAD_RECEIVER, replay(), out, out_idx)
        results.append((tuple(result), out, buf))
        check(bytes(buf[result.end:]) == body[result.end:], "open_batch touched bytes after where it stopped")
        check(result.count <= result.authenticated <= max(1, len(body) // 32), f"odd counts {result}")
    check(results[0][0] == results[1][0], f"open_batch C {results[1][0]} != Python {results[0][0]}")
    check(results[0][1] == results[1][1], "open_batch layouts differ")
    check(results[0][2] == results[1][2], "open_batch left different bytes in the buffer")

    # Seal: the body cut into up to 4 packets; both sealers give the same bytes, and those open again.
    cuts = sorted({0, len(body)} | {b % (len(body) + 1) for b in body[:3]})
    packets = [body[i:j] for i, j in zip(cuts, cuts[1:], strict=False)]
    counter = int.from_bytes(data[:2], "little")
    sealed = []
    for aead, _replay in impls:
        dst = bytearray(sum(len(p) + 48 for p in packets) + 16)
        sizes = array.array("i", [0]) * max(1, len(packets))
        n = aead(AEAD_KEY).seal_list(packets, dst, 0, 1420, AEAD_RECEIVER, counter, sizes, 0)
        sealed.append((bytes(dst[:n]), sizes))
    check(sealed[0] == sealed[1], "seal_list C and Python differ")
    buf = bytearray(sealed[0][0])
    pos = 0
    replay = impls[-1][1]()
    for k in range(len(packets)):
        size = sealed[0][1][k]
        out = array.array("i", [0]) * 2
        result = impls[-1][0](AEAD_KEY).open_batch(buf, pos, pos + size, size, AEAD_RECEIVER, replay, out, 0)
        check(result.authenticated == 1, f"a message sealed here does not open: {result}")
        check(bytes(buf[pos + 16:pos + 16 + len(packets[k])]) == packets[k], "opened plaintext differs")
        pos += size


# -------------------------------------------------------------------------------------------------------------
# UAPI


def _set_field_lines(obj, fields: tuple[tuple[str, Callable[..., str]], ...]) -> list[str]:  # noqa: ANN001
    """`name=value` for each of `fields` set on `obj`, in order: None means unset, and a flag is written
    only when true (`set=1` has no `=false`); 0 is a value and is written."""
    lines: list[str] = []
    for name, fmt in fields:
        value = getattr(obj, name)
        if value is not None and value is not False:
            lines.append(f"{name}={fmt(value)}")
    return lines


def _flag(_value: bool) -> str:
    return "true"


def _hex(value: bytes) -> str:
    return value.hex()


def encode_set(update) -> list[str]:  # noqa: ANN001
    """The `set=1` lines that parse back into `update` (the encoder the round trip needs)."""
    from turbowg.uapi.protocol import format_endpoint, format_network

    lines = _set_field_lines(update, (("private_key", _hex), ("listen_port", str), ("fwmark", str),
                                      ("replace_peers", _flag)))
    for peer in update.peers:
        lines.append(f"public_key={peer.public_key.hex()}")
        if peer.remove:
            lines.append("remove=true")
            continue
        lines += _set_field_lines(peer, (
            ("update_only", _flag), ("preshared_key", _hex), ("endpoint", format_endpoint),
            ("persistent_keepalive_interval", str), ("replace_allowed_ips", _flag),
        ))
        lines += [f"allowed_ip=-{format_network(n)}" for n in getattr(peer, "remove_allowed_ips", ())]
        lines += [f"allowed_ip={format_network(n)}" for n in peer.allowed_ips]
        lines += _set_field_lines(peer, (("protocol_version", str),))
    return lines


@_register("uapi_set", "turbowg.uapi.protocol parse_set (parse_endpoint, parse_allowed_ip)")
def uapi_set(data: bytes) -> None:
    """The key=value lines of a set=1 request; parse(encode(parse(x))) == parse(x)."""
    from turbowg.uapi.model import DeviceUpdate, UAPIError
    from turbowg.uapi.protocol import parse_set

    lines = data.decode("utf-8", "replace").split("\n")
    try:
        update = parse_set(lines)
    except UAPIError as exc:
        check(isinstance(exc.errno, int) and exc.errno > 0, f"bad errno {exc.errno!r}")
        return
    check(isinstance(update, DeviceUpdate) and len(update.peers) <= len(lines), "odd DeviceUpdate")
    again = parse_set(encode_set(update))
    check(again == update, f"set round trip: {again} != {update}")


def _request_key(request) -> tuple:  # noqa: ANN001
    error = request.error
    return (request.kind, tuple(request.lines), (error.errno, str(error)) if error else None, request.operation)


@_register("uapi_stream", "turbowg.uapi.protocol UAPIConnection.receive_data/receive_eof (request framing)")
def uapi_stream(data: bytes) -> None:
    """A UAPI connection's byte stream: byte 0 = read size - 1; the requests do not depend on the read sizes."""
    from turbowg.uapi.model import UAPIError
    from turbowg.uapi.protocol import UAPIConnection, parse_set

    if not data:
        return
    step, stream = data[0] + 1, data[1:]
    requests, _ = _feed_both(UAPIConnection, lambda c, b: [_request_key(r) for r in c.receive_data(b)], stream,
                             step, (), finish=lambda c: [_request_key(r) for r in c.receive_eof()])
    check(sum(len(lines) for _, lines, _, _ in requests) <= stream.count(b"\n") + 1, "more lines than in the stream")
    for kind, lines, error, _ in requests:
        check(kind in ("get", "set", "stats", "invalid"), f"odd request kind {kind!r}")
        if kind == "set" and error is None:
            try:
                parse_set(list(lines))
            except UAPIError:
                pass


# -------------------------------------------------------------------------------------------------------------
# Key text and key files


@_register("wg_keys", "turbowg.noise.keys decode_key/decode_hex_key")
def wg_keys(data: bytes) -> None:
    """Key text (base64 as in wg configs, hex as in the UAPI): 32 bytes back, canonical round trip."""
    from turbowg.noise.keys import KeyFormatError, decode_hex_key, decode_key, encode_hex_key, encode_key

    text = data.decode("latin-1")
    # Each form's canonical spelling: base64 as written, hex in lower case (the UAPI writes lower case).
    for decode, encode, canonical in ((decode_key, encode_key, text.strip()),
                                      (decode_hex_key, encode_hex_key, text.strip().lower())):
        try:
            key = decode(text)
        except KeyFormatError:
            continue
        check(len(key) == 32, f"{decode.__name__} gave {len(key)} bytes")
        check(encode(key) == canonical, f"{decode.__name__} accepted a non-canonical spelling")


@functools.cache
def _scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="turbowg-fuzz-")


@_register("derp_keys", "turbowg.derp.keys parse_private_key/parse_public_key/load_or_create_config, "
                        "relay app read_mesh_key")
def derp_keys(data: bytes) -> None:
    """derper key text, the derper JSON key file and the mesh PSK file, from the same bytes."""
    keys = mod("derp_keys")
    text = data.decode("latin-1")
    for parse, fmt in ((keys.parse_private_key, keys.format_private_key),
                       (keys.parse_public_key, keys.format_public_key)):
        try:
            key = parse(text)
        except keys.KeyFormatError:
            continue
        check(len(key) == 32 and parse(fmt(key)) == key, "derp key round trip")
    path = os.path.join(_scratch_dir(), "derper.key")
    with open(path, "wb") as f:
        f.write(data)
    try:
        key = keys.load_or_create_config(path)
    except keys.KeyFormatError:
        pass
    else:
        check(len(key) == 32, f"key file gave {len(key)} bytes")
    with open(path, "rb") as f:
        check(f.read() == data, "load_or_create_config rewrote an existing key file")
    app = mod("relay_app")
    try:
        mesh_key = app.read_mesh_key(path)
    except app.RelayConfigError:
        pass
    else:
        check(len(bytes.fromhex(mesh_key)) == 32, "mesh key is not 32 bytes")


@_register("relay_addr", "relay app parse_addr (derper -a) and mesh PeerAddress.parse (--mesh-with)")
def relay_addr(data: bytes) -> None:
    """Listen addresses and mesh peer addresses: host and a port in range, or the documented error."""
    app, mesh = mod("relay_app"), mod("mesh")
    text = data.decode("utf-8", "replace")
    try:
        host, port = app.parse_addr(text, 443)
    except app.RelayConfigError:
        pass
    else:
        check(isinstance(host, str) and 0 <= port <= 65535, f"parse_addr gave {(host, port)!r}")
    for tls in (False, True):
        try:
            peer = mesh.PeerAddress.parse(text, tls)
        except mesh.MeshConfigError:
            continue
        check(peer.host and 1 <= peer.port <= 65535, f"PeerAddress.parse gave {peer!r}")


# -------------------------------------------------------------------------------------------------------------
# DERP frames, ClientInfo / ServerInfo on both sides


def _feed_both(make: Callable[[], object], feed: Callable[[object, bytes], list], stream: bytes, step: int,
               errors: tuple[type[BaseException], ...],
               finish: Callable[[object], list] | None = None) -> tuple[list, str | None]:
    """Feed `stream` whole and in `step`-byte reads (then `finish`, the end of the stream, if given); both must
    give the same items and the same error."""
    outcomes = []
    for size in (max(1, len(stream)), step):
        conn = make()
        got: list = []
        error = None
        try:
            for i in range(0, len(stream), size):
                got += feed(conn, stream[i:i + size])
            if finish is not None:
                got += finish(conn)
        except errors as exc:
            error = type(exc).__name__
        outcomes.append((got, error))
    (whole, whole_error), (cut, cut_error) = outcomes
    if whole_error is None and cut_error is None:
        same = whole == cut
    else:
        # A parser that raises drops what it had completed in that same call: the whole-stream run may lose
        # items the cut run delivered before the error. Same error, and one item list a prefix of the other.
        shorter, longer = sorted((whole, cut), key=len)
        same = whole_error == cut_error and longer[:len(shorter)] == shorter
    check(same, f"whole {outcomes[0]!r:.300} != in reads of {step}: {outcomes[1]!r:.300}")
    return outcomes[1]


def _check_message_round_trip(codec, message) -> None:  # noqa: ANN001
    encoded = None
    if isinstance(message, codec.ReceivedPacket):
        encoded = codec.encode_recv_packet(message.source, message.data)
    elif isinstance(message, codec.PeerGone):
        encoded = codec.encode_peer_gone(message.peer, message.reason)
    elif isinstance(message, codec.PeerPresent) and message.ip is not None:
        encoded = codec.encode_peer_present(message.peer, message.ip, message.port, message.flags)
    elif isinstance(message, codec.Ping):
        encoded = codec.encode_ping(message.data)
    elif isinstance(message, codec.Pong):
        encoded = codec.encode_pong(message.data)
    elif isinstance(message, codec.Health):
        encoded = codec.encode_health(message.problem)
    elif isinstance(message, codec.ServerRestarting):
        encoded = codec.encode_restarting(message.reconnect_in_ms, message.try_for_ms)
    elif isinstance(message, codec.KeepAlive):
        encoded = codec.encode_keep_alive()
    if encoded is None:
        return
    (frame,) = codec.FrameDecoder(lambda _t: 1 << 20).feed(encoded)
    check(codec.decode_server_message(*frame) == message, f"decode(encode({message!r:.200})) differs")


@_register("derp_frames", "turbowg.derp.codec FrameDecoder, decode_server_message, parse_* payload parsers")
def derp_frames(data: bytes) -> None:
    """A DERP byte stream: byte 0 = read size - 1; frames re-encode to the bytes they came from."""
    codec = mod("derp_codec")
    if not data:
        return
    step, stream = data[0] + 1, data[1:]

    def limit(frame_type: int) -> int:
        return 1 << 17

    frames, error = _feed_both(lambda: codec.FrameDecoder(limit), lambda d, b: d.feed(b), stream, step,
                               (codec.FrameError,))
    encoded = b"".join(codec.encode_frame(t, p) for t, p in frames)
    check(stream.startswith(encoded), "frames do not re-encode to the stream they came from")
    parsers = (codec.parse_server_key, codec.parse_client_info, codec.parse_server_info, codec.parse_send_packet,
               codec.parse_recv_packet, codec.parse_forward_packet, codec.parse_note_preferred, codec.parse_ping,
               codec.parse_peer_present, lambda p: codec.parse_key_frame(p, "ClosePeer"))
    for frame_type, payload in frames:
        try:
            message = codec.decode_server_message(frame_type, payload)
        except codec.FrameError:
            pass
        else:
            _check_message_round_trip(codec, message)
        for parse in parsers:
            try:
                parse(payload)
            except codec.FrameError:
                pass


def _info_and_rest(body: bytes) -> tuple[bytes, bytes]:
    """2-byte big-endian JSON length, the JSON, then the rest of the stream."""
    n = int.from_bytes(body[:2], "big")
    return body[2:2 + n], body[2 + n:]


class _Events:
    """ServerEvents that record what the connection reported."""

    def __init__(self, log: list) -> None:
        self.log = log

    def on_authenticated(self, client_key, info, can_mesh, server_info_frame) -> None:  # noqa: ANN001
        # The frame's box has a random nonce: recorded as what our client makes of it.
        server_info = None
        if client_key == _derp_publics()[1]:
            keys, codec = mod("derp_keys"), mod("derp_codec")
            opened = keys.open_from(DERP_CLIENT_PRIVATE, _derp_publics()[0], server_info_frame[5:])
            check(server_info_frame[:1] == b"\x03" and opened is not None, "ServerInfo frame does not open")
            server_info = codec.ServerInfo.from_json(opened)
        self.log.append(("auth", bytes(client_key), info, can_mesh, server_info))

    def on_send_packet(self, dst, packet) -> None:  # noqa: ANN001
        self.log.append(("send", bytes(dst), bytes(packet)))

    def on_forward_packet(self, src, dst, packet) -> None:  # noqa: ANN001
        self.log.append(("forward", bytes(src), bytes(dst), bytes(packet)))

    def on_note_preferred(self, preferred) -> None:  # noqa: ANN001
        self.log.append(("preferred", preferred))

    def on_watch_conns(self) -> None:
        self.log.append(("watch",))

    def on_close_peer(self, peer) -> None:  # noqa: ANN001
        self.log.append(("close_peer", bytes(peer)))

    def on_ping(self, data) -> None:  # noqa: ANN001
        self.log.append(("ping", bytes(data)))

    def on_unknown_frame(self, frame_type, length) -> None:  # noqa: ANN001
        self.log.append(("unknown", frame_type, length))


DERP_SEALED_INFO, DERP_MESH_SERVER = 1, 2


@functools.cache
def _derp_publics() -> tuple[bytes, bytes]:
    keys = mod("derp_keys")
    return keys.public_key(DERP_SERVER_PRIVATE), keys.public_key(DERP_CLIENT_PRIVATE)


def _derp_input(data: bytes, to_server: bool) -> tuple[int, int, bytes] | None:
    """A derp_server / derp_client input as (flags, read size, stream): byte 0 = flags, byte 1 = read size - 1.
    With DERP_SEALED_INFO, bytes 2.. are an info JSON (then raw bytes) sealed here and framed as the other
    side's handshake (ClientInfo to the relay; ServerKey + ServerInfo to the client), so the fuzzer gets
    past the box it could never forge."""
    if len(data) < 2:
        return None
    flags, step, body = data[0], data[1] + 1, data[2:]
    if not flags & DERP_SEALED_INFO:
        return flags, step, body
    codec, keys = mod("derp_codec"), mod("derp_keys")
    server_public, client_public = _derp_publics()
    info, rest = _info_and_rest(body)
    if to_server:
        sealed = keys.seal_to(DERP_CLIENT_PRIVATE, server_public, info, nonce=DERP_NONCE)
        return flags, step, codec.encode_client_info(client_public, sealed) + rest
    sealed = keys.seal_to(DERP_SERVER_PRIVATE, client_public, info, nonce=DERP_NONCE)
    return flags, step, codec.encode_server_key(server_public) + codec.encode_server_info(sealed) + rest


@_register("derp_server", "server_proto ServerConnection.receive_data (ClientInfo JSON, frame validation)")
def derp_server(data: bytes) -> None:
    """Client-to-relay bytes: byte 0 = flags (1: bytes 2.. are a ClientInfo JSON sealed here, 2: relay has a
    mesh key), byte 1 = read size - 1; events do not depend on the read sizes."""
    proto, codec = mod("server_proto"), mod("derp_codec")
    parsed = _derp_input(data, to_server=True)
    if parsed is None:
        return
    flags, step, stream = parsed
    server_public = _derp_publics()[0]
    mesh_key = DERP_MESH_KEY if flags & DERP_MESH_SERVER else ""

    def make():  # noqa: ANN202
        log: list = []
        conn = proto.ServerConnection(DERP_SERVER_PRIVATE, _Events(log), mesh_key=mesh_key,
                                      public_key=server_public)
        return conn, log

    def feed(state, chunk: bytes) -> list:  # noqa: ANN001
        conn, log = state
        before = len(log)
        conn.receive_data(chunk)
        return log[before:]

    events, _error = _feed_both(make, feed, stream, step, (proto.ProtocolError,))
    for event in events:
        if event[0] == "auth":
            _tag, client_key, info, can_mesh, _server_info = event
            check(client_key == stream[5:37], "authenticated a key that is not the ClientInfo's")
            check(isinstance(info.mesh_key, str) and type(info.version) is int  # a JSON true is no version
                  and type(info.can_ack_pings) is bool and type(info.is_prober) is bool, f"odd ClientInfo {info!r}")
            check(codec.ClientInfo.from_json(info.to_json()) == info, "ClientInfo JSON round trip")
            check(not can_mesh or bool(mesh_key), "mesh rights without a mesh key")
        elif event[0] in ("send", "forward"):
            check(len(event[-1]) <= codec.MAX_PACKET_SIZE, "packet over the DERP maximum")


@_register("derp_client", "turbowg.derp.client_proto ClientConnection.receive_data (ServerKey, ServerInfo)")
def derp_client(data: bytes) -> None:
    """Relay-to-client bytes: byte 0 = flags (1: a ServerKey frame, then bytes 2.. as a ServerInfo JSON sealed
    here), byte 1 = read size - 1; messages do not depend on the read sizes."""
    client_proto, codec = mod("client_proto"), mod("derp_codec")
    parsed = _derp_input(data, to_server=False)
    if parsed is None:
        return
    flags, step, stream = parsed
    server_public = _derp_publics()[0]

    def make():  # noqa: ANN202
        return client_proto.ClientConnection(DERP_CLIENT_PRIVATE, mesh_key=DERP_MESH_KEY)

    messages, _error = _feed_both(make, lambda c, b: c.receive_data(b), stream, step,
                                  (client_proto.ClientProtocolError,))
    for message in messages:
        if isinstance(message, client_proto.Connected):
            check(message.server_key == server_public or not flags & DERP_SEALED_INFO, "connected to another key")
            check(type(message.server_info.version) is int, f"odd ServerInfo {message.server_info!r}")  # not bool
        else:
            _check_message_round_trip(codec, message)


# -------------------------------------------------------------------------------------------------------------
# The relay's HTTP front


class _Transport:
    """Just enough of an asyncio transport for RelayHTTPProtocol and ClientConn."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        check(not self.closed, "write after close")
        self.out += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


_LOOP: asyncio.AbstractEventLoop | None = None


def _relay_http_once(stream: bytes, step: int) -> tuple[bytes, bool]:
    http, server_mod = mod("relay_http"), mod("relay_server")

    async def drive() -> tuple[bytes, bool]:
        server = server_mod.DerpServer(DERP_SERVER_PRIVATE, handshake_timeout=0, write_timeout=0)
        protocol = http.RelayHTTPProtocol(server)
        transport = _Transport()
        protocol.connection_made(transport)
        for i in range(0, len(stream), step):
            if transport.closed:
                break
            protocol.data_received(stream[i:i + step])
        protocol.connection_lost(None)
        server.close()
        return bytes(transport.out), transport.closed

    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(drive())


@_register("relay_http", "relay http RelayHTTPProtocol.data_received (request head parser, upgrade to DERP)")
def relay_http(data: bytes) -> None:
    """Bytes on a relay TCP connection: byte 0 = read size - 1; responses do not depend on the read sizes."""
    if not data:
        return
    step, stream = data[0] + 1, data[1:]
    whole = _relay_http_once(stream, max(1, len(stream)))
    pieces = _relay_http_once(stream, step)
    check(whole == pieces, f"responses depend on the read sizes: {whole!r:.200} != {pieces!r:.200}")
    out = whole[0]
    check(not out or out.startswith((b"HTTP/1.1 ", b"\x01\x00\x00\x00\x28")), f"odd first bytes {out[:40]!r}")
    heads = stream.count(b"\r\n\r\n")
    check(out.count(b"HTTP/1.1 ") <= heads + 1, "more responses than requests")


# -------------------------------------------------------------------------------------------------------------
# STUN

STUN_STRUCTURED, STUN_FINGERPRINT, STUN_RESPONSE = 1, 2, 4


class _DatagramTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, object]] = []

    def sendto(self, data: bytes, addr: object) -> None:
        self.sent.append((data, addr))


@_register("stun", "relay stun parse_binding_request/parse_binding_response, StunProtocol.datagram_received")
def stun(data: bytes) -> None:
    """A STUN datagram: byte 0 = flags (1: a valid header is built around bytes 13.. as attributes with txid
    1..12, 2: add a FINGERPRINT, 4: binding success); round trips through the builders."""
    s = mod("stun")
    if not data:
        return
    flags = data[0]
    if flags & STUN_STRUCTURED and len(data) >= 13:
        txid, attrs = data[1:13], data[13:]
        attrs += b"\0" * (-len(attrs) % 4)
        kind = s.BINDING_SUCCESS if flags & STUN_RESPONSE else s.BINDING_REQUEST
        length = len(attrs) + (8 if flags & STUN_FINGERPRINT else 0)
        msg = struct.pack("!HHI12s", kind, length, s.MAGIC_COOKIE, txid) + attrs
        if flags & STUN_FINGERPRINT:
            msg += struct.pack("!HHI", s.ATTR_FINGERPRINT, 4, s.fingerprint(msg))
    else:
        msg = data[1:]
    for parse in (s.parse_binding_request, s.parse_binding_response):
        try:
            result = parse(msg)
        except s.StunError as exc:
            check(isinstance(exc.reason, str) and exc.reason, "StunError without a reason")
            continue
        if parse is s.parse_binding_request:
            check(result == msg[8:20], "txid is not the header's")
        else:
            txid, ip, port = result
            check(txid == msg[8:20] and 0 <= port <= 0xFFFF, f"odd binding response {result!r}")
            check(s.parse_binding_response(s.build_binding_response(txid, ip, port)) == (txid, ip, port),
                  "binding response round trip")
    protocol = s.StunProtocol()
    transport = _DatagramTransport()
    protocol.connection_made(transport)
    protocol.datagram_received(msg, ("2001:db8::7%eth0", 3478))
    protocol.datagram_received(msg, ("192.0.2.9", 40000))
    for response, _addr in transport.sent:
        check(s.parse_binding_response(response)[0] == msg[8:20], "a response for another transaction")
    if len(data) >= 15:
        txid = data[1:13]
        port = int.from_bytes(data[13:15], "big")
        ip = ipaddress.ip_address(data[15:31]) if len(data) >= 31 else ipaddress.ip_address(data[1:5])
        check(s.parse_binding_response(s.build_binding_response(txid, ip, port)) == (txid, ip, port)
              or (ip.version == 6 and ip.ipv4_mapped is not None), "binding response round trip")
        check(s.parse_binding_request(s.build_binding_request(txid, data[15:40])) == txid,
              "binding request round trip")


@_register("handshake_screen", "turbowg.conn recvmmsg Screener (C) vs PyScreener: one recvmmsg batch")
def handshake_screen(data: bytes) -> None:
    """recvmmsg buffers as the kernel could fill them, from the input: byte 0 = slots (1..4) and under-load
    bit; then per slot a 6-byte head (msg_len, GRO segment size, flags: bit 0 GRO cmsg, bit 1 MSG_TRUNC, bit 2
    IPv4 source) and its payload cut from the rest. The C and Python screeners must agree."""
    from turbowg.conn import recvmmsg as r

    if len(data) < 1:
        return
    n = 1 + (data[0] & 3)
    under_load = bool(data[0] & 4)
    slot = r.SLOT_BYTES
    headers = bytearray(r._MMSGHDR_SIZE * n)
    body = bytearray(slot * n)
    names = bytearray(r._SOCKADDR_IN6 * n)
    controls = bytearray(r._GRO_CMSG_SPACE * n)
    pos = 1
    for i in range(n):
        head = data[pos:pos + 6].ljust(6, b"\0")
        pos += 6
        msg_len, seg, flags = struct.unpack("<HHH", head)
        payload = data[pos:pos + min(msg_len, slot)]
        pos += len(payload)
        body[i * slot:i * slot + len(payload)] = payload
        at = i * r._SOCKADDR_IN6
        struct.pack_into("=H", names, at, 10)  # AF_INET6
        names[at + 2:at + 4] = (1000 + i).to_bytes(2, "big")
        names[at + 8:at + 24] = (bytes(10) + b"\xff\xff" + bytes([10, 0, 0, i])) if flags & 4 else \
            bytes([0xFD] + [i] * 15)
        controllen = 0
        if flags & 1:
            struct.pack_into("=Qii", controls, i * r._GRO_CMSG_SPACE, 18, r.SOL_UDP, r.UDP_GRO)
            struct.pack_into("=H", controls, i * r._GRO_CMSG_SPACE + 16, seg)
            controllen = r._GRO_CMSG_SPACE
        base = i * r._MMSGHDR_SIZE
        struct.pack_into("=Q", headers, base + r.Msghdr.msg_controllen.offset, controllen)
        struct.pack_into("=i", headers, base + r.Msghdr.msg_flags.offset, 0x20 if flags & 2 else 0)
        struct.pack_into("=I", headers, base + r.Mmsghdr.msg_len.offset, msg_len)
    key = bytes(range(32))
    now = 10**12
    args = (headers, body, names, controls, n, slot, r._GRO_CMSG_SPACE, now, under_load)
    want = r.PyScreener(key, 20.0, 5, 4, 1_000_000_000).screen(*args)
    if r._hsscreen is not None and r._hsscreen.SIZEOF_MMSGHDR == r._MMSGHDR_SIZE:
        got = r._hsscreen.Screener(key, 20.0, 5, 4, 1_000_000_000).screen(*args)
        check(got == want, f"C and Python screeners disagree: {got!r} != {want!r}")
