"""Session keypairs and the current/previous/next rotation of one peer.

A responder's new keypair waits in `next` until the initiator proves it has the keys by
sending data under it; only then it becomes `current` (the key-confirmation rule of the
WireGuard paper, section 5.4.7, as wireguard-go's ReceivedWithKeypair).
"""

from __future__ import annotations

from turbowg.device.constants import (
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
)
from turbowg.device.replay import ReplayWindow as _PyReplayWindow
from turbowg.noise import transport

# The C open_batch needs the C window; both have the same accept(counter) used by the slow path.
ReplayWindow = transport.CReplayWindow or _PyReplayWindow


class Keypair:
    """One direction pair of transport keys with its counters and indices."""

    __slots__ = (
        "send_counter",
        "replay",
        "local_index",
        "remote_index",
        "created",
        "is_initiator",
        "send_aead",
        "receive_aead",
    )

    def __init__(
        self,
        send_key: bytes,
        receive_key: bytes,
        local_index: int,
        remote_index: int,
        created: float,
        is_initiator: bool,
    ) -> None:
        # Batch sealing/opening for the packed data path (turbowg/noise/transport.py).
        self.send_aead = transport.Aead(bytes(send_key))
        self.receive_aead = transport.Aead(bytes(receive_key))
        self.send_counter = 0  # the next counter to use
        self.replay = ReplayWindow()
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = created
        self.is_initiator = is_initiator

    def usable_for_sending(self, now: float) -> bool:
        """Not expired by age or message count (wireguard-go's SendStagedPackets check)."""
        return self.send_counter < REJECT_AFTER_MESSAGES and now - self.created < REJECT_AFTER_TIME


class Keypairs:
    """current / previous / next keypairs of a peer. Methods return the keypairs they drop,
    so the caller can free their indices."""

    __slots__ = ("current", "previous", "next")

    def __init__(self) -> None:
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None

    def install(self, keypair: Keypair) -> list[Keypair]:
        """Add a freshly derived keypair (wireguard-go's BeginSymmetricSession rotation)."""
        dropped: list[Keypair] = []
        if keypair.is_initiator:
            # The initiator may use its keypair at once (the response confirmed the keys).
            if self.next is not None:
                # An unconfirmed responder keypair is newer than current: keep it as previous.
                if self.previous is not None:
                    dropped.append(self.previous)
                if self.current is not None:
                    dropped.append(self.current)
                self.previous = self.next
                self.next = None
            else:
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous = self.current
            self.current = keypair
        else:
            # The responder waits for the first data packet before using it.
            if self.next is not None:
                dropped.append(self.next)
            if self.previous is not None:
                dropped.append(self.previous)
            self.next = keypair
            self.previous = None
        return dropped

    def confirm(self, keypair: Keypair) -> tuple[bool, list[Keypair]]:
        """Data arrived under `keypair`: if it is `next`, rotate it to current.

        Returns (rotated, dropped keypairs)."""
        if self.next is not keypair:
            return False, []
        dropped = [self.previous] if self.previous is not None else []
        self.previous = self.current
        self.current = keypair
        self.next = None
        return True, dropped

    def clear(self) -> list[Keypair]:
        dropped = [kp for kp in (self.current, self.previous, self.next) if kp is not None]
        self.current = self.previous = self.next = None
        return dropped

    def all(self) -> list[Keypair]:
        return [kp for kp in (self.current, self.previous, self.next) if kp is not None]
