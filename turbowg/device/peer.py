"""State of one configured peer: identity, handshake, keypairs, timers, staged packets, stats.

Only state and tiny helpers live here; the protocol logic that moves packets between
peers lives in `device.Device` (and the files of its jobs: send.py, receive.py, handshake.py, config.py),
which owns the index table and the local identity.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from turbowg.conn.endpoint import Endpoint
from turbowg.device.constants import MAX_STAGED_PACKETS
from turbowg.device.keypair import Keypairs
from turbowg.device.timers import PeerTimers, Schedule, default_jitter
from turbowg.noise.cookie import CookieGenerator
from turbowg.noise.handshake import Handshake, LocalIdentity
from turbowg.noise.primitives import ZERO32


class Peer:
    """One peer of the device. Identity is by object; the device maps public keys to peers."""

    __slots__ = (
        "public_key",
        "preshared_key",
        "handshake",
        "cookie_generator",
        "_endpoint",
        "keypairs",
        "timers",
        "staged",
        "rx_bytes",
        "tx_bytes",
        "last_handshake_wall",
        "last_sent_handshake",
        "handshake_index",
        "sent_last_minute_handshake",
        "allowed_src",
    )

    def __init__(
        self,
        public_key: bytes,
        local: LocalIdentity | None,
        jitter: Callable[[], float] = default_jitter,
        schedule: Schedule | None = None,
    ) -> None:
        self.public_key = bytes(public_key)
        self.preshared_key = ZERO32
        # None while the device has no private key: no handshake can happen then.
        self.handshake: Handshake | None = None
        self.cookie_generator = CookieGenerator(self.public_key)
        self._endpoint: Endpoint | None = None
        self.keypairs = Keypairs()
        self.timers = PeerTimers(jitter, schedule)
        # Packets waiting for a session; the oldest is dropped when full (as wireguard-go).
        self.staged: deque[bytes | memoryview] = deque(maxlen=MAX_STAGED_PACKETS)
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake_wall = 0.0  # wall-clock seconds of the last completed handshake; 0 = never
        self.last_sent_handshake: float | None = None  # monotonic; None = never
        self.handshake_index: int | None = None  # local index of our in-flight handshake
        self.sent_last_minute_handshake = False
        # An inner source address last proved to route to this peer: the packed receive path checks
        # packets against it in C and looks up only the others. The device clears it when allowed IPs change.
        self.allowed_src = b""
        self.set_local(local)

    def set_local(self, local: LocalIdentity | None) -> None:
        """Adopt the device's (new) identity; a missing identity disables handshakes."""
        if local is None:
            self.handshake = None
        elif self.handshake is None:
            self.handshake = Handshake(self.public_key, self.preshared_key, local=local)
        else:
            self.handshake.set_local(local)

    def set_preshared_key(self, preshared_key: bytes) -> None:
        self.preshared_key = bytes(preshared_key)
        if self.handshake is not None:
            self.handshake.set_preshared_key(self.preshared_key)

    @property
    def endpoint(self) -> Endpoint | None:
        """Where the peer is over UDP (configured, or roamed to): what `wg show` reports."""
        return self._endpoint

    @endpoint.setter
    def endpoint(self, endpoint: Endpoint | None) -> None:
        # A relay pseudo-endpoint (port 0, turbowg/device/paths.py) is how a message came, not where the peer
        # is: handshakes received over DERP must not overwrite the direct endpoint with it.
        if endpoint is not None and endpoint[1] == 0:
            return
        self._endpoint = endpoint

    @property
    def persistent_keepalive_interval(self) -> int:
        return self.timers.persistent_keepalive_interval

    def __repr__(self) -> str:
        return f"Peer({self.public_key.hex()[:16]}…, endpoint={self.endpoint})"
