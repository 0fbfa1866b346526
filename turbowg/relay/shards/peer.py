"""ShardPeer: this shard's end of the channel to one sibling shard, and the forwarder for its keys.

For every key the sibling holds (it says so with PRESENT records), the DerpServer of this shard has
this ShardPeer registered as the packet forwarder -- the same hook the mesh uses between relays.
`forward_packet` appends a PACKET record (records.py) to an output buffer and a flush is scheduled
once per event-loop turn, so packets cross between processes in batches (one write per turn per
sibling, not one per packet). The receiving side hands each packet to `DerpServer.deliver_forwarded`,
which only delivers locally (never re-forwards). Each channel end is owned by exactly one process: no
locks anywhere on this path.

Flow control: when the channel holds more than CHANNEL_HIGH unsent bytes the peer reports congestion
(`on_congestion`, links.py pauses the shard's client reads) until it drains below CHANNEL_LOW.

Two ways to run, one record format:
- asyncio (the pure-Python path, TURBOWG_NO_C=1): the channel is an asyncio transport and every packet
  crosses in Python, as described above.
- C (`attach_c`, when the worker has a C forwarding plane): the channel fd belongs to the worker's C loop
  (fastpath.py, _fastpath.c). Packets between C-held clients cross without Python, with per-key XOFF/XON
  records between the two C loops as backpressure; this object then only sees what C hands up
  (`records_received`: PRESENT/GONE, packets for keys Python holds), and forwards for senders Python holds
  (TLS, WebSocket, mesh) through `FastPlane.forward`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from turbowg.relay.server import DerpServer
from turbowg.relay.shards import records
from turbowg.relay.shards.records import (
    MAX_RECORD,
    REC_GONE,
    REC_PACKET,
    REC_PRESENT,
    append_announce,
    append_packet,
)
from turbowg.wire import KEY_SIZE

if TYPE_CHECKING:
    import socket

    from turbowg.relay.fastpath import FastPlane

log = logging.getLogger("turbowg.relay.shards")

# data_received parses records inline: it is the receiving shard's hot loop.
_REC_HEADER = records.HEADER
_REC_HEADER_LEN = records.HEADER_LEN

# Above this many bytes not yet taken by the kernel/peer shard, forwarded packets are dropped (like a
# full client send queue) instead of buffering without bound.
DEFAULT_MAX_BACKLOG = 8 << 20
# Flow control between shards: when the channel to a sibling holds more than CHANNEL_HIGH unsent
# bytes, this shard stops reading from its clients until it drains below CHANNEL_LOW. Without it a
# shard that reads its senders faster than the sibling can deliver would only fill the backlog and
# drop; with it the senders feel TCP backpressure, as they do when one event loop does everything.
CHANNEL_HIGH = 2 << 20
CHANNEL_LOW = 512 << 10


@dataclass
class ShardCounters:
    packets_out: int = 0
    bytes_out: int = 0
    batches_out: int = 0
    packets_in: int = 0
    packets_in_undelivered: int = 0  # deliver_forwarded said no (client gone or its queue full)
    dropped_backlog: int = 0  # channel to the peer shard was full
    dropped_closed: int = 0  # channel to the peer shard is closed


class ShardPeer(asyncio.Protocol):
    """This shard's view of one other shard: the channel to it, and the forwarder for its keys."""

    # server.SiblingForwarder: this forwarder reaches a sibling shard of this same relay (not another
    # relay), so the server may pass a mesh-forwarded packet on to it (the sibling only delivers locally).
    intra_server = True

    def __init__(
        self, server: DerpServer, peer_index: int, max_backlog: int = DEFAULT_MAX_BACKLOG,
        on_congestion: Callable[[ShardPeer, bool], None] | None = None,
    ) -> None:
        self.server = server
        self.on_congestion = on_congestion
        self.peer_index = peer_index
        self.max_backlog = max_backlog
        self.counters = ShardCounters()
        self.remote_keys: set[bytes] = set()  # keys the peer shard says it holds (forwarders registered)
        self.closed = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._out = bytearray()
        self._flush_scheduled = False
        self._rx = b""
        # Congested = the transport says its buffer is over high water, or this turn's batch already is
        # (uvloop reads up to MBs per connection per turn, so waiting for the flush would be too late).
        self._transport_paused = False
        self._batch_full = False
        self._congested = False
        # C mode (attach_c): the channel's id in the worker's C loop, and packets Python forwarded through it
        self.c_channel: int | None = None
        self._plane: FastPlane | None = None
        self._py_packets_out = 0
        self._py_packets_in = 0

    def attach_c(self, plane: FastPlane, sock: socket.socket) -> None:
        """Hand the channel socket to the worker's C loop (instead of an asyncio transport)."""
        self._plane = plane
        self.c_channel = plane.add_channel(sock, self.peer_index, self)

    def sync_counters(self) -> ShardCounters:
        """The counters, with the packets the C loop moved on this channel added (C mode)."""
        if self.c_channel is not None and self._plane is not None:
            try:
                info = self._plane.channel_info(self.c_channel)
            except (KeyError, ValueError):
                return self.counters
            self.counters.packets_out = self._py_packets_out + int(info["records_out"])  # type: ignore[call-overload]
            self.counters.packets_in = self._py_packets_in + int(info["records_in"])  # type: ignore[call-overload]
        return self.counters

    # -- sending side (called from the DerpServer's forwarding path) --------------------------------

    def forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        fid = self.c_channel
        if fid is not None:
            return self._forward_c(fid, src, dst, packet)
        if self._plane is not None:  # C mode, channel gone
            self.counters.dropped_closed += 1
            return False
        transport = self._transport
        if transport is None or transport.is_closing():
            self.counters.dropped_closed += 1
            return False
        out = self._out
        if len(out) + transport.get_write_buffer_size() > self.max_backlog:
            self.counters.dropped_backlog += 1
            return False
        append_packet(out, src, dst, packet)
        self.counters.packets_out += 1
        if not self._batch_full and len(out) > CHANNEL_HIGH:
            self._batch_full = True
            self._update_congestion()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return True

    def _forward_c(self, fid: int, src: bytes, dst: bytes, packet: bytes) -> bool:
        assert self._plane is not None
        queued = self._plane.forward(fid, src, dst, packet, self.max_backlog)
        if queued < 0:
            self.counters.dropped_backlog += 1
            return False
        self._py_packets_out += 1
        self.counters.packets_out += 1
        if queued > CHANNEL_HIGH and not self._batch_full:
            self._batch_full = True  # until channel_drained says it is below CHANNEL_LOW
            self._plane.watch_drain(fid, self)
            self._update_congestion()
        return True

    # -- C mode: fastpath.ChannelEnd -----------------------------------------------------------------

    def records_received(self, data: bytes) -> None:
        self.data_received(data)

    def channel_lost(self, reason: str) -> None:
        self.c_channel = None
        self.connection_lost(None)

    def channel_drained(self, queued: int) -> None:
        if queued < CHANNEL_LOW and self._batch_full and self._plane is not None and self.c_channel is not None:
            self._batch_full = False
            self._plane.unwatch_drain(self.c_channel)
            self._update_congestion()

    def announce(self, key: bytes, present: bool) -> None:
        """Tell the peer shard that this shard gained or lost a client key."""
        if self.c_channel is not None and self._plane is not None:
            rec = bytearray()
            append_announce(rec, key, present)
            self._plane.write_channel(self.c_channel, bytes(rec))
            return
        if self._transport is None or self._transport.is_closing():
            return
        append_announce(self._out, key, present)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out or self._transport is None or self._transport.is_closing():
            self._out.clear()
            return
        batch, self._out = self._out, bytearray()  # the transport may keep a reference to batch
        self.counters.bytes_out += len(batch)
        self.counters.batches_out += 1
        self._transport.write(batch)
        if self._batch_full:
            self._batch_full = False
            self._update_congestion()

    def close(self) -> None:
        """Close the channel (connection_lost then unregisters the sibling's keys)."""
        if self.c_channel is not None and self._plane is not None:
            self._plane.drop_channel(self.c_channel)
        elif self._transport is not None:
            self._transport.close()

    def _update_congestion(self) -> None:
        congested = self._transport_paused or self._batch_full
        if congested != self._congested:
            self._congested = congested
            if self.on_congestion is not None:
                self.on_congestion(self, congested)

    # -- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's Unix transport does not subclass asyncio.Transport, hence a cast, not an isinstance check.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=CHANNEL_HIGH, low=CHANNEL_LOW)

    def pause_writing(self) -> None:
        self._transport_paused = True
        self._update_congestion()

    def resume_writing(self) -> None:
        self._transport_paused = False
        self._update_congestion()

    def data_received(self, data: bytes) -> None:
        if self._rx:
            data = self._rx + data
        end = len(data)
        pos = 0
        server = self.server
        counters = self.counters
        unpack = _REC_HEADER.unpack_from
        while end - pos >= _REC_HEADER_LEN:
            length, rec_type = unpack(data, pos)
            if length > MAX_RECORD:
                log.error("shard channel to %d corrupted (record of %d bytes); closing", self.peer_index, length)
                if self._transport is not None:
                    self._transport.close()
                return
            body = pos + _REC_HEADER_LEN
            if end - body < length:
                break
            pos = body + length
            if rec_type == REC_PACKET:
                counters.packets_in += 1
                self._py_packets_in += 1
                if not server.deliver_forwarded(
                    data[body : body + KEY_SIZE], data[body + KEY_SIZE : body + 2 * KEY_SIZE], data[body + 2 * KEY_SIZE : pos]
                ):
                    counters.packets_in_undelivered += 1
            elif rec_type == REC_PRESENT and length == KEY_SIZE:
                key = data[body:pos]
                if key not in self.remote_keys:
                    self.remote_keys.add(key)
                    server.register_forwarder(key, self)
            elif rec_type == REC_GONE and length == KEY_SIZE:
                key = data[body:pos]
                if key in self.remote_keys:
                    self.remote_keys.discard(key)
                    server.unregister_forwarder(key, self)
            else:
                log.warning("shard channel to %d: unknown record type %d ignored", self.peer_index, rec_type)
        self._rx = data[pos:] if pos < end else b""

    def connection_lost(self, exc: Exception | None) -> None:
        for key in self.remote_keys:
            self.server.unregister_forwarder(key, self)
        self.remote_keys.clear()
        self._transport = None
        self._transport_paused = self._batch_full = False
        self._update_congestion()
        if not self.closed.done():
            self.closed.set_result(None)
