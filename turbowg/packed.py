"""The packed batch: packets back to back in one buffer, described by an int32 layout.

The data path (turbowg/device/send.py and receive.py, turbowg/tun/device.py, turbowg/conn/udp.py) moves
packets this way so that a batch costs no Python object per packet; `pack` turns a list of packets into that
form for the list APIs kept beside the packed ones.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable


def pack(packets: Iterable[bytes | bytearray | memoryview]) -> tuple[bytearray, array]:
    """(buffer, layout): packet k is buffer[layout[2k] : layout[2k] + layout[2k+1]]."""
    buf = bytearray()
    layout = array("i")
    for packet in packets:
        layout.append(len(buf))
        layout.append(len(packet))
        buf += packet
    return buf, layout
