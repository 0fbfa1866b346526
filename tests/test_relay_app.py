"""DERP relay over loopback sockets: plain and TLS, bulk exchange, PeerGone, hostile input,
stalled readers, many idle connections, HTTP endpoints, and the relay app wiring."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import resource
import shutil
import socket
import ssl
import subprocess
import time
import types
import weakref
from pathlib import Path

import pytest

from turbowg.derp import client as client_mod
from turbowg.derp import codec, keys
from turbowg.derp.client import DerpClient, DerpClientError
from turbowg.derp.client_proto import ClientConnection
from turbowg.derp.codec import FrameType
from turbowg.relay.app import RelayConfig, RelayConfigError, parse_addr, prepare, serve_worker
from turbowg.testing.relay import (
    connected_clients,
    exchange,
    make_cert,
    raw_upgrade,
    relay,
    run,
    server_tls,
    until,
)

# A Ping/Pong over loopback through an idle-ish relay takes well under a millisecond; a second is a bound that
# still holds on a loaded 2-core CI machine, and a failure means the pong is stuck, not slow.
RTT_BOUND = 1.0


async def checked_ping(client: DerpClient, monkeypatch: pytest.MonkeyPatch, data: bytes) -> float:
    """client.ping() with a known payload: the RTT is within RTT_BOUND and the Pong that ended it, still in
    the client's queue, carries exactly that payload."""
    assert len(data) == 8
    monkeypatch.setattr(client_mod, "os", types.SimpleNamespace(urandom=lambda n: data[:n]))
    try:
        rtt = await client.ping(timeout=RTT_BOUND)
    finally:
        monkeypatch.undo()
    assert 0 < rtt < RTT_BOUND
    while True:  # ping() returns when the pong is in: it is queued already, no waiting for it here
        msg = await asyncio.wait_for(client.recv(), 0.05)
        if isinstance(msg, (codec.Pong, codec.Ping)):
            break
    assert msg == codec.Pong(data), msg
    return rtt


@pytest.mark.parametrize("use_tls", [False, True], ids=["plain", "tls"])
def test_100k_packets_exchanged_without_loss(use_tls: bool, tmp_path: Path, monkeypatch) -> None:
    async def main() -> None:
        tls = server_tls(tmp_path) if use_tls else None
        async with relay(tls) as (server, url):
            a, b = await connected_clients(url, verify=False)
            await exchange(a, b, 100_000)
            await exchange(b, a, 1_000)  # and the other way
            assert server.metrics.total_dropped() == 0
            assert server.metrics.packets_sent == 101_000
            await checked_ping(a, monkeypatch, b"ping-100")
            await a.close()
            await b.close()

    run(main)


def test_tls_client_verifies_certificate_when_asked(tmp_path: Path) -> None:
    async def main() -> None:
        tls = server_tls(tmp_path)
        async with relay(tls) as (_, url):
            with pytest.raises(DerpClientError, match="certificate"):
                await DerpClient().connect(url, verify=True)
            ctx = ssl.create_default_context(cafile=str(tmp_path / "localhost.crt"))
            c = DerpClient()
            await c.connect(url, ssl_context=ctx, server_hostname="localhost")
            await c.close()

    run(main)


def test_peer_gone_arrives_when_peer_leaves() -> None:
    async def main() -> None:
        async with relay() as (server, url):
            a, b = await connected_clients(url)
            a.send(b.public_key, b"hello")
            assert await b.recv() == codec.ReceivedPacket(a.public_key, b"hello")
            await a.close()
            msg = await asyncio.wait_for(b.recv(), 5)
            assert msg == codec.PeerGone(a.public_key, codec.PeerGoneReason.DISCONNECTED)
            await b.close()
            await until(lambda: server.clients == {} and server.conns == set(), "the relay to forget both clients")

    run(main)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True once the server has closed the connection (EOF, or a reset when it aborted), reading and
    discarding whatever it sent before; False if the connection is still open after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if not await asyncio.wait_for(reader.read(65536), remaining):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_closed_by_server_tells_a_close_from_an_open_connection() -> None:
    """The helper itself: a server that closes -> True (at once); one that stays open and even keeps
    talking -> False after the timeout, not True."""
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                mode = await reader.readexactly(1)
            except asyncio.IncompleteReadError:
                return
            if mode == b"c":
                writer.write(b"bye")
                writer.close()
            elif mode == b"a":
                writer.transport.abort()
            else:
                with contextlib.suppress(ConnectionError):
                    for _ in range(30):
                        writer.write(b"still here")
                        await writer.drain()
                        await asyncio.sleep(0.05)

        srv = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        for mode, closed in ((b"c", True), (b"a", True), (b"o", False), (b"s", False)):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            if mode != b"s":  # "s": say nothing, the handler waits: open and silent
                w.write(mode)
            # A close must be seen before the timeout (True is only returned on EOF or a reset), however
            # busy the machine; an open connection must be waited out for the whole timeout, never True.
            timeout = 5.0 if closed else 0.5
            started = time.monotonic()
            assert await closed_by_server(r, timeout=timeout) is closed, mode
            if not closed:  # waited out (uvloop's timers run on libuv's millisecond clock: up to 1 ms early)
                assert time.monotonic() - started >= timeout - 0.002
            w.close()
        srv.close()

    run(main)


def test_hostile_input_closes_only_that_connection() -> None:
    async def main() -> None:
        async with relay() as (server, url):
            good_a, good_b = await connected_clients(url)

            # 1. garbage instead of an HTTP request
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"\x00\x01garbage\r\n\r\n")
            assert (await r.read(100)).startswith(b"HTTP/1.1 400")
            w.close()

            # 2. garbage instead of the ClientInfo frame
            r, w = await raw_upgrade(url)
            w.write(b"DERQ\xf0\x9f\x94\x91" * 10)
            assert await closed_by_server(r)
            w.close()

            # 3. a ClientInfo that does not open (sealed with the wrong key)
            r, w = await raw_upgrade(url)
            hdr = await r.readexactly(5)
            server_key = codec.parse_server_key(await r.readexactly(hdr[4]))
            me, stranger = keys.generate_private_key(), keys.generate_private_key()
            w.write(codec.encode_client_info(keys.public_key(me), keys.seal_to(stranger, server_key, b"{}")))
            assert await closed_by_server(r)
            w.close()

            # 4. an oversized frame after a good handshake
            r, w = await raw_upgrade(url)
            proto = ClientConnection(keys.generate_private_key())
            proto.receive_data(await r.readexactly(45))
            w.write(proto.data_to_send())
            w.write(codec.pack_header(FrameType.SEND_PACKET, 32 + (64 << 10) + 1) + bytes(1000))
            assert await closed_by_server(r)
            w.close()

            # 5. a truncated frame, then the client vanishes
            r, w = await raw_upgrade(url)
            proto = ClientConnection(keys.generate_private_key())
            proto.receive_data(await r.readexactly(45))
            w.write(proto.data_to_send() + codec.encode_send_packet(good_b.public_key, b"cut short")[:-4])
            await until(lambda: len(server.conns) == 3, "the truncated-frame client to be registered")
            w.close()
            await until(lambda: len(server.conns) == 2, "the relay to drop the vanished client")

            m = server.metrics
            assert m.handshake_errors == 2 and m.protocol_errors == 1
            assert set(server.clients) == {good_a.public_key, good_b.public_key}
            assert len(server.conns) == 2
            good_a.send(good_b.public_key, b"still fine")
            assert await asyncio.wait_for(good_b.recv(), 5) == codec.ReceivedPacket(good_a.public_key, b"still fine")
            await good_a.close()
            await good_b.close()

    run(main)


def test_client_refuses_a_server_that_is_not_derp() -> None:
    async def main() -> None:
        async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + codec.encode_frame(1, b"NOTDERP!" + bytes(32)))
            await writer.drain()
            await asyncio.sleep(1)
            writer.close()

        srv = await asyncio.start_server(fake, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        with pytest.raises(DerpClientError, match="magic"):
            await DerpClient().connect(f"http://127.0.0.1:{port}/derp", timeout=5)
        srv.close()

    run(main)


def test_client_that_never_reads_drops_and_counts_while_others_flow() -> None:
    # The Python path's queue semantics (derper's: drop at the head while the receiver is congested). The C
    # forwarding plane pauses the senders instead and drops only past the write timeout:
    # tests/test_relay_fastpath.py::test_app_never_reading_client_pauses_sender_then_times_out.
    async def main() -> None:
        async with relay(write_timeout=0.5, fastpath=False) as (server, url):
            # a client whose socket is never read: handshake by hand, then silence
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            r, w = await asyncio.open_connection(sock=(sock.connect(("127.0.0.1", port)), sock)[1])
            w.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n")
            await r.readuntil(b"\r\n\r\n")
            proto = ClientConnection(keys.generate_private_key())
            proto.receive_data(await r.readexactly(45))
            w.write(proto.data_to_send())
            await r.readexactly(5 + 24 + 16 + 13)  # ServerInfo; never read again
            stalled = proto.public_key
            w.transport.pause_reading()

            flood, a, b = await connected_clients(url, 3)
            for _ in range(20):
                flood.send_many(stalled, [bytes(1200)] * 256)
                await flood.drain()
                await exchange(a, b, 200)  # the other pair keeps flowing while the flood goes on
            assert server.metrics.dropped("queue_head") > 0
            assert server.metrics.packets_sent >= 20 * 200
            # no progress on the stalled socket: the relay closes it and forgets it
            for _ in range(100):
                if stalled not in server.clients:
                    break
                await asyncio.sleep(0.05)
            assert stalled not in server.clients and server.metrics.write_timeouts == 1
            await exchange(a, b, 100)
            w.close()
            for c in (flood, a, b):
                await c.close()

    run(main)


def test_thousand_idle_connections_and_state_released() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * 1000 + 200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))

    async def main() -> None:
        async with relay() as (server, url):
            clients = [DerpClient() for _ in range(1000)]
            for start in range(0, 1000, 100):
                await asyncio.gather(*(c.connect(url) for c in clients[start : start + 100]))
            assert server.metrics.current_connections == 1000 and len(server.clients) == 1000
            refs = [weakref.ref(c) for c in server.conns]
            await exchange(clients[0], clients[999], 500)
            await asyncio.gather(*(c.close() for c in clients))
            for _ in range(100):
                if not server.conns:
                    break
                await asyncio.sleep(0.05)
            assert server.conns == set() and server.clients == {} and server.watchers == set()
            assert server.metrics.current_connections == 0 and server._peer_gone_watchers == {}
            await asyncio.sleep(0)
            gc.collect()
            assert sum(r() is not None for r in refs) == 0

    run(main, timeout=120)


async def http_get(url: str, path: str, headers: str = "") -> bytes:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode())
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    return data


def test_http_endpoints(monkeypatch) -> None:
    async def main() -> None:
        async with relay() as (server, url):
            resp = await http_get(url, "/derp")
            assert resp.startswith(b"HTTP/1.1 426 Upgrade Required")
            assert (await http_get(url, "/derp/probe")).startswith(b"HTTP/1.1 200 OK")
            assert (await http_get(url, "/derp/latency-check")).startswith(b"HTTP/1.1 200 OK")
            resp = await http_get(url, "/generate_204", "X-Tailscale-Challenge: abc123\r\n")
            assert resp.startswith(b"HTTP/1.1 204") and b"X-Tailscale-Response: response abc123\r\n" in resp
            resp = await http_get(url, "/generate_204", "X-Tailscale-Challenge: <script>\r\n")
            assert b"X-Tailscale-Response" not in resp
            assert (await http_get(url, "/nope")).startswith(b"HTTP/1.1 404")
            c = DerpClient()
            await c.connect(url)
            for path in ("/debug/varz", "/metrics"):
                body = await http_get(url, path)
                for name in (b"derp_current_connections 1.0", b"derp_packets_sent", b"derp_packets_received",
                             b"derp_bytes_sent", b"derp_bytes_received", b'derp_packets_dropped{kind="disco",'):
                    assert name in body
            await c.close()

            # 101 response carries the derper headers
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
            head = (await r.readuntil(b"\r\n\r\n")).decode()
            assert "Derp-Version: 2\r\n" in head and f"Derp-Public-Key: {server.public_key.hex()}\r\n" in head
            w.close()

            # fast start: no HTTP response, frames straight away
            fast = DerpClient()
            await fast.connect(url, fast_start=True, expected_server_key=server.public_key)
            await checked_ping(fast, monkeypatch, b"fastping")
            await fast.close()

    run(main)


def test_relay_app_serves_tls_from_certdir_and_reports_bad_settings(tmp_path: Path) -> None:
    make_cert(tmp_path, "relay.test")
    keyfile = tmp_path / "derper.key"
    config = RelayConfig(addr="127.0.0.1:0", config_path=str(keyfile), hostname="relay.test", certdir=str(tmp_path),
                         stun=False, workers=1)
    bound: list[tuple[str, int]] = []
    config.ready = bound.extend

    async def main() -> None:
        prepared = prepare(config)
        task = asyncio.create_task(serve_worker(config, prepared))
        await until(lambda: bool(bound), "the relay worker to listen")
        port = bound[0][1]
        a, b = DerpClient(), DerpClient()
        await a.connect(f"https://127.0.0.1:{port}", server_hostname="relay.test")
        await b.connect(f"127.0.0.1:{port}")  # scheme defaults to https, path to /derp
        assert a.server_key == keys.public_key(keys.load_or_create_config(keyfile))
        await exchange(a, b, 1000)
        # derper's meta certificate rides in the chain, and a verifying client still accepts the chain
        # (openssl is in setup.sh's package list: this check is not optional)
        assert shutil.which("openssl"), "the openssl command is needed (Debian package openssl, see setup.sh)"
        shown = await asyncio.to_thread(
            subprocess.run, ["openssl", "s_client", "-showcerts", "-connect", f"127.0.0.1:{port}"],
            input=b"", capture_output=True, timeout=20,
        )
        assert f"CN = derpkey{a.server_key.hex()}".encode() in shown.stdout, shown.stdout[-2000:]
        verifying = DerpClient()
        ctx = ssl.create_default_context(cafile=str(tmp_path / "relay.test.crt"))
        await verifying.connect(f"https://127.0.0.1:{port}", ssl_context=ctx, server_hostname="relay.test")
        await verifying.close()
        await a.close()
        await b.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    run(main)
    with pytest.raises(RelayConfigError, match="not found"):
        prepare(RelayConfig(config_path=str(keyfile), hostname="missing", certdir=str(tmp_path)))
    with pytest.raises(RelayConfigError, match="-c"):
        prepare(RelayConfig())
    with pytest.raises(RelayConfigError, match="certmode"):
        prepare(RelayConfig(config_path=str(keyfile), certmode="letsencrypt"))
    bad_psk = tmp_path / "psk"
    bad_psk.write_text("short\n")
    with pytest.raises(RelayConfigError, match="64 hex"):
        prepare(RelayConfig(dev=True, mesh_psk_file=str(bad_psk)))
    assert parse_addr(":443", 1) == ("", 443)
    assert parse_addr("[::1]:3340", 1) == ("::1", 3340)
    assert parse_addr("10.0.0.1", 3340) == ("10.0.0.1", 3340)
    assert parse_addr("8443", 1) == ("", 8443)
    with pytest.raises(RelayConfigError):
        parse_addr(":http", 1)


def test_mesh_client_watches_conns_and_closes_peers_over_sockets() -> None:
    mesh_key = "cd" * 32

    async def main() -> None:
        async with relay(mesh_key=mesh_key) as (server, url):
            plain = DerpClient()
            await plain.connect(url)
            watcher = DerpClient(mesh_key=mesh_key)
            await watcher.connect(url)
            watcher.watch_conns()
            seen = set()
            while plain.public_key not in seen:
                msg = await asyncio.wait_for(watcher.recv(), 5)
                if isinstance(msg, codec.PeerPresent):
                    seen.add(msg.peer)
                    assert msg.ip == ipaddress.IPv4Address("127.0.0.1") and msg.port > 0
            watcher.forward_packet(bytes(32), plain.public_key, b"forwarded")
            assert await asyncio.wait_for(plain.recv(), 5) == codec.ReceivedPacket(bytes(32), b"forwarded")
            watcher.close_peer(plain.public_key)
            msg = await asyncio.wait_for(watcher.recv(), 5)
            while isinstance(msg, codec.PeerPresent):  # derper lists the watcher itself too
                msg = await asyncio.wait_for(watcher.recv(), 5)
            assert msg == codec.PeerGone(plain.public_key, 0)
            with pytest.raises(DerpClientError):
                for _ in range(50):
                    await asyncio.wait_for(plain.recv(), 5)
            with pytest.raises(DerpClientError):
                plain.send(watcher.public_key, b"after close")

            intruder = DerpClient()  # no mesh key: WatchConns closes the connection
            await intruder.connect(url)
            intruder.watch_conns()
            with pytest.raises(DerpClientError):
                await asyncio.wait_for(intruder.recv(), 5)
            await watcher.close()

    run(main)


def test_relay_answers_a_ping_with_the_same_payload_at_once() -> None:
    """Below DerpClient: a Ping frame with a known payload gets a Pong frame with exactly that payload, within
    RTT_BOUND. A ping that comes while a pong is still pending is dropped (as derper does)."""
    async def main() -> None:
        async with relay() as (server, url):
            r, w = await raw_upgrade(url)
            proto = ClientConnection(keys.generate_private_key())
            proto.receive_data(await r.readexactly(45))
            w.write(proto.data_to_send())

            async def pongs(n: int) -> list[bytes]:
                got: list[bytes] = []
                while len(got) < n:
                    data = await asyncio.wait_for(r.read(65536), RTT_BOUND)
                    assert data, "relay closed the connection"
                    got += [ev.data for ev in proto.receive_data(data) if isinstance(ev, codec.Pong)]
                return got

            started = time.monotonic()
            w.write(codec.encode_ping(b"\x01\x02\x03\x04\x05\x06\x07\x08"))
            assert await pongs(1) == [b"\x01\x02\x03\x04\x05\x06\x07\x08"]
            assert time.monotonic() - started < RTT_BOUND
            w.write(codec.encode_ping(b"first..!") + codec.encode_ping(b"second.!"))
            assert await pongs(1) == [b"first..!"]
            with pytest.raises(TimeoutError):  # no pong for the second: it came while the first was pending
                await asyncio.wait_for(r.read(65536), 0.3)
            assert server.metrics.got_ping == 3 and server.metrics.sent_pong == 2
            w.write(codec.encode_ping(b"third..!"))
            assert await pongs(1) == [b"third..!"]
            w.close()

    run(main)
