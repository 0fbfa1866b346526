"""turbowg/device/peer.py on its own: a Peer's identity and fresh state, its handshake following the device
identity and the preshared key, the staged-packet queue (bounded, oldest dropped), its endpoint, its timers,
and its cookie generator keyed to the peer."""

from __future__ import annotations

import pytest

from turbowg.device.constants import MAX_STAGED_PACKETS
from turbowg.device.keypair import Keypair
from turbowg.device.peer import Peer
from turbowg.device.timers import Schedule
from turbowg.noise.cookie import CookieChecker
from turbowg.noise.handshake import (
    INITIATION_SIZE,
    LocalIdentity,
    begin_session,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
)
from turbowg.noise.primitives import ZERO32, dh, generate_private_key


def identity() -> LocalIdentity:
    return LocalIdentity(generate_private_key())


def test_fresh_peer_state() -> None:
    local, remote = identity(), identity()
    source = bytearray(remote.public_key)
    peer = Peer(source, local)
    source[0] ^= 0xFF  # the peer keeps its own copy of the key
    assert peer.public_key == remote.public_key and isinstance(peer.public_key, bytes)
    assert peer.preshared_key == ZERO32
    assert peer.endpoint is None and peer.allowed_src == b""
    assert (peer.rx_bytes, peer.tx_bytes) == (0, 0)
    assert peer.last_handshake_wall == 0.0 and peer.last_sent_handshake is None
    assert peer.handshake_index is None and peer.sent_last_minute_handshake is False
    assert peer.keypairs.all() == [] and len(peer.staged) == 0
    assert peer.persistent_keepalive_interval == 0
    assert peer.handshake is not None and peer.handshake.remote_static == remote.public_key
    assert peer.handshake.local is local


def test_two_peers_do_not_share_state() -> None:
    local, remote = identity(), identity()
    a, b = Peer(remote.public_key, local), Peer(remote.public_key, local)
    a.staged.append(b"x")
    a.rx_bytes += 5
    assert len(b.staged) == 0 and b.rx_bytes == 0
    assert a.keypairs is not b.keypairs and a.timers is not b.timers and a.handshake is not b.handshake


def test_staged_queue_is_bounded_and_drops_the_oldest() -> None:
    peer = Peer(identity().public_key, identity())
    assert peer.staged.maxlen == MAX_STAGED_PACKETS
    for i in range(MAX_STAGED_PACKETS + 5):
        peer.staged.append(i.to_bytes(2, "big"))
    assert len(peer.staged) == MAX_STAGED_PACKETS
    assert peer.staged[0] == (5).to_bytes(2, "big")  # 0..4 were dropped, oldest first
    assert peer.staged[-1] == (MAX_STAGED_PACKETS + 4).to_bytes(2, "big")
    burst = [bytes([i % 256]) * 3 for i in range(3 * MAX_STAGED_PACKETS)]
    peer.staged.extend(burst)
    assert list(peer.staged) == burst[-MAX_STAGED_PACKETS:]  # the newest, in order
    assert peer.staged.popleft() == burst[-MAX_STAGED_PACKETS]


def test_endpoint_is_the_peers_own_and_shows_in_repr() -> None:
    remote = identity()
    peer = Peer(remote.public_key, identity())
    assert "endpoint=None" in repr(peer) and remote.public_key.hex()[:16] in repr(peer)
    peer.endpoint = ("192.0.2.7", 51820)
    assert peer.endpoint == ("192.0.2.7", 51820) and "('192.0.2.7', 51820)" in repr(peer)
    peer.endpoint = ("2001:db8::1", 4242)  # roaming replaces it
    assert peer.endpoint == ("2001:db8::1", 4242)
    other = Peer(remote.public_key, identity())
    assert other.endpoint is None


def test_without_a_device_key_there_is_no_handshake_until_one_is_set() -> None:
    remote = identity()
    peer = Peer(remote.public_key, None)
    assert peer.handshake is None
    psk = bytes(range(32))
    peer.set_preshared_key(psk)  # remembered for the handshake created later
    assert peer.preshared_key == psk
    local = identity()
    peer.set_local(local)
    assert peer.handshake is not None and peer.handshake.local is local
    assert bytes(peer.handshake.preshared_key) == psk
    assert peer.handshake.precomputed_static_static == dh(local.private_key, remote.public_key)


def test_new_device_identity_updates_the_same_handshake_and_none_removes_it() -> None:
    remote = identity()
    first, second = identity(), identity()
    peer = Peer(remote.public_key, first)
    hs = peer.handshake
    peer.set_local(second)
    assert peer.handshake is hs and hs.local is second
    assert hs.precomputed_static_static == dh(second.private_key, remote.public_key)
    assert hs.precomputed_static_static != dh(first.private_key, remote.public_key)
    peer.set_local(None)
    assert peer.handshake is None


def test_preshared_key_reaches_the_handshake() -> None:
    peer = Peer(identity().public_key, identity())
    psk = bytearray(range(1, 33))
    peer.set_preshared_key(psk)
    psk[0] = 0  # copied, not aliased
    assert peer.preshared_key == bytes(range(1, 33)) and isinstance(peer.preshared_key, bytes)
    assert bytes(peer.handshake.preshared_key) == bytes(range(1, 33))
    peer.set_preshared_key(ZERO32)
    assert bytes(peer.handshake.preshared_key) == ZERO32


@pytest.mark.parametrize("psk", [ZERO32, bytes(range(32))])
def test_two_peers_handshake_with_their_devices_identities(psk: bytes) -> None:
    """Peer objects set up as two devices would (each the other's public key, same psk) complete a handshake
    and derive working, matching keypairs; a psk mismatch makes the response fail."""
    ia, ib = identity(), identity()
    a_sees_b, b_sees_a = Peer(ib.public_key, ia), Peer(ia.public_key, ib)
    a_sees_b.set_preshared_key(psk)
    b_sees_a.set_preshared_key(psk)
    init = create_initiation(a_sees_b.handshake, 1, 1_700_000_000.0)
    assert len(init) == INITIATION_SIZE
    lookup = {ia.public_key: b_sees_a.handshake}.get
    assert consume_initiation(ib, bytes(init), lookup, 10.0) is b_sees_a.handshake
    resp = create_response(b_sees_a.handshake, 2)
    assert consume_response(ia, bytes(resp), {1: a_sees_b.handshake}.get) is a_sees_b.handshake
    ka, kb = begin_session(a_sees_b.handshake), begin_session(b_sees_a.handshake)
    assert ka.send_key == kb.recv_key and ka.recv_key == kb.send_key
    a_sees_b.keypairs.install(Keypair(ka.send_key, ka.recv_key, 1, 2, 10.0, True))
    b_sees_a.keypairs.install(Keypair(kb.send_key, kb.recv_key, 2, 1, 10.0, False))
    assert a_sees_b.keypairs.current is not None and b_sees_a.keypairs.next is not None

    # The same with the responder holding another psk: the initiator refuses the response.
    ia2, ib2 = identity(), identity()
    x, y = Peer(ib2.public_key, ia2), Peer(ia2.public_key, ib2)
    x.set_preshared_key(psk)
    y.set_preshared_key(bytes(31) + b"\x01")
    init = create_initiation(x.handshake, 1, 1_700_000_000.0)
    assert consume_initiation(ib2, bytes(init), {ia2.public_key: y.handshake}.get, 10.0) is y.handshake
    resp = create_response(y.handshake, 2)
    assert consume_response(ia2, bytes(resp), {1: x.handshake}.get) is None


def test_cookie_generator_macs_are_keyed_to_the_peer() -> None:
    """mac1 of what we send a peer verifies with that peer's checker, not with another identity's."""
    remote, stranger = identity(), identity()
    peer = Peer(remote.public_key, identity())
    init = create_initiation(peer.handshake, 1, 1_700_000_000.0)
    peer.cookie_generator.add_macs(init, 0.0)
    assert CookieChecker(remote.public_key).check_mac1(init)
    assert not CookieChecker(stranger.public_key).check_mac1(init)
    assert not peer.cookie_generator.has_cookie


def test_timers_get_the_jitter_and_schedule_and_keepalive_interval_is_read_through() -> None:
    schedule = Schedule()
    peer = Peer(identity().public_key, identity(), jitter=lambda: 0.25, schedule=schedule)
    peer.timers.data_sent(100.0)
    assert peer.timers.new_handshake == pytest.approx(100.0 + 15.0 + 0.25)  # KEEPALIVE 10 + REKEY_TIMEOUT 5
    assert schedule.earliest == peer.timers.new_handshake  # armed on the device's schedule
    peer.timers.persistent_keepalive_interval = 25
    assert peer.persistent_keepalive_interval == 25
