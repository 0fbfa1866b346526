"""The sans-IO WireGuard device: batches of TUN packets and UDP datagrams in, batches out.

`Device` owns the peers, the allowed-IPs table, the index table (random 32-bit local
indices naming handshakes and keypairs) and the local identity. The runtime feeds it

* `handle_tun_packed(buf, layout, runs, now)`: IP packets read from the TUN, back to back in
  `buf` -> sealed messages in `tx_buffer` per endpoint (PackedTransmit) + other datagrams,
* `handle_udp_packed(buf, chunks, endpoints, now, under_load)`: UDP reads (GRO runs of equal
  datagrams) -> inner packets opened in place, described by `rx_layout` + datagrams to send,
* `tick(now)`: timers -> datagrams to send,

and sends each PackedTransmit / `Transmit` (one endpoint, many datagrams: a natural GSO batch).
`handle_tun_batch` / `handle_udp_batch` are the same paths for packets held as objects (the
protocol tests drive them). Nothing here touches a socket or a clock except through arguments.
Malformed or unauthenticated input is dropped, counted in `Device.counters` and never answered
(except cookie replies under load).
"""

from __future__ import annotations

import errno
import ipaddress
import random
import struct
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from turbowg.device.allowedips import AllowedIPs
from turbowg.device.constants import (
    COOKIE_REPLY_SIZE,
    DEFAULT_MTU,
    INITIATION_SIZE,
    MAX_MESSAGE_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_TRANSPORT,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)
from turbowg.device.keypair import Keypair
from turbowg.device.peer import Peer
from turbowg.device.route import check_inner_sources
from turbowg.device.timers import TimerAction, needs_rekey_on_receive, needs_rekey_on_send
from turbowg.noise.cookie import CookieChecker
from turbowg.noise.handshake import (
    Handshake,
    HandshakeError,
    LocalIdentity,
    begin_session,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
)
from turbowg.noise.transport import OVERHEAD, padded_length
from turbowg.packed import pack
from turbowg.uapi.model import DeviceSnapshot, DeviceUpdate, Endpoint, PeerSnapshot, PeerUpdate, UAPIError

_MESSAGE_TYPE = struct.Struct("<I")
_KEY_SIZE = 32
_ZERO_KEY = bytes(_KEY_SIZE)


@dataclass(slots=True)
class Transmit:
    """Datagrams (bytes or bytearray) to send to one endpoint, in order."""

    endpoint: Endpoint
    datagrams: list[bytes | bytearray]


@dataclass(slots=True)
class PackedTransmit:
    """Sealed messages to one endpoint lying back to back in `Device.tx_buffer`.

    `count` messages, `nbytes` in all, from byte `offset`; their sizes are `Device.tx_sizes[sizes_start:]`."""

    endpoint: Endpoint
    offset: int
    nbytes: int
    sizes_start: int
    count: int


# Room of the packed send path: what one batch of TUN reads can produce (the runtime stays below).
TX_BUFFER_SIZE = 4 << 20
TX_MAX_MESSAGES = 8192
# Room of the packed receive path: inner packets one batch of UDP reads can hold (32 bytes each at least:
# the runtime's 2 MiB receive buffer plus one last 64 KiB read).
RX_MAX_PACKETS = 68 << 10


# DESIGN.md calls the same thing "Outgoing".
Outgoing = Transmit

_Out = dict[Endpoint, list]  # datagrams being collected per endpoint during one call


class _IndexEntry:
    """What a local index names: a peer's in-flight handshake (keypair None) or a keypair."""

    __slots__ = ("peer", "keypair")

    def __init__(self, peer: Peer, keypair: Keypair | None = None) -> None:
        self.peer = peer
        self.keypair = keypair


def _cookie_source(endpoint: Endpoint) -> bytes:
    """Address bytes + big-endian port: what a cookie is bound to (as wireguard-go)."""
    host, port = endpoint
    return ipaddress.ip_address(host).packed + port.to_bytes(2, "big")


def _canonical_endpoint(endpoint: Endpoint) -> Endpoint:
    host, port = endpoint
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise UAPIError(errno.EINVAL, f"endpoint host {host!r} is not an IP address") from None
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise UAPIError(errno.EINVAL, f"endpoint port {port!r} out of range")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (str(address), port)


class Device:
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
        self._identity: LocalIdentity | None = None
        self._cookie_checker: CookieChecker | None = None
        self.peers: dict[bytes, Peer] = {}  # public key -> peer, in configuration order
        self.allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        self._indices: dict[int, _IndexEntry] = {}
        self.counters: Counter[str] = Counter()  # drop reason / event -> count
        self.listen_port = 0
        self.fwmark = 0
        # Whether the interface is up: the runtime may clear it; nothing is sent while down.
        self.up = True
        # Output produced outside a batch call (by apply_update), handed out by the next tick.
        self._queued: _Out = {}
        # Packed data path (handle_tun_packed / handle_udp_packed): preallocated, reused every batch.
        self.tx_buffer = bytearray(TX_BUFFER_SIZE)
        self.tx_sizes = array("i", bytes(4 * TX_MAX_MESSAGES))
        self.rx_layout = array("i", bytes(8 * RX_MAX_PACKETS))
        if private_key is not None:
            self._set_private_key(self._check_key(private_key, "private key"), self._clock())

    # -- identity and configuration ---------------------------------------------------------------

    @property
    def private_key(self) -> bytes | None:
        return self._identity.private_key if self._identity is not None else None

    @property
    def public_key(self) -> bytes | None:
        return self._identity.public_key if self._identity is not None else None

    def set_bound_port(self, port: int) -> None:
        """The runtime bound the UDP socket (maybe to port 0): report the actual port."""
        self.listen_port = port

    def _jitter(self) -> float:
        return self._rng.uniform(0.0, REKEY_TIMEOUT_JITTER_MAX)

    @staticmethod
    def _check_key(key: bytes, what: str) -> bytes:
        if not isinstance(key, bytes | bytearray) or len(key) != _KEY_SIZE:
            raise UAPIError(errno.EINVAL, f"{what} must be {_KEY_SIZE} bytes")
        return bytes(key)

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
                _canonical_endpoint(peer_update.endpoint)
            interval = peer_update.persistent_keepalive_interval
            if interval is not None and not 0 <= interval <= 65535:
                raise UAPIError(errno.EINVAL, f"persistent_keepalive_interval {interval} out of range")
            for network in peer_update.allowed_ips:
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
        out: _Out = {}
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
        return self._transmits(out)

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
            peer = Peer(public_key, self._identity, self._jitter)
            self.peers[public_key] = peer
        if update.preshared_key is not None:
            peer.set_preshared_key(update.preshared_key)
        if update.endpoint is not None:
            peer.endpoint = _canonical_endpoint(update.endpoint)
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

    def _expire_current_keypairs(self, peer: Peer) -> None:
        """Sessions under the old identity may still receive but must not send; the next
        packet starts a handshake at once (wireguard-go ExpireCurrentKeypairs)."""
        if peer.handshake is not None:
            peer.handshake.clear()
        self._free_handshake_index(peer)
        peer.last_sent_handshake = None
        for keypair in (peer.keypairs.current, peer.keypairs.next):
            if keypair is not None:
                keypair.send_counter = REJECT_AFTER_MESSAGES

    def snapshot(self) -> DeviceSnapshot:
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

    # -- index table ------------------------------------------------------------------------------

    def _new_index(self, peer: Peer, keypair: Keypair | None = None) -> int:
        indices = self._indices
        index = self._rng.getrandbits(32)
        while index in indices:  # 2**32 space: a handful of tries at most
            index = self._rng.getrandbits(32)
        indices[index] = _IndexEntry(peer, keypair)
        return index

    def _free_handshake_index(self, peer: Peer) -> None:
        index = peer.handshake_index
        if index is None:
            return
        entry = self._indices.get(index)
        if entry is not None and entry.peer is peer and entry.keypair is None:
            del self._indices[index]
        peer.handshake_index = None

    def _drop_keypairs(self, keypairs: Iterable[Keypair]) -> None:
        for keypair in keypairs:
            entry = self._indices.get(keypair.local_index)
            if entry is not None and entry.keypair is keypair:
                del self._indices[keypair.local_index]

    def _install_keypair(self, peer: Peer, keypair: Keypair) -> None:
        self._drop_keypairs(peer.keypairs.install(keypair))
        peer.sent_last_minute_handshake = False

    def _remove_peer(self, peer: Peer) -> None:
        self.allowed_ips.remove_by_peer(peer)
        self._drop_keypairs(peer.keypairs.clear())
        self._free_handshake_index(peer)
        if peer.handshake is not None:
            peer.handshake.clear()
        peer.timers.stop()
        peer.staged.clear()
        self.peers.pop(peer.public_key, None)

    def _zero_keys(self, peer: Peer) -> None:
        """3 * REJECT_AFTER_TIME without a new session: forget every key of the peer."""
        self._drop_keypairs(peer.keypairs.clear())
        self._free_handshake_index(peer)
        if peer.handshake is not None:
            peer.handshake.clear()
        self.counters["keys_zeroed"] += 1

    # -- sending ----------------------------------------------------------------------------------

    @staticmethod
    def _transmits(out: _Out) -> list[Transmit]:
        return [Transmit(endpoint, datagrams) for endpoint, datagrams in out.items()]

    def _emit(self, peer: Peer, datagram: bytes | bytearray, out: _Out) -> None:
        endpoint = peer.endpoint
        if endpoint is None:
            self.counters["tx_no_endpoint"] += 1
            return
        datagrams = out.get(endpoint)
        if datagrams is None:
            out[endpoint] = [datagram]
        else:
            datagrams.append(datagram)
        peer.tx_bytes += len(datagram)

    def _initiate_handshake(self, peer: Peer, now: float, out: _Out, retry: bool = False) -> None:
        """Send an initiation, at most one per REKEY_TIMEOUT (wireguard-go SendHandshakeInitiation)."""
        timers = peer.timers
        if not retry:
            timers.handshake_attempts = 0
        if peer.last_sent_handshake is not None and now - peer.last_sent_handshake < REKEY_TIMEOUT:
            return
        handshake = peer.handshake
        if handshake is None or not self.up:
            return
        peer.last_sent_handshake = now
        self._free_handshake_index(peer)
        index = self._new_index(peer)
        try:
            message = create_initiation(handshake, index, self._wall_clock())
        except HandshakeError:
            del self._indices[index]
            self.counters["tx_handshake_impossible"] += 1
            return
        peer.handshake_index = index
        peer.cookie_generator.add_macs(message, now)
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_sent(now)
        self._emit(peer, message, out)
        self.counters["tx_initiation"] += 1
        timers.handshake_initiated(now)

    def _send_keepalive(self, peer: Peer, now: float, out: _Out) -> None:
        """An empty data packet, unless staged packets can carry the same news."""
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now, out)

    def _send_staged(self, peer: Peer, now: float, out: _Out) -> None:
        staged = peer.staged
        if not staged or not self.up:
            return
        keypair = self._sending_keypair(peer, len(staged), now)
        if keypair is None:
            self._initiate_handshake(peer, now, out)
            return
        packets = list(staged)
        staged.clear()
        self._encrypt_and_send(peer, keypair, packets, now, out)

    def _encrypt_and_send(
        self, peer: Peer, keypair: Keypair, packets: Sequence[bytes | memoryview], now: float, out: _Out
    ) -> None:
        """Encrypt `packets` (staged ones, keepalives) under `keypair` into type-4 messages for the peer's
        endpoint, as separate datagrams (the bulk path, handle_tun_packed, seals into tx_buffer instead)."""
        endpoint = peer.endpoint
        if endpoint is None:
            self.counters["tx_no_endpoint"] += len(packets)
            return
        datagrams = out.get(endpoint)
        if datagrams is None:
            datagrams = out[endpoint] = []
        mtu = self.mtu
        count = len(packets)
        sealed = bytearray(sum(OVERHEAD + padded_length(len(p), mtu) for p in packets))
        sizes = array("i", bytes(4 * count))
        keypair.send_aead.seal_list(list(packets), sealed, 0, mtu, keypair.remote_index, keypair.send_counter,
                                    sizes, 0)
        keypair.send_counter += count
        pos = 0
        for size in sizes:
            datagrams.append(sealed[pos:pos + size])
            pos += size
        self._after_send(peer, len(sealed), any(len(p) for p in packets), now, out)

    @staticmethod
    def _sending_keypair(peer: Peer, count: int, now: float) -> Keypair | None:
        """The current keypair if it may seal `count` more messages now, else None."""
        keypair = peer.keypairs.current
        if (
            keypair is None
            or not keypair.usable_for_sending(now)
            or keypair.send_counter + count > REJECT_AFTER_MESSAGES
        ):
            return None
        return keypair

    def _after_send(self, peer: Peer, sent_bytes: int, sent_data: bool, now: float, out: _Out) -> None:
        peer.tx_bytes += sent_bytes
        timers = peer.timers
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_sent(now)
        if sent_data:
            timers.data_sent(now)
        if needs_rekey_on_send(peer.keypairs.current, now):
            self._initiate_handshake(peer, now, out)

    def handle_tun_batch(self, packets: Iterable[bytes | memoryview], now: float) -> list[Transmit]:
        """Route and encrypt IP packets read from the TUN; returns what to send, grouped per endpoint.
        (The list form of handle_tun_packed, for callers that hold packets as objects.)"""
        buf, layout = pack(packets)
        count = len(layout) // 2
        packed, transmits = self.handle_tun_packed(buf, layout, [k for i in range(count) for k in (i, 1)], now)
        return self._merge(packed, transmits)

    def _merge(self, packed: list[PackedTransmit], transmits: list[Transmit]) -> list[Transmit]:
        """PackedTransmits as datagram lists (copies out of tx_buffer), then the other transmits."""
        per_endpoint: _Out = {}
        for item in packed:
            datagrams = per_endpoint.setdefault(item.endpoint, [])
            pos = item.offset
            for k in range(item.sizes_start, item.sizes_start + item.count):
                size = self.tx_sizes[k]
                datagrams.append(bytes(self.tx_buffer[pos:pos + size]))
                pos += size
        for transmit in transmits:
            per_endpoint.setdefault(transmit.endpoint, []).extend(transmit.datagrams)
        return self._transmits(per_endpoint)

    def _stage_packets(self, peer: Peer, packets: list[bytes], now: float, out: _Out) -> None:
        """No usable session for `packets` (copies): queue them and start or await a handshake."""
        staged = peer.staged
        overflow = len(staged) + len(packets) - staged.maxlen  # type: ignore[operator]
        if overflow > 0:
            self.counters["staged_overflow"] += overflow
        staged.extend(packets)
        self._send_staged(peer, now, out)

    def handle_tun_packed(
        self, buf: bytearray, layout: array, runs: list[int], now: float
    ) -> tuple[list[PackedTransmit], list[Transmit]]:
        """The packed send path: packets lie in `buf` as described by `layout` (int32 offset, length pairs);
        `runs` is flat (start, count) pairs of consecutive packets going to one destination (one split GSO
        monster, or one plain packet). Sealed messages go to `tx_buffer` (PackedTransmit, one per peer);
        handshakes and staged output come back as ordinary Transmits. Nothing is copied per packet unless the
        peer has no usable session (then the packets are staged, as `handle_tun_batch` does)."""
        counters = self.counters
        lookup = self.allowed_ips.lookup
        per_peer: dict[Peer, list[int]] = {}
        for i in range(0, len(runs), 2):
            start = runs[i]
            off = layout[2 * start]
            length = layout[2 * start + 1]
            version = buf[off] >> 4 if length else 0
            if version == 4 and length >= 20:
                peer = lookup(bytes(buf[off + 16:off + 20]))
            elif version == 6 and length >= 40:
                peer = lookup(bytes(buf[off + 24:off + 40]))
            else:
                counters["tun_bad_packet" if length >= 20 else "tun_too_short"] += runs[i + 1]
                continue
            if peer is None:
                counters["tun_no_route"] += runs[i + 1]
                continue
            peer_runs = per_peer.get(peer)
            if peer_runs is None:
                per_peer[peer] = [start, runs[i + 1]]
            elif peer_runs[-2] + peer_runs[-1] == start:
                peer_runs[-1] += runs[i + 1]  # adjacent in the stage: one seal call for both
            else:
                peer_runs.append(start)
                peer_runs.append(runs[i + 1])
        out: _Out = {}
        packed: list[PackedTransmit] = []
        cursor = 0
        sizes_at = 0
        mtu = self.mtu
        tx_buffer = self.tx_buffer
        tx_sizes = self.tx_sizes
        for peer, peer_runs in per_peer.items():
            total = sum(peer_runs[1::2])
            keypair = None if peer.staged or not self.up else self._sending_keypair(peer, total, now)
            if keypair is None:
                packets = []  # copies: the runtime reuses its stage
                for j in range(0, len(peer_runs), 2):
                    for k in range(peer_runs[j], peer_runs[j] + peer_runs[j + 1]):
                        off = layout[2 * k]
                        packets.append(bytes(buf[off:off + layout[2 * k + 1]]))
                self._stage_packets(peer, packets, now, out)
                continue
            endpoint = peer.endpoint
            if endpoint is None:
                counters["tx_no_endpoint"] += total
                continue
            seal = keypair.send_aead.seal_batch
            receiver = keypair.remote_index
            counter = keypair.send_counter
            first_byte = cursor
            first_size = sizes_at
            for j in range(0, len(peer_runs), 2):
                count = peer_runs[j + 1]
                cursor += seal(buf, layout, peer_runs[j], count, tx_buffer, cursor, mtu, receiver, counter,
                               tx_sizes, sizes_at)
                counter += count
                sizes_at += count
            keypair.send_counter = counter
            packed.append(PackedTransmit(endpoint, first_byte, cursor - first_byte, first_size, total))
            self._after_send(peer, cursor - first_byte, True, now, out)
        return packed, self._transmits(out)

    # -- receiving --------------------------------------------------------------------------------

    def handle_udp_batch(
        self, datagrams: Iterable[tuple[bytes, Endpoint]], now: float, under_load: bool = False
    ) -> tuple[list[bytes], list[Transmit]]:
        """Process received datagrams; returns (IP packets for the TUN, datagrams to send).
        (The list form of handle_udp_packed: each datagram a read of its own.)"""
        buf = bytearray()
        chunks: list[int] = []
        endpoints: list[Endpoint] = []
        for data, endpoint in datagrams:
            start = len(buf)
            buf += data
            chunks += (start, len(buf), max(len(data), 1))
            endpoints.append(endpoint)
        count, transmits = self.handle_udp_packed(buf, chunks, endpoints, now, under_load)
        layout = self.rx_layout
        packets = [bytes(buf[layout[2 * k]:layout[2 * k] + layout[2 * k + 1]]) for k in range(count)]
        return packets, transmits

    def handle_udp_packed(
        self, buf: bytearray, chunks: list[int], endpoints: list[Endpoint], now: float, under_load: bool = False
    ) -> tuple[int, list[Transmit]]:
        """The packed receive path. `chunks` is flat (offset, end, stride) triples, one per UDP read into
        `buf` (a UDP_GRO read holds datagrams of `stride` bytes, the last maybe shorter), `endpoints` the
        sender of each. Transport messages are opened in place in batches; the inner packets to write to the
        TUN are described by `rx_layout[:2 * n]` (offsets into `buf`); returns (n, datagrams to send)."""
        counters = self.counters
        indices = self._indices
        unpack_type = _MESSAGE_TYPE.unpack_from
        layout = self.rx_layout
        n_out = 0
        out: _Out = {}
        heard: dict[Peer, bool] = {}
        for c, endpoint in enumerate(endpoints):
            pos, end, stride = chunks[3 * c], chunks[3 * c + 1], chunks[3 * c + 2]
            if pos >= end:
                counters["rx_too_short"] += 1  # an empty datagram
                continue
            while pos < end:
                size = end - pos if end - pos < stride else stride
                kind = unpack_type(buf, pos)[0] if size >= 4 else -1
                if kind != MESSAGE_TRANSPORT or size < TRANSPORT_MIN_SIZE:
                    self._receive_other(kind, bytes(buf[pos:pos + size]), endpoint, now, under_load, out)
                    pos += stride
                    continue
                receiver = unpack_type(buf, pos + 4)[0]
                entry = indices.get(receiver)
                keypair = entry.keypair if entry is not None else None
                if keypair is None:
                    counters["rx_unknown_index"] += 1
                    pos += stride
                    continue
                if now - keypair.created >= REJECT_AFTER_TIME:
                    counters["rx_expired_keypair"] += 1
                    pos += stride
                    continue
                peer = entry.peer  # type: ignore[union-attr]
                opened = keypair.receive_aead.open_batch(buf, pos, end, stride, receiver, keypair.replay, layout,
                                                         n_out)
                if opened.end == pos:
                    counters["rx_layout_full"] += 1  # cannot happen with RX_MAX_PACKETS sized to the buffer
                    break
                pos = opened.end
                if opened.auth_fail:
                    counters["rx_decrypt_failed"] += opened.auth_fail
                if opened.replay:
                    counters["rx_replay"] += opened.replay
                if opened.expired:
                    counters["rx_expired_keypair"] += opened.expired
                if opened.keepalive:
                    counters["rx_keepalive"] += opened.keepalive
                authenticated = opened.authenticated
                if not authenticated:
                    continue
                got, bad_inner, mismatch = check_inner_sources(buf, layout, n_out, opened.count, peer.allowed_src)
                if bad_inner:
                    counters["rx_bad_inner_packet"] += bad_inner
                if mismatch:
                    got = self._check_sources(peer, buf, layout, n_out, got)
                n_out += got
                peer.endpoint = endpoint
                peer.rx_bytes += opened.rx_bytes
                if peer.keypairs.next is keypair:
                    self._confirm_keypair(peer, keypair, now, out)
                if authenticated > opened.keepalive:
                    heard[peer] = True
                elif peer not in heard:
                    heard[peer] = False
        self._after_receive(heard, now, out)
        return n_out, self._transmits(out)

    def _check_sources(self, peer: Peer, buf: bytearray, layout: array, start: int, count: int) -> int:
        """Keep the packets layout[start:start+count] whose inner source routes to `peer` (compacting the
        layout); returns how many were kept."""
        lookup = self.allowed_ips.lookup
        kept = start
        for k in range(start, start + count):
            off = layout[2 * k]
            source = bytes(buf[off + 12:off + 16]) if buf[off] >> 4 == 4 else bytes(buf[off + 8:off + 24])
            if lookup(source) is not peer:
                self.counters["rx_source_not_allowed"] += 1
                continue
            peer.allowed_src = source
            layout[2 * kept] = off
            layout[2 * kept + 1] = layout[2 * k + 1]
            kept += 1
        return kept - start

    def _receive_other(self, kind: int, data: bytes, endpoint: Endpoint, now: float, under_load: bool,
                       out: _Out) -> None:
        """A datagram that is not a well-formed transport message."""
        if kind < 0:
            self.counters["rx_too_short"] += 1
        elif kind == MESSAGE_TRANSPORT:
            self.counters["rx_transport_too_short"] += 1
        elif MESSAGE_INITIATION <= kind <= MESSAGE_COOKIE_REPLY:
            self._handle_handshake_message(kind, data, endpoint, now, under_load, out)
        else:
            self.counters["rx_unknown_type"] += 1

    def _after_receive(self, heard: dict[Peer, bool], now: float, out: _Out) -> None:
        for peer, got_data in heard.items():
            timers = peer.timers
            timers.any_authenticated_packet_traversal(now)
            timers.any_authenticated_packet_received(now)
            if got_data:
                timers.data_received(now)
            if not peer.sent_last_minute_handshake and needs_rekey_on_receive(peer.keypairs.current, now):
                peer.sent_last_minute_handshake = True
                self._initiate_handshake(peer, now, out)

    def _confirm_keypair(self, peer: Peer, keypair: Keypair, now: float, out: _Out) -> None:
        """First data under the responder's `next` keypair: the initiator has the keys."""
        rotated, dropped = peer.keypairs.confirm(keypair)
        self._drop_keypairs(dropped)
        if rotated:
            peer.timers.handshake_complete(now)
            peer.last_handshake_wall = self._wall_clock()
            self._send_staged(peer, now, out)

    def _handshake_for_key(self, public_key: bytes) -> Handshake | None:
        peer = self.peers.get(bytes(public_key))
        return peer.handshake if peer is not None else None

    def _handshake_for_index(self, index: int) -> Handshake | None:
        entry = self._indices.get(index)
        if entry is None or entry.keypair is not None:
            return None
        return entry.peer.handshake

    def _handle_handshake_message(
        self, kind: int, data: bytes, endpoint: Endpoint, now: float, under_load: bool, out: _Out
    ) -> None:
        counters = self.counters
        size = len(data)
        if kind == MESSAGE_COOKIE_REPLY:
            if size != COOKIE_REPLY_SIZE:
                counters["rx_cookie_reply_bad_size"] += 1
                return
            entry = self._indices.get(int.from_bytes(data[4:8], "little"))
            if entry is None:
                counters["rx_unknown_index"] += 1
            elif entry.peer.cookie_generator.consume_reply(data, now):
                counters["rx_cookie_reply"] += 1
            else:
                counters["rx_bad_cookie_reply"] += 1
            return
        if size != (INITIATION_SIZE if kind == MESSAGE_INITIATION else RESPONSE_SIZE):
            counters["rx_handshake_bad_size"] += 1
            return
        checker = self._cookie_checker
        identity = self._identity
        if checker is None or identity is None:
            counters["rx_handshake_no_private_key"] += 1
            return
        if not checker.check_mac1(data):
            counters["rx_bad_mac1"] += 1
            return
        if under_load:
            source = _cookie_source(endpoint)
            if not checker.check_mac2(data, source, now):
                sender = int.from_bytes(data[4:8], "little")
                reply = checker.create_reply(data, sender, source, now)
                datagrams = out.get(endpoint)
                if datagrams is None:
                    out[endpoint] = [reply]
                else:
                    datagrams.append(reply)
                counters["tx_cookie_reply"] += 1
                return
        if kind == MESSAGE_INITIATION:
            self._consume_initiation(identity, data, endpoint, now, out)
        else:
            self._consume_response(identity, data, endpoint, now, out)

    def _consume_initiation(
        self, identity: LocalIdentity, data: bytes, endpoint: Endpoint, now: float, out: _Out
    ) -> None:
        handshake = consume_initiation(identity, data, self._handshake_for_key, now)
        if handshake is None:
            self.counters["rx_initiation_rejected"] += 1
            return
        peer = self.peers[handshake.remote_static]
        peer.endpoint = endpoint
        peer.rx_bytes += len(data)
        timers = peer.timers
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_received(now)
        if not self.up:
            return
        # Our own initiation, if any, is superseded: its state was just overwritten.
        self._free_handshake_index(peer)
        index = self._new_index(peer)
        try:
            response = create_response(handshake, index)
        except HandshakeError:
            del self._indices[index]
            self.counters["rx_initiation_rejected"] += 1
            return
        peer.cookie_generator.add_macs(response, now)
        keys = begin_session(handshake)
        keypair = Keypair(keys.send_key, keys.recv_key, index, keys.remote_index, now, False)
        self._indices[index].keypair = keypair
        self._install_keypair(peer, keypair)
        timers.session_derived(now)
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_sent(now)
        self._emit(peer, response, out)
        self.counters["tx_response"] += 1

    def _consume_response(
        self, identity: LocalIdentity, data: bytes, endpoint: Endpoint, now: float, out: _Out
    ) -> None:
        handshake = consume_response(identity, data, self._handshake_for_index)
        if handshake is None:
            self.counters["rx_response_rejected"] += 1
            return
        index = handshake.local_index
        entry = self._indices[index]
        peer = entry.peer
        keys = begin_session(handshake)
        keypair = Keypair(keys.send_key, keys.recv_key, index, keys.remote_index, now, True)
        entry.keypair = keypair
        peer.handshake_index = None
        self._install_keypair(peer, keypair)
        peer.endpoint = endpoint
        peer.rx_bytes += len(data)
        timers = peer.timers
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_received(now)
        timers.session_derived(now)
        timers.handshake_complete(now)
        peer.last_handshake_wall = self._wall_clock()
        # Tell the responder the keys work: staged data, or a keepalive.
        self._send_keepalive(peer, now, out)

    # -- timers -----------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest time `tick` has work to do, or None."""
        if self._queued:
            return float("-inf")
        deadlines = [d for d in (p.timers.next_deadline() for p in self.peers.values()) if d is not None]
        return min(deadlines) if deadlines else None

    def tick(self, now: float) -> list[Transmit]:
        """Run due timers of every peer: retransmits, keepalives, new handshakes, key zeroing.
        Also hands out what `apply_update` queued."""
        out = self._queued
        self._queued = {}
        for peer in list(self.peers.values()):
            deadline = peer.timers.next_deadline()
            if deadline is None or deadline > now:
                continue
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
        return self._transmits(out)
