"""turbowg.device: the WireGuard device core (sans-IO) and its runtime."""

from turbowg.device.core import Device, Outgoing, Transmit

__all__ = ["Device", "Outgoing", "Transmit"]
