"""Shared by the DERP mesh/shard tests: a flow-controlled, verifiable packet exchange between two clients.

The sender keeps at most `window` packets unacknowledged; the receiver checks every packet (exact
bytes, strictly increasing sequence: one path of TCP hops preserves order, so any gap is a loss) and
acknowledges through the relay(s) in the opposite direction, which exercises both directions.
"""

from __future__ import annotations

import asyncio
import os

from turbowg.derp.client import DerpClient
from turbowg.derp.codec import ReceivedPacket

_PATTERN = os.urandom(4096)
_ACK = b"ACK!"


def payload(seq: int) -> bytes:
    """Packet `seq`: 8-byte sequence number + 8..1200 bytes that depend on seq."""
    size = 8 + (seq * 7919) % 1193
    start = (seq * 31) % 2048
    return seq.to_bytes(8, "big") + _PATTERN[start : start + size]


async def exchange(sender: DerpClient, receiver: DerpClient, count: int, *, window: int = 256,
                   batch: int = 64, timeout: float = 90.0) -> None:
    """Send `count` packets sender -> receiver; raise AssertionError on any loss, reordering or alteration."""
    acked = 0
    ack_event = asyncio.Event()
    ack_every = max(1, window // 4)

    async def receive() -> None:
        expected = 0
        while expected < count:
            for msg in await receiver.recv_many():
                if not isinstance(msg, ReceivedPacket) or msg.source != sender.public_key:
                    continue
                seq = int.from_bytes(msg.data[:8], "big")
                assert seq == expected, f"expected packet {expected}, got {seq} (lost or reordered)"
                assert msg.data == payload(seq), f"packet {seq} altered"
                expected += 1
                if expected % ack_every == 0 or expected == count:
                    receiver.send(sender.public_key, _ACK + expected.to_bytes(8, "big"))

    async def read_acks() -> None:
        nonlocal acked
        while acked < count:
            for msg in await sender.recv_many():
                if isinstance(msg, ReceivedPacket) and msg.source == receiver.public_key and msg.data[:4] == _ACK:
                    acked = max(acked, int.from_bytes(msg.data[4:12], "big"))
                    ack_event.set()

    async def send() -> None:
        seq = 0
        while seq < count:
            room = window - (seq - acked)
            if room <= 0:
                ack_event.clear()
                await ack_event.wait()
                continue
            n = min(room, batch, count - seq)
            sender.send_many(receiver.public_key, [payload(s) for s in range(seq, seq + n)])
            seq += n
            await sender.drain()

    async with asyncio.timeout(timeout):
        tasks = [asyncio.create_task(coro) for coro in (receive(), read_acks(), send())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
    assert acked == count
