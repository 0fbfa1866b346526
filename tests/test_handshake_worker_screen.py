"""The handshake worker's batch screener: the C one (turbowg/conn/_hsscreen.c) and its Python twin
(recvmmsg.PyScreener) give the same verdicts, counters and limiter state for the same recvmmsg buffers, and
the worker core's screened path decides as process_batch does."""

from __future__ import annotations

import hashlib
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turbowg import accel
from turbowg.conn import recvmmsg
from turbowg.conn.recvmmsg import (
    _GRO_CMSG_SPACE,
    _MMSGHDR_SIZE,
    _SOCKADDR_IN6,
    SLOT_BYTES,
    V_ACCEPT,
    V_COOKIE,
    V_FORWARD,
    V_MAC2,
    Mmsghdr,
    Msghdr,
    PyScreener,
)
from turbowg.device.handshake_worker import HandshakeWorkerCore
from turbowg.linux import SOL_UDP, UDP_GRO
from turbowg.noise.primitives import generate_private_key

try:
    from turbowg.conn import _hsscreen
except ImportError:
    # Optional in setup.py; a CI run that wants the C path (tests/test_accel.py's rule) fails instead.
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false") and not accel.forced_python():
        raise
    pytest.skip("C screener turbowg.conn._hsscreen not built (optional in setup.py)", allow_module_level=True)

KEY = hashlib.blake2s(b"responder", digest_size=32).digest()
_V4 = bytes(10) + b"\xff\xff"


def _mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def _message(kind: str, rnd: bytes, zero_mac2: bool) -> bytes:
    """A message of the given shape: valid/invalid mac1, zero or random mac2, wrong size, junk."""
    body_len = {"init": 116, "resp": 60}.get(kind, 0)
    if kind in ("init", "resp"):
        head = struct.pack("<I", 1 if kind == "init" else 2)
        body = head + (rnd * 8)[:body_len - 4]
        mac2 = bytes(16) if zero_mac2 else (rnd * 2 + b"\x01" * 16)[:16]
        return body + _mac(KEY, body) + mac2
    if kind == "badmac1":
        body = struct.pack("<I", 1) + (rnd * 8)[:112]
        return body + bytes(16) + bytes(16)
    if kind == "cookie":
        return struct.pack("<I", 3) + (rnd * 4)[:60]
    if kind == "badsize":
        return struct.pack("<I", 1) + rnd[:20]
    if kind == "badreserved":
        return b"\x01\x00\x01\x00" + (rnd * 8)[:144]
    if kind == "empty":
        return b""
    return rnd[:3]  # shorter than a header


SOURCES = [_V4 + bytes([10, 203, 0, i]) for i in range(1, 5)] + \
    [bytes.fromhex(f"fd000000000000{i:02x}") + os.urandom(8) for i in range(1, 3)]

kinds = st.sampled_from(["init", "init", "init", "resp", "badmac1", "cookie", "badsize", "badreserved", "short",
                         "empty"])
datagram = st.tuples(st.lists(st.tuples(kinds, st.binary(min_size=20, max_size=20), st.booleans()), min_size=1,
                              max_size=4),
                     st.integers(0, len(SOURCES) - 1), st.integers(1, 65535), st.booleans(), st.booleans())


def _buffers(datagrams: list) -> tuple[bytearray, bytearray, bytearray, bytearray, int]:
    """The four buffers recvmmsg would have filled for `datagrams` (GRO runs when several messages)."""
    n = len(datagrams)
    headers = bytearray(_MMSGHDR_SIZE * n)
    data = bytearray(SLOT_BYTES * n)
    names = bytearray(_SOCKADDR_IN6 * n)
    controls = bytearray(_GRO_CMSG_SPACE * n)
    for i, (messages, source, port, gro, truncated) in enumerate(datagrams):
        parts = [_message(kind, rnd, zero) for kind, rnd, zero in messages]
        if gro and len(parts) > 1:  # a GRO run: equal segments, the last may be shorter
            seg = len(parts[0])
            parts = [p[:seg] for p in parts]
            payload = b"".join(parts)
            struct.pack_into("=Qii", controls, i * _GRO_CMSG_SPACE, socket.CMSG_LEN(2), SOL_UDP, UDP_GRO)
            struct.pack_into("=H", controls, i * _GRO_CMSG_SPACE + 16, seg)
            controllen = _GRO_CMSG_SPACE
        else:
            payload = parts[0]
            controllen = 0
        data[i * SLOT_BYTES:i * SLOT_BYTES + len(payload)] = payload
        at = i * _SOCKADDR_IN6
        struct.pack_into("=H", names, at, socket.AF_INET6)
        names[at + 2:at + 4] = port.to_bytes(2, "big")
        names[at + 8:at + 24] = SOURCES[source]
        base = i * _MMSGHDR_SIZE
        struct.pack_into("=Q", headers, base + Msghdr.msg_controllen.offset, controllen)
        struct.pack_into("=i", headers, base + Msghdr.msg_flags.offset, 0x20 if truncated else 0)
        struct.pack_into("=I", headers, base + Mmsghdr.msg_len.offset, len(payload))
    return headers, data, names, controls, n


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.tuples(st.lists(datagram, min_size=1, max_size=12), st.booleans(),
                                  st.integers(0, 400_000_000)), min_size=1, max_size=6),
       max_entries=st.integers(1, 6))
def test_c_and_python_screeners_agree(batches, max_entries):
    c = _hsscreen.Screener(KEY, 20.0, 5, max_entries, 1_000_000_000)
    py = PyScreener(KEY, 20.0, 5, max_entries, 1_000_000_000)
    now = 10**12
    for datagrams, under_load, step in batches:
        now += step
        bufs = _buffers(datagrams)
        got_c = c.screen(*bufs, SLOT_BYTES, _GRO_CMSG_SPACE, now, under_load)
        got_py = py.screen(*bufs, SLOT_BYTES, _GRO_CMSG_SPACE, now, under_load)
        assert got_c == got_py
        assert c.buckets() == py.buckets()
        probe = SOURCES[step % len(SOURCES)]
        assert c.allow(probe, now) == py.allow(probe, now)


def test_screen_verdicts_and_counters():
    screener = recvmmsg.make_screener(KEY)
    rnd = os.urandom(20)
    flood = [([("init", rnd, True)], 0, 40000, False, False)] * 8
    other = [([("resp", rnd, False)], 1, 1, False, False), ([("cookie", rnd, False)], 1, 2, False, False),
             ([("badmac1", rnd, False)], 1, 3, False, False), ([("short", rnd, False)], 1, 4, False, True)]
    kept, counts = screener.screen(*_buffers(flood + other), SLOT_BYTES, _GRO_CMSG_SPACE, 10**12, True)
    verdicts = [k[0] for k in kept]
    # A new source's bucket starts with burst - 1 tokens and spends while more than one is left (as
    # ratelimiter.RateLimiter): 4 of the 8 zero-mac2 initiations from one source get a cookie reply.
    assert verdicts.count(V_COOKIE) == 4
    assert V_MAC2 in verdicts and V_FORWARD in verdicts
    other_n, bad_size, cookie_bad, bad_mac1, limited, truncated, messages = counts
    assert (other_n, bad_mac1, limited, truncated, messages) == (1, 1, 4, 1, 11)
    assert kept[0][2] == bytes([10, 203, 0, 1]) and kept[0][3] == 40000  # v4-mapped folded to 4 bytes
    # Not under load: everything with a valid mac1 is accepted, nothing is rate limited.
    kept, counts = screener.screen(*_buffers(flood), SLOT_BYTES, _GRO_CMSG_SPACE, 10**12 + 1, False)
    assert [k[0] for k in kept] == [V_ACCEPT] * 8 and counts[4] == 0


def test_mac1_matches_hashlib():
    for size in (1, 60, 64, 65, 116, 128, 129, 1000):
        data = os.urandom(size)
        assert _hsscreen.mac1(KEY, data) == _mac(KEY, data)


def test_screener_refuses_short_buffers():
    for screener in (_hsscreen.Screener(KEY), PyScreener(KEY)):
        with pytest.raises(ValueError):
            screener.screen(bytearray(8), bytearray(8), bytearray(8), bytearray(8), 1, SLOT_BYTES,
                            _GRO_CMSG_SPACE, 0, False)


def test_worker_core_screened_path_answers_as_process_batch():
    """The core's screened path: cookie replies for zero-mac2 floods under load, identification otherwise."""
    core = HandshakeWorkerCore()
    core.configure(1, generate_private_key(), [])
    assert core.screener is not None
    from turbowg.bench.flooder import build_initiation
    msg = build_initiation(core.identity.mac1_key)
    datagrams = [([("init", os.urandom(20), True)], 0, 1, False, False)]
    bufs = bytearray(SLOT_BYTES)
    bufs[:len(msg)] = msg
    headers, _data, names, controls, n = _buffers(datagrams)
    struct.pack_into("=I", headers, Mmsghdr.msg_len.offset, len(msg))
    now = 100.0
    kept, counts = core.screener.screen(headers, bufs, names, controls, n, SLOT_BYTES, _GRO_CMSG_SPACE,
                                        int(now * 1e9), core.load_for_chunk(1000, 1000, now))
    replies, identified, forwarded = core.process_screened(kept, counts[-1], now)
    assert len(replies) == 1 and not identified and core.counters["tx_cookie_reply"] == 1
    assert replies[0][0][0] == 3 and replies[0][1:] == (bytes([10, 203, 0, 1]), 1)
    # Not under load (a second worker, no flood): the random initiation goes to identification (rejected).
    calm = HandshakeWorkerCore()
    calm.configure(1, core.identity.private_key, [])
    kept, counts = calm.screener.screen(headers, bufs, names, controls, n, SLOT_BYTES, _GRO_CMSG_SPACE,
                                        int(now * 1e9), calm.load_for_chunk(1, 1, now))
    replies, identified, forwarded = calm.process_screened(kept, counts[-1], now)
    assert not replies and calm.counters["rx_initiation_rejected"] == 1


def test_python_fallback_is_used_without_c(monkeypatch):
    monkeypatch.setattr(recvmmsg, "use_c", lambda: False)
    assert isinstance(recvmmsg.make_screener(KEY), PyScreener)
    monkeypatch.setattr(recvmmsg, "use_c", lambda: True)
    assert isinstance(recvmmsg.make_screener(KEY), _hsscreen.Screener)


def test_cookie_replies_keep_the_cookie_per_secret_and_never_repeat_a_nonce():
    from turbowg.noise.cookie import CookieChecker, CookieGenerator
    from turbowg.noise.primitives import xaead_open

    public = os.urandom(32)
    checker = CookieChecker(public)
    msg = bytearray(148)
    msg[0] = 1
    CookieGenerator(public).add_macs(msg, 1.0)
    src = bytes([10, 203, 0, 1]) + (40000).to_bytes(2, "big")

    def cookie_of(reply: bytes) -> bytes:
        return xaead_open(checker.cookie_key, reply[8:32], reply[32:], bytes(msg[116:132]))

    replies = [checker.create_reply(msg, 7, src, 1.0 + i / 1000) for i in range(200)]
    assert len({r[8:32] for r in replies}) == 200  # nonces across several bulk draws
    assert len({cookie_of(r) for r in replies}) == 1
    # A new secret (after 120 s) makes a new cookie for the same source: the cached one is gone.
    later = checker.create_reply(msg, 7, src, 200.0)
    assert cookie_of(later) not in {cookie_of(replies[0]), None}
    # ... and what a sender proves with it is checked against the new secret.
    generator = CookieGenerator(public)
    generator.add_macs(msg, 200.0)
    assert generator.consume_reply(later, 200.0)
    generator.add_macs(msg, 200.0)
    assert checker.check_mac2(bytes(msg), src, 200.0)


def test_a_wake_that_read_a_flood_answers_what_was_accepted_before_it_knew():
    """The screener judged the first batches of a wake not under load (ACCEPT); the whole wake read more than
    UNDER_LOAD_BACKLOG, so those get cookie replies (rate limited), not a key exchange each."""
    from turbowg.bench.flooder import build_initiation
    from turbowg.device.handshake_worker import UNDER_LOAD_BACKLOG

    core = HandshakeWorkerCore()
    core.configure(1, generate_private_key(), [])
    kept = [(V_ACCEPT, 1, bytes([10, 203, 0, 1 + i % 4]), 40000, build_initiation(core.identity.mac1_key))
            for i in range(40)]
    replies, identified, _ = core.process_screened(kept, UNDER_LOAD_BACKLOG + 1, 100.0,
                                                   backlog=UNDER_LOAD_BACKLOG + 1)
    assert not identified and core.counters["rx_initiation_rejected"] == 0
    assert len(replies) == 4 * 4  # 4 sources, 4 replies each before their buckets run dry
    assert core.counters["tx_cookie_reply_ratelimited"] == 40 - 16
    # A small wake (no flood): the same messages go to identification.
    calm = HandshakeWorkerCore()
    calm.configure(1, core.identity.private_key, [])
    replies, identified, _ = calm.process_screened(kept[:3], 3, 100.0, backlog=3)
    assert not replies and calm.counters["rx_initiation_rejected"] == 3
