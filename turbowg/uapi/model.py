"""The configuration model the UAPI speaks, shared by the UAPI codec and the device.

The UAPI codec (`turbowg.uapi.protocol`) turns a `set=1` request into a `DeviceUpdate`
and a `DeviceSnapshot` into the text of a `get=1` answer; the device applies updates
and produces snapshots. Neither side knows how the other is built.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from turbowg.conn.endpoint import Endpoint

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class PeerUpdate:
    public_key: bytes  # 32 bytes
    remove: bool = False
    update_only: bool = False
    preshared_key: bytes | None = None  # 32 bytes; all-zero clears it
    endpoint: Endpoint | None = None
    persistent_keepalive_interval: int | None = None  # seconds, 0 = off
    replace_allowed_ips: bool = False
    allowed_ips: list[IPNetwork] = field(default_factory=list)  # appended after any replace
    # `allowed_ip=-PREFIX`: each removed after any replace and before `allowed_ips` are added, only if this
    # peer holds exactly that prefix (wireguard-go's allowedips.Remove).
    remove_allowed_ips: list[IPNetwork] = field(default_factory=list)
    protocol_version: int | None = None  # only 1 is accepted


@dataclass
class DeviceUpdate:
    private_key: bytes | None = None  # 32 bytes; all-zero clears it
    listen_port: int | None = None
    fwmark: int | None = None  # 0 = off
    replace_peers: bool = False
    peers: list[PeerUpdate] = field(default_factory=list)


@dataclass
class PeerSnapshot:
    public_key: bytes
    preshared_key: bytes  # 32 zero bytes when none
    endpoint: Endpoint | None
    last_handshake_time_sec: int
    last_handshake_time_nsec: int
    tx_bytes: int
    rx_bytes: int
    persistent_keepalive_interval: int
    allowed_ips: list[IPNetwork]
    protocol_version: int = 1


@dataclass
class DeviceSnapshot:
    private_key: bytes | None
    listen_port: int
    fwmark: int
    peers: list[PeerSnapshot]


__all__ = ["DeviceSnapshot", "DeviceUpdate", "Endpoint", "IPNetwork", "PeerSnapshot", "PeerUpdate", "UAPIError"]


class UAPIError(Exception):
    """A request the device refuses; `errno` is the positive errno sent back negated."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
