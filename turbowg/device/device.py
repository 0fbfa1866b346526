"""The sans-IO WireGuard device: batches of TUN packets and UDP datagrams in, batches out.

`Device` owns the peers, the allowed-IPs table, the index table (indextable.py) and the local identity.
The runtime (turbowg/daemon/runtime.py) feeds it

* `handle_tun_packed(buf, layout, runs, now)` (send.py): IP packets read from the TUN, back to back in
  `buf` -> sealed messages in `tx_buffer` per endpoint (PackedTransmit) + other datagrams,
* `handle_udp_packed(buf, chunks, endpoints, now, under_load)` (receive.py): UDP reads (GRO runs of equal
  datagrams) -> inner packets opened in place, described by `rx_layout` + datagrams to send,
* `apply_update(update)` (config.py): a UAPI `set`,
* `tick(now)` (here): timers -> datagrams to send, whenever `next_deadline()` comes,

and sends each PackedTransmit / `Transmit` (one endpoint, many datagrams: a natural GSO batch).
`handle_tun_batch` / `handle_udp_batch` are the same paths for packets held as objects (the protocol tests
drive them). Handshakes are driven by handshake.py. Nothing here touches a socket or a clock except through
arguments. Malformed or unauthenticated input is dropped, counted in `Device.counters` and never answered
(except cookie replies under load).
"""

from __future__ import annotations

import math
import random
import time
from array import array
from collections import Counter
from collections.abc import Callable

from turbowg.device.allowedips import AllowedIPs
from turbowg.device.config import Configuration
from turbowg.device.constants import DEFAULT_MTU
from turbowg.device.handshake import HandshakeDriver
from turbowg.device.indextable import IndexTable
from turbowg.device.output import Out, Outgoing, PackedTransmit, Transmit, transmits
from turbowg.device.peer import Peer
from turbowg.device.receive import RX_MAX_PACKETS, ReceivePath
from turbowg.device.send import TX_BUFFER_SIZE, TX_MAX_MESSAGES, SendPath
from turbowg.device.timers import Schedule, TimerAction
from turbowg.uapi.model import DeviceSnapshot, PeerSnapshot
from turbowg.wire import MAX_MESSAGE_SIZE, TRANSPORT_MIN_SIZE

__all__ = ["Device", "Outgoing", "PackedTransmit", "RX_MAX_PACKETS", "TX_MAX_MESSAGES", "Transmit"]


class Device(Configuration, SendPath, ReceivePath, HandshakeDriver):
    """A WireGuard device without I/O. See the module docstring for the batch interface."""

    def __init__(
        self,
        *,
        private_key: bytes | None = None,
        mtu: int = DEFAULT_MTU,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not 576 <= mtu <= MAX_MESSAGE_SIZE - TRANSPORT_MIN_SIZE:
            raise ValueError(f"mtu {mtu} out of range")
        self.mtu = mtu
        self._wall_clock = wall_clock
        self._clock = clock
        self._rng = rng if rng is not None else random.SystemRandom()
        # Timer jitter needs no secrecy (wireguard-go uses fastrand): a seeded Mersenne twister, not a
        # getrandom() system call per data packet sent after an answer (timers.data_sent on the lone path).
        self._jitter_rng = rng if rng is not None else random.Random()
        self._identity = None
        self._cookie_checker = None
        self.peers = {}
        self.allowed_ips = AllowedIPs()
        self._indices = IndexTable(self._rng)
        self._schedule = Schedule()  # every peer's timers lower it when they arm
        self.counters = Counter()
        self.listen_port = 0
        self.fwmark = 0
        self.up = True
        self._queued = {}
        self.paths = None  # turbowg/device/paths.py Paths, set by the runtime with a DERP relay (--derp)
        # Packed data path (handle_tun_packed / handle_udp_packed): preallocated, reused every batch.
        self.tx_buffer = bytearray(TX_BUFFER_SIZE)
        self.tx_sizes = array("i", bytes(4 * TX_MAX_MESSAGES))
        self.rx_layout = array("i", bytes(8 * RX_MAX_PACKETS))
        if private_key is not None:
            self._set_private_key(self._check_key(private_key, "private key"), self._clock())

    # -- identity ---------------------------------------------------------------------------------

    @property
    def private_key(self) -> bytes | None:
        return self._identity.private_key if self._identity is not None else None

    @property
    def public_key(self) -> bytes | None:
        return self._identity.public_key if self._identity is not None else None

    def set_bound_port(self, port: int) -> None:
        """The runtime bound the UDP socket (maybe to port 0): report the actual port."""
        self.listen_port = port

    def snapshot(self) -> DeviceSnapshot:
        """The configuration and statistics a UAPI `get` reports."""
        peers = []
        for peer in self.peers.values():
            wall = peer.last_handshake_wall
            seconds = int(wall)
            peers.append(
                PeerSnapshot(
                    public_key=peer.public_key,
                    preshared_key=peer.preshared_key,
                    endpoint=peer.endpoint,
                    last_handshake_time_sec=seconds,
                    last_handshake_time_nsec=int(round((wall - seconds) * 1e9)) % 1_000_000_000,
                    tx_bytes=peer.tx_bytes,
                    rx_bytes=peer.rx_bytes,
                    persistent_keepalive_interval=peer.timers.persistent_keepalive_interval,
                    allowed_ips=self.allowed_ips.entries_for_peer(peer),
                )
            )
        return DeviceSnapshot(
            private_key=self.private_key, listen_port=self.listen_port, fwmark=self.fwmark, peers=peers
        )

    # -- timers -----------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest time `tick` has work to do (-inf: at once), or None. O(1): the peers' timers lower
        the shared schedule whenever they arm, and `tick` recomputes it exactly. Never later than the
        true earliest deadline; a timer disarmed since costs one tick that finds nothing to do."""
        if self._queued:
            return -math.inf
        earliest = self._schedule.earliest
        return None if earliest == math.inf else earliest

    def tick(self, now: float) -> list[Transmit]:
        """Run due timers of every peer: retransmits, keepalives, new handshakes, key zeroing.
        Also hands out what `apply_update` queued."""
        out: Out = self._queued
        self._queued = {}
        # Recompute the schedule exactly: a peer's timer actions change only that peer's timers, so each
        # peer's deadline read after its actions is final (arms during the loop may have been superseded).
        earliest = math.inf
        for peer in list(self.peers.values()):
            timers = peer.timers
            deadline = timers.next_deadline()
            if deadline is not None and deadline <= now:
                self._run_timers(peer, now, out)
                deadline = timers.next_deadline()
            if deadline is not None and deadline < earliest:
                earliest = deadline
        self._schedule.earliest = earliest
        return transmits(out)

    def _run_timers(self, peer: Peer, now: float, out: Out) -> None:
        for action in peer.timers.expired(now):
            if action is TimerAction.RETRANSMIT_HANDSHAKE:
                self._initiate_handshake(peer, now, out, retry=True)
            elif action is TimerAction.NEW_HANDSHAKE:
                self._initiate_handshake(peer, now, out)
            elif action is TimerAction.GIVE_UP_HANDSHAKE:
                self.counters["staged_dropped_handshake_timeout"] += len(peer.staged)
                peer.staged.clear()
            elif action is TimerAction.ZERO_KEYS:
                self._zero_keys(peer)
            else:  # SEND_KEEPALIVE, PERSISTENT_KEEPALIVE
                if self.up:
                    self._send_keepalive(peer, now, out)

    def _zero_keys(self, peer: Peer) -> None:
        """3 * REJECT_AFTER_TIME without a new session: forget every key of the peer."""
        self._indices.free_keypairs(peer.keypairs.clear())
        self._indices.free_handshake(peer)
        if peer.handshake is not None:
            peer.handshake.clear()
        self.counters["keys_zeroed"] += 1
