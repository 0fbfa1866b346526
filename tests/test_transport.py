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

from turbowg.device import route
from turbowg.device.replay import ReplayWindow as PyReplayWindow
from turbowg.noise import transport
from turbowg.noise.transport import PyAead, padded_length

needs_c = pytest.mark.skipif(not transport.HAVE_C, reason="C extension turbowg.noise._aead not built")
KEY = bytes(range(32))
MTU = 1420


def implementations() -> list:
    """PyAead, and the C Aead, or in its place a recorded skip: the C case never just vanishes
    (and tests/test_accel.py fails a CI run without the extension)."""
    if transport.HAVE_C:
        from turbowg.noise._aead import Aead

        c_case = pytest.param(Aead, id="c")
    else:
        c_case = pytest.param(None, id="c", marks=pytest.mark.skip(
            reason="C extension turbowg.noise._aead not built (or TURBOWG_NO_C set): C case not run"))
    return [pytest.param(PyAead, id="py"), c_case]


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


def open_and_route(impl, key: bytes, buf, off: int, end: int, stride: int, receiver: int, replay,
                   allowed_src: bytes, out, out_idx: int) -> tuple[int, ...]:
    """The receive path's two steps, as the device runs them: the noise layer opens, the device checks the inner
    headers and sources (C with C, Python with Python). Returns (end, n_out, auth_fail, replay, expired,
    keepalive, bad_inner, src_mismatch, rx_bytes, authenticated, max_counter)."""
    opened = impl(key).open_batch(buf, off, end, stride, receiver, replay, out, out_idx)
    check = route.check_inner_sources_py if impl is PyAead else route.check_inner_sources
    inner = check(buf, out, out_idx, opened.count, allowed_src)
    return (opened.end, inner.kept, opened.auth_fail, opened.replay, opened.expired, opened.keepalive,
            inner.bad_inner, inner.src_mismatch, opened.rx_bytes, opened.authenticated, opened.max_counter)


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
    result = open_and_route(impl, KEY, buf, 0, len(buf), stride, receiver, replay, b"\x0a\x00\x00\x01", out, 3)
    end, n_out, auth_fail, replayed, expired, keepalive, bad_inner, mismatch, rx_bytes, authenticated, top = result
    assert (end, n_out, auth_fail, replayed, mismatch, authenticated, top) == (len(buf), 5, 1, 0, 1, 5, 5)
    assert rx_bytes == 5 * stride and keepalive == 0 and bad_inner == 0 and expired == 0
    got = [bytes(buf[out[2 * k]:out[2 * k] + out[2 * k + 1]]) for k in range(3, 3 + n_out)]
    assert got[:2] == inner[:2] and got[2] == inner[3] and got[4] == inner[5]
    # The same counters again: the window refuses all but counter 2, whose first copy was forged.
    buf2, _ = gro_read([reference_message(KEY, p, receiver, i) for i, p in enumerate(inner)])
    result = open_and_route(impl, KEY, buf2, 0, len(buf2), stride, receiver, replay, b"", out, 0)
    assert result[1] == 1 and result[3] == 5 and result[2] == 0 and result[9] == 1


@pytest.mark.parametrize("impl", implementations())
def test_open_batch_stops_before_other_receivers_and_handshakes(impl) -> None:
    m0 = reference_message(KEY, ipv4(b"a" * 50), 5, 0)
    m1 = reference_message(KEY, ipv4(b"b" * 50), 6, 1)  # another index
    buf = bytearray(m0 + m1)
    out = array("i", [0] * 8)
    replay = transport.CReplayWindow() if impl is not PyAead else PyReplayWindow()
    result = open_and_route(impl, KEY, buf, 0, len(buf), len(m0), 5, replay, b"", out, 0)
    assert result[0] == len(m0) and result[1] == 1
    initiation = bytearray(148)
    initiation[0] = 1
    result = open_and_route(impl, KEY, initiation, 0, 148, 148, 5, replay, b"", out, 0)
    assert result[0] == 0 and result[1] == 0
    keepalive = reference_message(KEY, b"", 5, 9)
    result = open_and_route(impl, KEY, bytearray(keepalive), 0, 32, 32, 5, replay, b"", out, 0)
    assert result[1] == 0 and result[5] == 1 and result[9] == 1
    garbage = reference_message(KEY, b"\x00" * 30, 5, 10)  # authenticated, but not an IP packet
    result = open_and_route(impl, KEY, bytearray(garbage), 0, len(garbage), len(garbage), 5, replay, b"", out, 0)
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
    result = open_and_route(Aead, KEY, buf, 0, len(buf), stride, 5, transport.CReplayWindow(), b"", out, 0)
    assert result[1] == 0 and 0 <= result[0] <= len(buf)


@needs_c
def test_random_keys_interoperate_between_c_and_python() -> None:
    key = os.urandom(32)
    packets = [ipv4(os.urandom(n)) for n in (1, 100, 1380)]
    buf, layout = packed(packets)
    dst = bytearray(8192)
    sizes = array("i", [0] * 3)
    sealer = transport.Aead(key)  # the C one (needs_c)
    sealer.seal_batch(buf, layout, 0, 3, dst, 0, MTU, 1, 0, sizes, 0)
    out = array("i", [0] * 6)
    pos = 0
    for k in range(3):
        one = bytearray(dst[pos:pos + sizes[k]])
        result = open_and_route(PyAead, key, one, 0, len(one), len(one), 1, PyReplayWindow(), b"", out, k)
        assert result[1] == 1 and bytes(one[out[2 * k]:out[2 * k] + out[2 * k + 1]]) == packets[k]
        pos += sizes[k]


@pytest.mark.parametrize("impl", implementations())
def test_open_batch_leaves_forged_messages_as_they_came(impl) -> None:
    """A forged tag over genuine ciphertext must not leave the genuine plaintext in the caller's buffer."""
    receiver = 7
    secret = ipv4(b"secret!!" * 25)
    messages = [reference_message(KEY, ipv4(b"g" * 200), receiver, 0),
                reference_message(KEY, secret, receiver, 1),
                reference_message(KEY, ipv4(b"h" * 200), receiver, 2)]
    forged = bytearray(messages[1])
    forged[-1] ^= 1  # the tag
    messages[1] = bytes(forged)
    buf, stride = gro_read(messages)
    before = bytes(buf)
    out = array("i", [0] * 8)
    replay = transport.CReplayWindow() if impl is not PyAead else PyReplayWindow()
    result = impl(KEY).open_batch(buf, 0, len(buf), stride, receiver, replay, out, 0)
    assert (result.count, result.auth_fail, result.authenticated) == (2, 1, 2)
    assert bytes(buf[stride:2 * stride]) == before[stride:2 * stride]
    assert secret[20:] not in bytes(buf)


# -- differential: C against Python on forged, truncated and mixed batches ------------------------------------

_KINDS = ("ipv4", "ipv4_other_src", "ipv6", "ipv4_bad_length", "not_ip", "forged_tag", "forged_body", "replayed",
          "other_receiver", "expired", "handshake_type")


def _plaintext(kind: str, body: bytes) -> bytes:
    """`body` (the plaintext length of the batch) dressed as `kind`'s inner packet."""
    p = bytearray(body)
    length = len(p)
    if kind in ("ipv4", "ipv4_other_src", "ipv4_bad_length", "forged_tag", "forged_body", "replayed") \
            and length >= 20:
        p[0] = 0x45
        total = length + 1 if kind == "ipv4_bad_length" else max(20, length - (p[1] & 15))
        p[2:4] = total.to_bytes(2, "big")
        p[12:16] = b"\x0a\x00\x00\x09" if kind == "ipv4_other_src" else b"\x0a\x00\x00\x01"
    elif kind == "ipv6" and length >= 40:
        p[0] = 0x60
        p[4:6] = (length - 40).to_bytes(2, "big")
    elif kind == "not_ip" and length:
        p[0] = 0x10
    return bytes(p)


def _message(kind: str, body: bytes, receiver: int, counter: int) -> bytes:
    if kind == "other_receiver":
        receiver += 1
    if kind == "expired":
        counter = 2**64 - 1
    message = bytearray(reference_message(KEY, _plaintext(kind, body), receiver, counter))
    if kind == "forged_tag":
        message[-1] ^= 0x80
    elif kind == "forged_body" and len(message) > 32:
        message[16] ^= 1
    elif kind == "handshake_type":
        message[0] = 1
    return bytes(message)


def _open_all(impl, check, buf: bytearray, stride: int, receiver: int, replay, allowed: bytes) -> tuple:
    """Open a whole read as the device does: resume after each stop, skip a datagram that is not ours."""
    out = array("i", bytes(8 * 64))
    results = []
    pos, n = 0, 0
    aead = impl(KEY)
    while pos < len(buf):
        opened = aead.open_batch(buf, pos, len(buf), stride, receiver, replay, out, n)
        inner = check(buf, out, n, opened.count, allowed)
        results.append((tuple(opened), tuple(inner)))
        n += inner.kept
        pos = opened.end if opened.end > pos else pos + stride
    return results, list(out[:2 * n])


@needs_c
@given(st.sampled_from([0, 20, 40, 64, 100, 333]), st.lists(st.sampled_from(_KINDS), min_size=1, max_size=10),
       st.integers(0, 80), st.sampled_from([b"", b"\x0a\x00\x00\x01", bytes(16)]), st.data())
@settings(max_examples=150, deadline=None)
def test_open_and_route_c_matches_python(length: int, kinds: list[str], cut: int, allowed: bytes, data) -> None:
    from turbowg.noise._aead import Aead

    receiver = 0x0A0B0C0D
    messages = []
    for counter, kind in enumerate(kinds):
        body = data.draw(st.binary(min_size=length, max_size=length))
        messages.append(_message(kind, body, receiver, max(0, counter - 1) if kind == "replayed" else counter))
    messages[-1] = messages[-1][:max(0, len(messages[-1]) - cut)]  # maybe truncated
    stride = len(messages[0]) if len(messages) > 1 else max(1, len(messages[0]))
    original = b"".join(messages)
    buf_c, buf_py = bytearray(original), bytearray(original)
    got_c = _open_all(Aead, route.check_inner_sources, buf_c, stride, receiver, transport.CReplayWindow(), allowed)
    got_py = _open_all(PyAead, route.check_inner_sources_py, buf_py, stride, receiver, PyReplayWindow(), allowed)
    assert got_c == got_py
    assert buf_c == buf_py
    # Nothing that failed authentication was touched.
    for k, kind in enumerate(kinds):
        if kind.startswith("forged"):
            assert buf_c[k * stride:(k + 1) * stride] == original[k * stride:(k + 1) * stride]


@pytest.mark.skipif(not route.HAVE_C, reason="C extension turbowg.device._route not built")
@given(st.binary(max_size=600), st.lists(st.tuples(st.integers(0, 600), st.integers(0, 120)), max_size=12),
       st.sampled_from([b"", b"\x0a\x00\x00\x01", bytes(16)]))
@settings(max_examples=200, deadline=None)
def test_check_inner_sources_c_matches_python(data: bytes, spans: list[tuple[int, int]], allowed: bytes) -> None:
    buf = bytearray(data)
    spans = [(off, length) for off, length in spans if off + length <= len(buf)]
    layout_c = array("i", [v for span in spans for v in span] + [0, 0])
    layout_py = array("i", layout_c)
    assert tuple(route.check_inner_sources(buf, layout_c, 0, len(spans), allowed)) == \
        tuple(route.check_inner_sources_py(buf, layout_py, 0, len(spans), allowed))
    assert layout_c == layout_py
