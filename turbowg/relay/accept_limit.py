"""derper's `-accept-connection-limit` / `-accept-connection-burst`: a token bucket on new connections.

Like derper's rateLimitedListener, a connection over the limit is still accepted by the kernel and then
closed at once (the client sees a reset and retries with its own backoff) rather than left in the
backlog. derper's defaults are a limit of +Inf and a burst of MaxInt, i.e. no limit; `make_limiter`
returns None then, so the accept path costs nothing. With several worker processes each has its own
bucket with an equal share of the rate and the burst (app.py divides them).
"""

from __future__ import annotations

import math
import time


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved; starts full (as golang.org/x/time/rate)."""

    __slots__ = ("rate", "burst", "tokens", "stamp", "clock")

    def __init__(self, rate: float, burst: float, clock=time.monotonic) -> None:
        if rate < 0 or burst < 0 or math.isnan(rate) or math.isnan(burst):
            raise ValueError("rate and burst must be >= 0")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.clock = clock
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def allow(self, n: float = 1.0) -> bool:
        """Take `n` tokens if there are that many."""
        self._refill()
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def take(self, n: float) -> float:
        """Take `n` tokens even into debt; returns the seconds until the balance is back to zero."""
        self._refill()
        self.tokens -= n
        if self.tokens >= 0 or self.rate <= 0:
            return 0.0 if self.tokens >= 0 else math.inf
        return -self.tokens / self.rate


def make_limiter(limit: float, burst: int, workers: int = 1) -> TokenBucket | None:
    """The bucket for one worker, or None when there is no limit (derper's +Inf default)."""
    if math.isinf(limit) and limit > 0:
        return None
    workers = max(1, workers)
    return TokenBucket(limit / workers, max(1, math.ceil(burst / workers)) if burst > 0 else 0)
