"""The WireGuard UDP socket: one dual-stack AF_INET6 socket with batch send (UDP_SEGMENT) and batch receive
(UDP_GRO).

Public API (stable; the device runtime drives it)::

    bind = UDPBind(port=0, fwmark=0)        # binds [::]:port with IPV6_V6ONLY=0, non-blocking
    bind.port                               # actual bound port
    bind.fileno()                           # register with the event loop for readability
    bind.set_fwmark(mark); bind.fwmark     # SO_MARK (0 clears); the mark in effect
    n = bind.recv_batch(out, max_calls=64)  # appends (datagram: bytes, endpoint) until EAGAIN or max_calls
    bind.send_batch(endpoint, datagrams)    # endpoint = (host, port); host is a plain IPv4 or IPv6 string
    cursor = bind.recv_packed(buf, cursor, limit, chunks, endpoints, max_calls=64)
                                            # reads straight into buf; per read appends (offset, end, stride)
                                            # to chunks (stride = UDP_GRO segment size) and the sender
    bind.send_packed(endpoint, buf, offset, sizes, sizes_start, count)
                                            # `count` datagrams back to back in buf from offset, sizes in an
                                            # int32 array: runs of equal size go out as one UDP_SEGMENT sendmsg
    bind.gso, bind.gro: bool                # UDP_SEGMENT sends / UDP_GRO receives in use
    bind.counters: dict[str, int]
    bind.close()

Endpoints are ``(host, port)`` with IPv4 peers as plain dotted quads (v4-mapped addresses are un-mapped on
receive and re-mapped to ::ffff:a.b.c.d on send). Runs of equal-size datagrams to one endpoint go out in one
sendmsg with a UDP_SEGMENT control message (a shorter datagram may end a run; at most 64 datagrams and
65507 (IPv4) / 65527 (IPv6) bytes per call). If the kernel refuses a segmented send (EIO, EINVAL, EMSGSIZE),
that run is resent one datagram per call and GSO stays off for this socket (logged once). EAGAIN drops the
rest of the batch and counts it; other send errors (unreachable, ...) drop and count. Nothing raises for
network conditions; a malformed endpoint raises ValueError.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
import sys

from turbowg.conn.endpoint import Endpoint
from turbowg.linux import SO_MARK, SO_RCVBUFFORCE, SO_SNDBUFFORCE, SOL_UDP, UDP_GRO, UDP_SEGMENT
from turbowg.packed import pack

log = logging.getLogger(__name__)

SOCKET_BUFFER = 7 << 20
MAX_SEGMENTS = 64
MAX_SEND_V4 = 65507
MAX_SEND_V6 = 65527
RECV_BUFFER = 65536 + 1024
_GSO_REFUSALS = (errno.EIO, errno.EINVAL, errno.EMSGSIZE)
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_ENDPOINT_CACHE_MAX = 4096


class UDPBind:
    def __init__(self, port: int = 0, *, fwmark: int = 0, gso: bool = True, gro: bool = True) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"UDP port {port} out of range 0..65535")
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setblocking(False)
            for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
            try:
                sock.bind(("::", port))
            except OSError as exc:
                raise OSError(exc.errno, f"cannot bind UDP port {port}: {exc.strerror}") from None
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self.gro = gro and self._try_setsockopt(SOL_UDP, UDP_GRO, 1)
        self.gso = gso and self._probe_gso()
        self._gso_warned = False
        self.fwmark = 0
        if fwmark:
            self.set_fwmark(fwmark)
        self._list_buf = bytearray()  # recv_batch's reads, allocated on first use
        self._to_sockaddr: dict[Endpoint, tuple] = {}
        self._from_sockaddr: dict[tuple[str, int], Endpoint] = {}
        self.counters: dict[str, int] = {
            "recv_calls": 0, "recv_datagrams": 0, "recv_errors": 0,
            "send_calls": 0, "send_datagrams": 0, "send_dropped_eagain": 0, "send_errors": 0,
            "gso_fallbacks": 0,
        }

    def _try_setsockopt(self, level: int, opt: int, value: int) -> bool:
        try:
            self._sock.setsockopt(level, opt, value)
        except OSError:
            return False
        return True

    def _probe_gso(self) -> bool:
        try:
            self._sock.getsockopt(SOL_UDP, UDP_SEGMENT)
        except OSError:
            return False
        return True

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> UDPBind:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_fwmark(self, mark: int) -> None:
        if not 0 <= mark <= 0xFFFFFFFF:
            raise ValueError(f"fwmark {mark} out of range")
        self._sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        self.fwmark = mark

    # -- receive --------------------------------------------------------------------------------------------
    def recv_batch(self, out: list, max_calls: int = 64) -> int:
        """Up to `max_calls` reads until EAGAIN; appends (datagram: bytes, endpoint); returns datagrams
        appended. (The list form of recv_packed, for callers that want objects.)"""
        if len(self._list_buf) < max_calls * RECV_BUFFER:
            self._list_buf = bytearray(max_calls * RECV_BUFFER)
        buf = self._list_buf
        chunks: list[int] = []
        endpoints: list = []
        self.recv_packed(buf, 0, len(buf) - RECV_BUFFER, chunks, endpoints, max_calls)
        count = 0
        for c, endpoint in enumerate(endpoints):
            pos, end, stride = chunks[3 * c], chunks[3 * c + 1], chunks[3 * c + 2]
            if pos == end:
                out.append((b"", endpoint))
                count += 1
            while pos < end:
                out.append((bytes(buf[pos:min(pos + stride, end)]), endpoint))
                pos += stride
                count += 1
        return count

    def recv_packed(self, buf: bytearray, cursor: int, limit: int, chunks: list[int], endpoints: list,
                    max_calls: int = 64) -> int:
        """Up to `max_calls` reads into buf[cursor:] (each up to RECV_BUFFER bytes) until EAGAIN or past
        `limit`; returns the cursor after the last read."""
        recvmsg_into = self._sock.recvmsg_into
        mv = memoryview(buf)
        anc = _GRO_CMSG_SPACE if self.gro else 0
        known = self._from_sockaddr
        counters = self.counters
        from_bytes = int.from_bytes
        calls = 0
        datagrams = 0
        while calls < max_calls and cursor <= limit:
            try:
                n, ancdata, _flags, addr = recvmsg_into([mv[cursor:cursor + RECV_BUFFER]], anc)
            except BlockingIOError:
                break
            except OSError:
                counters["recv_errors"] += 1
                calls += 1
                continue
            calls += 1
            key = (addr[0], addr[1])
            endpoint = known.get(key)
            if endpoint is None:
                endpoint = self._endpoint_of(key)
            stride = n
            if ancdata:
                for level, kind, data in ancdata:
                    if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
                        seg = from_bytes(data[:4] if len(data) >= 4 else data[:2], sys.byteorder)
                        if 0 < seg < n:
                            stride = seg
            if n == 0:
                stride = 1  # an empty datagram: one (too short) datagram, not an endless run
            chunks.append(cursor)
            chunks.append(cursor + n)
            chunks.append(stride)
            endpoints.append(endpoint)
            datagrams += -(-n // stride) if n else 1
            cursor += n
        counters["recv_calls"] += calls
        counters["recv_datagrams"] += datagrams
        return cursor

    def _endpoint_of(self, key: tuple[str, int]) -> Endpoint:
        host = key[0]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        elif "%" in host:
            host = host.split("%", 1)[0]
        endpoint = (host, key[1])
        if len(self._from_sockaddr) >= _ENDPOINT_CACHE_MAX:
            self._from_sockaddr.clear()
        self._from_sockaddr[key] = endpoint
        return endpoint

    # -- send -----------------------------------------------------------------------------------------------
    def _sockaddr(self, endpoint: Endpoint) -> tuple:
        addr = self._to_sockaddr.get(endpoint)
        if addr is None:
            host, port = endpoint
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"endpoint host {host!r} is not an IP address") from None
            if not 0 < port <= 65535:
                raise ValueError(f"endpoint port {port} out of range 1..65535")
            addr = (f"::ffff:{ip}" if ip.version == 4 else str(ip), port, 0, 0)
            if len(self._to_sockaddr) >= _ENDPOINT_CACHE_MAX:
                self._to_sockaddr.clear()
            self._to_sockaddr[endpoint] = addr
        return addr

    def send_batch(self, endpoint: Endpoint, datagrams: list) -> None:
        """Send datagrams (bytes-like) to one endpoint, batched as send_packed does."""
        self._sockaddr(endpoint)  # a malformed endpoint raises even for an empty batch
        if not datagrams:
            return
        buf, layout = pack(datagrams)
        self.send_packed(endpoint, buf, 0, layout[1::2], 0, len(datagrams))

    def send_packed(self, endpoint: Endpoint, buf: bytes | bytearray, offset: int, sizes, sizes_start: int,
                    count: int) -> None:
        """Send `count` datagrams lying back to back in buf from `offset` (sizes[sizes_start:]): each run of
        equal sizes (a shorter one may end it; at most 64 and 65507/65527 bytes) in one UDP_SEGMENT sendmsg."""
        if count <= 0:
            return
        addr = self._sockaddr(endpoint)
        counters = self.counters
        if count == 1:  # one datagram (the interactive case): one sendto, nothing to group
            size = sizes[sizes_start]
            try:
                self._sock.sendto(memoryview(buf)[offset:offset + size], addr)
            except BlockingIOError:
                counters["send_dropped_eagain"] += 1
                return
            except OSError:
                counters["send_errors"] += 1
                return
            counters["send_calls"] += 1
            counters["send_datagrams"] += 1
            return
        mv = memoryview(buf)
        if not self.gso:
            self._send_each(addr, self._slices(mv, offset, sizes, sizes_start, count))
            return
        limit = MAX_SEND_V4 if addr[0].startswith("::ffff:") else MAX_SEND_V6
        sendmsg = self._sock.sendmsg
        pack = struct.pack
        i = sizes_start
        stop = sizes_start + count
        pos = offset
        while i < stop:
            size = sizes[i]
            j = i + 1
            total = size
            while j < stop and j - i < MAX_SEGMENTS:
                length = sizes[j]
                if length > size or total + length > limit:
                    break
                total += length
                j += 1
                if length < size:
                    break
            try:
                if j - i == 1:
                    self._sock.sendto(mv[pos:pos + size], addr)
                else:
                    sendmsg([mv[pos:pos + total]], [(SOL_UDP, UDP_SEGMENT, pack("=H", size))], 0, addr)
            except BlockingIOError:
                counters["send_dropped_eagain"] += stop - i
                return
            except OSError as exc:
                if j - i > 1 and exc.errno in _GSO_REFUSALS:
                    self._disable_gso(exc)
                    rest = stop - i
                    self._send_each(addr, self._slices(mv, pos, sizes, i, rest))
                    return
                counters["send_errors"] += j - i
                i = j
                pos += total
                continue
            counters["send_calls"] += 1
            counters["send_datagrams"] += j - i
            i = j
            pos += total

    @staticmethod
    def _slices(mv: memoryview, offset: int, sizes, start: int, count: int) -> list:
        out = []
        for k in range(start, start + count):
            size = sizes[k]
            out.append(mv[offset:offset + size])
            offset += size
        return out

    def _disable_gso(self, exc: OSError) -> None:
        self.gso = False
        self.counters["gso_fallbacks"] += 1
        if not self._gso_warned:
            self._gso_warned = True
            log.warning("UDP port %d: segmented send refused (%s); sending one datagram per call",
                        self.port, exc.strerror)

    def _send_each(self, addr: tuple, datagrams: list) -> bool:
        """sendto per datagram; False when EAGAIN dropped the rest of the batch."""
        sendto = self._sock.sendto
        counters = self.counters
        sent = 0
        for k in range(len(datagrams)):
            try:
                sendto(datagrams[k], addr)
            except BlockingIOError:
                counters["send_dropped_eagain"] += len(datagrams) - k
                counters["send_calls"] += sent
                counters["send_datagrams"] += sent
                return False
            except OSError:
                counters["send_errors"] += 1
                continue
            sent += 1
        counters["send_calls"] += sent
        counters["send_datagrams"] += sent
        return True
