"""What the device core hands back to the runtime: datagrams to send, grouped per endpoint."""

from __future__ import annotations

from dataclasses import dataclass

from turbowg.conn.endpoint import Endpoint


@dataclass(slots=True)
class Transmit:
    """Datagrams (bytes or bytearray) to send to one endpoint, in order."""

    endpoint: Endpoint
    datagrams: list[bytes | bytearray]


@dataclass(slots=True)
class PackedTransmit:
    """Sealed messages to one endpoint lying back to back in `Device.tx_buffer`.

    `count` messages, `nbytes` in all, from byte `offset`; their sizes are `Device.tx_sizes[sizes_start:]`."""

    endpoint: Endpoint
    offset: int
    nbytes: int
    sizes_start: int
    count: int


# DESIGN.md calls the same thing "Outgoing".
Outgoing = Transmit

# Datagrams being collected per endpoint during one call (turned into Transmits at its end).
Out = dict[Endpoint, list]


def transmits(out: Out) -> list[Transmit]:
    return [Transmit(endpoint, datagrams) for endpoint, datagrams in out.items()]


def add_datagram(out: Out, endpoint: Endpoint, datagram: bytes | bytearray) -> None:
    datagrams = out.get(endpoint)
    if datagrams is None:
        out[endpoint] = [datagram]
    else:
        datagrams.append(datagram)
