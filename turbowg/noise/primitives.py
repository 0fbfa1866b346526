"""Cryptographic primitives of the WireGuard protocol (paper section 5.4), thin wrappers over
`cryptography`, `hashlib` and PyNaCl so that the handshake reads like the paper."""

from __future__ import annotations

import hashlib
import hmac
import math
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from turbowg.wire import AEAD_TAG_SIZE, KEY_SIZE

HASH_SIZE = 32
MAC_SIZE = 16
TAG_SIZE = AEAD_TAG_SIZE
XNONCE_SIZE = 24
TAI64N_SIZE = 12
ZERO32 = bytes(32)

# TAI64 labels seconds since 1970 TAI offset by 2^62; +10 is the TAI-UTC difference of 1970.
_TAI64_BASE = (1 << 62) + 10


def hash_(*parts: bytes) -> bytes:
    """HASH(a || b || ...): BLAKE2s-256 over the concatenation."""
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, data): keyed BLAKE2s with a 16-byte digest."""
    return hashlib.blake2s(data, digest_size=MAC_SIZE, key=key).digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    """HMAC(key, data) with BLAKE2s-256 as the hash (the paper's HMAC, not keyed BLAKE2s)."""
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf(key: bytes, data: bytes, n: int) -> tuple[bytes, ...]:
    """KDF_n(key, data): HKDF with HMAC-BLAKE2s, returning n 32-byte outputs (1 <= n <= 3)."""
    if not 1 <= n <= 3:
        raise ValueError(f"kdf returns 1 to 3 outputs, not {n}")
    prk = hmac_(key, data)
    outputs: list[bytes] = []
    previous = b""
    for i in range(1, n + 1):
        previous = hmac_(prk, previous + bytes((i,)))
        outputs.append(previous)
    return tuple(outputs)


def _nonce12(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")


def aead_seal(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    """AEAD(key, counter, plain, ad): ChaCha20-Poly1305 with nonce 32 zero bits || counter (64-bit LE)."""
    return ChaCha20Poly1305(bytes(key)).encrypt(_nonce12(counter), bytes(plaintext), bytes(ad))


def aead_open(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes | None:
    """Inverse of aead_seal; None when the tag does not verify."""
    try:
        return ChaCha20Poly1305(bytes(key)).decrypt(_nonce12(counter), bytes(ciphertext), bytes(ad))
    except InvalidTag:
        return None


def xaead_seal(key: bytes, nonce24: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XAEAD: XChaCha20-Poly1305 with a 24-byte random nonce (cookie replies)."""
    return crypto_aead_xchacha20poly1305_ietf_encrypt(bytes(plaintext), bytes(ad), bytes(nonce24), bytes(key))


def xaead_open(key: bytes, nonce24: bytes, ciphertext: bytes, ad: bytes) -> bytes | None:
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(
            bytes(ciphertext), bytes(ad), bytes(nonce24), bytes(key)
        )
    except CryptoError:
        return None


def generate_private_key() -> bytes:
    """A fresh Curve25519 private key, clamped like `wg genkey`."""
    key = bytearray(os.urandom(KEY_SIZE))
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(bytes(private)).public_key().public_bytes_raw()


def dh(private: bytes, public: bytes) -> bytes | None:
    """DH(private, public) over X25519; None if the result is all zero (low-order point)."""
    try:
        shared = X25519PrivateKey.from_private_bytes(bytes(private)).exchange(
            X25519PublicKey.from_public_bytes(bytes(public))
        )
    except ValueError:
        # cryptography refuses an all-zero shared secret itself.
        return None
    if hmac.compare_digest(shared, ZERO32):
        return None
    return shared


def tai64n(wall_time: float) -> bytes:
    """TAI64N label of a UNIX wall-clock time: 8-byte BE seconds + 2^62 + 10, 4-byte BE nanoseconds."""
    seconds = math.floor(wall_time)
    nanoseconds = min(int((wall_time - seconds) * 1e9), 999_999_999)
    return (_TAI64_BASE + seconds).to_bytes(8, "big") + nanoseconds.to_bytes(4, "big")


def zero(buffer: bytearray | None) -> None:
    """Overwrite a secret in place (best effort: Python may hold other copies)."""
    if buffer is not None:
        buffer[:] = bytes(len(buffer))
