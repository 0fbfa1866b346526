"""UDPBind over real sockets: GSO batch sends, GRO and non-GRO receivers, v4/v6 endpoints, GSO fallback."""

from __future__ import annotations

import select
import socket
import time

import pytest
from test_tun_device import inside

from turbowg.conn.udp import UDPBind
from turbowg.testing.marks import needs_netns
from turbowg.testing.netns import namespace_pair, ns_run


def receive(bind: UDPBind, want: int, timeout: float = 5.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        select.select([bind], [], [], 0.2)
        bind.recv_batch(out, max_calls=16)
    return out


def forty() -> list[bytes]:
    return [bytes([i]) * 1200 for i in range(39)] + [b"last-and-shorter"]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("receiver_gro", [True, False])
def test_gso_send_of_40_arrives_as_40(host: str, receiver_gro: bool) -> None:
    with UDPBind() as tx, UDPBind(gro=receiver_gro) as rx:
        assert tx.gso, "kernel without UDP_SEGMENT"
        assert rx.gro == receiver_gro
        data = forty()
        tx.send_batch((host, rx.port), data)
        assert tx.counters["send_calls"] == 1 and tx.counters["send_datagrams"] == 40
        got = receive(rx, 40)
        assert [d for d, _ in got] == data
        assert {ep for _, ep in got} == {(host, tx.port)}
        if receiver_gro:  # loopback keeps the GSO super-packet whole; recv_batch cut it
            assert rx.counters["recv_calls"] < 40
        else:
            assert rx.counters["recv_calls"] == 40


def test_runs_of_equal_size_split_batches_and_keep_order() -> None:
    with UDPBind() as tx, UDPBind() as rx:
        data = [b"a" * 1000] * 5 + [b"b" * 1200] + [b"c" * 1000] * 3 + [b"d" * 500] + [b"e" * 700]
        tx.send_batch(("127.0.0.1", rx.port), data)
        # [a*5] [b, c] [c, c, d] [e] -> 4 calls
        assert tx.counters["send_calls"] == 4
        assert [d for d, _ in receive(rx, len(data))] == data


def test_more_than_64_and_more_than_64k_are_split_across_sends() -> None:
    with UDPBind() as tx, UDPBind() as rx:
        data = [i.to_bytes(2, "big") * 100 for i in range(150)] + [b"x" * 1400] * 60
        tx.send_batch(("::1", rx.port), data)
        assert tx.counters["send_calls"] == 3 + 2  # 64+64+22 small; 60*1400 > 65527 so two sends
        assert [d for d, _ in receive(rx, len(data))] == data


def test_forced_gso_off_sends_one_per_call() -> None:
    with UDPBind(gso=False) as tx, UDPBind() as rx:
        assert not tx.gso
        data = forty()
        tx.send_batch(("127.0.0.1", rx.port), data)
        assert tx.counters["send_calls"] == 40
        assert [d for d, _ in receive(rx, 40)] == data


@needs_netns
def test_refused_gso_send_falls_back_per_datagram() -> None:
    """Segments bigger than the path MTU make the kernel refuse the UDP_SEGMENT send (EINVAL): the batch is
    resent datagram by datagram (IP-fragmented) and GSO stays off."""
    with namespace_pair("tc") as pair:
        with inside(pair.b):
            rx = UDPBind()
        with inside(pair.a):
            tx = UDPBind()
        with tx, rx:
            data = [bytes([i]) * 2000 for i in range(5)]
            tx.send_batch((pair.b_ip, rx.port), data)
            assert not tx.gso and tx.counters["gso_fallbacks"] == 1
            assert tx.counters["send_datagrams"] == 5
            got = receive(rx, 5)
            assert [d for d, _ in got] == data
            assert got[0][1] == (pair.a_ip, tx.port)
            tx.send_batch((pair.b_ip6, rx.port), data[:2])  # later batches: plain sends, no new fallback
            assert tx.counters["gso_fallbacks"] == 1
            got = receive(rx, 2)
            assert [d for d, _ in got] == data[:2] and got[0][1] == (pair.a_ip6, tx.port)
            assert ns_run(pair.a, "ip", "link").returncode == 0


def test_fwmark_and_bad_endpoints() -> None:
    with UDPBind(fwmark=0x51820) as b:
        assert b._sock.getsockopt(socket.SOL_SOCKET, 36) == 0x51820 == b.fwmark
        b.set_fwmark(0)
        assert b._sock.getsockopt(socket.SOL_SOCKET, 36) == 0 == b.fwmark
        for bad in (("not-an-ip", 1), ("127.0.0.1", 0), ("::1", 70000)):
            with pytest.raises(ValueError):
                b.send_batch(bad, [b"x"])
    with pytest.raises(ValueError):
        UDPBind(port=70000)


def test_port_in_use_is_a_clear_error() -> None:
    with UDPBind() as a:
        with pytest.raises(OSError, match="cannot bind UDP port"):
            UDPBind(a.port)
