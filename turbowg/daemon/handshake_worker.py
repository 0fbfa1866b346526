"""The handshake worker process: handshake messages served off the data path.

The decisions are sans-IO in turbowg/device/handshake_worker.py; this is the I/O around them.

The device's UDP port is a pair of sockets in one SO_REUSEPORT group (turbowg/conn/steering.py): the
kernel steers every datagram whose first word is a handshake header (types 1-3) to the handshake socket,
everything else to the data socket. The main process never reads, copies or classifies a flood datagram.

Worker process (`python -m turbowg.daemon.handshake_worker FD`, spawned by the runtime, stdin closed): FD
is one end of a nonblocking unix SOCK_SEQPACKET socketpair to the main process. It gets the identity and
the peers' public keys in a config message after every UAPI set that changes them, and the handshake
socket with SCM_RIGHTS (MSG_SOCKET; again after a rebind). It polls both: a wake of the handshake socket
reads it until EAGAIN (at most MAX_WAKE_READS, UDP_GRO reads split by segment size), each recvmmsg batch
screened in one C call (turbowg/conn/_hsscreen.c: header, size, mac1, under load the zero-mac2 cookie-reply
limiter), so only what passes becomes Python objects. What waited when the wake began (the queue's memory
over a datagram's least truesize, or what was read) is the backlog for the under-load decision (more than
512 = more than 1/8 of a 4096-message queue, and for a second after, as wireguard-go). Wakes are at least
MIN_WAKE_INTERVAL apart, LOAD_WAKE_INTERVAL while under load. The socket's receive buffer holds ~4096 handshake messages; a flood past
what the worker reads is dropped by the kernel there (counted: rx_handshake_socket_kernel_drops, from
SO_MEMINFO), never touching the data socket. Cookie replies go out of the handshake socket (same port).
What it identified (initiations from configured peers) and forwarded (responses, cookie replies) goes to
the main process over the socketpair, with its counters every COUNTERS_INTERVAL. It exits when the main
process goes away (end of file on the socketpair).

With the eBPF steering program (turbowg/conn/ebpf.py) the worker also gets its under-load flag and counters
maps with the socket: it sets the flag while under load (the kernel then drops zero-mac2 handshakes over
the per-source limit before they are queued here), counts the kernel's drops as arrivals for its rate rule
(so a flood held back in the kernel keeps it under load) and clears the flag when the load ends (it polls
with a timeout while the flag is set). If the worker dies, the flag stays as it was until the next worker
adopts the socket and clears it.
Cookie replies go out many per sendmmsg(2) call (recvmmsg.py ReplySender).

The main process's end (`HandshakeOffload`, the socket handover, the fallback when this process dies) is
turbowg/daemon/handshake_offload.py.

`TURBOWG_HANDSHAKE_WORKER_NICE=N` (default 10; 0 keeps the daemon's) sets the worker's priority and
`TURBOWG_HANDSHAKE_WORKER_SCHED=idle|batch|other` (default other) its scheduling policy.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable

from turbowg.conn.ebpf import KernelLimiter
from turbowg.conn.recvmmsg import HandshakeReader, ReplySender
from turbowg.device.handshake_worker import (
    MSG_BATCH,
    MSG_CONFIG,
    MSG_SOCKET,
    HandshakeWorkerCore,
    decode,
    encode_results,
)

RECV_SIZE = 1 << 20
MAX_DRAIN = 64  # messages read per wake, on either side
COUNTERS_INTERVAL = 0.5  # seconds between the worker's counter reports (at least)
MIN_WAKE_INTERVAL = 0.002  # seconds between two wakes of the worker for its socket (at least)
# ... while under load (TURBOWG_HANDSHAKE_WORKER_LOAD_WAKE_MS): a 4096-message queue holds 100 ms of a 40k/s flood.
try:
    LOAD_WAKE_INTERVAL = max(0.0, float(os.environ.get("TURBOWG_HANDSHAKE_WORKER_LOAD_WAKE_MS", "8")) / 1000)
except ValueError:
    LOAD_WAKE_INTERVAL = 0.008
_PR_SET_PDEATHSIG = 1
# The worker yields the CPU to the data path: handshake work is what waits when both want it.
DEFAULT_NICE = 10
# TURBOWG_HANDSHAKE_WORKER_SCREEN=0: no batch screener (each message drained into Python, then checked), for A/B.
SCREEN = os.environ.get("TURBOWG_HANDSHAKE_WORKER_SCREEN", "1").strip().lower() not in ("0", "off", "no", "false")
# TURBOWG_HANDSHAKE_WORKER_SENDMMSG=0: one sendto per cookie reply (as before ReplySender), for A/B.
SENDMMSG = os.environ.get("TURBOWG_HANDSHAKE_WORKER_SENDMMSG", "1").strip().lower() not in ("0", "off", "no", "false")
# TURBOWG_HANDSHAKE_WORKER_SCHED=idle|batch|other: the worker's scheduling policy (see docs/DESIGN.md).
DEFAULT_SCHED = "other"


def _sockaddr(addr: bytes, port: int) -> tuple:
    """Address for the dual-stack AF_INET6 UDP socket (IPv4 as v4-mapped)."""
    if len(addr) == 4:
        return ("::ffff:" + socket.inet_ntop(socket.AF_INET, addr), port, 0, 0)
    return (socket.inet_ntop(socket.AF_INET6, addr), port, 0, 0)


def _recv(sock: socket.socket, flags: int = 0) -> tuple[bytes, list[int]]:
    """One message and the descriptors passed with it (socket.recv_fds ignores its flags in 3.11)."""
    data, ancdata, _flags, _addr = sock.recvmsg(RECV_SIZE, socket.CMSG_LEN(4 * 4), flags)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += [int.from_bytes(payload[i:i + 4], sys.byteorder) for i in range(0, usable, 4)]
    return data, fds


class WorkerLoop:
    """The worker's loop: until end of file on the control socket `ctl`."""

    def __init__(self, ctl: socket.socket, clock: Callable[[], float] = time.monotonic) -> None:
        self.ctl = ctl
        self.clock = clock
        self.core = HandshakeWorkerCore()
        self.udp: socket.socket | None = None  # where cookie replies go out (the handshake socket)
        self.reader: HandshakeReader | None = None
        self.pair_done = 0  # messages of the main process's batches processed, in all
        self.last_report = float("-inf")
        self.last_wake = float("-inf")
        self.reported = True
        self.old_drops = 0
        self.screened_seen = 0  # core.counters["rx_handshake_screened"] already given to process_screened
        self.kernel: KernelLimiter | None = None  # the eBPF steering program's flag and counters, if any
        self.replier: ReplySender | None = ReplySender() if SENDMMSG else None
        self.kernel_dropped = 0  # its drop counter as last read
        self.poller = select.poll()
        self.poller.register(ctl.fileno(), select.POLLIN)

    def run(self) -> int:
        try:
            self.ctl.send(encode_results(0, [], [], None))  # hello: ready for sockets
            while True:
                timeout = None if self.reported else COUNTERS_INTERVAL * 1000
                if self.kernel is not None and self.kernel.flag:  # to clear the flag when the load ends
                    left = max(0.0, self.core.under_load_until - self.clock()) * 1000 + 1
                    timeout = left if timeout is None else min(timeout, left)
                try:
                    events = self.poller.poll(timeout)
                except InterruptedError:
                    continue
                identified: list = []
                forwarded: list = []
                ctl_ready = False
                for fd, _mask in events:
                    if fd == self.ctl.fileno():
                        ctl_ready = True
                    elif self.reader is not None and fd == self.reader.sock.fileno():
                        self._serve_socket(identified, forwarded)
                if ctl_ready and self._serve_control(identified, forwarded):
                    return 0
                if self.kernel is not None and self.kernel.flag:
                    self._sync_kernel(self.clock())
                if not self._report(identified, forwarded, bool(ctl_ready)):
                    return 0
        finally:
            if self.udp is not None:
                self.udp.close()

    def _serve_socket(self, identified: list, forwarded: list) -> None:
        assert self.reader is not None
        core = self.core
        # At most one wake per MIN_WAKE_INTERVAL: a paced flood then comes in runs, not one wake (poll, the
        # reads, a batch, the EAGAIN read) per few messages; a handshake waits that much longer at most.
        # Under load (a flood: every message without our cookie gets at most a rate-limited cookie reply,
        # and the cookie dance takes seconds anyway) at most one wake per LOAD_WAKE_INTERVAL: fewer, bigger
        # batches, fewer preemptions of the data path; the kernel drops what does not fit the queue.
        interval = LOAD_WAKE_INTERVAL if self.clock() < core.under_load_until else MIN_WAKE_INTERVAL
        wait = self.last_wake + interval - self.clock()
        if wait > 0:
            time.sleep(wait)
        self.last_wake = now = self.clock()
        if self.kernel is not None:
            self._kernel_drops(now)
        if core.screener is not None and SCREEN:
            # One C call per recvmmsg batch (turbowg/conn/_hsscreen.c): a dropped flood message makes no object.
            def under_load(seen: int) -> bool:
                return core.load_for_chunk(seen, 0, now)

            kept = self.reader.screen(core.screener, core.counters, now, under_load)
            if kept is not None:
                screened = core.counters["rx_handshake_screened"] - self.screened_seen
                self.screened_seen += screened
                core.load_for_chunk(0, screened, now)  # the rate rule counts what this wake read
                if kept or screened:
                    replies, ident, fwd = core.process_screened(kept, screened, now, backlog=screened)
                    self._send_replies(replies)
                    identified += ident
                    forwarded += fwd
                    self.reported = False
                if self.kernel is not None:
                    self._sync_kernel(now, read=False)
                return
        entries = self.reader.drain(core.counters)
        if not entries:
            return
        # Under load as wireguard-go counts it: the backlog is what waited in the socket's queue when this
        # wake began (all we read before EAGAIN), each message seeing what is still behind it.
        replies, ident, fwd = core.process_batch(core.processed + len(entries), entries, self.clock())
        self._send_replies(replies)
        identified += ident
        forwarded += fwd
        self.reported = False
        if self.kernel is not None:
            self._sync_kernel(self.clock(), read=False)

    def _kernel_drops(self, now: float) -> None:
        """What the kernel limiter dropped since the last look counts as arrived for the rate rule (it came,
        we just never saw it): a flood the kernel holds back keeps us under load, so it stays held back."""
        assert self.kernel is not None
        try:
            dropped = self.kernel.stats()[0]
        except OSError:
            return
        if dropped > self.kernel_dropped:
            self.core.load_for_chunk(0, dropped - self.kernel_dropped, now)
        self.kernel_dropped = dropped

    def _sync_kernel(self, now: float, read: bool = True) -> None:
        """The kernel limiter on while we are under load, off after (`read`: count its drops first)."""
        assert self.kernel is not None
        if read:
            self._kernel_drops(now)
        try:
            self.kernel.set_under_load(now < self.core.under_load_until)
        except OSError:
            self.core.counters["handshake_kernel_flag_errors"] += 1

    def _serve_control(self, identified: list, forwarded: list) -> bool:
        """Messages from the main process; True at end of file."""
        core = self.core
        messages = []
        eof = False
        for _ in range(MAX_DRAIN):
            try:
                data, fds = _recv(self.ctl, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:  # the main process closed with our results unread: gone all the same
                eof = True
                break
            if not data:
                eof = True
                break
            messages.append((decode(data), fds))
        # The queue as far as we can see it: what the newest batch read says was handed over.
        latest = max((m[1] for m, _ in messages if m[0] == MSG_BATCH), default=0)
        for message, fds in messages:
            if message[0] == MSG_CONFIG:
                _, generation, private_key, peer_keys = message
                core.configure(generation, private_key, peer_keys)
            if message[0] == MSG_SOCKET and fds:
                count = message[2] if len(message) > 2 else 0
                sock_fd = fds.pop(0)
                kernel_fds, fds = fds[:count], fds[count:]
                self._adopt_socket(sock_fd, message[1], kernel_fds)
            if message[0] != MSG_BATCH:
                for extra in fds:
                    os.close(extra)
                continue
            for extra in fds:
                os.close(extra)
            entries = message[2]
            backlog = max(latest - self.pair_done, len(entries))
            replies, ident, fwd = core.process_batch(core.processed + backlog, entries, self.clock())
            self.pair_done += len(entries)
            self._send_replies(replies)
            identified += ident
            forwarded += fwd
            self.reported = False
        if messages:
            self.reported = False
        return eof

    def _adopt_socket(self, fd: int, read: bool, kernel_fds: list[int] | None = None) -> None:
        """A new UDP socket from the main process: the handshake socket (read it, reply from it), or the data
        socket when steering is off (reply from it only); `kernel_fds`: the eBPF limiter's flag and counters
        maps (turbowg/conn/ebpf.py), if the pair has that program."""
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None
        if kernel_fds and len(kernel_fds) == 2:
            self.kernel = KernelLimiter(*kernel_fds)
            try:
                self.kernel_dropped = self.kernel.stats()[0]
                self.kernel.flag = self.kernel.read_flag()
            except OSError:
                self.kernel.close()
                self.kernel = None
        else:
            for extra in kernel_fds or []:
                os.close(extra)
        if self.reader is not None:
            self.old_drops = self.reader.kernel_drops()
            with contextlib.suppress(KeyError, ValueError):
                self.poller.unregister(self.reader.sock.fileno())
            self.reader = None
        if self.udp is not None:
            self.udp.close()
        self.udp = socket.socket(fileno=fd)
        if read:  # the handshake socket (turbowg/conn/steering.py)
            self.reader = HandshakeReader(self.udp)
            self.reader.drops_base = self.old_drops
            self.poller.register(fd, select.POLLIN)

    def _send_replies(self, replies: list) -> None:
        udp = self.udp
        counters = self.core.counters
        if udp is not None and replies and udp.family == socket.AF_INET6 and self.replier is not None:
            # Many per sendmmsg call (recvmmsg.py ReplySender): a flood's cookie replies come in batches.
            failed = self.replier.send(udp, replies)
            if failed:
                counters["tx_cookie_reply_send_failed"] += failed
            return
        for reply, addr, port in replies:
            if udp is None:
                counters["tx_cookie_reply_no_socket"] += 1
                continue
            try:
                udp.sendto(reply, _sockaddr(addr, port))
            except OSError:
                counters["tx_cookie_reply_send_failed"] += 1

    def _report(self, identified: list, forwarded: list, answer: bool) -> bool:
        """Results to the main process (and the counters, at most every COUNTERS_INTERVAL, and once after
        the last change); False if it is gone."""
        now = self.clock()
        counters = None
        if not self.reported and now - self.last_report >= COUNTERS_INTERVAL:
            counters = dict(self.core.counters)
            if self.reader is not None:
                counters["rx_handshake_socket_kernel_drops"] = self.reader.kernel_drops()
            elif self.old_drops:
                counters["rx_handshake_socket_kernel_drops"] = self.old_drops
            self.last_report = now
            self.reported = True
        if not identified and not forwarded and counters is None and not answer:
            return True
        try:
            self.ctl.send(encode_results(self.pair_done, identified, forwarded, counters))
        except BrokenPipeError:
            return False
        return True


def serve(sock: socket.socket, clock: Callable[[], float] = time.monotonic) -> int:
    """The worker's loop: until end of file on `sock`."""
    return WorkerLoop(sock, clock).run()


def _worker_setup() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop (end of file)
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    nice = os.environ.get("TURBOWG_HANDSHAKE_WORKER_NICE", str(DEFAULT_NICE)).strip()
    with contextlib.suppress(ValueError, OSError):
        if int(nice) > 0:
            os.nice(min(int(nice), 19))
    policy = os.environ.get("TURBOWG_HANDSHAKE_WORKER_SCHED", DEFAULT_SCHED).strip().lower()
    if policy == "idle":  # only CPU nobody else wants: the kernel drops what we cannot read
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif policy == "batch":
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m turbowg.daemon.handshake_worker FD (started by turbowgd)", file=sys.stderr)
        return 2
    _worker_setup()
    sock = socket.socket(fileno=int(args[0]))
    sock.setblocking(True)
    try:
        return serve(sock)
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
