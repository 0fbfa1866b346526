"""Key text formats: base64 as in wg(8) configs, lowercase hex as in the UAPI."""

from __future__ import annotations

import base64
import binascii

from .primitives import KEY_SIZE


class KeyFormatError(ValueError):
    """A key string is not a valid 32-byte key in the expected format."""


def decode_key(text: str) -> bytes:
    """Parse a base64 key as printed by `wg genkey` / `wg pubkey`."""
    stripped = text.strip()
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"key is not valid base64: {stripped[:48]!r}") from None
    if len(raw) != KEY_SIZE:
        raise KeyFormatError(f"key must decode to {KEY_SIZE} bytes, got {len(raw)}")
    if base64.b64encode(raw).decode("ascii") != stripped:  # nonzero padding bits: wg(8) refuses it too
        raise KeyFormatError(f"key is not canonical base64: {stripped[:48]!r}")
    return raw


def encode_key(key: bytes) -> str:
    if len(key) != KEY_SIZE:
        raise KeyFormatError(f"key must be {KEY_SIZE} bytes, got {len(key)}")
    return base64.b64encode(bytes(key)).decode("ascii")


def decode_hex_key(text: str) -> bytes:
    """Parse a 64-character hex key as used by the cross-platform UAPI."""
    stripped = text.strip()
    if len(stripped) != 2 * KEY_SIZE:
        raise KeyFormatError(f"hex key must be {2 * KEY_SIZE} characters, got {len(stripped)}")
    try:
        raw = bytes.fromhex(stripped)
    except ValueError:
        raise KeyFormatError(f"key is not valid hex: {stripped!r}") from None
    if len(raw) != KEY_SIZE:  # fromhex skips whitespace: '00 11 ...' is 64 characters but fewer bytes
        raise KeyFormatError(f"hex key must be {2 * KEY_SIZE} hex digits: {stripped!r}")
    return raw


def encode_hex_key(key: bytes) -> str:
    if len(key) != KEY_SIZE:
        raise KeyFormatError(f"key must be {KEY_SIZE} bytes, got {len(key)}")
    return bytes(key).hex()
