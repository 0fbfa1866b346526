"""The disco codec (turbowg/path/disco.py): layout, authentication, and no exception on hostile bytes."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey

from turbowg.path import disco
from turbowg.path.constants import MAX_CALL_ME_MAYBE_ENDPOINTS
from turbowg.path.disco import (
    HEADER_SIZE,
    MAGIC,
    MIN_SIZE,
    CallMeMaybe,
    DiscoKeys,
    Ping,
    Pong,
    is_disco,
    make_box,
    pack_endpoint,
    unpack_endpoint,
)
from turbowg.wire import MESSAGE_INITIATION, MESSAGE_TRANSPORT

A_PRIV = bytes(range(1, 33))
B_PRIV = bytes(range(101, 133))
C_PRIV = bytes(range(201, 233))
TXID = bytes(range(12))
NONCE = bytes(24)


def _keys() -> tuple[DiscoKeys, DiscoKeys]:
    a, b = DiscoKeys(A_PRIV), DiscoKeys(B_PRIV)
    a.add_peer(b.public_key)
    b.add_peer(a.public_key)
    return a, b


A, B = _keys()


def _seal_raw(sender: DiscoKeys, receiver_public: bytes, plaintext: bytes) -> bytes:
    """A correctly sealed datagram around arbitrary plaintext (to test the payload parser behind the box)."""
    box = make_box(sender._private_key, receiver_public)
    return MAGIC + sender.public_key + bytes(box.encrypt(plaintext, NONCE))


# -- layout -----------------------------------------------------------------------------------------------------
def test_magic_is_not_a_wireguard_type_word_nor_stun() -> None:
    (word,) = struct.unpack("<I", MAGIC[:4])
    assert word not in (1, 2, 3, 4)
    assert MAGIC[0] >> 6 != 0  # STUN messages start with two zero bits


@pytest.mark.parametrize("message", [
    Ping(TXID),
    Pong(TXID, ("192.0.2.7", 51820)),
    Pong(TXID, ("2001:db8::1", 1)),
    CallMeMaybe(()),
    CallMeMaybe((("10.0.0.1", 51820), ("2001:db8::2", 65535), ("198.51.100.9", 40000))),
    CallMeMaybe(tuple(("10.0.0.1", 1000 + i) for i in range(MAX_CALL_ME_MAYBE_ENDPOINTS))),
])
def test_round_trip(message: disco.Message) -> None:
    datagram = A.seal(B.public_key, message)
    assert is_disco(datagram)
    opened = B.open(datagram)
    assert opened is not None
    assert opened.sender == A.public_key
    assert opened.message == message


def test_wire_layout() -> None:
    datagram = A.seal(B.public_key, Ping(TXID), nonce=NONCE)
    assert datagram[:6] == MAGIC
    assert datagram[6:38] == A.public_key
    assert datagram[38:62] == NONCE
    assert len(datagram) == HEADER_SIZE + 16 + 2 + 12  # 92: tag, type+version, txid
    plaintext = make_box(B_PRIV, A.public_key).decrypt(datagram[62:], NONCE)
    assert plaintext == b"\x01\x00" + TXID
    pong = A.seal(B.public_key, Pong(TXID, ("192.0.2.7", 0x1234)), nonce=NONCE)
    plaintext = make_box(B_PRIV, A.public_key).decrypt(pong[62:], NONCE)
    assert plaintext == b"\x02\x00" + TXID + b"\x00" * 10 + b"\xff\xff" + bytes((192, 0, 2, 7)) + b"\x12\x34"


def test_random_nonce_each_time() -> None:
    assert A.seal(B.public_key, Ping(TXID)) != A.seal(B.public_key, Ping(TXID))


def test_accepts_bytearray_and_memoryview() -> None:
    datagram = A.seal(B.public_key, Ping(TXID))
    assert B.open(bytearray(datagram)) == B.open(memoryview(datagram)) == B.open(datagram)


# -- is_disco -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [MESSAGE_INITIATION, 2, 3, MESSAGE_TRANSPORT])
def test_wireguard_messages_are_not_disco(kind: int) -> None:
    assert not is_disco(struct.pack("<I", kind) + bytes(200))


def test_is_disco_needs_the_minimum_size() -> None:
    assert not is_disco(MAGIC + bytes(MIN_SIZE - len(MAGIC) - 1))
    assert is_disco(MAGIC + bytes(MIN_SIZE - len(MAGIC)))
    assert not is_disco(b"")
    assert not is_disco(b"TWdis" + bytes(200))


# -- rejections ---------------------------------------------------------------------------------------------------
def test_unknown_sender_is_rejected() -> None:
    c = DiscoKeys(C_PRIV)
    c.add_peer(B.public_key)
    assert B.open(c.seal(B.public_key, Ping(TXID))) is None


def test_claimed_sender_without_its_key_is_rejected() -> None:
    # C seals to B but claims to be A: the box (A, B) does not open it.
    c_box = make_box(C_PRIV, B.public_key)
    forged = MAGIC + A.public_key + bytes(c_box.encrypt(b"\x01\x00" + TXID, NONCE))
    assert B.open(forged) is None


def test_message_for_someone_else_is_rejected() -> None:
    c = DiscoKeys(C_PRIV)
    c.add_peer(A.public_key)
    A.add_peer(c.public_key)
    try:
        assert c.open(A.seal(B.public_key, Ping(TXID))) is None  # c knows A, but it was sealed for B
    finally:
        A.remove_peer(c.public_key)


def test_every_single_bit_flip_is_rejected() -> None:
    datagram = A.seal(B.public_key, Pong(TXID, ("192.0.2.1", 9)))
    for i in range(len(datagram)):
        for bit in (0x01, 0x80):
            mutated = bytearray(datagram)
            mutated[i] ^= bit
            assert B.open(bytes(mutated)) is None, (i, bit)


def test_truncated_is_rejected() -> None:
    datagram = A.seal(B.public_key, CallMeMaybe((("10.0.0.1", 5),)))
    for n in range(len(datagram)):
        assert B.open(datagram[:n]) is None


@pytest.mark.parametrize("plaintext", [
    b"",
    b"\x01",
    b"\x01\x00" + TXID[:11],  # short ping
    b"\x02\x00" + TXID + bytes(17),  # short pong
    b"\x02\x00" + TXID + pack_endpoint(("192.0.2.1", 5))[:16] + b"\x00\x00",  # pong port 0
    b"\x02\x00" + TXID + bytes(16) + b"\x00\x05",  # pong from ::
    b"\x02\x00" + TXID + b"\x00" * 10 + b"\xff\xff" + bytes(4) + b"\x00\x05",  # pong from 0.0.0.0
    b"\x03\x00" + bytes(17),  # not a multiple of 18
    b"\x03\x00" + pack_endpoint(("10.0.0.1", 1)) * (MAX_CALL_ME_MAYBE_ENDPOINTS + 1),  # too many
    b"\x03\x00" + pack_endpoint(("10.0.0.1", 1)) + bytes(18),  # one unspecified endpoint
    b"\x00\x00" + TXID,  # unknown types
    b"\x04\x00" + TXID,
    b"\xff\x00" + TXID,
])
def test_malformed_payload_is_rejected(plaintext: bytes) -> None:
    assert B.open(_seal_raw(A, B.public_key, plaintext)) is None


def test_version_and_trailing_bytes_are_ignored() -> None:
    opened = B.open(_seal_raw(A, B.public_key, b"\x01\x07" + TXID + b"padding"))
    assert opened is not None and opened.message == Ping(TXID)
    pong = b"\x02\x01" + TXID + pack_endpoint(("2001:db8::5", 7)) + b"more"
    opened = B.open(_seal_raw(A, B.public_key, pong))
    assert opened is not None and opened.message == Pong(TXID, ("2001:db8::5", 7))


def test_seal_refuses_what_cannot_be_sent() -> None:
    with pytest.raises(ValueError):
        A.seal(B.public_key, Ping(b"short"))
    with pytest.raises(ValueError):
        A.seal(B.public_key, Pong(TXID, ("not an ip", 5)))
    with pytest.raises(ValueError):
        A.seal(B.public_key, Pong(TXID, ("10.0.0.1", 0)))
    with pytest.raises(ValueError):
        A.seal(B.public_key, CallMeMaybe(tuple(("10.0.0.1", 1 + i) for i in range(MAX_CALL_ME_MAYBE_ENDPOINTS + 1))))
    with pytest.raises(ValueError):
        A.seal(B.public_key, Ping(TXID), nonce=b"short")
    with pytest.raises(KeyError):
        A.seal(bytes(32 * [7]), Ping(TXID))


def test_low_order_public_key_gives_no_box() -> None:
    keys = DiscoKeys(A_PRIV)
    with pytest.raises(ValueError):
        keys.add_peer(bytes(32))
    with pytest.raises(ValueError):
        make_box(A_PRIV, b"short")


def test_box_is_built_once_per_peer() -> None:
    keys = DiscoKeys(A_PRIV)
    keys.add_peer(B.public_key)
    box = keys._boxes[B.public_key]
    keys.add_peer(B.public_key)
    assert keys._boxes[B.public_key] is box
    assert keys.has_peer(B.public_key)
    keys.remove_peer(B.public_key)
    assert not keys.has_peer(B.public_key)


def test_public_key_matches_nacl() -> None:
    assert A.public_key == bytes(PrivateKey(A_PRIV).public_key)


# -- endpoints ----------------------------------------------------------------------------------------------------
def test_endpoint_forms() -> None:
    assert pack_endpoint(("192.0.2.7", 80)) == b"\x00" * 10 + b"\xff\xff\xc0\x00\x02\x07\x00\x50"
    assert unpack_endpoint(pack_endpoint(("192.0.2.7", 80))) == ("192.0.2.7", 80)
    assert unpack_endpoint(pack_endpoint(("::ffff:192.0.2.7", 80))) == ("192.0.2.7", 80)  # un-mapped
    assert unpack_endpoint(pack_endpoint(("2001:DB8:0::1", 443))) == ("2001:db8::1", 443)
    assert unpack_endpoint(pack_endpoint(("fe80::1%eth0", 443))) == ("fe80::1", 443)
    assert unpack_endpoint(bytes(17)) is None
    for bad in [("example.com", 1), ("10.0.0.1", 0), ("10.0.0.1", 65536), ("::", 5), ("0.0.0.0", 5),
                ("1.2.3", 5)]:
        with pytest.raises(ValueError):
            pack_endpoint(bad)


def _receive_path_spelling(address: bytes, port: int) -> tuple[str, int]:
    """How turbowg/conn/udp.py names a datagram's source: the socket's host string, v4-mapped un-mapped."""
    host = socket.inet_ntop(socket.AF_INET6, address)
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return (host, port)


@given(st.binary(min_size=16, max_size=16), st.integers(1, 65535))
def test_endpoint_spelling_matches_the_receive_path(address: bytes, port: int) -> None:
    unpacked = unpack_endpoint(address + port.to_bytes(2, "big"))
    if address == bytes(16) or address == b"\x00" * 10 + b"\xff\xff" + bytes(4):
        assert unpacked is None
        return
    assert unpacked == _receive_path_spelling(address, port)
    assert pack_endpoint(unpacked) == address + port.to_bytes(2, "big")


# -- hostile bytes (property tests) -------------------------------------------------------------------------------
@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_open_never_raises_on_random_bytes(data: bytes) -> None:
    assert B.open(data) is None
    assert B.open(MAGIC + A.public_key + data) is None  # known sender, garbage box


@settings(max_examples=500)
@given(st.binary(max_size=700))
def test_open_never_raises_on_authenticated_garbage(plaintext: bytes) -> None:
    opened = B.open(_seal_raw(A, B.public_key, plaintext))
    assert opened is None or isinstance(opened.message, Ping | Pong | CallMeMaybe)
    assert disco.decode_payload(plaintext) == (None if opened is None else opened.message)


@settings(max_examples=300)
@given(st.integers(0, 91), st.integers(1, 255))
def test_open_rejects_any_corruption(index: int, xor: int) -> None:
    datagram = bytearray(A.seal(B.public_key, Ping(TXID)))
    datagram[index] ^= xor
    assert B.open(bytes(datagram)) is None


_ENDPOINTS = st.tuples(
    st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)), st.integers(1, 65535))


@settings(max_examples=200)
@given(st.lists(_ENDPOINTS, max_size=MAX_CALL_ME_MAYBE_ENDPOINTS))
def test_call_me_maybe_round_trips(endpoints: list[tuple[str, int]]) -> None:
    endpoints = [e for e in endpoints if e[0] not in ("0.0.0.0", "::", "::ffff:0.0.0.0")]
    try:
        expected = tuple(unpack_endpoint(pack_endpoint(e)) for e in endpoints)
    except ValueError:
        return  # an unspecified address in another spelling
    opened = B.open(A.seal(B.public_key, CallMeMaybe(tuple(endpoints))))
    assert opened is not None and opened.message == CallMeMaybe(expected)  # type: ignore[arg-type]
