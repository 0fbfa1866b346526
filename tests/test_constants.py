"""One home for the wire constants: turbowg/wire.py. The C accelerator repeats a few of them (C cannot import
Python); these tests hold it to the same values, and the Python modules to importing rather than redefining."""

from __future__ import annotations

import re
import struct
from array import array
from pathlib import Path

import pytest

from turbowg import wire
from turbowg.noise import transport

AEAD_SOURCE = Path(transport.__file__).with_name("_aead.c")


def c_defines() -> dict[str, int]:
    defines = {}
    for name, value in re.findall(r"^#define\s+(\w+)\s+(\d+)u?\s*$", AEAD_SOURCE.read_text(), re.MULTILINE):
        defines[name] = int(value)
    return defines


def test_aead_source_defines_agree_with_wire() -> None:
    defines = c_defines()
    assert defines["MESSAGE_TRANSPORT"] == wire.MESSAGE_TRANSPORT
    assert defines["HEADER_SIZE"] == wire.TRANSPORT_HEADER_SIZE
    assert defines["TAG_SIZE"] == wire.AEAD_TAG_SIZE


@pytest.mark.skipif(not transport.HAVE_C, reason="C extension turbowg.noise._aead not built")
def test_c_sealed_message_has_the_wire_layout() -> None:
    packet = bytes(range(40))
    dst = bytearray(256)
    sizes = array("i", [0])
    written = transport.Aead(bytes(32)).seal_list([packet], dst, 0, 1420, 0x01020304, 7, sizes, 0)
    kind, receiver, counter = struct.unpack_from("<IIQ", dst)
    assert (kind, receiver, counter) == (wire.MESSAGE_TRANSPORT, 0x01020304, 7)
    padded = -(-len(packet) // wire.PADDING_MULTIPLE) * wire.PADDING_MULTIPLE
    assert written == sizes[0] == wire.TRANSPORT_HEADER_SIZE + padded + wire.AEAD_TAG_SIZE
    assert transport.OVERHEAD == wire.TRANSPORT_MIN_SIZE


def test_python_modules_import_the_wire_constants() -> None:
    from turbowg.device import constants
    from turbowg.noise import handshake

    for name in ("MESSAGE_INITIATION", "MESSAGE_TRANSPORT", "INITIATION_SIZE", "TRANSPORT_HEADER_SIZE"):
        assert not hasattr(constants, name), f"device/constants.py redefines {name}"
    assert handshake.MESSAGE_INITIATION is wire.MESSAGE_INITIATION
    assert transport.MESSAGE_TRANSPORT is wire.MESSAGE_TRANSPORT
