"""turbowg.ratelimiter: known answers with an injected clock (wireguard-go's numbers: 20/s, burst 5)."""

from __future__ import annotations

import pytest

from turbowg.ratelimiter import GC_INTERVAL, RateLimiter, source_key

V4 = bytes([192, 0, 2, 1])
V4_OTHER = bytes([192, 0, 2, 2])


def v6(prefix: int, host: int) -> bytes:
    return prefix.to_bytes(8, "big") + host.to_bytes(8, "big")


def test_burst_then_steady_rate():
    limiter = RateLimiter()
    t = 100.0
    # A new source: the first message plus the bucket's burst (5 in all; the 5th needs the strict ">" of
    # wireguard-go to be passed by an instant of refill, so step the clock a nanosecond-ish each time).
    answers = [limiter.allow(V4, t + i * 1e-6) for i in range(10)]
    assert answers == [True] * 5 + [False] * 5
    # Then one message per 1/20 s: exactly one is allowed per 50 ms.
    t += 1e-5
    allowed = 0
    for step in range(1, 201):  # 2 s in 10 ms steps: 20 per second -> 40
        allowed += limiter.allow(V4, t + step * 0.010)
    assert 39 <= allowed <= 40
    # Another source is independent.
    assert limiter.allow(V4_OTHER, t + 2.0)


def test_refill_is_capped_at_burst():
    limiter = RateLimiter()
    assert limiter.allow(V4, 0.0)
    # Idle for a long time (but the GC does not run: the sweep is due only at 1 s after start... it is,
    # so keep the bucket alive with allows), then a burst: at most 5.
    answers = [limiter.allow(V4, 0.5 + i * 1e-6) for i in range(8)]
    assert answers.count(True) == 5


def test_ipv6_aggregates_per_slash_64():
    limiter = RateLimiter()
    prefix = 0x20010DB800000001
    answers = [limiter.allow(v6(prefix, host), 10.0 + host * 1e-6) for host in range(1, 9)]
    assert answers == [True] * 5 + [False] * 3  # eight hosts, one /64: one bucket
    assert limiter.allow(v6(prefix + 1, 1), 10.0 + 1e-5)  # the next /64 is another bucket
    assert len(limiter) == 2


def test_v4_mapped_counts_as_v4():
    assert source_key(bytes(10) + b"\xff\xff" + V4) == V4
    limiter = RateLimiter()
    for i in range(5):
        assert limiter.allow(V4, 1.0 + i * 1e-6)
    assert not limiter.allow(bytes(10) + b"\xff\xff" + V4, 1.0 + 6e-6)
    with pytest.raises(ValueError):
        source_key(b"\x01\x02\x03")


def test_garbage_collection_of_idle_entries():
    limiter = RateLimiter()
    for i in range(100):
        limiter.allow(bytes([10, 0, 0, i]), 0.0)
    assert len(limiter) == 100
    limiter.allow(V4, 0.9)  # before the first sweep is due: nothing collected
    assert len(limiter) == 101
    # At 1.5 s the sweep runs: the 100 buckets idle for 1.5 s go, the one touched at 0.9 s stays.
    limiter.allow(V4_OTHER, 1.5)
    assert len(limiter) == 2
    # A collected source starts over with a full burst.
    assert [limiter.allow(bytes([10, 0, 0, 7]), 1.6 + i * 1e-6) for i in range(6)] == [True] * 5 + [False]
    assert limiter.collect(1.6 + GC_INTERVAL + 0.5) == 3


def test_memory_bound_evicts_the_oldest():
    limiter = RateLimiter(max_entries=64)
    for i in range(1000):
        limiter.allow(i.to_bytes(4, "big"), 5.0)
    assert len(limiter) == 64
    assert limiter.evicted == 1000 - 64
    # The newest sources are the ones kept: their buckets are already used (at one instant the strict
    # ">" of wireguard-go lets 4 through, not 5).
    for _ in range(3):
        assert limiter.allow((999).to_bytes(4, "big"), 5.0)
    assert not limiter.allow((999).to_bytes(4, "big"), 5.0)


def test_refused_counter_and_bad_parameters():
    limiter = RateLimiter(packets_per_second=1, burst=1)
    assert limiter.allow(V4, 0.0)
    assert not limiter.allow(V4, 0.5)
    assert limiter.refused == 1
    assert limiter.allow(V4, 1.6)
    with pytest.raises(ValueError):
        RateLimiter(packets_per_second=0)
