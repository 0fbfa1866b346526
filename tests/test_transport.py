"""Batched transport AEAD (turbowg/noise/transport.py): the C version against the Python one and against
`cryptography` directly, without sockets."""

from __future__ import annotations

import os
import struct
from array import array

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from turbowg.device.replay import ReplayWindow as PyReplayWindow
from turbowg.noise import transport
from turbowg.noise.transport import PyAead, padded_length

needs_c = pytest.mark.skipif(not transport.HAVE_C, reason="C extension turbowg.noise._aead not built")
KEY = bytes(range(32))
MTU = 1420


def implementations() -> list:
    impls = [PyAead]
    if transport.HAVE_C:
        from turbowg.noise._aead import Aead

        impls.append(Aead)
    return impls


def packed(packets: list[bytes]) -> tuple[bytearray, array]:
    buf = bytearray()
    layout = array("i")
    for p in packets:
        layout.extend([len(buf), len(p)])
        buf += p
    return buf, layout


def ipv4(payload: bytes, src: bytes = b"\x0a\x00\x00\x01") -> bytes:
    total = 20 + len(payload)
    return bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes(8) + src + b"\x0a\x00\x00\x02" + payload


def reference_message(key: bytes, packet: bytes, receiver: int, counter: int, mtu: int = MTU) -> bytes:
    plain = packet + bytes(padded_length(len(packet), mtu) - len(packet))
    sealed = ChaCha20Poly1305(key).encrypt(bytes(4) + struct.pack("<Q", counter), plain, None)
    return struct.pack("<IIQ", 4, receiver, counter) + sealed


@pytest.mark.parametrize("impl", implementations())
@given(st.lists(st.binary(max_size=1600), min_size=1, max_size=12), st.integers(0, 2**32 - 1),
       st.integers(0, 2**60))
@settings(max_examples=60, deadline=None)
def test_seal_batch_matches_reference(impl, packets, receiver, counter) -> None:
    buf, layout = packed(packets)
    dst = bytearray(64 * 1024)
    sizes = array("i", [0] * (len(packets) + 2))
    written = impl(KEY).seal_batch(buf, layout, 0, len(packets), dst, 7, MTU, receiver, counter, sizes, 1)
    expected = [reference_message(KEY, p, receiver, counter + i) for i, p in enumerate(packets)]
    assert written == sum(map(len, expected))
    assert bytes(dst[7:7 + written]) == b"".join(expected)
    assert list(sizes[1:1 + len(packets)]) == [len(m) for m in expected]
    # seal_list gives the same bytes
    dst2 = bytearray(64 * 1024)
    assert impl(KEY).seal_list(list(packets), dst2, 7, MTU, receiver, counter, sizes, 1) == written
    assert dst2[7:7 + written] == dst[7:7 + written]


@pytest.mark.parametrize("impl", implementations())
def test_seal_batch_subrange_and_bounds(impl) -> None:
    packets = [ipv4(bytes([i]) * 100) for i in range(5)]
    buf, layout = packed(packets)
    sizes = array("i", [0] * 8)
    dst = bytearray(4096)
    n = impl(KEY).seal_batch(buf, layout, 2, 2, dst, 0, MTU, 9, 100, sizes, 0)
    assert dst[:n] == reference_message(KEY, packets[2], 9, 100) + reference_message(KEY, packets[3], 9, 101)
    with pytest.raises(BufferError):
        impl(KEY).seal_batch(buf, layout, 0, 5, bytearray(100), 0, MTU, 9, 0, sizes, 0)
    bad = array("i", [0, len(buf) + 1])
    with pytest.raises(BufferError):
        impl(KEY).seal_batch(buf, bad, 0, 1, dst, 0, MTU, 9, 0, sizes, 0)


def gro_read(messages: list[bytes]) -> tuple[bytearray, int]:
    """Messages back to back, as one UDP_GRO read: all of the first one's size but maybe the last."""
    stride = len(messages[0])
    assert all(len(m) == stride for m in messages[:-1]) and len(messages[-1]) <= stride
    return bytearray(b"".join(messages)), stride


@pytest.mark.parametrize("impl", implementations())
def test_open_batch_opens_checks_and_stops(impl) -> None:
    receiver = 0x01020304
    inner = [ipv4(bytes([i]) * 1000) for i in range(6)]
    messages = [reference_message(KEY, p, receiver, i) for i, p in enumerate(inner)]
    messages[2] = messages[2][:-1] + bytes([messages[2][-1] ^ 1])  # forged tag
    messages[4] = reference_message(KEY, ipv4(bytes([4]) * 1000, src=b"\x0a\x00\x00\x09"), receiver, 4)
    buf, stride = gro_read(messages)
    out = array("i", [0] * 64)
    replay = transport.CReplayWindow() if impl is not PyAead else PyReplayWindow()
    result = impl(KEY).open_batch(buf, 0, len(buf), stride, receiver, replay, b"\x0a\x00\x00\x01", out, 3)
    end, n_out, auth_fail, replayed, expired, keepalive, bad_inner, mismatch, rx_bytes, authenticated, top = result
    assert (end, n_out, auth_fail, replayed, mismatch, authenticated, top) == (len(buf), 5, 1, 0, 1, 5, 5)
    assert rx_bytes == 5 * stride and keepalive == 0 and bad_inner == 0 and expired == 0
    got = [bytes(buf[out[2 * k]:out[2 * k] + out[2 * k + 1]]) for k in range(3, 3 + n_out)]
    assert got[:2] == inner[:2] and got[2] == inner[3] and got[4] == inner[5]
    # The same counters again: the window refuses all but counter 2, whose first copy was forged.
    buf2, _ = gro_read([reference_message(KEY, p, receiver, i) for i, p in enumerate(inner)])
    result = impl(KEY).open_batch(buf2, 0, len(buf2), stride, receiver, replay, b"", out, 0)
    assert result[1] == 1 and result[3] == 5 and result[2] == 0 and result[9] == 1


@pytest.mark.parametrize("impl", implementations())
def test_open_batch_stops_before_other_receivers_and_handshakes(impl) -> None:
    m0 = reference_message(KEY, ipv4(b"a" * 50), 5, 0)
    m1 = reference_message(KEY, ipv4(b"b" * 50), 6, 1)  # another index
    buf = bytearray(m0 + m1)
    out = array("i", [0] * 8)
    replay = transport.CReplayWindow() if impl is not PyAead else PyReplayWindow()
    result = impl(KEY).open_batch(buf, 0, len(buf), len(m0), 5, replay, b"", out, 0)
    assert result[0] == len(m0) and result[1] == 1
    initiation = bytearray(148)
    initiation[0] = 1
    result = impl(KEY).open_batch(initiation, 0, 148, 148, 5, replay, b"", out, 0)
    assert result[0] == 0 and result[1] == 0
    keepalive = reference_message(KEY, b"", 5, 9)
    result = impl(KEY).open_batch(bytearray(keepalive), 0, 32, 32, 5, replay, b"", out, 0)
    assert result[1] == 0 and result[5] == 1 and result[9] == 1
    garbage = reference_message(KEY, b"\x00" * 30, 5, 10)  # authenticated, but not an IP packet
    result = impl(KEY).open_batch(bytearray(garbage), 0, len(garbage), len(garbage), 5, replay, b"", out, 0)
    assert result[1] == 0 and result[6] == 1


@needs_c
@given(st.lists(st.integers(0, 20000), max_size=300))
@settings(max_examples=150, deadline=None)
def test_c_replay_window_matches_python(counters: list[int]) -> None:
    c, py = transport.CReplayWindow(), PyReplayWindow()
    for counter in counters:
        assert c.accept(counter) == py.accept(counter)


@needs_c
def test_c_replay_window_edges() -> None:
    c = transport.CReplayWindow()
    assert not c.accept(-1)
    assert not c.accept(2**64 - 2**13 - 1)
    assert not c.accept(2**70)
    assert c.accept(10_000) and not c.accept(10_000)
    assert not c.accept(10_000 - 8192 - 1)
    c.reset()
    assert c.accept(10_000)


@needs_c
@given(st.binary(min_size=0, max_size=3000), st.integers(1, 1500))
@settings(max_examples=200, deadline=None)
def test_open_batch_never_crashes_on_junk(data: bytes, stride: int) -> None:
    from turbowg.noise._aead import Aead

    buf = bytearray(struct.pack("<II", 4, 5) + data)
    out = array("i", [0] * 8)
    result = Aead(KEY).open_batch(buf, 0, len(buf), stride, 5, transport.CReplayWindow(), b"", out, 0)
    assert result[1] == 0 and 0 <= result[0] <= len(buf)


def test_random_keys_interoperate_between_c_and_python() -> None:
    key = os.urandom(32)
    packets = [ipv4(os.urandom(n)) for n in (1, 100, 1380)]
    buf, layout = packed(packets)
    dst = bytearray(8192)
    sizes = array("i", [0] * 3)
    sealer = implementations()[-1](key)
    sealer.seal_batch(buf, layout, 0, 3, dst, 0, MTU, 1, 0, sizes, 0)
    out = array("i", [0] * 6)
    pos = 0
    for k in range(3):
        one = bytearray(dst[pos:pos + sizes[k]])
        result = PyAead(key).open_batch(one, 0, len(one), len(one), 1, PyReplayWindow(), b"", out, k)
        assert result[1] == 1 and bytes(one[out[2 * k]:out[2 * k] + out[2 * k + 1]]) == packets[k]
        pos += sizes[k]
