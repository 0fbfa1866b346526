"""turbowg/device/keypair.py on its own: a Keypair's keys, counters, replay window and expiry, and the
current/previous/next rotation of Keypairs (install, key confirmation, clear), including the promise that
every keypair pushed out is handed back exactly once so its index can be freed."""

from __future__ import annotations

import struct
from array import array

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from turbowg.device.constants import REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME
from turbowg.device.keypair import Keypair, Keypairs
from turbowg.noise.handshake import (
    Handshake,
    LocalIdentity,
    begin_session,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
)
from turbowg.noise.primitives import generate_private_key

SEND, RECV = bytes(range(32)), bytes(range(32, 64))
MTU = 1420


def make(index: int = 1, *, initiator: bool = True, created: float = 100.0) -> Keypair:
    return Keypair(SEND, RECV, index, 1000 + index, created, initiator)


def ipv4(payload: bytes) -> bytes:
    return bytes([0x45, 0]) + (20 + len(payload)).to_bytes(2, "big") + bytes(8) + b"\x0a\0\0\x01\x0a\0\0\x02" + payload


def seal(kp: Keypair, packets: list[bytes]) -> list[bytes]:
    """Messages sealed with kp.send_aead at kp.send_counter, .. (advancing it, as the device does)."""
    dst = bytearray(len(packets) * (MTU + 64))
    sizes = array("i", [0] * len(packets))
    kp.send_aead.seal_list(packets, dst, 0, MTU, kp.remote_index, kp.send_counter, sizes, 0)
    kp.send_counter += len(packets)
    out, pos = [], 0
    for n in sizes:
        out.append(bytes(dst[pos:pos + n]))
        pos += n
    return out


def open_one(kp: Keypair, message: bytes):
    buf = bytearray(message)
    out = array("i", [0] * 2)
    result = kp.receive_aead.open_batch(buf, 0, len(buf), len(buf), kp.local_index, kp.replay, out, 0)
    return result, bytes(buf[out[0]:out[0] + out[1]]) if result.count else None


# ---------------------------------------------------------------------------------------------------------
# one Keypair


def test_fields_and_fresh_state() -> None:
    kp = Keypair(bytearray(SEND), bytearray(RECV), 7, 9, 42.5, False)
    assert (kp.local_index, kp.remote_index, kp.created, kp.is_initiator) == (7, 9, 42.5, False)
    assert kp.send_counter == 0
    assert kp.replay.accept(0) and not kp.replay.accept(0)  # a window of its own, fresh
    assert make().replay is not make().replay


def test_send_key_seals_and_receive_key_opens() -> None:
    """send_aead uses the send key (checked against `cryptography`), receive_aead the receive key."""
    kp = make()
    packet = ipv4(b"hello")
    (message,) = seal(kp, [packet])
    kind, receiver, counter = struct.unpack_from("<IIQ", message, 0)
    assert (kind, receiver, counter) == (4, kp.remote_index, 0) and kp.send_counter == 1
    nonce = bytes(4) + struct.pack("<Q", 0)
    plain = ChaCha20Poly1305(SEND).decrypt(nonce, message[16:], None)
    assert plain[:len(packet)] == packet
    # A message for us, sealed with RECV: opens; the same with SEND does not.
    incoming = struct.pack("<IIQ", 4, kp.local_index, 5) + ChaCha20Poly1305(RECV).encrypt(
        bytes(4) + struct.pack("<Q", 5), packet, None)
    result, got = open_one(kp, incoming)
    assert result.count == 1 and result.authenticated == 1 and got == packet
    wrong = struct.pack("<IIQ", 4, kp.local_index, 6) + ChaCha20Poly1305(SEND).encrypt(
        bytes(4) + struct.pack("<Q", 6), packet, None)
    result, got = open_one(kp, wrong)
    assert result.count == 0 and result.auth_fail == 1 and got is None


def test_replay_window_refuses_a_second_copy() -> None:
    kp = make()
    incoming = struct.pack("<IIQ", 4, kp.local_index, 3) + ChaCha20Poly1305(RECV).encrypt(
        bytes(4) + struct.pack("<Q", 3), ipv4(b"x"), None)
    first, _ = open_one(kp, incoming)
    again, got = open_one(kp, incoming)
    assert first.count == 1 and again.count == 0 and again.replay == 1 and got is None


def test_usable_for_sending_until_reject_after_time_or_messages() -> None:
    kp = make(created=100.0)
    assert kp.usable_for_sending(100.0)
    assert kp.usable_for_sending(100.0 + REJECT_AFTER_TIME - 0.001)
    assert not kp.usable_for_sending(100.0 + REJECT_AFTER_TIME)
    assert not kp.usable_for_sending(100.0 + 10 * REJECT_AFTER_TIME)
    kp.send_counter = REJECT_AFTER_MESSAGES - 1
    assert kp.usable_for_sending(101.0)
    kp.send_counter = REJECT_AFTER_MESSAGES
    assert not kp.usable_for_sending(101.0)


# ---------------------------------------------------------------------------------------------------------
# Keypairs rotation


def slots(kps: Keypairs) -> tuple:
    return kps.current, kps.previous, kps.next


def test_initiator_keypairs_are_used_at_once_and_shift_down() -> None:
    kps = Keypairs()
    a, b, c = make(1), make(2), make(3)
    assert kps.install(a) == [] and slots(kps) == (a, None, None)
    assert kps.install(b) == [] and slots(kps) == (b, a, None)
    assert kps.install(c) == [a] and slots(kps) == (c, b, None)  # the oldest is handed back
    assert kps.all() == [c, b]


def test_responder_keypair_waits_in_next_until_confirmed() -> None:
    kps = Keypairs()
    cur, prev = make(1), make(2)
    kps.install(prev)
    kps.install(cur)
    r = make(3, initiator=False)
    assert kps.install(r) == [prev]  # previous goes, current stays usable for sending
    assert slots(kps) == (cur, None, r)
    assert kps.confirm(cur) == (False, []) and slots(kps) == (cur, None, r)  # data under current: no change
    assert kps.confirm(make(9, initiator=False)) == (False, [])
    assert kps.confirm(r) == (True, []) and slots(kps) == (r, cur, None)
    assert kps.confirm(r) == (False, [])  # only once


def test_confirm_hands_back_the_previous_it_pushes_out() -> None:
    kps = Keypairs()
    a, b = make(1), make(2)
    kps.install(a)
    kps.install(b)
    r = make(3, initiator=False)
    assert kps.install(r) == [a] and slots(kps) == (b, None, r)
    s = make(4, initiator=False)
    assert kps.install(s) == [r]  # a newer responder keypair replaces an unconfirmed one
    assert kps.confirm(r) == (False, []) and slots(kps) == (b, None, s)
    kps.previous = a  # whatever sits in previous when next is confirmed is handed back
    assert kps.confirm(s) == (True, [a]) and slots(kps) == (s, b, None)
    t = make(5, initiator=False)
    assert kps.install(t) == [b] and kps.confirm(t) == (True, []) and slots(kps) == (t, s, None)


def test_initiator_install_while_a_responder_keypair_is_pending() -> None:
    """The pending (newer) responder keypair becomes previous; the old current and previous are dropped."""
    kps = Keypairs()
    old, cur = make(1), make(2)
    kps.install(old)
    kps.install(cur)
    pending = make(3, initiator=False)
    assert kps.install(pending) == [old]
    kps.previous = make(4)  # a previous next to the pending one, to see both dropped
    dropped_previous = kps.previous
    mine = make(5)
    assert kps.install(mine) == [dropped_previous, cur]
    assert slots(kps) == (mine, pending, None)


def test_clear_returns_every_keypair() -> None:
    kps = Keypairs()
    a, b, r = make(1), make(2), make(3, initiator=False)
    kps.install(a)
    kps.install(b)
    kps.install(r)
    assert sorted(k.local_index for k in kps.clear()) == [2, 3]
    assert slots(kps) == (None, None, None) and kps.all() == [] and kps.clear() == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["init", "resp", "confirm_next", "confirm_other", "clear"]),
                          st.integers(0, 3)), max_size=40))
def test_every_keypair_is_held_once_or_handed_back_once(ops: list) -> None:
    """Whatever the sequence, each keypair ever installed is in exactly one slot or was returned exactly once
    (the caller frees its index then), never both; `current` is never an unconfirmed responder keypair."""
    kps = Keypairs()
    installed: list[Keypair] = []
    returned: list[Keypair] = []
    for n, (op, pick) in enumerate(ops):
        if op in ("init", "resp"):
            kp = make(n, initiator=op == "init")
            installed.append(kp)
            returned += kps.install(kp)
        elif op == "confirm_next" and kps.next is not None:
            was_next = kps.next
            rotated, dropped = kps.confirm(was_next)
            assert rotated and kps.current is was_next
            returned += dropped
        elif op == "confirm_other" and installed:
            other = installed[pick % len(installed)]
            if other is not kps.next:
                before = slots(kps)
                assert kps.confirm(other) == (False, []) and slots(kps) == before
        elif op == "clear":
            returned += kps.clear()
        held = [k for k in slots(kps) if k is not None]
        assert len({id(k) for k in held}) == len(held)
        assert len({id(k) for k in returned}) == len(returned)
        assert not {id(k) for k in held} & {id(k) for k in returned}
        assert {id(k) for k in held} | {id(k) for k in returned} == {id(k) for k in installed}
        assert kps.all() == held
        assert kps.next is None or not kps.next.is_initiator
        # current is an initiator keypair or a responder one that was confirmed (it left `next` via confirm).


# ---------------------------------------------------------------------------------------------------------
# with a real handshake


def handshake_keypairs(now: float = 50.0) -> tuple[Keypair, Keypair]:
    """(initiator's, responder's) Keypair from a complete Noise IK handshake between two identities."""
    ia, ib = LocalIdentity(generate_private_key()), LocalIdentity(generate_private_key())
    hs_a = Handshake(ib.public_key, local=ia)
    hs_b = Handshake(ia.public_key, local=ib)
    init = create_initiation(hs_a, 11, 1_700_000_000.0)
    assert consume_initiation(ib, bytes(init), lambda key: hs_b if key == ia.public_key else None, now) is hs_b
    resp = create_response(hs_b, 22)
    assert consume_response(ia, bytes(resp), lambda index: hs_a if index == 11 else None) is hs_a
    ka, kb = begin_session(hs_a), begin_session(hs_b)
    a = Keypair(ka.send_key, ka.recv_key, ka.local_index, ka.remote_index, now, ka.is_initiator)
    b = Keypair(kb.send_key, kb.recv_key, kb.local_index, kb.remote_index, now, kb.is_initiator)
    return a, b


def test_handshake_keypairs_talk_and_the_responder_confirms_on_first_data() -> None:
    a, b = handshake_keypairs()
    assert (a.local_index, a.remote_index, b.local_index, b.remote_index) == (11, 22, 22, 11)
    assert a.is_initiator and not b.is_initiator
    side_a, side_b = Keypairs(), Keypairs()
    assert side_a.install(a) == [] and side_a.current is a  # initiator: usable at once
    assert side_b.install(b) == [] and side_b.current is None and side_b.next is b  # responder: waits
    packets = [ipv4(b"first"), ipv4(b"second" * 50)]
    for message, packet in zip(seal(a, packets), packets, strict=True):
        result, got = open_one(side_b.next, message)
        assert result.authenticated == 1 and got[:len(packet)] == packet
    assert side_b.confirm(b) == (True, []) and side_b.current is b and side_b.next is None
    (back,) = seal(side_b.current, [ipv4(b"reply")])
    result, got = open_one(side_a.current, back)
    assert result.authenticated == 1 and got[:25] == ipv4(b"reply")


@pytest.mark.parametrize("direction", ["a_to_b", "b_to_a"])
def test_keypairs_of_different_sessions_do_not_open_each_other(direction: str) -> None:
    a1, b1 = handshake_keypairs()
    a2, b2 = handshake_keypairs()
    sender, receiver = (a1, b2) if direction == "a_to_b" else (b1, a2)
    receiver.local_index = sender.remote_index  # same index, other keys
    (message,) = seal(sender, [ipv4(b"x")])
    result, got = open_one(receiver, message)
    assert result.auth_fail == 1 and result.count == 0 and got is None
