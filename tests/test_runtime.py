"""turbowg/daemon/runtime.py's under-load detection on its own (no TUN, no sockets): the handshake-rate
window that turns cookie replies on, what it counts, how long it holds, and that the receive path hands its
verdict to the device."""

from __future__ import annotations

import struct

import pytest

from turbowg.daemon import runtime as runtime_mod
from turbowg.daemon.runtime import Runtime

LIMIT = runtime_mod.UNDER_LOAD_HANDSHAKES_PER_SECOND
HOLD = runtime_mod.UNDER_LOAD_HOLD

pytestmark = pytest.mark.skipif(not hasattr(Runtime, "_under_load"),
                                reason="Runtime._under_load replaced (handshake worker): see test_handshake_worker")


def datagrams(kinds: list[bytes]) -> tuple[bytearray, list[int]]:
    """A receive buffer with one datagram per read (as handshakes come), and its (offset, end, stride)
    chunks."""
    buf = bytearray()
    chunks: list[int] = []
    for d in kinds:
        chunks += [len(buf), len(buf) + len(d), len(d)]
        buf += d
    return buf, chunks


def initiation() -> bytes:
    return struct.pack("<I", 1) + bytes(144)


def response() -> bytes:
    return struct.pack("<I", 2) + bytes(88)


def transport() -> bytes:
    return struct.pack("<IIQ", 4, 7, 0) + bytes(32)


@pytest.fixture
def rt() -> Runtime:
    return Runtime("twtest0", socket_dir="/nonexistent")  # nothing is opened before start()


def feed(rt: Runtime, kinds: list[bytes], now: float) -> bool:
    buf, chunks = datagrams(kinds)
    return rt._under_load(buf, chunks, now)


def test_quiet_and_data_traffic_is_not_load(rt) -> None:
    assert not feed(rt, [], 10.0)
    assert not feed(rt, [transport()] * 1000, 10.0)
    assert not feed(rt, [struct.pack("<I", 3) + bytes(60)] * 1000, 10.0)  # cookie replies are not counted


def test_more_than_the_limit_per_second_turns_load_on(rt) -> None:
    assert not feed(rt, [initiation()] * LIMIT, 100.0)  # exactly the limit: not yet
    assert feed(rt, [response()], 100.5)  # one more within the same second
    assert feed(rt, [], 100.5 + HOLD - 0.01)  # holds without new handshakes...
    assert not feed(rt, [], 100.5 + HOLD)  # ...for UNDER_LOAD_HOLD seconds after the last trigger


def test_handshakes_and_types_1_and_2_only_are_counted(rt) -> None:
    not_handshakes = [
        transport(),
        struct.pack("<I", 3) + bytes(60),  # cookie reply
        bytes([1, 1, 0, 0]) + bytes(144),  # type word 0x101: not a WireGuard message
        bytes([1, 0, 0]),  # too short to hold a type word
        b"",
    ]
    assert not feed(rt, not_handshakes * 100, 50.0)
    assert not feed(rt, [initiation(), response()] * (LIMIT // 2), 50.0)
    assert feed(rt, [initiation()], 50.1)


def test_the_window_restarts_after_a_second(rt) -> None:
    assert not feed(rt, [initiation()] * LIMIT, 200.0)
    assert not feed(rt, [initiation()] * LIMIT, 201.01)  # a new window: the count starts over
    assert not feed(rt, [initiation()] * (LIMIT // 2), 202.5)
    assert not feed(rt, [initiation()] * (LIMIT // 2), 203.0)  # same window as 202.5: exactly the limit
    assert feed(rt, [initiation()], 203.2)


def test_a_flood_in_one_read_batch_counts_every_datagram(rt) -> None:
    assert feed(rt, [transport()] * 10 + [initiation()] * (LIMIT + 1) + [transport()] * 10, 300.0)


def test_a_sustained_flood_keeps_it_on_and_it_ends_after_the_hold(rt) -> None:
    t = 400.0
    for step in range(300):  # 3 s of batches of 2 every 10 ms: 200 handshakes per second
        under = feed(rt, [initiation(), initiation()], t + step * 0.01)
        assert under == (2 * (step + 1) > LIMIT), step  # on from the first window over the limit, never off
    last = t + 299 * 0.01
    assert feed(rt, [transport()], last + HOLD - 0.05)
    assert not feed(rt, [transport()], last + HOLD + 0.01)


def test_the_receive_path_hands_the_verdict_to_the_device(rt, monkeypatch) -> None:
    """_on_udp_readable runs the detection over what it read and passes it as handle_udp_packed(under_load=)."""
    seen: list[bool] = []
    pending: list[list[bytes]] = []

    class FakeUDP:
        def recv_packed(self, buf, cursor, limit, chunks, senders, max_calls=64):
            for d in pending.pop(0):
                chunks += [cursor, cursor + len(d), len(d)]
                buf[cursor:cursor + len(d)] = d
                senders.append(("192.0.2.1", 51820))
                cursor += len(d)
            return cursor

    def handle_udp_packed(buf, chunks, senders, now, under_load=False):
        seen.append(under_load)
        return 0, []

    rt.udp = FakeUDP()
    monkeypatch.setattr(rt.device, "handle_udp_packed", handle_udp_packed)
    monkeypatch.setattr(rt, "_reschedule_timer", lambda: None)
    pending += [[initiation()] * LIMIT, [initiation()], [transport()]]
    rt._on_udp_readable()
    rt._on_udp_readable()
    rt._on_udp_readable()
    assert seen == [False, True, True]
