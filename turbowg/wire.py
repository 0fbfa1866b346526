"""Wire constants of WireGuard, in one place (the WireGuard paper section 5.4, wireguard-go's
device/noise-protocol.go and device/constants.go).

The C accelerator `turbowg/noise/_aead.c` repeats MESSAGE_TRANSPORT and the header/tag sizes because C
cannot import them; `tests/test_constants.py` checks that it agrees with this module.
"""

from __future__ import annotations

# Curve25519 public/private keys, the preshared key, and DERP node keys (a DERP key is a Curve25519 key).
KEY_SIZE = 32

# Message types: the first byte of the little-endian type word; the other 3 bytes are reserved and must
# be zero (a message whose reserved bytes are not zero is malformed, as in wireguard-go).
MESSAGE_INITIATION = 1
MESSAGE_RESPONSE = 2
MESSAGE_COOKIE_REPLY = 3
MESSAGE_TRANSPORT = 4

INITIATION_SIZE = 148  # type(4) sender(4) ephemeral(32) static(32+16) timestamp(12+16) mac1(16) mac2(16)
RESPONSE_SIZE = 92  # type(4) sender(4) receiver(4) ephemeral(32) empty(0+16) mac1(16) mac2(16)
COOKIE_REPLY_SIZE = 64  # type(4) receiver(4) nonce(24) cookie(16+16)
TRANSPORT_HEADER_SIZE = 16  # type(4) receiver(4) counter(8)
AEAD_TAG_SIZE = 16
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + AEAD_TAG_SIZE  # a keepalive
# Largest datagram accepted at all (as wireguard-go's MaxMessageSize).
MAX_MESSAGE_SIZE = 65535
PADDING_MULTIPLE = 16

# Protocol limits that both the noise layer and the device use (wireguard-go device/constants.go).
# A counter at or past this is never used: a keypair is done before the nonce could wrap.
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
# The responder's cookie secret lives this long; an initiator's cookie is used for as long.
COOKIE_REFRESH_TIME = 120.0
# Minimum spacing of accepted initiations from one peer (wireguard-go HandshakeInitationRate).
HANDSHAKE_INITIATION_RATE = 1.0 / 50.0
