"""Timer behaviour of the device core under an injected clock (two devices back to back)."""

from __future__ import annotations

from test_device_core import A_V4, B_ENDPOINT, B_V4, Pair, ipv4_packet

from turbowg.device.constants import MAX_TIMER_HANDSHAKES, REKEY_TIMEOUT, REKEY_TIMEOUT_JITTER_MAX
from turbowg.device.timers import PeerTimers, TimerAction


def sizes(pair: Pair, transmits, endpoint) -> list[int]:
    return [len(d) for d in pair.datagrams(transmits, endpoint)]


def settled_pair() -> Pair:
    """Handshake done at t0 = pair.now, and b's keepalive at t0 + 10 answered a's data."""
    pair = Pair()
    pair.handshake()
    pair.b_to_a(pair.b.tick(pair.now + 10))
    return pair


def test_initiator_rekeys_when_sending_after_120s() -> None:
    pair = settled_pair()
    t0 = pair.now
    packet = ipv4_packet(A_V4, B_V4, b"data")
    assert sizes(pair, pair.a.handle_tun_batch([packet], t0 + 119), B_ENDPOINT) == [64]
    # Past REKEY_AFTER_TIME the data still goes out under the old keypair, plus an initiation.
    assert sizes(pair, pair.a.handle_tun_batch([packet], t0 + 121), B_ENDPOINT) == [64, 148]
    # The responder never rekeys on send: it's the initiator's job.
    out = pair.b.handle_tun_batch([ipv4_packet(B_V4, A_V4, b"x")], t0 + 122)
    assert [len(d) for t in out for d in t.datagrams] == [64]


def test_keypair_rejected_after_180s() -> None:
    pair = settled_pair()
    t0 = pair.now
    late = pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"late")], t0 + 100)
    # Sent at t0 + 100 but arriving after REJECT_AFTER_TIME: the receiver refuses the old keypair.
    pair.now = t0 + 180
    tun_b, out = pair.a_to_b(late)
    assert tun_b == [] and out == []
    assert pair.b.counters["rx_expired_keypair"] == 1
    # The sender no longer uses it either: the packet is staged behind a new handshake.
    out = pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"staged")], t0 + 180)
    assert sizes(pair, out, B_ENDPOINT) == [148]
    assert len(pair.a_peer.staged) == 1


def test_initiator_rekeys_on_receive_after_165s() -> None:
    pair = settled_pair()
    t0 = pair.now
    pair.now = t0 + 164
    _, out = pair.b_to_a(pair.b.handle_tun_batch([ipv4_packet(B_V4, A_V4, b"1")], pair.now))
    assert out == []
    pair.now = t0 + 166
    _, out = pair.b_to_a(pair.b.handle_tun_batch([ipv4_packet(B_V4, A_V4, b"2")], pair.now))
    assert sizes(pair, out, B_ENDPOINT) == [148]
    # Only once per session.
    pair.now = t0 + 167
    _, out = pair.b_to_a(pair.b.handle_tun_batch([ipv4_packet(B_V4, A_V4, b"3")], pair.now))
    assert out == []


def test_keepalive_after_10s_of_receiving_without_sending() -> None:
    pair = settled_pair()
    t0 = pair.now + 20
    pair.now = t0
    pair.a_to_b(pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"ping")], t0))
    assert pair.b.tick(t0 + 9.99) == []
    keepalive = pair.b.tick(t0 + 10)
    assert [len(d) for t in keepalive for d in t.datagrams] == [32]
    assert pair.b.tick(t0 + 30) == []
    # Sending data ourselves within the 10 s makes the keepalive unnecessary.
    pair.now = t0 + 40
    pair.a_to_b(pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"ping")], pair.now))
    pair.b.handle_tun_batch([ipv4_packet(B_V4, A_V4, b"pong")], pair.now + 1)
    assert pair.b.tick(pair.now + 10) == []


def test_new_handshake_after_15s_of_sending_without_hearing_back() -> None:
    pair = settled_pair()
    t0 = pair.now + 20
    assert sizes(pair, pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"?")], t0), B_ENDPOINT) == [64]
    assert pair.a.tick(t0 + 14.99) == []
    assert sizes(pair, pair.a.tick(t0 + 15 + REKEY_TIMEOUT_JITTER_MAX), B_ENDPOINT) == [148]


def test_handshake_retries_with_jitter_given_up_after_90s() -> None:
    pair = Pair()
    t0 = pair.now
    sent_at = []
    out = pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"lost")], t0)
    assert sizes(pair, out, B_ENDPOINT) == [148]
    sent_at.append(t0)
    step = 0.01
    for i in range(1, 12_000):  # 120 s: nothing ever answers
        now = t0 + i * step
        for transmit in pair.a.tick(now):
            assert [len(d) for d in transmit.datagrams] == [148]
            sent_at.append(now)
    assert len(sent_at) == 1 + MAX_TIMER_HANDSHAKES
    gaps = [b - a for a, b in zip(sent_at, sent_at[1:], strict=False)]
    assert all(REKEY_TIMEOUT <= gap <= REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX + step + 1e-9 for gap in gaps)
    assert len({round(gap, 2) for gap in gaps}) > 1  # jittered
    assert 90 <= sent_at[-1] - t0 <= 90 + 18 * (REKEY_TIMEOUT_JITTER_MAX + step)
    assert len(pair.a_peer.staged) == 0
    assert pair.a.counters["staged_dropped_handshake_timeout"] == 1


def test_keys_zeroed_after_540s() -> None:
    pair = settled_pair()
    t0 = pair.now
    assert pair.a_peer.keypairs.current is not None
    for now in range(int(t0) + 11, int(t0) + 540):
        pair.a.tick(now)
        pair.b.tick(now)
    assert pair.a_peer.keypairs.current is not None
    assert pair.b_peer.keypairs.current is not None
    pair.a.tick(t0 + 540)
    pair.b.tick(t0 + 540)
    assert pair.a_peer.keypairs.all() == [] and pair.b_peer.keypairs.all() == []
    assert pair.a.counters["keys_zeroed"] == 1
    assert all(entry.keypair is None for entry in pair.a._indices.values())


def test_peer_timers_keepalive_rearms_when_more_data_arrived() -> None:
    timers = PeerTimers(jitter=lambda: 0.0)
    timers.data_received(0.0)
    timers.data_received(3.0)  # while the keepalive is pending
    assert timers.expired(9.9) == []
    assert timers.expired(10.0) == [TimerAction.SEND_KEEPALIVE]
    assert timers.expired(20.0) == [TimerAction.SEND_KEEPALIVE]
    assert timers.expired(40.0) == []
    assert timers.next_deadline() is None
    timers.persistent_keepalive_interval = 25
    timers.any_authenticated_packet_traversal(50.0)
    assert timers.next_deadline() == 75.0
    assert timers.expired(75.0) == [TimerAction.PERSISTENT_KEEPALIVE]


def test_rekey_transition_keeps_traffic_flowing() -> None:
    pair = settled_pair()
    t0 = pair.now
    pair.now = t0 + 121
    out = pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"old")], pair.now)
    old_a = pair.a_peer.keypairs.current
    tun_b, response = pair.a_to_b(out)  # data under the old keypair + the initiation
    assert tun_b == [ipv4_packet(A_V4, B_V4, b"old")]
    old_b = pair.b_peer.keypairs.current
    assert pair.b_peer.keypairs.next is not None
    # While b's new keypair is unconfirmed, b keeps sending under the old one.
    during = pair.b.handle_tun_batch([ipv4_packet(B_V4, A_V4, b"during")], pair.now)
    tun_a, _ = pair.b_to_a(during)
    assert tun_a == [ipv4_packet(B_V4, A_V4, b"during")]
    _, keepalive = pair.b_to_a(response)
    assert pair.a_peer.keypairs.current is not old_a and pair.a_peer.keypairs.previous is old_a
    pair.a_to_b(keepalive)
    assert pair.b_peer.keypairs.previous is old_b and pair.b_peer.keypairs.next is None
    # Both directions use the new keypairs now; the old ones still decrypt late packets.
    assert pair.a_to_b(pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"new")], pair.now))[0]
    assert pair.b_to_a(pair.b.handle_tun_batch([ipv4_packet(B_V4, A_V4, b"new")], pair.now))[0]
    assert len([e for e in pair.a._indices.values() if e.keypair is not None]) == 2


def _true_earliest(device) -> float | None:
    deadlines = [d for d in (p.timers.next_deadline() for p in device.peers.values()) if d is not None]
    return min(deadlines) if deadlines else None


def test_device_next_deadline_is_never_later_than_a_peer_timer_and_exact_after_tick() -> None:
    """The runtime sleeps until `next_deadline()`: it may be early (one idle tick), never late."""
    pair = Pair()
    assert pair.a.next_deadline() is None
    checks = []

    def check(device) -> None:
        reported, true = device.next_deadline(), _true_earliest(device)
        checks.append((reported, true))
        assert true is None or (reported is not None and reported <= true)

    pair.handshake()
    check(pair.a)
    check(pair.b)
    t0 = pair.now
    pair.a_to_b(pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"data")], t0 + 1))
    check(pair.a)
    check(pair.b)  # b owes a keepalive at t0 + 11
    assert pair.b.next_deadline() <= t0 + 11
    for now in (t0 + 5, t0 + 11, t0 + 30, t0 + 200):
        pair.a.tick(now)
        pair.b.tick(now)
        for device in (pair.a, pair.b):
            assert device.next_deadline() == _true_earliest(device)  # exact right after a tick
    assert len(checks) == 4


def test_device_next_deadline_covers_a_handshake_started_by_a_batch() -> None:
    """A batch that starts a handshake arms the retransmit: the runtime must learn of it from next_deadline."""
    pair = Pair()
    now = pair.now
    pair.a.tick(now)
    pair.a.handle_tun_batch([ipv4_packet(A_V4, B_V4, b"first")], now)
    retransmit = pair.a_peer.timers.retransmit_handshake
    assert retransmit is not None and retransmit <= now + REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX
    assert pair.a.next_deadline() <= retransmit
