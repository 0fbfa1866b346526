"""DERP relay core: clients by key, per-client bounded send queues, routing, metrics, mesh/shard hooks.

One `DerpServer` runs per event loop (per worker process). Each connection is a `ClientConn`, an
asyncio Protocol wrapping the sans-IO `ServerConnection`. Packets for a client go to its bounded
queue (derper's perClientSendQueueDepth); all frames queued for a client during one loop turn are
written with a single transport.write. While a client's transport is over its high-water mark its
queue keeps only the newest packets (dropping at the head), so a stalled reader never blocks a
sender or any other client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from turbowg.derp import keys
from turbowg.derp.codec import (
    KEEP_ALIVE_FRAME,
    KEY_LEN,
    ClientInfo,
    FrameType,
    PeerGoneReason,
    PeerPresentFlags,
    encode_peer_gone,
    encode_peer_present,
    encode_pong,
    looks_like_disco,
    pack_header,
)
from turbowg.derp.metrics import (
    DROP_GONE_DISCONNECTED,
    DROP_QUEUE_HEAD,
    DROP_UNKNOWN_DEST,
    DROP_UNKNOWN_DEST_ON_FWD,
    ServerMetrics,
    make_registry,
)
from turbowg.derp.server_proto import ProtocolError, ServerConnection

log = logging.getLogger("turbowg.derp.server")

PER_CLIENT_SEND_QUEUE_DEPTH = 32  # derper's defaultPerClientSendQueueDepth
KEEPALIVE_INTERVAL = 60.0
KEEPALIVE_JITTER = 5.0
HANDSHAKE_TIMEOUT = 10.0  # derper's deadline for the ClientInfo frame
WRITE_TIMEOUT = 2.0  # derper's DefaultTCPWriteTimeout: no write progress for this long closes the client
MESH_WRITE_TIMEOUT = 30.0  # derper's privilegedWriteTimeout
WRITE_BUFFER_HIGH = 256 << 10
WRITE_BUFFER_LOW = 64 << 10

_RECV_PACKET = FrameType.RECV_PACKET
_RECV_OVERHEAD = KEY_LEN
_DISCO_PREFIX = b"TS\xf0\x9f\x92\xac"


class PacketForwarder(Protocol):
    """Something that can carry a packet to a key held elsewhere (a mesh peer, another shard)."""

    def forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        """False means the packet was dropped."""
        ...


ConnListener = Callable[[bytes, bool], None]


class _TokenBucket:
    """derper limits PeerGone(not here) replies to 1/s with a burst of 3 per client."""

    __slots__ = ("tokens", "stamp")

    def __init__(self) -> None:
        self.tokens = 3.0
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(3.0, self.tokens + (now - self.stamp))
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class ClientConn(asyncio.Protocol):
    """One accepted DERP connection (derper's sclient)."""

    __slots__ = (
        "server", "transport", "proto", "key", "info", "can_mesh", "remote_ip", "remote_port",
        "queue", "control", "pong_pending", "paused", "dirty", "closed", "is_dup", "registered",
        "preferred", "seen_srcs", "connected_at", "_not_here_limit", "_keepalive", "_handshake_timer",
        "_write_timer", "_write_mark", "__weakref__",
    )

    def __init__(self, server: DerpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.proto = ServerConnection(server.private_key, self, mesh_key=server.mesh_key, public_key=server.public_key)
        self.key: bytes | None = None
        self.info: ClientInfo | None = None
        self.can_mesh = False
        self.remote_ip: bytes | None = None
        self.remote_port = 0
        self.queue: deque[tuple[bytes, bytes]] = deque()
        self.control: list[bytes] = []
        self.pong_pending = False
        self.paused = False
        self.dirty = False
        self.closed = False
        self.is_dup = False
        self.registered = False
        self.preferred = False
        self.seen_srcs: set[bytes] = set()
        self.connected_at = time.monotonic()
        self._not_here_limit: _TokenBucket | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._write_mark = 0

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        server.conns.add(self)
        server.metrics.accepts += 1
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            try:
                self.remote_ip = _ip16(peer[0])
                self.remote_port = int(peer[1])
            except ValueError:
                pass
        try:
            transport.set_write_buffer_limits(high=server.write_buffer_high, low=server.write_buffer_low)
        except (AttributeError, NotImplementedError):
            pass
        transport.write(self.proto.initial_bytes())
        if server.handshake_timeout:
            self._handshake_timer = server.loop.call_later(server.handshake_timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.is_dup:
            self.server._note_activity(self)
        try:
            self.proto.receive_data(data)
        except ProtocolError as exc:
            m = self.server.metrics
            if self.key is None:
                m.handshake_errors += 1
            else:
                m.protocol_errors += 1
            log.debug("derp client %s: %s; closing", self.describe(), exc)
            self.abort()
        server = self.server
        if server._dirty:
            server.flush_dirty()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()

    def pause_writing(self) -> None:
        self.paused = True
        t = self.transport
        if t is not None and self.server.write_timeout:
            self._write_mark = t.get_write_buffer_size()
            self._write_timer = self.server.loop.call_later(self._write_timeout(), self._write_check)

    def _write_timeout(self) -> float:
        # derper gives privileged (mesh) connections longer: they carry a whole region's traffic
        return max(self.server.write_timeout, MESH_WRITE_TIMEOUT) if self.can_mesh else self.server.write_timeout

    def resume_writing(self) -> None:
        self.paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        if self.queue or self.control:
            self.flush()

    # -- sans-IO events (server_proto.ServerEvents) -------------------------------------------------

    def on_authenticated(self, client_key: bytes, info: ClientInfo, can_mesh: bool, server_info_frame: bytes) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.key = client_key
        self.info = info
        self.can_mesh = can_mesh
        assert self.transport is not None
        self.transport.write(server_info_frame)
        self.server._register(self)
        self._arm_keepalive()

    def on_send_packet(self, dst: bytes, packet: bytes) -> None:
        server = self.server
        m = server.metrics
        m.packets_received += 1
        m.bytes_received += len(packet)
        if packet.startswith(_DISCO_PREFIX) and looks_like_disco(packet):
            m.packets_received_disco += 1
        target = server.clients.get(dst)
        if target is not None:
            target.enqueue_packet(self.key, packet)  # type: ignore[arg-type]
        else:
            server._route_elsewhere(self, dst, packet)

    def on_forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> None:
        server = self.server
        server.metrics.packets_forwarded_in += 1
        target = server.clients.get(dst)
        if target is not None:
            target.enqueue_packet(src, packet)
            return
        # A mesh peer reached one worker of a sharded relay; the key may live on a sibling shard. Those
        # forwarders say so with `intra_server = True` and only ever deliver locally, so this is the
        # packet's last hop either way. Mesh forwarders (other relays) are never used here.
        for fwd in server._forwarders.get(dst, ()):
            if getattr(fwd, "intra_server", False):
                server._forward(fwd, src, dst, packet)
                return
        server.record_drop(DROP_UNKNOWN_DEST_ON_FWD, packet)
        self.note_not_here(dst, packet)

    def on_note_preferred(self, preferred: bool) -> None:
        if preferred == self.preferred:
            return
        self.preferred = preferred
        m = self.server.metrics
        m.current_home_connections += 1 if preferred else -1
        # derper ignores the first note (sent right after connecting) when counting home moves
        if time.monotonic() - self.connected_at > 5.0:
            if preferred:
                m.home_moves_in += 1
            else:
                m.home_moves_out += 1

    def on_watch_conns(self) -> None:
        self.server._add_watcher(self)

    def on_close_peer(self, peer: bytes) -> None:
        self.server.close_peer(peer)

    def on_ping(self, data: bytes) -> None:
        m = self.server.metrics
        m.got_ping += 1
        if self.pong_pending:
            return  # a pong is already waiting: the client pings faster than we write (derper drops too)
        self.pong_pending = True
        m.sent_pong += 1
        self.push_control(encode_pong(data))

    def on_unknown_frame(self, frame_type: int, length: int) -> None:
        self.server.metrics.unknown_frames += 1

    # -- output -----------------------------------------------------------------------------------

    def enqueue_packet(self, src: bytes, packet: bytes) -> None:
        q = self.queue
        if len(q) >= self.server.send_queue_depth:
            if not self.paused and self.transport is not None:
                self.flush()  # not congested, just a burst: write now rather than drop
            else:
                _, old = q.popleft()
                self.server.record_drop(DROP_QUEUE_HEAD, old)
        q.append((src, packet))
        if src not in self.seen_srcs:
            self.server._note_sender(src, self)
        if not self.dirty:
            self.dirty = True
            self.server._dirty.append(self)

    def push_control(self, frame: bytes) -> None:
        """Queue a control frame (pong, keepalive, peer gone/present) for the next flush."""
        if self.closed:
            return
        self.control.append(frame)
        if not self.dirty:
            self.dirty = True
            server = self.server
            server._dirty.append(self)
            server.schedule_flush()

    def flush(self) -> None:
        """Write everything queued in one transport.write (unless the transport is over high water)."""
        self.dirty = False
        t = self.transport
        if t is None or self.paused:
            return
        parts = self.control
        if parts:
            self.control = []
            self.pong_pending = False
        else:
            parts = []
        q = self.queue
        if q:
            pack = pack_header
            nbytes = 0
            for src, pkt in q:
                n = len(pkt)
                parts.append(pack(_RECV_PACKET, _RECV_OVERHEAD + n))
                parts.append(src)
                parts.append(pkt)
                nbytes += n
            m = self.server.metrics
            m.packets_sent += len(q)
            m.bytes_sent += nbytes
            q.clear()
        if parts:
            t.write(b"".join(parts))

    def note_not_here(self, dst: bytes, packet: bytes) -> None:
        # derper answers only disco packets (a peer trying to reach a key we don't have), rate-limited.
        if not looks_like_disco(packet):
            return
        if self._not_here_limit is None:
            self._not_here_limit = _TokenBucket()
        if self._not_here_limit.allow():
            self.server.metrics.peer_gone_not_here_frames += 1
            self.push_control(encode_peer_gone(dst, PeerGoneReason.NOT_HERE))

    def present_flags(self) -> int:
        flags = 0
        if self.info is not None and self.info.is_prober:
            flags |= PeerPresentFlags.PROBER
        if self.can_mesh:
            flags |= PeerPresentFlags.MESH_PEER
        return flags or PeerPresentFlags.REGULAR

    # -- lifecycle --------------------------------------------------------------------------------

    def abort(self) -> None:
        t = self.transport
        if t is not None:
            t.abort()  # connection_lost follows and releases the state
        else:
            self._release()

    def describe(self) -> str:
        ip = ""
        if self.remote_ip is not None:
            addr = ipaddress.IPv6Address(self.remote_ip)
            ip = f"{addr.ipv4_mapped or addr}:{self.remote_port}"
        return f"{ip}/{self.key.hex()[:12] if self.key else '?'}"

    def _arm_keepalive(self) -> None:
        server = self.server
        if server.keepalive_interval:
            delay = server.keepalive_interval + random.uniform(0, server.keepalive_jitter)
            self._keepalive = server.loop.call_later(delay, self._send_keepalive)

    def _send_keepalive(self) -> None:
        self._keepalive = None
        if self.closed:
            return
        self.push_control(KEEP_ALIVE_FRAME)
        self._arm_keepalive()

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.key is None and not self.closed:
            self.server.metrics.handshake_errors += 1
            self.abort()

    def _write_check(self) -> None:
        self._write_timer = None
        t = self.transport
        if t is None or not self.paused:
            return
        size = t.get_write_buffer_size()
        if size < self._write_mark:  # the client is reading, just slowly
            self._write_mark = size
            self._write_timer = self.server.loop.call_later(self._write_timeout(), self._write_check)
            return
        self.server.metrics.write_timeouts += 1
        log.info("derp client %s: no write progress for %.1fs; closing", self.describe(), self.server.write_timeout)
        self.abort()

    def _release(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.proto.close()
        for handle in (self._keepalive, self._handshake_timer, self._write_timer):
            if handle is not None:
                handle.cancel()
        self._keepalive = self._handshake_timer = self._write_timer = None
        server = self.server
        for _, pkt in self.queue:
            server.record_drop(DROP_GONE_DISCONNECTED, pkt)
        self.queue.clear()
        self.control = []
        server._unregister(self)
        self.transport = None


def _ip16(host: str) -> bytes:
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


class DerpServer:
    """All DERP state of one worker: connections, routing, forwarders, watchers, metrics."""

    def __init__(
        self,
        private_key: bytes,
        *,
        mesh_key: str = "",
        send_queue_depth: int = PER_CLIENT_SEND_QUEUE_DEPTH,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        keepalive_jitter: float = KEEPALIVE_JITTER,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        write_buffer_high: int = WRITE_BUFFER_HIGH,
        write_buffer_low: int = WRITE_BUFFER_LOW,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.private_key = private_key
        self.public_key = keys.public_key(private_key)
        self.mesh_key = mesh_key
        self.send_queue_depth = send_queue_depth
        self.keepalive_interval = keepalive_interval
        self.keepalive_jitter = keepalive_jitter
        self.handshake_timeout = handshake_timeout
        self.write_timeout = write_timeout
        self.write_buffer_high = write_buffer_high
        self.write_buffer_low = write_buffer_low
        self._loop = loop
        self.clients: dict[bytes, ClientConn] = {}  # the active connection per key
        self._dups: dict[bytes, list[ClientConn]] = {}  # keys with 2+ connections, least recently active first
        self.conns: set[ClientConn] = set()  # every open connection, authenticated or not
        self.watchers: set[ClientConn] = set()
        self._forwarders: dict[bytes, list[PacketForwarder]] = {}
        self._conn_listeners: list[ConnListener] = []
        self._peer_gone_watchers: dict[bytes, set[ClientConn]] = {}  # src -> connections it sent to
        self._dirty: list[ClientConn] = []
        self._flush_scheduled = False
        self.metrics = ServerMetrics()
        self.registry, self.render_metrics = make_registry(self)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # -- accepting --------------------------------------------------------------------------------

    def protocol_factory(self) -> ClientConn:
        """For listeners that speak DERP from the first byte (no HTTP upgrade)."""
        return ClientConn(self)

    def close(self) -> None:
        """Abort every connection (their state is released as they go)."""
        for conn in list(self.conns):
            conn.abort()

    # -- mesh / shard hooks (DESIGN.md) -----------------------------------------------------------

    def register_forwarder(self, key: bytes, fwd: PacketForwarder) -> None:
        """`key` is reachable through `fwd`; local clients still win. The first registered is used."""
        lst = self._forwarders.setdefault(key, [])
        if not any(f is fwd for f in lst):
            lst.append(fwd)
            # A key on a sibling shard is part of this relay: mesh watchers must hear of it too.
            if getattr(fwd, "intra_server", False) and key not in self.clients and self._sibling_count(key) == 1:
                self._broadcast_frame(encode_peer_present(key))

    def unregister_forwarder(self, key: bytes, fwd: PacketForwarder) -> None:
        lst = self._forwarders.get(key)
        if not lst:
            return
        was_sibling = self._sibling_count(key) > 0
        lst[:] = [f for f in lst if f is not fwd]
        if was_sibling and self._sibling_count(key) == 0 and key not in self.clients:
            self._broadcast_frame(encode_peer_gone(key, PeerGoneReason.DISCONNECTED))
        if not lst:
            del self._forwarders[key]
            if key not in self.clients:
                self._peer_gone_from_region(key)

    def add_conn_listener(self, cb: ConnListener) -> Callable[[], None]:
        """`cb(key, present)` when a key gets its first local connection / loses its last one."""
        self._conn_listeners.append(cb)

        def unsubscribe() -> None:
            try:
                self._conn_listeners.remove(cb)
            except ValueError:
                pass

        return unsubscribe

    def local_keys(self) -> Iterable[bytes]:
        return list(self.clients)

    def forwarder_keys(self) -> Iterable[bytes]:
        return list(self._forwarders)

    def deliver_forwarded(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        """A packet from a mesh peer or another shard for a local client; never forwarded again."""
        self.metrics.packets_forwarded_in += 1
        target = self.clients.get(dst)
        if target is None:
            self.record_drop(DROP_UNKNOWN_DEST_ON_FWD, packet)
            return False
        target.enqueue_packet(src, packet)
        self.schedule_flush()
        return True

    # -- routing ----------------------------------------------------------------------------------

    def record_drop(self, reason: str, packet: bytes) -> None:
        kind = "disco" if looks_like_disco(packet) else "other"
        m = self.metrics
        m.packets_dropped[(reason, kind)] += 1
        m.bytes_dropped[(reason, kind)] += len(packet)

    def _route_elsewhere(self, sender: ClientConn, dst: bytes, packet: bytes) -> None:
        fwds = self._forwarders.get(dst)
        if fwds:
            self._forward(fwds[0], sender.key, dst, packet)  # type: ignore[arg-type]
            return
        self.record_drop(DROP_UNKNOWN_DEST, packet)
        sender.note_not_here(dst, packet)

    def _forward(self, fwd: PacketForwarder, src: bytes, dst: bytes, packet: bytes) -> None:
        self.metrics.packets_forwarded_out += 1
        try:
            ok = fwd.forward_packet(src, dst, packet)
        except Exception:  # a broken forwarder must not take the sender down
            log.exception("forwarder for %s failed", dst.hex()[:12])
            ok = False
        if not ok:
            self.metrics.forward_failures += 1

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_callback)

    def _flush_callback(self) -> None:
        self._flush_scheduled = False
        self.flush_dirty()

    def flush_dirty(self) -> None:
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        for conn in dirty:
            if conn.dirty:
                conn.flush()

    def close_peer(self, key: bytes) -> None:
        conns = self._dups.get(key) or ([self.clients[key]] if key in self.clients else [])
        for conn in list(conns):
            conn.abort()

    def is_connected(self, key: bytes) -> bool:
        return key in self.clients

    def dup_key_count(self) -> int:
        return len(self._dups)

    def dup_conn_count(self) -> int:
        return sum(len(v) for v in self._dups.values())

    # -- registration -----------------------------------------------------------------------------

    def _register(self, conn: ClientConn) -> None:
        key = conn.key
        assert key is not None
        conn.registered = True
        self.metrics.current_connections += 1
        old = self.clients.get(key)
        self.clients[key] = conn  # newest connection is active, as derper's lastWriterIsActive
        if old is not None:
            self.metrics.total_dup_client_conns += 1
            self.metrics.clients_replaced += 1
            dups = self._dups.get(key)
            if dups is None:
                dups = self._dups[key] = [old]
            dups.append(conn)
            for c in dups:
                c.is_dup = True
        self._broadcast_presence(key, conn, True)
        if old is None:
            self._notify_listeners(key, True)

    def _unregister(self, conn: ClientConn) -> None:
        self.conns.discard(conn)
        self.watchers.discard(conn)
        for src in conn.seen_srcs:
            watchers = self._peer_gone_watchers.get(src)
            if watchers is not None:
                watchers.discard(conn)
                if not watchers:
                    del self._peer_gone_watchers[src]
        conn.seen_srcs.clear()
        if not conn.registered:
            return
        conn.registered = False
        key = conn.key
        assert key is not None
        self.metrics.current_connections -= 1
        if conn.preferred:
            self.metrics.current_home_connections -= 1
        dups = self._dups.get(key)
        if dups is not None:
            dups.remove(conn)
            conn.is_dup = False
            if len(dups) == 1:
                del self._dups[key]
                dups[0].is_dup = False
            if self.clients.get(key) is conn:
                self.clients[key] = dups[-1]
            return
        if self.clients.get(key) is conn:
            del self.clients[key]
            self._broadcast_presence(key, conn, False)
            self._notify_listeners(key, False)
            if key not in self._forwarders:
                self._peer_gone_from_region(key)

    def _note_activity(self, conn: ClientConn) -> None:
        # derper's lastWriterIsActive: of duplicate connections, the one that last spoke gets traffic
        key = conn.key
        if key is None or not conn.registered or self.clients.get(key) is conn:
            return
        dups = self._dups.get(key)
        if dups is None:
            return
        self.clients[key] = conn
        dups.remove(conn)
        dups.append(conn)

    def _note_sender(self, src: bytes, dst: ClientConn) -> None:
        dst.seen_srcs.add(src)
        watchers = self._peer_gone_watchers.get(src)
        if watchers is None:
            watchers = self._peer_gone_watchers[src] = set()
        watchers.add(dst)

    def _peer_gone_from_region(self, key: bytes) -> None:
        """Tell every connection that received from `key` that it is gone (derper's PeerGone)."""
        watchers = self._peer_gone_watchers.pop(key, None)
        if not watchers:
            return
        frame = encode_peer_gone(key, PeerGoneReason.DISCONNECTED)
        for conn in watchers:
            conn.seen_srcs.discard(key)
            if not conn.closed:
                self.metrics.peer_gone_disconnected_frames += 1
                conn.push_control(frame)

    def _notify_listeners(self, key: bytes, present: bool) -> None:
        for cb in list(self._conn_listeners):
            try:
                cb(key, present)
            except Exception:
                log.exception("DERP connection listener failed")

    def _add_watcher(self, conn: ClientConn) -> None:
        if conn.key == self.public_key:
            return  # a mesh peer that is us
        for key, c in self.clients.items():
            conn.push_control(encode_peer_present(key, c.remote_ip, c.remote_port, c.present_flags()))
        for key in self._forwarders:
            if key not in self.clients and self._sibling_count(key):
                conn.push_control(encode_peer_present(key))
        self.watchers.add(conn)

    def _sibling_count(self, key: bytes) -> int:
        """How many forwarders for `key` lead to another shard of this relay (not another relay)."""
        return sum(1 for f in self._forwarders.get(key, ()) if getattr(f, "intra_server", False))

    def _broadcast_frame(self, frame: bytes) -> None:
        for w in self.watchers:
            w.push_control(frame)

    def _broadcast_presence(self, key: bytes, conn: ClientConn, present: bool) -> None:
        if not self.watchers:
            return
        if present:
            frame = encode_peer_present(key, conn.remote_ip, conn.remote_port, conn.present_flags())
        else:
            frame = encode_peer_gone(key, PeerGoneReason.DISCONNECTED)
        for w in self.watchers:
            if w is not conn:
                w.push_control(frame)
