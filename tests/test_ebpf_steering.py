"""turbowg.conn.ebpf: the eBPF steering program's per-source limit in the kernel, on the running kernel (the
steering itself is tests/test_reuseport_steering.py, run with both programs): only under load, only
zero-mac2 initiations/responses of their exact size, per IPv4 address / IPv6 /64, counted; agreeing with the
user-space limiter (turbowg/ratelimiter) on a packet sequence; the classic fallback."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from turbowg.conn import ebpf, steering
from turbowg.conn.steering import HandshakeSocket
from turbowg.conn.udp import UDPBind
from turbowg.ratelimiter import PACKETS_BURSTABLE, RateLimiter

INITIATION = b"\x01\x00\x00\x00" + bytes(144)  # zero mac2
RESPONSE = b"\x02\x00\x00\x00" + bytes(88)
COOKIE = b"\x03\x00\x00\x00" + bytes(60)
WITH_MAC2 = b"\x01\x00\x00\x00" + bytes(143) + b"\x01"
SHORT = b"\x01\x00\x00\x00" + bytes(143)  # a bad size: the screener's business
TRANSPORT = b"\x04\x00\x00\x00" + bytes(60)


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(70000))
        except BlockingIOError:
            return out


@pytest.fixture
def pair(monkeypatch):
    monkeypatch.setattr(steering, "EBPF", True)
    udp = UDPBind(0, gro=False)
    hs = HandshakeSocket(udp._sock, gro=False)
    if hs.kernel is None:
        hs.close()
        udp.close()
        pytest.skip("this kernel or user cannot load the eBPF steering program")
    try:
        yield udp, hs
    finally:
        hs.close()
        udp.close()


def _send(port: int, payload: bytes, count: int, source: str = "127.0.0.1") -> None:
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as tx:
        tx.bind((source, 0))
        for _ in range(count):
            tx.sendto(payload, (source if family == socket.AF_INET else "::1", port))


def _settle() -> None:
    time.sleep(0.05)  # loopback delivers in the send call; this only covers a softirq deferred to ksoftirqd


def test_not_under_load_nothing_is_limited(pair):
    udp, hs = pair
    assert not hs.kernel.limiter.read_flag()
    _send(udp.port, INITIATION, 40)
    _settle()
    assert len(_drain(hs.sock)) == 40
    assert hs.kernel_counters() == {"rx_handshake_kernel_ratelimited": 0, "rx_handshake_kernel_admitted": 0}


@pytest.mark.parametrize("source", ["127.0.0.1", "::1"])
def test_under_load_a_source_gets_its_burst_and_the_rest_is_dropped_and_counted(pair, source):
    udp, hs = pair
    hs.kernel.limiter.set_under_load(True)
    assert hs.kernel.limiter.read_flag()
    start = time.monotonic()
    _send(udp.port, INITIATION, 30, source)
    _send(udp.port, RESPONSE, 10, source)
    elapsed = time.monotonic() - start
    _settle()
    got = _drain(hs.sock)
    # The burst (5), plus what refilled at 20/s while we sent (bounded by the time the sends took).
    assert PACKETS_BURSTABLE <= len(got) <= PACKETS_BURSTABLE + 1 + int(elapsed * 20), (len(got), elapsed)
    assert got[:PACKETS_BURSTABLE] == [INITIATION] * PACKETS_BURSTABLE  # one bucket for both kinds
    counters = hs.kernel_counters()
    assert counters["rx_handshake_kernel_admitted"] == len(got)
    assert counters["rx_handshake_kernel_ratelimited"] == 40 - len(got)
    assert _drain(udp._sock) == []  # nothing limited leaks to the data socket
    # ... they went to the sink, whose filter dropped them unqueued (not SK_DROP's closed-port path)
    assert steering.meminfo(hs.sink)[steering.SK_MEMINFO_DROPS] == 40 - len(got)
    assert steering.meminfo(hs.sink)[steering.SK_MEMINFO_RMEM_ALLOC] == 0


def test_under_load_only_zero_mac2_handshakes_of_their_size_are_limited(pair):
    udp, hs = pair
    hs.kernel.limiter.set_under_load(True)
    _send(udp.port, INITIATION, 20)  # the bucket of 127.0.0.1 is now empty
    _drain(hs.sock)
    for payload in (WITH_MAC2, COOKIE, SHORT):
        _send(udp.port, payload, 20)
    _send(udp.port, TRANSPORT, 20)
    _settle()
    steered = _drain(hs.sock)
    assert sorted(steered) == sorted([WITH_MAC2] * 20 + [COOKIE] * 20 + [SHORT] * 20)
    assert _drain(udp._sock) == [TRANSPORT] * 20


def test_sources_have_their_own_buckets_and_the_flag_turns_the_limit_off(pair):
    udp, hs = pair
    hs.kernel.limiter.set_under_load(True)
    _send(udp.port, INITIATION, 20, "127.0.0.2")  # a flooded source ...
    _drain(hs.sock)
    _send(udp.port, INITIATION, 3, "127.0.0.3")  # ... does not spend another's bucket
    _send(udp.port, INITIATION, 3, "127.0.0.2")
    _settle()
    got = _drain(hs.sock)
    assert 3 <= len(got) <= 4, len(got)  # 127.0.0.3's three; 127.0.0.2 refilled at most one in this time
    assert hs.kernel.bucket(ebpf.bucket_key(socket.inet_aton("127.0.0.3"))) is not None
    hs.kernel.limiter.set_under_load(False)
    _send(udp.port, INITIATION, 20, "127.0.0.2")
    _settle()
    assert len(_drain(hs.sock)) == 20


def test_the_kernel_and_the_user_space_limiter_agree_on_a_sequence(pair):
    """The same sequence through both limiters: bursts from 4 sources with pauses that refill some tokens.
    The kernel stamps a datagram a few microseconds after our clock read before sendto (loopback delivers
    in the call), so the two can differ only for a datagram that lands within that skew of a token's refill:
    at most one per source per pause, and the totals within the number of sources."""
    udp, hs = pair
    hs.kernel.limiter.set_under_load(True)
    sources = [f"127.0.0.{i}" for i in (11, 12, 13, 14)]
    socks = []
    for source in sources:
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.bind((source, 0))
        socks.append(tx)
    model = RateLimiter()
    expected = dict.fromkeys(sources, 0)
    received = dict.fromkeys(sources, 0)
    pattern = [(12, 0.0), (3, 0.06), (6, 0.13), (2, 0.02), (8, 0.3)]  # (datagrams per source, pause before)
    try:
        for burst, pause in pattern:
            time.sleep(pause)
            for _ in range(burst):
                for source, tx in zip(sources, socks, strict=True):
                    now_ns = time.monotonic_ns()
                    tx.sendto(INITIATION, ("127.0.0.1", udp.port))
                    expected[source] += model.allow_ns(socket.inet_aton(source), now_ns)
            _settle()
            while True:
                try:
                    data, addr = hs.sock.recvfrom(2000)
                except BlockingIOError:
                    break
                received[addr[0].removeprefix("::ffff:")] += 1
    finally:
        for tx in socks:
            tx.close()
    for source in sources:
        assert abs(received[source] - expected[source]) <= len(pattern), (source, received, expected)
    assert abs(sum(received.values()) - sum(expected.values())) <= len(sources), (received, expected)
    sent = sum(b for b, _ in pattern) * len(sources)
    assert hs.kernel_counters()["rx_handshake_kernel_ratelimited"] == sent - sum(received.values())
    assert sum(received.values()) < sent * 0.7  # the limit really bit (~68 of 124 pass)


def test_a_refused_program_falls_back_to_the_classic_one_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(steering, "EBPF", True)
    monkeypatch.setattr(steering, "_fallback_logged", False)

    def refuse(code: bytes, log_size: int = 0) -> int:
        raise ebpf.BpfUnavailable(13, "program refused: test")

    monkeypatch.setattr(ebpf, "load_program", refuse)
    caplog.set_level(logging.WARNING, logger="turbowg.steering")
    for _ in range(2):
        udp = UDPBind(0, gro=False)
        hs = HandshakeSocket(udp._sock, gro=False)
        try:
            assert hs.kernel is None and hs.kernel_counters() == {}
            _send(udp.port, INITIATION, 3)
            _send(udp.port, TRANSPORT, 3)
            _settle()
            assert _drain(hs.sock) == [INITIATION] * 3 and _drain(udp._sock) == [TRANSPORT] * 3
        finally:
            hs.close()
            udp.close()
    assert len([r for r in caplog.records if "classic BPF, no kernel limiter" in r.getMessage()
                and "program refused: test" in r.getMessage()]) == 1


def test_the_verifier_refusal_reaches_us_with_its_log():
    a = ebpf.Asm()
    a.exit()  # returns R0 without setting it: refused
    try:
        os.close(ebpf.create_map(ebpf.MAP_ARRAY, 4, 4, 1))
    except OSError:
        pytest.skip("no bpf(2) here")
    with pytest.raises(ebpf.BpfUnavailable) as err:
        ebpf.load_program(a.code())
    assert "program refused" in str(err.value) and "R0" in str(err.value), str(err.value)


def test_the_worker_sets_the_flag_under_load_and_clears_it_after(pair):
    """The worker loop in a thread gets the handshake socket and the program's maps (MSG_SOCKET): a flood
    queued before it starts (700 > 512 waiting) turns its under-load state on, and so the kernel limit; the
    kernel's drops keep it on while they go on; a second after the flood it is off again."""
    import threading

    from turbowg.daemon.handshake_worker import WorkerLoop
    from turbowg.device.handshake_worker import UNDER_LOAD_HOLD, encode_config, encode_socket
    from turbowg.noise.handshake import LocalIdentity
    from turbowg.noise.primitives import generate_private_key, mac

    udp, hs = pair
    identity = LocalIdentity(generate_private_key())

    def initiation() -> bytes:
        body = b"\x01\x00\x00\x00" + os.urandom(148 - 4 - 32)
        return body + mac(identity.mac1_key, body) + bytes(16)

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    thread = None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            tx.bind(("127.0.0.1", 0))
            for _ in range(700):
                tx.sendto(initiation(), ("127.0.0.1", udp.port))
            assert not hs.kernel.limiter.read_flag()
            socket.send_fds(ours, [encode_config(1, identity.private_key, [])], [])
            socket.send_fds(ours, [encode_socket(True, 2)], [os.dup(hs.fileno())] +
                            [os.dup(fd) for fd in hs.kernel.worker_fds()])
            thread = threading.Thread(target=WorkerLoop(theirs).run, daemon=True)
            thread.start()
            deadline = time.monotonic() + 10
            while not hs.kernel.limiter.read_flag() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert hs.kernel.limiter.read_flag()
            # Under load: 127.0.0.1's bucket lets ~20/s through; the rest is dropped before the worker.
            end = time.monotonic() + 1.5 * UNDER_LOAD_HOLD
            while time.monotonic() < end:
                for _ in range(20):
                    tx.sendto(initiation(), ("127.0.0.1", udp.port))
                time.sleep(0.01)
            dropped = hs.kernel_counters()["rx_handshake_kernel_ratelimited"]
            assert dropped > 1000, hs.kernel_counters()
            assert hs.kernel.limiter.read_flag()  # the drops kept it under load past the hold
            deadline = time.monotonic() + UNDER_LOAD_HOLD + 3
            while hs.kernel.limiter.read_flag() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not hs.kernel.limiter.read_flag()
    finally:
        ours.close()
        if thread is not None:
            thread.join(5)
        theirs.close()


_HEADERS = [b"\x01\x00\x00\x00", b"\x02\x00\x00\x00", b"\x03\x00\x00\x00", b"\x04\x00\x00\x00", b"\x01\x00\x01\x00",
            b"\x00\x00\x00\x00", b"\x02\x00\x00\x80"]


def _payloads():
    from hypothesis import strategies as st

    sized = st.tuples(st.sampled_from(_HEADERS), st.sampled_from([0, 60, 88, 87, 89, 144, 143, 145, 200]),
                      st.booleans()).map(lambda t: t[0] + (bytes(t[1]) if t[2] else os.urandom(t[1])))
    return st.lists(st.one_of(sized, st.binary(max_size=160)), min_size=1, max_size=40)


def test_random_payloads_go_where_the_python_twin_says(pair):
    """Random and near-miss payloads under load: everything the twin (ebpf.classify) does not limit arrives
    at the socket it names; of what it limits (one source's bucket), what does not arrive was counted as
    dropped, and at most the burst plus the refill got through."""
    from hypothesis import HealthCheck, given, settings

    udp, hs = pair
    hs.kernel.limiter.set_under_load(True)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.9", 0))
    start = time.monotonic()

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(_payloads())
    def check(payloads):
        before = hs.kernel_counters()
        for payload in payloads:
            tx.sendto(payload, ("127.0.0.1", udp.port))
        _settle()
        data, steered = _drain(udp._sock), _drain(hs.sock)
        want_data = sorted(p for p in payloads if ebpf.classify(p)[0] == ebpf.DATA_INDEX)
        want_hs = sorted(p for p in payloads if ebpf.classify(p) == (ebpf.HANDSHAKE_INDEX, False))
        limitable = [p for p in payloads if ebpf.classify(p)[1]]
        assert sorted(data) == want_data
        passed = [p for p in steered if ebpf.classify(p)[1]]
        assert sorted(p for p in steered if not ebpf.classify(p)[1]) == want_hs
        after = hs.kernel_counters()
        dropped = after["rx_handshake_kernel_ratelimited"] - before["rx_handshake_kernel_ratelimited"]
        assert dropped == len(limitable) - len(passed)
        assert after["rx_handshake_kernel_admitted"] - before["rx_handshake_kernel_admitted"] == len(passed)

    try:
        check()
    finally:
        tx.close()
    admitted = hs.kernel_counters()["rx_handshake_kernel_admitted"]
    assert admitted <= PACKETS_BURSTABLE + 1 + int((time.monotonic() - start) * 20)
