"""What the relay tests share: one relay worker (`turbowg relay`'s serve_worker) or one DerpServer on
127.0.0.1 in this event loop, a throwaway TLS certificate, connected clients, and a lossless exchange check.

These lived in tests/test_relay_app.py and other test files imported them from there; a test module is no
library (importing it re-runs its module setup and ties the files' collection together)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from turbowg.derp import codec, keys
from turbowg.derp.client import DerpClient
from turbowg.relay.app import RelayConfig, prepare, serve_worker
from turbowg.relay.http import RelayHTTPProtocol
from turbowg.relay.server import DerpServer


@contextlib.asynccontextmanager
async def serving_relay(timeout: float = 15.0, **kw: Any) -> AsyncIterator[tuple[RelayConfig, list[tuple[str, int]]]]:
    """A relay worker with `RelayConfig(**kw)` (dev mode, no STUN, one worker, a free port unless `kw` says
    otherwise): (its config, the addresses it bound) once it listens; cancelled on exit."""
    ready: asyncio.Future[list[tuple[str, int]]] = asyncio.get_running_loop().create_future()
    kw = {"addr": "127.0.0.1:0", "dev": True, "stun": False, "workers": 1, **kw}
    config = RelayConfig(ready=lambda bound: ready.set_result(bound), **kw)
    task = asyncio.create_task(serve_worker(config, prepare(config)))
    bound = await asyncio.wait_for(ready, timeout)
    try:
        yield config, bound
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 60.0) -> Any:
    """coro_fn() on a fresh uvloop (the relay's loop), failing after `timeout` seconds."""
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro_fn()

    return uvloop.run(bounded())


def make_cert(directory: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """A self-signed P-256 certificate for `hostname` and 127.0.0.1, valid +-1 day: (<host>.crt, <host>.key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    crt, keyfile = directory / f"{hostname}.crt", directory / f"{hostname}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return crt, keyfile


def server_tls(directory: Path) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2+) with a make_cert() certificate for localhost."""
    crt, key = make_cert(directory)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(crt), str(key))
    return ctx


@contextlib.asynccontextmanager
async def relay(tls: ssl.SSLContext | None = None, **kw: Any) -> AsyncIterator[tuple[DerpServer, str]]:
    """A DerpServer(**kw) behind its HTTP front on a free port: (server, its /derp URL); closed on exit."""
    server = DerpServer(keys.generate_private_key(), **kw)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: RelayHTTPProtocol(server), "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield server, f"{'https' if tls else 'http'}://127.0.0.1:{port}/derp"
    finally:
        listener.close()
        server.close()
        await asyncio.sleep(0.01)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll `predicate` (every 10 ms) until true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def payload(i: int) -> bytes:
    # sizes vary from 4 to ~1400 bytes; contents depend on the sequence number
    size = 4 + (i * 37) % 1400
    return i.to_bytes(4, "big") + bytes([i & 0xFF]) * (size - 4)


async def exchange(a: DerpClient, b: DerpClient, count: int, window: int = 64) -> None:
    """a sends `count` packets to b in windows, waiting for each window to arrive (no congestion)."""
    expect = 0
    for start in range(0, count, window):
        end = min(start + window, count)
        a.send_many(b.public_key, [payload(i) for i in range(start, end)])
        await a.drain()
        while expect < end:
            for msg in await b.recv_many():
                if isinstance(msg, codec.ReceivedPacket):
                    assert msg.source == a.public_key
                    assert msg.data == payload(expect), f"packet {expect} lost or altered"
                    expect += 1


async def raw_upgrade(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A bare TCP connection upgraded to DERP (HTTP 101 read), for tests that write the frames themselves."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    return reader, writer


async def connected_clients(url: str, count: int = 2, **connect_kw: Any) -> list[DerpClient]:
    """`count` new DerpClients (fresh keys), each connected to `url` in turn (so registered in that order)."""
    clients = [DerpClient() for _ in range(count)]
    for c in clients:
        await c.connect(url, **connect_kw)
    return clients
