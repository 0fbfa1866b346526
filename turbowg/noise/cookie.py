"""mac1/mac2 and cookie replies (WireGuard paper section 5.3, 5.4.7), sans-IO with an injected clock.

`src` is the sender's address bytes + port (16 or 4 IP bytes + 2-byte big-endian port).
"""

from __future__ import annotations

import hmac
import os
import struct
import time

from turbowg.wire import COOKIE_REFRESH_TIME, COOKIE_REPLY_SIZE, MESSAGE_COOKIE_REPLY

from .handshake import LABEL_COOKIE, LABEL_MAC1
from .primitives import MAC_SIZE, XNONCE_SIZE, hash_, mac, xaead_open, xaead_seal

_COOKIE_REPLY_HEAD = struct.Struct("<II")  # type word, receiver index
COOKIE_CACHE = 4096  # sources whose cookie the responder keeps
NONCE_POOL = 64  # cookie-reply nonces drawn per getrandom


def _mac_offsets(msg: bytes | bytearray) -> tuple[int, int]:
    mac2_at = len(msg) - MAC_SIZE
    return mac2_at - MAC_SIZE, mac2_at


class CookieChecker:
    """Responder side: validates mac1/mac2 and answers with cookie replies when under load."""

    def __init__(self, local_public: bytes) -> None:
        self.mac1_key = hash_(LABEL_MAC1, local_public)
        self.cookie_key = hash_(LABEL_COOKIE, local_public)
        self._secret: bytearray | None = None
        self._secret_set = 0.0
        # Under a flood the same sources get reply after reply: their cookies (MAC(secret, src), fixed for
        # the secret's 120 s) are kept, bounded, and forgotten with the secret; nonces are drawn in bulk
        # (one getrandom per NONCE_POOL replies).
        self._cookies: dict[bytes, bytes] = {}
        self._nonces = b""
        self._nonce_at = 0

    def check_mac1(self, msg: bytes | bytearray) -> bool:
        if len(msg) < 2 * MAC_SIZE:
            return False
        mac1_at, mac2_at = _mac_offsets(msg)
        expected = mac(self.mac1_key, bytes(msg[:mac1_at]))
        return hmac.compare_digest(expected, bytes(msg[mac1_at:mac2_at]))

    def _secret_valid(self, now: float | None) -> bool:
        if self._secret is None:
            return False
        return now is None or now - self._secret_set <= COOKIE_REFRESH_TIME

    def check_mac2(self, msg: bytes | bytearray, src: bytes, now: float | None = None) -> bool:
        """mac2 must be MAC(cookie, msg up to mac2) with cookie = MAC(secret, src). Passing `now` also
        refuses once the secret is older than 120 s (a cookie the sender can no longer hold)."""
        if len(msg) < 2 * MAC_SIZE or not self._secret_valid(now):
            return False
        assert self._secret is not None
        cookie = mac(bytes(self._secret), src)
        _, mac2_at = _mac_offsets(msg)
        expected = mac(cookie, bytes(msg[:mac2_at]))
        return hmac.compare_digest(expected, bytes(msg[mac2_at:]))

    def create_reply(self, msg: bytes | bytearray, receiver_index: int, src: bytes, now: float) -> bytes:
        """Type-3 reply to `msg` (an initiation or response whose mac1 was valid), addressed to
        `receiver_index` (the message's sender index). Rotates the secret every 120 s."""
        if self._secret is None or now - self._secret_set > COOKIE_REFRESH_TIME:
            if self._secret is not None:
                self._secret[:] = bytes(len(self._secret))
            self._secret = bytearray(os.urandom(32))
            self._secret_set = now
            self._cookies.clear()
        cookie = self._cookies.get(src)
        if cookie is None:
            if len(self._cookies) >= COOKIE_CACHE:
                self._cookies.clear()
            cookie = self._cookies[src] = mac(bytes(self._secret), src)
        mac1_at, mac2_at = _mac_offsets(msg)
        at = self._nonce_at
        if at + XNONCE_SIZE > len(self._nonces):
            self._nonces = os.urandom(XNONCE_SIZE * NONCE_POOL)
            at = 0
        nonce = self._nonces[at:at + XNONCE_SIZE]
        self._nonce_at = at + XNONCE_SIZE
        sealed = xaead_seal(self.cookie_key, nonce, cookie, bytes(msg[mac1_at:mac2_at]))
        return _COOKIE_REPLY_HEAD.pack(MESSAGE_COOKIE_REPLY, receiver_index) + nonce + sealed


class CookieGenerator:
    """Initiator side (per peer): fills mac1/mac2 and stores cookies from replies."""

    def __init__(self, remote_public: bytes) -> None:
        self.mac1_key = hash_(LABEL_MAC1, remote_public)
        self.cookie_key = hash_(LABEL_COOKIE, remote_public)
        self._cookie: bytes | None = None
        self._cookie_set = 0.0
        self._last_mac1: bytes | None = None

    def add_macs(self, msg: bytearray, now: float) -> None:
        """Write mac1, and mac2 when we hold a cookie younger than 120 s (else zeros), into msg."""
        mac1_at, mac2_at = _mac_offsets(msg)
        mac1 = mac(self.mac1_key, bytes(msg[:mac1_at]))
        msg[mac1_at:mac2_at] = mac1
        self._last_mac1 = mac1
        if self._cookie is not None and now - self._cookie_set <= COOKIE_REFRESH_TIME:
            msg[mac2_at:] = mac(self._cookie, bytes(msg[:mac2_at]))
        else:
            msg[mac2_at:] = bytes(MAC_SIZE)

    def consume_reply(self, msg: bytes | bytearray, now: float | None = None) -> bool:
        """Decrypt a cookie reply to the last message we sent; False if unexpected or invalid."""
        if self._last_mac1 is None or len(msg) != COOKIE_REPLY_SIZE:
            return False
        kind, _receiver = _COOKIE_REPLY_HEAD.unpack_from(msg, 0)
        if kind != MESSAGE_COOKIE_REPLY:
            return False
        nonce = bytes(msg[8 : 8 + XNONCE_SIZE])
        cookie = xaead_open(self.cookie_key, nonce, bytes(msg[8 + XNONCE_SIZE :]), self._last_mac1)
        if cookie is None:
            return False
        self._cookie = cookie
        self._cookie_set = time.monotonic() if now is None else now
        self._last_mac1 = None
        return True

    @property
    def has_cookie(self) -> bool:
        return self._cookie is not None
