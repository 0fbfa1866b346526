"""WireGuard's Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s handshake (WireGuard paper section 5.4), sans-IO.

One `Handshake` per peer holds the in-progress state, like wireguard-go's Handshake struct. Functions
take bytes and times and return bytes or the updated Handshake; mac1/mac2 are left zero for
cookie.CookieGenerator.add_macs to fill in.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from turbowg.wire import (
    HANDSHAKE_INITIATION_RATE,
    INITIATION_SIZE,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    RESPONSE_SIZE,
)

from .primitives import (
    HASH_SIZE,
    KEY_SIZE,
    TAI64N_SIZE,
    ZERO32,
    aead_open,
    aead_seal,
    dh,
    generate_private_key,
    hash_,
    kdf,
    public_key,
    tai64n,
    zero,
)

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

# Nanoseconds of our TAI64N timestamps are rounded down to ~16.8 ms, as wireguard-go does, so that
# initiations do not reveal our precise clock.
TIMESTAMP_WHITENER_MASK = 0x1000000 - 1


# Chaining key and hash after mixing the construction and identifier: the same for every handshake.
INITIAL_CHAINING_KEY = hash_(CONSTRUCTION)
INITIAL_HASH = hash_(INITIAL_CHAINING_KEY, IDENTIFIER)

_INITIATION_HEAD = struct.Struct("<II")  # type word, sender index
_RESPONSE_HEAD = struct.Struct("<III")  # type word, sender index, receiver index


class HandshakeState(enum.Enum):
    ZEROED = 0
    INITIATION_CREATED = 1
    INITIATION_CONSUMED = 2
    RESPONSE_CREATED = 3
    RESPONSE_CONSUMED = 4


class HandshakeError(Exception):
    """A handshake function was called in the wrong state or with unusable keys (a caller bug)."""


class LocalIdentity:
    """This device's static key pair, with the keys derived from it precomputed."""

    __slots__ = ("private_key", "public_key", "mac1_key", "cookie_key", "initial_hash")

    def __init__(self, private_key: bytes) -> None:
        if len(private_key) != KEY_SIZE:
            raise ValueError(f"private key must be {KEY_SIZE} bytes, got {len(private_key)}")
        self.private_key = bytes(private_key)
        self.public_key = public_key(self.private_key)
        # Keys an initiator uses towards us for mac1 and cookie replies (paper 5.4.4, 5.4.7).
        self.mac1_key = hash_(LABEL_MAC1, self.public_key)
        self.cookie_key = hash_(LABEL_COOKIE, self.public_key)
        # Responder's H after mixing its own static public key: the start of every consumed initiation.
        self.initial_hash = hash_(INITIAL_HASH, self.public_key)


@dataclass(frozen=True, slots=True)
class SessionKeys:
    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)
    local_index: int
    remote_index: int
    is_initiator: bool


class Handshake:
    """Per-peer handshake state (wireguard-go's Handshake)."""

    def __init__(
        self, remote_static: bytes, preshared_key: bytes = ZERO32, local: LocalIdentity | None = None
    ) -> None:
        if local is None:
            raise TypeError("Handshake needs local=LocalIdentity(...)")
        if len(remote_static) != KEY_SIZE:
            raise ValueError(f"remote static key must be {KEY_SIZE} bytes, got {len(remote_static)}")
        self.remote_static = bytes(remote_static)
        self.remote_initial_hash = hash_(INITIAL_HASH, self.remote_static)
        self.remote_mac1_key = hash_(LABEL_MAC1, self.remote_static)
        self.remote_cookie_key = hash_(LABEL_COOKIE, self.remote_static)
        self.preshared_key = bytearray(KEY_SIZE)
        self.set_preshared_key(preshared_key)
        self.local: LocalIdentity = local
        self.precomputed_static_static: bytes | None = None
        self.set_local(local)
        self.state = HandshakeState.ZEROED
        self.hash = bytearray(HASH_SIZE)
        self.chaining_key = bytearray(HASH_SIZE)
        self.local_ephemeral = bytearray(KEY_SIZE)
        self.remote_ephemeral = bytearray(KEY_SIZE)
        self.local_index = 0
        self.remote_index = 0
        self.last_timestamp = bytes(TAI64N_SIZE)
        self.last_initiation_consumption: float | None = None
        self.last_sent_handshake: float | None = None

    def set_local(self, local: LocalIdentity) -> None:
        """Adopt a (new) local identity: recompute DH(S_local, S_remote); None if it is all zero."""
        self.local = local
        self.precomputed_static_static = dh(local.private_key, self.remote_static)

    def set_preshared_key(self, preshared_key: bytes) -> None:
        if len(preshared_key) != KEY_SIZE:
            raise ValueError(f"preshared key must be {KEY_SIZE} bytes, got {len(preshared_key)}")
        self.preshared_key[:] = preshared_key

    def clear(self) -> None:
        """Forget in-progress secrets (wireguard-go Handshake.Clear)."""
        zero(self.hash)
        zero(self.chaining_key)
        zero(self.local_ephemeral)
        zero(self.remote_ephemeral)
        self.local_index = 0
        self.state = HandshakeState.ZEROED


def _put(buffer: bytearray, value: bytes) -> None:
    buffer[:] = value


def whitened_tai64n(wall_time: float) -> bytes:
    """TAI64N of wall_time with the low 24 bits of the nanoseconds cleared."""
    stamp = bytearray(tai64n(wall_time))
    nanos = int.from_bytes(stamp[8:], "big") & ~TIMESTAMP_WHITENER_MASK
    stamp[8:] = nanos.to_bytes(4, "big")
    return bytes(stamp)


def create_initiation(
    hs: Handshake, local_index: int, wall_time: float, ephemeral_private: bytes | None = None
) -> bytearray:
    """Build a 148-byte initiation to hs.remote_static (mac1/mac2 zero); hs moves to INITIATION_CREATED."""
    ss = hs.precomputed_static_static
    if ss is None:
        raise HandshakeError("static-static DH with this peer is all zero; refusing to initiate")
    ephemeral = bytes(ephemeral_private) if ephemeral_private is not None else generate_private_key()
    ephemeral_public = public_key(ephemeral)

    h = hash_(hs.remote_initial_hash, ephemeral_public)
    (ck,) = kdf(INITIAL_CHAINING_KEY, ephemeral_public, 1)
    es = dh(ephemeral, hs.remote_static)
    if es is None:
        raise HandshakeError("ephemeral-static DH is all zero")
    ck, key = kdf(ck, es, 2)
    encrypted_static = aead_seal(key, 0, hs.local.public_key, h)
    h = hash_(h, encrypted_static)
    ck, key = kdf(ck, ss, 2)
    encrypted_timestamp = aead_seal(key, 0, whitened_tai64n(wall_time), h)
    h = hash_(h, encrypted_timestamp)

    msg = bytearray(INITIATION_SIZE)
    _INITIATION_HEAD.pack_into(msg, 0, MESSAGE_INITIATION, local_index)
    msg[8:40] = ephemeral_public
    msg[40:88] = encrypted_static
    msg[88:116] = encrypted_timestamp

    _put(hs.local_ephemeral, ephemeral)
    _put(hs.chaining_key, ck)
    _put(hs.hash, h)
    hs.local_index = local_index
    hs.state = HandshakeState.INITIATION_CREATED
    return msg


def peek_initiation_sender(msg: bytes) -> int:
    """Sender index of an initiation (for cookie replies before any crypto)."""
    return int.from_bytes(msg[4:8], "little")


@dataclass(slots=True)
class Identified:
    """An initiation that decrypted under our static key to a configured peer (not yet replay-checked)."""

    remote_static: bytes
    sender: int
    ephemeral: bytes
    timestamp: bytes
    hash: bytes
    chaining_key: bytes

    def as_tuple(self) -> tuple:
        return (self.remote_static, self.sender, self.ephemeral, self.timestamp, self.hash, self.chaining_key)


def identify_initiation(
    local: LocalIdentity, msg: bytes, static_static: Callable[[bytes], bytes | None]
) -> Identified | None:
    """The stateless first half of consume_initiation: which peer sent `msg` to `local`, and the handshake
    hash/chaining key after its timestamp. `static_static` maps the initiator's static public key to
    DH(our private key, its public key), or None (unknown peer, or that DH is all zero). None if the
    message is malformed or does not decrypt."""
    if len(msg) != INITIATION_SIZE:
        return None
    kind, sender = _INITIATION_HEAD.unpack_from(msg, 0)
    if kind != MESSAGE_INITIATION:
        return None
    ephemeral_public = bytes(msg[8:40])

    h = hash_(local.initial_hash, ephemeral_public)
    (ck,) = kdf(INITIAL_CHAINING_KEY, ephemeral_public, 1)
    es = dh(local.private_key, ephemeral_public)
    if es is None:
        return None
    ck, key = kdf(ck, es, 2)
    encrypted_static = bytes(msg[40:88])
    remote_static = aead_open(key, 0, encrypted_static, h)
    if remote_static is None:
        return None
    h = hash_(h, encrypted_static)

    ss = static_static(remote_static)
    if ss is None:
        return None
    ck, key = kdf(ck, ss, 2)
    encrypted_timestamp = bytes(msg[88:116])
    timestamp = aead_open(key, 0, encrypted_timestamp, h)
    if timestamp is None:
        return None
    h = hash_(h, encrypted_timestamp)
    return Identified(remote_static, sender, ephemeral_public, timestamp, h, ck)


def accept_identified(hs: Handshake, ident: Identified, now: float) -> bool:
    """The per-peer second half of consume_initiation, on the initiator's Handshake: refuse a replayed
    timestamp (TAI64N not newer) or an initiation within HANDSHAKE_INITIATION_RATE of the last one; else
    write the state (INITIATION_CONSUMED)."""
    if hs.remote_static != ident.remote_static or hs.precomputed_static_static is None:
        return False
    # Byte order of TAI64N is big-endian, so bytes comparison is time comparison.
    replay = ident.timestamp <= hs.last_timestamp
    flood = (
        hs.last_initiation_consumption is not None
        and now - hs.last_initiation_consumption < HANDSHAKE_INITIATION_RATE
    )
    if replay or flood:
        return False

    _put(hs.hash, ident.hash)
    _put(hs.chaining_key, ident.chaining_key)
    _put(hs.remote_ephemeral, ident.ephemeral)
    zero(hs.local_ephemeral)
    hs.remote_index = ident.sender
    hs.last_timestamp = ident.timestamp
    if hs.last_initiation_consumption is None or now > hs.last_initiation_consumption:
        hs.last_initiation_consumption = now
    hs.state = HandshakeState.INITIATION_CONSUMED
    return True


def consume_initiation(
    local: LocalIdentity,
    msg: bytes,
    lookup: Callable[[bytes], Handshake | None],
    now: float,
) -> Handshake | None:
    """Decrypt an initiation addressed to `local`; `lookup` maps the initiator's static public key to
    its Handshake. Returns that Handshake in INITIATION_CONSUMED, or None if the message is malformed,
    from an unknown peer, replayed (TAI64N not newer) or flooding (within 20 ms of the last one)."""
    found: Handshake | None = None

    def static_static(remote_static: bytes) -> bytes | None:
        nonlocal found
        found = lookup(remote_static)
        return None if found is None else found.precomputed_static_static

    ident = identify_initiation(local, msg, static_static)
    if ident is None or found is None or not accept_identified(found, ident, now):
        return None
    return found


def create_response(hs: Handshake, local_index: int, ephemeral_private: bytes | None = None) -> bytearray:
    """Build the 92-byte response to a consumed initiation (mac1/mac2 zero); hs moves to RESPONSE_CREATED."""
    if hs.state is not HandshakeState.INITIATION_CONSUMED:
        raise HandshakeError(f"create_response needs a consumed initiation, state is {hs.state.name}")
    ephemeral = bytes(ephemeral_private) if ephemeral_private is not None else generate_private_key()
    ephemeral_public = public_key(ephemeral)

    h = hash_(hs.hash, ephemeral_public)
    (ck,) = kdf(hs.chaining_key, ephemeral_public, 1)
    ee = dh(ephemeral, hs.remote_ephemeral)
    se = dh(ephemeral, hs.remote_static)
    if ee is None or se is None:
        raise HandshakeError("response DH is all zero")
    (ck,) = kdf(ck, ee, 1)
    (ck,) = kdf(ck, se, 1)
    ck, tau, key = kdf(ck, hs.preshared_key, 3)
    h = hash_(h, tau)
    encrypted_empty = aead_seal(key, 0, b"", h)
    h = hash_(h, encrypted_empty)

    msg = bytearray(RESPONSE_SIZE)
    _RESPONSE_HEAD.pack_into(msg, 0, MESSAGE_RESPONSE, local_index, hs.remote_index)
    msg[12:44] = ephemeral_public
    msg[44:60] = encrypted_empty

    _put(hs.local_ephemeral, ephemeral)
    _put(hs.chaining_key, ck)
    _put(hs.hash, h)
    hs.local_index = local_index
    hs.state = HandshakeState.RESPONSE_CREATED
    return msg


def peek_response_receiver(msg: bytes) -> int:
    return int.from_bytes(msg[8:12], "little")


def consume_response(
    local: LocalIdentity, msg: bytes, lookup_index: Callable[[int], Handshake | None]
) -> Handshake | None:
    """Decrypt a response; `lookup_index` maps our local index (the message's receiver) to the
    Handshake that sent the initiation. Returns it in RESPONSE_CONSUMED, or None."""
    if len(msg) != RESPONSE_SIZE:
        return None
    kind, sender, receiver = _RESPONSE_HEAD.unpack_from(msg, 0)
    if kind != MESSAGE_RESPONSE:
        return None
    hs = lookup_index(receiver)
    if hs is None or hs.state is not HandshakeState.INITIATION_CREATED or hs.local_index != receiver:
        return None
    ephemeral_public = bytes(msg[12:44])

    h = hash_(hs.hash, ephemeral_public)
    (ck,) = kdf(hs.chaining_key, ephemeral_public, 1)
    ee = dh(hs.local_ephemeral, ephemeral_public)
    se = dh(local.private_key, ephemeral_public)
    if ee is None or se is None:
        return None
    (ck,) = kdf(ck, ee, 1)
    (ck,) = kdf(ck, se, 1)
    ck, tau, key = kdf(ck, hs.preshared_key, 3)
    h = hash_(h, tau)
    encrypted_empty = bytes(msg[44:60])
    if aead_open(key, 0, encrypted_empty, h) is None:
        return None
    h = hash_(h, encrypted_empty)

    _put(hs.hash, h)
    _put(hs.chaining_key, ck)
    _put(hs.remote_ephemeral, ephemeral_public)
    zero(hs.local_ephemeral)
    hs.remote_index = sender
    hs.state = HandshakeState.RESPONSE_CONSUMED
    return hs


def begin_session(hs: Handshake) -> SessionKeys:
    """Derive transport keys (paper 5.4.5) and zero the handshake's secrets; hs returns to ZEROED."""
    if hs.state is HandshakeState.RESPONSE_CONSUMED:
        is_initiator = True
    elif hs.state is HandshakeState.RESPONSE_CREATED:
        is_initiator = False
    else:
        raise HandshakeError(f"begin_session needs a completed handshake, state is {hs.state.name}")
    first, second = kdf(hs.chaining_key, b"", 2)
    send_key, recv_key = (first, second) if is_initiator else (second, first)
    keys = SessionKeys(send_key, recv_key, hs.local_index, hs.remote_index, is_initiator)
    hs.clear()
    return keys
