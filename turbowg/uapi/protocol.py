"""Sans-IO codec of the cross-platform WireGuard configuration protocol (the UAPI), as wireguard-go speaks it.

A client writes `get=1\\n\\n` or `set=1\\n` + `key=value` lines + a blank line; the device answers
(get: the configuration lines, then) `errno=N\\n\\n`, where N is 0 or a *negative* errno (wireguard-go sends
`errno=-22` for EINVAL, and `wg` turns that into "Invalid argument"). One connection may carry any number of
requests. An operation line other than `get=1`/`set=1` closes the connection, as in wireguard-go.

turbowg extension: `stats=1\n\n` answers the device's counters (drop reasons, events) as `name=value`
lines, then `errno=0`. Stock tools never send it.

Differences from wireguard-go, all deliberate:
- A `set` is parsed completely into a `DeviceUpdate` before anything is applied, so a malformed request
  changes nothing. wireguard-go applies line by line and stops at the first bad line, leaving the lines
  before it applied (and the lines after it unread, which usually kills the connection). Here the rest of
  the request is consumed and the connection stays usable.
- Error messages never echo private or preshared key values.
- Requests pipelined behind a `set` are not lost (wireguard-go's line scanner may swallow them).
- A `set` longer than MAX_REQUEST_SIZE is refused with EMSGSIZE and closes the connection (wireguard-go,
  applying as it reads, has no limit).

Line semantics reproduced from wireguard-go (device/uapi.go):
- Device keys come before the first `public_key`; after it every key is a peer key, so a device key in
  a peer section is an "invalid UAPI peer key".
- `remove=true` makes the rest of that peer's lines no-ops (still validated); it wins over everything
  else said about the peer in the request.
- `replace_allowed_ips=true` discards the allowed IPs listed before it for that peer.
- `allowed_ip` is masked to its prefix (10.0.0.7/24 -> 10.0.0.0/24); the prefix length is required.
- `allowed_ip=-PREFIX` (wireguard-go since 2025; `wg set ... allowed-ips -PREFIX` in newer wg-tools)
  removes PREFIX from the peer if the peer holds exactly that prefix, and does nothing otherwise. In line
  order: a removal cancels earlier additions of the same prefix in that peer section, an addition after a
  removal stands (the device applies replace, then removals, then additions). One corner differs:
  wireguard-go's `allowed_ip=X` then `allowed_ip=-X` for a prefix another peer holds first moves X to this
  peer, then deletes it; here the other peer keeps X.
- `endpoint` is a literal `ip:port` or `[ipv6]:port` (a zone such as `%eth0` allowed); hostnames are refused.
- Boolean keys accept only `true`; numbers are unsigned decimal within the field width.

Why one file (~450 lines): it is the codec of one protocol; request framing, the `set` parser and the `get`
encoder share the line grammar and the error rules, and most of its length is the record above of where and
why it differs from wireguard-go.
"""

from __future__ import annotations

import errno as errno_codes
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from turbowg.uapi.model import DeviceSnapshot, DeviceUpdate, IPNetwork, PeerUpdate, UAPIError

# Positive errno values; the wire carries them negated (see `status_reply`).
ERR_IO = errno_codes.EIO
ERR_PROTOCOL = errno_codes.EPROTO
ERR_INVALID = errno_codes.EINVAL
ERR_PORT_IN_USE = errno_codes.EADDRINUSE
ERR_UNKNOWN = errno_codes.ENOANO  # wireguard-go's IpcErrorUnknown: an error that is not an IPC error

# bufio.Scanner's default token limit in wireguard-go; a longer set line fails the request with EIO.
MAX_LINE_LENGTH = 64 * 1024
# The most text one `set=1` request may carry; a longer one is refused with EMSGSIZE ("Message too long")
# and the connection closed. wireguard-go applies a set line by line and so has no such limit, but a set is
# parsed whole here before anything is applied (see above), so its lines are held in memory: this bounds
# what one connection can make the daemon hold. 8 MiB is ~25,000 peers as `wg setconf` writes them
# (public key, preshared key, endpoint, keepalive, replace_allowed_ips and two allowed IPs: ~320 bytes)
# or ~350,000 allowed-IP lines, well beyond what a Python data plane serves; held as Python strings it
# costs at most ~25 MB, transiently.
MAX_REQUEST_SIZE = 8 * 1024 * 1024
ERR_TOO_BIG = errno_codes.EMSGSIZE

_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_UNSIGNED = re.compile(r"[0-9]+")
_PREFIX_BITS = re.compile(r"0|[1-9][0-9]{0,2}")
_SECRET_KEYS = frozenset({"private_key", "preshared_key"})
_ZERO_KEY = bytes(32)
_COUNTER_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class Request:
    """One complete request read from a connection.

    kind "stats" is turbowg's counters extension. kind "invalid" means an unknown operation line: log it and close the connection (as wireguard-go).
    `error` is set when the request is already known to fail before the device sees it.
    """

    kind: Literal["get", "set", "stats", "invalid"]
    lines: list[str] = field(default_factory=list)
    error: UAPIError | None = None
    operation: str = ""  # the raw operation line, for logging an invalid one


def _describe(number: int, line: str) -> str:
    key, sep, _ = line.partition("=")
    shown = f"{key}=<redacted>" if sep and key in _SECRET_KEYS else line
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return f"line {number} {shown!r}"


def _fail(code: int, number: int, line: str, reason: str) -> UAPIError:
    return UAPIError(code, f"{_describe(number, line)}: {reason}")


def _parse_unsigned(value: str, limit: int) -> int | None:
    if not _UNSIGNED.fullmatch(value):
        return None
    digits = value.lstrip("0")
    if len(digits) > len(str(limit)):  # int() refuses more than 4300 digits with a ValueError
        return None
    number = int(digits or "0")
    return number if number <= limit else None


def _parse_hex_key(value: str) -> bytes | None:
    return bytes.fromhex(value) if _HEX_KEY.fullmatch(value) else None


def parse_endpoint(value: str) -> tuple[str, int] | None:
    """`1.2.3.4:51820` or `[2001:db8::1]:51820` (zone allowed) -> (normalized host, port); None if invalid."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        return None
    port = _parse_unsigned(port_text, 0xFFFF)
    if port is None:
        return None
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    address_text, percent, zone = host.partition("%")
    if percent and (not bracketed or not zone):
        return None
    try:
        address = ipaddress.ip_address(address_text)
    except ValueError:
        return None
    # Brackets exactly when IPv6, as Go's netip.ParseAddrPort insists.
    if bracketed != (address.version == 6):
        return None
    return (format_address(address) + (f"%{zone}" if percent else ""), port)


def parse_allowed_ip(value: str) -> IPNetwork | None:
    """`10.0.0.0/24` or `fd00::/64` -> network (host bits masked off); None if invalid."""
    address_text, slash, bits_text = value.partition("/")
    if not slash or not _PREFIX_BITS.fullmatch(bits_text) or "%" in address_text:
        return None
    try:
        address = ipaddress.ip_address(address_text)
        return ipaddress.ip_network(f"{address}/{int(bits_text)}", strict=False)
    except ValueError:
        return None


def parse_set(lines: list[str]) -> DeviceUpdate:
    """Parse the `key=value` lines of a `set=1` request (without the operation and blank lines).

    Raises UAPIError naming the first bad line (1-based within `lines`) and why; nothing is half-parsed.
    """
    update = DeviceUpdate()
    peer: PeerUpdate | None = None
    for number, line in enumerate(lines, start=1):
        key, sep, value = line.partition("=")
        if not sep:
            raise _fail(ERR_PROTOCOL, number, line, "no '=' in line")
        if key == "public_key":
            public_key = _parse_hex_key(value)
            if public_key is None:
                raise _fail(ERR_INVALID, number, line, "public_key is not 64 hex digits")
            peer = PeerUpdate(public_key=public_key)
            update.peers.append(peer)
        elif peer is None:
            _parse_device_line(update, number, line, key, value)
        else:
            _parse_peer_line(peer, number, line, key, value)
    return update


def _parse_device_line(update: DeviceUpdate, number: int, line: str, key: str, value: str) -> None:
    if key == "private_key":
        private_key = _parse_hex_key(value)
        if private_key is None:
            raise _fail(ERR_INVALID, number, line, "private_key is not 64 hex digits")
        update.private_key = private_key
    elif key == "listen_port":
        port = _parse_unsigned(value, 0xFFFF)
        if port is None:
            raise _fail(ERR_INVALID, number, line, "listen_port is not a number in 0..65535")
        update.listen_port = port
    elif key == "fwmark":
        mark = _parse_unsigned(value, 0xFFFFFFFF)
        if mark is None:
            raise _fail(ERR_INVALID, number, line, "fwmark is not a number in 0..4294967295")
        update.fwmark = mark
    elif key == "replace_peers":
        if value != "true":
            raise _fail(ERR_INVALID, number, line, "replace_peers accepts only 'true'")
        update.replace_peers = True
    else:
        raise _fail(ERR_INVALID, number, line, f"invalid UAPI device key {key!r}")


def _parse_peer_line(peer: PeerUpdate, number: int, line: str, key: str, value: str) -> None:
    removed = peer.remove  # lines after remove=true are validated, then ignored (wireguard-go's dummy peer)
    if key in ("update_only", "remove", "replace_allowed_ips"):
        if value != "true":
            raise _fail(ERR_INVALID, number, line, f"{key} accepts only 'true'")
        if removed:
            return
        if key == "update_only":
            peer.update_only = True
        elif key == "remove":
            _mark_removed(peer)
        else:
            peer.replace_allowed_ips = True
            peer.allowed_ips.clear()
            peer.remove_allowed_ips.clear()
    elif key == "preshared_key":
        preshared_key = _parse_hex_key(value)
        if preshared_key is None:
            raise _fail(ERR_INVALID, number, line, "preshared_key is not 64 hex digits")
        if not removed:
            peer.preshared_key = preshared_key
    elif key == "endpoint":
        endpoint = parse_endpoint(value)
        if endpoint is None:
            raise _fail(ERR_INVALID, number, line, "endpoint is not a literal ip:port or [ipv6]:port")
        if not removed:
            peer.endpoint = endpoint
    elif key == "persistent_keepalive_interval":
        seconds = _parse_unsigned(value, 0xFFFF)
        if seconds is None:
            raise _fail(ERR_INVALID, number, line, "persistent_keepalive_interval is not a number in 0..65535")
        if not removed:
            peer.persistent_keepalive_interval = seconds
    elif key == "allowed_ip":
        removal = value.startswith("-")
        network = parse_allowed_ip(value[1:] if removal else value)
        if network is None:
            raise _fail(ERR_INVALID, number, line, "allowed_ip is not an ip/prefix-length or -ip/prefix-length")
        if removed:
            return
        if removal:
            # Later lines win: the removal cancels this section's earlier additions of the prefix.
            peer.allowed_ips[:] = [n for n in peer.allowed_ips if n != network]
            if network not in peer.remove_allowed_ips:
                peer.remove_allowed_ips.append(network)
        else:
            peer.allowed_ips.append(network)
    elif key == "protocol_version":
        if value != "1":
            raise _fail(ERR_INVALID, number, line, "only protocol_version 1 is supported")
        if not removed:
            peer.protocol_version = 1
    else:
        raise _fail(ERR_INVALID, number, line, f"invalid UAPI peer key {key!r}")


def _mark_removed(peer: PeerUpdate) -> None:
    """Removal wins: whatever else the request said about this peer is moot."""
    peer.remove = True
    peer.update_only = False
    peer.preshared_key = None
    peer.endpoint = None
    peer.persistent_keepalive_interval = None
    peer.replace_allowed_ips = False
    peer.allowed_ips.clear()
    peer.remove_allowed_ips.clear()
    peer.protocol_version = None


def format_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Address text as Go's netip prints it (IPv4-mapped IPv6 keeps its dotted quad)."""
    if address.version == 6 and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def format_endpoint(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_network(network: IPNetwork) -> str:
    return f"{format_address(network.network_address)}/{network.prefixlen}"


def format_get(snapshot: DeviceSnapshot) -> str:
    """The configuration lines of a `get=1` answer, in wireguard-go's order, without the `errno=` trailer.

    Omitted as wireguard-go does: private_key when unset/zero, listen_port and fwmark when 0, a peer's
    endpoint when it has none. Everything else per peer is always present.
    """
    out: list[str] = []
    if snapshot.private_key is not None and snapshot.private_key != _ZERO_KEY:
        out.append(f"private_key={snapshot.private_key.hex()}\n")
    if snapshot.listen_port:
        out.append(f"listen_port={snapshot.listen_port}\n")
    if snapshot.fwmark:
        out.append(f"fwmark={snapshot.fwmark}\n")
    for peer in snapshot.peers:
        out.append(f"public_key={peer.public_key.hex()}\n")
        out.append(f"preshared_key={(peer.preshared_key or _ZERO_KEY).hex()}\n")
        out.append(f"protocol_version={peer.protocol_version}\n")
        if peer.endpoint is not None:
            out.append(f"endpoint={format_endpoint(peer.endpoint)}\n")
        out.append(f"last_handshake_time_sec={peer.last_handshake_time_sec}\n")
        out.append(f"last_handshake_time_nsec={peer.last_handshake_time_nsec}\n")
        out.append(f"tx_bytes={peer.tx_bytes}\n")
        out.append(f"rx_bytes={peer.rx_bytes}\n")
        out.append(f"persistent_keepalive_interval={peer.persistent_keepalive_interval}\n")
        for network in peer.allowed_ips:
            out.append(f"allowed_ip={format_network(network)}\n")
    return "".join(out)


def stats_reply(counters: Mapping[str, int]) -> bytes:
    """The answer to `stats=1`: one `name=value` line per counter (sorted), then `errno=0`."""
    lines = [f"{name}={int(value)}\n" for name, value in sorted(counters.items()) if _COUNTER_NAME.fullmatch(name)]
    return "".join(lines).encode("ascii") + status_reply(0)


def status_reply(errno: int = 0) -> bytes:
    """The `errno=` trailer; `errno` is positive (or 0) and goes on the wire negated, as wireguard-go."""
    return f"errno={-abs(errno)}\n\n".encode("ascii")


def get_reply(snapshot: DeviceSnapshot) -> bytes:
    """The whole answer to a successful `get=1`."""
    return format_get(snapshot).encode("ascii") + status_reply(0)


class UAPIConnection:
    """Frames the byte stream of one UAPI connection into requests.

    Feed it bytes with `feed` and take the requests that became complete one at a time with `next_request`
    (or both at once with `receive_data`); `receive_eof` ends the stream. After an "invalid" request, an
    oversized line or an oversized `set` it is `closed` and ignores further input; the I/O layer should close
    the socket once its replies are written.

    What it holds is bounded: the unframed bytes are what was fed and not yet taken as requests (an I/O
    layer that feeds one read at a time and takes every request before reading again holds one read plus a
    partial line of at most MAX_LINE_LENGTH), and the lines of the `set` being read are at most
    MAX_REQUEST_SIZE bytes.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._state: Literal["operation", "get", "stats", "set", "closed"] = "operation"
        self._set_lines: list[str] = []
        self._set_size = 0

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    def feed(self, data: bytes) -> None:
        """Add bytes read from the connection; take the requests with `next_request`."""
        if self._state != "closed":
            self._buffer += data

    def next_request(self) -> Request | None:
        """The next complete request of what was fed, or None until more bytes arrive (or once closed)."""
        if self._state == "closed":
            return None
        return self._next_request()

    def receive_data(self, data: bytes) -> list[Request]:
        """`feed(data)`, then every request that became complete."""
        self.feed(data)
        requests: list[Request] = []
        while (request := self.next_request()) is not None:
            requests.append(request)
        return requests

    def receive_eof(self) -> list[Request]:
        """The peer finished writing. A `set` cut short still counts as ended, as in wireguard-go."""
        requests: list[Request] = []
        if self._state == "set":
            if self._buffer:
                self._set_lines.append(self._decode_line(bytes(self._buffer)))
            requests.append(Request("set", self._set_lines))
        self._buffer.clear()
        self._set_lines = []
        self._set_size = 0
        self._state = "closed"
        return requests

    def _next_request(self) -> Request | None:
        buffer = self._buffer
        if self._state in ("get", "stats"):
            # wireguard-go reads exactly one byte after "get=1\n" and insists it is the blank line.
            if not buffer:
                return None
            kind = "get" if self._state == "get" else "stats"
            trailing = buffer[0]
            del buffer[:1]
            self._state = "operation"
            if trailing != 0x0A:
                error = UAPIError(ERR_INVALID, f"trailing character in UAPI {kind}: {chr(trailing)!r}")
                return Request(kind, error=error)
            return Request(kind)
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > MAX_LINE_LENGTH:
                    return self._overflow()
                return None
            raw = bytes(buffer[:end])
            del buffer[: end + 1]
            if self._state == "operation":
                if raw in (b"get=1", b"stats=1"):
                    self._state = "get" if raw == b"get=1" else "stats"
                    return self._next_request()
                if raw == b"set=1":
                    self._state = "set"
                    self._set_lines = []
                    self._set_size = 0
                    continue
                self._state = "closed"
                buffer.clear()
                return Request("invalid", operation=raw[:200].decode("utf-8", "replace"))
            # state "set"
            if len(raw) > MAX_LINE_LENGTH:
                return self._overflow()
            self._set_size += end + 1
            if self._set_size > MAX_REQUEST_SIZE:
                return self._too_big()
            line = self._decode_line(raw)
            if line == "":
                lines, self._set_lines = self._set_lines, []
                self._state = "operation"
                return Request("set", lines)
            self._set_lines.append(line)

    @staticmethod
    def _decode_line(raw: bytes) -> str:
        if raw.endswith(b"\r"):  # bufio.ScanLines drops one trailing CR
            raw = raw[:-1]
        return raw.decode("utf-8", "replace")

    def _close(self) -> None:
        self._state = "closed"
        self._buffer.clear()
        self._set_lines = []
        self._set_size = 0

    def _too_big(self) -> Request:
        self._close()
        return Request("set", error=UAPIError(
            ERR_TOO_BIG, f"set request longer than {MAX_REQUEST_SIZE} bytes ({MAX_REQUEST_SIZE >> 20} MiB): "
                         "nothing applied, closing the connection"))

    def _overflow(self) -> Request:
        was_set = self._state == "set"
        self._close()
        if was_set:
            return Request("set", error=UAPIError(ERR_IO, f"line longer than {MAX_LINE_LENGTH} bytes"))
        return Request("invalid", operation=f"<operation line longer than {MAX_LINE_LENGTH} bytes>")
