"""STUN (RFC 5389) binding service, as a DERP relay offers it on UDP 3478.

The protocol part is sans-IO: `parse_binding_request` turns a datagram into a transaction id (or raises
`StunError` with the reason, so the server can count drops), `build_binding_response` turns a
transaction id and the observed source address into the success response carrying
XOR-MAPPED-ADDRESS. Like Tailscale's derper, the response holds only that one attribute. Unlike
derper, any well-formed binding request is answered, not only those whose SOFTWARE says "tailnode":
a STUN server that only talks to one client is of little use for testing. A FINGERPRINT, when
present, must be the last attribute and must match.

`build_binding_request` / `parse_binding_response` are the client side (used by tests and by
endpoint discovery). `serve_stun` is the thin asyncio layer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import cast

log = logging.getLogger(__name__)

MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
HEADER_LEN = 20
TXID_LEN = 12

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020  # some servers send it in the comprehension-optional range
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
FINGERPRINT_XOR = 0x5354554E  # "STUN"

FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

TAILSCALE_SOFTWARE = b"tailnode"

_HEADER = struct.Struct("!HHI12s")
_ATTR_HEADER = struct.Struct("!HH")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class StunError(ValueError):
    """A datagram that is not a usable STUN message; `reason` is a short counter name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def fingerprint(message_prefix: bytes | memoryview) -> int:
    """FINGERPRINT value over everything before the FINGERPRINT attribute (RFC 5389 15.5)."""
    return zlib.crc32(message_prefix) ^ FINGERPRINT_XOR


def is_stun(data: bytes | memoryview) -> bool:
    """Cheap check used to demultiplex STUN from other traffic on a shared socket."""
    return len(data) >= HEADER_LEN and data[0] & 0xC0 == 0 and bytes(data[4:8]) == MAGIC_COOKIE_BYTES


def _iter_attributes(body: memoryview) -> list[tuple[int, int, memoryview]]:
    """(type, offset of the attribute header within body, value) for each attribute; raises on bad TLVs."""
    attrs: list[tuple[int, int, memoryview]] = []
    pos = 0
    end = len(body)
    while pos < end:
        if end - pos < 4:
            raise StunError("truncated_attribute")
        attr_type, attr_len = _ATTR_HEADER.unpack_from(body, pos)
        value_start = pos + 4
        padded = (attr_len + 3) & ~3
        if value_start + padded > end:
            raise StunError("truncated_attribute")
        attrs.append((attr_type, pos, body[value_start : value_start + attr_len]))
        pos = value_start + padded
    return attrs


def _parse_message(data: bytes | memoryview) -> tuple[int, bytes, list[tuple[int, int, memoryview]]]:
    """Validate header, length and attribute framing (and FINGERPRINT if present)."""
    view = memoryview(data)
    if len(view) < HEADER_LEN:
        raise StunError("short")
    msg_type, msg_len, cookie, txid = _HEADER.unpack_from(view, 0)
    if msg_type & 0xC000:
        raise StunError("not_stun")
    if cookie != MAGIC_COOKIE:
        raise StunError("bad_cookie")
    if msg_len % 4 or HEADER_LEN + msg_len != len(view):
        raise StunError("bad_length")
    attrs = _iter_attributes(view[HEADER_LEN:])
    for index, (attr_type, offset, value) in enumerate(attrs):
        if attr_type != ATTR_FINGERPRINT:
            continue
        if index != len(attrs) - 1 or len(value) != 4:
            raise StunError("bad_fingerprint")
        expected = fingerprint(view[: HEADER_LEN + offset])
        if int.from_bytes(value, "big") != expected:
            raise StunError("bad_fingerprint")
    return msg_type, txid, attrs


def parse_binding_request(data: bytes | memoryview) -> bytes:
    """Return the 12-byte transaction id of a well-formed binding request, else raise StunError."""
    msg_type, txid, _ = _parse_message(data)
    if msg_type != BINDING_REQUEST:
        raise StunError("not_binding_request")
    return txid


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _xor_address(txid: bytes, packed: bytes) -> bytes:
    mask = MAGIC_COOKIE_BYTES + txid
    return bytes(a ^ b for a, b in zip(packed, mask, strict=False))


def encode_xor_mapped_address(txid: bytes, ip: IPAddress, port: int) -> bytes:
    """The XOR-MAPPED-ADDRESS attribute (header included) for ip:port."""
    ip = _unmapped(ip)
    family = FAMILY_IPV4 if ip.version == 4 else FAMILY_IPV6
    packed = ip.packed
    value = struct.pack("!BBH", 0, family, port ^ (MAGIC_COOKIE >> 16)) + _xor_address(txid, packed)
    return _ATTR_HEADER.pack(ATTR_XOR_MAPPED_ADDRESS, len(value)) + value


def build_binding_response(txid: bytes, ip: IPAddress | str, port: int) -> bytes:
    """Binding success response telling the client which address and port its request came from."""
    if len(txid) != TXID_LEN:
        raise ValueError("transaction id must be 12 bytes")
    if not 0 <= port <= 0xFFFF:
        raise ValueError("port out of range")
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    attr = encode_xor_mapped_address(txid, addr, port)
    return _HEADER.pack(BINDING_SUCCESS, len(attr), MAGIC_COOKIE, txid) + attr


def new_txid() -> bytes:
    return os.urandom(TXID_LEN)


def build_binding_request(txid: bytes, software: bytes | None = TAILSCALE_SOFTWARE) -> bytes:
    """Binding request with SOFTWARE (as Tailscale clients send) and FINGERPRINT."""
    if len(txid) != TXID_LEN:
        raise ValueError("transaction id must be 12 bytes")
    attrs = b""
    if software is not None:
        attrs += _ATTR_HEADER.pack(ATTR_SOFTWARE, len(software)) + software + b"\0" * (-len(software) % 4)
    length = len(attrs) + 8  # plus FINGERPRINT
    prefix = _HEADER.pack(BINDING_REQUEST, length, MAGIC_COOKIE, txid) + attrs
    return prefix + _ATTR_HEADER.pack(ATTR_FINGERPRINT, 4) + fingerprint(prefix).to_bytes(4, "big")


def _decode_address(value: memoryview, txid: bytes | None) -> tuple[IPAddress, int]:
    if len(value) < 4:
        raise StunError("bad_address")
    family = value[1]
    addr_len = {FAMILY_IPV4: 4, FAMILY_IPV6: 16}.get(family)
    if addr_len is None or len(value) < 4 + addr_len:
        raise StunError("bad_address")
    port = int.from_bytes(value[2:4], "big")
    raw = bytes(value[4 : 4 + addr_len])
    if txid is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = _xor_address(txid, raw)
    # An IPv6-family v4-mapped address is the IPv4 address: the same canonical form the builder writes,
    # so a client's endpoint never depends on which family the server chose (found by `turbowg fuzz stun`).
    return _unmapped(ipaddress.ip_address(raw)), port


def parse_binding_response(data: bytes | memoryview) -> tuple[bytes, IPAddress, int]:
    """(txid, ip, port) from a binding success response; XOR-MAPPED-ADDRESS preferred over MAPPED-ADDRESS."""
    msg_type, txid, attrs = _parse_message(data)
    if msg_type != BINDING_SUCCESS:
        raise StunError("not_binding_success")
    fallback: tuple[IPAddress, int] | None = None
    for attr_type, _, value in attrs:
        if attr_type in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
            ip, port = _decode_address(value, txid)
            return txid, ip, port
        if attr_type == ATTR_MAPPED_ADDRESS:
            fallback = _decode_address(value, None)
    if fallback is None:
        raise StunError("no_address")
    return txid, fallback[0], fallback[1]


@dataclass
class StunCounters:
    requests: int = 0
    responses: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class StunProtocol(asyncio.DatagramProtocol):
    """Answers binding requests; everything else is dropped and counted by reason."""

    def __init__(self) -> None:
        self.counters = StunCounters()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport does not subclass DatagramTransport, hence the cast.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        try:
            txid = parse_binding_request(data)
            ip = ipaddress.ip_address(addr[0].split("%", 1)[0])  # drop an IPv6 zone id
            response = build_binding_response(txid, ip, addr[1])
        except (StunError, ValueError) as exc:
            self.counters.drop(exc.reason if isinstance(exc, StunError) else "bad_source")
            return
        self.counters.requests += 1
        if self.transport is not None:
            self.transport.sendto(response, addr)
            self.counters.responses += 1

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier responses (client gone); nothing to do but note it.
        log.debug("stun: socket error %s", exc)
        self.counters.drop("socket_error")


async def serve_stun(host: str, port: int) -> asyncio.DatagramTransport:
    """Listen for STUN on host:port (UDP); the protocol (with counters) is `transport.get_protocol()`."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(StunProtocol, local_addr=(host, port))
    return cast(asyncio.DatagramTransport, transport)
