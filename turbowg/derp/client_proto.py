"""Sans-IO client side of a DERP connection: ServerKey -> ClientInfo -> ServerInfo, then messages.

`receive_data(bytes)` returns the messages the bytes completed; `data_to_send()` returns bytes the
handshake produced. `receive_frames(bytes)` is the same handshake for callers that want the raw frames
after it (the mesh links and the relay benchmark, through handshake.derp_handshake). The encode
helpers in codec.py build steady-state frames (SendPacket, Ping, ...). No I/O here, so any transport
(the asyncio DerpClient, a WireGuard device later) drives the same state machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from turbowg.derp import keys
from turbowg.derp.codec import (
    MAX_INFO_LEN,
    MAX_PACKET_SIZE,
    NONCE_LEN,
    ClientInfo,
    FrameDecoder,
    FrameError,
    FrameType,
    ServerInfo,
    ServerMessage,
    decode_server_message,
    encode_client_info,
    parse_server_info,
    parse_server_key,
)
from turbowg.wire import KEY_SIZE


class ClientProtocolError(Exception):
    """The server broke the protocol (or is not the server we expected)."""


@dataclass(slots=True, frozen=True)
class Connected:
    """The handshake finished: the server accepted our ClientInfo and sent its ServerInfo."""

    server_key: bytes
    server_info: ServerInfo


class ClientState(Enum):
    AWAIT_SERVER_KEY = 1
    AWAIT_SERVER_INFO = 2
    CONNECTED = 3
    CLOSED = 4


def _client_limit(frame_type: int) -> int:
    if frame_type == FrameType.RECV_PACKET:
        return KEY_SIZE + MAX_PACKET_SIZE
    if frame_type == FrameType.SERVER_INFO:
        return NONCE_LEN + MAX_INFO_LEN
    return MAX_INFO_LEN  # derper's client reads frames of up to 1 MiB


class ClientConnection:
    __slots__ = ("_private_key", "public_key", "_info", "_expected_server_key", "_decoder", "_out", "state", "server_key")

    def __init__(
        self,
        private_key: bytes,
        *,
        mesh_key: str = "",
        can_ack_pings: bool = True,
        is_prober: bool = False,
        expected_server_key: bytes | None = None,
    ) -> None:
        self._private_key = private_key
        self.public_key = keys.public_key(private_key)
        self._info = ClientInfo(mesh_key=mesh_key, can_ack_pings=can_ack_pings, is_prober=is_prober)
        self._expected_server_key = expected_server_key
        self._decoder = FrameDecoder(_client_limit)
        self._out = bytearray()
        self.state = ClientState.AWAIT_SERVER_KEY
        self.server_key: bytes | None = None

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def decoder(self) -> FrameDecoder:
        """The frame decoder, with whatever it buffered past the frames returned so far."""
        return self._decoder

    def receive_data(self, data: bytes) -> list[ServerMessage | Connected]:
        """Messages completed by `data` (a `Connected` first, when the handshake finishes in it)."""
        if self.state is ClientState.CONNECTED:
            try:
                return [decode_server_message(ftype, payload) for ftype, payload in self._decoder.feed(data)]
            except FrameError as exc:
                self.state = ClientState.CLOSED
                raise ClientProtocolError(str(exc)) from None
        connected, frames = self.receive_frames(data)
        out: list[ServerMessage | Connected] = [] if connected is None else [connected]
        try:
            for ftype, payload in frames:
                out.append(decode_server_message(ftype, payload))
        except FrameError as exc:
            self.state = ClientState.CLOSED
            raise ClientProtocolError(str(exc)) from None
        return out

    def receive_frames(self, data: bytes) -> tuple[Connected | None, list[tuple[int, bytes]]]:
        """Runs the handshake on `data`: (Connected if it finished here, raw frames that came after it)."""
        if self.state is ClientState.CLOSED:
            return None, []
        try:
            frames = self._decoder.feed(data)
            connected: Connected | None = None
            i = 0
            while self.state is not ClientState.CONNECTED and i < len(frames):
                ftype, payload = frames[i]
                i += 1
                if self.state is ClientState.AWAIT_SERVER_KEY:
                    self._on_server_key(ftype, payload)
                else:
                    connected = self._on_server_info(ftype, payload)
            return connected, frames[i:] if i else frames
        except FrameError as exc:
            self.state = ClientState.CLOSED
            raise ClientProtocolError(str(exc)) from None

    def _on_server_key(self, ftype: int, payload: bytes) -> None:
        if ftype != FrameType.SERVER_KEY:
            raise FrameError(f"expected ServerKey frame, got type 0x{ftype:02x}")
        server_key = parse_server_key(payload)
        if self._expected_server_key is not None and server_key != self._expected_server_key:
            raise FrameError(f"server key {server_key.hex()} is not the expected {self._expected_server_key.hex()}")
        self.server_key = server_key
        try:
            sealed = keys.seal_to(self._private_key, server_key, self._info.to_json())
        except keys.LowOrderKeyError as exc:  # e.g. all zeros: no shared secret, the handshake cannot go on
            raise FrameError(f"server key is not a usable Curve25519 key: {exc}") from None
        self._out += encode_client_info(self.public_key, sealed)
        self.state = ClientState.AWAIT_SERVER_INFO

    def _on_server_info(self, ftype: int, payload: bytes) -> Connected:
        if ftype != FrameType.SERVER_INFO:
            raise FrameError(f"expected ServerInfo frame, got type 0x{ftype:02x}")
        assert self.server_key is not None
        opened = keys.open_from(self._private_key, self.server_key, parse_server_info(payload))
        if opened is None:
            raise FrameError("ServerInfo box does not open with the server's key")
        info = ServerInfo.from_json(opened)
        self.state = ClientState.CONNECTED
        return Connected(self.server_key, info)
