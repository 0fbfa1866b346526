"""The record format on a channel between two shards of one relay (a socketpair per pair of shards).

Records: 4-byte big-endian body length, 1-byte type, body.
  PACKET  src key (32) | dst key (32) | packet
  PRESENT key (32)   -- this shard now holds key
  GONE    key (32)   -- this shard no longer holds key
All records on a channel are ordered, so a PRESENT is always seen before packets it enables.

Encoding appends to the caller's batch buffer (one write per loop turn, peer.py); decoding is inline
in ShardPeer.data_received, the hot loop of the receiving shard, using HEADER and HEADER_LEN from here.
"""

from __future__ import annotations

import struct

from turbowg.wire import KEY_SIZE

REC_PACKET = 1
REC_PRESENT = 2
REC_GONE = 3
HEADER = struct.Struct("!IB")
HEADER_LEN = HEADER.size
MAX_RECORD = 1 << 20  # DERP packets are at most 64 KiB; anything larger means a corrupted channel
PACKET_OVERHEAD = HEADER_LEN + 2 * KEY_SIZE

_pack_header = HEADER.pack


def append_packet(out: bytearray, src: bytes, dst: bytes, packet: bytes) -> None:
    """A PACKET record for `packet` from `src` to `dst`, appended to `out`."""
    out += _pack_header(2 * KEY_SIZE + len(packet), REC_PACKET)
    out += src
    out += dst
    out += packet


def append_announce(out: bytearray, key: bytes, present: bool) -> None:
    """A PRESENT (or GONE) record for `key`, appended to `out`."""
    out += _pack_header(KEY_SIZE, REC_PRESENT if present else REC_GONE)
    out += key
