"""Preshared keys against Debian wireguard-go: with the same key on both sides the handshake completes
whichever side initiates; with different keys (or a key on one side only) it never does, in either
direction. A device that ignored its preshared key fails both kinds of test: it cannot complete a
handshake with a peer that mixes the key in, and it does complete one when only it has a key."""

from __future__ import annotations

import shutil

import pytest

from turbowg.testing.marks import needs_netns
from turbowg.testing.tunnel import genpsk, latest_handshake, ping, transfer, tunnel

pytestmark = [needs_netns, pytest.mark.netns,
              pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs Debian wireguard-go")]

INITIATORS = ["turbowg", "wireguard-go"]


def _psk_shown(side) -> str:
    """The preshared key `wg show IF preshared-keys` reports for the (only) peer ("(none)" if none)."""
    return side.wg("show", side.ifname, "preshared-keys").stdout.split()[1]


@pytest.mark.parametrize("initiator", INITIATORS)
def test_same_psk_interoperates(initiator: str, tmp_path) -> None:
    # Only the initiator knows the other's endpoint, so it must be the one that starts the handshake.
    endpoints = "a" if initiator == "turbowg" else "b"
    with tunnel("turbowg", "wireguard-go", endpoints=endpoints, psk=True, tmp_path=str(tmp_path)) as tun:
        first, second = (tun.a, tun.b) if initiator == "turbowg" else (tun.b, tun.a)
        assert tun.a.psk and tun.a.psk == tun.b.psk
        assert _psk_shown(tun.a) == _psk_shown(tun.b) == tun.a.psk  # both devices hold the key
        assert latest_handshake(tun.a) == latest_handshake(tun.b) == 0
        assert ping(first, second.inner_ip), f"{initiator} could not reach its peer with a shared PSK"
        assert ping(second, first.inner_ip) and ping(first, second.inner_ip6)
        assert latest_handshake(tun.a) > 0 and latest_handshake(tun.b) > 0
        assert all(n > 0 for n in transfer(tun.a) + transfer(tun.b))


@pytest.mark.parametrize("mismatch", ["turbowg-only", "different"])
@pytest.mark.parametrize("initiator", INITIATORS)
def test_mismatched_psk_never_handshakes(initiator: str, mismatch: str, tmp_path) -> None:
    endpoints = "a" if initiator == "turbowg" else "b"
    psk_a = genpsk()  # turbowg's
    psk_b = None if mismatch == "turbowg-only" else genpsk()
    with tunnel("turbowg", "wireguard-go", endpoints=endpoints, psk_a=psk_a, psk_b=psk_b,
                tmp_path=str(tmp_path)) as tun:
        first, second = (tun.a, tun.b) if initiator == "turbowg" else (tun.b, tun.a)
        assert _psk_shown(tun.a) == psk_a and _psk_shown(tun.b) == (psk_b or "(none)")
        # Two handshake attempts (wireguard-go and turbowg retry every 5 s) and none may complete.
        assert not ping(first, second.inner_ip, count=1, timeout=8), "a ping crossed despite mismatched PSKs"
        assert latest_handshake(tun.a) == 0 and latest_handshake(tun.b) == 0
        # The responder did get the initiations: it is the keys, not the network, that keep them apart.
        assert transfer(second)[0] > 0 or transfer(first)[0] > 0
