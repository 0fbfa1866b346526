"""The configuration side of the device, as wireguard-go's device/uapi.go (IpcSet): validate and apply a
UAPI `set` (a `DeviceUpdate`), add and remove peers, change the private key. Snapshots for `get` are
`Device.snapshot` (device.py).
"""

from __future__ import annotations

import errno
import ipaddress

from turbowg.conn.endpoint import Endpoint, canonical_endpoint
from turbowg.device.constants import REKEY_TIMEOUT_JITTER_MAX
from turbowg.device.output import Out, Transmit, transmits
from turbowg.device.peer import Peer
from turbowg.device.state import DeviceState
from turbowg.noise.cookie import CookieChecker
from turbowg.noise.handshake import LocalIdentity
from turbowg.uapi.model import DeviceUpdate, PeerUpdate, UAPIError
from turbowg.wire import KEY_SIZE

_ZERO_KEY = bytes(KEY_SIZE)


def _checked_endpoint(endpoint: Endpoint) -> Endpoint:
    try:
        return canonical_endpoint(endpoint)
    except ValueError as exc:
        raise UAPIError(errno.EINVAL, str(exc)) from None


class Configuration(DeviceState):
    """The UAPI `set` methods of `Device`."""

    @staticmethod
    def _check_key(key: bytes, what: str) -> bytes:
        if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
            raise UAPIError(errno.EINVAL, f"{what} must be {KEY_SIZE} bytes")
        return bytes(key)

    def _jitter(self) -> float:
        return self._jitter_rng.random() * REKEY_TIMEOUT_JITTER_MAX

    def _validate(self, update: DeviceUpdate) -> None:
        """Refuse a bad update before changing anything."""
        if update.private_key is not None:
            self._check_key(update.private_key, "private key")
        if update.listen_port is not None and not 0 <= update.listen_port <= 65535:
            raise UAPIError(errno.EINVAL, f"listen_port {update.listen_port} out of range")
        if update.fwmark is not None and not 0 <= update.fwmark <= 0xFFFFFFFF:
            raise UAPIError(errno.EINVAL, f"fwmark {update.fwmark} out of range")
        for peer_update in update.peers:
            self._check_key(peer_update.public_key, "public key")
            if peer_update.protocol_version is not None and peer_update.protocol_version != 1:
                raise UAPIError(
                    errno.EINVAL, f"protocol_version {peer_update.protocol_version} not supported"
                )
            if peer_update.preshared_key is not None:
                self._check_key(peer_update.preshared_key, "preshared key")
            if peer_update.endpoint is not None:
                _checked_endpoint(peer_update.endpoint)
            interval = peer_update.persistent_keepalive_interval
            if interval is not None and not 0 <= interval <= 65535:
                raise UAPIError(errno.EINVAL, f"persistent_keepalive_interval {interval} out of range")
            for network in (*peer_update.allowed_ips, *peer_update.remove_allowed_ips):
                if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
                    raise UAPIError(errno.EINVAL, f"allowed ip {network!r} is not a network")

    def apply_update(self, update: DeviceUpdate, now: float | None = None) -> list[Transmit]:
        """Apply a UAPI `set`; raises UAPIError (nothing changed) for a refused request.

        Datagrams the update causes (the keepalive for a persistent keepalive just switched
        on, staged packets a new endpoint lets out, as wireguard-go) are queued and come out
        of the next `tick()`, which the runtime calls after every `set`. The return value lists
        what this update queued, for inspection: send either it or the tick's output, not both."""
        self._validate(update)
        now = self._clock() if now is None else now
        if update.private_key is not None:
            self._set_private_key(bytes(update.private_key), now)
        if update.listen_port is not None:
            self.listen_port = update.listen_port
        if update.fwmark is not None:
            self.fwmark = update.fwmark
        if update.replace_peers:
            for peer in list(self.peers.values()):
                self._remove_peer(peer)
        touched: dict[Peer, bool] = {}  # peer -> persistent keepalive just switched on
        for peer in self.peers.values():
            peer.allowed_src = b""  # allowed IPs may change below: prove sources anew
        for peer_update in update.peers:
            peer, switched_on = self._apply_peer_update(peer_update)
            if peer is not None:
                touched[peer] = touched.get(peer, False) or switched_on
        if self.paths is not None:
            self.paths.after_update(self, update, now)  # keys, peers, configured endpoints (paths.py)
        out: Out = {}
        if self.up:
            for peer, keepalive_now in touched.items():
                if self.peers.get(peer.public_key) is not peer:
                    continue  # removed later in the same update
                if keepalive_now:
                    self._send_keepalive(peer, now, out)
                else:
                    self._send_staged(peer, now, out)
        for endpoint, datagrams in out.items():
            self._queued.setdefault(endpoint, []).extend(datagrams)
        return transmits(out)

    def _apply_peer_update(self, update: PeerUpdate) -> tuple[Peer | None, bool]:
        """Returns the peer configured (None if removed or ignored) and whether its persistent
        keepalive was just switched on."""
        public_key = bytes(update.public_key)
        if self._identity is not None and public_key == self._identity.public_key:
            return None, False  # a peer that is ourselves is ignored, as wireguard-go
        peer = self.peers.get(public_key)
        if update.remove:
            if peer is not None:
                self._remove_peer(peer)
            return None, False
        if peer is None:
            if update.update_only:
                return None, False
            peer = Peer(public_key, self._identity, self._jitter, self._schedule)
            self.peers[public_key] = peer
        if update.preshared_key is not None:
            peer.set_preshared_key(update.preshared_key)
        if update.endpoint is not None:
            peer.endpoint = _checked_endpoint(update.endpoint)
        switched_on = False
        if update.persistent_keepalive_interval is not None:
            old = peer.timers.persistent_keepalive_interval
            peer.timers.persistent_keepalive_interval = update.persistent_keepalive_interval
            if update.persistent_keepalive_interval == 0:
                peer.timers.persistent_keepalive = None
            elif old == 0:
                switched_on = True
        if update.replace_allowed_ips:
            self.allowed_ips.remove_by_peer(peer)
        for network in update.remove_allowed_ips:  # allowed_ip=-PREFIX: only if this peer holds exactly it
            self.allowed_ips.remove(network, peer)
        for network in update.allowed_ips:
            self.allowed_ips.insert(network, peer)
        return peer, switched_on

    def _set_private_key(self, private_key: bytes, now: float) -> None:
        if self._identity is not None and self._identity.private_key == private_key:
            return
        if private_key == _ZERO_KEY:
            identity = None
        else:
            identity = LocalIdentity(private_key)
            # A peer with our own public key would be ourselves: drop it.
            ourselves = self.peers.get(identity.public_key)
            if ourselves is not None:
                self._remove_peer(ourselves)
        self._identity = identity
        self._cookie_checker = CookieChecker(identity.public_key) if identity is not None else None
        for peer in self.peers.values():
            peer.set_local(identity)
            self._expire_current_keypairs(peer)

    def _remove_peer(self, peer: Peer) -> None:
        self.allowed_ips.remove_by_peer(peer)
        self._indices.free_keypairs(peer.keypairs.clear())
        self._indices.free_handshake(peer)
        if peer.handshake is not None:
            peer.handshake.clear()
        peer.timers.stop()
        peer.staged.clear()
        self.peers.pop(peer.public_key, None)
