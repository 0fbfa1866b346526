"""Tests of turbowg.noise.cookie with an injected clock, plus a cookie round trip with wireguard-go."""

from __future__ import annotations

import socket
import struct
import subprocess
import time

import pytest
from test_noise import recv_until, wireguard_go_peer

from turbowg.noise import (
    COOKIE_REFRESH_TIME,
    COOKIE_REPLY_SIZE,
    CookieChecker,
    CookieGenerator,
    Handshake,
    LocalIdentity,
    consume_initiation,
    create_initiation,
    generate_private_key,
)
from turbowg.testing.marks import needs_netns

SRC = socket.inet_aton("192.0.2.7") + (51820).to_bytes(2, "big")
OTHER_SRC = socket.inet_aton("192.0.2.8") + (51820).to_bytes(2, "big")


class Sides:
    """An initiator's generator and a responder's checker, with a real initiation to protect."""

    def __init__(self) -> None:
        self.initiator = LocalIdentity(generate_private_key())
        self.responder = LocalIdentity(generate_private_key())
        self.hs = Handshake(self.responder.public_key, local=self.initiator)
        self.generator = CookieGenerator(self.responder.public_key)
        self.checker = CookieChecker(self.responder.public_key)
        self.wall = 1_000.0

    def message(self, now: float) -> bytearray:
        self.wall += 1
        msg = create_initiation(self.hs, 9, self.wall)
        self.generator.add_macs(msg, now)
        return msg


def test_mac1_valid_and_invalid() -> None:
    s = Sides()
    msg = s.message(now=0.0)
    assert s.checker.check_mac1(msg)
    assert s.checker.check_mac1(bytes(msg))
    # mac1 is keyed with the responder's public key: a third party's checker refuses it.
    assert not CookieChecker(LocalIdentity(generate_private_key()).public_key).check_mac1(msg)
    for offset in (0, 4, 50, 115, 116, 131):
        tampered = bytearray(msg)
        tampered[offset] ^= 0x80
        assert not s.checker.check_mac1(tampered), offset
    # mac2 is outside mac1's coverage.
    tampered = bytearray(msg)
    tampered[140] ^= 1
    assert s.checker.check_mac1(tampered)
    assert not s.checker.check_mac1(b"short")


def test_mac2_absent_until_cookie_then_valid() -> None:
    s = Sides()
    first = s.message(now=0.0)
    assert first[-16:] == bytes(16)
    assert not s.checker.check_mac2(first, SRC, now=0.0)  # no secret yet

    reply = s.checker.create_reply(first, receiver_index=9, src=SRC, now=0.0)
    assert len(reply) == COOKIE_REPLY_SIZE
    assert struct.unpack_from("<II", reply) == (3, 9)
    assert s.generator.consume_reply(reply, now=0.0)

    second = s.message(now=1.0)
    assert second[-16:] != bytes(16)
    assert s.checker.check_mac1(second)
    assert s.checker.check_mac2(second, SRC, now=1.0)
    assert s.checker.check_mac2(second, SRC)  # without a clock: secret not aged
    assert not s.checker.check_mac2(second, OTHER_SRC, now=1.0)  # cookie is bound to the address
    tampered = bytearray(second)
    tampered[20] ^= 1
    assert not s.checker.check_mac2(tampered, SRC, now=1.0)


def test_cookie_expires_and_secret_rotates() -> None:
    s = Sides()
    reply = s.checker.create_reply(s.message(now=0.0), 9, SRC, now=0.0)
    assert s.generator.consume_reply(reply, now=0.0)

    late_but_valid = s.message(now=COOKIE_REFRESH_TIME - 1)
    assert s.checker.check_mac2(late_but_valid, SRC, now=COOKIE_REFRESH_TIME - 1)
    # Once the secret is older than 120 s the checker refuses mac2s made from it...
    assert not s.checker.check_mac2(late_but_valid, SRC, now=COOKIE_REFRESH_TIME + 1)
    # ...and the generator stops sending mac2 from a cookie older than 120 s.
    expired = s.message(now=COOKIE_REFRESH_TIME + 1)
    assert expired[-16:] == bytes(16)

    # A new reply after 120 s rotates the secret: cookies from the old secret no longer verify.
    fresh_reply = s.checker.create_reply(expired, 9, SRC, now=COOKIE_REFRESH_TIME + 1)
    assert not s.checker.check_mac2(late_but_valid, SRC, now=COOKIE_REFRESH_TIME + 1)
    assert s.generator.consume_reply(fresh_reply, now=COOKIE_REFRESH_TIME + 1)
    renewed = s.message(now=COOKIE_REFRESH_TIME + 2)
    assert s.checker.check_mac2(renewed, SRC, now=COOKIE_REFRESH_TIME + 2)


def test_secret_kept_within_refresh_time() -> None:
    s = Sides()
    msg = s.message(now=0.0)
    a = s.checker.create_reply(msg, 9, SRC, now=0.0)
    assert s.generator.consume_reply(a, now=0.0)
    signed = s.message(now=1.0)
    s.checker.create_reply(signed, 9, SRC, now=60.0)  # within 120 s: same secret
    assert s.checker.check_mac2(signed, SRC, now=60.0)


def test_reply_ignored_when_unexpected_or_invalid() -> None:
    s = Sides()
    fresh = CookieGenerator(s.responder.public_key)
    msg_a = s.message(now=0.0)
    reply_a = s.checker.create_reply(msg_a, 9, SRC, now=0.0)
    assert not fresh.consume_reply(reply_a, now=0.0)  # never sent anything

    s.message(now=0.0)  # generator's last mac1 is now another message's
    assert not s.generator.consume_reply(reply_a, now=0.0)
    assert not s.generator.has_cookie

    msg_c = s.message(now=0.0)
    reply_c = s.checker.create_reply(msg_c, 9, SRC, now=0.0)
    for offset in (0, 8, 31, 32, 63):
        tampered = bytearray(reply_c)
        tampered[offset] ^= 1
        assert not s.generator.consume_reply(tampered, now=0.0), offset
    assert not s.generator.consume_reply(reply_c[:-1], now=0.0)
    assert s.generator.consume_reply(reply_c, now=0.0)
    assert not s.generator.consume_reply(reply_c, now=0.0)  # answered already: no longer expecting one

    # A reply encrypted for another responder's key is refused.
    stranger = CookieChecker(LocalIdentity(generate_private_key()).public_key)
    msg_d = s.message(now=0.0)
    assert not s.generator.consume_reply(stranger.create_reply(msg_d, 9, SRC, now=0.0), now=0.0)


@needs_netns
@pytest.mark.netns
@pytest.mark.timeout(60)
def test_wireguard_go_returns_our_cookie_in_mac2() -> None:
    """We answer wireguard-go's initiation with a cookie reply; its retransmitted initiation (after
    REKEY_TIMEOUT, about 5 s) must carry a mac2 our checker accepts for its source address."""
    me = LocalIdentity(generate_private_key())
    checker = CookieChecker(me.public_key)
    with wireguard_go_peer(me.public_key, with_endpoint=True) as (wg, sock):
        ping = subprocess.Popen(
            ["ip", "netns", "exec", wg.ns, "ping", "-c", "1", "-W", "1", "10.99.0.2"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            first, addr = recv_until(sock, 1, deadline)
            src = socket.inet_aton(addr[0]) + addr[1].to_bytes(2, "big")
            assert checker.check_mac1(first) and not checker.check_mac2(first, src, time.monotonic())
            sender = int.from_bytes(first[4:8], "little")
            sock.sendto(checker.create_reply(first, sender, src, time.monotonic()), addr)

            second, addr2 = recv_until(sock, 1, deadline)
            assert addr2 == addr
            assert checker.check_mac1(second)
            assert checker.check_mac2(second, src, time.monotonic())
            assert not checker.check_mac2(second, src[:-2] + b"\x00\x01", time.monotonic())
            # And it is still a good initiation from wireguard-go.
            hs = Handshake(wg.public, local=me)
            assert consume_initiation(me, second, {wg.public: hs}.get, time.monotonic()) is hs
        finally:
            ping.wait(timeout=10)
