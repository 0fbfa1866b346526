"""DERP relay core: clients by key, routing, duplicate connections, watchers, forwarders, PeerGone.

One `DerpServer` runs per event loop (per worker process). Each accepted connection is a `ClientConn`
(conn.py), which talks to the server only through the `ConnOwner` methods implemented here
(conn_opened/..., route_packet, route_forwarded, mark_dirty, ...). Keys held elsewhere -- by another
relay of the region (mesh.py) or another shard of this relay (shards/) -- are reached through
`PacketForwarder`s registered per key. Counters live in a `ServerMetrics`; the Prometheus view
(metrics.py) reads them and `gauges()` and knows nothing else about the server.

Why one file (~450 lines): one class, DerpServer: the client table, forwarding and the watcher/mesh
registry share one state and change together.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from turbowg.derp import keys
from turbowg.derp.codec import PeerGoneReason, encode_peer_gone, encode_peer_present, looks_like_disco
from turbowg.relay.conn import (
    HANDSHAKE_TIMEOUT,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_JITTER,
    PER_CLIENT_SEND_QUEUE_DEPTH,
    WRITE_BUFFER_HIGH,
    WRITE_BUFFER_LOW,
    WRITE_TIMEOUT,
    ClientConn,
    ConnLimits,
)
from turbowg.relay.fastpath import FastConn, FastPlane
from turbowg.relay.fastpath import available as fastpath_available
from turbowg.relay.metrics import (
    DROP_UNKNOWN_DEST,
    DROP_UNKNOWN_DEST_ON_FWD,
    ServerGauges,
    ServerMetrics,
    make_registry,
)

log = logging.getLogger("turbowg.relay.server")


class PacketForwarder(Protocol):
    """Something that can carry a packet to a key held elsewhere (a mesh peer, another shard)."""

    def forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        """False means the packet was dropped."""
        ...


@runtime_checkable
class SiblingForwarder(Protocol):
    """A forwarder to another shard of this same relay (shards/peer.py's ShardPeer), not to another relay.

    It declares `intra_server = True`. The sibling only ever delivers locally, so the server may pass a
    packet that a mesh peer forwarded here on to it (the packet's last hop either way), and keys behind
    it are announced to mesh watchers as part of this relay. Any other forwarder is a link to another
    relay (mesh.py's MeshPeer declares `intra_server = False`).
    """

    intra_server: bool

    def forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> bool: ...


def is_sibling(fwd: PacketForwarder) -> bool:
    return isinstance(fwd, SiblingForwarder) and fwd.intra_server is True


ConnListener = Callable[[bytes, bool], None]


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
        fastpath: bool | None = None,
    ) -> None:
        self.private_key = private_key
        self.public_key = keys.public_key(private_key)
        self.mesh_key = mesh_key
        self.limits = ConnLimits(
            send_queue_depth=send_queue_depth, keepalive_interval=keepalive_interval,
            keepalive_jitter=keepalive_jitter, handshake_timeout=handshake_timeout, write_timeout=write_timeout,
            write_buffer_high=write_buffer_high, write_buffer_low=write_buffer_low,
        )
        self._loop = loop
        self.clients: dict[bytes, ClientConn] = {}  # the active connection per key
        self._dups: dict[bytes, list[ClientConn]] = {}  # keys with 2+ connections, least recently active first
        self.conns: set[ClientConn] = set()  # every open connection, authenticated or not
        self.watchers: set[ClientConn] = set()
        self._forwarders: dict[bytes, list[PacketForwarder]] = {}
        self._siblings: dict[bytes, list[PacketForwarder]] = {}  # the SiblingForwarders among _forwarders
        self._conn_listeners: list[ConnListener] = []
        self._peer_gone_watchers: dict[bytes, set[ClientConn]] = {}  # src -> connections it sent to
        self._dirty: list[ClientConn] = []
        self._flush_scheduled = False
        self._read_paused: list[ClientConn] = []
        self.metrics = ServerMetrics()
        self.registry, self.render_metrics = make_registry(self.metrics, self.gauges)
        # The C forwarding plane (fastpath.py): authenticated plain-TCP clients move to it. None: all Python.
        self.fast: FastPlane | None = None
        if fastpath if fastpath is not None else fastpath_available():
            self.fast = FastPlane(self)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # -- accepting --------------------------------------------------------------------------------

    def protocol_factory(self) -> ClientConn:
        """The connection for a DERP stream (after the HTTP upgrade, or from the first byte)."""
        return FastConn(self, self.fast) if self.fast is not None else ClientConn(self)

    def close(self) -> None:
        """Abort every connection (their state is released as they go)."""
        for conn in list(self.conns):
            conn.abort()
        if self.fast is not None:
            self.fast.close()

    def pause_client_reads(self) -> None:
        """Stop reading from every client (shards/links.py: a channel to a sibling shard is congested)."""
        for conn in list(self.conns):
            if conn.pause_reading():
                self._read_paused.append(conn)

    def resume_client_reads(self) -> None:
        paused, self._read_paused = self._read_paused, []
        for conn in paused:
            conn.resume_reading()

    # -- forwarders: mesh peers and sibling shards (DESIGN.md) ------------------------------------

    def register_forwarder(self, key: bytes, fwd: PacketForwarder) -> None:
        """`key` is reachable through `fwd`; local clients still win. The first registered is used."""
        lst = self._forwarders.setdefault(key, [])
        if any(f is fwd for f in lst):
            return
        lst.append(fwd)
        if is_sibling(fwd):
            siblings = self._siblings.setdefault(key, [])
            siblings.append(fwd)
            # A key on a sibling shard is part of this relay: mesh watchers must hear of it too.
            if key not in self.clients and len(siblings) == 1:
                self._broadcast_frame(encode_peer_present(key))
        if self.fast is not None and lst[0] is fwd:
            self.fast.sync_key(key)  # a sibling's key: the C plane routes it to the channel

    def unregister_forwarder(self, key: bytes, fwd: PacketForwarder) -> None:
        lst = self._forwarders.get(key)
        if not lst:
            return
        lst[:] = [f for f in lst if f is not fwd]
        siblings = self._siblings.get(key)
        if siblings is not None:
            siblings[:] = [f for f in siblings if f is not fwd]
            if not siblings:
                del self._siblings[key]
                if key not in self.clients:
                    self._broadcast_frame(encode_peer_gone(key, PeerGoneReason.DISCONNECTED))
        if not lst:
            del self._forwarders[key]
            if key not in self.clients:
                self._peer_gone_from_region(key)
        if self.fast is not None:
            self.fast.sync_key(key)

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

    def first_forwarder(self, key: bytes) -> PacketForwarder | None:
        """The forwarder route_packet uses for `key` when no local client holds it."""
        fwds = self._forwarders.get(key)
        return fwds[0] if fwds else None

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

    # -- routing (ConnOwner) ----------------------------------------------------------------------

    def route_packet(self, sender: ClientConn, dst: bytes, packet: bytes) -> None:
        target = self.clients.get(dst)
        if target is not None:
            target.enqueue_packet(sender.key, packet)  # type: ignore[arg-type]
            return
        fwds = self._forwarders.get(dst)
        if fwds:
            self._forward(fwds[0], sender.key, dst, packet)  # type: ignore[arg-type]
            return
        self.record_drop(DROP_UNKNOWN_DEST, packet)
        sender.note_not_here(dst, packet)

    def route_forwarded(self, via: ClientConn, src: bytes, dst: bytes, packet: bytes) -> None:
        self.metrics.packets_forwarded_in += 1
        target = self.clients.get(dst)
        if target is not None:
            target.enqueue_packet(src, packet)
            return
        # A mesh peer reached one worker of a sharded relay; the key may live on a sibling shard, which only
        # delivers locally, so this is the packet's last hop either way. Other relays are never used here.
        siblings = self._siblings.get(dst)
        if siblings:
            self._forward(siblings[0], src, dst, packet)
            return
        self.record_drop(DROP_UNKNOWN_DEST_ON_FWD, packet)
        via.note_not_here(dst, packet)

    def record_drop(self, reason: str, packet: bytes) -> None:
        kind = "disco" if looks_like_disco(packet) else "other"
        m = self.metrics
        m.packets_dropped[(reason, kind)] += 1
        m.bytes_dropped[(reason, kind)] += len(packet)

    def _forward(self, fwd: PacketForwarder, src: bytes, dst: bytes, packet: bytes) -> None:
        self.metrics.packets_forwarded_out += 1
        try:
            ok = fwd.forward_packet(src, dst, packet)
        except Exception:  # a broken forwarder must not take the sender down
            log.exception("forwarder for %s failed", dst.hex()[:12])
            ok = False
        if not ok:
            self.metrics.forward_failures += 1

    def watch_conns(self, conn: ClientConn) -> None:
        if conn.key == self.public_key:
            return  # a mesh peer that is us
        for key, c in self.clients.items():
            conn.push_control(encode_peer_present(key, c.remote_ip, c.remote_port, c.present_flags()))
        for key in self._forwarders:
            if key not in self.clients and key in self._siblings:
                conn.push_control(encode_peer_present(key))
        self.watchers.add(conn)

    def close_peer(self, key: bytes) -> None:
        conns = self._dups.get(key) or ([self.clients[key]] if key in self.clients else [])
        for conn in list(conns):
            conn.abort()

    # -- output batching (ConnOwner) --------------------------------------------------------------

    def mark_dirty(self, conn: ClientConn, schedule: bool) -> None:
        self._dirty.append(conn)
        if schedule:
            self.schedule_flush()

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

    def note_delivery(self, src: bytes, to: ClientConn) -> None:
        to.seen_srcs.add(src)
        watchers = self._peer_gone_watchers.get(src)
        if watchers is None:
            watchers = self._peer_gone_watchers[src] = set()
        watchers.add(to)

    # -- observing --------------------------------------------------------------------------------

    def is_connected(self, key: bytes) -> bool:
        return key in self.clients

    def dup_key_count(self) -> int:
        return len(self._dups)

    def dup_conn_count(self) -> int:
        return sum(len(v) for v in self._dups.values())

    def conns_for_key(self, key: bytes) -> list[ClientConn]:
        """Every connection registered under `key` (more than one while duplicates are connected)."""
        dups = self._dups.get(key)
        if dups is not None:
            return list(dups)
        conn = self.clients.get(key)
        return [conn] if conn is not None else []

    def sync_metrics(self) -> None:
        """Bring `self.metrics` up to date with what the C forwarding plane counted."""
        if self.fast is not None:
            self.fast.sync_metrics()

    def gauges(self) -> ServerGauges:
        """The current sizes metrics.py exports (counters are in `self.metrics`)."""
        self.sync_metrics()  # metrics.py reads the counters right after this
        local = len(self.clients)
        fast = self.fast.gauges() if self.fast is not None else {}
        return ServerGauges(
            clients_local=local,
            clients_remote=sum(1 for k in self._forwarders if k not in self.clients),
            dup_client_keys=self.dup_key_count(),
            dup_client_conns=self.dup_conn_count(),
            watchers=len(self.watchers),
            **fast,
        )

    # -- registration (ConnOwner) -----------------------------------------------------------------

    def conn_opened(self, conn: ClientConn) -> None:
        self.conns.add(conn)
        self.metrics.accepts += 1

    def conn_authenticated(self, conn: ClientConn) -> None:
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
        if self.fast is not None:
            self.fast.sync_key(key)

    def conn_closed(self, conn: ClientConn) -> None:
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
            if self.fast is not None:
                self.fast.sync_key(key)
            return
        if self.clients.get(key) is conn:
            del self.clients[key]
            if self.fast is not None:
                self.fast.sync_key(key)
            self._broadcast_presence(key, conn, False)
            self._notify_listeners(key, False)
            if key not in self._forwarders:
                self._peer_gone_from_region(key)

    def conn_active(self, conn: ClientConn) -> None:
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
        if self.fast is not None:
            self.fast.sync_key(key)

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
