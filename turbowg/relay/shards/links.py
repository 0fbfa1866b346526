"""Wiring one worker's DerpServer to its sibling shards: key announcements and congestion.

`ShardContext` is what a worker process gets from the supervisor (its index and its channel ends).
`attach` turns each channel into a ShardPeer (peer.py), announces every key this shard holds -- now
and whenever a key gets its first or loses its last local connection (`DerpServer.add_conn_listener`)
-- and stops reading from this shard's clients while any channel is congested, so senders feel TCP
backpressure instead of the channel dropping. With a C forwarding plane (server.fast) the channel sockets
go to the C loop instead of asyncio (ShardPeer.attach_c): C-held senders are then paused per key by the
C loops themselves, and the congestion signal only comes from packets Python forwards.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from turbowg.relay.server import DerpServer
from turbowg.relay.shards.peer import ShardCounters, ShardPeer


@dataclass
class ShardLinks:
    """All channels of one shard, attached to its DerpServer."""

    peers: dict[int, ShardPeer]
    _unsubscribe: Callable[[], None]

    def counters(self) -> ShardCounters:
        total = ShardCounters()
        for peer in self.peers.values():
            for name, value in vars(peer.sync_counters()).items():
                setattr(total, name, getattr(total, name) + value)
        return total

    def close(self) -> None:
        self._unsubscribe()
        for peer in self.peers.values():
            peer.close()


@dataclass
class ShardContext:
    """What a worker gets: its index, the worker count, and its channels to the other shards."""

    index: int
    workers: int
    channels: dict[int, socket.socket] = field(default_factory=dict)

    async def attach(self, server: DerpServer) -> ShardLinks:
        """Wire this shard's DerpServer to the other shards (call once, inside the worker's loop)."""
        loop = asyncio.get_running_loop()
        peers: dict[int, ShardPeer] = {}
        congested: set[int] = set()

        def on_congestion(peer: ShardPeer, is_congested: bool) -> None:
            if is_congested:
                if not congested:  # first congested channel: stop reading from every client of this shard
                    server.pause_client_reads()
                congested.add(peer.peer_index)
            elif peer.peer_index in congested:
                congested.discard(peer.peer_index)
                if not congested:
                    server.resume_client_reads()

        for peer_index, sock in sorted(self.channels.items()):
            peer = ShardPeer(server, peer_index, on_congestion=on_congestion)
            if server.fast is not None:
                peer.attach_c(server.fast, sock)
            else:
                await loop.connect_accepted_socket(lambda p=peer: p, sock)
            peers[peer_index] = peer

        def on_conn_change(key: bytes, present: bool) -> None:
            for peer in peers.values():
                peer.announce(key, present)

        unsubscribe = server.add_conn_listener(on_conn_change)
        for key in server.local_keys():
            on_conn_change(key, True)
        return ShardLinks(peers, unsubscribe)
