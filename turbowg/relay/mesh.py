"""Meshing relays of one region, as derper's --mesh-with: a client on relay A can reach a client on relay B.

For every other relay of the region this relay keeps one outgoing DERP connection that presents the
shared mesh key in its ClientInfo and sends WatchConns. The remote relay answers with PeerPresent for
every client it holds (and later PeerGone/PeerPresent as they come and go); for each present key a
`MeshPeer` is registered as the packet forwarder on the local `DerpServer`. Packets for those keys
go out as ForwardPacket frames (src, dst, packet), which the remote relay delivers to its local
client only (one hop, never re-forwarded). If the connection breaks, every forwarder it registered
is removed and the connection is re-dialled with exponential backoff; on reconnect the remote relay
sends the full PeerPresent set again.

With the relay's C plane (fastpath.py), the connection's socket (and its TLS session) is handed to the C loop
once the handshake and WatchConns are done: the peer's keys are routed in the C table to the link, so packets
from clients in C leave as ForwardPacket frames without Python (same queue bound, sender pauses, write
timeout and head drops as any destination). Every frame the peer relay sends still comes up to `_on_frame`;
a lost link ends `_connect_and_watch` as on the Python path, and the reconnect loop runs unchanged. The
Python path stays for TURBOWG_NO_C=1 and whenever the handover is refused.

The connection speaks only what the mesh needs (WatchConns, ForwardPacket, Ping/Pong) after the one
client handshake of turbowg/derp/handshake.py (the same code DerpClient uses).

TLS: the mesh key is sent to the peer relay inside the handshake, so whoever terminates the TLS
connection gets it. Peer relays' certificates are therefore verified (chain and host name) against
the system trust store, or against `ca_file` (relay flag -mesh-ca); `insecure_skip_verify`
(-mesh-insecure-skip-verify) turns that off for self-signed test setups only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from turbowg.derp import keys
from turbowg.derp.client_proto import ClientProtocolError
from turbowg.derp.codec import (
    MAX_PACKET_SIZE,
    WATCH_CONNS_FRAME,
    FrameDecoder,
    FrameError,
    FrameType,
    PeerGone,
    PeerPresent,
    Ping,
    decode_server_message,
    encode_pong,
)
from turbowg.derp.handshake import HandshakeError, SelfConnectError, derp_handshake
from turbowg.relay.conn import MESH_WRITE_TIMEOUT
from turbowg.relay.server import DerpServer
from turbowg.wire import KEY_SIZE

log = logging.getLogger("turbowg.relay.mesh")

_FORWARD_HEADER = struct.Struct(">BI")
MAX_BACKLOG = 8 << 20  # bytes queued towards one peer relay before forwarded packets are dropped
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0


class MeshConfigError(ValueError):
    """A --mesh-with entry that cannot be used."""


@dataclass(frozen=True)
class PeerAddress:
    host: str
    port: int
    use_tls: bool
    name: str  # as given, for logs

    @classmethod
    def parse(cls, text: str, default_tls: bool) -> PeerAddress:
        """`host`, `host:port`, `[v6]:port` or `http(s)://host[:port][/derp]`."""
        raw = text.strip()
        if not raw:
            raise MeshConfigError("empty mesh peer")
        try:
            urlsplit(raw if "://" in raw else "//" + raw)
        except ValueError:  # e.g. '[::1' or '[host]': "Invalid IPv6 URL"
            raise MeshConfigError(f"mesh peer {text!r}: bad host") from None
        if "://" in raw:
            parts = urlsplit(raw)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise MeshConfigError(f"mesh peer {text!r}: expected http(s)://host[:port]")
            use_tls = parts.scheme == "https"
            try:
                port = parts.port or (443 if use_tls else 80)
            except ValueError:
                raise MeshConfigError(f"mesh peer {text!r}: bad port") from None
            return cls(parts.hostname, port, use_tls, raw)
        parts = urlsplit("//" + raw)
        if not parts.hostname:
            raise MeshConfigError(f"mesh peer {text!r}: no host")
        try:
            port = parts.port or (443 if default_tls else 80)
        except ValueError:
            raise MeshConfigError(f"mesh peer {text!r}: bad port") from None
        return cls(parts.hostname, port, default_tls, raw)


@dataclass
class MeshCounters:
    connects: int = 0
    connect_failures: int = 0
    packets_forwarded: int = 0
    dropped_backlog: int = 0
    dropped_not_connected: int = 0
    pongs_sent: int = 0


class MeshPeer:
    """The link to one other relay: watches its clients and forwards packets for them."""

    # server.SiblingForwarder: this forwarder leads to another relay, never used for a packet a mesh peer
    # forwarded to us (one hop only).
    intra_server = False

    def __init__(
        self, server: DerpServer, address: PeerAddress, mesh_key: str, private_key: bytes,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.server = server
        self.address = address
        self._mesh_key = mesh_key
        self._private_key = private_key
        self.public_key = keys.public_key(private_key)
        self._ssl = ssl_context
        self.counters = MeshCounters()
        self.remote_server_key: bytes | None = None
        self.self_connect = False
        self.registered: set[bytes] = set()
        self.connected = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.WriteTransport | None = None
        self._out = bytearray()
        self._flush_scheduled = False
        self._task: asyncio.Task[None] | None = None
        # the C loop's id for this link while it holds the socket (fastpath.FastPlane reads it as `c_mesh`)
        self.c_mesh: int | None = None
        self._c_lost: asyncio.Future[str] | None = None
        self.c_stalls = 0

    # -- forwarding (called by the DerpServer) -------------------------------------------------------

    def forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        if self.c_mesh is not None:  # a sender Python holds (WebSocket, ...) while the link is in C
            return self._forward_c(self.c_mesh, src, dst, packet)
        transport = self._transport
        if transport is None or transport.is_closing():
            self.counters.dropped_not_connected += 1
            return False
        out = self._out
        if len(out) + transport.get_write_buffer_size() > MAX_BACKLOG or len(packet) > MAX_PACKET_SIZE:
            self.counters.dropped_backlog += 1
            return False
        out += _FORWARD_HEADER.pack(FrameType.FORWARD_PACKET, 2 * KEY_SIZE + len(packet))
        out += src
        out += dst
        out += packet
        self.counters.packets_forwarded += 1
        if not self._flush_scheduled:  # one write per event-loop turn, however many packets
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return True

    def _forward_c(self, fid: int, src: bytes, dst: bytes, packet: bytes) -> bool:
        fast = self.server.fast
        if fast is None or len(packet) > MAX_PACKET_SIZE or fast.queue_bytes_of(fid) > MAX_BACKLOG:
            self.counters.dropped_backlog += 1
            return False
        hdr = _FORWARD_HEADER.pack(FrameType.FORWARD_PACKET, 2 * KEY_SIZE + len(packet))
        if fast.write_mesh(fid, b"".join((hdr, src, dst, packet))) < 0:
            self.counters.dropped_not_connected += 1
            return False
        self.counters.packets_forwarded += 1
        return True

    def _write(self, frame: bytes) -> None:
        if self.c_mesh is not None and self.server.fast is not None:
            self.server.fast.write_mesh(self.c_mesh, frame)
            return
        self._out += frame
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._transport
        if not self._out:
            return
        if transport is None or transport.is_closing():
            self._out.clear()
            return
        batch, self._out = self._out, bytearray()
        transport.write(batch)

    # -- connection loop -----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"mesh:{self.address.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            try:
                await self._connect_and_watch()
                backoff = BACKOFF_MIN  # the connection was established; start over quickly
            except asyncio.CancelledError:
                raise
            except SelfConnectError:
                # As derper: every relay gets the whole region list; the entry that is us is dropped.
                log.info("mesh %s is this relay itself; not meshing with it", self.address.name)
                self.self_connect = True
                self._clear()
                return
            except (OSError, EOFError, FrameError, ssl.SSLError, TimeoutError, HandshakeError,
                    ClientProtocolError) as exc:
                self.counters.connect_failures += 1
                log.warning("mesh %s: %s; retrying in %.1f s", self.address.name, exc or type(exc).__name__, backoff)
            finally:
                self._clear()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _clear(self) -> None:
        self.connected.clear()
        self._drop_c()
        if self._transport is not None:
            self._transport.close()
        self._transport = None
        self._out.clear()
        for key in self.registered:
            self.server.unregister_forwarder(key, self)
        self.registered.clear()

    async def _connect_and_watch(self) -> None:
        addr = self.address
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                addr.host, addr.port, ssl=self._ssl, server_hostname=addr.host if self._ssl else None,
                limit=MAX_PACKET_SIZE * 4,
            ),
            CONNECT_TIMEOUT,
        )
        try:
            decoder = await asyncio.wait_for(self._handshake(reader, writer), HANDSHAKE_TIMEOUT)
            self._transport = writer.transport
            self.counters.connects += 1
            if self._take_c(reader, writer, decoder):
                self.connected.set()
                log.info("mesh %s: connected, watching its clients (link in the C plane)", addr.name)
                assert self._c_lost is not None
                raise EOFError(await self._c_lost)
            self.connected.set()
            log.info("mesh %s: connected, watching its clients", addr.name)
            while True:
                data = await reader.read(1 << 18)
                if not data:
                    raise EOFError("connection closed by peer relay")
                for ftype, payload in decoder.feed(data):
                    self._on_frame(ftype, payload)
        finally:
            writer.close()

    # -- the link in the C plane ---------------------------------------------------------------------

    def _take_c(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: FrameDecoder) -> bool:
        """Hand the connected link to the server's C plane; False: it stays on the Python path."""
        fast = self.server.fast
        if fast is None or self._out:
            return False
        # Bytes read but not parsed yet: the decoder's partial frame, then whatever the StreamReader still
        # buffers (private attributes: neither exposes a take; both are plain bytearrays).
        pending = bytes(getattr(decoder, "_buf", b"")) + bytes(getattr(reader, "_buffer", b""))
        timeout = max(self.server.limits.write_timeout, MESH_WRITE_TIMEOUT) if self.server.limits.write_timeout else 0.0
        fid = fast.take_mesh(writer.transport, pending, self, timeout)
        if fid is None:
            return False
        self.c_mesh = fid
        self._transport = None
        self._c_lost = self._loop.create_future()
        for key in self.registered:  # keys announced during the handshake: route them to the link in C
            fast.sync_key(key)
        return True

    def _drop_c(self) -> None:
        fid, self.c_mesh = self.c_mesh, None
        self._c_lost = None
        if fid is not None and self.server.fast is not None:
            self.counters.packets_forwarded += self.server.fast.drop_mesh(fid)

    def mesh_frame(self, frame: bytes) -> None:
        """fastpath.MeshLink: a frame the peer relay sent on the link in C, to the same handler as in Python."""
        try:
            self._on_frame(frame[0], frame[5:])
        except (FrameError, ValueError) as exc:
            self.mesh_lost(f"bad frame from peer relay: {exc}")

    def mesh_lost(self, reason: str, forwarded: int = 0) -> None:
        """fastpath.MeshLink: the C loop lost the link (it forgot its routes); the reconnect loop takes over."""
        self.counters.packets_forwarded += forwarded  # what C forwarded (its per-link counter is gone now)
        lost = self._c_lost  # c_mesh stays until _clear: drop_mesh there closes a link C still holds
        if lost is not None and not lost.done():
            lost.set_result(reason)

    def mesh_stalled(self) -> None:
        """fastpath.MeshLink: the peer took nothing for the write timeout; C dropped the queued packets and goes
        on with head drops (as for a sibling channel): the link stays, TCP tells when it is really dead."""
        self.c_stalls += 1
        log.warning("mesh %s: no write progress; dropped the packets queued for it", self.address.name)

    def c_info(self) -> dict[str, object] | None:
        """The C loop's view of the link (queue, counters) while it holds it; None otherwise."""
        fast = self.server.fast
        if self.c_mesh is None or fast is None:
            return None
        return fast.channel_info(self.c_mesh)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> FrameDecoder:
        server_key, decoder, frames = await derp_handshake(
            reader, writer, self.address.host, self._private_key, self._mesh_key,
            refuse_server_keys=(self.public_key, self.server.public_key),
        )
        self.remote_server_key = server_key
        writer.write(WATCH_CONNS_FRAME)
        for ftype, payload in frames:  # anything that came in the same read
            self._on_frame(ftype, payload)
        return decoder

    def _on_frame(self, ftype: int, payload: bytes) -> None:
        msg = decode_server_message(ftype, payload)
        if isinstance(msg, PeerPresent):
            key = msg.peer
            if key == self.public_key or key in self.registered:
                return
            self.registered.add(key)
            self.server.register_forwarder(key, self)
        elif isinstance(msg, PeerGone):
            if msg.peer in self.registered:
                self.registered.discard(msg.peer)
                self.server.unregister_forwarder(msg.peer, self)
        elif isinstance(msg, Ping):
            self._write(encode_pong(msg.data))
            self.counters.pongs_sent += 1
        # RecvPacket, KeepAlive, Health, ...: nothing for a mesh link to do.


@dataclass
class Mesh:
    """Handle returned by start_mesh."""

    peers: list[MeshPeer] = field(default_factory=list)

    async def wait_connected(self, timeout: float) -> None:
        await asyncio.wait_for(asyncio.gather(*(p.connected.wait() for p in self.peers)), timeout)

    async def close(self) -> None:
        for peer in self.peers:
            await peer.stop()


def mesh_ssl_context(ca_file: str = "", insecure_skip_verify: bool = False) -> ssl.SSLContext:
    """TLS client settings of the mesh links: verify the peer relay (system store or `ca_file`) unless told not to."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)  # only ca_file's CAs when given
    except (OSError, ssl.SSLError) as exc:
        raise MeshConfigError(f"cannot load mesh CA file {ca_file}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def start_mesh(
    server: DerpServer,
    mesh_key: str,
    peers: Iterable[str],
    self_name: str,
    *,
    tls: bool = True,
    ca_file: str = "",
    insecure_skip_verify: bool = False,
    private_key: bytes | None = None,
) -> Mesh:
    """Dial every peer relay except `self_name` and keep forwarding to their clients until closed.

    `tls` is the default for peers given without a scheme. Their certificates are verified against
    the system trust store, or only `ca_file`'s CAs when given; `insecure_skip_verify` disables that
    (self-signed test setups: anyone on the path could then take the mesh key). The mesh connections
    use `private_key`, by default the server's own.
    """
    if not mesh_key:
        raise MeshConfigError("meshing needs a mesh key")
    if private_key is None:
        private_key = server.private_key
    mesh = Mesh()
    ssl_context: ssl.SSLContext | None = None
    for text in peers:
        address = PeerAddress.parse(text, tls)
        if address.host == self_name or address.name == self_name:
            continue
        if address.use_tls and ssl_context is None:
            ssl_context = mesh_ssl_context(ca_file, insecure_skip_verify)
        peer = MeshPeer(server, address, mesh_key, private_key, ssl_context if address.use_tls else None)
        mesh.peers.append(peer)
        peer.start()
    return mesh
