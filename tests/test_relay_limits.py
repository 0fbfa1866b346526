"""-accept-connection-limit/-burst and -client-rate-limits, through the app (RelayConfig -> serve_worker)
over loopback: a burst of connections past the bucket is closed and later ones are accepted again; a
rate-limited client's throughput stays near its limit while an unlimited one is not slowed, nothing is
dropped (the relay reads slower), and a SIGHUP to the process reloads the file; malformed files are
refused with the line and the reason."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import pytest
import uvloop

from turbowg.derp import codec, keys
from turbowg.derp.client import DerpClient
from turbowg.relay.app import RelayConfig, RelayConfigError, prepare
from turbowg.testing.relay import serving_relay

TIMEOUT = 15.0


@contextlib.asynccontextmanager
async def relay(**kw: Any) -> AsyncIterator[tuple[Any, int]]:
    async with serving_relay(TIMEOUT, **kw) as (config, bound):
        yield config, bound[0][1]


async def probe(port: int) -> bool:
    """True if the relay served GET /derp/probe on a new connection, False if it closed it unanswered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            data = await reader.read(100)
        return data.startswith(b"HTTP/1.1 200")
    except ConnectionError:
        return False
    finally:
        writer.close()


def test_accept_connection_limit_closes_a_burst_then_accepts_again() -> None:
    async def main() -> None:
        async with relay(accept_connection_limit=2.0, accept_connection_burst=3) as (_config, port):
            results = [await probe(port) for _ in range(8)]
            assert results[:3] == [True, True, True]  # the burst
            assert results.count(True) <= 4 and results[-1] is False  # then closed at once (maybe one refill)
            await asyncio.sleep(1.1)  # 2/s refills two tokens
            assert await probe(port) and await probe(port)
            # the counters derper's rate-limited listener exports
            await asyncio.sleep(1.0)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            text = (await asyncio.wait_for(reader.read(), 5)).decode()
            writer.close()
            rejected = float(text.split("\ntls_listener_rejected_connections ")[1].split()[0])
            accepted = float(text.split("\ntls_listener_accepted_connections ")[1].split()[0])
            assert rejected == results.count(False) and accepted >= 6

    uvloop.run(main())


def test_accept_limit_defaults_are_unlimited() -> None:
    async def main() -> None:
        async with relay() as (_config, port):
            assert all([await probe(port) for _ in range(30)])

    uvloop.run(main())


class Flow:
    """`sender` -> a receiver of its own, sending as fast as the relay takes it; rates measured at the receiver."""

    def __init__(self, sender: DerpClient) -> None:
        self.sender = sender
        self.receiver = DerpClient()
        self.received = 0
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, url: str) -> None:
        await self.sender.connect(url)
        await self.receiver.connect(url)
        self.tasks = [asyncio.create_task(self._send()), asyncio.create_task(self._recv())]

    async def _send(self) -> None:
        batch = [b"\x00" * 1400] * 16
        while True:
            self.sender.send_many(self.receiver.public_key, batch)
            await self.sender.drain()
            await asyncio.sleep(0)

    async def _recv(self) -> None:
        while True:
            for msg in await self.receiver.recv_many():
                if isinstance(msg, codec.ReceivedPacket):
                    self.received += len(msg.data)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for c in (self.sender, self.receiver):
            await c.close()


async def rates(flows: list[Flow], seconds: float = 2.0) -> list[float]:
    before = [f.received for f in flows]
    await asyncio.sleep(seconds)
    return [(f.received - b) / seconds for f, b in zip(flows, before, strict=True)]


def test_per_client_rate_limit_backpressure_and_sighup_reload(tmp_path: Path) -> None:
    limited, unlimited = DerpClient(), DerpClient()
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps({"clients": {
        keys.format_public_key(limited.public_key): {"bytes_per_sec": 600_000, "burst": 64_000}}}))

    async def main() -> None:
        async with relay(client_rate_limits=str(limits)) as (_config, port):
            url = f"http://127.0.0.1:{port}/derp"
            flows = [Flow(limited), Flow(unlimited)]
            for f in flows:
                await f.start(url)
            await asyncio.sleep(1.0)  # past the burst and the socket buffers filling
            slow, fast = await rates(flows, 3.0)
            assert 400_000 < slow < 800_000, slow  # ~600 kB/s of reads (frame headers count too)
            assert fast > 5 * slow, (fast, slow)
            # reload: the limited client gets 4x more, everyone else a default limit
            limits.write_text(json.dumps({
                "default": {"bytes_per_sec": 800_000},
                "clients": {keys.format_public_key(limited.public_key): {"bytes_per_sec": 2_400_000,
                                                                         "burst": 64_000}}}))
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(1.5)
            slow2, capped = await rates(flows, 3.0)
            assert 1_600_000 < slow2 < 3_200_000, slow2
            assert 530_000 < capped < 1_070_000, capped
            # a malformed file on SIGHUP keeps the limits in force
            limits.write_text('{"default": {"bytes_per_sec": "fast"}}')
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.5)
            slow3, capped3 = await rates(flows, 3.0)
            assert 1_600_000 < slow3 < 3_200_000 and 530_000 < capped3 < 1_070_000, (slow3, capped3)
            for f in flows:
                await f.stop()

    uvloop.run(main())


def test_rate_limited_sender_loses_nothing(tmp_path: Path) -> None:
    """Backpressure, not loss: every packet a limited client sends arrives, in order."""
    limited = DerpClient()
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps({"default": {"bytes_per_sec": 400_000, "burst": 20_000}}))

    async def main() -> None:
        async with relay(client_rate_limits=str(limits)) as (_config, port):
            url = f"http://127.0.0.1:{port}/derp"
            receiver = DerpClient()
            await limited.connect(url)
            await receiver.connect(url)
            n = 600  # 600 * 1000 B = 600 kB: ~1.5 s at 400 kB/s
            started = time.monotonic()
            for i in range(n):
                limited.send(receiver.public_key, i.to_bytes(4, "big") * 250)
                await limited.drain()
            got = []
            async with asyncio.timeout(TIMEOUT):
                while len(got) < n:
                    for msg in await receiver.recv_many():
                        if isinstance(msg, codec.ReceivedPacket):
                            got.append(int.from_bytes(msg.data[:4], "big"))
            elapsed = time.monotonic() - started
            assert got == list(range(n))
            assert elapsed > 1.0, elapsed  # it was slowed down, not dropped
            await limited.close()
            await receiver.close()

    uvloop.run(main())


@pytest.mark.parametrize("text, where", [
    ('{"default": {"bytes_per_sec": 10}, "clients": {\n  "nodekey:12": {"bytes_per_sec": 5}\n}}', ":2: client"),
    ('{\n "default": {"bytes_per_sec": -5}\n}', ":2: default: bytes_per_sec must be"),
    ('{\n "default": {"bytes_per_sec": 5, "burts": 3}\n}', ":2: default: unknown field(s) burts"),
    ('{\n "defaults": {}\n}', ":2: unknown key 'defaults'"),
    ('{"default": {"bytes_per_sec": 5},\n\n ]', ":3: not JSON"),
])
def test_malformed_rate_limit_file_is_refused_with_line_and_reason(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "limits.json"
    path.write_text(text)
    with pytest.raises(RelayConfigError) as info:
        prepare(RelayConfig(dev=True, client_rate_limits=str(path)))
    assert f"{path}{where}" in str(info.value)
    proc = subprocess.run([sys.executable, "-m", "turbowg", "relay", "-dev", "-a", "127.0.0.1:0", "-stun=false",
                           "--workers", "1", "-client-rate-limits", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and f"{path}{where}" in proc.stderr


def read_until(stream: IO[str], lines: list[str], text: str, count: int, deadline: float) -> int:
    """Read lines from `stream` into `lines` until `count` of them hold `text` (or end of stream, or `deadline`);
    how many do."""
    while sum(text in ln for ln in lines) < count and time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
    return sum(text in ln for ln in lines)


def test_sighup_reaches_every_worker_of_a_sharded_relay(tmp_path: Path) -> None:
    """`turbowg relay --workers 2 -client-rate-limits FILE`: SIGHUP to the supervisor reloads the file in both
    workers and stops nothing (without a handler SIGHUP would end the process)."""
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps({"default": {"bytes_per_sec": 1_000_000}}))
    proc = subprocess.Popen([sys.executable, "-m", "turbowg", "relay", "-dev", "-a", "127.0.0.1:0", "-stun=false",
                             "--workers", "2", "-client-rate-limits", str(limits)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        assert read_until(proc.stdout, lines, "listening on", 2, deadline) == 2, "".join(lines)
        time.sleep(0.3)
        limits.write_text(json.dumps({"default": {"bytes_per_sec": 2_000_000}, "clients": {}}))
        proc.send_signal(signal.SIGHUP)
        assert read_until(proc.stdout, lines, "rate limits reloaded", 2, deadline) == 2, "".join(lines)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(15)
