"""The main process's end of the handshake worker (turbowg/daemon/handshake_worker.py): `HandshakeOffload`.

The device's UDP port is a pair of sockets in one SO_REUSEPORT group (turbowg/conn/steering.py): the
kernel steers every datagram whose first word is a handshake header (types 1-3) to the handshake socket,
everything else to the data socket. The main process never reads, copies or classifies a flood datagram.

Main process (`HandshakeOffload`, owned by the runtime): `attach(udp)` makes the handshake socket for each
bound data socket and hands it over; results are applied by `Device.handle_handshake_results` (the
per-peer part: timestamp replay, initiation rate, response creation, keypair installation). Handshake
messages that still reach the data socket (steering off or unavailable, a GRO run that began with a
transport message) go the old way: the receive path hands them to `sink`, and they go to the worker in
batches over the socketpair (bounded: at most QUEUE_SIZE handed over and not yet processed; past that
they are dropped and counted, rx_handshake_queue_full). If the worker dies, the main process reads the
handshake socket itself in the event loop (the in-loop path) and restarts the worker after RESTART_DELAY
(doubling up to RESTART_DELAY_MAX per failure); the handshake socket stays open meanwhile, so the group
keeps its shape (see steering.py on why it is never closed while the data socket lives).

`TURBOWG_HANDSHAKE_WORKER=0` keeps the old way (one socket, handshakes served in the event loop);
`TURBOWG_HANDSHAKE_STEERING=0` keeps the worker but no handshake socket (fed through the data path). The
worker's own settings (priority, scheduling policy) are in handshake_worker.py.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from turbowg.conn.recvmmsg import HandshakeReader
from turbowg.conn.steering import HandshakeSocket
from turbowg.daemon.handshake_worker import MAX_DRAIN, RECV_SIZE
from turbowg.device.handshake_worker import (
    MSG_RESULTS,
    QUEUE_SIZE,
    UNDER_LOAD_HOLD,
    HandshakeRate,
    decode,
    encode_batch,
    encode_config,
    encode_socket,
    identified_from_tuple,
)
from turbowg.linux import SO_RCVBUFFORCE, SO_SNDBUFFORCE

log = logging.getLogger("turbowg.handshake_worker")

BATCH_MAX = 256  # entries per socket message (a receive wake may hand over thousands: GRO runs)
# Messages of several receive wakes go over together (one wake often holds one or two handshake messages,
# and a socket message plus a worker wake and report per message would cost more than the message): sent
# once FLUSH_ENTRIES are waiting, or FLUSH_DELAY after the first one (a handshake waits that much longer).
FLUSH_ENTRIES = 128
FLUSH_DELAY = 0.002
SOCKET_BUFFER = 4 << 20
FALLBACK_READS = 64  # per event-loop wake, when the main process reads the handshake socket itself
FALLBACK_UNDER_LOAD_PER_SECOND = 64  # as the runtime's in-loop path
RESTART_DELAY = 1.0  # a failed worker is restarted after this, doubling per failure up to ...
RESTART_DELAY_MAX = 60.0


def enabled_from_env() -> bool:
    return os.environ.get("TURBOWG_HANDSHAKE_WORKER", "1").strip().lower() not in ("0", "off", "no", "false")


def restart_delay_from_env() -> float:
    """TURBOWG_HANDSHAKE_WORKER_RESTART_DELAY: seconds before a failed worker is restarted (first time)."""
    try:
        return max(0.1, float(os.environ.get("TURBOWG_HANDSHAKE_WORKER_RESTART_DELAY", RESTART_DELAY)))
    except ValueError:
        return RESTART_DELAY


def steering_from_env() -> bool:
    """TURBOWG_HANDSHAKE_STEERING=0: no handshake socket; the worker is fed through the data path."""
    return os.environ.get("TURBOWG_HANDSHAKE_STEERING", "1").strip().lower() not in ("0", "off", "no", "false")


def _big_buffers(sock: socket.socket) -> None:
    for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def _address_bytes(host: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)


def _host(addr: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(addr) == 4 else socket.AF_INET6, addr)


class HandshakeOffload:
    """The main process's end: owns the handshake socket of the steered pair and the worker, feeds the
    worker what still reaches the data path, applies its results. `send` sends a list of device Transmits
    (the runtime's); `after_results` runs after the device took results (the runtime re-arms its timer: a
    handshake may have armed one sooner)."""

    def __init__(self, device: Any, loop: Any, send: Callable[[list], None],
                 after_results: Callable[[], None] | None = None,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.device = device
        self.loop = loop
        self._send = send
        self._after_results = after_results
        self._on_failure = on_failure
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.entries: list[tuple[int, bytes, int, bytes]] = []
        self.handed = 0  # messages handed to the worker, in all
        self.processed = 0  # ... of which it reported processed
        self.generation = 0
        self._config_key: tuple | None = None
        self._udp_fd: int | None = None  # the socket the worker has (handshake socket, or data socket)
        self._addresses: dict[str, bytes] = {}
        self.counters: dict[str, int] = {}  # our own
        self._flush_timer: Any = None
        self.worker_counters: dict[str, int] = {}  # the worker's latest report
        self.steering = steering_from_env()
        self.hsock: HandshakeSocket | None = None  # socket 1 of the steered pair (turbowg/conn/steering.py)
        self._data_fd: int | None = None
        self._fallback_reader = False  # the worker is gone: we read the handshake socket ourselves
        self._fallback_buf = bytearray(65536)
        self._fallback_addresses: dict[str, bytes] = {}
        self._handshake_rate = HandshakeRate(FALLBACK_UNDER_LOAD_PER_SECOND, UNDER_LOAD_HOLD)
        self._restart_handle: Any = None
        self._ready = False
        self.restart_delay = restart_delay_from_env()
        self._closed = False

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for sock in (ours, theirs):
                _big_buffers(sock)
            env = dict(os.environ)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "turbowg.daemon.handshake_worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.handed = self.processed = 0
        self._config_key = None
        self._udp_fd = None
        self._ready = False  # the worker said hello: it takes sockets now (see configure)
        self.loop.add_reader(ours.fileno(), self._on_readable)
        self.device.handshake_sink = self.sink
        log.info("handshake worker started (pid %d)", self.proc.pid)

    # -- the steered socket pair ------------------------------------------------------------------------------
    def attach(self, udp: Any) -> None:
        """A new data socket (`UDPBind`) was bound: join it with a new handshake socket (the old pair's goes),
        and give the worker the socket it reads and replies from. OSError(EADDRINUSE) if a foreign socket
        shares the port (the caller closes the data socket); any other failure to steer (an old kernel)
        leaves steering off: the worker is fed through the data path and replies from the data socket."""
        hsock = None
        if self.steering:
            try:
                hsock = HandshakeSocket(udp._sock, fwmark=udp.fwmark, gro=udp.gro)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise
                log.warning("UDP port %d: no handshake socket (%s); handshakes reach the worker through the "
                            "data path", udp.port, exc)
                self.counters["handshake_steering_failed"] = self.counters.get("handshake_steering_failed", 0) + 1
        old, self.hsock = self.hsock, hsock
        self._data_fd = udp.fileno()
        if old is not None:
            if self._fallback_reader:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(old.fileno())
            old.close()
        self._fallback_reader = False
        if self.sock is None:
            self._read_fallback()
        self.configure(force_socket=True)

    def set_fwmark(self, mark: int) -> None:
        if self.hsock is not None:
            self.hsock.set_fwmark(mark)

    # -- configuration --------------------------------------------------------------------------------------
    def configure(self, udp_fd: int | None = None, *, force_socket: bool = False) -> None:
        """Push identity and peers to the worker if they changed, and the socket it should use if that
        changed. (`udp_fd`: the data socket, for callers of the time before steering.)"""
        if udp_fd is not None:
            self._data_fd = udp_fd
        if self.sock is None:
            return
        device = self.device
        private = device.private_key
        key = (private, tuple(device.peers))
        fd = self.hsock.fileno() if self.hsock is not None else self._data_fd
        messages: list[tuple[bytes, list[int]]] = []
        if key != self._config_key:
            self.generation += 1
            messages.append((encode_config(self.generation, private, list(device.peers)), []))
        # A socket goes only to a worker that is up: one in flight in the socketpair keeps its port bound
        # (a rebind right after the start would leave the old port held until the worker reads it).
        if fd is not None and (fd != self._udp_fd or force_socket) and self._ready:
            # With the eBPF program, its under-load flag and counters go along (the worker sets the flag).
            extra = self.hsock.kernel.worker_fds() if self.hsock is not None and self.hsock.kernel else []
            messages.append((encode_socket(self.hsock is not None, len(extra)), [fd, *extra]))
        else:
            fd = self._udp_fd
        if not messages:
            return
        self.sock.setblocking(True)  # rare and small: must not be lost
        try:
            self.sock.settimeout(2.0)
            for data, fds in messages:
                socket.send_fds(self.sock, [data], fds)
        except OSError as exc:
            self._fail(f"handshake worker: cannot configure it: {exc}")
            return
        finally:
            if self.sock is not None:
                self.sock.setblocking(False)
        self._config_key = key
        self._udp_fd = fd

    # -- receive path -----------------------------------------------------------------------------------------
    def sink(self, kind: int, data: bytes, endpoint: tuple[str, int]) -> None:
        """Called by the device for each handshake message of a receive batch (those that still reach the
        data socket: steering off, or a GRO run that began with transport data)."""
        if self.handed + len(self.entries) - self.processed >= QUEUE_SIZE:
            self.counters["rx_handshake_queue_full"] = self.counters.get("rx_handshake_queue_full", 0) + 1
            return
        host, port = endpoint
        addr = self._addresses.get(host)
        if addr is None:
            if len(self._addresses) >= 4096:
                self._addresses.clear()
            addr = self._addresses[host] = _address_bytes(host)
        self.entries.append((kind, addr, port, data))
        if self._flush_timer is None:  # goes within FLUSH_DELAY even if nobody calls flush()
            self._flush_timer = self.loop.call_later(FLUSH_DELAY, self.send_now)

    def flush(self) -> None:
        """After each receive wake (the runtime calls this): send the waiting messages if there are enough
        (else they go when the timer `sink` armed fires, FLUSH_DELAY after the first)."""
        if len(self.entries) >= FLUSH_ENTRIES:
            self.send_now()

    def send_now(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        entries = self.entries
        if not entries:
            return
        self.entries = []
        sock = self.sock
        if sock is None:
            return
        for start in range(0, len(entries), BATCH_MAX):
            chunk = entries[start:start + BATCH_MAX]
            try:
                sock.send(encode_batch(self.handed + len(chunk), chunk))
            except (BlockingIOError, InterruptedError):
                dropped = len(entries) - start
                self.counters["rx_handshake_queue_full"] = self.counters.get("rx_handshake_queue_full", 0) + dropped
                return
            except OSError as exc:
                self._fail(f"handshake worker: send failed: {exc}")
                return
            self.handed += len(chunk)

    def _on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        identified: list = []
        forwarded: list = []
        for _ in range(MAX_DRAIN):
            try:
                data = sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fail(f"handshake worker: receive failed: {exc}")
                return
            if not data:
                self._fail("handshake worker exited")
                return
            message = decode(data)
            if message[0] != MSG_RESULTS:
                continue
            _, processed, ident_entries, fwd_entries, counters = message
            if not self._ready:  # its hello
                self._ready = True
                self.configure(force_socket=True)
                if self.sock is None:
                    return
            self.processed = max(self.processed, processed)
            if counters is not None:
                self.worker_counters = counters
            for entry in ident_entries:
                if entry[0] != self.generation:
                    self.counters["rx_handshake_stale"] = self.counters.get("rx_handshake_stale", 0) + 1
                    continue
                identified.append((identified_from_tuple(entry), (_host(entry[1]), entry[2])))
            for kind, addr, port, msg in fwd_entries:
                forwarded.append((kind, msg, (_host(addr), port)))
        if identified or forwarded:
            transmits = self.device.handle_handshake_results(identified, forwarded, time.monotonic())
            if transmits:
                self._send(transmits)
            if self._after_results is not None:
                self._after_results()

    # -- without the worker: the handshake socket read in the event loop -----------------------------------
    def _read_fallback(self) -> None:
        if self.hsock is not None and not self._fallback_reader and not self._closed:
            self.loop.add_reader(self.hsock.fileno(), self._on_fallback_readable)
            self._fallback_reader = True

    def _on_fallback_readable(self) -> None:
        """The worker is gone: serve what reaches the handshake socket here, as the in-loop path does."""
        hsock = self.hsock
        if hsock is None:
            return
        reader = HandshakeReader(hsock.sock)
        reader.buf = self._fallback_buf
        reader.view = memoryview(self._fallback_buf)
        reader.addresses = self._fallback_addresses
        counters: Counter[str] = Counter()
        entries = reader.drain(counters, FALLBACK_READS)
        for key, value in counters.items():
            key = key.replace("rx_handshake_socket", "rx_handshake_socket_inloop")
            self.counters[key] = self.counters.get(key, 0) + value
        if not entries:
            return
        now = time.monotonic()
        self._handshake_rate.add(len(entries), now)
        device = self.device
        datagrams = [(msg, (_host(addr), port)) for _kind, addr, port, msg in entries]
        _packets, transmits = device.handle_udp_batch(datagrams, now,
                                                      under_load=self._handshake_rate.under_load(now))
        if transmits:
            self._send(transmits)
        if self._after_results is not None:
            self._after_results()

    def stats(self) -> dict[str, int]:
        out = dict(self.worker_counters)
        if self.hsock is not None:  # the kernel limiter's drops (eBPF steering), read from its map
            out.update(self.hsock.kernel_counters())
        for key, value in self.counters.items():
            out[key] = out.get(key, 0) + value
        out["handshake_queue_backlog"] = self.handed - self.processed
        out["handshake_worker_running"] = int(self.sock is not None)
        out["handshake_socket"] = int(self.hsock is not None)
        return out

    # -- life cycle -------------------------------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        """The worker is gone or unusable: serve handshakes in the event loop (the data socket's, and the
        handshake socket's, read here now) until a new worker runs (after restart_delay, doubling)."""
        log.error("%s; handshakes are served in the event loop until it is restarted in %.0f s", reason,
                  self.restart_delay)
        self._stop_worker()
        self.counters["handshake_worker_failures"] = self.counters.get("handshake_worker_failures", 0) + 1
        self._read_fallback()
        if self._on_failure is not None:
            self._on_failure(reason)
        if not self._closed and self._restart_handle is None:
            self._restart_handle = self.loop.call_later(self.restart_delay, self._restart)
            self.restart_delay = min(self.restart_delay * 2, RESTART_DELAY_MAX)

    def _restart(self) -> None:
        self._restart_handle = None
        if self._closed or self.sock is not None:
            return
        try:
            self.start()
        except OSError as exc:
            self._fail(f"handshake worker: cannot restart it: {exc}")
            return
        if self._fallback_reader and self.hsock is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.hsock.fileno())
            self._fallback_reader = False
        self.configure(force_socket=True)
        log.info("handshake worker restarted")

    def _stop_worker(self) -> None:
        if self.device.handshake_sink == self.sink:
            self.device.handshake_sink = None
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self.entries = []
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(sock.fileno())
            sock.close()  # the worker sees end of file and exits
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2.0)

    def close(self) -> None:
        self._closed = True
        if self._restart_handle is not None:
            self._restart_handle.cancel()
            self._restart_handle = None
        self._stop_worker()
        hsock, self.hsock = self.hsock, None
        if hsock is not None:
            if self._fallback_reader:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(hsock.fileno())
            self._fallback_reader = False
            hsock.close()
