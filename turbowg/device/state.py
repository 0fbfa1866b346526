"""The state every job of the device reads (send.py, receive.py, handshake.py, config.py, device.py).

`Device` (device.py) is composed of one class per job, as wireguard-go spreads the methods of its one Device
type over send.go, receive.go, noise-protocol.go and uapi.go. `DeviceState` declares the fields they share
(set in `Device.__init__`), the one helper all of them use, and the methods one job calls in another's file
(declared here so that each file stands on its own; `Device` gets the real ones first in its MRO).
"""

from __future__ import annotations

import random
from array import array
from collections import Counter
from collections.abc import Callable

from turbowg.conn.endpoint import Endpoint
from turbowg.device.allowedips import AllowedIPs
from turbowg.device.indextable import IndexTable
from turbowg.device.keypair import Keypair
from turbowg.device.output import Out, add_datagram
from turbowg.device.peer import Peer
from turbowg.device.timers import Schedule
from turbowg.noise.cookie import CookieChecker
from turbowg.noise.handshake import LocalIdentity


class DeviceState:
    mtu: int
    up: bool  # whether the interface is up: the runtime may clear it; nothing is sent while down
    listen_port: int
    fwmark: int
    peers: dict[bytes, Peer]  # public key -> peer, in configuration order
    allowed_ips: AllowedIPs[Peer]
    counters: Counter[str]  # drop reason / event -> count
    _indices: IndexTable
    _identity: LocalIdentity | None
    _cookie_checker: CookieChecker | None
    _schedule: Schedule
    _queued: Out  # output produced outside a batch call (by apply_update), handed out by the next tick
    _wall_clock: Callable[[], float]
    _clock: Callable[[], float]
    _rng: random.Random
    _jitter_rng: random.Random  # timer jitter (not secret)
    tx_buffer: bytearray
    tx_sizes: array
    rx_layout: array

    def _emit(self, peer: Peer, datagram: bytes | bytearray, out: Out) -> None:
        """Queue one datagram (a handshake message) for the peer's endpoint."""
        endpoint = peer.endpoint
        if endpoint is None:
            self.counters["tx_no_endpoint"] += 1
            return
        add_datagram(out, endpoint, datagram)
        peer.tx_bytes += len(datagram)

    # -- implemented in the other job files ---------------------------------------------------------------

    def _initiate_handshake(self, peer: Peer, now: float, out: Out, retry: bool = False) -> None:
        raise NotImplementedError  # handshake.py

    def _handle_handshake_message(self, kind: int, data: bytes, endpoint: Endpoint, now: float,
                                  under_load: bool, out: Out) -> None:
        raise NotImplementedError  # handshake.py

    def _confirm_keypair(self, peer: Peer, keypair: Keypair, now: float, out: Out) -> None:
        raise NotImplementedError  # handshake.py

    def _expire_current_keypairs(self, peer: Peer) -> None:
        raise NotImplementedError  # handshake.py

    def _send_keepalive(self, peer: Peer, now: float, out: Out) -> None:
        raise NotImplementedError  # send.py

    def _send_staged(self, peer: Peer, now: float, out: Out) -> None:
        raise NotImplementedError  # send.py

    def _remove_peer(self, peer: Peer) -> None:
        raise NotImplementedError  # config.py
