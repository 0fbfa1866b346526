"""DERP over WebSocket (`GET /derp`, `Upgrade: websocket`, `Sec-WebSocket-Protocol: derp`) against the real
relay front over loopback: turbowg's wsproto client (DerpClient with a ws:// URL), an independent client
(the `websockets` package driving turbowg's sans-IO DERP client handshake, when installed), the
`turbowg derp-client` command, each exchanging packets with a plain DERP client; refusals (no derp
subprotocol, text messages); derper's `derp_websocket_accepts` metric."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import uvloop

from turbowg.derp import codec, keys
from turbowg.derp.client import DerpClient, DerpClientError
from turbowg.derp.client_proto import ClientConnection, Connected
from turbowg.relay.http import RelayHTTPProtocol
from turbowg.relay.server import DerpServer

TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def relay() -> AsyncIterator[tuple[DerpServer, int]]:
    server = DerpServer(keys.generate_private_key())
    listener = await asyncio.get_running_loop().create_server(
        lambda: RelayHTTPProtocol(server), "127.0.0.1", 0, family=socket.AF_INET)
    try:
        yield server, listener.sockets[0].getsockname()[1]
    finally:
        server.close()
        listener.close()


async def recv_packet(client: DerpClient) -> codec.ReceivedPacket:
    async with asyncio.timeout(TIMEOUT):
        while True:
            msg = await client.recv()
            if isinstance(msg, codec.ReceivedPacket):
                return msg


def metric(server: DerpServer, name: str) -> float:
    for line in server.render_metrics().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_wsproto_client_exchanges_packets_with_a_plain_derp_client() -> None:
    async def main() -> None:
        async with relay() as (server, port):
            ws, plain = DerpClient(), DerpClient()
            await ws.connect(f"ws://127.0.0.1:{port}/derp")
            await plain.connect(f"http://127.0.0.1:{port}/derp")
            assert ws.server_key == plain.server_key == server.public_key
            # both ways, packets of every size up to derper's 64 KiB, in order and intact
            sizes = [1, 100, 1400, 4096, 65536]
            for n in sizes:
                ws.send(plain.public_key, bytes([n % 251]) * n)
            for n in sizes:
                got = await recv_packet(plain)
                assert got.source == ws.public_key and got.data == bytes([n % 251]) * n
            for n in sizes:
                plain.send(ws.public_key, bytes([n % 13]) * n)
            for n in sizes:
                got = await recv_packet(ws)
                assert got.source == plain.public_key and got.data == bytes([n % 13]) * n
            assert await ws.ping() < TIMEOUT  # Ping/Pong over the WebSocket too
            # a bulk run: many frames per WebSocket message and messages split over reads
            burst = [i.to_bytes(4, "big") * 300 for i in range(500)]
            ws.send_many(plain.public_key, burst)
            await ws.drain()
            for want in burst:
                assert (await recv_packet(plain)).data == want
            assert server.metrics.websocket_accepts == 1
            assert metric(server, "derp_websocket_accepts") == 1.0
            await ws.close()
            await plain.close()

    uvloop.run(main())


def test_websockets_package_client_interoperates() -> None:
    """An independent WebSocket implementation (the `websockets` package) carries the DERP stream."""
    pytest.importorskip("websockets")
    from websockets.asyncio.client import connect

    async def main() -> None:
        async with relay() as (server, port):
            plain = DerpClient()
            await plain.connect(f"http://127.0.0.1:{port}/derp")
            private = keys.generate_private_key()
            proto = ClientConnection(private)
            async with connect(f"ws://127.0.0.1:{port}/derp", subprotocols=["derp"], compression=None) as ws:
                assert ws.subprotocol == "derp"
                connected = None
                async with asyncio.timeout(TIMEOUT):
                    while connected is None:
                        msg = await ws.recv()
                        assert isinstance(msg, bytes)  # binary messages only
                        connected, _frames = proto.receive_frames(msg)
                        out = proto.data_to_send()
                        if out:
                            await ws.send(out)
                assert isinstance(connected, Connected) and connected.server_key == server.public_key
                await ws.send(codec.encode_send_packet(plain.public_key, b"from websockets"))
                got = await recv_packet(plain)
                assert got.source == keys.public_key(private) and got.data == b"from websockets"
                plain.send(keys.public_key(private), b"to websockets")
                frames: list[tuple[int, bytes]] = []
                async with asyncio.timeout(TIMEOUT):
                    while not any(t == codec.FrameType.RECV_PACKET for t, _ in frames):
                        _, more = proto.receive_frames(await ws.recv())
                        frames += more
                payload = next(p for t, p in frames if t == codec.FrameType.RECV_PACKET)
                assert payload == plain.public_key + b"to websockets"
            assert server.metrics.websocket_accepts == 1
            await plain.close()

    uvloop.run(main())


async def raw_request(port: int, head: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode())
    data = b""
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        async with asyncio.timeout(3):
            while chunk := await reader.read(65536):
                data += chunk
    writer.close()
    return data


def test_websocket_without_the_derp_subprotocol_is_not_a_derp_connection() -> None:
    """derper: `Upgrade: websocket` without the derp subprotocol is not a WebSocket client (early clients sent
    that header with DERP's own framing): it gets the ordinary 426."""
    async def main() -> None:
        async with relay() as (server, port):
            resp = await raw_request(port, (
                "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: chat\r\n\r\n"))
            assert resp.startswith(b"HTTP/1.1 426 ")
            assert server.metrics.websocket_accepts == 0
            # a well-formed derp WebSocket request: 101 with the RFC 6455 accept value and the derp subprotocol
            resp = await raw_request(port, (
                "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: derp\r\n\r\n"))
            head = resp.split(b"\r\n\r\n", 1)[0].lower()
            assert head.startswith(b"http/1.1 101 ")
            assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in head
            assert b"sec-websocket-protocol: derp" in head
            assert b"sec-websocket-extensions" not in head  # no compression, as derper
            # then the ServerKey frame in a binary message (opcode 2)
            rest = resp.split(b"\r\n\r\n", 1)[1]
            assert rest[0] == 0x82 and codec.MAGIC in rest[:64]
            # a WebSocket request missing its key is refused
            resp = await raw_request(port, (
                "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: derp\r\n\r\n"))
            assert resp.startswith(b"HTTP/1.1 400 ")

    uvloop.run(main())


def test_text_message_closes_with_policy_violation() -> None:
    websockets = pytest.importorskip("websockets")
    from websockets.asyncio.client import connect

    async def main() -> None:
        async with relay() as (_server, port):
            async with connect(f"ws://127.0.0.1:{port}/derp", subprotocols=["derp"], compression=None) as ws:
                await ws.recv()  # ServerKey
                await ws.send("not binary")
                with pytest.raises(websockets.ConnectionClosed) as info:
                    async with asyncio.timeout(TIMEOUT):
                        while True:
                            await ws.recv()
                assert info.value.rcvd is not None and info.value.rcvd.code == 1008

    uvloop.run(main())


def test_plain_relay_refusal_is_a_client_error() -> None:
    """A ws:// client talking to something that is not a WebSocket DERP endpoint fails cleanly."""
    async def main() -> None:
        async def not_ws(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(not_ws, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        with pytest.raises(DerpClientError):
            await DerpClient().connect(f"ws://127.0.0.1:{port}/derp", timeout=5)
        srv.close()

    uvloop.run(main())


def test_derp_client_command_over_websocket() -> None:
    """`turbowg derp-client` with a ws:// URL and with --websocket, against `turbowg relay` (a real process)."""
    from test_derp_cli import relay_process, turbowg

    with relay_process() as url:
        ws_url = url.replace("http://", "ws://")
        info = turbowg("derp-client", "info", ws_url)
        assert info.returncode == 0, info.stderr
        assert info.stdout.startswith("relay nodekey:")
        receiver_key = keys.generate_private_key()
        recv = subprocess.Popen(
            [sys.executable, "-m", "turbowg", "derp-client", "recv", url, "--websocket", "--count", "2",
             "--private-key", keys.format_private_key(receiver_key), "--timeout", "15"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert recv.stdout is not None
            assert recv.stdout.readline().startswith("listening as")
            sent = turbowg("derp-client", "send", ws_url, "--to", keys.format_public_key(keys.public_key(receiver_key)),
                           "--data", "over websocket", "--count", "2")
            assert sent.returncode == 0, sent.stderr
            out, err = recv.communicate(timeout=20)
            assert recv.returncode == 0, err
            assert out.count("b'over websocket'") == 2
        finally:
            if recv.poll() is None:
                recv.kill()
