"""DERP server without sockets: the sans-IO handshake/frame state machine, then DerpServer routing
driven through an in-memory transport (queues, drops, PeerGone, duplicates, forwarders, watchers)."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import weakref
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turbowg.derp import codec, keys
from turbowg.derp.client_proto import ClientConnection, ClientProtocolError, Connected
from turbowg.derp.codec import FrameType
from turbowg.relay.conn import ClientConn
from turbowg.relay.server import DerpServer
from turbowg.relay.server_proto import ProtocolError, ServerConnection, ServerState

MESH_KEY = "ab" * 32


class Recorder:
    """Records every ServerEvents call."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_authenticated(self, client_key: bytes, info: codec.ClientInfo, can_mesh: bool, frame: bytes) -> None:
        self.events.append(("auth", client_key, info, can_mesh, frame))

    def on_send_packet(self, dst: bytes, packet: bytes) -> None:
        self.events.append(("send", dst, packet))

    def on_forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> None:
        self.events.append(("forward", src, dst, packet))

    def on_note_preferred(self, preferred: bool) -> None:
        self.events.append(("preferred", preferred))

    def on_watch_conns(self) -> None:
        self.events.append(("watch",))

    def on_close_peer(self, peer: bytes) -> None:
        self.events.append(("close_peer", peer))

    def on_ping(self, data: bytes) -> None:
        self.events.append(("ping", data))

    def on_unknown_frame(self, frame_type: int, length: int) -> None:
        self.events.append(("unknown", frame_type, length))


def client_info_frame(client_priv: bytes, server_pub: bytes, info: codec.ClientInfo | None = None,
                      body: bytes | None = None) -> bytes:
    raw = body if body is not None else (info or codec.ClientInfo()).to_json()
    return codec.encode_client_info(keys.public_key(client_priv), keys.seal_to(client_priv, server_pub, raw))


def new_server_conn(mesh_key: str = "") -> tuple[ServerConnection, Recorder, bytes]:
    server_priv = keys.generate_private_key()
    rec = Recorder()
    return ServerConnection(server_priv, rec, mesh_key=mesh_key), rec, server_priv


def authenticated(mesh_key: str = "", client_mesh_key: str = "") -> tuple[ServerConnection, Recorder, bytes]:
    conn, rec, _ = new_server_conn(mesh_key)
    client_priv = keys.generate_private_key()
    conn.receive_data(client_info_frame(client_priv, conn.public_key, codec.ClientInfo(mesh_key=client_mesh_key)))
    assert conn.state is ServerState.ESTABLISHED
    rec.events.clear()
    return conn, rec, client_priv


# ---------------------------------------------------------------------------------------------------
# sans-IO server connection


def test_handshake_server_key_then_server_info_box_opens_with_client_key() -> None:
    conn, rec, server_priv = new_server_conn()
    first = conn.initial_bytes()
    assert first[:5] == bytes([1, 0, 0, 0, 40])
    assert codec.parse_server_key(first[5:]) == keys.public_key(server_priv)

    client_priv = keys.generate_private_key()
    info = codec.ClientInfo(can_ack_pings=True, is_prober=True)
    conn.receive_data(client_info_frame(client_priv, conn.public_key, info))
    assert conn.state is ServerState.ESTABLISHED
    [(kind, key, got_info, can_mesh, frame)] = rec.events
    assert (kind, key, got_info, can_mesh) == ("auth", keys.public_key(client_priv), info, False)
    assert frame[0] == FrameType.SERVER_INFO
    opened = keys.open_from(client_priv, keys.public_key(server_priv), frame[5:])
    assert opened is not None and json.loads(opened) == {"version": 2}


def test_garbage_instead_of_client_info_is_refused() -> None:
    conn, rec, _ = new_server_conn()
    with pytest.raises(ProtocolError):
        conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.state is ServerState.CLOSED and rec.events == []
    conn.receive_data(b"more")  # ignored after close, no exception
    conn2, _, _ = new_server_conn()
    with pytest.raises(ProtocolError, match="exceeds limit 0"):
        conn2.receive_data(codec.encode_send_packet(bytes(32), b"early"))
    conn3, _, _ = new_server_conn()
    with pytest.raises(ProtocolError, match="expected ClientInfo"):
        conn3.receive_data(codec.encode_keep_alive())


def test_client_info_that_does_not_open_is_refused() -> None:
    conn, rec, _ = new_server_conn()
    client_priv, other = keys.generate_private_key(), keys.generate_private_key()
    sealed = keys.seal_to(other, conn.public_key, codec.ClientInfo().to_json())  # sealed by someone else
    with pytest.raises(ProtocolError, match="does not open"):
        conn.receive_data(codec.encode_client_info(keys.public_key(client_priv), sealed))
    assert rec.events == []
    conn2, rec2, _ = new_server_conn()
    with pytest.raises(ProtocolError, match="JSON"):
        conn2.receive_data(client_info_frame(client_priv, conn2.public_key, body=b"{nope"))
    conn3, _, _ = new_server_conn()
    with pytest.raises(ProtocolError, match="short"):
        conn3.receive_data(codec.encode_frame(FrameType.CLIENT_INFO, bytes(40)))


def test_oversized_client_info_refused_from_header_alone() -> None:
    conn, _, _ = new_server_conn()
    with pytest.raises(ProtocolError, match="exceeds"):
        conn.receive_data(codec.pack_header(FrameType.CLIENT_INFO, (256 << 10) + 1))


def test_truncated_frames_wait_and_pipelined_frames_after_client_info_are_handled() -> None:
    conn, rec, _ = new_server_conn()
    client_priv = keys.generate_private_key()
    dst = bytes(range(32))
    stream = client_info_frame(client_priv, conn.public_key) + codec.encode_send_packet(dst, b"pkt1")
    stream += codec.encode_send_packet(dst, b"pkt2")
    conn.receive_data(stream[:-3])  # ClientInfo + pkt1 + a truncated pkt2
    assert [e[0] for e in rec.events] == ["auth", "send"]
    assert rec.events[1] == ("send", dst, b"pkt1")
    conn.receive_data(stream[-3:])
    assert rec.events[2] == ("send", dst, b"pkt2")


def test_steady_state_frames_dispatch() -> None:
    conn, rec, _ = authenticated()
    k = bytes(range(32))
    conn.receive_data(
        codec.encode_note_preferred(True) + codec.encode_ping(b"12345678") + codec.encode_keep_alive()
        + codec.encode_frame(FrameType.PONG, b"xxxxxxxx") + codec.encode_frame(0x7E, b"future")
        + codec.encode_send_packet(k, b"")
    )
    assert rec.events == [("preferred", True), ("ping", b"12345678"), ("unknown", 0x7E, 6), ("send", k, b"")]


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (codec.pack_header(FrameType.SEND_PACKET, 32 + (64 << 10) + 1), "exceeds"),
        (codec.encode_frame(FrameType.SEND_PACKET, bytes(10)), "short"),
        (codec.encode_frame(FrameType.NOTE_PREFERRED, b"\x01\x01"), "exceeds"),
        (codec.encode_frame(FrameType.PING, b"1234"), "short"),
        (codec.pack_header(0x7E, (64 << 10) + 33), "exceeds"),
        (codec.encode_forward_packet(bytes(32), bytes(32), b"x"), "permission"),
        (codec.WATCH_CONNS_FRAME, "permission"),
        (codec.encode_close_peer(bytes(32)), "permission"),
    ],
)
def test_bad_frames_after_handshake_close_the_connection(frame: bytes, match: str) -> None:
    conn, rec, _ = authenticated()
    with pytest.raises(ProtocolError, match=match):
        conn.receive_data(frame)
    assert conn.state is ServerState.CLOSED and rec.events == []


def test_mesh_key_grants_watch_close_and_forward() -> None:
    conn, rec, _ = authenticated(mesh_key=MESH_KEY, client_mesh_key=MESH_KEY)
    assert conn.can_mesh
    a, b = bytes(range(32)), bytes(range(1, 33))
    conn.receive_data(codec.WATCH_CONNS_FRAME + codec.encode_close_peer(a) + codec.encode_forward_packet(a, b, b"x"))
    assert rec.events == [("watch",), ("close_peer", a), ("forward", a, b, b"x")]
    wrong, _, _ = authenticated(mesh_key=MESH_KEY, client_mesh_key="cd" * 32)
    assert not wrong.can_mesh
    unset, _, _ = authenticated(mesh_key="", client_mesh_key="")
    assert not unset.can_mesh  # an empty key never matches an unconfigured server


def test_sans_io_client_and_server_complete_handshake_in_memory() -> None:
    conn, rec, server_priv = new_server_conn()
    client = ClientConnection(keys.generate_private_key(), expected_server_key=keys.public_key(server_priv))
    assert client.receive_data(conn.initial_bytes()) == []
    conn.receive_data(client.data_to_send())
    server_info_frame = rec.events[0][4]
    events = client.receive_data(server_info_frame + codec.encode_recv_packet(bytes(32), b"hi"))
    assert events == [Connected(keys.public_key(server_priv), codec.ServerInfo(2)), codec.ReceivedPacket(bytes(32), b"hi")]


def test_sans_io_client_refuses_wrong_server() -> None:
    conn, _, _ = new_server_conn()
    client = ClientConnection(keys.generate_private_key(), expected_server_key=bytes(32))
    with pytest.raises(ClientProtocolError, match="expected"):
        client.receive_data(conn.initial_bytes())
    bad_magic = ClientConnection(keys.generate_private_key())
    with pytest.raises(ClientProtocolError, match="magic"):
        bad_magic.receive_data(codec.encode_frame(FrameType.SERVER_KEY, b"GARBAGE!" + bytes(32)))


# ---------------------------------------------------------------------------------------------------
# DerpServer through an in-memory transport (no sockets)


class MemoryTransport:
    """Just enough of asyncio.Transport: records writes, lets the test pause writing."""

    def __init__(self, protocol: ClientConn, port: int) -> None:
        self.protocol = protocol
        self.port = port
        self.writes: list[bytes] = []
        self.buffered = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(bytes(data))

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", self.port) if name == "peername" else None

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.protocol.connection_lost(None)

    close = abort


class Peer:
    """A client of the in-memory server: its key, conn, transport and a decoder of what it got."""

    def __init__(self, server: DerpServer, port: int, mesh_key: str = "", priv: bytes | None = None) -> None:
        self.priv = priv or keys.generate_private_key()
        self.key = keys.public_key(self.priv)
        self.conn = ClientConn(server)
        self.t = MemoryTransport(self.conn, port)
        self.conn.connection_made(self.t)  # type: ignore[arg-type]
        self.proto = ClientConnection(self.priv, mesh_key=mesh_key)
        assert self.proto.receive_data(self.t.writes.pop(0)) == []
        self.conn.data_received(self.proto.data_to_send())
        assert isinstance(self.proto.receive_data(self.t.writes.pop(0))[0], Connected)

    def feed(self, data: bytes) -> None:
        self.conn.data_received(data)

    def received(self) -> list[Any]:
        out = []
        for w in self.t.writes:
            out += self.proto.receive_data(w)
        self.t.writes.clear()
        return out

    def packets(self) -> list[tuple[bytes, bytes]]:
        return [(m.source, m.data) for m in self.received() if isinstance(m, codec.ReceivedPacket)]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def disco(n: int = 0) -> bytes:
    return codec.DISCO_MAGIC + bytes(32) + bytes(24) + n.to_bytes(4, "big")


def test_burst_larger_than_queue_is_delivered_in_batched_writes() -> None:
    async def main() -> None:
        s = DerpServer(keys.generate_private_key(), keepalive_interval=0)
        a, b = Peer(s, 1), Peer(s, 2)
        pkts = [i.to_bytes(2, "big") * 10 for i in range(100)]
        a.feed(b"".join(codec.encode_send_packet(b.key, p) for p in pkts))
        assert len(b.t.writes) == 4  # 32 + 32 + 32 written as the queue filled, 4 more at end of turn
        assert b.packets() == [(a.key, p) for p in pkts]
        assert s.metrics.total_dropped() == 0
        assert s.metrics.packets_sent == s.metrics.packets_received == 100

    run(main())


def test_congested_receiver_drops_oldest_and_counts_while_others_flow() -> None:
    async def main() -> None:
        s = DerpServer(keys.generate_private_key(), keepalive_interval=0, write_timeout=0)
        a, slow, c, d = Peer(s, 1), Peer(s, 2), Peer(s, 3), Peer(s, 4)
        slow.conn.pause_writing()
        a.feed(b"".join(codec.encode_send_packet(slow.key, i.to_bytes(4, "big")) for i in range(100)))
        c.feed(codec.encode_send_packet(d.key, b"still flowing"))
        assert d.packets() == [(c.key, b"still flowing")]
        assert slow.t.writes == []
        assert s.metrics.dropped("queue_head") == 68
        assert len(slow.conn.queue) == 32
        slow.conn.resume_writing()
        assert [p for _, p in slow.packets()] == [i.to_bytes(4, "big") for i in range(68, 100)]
        assert "derp_packets_dropped{kind=\"other\",reason=\"queue_head\"} 68.0" in s.render_metrics().decode()

    run(main())


def test_unknown_destination_dropped_and_disco_gets_rate_limited_not_here() -> None:
    async def main() -> None:
        s = DerpServer(keys.generate_private_key(), keepalive_interval=0)
        a = Peer(s, 1)
        nobody = bytes(range(32))
        a.feed(codec.encode_send_packet(nobody, b"data"))
        assert a.received() == []  # derper answers only disco packets
        a.feed(b"".join(codec.encode_send_packet(nobody, disco(i)) for i in range(10)))
        gone = a.received()
        assert gone == [codec.PeerGone(nobody, codec.PeerGoneReason.NOT_HERE)] * 3  # burst of 3, then 1/s
        assert s.metrics.packets_dropped[("unknown_dest", "other")] == 1
        assert s.metrics.packets_dropped[("unknown_dest", "disco")] == 10
        assert s.metrics.peer_gone_not_here_frames == 3

    run(main())


def test_peer_gone_sent_to_receivers_when_sender_leaves() -> None:
    async def main() -> None:
        s = DerpServer(keys.generate_private_key(), keepalive_interval=0)
        a, b, c = Peer(s, 1), Peer(s, 2), Peer(s, 3)
        a.feed(codec.encode_send_packet(b.key, b"x"))
        b.received()
        a.t.abort()
        await asyncio.sleep(0)  # control frames flush on the next loop turn
        assert b.received() == [codec.PeerGone(a.key, codec.PeerGoneReason.DISCONNECTED)]
        assert c.received() == []  # never heard from a
        assert s._peer_gone_watchers == {}

    run(main())


def test_duplicate_key_newest_active_then_last_writer() -> None:
    async def main() -> None:
        s = DerpServer(keys.generate_private_key(), keepalive_interval=0)
        sender = Peer(s, 1)
        old = Peer(s, 2)
        new = Peer(s, 3, priv=old.priv)
        assert s.clients[old.key] is new.conn and s.dup_key_count() == 1
        sender.feed(codec.encode_send_packet(old.key, b"1"))
        assert new.packets() == [(sender.key, b"1")] and old.packets() == []
        old.feed(codec.encode_ping(b"12345678"))  # the old connection speaks: it becomes active
        sender.feed(codec.encode_send_packet(old.key, b"2"))
        assert old.packets() == [(sender.key, b"2")]
        old.t.abort()
        assert s.clients[new.key] is new.conn and s.dup_key_count() == 0
        sender.feed(codec.encode_send_packet(new.key, b"3"))
        assert new.packets() == [(sender.key, b"3")]

    run(main())


class RecordingForwarder:
    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.packets: list[tuple[bytes, bytes, bytes]] = []

    def forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        self.packets.append((src, dst, packet))
        return self.ok


def test_forwarder_hooks_listeners_and_deliver_forwarded() -> None:
    async def main() -> None:
        s = DerpServer(keys.generate_private_key(), keepalive_interval=0)
        seen: list[tuple[bytes, bool]] = []
        unsubscribe = s.add_conn_listener(lambda k, p: seen.append((k, p)))
        a = Peer(s, 1)
        assert seen == [(a.key, True)] and list(s.local_keys()) == [a.key]
        remote = bytes(range(32))
        fwd, second = RecordingForwarder(), RecordingForwarder()
        s.register_forwarder(remote, fwd)
        s.register_forwarder(remote, second)
        a.feed(codec.encode_send_packet(remote, b"via mesh"))
        assert fwd.packets == [(a.key, remote, b"via mesh")] and second.packets == []
        assert s.metrics.packets_forwarded_out == 1

        # a packet from the remote key arrives via the forwarder side: local delivery only
        assert s.deliver_forwarded(remote, a.key, b"back") is True
        await asyncio.sleep(0)
        assert a.packets() == [(remote, b"back")]
        assert s.deliver_forwarded(remote, bytes(32), b"nowhere") is False
        assert s.metrics.dropped("unknown_dest_on_fwd") == 1

        # the remote key leaves the region: a, who received from it, hears PeerGone
        s.unregister_forwarder(remote, fwd)
        assert a.received() == []  # still reachable through `second`
        s.unregister_forwarder(remote, second)
        await asyncio.sleep(0)
        assert a.received() == [codec.PeerGone(remote, 0)]

        # local clients win over forwarders
        b = Peer(s, 2)
        s.register_forwarder(b.key, fwd)
        a.feed(codec.encode_send_packet(b.key, b"local"))
        assert b.packets() == [(a.key, b"local")] and len(fwd.packets) == 1

        failing = RecordingForwarder(ok=False)
        s.register_forwarder(remote, failing)
        a.feed(codec.encode_send_packet(remote, b"refused"))
        assert s.metrics.forward_failures == 1

        b.t.abort()
        assert seen[-1] == (b.key, False)
        unsubscribe()
        a.t.abort()
        assert seen[-1] == (b.key, False)  # unsubscribed: no more calls

    run(main())


def test_watch_conns_streams_presence_to_mesh_clients_only() -> None:
    async def main() -> None:
        s = DerpServer(keys.generate_private_key(), mesh_key=MESH_KEY, keepalive_interval=0)
        a = Peer(s, 1111)
        outsider = Peer(s, 2)
        outsider.feed(codec.WATCH_CONNS_FRAME)
        assert outsider.t.closed and s.metrics.protocol_errors == 1
        watcher = Peer(s, 3, mesh_key=MESH_KEY)
        watcher.feed(codec.WATCH_CONNS_FRAME)
        got = watcher.received()
        assert codec.PeerPresent(a.key, ipaddress.IPv4Address("127.0.0.1"), 1111, 1) in got
        b = Peer(s, 4)
        await asyncio.sleep(0)
        [present] = watcher.received()
        assert isinstance(present, codec.PeerPresent) and present.peer == b.key
        b.t.abort()
        await asyncio.sleep(0)
        assert watcher.received() == [codec.PeerGone(b.key, 0)]
        watcher.feed(codec.encode_close_peer(a.key))
        assert a.t.closed and not s.is_connected(a.key)

    run(main())


def test_pings_answered_and_keepalives_sent() -> None:
    async def main() -> None:
        s = DerpServer(keys.generate_private_key(), keepalive_interval=0.01, keepalive_jitter=0.0)
        a = Peer(s, 1)
        a.feed(codec.encode_ping(b"abcdefgh"))
        await asyncio.sleep(0)
        assert codec.Pong(b"abcdefgh") in a.received()
        await asyncio.sleep(0.05)
        assert codec.KeepAlive() in a.received()

    run(main())


def test_handshake_timeout_closes_silent_connection() -> None:
    async def main() -> None:
        s = DerpServer(keys.generate_private_key(), handshake_timeout=0.01)
        conn = ClientConn(s)
        t = MemoryTransport(conn, 1)
        conn.connection_made(t)  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert t.closed and s.conns == set() and s.metrics.handshake_errors == 1

    run(main())


def test_connection_state_released_on_close() -> None:
    async def main() -> None:
        s = DerpServer(keys.generate_private_key(), keepalive_interval=60)
        a, b = Peer(s, 1), Peer(s, 2)
        b.conn.pause_writing()
        a.feed(codec.encode_send_packet(b.key, b"queued"))
        refs = [weakref.ref(a.conn), weakref.ref(b.conn)]
        a.t.abort()
        b.t.abort()
        assert s.metrics.dropped("gone_disconnected") == 1
        assert s.clients == {} and s.conns == set() and s._peer_gone_watchers == {} and s._dups == {}
        assert s.metrics.current_connections == 0
        del a, b
        await asyncio.sleep(0)  # a's PeerGone for b was queued before b closed; the flush drops it
        gc.collect()
        assert [r() for r in refs] == [None, None]

    run(main())


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=100_000), max_size=12),
)
def test_any_split_of_the_stream_gives_the_same_events(sizes: list[int], cuts: list[int]) -> None:
    server_priv = keys.generate_private_key()
    client_priv = keys.generate_private_key()
    dst = bytes(range(32))
    stream = client_info_frame(client_priv, keys.public_key(server_priv))
    expected: list[tuple[Any, ...]] = []
    for i, size in enumerate(sizes):
        if i % 3 == 2:
            stream += codec.encode_ping(i.to_bytes(8, "big"))
            expected.append(("ping", i.to_bytes(8, "big")))
        else:
            pkt = bytes([i]) * size
            stream += codec.encode_send_packet(dst, pkt)
            expected.append(("send", dst, pkt))
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    rec = Recorder()
    conn = ServerConnection(server_priv, rec)
    for a, b in zip(points, points[1:], strict=False):
        conn.receive_data(stream[a:b])
    assert rec.events[0][0] == "auth"
    assert rec.events[1:] == expected
    assert all(type(x) is bytes for e in rec.events[1:] for x in e[1:])


class SiblingShard(RecordingForwarder):
    intra_server = True


def test_mesh_forward_reaches_sibling_shard_but_never_another_relay() -> None:
    async def main() -> None:
        s = DerpServer(keys.generate_private_key(), mesh_key=MESH_KEY, keepalive_interval=0)
        mesh_peer = Peer(s, 1, mesh_key=MESH_KEY)
        on_sibling, on_other_relay = bytes(range(32)), bytes(range(1, 33))
        sibling, other_relay = SiblingShard(), RecordingForwarder()
        s.register_forwarder(on_sibling, sibling)
        s.register_forwarder(on_other_relay, other_relay)
        src = bytes(32)
        mesh_peer.feed(codec.encode_forward_packet(src, on_sibling, b"to shard")
                       + codec.encode_forward_packet(src, on_other_relay, b"no second mesh hop"))
        assert sibling.packets == [(src, on_sibling, b"to shard")]
        assert other_relay.packets == []
        assert s.metrics.dropped("unknown_dest_on_fwd") == 1

    run(main())


def test_mesh_watchers_see_keys_held_by_sibling_shards() -> None:
    # With --workers 2, a mesh peer's WatchConns lands on one shard; it must still learn every key of the relay.
    async def main() -> None:
        s = DerpServer(keys.generate_private_key(), mesh_key=MESH_KEY, keepalive_interval=0)
        early, late, remote = bytes(range(32)), bytes(range(2, 34)), bytes(range(3, 35))
        sibling = SiblingShard()
        s.register_forwarder(early, sibling)
        s.register_forwarder(remote, RecordingForwarder())  # another relay's key: not ours to announce
        watcher = Peer(s, 3, mesh_key=MESH_KEY)
        watcher.feed(codec.WATCH_CONNS_FRAME)
        announced = [m.peer for m in watcher.received() if isinstance(m, codec.PeerPresent)]
        assert announced == [watcher.key, early]  # its own connection, then the sibling's key
        s.register_forwarder(late, sibling)
        await asyncio.sleep(0)
        assert [m.peer for m in watcher.received() if isinstance(m, codec.PeerPresent)] == [late]
        s.unregister_forwarder(late, sibling)
        await asyncio.sleep(0)
        assert watcher.received() == [codec.PeerGone(late, 0)]

    run(main())


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x20), st.binary(max_size=80)), max_size=30), st.binary(max_size=64))
def test_random_frames_never_crash_the_server(frames: list[tuple[int, bytes]], tail: bytes) -> None:
    async def main() -> None:
        s = DerpServer(keys.generate_private_key(), keepalive_interval=0)
        victim, other, partner = Peer(s, 1), Peer(s, 2), Peer(s, 3)
        victim.feed(b"".join(codec.encode_frame(t, p) for t, p in frames) + tail)  # must not raise
        other.feed(codec.encode_send_packet(partner.key, b"unaffected"))
        assert partner.packets() == [(other.key, b"unaffected")]
        victim.t.abort()
        assert victim.key not in s.clients and victim.conn not in s.conns

    run(main())


def test_order_kept_across_congestion_and_resume() -> None:
    async def main() -> None:
        s = DerpServer(keys.generate_private_key(), keepalive_interval=0, write_timeout=0)
        a, b = Peer(s, 1), Peer(s, 2)
        b.conn.enqueue_packet(a.key, b"framed before the pause")  # sits in this turn's output buffer
        b.conn.pause_writing()
        for i in range(3):
            b.conn.enqueue_packet(a.key, b"held %d" % i)
        s.flush_dirty()
        assert b.t.writes == []  # nothing written while congested
        b.conn.resume_writing()
        assert [p for _, p in b.packets()] == [b"framed before the pause", b"held 0", b"held 1", b"held 2"]
        assert s.metrics.packets_sent == 4

    run(main())
