"""Protocol constants of WireGuard (paper section 6 and wireguard-go's device/constants.go).

Times are in seconds of the injected monotonic clock. Message types and sizes are turbowg/wire.py's.
"""

from __future__ import annotations

import os

from turbowg.wire import COOKIE_REFRESH_TIME, HANDSHAKE_INITIATION_RATE, REJECT_AFTER_MESSAGES

__all__ = ["COOKIE_REFRESH_TIME", "HANDSHAKE_INITIATION_RATE", "REJECT_AFTER_MESSAGES"]  # re-exported

# Key lifetime limits.
REKEY_AFTER_MESSAGES = 1 << 60
REKEY_AFTER_TIME = 120.0
# Test-only: TURBOWG_REKEY_AFTER_TIME=<seconds> (read once, at import) makes sessions rekey sooner, so a
# test can watch rekeying (tests/test_flood_rekey.py). Never set it in production.
if os.environ.get("TURBOWG_REKEY_AFTER_TIME"):
    REKEY_AFTER_TIME = max(1.0, min(REKEY_AFTER_TIME, float(os.environ["TURBOWG_REKEY_AFTER_TIME"])))
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX = 1.0 / 3.0
KEEPALIVE_TIMEOUT = 10.0

# Retransmissions of one handshake: REKEY_ATTEMPT_TIME worth of REKEY_TIMEOUTs.
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
# Keys are zeroed when no new handshake happened for this long after the last session.
ZERO_KEYS_AFTER = 3 * REJECT_AFTER_TIME
# The initiator rekeys on receive when its keypair is this old, so the new session is up
# before the old one hits REJECT_AFTER_TIME.
REKEY_ON_RECEIVE_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
# A peer with nothing heard back this long after sending data starts a new handshake.
NEW_HANDSHAKE_AFTER = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT

# Packets queued per peer while waiting for a handshake (the oldest is dropped when full).
MAX_STAGED_PACKETS = 128

DEFAULT_MTU = 1420
