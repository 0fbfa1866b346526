"""turbowg.conn.steering: the data socket + handshake socket pair on one port, steered by classic BPF in the
kernel (run against the running kernel: the payload offset the program sees, the out-of-range fallback,
who may join the port), and the worker's reads of the handshake socket."""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import time
from collections import Counter

import pytest

from turbowg.bench.flood import responder_of, uapi_stats
from turbowg.conn.recvmmsg import HandshakeReader
from turbowg.conn.steering import (
    DATA_INDEX,
    HANDSHAKE_INDEX,
    SK_MEMINFO_DROPS,
    SO_REUSEPORT,
    HandshakeSocket,
    bound_inodes,
    inode,
    make_shareable,
    meminfo,
    steer,
)
from turbowg.conn.udp import UDPBind
from turbowg.daemon.handshake_worker import WorkerLoop
from turbowg.device.handshake_worker import (
    MSG_RESULTS,
    decode,
    encode_config,
    encode_socket,
)
from turbowg.noise.handshake import LocalIdentity
from turbowg.noise.primitives import generate_private_key, mac
from turbowg.testing.marks import needs_netns
from turbowg.testing.tunnel import TunnelSpec, build_topology, known_implementations

INITIATION = b"\x01\x00\x00\x00" + bytes(144)
RESPONSE = b"\x02\x00\x00\x00" + bytes(88)
COOKIE = b"\x03\x00\x00\x00" + bytes(60)
TRANSPORT = b"\x04\x00\x00\x00" + bytes(60)
# Not handshakes: a type byte with non-zero reserved bytes, too short, empty, a disco message, a STUN
# binding response (whose first byte is 1).
OTHERS = [b"\x01\x01\x00\x00" + bytes(144), b"\x01", b"\x01\x00\x00", b"", b"TS\xf0\x9f\x92\xac" + bytes(30),
          bytes.fromhex("0101000c2112a442") + bytes(24)]


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(70000))
        except BlockingIOError:
            return out


@pytest.fixture(params=["ebpf", "classic"])
def pair(request, monkeypatch):
    """The pair with each steering program: the eBPF one (turbowg/conn/ebpf.py) and the classic one."""
    from turbowg.conn import steering

    monkeypatch.setattr(steering, "EBPF", request.param == "ebpf")
    udp = UDPBind(0, gro=False)
    hs = HandshakeSocket(udp._sock, gro=False)
    if request.param == "ebpf" and hs.kernel is None:
        hs.close()
        udp.close()
        pytest.skip("this kernel or user cannot load the eBPF steering program")
    assert (hs.kernel is None) == (request.param == "classic")
    try:
        yield udp, hs
    finally:
        hs.close()
        udp.close()


def _send_all(port: int, payloads: list[bytes], rounds: int = 4) -> None:
    # A new source port per round: the group's hash would spread them over both sockets.
    for _ in range(rounds):
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family, socket.SOCK_DGRAM) as tx:
                for payload in payloads:
                    tx.sendto(payload, (host, port))
    time.sleep(0.05)


def test_each_kind_arrives_where_the_program_says(pair):
    udp, hs = pair
    handshakes = [INITIATION, RESPONSE, COOKIE]
    _send_all(udp.port, handshakes + [TRANSPORT] + OTHERS)
    data = _drain(udp._sock)
    steered = _drain(hs.sock)
    # The program saw the UDP payload at offset 0: the three handshake headers, and only they, went to
    # socket 1, from both address families; everything else (shorter than 4 bytes too) to socket 0.
    assert sorted(steered) == sorted(handshakes * 8)
    assert sorted(data) == sorted(([TRANSPORT] + OTHERS) * 8)
    for payload in handshakes:
        assert steer(payload) == HANDSHAKE_INDEX
    for payload in [TRANSPORT] + OTHERS:
        assert steer(payload) == DATA_INDEX


def test_an_index_the_group_does_not_hold_falls_back_to_the_data_socket(pair):
    udp, hs = pair
    hs.sock.close()  # the group holds the data socket only: the program's 1 is out of range
    _send_all(udp.port, [INITIATION, TRANSPORT])
    assert sorted(_drain(udp._sock)) == sorted([INITIATION, TRANSPORT] * 8)


def test_the_pair_is_all_that_is_bound_and_others_are_refused(pair):
    udp, hs = pair
    ours = [inode(udp._sock), inode(hs.sock)] + ([inode(hs.sink)] if hs.sink is not None else [])
    assert (hs.sink is not None) == (hs.kernel is not None)  # the eBPF program's sink (steering.make_sink)
    assert sorted(bound_inodes(udp.port)) == sorted(ours)
    # A plain bind to the port is refused as before (errno 98): e.g. a second turbowgd on the same port.
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as other:
        with pytest.raises(OSError) as err:
            other.bind(("::", udp.port))
        assert err.value.errno == errno.EADDRINUSE
    with pytest.raises(OSError) as err:
        UDPBind(udp.port)
    assert err.value.errno == errno.EADDRINUSE


def test_a_foreign_member_of_the_group_is_refused():
    udp = UDPBind(0)
    try:
        # A root process that binds the port with SO_REUSEPORT in the window (simulated: before we join).
        make_shareable(udp._sock)
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as foreign:
            foreign.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
            foreign.bind(("::", udp.port))
            with pytest.raises(OSError) as err:
                HandshakeSocket(udp._sock)
            assert err.value.errno == errno.EADDRINUSE
            assert bound_inodes(udp.port).count(inode(foreign)) == 1 and len(bound_inodes(udp.port)) == 2
            assert udp._sock.getsockopt(socket.SOL_SOCKET, SO_REUSEPORT) == 0  # shareable no more
    finally:
        udp.close()


def test_a_foreign_socket_that_joins_with_ours_is_seen_after_the_bind(monkeypatch):
    from turbowg.conn import steering

    udp = UDPBind(0)
    real = steering.bound_inodes
    calls = []

    def racing(port: int) -> list[int]:  # a foreign socket joins between our check and our bind
        calls.append(port)
        return real(port) + ([999999999] if len(calls) > 1 else [])

    monkeypatch.setattr(steering, "bound_inodes", racing)
    try:
        with pytest.raises(OSError) as err:
            HandshakeSocket(udp._sock)
        assert err.value.errno == errno.EADDRINUSE and len(calls) == 2
        monkeypatch.setattr(steering, "bound_inodes", real)
        assert real(udp.port) == [inode(udp._sock)]  # our handshake socket is closed again
        assert udp._sock.getsockopt(socket.SOL_SOCKET, SO_REUSEPORT) == 0
    finally:
        udp.close()


def test_a_full_handshake_socket_drops_in_the_kernel_and_counts(pair):
    udp, hs = pair
    hs.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # holds a few messages only
    _send_all(udp.port, [INITIATION] * 50, rounds=1)
    got = _drain(hs.sock)
    drops = meminfo(hs.sock)[SK_MEMINFO_DROPS]
    assert got and drops > 0 and len(got) + drops == 100
    assert _drain(udp._sock) == []  # the data socket never saw them


def test_rebinding_moves_the_pair_and_fwmark_reaches_both():
    udp = UDPBind(0, fwmark=0x51)
    hs = HandshakeSocket(udp._sock, fwmark=udp.fwmark)
    assert hs.sock.getsockopt(socket.SOL_SOCKET, 36) == 0x51
    udp2 = UDPBind(0)
    hs2 = HandshakeSocket(udp2._sock)
    hs.close()
    udp.close()
    try:
        _send_all(udp2.port, [INITIATION, TRANSPORT], rounds=1)
        assert _drain(hs2.sock) == [INITIATION] * 2 and _drain(udp2._sock) == [TRANSPORT] * 2
    finally:
        hs2.close()
        udp2.close()


@pytest.mark.parametrize("recvmmsg", [True, False])
def test_the_reader_keeps_handshakes_and_their_sources(recvmmsg, monkeypatch):
    from turbowg.conn import recvmmsg as reader_module

    if not recvmmsg:  # recvmsg per datagram (no recvmmsg in libc)
        monkeypatch.setattr(reader_module, "libc_recvmmsg", lambda: None)
    udp = UDPBind(0)
    hs = HandshakeSocket(udp._sock, gro=True)
    try:
        _send_all(udp.port, [INITIATION, RESPONSE, COOKIE], rounds=1)
        counters: Counter = Counter()
        reader = HandshakeReader(hs.sock, slots=4)  # two recvmmsg calls for the six
        assert (reader._recvmmsg is not None) == recvmmsg
        entries = reader.drain(counters)
        assert counters["rx_handshake_socket_reads"] == 6
        assert sorted(e[3] for e in entries) == sorted([INITIATION, RESPONSE, COOKIE] * 2)
        assert all(e[2] > 0 for e in entries)
        kinds = sorted(e[0] for e in entries)
        assert kinds == [1, 1, 2, 2, 3, 3]
        assert {len(e[1]) for e in entries} == {4, 16}  # 127.0.0.1 as 4 bytes, ::1 as 16
        assert {e[1] for e in entries} == {socket.inet_aton("127.0.0.1"), socket.inet_pton(socket.AF_INET6, "::1")}
    finally:
        hs.close()
        udp.close()


def _initiation(mac1_key: bytes) -> bytes:
    body = b"\x01\x00\x00\x00" + os.urandom(148 - 4 - 32)
    return body + mac(mac1_key, body) + bytes(16)


def test_the_worker_reads_its_socket_and_answers_a_flood_with_cookies():
    """The worker loop in a thread: it gets the handshake socket with MSG_SOCKET, a flood that fills more
    than 1/8 of the queue turns "under load" on, cookie replies go out of the same port, the main process
    gets counters (and no results: the flood identifies nothing)."""
    udp = UDPBind(0, gro=False)
    hs = HandshakeSocket(udp._sock, gro=False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    identity = LocalIdentity(generate_private_key())
    mac1_key = identity.mac1_key
    flood = [_initiation(mac1_key) for _ in range(700)]
    # Queue the flood before the worker starts: its first wake drains 700 > 512.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        tx.bind(("127.0.0.1", 0))
        for message in flood:
            tx.sendto(message, ("127.0.0.1", udp.port))
        socket.send_fds(ours, [encode_config(1, identity.private_key, [])], [])
        socket.send_fds(ours, [encode_socket(True)], [os.dup(hs.fileno())])
        loop = WorkerLoop(theirs)
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        counters: dict = {}
        while time.monotonic() < deadline and counters.get("tx_cookie_reply", 0) + counters.get(
                "tx_cookie_reply_ratelimited", 0) < 700:
            ours.settimeout(1.0)
            try:
                message = decode(ours.recv(1 << 20))
            except TimeoutError:
                continue
            assert message[0] == MSG_RESULTS and message[2] == [] and message[3] == []
            counters = message[4] or counters
        tx.settimeout(2.0)
        reply, source = tx.recvfrom(100)
        assert reply[0] == 3 and len(reply) == 64 and source[1] == udp.port
    ours.close()
    thread.join(5)
    hs.close()
    udp.close()
    assert counters["rx_handshake_socket_reads"] == 700
    assert counters["tx_cookie_reply"] >= 1 and counters["tx_cookie_reply_ratelimited"] >= 600
    assert "rx_handshake_socket_kernel_drops" in counters


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


@needs_netns
def test_a_daemon_keeps_handshaking_when_its_worker_dies_and_restarts_it():
    """A real turbowgd (responder) with a steered pair: its worker is SIGKILLed; the initiator's rekeys (every
    3 s) are answered by the main process reading the handshake socket for 8 s, then by a restarted worker.
    (8 s, longer than REKEY_TIMEOUT + jitter: an initiation the worker took with it when it died is sent again
    5-5.3 s later, and must land in the window the main process reads.)"""
    impl = known_implementations(with_versions=False)["turbowg"]
    spec = TunnelSpec("turbowg", impl, impl, env_a={"TURBOWG_REKEY_AFTER_TIME": "3"},
                      env_b={"TURBOWG_HANDSHAKE_WORKER_RESTART_DELAY": "8"})
    with build_topology([spec]) as topo:
        tun = topo.tunnels["turbowg"]
        resp = responder_of(topo, "turbowg")
        stats = uapi_stats(tun.b.ifname) or {}
        assert stats.get("handshake_socket") == 1 and stats.get("handshake_worker_running") == 1, stats
        [worker] = _children(resp.pid)
        os.kill(worker, signal.SIGKILL)
        time.sleep(0.3)
        stats = uapi_stats(tun.b.ifname) or {}
        assert stats.get("handshake_worker_running") == 0 and stats.get("handshake_worker_failures") == 1, stats
        before = stats.get("tx_response", 0)
        ping = topo.run(topo.ns_a, "ping", "-4", "-n", "-i", "0.2", "-c", "75", "-W", "1", tun.server_v4,
                        check=False, timeout=60)
        stats = uapi_stats(tun.b.ifname) or {}
        assert stats.get("rx_handshake_socket_inloop_reads", 0) >= 1, stats  # read in the event loop ...
        assert stats.get("tx_response", 0) - before >= 3, stats  # ... and rekeys answered all along
        assert stats.get("handshake_worker_running") == 1, stats  # restarted (after 8 s)
        assert len(_children(resp.pid)) == 1
        assert ping.stdout.count("bytes from") >= 70, ping.stdout[-400:]
