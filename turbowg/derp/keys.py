"""DERP node keys (Curve25519) in Tailscale's text forms, derper's JSON key file, and NaCl boxes.

Tailscale writes a private key as `privkey:<64 hex>` and a public node key as `nodekey:<64 hex>`;
the handshake bodies are NaCl `box` (X25519 + XSalsa20-Poly1305) sealed as nonce || ciphertext.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from nacl.utils import random as nacl_random

from turbowg.wire import KEY_SIZE

NONCE_LEN = 24
PRIVATE_PREFIX = "privkey:"
PUBLIC_PREFIX = "nodekey:"


class KeyFormatError(ValueError):
    """A key in text form that cannot be parsed."""


class LowOrderKeyError(ValueError):
    """A peer public key (all zeros, or another point of small order) with which X25519 gives the all-zero
    shared secret: no box can be made to or from it."""


def generate_private_key() -> bytes:
    return bytes(PrivateKey.generate())


def public_key(private: bytes) -> bytes:
    return bytes(PrivateKey(private).public_key)


def _parse_hex32(text: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise KeyFormatError(f"{what} is not hex: {text[:16]!r}...") from None
    if len(raw) != KEY_SIZE:
        raise KeyFormatError(f"{what} must be {KEY_SIZE} bytes (64 hex digits), got {len(raw)}")
    return raw


def _parse_key_text(text: str, prefix: str, what: str) -> bytes:
    text = text.strip()
    if text.startswith(prefix):  # the prefix is optional: derper's headers and flags also take bare hex
        text = text[len(prefix) :]
    return _parse_hex32(text, what)


def parse_private_key(text: str) -> bytes:
    """`privkey:<hex>` (or bare hex)."""
    return _parse_key_text(text, PRIVATE_PREFIX, "private key")


def format_private_key(private: bytes) -> str:
    return PRIVATE_PREFIX + private.hex()


def parse_public_key(text: str) -> bytes:
    """`nodekey:<hex>` or bare hex (derper's Derp-Public-Key header form)."""
    return _parse_key_text(text, PUBLIC_PREFIX, "public key")


def format_public_key(public: bytes) -> str:
    return PUBLIC_PREFIX + public.hex()


def load_or_create_config(path: str | os.PathLike[str]) -> bytes:
    """Read derper's `{"PrivateKey": "privkey:<hex>"}` file, creating it (mode 0600) if missing."""
    p = Path(path)
    if p.exists():
        try:
            data = json.loads(p.read_text())
            return parse_private_key(str(data["PrivateKey"]))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: '[' * 100000
            raise KeyFormatError(f"{p}: not a derper key file ({exc})") from None
    private = generate_private_key()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"PrivateKey": format_private_key(private)}, f, indent=2)
        f.write("\n")
    return private


def box_between(private: bytes, peer_public: bytes) -> Box:
    """The NaCl box between a private key and a peer's public key; LowOrderKeyError for a low-order key."""
    # The one place that refuses a low-order peer key: both directions of the DERP handshake (the client
    # sealing to the ServerKey, the relay sealing ServerInfo to the client key) and disco's boxes. Box() runs X25519 at
    # once, and libsodium fails it (nacl's RuntimeError, a CryptoError) when the shared secret is all zero.
    ours, theirs = PrivateKey(private), PublicKey(peer_public)  # nacl refuses a wrong length here, not below
    try:
        return Box(ours, theirs)
    except CryptoError:
        raise LowOrderKeyError(f"public key {bytes(peer_public).hex()} gives no shared secret (low-order point)") from None


def seal_to(private: bytes, peer_public: bytes, message: bytes, nonce: bytes | None = None) -> bytes:
    """NaCl box of `message` from `private` to `peer_public`: 24-byte nonce || ciphertext.
    LowOrderKeyError if `peer_public` is all zeros or another low-order point."""
    if nonce is None:
        nonce = nacl_random(NONCE_LEN)
    return bytes(box_between(private, peer_public).encrypt(message, nonce))


def open_from(private: bytes, peer_public: bytes, sealed: bytes) -> bytes | None:
    """Opens a seal_to() box; None if it is too short, does not authenticate or the key is low-order."""
    if len(sealed) < NONCE_LEN + 16:
        return None
    try:
        return box_between(private, peer_public).decrypt(sealed[NONCE_LEN:], sealed[:NONCE_LEN])
    except (CryptoError, ValueError, TypeError):  # LowOrderKeyError is a ValueError
        return None
