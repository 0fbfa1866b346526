"""Transport-message AEAD in batches: the one import point for sealing and opening type-4 messages.

`Aead(key)` is the C version from `turbowg.noise._aead` when that extension is built, else `PyAead` below
(same signatures, same results, same bytes left in the buffers; `TURBOWG_NO_C=1` forces Python). The C `open_batch` needs the C replay window
(`CReplayWindow`); the Python one takes any object with `accept(counter)` (turbowg/device/replay.py). Buffers:
`layout`, `sizes` and `out_layout` are writable native int32 buffers (`array('i')`); a packet k of a layout is
``src[layout[2k] : layout[2k] + layout[2k+1]]``.

- ``seal_batch(src, layout, start, count, dst, dst_off, mtu, receiver, counter, sizes, sizes_idx) -> int``:
  seal packets start..start+count-1 into consecutive messages at dst[dst_off:] (header, padded ciphertext,
  tag) with counters counter, counter+1, ...; message sizes go to sizes[sizes_idx:]; returns bytes written.
- ``seal_list(packets, dst, dst_off, mtu, receiver, counter, sizes, sizes_idx) -> int``: the same for a list.
- ``open_batch(buf, off, end, stride, receiver, replay, out_layout, out_idx) -> OpenResult``: authenticate and
  decrypt the transport messages for `receiver` at off, off+stride, ... < end in place, check their counters
  against `replay`, and record each authentic non-empty plaintext (padding included) in
  out_layout[2 * out_idx:] as (offset, length). Stops before the first datagram that is not a transport
  message for `receiver`. A message that fails authentication is left as it came (no unauthenticated
  plaintext ever stays in `buf`). What the plaintexts are and whether they may come from that peer is the
  device's business (turbowg/device/route.py), not cryptography's.

The lone-packet path (one packet per wake, the interactive case) does a crossing's whole work in one call:

- ``seal_sendto(fd, src, off, length, mtu, receiver, counter, dst, sockaddr) -> int``: seal one packet into
  dst[0:] and sendto(fd) it to `sockaddr` (packed struct sockaddr, see `pack_sockaddr`); returns the
  message size, or -errno when the send failed (the message is sealed and the counter used all the same).
- ``open_write(buf, off, length, receiver, replay, allowed_src, tun_fd, prefix, layout) -> int``: open the
  one message at buf[off:off+length] in place, replay-check it, check its inner header and source (as
  route.check_inner_sources), and write it to the TUN with writev(tun_fd, [prefix, packet]); returns an
  `OW_*` code, or -errno when the TUN write failed. layout[0:2] gets (offset, inner length) of a kept packet.
- ``recv_one(fd, buf, off, cap, addr) -> int`` (C only, None without it): one recvmsg into buf[off:off+cap]
  with the sender's sockaddr in `addr`: n, n | segment << 32 for a UDP_GRO batch, or -errno. Without C the
  runtime reads through UDPBind.recv_packed, which gives the same datagram and sender.
- ``spin_poll(fd_a, fd_b, usec) -> int``: busy-poll both fds (poll with a zero timeout, in a loop) for up to
  `usec` microseconds: the first fd found readable (fd_a when both are), -1 when none was in time, -errno
  when poll failed. `py_spin_poll` is the pure-Python twin (same answers; a turn costs more).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
import time
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from turbowg import accel
from turbowg.wire import AEAD_TAG_SIZE, MESSAGE_TRANSPORT, REJECT_AFTER_MESSAGES, TRANSPORT_HEADER_SIZE

HEADER_SIZE = TRANSPORT_HEADER_SIZE
OVERHEAD = TRANSPORT_HEADER_SIZE + AEAD_TAG_SIZE

_HEADER = struct.Struct("<IIQ")
_NONCE = struct.Struct("<Q")


def padded_length(length: int, mtu: int) -> int:
    """Plaintext length after WireGuard's zero padding (to 16 bytes, never past the MTU)."""
    last = length % mtu if length > mtu else length
    padded_last = (last + 15) & ~15
    if padded_last > mtu:
        padded_last = mtu
    return length + padded_last - last


# open_write's answers (the same numbers in _aead.c); a failed TUN write is -errno instead.
OW_WRITTEN, OW_KEEPALIVE, OW_AUTH_FAIL, OW_REPLAY, OW_EXPIRED, OW_BAD_INNER, OW_MISMATCH, OW_NOT_MINE = range(8)


def pack_sockaddr(host: str, port: int) -> bytes:
    """The struct sockaddr_in6 an AF_INET6 (dual-stack) socket sends to for (host, port), IPv4 mapped."""
    try:
        raw = socket.inet_pton(socket.AF_INET, host)
        raw = b"\0" * 10 + b"\xff\xff" + raw
    except OSError:
        raw = socket.inet_pton(socket.AF_INET6, host)
    if not 0 < port <= 65535:
        raise ValueError(f"port {port} out of range 1..65535")
    return struct.pack("=H", socket.AF_INET6) + struct.pack("!HI16sI", port, 0, raw, 0)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.sendto.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
_libc.sendto.restype = ctypes.c_ssize_t


def _sendto_fd(fd: int, data: bytes, sockaddr: bytes) -> int:
    """sendto(2) on a bare fd (the C version's call): bytes sent, or -errno."""
    while True:
        sent = _libc.sendto(fd, data, len(data), 0, sockaddr, len(sockaddr))
        if sent >= 0:
            return sent
        err = ctypes.get_errno()
        if err != errno.EINTR:
            return -err


class OpenResult(NamedTuple):
    """What one open_batch call did (the C version returns a struct sequence with the same fields)."""

    end: int  # offset where opening stopped: the first datagram not opened, or the end
    count: int  # plaintexts recorded in out_layout
    auth_fail: int  # messages whose tag did not verify (left as they were)
    replay: int  # authentic messages refused by the replay window
    expired: int  # messages with a counter past REJECT_AFTER_MESSAGES
    keepalive: int  # authentic empty messages
    rx_bytes: int  # bytes of the authentic messages, headers included
    authenticated: int  # messages that verified and passed the replay window
    max_counter: int  # highest counter among the authenticated messages


class PyAead:
    """Pure-Python `Aead`: one ChaCha20-Poly1305 key, batch calls as the C version."""

    __slots__ = ("_cipher", "_nonce")

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("key must be 32 bytes")
        self._cipher = ChaCha20Poly1305(bytes(key))
        self._nonce = bytearray(12)

    def _seal(self, packet, dst: memoryview, cur: int, mtu: int, receiver: int, counter: int) -> int:
        length = len(packet)
        padded = padded_length(length, mtu)
        end = cur + OVERHEAD + padded
        if end > len(dst):
            raise BufferError("seal: no room in the destination buffer")
        _HEADER.pack_into(dst, cur, MESSAGE_TRANSPORT, receiver, counter)
        _NONCE.pack_into(self._nonce, 4, counter)
        plain = bytearray(padded)
        plain[:length] = packet
        self._cipher.encrypt_into(self._nonce, plain, None, dst[cur + HEADER_SIZE:end])
        return OVERHEAD + padded

    def seal_batch(self, src, layout, start: int, count: int, dst, dst_off: int, mtu: int, receiver: int,
                   counter: int, sizes, sizes_idx: int) -> int:
        smv = memoryview(src)
        dmv = memoryview(dst)
        cur = dst_off
        for k in range(count):
            off, length = layout[2 * (start + k)], layout[2 * (start + k) + 1]
            if off < 0 or off + length > len(smv):
                raise BufferError("seal_batch: packet outside the source buffer")
            size = self._seal(smv[off:off + length], dmv, cur, mtu, receiver, counter + k)
            sizes[sizes_idx + k] = size
            cur += size
        return cur - dst_off

    def seal_list(self, packets: list, dst, dst_off: int, mtu: int, receiver: int, counter: int, sizes,
                  sizes_idx: int) -> int:
        dmv = memoryview(dst)
        cur = dst_off
        for k, packet in enumerate(packets):
            size = self._seal(packet, dmv, cur, mtu, receiver, counter + k)
            sizes[sizes_idx + k] = size
            cur += size
        return cur - dst_off

    def seal_sendto(self, fd: int, src, off: int, length: int, mtu: int, receiver: int, counter: int, dst,
                    sockaddr: bytes) -> int:
        if off < 0 or length < 0 or off + length > len(src):
            raise BufferError("seal_sendto: packet outside the source buffer")
        size = self._seal(memoryview(src)[off:off + length], memoryview(dst), 0, mtu, receiver, counter)
        sent = _sendto_fd(fd, bytes(dst[:size]), sockaddr)
        return sent if sent < 0 else size

    def open_write(self, buf, off: int, length: int, receiver: int, replay, allowed_src: bytes, tun_fd: int,
                   prefix: bytes, layout) -> int:
        if off < 0 or length < 0 or off + length > len(buf):
            raise BufferError("open_write: range out of the buffer")
        opened = self.open_batch(buf, off, off + length, max(length, 1), receiver, replay, layout, 0)
        if opened.end == off:
            return OW_NOT_MINE
        if opened.expired:
            return OW_EXPIRED
        if opened.auth_fail:
            return OW_AUTH_FAIL
        if opened.replay:
            return OW_REPLAY
        if opened.keepalive:
            return OW_KEEPALIVE
        body, plen = layout[0], layout[1]
        version = buf[body] >> 4
        if version == 4 and plen >= 20:
            inner, minimum, source = (buf[body + 2] << 8) | buf[body + 3], 20, buf[body + 12:body + 16]
        elif version == 6 and plen >= 40:
            inner, minimum, source = 40 + ((buf[body + 4] << 8) | buf[body + 5]), 40, buf[body + 8:body + 24]
        else:
            return OW_BAD_INNER
        if not minimum <= inner <= plen:
            return OW_BAD_INNER
        layout[1] = inner
        if source != allowed_src:
            return OW_MISMATCH
        packet = memoryview(buf)[body:body + inner]
        try:
            os.writev(tun_fd, [prefix, packet] if prefix else [packet])
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        return OW_WRITTEN

    def open_batch(self, buf, off: int, end: int, stride: int, receiver: int, replay, out_layout,
                   out_idx: int) -> OpenResult:
        mv = memoryview(buf)
        out_cap = len(out_layout) // 2
        auth_fail = replay_n = expired = keepalive = rx_bytes = authenticated = max_counter = 0
        n_out = 0
        nonce = self._nonce
        pos = off
        while pos < end:
            length = min(stride, end - pos)
            if length < OVERHEAD:
                break
            kind, index, counter = _HEADER.unpack_from(mv, pos)
            if kind != MESSAGE_TRANSPORT or index != receiver or out_idx + n_out >= out_cap:
                break
            start = pos
            pos += stride
            if counter >= REJECT_AFTER_MESSAGES:
                expired += 1
                continue
            _NONCE.pack_into(nonce, 4, counter)
            body = start + HEADER_SIZE
            try:
                plain = self._cipher.decrypt(nonce, mv[body:start + length], None)
            except InvalidTag:
                auth_fail += 1  # the buffer keeps the forged bytes as they came
                continue
            plen = len(plain)
            # Authentic: the plaintext replaces the ciphertext (a replayed one too, as the C version leaves it).
            mv[body:body + plen] = plain
            if not replay.accept(counter):
                replay_n += 1
                continue
            authenticated += 1
            rx_bytes += length
            max_counter = max(max_counter, counter)
            if plen == 0:
                keepalive += 1
                continue
            out_layout[2 * (out_idx + n_out)] = body
            out_layout[2 * (out_idx + n_out) + 1] = plen
            n_out += 1
        return OpenResult(min(pos, end), n_out, auth_fail, replay_n, expired, keepalive, rx_bytes, authenticated,
                          max_counter)


def py_spin_poll(fd_a: int, fd_b: int, usec: int) -> int:
    """spin_poll without C: the same loop of zero-timeout polls, in Python."""
    poller = select.poll()
    for fd in (fd_a, fd_b):
        if fd >= 0:
            poller.register(fd, select.POLLIN)
    wanted = select.POLLIN | select.POLLERR | select.POLLHUP
    clock = time.monotonic_ns
    deadline = clock() + max(usec, 0) * 1000
    while True:
        try:
            events = dict(poller.poll(0))
        except InterruptedError:
            events = {}
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        if events:
            if fd_a >= 0 and events.get(fd_a, 0) & wanted:
                return fd_a
            if fd_b >= 0 and events.get(fd_b, 0) & wanted:
                return fd_b
            if any(ev & select.POLLNVAL for ev in events.values()):
                return -errno.EBADF
        if clock() >= deadline:
            return -1


try:
    if not accel.use_c():
        raise ImportError("TURBOWG_NO_C set")
    from turbowg.noise._aead import Aead, recv_one, spin_poll
    from turbowg.noise._aead import ReplayWindow as CReplayWindow

    HAVE_C = True
except ImportError:
    Aead = PyAead  # type: ignore[assignment,misc]
    CReplayWindow = None  # the caller uses turbowg.device.replay.ReplayWindow
    recv_one = None
    spin_poll = py_spin_poll
    HAVE_C = False

__all__ = [
    "OW_AUTH_FAIL", "OW_BAD_INNER", "OW_EXPIRED", "OW_KEEPALIVE", "OW_MISMATCH", "OW_NOT_MINE", "OW_REPLAY",
    "OW_WRITTEN", "Aead", "CReplayWindow", "HAVE_C", "OVERHEAD", "OpenResult", "PyAead", "pack_sockaddr",
    "padded_length", "py_spin_poll", "recv_one", "spin_poll",
]
