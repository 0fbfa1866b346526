"""The outgoing mesh link in the C plane (issue 12): once MeshPeer's handshake and WatchConns are done, its socket
(plain or TLS client session) joins the relay's C loop and packets from C clients to keys on the peer relay
leave as ForwardPacket frames without Python. Relay 1 meshes with relay 2 (one direction is enough: client A
on relay 1 sends to client B on relay 2)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from test_relay_mesh_tls import self_signed

from turbowg.derp import keys
from turbowg.derp.client import DerpClient
from turbowg.derp.codec import ReceivedPacket, encode_ping
from turbowg.relay import fastpath, mesh
from turbowg.relay.http import RelayHTTPProtocol
from turbowg.relay.mesh import MeshPeer, start_mesh
from turbowg.relay.server import DerpServer

MESH_KEY = "ab" * 32

pytestmark = pytest.mark.skipif(not fastpath.available(), reason="the C plane is not built or TURBOWG_NO_C=1")


async def until(cond: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@contextlib.asynccontextmanager
async def meshed(tmp: Path | None = None, **server_kw: Any) -> AsyncIterator[tuple[DerpServer, DerpServer, str, MeshPeer]]:
    """relay1 (mesh link to relay2) and relay2; with `tmp`, relay2 serves TLS with a self-signed certificate."""
    ctx: ssl.SSLContext | None = None
    ca = ""
    if tmp is not None:
        crt, key = self_signed(tmp)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(crt), str(key))
        ca = str(crt)
    relay1 = DerpServer(keys.generate_private_key(), mesh_key=MESH_KEY, **server_kw)
    relay2 = DerpServer(keys.generate_private_key(), mesh_key=MESH_KEY)
    loop = asyncio.get_running_loop()
    l1 = await loop.create_server(lambda: RelayHTTPProtocol(relay1), "127.0.0.1", 0)
    l2 = await loop.create_server(lambda: RelayHTTPProtocol(relay2), "127.0.0.1", 0, ssl=ctx)
    port1, port2 = l1.sockets[0].getsockname()[1], l2.sockets[0].getsockname()[1]
    scheme = "https" if ctx else "http"
    m = await start_mesh(relay1, MESH_KEY, [f"{scheme}://127.0.0.1:{port2}"], "relay1", ca_file=ca)
    try:
        await m.wait_connected(10)
        yield relay1, relay2, f"http://127.0.0.1:{port1}/derp", m.peers[0]
    finally:
        await m.close()
        l1.close()
        l2.close()
        relay1.close()
        relay2.close()


def count_calls(peer: MeshPeer) -> list[int]:
    """Python's forward_packet on this link, counted (it must stay unused while the link is in C)."""
    calls = [0]
    orig = peer.forward_packet

    def counted(src: bytes, dst: bytes, packet: bytes) -> bool:
        calls[0] += 1
        return orig(src, dst, packet)

    peer.forward_packet = counted  # type: ignore[method-assign]
    return calls


async def receive_from(client: DerpClient, src: bytes, count: int, timeout: float = 15.0) -> list[bytes]:
    got: list[bytes] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            for msg in await client.recv_many():
                if isinstance(msg, ReceivedPacket) and msg.source == src:
                    got.append(bytes(msg.data))
    return got


async def connect_pair(relay1: DerpServer, relay2: DerpServer, url1: str, peer: MeshPeer,
                       ) -> tuple[DerpClient, DerpClient]:
    a, b = DerpClient(), DerpClient()
    await a.connect(url1)
    port2 = int(peer.address.port)
    await b.connect(host="127.0.0.1", port=port2, tls=peer.address.use_tls)
    await until(lambda: b.public_key in relay1.forwarder_keys(), "relay 1 to learn B")
    await until(lambda: a.public_key in relay1.clients and relay1.fast is not None and relay1.fast.conns,
                "A in relay 1's C loop")
    return a, b


def run_on(loop_name: str, coro: Any) -> None:
    """On asyncio's default loop, or on uvloop as `turbowg relay` workers run (its TLS transport differs)."""
    factory = uvloop.new_event_loop if loop_name == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_packets_to_a_mesh_peer_key_leave_through_c(tmp_path: Path, tls: bool, loop_name: str) -> None:
    async def main() -> None:
        async with meshed(tmp_path if tls else None) as (relay1, relay2, url1, peer):
            assert relay1.fast is not None and peer.c_mesh is not None, "the link was not handed to C"
            info = peer.c_info()
            assert info is not None and info["kind"] == "mesh_out" and info["tls"] is tls
            calls = count_calls(peer)
            a, b = await connect_pair(relay1, relay2, url1, peer)
            before = relay1.fast.stats()["mesh_forwarded_out"]
            packets = [i.to_bytes(4, "big") + bytes(100 + i % 1200) for i in range(3000)]
            for i in range(0, len(packets), 100):
                a.send_many(b.public_key, packets[i:i + 100])
            assert await receive_from(b, a.public_key, len(packets)) == packets  # all, in order
            assert relay1.fast.stats()["mesh_forwarded_out"] - before == len(packets)
            assert calls[0] == 0
            info = peer.c_info()
            assert info is not None and info["records_out"] == len(packets)
            relay1.sync_metrics()
            assert relay1.metrics.packets_forwarded_out >= len(packets) and relay1.metrics.total_dropped() == 0

            # PeerPresent and PeerGone from the peer relay still reach MeshPeer: routes follow them
            c = DerpClient()
            await c.connect(host="127.0.0.1", port=peer.address.port, tls=tls)
            await until(lambda: c.public_key in peer.registered, "PeerPresent for C")
            a.send(c.public_key, b"to c")
            assert await receive_from(c, a.public_key, 1) == [b"to c"]
            await b.close()
            await until(lambda: b.public_key not in relay1.forwarder_keys(), "PeerGone for B")
            sent = relay1.fast.stats()["mesh_forwarded_out"]
            a.send(b.public_key, b"to nobody")
            a.send(c.public_key, b"to c again")
            assert await receive_from(c, a.public_key, 1) == [b"to c again"]
            assert relay1.fast.stats()["mesh_forwarded_out"] == sent + 1  # B's route went with PeerGone
            assert calls[0] == 0
            for x in (a, c):
                await x.close()

    run_on(loop_name, asyncio.wait_for(main(), 60))


def test_tls_link_stays_in_python_when_tls_in_c_is_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastpath, "TLS_IN_C", False)

    async def main() -> None:
        async with meshed(tmp_path) as (relay1, relay2, url1, peer):
            assert peer.c_mesh is None  # the handover was refused: the Python path, as the reference
            calls = count_calls(peer)
            a, b = await connect_pair(relay1, relay2, url1, peer)
            a.send_many(b.public_key, [bytes([i]) * 50 for i in range(200)])
            assert len(await receive_from(b, a.public_key, 200)) == 200
            assert calls[0] == 200
            for x in (a, b):
                await x.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_peer_relay_that_stops_reading_pauses_then_drops_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mesh, "MESH_WRITE_TIMEOUT", 1.0)

    async def main() -> None:
        async with meshed(write_timeout=1.0) as (relay1, relay2, url1, peer):
            assert relay1.fast is not None and relay2.fast is not None and peer.c_mesh is not None
            a, b = await connect_pair(relay1, relay2, url1, peer)
            link2 = next(c for c in relay2.fast.conns.values() if c.can_mesh)  # relay 2's end of the link
            assert link2.pause_reading()
            a.send_many(b.public_key, [bytes(1200)] * 12_000)  # 14 MB: more than socket buffers + the bound
            await until(lambda: relay1.fast.stats()["sender_pauses"] > 0, "A to be paused by the full link")
            info = peer.c_info()
            assert info is not None and info["queue_bytes"] <= fastpath.QUEUE_BOUND + 1300
            await until(lambda: peer.c_stalls >= 1, "the link's write timeout")
            relay1.sync_metrics()
            assert relay1.metrics.dropped("queue_head") > 0  # counted, not silently lost
            assert peer.c_mesh is not None and peer.counters.connects == 1  # the link stays
            for _ in range(20):  # the queue stays bounded while A keeps sending past the timeout
                info = peer.c_info()
                assert info is not None and info["queue_bytes"] <= fastpath.QUEUE_BOUND + 1300
                await asyncio.sleep(0.05)
            link2.resume_reading()
            await asyncio.sleep(0.5)
            a.send(b.public_key, b"marker")
            async with asyncio.timeout(20):
                while True:
                    msgs = await b.recv_many()
                    if any(isinstance(m, ReceivedPacket) and m.data == b"marker" for m in msgs):
                        break
            for x in (a, b):
                await x.close()

    asyncio.run(asyncio.wait_for(main(), 90))


def test_link_dropping_mid_frame_unregisters_and_reconnects_in_c() -> None:
    async def main() -> None:
        async with meshed() as (relay1, relay2, url1, peer):
            assert relay1.fast is not None and relay2.fast is not None
            a, b = await connect_pair(relay1, relay2, url1, peer)
            unregistered: list[bytes] = []
            orig = relay1.unregister_forwarder

            def unregister(key: bytes, fwd: Any) -> None:
                unregistered.append(key)
                orig(key, fwd)

            relay1.unregister_forwarder = unregister  # type: ignore[method-assign]
            a.send_many(b.public_key, [b"before %d" % i for i in range(20)])
            assert len(await receive_from(b, a.public_key, 20)) == 20
            assert peer.counters.packets_forwarded == 0  # C counts these on the link until it goes
            link2 = next(c for c in relay2.fast.conns.values() if c.can_mesh)
            assert link2.fid is not None
            relay2.fast.c.write(link2.fid, b"\x09\x00\x00\x00\x29" + bytes(10))  # half a PeerPresent frame
            relay2.fast.c.flush()
            await asyncio.sleep(0.1)
            link2.abort()
            await until(lambda: b.public_key in unregistered, "B's forwarder to be unregistered")
            await until(lambda: peer.counters.connects == 2 and peer.c_mesh is not None, "the reconnect")
            await until(lambda: b.public_key in relay1.forwarder_keys(), "B again after the reconnect")
            assert relay1.fast.mesh_handovers == 2
            assert peer.counters.packets_forwarded == 20  # the lost link's C counter, folded in
            sent = relay1.fast.stats()["mesh_forwarded_out"]
            a.send_many(b.public_key, [b"again %d" % i for i in range(50)])
            assert len(await receive_from(b, a.public_key, 50)) == 50
            assert relay1.fast.stats()["mesh_forwarded_out"] - sent == 50
            for x in (a, b):
                await x.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_pings_from_the_peer_are_answered_and_forwarded_packets_take_one_hop_only() -> None:
    async def main() -> None:
        async with meshed() as (relay1, relay2, url1, peer):
            assert relay1.fast is not None and relay2.fast is not None and peer.c_mesh is not None
            a, b = await connect_pair(relay1, relay2, url1, peer)
            link2 = next(c for c in relay2.fast.conns.values() if c.can_mesh)
            assert link2.fid is not None
            relay2.fast.c.write(link2.fid, encode_ping(b"12345678"))  # relay 2 pings relay 1 over the link
            relay2.fast.c.flush()
            await until(lambda: peer.counters.pongs_sent == 1, "relay 1's MeshPeer to answer the ping")
            # a third relay's mesh client forwards a packet to relay 1 for B, who is behind relay 1's link to
            # relay 2: the packet's last hop was relay 1 (derper's rule), so it must not go on to relay 2
            third = DerpClient(mesh_key=MESH_KEY)
            await third.connect(url1)
            await until(lambda: any(c.can_mesh and c.fid is not None for c in relay1.fast.conns.values()),
                        "the third relay's link in relay 1's C loop")
            sent = relay1.fast.stats()["mesh_forwarded_out"]
            relay1.sync_metrics()
            dropped = relay1.metrics.total_dropped()
            third.forward_packet(third.public_key, b.public_key, b"two hops")
            third.forward_packet(third.public_key, a.public_key, b"one hop")  # to a local client: delivered
            assert await receive_from(a, third.public_key, 1) == [b"one hop"]
            await until(lambda: (relay1.sync_metrics(), relay1.metrics.total_dropped())[1] == dropped + 1,
                        "the two-hop packet to be dropped and counted")
            assert relay1.fast.stats()["mesh_forwarded_out"] == sent
            for x in (a, b, third):
                await x.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_mesh_tests_pass_on_the_python_path_too() -> None:
    env = dict(os.environ, TURBOWG_NO_C="1")
    tests = Path(__file__).parent
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(tests / "test_relay_mesh.py"),
         str(tests / "test_relay_mesh_tls.py")],
        env=env, capture_output=True, text=True, timeout=300, cwd=tests.parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def test_a_malformed_frame_on_a_link_in_c_ends_the_link_without_an_exception() -> None:
    """mesh_frame: a frame the peer's codec refuses (a PeerPresent too short) ends the link's wait with the
    reason, as a lost link does (the reconnect loop then takes over), and raises nothing into the C loop."""
    async def main() -> None:
        server = DerpServer(keys.generate_private_key(), mesh_key=MESH_KEY)
        peer = MeshPeer(server, mesh.PeerAddress.parse("127.0.0.1:1", False), MESH_KEY,
                        keys.generate_private_key(), None)
        peer._c_lost = asyncio.get_running_loop().create_future()
        peer.mesh_frame(bytes((0x09, 0, 0, 0, 3)) + b"abc")  # PEER_PRESENT with a 3-byte body
        assert peer._c_lost.done() and peer._c_lost.result().startswith("bad frame from peer relay")
        assert peer.registered == set()

    asyncio.run(main())
