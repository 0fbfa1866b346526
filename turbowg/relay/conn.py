"""One accepted DERP connection (derper's sclient): its send queue, control frames, timers and writes.

A `ClientConn` is an asyncio Protocol wrapping the sans-IO `ServerConnection` (server_proto.py).
Packets for the client go to its bounded queue (derper's perClientSendQueueDepth); all frames queued
for it during one loop turn are written with a single transport.write. While its transport is over
its high-water mark the queue keeps only the newest packets (dropping at the head), so a stalled
reader never blocks a sender or any other client.

It knows the relay only through `ConnOwner`, the small interface declared here and implemented by
`DerpServer` (server.py): routing, registration and counters stay on the server's side, queueing and
writing on this side, and neither reaches into the other's private state.

Why one file (~450 lines): one class, ClientConn (and the ConnOwner interface it is written against); its
queue, control frames, timers and writes share one transport's backpressure state.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from turbowg.derp.codec import (
    KEEP_ALIVE_FRAME,
    ClientInfo,
    FrameType,
    PeerGoneReason,
    PeerPresentFlags,
    encode_peer_gone,
    encode_pong,
    looks_like_disco,
    pack_header,
)
from turbowg.relay.metrics import DROP_GONE_DISCONNECTED, DROP_QUEUE_HEAD, ServerMetrics
from turbowg.relay.server_proto import ProtocolError, ServerConnection
from turbowg.wire import KEY_SIZE

log = logging.getLogger("turbowg.relay.conn")

PER_CLIENT_SEND_QUEUE_DEPTH = 32  # derper's defaultPerClientSendQueueDepth
KEEPALIVE_INTERVAL = 60.0
KEEPALIVE_JITTER = 5.0
HANDSHAKE_TIMEOUT = 10.0  # derper's deadline for the ClientInfo frame
WRITE_TIMEOUT = 2.0  # derper's DefaultTCPWriteTimeout: no write progress for this long closes the client
MESH_WRITE_TIMEOUT = 30.0  # derper's privilegedWriteTimeout
WRITE_BUFFER_HIGH = 256 << 10
WRITE_BUFFER_LOW = 64 << 10

_RECV_PACKET = FrameType.RECV_PACKET
_RECV_OVERHEAD = KEY_SIZE
_DISCO_PREFIX = b"TS\xf0\x9f\x92\xac"


@dataclass(frozen=True, slots=True)
class ConnLimits:
    """Per-connection settings, the same for every connection of one server (0 disables a timer)."""

    send_queue_depth: int = PER_CLIENT_SEND_QUEUE_DEPTH
    keepalive_interval: float = KEEPALIVE_INTERVAL
    keepalive_jitter: float = KEEPALIVE_JITTER
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    write_timeout: float = WRITE_TIMEOUT
    write_buffer_high: int = WRITE_BUFFER_HIGH
    write_buffer_low: int = WRITE_BUFFER_LOW


class ConnOwner(Protocol):
    """What a ClientConn needs from the relay that accepted it; `DerpServer` implements it."""

    private_key: bytes
    public_key: bytes
    mesh_key: str
    limits: ConnLimits
    metrics: ServerMetrics

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    # lifecycle
    def conn_opened(self, conn: ClientConn) -> None: ...
    def conn_authenticated(self, conn: ClientConn) -> None: ...
    def conn_active(self, conn: ClientConn) -> None:
        """The connection sent something (decides which of duplicate connections gets traffic)."""
    def conn_closed(self, conn: ClientConn) -> None: ...

    # frames that need the whole relay
    def route_packet(self, sender: ClientConn, dst: bytes, packet: bytes) -> None:
        """SendPacket: deliver to `dst`'s local connection or hand it to a forwarder."""
    def route_forwarded(self, via: ClientConn, src: bytes, dst: bytes, packet: bytes) -> None:
        """ForwardPacket from a mesh peer: deliver here (or to a sibling shard), never to another relay."""
    def watch_conns(self, conn: ClientConn) -> None: ...
    def close_peer(self, key: bytes) -> None: ...

    # bookkeeping for the output side
    def note_delivery(self, src: bytes, to: ClientConn) -> None:
        """`to` got a packet from `src`: it must hear PeerGone when `src` leaves the region."""
    def mark_dirty(self, conn: ClientConn, schedule: bool) -> None:
        """`conn` has output to flush this loop turn (`schedule`: no data_received will flush it)."""
    def flush_dirty(self) -> None: ...
    def record_drop(self, reason: str, packet: bytes) -> None: ...


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
        "server", "limits", "transport", "proto", "key", "info", "can_mesh", "remote_ip", "remote_port",
        "queue", "control", "pong_pending", "paused", "dirty", "closed", "is_dup", "registered",
        "preferred", "seen_srcs", "connected_at", "_not_here_limit", "_keepalive", "_handshake_timer",
        "_write_timer", "_write_mark", "queued_at", "__weakref__",
    )

    def __init__(self, server: ConnOwner) -> None:
        self.server = server
        self.limits = server.limits
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
        self.dirty = False  # set and cleared by the owner's dirty list and flush()
        self.closed = False
        self.is_dup = False  # another connection has the same key (set by the owner)
        self.registered = False  # counted in the owner's clients (set by the owner)
        self.preferred = False
        self.seen_srcs: set[bytes] = set()  # keys that sent to this connection (maintained by the owner)
        self.connected_at = time.monotonic()
        self._not_here_limit: _TokenBucket | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._write_mark = 0
        self.queued_at = 0.0  # when the oldest packet now in `queue` was queued (derper's queue duration)

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        limits = self.limits
        server.conn_opened(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            try:
                self.remote_ip = _ip16(peer[0])
                self.remote_port = int(peer[1])
            except ValueError:
                pass
        try:
            transport.set_write_buffer_limits(high=limits.write_buffer_high, low=limits.write_buffer_low)
        except (AttributeError, NotImplementedError):
            pass
        transport.write(self.proto.initial_bytes())
        if limits.handshake_timeout:
            self._handshake_timer = server.loop.call_later(limits.handshake_timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        server = self.server
        if self.is_dup:
            server.conn_active(self)
        try:
            self.proto.receive_data(data)
        except ProtocolError as exc:
            m = server.metrics
            if self.key is None:
                m.handshake_errors += 1
            else:
                m.protocol_errors += 1
            log.debug("derp client %s: %s; closing", self.describe(), exc)
            self.abort()
        server.flush_dirty()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()

    def pause_writing(self) -> None:
        self.paused = True
        t = self.transport
        if t is not None and self.limits.write_timeout:
            self._write_mark = t.get_write_buffer_size()
            self._write_timer = self.server.loop.call_later(self._write_timeout(), self._write_check)

    def _write_timeout(self) -> float:
        # derper gives privileged (mesh) connections longer: they carry a whole region's traffic
        timeout = self.limits.write_timeout
        return max(timeout, MESH_WRITE_TIMEOUT) if self.can_mesh else timeout

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
        self.server.conn_authenticated(self)
        self._arm_keepalive()

    def on_send_packet(self, dst: bytes, packet: bytes) -> None:
        m = self.server.metrics
        m.packets_received += 1
        m.bytes_received += len(packet)
        if packet.startswith(_DISCO_PREFIX) and looks_like_disco(packet):
            m.packets_received_disco += 1
        self.server.route_packet(self, dst, packet)

    def on_forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> None:
        self.server.route_forwarded(self, src, dst, packet)

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
        self.server.watch_conns(self)

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

    # -- output (called by the owner) ---------------------------------------------------------------

    def enqueue_packet(self, src: bytes, packet: bytes) -> None:
        q = self.queue
        if len(q) >= self.limits.send_queue_depth:
            if not self.paused and self.transport is not None:
                self.flush()  # not congested, just a burst: write now rather than drop
            else:
                _, old = q.popleft()
                self.server.record_drop(DROP_QUEUE_HEAD, old)
        if not q:
            self.queued_at = time.monotonic()
        q.append((src, packet))
        self._packet_queued(src)

    def _packet_queued(self, src: bytes) -> None:
        """After a packet from `src` was queued for this client (here or, FastConn, in the C plane): tell the
        owner the first time `src` reaches us, and have this connection flushed."""
        if src not in self.seen_srcs:
            self.server.note_delivery(src, self)
        self._mark_dirty(False)

    def _mark_dirty(self, schedule: bool) -> None:
        if not self.dirty:
            self.dirty = True
            self.server.mark_dirty(self, schedule)

    def push_control(self, frame: bytes) -> None:
        """Queue a control frame (pong, keepalive, peer gone/present) for the next flush."""
        if self.closed:
            return
        self.control.append(frame)
        self._mark_dirty(True)

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
            # derper's average_queue_duration_ms: an EWMA (alpha 0.1 per packet) of whole ms queued; the
            # batch is charged the age of its oldest packet
            waited = int((time.monotonic() - self.queued_at) * 1000.0)
            keep = 0.9 ** len(q)
            m.avg_queue_duration_ms = m.avg_queue_duration_ms * keep + waited * (1.0 - keep)
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

    def pause_reading(self) -> bool:
        """Stop reading from the client (the relay is congested); False if there is nothing to pause."""
        t = self.transport
        if t is None or t.is_closing():
            return False
        t.pause_reading()
        return True

    def resume_reading(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

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
        limits = self.limits
        if limits.keepalive_interval:
            delay = limits.keepalive_interval + random.uniform(0, limits.keepalive_jitter)
            self._keepalive = self.server.loop.call_later(delay, self._send_keepalive)

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
        log.info("derp client %s: no write progress for %.1fs; closing", self.describe(), self.limits.write_timeout)
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
        server.conn_closed(self)
        self.transport = None


def _ip16(host: str) -> bytes:
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed
