"""asyncio DERP client: HTTP upgrade (plain or TLS), handshake, send/receive packets, ping.

    client = DerpClient()                       # fresh key, or DerpClient(private_key)
    await client.connect("https://relay:443/derp", verify=False)   # or "wss://relay/derp": DERP over WebSocket
    client.send(peer_public_key, b"packet")
    msg = await client.recv()                   # ReceivedPacket, PeerGone, PeerPresent, Ping, ...
    rtt = await client.ping()
    await client.close()

A WireGuard device takes packets in batches instead (`set_packet_handler`: each read from the relay decoded
in one pass into one packed buffer, no object per packet) and drops rather than queue (`write_blocked`).

The HTTP upgrade and the DERP handshake come from handshake.py and client_proto.py (the same code the
relay's mesh links use); this module only adds the asyncio transport, queues and backpressure.

Why one file (~490 lines): one class, the asyncio side of one relay connection; its send queue, receive
queue, batch handler and ping share one transport's backpressure state.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from turbowg.derp import keys
from turbowg.derp.client_proto import ClientConnection, ClientProtocolError, ClientState, Connected
from turbowg.derp.codec import (
    WATCH_CONNS_FRAME,
    FrameError,
    FrameType,
    Ping,
    Pong,
    ServerMessage,
    decode_server_message,
    encode_close_peer,
    encode_forward_packet,
    encode_note_preferred,
    encode_ping,
    encode_pong,
    encode_send_packet,
    pack_header,
)
from turbowg.derp.handshake import HandshakeError, UpgradeResponse, upgrade_request
from turbowg.wire import KEY_SIZE

if TYPE_CHECKING:
    from turbowg.derp.websocket import ClientWebSocket

_SEND = FrameType.SEND_PACKET


class DerpClientError(Exception):
    """Connecting or talking to the relay failed."""


class ConnectionClosed(DerpClientError):
    """The connection to the relay is closed."""


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, owner: DerpClient, expect_http: bool, websocket: tuple[str, str] | None = None) -> None:
        self.owner = owner
        self.upgrade: UpgradeResponse | None = UpgradeResponse() if expect_http and websocket is None else None
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.drain_waiters: list[asyncio.Future[None]] = []
        self._ws_target = websocket  # (Host header, path) for DERP over WebSocket
        self.ws: ClientWebSocket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._ws_target is not None:
            from turbowg.derp.websocket import ClientWebSocket

            ws = self.ws = ClientWebSocket(self.transport)
            ws.on_data = self.owner._on_data
            ws.on_error = lambda exc: self.owner._fail(DerpClientError(str(exc)))
            self.transport.write(ws.request(*self._ws_target))

    def write(self, data: bytes) -> None:
        """DERP bytes to the relay: as they are, or as one binary WebSocket message."""
        ws = self.ws
        if ws is not None:
            ws.transport.write(data)
        elif self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.data_received(data)
            return
        if self.upgrade is not None:
            try:
                rest = self.upgrade.feed(data)
            except HandshakeError as exc:
                self.upgrade = None
                self.owner._fail(DerpClientError(str(exc)))
                return
            if rest is None:
                return
            self.upgrade = None
            if not rest:
                return
            data = rest
        self.owner._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.owner._on_closed(exc)
        for w in self.drain_waiters:
            if not w.done():
                w.set_result(None)
        self.drain_waiters.clear()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for w in self.drain_waiters:
            if not w.done():
                w.set_result(None)
        self.drain_waiters.clear()


class DerpClient:
    """One connection to a DERP relay, identified by a Curve25519 key."""

    def __init__(
        self,
        private_key: bytes | None = None,
        *,
        mesh_key: str = "",
        can_ack_pings: bool = True,
        is_prober: bool = False,
        auto_pong: bool = True,
        max_queued_messages: int = 8192,
    ) -> None:
        self.private_key = private_key if private_key is not None else keys.generate_private_key()
        self.public_key = keys.public_key(self.private_key)
        self._mesh_key = mesh_key
        self._can_ack_pings = can_ack_pings
        self._is_prober = is_prober
        self._auto_pong = auto_pong
        self._max_queued = max_queued_messages
        self.server_key: bytes | None = None
        self._proto: ClientConnection | None = None
        self._protocol: _ClientProtocol | None = None
        self._messages: deque[ServerMessage] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._connected: asyncio.Future[Connected] | None = None
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._error: BaseException | None = None
        self._closed = True
        self._reading_paused = False
        self._packet_handler: Callable[[bytearray, list[int], list[bytes]], None] | None = None
        self._divert = b""

    # -- connecting -------------------------------------------------------------------------------

    async def connect(
        self,
        url: str | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        tls: bool | None = None,
        verify: bool = False,
        server_hostname: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        fast_start: bool = False,
        expected_server_key: bytes | None = None,
        timeout: float = 10.0,
        websocket: bool = False,
    ) -> Connected:
        """Connect to `url` (http[s]://host[:port][/derp]) or host/port, upgrade and handshake.

        `ws://` and `wss://` URLs, or `websocket=True`, speak DERP over a WebSocket (`derp` subprotocol,
        binary messages), as derper accepts for browsers and clients behind WebSocket-only proxies.
        """
        path = "/derp"
        if url is not None:
            parts = urlsplit(url if "://" in url else "https://" + url)
            if parts.scheme not in ("http", "https", "ws", "wss"):
                raise DerpClientError(f"unsupported relay URL scheme {parts.scheme!r}")
            host = parts.hostname
            port = parts.port
            if parts.scheme in ("ws", "wss"):
                websocket = True
            if tls is None:
                tls = parts.scheme in ("https", "wss")
            path = parts.path or "/derp"
        if not host:
            raise DerpClientError("no relay host given")
        if tls is None:
            tls = True
        if port is None:
            port = 443 if tls else 80
        ctx: ssl.SSLContext | None = None
        if tls:
            ctx = ssl_context or _client_ssl_context(verify)
        self._proto = ClientConnection(
            self.private_key, mesh_key=self._mesh_key, can_ack_pings=self._can_ack_pings,
            is_prober=self._is_prober, expected_server_key=expected_server_key,
        )
        loop = asyncio.get_running_loop()
        self._connected = loop.create_future()
        self._error = None
        self._closed = False
        request = upgrade_request(host, port, tls=tls, path=path, fast_start=fast_start)
        ws_target = None
        if websocket:
            host_header = f"[{host}]" if ":" in host else host
            if port != (443 if tls else 80):
                host_header += f":{port}"
            ws_target = (host_header, path)
        try:
            async with asyncio.timeout(timeout):
                _, protocol = await loop.create_connection(
                    lambda: _ClientProtocol(self, expect_http=not fast_start, websocket=ws_target), host, port,
                    ssl=ctx, server_hostname=(server_hostname or host) if ctx is not None else None,
                )
                self._protocol = protocol
                assert protocol.transport is not None
                if ws_target is None:
                    protocol.transport.write(request)
                return await self._connected
        except TimeoutError:
            self._teardown()
            raise DerpClientError(f"timed out connecting to DERP relay {host}:{port}") from None
        except (OSError, ssl.SSLError) as exc:
            self._teardown()
            raise DerpClientError(f"cannot connect to DERP relay {host}:{port}: {exc}") from exc
        except DerpClientError:
            self._teardown()
            raise
        except BaseException:
            self._teardown()
            raise

    def _teardown(self) -> None:
        self._closed = True
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.abort()

    # -- sending ----------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        p = self._protocol
        if self._closed or p is None or p.transport is None:
            raise ConnectionClosed("DERP connection is closed") from self._error
        p.write(data)

    def send(self, dst: bytes, packet: bytes) -> None:
        """Queue one packet for `dst` (its public key). Call `drain()` now and then to respect backpressure."""
        self._write(encode_send_packet(dst, packet))

    def send_many(self, dst: bytes, packets: list[bytes]) -> None:
        """Several packets to one destination in a single write."""
        parts: list[bytes] = []
        for pkt in packets:
            if len(pkt) > 65536:
                raise ValueError("packet exceeds 64 KiB")
            parts += (pack_header(_SEND, KEY_SIZE + len(pkt)), dst, pkt)
        self._write(b"".join(parts))

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        p = self._protocol
        if p is None or not p.paused or p.transport is None:
            return
        fut = asyncio.get_running_loop().create_future()
        p.drain_waiters.append(fut)
        await fut

    def forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> None:
        """Mesh only: relay a packet from `src` to `dst`'s local client on that server."""
        self._write(encode_forward_packet(src, dst, packet))

    def note_preferred(self, preferred: bool) -> None:
        self._write(encode_note_preferred(preferred))

    def watch_conns(self) -> None:
        """Mesh only: ask for PeerPresent/PeerGone for every client of the server."""
        self._write(WATCH_CONNS_FRAME)

    def close_peer(self, peer: bytes) -> None:
        """Mesh only: make the server close `peer`'s connection."""
        self._write(encode_close_peer(peer))

    def send_pong(self, data: bytes) -> None:
        self._write(encode_pong(data))

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time of a Ping/Pong through the relay, in seconds."""
        loop = asyncio.get_running_loop()
        data = os.urandom(8)
        fut = loop.create_future()
        self._pings[data] = fut
        start = time.perf_counter()
        try:
            self._write(encode_ping(data))
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise DerpClientError("ping timed out") from None
        finally:
            self._pings.pop(data, None)
        return time.perf_counter() - start

    # -- receiving --------------------------------------------------------------------------------

    async def recv(self) -> ServerMessage:
        """The next message from the relay; raises ConnectionClosed once it is gone and drained."""
        while not self._messages:
            await self._wait()
        msg = self._messages.popleft()
        self._maybe_resume()
        return msg

    async def recv_many(self, max_messages: int = 1024) -> list[ServerMessage]:
        """At least one, at most `max_messages` messages, without waiting for more than the first."""
        while not self._messages:
            await self._wait()
        msgs = self._messages
        if len(msgs) <= max_messages:
            out = list(msgs)
            msgs.clear()
        else:
            out = [msgs.popleft() for _ in range(max_messages)]
        self._maybe_resume()
        return out

    async def _wait(self) -> None:
        if self._closed:
            raise ConnectionClosed("DERP connection is closed") from self._error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _maybe_resume(self) -> None:
        if self._reading_paused and len(self._messages) <= self._max_queued // 2:
            p = self._protocol
            if p is not None and p.transport is not None:
                p.transport.resume_reading()
            self._reading_paused = False

    def set_packet_handler(
        self, handler: Callable[[bytearray, list[int], list[bytes]], None] | None, divert: bytes = b"",
    ) -> None:
        """Receive packets in batches instead of as `ReceivedPacket` messages (a WireGuard device's path).

        Once connected, each read from the relay is decoded in one pass (`FrameDecoder.feed_packets`) and
        `handler(buf, chunks, sources)` is called at once, from the transport's callback: the packets
        packed in `buf` (a new bytearray per call, the handler's to keep or modify), `chunks` flat
        (start, end, stride) runs of equal-size packets from one source (the last maybe shorter), `sources`
        the source key of each run. Other frames, empty packets and packets starting with `divert` still
        arrive through `recv()` / `recv_many()`, as do packets that came in the read that finished the
        handshake. The handler runs synchronously, so no packet queue builds up on this side: a slow
        handler slows reading and TCP pushes back on the relay. None restores per-message delivery."""
        self._packet_handler = handler
        self._divert = divert

    @property
    def write_blocked(self) -> bool:
        """Whether the connection's write buffer is over its high-water mark (`drain()` would wait): a
        sender that must not queue (a WireGuard device) drops instead, as a full link would."""
        p = self._protocol
        return p is not None and p.paused

    def _on_data(self, data: bytes) -> None:
        proto = self._proto
        assert proto is not None
        handler = self._packet_handler
        if handler is not None and proto.state is ClientState.CONNECTED:
            buf = bytearray()
            chunks: list[int] = []
            sources: list[bytes] = []
            try:
                frames = proto.decoder.feed_packets(data, buf, chunks, sources, self._divert)
                events: list = [decode_server_message(ftype, payload) for ftype, payload in frames]
            except FrameError as exc:
                proto.state = ClientState.CLOSED
                self._fail(DerpClientError(f"DERP protocol error: {exc}"))
                return
            if sources:
                handler(buf, chunks, sources)
            if events:
                self._dispatch(events)
            return
        try:
            events = proto.receive_data(data)
        except ClientProtocolError as exc:
            self._fail(DerpClientError(f"DERP protocol error: {exc}"))
            return
        out = proto.data_to_send()
        if out and self._protocol is not None and self._protocol.transport is not None:
            self._protocol.write(out)
        self._dispatch(events)

    def _dispatch(self, events: list) -> None:
        msgs = self._messages
        for ev in events:
            if isinstance(ev, Connected):
                self.server_key = ev.server_key
                if self._connected is not None and not self._connected.done():
                    self._connected.set_result(ev)
            elif isinstance(ev, Pong):
                fut = self._pings.get(ev.data)
                if fut is not None and not fut.done():
                    fut.set_result(None)
                msgs.append(ev)
            else:
                if isinstance(ev, Ping) and self._auto_pong:
                    self._write(encode_pong(ev.data))
                msgs.append(ev)
        if msgs:
            w = self._waiter
            if w is not None and not w.done():
                w.set_result(None)
            if len(msgs) > self._max_queued and not self._reading_paused:
                # Let TCP push back on the relay: it then drops for us, as it would for any slow reader.
                p = self._protocol
                if p is not None and p.transport is not None:
                    p.transport.pause_reading()
                    self._reading_paused = True

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        if self._connected is not None and not self._connected.done():
            self._connected.set_exception(exc)
        p = self._protocol
        if p is not None and p.transport is not None:
            p.transport.abort()
        else:
            self._on_closed(exc)

    def _on_closed(self, exc: BaseException | None) -> None:
        self._closed = True
        if exc is not None and self._error is None:
            self._error = exc
        if self._connected is not None and not self._connected.done():
            self._connected.set_exception(ConnectionClosed("relay closed the connection during the handshake"))
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(ConnectionClosed("DERP connection closed"))

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        p = self._protocol
        self._closed = True
        if p is not None and p.transport is not None:
            t = p.transport
            t.close()
            # wait briefly for connection_lost so the socket is really gone
            for _ in range(100):
                if p.transport is None:
                    break
                await asyncio.sleep(0.01)
            if p.transport is not None:
                p.transport.abort()

    async def __aenter__(self) -> DerpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _client_ssl_context(verify: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
