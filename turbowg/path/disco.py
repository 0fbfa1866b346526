"""Disco: small authenticated messages with which two peers find a direct UDP path while they talk over DERP.

The idea and the three message types are Tailscale's (disco/disco.go); the layout below is turbowg's own.
A disco datagram travels either as a UDP datagram on the WireGuard socket or as a DERP packet to the peer's
key, and is told apart from WireGuard by its first bytes alone (`is_disco`):

    offset  size  field
    0       6     MAGIC = b"TWdisc" (ASCII). As a little-endian u32 its first 4 bytes are 0x69645754, never a
                  WireGuard type word (1..4 followed by three zero reserved bytes), and its first two bits
                  (01) are not STUN's (00).
    6       32    sender's WireGuard static public key (Curve25519)
    38      24    nonce (random)
    62      16+n  NaCl box (XSalsa20-Poly1305 with the X25519 shared key of the two static keys) of:
                    0  1  message type: 1 ping, 2 pong, 3 call-me-maybe
                    1  1  version: 0; readers ignore it and any bytes after the v0 body of a ping/pong
                    2  .. body:
                         ping           txid(12)
                         pong           txid(12) src-address(16) src-port(2, big-endian)
                         call-me-maybe  n * [address(16) port(2, big-endian)], 0 <= n <= 32

Addresses are 16 bytes: IPv6, or IPv4 mapped (::ffff:a.b.c.d). A pong's src is where the ping came from as
the ponger saw it (the pinger's public address, like a STUN answer). Port 0 or an unspecified address makes
a message malformed.

`open` returns None for anything malformed, unauthenticated or from a key it has no box for; it raises
nothing on hostile bytes. Building a Box does the X25519 DH, so `DiscoKeys` keeps one per peer.
Endpoints are the data plane's ``(host, port)`` tuples (turbowg/conn/endpoint.py), spelled as the UDP
receive path spells them (IPv4 as a dotted quad, IPv6 as inet_ntop writes it), so a pong's UDP source
compares equal to the endpoint that was pinged.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey

from turbowg.conn.endpoint import Endpoint
from turbowg.derp.keys import box_between
from turbowg.path.constants import MAX_CALL_ME_MAYBE_ENDPOINTS
from turbowg.wire import KEY_SIZE

MAGIC = b"TWdisc"
NONCE_SIZE = 24
BOX_OVERHEAD = 16  # Poly1305 tag
HEADER_SIZE = len(MAGIC) + KEY_SIZE + NONCE_SIZE  # 62
TXID_SIZE = 12
ENDPOINT_SIZE = 18  # address(16) + port(2)
MIN_SIZE = HEADER_SIZE + BOX_OVERHEAD + 2  # type + version, empty body

TYPE_PING = 1
TYPE_PONG = 2
TYPE_CALL_ME_MAYBE = 3
VERSION = 0

_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"
_ZERO16 = bytes(16)


@dataclass(frozen=True, slots=True)
class Ping:
    """Are you there on this path? Answered by a Pong to the ping's UDP source."""

    txid: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to Ping `txid`; `src` is where the ping came from as the answering side saw it."""

    txid: bytes
    src: Endpoint


@dataclass(frozen=True, slots=True)
class CallMeMaybe:
    """(Sent over DERP) these are my candidate endpoints: ping them now, as I am pinging yours."""

    endpoints: tuple[Endpoint, ...]


Message = Ping | Pong | CallMeMaybe


class Opened(NamedTuple):
    sender: bytes  # the sender's static public key (authenticated by the box)
    message: Message


def is_disco(datagram: bytes | bytearray | memoryview) -> bool:
    """Whether `datagram` is (claims to be) a disco message: one length check and one prefix compare, cheap
    enough for the receive path; the box authenticates it later (`open`)."""
    return len(datagram) >= MIN_SIZE and datagram[:6] == MAGIC


# -- endpoints ------------------------------------------------------------------------------------------------
def pack_endpoint(endpoint: Endpoint) -> bytes:
    """``(host, port)`` -> 16-byte address (IPv4 mapped) + big-endian port. ValueError if it is not one."""
    host, port = endpoint
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"endpoint port {port!r} out of range")
    try:
        if ":" in host:
            address = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        else:
            address = _V4_MAPPED + socket.inet_pton(socket.AF_INET, host)
    except (OSError, TypeError):
        raise ValueError(f"endpoint host {host!r} is not an IP address") from None
    if address == _ZERO16 or address == _V4_MAPPED + bytes(4):
        raise ValueError(f"endpoint host {host!r} is unspecified")
    return address + port.to_bytes(2, "big")


def unpack_endpoint(data: bytes) -> Endpoint | None:
    """18 bytes -> ``(host, port)`` spelled as the UDP receive path does; None for port 0, an unspecified
    address, or not 18 bytes."""
    if len(data) != ENDPOINT_SIZE:
        return None
    port = (data[16] << 8) | data[17]
    if port == 0:
        return None
    address = data[:16]
    if address[:12] == _V4_MAPPED:
        if address[12:] == b"\x00\x00\x00\x00":
            return None
        return (socket.inet_ntop(socket.AF_INET, address[12:]), port)
    if address == _ZERO16:
        return None
    return (socket.inet_ntop(socket.AF_INET6, address), port)


# -- payload --------------------------------------------------------------------------------------------------
def encode_payload(message: Message) -> bytes:
    """The plaintext inside the box. ValueError for a message that cannot be sent (bad txid, endpoint, count)."""
    if isinstance(message, Ping):
        _check_txid(message.txid)
        return bytes((TYPE_PING, VERSION)) + message.txid
    if isinstance(message, Pong):
        _check_txid(message.txid)
        return bytes((TYPE_PONG, VERSION)) + message.txid + pack_endpoint(message.src)
    if isinstance(message, CallMeMaybe):
        if len(message.endpoints) > MAX_CALL_ME_MAYBE_ENDPOINTS:
            raise ValueError(f"call-me-maybe with {len(message.endpoints)} endpoints, at most "
                             f"{MAX_CALL_ME_MAYBE_ENDPOINTS}")
        return bytes((TYPE_CALL_ME_MAYBE, VERSION)) + b"".join(pack_endpoint(e) for e in message.endpoints)
    raise TypeError(f"not a disco message: {message!r}")


def _check_txid(txid: bytes) -> None:
    if not isinstance(txid, bytes) or len(txid) != TXID_SIZE:
        raise ValueError(f"txid must be {TXID_SIZE} bytes")


def decode_payload(plaintext: bytes) -> Message | None:
    """The message in an opened box, or None if it is malformed or of an unknown type."""
    if len(plaintext) < 2:
        return None
    kind = plaintext[0]  # plaintext[1] is the version: ignored, v0 layout read, trailing bytes ignored
    body = plaintext[2:]
    if kind == TYPE_PING:
        if len(body) < TXID_SIZE:
            return None
        return Ping(bytes(body[:TXID_SIZE]))
    if kind == TYPE_PONG:
        if len(body) < TXID_SIZE + ENDPOINT_SIZE:
            return None
        src = unpack_endpoint(bytes(body[TXID_SIZE:TXID_SIZE + ENDPOINT_SIZE]))
        if src is None:
            return None
        return Pong(bytes(body[:TXID_SIZE]), src)
    if kind == TYPE_CALL_ME_MAYBE:
        count, rest = divmod(len(body), ENDPOINT_SIZE)
        if rest or count > MAX_CALL_ME_MAYBE_ENDPOINTS:
            return None
        endpoints = []
        for i in range(0, len(body), ENDPOINT_SIZE):
            endpoint = unpack_endpoint(bytes(body[i:i + ENDPOINT_SIZE]))
            if endpoint is None:
                return None
            endpoints.append(endpoint)
        return CallMeMaybe(tuple(endpoints))
    return None


# -- sealing --------------------------------------------------------------------------------------------------
def make_box(private_key: bytes, peer_public: bytes) -> Box:
    """The box between our static private key and a peer's static public key (does the X25519 DH).
    ValueError for keys that are not 32 bytes or a DH that fails (a low-order public key)."""
    if len(private_key) != KEY_SIZE or len(peer_public) != KEY_SIZE:
        raise ValueError("keys must be 32 bytes")
    return box_between(bytes(private_key), bytes(peer_public))  # LowOrderKeyError is a ValueError


def seal(box: Box, sender_public: bytes, message: Message, nonce: bytes | None = None) -> bytes:
    """A disco datagram carrying `message` from `sender_public` (whose private key is in `box`)."""
    if len(sender_public) != KEY_SIZE:
        raise ValueError("sender public key must be 32 bytes")
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    elif len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    sealed = box.encrypt(encode_payload(message), nonce)  # nonce + tag + ciphertext
    return MAGIC + bytes(sender_public) + bytes(sealed)


def open(datagram: bytes | bytearray | memoryview, boxes: Mapping[bytes, Box]) -> Opened | None:  # noqa: A001
    """The sender and message of a disco datagram, or None if it is not one, is malformed, is not from a key
    in `boxes` (sender public key -> box with it), or fails authentication. Never raises on hostile bytes."""
    if not is_disco(datagram):
        return None
    sender = bytes(datagram[6:38])
    box = boxes.get(sender)
    if box is None:
        return None
    try:
        plaintext = box.decrypt(bytes(datagram[HEADER_SIZE:]), bytes(datagram[38:HEADER_SIZE]))
    except (CryptoError, ValueError, TypeError):
        return None
    message = decode_payload(plaintext)
    if message is None:
        return None
    return Opened(sender, message)


class DiscoKeys:
    """Our static key pair and one cached Box per peer: seal to / open from known peers only."""

    __slots__ = ("public_key", "_private_key", "_boxes")

    def __init__(self, private_key: bytes) -> None:
        if len(private_key) != KEY_SIZE:
            raise ValueError("private key must be 32 bytes")
        self._private_key = bytes(private_key)
        self.public_key = bytes(PrivateKey(self._private_key).public_key)
        self._boxes: dict[bytes, Box] = {}

    def add_peer(self, peer_public: bytes) -> None:
        """Precompute the box for a peer (the DH happens here, once). ValueError for an unusable key."""
        peer_public = bytes(peer_public)
        if peer_public not in self._boxes:
            self._boxes[peer_public] = make_box(self._private_key, peer_public)

    def remove_peer(self, peer_public: bytes) -> None:
        self._boxes.pop(bytes(peer_public), None)

    def has_peer(self, peer_public: bytes) -> bool:
        return bytes(peer_public) in self._boxes

    def seal(self, peer_public: bytes, message: Message, nonce: bytes | None = None) -> bytes:
        """A disco datagram for a peer added with add_peer (KeyError otherwise)."""
        return seal(self._boxes[bytes(peer_public)], self.public_key, message, nonce)

    def open(self, datagram: bytes | bytearray | memoryview) -> Opened | None:
        """As module-level `open`, against the peers added so far."""
        return open(datagram, self._boxes)
