"""Cross-shard forwarding in C: the channel between two sibling shards owned by their C loops (_fastpath.c).

First two C loops alone, joined by a socketpair channel as the supervisor joins two workers, with clients on
socketpairs: packets both ways without anything handed up, a full channel pausing the senders (memory
bounded, no loss once the sibling reads again), a receiver that does not read pausing -- through XOFF/XON
records -- only the senders of its key, the sibling going away. Then two DerpServers, each with its C plane,
joined the same way through ShardPeer.attach_c and served over real sockets: exchange both ways without a
packet crossing in Python, a key moving between the shards, and the sibling shard going away (its keys
unrouted, PeerGone to the clients that heard from them). Last, mesh ForwardPacket through the same C
mechanism: from a mesh peer's connection to a local client and on to the sibling shard, never from a plain
client; and two meshed relays whose inbound ForwardPacket frames are delivered in C. The asyncio channel
(TURBOWG_NO_C=1) is covered by test_relay_shards.py, which runs on both paths.
"""

from __future__ import annotations

import asyncio
import socket
import time
from contextlib import AsyncExitStack

import pytest

from turbowg.derp import codec, keys
from turbowg.derp.client import DerpClient
from turbowg.derp.codec import PeerGone, ReceivedPacket
from turbowg.relay import fastpath
from turbowg.relay.mesh import start_mesh
from turbowg.relay.server import DerpServer
from turbowg.relay.shards.peer import ShardPeer
from turbowg.testing.relay import exchange, relay, run, until

pytestmark = pytest.mark.skipif(not fastpath.HAVE_C, reason="turbowg.relay._fastpath not built or TURBOWG_NO_C set")

if fastpath.HAVE_C:
    from turbowg.relay._fastpath import EV_CLOSED, EV_RECORDS, Loop

LABEL = bytes(32)


def key(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


def send_frame(dst: bytes, packet: bytes) -> bytes:
    return bytes([codec.FrameType.SEND_PACKET]) + (32 + len(packet)).to_bytes(4, "big") + dst + packet


def recv_packets(data: bytes) -> list[tuple[bytes, bytes]]:
    """(src, packet) of every RecvPacket frame in `data` (which must end on a frame boundary)."""
    out, off = [], 0
    while off + 5 <= len(data):
        t, n = data[off], int.from_bytes(data[off + 1 : off + 5], "big")
        assert t == codec.FrameType.RECV_PACKET, t
        out.append((data[off + 5 : off + 37], data[off + 37 : off + 5 + n]))
        off += 5 + n
    assert off == len(data), "a partial frame at the end"
    return out


class Pair:
    """Shard A and shard B: two C loops joined by a channel; clients on socketpairs (`sock[name]` is ours)."""

    def __init__(self, bound: int = 256 << 10, write_timeout: float = 30.0) -> None:
        self.loops = {"A": Loop(bound=bound, write_timeout=write_timeout),
                      "B": Loop(bound=bound, write_timeout=write_timeout)}
        a, b = socket.socketpair()
        for end in (a, b):  # small kernel buffers: the tests fill the channel quickly
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        self.chan = {"A": self.loops["A"].add(a.detach(), LABEL, channel=1),
                     "B": self.loops["B"].add(b.detach(), LABEL, channel=0)}
        self.sock: dict[str, socket.socket] = {}
        self.ids: dict[str, int] = {}
        self.where: dict[str, str] = {}
        self.events: dict[str, list[tuple[int, int, bytes]]] = {"A": [], "B": []}
        self.polling = {"A": True, "B": True}

    def client(self, name: str, shard: str, k: bytes) -> None:
        """A client with key k on `shard`; the other shard routes k to its channel (as after PRESENT)."""
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        loop = self.loops[shard]
        cid = loop.add(theirs.detach(), k)
        loop.route(k, cid)
        other = "B" if shard == "A" else "A"
        self.loops[other].route(k, self.chan[other])
        self.sock[name], self.ids[name], self.where[name] = ours, cid, shard

    def poll(self, times: int = 1) -> None:
        for _ in range(times):
            for s, loop in self.loops.items():
                if self.polling[s]:
                    self.events[s] += loop.poll()

    def info(self, name: str) -> dict[str, object]:
        return self.loops[self.where[name]].conn_info(self.ids[name])

    def read(self, name: str) -> bytes:
        try:
            return self.sock[name].recv(1 << 20)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        for loop in self.loops.values():
            loop.close()
        for s in self.sock.values():
            s.close()


@pytest.fixture
def pair():
    made: list[Pair] = []

    def make(**kw: object) -> Pair:
        made.append(Pair(**kw))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for p in made:
        p.close()


def receive(p: Pair, name: str, want: int, timeout: float = 10.0) -> list[tuple[bytes, bytes]]:
    buf = b""
    got: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        p.poll()
        chunk = p.read(name)
        if not chunk:
            time.sleep(0.0005)
            continue
        buf += chunk
        # keep only whole frames
        off = 0
        while off + 5 <= len(buf) and off + 5 + int.from_bytes(buf[off + 1 : off + 5], "big") <= len(buf):
            off += 5 + int.from_bytes(buf[off + 1 : off + 5], "big")
        got += recv_packets(buf[:off])
        buf = buf[off:]
    return got


# ---------------------------------------------------------------------------------------------------
# two C loops


def test_packets_cross_the_channel_both_ways_in_c_without_anything_handed_up(pair) -> None:
    p = pair()
    p.client("x", "A", key(1))
    p.client("y", "B", key(2))
    pkts = [bytes([i % 251]) * (1 + (i * 37) % 1400) for i in range(300)]
    p.sock["x"].sendall(b"".join(send_frame(key(2), pk) for pk in pkts))
    p.sock["y"].sendall(b"".join(send_frame(key(1), pk) for pk in pkts[:100]))
    assert receive(p, "y", 300) == [(key(1), pk) for pk in pkts]
    assert receive(p, "x", 100) == [(key(2), pk) for pk in pkts[:100]]
    for s in "AB":
        assert not [e for e in p.events[s] if e[1] < 256 or e[1] == EV_RECORDS], p.events[s]
    a, b = p.loops["A"].stats(), p.loops["B"].stats()
    assert (a["packets_forwarded_out"], b["packets_forwarded_in"]) == (300, 300)
    assert (b["packets_forwarded_out"], a["packets_forwarded_in"]) == (100, 100)
    assert p.loops["A"].conn_info(p.chan["A"])["records_out"] == 300
    # the receiving shard reports each new source once (for PeerGone), keyed by the source's key
    deliveries = [e for e in p.events["B"] if e[1] == fastpath.EV_DELIVERY]
    assert deliveries == [(p.ids["y"], fastpath.EV_DELIVERY, key(1))]


def test_unrouted_keys_and_announcements_go_up_as_records_and_python_forward_queues_a_record(pair) -> None:
    p = pair()
    p.client("x", "A", key(1))
    ch_b = p.chan["B"]
    # B knows no client with key 9: the record goes up whole, for Python (a TLS client, or a drop)
    p.loops["A"].route(key(9), p.chan["A"])
    p.sock["x"].sendall(send_frame(key(9), b"hello"))
    # Python on A forwards for a sender it holds, and announces a key
    assert p.loops["A"].forward(p.chan["A"], key(5), key(9), b"from python", 1 << 20) > 0
    p.loops["A"].write(p.chan["A"], (32).to_bytes(4, "big") + bytes([2]) + key(7))
    p.loops["A"].flush()
    deadline = time.monotonic() + 5
    up = b""
    while len(up) < 2 * (5 + 64) + 5 + 11 + 37 and time.monotonic() < deadline:
        p.poll()
        up = b"".join(d for c, k, d in p.events["B"] if k == EV_RECORDS and c == ch_b)
    records, off = [], 0
    while off < len(up):
        n = int.from_bytes(up[off : off + 4], "big")
        records.append(up[off : off + 5 + n])
        off += 5 + n
    assert sorted(records) == sorted([(64 + 5).to_bytes(4, "big") + b"\x01" + key(1) + key(9) + b"hello",
                                      (64 + 11).to_bytes(4, "big") + b"\x01" + key(5) + key(9) + b"from python",
                                      (32).to_bytes(4, "big") + b"\x02" + key(7)])
    assert p.loops["A"].forward(p.chan["A"], key(5), key(9), b"x", 0) == 70  # nothing queued yet: taken
    assert p.loops["A"].forward(p.chan["A"], key(5), key(9), b"x", 0) == -1  # over the limit: dropped
    with pytest.raises(ValueError):
        p.loops["A"].deliver(p.chan["A"], key(5), b"x")


def test_full_channel_pauses_the_senders_then_everything_arrives_in_order(pair) -> None:
    bound = 256 << 10
    p = pair(bound=bound)
    p.client("x", "A", key(1))
    p.client("y", "B", key(2))
    p.polling["B"] = False  # shard B is busy: it does not read the channel
    pkt = bytes(1200)
    frames = [send_frame(key(2), i.to_bytes(4, "big") + pkt) for i in range(4000)]  # ~4.9 MB
    data = b"".join(frames)
    sent = 0
    paused = False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not paused:
        try:
            sent += p.sock["x"].send(data[sent : sent + (256 << 10)])
        except BlockingIOError:
            pass
        p.poll()
        paused = bool(p.info("x")["paused"])
    assert paused, "the sender was not paused by the full channel"
    chan = p.loops["A"].conn_info(p.chan["A"])
    assert chan["queue_bytes"] <= bound + 5 + 64 + 1204  # memory bound: at most one record past the bound
    assert not p.info("x")["reading"]
    assert p.loops["A"].stats()["sender_pauses"] >= 1
    # B reads again: all packets arrive, in order, none dropped; the sender is resumed
    p.polling["B"] = True
    got: list[tuple[bytes, bytes]] = []
    buf = b""
    deadline = time.monotonic() + 20
    while len(got) < len(frames) and time.monotonic() < deadline:
        if sent < len(data):
            try:
                sent += p.sock["x"].send(data[sent : sent + (256 << 10)])
            except BlockingIOError:
                pass
        p.poll()
        chunk = p.read("y")
        buf += chunk
        off = 0
        while off + 5 <= len(buf) and off + 5 + int.from_bytes(buf[off + 1 : off + 5], "big") <= len(buf):
            off += 5 + int.from_bytes(buf[off + 1 : off + 5], "big")
        got += recv_packets(buf[:off])
        buf = buf[off:]
    assert [int.from_bytes(pk[:4], "big") for _, pk in got] == list(range(len(frames)))
    for loop in p.loops.values():
        assert sum(n for n, _ in loop.stats()["dropped"].values()) == 0


def test_a_receiver_that_does_not_read_pauses_only_the_senders_of_its_key(pair) -> None:
    bound = 256 << 10
    p = pair(bound=bound)
    p.client("x", "A", key(1))  # sends to the stuck receiver
    p.client("z", "A", key(3))  # sends to a receiver that reads, through the same channel
    p.client("y", "B", key(2))  # never reads
    p.client("w", "B", key(4))
    for s in (p.sock["y"],):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    big = send_frame(key(2), bytes(1200)) * 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not p.info("x")["xoff_paused"]:
        try:
            p.sock["x"].send(big)
        except BlockingIOError:
            pass
        p.poll()
    assert p.info("x")["xoff_paused"], "the sender of the stuck key was not paused by XOFF"
    assert p.loops["B"].stats()["xoffs_sent"] >= 1 and p.info("y")["xoff_mask"] == 1 << 0
    assert p.loops["A"].conn_info(p.chan["A"])["queue_bytes"] < bound  # not the channel: the key is full
    queued_y = p.info("y")["queue_bytes"]
    assert bound <= queued_y <= fastpath.QUEUE_BOUND * 4  # bounded
    # the other flow through the same channel is not held up
    z_pkts = [i.to_bytes(4, "big") * 100 for i in range(500)]
    p.sock["z"].sendall(b"".join(send_frame(key(4), pk) for pk in z_pkts))
    assert receive(p, "w", 500) == [(key(3), pk) for pk in z_pkts]
    # the receiver reads: XON, the sender goes on; nothing was dropped
    drained = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and p.info("x")["xoff_paused"]:
        p.poll()
        drained += len(p.read("y"))
    assert not p.info("x")["xoff_paused"] and drained > 0
    assert p.loops["A"].stats()["xoff_pauses"] >= 1
    for loop in p.loops.values():
        assert sum(n for n, _ in loop.stats()["dropped"].values()) == 0


def test_a_receiver_leaving_while_its_key_is_xoff_releases_the_senders(pair) -> None:
    p = pair(bound=64 << 10)
    p.client("x", "A", key(1))
    p.client("y", "B", key(2))
    p.sock["y"].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
    big = send_frame(key(2), bytes(1000)) * 100
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not p.info("x")["xoff_paused"]:
        try:
            p.sock["x"].send(big)
        except BlockingIOError:
            pass
        p.poll()
    assert p.info("x")["xoff_paused"]
    p.loops["B"].remove(p.ids["y"])  # y disconnects: its queued packets are gone, the XON is owed anyway
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and p.info("x")["xoff_paused"]:
        p.poll()
    assert not p.info("x")["xoff_paused"], "the sender stayed paused for a receiver that left"
    # what x sends now reaches B, which no longer holds key(2): handed up there (Python: unknown destination)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not [e for e in p.events["B"] if e[1] == EV_RECORDS]:
        p.poll()
    assert [e for e in p.events["B"] if e[1] == EV_RECORDS]
    assert p.loops["B"].stats()["dropped"][("gone_disconnected", "other")][0] > 0


def test_sibling_going_away_closes_the_channel_and_wakes_its_waiting_senders(pair) -> None:
    p = pair(bound=64 << 10)
    p.client("x", "A", key(1))
    p.client("y", "B", key(2))
    p.polling["B"] = False
    frame = send_frame(key(2), bytes(1000))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not p.info("x")["paused"]:
        try:
            p.sock["x"].send(frame * 100)
        except BlockingIOError:
            pass
        p.poll()
    assert p.info("x")["paused"]
    p.loops["B"].close()  # shard B dies: its end of the channel closes
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(e[1] == EV_CLOSED for e in p.events["A"]):
        p.poll()
    assert [e for e in p.events["A"] if e[1] == EV_CLOSED and e[0] == p.chan["A"]]
    assert p.info("x")["paused"] is False  # woken: its next frames are for a dead channel
    p.loops["A"].remove(p.chan["A"])  # what FastPlane does on EV_CLOSED: every route to the channel goes
    assert p.loops["A"].stats()["routes"] == 1  # key(1) only
    p.events["A"].clear()
    p.sock["x"].send(send_frame(key(2), b"after"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not p.events["A"]:
        p.poll()
    up = b"".join(d for c, k, d in p.events["A"] if k < 256)
    assert up.endswith(send_frame(key(2), b"after"))  # handed up: Python says unknown destination


# ---------------------------------------------------------------------------------------------------
# two DerpServers joined by a C channel, clients over real sockets


async def _two_shards(stack: AsyncExitStack) -> tuple[dict[str, DerpServer], dict[str, str], dict[str, ShardPeer]]:
    servers, urls, peers = {}, {}, {}
    for name in "AB":
        servers[name], urls[name] = await stack.enter_async_context(relay())
        assert servers[name].fast is not None
    a, b = socket.socketpair()
    for name, sock, other in (("A", a, 1), ("B", b, 0)):
        peer = ShardPeer(servers[name], other)
        peer.attach_c(servers[name].fast, sock)  # type: ignore[arg-type]
        peers[name] = peer
        servers[name].add_conn_listener(lambda k, present, peer=peer: peer.announce(k, present))
    return servers, urls, peers


def test_servers_exchange_across_a_c_channel_and_python_sees_no_packet() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            servers, urls, peers = await _two_shards(stack)
            x, y = DerpClient(), DerpClient()
            await x.connect(urls["A"])
            await y.connect(urls["B"])
            stack.push_async_callback(x.close)
            stack.push_async_callback(y.close)
            await until(lambda: y.public_key in peers["A"].remote_keys and x.public_key in peers["B"].remote_keys,
                        "announcements")
            await until(lambda: x.public_key in servers["A"].clients and servers["A"].clients[x.public_key].fid
                        is not None, "handover")  # type: ignore[attr-defined]
            await exchange(x, y, 2000)
            await exchange(y, x, 500)
            a, b = servers["A"].fast.stats(), servers["B"].fast.stats()  # type: ignore[union-attr]
            assert a["packets_forwarded_out"] >= 2000 and b["packets_forwarded_in"] >= 2000
            assert peers["A"]._py_packets_in == peers["B"]._py_packets_in == 0  # no PACKET crossed in Python
            servers["A"].sync_metrics()
            assert servers["A"].metrics.packets_forwarded_out >= 2000
            assert peers["B"].sync_counters().packets_in >= 2000

    run(main)


def test_a_key_moving_between_shards_is_reached_where_it_is_now() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            servers, urls, peers = await _two_shards(stack)
            x = DerpClient()
            await x.connect(urls["A"])
            stack.push_async_callback(x.close)
            k = DerpClient()
            priv = k.private_key
            pub = k.public_key
            for shard in ("B", "A", "B"):
                k = DerpClient(priv)
                await k.connect(urls[shard])
                here = servers[shard]
                await until(lambda here=here: pub in here.clients, "registration")
                if shard == "B":  # x on A reaches k through the channel, in C
                    await until(lambda: pub in peers["A"].remote_keys, "announcement")
                else:
                    await until(lambda: pub not in peers["A"].remote_keys, "GONE on A")
                await exchange(x, k, 300)
                await k.close()
                await until(lambda here=here: pub not in here.clients, "unregistration")
            assert servers["B"].fast.stats()["packets_forwarded_in"] >= 600  # type: ignore[union-attr]

    run(main)


def test_sibling_going_away_unroutes_its_keys_and_sends_peer_gone() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            servers, urls, peers = await _two_shards(stack)
            x, y = DerpClient(), DerpClient()
            await x.connect(urls["A"])
            await y.connect(urls["B"])
            stack.push_async_callback(x.close)
            stack.push_async_callback(y.close)
            await until(lambda: y.public_key in peers["A"].remote_keys, "announcement")
            y.send(x.public_key, b"hello from B")  # x hears from y: x is owed a PeerGone when y goes
            async with asyncio.timeout(5):
                while True:
                    msg = await x.recv()
                    if isinstance(msg, ReceivedPacket):
                        assert msg == ReceivedPacket(y.public_key, b"hello from B")
                        break
            peers["B"].close()  # shard B goes away (its channel end closes)
            async with asyncio.timeout(5):
                while True:
                    msg = await x.recv()
                    if isinstance(msg, PeerGone):
                        assert msg.peer == y.public_key
                        break
            assert not peers["A"].remote_keys and peers["A"].c_channel is None
            assert servers["A"].fast.stats()["routes"] == 1  # type: ignore[union-attr]
            before = servers["A"].metrics.packets_dropped.copy()
            x.send(y.public_key, b"to nowhere")
            await until(lambda: servers["A"].metrics.packets_dropped != before, "unknown-destination drop")
            assert not peers["A"].forward_packet(x.public_key, y.public_key, b"x")

    run(main)


# ---------------------------------------------------------------------------------------------------
# mesh ForwardPacket through the same mechanism


def forward_frame(src: bytes, dst: bytes, packet: bytes) -> bytes:
    return bytes([codec.FrameType.FORWARD_PACKET]) + (64 + len(packet)).to_bytes(4, "big") + src + dst + packet


def test_mesh_forward_packets_are_delivered_locally_and_to_the_sibling_in_c(pair) -> None:
    p = pair()
    p.client("m", "A", key(100))  # a mesh peer relay's connection to shard A
    p.client("n", "A", key(101))  # a plain client: its ForwardPacket is not C's to deliver
    p.client("x", "A", key(1))
    p.client("y", "B", key(2))
    p.loops["A"].set_mesh(p.ids["m"], 10.0)
    src = key(77)  # a client of the other relay
    p.sock["m"].sendall(forward_frame(src, key(1), b"local") + forward_frame(src, key(2), b"sibling")
                        + forward_frame(src, key(55), b"unknown"))
    assert receive(p, "x", 1) == [(src, b"local")]
    assert receive(p, "y", 1) == [(src, b"sibling")]  # the last hop either way
    p.poll(3)
    up_m = b"".join(d for c, k, d in p.events["A"] if k < 256 and c == p.ids["m"])
    assert up_m == forward_frame(src, key(55), b"unknown")  # Python: unknown destination on forward
    p.sock["n"].sendall(forward_frame(src, key(1), b"not a mesh peer"))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not [e for e in p.events["A"] if e[0] == p.ids["n"] and e[1] < 256]:
        p.poll()
    up_n = b"".join(d for c, k, d in p.events["A"] if k < 256 and c == p.ids["n"])
    assert up_n == forward_frame(src, key(1), b"not a mesh peer")  # handed up: Python refuses it
    a = p.loops["A"].stats()
    assert a["packets_forwarded_in"] == 2 and a["packets_forwarded_out"] == 1
    assert [e for e in p.events["A"] if e[1] == fastpath.EV_DELIVERY and e[0] == p.ids["x"]][0][2] == src


def test_meshed_relays_deliver_forwarded_packets_in_c() -> None:
    mesh_key = "cd" * 32

    async def main() -> None:
        async with AsyncExitStack() as stack:
            r1, url1 = await stack.enter_async_context(relay(mesh_key=mesh_key))
            r2, url2 = await stack.enter_async_context(relay(mesh_key=mesh_key))
            region = [u.split("//")[1].split("/")[0] for u in (url1, url2)]
            for r, me in ((r1, region[0]), (r2, region[1])):  # each meshes with the other, as --mesh-with
                mesh = await start_mesh(r, mesh_key, region, me, tls=False)
                stack.push_async_callback(mesh.close)
                await mesh.wait_connected(10)
            a, b = DerpClient(), DerpClient()
            await a.connect(url1)
            await b.connect(url2)
            stack.push_async_callback(a.close)
            stack.push_async_callback(b.close)
            await until(lambda: b.public_key in r1.forwarder_keys(), "relay 1 to learn B")
            await until(lambda: a.public_key in r2.forwarder_keys(), "relay 2 to learn A")
            mesh_conns = [c for c in r2.conns if c.can_mesh]
            await until(lambda: all(c.fid is not None for c in mesh_conns), "mesh peer handed to C")  # type: ignore[attr-defined]
            a.send(b.public_key, b"across the mesh")
            async with asyncio.timeout(5):
                while True:
                    msg = await b.recv()
                    if isinstance(msg, ReceivedPacket):
                        assert msg == ReceivedPacket(a.public_key, b"across the mesh")
                        break
            assert r2.fast.stats()["packets_forwarded_in"] == 1  # type: ignore[union-attr]
            # and PeerGone still reaches b when a leaves (the delivery was reported up by C)
            await a.close()
            async with asyncio.timeout(10):
                while True:
                    msg = await b.recv()
                    if isinstance(msg, PeerGone) and msg.peer == a.public_key:
                        break

    run(main)


# ---------------------------------------------------------------------------------------------------
# the C channel against the asyncio channel (the reference)


async def _metrics_of_a_cross_shard_exchange(use_c: bool, count: int) -> dict[str, int]:
    async with AsyncExitStack() as stack:
        servers: dict[str, DerpServer] = {}
        urls: dict[str, str] = {}
        for name in "AB":
            servers[name], urls[name] = await stack.enter_async_context(relay(fastpath=use_c))
        a_sock, b_sock = socket.socketpair()
        peers: dict[str, ShardPeer] = {}
        for name, sock, other in (("A", a_sock, 1), ("B", b_sock, 0)):
            peer = ShardPeer(servers[name], other)
            if use_c:
                peer.attach_c(servers[name].fast, sock)  # type: ignore[arg-type]
            else:
                await asyncio.get_running_loop().connect_accepted_socket(lambda p=peer: p, sock)
            peers[name] = peer
            stack.callback(peer.close)
            servers[name].add_conn_listener(lambda k, present, peer=peer: peer.announce(k, present))
        x, y = DerpClient(), DerpClient()
        await x.connect(urls["A"])
        await y.connect(urls["B"])
        stack.push_async_callback(x.close)
        stack.push_async_callback(y.close)
        await until(lambda: y.public_key in peers["A"].remote_keys and x.public_key in peers["B"].remote_keys,
                    "announcements")
        await exchange(x, y, count)
        for s in servers.values():
            s.sync_metrics()
        a, b = servers["A"].metrics, servers["B"].metrics
        return {"A received": a.packets_received, "A forwarded out": a.packets_forwarded_out,
                "B forwarded in": b.packets_forwarded_in, "B sent": b.packets_sent,
                "B bytes sent": b.bytes_sent, "drops": a.total_dropped() + b.total_dropped(),
                "A out per links": peers["A"].sync_counters().packets_out,
                "B in per links": peers["B"].sync_counters().packets_in}


def test_c_channel_counts_what_the_asyncio_channel_counts() -> None:
    """The same cross-shard exchange through the asyncio channel (the reference) and the C channel: the
    same packets arrive (exchange checks every byte and the order) and the metrics say the same."""

    async def main() -> None:
        ref = await _metrics_of_a_cross_shard_exchange(False, 1000)
        got = await _metrics_of_a_cross_shard_exchange(True, 1000)
        assert got == ref
        assert ref["A forwarded out"] >= 1000 and ref["drops"] == 0

    run(main)


def test_python_senders_forwarding_into_a_full_c_channel_pause_client_reads_until_it_drains() -> None:
    """A sender Python holds (TLS, WebSocket) forwards through FastPlane.forward: past CHANNEL_HIGH the shard's
    client reads pause (on_congestion), and resume once the C loop has written the channel below CHANNEL_LOW."""
    from turbowg.relay.shards import peer as shard

    async def main() -> None:
        server = DerpServer(keys.generate_private_key())
        assert server.fast is not None
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        events: list[bool] = []
        peer = ShardPeer(server, 1, on_congestion=lambda _p, congested: events.append(congested))
        peer.attach_c(server.fast, ours)
        packet = bytes(1400)
        sent = 0
        while not events and sent < 10_000:  # one loop turn: nothing is written yet
            assert peer.forward_packet(b"s" * 32, b"d" * 32, packet)
            sent += 1
        assert events == [True] and sent * 1469 > shard.CHANNEL_HIGH
        received = 0
        async with asyncio.timeout(10):
            while received < sent * (5 + 64 + 1400) or events[-1]:
                try:
                    received += len(theirs.recv(1 << 20))
                except BlockingIOError:
                    await asyncio.sleep(0.01)
        assert events == [True, False] and peer.counters.dropped_backlog == 0
        assert received == sent * (5 + 64 + 1400)
        peer.close()
        assert peer.c_channel is None and not peer.forward_packet(b"s" * 32, b"d" * 32, packet)
        server.close()
        theirs.close()

    run(main)
