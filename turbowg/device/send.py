"""The send path (TUN -> UDP), as wireguard-go's device/send.go: route IP packets read from the TUN to their
peer by destination, seal them under the peer's current keypair, or stage them until a handshake completes.

`handle_tun_packed` is the runtime's hot path: one call per batch of TUN reads, one `seal_batch` call per run
of packets to one peer, sealed messages written back to back into the preallocated `Device.tx_buffer`.
`send_lone` is the same for the one packet of a lone wake (the interactive case), with the seal and the
sendto in one C call; anything unusual about the packet sends it down the batch path instead.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence

from turbowg.device.constants import (
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
)
from turbowg.device.keypair import Keypair
from turbowg.device.output import Out, PackedTransmit, Transmit, add_datagram, transmits
from turbowg.device.peer import Peer
from turbowg.device.state import DeviceState
from turbowg.device.timers import needs_rekey_on_send
from turbowg.noise.transport import OVERHEAD, padded_length
from turbowg.packed import pack

# Room of the packed send path: what one batch of TUN reads can produce (the runtime stays below).
TX_BUFFER_SIZE = 4 << 20
TX_MAX_MESSAGES = 8192


class SendPath(DeviceState):
    """The TUN -> UDP methods of `Device`."""

    def handle_tun_batch(self, packets: Iterable[bytes | memoryview], now: float) -> list[Transmit]:
        """Route and encrypt IP packets read from the TUN; returns what to send, grouped per endpoint.
        (The list form of handle_tun_packed, for callers that hold packets as objects.)"""
        buf, layout = pack(packets)
        count = len(layout) // 2
        packed, others = self.handle_tun_packed(buf, layout, [k for i in range(count) for k in (i, 1)], now)
        return self._merge(packed, others)

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
        out: Out = {}
        packed: list[PackedTransmit] = []
        cursor = 0
        sizes_at = 0
        mtu = self.mtu
        tx_buffer = self.tx_buffer
        tx_sizes = self.tx_sizes
        paths = self.paths
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
            endpoint = peer.endpoint if paths is None else paths.tx_endpoint(peer, now)
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
            if paths is not None:
                paths.data_sent(peer, endpoint, cursor - first_byte, total, now, out)
            self._after_send(peer, cursor - first_byte, True, now, out)
        return packed, transmits(out)

    def send_lone(self, buf: bytearray, off: int, length: int, now: float, fd: int,
                  sockaddrs: dict) -> int | None:
        """The lone-packet path: route buf[off:off+length], seal it and send it on the UDP socket `fd` in one
        call (`Aead.seal_sendto`), then do what handle_tun_packed does for it (counter, bytes, timers).
        `sockaddrs` maps an endpoint to its packed sockaddr (b"": not sendable here). Returns what the send
        returned (the message size, or -errno), or None when the packet needs the batch path (bad header, no
        route, no usable session, staged packets, the DERP path selector): the caller hands it to
        handle_tun_packed, which counts or stages it. A rekey it calls for is queued for the next tick
        (next_deadline() then says at once): the handshake goes out after the packet, not before it."""
        if length < 20:
            return None
        version = buf[off] >> 4
        if version == 4:
            peer = self.allowed_ips.lookup(bytes(buf[off + 16:off + 20]))
        elif version == 6 and length >= 40:
            peer = self.allowed_ips.lookup(bytes(buf[off + 24:off + 40]))
        else:
            return None
        if peer is None or peer.staged or not self.up or self.paths is not None:
            return None
        keypair = peer.keypairs.current
        if keypair is None:
            return None
        counter = keypair.send_counter
        # _sending_keypair(peer, 1, now), inlined: one Python frame less per packet.
        if counter + 1 > REJECT_AFTER_MESSAGES or now - keypair.created >= REJECT_AFTER_TIME:
            return None
        endpoint = peer.endpoint
        if endpoint is None:
            return None
        sockaddr = sockaddrs[endpoint]
        if not sockaddr:
            return None
        mtu = self.mtu
        sent = keypair.send_aead.seal_sendto(fd, buf, off, length, mtu, keypair.remote_index, counter,
                                             self.tx_buffer, sockaddr)
        keypair.send_counter = counter + 1
        # _after_send(peer, size, True, now, out), inlined (the same timer events, fewer frames).
        peer.tx_bytes += sent if sent >= 0 else OVERHEAD + padded_length(length, mtu)
        timers = peer.timers
        if timers.persistent_keepalive_interval > 0:
            timers.any_authenticated_packet_traversal(now)
        timers.send_keepalive = None  # any_authenticated_packet_sent
        if timers.new_handshake is None:
            timers.data_sent(now)
        if counter + 1 > REKEY_AFTER_MESSAGES or (keypair.is_initiator and now - keypair.created > REKEY_AFTER_TIME):
            self._initiate_handshake(peer, now, self._queued)
        return sent

    def _merge(self, packed: list[PackedTransmit], others: list[Transmit]) -> list[Transmit]:
        """PackedTransmits as datagram lists (copies out of tx_buffer), then the other transmits."""
        per_endpoint: Out = {}
        for item in packed:
            datagrams = per_endpoint.setdefault(item.endpoint, [])
            pos = item.offset
            for k in range(item.sizes_start, item.sizes_start + item.count):
                size = self.tx_sizes[k]
                datagrams.append(bytes(self.tx_buffer[pos:pos + size]))
                pos += size
        for transmit in others:
            per_endpoint.setdefault(transmit.endpoint, []).extend(transmit.datagrams)
        return transmits(per_endpoint)

    def _stage_packets(self, peer: Peer, packets: list[bytes], now: float, out: Out) -> None:
        """No usable session for `packets` (copies): queue them and start or await a handshake."""
        staged = peer.staged
        overflow = len(staged) + len(packets) - staged.maxlen  # type: ignore[operator]
        if overflow > 0:
            self.counters["staged_overflow"] += overflow
        staged.extend(packets)
        self._send_staged(peer, now, out)

    def _send_keepalive(self, peer: Peer, now: float, out: Out) -> None:
        """An empty data packet, unless staged packets can carry the same news."""
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now, out)

    def _send_staged(self, peer: Peer, now: float, out: Out) -> None:
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
        self, peer: Peer, keypair: Keypair, packets: Sequence[bytes | memoryview], now: float, out: Out
    ) -> None:
        """Encrypt `packets` (staged ones, keepalives) under `keypair` into type-4 messages for the peer's
        endpoint, as separate datagrams (the bulk path, handle_tun_packed, seals into tx_buffer instead)."""
        paths = self.paths
        endpoint = peer.endpoint if paths is None else paths.tx_endpoint(peer, now)
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
        if paths is not None:
            paths.data_sent(peer, endpoint, len(sealed), count, now, out)
        self._after_send(peer, len(sealed), any(len(p) for p in packets), now, out)

    def _emit(self, peer: Peer, datagram: bytes | bytearray, out: Out) -> None:
        """Queue one datagram (a handshake message) for the peer: to its endpoint, or with a DERP relay on
        the path the peer's selector chooses (DeviceState._emit without one)."""
        paths = self.paths
        if paths is None:
            super()._emit(peer, datagram, out)
            return
        now = self._clock()
        if datagram[0] == 1:  # an initiation: did the previous one go unanswered? (the selector learns the path)
            paths.before_initiation(peer, now, out)
        endpoint = paths.tx_endpoint(peer, now)
        if paths.rx_via_derp and datagram[0] != 1 and paths.derp_up:
            endpoint = paths.peers[peer.public_key].derp_ep if peer.public_key in paths.peers else endpoint
        if endpoint is None:
            self.counters["tx_no_endpoint"] += 1
            return
        add_datagram(out, endpoint, datagram)
        peer.tx_bytes += len(datagram)
        paths.handshake_sent(peer, endpoint, datagram, now, out)

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

    def _after_send(self, peer: Peer, sent_bytes: int, sent_data: bool, now: float, out: Out) -> None:
        peer.tx_bytes += sent_bytes
        timers = peer.timers
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_sent(now)
        if sent_data:
            timers.data_sent(now)
        if needs_rekey_on_send(peer.keypairs.current, now):
            self._initiate_handshake(peer, now, out)
