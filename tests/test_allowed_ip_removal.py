"""`allowed_ip=-PREFIX`: one allowed IP removed, with wireguard-go's semantics, in the device and in a real turbowgd.

The `wg` on this machine (wireguard-tools v1.0.20210914) predates `allowed-ips -PREFIX`, so the daemon test
speaks raw UAPI text over the socket, as a newer `wg set wg0 peer X allowed-ips -10.0.0.0/24` would, and
reads the result back with the stock `wg show`.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import shutil

import pytest

from turbowg.device import Device
from turbowg.testing.daemon import turbowgd_in_namespace
from turbowg.uapi.protocol import parse_set

K1 = bytes([1]) * 32
K2 = bytes([2]) * 32
net = ipaddress.ip_network


def apply(device: Device, *lines: str) -> None:
    device.apply_update(parse_set(list(lines)))


def owned(device: Device, key: bytes) -> set[str]:
    return {str(n) for n in device.allowed_ips.entries_for_peer(device.peers[key])}


def test_device_removes_one_allowed_ip() -> None:
    device = Device()
    apply(device, f"public_key={K1.hex()}", "allowed_ip=10.0.0.0/24", "allowed_ip=10.0.1.0/24",
          "allowed_ip=fd00::/64", f"public_key={K2.hex()}", "allowed_ip=10.9.0.0/16")
    apply(device, f"public_key={K1.hex()}", "allowed_ip=-10.0.0.0/24", "allowed_ip=-fd00::1/64")
    assert owned(device, K1) == {"10.0.1.0/24"}
    assert owned(device, K2) == {"10.9.0.0/16"}
    assert device.allowed_ips.lookup(bytes([10, 0, 0, 5])) is None
    assert device.allowed_ips.lookup(bytes([10, 0, 1, 5])) is device.peers[K1]
    snapshot = {p.public_key: p.allowed_ips for p in device.snapshot().peers}
    assert snapshot[K1] == [net("10.0.1.0/24")]


def test_device_removal_touches_only_that_peers_exact_prefix() -> None:
    device = Device()
    apply(device, f"public_key={K1.hex()}", "allowed_ip=10.0.0.0/16", f"public_key={K2.hex()}",
          "allowed_ip=10.9.0.0/16")
    # Another peer's prefix, a longer or shorter prefix than the one held, an unknown prefix: no-ops.
    apply(device, f"public_key={K1.hex()}", "allowed_ip=-10.9.0.0/16", "allowed_ip=-10.0.0.0/24",
          "allowed_ip=-10.0.0.0/8", "allowed_ip=-192.0.2.0/24")
    assert owned(device, K1) == {"10.0.0.0/16"}
    assert owned(device, K2) == {"10.9.0.0/16"}


def test_device_removal_order_within_a_set() -> None:
    device = Device()
    apply(device, f"public_key={K1.hex()}", "allowed_ip=10.1.0.0/16", "allowed_ip=10.2.0.0/16")
    # Removed, then added again in the same section: present. Added, then removed: absent.
    apply(device, f"public_key={K1.hex()}", "allowed_ip=-10.1.0.0/16", "allowed_ip=10.1.0.0/16",
          "allowed_ip=10.3.0.0/16", "allowed_ip=-10.3.0.0/16")
    assert owned(device, K1) == {"10.1.0.0/16", "10.2.0.0/16"}
    # A removal for a peer the same set creates, or with update_only for an unknown peer: nothing happens.
    apply(device, f"public_key={K2.hex()}", "allowed_ip=-10.1.0.0/16")
    assert owned(device, K2) == set() and owned(device, K1) == {"10.1.0.0/16", "10.2.0.0/16"}


# ------------------------------------------------------------------------------------------------
# A real turbowgd, raw UAPI text in, stock `wg show` out
# ------------------------------------------------------------------------------------------------

needs_daemon = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("wg") is None
    or not os.path.exists("/dev/net/tun"), reason="needs root, iproute2, wg and /dev/net/tun")


@needs_daemon
def test_real_daemon_removes_one_allowed_ip() -> None:
    with turbowgd_in_namespace("twgaip") as d:
        peer = base64.b64encode(K1).decode()
        d.wg("set", d.ifname, "peer", peer, "allowed-ips", "10.0.0.0/24,10.0.1.0/24,fd00::/64")
        answer = d.uapi(f"set=1\npublic_key={K1.hex()}\nupdate_only=true\nallowed_ip=-10.0.0.0/24\n\n")
        assert answer == b"errno=0\n\n"
        shown = d.wg("show", d.ifname, "allowed-ips").stdout.split()
        assert shown[0] == peer and set(shown[1:]) == {"10.0.1.0/24", "fd00::/64"}
        # Removing what the peer does not hold is not an error, and changes nothing.
        assert d.uapi(f"set=1\npublic_key={K1.hex()}\nallowed_ip=-10.0.0.0/24\n\n") == b"errno=0\n\n"
        assert d.uapi(f"set=1\npublic_key={K1.hex()}\nallowed_ip=-nonsense\n\n") == b"errno=-22\n\n"
        shown = d.wg("show", d.ifname, "allowed-ips").stdout.split()
        assert set(shown[1:]) == {"10.0.1.0/24", "fd00::/64"}
