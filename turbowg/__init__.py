"""turbowg: a userspace WireGuard data plane and DERP relay."""

__version__ = "0.1.0"
