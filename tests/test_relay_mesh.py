"""Two relays meshed over loopback: clients on different relays reach each other; PeerGone crosses the mesh."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from derp_traffic import exchange

from turbowg.derp import keys
from turbowg.derp.client import DerpClient
from turbowg.derp.codec import PeerGone
from turbowg.relay.http import RelayHTTPProtocol
from turbowg.relay.mesh import MeshConfigError, PeerAddress, start_mesh
from turbowg.relay.server import DerpServer

MESH_KEY = "ab" * 32


async def _listen(server: DerpServer) -> tuple[asyncio.Server, int]:
    listener = await asyncio.get_running_loop().create_server(
        lambda: RelayHTTPProtocol(server), "127.0.0.1", 0, family=socket.AF_INET
    )
    return listener, listener.sockets[0].getsockname()[1]


async def _until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_meshed_relays_carry_100k_packets_and_peer_gone() -> None:
    async def scenario() -> None:
        relay1 = DerpServer(keys.generate_private_key(), mesh_key=MESH_KEY)
        relay2 = DerpServer(keys.generate_private_key(), mesh_key=MESH_KEY)
        (l1, port1), (l2, port2) = await _listen(relay1), await _listen(relay2)
        peers = [f"127.0.0.1:{port1}", f"127.0.0.1:{port2}"]
        # Each relay gets the whole region list and skips itself by name, as derper's --mesh-with.
        mesh1 = await start_mesh(relay1, MESH_KEY, peers, f"127.0.0.1:{port1}", tls=False)
        mesh2 = await start_mesh(relay2, MESH_KEY, peers, f"127.0.0.1:{port2}", tls=False)
        assert len(mesh1.peers) == len(mesh2.peers) == 1
        a, b = DerpClient(), DerpClient()
        try:
            await mesh1.wait_connected(10)
            await mesh2.wait_connected(10)
            await a.connect(host="127.0.0.1", port=port1, tls=False)
            await b.connect(host="127.0.0.1", port=port2, tls=False)
            await _until(lambda: b.public_key in relay1.forwarder_keys(), 10, "relay 1 to learn B")
            await _until(lambda: a.public_key in relay2.forwarder_keys(), 10, "relay 2 to learn A")
            assert a.public_key not in relay1.forwarder_keys()  # local clients are not forwarded

            await exchange(a, b, 100_000)
            assert relay1.metrics.packets_forwarded_out >= 100_000
            assert relay2.metrics.packets_forwarded_in >= 100_000
            assert relay1.metrics.total_dropped() == relay2.metrics.total_dropped() == 0

            await b.close()
            await _until(lambda: b.public_key not in relay1.forwarder_keys(), 10, "relay 1 to forget B")
            async with asyncio.timeout(10):
                while True:
                    msg = await a.recv()
                    if isinstance(msg, PeerGone) and msg.peer == b.public_key:
                        break
        finally:
            await a.close()
            await b.close()
            await mesh1.close()
            await mesh2.close()
            relay1.close()
            relay2.close()
            l1.close()
            l2.close()

    asyncio.run(scenario())


@contextlib.asynccontextmanager
async def one_way_mesh(relay2_mesh_key: str = MESH_KEY) -> AsyncIterator[tuple[DerpServer, DerpServer, Any, int, DerpClient]]:
    """Relay 1 meshed to relay 2 (listening on a free port), and a client B not yet connected:
    (relay1, relay2, relay 1's mesh, relay 2's port, B). All closed on exit."""
    relay1 = DerpServer(keys.generate_private_key(), mesh_key=MESH_KEY)
    relay2 = DerpServer(keys.generate_private_key(), mesh_key=relay2_mesh_key)
    l2, port2 = await _listen(relay2)
    mesh1 = await start_mesh(relay1, MESH_KEY, [f"127.0.0.1:{port2}"], "relay1", tls=False)
    b = DerpClient()
    try:
        yield relay1, relay2, mesh1, port2, b
    finally:
        await b.close()
        await mesh1.close()
        relay1.close()
        relay2.close()
        l2.close()


def test_mesh_link_reconnects_after_relay_restart() -> None:
    async def scenario() -> None:
        async with one_way_mesh() as (relay1, relay2, mesh1, port2, b):
            await mesh1.wait_connected(10)
            await b.connect(host="127.0.0.1", port=port2, tls=False)
            await _until(lambda: b.public_key in relay1.forwarder_keys(), 10, "relay 1 to learn B")
            relay2.close()  # drops the mesh link and B
            await _until(lambda: b.public_key not in relay1.forwarder_keys(), 10, "relay 1 to clear B")
            await b.close()
            b2 = DerpClient()
            await _until(lambda: mesh1.peers[0].connected.is_set(), 10, "mesh link to come back")
            await b2.connect(host="127.0.0.1", port=port2, tls=False)
            await _until(lambda: b2.public_key in relay1.forwarder_keys(), 10, "relay 1 to learn B2")
            assert mesh1.peers[0].counters.connects >= 2
            await b2.close()

    asyncio.run(scenario())


def test_wrong_mesh_key_gets_no_watch() -> None:
    async def scenario() -> None:
        async with one_way_mesh(relay2_mesh_key="cd" * 32) as (relay1, relay2, mesh1, port2, b):
            await b.connect(host="127.0.0.1", port=port2, tls=False)
            await _until(lambda: mesh1.peers[0].counters.connect_failures >= 1, 10, "mesh link to be refused")
            assert b.public_key not in relay1.forwarder_keys()
            assert relay2.metrics.protocol_errors >= 1

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("relay2.example.com", PeerAddress("relay2.example.com", 443, True, "relay2.example.com")),
        ("10.0.0.2:8443", PeerAddress("10.0.0.2", 8443, True, "10.0.0.2:8443")),
        ("[fd00::2]:80", PeerAddress("fd00::2", 80, True, "[fd00::2]:80")),
        ("http://r2:3340/derp", PeerAddress("r2", 3340, False, "http://r2:3340/derp")),
    ],
)
def test_peer_address_parsing(text: str, expected: PeerAddress) -> None:
    assert PeerAddress.parse(text, default_tls=True) == expected


@pytest.mark.parametrize("text", ["", "ftp://x", "host:notaport", "https://:443"])
def test_bad_peer_addresses_are_clear_errors(text: str) -> None:
    with pytest.raises(MeshConfigError):
        PeerAddress.parse(text, default_tls=True)


def test_region_list_entry_that_is_this_relay_is_dropped() -> None:
    async def scenario() -> None:
        relay = DerpServer(keys.generate_private_key(), mesh_key=MESH_KEY)
        listener, port = await _listen(relay)
        # Listed under a name that differs from self_name: only the key in ServerKey reveals it is us.
        mesh = await start_mesh(relay, MESH_KEY, [f"127.0.0.1:{port}"], "relay.example", tls=False)
        try:
            await _until(lambda: mesh.peers[0].self_connect, 10, "self-connect detection")
            assert mesh.peers[0]._task is not None and mesh.peers[0]._task.done()
            assert not list(relay.forwarder_keys())
        finally:
            await mesh.close()
            relay.close()
            listener.close()

    asyncio.run(scenario())
