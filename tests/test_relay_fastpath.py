"""The relay's C forwarding plane (turbowg/relay/_fastpath.c, fastpath.py).

First the C loop alone, driven over socketpairs with real DERP frames: frames split anywhere (down to
byte by byte), 64 KiB packets, frames over their limit, control frames handed up byte for byte, a sender
that disconnects mid-frame, a destination that never reads (sender paused, memory bounded, no loss until
the write timeout, then counted head drops), 10,000 clients; and a property test against the pure-Python
parser (server_proto.ServerConnection) as the reference. Then the whole relay with the plane in use
(the socket handover after ServerInfo, PeerGone, duplicates, mixed TLS/plain clients), and the main relay
tests again with TURBOWG_NO_C=1 so both paths stay covered.

Why one file (~650 lines): the C plane's own tests and the relay's tests with the plane in use share the
socketpair harness and the frame helpers, and are run together whenever _fastpath.c changes.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_relay_server import authenticated

from turbowg.derp import codec, keys
from turbowg.derp.client import DerpClient
from turbowg.derp.client_proto import ClientConnection
from turbowg.relay import fastpath
from turbowg.relay.http import RelayHTTPProtocol
from turbowg.testing.relay import exchange, raw_upgrade, relay, run, server_tls, until

pytestmark = pytest.mark.skipif(not fastpath.HAVE_C, reason="turbowg.relay._fastpath not built or TURBOWG_NO_C set")

if fastpath.HAVE_C:
    from turbowg.relay._fastpath import EV_ACTIVE, EV_CLOSED, EV_DELIVERY, EV_PROTOCOL, EV_WRITE_TIMEOUT, Loop

MAX_PACKET = codec.MAX_PACKET_SIZE


def key(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


class Net:
    """A C loop with clients on socketpairs: `client[i]` is the test's end, the loop owns the other."""

    def __init__(self, n: int = 2, **kw: object) -> None:
        self.loop = Loop(**kw)
        self.sock: list[socket.socket] = []
        self.ids: list[int] = []
        self.events: list[tuple[int, int, bytes]] = []
        for i in range(n):
            self.add(key(i))

    def add(self, k: bytes, inbytes: bytes = b"", route: bool = True) -> int:
        ours, theirs = socket.socketpair()
        cid = self.loop.add(theirs.detach(), k, inbytes)
        if route:
            self.loop.route(k, cid)
        ours.setblocking(False)
        self.sock.append(ours)
        self.ids.append(cid)
        return cid

    def poll(self, times: int = 1) -> list[tuple[int, int, bytes]]:
        got = []
        for _ in range(times):
            got += self.loop.poll()
        self.events += got
        return got

    def recv_all(self, i: int, want: int, timeout: float = 5.0) -> bytes:
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while len(buf) < want:
            self.poll()
            try:
                chunk = self.sock[i].recv(1 << 20)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.0005)
                continue
            if not chunk:
                break
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self.loop.close()
        for s in self.sock:
            s.close()


@pytest.fixture
def net():
    nets: list[Net] = []

    def make(n: int = 2, **kw: object) -> Net:
        nets.append(Net(n, **kw))
        return nets[-1]

    yield make
    for n in nets:
        n.close()


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 0
    while off + 5 <= len(data):
        t, n = data[off], int.from_bytes(data[off + 1 : off + 5], "big")
        out.append((t, data[off + 5 : off + 5 + n]))
        off += 5 + n
    assert off == len(data), "a partial frame at the end"
    return out


def handed_up(events: list[tuple[int, int, bytes]], cid: int | None = None) -> bytes:
    """The frames the loop handed up (back-to-back frames of one conn come as one event), as one stream."""
    return b"".join(d for c, k, d in events if k < 256 and (cid is None or c == cid))


# ---------------------------------------------------------------------------------------------------
# The C loop alone


def test_send_packet_to_a_routed_key_arrives_as_recv_packet_once_per_turn(net) -> None:
    n = net(3)
    pkts = [bytes([i]) * (10 + i) for i in range(50)]
    n.sock[0].sendall(b"".join(codec.encode_send_packet(key(1), p) for p in pkts))
    n.sock[2].sendall(codec.encode_send_packet(key(1), b"from two"))
    got = frames_of(n.recv_all(1, sum(5 + 32 + len(p) for p in pkts) + 5 + 32 + 8))
    from0 = [p[32:] for t, p in got if p[:32] == key(0)]
    assert all(t == codec.FrameType.RECV_PACKET for t, _ in got)
    assert from0 == pkts
    assert [p[32:] for t, p in got if p[:32] == key(2)] == [b"from two"]
    st_ = n.loop.stats()
    assert st_["packets_sent"] == st_["packets_received"] == 51
    assert st_["bytes_received"] == sum(map(len, pkts)) + 8
    # each destination is told once per sender (EV_DELIVERY carries the sender's key), not per packet
    deliveries = [(cid, data) for cid, kind, data in n.events if kind == EV_DELIVERY]
    assert sorted(deliveries) == sorted([(n.ids[1], key(0)), (n.ids[1], key(2))])


def test_frames_split_byte_by_byte_and_at_every_offset(net) -> None:
    n = net(2)
    stream = b"".join(codec.encode_send_packet(key(1), bytes([i]) * i) for i in range(1, 40))
    stream += codec.encode_ping(b"12345678")
    for b in stream:
        n.sock[0].send(bytes([b]))
        n.poll()
    got = frames_of(n.recv_all(1, sum(5 + 32 + i for i in range(1, 40))))
    assert [p[32:] for _, p in got] == [bytes([i]) * i for i in range(1, 40)]
    assert handed_up(n.events) == codec.encode_ping(b"12345678")


def test_64k_packets_and_a_frame_one_byte_over_the_limit(net) -> None:
    n = net(2)
    big = [os.urandom(MAX_PACKET) for _ in range(6)]
    stream = b"".join(codec.encode_send_packet(key(1), p) for p in big)
    # in uneven chunks, so frames straddle reads
    for off in range(0, len(stream), 70001):
        n.sock[0].sendall(stream[off : off + 70001])
        n.poll()
    got = frames_of(n.recv_all(1, len(big) * (5 + 32 + MAX_PACKET)))
    assert [p[32:] for _, p in got] == big
    # SendPacket limit is 32 + 64 KiB: one more byte is a protocol error, reported and the conn stops
    n.sock[0].sendall(codec.pack_header(codec.FrameType.SEND_PACKET, 32 + MAX_PACKET + 1))
    n.poll(3)
    [(cid, kind, why)] = [e for e in n.events if e[1] == EV_PROTOCOL]
    assert cid == n.ids[0] and b"exceeds limit" in why


def test_control_frames_and_unrouted_send_packets_are_handed_up_exactly_as_sent(net) -> None:
    n = net(2)
    frames = [
        codec.encode_ping(b"abcdefgh"),
        codec.encode_note_preferred(True),
        codec.encode_frame(codec.FrameType.WATCH_CONNS),
        codec.encode_close_peer(key(7)),
        codec.encode_forward_packet(key(8), key(1), b"forwarded"),  # ForwardPacket: Python routes it
        codec.encode_keep_alive(),
        codec.encode_pong(b"12345678"),
        codec.encode_frame(0x77, b"unknown type"),
        codec.encode_send_packet(key(99), b"to a key the loop does not hold"),
        codec.encode_frame(codec.FrameType.SEND_PACKET, b"short"),  # < 32 bytes: Python's to refuse
        codec.encode_frame(codec.FrameType.PING, b"x" * 1000),  # at the limit
    ]
    n.sock[0].sendall(b"".join(frames))
    n.poll(2)
    assert handed_up(n.events, n.ids[0]) == b"".join(frames) == handed_up(n.events)
    assert [k for _, k, d in n.events if k < 256][0] == frames[0][0]  # an event's kind: its first frame's type
    assert n.loop.stats()["packets_sent"] == 0


def test_bytes_read_before_the_handover_are_parsed_first_and_initial_output_written(net) -> None:
    n = net(1)
    stream = codec.encode_send_packet(key(0), b"first") + codec.encode_send_packet(key(0), b"second")
    ours, theirs = socket.socketpair()
    cid = n.loop.add(theirs.detach(), key(5), stream[:9], outbytes=b"SERVERINFO")  # 9: a partial frame
    n.loop.route(key(5), cid)
    n.sock.append(ours)
    ours.setblocking(False)
    ours.sendall(stream[9:])
    n.poll(3)
    assert n.recv_all(1, 10) == b"SERVERINFO"
    got = frames_of(n.recv_all(0, 2 * (5 + 32) + 11))
    assert got == [(5, key(5) + b"first"), (5, key(5) + b"second")]


def test_sender_disconnecting_mid_frame_is_reported_and_nothing_half_is_forwarded(net) -> None:
    n = net(2)
    whole = codec.encode_send_packet(key(1), b"whole")
    half = codec.encode_send_packet(key(1), b"x" * 1000)[:500]
    n.sock[0].sendall(whole + half)
    n.sock[0].close()
    n.poll(3)
    assert frames_of(n.recv_all(1, 5 + 32 + 5)) == [(5, key(0) + b"whole")]
    [(cid, why)] = [(c, d) for c, k, d in n.events if k == EV_CLOSED]
    assert cid == n.ids[0] and why == b"eof mid-frame"
    n.loop.remove(cid)
    with pytest.raises(KeyError):
        n.loop.remove(cid)  # ids are not reused while stale
    assert n.loop.stats()["conns"] == 1
    time.sleep(0.05)
    assert n.recv_all(1, 1, timeout=0.05) == b""  # nothing more, no half frame


def test_removal_counts_queued_packets_as_gone_and_stale_ids_are_refused(net) -> None:
    n = net(2)
    n.sock[1].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    n.loop.deliver(n.ids[1], key(0), b"a" * 100)
    for _ in range(3000):  # more than any socket buffer holds: the rest stays queued in the loop
        n.loop.deliver(n.ids[1], key(0), b"p" * 1000)
    n.loop.flush()
    queued = n.loop.queue_bytes(n.ids[1])
    assert queued > 0
    n.loop.remove(n.ids[1])
    gone = n.loop.stats()["dropped"][("gone_disconnected", "other")]
    assert gone[0] > 0 and gone[1] <= queued
    with pytest.raises(KeyError):
        n.loop.write(n.ids[1], b"x")
    cid = n.add(key(1))
    assert cid != n.ids[1] and (cid & 0xFFFFFFFF) == (n.ids[1] & 0xFFFFFFFF)  # slot reused, new generation


def test_destination_that_never_reads_pauses_its_sender_without_loss_until_the_write_timeout(net) -> None:
    bound = 256 << 10
    n = net(3, bound=bound, write_timeout=0.5)
    sink, src, other = n.ids
    n.sock[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # never read
    pkt = b"q" * 1200
    frame = codec.encode_send_packet(key(0), pkt)
    sent = 0
    start = time.monotonic()
    paused_seen = False
    while time.monotonic() - start < 0.3:
        try:
            sent += n.sock[1].send(frame * 64) // len(frame)  # whole frames only, for the count below
        except BlockingIOError:
            pass
        n.poll()
        info = n.loop.conn_info(src)
        paused_seen |= info["paused"]
        assert n.loop.queue_bytes(sink) <= bound + len(frame)  # memory per client is bounded
    assert paused_seen, "the sender was never paused"
    st_ = n.loop.stats()
    assert st_["sender_pauses"] > 0
    assert sum(p for p, _ in st_["dropped"].values()) == 0  # backpressure, not loss
    # others are not held up by the stalled destination
    n.sock[2].sendall(codec.encode_send_packet(key(2), b"self"))
    assert frames_of(n.recv_all(2, 5 + 32 + 4)) == [(5, key(2) + b"self")]
    # past the write timeout: queued packets go, counted at the head, and the loop says so
    deadline = time.monotonic() + 3
    while not any(k == EV_WRITE_TIMEOUT for _, k, _ in n.events) and time.monotonic() < deadline:
        n.poll()
        time.sleep(0.01)
    assert [(c, k) for c, k, _ in n.events if k == EV_WRITE_TIMEOUT] == [(sink, EV_WRITE_TIMEOUT)]
    dropped = n.loop.stats()["dropped"][("queue_head", "other")]
    assert dropped[0] > 0 and dropped[1] == dropped[0] * len(pkt)
    assert not n.loop.conn_info(src)["paused"]  # the sender reads again


def test_slow_reader_gets_everything_in_order_while_the_sender_is_paused(net) -> None:
    n = net(2, bound=64 << 10, write_timeout=5.0)
    n.sock[1].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    pkts = [i.to_bytes(4, "big") * 300 for i in range(3000)]
    stream = b"".join(codec.encode_send_packet(key(1), p) for p in pkts)
    want = sum(5 + 32 + len(p) for p in pkts)
    got = bytearray()
    off = 0
    deadline = time.monotonic() + 30
    while len(got) < want and time.monotonic() < deadline:
        if off < len(stream):
            try:
                off += n.sock[0].send(stream[off : off + 65536])
            except BlockingIOError:
                pass
        n.poll()
        try:
            got += n.sock[1].recv(4096)  # slowly
        except BlockingIOError:
            pass
    assert [p[32:] for _, p in frames_of(bytes(got))] == pkts
    assert n.loop.stats()["sender_pauses"] > 0
    assert sum(p for p, _ in n.loop.stats()["dropped"].values()) == 0


def test_pause_reading_and_active_notification(net) -> None:
    n = net(2)
    n.loop.set_reading(n.ids[0], False)
    n.sock[0].sendall(codec.encode_send_packet(key(1), b"held"))
    n.poll(2)
    assert n.recv_all(1, 1, timeout=0.05) == b""
    n.loop.set_notify_active(n.ids[0], True)
    n.loop.set_reading(n.ids[0], True)
    assert frames_of(n.recv_all(1, 5 + 32 + 4)) == [(5, key(0) + b"held")]
    assert [c for c, k, _ in n.events if k == EV_ACTIVE] == [n.ids[0]]
    n.loop.unroute(key(1))
    n.sock[0].sendall(codec.encode_send_packet(key(1), b"now up"))
    n.poll(2)
    assert [d for _, k, d in n.events if k == codec.FrameType.SEND_PACKET] == [codec.encode_send_packet(key(1), b"now up")]


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _clients_process(port: int, count: int) -> int:
    """Child: `count` TCP clients; client i says its number, sends one packet to client i+1, and must
    receive exactly client i-1's packet."""
    socks = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(i.to_bytes(4, "big"))
        socks.append(s)
    for s in socks:
        s.recv(1)  # the relay's go-ahead: every client is in the loop
    for i, s in enumerate(socks):
        s.sendall(codec.encode_send_packet(key((i + 1) % count), i.to_bytes(4, "big")))
    want = 5 + 32 + 4
    for i, s in enumerate(socks):
        s.settimeout(30)
        data = b""
        while len(data) < want:
            chunk = s.recv(want - len(data))
            if not chunk:
                return 2
            data += chunk
        src = (i - 1) % count
        if frames_of(data) != [(5, key(src) + src.to_bytes(4, "big"))]:
            return 3
    return 0


def test_ten_thousand_clients_each_send_to_the_next() -> None:
    """10,000 loopback TCP clients in one loop (the clients live in a child process: each side needs
    10,000 descriptors)."""
    count = 10_000
    _raise_nofile(count + 200)
    lst = socket.create_server(("127.0.0.1", 0), backlog=4096)
    port = lst.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        code = 1
        try:
            lst.close()
            code = _clients_process(port, count)
        finally:
            os._exit(code)
    loop = Loop()
    try:
        ids = []
        for _ in range(count):
            conn, _ = lst.accept()
            i = int.from_bytes(conn.recv(4, socket.MSG_WAITALL), "big")
            cid = loop.add(conn.detach(), key(i))
            loop.route(key(i), cid)
            ids.append(cid)
        assert loop.stats()["conns"] == count
        for cid in ids:
            loop.write(cid, b"!")
        loop.flush()
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:
            loop.poll()
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.001)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the clients did not get their packets in time")
        assert os.waitstatus_to_exitcode(status) == 0
        st_ = loop.stats()
        assert st_["packets_sent"] == st_["packets_received"] == count
        for cid in ids[: count // 2]:
            loop.remove(cid)
        assert loop.stats()["conns"] == count // 2 and loop.stats()["routes"] == count // 2
    finally:
        loop.close()
        lst.close()


_frame = st.one_of(
    st.binary(max_size=300).map(lambda p: ("send", codec.encode_send_packet(key(1), p))),
    st.binary(max_size=300).map(lambda p: ("up", codec.encode_send_packet(key(9), p))),
    st.binary(min_size=8, max_size=8).map(lambda p: ("up", codec.encode_ping(p))),
    st.booleans().map(lambda b: ("up", codec.encode_note_preferred(b))),
    st.just(("up", codec.encode_keep_alive())),
    st.binary(max_size=50).map(lambda p: ("up", codec.encode_frame(0x60, p))),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_frame, max_size=30), st.lists(st.integers(1, 400), min_size=1, max_size=20))
def test_any_split_gives_what_the_python_parser_gives(frames: list[tuple[str, bytes]], cuts: list[int]) -> None:
    """Reference: the pure-Python ServerConnection sees the same frames in the same order; the C loop
    forwards the ones to a routed key and hands the rest up byte for byte."""
    stream = b"".join(f for _, f in frames)
    ref, rec, _ = authenticated()
    ref.receive_data(stream)

    n = Net(2)
    try:
        off, i = 0, 0
        while off < len(stream):
            step = cuts[i % len(cuts)]
            n.sock[0].sendall(stream[off : off + step])
            off += step
            i += 1
            n.poll()
        n.poll(2)
        forwarded = [f for kind, f in frames if kind == "send"]
        got = frames_of(n.recv_all(1, sum(len(f) for f in forwarded)))
        assert [p[32:] for _, p in got] == [f[37:] for f in forwarded]
        assert handed_up(n.events) == b"".join(f for kind, f in frames if kind == "up")
        # and what the reference parser saw is the same sequence of frames
        ref_sends = [(e[1], e[2]) for e in rec.events if e[0] == "send"]
        assert ref_sends == [(f[5:37], f[37:]) for kind, f in frames if f[0] == codec.FrameType.SEND_PACKET]
    finally:
        n.close()


# ---------------------------------------------------------------------------------------------------
# The relay with the plane in use


def test_app_clients_are_handed_to_the_c_loop_and_exchange_without_loss() -> None:
    async def main() -> None:
        async with relay() as (server, url):
            assert server.fast is not None
            a, b = DerpClient(), DerpClient()
            await a.connect(url)
            await b.connect(url)
            await until(lambda: server.fast.handovers == 2, "both sockets in the C loop")
            await exchange(a, b, 20_000)
            await exchange(b, a, 1_000)
            rtt = await a.ping(timeout=2)  # Ping handed up, Pong written by the C loop
            assert rtt < 2
            assert server.metrics.packets_sent == server.metrics.packets_received == 21_000
            assert server.metrics.total_dropped() == 0
            text = server.render_metrics()
            assert b"derp_packets_sent 21000" in text and b"turbowg_fastpath_connections 2.0" in text
            assert b"turbowg_fastpath_handovers 2" in text and b"turbowg_fastpath_tls_connections 0.0" in text
            await a.close()
            await b.close()
            await until(lambda: server.conns == set() and server.fast.conns == {}, "both gone")

    run(main)


def test_app_frames_pipelined_behind_client_info_are_not_lost_in_the_handover() -> None:
    async def main() -> None:
        async with relay() as (server, url):
            b = DerpClient()
            await b.connect(url)
            reader, writer = await raw_upgrade(url)
            proto = ClientConnection(keys.generate_private_key())
            proto.receive_data(await reader.readexactly(45))
            # ClientInfo, then packets in the same write, the last one split: some are parsed by Python
            # before the handover, the rest by the C loop from the bytes Python had buffered
            stream = proto.data_to_send() + b"".join(codec.encode_send_packet(b.public_key, bytes([i]) * 200)
                                                     for i in range(100))
            writer.write(stream[:-100])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(stream[-100:])
            got = []
            while len(got) < 100:
                for m in await b.recv_many():
                    if isinstance(m, codec.ReceivedPacket):
                        got.append(m.data)
            assert got == [bytes([i]) * 200 for i in range(100)]
            assert server.fast.handovers == 2
            writer.close()
            await b.close()

    run(main)


def test_app_never_reading_client_pauses_sender_then_times_out() -> None:
    async def main() -> None:
        async with relay(write_timeout=1.0) as (server, url):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            sock.connect(("127.0.0.1", port))
            r, w = await asyncio.open_connection(sock=sock)
            w.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n")
            await r.readuntil(b"\r\n\r\n")
            proto = ClientConnection(keys.generate_private_key())
            proto.receive_data(await r.readexactly(45))
            w.write(proto.data_to_send())
            await r.readexactly(5 + 24 + 16 + 13)
            stalled = proto.public_key
            w.transport.pause_reading()

            flood, a, b = DerpClient(), DerpClient(), DerpClient()
            for c in (flood, a, b):
                await c.connect(url)
            flood.send_many(stalled, [bytes(1200)] * 10_000)  # 12 MB: more than the socket buffers + the bound
            await until(lambda: server.fast.stats()["sender_pauses"] > 0, "the flood's sender to be paused")
            server.sync_metrics()
            assert server.metrics.total_dropped() == 0 and server.metrics.write_timeouts == 0
            assert server.fast.queue_bytes(server.clients[stalled]) <= fastpath.QUEUE_BOUND + 1300
            await exchange(a, b, 300)  # the other pair flows while the flood's sender is paused
            assert b"turbowg_fastpath_sender_pauses 0" not in server.render_metrics()
            await until(lambda: stalled not in server.clients, "the stalled client to be closed", timeout=10)
            assert server.metrics.write_timeouts == 1
            server.sync_metrics()
            assert server.metrics.dropped("queue_head") > 0
            await exchange(a, b, 100)
            w.close()
            for c in (flood, a, b):
                await c.close()

    run(main)


@pytest.mark.parametrize("tls_in_c", [True, False], ids=["tls-in-c", "tls-in-python"])
def test_app_peer_gone_duplicates_and_a_tls_client_talking_to_a_c_client(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tls_in_c: bool) -> None:
    monkeypatch.setattr(fastpath, "TLS_IN_C", tls_in_c)

    async def main() -> None:
        async with relay() as (server, url):
            a, b = DerpClient(), DerpClient()
            await a.connect(url)
            await b.connect(url)
            a.send(b.public_key, b"hello")
            assert await b.recv() == codec.ReceivedPacket(a.public_key, b"hello")
            await a.close()
            assert await asyncio.wait_for(b.recv(), 5) == codec.PeerGone(a.public_key,
                                                                          codec.PeerGoneReason.DISCONNECTED)
            # duplicates: the newest connection gets traffic, then whichever last sent something
            b2 = DerpClient(b.private_key)
            await b2.connect(url)
            c = DerpClient()
            await c.connect(url)
            await until(lambda: server.dup_conn_count() == 2, "the duplicate registered")
            c.send(b.public_key, b"to newest")
            assert await asyncio.wait_for(b2.recv(), 5) == codec.ReceivedPacket(c.public_key, b"to newest")
            b.send(c.public_key, b"b speaks")
            assert await asyncio.wait_for(c.recv(), 5) == codec.ReceivedPacket(b.public_key, b"b speaks")
            await until(lambda: server.clients[b.public_key].fid is not None
                        and server.fast.c.conn_info(server.clients[b.public_key].fid)["fd"] >= 0, "routing")
            c.send(b.public_key, b"to last writer")
            assert await asyncio.wait_for(b.recv(), 5) == codec.ReceivedPacket(c.public_key, b"to last writer")
            for x in (b, b2, c):
                await x.close()

        tls = server_tls(tmp_path)
        async with relay(tls) as (server2, turl):
            # a second listener, without TLS, on the same server
            loop = asyncio.get_running_loop()
            lst = await loop.create_server(lambda: RelayHTTPProtocol(server2), "127.0.0.1", 0)
            plain_port = lst.sockets[0].getsockname()[1]
            t, p = DerpClient(), DerpClient()
            await t.connect(turl, verify=False)
            await p.connect(f"http://127.0.0.1:{plain_port}/derp")
            # the TLS client is in the C loop too (OpenSSL from C), unless TLS is kept in Python
            await until(lambda: server2.fast.handovers == (2 if tls_in_c else 1), "the clients in the C loop")
            assert server2.fast.tls_handovers == (1 if tls_in_c else 0)
            await exchange(t, p, 2000)  # TLS conn -> plain conn (C to C, or Python conn -> C conn: deliver)
            await exchange(p, t, 2000)  # plain conn -> TLS conn (C to C, or handed up, routed by Python)
            assert server2.metrics.total_dropped() == 0
            await t.close()
            await p.close()
            lst.close()

    run(main)


def test_relay_tests_pass_on_the_python_path_too() -> None:
    """A representative subset of the relay's tests with TURBOWG_NO_C=1 (the default run covers the C path)."""
    env = dict(os.environ, TURBOWG_NO_C="1")
    tests = Path(__file__).parent
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(tests / "test_relay_app.py"), str(tests / "test_relay_server.py"),
         "-k", "100k or peer_gone or hostile or never_reads or thousand or mesh_client or duplicate or pings"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tests.parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def test_app_websocket_client_stays_in_python_and_talks_to_a_c_client() -> None:
    async def main() -> None:
        async with relay() as (server, url):
            ws, p = DerpClient(), DerpClient()
            await ws.connect(url.replace("http://", "ws://"))
            await p.connect(url, fast_start=True)
            await until(lambda: len(server.clients) == 2, "both registered")
            assert server.fast.handovers == 1  # the WebSocket's bytes are not plain DERP: not handed over
            await exchange(ws, p, 1000)
            await exchange(p, ws, 1000)
            await ws.close()
            await p.close()

    run(main)


def test_handover_on_the_default_asyncio_loop_too() -> None:
    """asyncio's own transport gives the socket up as cleanly as uvloop's (no FIN, no RST on the dup)."""
    async def main() -> None:
        async with relay() as (server, url):
            a, b = DerpClient(), DerpClient()
            await a.connect(url)
            await b.connect(url)
            await until(lambda: server.fast.handovers == 2, "both sockets in the C loop")
            await exchange(a, b, 5000)
            assert await a.ping(timeout=2) < 2
            await a.close()
            await b.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_average_queue_duration_is_kept_by_the_c_loop_too(net) -> None:
    n = net(2)
    n.sock[1].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for i in range(2000):
        n.loop.deliver(n.ids[1], key(0), i.to_bytes(4, "big") * 250)
    n.loop.flush()
    time.sleep(0.1)  # the reader is away: what is still queued waits
    first = n.sock[1].recv(1 << 20)
    n.poll()  # writable again: the packets written now waited ~100 ms
    assert n.loop.stats()["avg_queue_ms"] > 5
    rest = n.recv_all(1, 2000 * (5 + 32 + 1000) - len(first), timeout=10)
    got = frames_of(first + rest)
    assert [p[32:36] for _, p in got] == [i.to_bytes(4, "big") for i in range(2000)]
    # an EWMA per packet: the packets that then flowed without waiting pull it back down
    assert n.loop.stats()["avg_queue_ms"] < 5
