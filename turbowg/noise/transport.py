"""Transport-message AEAD in batches: the one import point for sealing and opening type-4 messages.

`Aead(key)` is the C version from `turbowg.noise._aead` when that extension is built, else `PyAead` below
(same signatures, same bytes; `TURBOWG_NO_C=1` forces Python). The C `open_batch` needs the C replay window
(`CReplayWindow`); the Python one takes any object with `accept(counter)` (turbowg/device/replay.py). Buffers:
`layout`, `sizes` and `out_layout` are writable native int32 buffers (`array('i')`); a packet k of a layout is
``src[layout[2k] : layout[2k] + layout[2k+1]]``.

- ``seal_batch(src, layout, start, count, dst, dst_off, mtu, receiver, counter, sizes, sizes_idx) -> int``:
  seal packets start..start+count-1 into consecutive messages at dst[dst_off:] (header, padded ciphertext,
  tag) with counters counter, counter+1, ...; message sizes go to sizes[sizes_idx:]; returns bytes written.
- ``seal_list(packets, dst, dst_off, mtu, receiver, counter, sizes, sizes_idx) -> int``: the same for a list.
- ``open_batch(buf, off, end, stride, receiver, replay, allowed_src, out_layout, out_idx) -> tuple``: open the
  datagrams at off, off+stride, ... < end in place; see `_aead.c` for the result tuple.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

MESSAGE_TRANSPORT = 4
HEADER_SIZE = 16
OVERHEAD = 32
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1

_HEADER = struct.Struct("<IIQ")
_NONCE = struct.Struct("<Q")


def padded_length(length: int, mtu: int) -> int:
    """Plaintext length after WireGuard's zero padding (to 16 bytes, never past the MTU)."""
    last = length % mtu if length > mtu else length
    padded_last = (last + 15) & ~15
    if padded_last > mtu:
        padded_last = mtu
    return length + padded_last - last


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

    def open_batch(self, buf, off: int, end: int, stride: int, receiver: int, replay, allowed_src: bytes,
                   out_layout, out_idx: int) -> tuple[int, ...]:
        mv = memoryview(buf)
        out_cap = len(out_layout) // 2
        auth_fail = replay_n = expired = keepalive = bad_inner = mismatch = rx_bytes = authenticated = 0
        max_counter = 0
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
                auth_fail += 1
                continue
            if not replay.accept(counter):
                replay_n += 1
                continue
            authenticated += 1
            rx_bytes += length
            max_counter = max(max_counter, counter)
            plen = len(plain)
            mv[body:body + plen] = plain
            if plen == 0:
                keepalive += 1
                continue
            version = plain[0] >> 4
            if version == 4 and plen >= 20:
                inner, minimum, source = (plain[2] << 8) | plain[3], 20, plain[12:16]
            elif version == 6 and plen >= 40:
                inner, minimum, source = 40 + ((plain[4] << 8) | plain[5]), 40, plain[8:24]
            else:
                bad_inner += 1
                continue
            if not minimum <= inner <= plen:
                bad_inner += 1
                continue
            if source != allowed_src:
                mismatch += 1
            out_layout[2 * (out_idx + n_out)] = body
            out_layout[2 * (out_idx + n_out) + 1] = inner
            n_out += 1
        return (min(pos, end), n_out, auth_fail, replay_n, expired, keepalive, bad_inner, mismatch, rx_bytes,
                authenticated, max_counter)


_FORCE_PY = os.environ.get("TURBOWG_NO_C", "").strip() not in ("", "0")
try:
    if _FORCE_PY:
        raise ImportError("TURBOWG_NO_C set")
    from turbowg.noise._aead import Aead
    from turbowg.noise._aead import ReplayWindow as CReplayWindow

    HAVE_C = True
except ImportError:
    Aead = PyAead  # type: ignore[assignment,misc]
    CReplayWindow = None  # the caller uses turbowg.device.replay.ReplayWindow
    HAVE_C = False

__all__ = ["Aead", "CReplayWindow", "PyAead", "HAVE_C", "padded_length", "OVERHEAD"]
