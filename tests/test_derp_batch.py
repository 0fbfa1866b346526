"""FrameDecoder.feed_packets (the batch receive path of a WireGuard device on DERP) against the per-frame
decoder (`feed` + decode_server_message), on random frame streams split at random and at every byte boundary."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turbowg.derp.client_proto import _client_limit
from turbowg.derp.codec import (
    FrameDecoder,
    FrameError,
    FrameType,
    ReceivedPacket,
    decode_server_message,
    encode_frame,
    encode_recv_packet,
)

DIVERT = b"TWdisc"
KEYS = [bytes([i]) * 32 for i in range(1, 4)]


def reference(stream_parts: list[bytes], divert: bytes) -> tuple[bytes, list[int], list[bytes], list[tuple[int, bytes]]]:
    """The per-frame decoder, then the same grouping as the batch decoder (as DerpLink did per message)."""
    dec = FrameDecoder(_client_limit)
    out = bytearray()
    chunks: list[int] = []
    sources: list[bytes] = []
    others: list[tuple[int, bytes]] = []
    open_run = False
    stride = 0
    for part in stream_parts:
        open_run = False  # runs never span two reads
        for ftype, payload in dec.feed(part):
            msg = decode_server_message(ftype, payload)
            if not isinstance(msg, ReceivedPacket) or not msg.data or (divert and msg.data.startswith(divert)):
                others.append((ftype, payload))
                continue
            size = len(msg.data)
            if open_run and msg.source == sources[-1] and size <= stride:
                chunks[-2] = len(out) + size
                open_run = size == stride
            else:
                chunks += (len(out), len(out) + size, size)
                sources.append(msg.source)
                stride = size
                open_run = True
            out += msg.data
    return bytes(out), chunks, sources, others


def batch(stream_parts: list[bytes], divert: bytes) -> tuple[bytes, list[int], list[bytes], list[tuple[int, bytes]]]:
    dec = FrameDecoder(_client_limit)
    out = bytearray()
    chunks: list[int] = []
    sources: list[bytes] = []
    others: list[tuple[int, bytes]] = []
    for part in stream_parts:
        others += dec.feed_packets(part, out, chunks, sources, divert)
    return bytes(out), chunks, sources, others


def _frame(kind: int, key: int, size: int, disco: bool) -> bytes:
    if kind == 0:
        body = (DIVERT if disco else b"\x04\x00\x00\x00") + bytes(range(256)) * (size // 256 + 1)
        return encode_recv_packet(KEYS[key], body[:size])
    if kind == 1:
        return encode_frame(FrameType.KEEP_ALIVE)
    if kind == 2:
        return encode_frame(FrameType.PING, b"12345678")
    if kind == 3:
        return encode_frame(FrameType.PEER_GONE, KEYS[key] + b"\x00")
    return encode_frame(0x77, b"x" * (size % 50))  # unknown type


frames = st.lists(
    st.builds(_frame, st.sampled_from([0, 0, 0, 0, 0, 0, 1, 2, 3, 4]), st.integers(0, 2),
              st.sampled_from([0, 1, 3, 5, 6, 40, 100, 100, 100, 1420, 1420]), st.booleans()),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(frames, st.lists(st.integers(0, 1 << 16), max_size=6), st.sampled_from([DIVERT, b""]))
def test_batch_matches_per_frame_decoder(frame_list, cuts, divert) -> None:
    stream = b"".join(frame_list)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    parts = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert batch(parts, divert) == reference(parts, divert)


@settings(max_examples=30, deadline=None)
@given(frames)
def test_every_byte_boundary(frame_list) -> None:
    stream = b"".join(frame_list)
    for cut in range(len(stream) + 1):
        parts = [stream[:cut], stream[cut:]]
        assert batch(parts, DIVERT) == reference(parts, DIVERT)
    # byte by byte: nothing may be lost or duplicated
    parts = [stream[i:i + 1] for i in range(len(stream))]
    assert batch(parts, DIVERT) == reference(parts, DIVERT)


def test_runs_group_equal_sizes_per_source() -> None:
    a, b = KEYS[0], KEYS[1]
    stream = b"".join([encode_recv_packet(a, b"x" * 100)] * 3 + [encode_recv_packet(a, b"y" * 60),
                      encode_recv_packet(a, b"z" * 100), encode_recv_packet(b, b"w" * 100)])
    out, chunks, sources, others = batch([stream], DIVERT)
    assert chunks == [0, 360, 100, 360, 460, 100, 460, 560, 100]
    assert sources == [a, a, b]
    assert others == []
    assert out == b"x" * 300 + b"y" * 60 + b"z" * 100 + b"w" * 100


def test_memoryview_and_bytearray_input() -> None:
    stream = encode_recv_packet(KEYS[0], b"\x04" + b"a" * 99) * 2 + encode_frame(FrameType.KEEP_ALIVE)
    for data in (bytearray(stream), memoryview(stream)):
        assert batch([data], DIVERT) == reference([stream], DIVERT)


@pytest.mark.parametrize("bad", [
    encode_frame(FrameType.RECV_PACKET, b"k" * 31),  # shorter than a key
    b"\x05" + (70000).to_bytes(4, "big"),  # over the RecvPacket limit: refused before the payload arrives
    b"\x06" + (2 << 20).to_bytes(4, "big"),
])
def test_bad_frames_raise_like_feed(bad) -> None:
    def per_frame() -> None:
        dec = FrameDecoder(_client_limit)
        for ftype, payload in dec.feed(bad):
            decode_server_message(ftype, payload)

    def batched() -> None:
        dec = FrameDecoder(_client_limit)
        for ftype, payload in dec.feed_packets(bad, bytearray(), [], []):
            decode_server_message(ftype, payload)

    with pytest.raises(FrameError):
        per_frame()
    with pytest.raises(FrameError):
        batched()


def test_client_packet_handler_through_a_relay() -> None:
    """DerpClient.set_packet_handler end to end through the in-process relay: batches for packets, messages for
    the rest (diverted disco-looking packets, pings), and write_blocked is a plain bool."""
    from turbowg.derp import keys
    from turbowg.derp.client import DerpClient
    from turbowg.relay.http import RelayHTTPProtocol
    from turbowg.relay.server import DerpServer

    async def main() -> None:
        server = DerpServer(keys.generate_private_key())
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: RelayHTTPProtocol(server), "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/derp"
        try:
            async with DerpClient() as sender, DerpClient() as receiver:
                await sender.connect(url)
                await receiver.connect(url)
                got: list[tuple[bytes, list[int], list[bytes]]] = []
                receiver.set_packet_handler(lambda buf, chunks, sources: got.append((bytes(buf), chunks, sources)),
                                            divert=DIVERT)
                assert receiver.write_blocked is False
                await receiver.ping()  # the receiver is registered on the relay
                packets = [b"\x04\x00\x00\x00" + bytes([i]) * 200 for i in range(50)]
                sender.send_many(receiver.public_key, packets)
                sender.send(receiver.public_key, DIVERT + b"disco")
                msg = await asyncio.wait_for(receiver.recv(), 5)
                while not isinstance(msg, ReceivedPacket):  # the Pong, keepalives
                    msg = await asyncio.wait_for(receiver.recv(), 5)
                assert msg.data == DIVERT + b"disco"
                for _ in range(100):
                    if sum(len(b) for b, _, _ in got) >= 50 * 204:
                        break
                    await asyncio.sleep(0.02)
                assert b"".join(b for b, _, _ in got) == b"".join(packets)
                assert all(s == sender.public_key for _, _, srcs in got for s in srcs)
        finally:
            srv.close()
            server.close()
            await asyncio.sleep(0.01)

    asyncio.run(main())
