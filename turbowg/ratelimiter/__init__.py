"""Per-source token buckets for handshake messages (wireguard-go's ratelimiter package), sans-IO.

`RateLimiter.allow(address, now)` says whether one more handshake message from `address` (4 or 16 raw
address bytes: no ipaddress objects on this path) may be processed. One bucket per IPv4 address and per
IPv6 /64 (a v4-mapped IPv6 address counts as its IPv4 address); each refills at PACKETS_PER_SECOND and
holds PACKETS_BURSTABLE, as wireguard-go (20/s, burst 5), kept in integer nanoseconds so the answers are
exact. Memory is bounded: at most `max_entries` buckets; a new source when full evicts the oldest bucket
(the one created first). Buckets idle longer than GC_INTERVAL are dropped by a sweep that `allow` runs at
most once per GC_INTERVAL (wireguard-go collects garbage every second the same way).
"""

from __future__ import annotations

PACKETS_PER_SECOND = 20
PACKETS_BURSTABLE = 5
GC_INTERVAL = 1.0  # seconds: sweep period, and idle time after which a bucket is forgotten
MAX_ENTRIES = 1 << 16

_NS = 1_000_000_000
_V4_MAPPED = bytes(10) + b"\xff\xff"


def source_key(address: bytes) -> bytes:
    """The bucket key of a raw address: the 4 IPv4 bytes, or the /64 prefix of an IPv6 address."""
    if len(address) == 4:
        return address
    if len(address) == 16:
        if address[:12] == _V4_MAPPED:
            return address[12:]
        return address[:8]
    raise ValueError(f"address must be 4 or 16 bytes, not {len(address)}")


class RateLimiter:
    __slots__ = ("packet_cost", "max_tokens", "max_entries", "gc_interval_ns", "_buckets", "_last_gc",
                 "evicted", "refused")

    def __init__(self, packets_per_second: float = PACKETS_PER_SECOND, burst: int = PACKETS_BURSTABLE,
                 max_entries: int = MAX_ENTRIES, gc_interval: float = GC_INTERVAL) -> None:
        if packets_per_second <= 0 or burst < 1 or max_entries < 1:
            raise ValueError("rate, burst and max_entries must be positive")
        self.packet_cost = int(_NS / packets_per_second)
        self.max_tokens = self.packet_cost * burst
        self.max_entries = max_entries
        self.gc_interval_ns = int(gc_interval * _NS)
        # key -> [tokens, last time], both in nanoseconds; dict order = creation order (eviction).
        self._buckets: dict[bytes, list[int]] = {}
        self._last_gc: int | None = None
        self.evicted = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, address: bytes, now: float) -> bool:
        """One message from `address` at monotonic time `now` (seconds): may it be processed?"""
        return self.allow_ns(address, int(now * _NS))

    def allow_ns(self, address: bytes, now_ns: int) -> bool:
        """`allow` with the time in integer nanoseconds (as the C screener, turbowg/conn/_hsscreen.c, takes it)."""
        last_gc = self._last_gc
        if last_gc is None:
            self._last_gc = now_ns
        elif now_ns - last_gc >= self.gc_interval_ns:
            self._collect_ns(now_ns)
        key = address if len(address) == 4 else source_key(address)
        bucket = self._buckets.get(key)
        if bucket is None:
            buckets = self._buckets
            if len(buckets) >= self.max_entries:
                del buckets[next(iter(buckets))]
                self.evicted += 1
            buckets[key] = [self.max_tokens - self.packet_cost, now_ns]
            return True
        tokens = bucket[0] + now_ns - bucket[1]
        bucket[1] = now_ns
        if tokens > self.max_tokens:
            tokens = self.max_tokens
        if tokens > self.packet_cost:
            bucket[0] = tokens - self.packet_cost
            return True
        bucket[0] = tokens
        self.refused += 1
        return False

    def collect(self, now: float) -> int:
        """Drop buckets idle longer than the GC interval; returns how many were dropped."""
        return self._collect_ns(int(now * _NS))

    def _collect_ns(self, now_ns: int) -> int:
        self._last_gc = now_ns
        limit = self.gc_interval_ns
        stale = [key for key, bucket in self._buckets.items() if now_ns - bucket[1] > limit]
        for key in stale:
            del self._buckets[key]
        return len(stale)

    def clear(self) -> None:
        self._buckets.clear()
        self._last_gc = None
