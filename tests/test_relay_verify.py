"""-verify-client-url against a real HTTP admission controller (http.server on loopback, in the test):
one key allowed, another denied, what the relay POSTs, non-200 answers, and -verify-client-url-fail-open
both ways when the controller is down. Through the app's own wiring (RelayConfig -> serve_worker)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import uvloop

from turbowg.derp import codec, keys
from turbowg.derp.client import DerpClient, DerpClientError
from turbowg.testing.relay import serving_relay

TIMEOUT = 10.0


class Controller:
    def __init__(self) -> None:
        self.allowed: set[str] = set()
        self.status = 200
        self.requests: list[dict[str, Any]] = []
        self.content_types: list[str] = []


@contextlib.contextmanager
def controller() -> Iterator[tuple[Controller, str]]:
    state = Controller()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append(body)
            state.content_types.append(self.headers.get("Content-Type", ""))
            answer = json.dumps({"Allow": body.get("NodePublic") in state.allowed}).encode()
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{httpd.server_address[1]}/admit"
    finally:
        httpd.shutdown()
        httpd.server_close()


def dead_url() -> str:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/admit"


@contextlib.asynccontextmanager
async def relay(**kw: Any) -> AsyncIterator[tuple[Any, str]]:
    async with serving_relay(TIMEOUT, **kw) as (config, bound):
        yield config, f"http://127.0.0.1:{bound[0][1]}/derp"


async def admitted(url: str, client: DerpClient) -> bool:
    try:
        await client.connect(url, timeout=TIMEOUT)
    except DerpClientError:
        return False
    return True


def test_controller_admits_one_key_and_refuses_another() -> None:
    async def main() -> None:
        with controller() as (ctl, verify_url):
            async with relay(verify_client_url=verify_url) as (_config, url):
                good, bad, other = DerpClient(), DerpClient(), DerpClient()
                ctl.allowed = {keys.format_public_key(good.public_key), keys.format_public_key(other.public_key)}
                assert await admitted(url, good)
                assert not await admitted(url, bad)
                assert await admitted(url, other)
                # what derper sends: tailcfg.DERPAdmitClientRequest as JSON
                assert {"NodePublic": keys.format_public_key(bad.public_key), "Source": "127.0.0.1"} in ctl.requests
                assert all(ct == "application/json" for ct in ctl.content_types)
                # the admitted clients work as usual
                good.send(other.public_key, b"admitted")
                async with asyncio.timeout(TIMEOUT):
                    while not isinstance(msg := await other.recv(), codec.ReceivedPacket):
                        pass
                assert msg.data == b"admitted" and msg.source == good.public_key
                for c in (good, other):
                    await c.close()

    uvloop.run(main())


def test_non_200_answer_refuses_even_an_allowed_key() -> None:
    async def main() -> None:
        with controller() as (ctl, verify_url):
            async with relay(verify_client_url=verify_url) as (_config, url):
                c = DerpClient()
                ctl.allowed = {keys.format_public_key(c.public_key)}
                ctl.status = 500
                assert not await admitted(url, c)
                ctl.status = 200
                assert await admitted(url, DerpClient(c.private_key))

    uvloop.run(main())


@pytest.mark.parametrize("fail_open", [True, False])
def test_controller_down_fails_open_or_closed(fail_open: bool) -> None:
    async def main() -> None:
        async with relay(verify_client_url=dead_url(), verify_client_url_fail_open=fail_open) as (_config, url):
            a, b = DerpClient(), DerpClient()
            assert await admitted(url, a) is fail_open
            if fail_open:
                assert await admitted(url, b)
                a.send(b.public_key, b"fail-open")
                async with asyncio.timeout(TIMEOUT):
                    while not isinstance(msg := await b.recv(), codec.ReceivedPacket):
                        pass
                assert msg.data == b"fail-open"
                await a.close()
                await b.close()

    uvloop.run(main())


def test_mesh_peers_are_not_asked() -> None:
    async def main() -> None:
        mesh_key = "ab" * 32
        with controller() as (ctl, verify_url):
            import tempfile
            with tempfile.NamedTemporaryFile("w", suffix=".key") as f:
                f.write(mesh_key)
                f.flush()
                async with relay(verify_client_url=verify_url, mesh_psk_file=f.name,
                                 verify_client_url_fail_open=False) as (_config, url):
                    peer = DerpClient(mesh_key=mesh_key)
                    assert await admitted(url, peer)
                    assert ctl.requests == []
                    await peer.close()

    uvloop.run(main())


def test_frames_sent_before_the_verdict_wait_for_it() -> None:
    """A client may send right after its ClientInfo (Go clients do): those frames are held until the controller
    answers, then handled in order if admitted, never if refused."""
    from turbowg.derp.client_proto import ClientConnection

    async def raw_client(port: int, private: bytes, dst: bytes) -> list[Any]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        proto = ClientConnection(private)
        events: list[Any] = []
        sent = False
        with contextlib.suppress(TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            async with asyncio.timeout(1.5):
                while data := await reader.read(65536):
                    events += proto.receive_data(data)
                    out = proto.data_to_send()
                    if out and not sent:  # ClientInfo, a packet and a ping in one write, before ServerInfo
                        writer.write(out + codec.encode_send_packet(dst, b"early") + codec.encode_ping(b"12345678"))
                        sent = True
        writer.close()
        return events

    async def main() -> None:
        with controller() as (ctl, verify_url):
            async with relay(verify_client_url=verify_url) as (_config, url):
                port = int(url.split(":")[2].split("/")[0])
                receiver = DerpClient()
                ok_key, bad_key = keys.generate_private_key(), keys.generate_private_key()
                ctl.allowed = {keys.format_public_key(receiver.public_key),
                               keys.format_public_key(keys.public_key(ok_key))}
                await receiver.connect(url)
                events = await raw_client(port, ok_key, receiver.public_key)
                assert any(isinstance(e, codec.Pong) and e.data == b"12345678" for e in events)
                async with asyncio.timeout(TIMEOUT):
                    while not isinstance(msg := await receiver.recv(), codec.ReceivedPacket):
                        pass
                assert msg.data == b"early" and msg.source == keys.public_key(ok_key)
                events = await raw_client(port, bad_key, receiver.public_key)
                assert not any(isinstance(e, codec.Pong) for e in events)  # closed before anything was handled
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.5):
                        while not isinstance(await receiver.recv(), codec.ReceivedPacket):
                            pass
                await receiver.close()

    uvloop.run(main())


def test_websocket_clients_are_verified_too() -> None:
    async def main() -> None:
        with controller() as (ctl, verify_url):
            async with relay(verify_client_url=verify_url) as (_config, url):
                ws_url = url.replace("http://", "ws://")
                good, bad = DerpClient(), DerpClient()
                ctl.allowed = {keys.format_public_key(good.public_key)}
                assert await admitted(ws_url, good)
                assert not await admitted(ws_url, bad)
                assert await good.ping() < TIMEOUT
                await good.close()

    uvloop.run(main())
