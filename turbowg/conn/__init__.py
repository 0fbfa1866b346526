"""turbowg.conn: the UDP side of the data plane: endpoints (endpoint.py) and the socket (udp.py, see its API).

`UDPBind` is imported lazily so that the sans-IO device core can use the endpoint helpers without pulling in
the socket layer.
"""

from __future__ import annotations

from typing import Any

from .endpoint import Endpoint, canonical_endpoint, cookie_source

__all__ = ["Endpoint", "UDPBind", "canonical_endpoint", "cookie_source"]


def __getattr__(name: str) -> Any:
    if name == "UDPBind":
        from .udp import UDPBind

        return UDPBind
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
