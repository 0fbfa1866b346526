"""Run the relay as N worker processes ("shards") that together behave as one DERP server.

Why processes: one Python event loop saturates one core long before the NIC. Each shard is a
forked process with its own event loop (uvloop when installed) and its own `DerpServer`, and all
of them accept on the same port with SO_REUSEPORT, so the kernel spreads connections across them.

A client on shard A may send to a key held by shard B. Shards therefore tell each other which keys
they hold (via `DerpServer.add_conn_listener`) and each shard registers, for every key another shard
holds, that shard's `ShardPeer` as the packet forwarder -- the same hook the mesh uses between relays.
`ShardPeer.forward_packet` appends a length-prefixed record to an output buffer and a flush is
scheduled once per event-loop turn, so packets cross between processes in batches (one write per
turn per peer shard, not one per packet). The receiving shard hands each packet to
`DerpServer.deliver_forwarded`, which only delivers locally (never re-forwards). Every shard pair
has its own socketpair, each end owned by exactly one process: no locks anywhere on this path.

Records on a channel: 4-byte big-endian body length, 1-byte type, body.
  PACKET  src key (32) | dst key (32) | packet
  PRESENT key (32)   -- this shard now holds key
  GONE    key (32)   -- this shard no longer holds key
All records on a channel are ordered, so a PRESENT is always seen before packets it enables.

The parent process only supervises: it forwards SIGTERM/SIGINT to the workers and, if one worker
dies unexpectedly, stops the rest and exits non-zero (the inter-shard channels of a dead shard
cannot be rebuilt in place; a service manager restarts the whole relay).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from turbowg.derp.server import DerpServer

log = logging.getLogger(__name__)

KEY_LEN = 32
REC_PACKET = 1
REC_PRESENT = 2
REC_GONE = 3
_REC_HEADER = struct.Struct("!IB")
_REC_HEADER_LEN = _REC_HEADER.size
MAX_RECORD = 1 << 20  # DERP packets are at most 64 KiB; anything larger means a corrupted channel
# Above this many bytes not yet taken by the kernel/peer shard, forwarded packets are dropped (like a
# full client send queue) instead of buffering without bound.
DEFAULT_MAX_BACKLOG = 8 << 20
# Flow control between shards: when the channel to a sibling holds more than CHANNEL_HIGH unsent
# bytes, this shard stops reading from its clients until it drains below CHANNEL_LOW. Without it a
# shard that reads its senders faster than the sibling can deliver would only fill the backlog and
# drop; with it the senders feel TCP backpressure, as they do when one event loop does everything.
CHANNEL_HIGH = 2 << 20
CHANNEL_LOW = 512 << 10
STOP_GRACE_SECONDS = 10.0

WorkerMain = Callable[["ShardContext"], Coroutine[Any, Any, None]]


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

    # Marks a forwarder that reaches a sibling shard of this same relay (not another relay): the server
    # may pass a mesh-forwarded packet on to it, since the sibling only ever delivers locally.
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

    # -- sending side (called from the DerpServer's forwarding path) --------------------------------

    def forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing():
            self.counters.dropped_closed += 1
            return False
        out = self._out
        if len(out) + transport.get_write_buffer_size() > self.max_backlog:
            self.counters.dropped_backlog += 1
            return False
        out += _REC_HEADER.pack(2 * KEY_LEN + len(packet), REC_PACKET)
        out += src
        out += dst
        out += packet
        self.counters.packets_out += 1
        if not self._batch_full and len(out) > CHANNEL_HIGH:
            self._batch_full = True
            self._update_congestion()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return True

    def announce(self, key: bytes, present: bool) -> None:
        """Tell the peer shard that this shard gained or lost a client key."""
        if self._transport is None or self._transport.is_closing():
            return
        self._out += _REC_HEADER.pack(KEY_LEN, REC_PRESENT if present else REC_GONE)
        self._out += key
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
                if not server.deliver_forwarded(
                    data[body : body + KEY_LEN], data[body + KEY_LEN : body + 2 * KEY_LEN], data[body + 2 * KEY_LEN : pos]
                ):
                    counters.packets_in_undelivered += 1
            elif rec_type == REC_PRESENT and length == KEY_LEN:
                key = data[body:pos]
                if key not in self.remote_keys:
                    self.remote_keys.add(key)
                    server.register_forwarder(key, self)
            elif rec_type == REC_GONE and length == KEY_LEN:
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


@dataclass
class ShardLinks:
    """All channels of one shard, attached to its DerpServer."""

    peers: dict[int, ShardPeer]
    _unsubscribe: Callable[[], None]

    def counters(self) -> ShardCounters:
        total = ShardCounters()
        for peer in self.peers.values():
            for name, value in vars(peer.counters).items():
                setattr(total, name, getattr(total, name) + value)
        return total

    def close(self) -> None:
        self._unsubscribe()
        for peer in self.peers.values():
            if peer._transport is not None:
                peer._transport.close()


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
        paused: list[asyncio.BaseTransport] = []

        def on_congestion(peer: ShardPeer, is_congested: bool) -> None:
            if is_congested:
                if not congested:  # first congested channel: stop reading from every client of this shard
                    for conn in list(server.conns):
                        t = conn.transport
                        if t is not None and not t.is_closing():
                            t.pause_reading()
                            paused.append(t)
                congested.add(peer.peer_index)
            elif peer.peer_index in congested:
                congested.discard(peer.peer_index)
                if not congested:
                    for t in paused:
                        if not t.is_closing():
                            t.resume_reading()
                    paused.clear()

        for peer_index, sock in sorted(self.channels.items()):
            peer = ShardPeer(server, peer_index, on_congestion=on_congestion)
            transport, _ = await loop.connect_accepted_socket(lambda p=peer: p, sock)
            peer._transport = cast(asyncio.Transport, transport)
            peers[peer_index] = peer

        def on_conn_change(key: bytes, present: bool) -> None:
            for peer in peers.values():
                peer.announce(key, present)

        unsubscribe = server.add_conn_listener(on_conn_change)
        for key in server.local_keys():
            on_conn_change(key, True)
        return ShardLinks(peers, unsubscribe)


def _make_channels(workers: int) -> dict[int, dict[int, socket.socket]]:
    """One socketpair per pair of shards: channels[i][j] is shard i's end of the i<->j channel."""
    channels: dict[int, dict[int, socket.socket]] = {i: {} for i in range(workers)}
    for i in range(workers):
        for j in range(i + 1, workers):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            for end in (a, b):
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            channels[i][j] = a
            channels[j][i] = b
    return channels


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_worker(ctx: ShardContext, worker_main: WorkerMain) -> int:
    """Run one shard in the current process until worker_main returns or SIGTERM/SIGINT arrives."""

    async def guarded() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        try:
            await worker_main(ctx)
        except asyncio.CancelledError:
            pass

    with asyncio.Runner(loop_factory=_new_event_loop) as runner:
        runner.run(guarded())
    return 0


def run_sharded(workers: int, worker_main: WorkerMain) -> int:
    """Run `worker_main` in `workers` forked processes (in-process if workers == 1); returns an exit code.

    Call it from synchronous code (no running event loop): the children are forked from here.
    Each worker must create its own listening socket with SO_REUSEPORT, build its own DerpServer and
    call `await ctx.attach(server)` before serving.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    if workers == 1:
        return run_worker(ShardContext(0, 1), worker_main)

    channels = _make_channels(workers)
    watched = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    children: dict[int, int] = {}  # pid -> shard index
    try:
        for index in range(workers):
            pid = os.fork()
            if pid == 0:  # child
                code = 1
                try:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                    for other, ends in channels.items():
                        if other != index:
                            for sock in ends.values():
                                sock.close()
                    code = run_worker(ShardContext(index, workers, channels[index]), worker_main)
                except BaseException:
                    log.exception("shard %d crashed", index)
                finally:
                    os._exit(code)
            children[pid] = index
        for ends in channels.values():
            for sock in ends.values():
                sock.close()
        return _supervise(children, watched)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)  # no-op unless supervision itself failed
            except ProcessLookupError:
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _supervise(children: dict[int, int], watched: set[signal.Signals]) -> int:
    """Wait for the workers; forward stop signals; stop all if one dies. Children must be reaped."""
    stopping = False
    deadline: float | None = None
    status = 0
    while children:
        timeout = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        info = signal.sigtimedwait(watched, timeout)
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT) and not stopping:
            stopping = True
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            _signal_all(children, signal.SIGTERM)
        while children:  # reap everything that exited (SIGCHLD coalesces)
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            index = children.pop(pid, None)
            code = os.waitstatus_to_exitcode(wait_status)
            if not stopping:
                log.error("shard %s exited with %d; stopping the relay", index, code)
                status = 1
                stopping = True
                deadline = time.monotonic() + STOP_GRACE_SECONDS
                _signal_all(children, signal.SIGTERM)
            elif code != 0:
                status = status or 1
        if deadline is not None and time.monotonic() >= deadline and children:
            log.error("shards %s did not stop in %.0f s; killing", sorted(children.values()), STOP_GRACE_SECONDS)
            _signal_all(children, signal.SIGKILL)
            deadline = time.monotonic() + STOP_GRACE_SECONDS
    return status


def _signal_all(children: dict[int, int], signum: int) -> None:
    for pid in children:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def reuseport_listener(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT, so every shard can bind the same host:port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
