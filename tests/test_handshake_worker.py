"""turbowg.device.handshake_worker: the worker's decisions, without sockets (injected times)."""

from __future__ import annotations

import os
import struct

from turbowg.device.handshake_worker import (
    MSG_BATCH,
    MSG_CONFIG,
    MSG_RESULTS,
    QUEUE_SIZE,
    UNDER_LOAD_BACKLOG,
    UNDER_LOAD_HOLD,
    HandshakeWorkerCore,
    decode,
    encode_batch,
    encode_config,
    encode_results,
    identified_from_tuple,
)
from turbowg.noise.cookie import CookieGenerator
from turbowg.noise.handshake import (
    Handshake,
    HandshakeState,
    LocalIdentity,
    accept_identified,
    begin_session,
    consume_response,
    create_initiation,
    create_response,
)
from turbowg.noise.primitives import generate_private_key, hash_, mac
from turbowg.wire import MESSAGE_COOKIE_REPLY, MESSAGE_INITIATION, MESSAGE_RESPONSE

SRC = bytes([10, 203, 0, 7])
PORT = 40001
WALL = 1_700_000_000.0


def _keys():
    responder = LocalIdentity(generate_private_key())
    initiator = LocalIdentity(generate_private_key())
    return responder, initiator


def _core(responder: LocalIdentity, *peers: bytes) -> HandshakeWorkerCore:
    core = HandshakeWorkerCore()
    core.configure(1, responder.private_key, list(peers))
    return core


def _initiation(initiator: LocalIdentity, responder: LocalIdentity, gen: CookieGenerator, now: float,
                wall: float = WALL, index: int = 77) -> tuple[Handshake, bytes]:
    hs = Handshake(responder.public_key, local=initiator)
    msg = create_initiation(hs, index, wall)
    gen.add_macs(msg, now)
    return hs, bytes(msg)


def _flood_message(responder: LocalIdentity) -> bytes:
    body = struct.pack("<I", MESSAGE_INITIATION) + os.urandom(112)
    return body + mac(hash_(b"mac1----", responder.public_key), body) + bytes(16)


def test_bad_mac1_is_dropped_and_counted():
    responder, initiator = _keys()
    core = _core(responder, initiator.public_key)
    msg = bytearray(_flood_message(responder))
    msg[120] ^= 1  # inside mac1
    replies, identified, forwarded = core.process_batch(1, [(MESSAGE_INITIATION, SRC, PORT, bytes(msg))], 5.0)
    assert (replies, identified, forwarded) == ([], [], [])
    assert core.counters["rx_bad_mac1"] == 1
    assert core.processed == 1
    # Wrong sizes are counted apart, and so is a missing private key.
    core.process_batch(2, [(MESSAGE_RESPONSE, SRC, PORT, b"\x02" + bytes(90))], 5.0)
    assert core.counters["rx_handshake_bad_size"] == 1
    core.configure(2, None, [])
    core.process_batch(3, [(MESSAGE_INITIATION, SRC, PORT, _flood_message(responder))], 5.0)
    assert core.counters["rx_handshake_no_private_key"] == 1


def test_valid_initiation_is_identified_and_completes_a_handshake():
    responder, initiator = _keys()
    core = _core(responder, initiator.public_key)
    gen = CookieGenerator(responder.public_key)
    initiator_hs, msg = _initiation(initiator, responder, gen, 10.0)
    replies, identified, forwarded = core.process_batch(1, [(MESSAGE_INITIATION, SRC, PORT, msg)], 10.0)
    assert replies == [] and forwarded == []
    [entry] = identified
    generation, addr, port = entry[:3]
    assert (generation, addr, port) == (1, SRC, PORT)
    ident = identified_from_tuple(entry)
    assert ident.remote_static == initiator.public_key and ident.sender == 77
    # The main process: per-peer checks on the peer's Handshake, then the response as usual.
    responder_hs = Handshake(initiator.public_key, local=responder)
    assert accept_identified(responder_hs, ident, 10.0)
    assert responder_hs.state is HandshakeState.INITIATION_CONSUMED
    response = create_response(responder_hs, 99)
    keys_r = begin_session(responder_hs)
    assert consume_response(initiator, bytes(response), lambda i: initiator_hs if i == 77 else None) is initiator_hs
    keys_i = begin_session(initiator_hs)
    assert keys_i.send_key == keys_r.recv_key and keys_i.recv_key == keys_r.send_key
    # The same initiation again is a replay; a fresh one within 20 ms is a flood: both refused.
    assert not accept_identified(responder_hs, ident, 11.0)
    _, again = _initiation(initiator, responder, gen, 11.0, wall=WALL + 1)
    ident2 = identified_from_tuple(core.process_batch(2, [(MESSAGE_INITIATION, SRC, PORT, again)], 10.01)[1][0])
    assert not accept_identified(responder_hs, ident2, 10.01)
    assert accept_identified(responder_hs, ident2, 10.5)


def test_unknown_peer_and_random_content_are_rejected():
    responder, initiator = _keys()
    core = _core(responder)  # the initiator is not a configured peer
    gen = CookieGenerator(responder.public_key)
    _, msg = _initiation(initiator, responder, gen, 1.0)
    entries = [(MESSAGE_INITIATION, SRC, PORT, msg), (MESSAGE_INITIATION, SRC, PORT, _flood_message(responder))]
    assert core.process_batch(2, entries, 1.0) == ([], [], [])
    assert core.counters["rx_initiation_rejected"] == 2


def test_under_load_cookie_reply_then_mac2_passes():
    responder, initiator = _keys()
    core = _core(responder, initiator.public_key)
    gen = CookieGenerator(responder.public_key)
    _, msg = _initiation(initiator, responder, gen, 20.0)
    # A backlog above QUEUE_SIZE/8 (handed_total far ahead of processed): under load.
    handed = UNDER_LOAD_BACKLOG + 2
    replies, identified, forwarded = core.process_batch(handed, [(MESSAGE_INITIATION, SRC, PORT, msg)], 20.0)
    assert identified == [] and forwarded == []
    [(reply, addr, port)] = replies
    assert (addr, port) == (SRC, PORT) and reply[0] == MESSAGE_COOKIE_REPLY and len(reply) == 64
    assert core.counters["tx_cookie_reply"] == 1
    # The initiator takes the cookie; its next initiation carries mac2 and is identified, still under load
    # (held for UNDER_LOAD_HOLD after the backlog was seen) though the queue is now empty.
    assert gen.consume_reply(reply, 20.1)
    _, msg2 = _initiation(initiator, responder, gen, 20.2, wall=WALL + 1)
    assert msg2[-16:] != bytes(16)
    replies, identified, _ = core.process_batch(core.processed + 1, [(MESSAGE_INITIATION, SRC, PORT, msg2)], 20.2)
    assert replies == [] and len(identified) == 1
    assert core.under_load(0, 20.0 + UNDER_LOAD_HOLD - 0.01)
    assert not core.under_load(0, 20.0 + UNDER_LOAD_HOLD + 0.01)
    # A cookie for one port is not valid from another port of the same address.
    replies, identified, _ = core.process_batch(core.processed + QUEUE_SIZE, [(MESSAGE_INITIATION, SRC, PORT + 1, msg2)],
                                                21.5)
    assert len(replies) == 1 and identified == []


def test_not_under_load_no_cookie_replies():
    responder, _ = _keys()
    core = _core(responder)
    entries = [(MESSAGE_INITIATION, SRC, PORT, _flood_message(responder)) for _ in range(10)]
    replies, _, _ = core.process_batch(10, entries, 3.0)  # backlog 10 <= 512
    assert replies == [] and core.counters["rx_initiation_rejected"] == 10


def test_cookie_replies_and_mac2_messages_are_rate_limited_per_source():
    responder, initiator = _keys()
    core = _core(responder, initiator.public_key)
    flood = [(MESSAGE_INITIATION, SRC, PORT + i % 8, _flood_message(responder)) for i in range(50)]
    replies, _, _ = core.process_batch(QUEUE_SIZE, flood, 30.0)
    # One address, eight ports: one bucket of 5 at one instant (the strict ">" lets 4 through), rest refused.
    assert 4 <= len(replies) <= 5
    assert core.counters["tx_cookie_reply_ratelimited"] == 50 - len(replies)
    other = [(MESSAGE_INITIATION, bytes([10, 203, 0, 8]), PORT, _flood_message(responder))]
    assert len(core.process_batch(core.processed + QUEUE_SIZE, other, 30.0)[0]) == 1
    # With a valid cookie (mac2), the per-source limiter of wireguard-go applies: 20/s, burst 5.
    gen = CookieGenerator(responder.public_key)
    _, probe = _initiation(initiator, responder, gen, 31.0)
    source = bytes([10, 203, 0, 9])
    [(reply, _, _)] = core.process_batch(core.processed + QUEUE_SIZE, [(MESSAGE_INITIATION, source, PORT, probe)],
                                         31.0)[0]
    assert gen.consume_reply(reply, 31.0)
    msgs = [_initiation(initiator, responder, gen, 31.0, wall=WALL + i)[1] for i in range(8)]
    _, identified, _ = core.process_batch(core.processed + QUEUE_SIZE,
                                          [(MESSAGE_INITIATION, source, PORT, m) for m in msgs], 31.0)
    assert 4 <= len(identified) <= 5
    assert core.counters["rx_handshake_ratelimited"] == 8 - len(identified)


def test_responses_and_cookie_replies_are_forwarded():
    responder, initiator = _keys()
    core = _core(responder, initiator.public_key)
    # A response to us (mac1 for our key): forwarded for the main process's index lookup.
    response = bytearray(92)
    response[0] = MESSAGE_RESPONSE
    CookieGenerator(responder.public_key).add_macs(response, 1.0)
    cookie = bytes([MESSAGE_COOKIE_REPLY]) + bytes(63)
    entries = [(MESSAGE_RESPONSE, SRC, PORT, bytes(response)), (MESSAGE_COOKIE_REPLY, SRC, PORT, cookie),
               (MESSAGE_COOKIE_REPLY, SRC, PORT, cookie + b"x")]
    replies, identified, forwarded = core.process_batch(3, entries, 1.0)
    assert forwarded == entries[:2] and replies == [] and identified == []
    assert core.counters["rx_cookie_reply_bad_size"] == 1


def test_codec_round_trip():
    entries = [(1, SRC, PORT, b"x" * 148), (2, bytes(16), 1, b"y" * 92)]
    assert decode(encode_batch(12, entries)) == (MSG_BATCH, 12, entries)
    assert decode(encode_config(3, b"k" * 32, [b"p" * 32])) == (MSG_CONFIG, 3, b"k" * 32, [b"p" * 32])
    assert decode(encode_results(5, [], entries, {"a": 1})) == (MSG_RESULTS, 5, [], entries, {"a": 1})


def test_a_rate_past_the_limit_is_load_without_a_backlog():
    from turbowg.device.handshake_worker import UNDER_LOAD_RATE

    responder, _ = _keys()
    core = _core(responder)
    flood = [(MESSAGE_INITIATION, SRC, PORT, _flood_message(responder))] * 64
    for k in range(UNDER_LOAD_RATE // 64):  # no backlog ever: each batch alone in the queue
        replies, _, _ = core.process_batch(core.processed + 1, flood, 50.0 + k * 0.001)
        assert not replies and not core.under_load(0, 50.0 + k * 0.001)
    replies, _, _ = core.process_batch(core.processed + 1, flood, 50.9)
    assert replies and core.under_load(0, 51.5)  # cookie replies (rate-limited per source) from here on
    assert not core.under_load(0, 52.0)
