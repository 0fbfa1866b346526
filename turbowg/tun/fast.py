"""The one import point for the TUN offload hot paths: C (``turbowg.tun._offload``) when built, else Python.

Both implementations take whole batches through caller-owned buffers, with no Python object per packet on
the C side, and give byte-identical results:

- ``ingest(frame, frame_len, dst, dst_off, layout, idx) -> (count, next_off)``: one TUN read with a
  virtio-net header (``frame[:frame_len]``) becomes ``count`` plain IP packets written back to back into
  ``dst`` from ``dst_off``: a GSO monster is split (``gso.split``), a NEEDS_CSUM packet gets its checksum
  completed (``gso.finish_checksum``), anything else is copied. Packet k is recorded in the native int32
  buffer ``layout`` as ``layout[2*(idx+k)] = offset in dst`` and ``layout[2*(idx+k)+1] = length``;
  ``next_off`` is the dst offset just after the last packet.
- ``coalesce(src, layout, count, dst, frames, tcp, udp) -> nframes``: GRO. Packet k is
  ``src[layout[2k]:layout[2k]+layout[2k+1]]``; they are grouped as ``gro.coalesce(packets, tcp=tcp,
  udp=udp)`` does and frame j (``b"".join(gro.frame_iov(group_j))``: virtio header + packet) is written to
  ``dst`` back to back from offset 0 and recorded as ``frames[2j] = offset``, ``frames[2j+1] = length``.

Errors: malformed input (everything ``gso.MalformedPacket`` covers, a frame shorter than the virtio header,
``frame_len`` beyond the frame, a layout entry outside ``src``, negative offsets/counts) raises
``ValueError``; output that would not fit ``dst`` / ``layout`` / ``frames`` raises ``BufferError`` before
anything is written; wrong argument types (including read-only output buffers) raise ``TypeError``.

``TURBOWG_NO_C=1`` in the environment (read once, at import) forces the Python versions.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

from turbowg import accel

from . import vnet
from .gro import coalesce as _gro_coalesce
from .gro import frame_iov
from .gso import MalformedPacket, finish_checksum, split

__all__ = ["HAVE_C", "coalesce", "coalesce_py", "ingest", "ingest_py"]

_INT32_MAX = 2**31 - 1
_index = operator.index


def _readable(obj: object, name: str) -> memoryview:
    try:
        mv = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be a contiguous buffer, not {type(obj).__name__}") from None
    if not mv.c_contiguous:
        raise TypeError(f"{name} must be a contiguous buffer")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _writable(obj: object, name: str) -> memoryview:
    mv = _readable(obj, name)
    if mv.readonly:
        raise TypeError(f"{name} must be a writable contiguous buffer, not {type(obj).__name__}")
    return mv


def _int32_table(mv: memoryview) -> memoryview:
    """The buffer as native int32 entries (a trailing partial entry is ignored, as in C)."""
    return mv[:mv.nbytes // 4 * 4].cast("i")


def ingest_py(frame: object, frame_len: int, dst: object, dst_off: int, layout: object,
              idx: int) -> tuple[int, int]:
    """Pure-Python ``ingest`` (see the module docstring), built on gso.split / gso.finish_checksum."""
    frame_len, dst_off, idx = _index(frame_len), _index(dst_off), _index(idx)
    fmv = _readable(frame, "frame")
    out = _writable(dst, "dst")
    table = _int32_table(_writable(layout, "layout"))
    if frame_len < vnet.VNET_HDR_LEN:
        raise ValueError("frame shorter than the virtio header")
    if frame_len > fmv.nbytes:
        raise ValueError("frame_len beyond the frame")
    if dst_off < 0 or idx < 0:
        raise ValueError("negative dst_off or idx")
    if dst_off > out.nbytes or idx > len(table) // 2:
        raise BufferError("no room in dst" if dst_off > out.nbytes else "no room in layout")
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = vnet.unpack_from(fmv, 0)
    pkt = fmv[vnet.VNET_HDR_LEN:frame_len]
    try:
        segs: list = []
        try:
            if gso_type != vnet.GSO_NONE:
                split(pkt, gso_type, gso_size, csum_start, segs)
            elif flags & vnet.NEEDS_CSUM:
                segs.append(finish_checksum(pkt, csum_start, csum_offset))
            else:
                segs.append(pkt)
        except MalformedPacket as exc:
            raise ValueError(str(exc)) from None
        end = dst_off + sum(len(s) for s in segs)
        if end > out.nbytes or end > _INT32_MAX:
            raise BufferError("no room in dst")
        if 2 * (idx + len(segs)) > len(table):
            raise BufferError("no room in layout")
        pos = dst_off
        slot = 2 * idx
        for seg in segs:
            n = len(seg)
            out[pos:pos + n] = seg
            table[slot] = pos
            table[slot + 1] = n
            slot += 2
            pos += n
        return len(segs), pos
    finally:
        pkt.release()


def coalesce_py(src: object, layout: object, count: int, dst: object, frames: object, tcp: bool,
                udp: bool) -> int:
    """Pure-Python ``coalesce`` (see the module docstring), built on gro.coalesce / gro.frame_iov."""
    count = _index(count)
    tcp, udp = bool(tcp), bool(udp)
    smv = _readable(src, "src")
    lay = _int32_table(_readable(layout, "layout"))
    out = _writable(dst, "dst")
    table = _int32_table(_writable(frames, "frames"))
    if count < 0:
        raise ValueError("negative count")
    if count > len(lay) // 2 or count > _INT32_MAX // 2:
        raise ValueError("count beyond the layout")
    packets = []
    for k in range(count):
        off, n = lay[2 * k], lay[2 * k + 1]
        if off < 0 or n < 0 or off + n > smv.nbytes:
            raise ValueError(f"packet {k} lies outside src")
        packets.append(smv[off:off + n])
    if not packets:
        return 0
    iovs = [frame_iov(g) for g in _gro_coalesce(packets, tcp=tcp, udp=udp)]
    need = sum(len(b) for iov in iovs for b in iov)
    if need > out.nbytes or need > _INT32_MAX:
        raise BufferError("no room in dst")
    if 2 * len(iovs) > len(table):
        raise BufferError("no room in frames")
    pos = 0
    for j, iov in enumerate(iovs):
        start = pos
        for b in iov:
            n = len(b)
            out[pos:pos + n] = b
            pos += n
        table[2 * j] = start
        table[2 * j + 1] = pos - start
    return len(iovs)


IngestFn = Callable[[object, int, object, int, object, int], tuple[int, int]]
CoalesceFn = Callable[[object, object, int, object, object, bool, bool], int]

ingest: IngestFn = ingest_py
coalesce: CoalesceFn = coalesce_py
HAVE_C = False

if accel.use_c():  # TURBOWG_NO_C forces the Python versions
    try:
        from . import _offload
    except ImportError:  # extension not built (optional in setup.py)
        pass
    else:
        ingest = _offload.ingest
        coalesce = _offload.coalesce
        HAVE_C = True
