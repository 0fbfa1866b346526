"""The I/O runtime: binds the sans-IO device core to a real TUN, a UDP socket and the UAPI socket.

One event loop, three readers: the TUN fd (packets out of the kernel -> encrypt -> UDP), the UDP socket
(datagrams -> decrypt -> TUN), and the UAPI unix socket. Both data directions work in batches: drain the
fd until it would block (bounded), hand the whole batch to the core, then flush the core's output per peer
with as few system calls as the kernel allows (UDP GSO, TUN GRO).

A lone packet (a wake long after the previous one on that fd: interactive traffic; or a wake whose reads
found just one, between a paced flow's bursts) takes a shorter way: `Device.send_lone` /
`Device.receive_lone`, each one C call for the crypto and the system call that sends the result on (seal +
sendto; open + checks + TUN writev), the lone UDP read itself one C recvmsg (`transport.recv_one`); anything
unusual about the packet (no session, a handshake message, the DERP path) falls back to the batch path with
the same read.
`TURBOWG_LONE_PATH=0` turns the lone calls off (the batch path then carries lone packets too).

Wakeups: the loop thread asks the kernel for a short scheduling slice (TURBOWG_SCHED_SLICE_US, default 100 us)
so that a packet's wakeup preempts a CPU-bound task at once; an optional bounded C spin after a lone request
(TURBOWG_BUSY_POLL_US, off: it did not pay on a shared 2-core machine, see docs/DESIGN.md) waits for the
answer without sleeping.

Timers: no polling. The device reports its earliest deadline (`Device.next_deadline()`, O(1)); the runtime
keeps one `call_later` armed for it and moves it earlier after every batch and every UAPI `set` that armed
something sooner (a later deadline only costs one tick that finds nothing to do and re-arms).

Why one file (~720 lines): the one owner of the daemon's lifetime: it opens and closes TUN, UDP, UAPI, DERP
and the timers in one order, and its readers and the timer share that state.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import math
import os
import select
import signal
import socket
import struct
import time
from array import array
from collections.abc import Callable

import uvloop

from turbowg.conn.udp import RECV_BUFFER, UDPBind
from turbowg.daemon.derp_link import DerpLink
from turbowg.daemon.handshake_offload import HandshakeOffload, enabled_from_env
from turbowg.daemon.trace import LatencyTrace, enable_kernel_timestamps
from turbowg.daemon.trace import enabled_from_env as trace_enabled
from turbowg.device import Device
from turbowg.device.handshake_worker import HandshakeRate
from turbowg.device.receive import LONE_WRITE, LONE_WRITTEN, RX_MAX_PACKETS
from turbowg.device.send import TX_MAX_MESSAGES
from turbowg.noise.transport import pack_sockaddr, recv_one, spin_poll
from turbowg.tun.device import (
    READ_ROOM_BYTES,
    READ_ROOM_PACKETS,
    WRITE_MAX_BYTES,
    WRITE_MAX_FRAMES,
    TunDevice,
    open_tun,
)
from turbowg.tun.vnet import ZERO_HDR
from turbowg.uapi.server import UAPIServer, start_uapi_server

log = logging.getLogger("turbowg.runtime")

# Bounds on one reader callback, so one busy direction cannot starve the other or the UAPI.
MAX_TUN_READS_PER_WAKE = 64
MAX_UDP_READS_PER_WAKE = 64
# The device timer fires this much after the deadline, so that a loop clock rounding to the millisecond never
# wakes it just before (which would find nothing due and re-arm at once).
TIMER_SLACK = 0.001
LINK_CHECK_INTERVAL = 1.0  # seconds between checks that the interface still exists
# Handshake messages per second above which the device counts as under load (cookie replies start).
UNDER_LOAD_HANDSHAKES_PER_SECOND = 64
UNDER_LOAD_HOLD = 1.0
# TURBOWG_BUSY_POLL_US=N: after a lone packet left from an idle TUN wake (a request going out: a ping, an
# RPC, a keystroke), poll the UDP socket and the TUN in C (`spin_poll`) for up to N microseconds before going
# back to the loop: the answer that comes back within N us is handled at once, without the wakeup a sleeping
# loop pays (idle exit, epoll return, uvloop dispatch). Only then: not after bulk or paced wakes (they are not
# idle), not after the answering side's own send. Costs CPU while it spins (at most N us per idle request).
BUSY_POLL_DEFAULT_US = 0
BUSY_POLL_MAX_US = 10_000


def busy_poll_from_env() -> int:
    """Microseconds to spin after a lone request left (TURBOWG_BUSY_POLL_US; 0: off)."""
    try:
        value = int(os.environ.get("TURBOWG_BUSY_POLL_US", str(BUSY_POLL_DEFAULT_US)).strip() or "0")
    except ValueError:
        return BUSY_POLL_DEFAULT_US
    return min(max(value, 0), BUSY_POLL_MAX_US)


# A wake this long after the previous one on the same fd counts as a lone packet (see _on_tun_readable).
# Above the 1 ms bursts of common pacers (iperf3's pacing timer), so a paced flow keeps draining whole bursts.
LONE_GAP = 0.002
# The look for a local answer after a lone UDP->TUN write (one poll(0)) finds nothing on the side whose
# application only receives answers (the ping's sender): after ANSWER_MISS_STREAK misses in a row it is made
# only every ANSWER_PROBE_EVERY-th write, until it finds one again. A skipped answer is not lost: the loop's
# TUN reader takes it one loop turn later.
ANSWER_MISS_STREAK = 8
ANSWER_PROBE_EVERY = 16


# TURBOWG_SCHED_SLICE_US=N: the daemon's thread asks the kernel (EEVDF, Linux >= 6.12) for a scheduling slice
# of N us instead of the default (~0.7-3 ms). It gets no more CPU than before (same nice, same weight), but a
# shorter slice means an earlier virtual deadline, so when a packet wakes it on a CPU busy with another task
# it preempts that task at once instead of waiting out the task's slice: on a shared machine this is the
# difference between a wake in tens of microseconds and one in milliseconds (the RTT p99). The kernel clamps N
# to 100..100000 us; 0 leaves the default. Older kernels ignore the field (nothing changes).
SCHED_SLICE_DEFAULT_US = 100
_SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274, "armv7l": 380, "i686": 351}.get(os.uname().machine, -1)
# struct sched_attr, SCHED_ATTR_SIZE_VER0 (48 bytes): size, policy, flags, nice, priority, runtime, deadline,
# period. SCHED_OTHER with sched_runtime set is the custom slice.
_SCHED_ATTR = struct.Struct("IIQiIQQQ")


def sched_slice_from_env() -> int:
    """Microseconds of scheduling slice to ask for (TURBOWG_SCHED_SLICE_US; 0: leave the kernel's)."""
    try:
        value = int(os.environ.get("TURBOWG_SCHED_SLICE_US", str(SCHED_SLICE_DEFAULT_US)).strip() or "0")
    except ValueError:
        return SCHED_SLICE_DEFAULT_US
    return max(value, 0)


def request_sched_slice(usec: int) -> bool:
    """Ask for a `usec` scheduling slice for the calling thread (sched_setattr, SCHED_OTHER, the nice value
    unchanged). True when the kernel took it; False (nothing changed) on an unknown architecture or error."""
    if usec <= 0 or _SYS_SCHED_SETATTR < 0:
        return False
    try:
        nice = os.getpriority(os.PRIO_PROCESS, 0)
        attr = ctypes.create_string_buffer(_SCHED_ATTR.pack(_SCHED_ATTR.size, 0, 0, nice, 0, usec * 1000, 0, 0),
                                           _SCHED_ATTR.size)
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_SCHED_SETATTR, 0, attr, 0) == 0
    except (OSError, AttributeError):
        return False


def lone_path_from_env() -> bool:
    """TURBOWG_LONE_PATH=0 sends lone packets down the batch path too (for A/B measurements)."""
    return os.environ.get("TURBOWG_LONE_PATH", "1").strip().lower() not in ("0", "off", "no", "false")


class SockaddrCache(dict):
    """endpoint -> packed sockaddr for Aead.seal_sendto, filled on first use (a hit is one dict lookup);
    b"" for an endpoint the lone path cannot send to (a relay pseudo-endpoint, a malformed one)."""

    MAX = 4096

    def __missing__(self, endpoint: tuple[str, int]) -> bytes:
        host, port = endpoint
        try:
            value = pack_sockaddr(host, port) if port else b""
        except (OSError, ValueError, TypeError):
            value = b""
        if len(self) >= self.MAX:
            self.clear()
        self[endpoint] = value
        return value


class EndpointCache(dict):
    """packed sockaddr (what recv_one reports) -> endpoint, as UDPBind names a sender: IPv4-mapped addresses
    as IPv4, no scope."""

    MAX = 4096

    def __missing__(self, raw: bytes) -> tuple[str, int]:
        port = int.from_bytes(raw[2:4], "big")
        if raw[8:20] == b"\0" * 10 + b"\xff\xff":
            host = socket.inet_ntop(socket.AF_INET, raw[20:24])
        else:
            host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        endpoint = (host, port)
        if len(self) >= self.MAX:
            self.clear()
        self[raw] = endpoint
        return endpoint


# Packed batches: all TUN reads of one wake land in one staging buffer, all UDP reads in one receive buffer.
TUN_STAGE_BYTES = 1 << 20
TUN_STAGE_ROOM = READ_ROOM_BYTES  # what one read may add (see turbowg/tun/device.py)
TUN_STAGE_PACKETS = TX_MAX_MESSAGES - READ_ROOM_PACKETS
UDP_RECV_BYTES = 2 << 20  # reads stop past this; every datagram of a batch fits Device.rx_layout
assert UDP_RECV_BYTES + RECV_BUFFER <= RX_MAX_PACKETS * 32
# ... and one TUN write_packed call takes all of them without cutting the batch.
assert UDP_RECV_BYTES + RECV_BUFFER <= WRITE_MAX_BYTES and RX_MAX_PACKETS <= WRITE_MAX_FRAMES


class Runtime:
    """A running WireGuard interface: TUN + UDP + UAPI around one `Device`."""

    def __init__(self, ifname: str, *, offloads: bool = True, mtu: int = 1420,
                 socket_dir: str = "/var/run/wireguard", derp: str | None = None,
                 derp_ca: str | None = None) -> None:
        self.ifname = ifname
        self.offloads = offloads
        self.mtu = mtu
        self.socket_dir = socket_dir
        self.device = Device(mtu=mtu)
        self.tun: TunDevice | None = None
        self.udp: UDPBind | None = None
        self.uapi: UAPIServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._stage = bytearray(TUN_STAGE_BYTES + TUN_STAGE_ROOM)
        self._stage_layout = array("i", bytes(8 * TX_MAX_MESSAGES))
        self._runs: list[int] = []
        self._rxbuf = bytearray(UDP_RECV_BYTES + RECV_BUFFER)
        self._chunks: list[int] = []
        self._senders: list = []
        self._handshake_rate = HandshakeRate(UNDER_LOAD_HANDSHAKES_PER_SECOND, UNDER_LOAD_HOLD)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline = math.inf  # the device deadline self._timer is armed for
        self.stop_reason = ""
        self.handshakes: HandshakeOffload | None = None  # the handshake worker process, when in use
        # The home DERP relay (turbowgd --derp): messages to relay pseudo-endpoints (port 0) go through it.
        self.derp_link: DerpLink | None = DerpLink(self, derp, ca_file=derp_ca) if derp else None
        # TURBOWG_TRACE_LATENCY=1: wrapped readers time the stages of each crossing (nothing wrapped when off).
        self.trace: LatencyTrace | None = LatencyTrace() if trace_enabled() else None
        self.busy_poll = busy_poll_from_env()
        self._reply_poll: Callable[[int], list] | None = None  # poll(0) of the TUN fd
        self._answer_misses = 0  # looks for a local answer that found none, in a row (see ANSWER_MISS_STREAK)
        self._tun_last_wake = 0.0
        self._udp_last_wake = 0.0
        self._expect_answer = False  # a lone request just left from an idle TUN wake: spin for the answer
        # Busy-poll outcomes and answers taken in the wake of the packet that caused them (for `stats=1`).
        self.lone_counters = {"busy_poll_hits": 0, "busy_poll_misses": 0, "answers_taken": 0,
                              "answer_looks_skipped": 0}
        self._tun_reader: Callable[[], None] = self._on_tun_readable
        self._udp_reader: Callable[[], None] = self._on_udp_readable
        self._lone = lone_path_from_env()
        self._sockaddrs = SockaddrCache()
        self._endpoints = EndpointCache()
        self._from = bytearray(28)  # the sender's sockaddr_in6 of a lone read
        self._recv_one = recv_one if self._lone else None  # None without the C extension
        self._udp_fd = -1
        self._tun_fd = -1
        self._tun_prefix = b""  # what precedes a packet written to the TUN: the zero virtio header, or nothing

    # ---- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self.tun = open_tun(self.ifname, vnet_hdr=self.offloads, mtu=self.mtu)
        self.device.mtu = self.tun.mtu
        self._tun_fd = self.tun.fileno()
        self._tun_prefix = ZERO_HDR if self.tun.vnet_hdr else b""
        log.info("interface %s up: vnet_hdr=%s offloads=%#x", self.ifname, self.tun.vnet_hdr, self.tun.offloads)
        if enabled_from_env():
            self.handshakes = HandshakeOffload(self.device, self._loop, self._send, self._reschedule_timer)
            self.handshakes.start()
        self._bind(self.device.listen_port or 0, self.device.fwmark)
        self.uapi = await start_uapi_server(self.ifname, self.device, socket_dir=self.socket_dir,
                                            on_set=self._after_uapi_set,
                                            on_removed=lambda: self.stop("UAPI socket removed"),
                                            stats=self.stats)
        tun_reader = self._on_tun_readable
        if self.trace is not None:
            self.trace.attach_tun(self.tun, self.device)
            tun_reader = self.trace.tun_reader(tun_reader)
        self._tun_reader = tun_reader
        poller = select.poll()
        poller.register(self.tun.fileno(), select.POLLIN)
        self._reply_poll = poller.poll
        if self.busy_poll and self._lone:
            tun_reader = self._on_tun_readable_spin
        self._loop.add_reader(self.tun.fileno(), tun_reader)
        if self.derp_link is not None:
            self.derp_link.start()
        self._schedule_timer()
        self._loop.call_later(LINK_CHECK_INTERVAL, self._on_link_check)

    def _bind(self, port: int, fwmark: int) -> None:
        """Bind UDP `port` (0: the kernel chooses) and report the port bound. The new socket is opened before
        the old one is closed: a refused port (OSError) leaves the old socket, and its port reported."""
        assert self._loop is not None
        old = self.udp
        try:
            udp = UDPBind(port, fwmark=fwmark, gso=self.offloads, gro=self.offloads)
            if self.handshakes is not None:
                try:  # a handshake socket joins the port (turbowg/conn/steering.py), for the worker to read
                    self.handshakes.attach(udp)
                except OSError:
                    udp.close()  # a foreign socket shares the port: refused as a taken port
                    raise
        except OSError:
            if old is not None:
                self.device.set_bound_port(old.port)
            raise
        if old is not None:
            self._loop.remove_reader(old.fileno())
            old.close()
        self.udp = udp
        self._udp_fd = udp.fileno()
        self.device.set_bound_port(self.udp.port)
        udp_reader = self._on_udp_readable
        if self.trace is not None:
            self.trace.attach_udp(udp)
            enable_kernel_timestamps(udp.fileno())
            udp_reader = self.trace.udp_reader(udp_reader, self)
        self._udp_reader = udp_reader
        self._loop.add_reader(self.udp.fileno(), udp_reader)
        log.info("listening on UDP port %d", self.udp.port)

    def _after_uapi_set(self) -> None:
        """A `set` may change the port or fwmark: rebind, and flush what the update queued (keepalives)."""
        udp = self.udp
        wanted = self.device.listen_port  # the bound port unless this set named another (0: a new random one)
        try:
            if udp is None or wanted != udp.port:
                self._bind(wanted, self.device.fwmark)  # OSError: the UAPI answers EADDRINUSE
            elif self.device.fwmark != udp.fwmark:
                udp.set_fwmark(self.device.fwmark)
                if self.handshakes is not None:
                    self.handshakes.set_fwmark(self.device.fwmark)  # cookie replies leave its handshake socket
        finally:
            if self.handshakes is not None:
                self.handshakes.configure()  # new keys or peers
            if self.derp_link is not None:
                self.derp_link.after_set()  # a new private key: a new relay identity
            self._send(self.device.tick(time.monotonic()))
            self._schedule_timer()

    def stats(self) -> dict[str, int]:
        """Device counters plus the I/O layers' own (prefixed udp_ and tunio_), for `stats=1`."""
        out = dict(self.device.counters)
        if self.udp is not None:
            out.update({f"udp_{k}": v for k, v in self.udp.counters.items()})
        if self.tun is not None:
            out.update({f"tunio_{k}": v for k, v in self.tun.counters.items()})
        if self.derp_link is not None:
            out.update(self.derp_link.stats())
        out.update({f"lone_{k}": v for k, v in self.lone_counters.items()})
        if self.handshakes is not None:  # the worker's counters use the device's names: add them up
            for key, value in self.handshakes.stats().items():
                out[key] = out.get(key, 0) + value
        return out

    def stop(self, reason: str = "") -> None:
        if self._stopped is not None and not self._stopped.is_set():
            self.stop_reason = reason
            self._stopped.set()

    async def wait_stopped(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()

    async def close(self) -> None:
        loop = self._loop
        if self.derp_link is not None:
            await self.derp_link.close()
        if self.handshakes is not None:
            self.handshakes.close()
            self.handshakes = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.uapi is not None:
            self.uapi.close()
            self.uapi = None
        self._reply_poll = None
        if self.udp is not None:
            if loop is not None:
                loop.remove_reader(self.udp.fileno())
            self.udp.close()
            self.udp = None
            self._udp_fd = -1
        if self.tun is not None:
            if loop is not None:
                loop.remove_reader(self.tun.fileno())
            self.tun.close()
            self.tun = None
            self._tun_fd = -1

    # ---- data path ------------------------------------------------------------------------------
    def _on_tun_readable_spin(self) -> None:
        """The TUN reader with busy polling on (TURBOWG_BUSY_POLL_US): after a lone request left, wait for
        its answer spinning (bounded) rather than sleeping, and handle it at once. Outside the (traced)
        reader, so the trace's stages stay those of the crossing."""
        self._tun_reader()
        if not self._expect_answer:
            return
        self._expect_answer = False
        udp_fd = self._udp_fd
        fd = spin_poll(udp_fd, self._tun_fd, self.busy_poll)
        counters = self.lone_counters
        if fd < 0:
            counters["busy_poll_misses"] += 1
            return
        counters["busy_poll_hits"] += 1
        if fd == udp_fd:
            self._udp_reader()
        else:
            self._tun_reader()  # the application sent again first
        self._expect_answer = False  # one spin per idle request: no chain of spins

    def _on_tun_readable(self) -> None:
        """Read the TUN until it would block (bounded), seal the whole batch per peer, send per peer."""
        tun = self.tun
        if tun is None:
            return
        stage = self._stage
        layout = self._stage_layout
        runs = self._runs
        runs.clear()
        cursor = 0
        count = 0
        read_packed = tun.read_packed
        now = time.monotonic()
        # A lone packet (the last wake was long ago): one read, no second read that would only say EAGAIN;
        # if more was queued after all, the level-triggered loop brings us back at once (and drains then).
        lone = now - self._tun_last_wake > LONE_GAP
        self._tun_last_wake = now
        try:
            if lone:
                got, cursor = read_packed(stage, 0, layout, 0)
                if got == 1:
                    if self._lone and self._udp_fd >= 0 and self._send_one(stage, layout, now):
                        self._expect_answer = True  # cleared when the answering side sent it (see below)
                        return
                    runs.append(0)
                    runs.append(1)
                    count = 1
                elif got > 1:  # a coalesced frame: a burst after all, drain as usual
                    runs.append(0)
                    runs.append(got)
                    count = got
                    lone = False
                elif got < 0:
                    return
                else:
                    lone = False
            if not lone:
                for _ in range(MAX_TUN_READS_PER_WAKE):
                    if cursor > TUN_STAGE_BYTES or count > TUN_STAGE_PACKETS:
                        break
                    got, cursor = read_packed(stage, cursor, layout, count)
                    if got < 0:
                        break
                    if got:
                        runs.append(count)
                        runs.append(got)
                        count += got
        except OSError as exc:
            self.stop(f"TUN read failed: {exc}")
            return
        if not runs:
            return
        # One packet after all (between the bursts of a paced flow: an ACK, a ping): the one-call way too.
        if not lone and count == 1 and self._lone and self._udp_fd >= 0 and self._send_one(stage, layout, now):
            return
        packed, transmits = self.device.handle_tun_packed(stage, layout, runs, now)
        self._reschedule_timer()
        udp = self.udp
        if udp is None:
            return
        device = self.device
        for item in packed:
            if item.endpoint[1] == 0 and self.derp_link is not None:  # a relay pseudo-endpoint
                self.derp_link.send_packed(item.endpoint, device.tx_buffer, item.offset, device.tx_sizes,
                                           item.sizes_start, item.count)
                continue
            udp.send_packed(item.endpoint, device.tx_buffer, item.offset, device.tx_sizes, item.sizes_start,
                            item.count)
        if transmits:
            self._send(transmits)

    def _on_udp_readable(self) -> None:
        """Read the UDP socket until it would block (bounded), open everything in place, write the inner
        packets to the TUN coalesced per flow."""
        udp = self.udp
        if udp is None:
            return
        chunks = self._chunks
        senders = self._senders
        chunks.clear()
        senders.clear()
        buf = self._rxbuf
        now = time.monotonic()
        lone = now - self._udp_last_wake > LONE_GAP
        self._udp_last_wake = now
        if lone:  # one read; more only if it was a GRO batch (see _on_tun_readable)
            if self._recv_one is not None and self._udp_fd >= 0:
                cursor = self._read_lone(udp, buf, chunks, senders)
            else:
                cursor = udp.recv_packed(buf, 0, UDP_RECV_BYTES, chunks, senders, max_calls=1)
            if chunks and chunks[2] < chunks[1] - chunks[0]:
                udp.recv_packed(buf, cursor, UDP_RECV_BYTES, chunks, senders, max_calls=MAX_UDP_READS_PER_WAKE - 1)
            elif chunks and self._lone and self._tun_fd >= 0 and self._on_lone_datagram(buf, chunks, now):
                return
        else:
            udp.recv_packed(buf, 0, UDP_RECV_BYTES, chunks, senders, max_calls=MAX_UDP_READS_PER_WAKE)
            # One datagram after all (see _on_tun_readable): the one-call way too.
            if len(senders) == 1 and chunks[2] >= chunks[1] - chunks[0] and self._lone and self._tun_fd >= 0 \
                    and self._on_lone_datagram(buf, chunks, now):
                return
        if not senders:
            return
        device = self.device
        # The in-loop handshake path needs the handshake rate; while the worker takes handshakes (the sink is
        # set), nothing here would read it, so the per-read scan is skipped.
        under_load = self._under_load(buf, chunks, now) if device.handshake_sink is None else False
        count, transmits = device.handle_udp_packed(buf, chunks, senders, now, under_load=under_load)
        if self.handshakes is not None:
            self.handshakes.flush()
        self._reschedule_timer()
        if count and self.tun is not None:
            try:
                self.tun.write_packed(buf, self.device.rx_layout, count)
            except OSError as exc:
                self.stop(f"TUN write failed: {exc}")
                return
        if transmits:
            self._send(transmits)
        if count and self._reply_poll is not None and self._reply_poll(0):
            # A local answer (ping, RPC) is often queued on the TUN by the time the write returns: take it
            # now rather than after another loop turn.
            self._take_answer()

    def _take_answer(self) -> None:
        """Read the TUN in the wake of the write that caused the answer waiting there."""
        self._tun_reader()
        self._expect_answer = False  # an answer, not a request: nothing to wait for
        self.lone_counters["answers_taken"] += 1

    def _read_lone(self, udp: UDPBind, buf: bytearray, chunks: list[int], senders: list) -> int:
        """UDPBind.recv_packed(max_calls=1) in one C call (transport.recv_one): the same chunk, sender and
        counters, without the tuples, address string and ancillary list of recvmsg_into."""
        got = self._recv_one(self._udp_fd, buf, 0, RECV_BUFFER, self._from)  # type: ignore[misc]
        counters = udp.counters
        if got < 0:
            if got != -errno.EAGAIN:
                counters["recv_calls"] += 1
                counters["recv_errors"] += 1
            return 0
        n = got & 0xFFFFFFFF
        stride = got >> 32 or n or 1  # a GRO batch's segment size; an empty datagram is one (too short) one
        chunks.append(0)
        chunks.append(n)
        chunks.append(stride)
        senders.append(self._endpoints[bytes(self._from)])
        counters["recv_calls"] += 1
        counters["recv_datagrams"] += -(-n // stride) if n else 1
        return n

    def _on_lone_datagram(self, buf: bytearray, chunks: list[int], now: float) -> bool:
        """One datagram read in a lone wake: Device.receive_lone (open + checks + TUN write in one C call).
        False when the batch path must take it (nothing was done then)."""
        start = chunks[0]
        device = self.device
        result = device.receive_lone(buf, start, chunks[1] - start, self._senders[0], now, self._tun_fd,
                                     self._tun_prefix)
        if result is None:
            return False
        tun = self.tun
        if result == LONE_WRITTEN:
            counters = tun.counters  # type: ignore[union-attr]
            counters["write_frames"] += 1
            counters["write_packets"] += 1
        elif result == LONE_WRITE and tun is not None:
            try:  # the ordinary write: it counts a dropped packet, or finds the TUN gone
                tun.write_packed(buf, device.rx_layout, 1)
            except OSError as exc:
                self.stop(f"TUN write failed: {exc}")
                return True
        if result and self._answer_ready():
            self._take_answer()  # the local answer, in the same wake (see _on_udp_readable)
        self._reschedule_timer()  # after the answer left: what receive_lone queued goes out after it anyway
        return True

    def _answer_ready(self) -> bool:
        """After a lone TUN write: is a local answer already queued on the TUN? One poll(0), skipped most of
        the time while such looks keep finding nothing (ANSWER_MISS_STREAK)."""
        poll = self._reply_poll
        if poll is None:
            return False
        misses = self._answer_misses
        if misses >= ANSWER_MISS_STREAK:
            self._answer_misses = misses + 1
            if (misses - ANSWER_MISS_STREAK) % ANSWER_PROBE_EVERY:
                self.lone_counters["answer_looks_skipped"] += 1
                return False
        if poll(0):
            self._answer_misses = 0
            return True
        self._answer_misses = misses + 1
        return False

    def _send_one(self, stage: bytearray, layout: array, now: float) -> bool:
        """The one packet read (stage, layout[0:2]) through Device.send_lone (route + seal + sendto in one C
        call) with UDPBind.send_packed's counters; False when the batch path must take it (nothing done)."""
        sent = self.device.send_lone(stage, layout[0], layout[1], now, self._udp_fd, self._sockaddrs)
        if sent is None:
            return False
        counters = self.udp.counters  # type: ignore[union-attr]
        if sent >= 0:
            counters["send_calls"] += 1
            counters["send_datagrams"] += 1
        elif sent == -errno.EAGAIN:
            counters["send_dropped_eagain"] += 1
        else:
            counters["send_errors"] += 1
        self._reschedule_timer()
        return True

    def _under_load(self, buf: bytearray, chunks: list[int], now: float) -> bool:
        # Handshake messages (types 1 and 2) per second; a flood turns on cookie replies for a while.
        # They come alone (one datagram per read): count the reads that start with one.
        handshakes = 0
        for i in range(0, len(chunks), 3):
            offset = chunks[i]
            if chunks[i + 1] - offset >= 4 and buf[offset] in (1, 2) and not buf[offset + 1]:
                handshakes += 1
        rate = self._handshake_rate
        if handshakes:
            rate.add(handshakes, now)
        return rate.under_load(now)

    def _send(self, transmits: list) -> None:
        udp = self.udp
        if udp is None:
            return
        link = self.derp_link
        for transmit in transmits:
            if transmit.endpoint[1] == 0 and link is not None:  # a relay pseudo-endpoint
                link.send(transmit.endpoint, transmit.datagrams)
                continue
            udp.send_batch(transmit.endpoint, transmit.datagrams)

    # ---- timers -----------------------------------------------------------------------------------
    def _reschedule_timer(self) -> None:
        """After a batch: move the timer earlier if the device now has an earlier deadline (one compare)."""
        deadline = self.device.next_deadline()
        if deadline is not None and deadline < self._timer_deadline:
            self._schedule_timer()

    def _schedule_timer(self) -> None:
        """Arm the one device timer for the device's earliest deadline (or none)."""
        loop = self._loop
        if loop is None or (self._stopped is not None and self._stopped.is_set()):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.device.next_deadline()
        if deadline is None:
            self._timer_deadline = math.inf
            return
        self._timer_deadline = deadline
        delay = deadline - time.monotonic() + TIMER_SLACK
        self._timer = loop.call_later(max(0.0, delay), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_deadline = math.inf
        if self._stopped is not None and self._stopped.is_set():
            return
        try:
            self._send(self.device.tick(time.monotonic()))
        finally:
            self._schedule_timer()

    def _on_link_check(self) -> None:
        assert self._loop is not None
        try:
            if self.tun is not None and not self.tun.exists():
                self.stop(f"interface {self.ifname} was deleted")
                return
            mtu = self.tun.mtu if self.tun is not None else None
        except OSError as exc:
            # Raised out of this callback, it would end the checks for good and leave the daemon holding
            # its TUN, UDP and UAPI sockets; stopping makes run() close them all.
            self.stop(f"interface {self.ifname} check failed: {exc}")
            return
        if mtu is not None:
            if mtu != self.device.mtu:
                log.info("MTU of %s is now %d", self.ifname, mtu)
                self.device.mtu = mtu
        self._loop.call_later(LINK_CHECK_INTERVAL, self._on_link_check)


def run(ifname: str, *, offloads: bool = True, on_ready: Callable[[], None] | None = None,
        on_error: Callable[[str], None] | None = None, derp: str | None = None,
        derp_ca: str | None = None) -> int:
    """Run an interface until SIGTERM/SIGINT or until the interface is deleted. Returns an exit code."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    runtime = Runtime(ifname, offloads=offloads, derp=derp, derp_ca=derp_ca)

    async def main() -> int:
        try:
            await runtime.start()
        except OSError as exc:
            await runtime.close()
            msg = f"failed to create interface {ifname}: {exc}"
            log.error("%s", msg)
            if on_error is not None:
                on_error(msg)
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runtime.stop, f"signal {sig.name}")
        # After start(): the handshake worker it spawned keeps the default slice (see TURBOWG_SCHED_SLICE_US).
        slice_us = sched_slice_from_env()
        if slice_us and not request_sched_slice(slice_us):
            log.info("scheduling slice of %d us not available", slice_us)
        if runtime.trace is not None:
            loop.add_signal_handler(signal.SIGUSR1, runtime.trace.report)
        if on_ready is not None:
            on_ready()
        await runtime.wait_stopped()
        log.info("shutting down: %s", runtime.stop_reason)
        await runtime.close()
        if runtime.trace is not None:
            runtime.trace.report()
        return 0

    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def offloads_from_env() -> bool:
    return os.environ.get("TURBOWG_OFFLOADS", "1").strip().lower() not in ("0", "off", "no", "false")
