"""turbowg.device: the sans-IO WireGuard device core (no sockets, no event loop: turbowg/daemon runs it)."""

from turbowg.device.device import Device
from turbowg.device.output import Outgoing, PackedTransmit, Transmit

__all__ = ["Device", "Outgoing", "PackedTransmit", "Transmit"]
