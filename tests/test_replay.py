"""ReplayWindow against a set-based reference."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from turbowg.device.constants import REJECT_AFTER_MESSAGES
from turbowg.device.replay import ReplayWindow

WINDOW = ReplayWindow.WINDOW_SIZE


class Reference:
    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.highest = 0

    def accept(self, counter: int) -> bool:
        if counter >= REJECT_AFTER_MESSAGES or counter in self.seen or self.highest - counter > WINDOW:
            return False
        self.seen.add(counter)
        self.highest = max(self.highest, counter)
        return True


def test_window_is_at_least_2_pow_13() -> None:
    assert WINDOW >= 1 << 13


# Counters as small jumps forward/backward around a moving base, plus some far jumps,
# so the edges of the window are hit often.
steps = st.lists(
    st.one_of(
        st.integers(-WINDOW - 70, WINDOW + 70),
        st.integers(-3, 3),
        st.integers(-WINDOW - 70, -WINDOW + 5),  # right at the trailing edge
        st.integers(0, 200 * WINDOW),
        st.sampled_from([REJECT_AFTER_MESSAGES - 1, REJECT_AFTER_MESSAGES, 2**64 - 1]),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_matches_reference(moves) -> None:
    window, reference = ReplayWindow(), Reference()
    position = 0
    for move in moves:
        if move >= REJECT_AFTER_MESSAGES - 1:
            counter = move
        else:
            position = max(0, position + move)
            counter = position
        assert window.accept(counter) == reference.accept(counter), counter


def test_sequential_and_replays() -> None:
    window = ReplayWindow()
    for counter in range(3 * WINDOW):
        assert window.accept(counter)
    assert not window.accept(3 * WINDOW - 1)
    assert not window.accept(0)  # far too old
    assert window.accept(3 * WINDOW + 100)
    # Within the window but skipped over: accepted once.
    assert window.accept(3 * WINDOW + 50)
    assert not window.accept(3 * WINDOW + 50)
    assert not window.accept(REJECT_AFTER_MESSAGES)
    window.reset()
    assert window.accept(0)


def test_trailing_edge_exact() -> None:
    for highest in (WINDOW + 100, 5 * WINDOW + 63, 7 * WINDOW + 64):
        window = ReplayWindow()
        assert window.accept(highest)
        for behind in range(WINDOW + 1, WINDOW + 130):
            assert not window.accept(highest - behind), behind
        for behind in range(WINDOW, 0, -1):
            assert window.accept(highest - behind), behind
