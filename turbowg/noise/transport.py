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
"""

from __future__ import annotations

import struct
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


try:
    if not accel.use_c():
        raise ImportError("TURBOWG_NO_C set")
    from turbowg.noise._aead import Aead
    from turbowg.noise._aead import ReplayWindow as CReplayWindow

    HAVE_C = True
except ImportError:
    Aead = PyAead  # type: ignore[assignment,misc]
    CReplayWindow = None  # the caller uses turbowg.device.replay.ReplayWindow
    HAVE_C = False

__all__ = ["Aead", "CReplayWindow", "HAVE_C", "OVERHEAD", "OpenResult", "PyAead", "padded_length"]
