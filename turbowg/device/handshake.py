"""Driving the Noise handshake for the device, as wireguard-go's device/noise-protocol.go + the handshake
half of receive.go: send initiations (rate-limited), consume initiations, responses and cookie replies
(with the cookie/under-load check), install the derived keypairs and confirm a responder's keypair on its
first data. The cryptography itself is turbowg/noise/handshake.py; the indices are indextable.py.
"""

from __future__ import annotations

from turbowg.conn.endpoint import Endpoint, cookie_source
from turbowg.device.constants import REJECT_AFTER_MESSAGES, REKEY_TIMEOUT
from turbowg.device.keypair import Keypair
from turbowg.device.output import Out, add_datagram
from turbowg.device.peer import Peer
from turbowg.device.state import DeviceState
from turbowg.noise.handshake import (
    Handshake,
    HandshakeError,
    Identified,
    LocalIdentity,
    accept_identified,
    begin_session,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
)
from turbowg.wire import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    RESPONSE_SIZE,
)


class HandshakeDriver(DeviceState):
    """The handshake methods of `Device`."""

    def _initiate_handshake(self, peer: Peer, now: float, out: Out, retry: bool = False) -> None:
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
        indices = self._indices
        indices.free_handshake(peer)
        index = indices.new_index(peer)
        try:
            message = create_initiation(handshake, index, self._wall_clock())
        except HandshakeError:
            indices.free(index)
            self.counters["tx_handshake_impossible"] += 1
            return
        peer.handshake_index = index
        peer.cookie_generator.add_macs(message, now)
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_sent(now)
        self._emit(peer, message, out)
        self.counters["tx_initiation"] += 1
        timers.handshake_initiated(now)

    def _handle_handshake_message(
        self, kind: int, data: bytes, endpoint: Endpoint, now: float, under_load: bool, out: Out
    ) -> None:
        counters = self.counters
        size = len(data)
        if kind == MESSAGE_COOKIE_REPLY:
            if size != COOKIE_REPLY_SIZE:
                counters["rx_cookie_reply_bad_size"] += 1
                return
            entry = self._indices.lookup(int.from_bytes(data[4:8], "little"))
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
            source = cookie_source(endpoint)
            if not checker.check_mac2(data, source, now):
                sender = int.from_bytes(data[4:8], "little")
                add_datagram(out, endpoint, checker.create_reply(data, sender, source, now))
                counters["tx_cookie_reply"] += 1
                return
        if kind == MESSAGE_INITIATION:
            self._consume_initiation(identity, data, endpoint, now, out)
        else:
            self._consume_response(identity, data, endpoint, now, out)

    def _handshake_for_key(self, public_key: bytes) -> Handshake | None:
        peer = self.peers.get(bytes(public_key))
        return peer.handshake if peer is not None else None

    def _handshake_for_index(self, index: int) -> Handshake | None:
        peer = self._indices.handshake_peer(index)
        return peer.handshake if peer is not None else None

    def _consume_initiation(
        self, identity: LocalIdentity, data: bytes, endpoint: Endpoint, now: float, out: Out
    ) -> None:
        handshake = consume_initiation(identity, data, self._handshake_for_key, now)
        self._answer_initiation(handshake, len(data), endpoint, now, out)

    def _consume_identified(self, ident: Identified, endpoint: Endpoint, now: float, out: Out) -> None:
        """An initiation the handshake worker identified (turbowg/device/handshake_worker.py)."""
        handshake = self._handshake_for_key(ident.remote_static)
        if handshake is not None and not accept_identified(handshake, ident, now):
            handshake = None
        self._answer_initiation(handshake, INITIATION_SIZE, endpoint, now, out)

    def _answer_initiation(self, handshake: Handshake | None, size: int, endpoint: Endpoint, now: float,
                           out: Out) -> None:
        if handshake is None:
            self.counters["rx_initiation_rejected"] += 1
            return
        peer = self.peers[handshake.remote_static]
        peer.endpoint = endpoint
        peer.rx_bytes += size
        timers = peer.timers
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_received(now)
        if not self.up:
            return
        indices = self._indices
        # Our own initiation, if any, is superseded: its state was just overwritten.
        indices.free_handshake(peer)
        index = indices.new_index(peer)
        try:
            response = create_response(handshake, index)
        except HandshakeError:
            indices.free(index)
            self.counters["rx_initiation_rejected"] += 1
            return
        peer.cookie_generator.add_macs(response, now)
        keys = begin_session(handshake)
        keypair = Keypair(keys.send_key, keys.recv_key, index, keys.remote_index, now, False)
        indices[index].keypair = keypair
        self._install_keypair(peer, keypair)
        timers.session_derived(now)
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_sent(now)
        self._emit(peer, response, out)
        self.counters["tx_response"] += 1

    def _consume_response(
        self, identity: LocalIdentity, data: bytes, endpoint: Endpoint, now: float, out: Out
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

    def _install_keypair(self, peer: Peer, keypair: Keypair) -> None:
        self._indices.free_keypairs(peer.keypairs.install(keypair))
        peer.sent_last_minute_handshake = False

    def _confirm_keypair(self, peer: Peer, keypair: Keypair, now: float, out: Out) -> None:
        """First data under the responder's `next` keypair: the initiator has the keys."""
        rotated, dropped = peer.keypairs.confirm(keypair)
        self._indices.free_keypairs(dropped)
        if rotated:
            peer.timers.handshake_complete(now)
            peer.last_handshake_wall = self._wall_clock()
            self._send_staged(peer, now, out)

    def _expire_current_keypairs(self, peer: Peer) -> None:
        """Sessions under the old identity may still receive but must not send; the next
        packet starts a handshake at once (wireguard-go ExpireCurrentKeypairs)."""
        if peer.handshake is not None:
            peer.handshake.clear()
        self._indices.free_handshake(peer)
        peer.last_sent_handshake = None
        for keypair in (peer.keypairs.current, peer.keypairs.next):
            if keypair is not None:
                keypair.send_counter = REJECT_AFTER_MESSAGES
