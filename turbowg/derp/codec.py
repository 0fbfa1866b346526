"""Sans-IO DERP frame codec (protocol version 2, wire-compatible with Tailscale's derper).

A frame is a 1-byte type, a 4-byte big-endian payload length, then the payload. This module builds
and parses every frame type and the JSON bodies of the handshake; it never touches sockets.

Why one file of ~500 lines: it is one table -- each frame type's encoder, parser and message class --
and the client, the server and the fuzz targets all need all of it; split by direction, each frame's
two halves would live apart.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from turbowg.wire import KEY_SIZE

MAGIC = b"DERP\xf0\x9f\x94\x91"  # "DERP🔑"
PROTOCOL_VERSION = 2
NONCE_LEN = 24
FRAME_HEADER_LEN = 5
MAX_PACKET_SIZE = 64 << 10
MAX_CLIENT_INFO_LEN = 256 << 10  # derper refuses a longer ClientInfo before opening it
MAX_INFO_LEN = 1 << 20  # largest ServerInfo a client accepts
MAX_PING_LEN = 1000  # derper tolerates some extension bytes after the 8-byte ping payload
MAX_UNKNOWN_FRAME_LEN = MAX_PACKET_SIZE + KEY_SIZE  # derper's maxUnknownFrameLen

DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"  # "TS💬", Tailscale disco message wrapper
_DISCO_MIN_LEN = len(DISCO_MAGIC) + KEY_SIZE + NONCE_LEN


class FrameType(IntEnum):
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(IntEnum):
    DISCONNECTED = 0x00  # peer disconnected from this server
    NOT_HERE = 0x01  # server has no record of the peer


class PeerPresentFlags(IntEnum):
    REGULAR = 1 << 0
    MESH_PEER = 1 << 1
    PROBER = 1 << 2
    NOT_IDEAL = 1 << 3


class FrameError(ValueError):
    """A frame that breaks the protocol; the connection carrying it must be closed."""


_HEADER = struct.Struct(">BI")
_U32X2 = struct.Struct(">II")
_PORT = struct.Struct(">H")
pack_header: Callable[[int, int], bytes] = _HEADER.pack


def looks_like_disco(packet: bytes) -> bool:
    """Same test as Tailscale's disco.LooksLikeDiscoWrapper (decides drop 'kind' and PeerGone replies)."""
    return len(packet) >= _DISCO_MIN_LEN and packet.startswith(DISCO_MAGIC)


# ---------------------------------------------------------------------------------------------------
# Encoding


def encode_frame(frame_type: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(frame_type, len(payload)) + payload


def _check_key(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise ValueError(f"DERP keys are {KEY_SIZE} bytes, got {len(key)}")


def encode_server_key(server_public: bytes) -> bytes:
    _check_key(server_public)
    return encode_frame(FrameType.SERVER_KEY, MAGIC + server_public)


def encode_client_info(client_public: bytes, sealed_info: bytes) -> bytes:
    """`sealed_info` is nonce + NaCl box of the ClientInfo JSON (keys.seal_to)."""
    _check_key(client_public)
    return encode_frame(FrameType.CLIENT_INFO, client_public + sealed_info)


def encode_server_info(sealed_info: bytes) -> bytes:
    return encode_frame(FrameType.SERVER_INFO, sealed_info)


def encode_send_packet(dst: bytes, packet: bytes) -> bytes:
    _check_key(dst)
    if len(packet) > MAX_PACKET_SIZE:
        raise ValueError(f"packet of {len(packet)} bytes exceeds DERP maximum {MAX_PACKET_SIZE}")
    return _HEADER.pack(FrameType.SEND_PACKET, KEY_SIZE + len(packet)) + dst + packet


def encode_recv_packet(src: bytes, packet: bytes) -> bytes:
    return _HEADER.pack(FrameType.RECV_PACKET, KEY_SIZE + len(packet)) + src + packet


def encode_forward_packet(src: bytes, dst: bytes, packet: bytes) -> bytes:
    _check_key(src)
    _check_key(dst)
    if len(packet) > MAX_PACKET_SIZE:
        raise ValueError(f"packet of {len(packet)} bytes exceeds DERP maximum {MAX_PACKET_SIZE}")
    return _HEADER.pack(FrameType.FORWARD_PACKET, 2 * KEY_SIZE + len(packet)) + src + dst + packet


KEEP_ALIVE_FRAME = encode_frame(FrameType.KEEP_ALIVE)
WATCH_CONNS_FRAME = encode_frame(FrameType.WATCH_CONNS)


def encode_keep_alive() -> bytes:
    return KEEP_ALIVE_FRAME


def encode_note_preferred(preferred: bool) -> bytes:
    return encode_frame(FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00")


def encode_peer_gone(peer: bytes, reason: int = PeerGoneReason.DISCONNECTED) -> bytes:
    _check_key(peer)
    return encode_frame(FrameType.PEER_GONE, peer + bytes((reason,)))


def ip_to_16(ip: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bytes:
    """16-byte form of an address as Go's netip.Addr.As16 (IPv4 becomes ::ffff:a.b.c.d)."""
    if ip is None:
        return bytes(16)
    if isinstance(ip, bytes):
        if len(ip) == 16:
            return ip
        if len(ip) == 4:
            return b"\x00" * 10 + b"\xff\xff" + ip
        raise ValueError("IP address must be 4 or 16 bytes")
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + addr.packed
    return addr.packed


def encode_peer_present(
    peer: bytes, ip: str | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
    port: int = 0, flags: int = PeerPresentFlags.REGULAR,
) -> bytes:
    _check_key(peer)
    return encode_frame(FrameType.PEER_PRESENT, peer + ip_to_16(ip) + _PORT.pack(port) + bytes((flags,)))


def encode_close_peer(peer: bytes) -> bytes:
    _check_key(peer)
    return encode_frame(FrameType.CLOSE_PEER, peer)


def encode_ping(data: bytes) -> bytes:
    if len(data) != 8:
        raise ValueError("ping payload is 8 bytes")
    return encode_frame(FrameType.PING, data)


def encode_pong(data: bytes) -> bytes:
    if len(data) != 8:
        raise ValueError("pong payload is 8 bytes")
    return encode_frame(FrameType.PONG, data)


def encode_health(problem: str) -> bytes:
    return encode_frame(FrameType.HEALTH, problem.encode())


def encode_restarting(reconnect_in_ms: int, try_for_ms: int) -> bytes:
    return encode_frame(FrameType.RESTARTING, _U32X2.pack(reconnect_in_ms, try_for_ms))


# ---------------------------------------------------------------------------------------------------
# Incremental decoding


class FrameDecoder:
    """Splits a byte stream into (type, payload) frames.

    `limit(frame_type)` gives the largest payload accepted for a type; a header over it raises
    FrameError before any of the payload is buffered, so a peer cannot make us hold a huge frame.
    """

    __slots__ = ("_buf", "_limit")

    def __init__(self, limit: Callable[[int], int]) -> None:
        self._buf = bytearray()
        self._limit = limit

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def set_limit(self, limit: Callable[[int], int]) -> None:
        """Change the size limits, keeping any bytes already buffered (e.g. after a handshake)."""
        self._limit = limit

    def feed(self, data: bytes, max_frames: int = 0) -> list[tuple[int, bytes]]:
        """Frames completed by `data`; with `max_frames` > 0, stop after that many (rest stays buffered)."""
        buf = self._buf
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        frames: list[tuple[int, bytes]] = []
        off = 0
        end = len(view)
        unpack = _HEADER.unpack_from
        limit = self._limit
        while end - off >= FRAME_HEADER_LEN:
            ftype, flen = unpack(view, off)
            if flen > limit(ftype):
                raise FrameError(f"frame type 0x{ftype:02x} length {flen} exceeds limit {limit(ftype)}")
            stop = off + FRAME_HEADER_LEN + flen
            if stop > end:
                break
            frames.append((ftype, bytes(view[off + FRAME_HEADER_LEN : stop])))
            off = stop
            if max_frames and len(frames) >= max_frames:
                break
        if view is buf:
            del buf[:off]
        elif off < end:
            buf += data[off:]
        return frames

    def feed_packets(
        self, data: bytes | bytearray | memoryview, out: bytearray, chunks: list[int], sources: list[bytes],
        divert: bytes = b"",
    ) -> list[tuple[int, bytes]]:
        """The batch form of `feed` for a client's receive path: no Python object per packet.

        Every complete RecvPacket frame in the buffered bytes + `data` appends its packet to `out`;
        consecutive packets from one source form runs as a UDP GRO read does -- equal sizes, the last of
        a run maybe shorter -- and each run appends (start, end, stride) to `chunks` and its source key
        (one bytes object per run) to `sources`. Returned, in order: every other frame as (type, payload),
        and RecvPackets whose packet is empty or starts with `divert` (when given) as ordinary frames.
        Same limits and FrameError as `feed`; after a FrameError `out`/`chunks`/`sources` may hold part
        of the batch and the connection must be closed, as with `feed`."""
        buf = self._buf
        if buf:
            buf += data
            view: bytes | bytearray | memoryview = buf
        else:
            view = data
        mv = memoryview(view)
        frames: list[tuple[int, bytes]] = []
        off = 0
        end = len(view)
        unpack = _HEADER.unpack_from
        limit = self._limit
        recv_type = FrameType.RECV_PACKET.value
        recv_limit = limit(recv_type)
        header_key = FRAME_HEADER_LEN + KEY_SIZE
        key: bytes = b""
        stride = 0
        open_run = False  # the last run may take more packets of its stride
        startswith = view.startswith if not isinstance(view, memoryview) else bytes(view).startswith
        try:
            while end - off >= FRAME_HEADER_LEN:
                ftype, flen = unpack(view, off)
                stop = off + FRAME_HEADER_LEN + flen
                if ftype == recv_type and KEY_SIZE < flen <= recv_limit:
                    if stop > end:
                        break
                    size = flen - KEY_SIZE
                    if divert and startswith(divert, off + header_key):
                        frames.append((ftype, bytes(mv[off + FRAME_HEADER_LEN : stop])))
                    else:
                        o_end = len(out)
                        if open_run and size <= stride and startswith(key, off + FRAME_HEADER_LEN):
                            chunks[-2] = o_end + size
                            open_run = size == stride
                        else:
                            key = bytes(mv[off + FRAME_HEADER_LEN : off + header_key])
                            chunks += (o_end, o_end + size, size)
                            sources.append(key)
                            stride = size
                            open_run = True
                        out += mv[off + header_key : stop]
                    off = stop
                    continue
                if flen > limit(ftype):
                    raise FrameError(f"frame type 0x{ftype:02x} length {flen} exceeds limit {limit(ftype)}")
                if stop > end:
                    break
                frames.append((ftype, bytes(mv[off + FRAME_HEADER_LEN : stop])))
                off = stop
        finally:
            mv.release()
        if view is buf:
            del buf[:off]
        elif off < end:
            buf += data[off:]
        return frames


# ---------------------------------------------------------------------------------------------------
# Payload parsing (both directions)


def parse_server_key(payload: bytes) -> bytes:
    """Returns the server's public key; later bytes are reserved for future use, as derper."""
    if len(payload) < len(MAGIC) + KEY_SIZE:
        raise FrameError("short ServerKey frame")
    if payload[: len(MAGIC)] != MAGIC:
        raise FrameError("bad DERP magic")
    return payload[len(MAGIC) : len(MAGIC) + KEY_SIZE]


def parse_client_info(payload: bytes) -> tuple[bytes, bytes]:
    """(client public key, sealed info = nonce + box)."""
    if len(payload) < KEY_SIZE + NONCE_LEN:
        raise FrameError("short ClientInfo frame")
    if len(payload) > MAX_CLIENT_INFO_LEN:
        raise FrameError("long ClientInfo frame")
    return payload[:KEY_SIZE], payload[KEY_SIZE:]


def parse_server_info(payload: bytes) -> bytes:
    if len(payload) < NONCE_LEN:
        raise FrameError("short ServerInfo frame")
    if len(payload) > NONCE_LEN + MAX_INFO_LEN:
        raise FrameError("long ServerInfo frame")
    return payload


def parse_send_packet(payload: bytes) -> tuple[bytes, bytes]:
    """(destination key, packet)."""
    if len(payload) < KEY_SIZE:
        raise FrameError("short SendPacket frame")
    if len(payload) - KEY_SIZE > MAX_PACKET_SIZE:
        raise FrameError("SendPacket packet exceeds 64 KiB")
    return payload[:KEY_SIZE], payload[KEY_SIZE:]


def parse_recv_packet(payload: bytes) -> tuple[bytes, bytes]:
    """(source key, packet)."""
    if len(payload) < KEY_SIZE:
        raise FrameError("short RecvPacket frame")
    return payload[:KEY_SIZE], payload[KEY_SIZE:]


def parse_forward_packet(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """(source key, destination key, packet)."""
    if len(payload) < 2 * KEY_SIZE:
        raise FrameError("short ForwardPacket frame")
    if len(payload) - 2 * KEY_SIZE > MAX_PACKET_SIZE:
        raise FrameError("ForwardPacket packet exceeds 64 KiB")
    return payload[:KEY_SIZE], payload[KEY_SIZE : 2 * KEY_SIZE], payload[2 * KEY_SIZE :]


def parse_note_preferred(payload: bytes) -> bool:
    if len(payload) != 1:
        raise FrameError("NotePreferred frame is 1 byte")
    return payload[0] != 0


def parse_key_frame(payload: bytes, name: str) -> bytes:
    if len(payload) != KEY_SIZE:
        raise FrameError(f"{name} frame is {KEY_SIZE} bytes")
    return payload


def parse_ping(payload: bytes) -> bytes:
    """The 8 bytes to echo; extra bytes (up to MAX_PING_LEN) are tolerated for extensibility."""
    if len(payload) < 8:
        raise FrameError("short Ping frame")
    if len(payload) > MAX_PING_LEN:
        raise FrameError("Ping frame too large")
    return payload[:8]


@dataclass(slots=True, frozen=True)
class ReceivedPacket:
    source: bytes
    data: bytes


@dataclass(slots=True, frozen=True)
class PeerGone:
    peer: bytes
    reason: int


@dataclass(slots=True, frozen=True)
class PeerPresent:
    peer: bytes
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    port: int
    flags: int


@dataclass(slots=True, frozen=True)
class KeepAlive:
    pass


@dataclass(slots=True, frozen=True)
class Ping:
    data: bytes


@dataclass(slots=True, frozen=True)
class Pong:
    data: bytes


@dataclass(slots=True, frozen=True)
class Health:
    problem: str  # empty clears the error state


@dataclass(slots=True, frozen=True)
class ServerRestarting:
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(slots=True, frozen=True)
class UnknownFrame:
    frame_type: int
    payload: bytes


ServerMessage = (
    ReceivedPacket | PeerGone | PeerPresent | KeepAlive | Ping | Pong | Health | ServerRestarting | UnknownFrame
)

_KEEP_ALIVE = KeepAlive()


def parse_peer_present(payload: bytes) -> PeerPresent:
    """At least a key; then optionally 16-byte IP + 2-byte port, then optionally a flags byte."""
    if len(payload) < KEY_SIZE:
        raise FrameError("short PeerPresent frame")
    peer = payload[:KEY_SIZE]
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    port = 0
    flags = 0
    if len(payload) >= KEY_SIZE + 18:
        raw = payload[KEY_SIZE : KEY_SIZE + 16]
        addr6 = ipaddress.IPv6Address(raw)
        ip = addr6.ipv4_mapped or addr6
        (port,) = _PORT.unpack_from(payload, KEY_SIZE + 16)
        if len(payload) >= KEY_SIZE + 19:
            flags = payload[KEY_SIZE + 18]
    return PeerPresent(peer, ip, port, flags)


def decode_server_message(frame_type: int, payload: bytes) -> ServerMessage:
    """Decode a steady-state server-to-client frame (what a DERP client receives)."""
    if frame_type == FrameType.RECV_PACKET:
        src, data = parse_recv_packet(payload)
        return ReceivedPacket(src, data)
    if frame_type == FrameType.KEEP_ALIVE:
        return _KEEP_ALIVE
    if frame_type == FrameType.PEER_GONE:
        if len(payload) < KEY_SIZE:
            raise FrameError("short PeerGone frame")
        reason = payload[KEY_SIZE] if len(payload) > KEY_SIZE else PeerGoneReason.DISCONNECTED
        return PeerGone(payload[:KEY_SIZE], reason)
    if frame_type == FrameType.PEER_PRESENT:
        return parse_peer_present(payload)
    if frame_type == FrameType.PING:
        if len(payload) < 8:
            raise FrameError("short Ping frame")
        return Ping(payload[:8])
    if frame_type == FrameType.PONG:
        if len(payload) < 8:
            raise FrameError("short Pong frame")
        return Pong(payload[:8])
    if frame_type == FrameType.HEALTH:
        return Health(payload.decode("utf-8", "replace"))
    if frame_type == FrameType.RESTARTING:
        if len(payload) < 8:
            raise FrameError("short Restarting frame")
        reconnect, try_for = _U32X2.unpack_from(payload)
        return ServerRestarting(reconnect, try_for)
    return UnknownFrame(frame_type, payload)


# ---------------------------------------------------------------------------------------------------
# Handshake JSON bodies


def _lower_keys(obj: object) -> dict[str, object]:
    # Go's encoding/json matches field names case-insensitively; so does derper, so we do too.
    if not isinstance(obj, dict):
        raise FrameError("info JSON is not an object")
    return {str(k).lower(): v for k, v in obj.items()}


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1  # Go's int on the 64-bit hosts derper runs on


def _json_int(fields: dict[str, object], name: str, what: str) -> int:
    # Go's json.Unmarshal into an int field: absent or null leaves 0; a bool, float, string, ... or an
    # int64 overflow is an UnmarshalTypeError, which derper (and its client) treat as a failed handshake.
    # bool is checked first: Python's True is an int.
    value = fields.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not _INT64_MIN <= value <= _INT64_MAX:
        raise FrameError(f"{what} {name} is not a 64-bit integer")
    return value


def _json_bool(fields: dict[str, object], name: str, what: str) -> bool:
    value = fields.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise FrameError(f"{what} {name} is not a boolean")
    return value


def _json_str(fields: dict[str, object], name: str, what: str) -> str:
    value = fields.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FrameError(f"{what} {name} is not a string")
    return value


@dataclass(slots=True, frozen=True)
class ClientInfo:
    version: int = PROTOCOL_VERSION
    mesh_key: str = ""
    can_ack_pings: bool = True
    is_prober: bool = False

    def to_json(self) -> bytes:
        # Field names exactly as derp.ClientInfo's JSON tags: meshKey/version (omitempty), CanAckPings
        # (untagged, always present), IsProber (omitempty).
        body: dict[str, object] = {}
        if self.mesh_key:
            body["meshKey"] = self.mesh_key
        if self.version:
            body["version"] = self.version
        body["CanAckPings"] = self.can_ack_pings
        if self.is_prober:
            body["IsProber"] = True
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ClientInfo:
        try:
            fields = _lower_keys(json.loads(raw))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: '[' * 100000
            raise FrameError(f"bad ClientInfo JSON: {exc}") from None
        return cls(
            version=_json_int(fields, "version", "ClientInfo"),
            mesh_key=_json_str(fields, "meshkey", "ClientInfo"),
            can_ack_pings=_json_bool(fields, "canackpings", "ClientInfo"),
            is_prober=_json_bool(fields, "isprober", "ClientInfo"),
        )


@dataclass(slots=True, frozen=True)
class ServerInfo:
    version: int = PROTOCOL_VERSION

    def to_json(self) -> bytes:
        return json.dumps({"version": self.version}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ServerInfo:
        try:
            fields = _lower_keys(json.loads(raw))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: '[' * 100000
            raise FrameError(f"bad ServerInfo JSON: {exc}") from None
        # derper's serverInfo also has the token-bucket ints; unused here, but typed as Go would check them.
        _json_int(fields, "tokenbucketbytespersecond", "ServerInfo")
        _json_int(fields, "tokenbucketbytesburst", "ServerInfo")
        return cls(version=_json_int(fields, "version", "ServerInfo"))
