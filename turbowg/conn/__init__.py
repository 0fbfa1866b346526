"""turbowg.conn: the UDP socket of the data plane (see udp.py for the API)."""

from .udp import Endpoint, UDPBind

__all__ = ["Endpoint", "UDPBind"]
