"""Inner-packet checks of the receive path: is an opened plaintext an IP packet, and may it come from there?

The noise layer (`turbowg.noise.transport`) only authenticates and decrypts; routing is the device's. After
each `open_batch`, `receive.py` calls `check_inner_sources` on the plaintexts it recorded:

    check_inner_sources(buf, layout, start, count, allowed_src) -> InnerCheck(kept, bad_inner, src_mismatch)

`layout[2*start : 2*(start+count)]` holds (offset, padded plaintext length) int32 pairs. Packets whose inner
IPv4/IPv6 header is malformed are dropped (`bad_inner`); the others are compacted in place to
`layout[2*start : 2*(start+kept)]` as (offset, inner length: the padding cut off). `src_mismatch` counts kept
packets whose source address is not `allowed_src` (the 4- or 16-byte source last proved allowed for the
peer); the caller then looks every packet of the batch up in the allowed-IPs table.

The C version (`turbowg.device._route`, one call per batch, no object per packet) is used when built;
`check_inner_sources_py` below is the byte-identical fallback (`TURBOWG_NO_C=1` forces it).
"""

from __future__ import annotations

from array import array
from typing import NamedTuple

from turbowg import accel


class InnerCheck(NamedTuple):
    """What one check_inner_sources call did (the C version returns a struct sequence with these fields)."""

    kept: int
    bad_inner: int
    src_mismatch: int


def check_inner_sources_py(buf: bytearray, layout: array, start: int, count: int,
                           allowed_src: bytes) -> InnerCheck:
    for k in range(start, start + count):
        off, length = layout[2 * k], layout[2 * k + 1]
        if off < 0 or length < 0 or off + length > len(buf):
            raise BufferError("check_inner_sources: packet outside the buffer")
    kept = start
    bad_inner = mismatch = 0
    for k in range(start, start + count):
        off, plen = layout[2 * k], layout[2 * k + 1]
        version = buf[off] >> 4 if plen else 0
        if version == 4 and plen >= 20:
            inner, minimum, source = (buf[off + 2] << 8) | buf[off + 3], 20, buf[off + 12:off + 16]
        elif version == 6 and plen >= 40:
            inner, minimum, source = 40 + ((buf[off + 4] << 8) | buf[off + 5]), 40, buf[off + 8:off + 24]
        else:
            bad_inner += 1
            continue
        if not minimum <= inner <= plen:
            bad_inner += 1
            continue
        if source != allowed_src:
            mismatch += 1
        layout[2 * kept] = off
        layout[2 * kept + 1] = inner
        kept += 1
    return InnerCheck(kept - start, bad_inner, mismatch)


HAVE_C = False
check_inner_sources = check_inner_sources_py
if accel.use_c():
    try:
        from turbowg.device._route import check_inner_sources  # type: ignore[no-redef]

        HAVE_C = True
    except ImportError:  # the extension is optional (setup.py): the Python version gives the same results
        pass

__all__ = ["HAVE_C", "InnerCheck", "check_inner_sources", "check_inner_sources_py"]
