"""Per-peer protocol timers, sans-IO (wireguard-go's timers.go with an injected clock).

The device reports events (`data_sent`, `handshake_initiated`, ...) with the current
monotonic time; `expired(now)` returns the actions whose deadlines have passed, and the
device carries them out (send a keepalive, retransmit an initiation, zero keys, ...).
`next_deadline()` tells an event loop when to call again.

Every arming also lowers the device's shared `Schedule`, so the device can report its earliest deadline in
O(1) after any batch (never later than the true earliest; a timer disarmed since only costs one early tick,
after which the device recomputes the exact value).
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable

from turbowg.device.constants import (
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    NEW_HANDSHAKE_AFTER,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    ZERO_KEYS_AFTER,
)
from turbowg.device.keypair import Keypair


class TimerAction(enum.Enum):
    RETRANSMIT_HANDSHAKE = "retransmit_handshake"  # send the initiation again (a retry)
    GIVE_UP_HANDSHAKE = "give_up_handshake"  # drop the staged packets
    SEND_KEEPALIVE = "send_keepalive"  # we received data and sent nothing back
    NEW_HANDSHAKE = "new_handshake"  # we sent data and heard nothing back
    ZERO_KEYS = "zero_keys"  # no new session for 3 * REJECT_AFTER_TIME
    PERSISTENT_KEEPALIVE = "persistent_keepalive"


class Schedule:
    """The earliest deadline armed by any peer of a device since the device last recomputed it."""

    __slots__ = ("earliest",)

    def __init__(self) -> None:
        self.earliest = math.inf

    def arm(self, deadline: float) -> None:
        if deadline < self.earliest:
            self.earliest = deadline


def default_jitter() -> float:
    return random.uniform(0.0, REKEY_TIMEOUT_JITTER_MAX)


class PeerTimers:
    """Deadlines (monotonic seconds, None = not armed) of one peer's five timers."""

    __slots__ = (
        "retransmit_handshake",
        "send_keepalive",
        "new_handshake",
        "zero_key_material",
        "persistent_keepalive",
        "need_another_keepalive",
        "handshake_attempts",
        "persistent_keepalive_interval",
        "_jitter",
        "_schedule",
    )

    def __init__(self, jitter: Callable[[], float] = default_jitter, schedule: Schedule | None = None) -> None:
        self.retransmit_handshake: float | None = None
        self.send_keepalive: float | None = None
        self.new_handshake: float | None = None
        self.zero_key_material: float | None = None
        self.persistent_keepalive: float | None = None
        self.need_another_keepalive = False
        self.handshake_attempts = 0
        self.persistent_keepalive_interval = 0
        self._jitter = jitter
        self._schedule = schedule if schedule is not None else Schedule()

    # -- events -------------------------------------------------------------------------------

    def data_sent(self, now: float) -> None:
        """A non-keepalive data packet went out: expect to hear back within 15 s (+ jitter)."""
        if self.new_handshake is None:
            self.new_handshake = now + NEW_HANDSHAKE_AFTER + self._jitter()
            self._schedule.arm(self.new_handshake)

    def data_received(self, now: float) -> None:
        """A non-keepalive data packet came in: answer within 10 s, with a keepalive if need be."""
        if self.send_keepalive is None:
            self.send_keepalive = now + KEEPALIVE_TIMEOUT
            self._schedule.arm(self.send_keepalive)
        else:
            self.need_another_keepalive = True

    def any_authenticated_packet_sent(self, now: float) -> None:
        """Anything we send counts as the answer the keepalive timer waits for."""
        self.send_keepalive = None

    def any_authenticated_packet_received(self, now: float) -> None:
        """Hearing from the peer proves the session works: no new handshake needed."""
        self.new_handshake = None

    def any_authenticated_packet_traversal(self, now: float) -> None:
        if self.persistent_keepalive_interval > 0:
            self.persistent_keepalive = now + self.persistent_keepalive_interval
            self._schedule.arm(self.persistent_keepalive)

    def handshake_initiated(self, now: float) -> None:
        self.retransmit_handshake = now + REKEY_TIMEOUT + self._jitter()
        self._schedule.arm(self.retransmit_handshake)

    def handshake_complete(self, now: float) -> None:
        self.retransmit_handshake = None
        self.handshake_attempts = 0

    def session_derived(self, now: float) -> None:
        self.zero_key_material = now + ZERO_KEYS_AFTER
        self._schedule.arm(self.zero_key_material)

    def stop(self) -> None:
        """Disarm everything (peer removed or device down)."""
        self.retransmit_handshake = None
        self.send_keepalive = None
        self.new_handshake = None
        self.zero_key_material = None
        self.persistent_keepalive = None
        self.need_another_keepalive = False

    # -- expiry -------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest armed deadline of this peer, or None (no list built: the device asks every tick)."""
        earliest: float | None = None
        for deadline in (self.retransmit_handshake, self.send_keepalive, self.new_handshake,
                         self.zero_key_material, self.persistent_keepalive):
            if deadline is not None and (earliest is None or deadline < earliest):
                earliest = deadline
        return earliest

    def expired(self, now: float) -> list[TimerAction]:
        """Fire every timer due at `now`, in wireguard-go's order of concerns."""
        actions: list[TimerAction] = []
        if self.retransmit_handshake is not None and self.retransmit_handshake <= now:
            self.retransmit_handshake = None
            if self.handshake_attempts >= MAX_TIMER_HANDSHAKES:
                actions.append(TimerAction.GIVE_UP_HANDSHAKE)
                # Without a session in sight, make sure the old keys die eventually.
                if self.zero_key_material is None:
                    self.zero_key_material = now + ZERO_KEYS_AFTER
                    self._schedule.arm(self.zero_key_material)
            else:
                self.handshake_attempts += 1
                actions.append(TimerAction.RETRANSMIT_HANDSHAKE)
        if self.send_keepalive is not None and self.send_keepalive <= now:
            self.send_keepalive = None
            actions.append(TimerAction.SEND_KEEPALIVE)
            if self.need_another_keepalive:
                self.need_another_keepalive = False
                self.send_keepalive = now + KEEPALIVE_TIMEOUT
                self._schedule.arm(self.send_keepalive)
        if self.new_handshake is not None and self.new_handshake <= now:
            self.new_handshake = None
            actions.append(TimerAction.NEW_HANDSHAKE)
        if self.zero_key_material is not None and self.zero_key_material <= now:
            self.zero_key_material = None
            actions.append(TimerAction.ZERO_KEYS)
        if self.persistent_keepalive is not None and self.persistent_keepalive <= now:
            self.persistent_keepalive = None
            if self.persistent_keepalive_interval > 0:
                actions.append(TimerAction.PERSISTENT_KEEPALIVE)
        return actions


def needs_rekey_on_send(keypair: Keypair | None, now: float) -> bool:
    """After sending under `keypair`: is it time for a new handshake (wireguard-go keepKeyFreshSending)?"""
    if keypair is None:
        return False
    if keypair.send_counter > REKEY_AFTER_MESSAGES:
        return True
    return keypair.is_initiator and now - keypair.created > REKEY_AFTER_TIME


def needs_rekey_on_receive(keypair: Keypair | None, now: float) -> bool:
    """After receiving: the initiator's keypair is close to REJECT_AFTER_TIME, rekey before it dies."""
    return keypair is not None and keypair.is_initiator and now - keypair.created > REKEY_ON_RECEIVE_AGE


def keypair_expired(keypair: Keypair, now: float) -> bool:
    """Keypairs older than REJECT_AFTER_TIME are used neither to send nor to receive."""
    return now - keypair.created >= REJECT_AFTER_TIME
