"""Sans-IO server side of one DERP connection: handshake, frame validation and dispatch.

Bytes go in through `receive_data`; what they mean comes out as calls on a `ServerEvents` handler.
A protocol violation raises `ProtocolError`, after which the caller must close the connection (as
derper does: any error from a frame handler ends the connection).
"""

from __future__ import annotations

import hmac
import struct
from enum import Enum
from typing import Protocol

from turbowg.derp import keys
from turbowg.derp.codec import (
    FRAME_HEADER_LEN,
    MAX_CLIENT_INFO_LEN,
    MAX_PACKET_SIZE,
    MAX_PING_LEN,
    MAX_UNKNOWN_FRAME_LEN,
    NONCE_LEN,
    ClientInfo,
    FrameError,
    FrameType,
    ServerInfo,
    encode_frame,
    encode_server_key,
    parse_client_info,
    parse_forward_packet,
    parse_key_frame,
    parse_note_preferred,
    parse_ping,
    parse_send_packet,
)
from turbowg.wire import KEY_SIZE


class ProtocolError(Exception):
    """The peer broke the protocol; close the connection."""


class ServerEvents(Protocol):
    """What a server connection reports. Implemented by the I/O layer (conn.py's ClientConn) and by tests."""

    def on_authenticated(self, client_key: bytes, info: ClientInfo, can_mesh: bool, server_info_frame: bytes) -> None:
        """The ClientInfo opened: register the client, then write `server_info_frame` to it."""

    def on_send_packet(self, dst: bytes, packet: bytes) -> None: ...

    def on_forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> None: ...

    def on_note_preferred(self, preferred: bool) -> None: ...

    def on_watch_conns(self) -> None: ...

    def on_close_peer(self, peer: bytes) -> None: ...

    def on_ping(self, data: bytes) -> None: ...

    def on_unknown_frame(self, frame_type: int, length: int) -> None: ...


_SEND_PACKET = int(FrameType.SEND_PACKET)
_unpack_header = struct.Struct(">BI").unpack_from


class ServerState(Enum):
    AWAIT_CLIENT_INFO = 1
    ESTABLISHED = 2
    CLOSED = 3


def _handshake_limit(frame_type: int) -> int:
    # Before the client is authenticated only a ClientInfo is acceptable, and at most 256 KiB of it.
    return MAX_CLIENT_INFO_LEN if frame_type == FrameType.CLIENT_INFO else 0


_LIMITS: dict[int, int] = {
    FrameType.SEND_PACKET: KEY_SIZE + MAX_PACKET_SIZE,
    FrameType.FORWARD_PACKET: 2 * KEY_SIZE + MAX_PACKET_SIZE,
    FrameType.NOTE_PREFERRED: 1,
    FrameType.WATCH_CONNS: 0,
    FrameType.CLOSE_PEER: KEY_SIZE,
    FrameType.PING: MAX_PING_LEN,
    FrameType.KEEP_ALIVE: MAX_UNKNOWN_FRAME_LEN,
    FrameType.PONG: MAX_UNKNOWN_FRAME_LEN,
}


def _established_limit(frame_type: int) -> int:
    return _LIMITS.get(frame_type, MAX_UNKNOWN_FRAME_LEN)


class ServerConnection:
    """One client connection as the server sees it, from ServerKey to close."""

    __slots__ = (
        "_private_key", "public_key", "_mesh_key", "_events", "_pending", "_limit", "state",
        "client_key", "info", "can_mesh",
    )

    def __init__(self, private_key: bytes, events: ServerEvents, *, mesh_key: str = "", public_key: bytes | None = None) -> None:
        self._private_key = private_key
        self.public_key = public_key if public_key is not None else keys.public_key(private_key)
        self._mesh_key = mesh_key
        self._events = events
        self._pending = b""
        self._limit = _handshake_limit
        self.state = ServerState.AWAIT_CLIENT_INFO
        self.client_key: bytes | None = None
        self.info: ClientInfo | None = None
        self.can_mesh = False

    def initial_bytes(self) -> bytes:
        """The ServerKey frame, sent as soon as the connection is (upgraded to) DERP."""
        return encode_server_key(self.public_key)

    def close(self) -> None:
        self.state = ServerState.CLOSED

    def take_pending(self) -> bytes:
        """The bytes received after the last whole frame, which this parser then forgets: whoever takes
        over the stream (fastpath.FastPlane.take) continues from them."""
        pending, self._pending = self._pending, b""
        return pending

    def receive_data(self, data: bytes) -> None:
        if self.state is ServerState.CLOSED:
            return
        try:
            self._receive(data if isinstance(data, bytes) else bytes(data))
        except FrameError as exc:
            self.state = ServerState.CLOSED
            raise ProtocolError(str(exc)) from None

    def _receive(self, data: bytes) -> None:
        # Hot path. Frames are parsed straight out of `data` (one copy per packet, into the bytes
        # handed to on_send_packet); only a frame split across reads is assembled in `_pending`.
        off = 0
        pending = self._pending
        if pending:
            have = len(pending)
            if have < FRAME_HEADER_LEN:
                off = min(FRAME_HEADER_LEN - have, len(data))
                pending += data[:off]
                if len(pending) < FRAME_HEADER_LEN:
                    self._pending = pending
                    return
            ftype, flen = _unpack_header(pending, 0)
            if flen > self._limit(ftype):
                raise FrameError(f"frame type 0x{ftype:02x} length {flen} exceeds limit {self._limit(ftype)}")
            total = FRAME_HEADER_LEN + flen
            take = min(total - len(pending), len(data) - off)
            if take:
                pending += data[off : off + take]
                off += take
            if len(pending) < total:
                self._pending = pending
                return
            self._pending = b""
            self._frame(ftype, pending[FRAME_HEADER_LEN:])
        end = len(data)
        events = self._events
        limit = self._limit
        established = ServerState.ESTABLISHED
        while end - off >= FRAME_HEADER_LEN:
            if self.state is not established and self.state is not ServerState.AWAIT_CLIENT_INFO:
                return  # a handler closed the connection
            ftype, flen = _unpack_header(data, off)
            if flen > limit(ftype):
                raise FrameError(f"frame type 0x{ftype:02x} length {flen} exceeds limit {limit(ftype)}")
            stop = off + FRAME_HEADER_LEN + flen
            if stop > end:
                break
            if ftype == _SEND_PACKET and self.state is established:
                if flen < KEY_SIZE:
                    raise FrameError("short SendPacket frame")
                key_end = off + FRAME_HEADER_LEN + KEY_SIZE
                events.on_send_packet(data[off + FRAME_HEADER_LEN : key_end], data[key_end:stop])
            else:
                self._frame(ftype, data[off + FRAME_HEADER_LEN : stop])
                limit = self._limit  # the handshake changes the limits
            off = stop
        if off < end and self.state is not ServerState.CLOSED:
            self._pending = data[off:]

    def _frame(self, ftype: int, payload: bytes) -> None:
        state = self.state
        if state is ServerState.ESTABLISHED:
            if ftype == _SEND_PACKET:
                dst, packet = parse_send_packet(payload)
                self._events.on_send_packet(dst, packet)
            else:
                self._dispatch_other(ftype, payload)
        elif state is ServerState.AWAIT_CLIENT_INFO:
            self._handshake(ftype, payload)

    def _handshake(self, ftype: int, payload: bytes) -> None:
        self.state = ServerState.CLOSED  # until proven otherwise
        if ftype != FrameType.CLIENT_INFO:
            raise ProtocolError(f"expected ClientInfo frame, got type 0x{ftype:02x}")
        try:
            client_key, sealed = parse_client_info(payload)
        except FrameError as exc:
            raise ProtocolError(str(exc)) from None
        if len(sealed) < NONCE_LEN:
            raise ProtocolError("short ClientInfo frame")
        opened = keys.open_from(self._private_key, client_key, sealed)
        if opened is None:
            raise ProtocolError("ClientInfo box does not open with the client's key")
        try:
            info = ClientInfo.from_json(opened)
        except FrameError as exc:
            raise ProtocolError(str(exc)) from None
        can_mesh = bool(self._mesh_key) and bool(info.mesh_key) and hmac.compare_digest(
            info.mesh_key.encode("utf-8", "surrogatepass"), self._mesh_key.encode()  # JSON "\ud800" is a lone surrogate
        )
        self.client_key = client_key
        self.info = info
        self.can_mesh = can_mesh
        self.state = ServerState.ESTABLISHED
        self._limit = _established_limit
        sealed_info = keys.seal_to(self._private_key, client_key, ServerInfo().to_json())
        self._events.on_authenticated(client_key, info, can_mesh, encode_frame(FrameType.SERVER_INFO, sealed_info))

    def _dispatch_other(self, ftype: int, payload: bytes) -> None:
        events = self._events
        if ftype == FrameType.FORWARD_PACKET:
            self._require_mesh("ForwardPacket")
            src, dst, packet = parse_forward_packet(payload)
            events.on_forward_packet(src, dst, packet)
        elif ftype == FrameType.PING:
            events.on_ping(parse_ping(payload))
        elif ftype == FrameType.NOTE_PREFERRED:
            events.on_note_preferred(parse_note_preferred(payload))
        elif ftype == FrameType.WATCH_CONNS:
            if payload:
                raise FrameError("WatchConns frame has no payload")
            self._require_mesh("WatchConns")
            events.on_watch_conns()
        elif ftype == FrameType.CLOSE_PEER:
            peer = parse_key_frame(payload, "ClosePeer")
            self._require_mesh("ClosePeer")
            events.on_close_peer(peer)
        elif ftype in (FrameType.KEEP_ALIVE, FrameType.PONG):
            pass  # liveness only
        else:
            events.on_unknown_frame(ftype, len(payload))

    def _require_mesh(self, what: str) -> None:
        if not self.can_mesh:
            raise FrameError(f"{what} needs the mesh key: insufficient permissions")
