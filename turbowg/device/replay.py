"""Sliding replay window over transport counters (RFC 6479 style, as wireguard-go's replay.go).

The window is a ring of 64-bit blocks. Advancing the highest counter clears only the blocks
it skips over, so each check is O(1) amortised with no big-integer shifting.
"""

from __future__ import annotations

from turbowg.device.constants import REJECT_AFTER_MESSAGES

_BLOCK_BITS = 64
_BLOCK_SHIFT = 6
_BIT_MASK = _BLOCK_BITS - 1
_RING_BLOCKS = 129  # one block more than the window, so the window is exactly 2**13 counters


class ReplayWindow:
    """Accepts each counter at most once, and none older than WINDOW_SIZE below the highest."""

    WINDOW_SIZE = (_RING_BLOCKS - 1) * _BLOCK_BITS

    __slots__ = ("_last", "_blocks")

    def __init__(self) -> None:
        self._last = 0
        self._blocks = [0] * _RING_BLOCKS

    def reset(self) -> None:
        self._last = 0
        self._blocks = [0] * _RING_BLOCKS

    def accept(self, counter: int) -> bool:
        """Record `counter` and return True if it is fresh; False for replays and too-old ones."""
        if counter >= REJECT_AFTER_MESSAGES or counter < 0:
            return False
        blocks = self._blocks
        block_index = counter >> _BLOCK_SHIFT
        last = self._last
        if counter > last:
            current = last >> _BLOCK_SHIFT
            skipped = block_index - current
            if skipped > _RING_BLOCKS:
                skipped = _RING_BLOCKS
            for index in range(current + 1, current + skipped + 1):
                blocks[index % _RING_BLOCKS] = 0
            self._last = counter
        elif last - counter > self.WINDOW_SIZE:
            return False
        slot = block_index % _RING_BLOCKS
        bit = 1 << (counter & _BIT_MASK)
        word = blocks[slot]
        if word & bit:
            return False
        blocks[slot] = word | bit
        return True
