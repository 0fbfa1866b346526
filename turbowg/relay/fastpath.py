"""The relay's forwarding plane: authenticated DERP sockets handed to a C epoll loop (_fastpath.c).

Python keeps everything that is not a data frame: the HTTP upgrade, the ClientInfo/ServerInfo handshake,
pings, WatchConns/PeerPresent/PeerGone, mesh, metrics. Once a client is authenticated, its socket leaves
asyncio and joins the C loop of its worker (`FastPlane.take`); with TLS terminated here, the C loop also
takes the SSL object asyncio/uvloop did the handshake with and drives OpenSSL on its memory BIOs itself: from then on SendPacket frames to
keys the C loop holds are forwarded without Python; every other frame, SendPacket to keys it does not hold
(those on a sibling shard, behind a mesh peer, unknown) and connection events come back up through
`FastPlane._on_ready`, and are fed to the same sans-IO handlers as before.

`FastConn` is the connection the server makes when a fast plane exists: a `ClientConn` until the handover,
then the same object (same registration, timers, watchers) whose output goes to the C loop.

Channels to sibling shards (shards/peer.py) join the same C loop (`FastPlane.add_channel`): a key a
sibling announces is routed in the C table to its channel, so a SendPacket for it becomes a PACKET record
in the channel's output buffer (written once per turn), PACKET records read from a channel are delivered
to local C clients without Python, and per-key XOFF/XON records between the two C loops pause the senders
of a key whose receiver is full. PRESENT/GONE and packets for keys C does not hold come up as EV_RECORDS
to the channel's `ChannelEnd`.

Outgoing mesh links (mesh.py's MeshPeer) join the same C loop once their handshake and WatchConns are done
(`FastPlane.take_mesh`): the keys the peer relay announced are routed in the C table to the link, so a
SendPacket for one becomes a ForwardPacket frame in the link's output buffer, with the same bound, sender
pauses, write timeout and head drops as any destination. Every frame the peer relay sends on it
(PeerPresent/PeerGone, pings, keepalives) and its loss come up to the MeshPeer (`MeshLink`).

The C loop's epoll fd is registered with the asyncio loop (`add_reader`); `poll()` does one non-blocking
turn. One thread: all of this runs on the worker's event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
from typing import TYPE_CHECKING, Protocol

from turbowg import accel
from turbowg.derp.codec import ClientInfo
from turbowg.relay.conn import ClientConn, ConnOwner
from turbowg.relay.server_proto import ProtocolError

if TYPE_CHECKING:
    from turbowg.relay.server import DerpServer

try:
    from turbowg.relay import _fastpath
except ImportError:  # not built: the pure-Python path
    _fastpath = None  # type: ignore[assignment]

HAVE_C = _fastpath is not None and accel.use_c()

log = logging.getLogger("turbowg.relay.fastpath")

QUEUE_BOUND = 2 << 20  # bytes queued for one client before the senders feeding it are paused
TICK = 0.25  # how often the write timeouts are checked and counters synced while connections exist

if _fastpath is not None:
    EV_CLOSED = _fastpath.EV_CLOSED
    EV_PROTOCOL = _fastpath.EV_PROTOCOL
    EV_WRITE_TIMEOUT = _fastpath.EV_WRITE_TIMEOUT
    EV_DELIVERY = _fastpath.EV_DELIVERY
    EV_ACTIVE = _fastpath.EV_ACTIVE
    EV_RECORDS = _fastpath.EV_RECORDS

_SYNCED = ("packets_received", "bytes_received", "packets_received_disco", "packets_sent", "bytes_sent",
           "packets_forwarded_out", "packets_forwarded_in")
_CHANNEL_LABEL = b"\x00" * 32  # a channel has no DERP key


class ChannelEnd(Protocol):
    """What the C loop reports a sibling channel's events to (shards/peer.py's ShardPeer in C mode)."""

    def records_received(self, data: bytes) -> None:
        """Whole records the C loop did not handle (PRESENT/GONE, packets for keys it does not hold)."""

    def sync_counters(self) -> object:
        """Read the channel's counters from the C loop (called once more just before it forgets them)."""

    def channel_lost(self, reason: str) -> None:
        """The channel closed or broke; the C loop has forgotten it and every route to it."""

    def channel_drained(self, queued: int) -> None:
        """After a poll, while registered with `watch_drain`: bytes still queued on the channel."""


class MeshLink(Protocol):
    """What the C loop reports an outgoing mesh link's events to (mesh.py's MeshPeer once handed over)."""

    def mesh_frame(self, frame: bytes) -> None:
        """A whole frame (header included) the peer relay sent: all of them come up, none is data for C."""

    def mesh_lost(self, reason: str, forwarded: int) -> None:
        """The link closed or broke; the C loop has forgotten it and every route to it. `forwarded`: packets
        C queued on it over its life (its counters go with it)."""

    def mesh_stalled(self) -> None:
        """The peer relay took nothing for the write timeout: the link's queued packets were dropped."""


_LOOP_MODULES = ("uvloop", "asyncio")

# TLS terminated by the relay goes to the C loop too (OpenSSL driven from C on the handshake's SSL object);
# TURBOWG_RELAY_TLS_IN_C=0 keeps TLS connections in Python (an A/B switch, and a way out).
TLS_IN_C = os.environ.get("TURBOWG_RELAY_TLS_IN_C", "1") != "0"


def _socket_parts(t: asyncio.BaseTransport) -> tuple[socket.socket, object | None, asyncio.BaseTransport | None] | None:
    """(TCP socket, SSL object or None, the TCP transport under a TLS one or None) of a transport the C loop
    can take over; None when it cannot: a wrapper (WebSocket...: the bytes on the socket are not plain DERP),
    TLS kept in Python (TURBOWG_RELAY_TLS_IN_C=0) or a TLS object C cannot use, not a TCP socket."""
    if type(t).__module__.split(".")[0] not in _LOOP_MODULES:
        return None
    tls = lower = None
    if t.get_extra_info("ssl_object") is not None:
        # TLS terminated here: the C loop goes on with the same SSL session (its SSL* and memory BIOs)
        if not TLS_IN_C or (parts := _tls_parts(t)) is None:
            return None
        tls, lower = parts
    sock = t.get_extra_info("socket")
    if sock is None or sock.type != socket.SOCK_STREAM:
        return None
    return sock, tls, lower


def _holds_output(t: asyncio.BaseTransport, lower: asyncio.BaseTransport | None) -> bool:
    """asyncio still has bytes to write (plaintext, or a TLS transport's ciphertext below it)."""
    return bool(t.get_write_buffer_size() or (lower is not None and lower.get_write_buffer_size()))  # type: ignore[attr-defined]


def _tls_parts(t: asyncio.BaseTransport) -> tuple[object, asyncio.BaseTransport] | None:
    """(the _ssl._SSLSocket, the TCP transport under the TLS one) of asyncio's or uvloop's TLS transport, or
    None if they cannot be found (the connection then stays in Python). uvloop keeps both in C attributes;
    the garbage collector's referents reach them (Cython traverses every object attribute)."""
    ssl_object = t.get_extra_info("ssl_object")
    sslsock = getattr(ssl_object, "_sslobj", None)
    if sslsock is None or type(sslsock).__name__ != "_SSLSocket":
        return None
    proto = getattr(t, "_ssl_protocol", None)
    if proto is None:
        proto = next((r for r in gc.get_referents(t) if type(r).__name__ == "SSLProtocol"), None)
    if proto is None:
        return None
    lower = getattr(proto, "_transport", None)
    if lower is None:
        lower = next((r for r in gc.get_referents(proto)
                      if type(r).__name__ in ("TCPTransport", "UnixTransport")), None)
    if lower is None or not hasattr(lower, "get_write_buffer_size"):
        return None
    return sslsock, lower


def available() -> bool:
    """The C plane is built and not switched off by TURBOWG_NO_C."""
    return HAVE_C


class FastPlane:
    """One worker's C loop: the sockets it owns, its route table, and the events it hands up."""

    def __init__(self, server: DerpServer, *, bound: int = QUEUE_BOUND) -> None:
        assert _fastpath is not None
        self.server = server
        self.c = _fastpath.Loop(bound=bound, write_timeout=server.limits.write_timeout or 0.0)
        self.conns: dict[int, FastConn] = {}
        self.channels: dict[int, ChannelEnd] = {}
        self.mesh_links: dict[int, MeshLink] = {}
        self.mesh_handovers = 0
        self._draining: dict[int, ChannelEnd] = {}  # channels whose Python senders wait for the queue to drain
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._prev: dict[str, object] = {}
        self._last: tuple[int, ...] = ()
        self.handovers = 0
        self.tls_handovers = 0
        self.closed = False
        self.handovers_skipped = 0

    # -- socket handover ------------------------------------------------------------------------------

    def take(self, conn: FastConn) -> bool:
        """Move an authenticated connection's socket from asyncio to the C loop. False: it stays in Python
        (a wrapped transport such as a WebSocket, output still buffered, a TLS object C cannot use, ...)."""
        t = conn.transport
        if t is None or self.closed or conn.closed or conn.key is None or t.is_closing():
            return self._refuse(conn)
        parts = _socket_parts(t)
        if parts is None:
            return self._refuse(conn)
        sock, tls, lower = parts
        conn.flush()  # packets queued in Python before the handover go first, through asyncio
        if conn.paused or _holds_output(t, lower):
            return False  # asyncio still holds output (plaintext or ciphertext): try again after the next read
        try:
            fd = os.dup(sock.fileno())
        except OSError:
            return self._refuse(conn)
        t.pause_reading()
        pending = conn.proto.take_pending()  # bytes after the last whole frame: the C loop continues from them
        try:
            fid = self.c.add(fd, conn.key, pending, tls=tls)
        except (OSError, ValueError):
            os.close(fd)
            conn.proto.receive_data(pending)  # back to the Python parser, as if never taken
            t.resume_reading()
            return self._refuse(conn)
        if conn.can_mesh:  # a mesh peer relay: its ForwardPacket frames are delivered in C too
            self.c.set_mesh(fid, conn._write_timeout())
        conn.fid = fid
        conn.handed_over = True
        conn.tls_in_c = tls is not None
        conn.transport = None
        self.conns[fid] = conn
        self._attach()
        # asyncio closes its descriptor only; the socket lives on in the C loop's dup. (connection_lost
        # follows and is ignored by FastConn.) A TLS transport's abort sends no close_notify and frees nothing:
        # the C loop holds the SSL object; the transport only drains its (empty) outgoing BIO once more.
        t.abort()
        self.handovers += 1
        if tls is not None:
            self.tls_handovers += 1
        self.sync_key(conn.key)
        return True

    def _refuse(self, conn: FastConn) -> bool:
        conn._take_after = False
        self.handovers_skipped += 1
        return False

    def _attach(self) -> None:
        if self._loop is None:
            self._loop = self.server.loop
            self._loop.add_reader(self.c.fileno(), self._on_ready)
        if self._tick is None:
            self._tick = self._loop.call_later(TICK, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        self._on_ready()
        self.sync_metrics()
        if (self.conns or self.channels or self.mesh_links) and self._loop is not None:
            self._tick = self._loop.call_later(TICK, self._on_tick)

    def drop(self, fid: int) -> None:
        self.conns.pop(fid, None)
        try:
            self.c.remove(fid)
        except KeyError:
            pass

    # -- outgoing mesh links --------------------------------------------------------------------------

    def take_mesh(self, t: asyncio.BaseTransport, pending: bytes, link: MeshLink, write_timeout: float) -> int | None:
        """Move an outgoing mesh link (after its handshake and WatchConns) from asyncio to the C loop. `pending`:
        bytes already read and not yet parsed. None: it stays in Python (nothing was changed)."""
        # a TLS *client* session: after the handshake SSL_read/SSL_write do not care which side we are
        parts = None if self.closed or t.is_closing() else _socket_parts(t)
        if parts is None:
            return None
        sock, tls, lower = parts
        if _holds_output(t, lower):
            return None  # asyncio still holds output: C would write after it, out of order
        try:
            fd = os.dup(sock.fileno())
        except OSError:
            return None
        try:
            fid: int = self.c.add(fd, _CHANNEL_LABEL, pending, tls=tls)
        except (OSError, ValueError):
            os.close(fd)
            return None
        self.c.set_mesh_out(fid, write_timeout)
        self.mesh_links[fid] = link
        self._attach()
        t.pause_reading()
        t.abort()  # asyncio lets go of its descriptor (and, for TLS, frees nothing: C holds the SSL object)
        self.mesh_handovers += 1
        return fid

    def write_mesh(self, fid: int, frame: bytes) -> int:
        """Queue frames Python made (a pong, a ForwardPacket from a sender Python holds); bytes queued."""
        if self.closed or fid not in self.mesh_links:
            return -1
        self.c.write(fid, frame)
        self.request_flush()
        return self.c.queue_bytes(fid)  # type: ignore[no-any-return]

    def queue_bytes_of(self, fid: int) -> int:
        return self.c.queue_bytes(fid) if fid in self.mesh_links and not self.closed else 0  # type: ignore[no-any-return]

    def drop_mesh(self, fid: int) -> int:
        """Close a mesh link (its routes go with it); no event follows. Returns the packets C queued on it
        (0 if it was gone already): its counters are freed with the slot."""
        if self.mesh_links.pop(fid, None) is None:
            return 0
        forwarded = 0
        try:
            forwarded = int(self.c.conn_info(fid)["records_out"])  # type: ignore[call-overload]
            self.c.remove(fid)
        except (KeyError, ValueError):
            pass
        return forwarded

    def _mesh_event(self, fid: int, link: MeshLink, kind: int, data: bytes) -> None:
        if kind < 256:
            link.mesh_frame(data)
        elif kind in (EV_CLOSED, EV_PROTOCOL):
            link.mesh_lost(data.decode(errors="replace"), self.drop_mesh(fid))
        elif kind == EV_WRITE_TIMEOUT:
            link.mesh_stalled()

    # -- sibling channels -----------------------------------------------------------------------------

    def add_channel(self, sock: socket.socket, number: int, end: ChannelEnd) -> int:
        """The C loop owns `sock` (a channel to sibling shard `number`) from now on; events go to `end`."""
        fid: int = self.c.add(sock.detach(), _CHANNEL_LABEL, channel=number)
        self.channels[fid] = end
        self._attach()
        return fid

    def drop_channel(self, fid: int) -> None:
        """Close a channel (its routes go with it); the end hears channel_lost."""
        end = self.channels.get(fid)
        if end is not None:
            self._forget_channel(fid, end, "closed")
            return
        try:
            self.c.remove(fid)
        except (KeyError, ValueError):
            pass

    def _forget_channel(self, fid: int, end: ChannelEnd, reason: str) -> None:
        # The end reads the channel's C counters first: after remove() they are gone with the slot.
        self.channels.pop(fid, None)
        self._draining.pop(fid, None)
        end.sync_counters()
        try:
            self.c.remove(fid)
        except (KeyError, ValueError):
            pass
        end.channel_lost(reason)

    def forward(self, fid: int, src: bytes, dst: bytes, packet: bytes, limit: int) -> int:
        """A PACKET record from a sender Python holds; queued bytes on the channel, or -1 if dropped."""
        if self.closed:
            return -1
        queued: int = self.c.forward(fid, src, dst, packet, limit)
        self.request_flush()
        return queued

    def write_channel(self, fid: int, records: bytes) -> None:
        if self.closed:
            return
        self.c.write(fid, records)
        self.request_flush()

    def watch_drain(self, fid: int, end: ChannelEnd) -> None:
        self._draining[fid] = end

    def unwatch_drain(self, fid: int) -> None:
        self._draining.pop(fid, None)

    def request_flush(self) -> None:
        """Write what Python queued in the C loop at the end of this event-loop turn (once per turn)."""
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self.server.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self.closed:
            self.c.flush()

    def channel_info(self, fid: int) -> dict[str, object]:
        return self.c.conn_info(fid)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for conn in list(self.conns.values()):
            conn.abort()
        for fid in list(self.channels):
            self.drop_channel(fid)
        for fid, link in list(self.mesh_links.items()):
            link.mesh_lost("relay closing", self.drop_mesh(fid))
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.c.fileno())
            except (ValueError, RuntimeError):
                pass
            self._loop = None
        self.sync_metrics()
        self.c.close()

    # -- routing: the C table mirrors `server.clients` for the keys whose active conn is in C ----------

    def sync_key(self, key: bytes) -> None:
        if self.closed:
            return
        server = self.server
        conn = server.clients.get(key)
        c = self.c
        if isinstance(conn, FastConn) and conn.fid is not None:
            c.route(key, conn.fid)
        elif conn is None and (fid := self._channel_of(key)) is not None:
            c.route(key, fid)  # held by a sibling shard: SendPacket becomes a PACKET record in C
        else:
            c.unroute(key)
        # duplicates: the C loop says when one of them speaks (derper's last-writer-is-active)
        for d in server.conns_for_key(key):
            if isinstance(d, FastConn) and d.fid is not None:
                c.set_notify_active(d.fid, d.is_dup)

    def _channel_of(self, key: bytes) -> int | None:
        """The C channel or mesh link of the forwarder Python would use for `key` (the first registered)."""
        fwd = self.server.first_forwarder(key)
        fid = getattr(fwd, "c_channel", None)
        if fid is not None and fid in self.channels:
            return fid  # type: ignore[no-any-return]
        fid = getattr(fwd, "c_mesh", None)
        return fid if fid is not None and fid in self.mesh_links else None

    # -- events from the C loop -----------------------------------------------------------------------

    def _on_ready(self) -> None:
        try:
            events = self.c.poll()
        except ValueError:  # closed
            return
        if events:
            self._dispatch(events)
        if self._draining:
            for fid, end in list(self._draining.items()):
                end.channel_drained(self.c.queue_bytes(fid))
        self.server.flush_dirty()
        if self.c.counters() != self._last:
            self.sync_metrics()

    def _dispatch(self, events: list[tuple[int, int, bytes]]) -> None:
        conns = self.conns
        server = self.server
        for fid, kind, data in events:
            conn = conns.get(fid)
            if conn is None:
                end = self.channels.get(fid)
                if end is not None:
                    self._channel_event(fid, end, kind, data)
                elif (link := self.mesh_links.get(fid)) is not None:
                    self._mesh_event(fid, link, kind, data)
                continue
            if kind < 256:
                conn.fast_frame(data)
            elif kind == EV_DELIVERY:
                if data not in conn.seen_srcs:
                    server.note_delivery(data, conn)
            elif kind == EV_ACTIVE:
                server.conn_active(conn)
            elif kind == EV_CLOSED:
                log.debug("derp client %s: %s", conn.describe(), data.decode(errors="replace"))
                conn.abort()
            elif kind == EV_PROTOCOL:
                server.metrics.protocol_errors += 1
                log.debug("derp client %s: %s; closing", conn.describe(), data.decode(errors="replace"))
                conn.abort()
            elif kind == EV_WRITE_TIMEOUT:
                # the C loop dropped its queued packets (queue_head); derper then closes the client
                server.metrics.write_timeouts += 1
                log.info("derp client %s: no write progress for %.1fs; closing", conn.describe(),
                         server.limits.write_timeout)
                conn.abort()

    def _channel_event(self, fid: int, end: ChannelEnd, kind: int, data: bytes) -> None:
        if kind == EV_RECORDS:
            end.records_received(data)
        elif kind in (EV_CLOSED, EV_PROTOCOL):
            # a sibling that stops closes its end (the supervisor reports a sibling that died)
            log.log(logging.ERROR if kind == EV_PROTOCOL else logging.INFO, "shard channel: %s",
                    data.decode(errors="replace"))
            self._forget_channel(fid, end, data.decode(errors="replace"))
        elif kind == EV_WRITE_TIMEOUT:
            # the sibling took nothing for the write timeout: its queued packets were dropped (queue_head) and
            # senders go on with head drops until it reads again; the channel itself stays
            log.warning("shard channel: no write progress for %.1fs; dropped its queued packets",
                        self.server.limits.write_timeout)

    # -- counters -------------------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        return self.c.stats()

    def sync_metrics(self) -> None:
        """Add what the C loop counted since the last call to the server's `ServerMetrics`."""
        try:
            st = self.c.stats()
            self._last = self.c.counters()
        except ValueError:
            return
        prev = self._prev
        m = self.server.metrics
        for name in _SYNCED:
            d = st[name] - prev.get(name, 0)  # type: ignore[operator]
            if d:
                setattr(m, name, getattr(m, name) + d)
        # derper's average queue duration: the C loop keeps its own EWMA; fold it in with the weight of the
        # packets it wrote since the last sync (alpha 0.1 per packet, as both EWMAs)
        written = st["packets_sent"] - prev.get("packets_sent", 0)  # type: ignore[operator]
        if written and hasattr(m, "avg_queue_duration_ms"):
            keep = 0.9 ** min(written, 1000)
            m.avg_queue_duration_ms = m.avg_queue_duration_ms * keep + st["avg_queue_ms"] * (1.0 - keep)
        old_drops = prev.get("dropped", {})
        for rk, (pkts, nbytes) in st["dropped"].items():  # type: ignore[union-attr]
            p0, b0 = old_drops.get(rk, (0, 0))  # type: ignore[union-attr]
            if pkts != p0:
                m.packets_dropped[rk] += pkts - p0
                m.bytes_dropped[rk] += nbytes - b0
        self._prev = st

    def gauges(self) -> dict[str, int]:
        """ServerGauges' fast_* fields, from the last sync_metrics()."""
        st = self._prev
        return {"fast_conns": len(self.conns), "fast_queued_bytes": int(st.get("queued_bytes", 0)),  # type: ignore[call-overload]
                "fast_sender_pauses": int(st.get("sender_pauses", 0)),  # type: ignore[call-overload]
                "fast_tls_conns": sum(1 for c in self.conns.values() if c.tls_in_c),
                "fast_handovers": self.handovers, "fast_tls_handovers": self.tls_handovers}

    def queue_bytes(self, conn: FastConn) -> int:
        return self.c.queue_bytes(conn.fid) if conn.fid is not None and not self.closed else 0


class FastConn(ClientConn):
    """A ClientConn that moves to the C loop once authenticated (plain TCP or TLS terminated here)."""

    __slots__ = ("plane", "fid", "handed_over", "tls_in_c", "_take_after")

    def __init__(self, server: ConnOwner, plane: FastPlane) -> None:
        super().__init__(server)
        self.plane = plane
        self.fid: int | None = None
        self.handed_over = False
        self.tls_in_c = False
        self._take_after = False

    # -- before the handover: a ClientConn ------------------------------------------------------------

    def on_authenticated(self, client_key: bytes, info: ClientInfo, can_mesh: bool, server_info_frame: bytes) -> None:
        super().on_authenticated(client_key, info, can_mesh, server_info_frame)
        # Mesh peers move too: C delivers their ForwardPacket frames (set_mesh) with the mesh write timeout;
        # WatchConns, ClosePeer and the PeerPresent/PeerGone they get stay Python's (handed up / written down).
        self._take_after = True

    def data_received(self, data: bytes) -> None:
        if self.handed_over:
            return
        super().data_received(data)
        if self._take_after and not self.closed:
            # after the frames of this read (the rest of the ClientInfo read is handled by now)
            if self.plane.take(self):
                self._take_after = False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handed_over:
            return  # asyncio let go of its descriptor: the C loop has the socket (or had it, until abort)
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        if not self.handed_over:
            super().pause_writing()

    def resume_writing(self) -> None:
        if not self.handed_over:
            super().resume_writing()

    # -- after: the C loop ----------------------------------------------------------------------------

    def fast_frame(self, frame: bytes) -> None:
        """A frame the C loop handed up, through the same sans-IO dispatch as on the Python path."""
        if self.closed:
            return
        try:
            self.proto.receive_data(frame)
        except ProtocolError as exc:
            self.server.metrics.protocol_errors += 1
            log.debug("derp client %s: %s; closing", self.describe(), exc)
            self.abort()

    def enqueue_packet(self, src: bytes, packet: bytes) -> None:
        fid = self.fid
        if fid is None:
            if not self.handed_over:
                super().enqueue_packet(src, packet)
            return
        self.plane.c.deliver(fid, src, packet)
        self._packet_queued(src)

    def push_control(self, frame: bytes) -> None:
        fid = self.fid
        if fid is None:
            if not self.handed_over:
                super().push_control(frame)
            return
        if self.closed:
            return
        self.plane.c.write(fid, frame)
        self._mark_dirty(True)

    def flush(self) -> None:
        if not self.handed_over:
            super().flush()
            return
        self.dirty = False
        self.pong_pending = False
        if self.fid is not None:
            self.plane.c.flush()

    def pause_reading(self) -> bool:
        if not self.handed_over:
            return super().pause_reading()
        if self.fid is None:
            return False
        self.plane.c.set_reading(self.fid, False)
        return True

    def resume_reading(self) -> None:
        if not self.handed_over:
            super().resume_reading()
        elif self.fid is not None:
            self.plane.c.set_reading(self.fid, True)

    def queue_bytes(self) -> int:
        return self.plane.queue_bytes(self)

    def abort(self) -> None:
        if not self.handed_over:
            super().abort()
            return
        fid = self.fid
        if fid is not None:
            self.fid = None
            self.plane.drop(fid)  # closes the socket; queued packets count as gone_disconnected
        self._release()
