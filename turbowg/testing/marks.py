"""pytest skip markers for tests that use this harness (imports pytest: only tests import this module)."""

from __future__ import annotations

import shutil

import pytest

from turbowg.testing.netns import can_use_netns

needs_netns = pytest.mark.skipif(not can_use_netns(), reason="needs root, iproute2 and /dev/net/tun")
needs_wireguard_go = pytest.mark.skipif(shutil.which("wireguard-go") is None or shutil.which("wg") is None,
                                        reason="needs wireguard-go and wireguard-tools")
needs_iperf3 = pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")
