"""The handshake worker process and its plumbing: handshake messages served off the data path.

The decisions are sans-IO in turbowg/device/handshake_worker.py; this is the I/O around them.

Main process (`HandshakeOffload`, owned by the runtime): the device's receive path hands every handshake
message (initiation, response, cookie reply) to `sink` at classification time instead of handling it; the
runtime calls `flush()` after each receive wake, which sends the wake's messages to the worker as one
batch (chunks of at most BATCH_MAX entries) over a nonblocking unix SOCK_SEQPACKET socketpair. Each
entry is (kind, source address bytes (4 or 16), port, message). The queue is bounded: messages handed
over minus messages the worker reports processed may not exceed QUEUE_SIZE (4096, as wireguard-go's
handshake queue); past that, or when the socket is full, messages are dropped and counted
(`rx_handshake_queue_full`). Transport data never waits behind handshake work: the data path only copies
the message and appends it to a list. What comes back (initiations the worker identified, responses and
cookie replies that passed its checks) is handed to `Device.handle_handshake_results`, which does the
per-peer part (timestamp replay, initiation rate, response creation, keypair installation).

Worker process (`python -m turbowg.daemon.handshake_worker FD`, spawned by the runtime, stdin closed): the
other end of the socketpair. It gets the identity and the peers' public keys in a config message after
every UAPI set that changes them, and the UDP socket with SCM_RIGHTS (again after a rebind), so it sends
cookie replies itself. It exits when the main process goes away (end of file on the socketpair).

`TURBOWG_HANDSHAKE_WORKER=0` keeps the old way (handshakes served in the event loop);
`TURBOWG_HANDSHAKE_WORKER_NICE=N` (default 10; 0 keeps the daemon's) sets the worker's scheduling priority.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from turbowg.device.handshake_worker import (
    MSG_BATCH,
    MSG_CONFIG,
    MSG_RESULTS,
    QUEUE_SIZE,
    HandshakeWorkerCore,
    decode,
    encode_batch,
    encode_config,
    encode_results,
    identified_from_tuple,
)

log = logging.getLogger("turbowg.handshake_worker")

BATCH_MAX = 256  # entries per socket message (a receive wake may hand over thousands: GRO runs)
# Messages of several receive wakes go over together (one wake often holds one or two handshake messages,
# and a socket message plus a worker wake and report per message would cost more than the message): sent
# once FLUSH_ENTRIES are waiting, or FLUSH_DELAY after the first one (a handshake waits that much longer).
FLUSH_ENTRIES = 128
FLUSH_DELAY = 0.002
RECV_SIZE = 1 << 20
SOCKET_BUFFER = 4 << 20
MAX_DRAIN = 64  # messages read per wake, on either side
COUNTERS_INTERVAL = 0.5  # seconds between the worker's counter reports (at least)
_SO_SNDBUFFORCE = 32
_SO_RCVBUFFORCE = 33
_PR_SET_PDEATHSIG = 1
# The worker yields the CPU to the data path: handshake work is what waits when both want it.
DEFAULT_NICE = 10


def enabled_from_env() -> bool:
    return os.environ.get("TURBOWG_HANDSHAKE_WORKER", "1").strip().lower() not in ("0", "off", "no", "false")


def _big_buffers(sock: socket.socket) -> None:
    for force, plain in ((_SO_SNDBUFFORCE, socket.SO_SNDBUF), (_SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def _address_bytes(host: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)


def _host(addr: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(addr) == 4 else socket.AF_INET6, addr)


# ---------------------------------------------------------------- main process side


class HandshakeOffload:
    """The main process's end: collects the receive path's handshake messages, feeds the worker, applies
    its results. `send` sends a list of device Transmits (the runtime's); `after_results` runs after the
    device took results (the runtime re-arms its timer: a handshake may have armed one sooner)."""

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
        self._udp_fd: int | None = None
        self._addresses: dict[str, bytes] = {}
        self.counters: dict[str, int] = {}  # our own
        self._flush_timer: Any = None
        self.worker_counters: dict[str, int] = {}  # the worker's latest report

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
        self.loop.add_reader(ours.fileno(), self._on_readable)
        self.device.handshake_sink = self.sink
        log.info("handshake worker started (pid %d)", self.proc.pid)

    # -- configuration --------------------------------------------------------------------------------------
    def configure(self, udp_fd: int | None = None) -> None:
        """Push identity and peers to the worker if they changed (and the UDP socket if `udp_fd` is new)."""
        if self.sock is None:
            return
        device = self.device
        private = device.private_key
        key = (private, tuple(device.peers))
        new_fd = udp_fd is not None and udp_fd != self._udp_fd
        if key == self._config_key and not new_fd:
            return
        if key != self._config_key:
            self.generation += 1
        data = encode_config(self.generation, private, list(device.peers))
        fds = [udp_fd] if new_fd else []
        self.sock.setblocking(True)  # rare and small: must not be lost
        try:
            self.sock.settimeout(2.0)
            socket.send_fds(self.sock, [data], fds)
        except OSError as exc:
            self._fail(f"handshake worker: cannot configure it: {exc}")
            return
        finally:
            if self.sock is not None:
                self.sock.setblocking(False)
        self._config_key = key
        if new_fd:
            self._udp_fd = udp_fd

    # -- receive path -----------------------------------------------------------------------------------------
    def sink(self, kind: int, data: bytes, endpoint: tuple[str, int]) -> None:
        """Called by the device for each handshake message of a receive batch."""
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

    def stats(self) -> dict[str, int]:
        out = dict(self.worker_counters)
        for key, value in self.counters.items():
            out[key] = out.get(key, 0) + value
        out["handshake_queue_backlog"] = self.handed - self.processed
        return out

    # -- life cycle -------------------------------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        """The worker is gone or unusable: serve handshakes in the event loop again."""
        log.error("%s; handshakes are served in the event loop from now on", reason)
        self.close()
        if self._on_failure is not None:
            self._on_failure(reason)

    def close(self) -> None:
        if self.device.handshake_sink == self.sink:
            self.device.handshake_sink = None
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
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


# ---------------------------------------------------------------- worker process side


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


def serve(sock: socket.socket, clock: Callable[[], float] = time.monotonic) -> int:
    """The worker's loop: until end of file on `sock`."""
    core = HandshakeWorkerCore()
    udp: socket.socket | None = None
    last_report = float("-inf")
    try:
        while True:
            try:
                data, fds = _recv(sock)
            except InterruptedError:
                continue
            if not data:
                return 0
            messages = [(data, fds)]
            eof = False
            for _ in range(MAX_DRAIN):
                try:
                    data, fds = _recv(sock, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                if not data:
                    eof = True
                    break
                messages.append((data, fds))
            identified: list = []
            forwarded: list = []
            decoded = [(decode(data), fds) for data, fds in messages]
            # The queue as far as we can see it: what the newest batch read says was handed over.
            latest = max((m[1] for m, _ in decoded if m[0] == MSG_BATCH), default=0)
            for message, fds in decoded:
                if message[0] == MSG_CONFIG:
                    _, generation, private_key, peer_keys = message
                    core.configure(generation, private_key, peer_keys)
                    if fds:
                        if udp is not None:
                            udp.close()
                        udp = socket.socket(fileno=fds[0])
                        for extra in fds[1:]:
                            os.close(extra)
                    continue
                for extra in fds:
                    os.close(extra)
                if message[0] != MSG_BATCH:
                    continue
                replies, ident, fwd = core.process_batch(latest, message[2], clock())
                for reply, addr, port in replies:
                    if udp is None:
                        core.counters["tx_cookie_reply_no_socket"] += 1
                        continue
                    try:
                        udp.sendto(reply, _sockaddr(addr, port))
                    except OSError:
                        core.counters["tx_cookie_reply_send_failed"] += 1
                identified += ident
                forwarded += fwd
            now = clock()
            counters = None
            if now - last_report >= COUNTERS_INTERVAL or len(messages) == 1:
                counters = dict(core.counters)
                last_report = now
            try:
                sock.send(encode_results(core.processed, identified, forwarded, counters))
            except BrokenPipeError:
                return 0
            if eof:
                return 0
    finally:
        if udp is not None:
            udp.close()


def _worker_setup() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop (end of file)
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    nice = os.environ.get("TURBOWG_HANDSHAKE_WORKER_NICE", str(DEFAULT_NICE)).strip()
    with contextlib.suppress(ValueError, OSError):
        if int(nice) > 0:
            os.nice(min(int(nice), 19))


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
