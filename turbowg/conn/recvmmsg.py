"""Many datagrams per system call through ctypes: recvmmsg(2), and the handshake socket's reader built on it.

`Iovec`/`Msghdr`/`Mmsghdr` are struct iovec/msghdr/mmsghdr as recvmmsg(2) and sendmmsg(2) take them (the
flooder of `bench flood`, bench/flooder.py, sends with them too); `libc_recvmmsg()` is libc's recvmmsg, or
None where it is missing or the layout is not LP64 (the unpack of HandshakeReader assumes it).

`Screener`/`make_screener` screen one recvmmsg batch in one call (turbowg/conn/_hsscreen.c; `PyScreener`
is its pure-Python twin, tested against it): header, size, mac1 and, under load, the per-source cookie-reply
limiter, so that a flood message the worker drops costs no Python object (~8 us each in Python, well under
1 us in C). `HandshakeReader.screen` reads with it.

`HandshakeReader` is how the handshake worker (turbowg/daemon/handshake_worker.py) and, while the worker
is down, the main process (turbowg/daemon/handshake_offload.py) read the steered handshake socket
(steering.py): drain until EAGAIN (bounded), UDP_GRO reads split by segment size, into (kind, source
address bytes, port, message) entries.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import socket
import struct
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

from turbowg.accel import use_c
from turbowg.conn.steering import SK_MEMINFO_DROPS, SK_MEMINFO_RMEM_ALLOC, meminfo
from turbowg.linux import SOL_UDP, UDP_GRO
from turbowg.noise.primitives import MAC_SIZE
from turbowg.ratelimiter import RateLimiter
from turbowg.wire import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    RESPONSE_SIZE,
)

try:
    from turbowg.conn import _hsscreen
except ImportError:  # the C extension is optional (setup.py)
    _hsscreen = None  # type: ignore[assignment]
# The C screener is in use (for `turbowg doctor` and the CI check of built extensions).
HAVE_C = _hsscreen is not None and use_c()

if TYPE_CHECKING:
    from turbowg.device.handshake_worker import Entry

# Reads of the handshake socket per worker wake: more than UNDER_LOAD_BACKLOG (512), so that a wake that
# finds more than 1/8 of a 4096-message queue waiting can see it (and turn "under load" on).
MAX_WAKE_READS = 1024
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
# Bytes of receive-queue memory per queued handshake datagram, at least (its skb's truesize: 832 for a
# 148-byte initiation over veth or loopback, more from a NIC): the queue's memory over this is an upper
# estimate of the messages waiting.
QUEUED_TRUESIZE_FLOOR = 768


def source_bytes(sockaddr: tuple, cache: dict) -> bytes:
    """The source of a datagram on the dual-stack socket as address bytes (4 for v4-mapped, else 16)."""
    host = sockaddr[0]
    addr = cache.get(host)
    if addr is None:
        if len(cache) >= 4096:
            cache.clear()
        if host.startswith("::ffff:") and "." in host:
            addr = socket.inet_aton(host[7:])
        else:
            addr = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        cache[host] = addr
    return addr


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(Iovec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", Msghdr), ("msg_len", ctypes.c_uint)]


_SOCKADDR_IN6 = 28
_V4_MAPPED = bytes(10) + b"\xff\xff"
_MSG_TRUNC = 0x20
_EAGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)
# A GRO run on the handshake socket is of handshake messages (<= 148 bytes, at most 64 segments).
SLOT_BYTES = 64 * 148 + 128
RECVMMSG_SLOTS = 128


# The tail of one struct mmsghdr read back in one unpack: msg_controllen, msg_flags, msg_len.
_TAIL_OFFSET = Msghdr.msg_controllen.offset
_HEADER_TAIL = struct.Struct(f"=Qi{Mmsghdr.msg_len.offset - Msghdr.msg_flags.offset - 4}xI")
_MMSGHDR_SIZE = ctypes.sizeof(Mmsghdr)


def libc_recvmmsg() -> Any:
    if Msghdr.msg_flags.offset != _TAIL_OFFSET + 8 or ctypes.sizeof(ctypes.c_size_t) != 8:
        return None  # not the LP64 layout the unpack assumes: recvmsg per datagram
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.recvmmsg
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(Mmsghdr), ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def libc_sendmmsg() -> Any:
    if ctypes.sizeof(ctypes.c_size_t) != 8:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sendmmsg
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


REPLY_SLOTS = 64
_REPLY_BYTES = 64  # a cookie reply (COOKIE_REPLY_SIZE); larger datagrams go one by one


class ReplySender:
    """The worker's cookie replies, many per sendmmsg(2) call from preallocated slots (addresses as
    sockaddr_in6, IPv4 v4-mapped, for the dual-stack handshake socket). `send` returns how many failed.
    Without sendmmsg in libc (or for a datagram larger than a slot): sendto per datagram."""

    def __init__(self, slots: int = REPLY_SLOTS) -> None:
        self._sendmmsg = libc_sendmmsg()
        self.slots = slots
        self.data = bytearray(slots * _REPLY_BYTES)
        self.names = bytearray(slots * _SOCKADDR_IN6)
        for i in range(slots):  # family once: AF_INET6, host order
            self.names[i * _SOCKADDR_IN6:i * _SOCKADDR_IN6 + 2] = socket.AF_INET6.to_bytes(2, sys.byteorder)
        data_base = ctypes.addressof(ctypes.c_char.from_buffer(self.data))
        name_base = ctypes.addressof(ctypes.c_char.from_buffer(self.names))
        self.iovecs = (Iovec * slots)()
        self.msgs = (Mmsghdr * slots)()
        for i in range(slots):
            self.iovecs[i].iov_base = data_base + i * _REPLY_BYTES
            hdr = self.msgs[i].msg_hdr
            hdr.msg_name = name_base + i * _SOCKADDR_IN6
            hdr.msg_namelen = _SOCKADDR_IN6
            hdr.msg_iov = ctypes.pointer(self.iovecs[i])
            hdr.msg_iovlen = 1
        self._base = ctypes.addressof(self.msgs)
        self._size = ctypes.sizeof(Mmsghdr)

    def send(self, sock: socket.socket, replies: list[tuple[bytes, bytes, int]]) -> int:
        failed = 0
        if self._sendmmsg is None:
            for reply, addr, port in replies:
                failed += not _sendto(sock, reply, addr, port)
            return failed
        fd = sock.fileno()
        n = 0
        data, names, iovecs = self.data, self.names, self.iovecs
        for reply, addr, port in replies:
            if len(reply) > _REPLY_BYTES:
                failed += not _sendto(sock, reply, addr, port)
                continue
            at = n * _SOCKADDR_IN6
            names[at + 2:at + 4] = port.to_bytes(2, "big")
            names[at + 8:at + 24] = _V4_MAPPED + addr if len(addr) == 4 else addr
            data[n * _REPLY_BYTES:n * _REPLY_BYTES + len(reply)] = reply
            iovecs[n].iov_len = len(reply)
            n += 1
            if n == self.slots:
                failed += self._flush(fd, n)
                n = 0
        if n:
            failed += self._flush(fd, n)
        return failed

    def _flush(self, fd: int, n: int) -> int:
        """Send slots 0..n-1; a datagram the kernel refuses is counted and skipped."""
        failed = 0
        start = 0
        while start < n:
            got = self._sendmmsg(fd, self._base + start * self._size, n - start, socket.MSG_DONTWAIT)
            if got < 0:
                if ctypes.get_errno() == errno.EINTR:
                    continue
                got = 0
                failed += 1
                start += 1  # the first of the rest failed: skip it, try the others
            start += got
        return failed


def _sendto(sock: socket.socket, reply: bytes, addr: bytes, port: int) -> bool:
    host = socket.inet_ntop(socket.AF_INET6, _V4_MAPPED + addr if len(addr) == 4 else addr)
    try:
        sock.sendto(reply, (host, port, 0, 0))
    except OSError:
        return False
    return True


# Screen verdicts of a kept message (turbowg/conn/_hsscreen.c): identify it / answer with a cookie reply /
# forward it (a cookie reply to one of our initiations) / check its mac2 (under load, a non-zero mac2).
V_ACCEPT, V_COOKIE, V_FORWARD, V_MAC2 = 1, 2, 3, 4
# The counters tuple of Screener.screen, in order.
SCREEN_COUNTERS = ("rx_handshake_socket_other", "rx_handshake_bad_size", "rx_cookie_reply_bad_size", "rx_bad_mac1",
                   "tx_cookie_reply_ratelimited", "rx_handshake_socket_truncated", "rx_handshake_screened")
_SIZES = {MESSAGE_INITIATION: INITIATION_SIZE, MESSAGE_RESPONSE: RESPONSE_SIZE, MESSAGE_COOKIE_REPLY: COOKIE_REPLY_SIZE}
_NO_MAC = bytes(MAC_SIZE)
_CONTROL_LEVEL = struct.Struct("=Qii")  # struct cmsghdr: cmsg_len, cmsg_level, cmsg_type


class PyScreener:
    """The pure-Python twin of _hsscreen.Screener: the same verdicts and counters for the same buffers."""

    def __init__(self, mac1_key: bytes, packets_per_second: float = 20.0, burst: int = 5,
                 max_entries: int = 1 << 16, gc_interval_ns: int = 1_000_000_000) -> None:
        if len(mac1_key) != 32:
            raise ValueError("mac1_key must be 32 bytes")
        self.mac1_key = bytes(mac1_key)
        self.limiter = RateLimiter(packets_per_second, burst, max_entries, gc_interval_ns / 1e9)
        self.limiter.gc_interval_ns = gc_interval_ns

    def allow(self, address: bytes, now_ns: int) -> bool:
        return self.limiter.allow_ns(bytes(address), now_ns)

    def buckets(self) -> int:
        return len(self.limiter)

    def screen(self, headers: Any, data: Any, names: Any, controls: Any, n: int, slot_bytes: int, cmsg_space: int,
               now_ns: int, under_load: bool) -> tuple[list, tuple[int, ...]]:
        if n < 0 or len(headers) < n * _MMSGHDR_SIZE or len(data) < n * slot_bytes or \
                len(names) < n * _SOCKADDR_IN6 or len(controls) < n * cmsg_space or \
                cmsg_space < _GRO_CMSG_SPACE or slot_bytes <= 0:
            raise ValueError("buffers too small for n slots")
        kept: list = []
        other = bad_size = cookie_bad_size = bad_mac1 = limited = truncated = messages = 0
        blake2s = hashlib.blake2s
        key = self.mac1_key
        allow = self.limiter.allow_ns
        for i in range(n):
            controllen, flags, size = _HEADER_TAIL.unpack_from(headers, i * _MMSGHDR_SIZE + _TAIL_OFFSET)
            size = min(size, slot_bytes)
            name_at = i * _SOCKADDR_IN6
            raw = bytes(names[name_at + 8:name_at + 24])
            addr = raw[12:] if raw[:12] == _V4_MAPPED else raw
            port = (names[name_at + 2] << 8) | names[name_at + 3]
            stride = size
            if controllen:
                c = i * cmsg_space
                _len, level, kind = _CONTROL_LEVEL.unpack_from(controls, c)
                if level == SOL_UDP and kind == UDP_GRO:
                    seg = int.from_bytes(controls[c + 16:c + 18], sys.byteorder)
                    if 0 < seg < size:
                        stride = seg
            if flags & _MSG_TRUNC:
                truncated += 1
            at = i * slot_bytes
            for pos in range(0, size, stride or 1):  # an empty datagram (stride 0) holds no message
                length = min(stride, size - pos)
                msg = bytes(data[at + pos:at + pos + length])
                kind = msg[0] if length >= 4 and msg[1:4] == b"\0\0\0" else 0
                if not MESSAGE_INITIATION <= kind <= MESSAGE_COOKIE_REPLY:
                    other += 1
                    continue
                messages += 1
                if _SIZES[kind] != length:
                    if kind == MESSAGE_COOKIE_REPLY:
                        cookie_bad_size += 1
                    else:
                        bad_size += 1
                    continue
                if kind == MESSAGE_COOKIE_REPLY:
                    kept.append((V_FORWARD, kind, addr, port, msg))
                    continue
                mac1_at = length - 2 * MAC_SIZE
                if blake2s(msg[:mac1_at], digest_size=MAC_SIZE, key=key).digest() != msg[mac1_at:mac1_at + MAC_SIZE]:
                    bad_mac1 += 1
                    continue
                verdict = V_ACCEPT
                if under_load:
                    verdict = V_MAC2
                    if msg[length - MAC_SIZE:] == _NO_MAC:
                        if not allow(addr, now_ns):
                            limited += 1
                            continue
                        verdict = V_COOKIE
                kept.append((verdict, kind, addr, port, msg))
        return kept, (other, bad_size, cookie_bad_size, bad_mac1, limited, truncated, messages)


def make_screener(mac1_key: bytes) -> Any:
    """The C screener, or its Python twin without the extension (or with TURBOWG_NO_C=1)."""
    if _hsscreen is not None and use_c() and _hsscreen.SIZEOF_MMSGHDR == _MMSGHDR_SIZE:
        return _hsscreen.Screener(mac1_key)
    return PyScreener(mac1_key)


class HandshakeReader:
    """The worker's reads of the handshake socket: a wake drains it until EAGAIN (at most MAX_WAKE_READS),
    RECVMMSG_SLOTS datagrams per recvmmsg(2) call (through ctypes: a system call costs ~2-3 us here, and
    one per datagram was most of a flood message's cost), UDP_GRO reads split by segment size, into
    (kind, source bytes, port, message) entries. Falls back to recvmsg_into per datagram without recvmmsg."""

    def __init__(self, sock: socket.socket, slots: int = RECVMMSG_SLOTS) -> None:
        self.sock = sock
        self.buf = bytearray(65536)
        self.view = memoryview(self.buf)
        self.addresses: dict[str, bytes] = {}
        self.sources: dict[bytes, bytes] = {}  # sockaddr address part -> source bytes
        self.drops_base = 0
        self._recvmmsg = libc_recvmmsg()
        if self._recvmmsg is not None:
            self.slots = slots
            self.data = bytearray(slots * SLOT_BYTES)
            self.names = bytearray(slots * _SOCKADDR_IN6)
            self.controls = bytearray(slots * _GRO_CMSG_SPACE)
            data_base = ctypes.addressof(ctypes.c_char.from_buffer(self.data))
            name_base = ctypes.addressof(ctypes.c_char.from_buffer(self.names))
            control_base = ctypes.addressof(ctypes.c_char.from_buffer(self.controls))
            self.iovecs = (Iovec * slots)()
            self.headers = bytearray(ctypes.sizeof(Mmsghdr) * slots)
            self.msgs = (Mmsghdr * slots).from_buffer(self.headers)
            for i in range(slots):
                self.iovecs[i].iov_base = data_base + i * SLOT_BYTES
                self.iovecs[i].iov_len = SLOT_BYTES
                hdr = self.msgs[i].msg_hdr
                hdr.msg_name = name_base + i * _SOCKADDR_IN6
                hdr.msg_namelen = _SOCKADDR_IN6
                hdr.msg_iov = ctypes.pointer(self.iovecs[i])
                hdr.msg_iovlen = 1
                hdr.msg_control = control_base + i * _GRO_CMSG_SPACE
                hdr.msg_controllen = _GRO_CMSG_SPACE
            self.template = bytes(self.headers)  # what the kernel overwrites, restored before each call
            self.data_view = memoryview(self.data)

    def drain(self, counters: Counter, limit: int = 0) -> list[Entry]:
        if self._recvmmsg is None:
            return self._drain_each(counters, limit)
        entries: list[Entry] = []
        limit = limit or MAX_WAKE_READS
        fd = self.sock.fileno()
        msgs = self.msgs
        headers = self.headers
        template = self.template
        data = self.data_view
        names = self.names
        controls = self.controls
        sources = self.sources
        unpack = _HEADER_TAIL.unpack_from
        size_of = _MMSGHDR_SIZE
        reads = 0
        while reads < limit:
            headers[:] = template
            n = self._recvmmsg(fd, msgs, min(self.slots, limit - reads), socket.MSG_DONTWAIT, None)
            if n <= 0:
                if n < 0 and ctypes.get_errno() not in _EAGAIN:
                    counters["rx_handshake_socket_errors"] += 1
                break
            reads += n
            for i in range(n):
                controllen, flags, size = unpack(headers, i * size_of + _TAIL_OFFSET)
                name_at = i * _SOCKADDR_IN6
                raw = bytes(names[name_at + 8:name_at + 24])
                source = sources.get(raw)
                if source is None:
                    if len(sources) >= 4096:
                        sources.clear()
                    source = sources[raw] = raw[12:] if raw[:12] == _V4_MAPPED else raw
                port = (names[name_at + 2] << 8) | names[name_at + 3]
                at = i * SLOT_BYTES
                stride = size
                if controllen:
                    c = i * _GRO_CMSG_SPACE
                    if int.from_bytes(controls[c + 8:c + 12], sys.byteorder) == SOL_UDP and \
                            int.from_bytes(controls[c + 12:c + 16], sys.byteorder) == UDP_GRO:
                        seg = int.from_bytes(controls[c + 16:c + 18], sys.byteorder)
                        if 0 < seg < size:
                            stride = seg
                if flags & _MSG_TRUNC:
                    counters["rx_handshake_socket_truncated"] += 1
                pos = at
                end = at + size
                while pos < end:
                    stop = pos + stride if pos + stride < end else end
                    message = bytes(data[pos:stop])
                    pos = stop
                    kind = message[0] if message[1:4] == b"\0\0\0" else 0
                    if not MESSAGE_INITIATION <= kind <= MESSAGE_COOKIE_REPLY:
                        counters["rx_handshake_socket_other"] += 1
                        continue
                    entries.append((kind, source, port, message))
            if n < self.slots:
                break  # the queue is empty (or nearly: the next wake takes the rest)
        counters["rx_handshake_socket_reads"] += reads
        return entries

    def screen(self, screener: Any, counters: Counter, now: float, under_load: Any, limit: int = 0) -> list | None:
        """`drain` through `screener` (make_screener): only what passed its checks comes back, as
        (verdict, kind, source bytes, port, message). `under_load(seen)` is asked before each recvmmsg batch
        is screened, `seen` = what waited in the queue when this wake began, as far as we know: the datagrams
        read so far (this batch included), or the queue's memory / QUEUED_TRUESIZE_FLOOR if more (so a wake
        that finds more than 1/8 of the queue waiting is under load from its first batch on, as when the
        whole wake was read before deciding). None without recvmmsg (the caller drains as before)."""
        if self._recvmmsg is None:
            return None
        kept: list = []
        limit = limit or MAX_WAKE_READS
        fd = self.sock.fileno()
        now_ns = int(now * 1_000_000_000)
        totals = [0] * len(SCREEN_COUNTERS)
        reads = 0
        try:
            queued = meminfo(self.sock)[SK_MEMINFO_RMEM_ALLOC] // QUEUED_TRUESIZE_FLOOR
        except OSError:
            queued = 0
        while reads < limit:
            self.headers[:] = self.template
            n = self._recvmmsg(fd, self.msgs, min(self.slots, limit - reads), socket.MSG_DONTWAIT, None)
            if n <= 0:
                if n < 0 and ctypes.get_errno() not in _EAGAIN:
                    counters["rx_handshake_socket_errors"] += 1
                break
            reads += n
            batch, counts = screener.screen(self.headers, self.data, self.names, self.controls, n, SLOT_BYTES,
                                            _GRO_CMSG_SPACE, now_ns, under_load(max(reads, queued)))
            kept += batch
            for index, value in enumerate(counts):
                totals[index] += value
            if n < self.slots:
                break
        for name, value in zip(SCREEN_COUNTERS, totals, strict=True):
            if value:
                counters[name] += value
        counters["rx_handshake_socket_reads"] += reads
        return kept

    def _drain_each(self, counters: Counter, limit: int = 0) -> list[Entry]:
        entries: list[Entry] = []
        recv = self.sock.recvmsg_into
        buf = self.buf
        view = [self.view]
        addresses = self.addresses
        limit = limit or MAX_WAKE_READS
        reads = 0
        while reads < limit:
            try:
                n, ancdata, _flags, addr = recv(view, _GRO_CMSG_SPACE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                counters["rx_handshake_socket_errors"] += 1
                reads += 1
                continue
            reads += 1
            source = addresses.get(addr[0])
            if source is None:
                source = source_bytes(addr, addresses)
            port = addr[1]
            stride = n
            for level, kind, data in ancdata:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
                    seg = int.from_bytes(data[:4] if len(data) >= 4 else data[:2], sys.byteorder)
                    if 0 < seg < n:
                        stride = seg
            pos = 0
            while pos < n:
                end = min(pos + stride, n)
                message = bytes(buf[pos:end])
                pos = end
                kind = message[0] if len(message) >= 4 and not any(message[1:4]) else 0
                if not MESSAGE_INITIATION <= kind <= MESSAGE_COOKIE_REPLY:
                    counters["rx_handshake_socket_other"] += 1  # a GRO run that mixed in another message
                    continue
                entries.append((kind, source, port, message))
        counters["rx_handshake_socket_reads"] += reads
        return entries

    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped at this socket (its receive queue was full), plus earlier sockets'."""
        try:
            return self.drops_base + meminfo(self.sock)[SK_MEMINFO_DROPS]
        except OSError:
            return self.drops_base
