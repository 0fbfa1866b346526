"""The receive path (UDP -> TUN), as wireguard-go's device/receive.go: find the keypair a transport message
names, have the noise layer open it, route what came out (inner header, allowed source), and hand handshake
messages to handshake.py.

`handle_udp_packed` is the runtime's hot path: datagrams lie in the runtime's receive buffer; one
`open_batch` (turbowg/noise/transport.py: authenticate, decrypt in place, replay window) and one
`check_inner_sources` (turbowg/device/route.py: inner IP header, allowed source) call per run of messages to
one keypair; the packets for the TUN are described by the preallocated `Device.rx_layout`.
`receive_lone` is the same for the one datagram of a lone wake, with the open, the replay and inner checks
and the TUN write in one C call (`Aead.open_write`); anything unusual goes down the batch path instead.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Iterable

from turbowg.conn.endpoint import Endpoint
from turbowg.device.constants import REJECT_AFTER_TIME
from turbowg.device.output import Out, Transmit, transmits
from turbowg.device.peer import Peer
from turbowg.device.route import check_inner_sources
from turbowg.device.state import DeviceState
from turbowg.device.timers import needs_rekey_on_receive
from turbowg.noise.handshake import Identified
from turbowg.noise.transport import (
    OW_AUTH_FAIL,
    OW_BAD_INNER,
    OW_EXPIRED,
    OW_KEEPALIVE,
    OW_MISMATCH,
    OW_NOT_MINE,
    OW_REPLAY,
    OW_WRITTEN,
)
from turbowg.wire import MESSAGE_COOKIE_REPLY, MESSAGE_INITIATION, MESSAGE_TRANSPORT, TRANSPORT_MIN_SIZE

_MESSAGE_TYPE = struct.Struct("<I")

# What receive_lone did with the packet (None: nothing, the batch path must take the datagram).
LONE_NOTHING = 0  # nothing to write (keepalive, dropped, refused): counted
LONE_WRITTEN = 1  # written to the TUN
LONE_WRITE = 2  # the caller writes rx_layout[0:2] (source re-checked here, or the C write failed)

_REFUSED = {OW_AUTH_FAIL: "rx_decrypt_failed", OW_REPLAY: "rx_replay", OW_EXPIRED: "rx_expired_keypair"}

# Room of the packed receive path: inner packets one batch of UDP reads can hold (32 bytes each at least:
# the runtime's 2 MiB receive buffer plus one last 64 KiB read).
RX_MAX_PACKETS = 68 << 10


class ReceivePath(DeviceState):
    """The UDP -> TUN methods of `Device`."""

    # Set by the runtime when a handshake worker (turbowg/daemon/handshake_worker.py) serves handshake
    # messages: called as sink(kind, data, endpoint) instead of handling them here; what the worker passes
    # back comes in through handle_handshake_results.
    handshake_sink: Callable[[int, bytes, Endpoint], None] | None = None

    def handle_handshake_results(self, identified: Iterable[tuple[Identified, Endpoint]],
                                 forwarded: Iterable[tuple[int, bytes, Endpoint]], now: float) -> list[Transmit]:
        """What the handshake worker passed on: initiations it identified (answered here after the per-peer
        checks) and responses / cookie replies that passed its mac1 (and, under load, mac2 and rate) checks."""
        out: Out = {}
        for ident, endpoint in identified:
            self._consume_identified(ident, endpoint, now, out)
        for kind, data, endpoint in forwarded:
            self._handle_handshake_message(kind, data, endpoint, now, False, out)
        return transmits(out)

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
        count, out = self.handle_udp_packed(buf, chunks, endpoints, now, under_load)
        layout = self.rx_layout
        packets = [bytes(buf[layout[2 * k]:layout[2 * k] + layout[2 * k + 1]]) for k in range(count)]
        return packets, out

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
        out: Out = {}
        heard: dict[Peer, bool] = {}
        paths = self.paths
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
                if paths is None:
                    peer.endpoint = endpoint
                else:  # counts per path, roams only to real endpoints (paths.py)
                    paths.data_received(peer, endpoint, opened.rx_bytes, authenticated, now, out)
                peer.rx_bytes += opened.rx_bytes
                if peer.keypairs.next is keypair:
                    self._confirm_keypair(peer, keypair, now, out)
                if authenticated > opened.keepalive:
                    heard[peer] = True
                elif peer not in heard:
                    heard[peer] = False
        self._after_receive(heard, now, out)
        return n_out, transmits(out)

    def receive_lone(self, buf: bytearray, off: int, length: int, endpoint: Endpoint, now: float, tun_fd: int,
                     prefix: bytes) -> int | None:
        """The lone-datagram path: the one transport message at buf[off:off+length] from `endpoint` is opened,
        checked and written to the TUN `tun_fd` (writev of `prefix` + packet) in one C call
        (`Aead.open_write`), then handle_udp_packed's bookkeeping is done for it (counters, roaming, key
        confirmation, timers). Returns LONE_NOTHING / LONE_WRITTEN / LONE_WRITE, or None when the datagram
        needs the batch path (not a transport message, unknown index, expired keypair, the DERP path
        selector); nothing is changed then. What it starts (a rekey, staged packets after a key
        confirmation) is queued for the next tick, after the packet."""
        if length < TRANSPORT_MIN_SIZE or self.paths is not None:
            return None
        unpack = _MESSAGE_TYPE.unpack_from
        if unpack(buf, off)[0] != MESSAGE_TRANSPORT:
            return None
        receiver = unpack(buf, off + 4)[0]
        entry = self._indices.get(receiver)
        keypair = entry.keypair if entry is not None else None
        if keypair is None or now - keypair.created >= REJECT_AFTER_TIME:
            return None
        peer = entry.peer  # type: ignore[union-attr]
        code = keypair.receive_aead.open_write(buf, off, length, receiver, keypair.replay, peer.allowed_src, tun_fd,
                                               prefix, self.rx_layout)
        data = True
        if code == OW_NOT_MINE:  # cannot happen after the checks above; nothing was touched
            return None
        if code == OW_WRITTEN:
            result = LONE_WRITTEN
        elif code < 0:
            result = LONE_WRITE  # the TUN write failed: the caller's write counts it (or finds the TUN gone)
        elif code == OW_MISMATCH:
            result = LONE_WRITE if self._check_sources(peer, buf, self.rx_layout, 0, 1) else LONE_NOTHING
        elif code == OW_KEEPALIVE:
            self.counters["rx_keepalive"] += 1
            data = False
            result = LONE_NOTHING
        elif code == OW_BAD_INNER:
            self.counters["rx_bad_inner_packet"] += 1
            result = LONE_NOTHING
        else:  # not authenticated: nothing else happens (as handle_udp_packed)
            self.counters[_REFUSED[code]] += 1
            return LONE_NOTHING
        # What handle_udp_packed and _after_receive do for one authenticated message, inlined.
        peer.endpoint = endpoint
        peer.rx_bytes += length
        if peer.keypairs.next is keypair:
            self._confirm_keypair(peer, keypair, now, self._queued)
        timers = peer.timers
        if timers.persistent_keepalive_interval > 0:
            timers.any_authenticated_packet_traversal(now)
        timers.new_handshake = None  # any_authenticated_packet_received
        if data:
            timers.data_received(now)
        if not peer.sent_last_minute_handshake and needs_rekey_on_receive(peer.keypairs.current, now):
            peer.sent_last_minute_handshake = True
            self._initiate_handshake(peer, now, self._queued)
        return result

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
                       out: Out) -> None:
        """A datagram that is not a well-formed transport message."""
        if kind < 0:
            self.counters["rx_too_short"] += 1
        elif kind == MESSAGE_TRANSPORT:
            self.counters["rx_transport_too_short"] += 1
        elif MESSAGE_INITIATION <= kind <= MESSAGE_COOKIE_REPLY:
            sink = self.handshake_sink
            if sink is not None and endpoint[1] != 0:  # not over DERP (paths.py): the worker needs an address
                sink(kind, data, endpoint)  # off the data path, to the handshake worker
            else:
                self._handle_handshake_message(kind, data, endpoint, now, under_load, out)
        elif self.paths is None or not self.paths.receive_other(data, endpoint, now, out):  # disco, STUN
            self.counters["rx_unknown_type"] += 1

    def _after_receive(self, heard: dict[Peer, bool], now: float, out: Out) -> None:
        for peer, got_data in heard.items():
            timers = peer.timers
            timers.any_authenticated_packet_traversal(now)
            timers.any_authenticated_packet_received(now)
            if got_data:
                timers.data_received(now)
            if not peer.sent_last_minute_handshake and needs_rekey_on_receive(peer.keypairs.current, now):
                peer.sent_last_minute_handshake = True
                self._initiate_handshake(peer, now, out)
