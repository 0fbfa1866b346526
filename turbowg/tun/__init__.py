"""turbowg.tun: TUN device I/O with virtio-net offloads.

- device.py: ``open_tun(name, *, vnet_hdr=True, mtu=None) -> TunDevice`` (read_batch / write_batch; see there)
- vnet.py: the 10-byte virtio-net header
- gso.py: split GSO monsters into wire packets; finish partial checksums
- gro.py: coalesce packets per flow into monsters for writing
- checksum.py: fast Internet checksums
"""

from .device import TunDevice, TunError, TunGone, open_tun

__all__ = ["TunDevice", "TunError", "TunGone", "open_tun"]
