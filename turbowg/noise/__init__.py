"""WireGuard's Noise_IKpsk2 handshake, cookies and the primitives beneath them (sans-IO)."""

from turbowg.wire import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_HEADER_SIZE,
)

from .cookie import COOKIE_REFRESH_TIME, CookieChecker, CookieGenerator
from .handshake import (
    Handshake,
    HandshakeError,
    HandshakeState,
    LocalIdentity,
    SessionKeys,
    begin_session,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
)
from .keys import KeyFormatError, decode_hex_key, decode_key, encode_hex_key, encode_key
from .primitives import ZERO32, generate_private_key, public_key

__all__ = [
    "COOKIE_REFRESH_TIME",
    "COOKIE_REPLY_SIZE",
    "INITIATION_SIZE",
    "MESSAGE_COOKIE_REPLY",
    "MESSAGE_INITIATION",
    "MESSAGE_RESPONSE",
    "MESSAGE_TRANSPORT",
    "RESPONSE_SIZE",
    "TRANSPORT_HEADER_SIZE",
    "ZERO32",
    "CookieChecker",
    "CookieGenerator",
    "Handshake",
    "HandshakeError",
    "HandshakeState",
    "KeyFormatError",
    "LocalIdentity",
    "SessionKeys",
    "begin_session",
    "consume_initiation",
    "consume_response",
    "create_initiation",
    "create_response",
    "decode_hex_key",
    "decode_key",
    "encode_hex_key",
    "encode_key",
    "generate_private_key",
    "public_key",
]
