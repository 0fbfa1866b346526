"""Handshake work off the data path, sans-IO: what the handshake worker process does with each message.

The daemon (turbowg/daemon/handshake_offload.py) takes handshake messages (initiation, response, cookie reply)
off the receive path at classification time and hands them in batches to a worker process. This module
is everything that worker decides, without sockets or a clock of its own:

* `HandshakeWorkerCore.process_batch(handed_total, entries, now)`: for each message (raw source address
  bytes, port, bytes): size check; mac1 check (drop + count); the under-load decision (the backlog of
  messages handed over but not yet processed is more than QUEUE_SIZE/8, as wireguard-go, or more than
  UNDER_LOAD_RATE came within a second; and for UNDER_LOAD_HOLD seconds after); under load: mac2 check, no valid mac2 -> a cookie reply (rate-limited per source)
  and nothing else, valid mac2 -> the per-source rate limiter (turbowg/ratelimiter). Then an initiation is
  identified (noise.handshake.identify_initiation: the stateless first half of consume_initiation, which
  needs only our private key and the precomputed static-static DH per peer); responses and cookie replies
  are forwarded as they are (they need per-peer state). Returns (cookie replies to send, identified
  initiations, forwarded messages). The main process runs the per-peer second half
  (noise.handshake.accept_identified) on the peer's Handshake.
* the codec of the messages between the two processes (marshal of plain tuples: both ends are us).

No `ipaddress` objects: sources are address bytes (4 or 16) and a port.

From the steered handshake socket the worker reads through a screener (turbowg/conn/recvmmsg.py
`make_screener`, C in turbowg/conn/_hsscreen.c): one call per recvmmsg batch does the size, mac1 and, under
load, the zero-mac2 cookie-reply limiter checks, so a dropped flood message costs no Python object;
`process_screened` does the rest for what it kept (the same decisions as `process_batch`).
"""

from __future__ import annotations

import hashlib
import hmac
import marshal
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from turbowg.conn.recvmmsg import V_COOKIE, V_FORWARD, V_MAC2, make_screener
from turbowg.noise.cookie import CookieChecker
from turbowg.noise.handshake import Identified, LocalIdentity, identify_initiation
from turbowg.noise.primitives import MAC_SIZE, dh
from turbowg.ratelimiter import RateLimiter
from turbowg.wire import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    RESPONSE_SIZE,
)

# wireguard-go QueueHandshakeSize; under load when more than 1/8 of it waits, and for a second after.
QUEUE_SIZE = 4096
UNDER_LOAD_BACKLOG = QUEUE_SIZE // 8
UNDER_LOAD_HOLD = 1.0
# ... or when more than this many handshake messages came in one second: a Python worker pays ~60-100 us for
# an initiation's DH where Go pays a few, so a flood it only just keeps up with (no backlog) would cost a core.
# 512/s bounds that at ~5% of one (2048 let a 2,000/s flood cost 12-20%, and a nice-10 worker on a busy
# machine fell behind by seconds); 512 handshakes/s is still a rekey every 2 minutes for 60,000 peers.
UNDER_LOAD_RATE = 512

_NO_MAC2 = bytes(MAC_SIZE)
_SIZES = {MESSAGE_INITIATION: INITIATION_SIZE, MESSAGE_RESPONSE: RESPONSE_SIZE, MESSAGE_COOKIE_REPLY: COOKIE_REPLY_SIZE}

# Inter-process messages: tuples, marshalled. First element is the tag.
MSG_BATCH = 1  # main -> worker: (MSG_BATCH, handed_total, [(kind, addr, port, message), ...])
MSG_CONFIG = 2  # main -> worker: (MSG_CONFIG, generation, private_key | None, [peer public key, ...])
MSG_RESULTS = 3  # worker -> main: (MSG_RESULTS, processed_total, [identified...], [forwarded...], counters|None)
MSG_SOCKET = 4  # main -> worker, with fds: (MSG_SOCKET, read, k): the UDP socket to send cookie replies from,
#                 and, if `read`, to read handshake messages from (the steered handshake socket); then k
#                 descriptors of the eBPF steering program's maps (turbowg/conn/ebpf.py KernelLimiter: flag, stats)

Entry = tuple[int, bytes, int, bytes]  # kind, source address bytes, source port, message


class HandshakeRate:
    """Under load by rate, as the daemon's in-loop paths judge it: more than `limit` handshake messages in one
    window of a second (a window starts with the first message more than a second after the last start)
    turns it on for `hold` seconds after. Sans-IO: times are given."""

    __slots__ = ("limit", "hold", "window_start", "count", "until")

    def __init__(self, limit: int, hold: float = UNDER_LOAD_HOLD) -> None:
        self.limit = limit
        self.hold = hold
        self.window_start = 0.0
        self.count = 0
        self.until = 0.0

    def add(self, messages: int, now: float) -> None:
        if now - self.window_start > 1.0:
            self.window_start = now
            self.count = 0
        self.count += messages
        if self.count > self.limit:
            self.until = now + self.hold

    def under_load(self, now: float) -> bool:
        return now < self.until


class HandshakeWorkerCore:
    """The worker's state: identity, per-peer static-static DH, cookie secret, rate limiters, counters."""

    def __init__(self) -> None:
        self.identity: LocalIdentity | None = None
        self.checker: CookieChecker | None = None
        self.static_static: dict[bytes, bytes] = {}
        self.generation = 0
        self.limiter = RateLimiter()  # messages with a valid mac2, under load (wireguard-go)
        self.cookie_limiter = RateLimiter()  # cookie replies per source (process_batch)
        self.screener: Any = None  # mac1 + the cookie-reply limiter of the screened path (process_screened)
        self.processed = 0  # messages taken from the queue, in all
        self.under_load_until = float("-inf")
        self.window_start = float("-inf")
        self.window_count = 0
        self.counters: Counter[str] = Counter()

    def configure(self, generation: int, private_key: bytes | None, peer_keys: Iterable[bytes]) -> None:
        """Adopt the device's identity and peers (after every UAPI set that changes them)."""
        self.generation = generation
        if private_key is None or not any(private_key):
            self.identity = None
            self.checker = None
            self.screener = None
            self.static_static = {}
            return
        if self.identity is None or self.identity.private_key != private_key:
            self.identity = LocalIdentity(private_key)
            self.checker = CookieChecker(self.identity.public_key)
            self.screener = make_screener(self.identity.mac1_key)
        table = {}
        for key in peer_keys:
            key = bytes(key)
            if len(key) == 32 and key != self.identity.public_key:
                ss = dh(self.identity.private_key, key)
                if ss is not None:
                    table[key] = ss
        self.static_static = table

    def under_load(self, backlog: int, now: float) -> bool:
        if backlog > UNDER_LOAD_BACKLOG:
            self.under_load_until = now + UNDER_LOAD_HOLD
        return now < self.under_load_until

    def load_for_chunk(self, seen: int, chunk: int, now: float) -> bool:
        """Under load for a batch of `chunk` messages read from the socket, `seen` read in this wake so far
        (this batch included): the backlog rule (more than UNDER_LOAD_BACKLOG waited), the rate rule (more
        than UNDER_LOAD_RATE in a second), and the hold, as process_batch applies them."""
        self._count_window(chunk, now)
        return self.under_load(seen, now)

    def _count_window(self, count: int, now: float) -> None:
        if now - self.window_start >= 1.0:
            self.window_start = now
            self.window_count = 0
        self.window_count += count
        if self.window_count > UNDER_LOAD_RATE:
            self.under_load_until = now + UNDER_LOAD_HOLD

    def process_screened(self, kept: Sequence[tuple], screened: int, now: float, backlog: int = 0,
                         ) -> tuple[list[tuple[bytes, bytes, int]], list[tuple], list[Entry]]:
        """process_batch for what the screener kept of `screened` messages (verdict, kind, addr, port, msg):
        the cookie replies it allowed, the mac2 checks it left to us, identification and forwarding.
        `backlog` is what the wake read in all: the screener decided "under load" batch by batch, before it
        knew; if the whole wake says so, what it accepted gets the under-load treatment here (as
        process_batch, which decides after the whole wake was read), so a wake that finds a flood does not
        run a key exchange for each of its first UNDER_LOAD_BACKLOG messages."""
        replies: list[tuple[bytes, bytes, int]] = []
        identified: list[tuple] = []
        forwarded: list[Entry] = []
        counters = self.counters
        self.processed += screened
        identity = self.identity
        checker = self.checker
        if identity is None or checker is None:
            counters["rx_handshake_no_private_key"] += len(kept)
            return replies, identified, forwarded
        load = self.under_load(backlog, now)
        now_ns = int(now * 1_000_000_000)
        screener = self.screener
        out = (replies, identified, forwarded)

        def cookie_allowed(addr: bytes) -> bool:
            return bool(screener.allow(addr, now_ns))

        for verdict, kind, addr, port, msg in kept:
            if verdict == V_FORWARD:
                forwarded.append((kind, addr, port, msg))
            elif verdict == V_COOKIE:  # the screener found no mac2 and already allowed the reply
                self._after_mac1(kind, addr, port, msg, now, True, None, out)
            else:
                self._after_mac1(kind, addr, port, msg, now, verdict == V_MAC2 or load, cookie_allowed, out)
        return replies, identified, forwarded

    def _after_mac1(self, kind: int, addr: bytes, port: int, msg: bytes, now: float, load: bool,
                    cookie_allowed: Callable[[bytes], bool] | None,
                    out: tuple[list[tuple[bytes, bytes, int]], list[tuple], list[Entry]]) -> None:
        """A message with a valid mac1. Under load: without a valid mac2, a cookie reply if
        `cookie_allowed(addr)` (None: already allowed, and mac2 known absent) and nothing else; with one, the
        per-source limit. Then an initiation is identified and a response forwarded."""
        replies, identified, forwarded = out
        counters = self.counters
        if load:
            source = addr + port.to_bytes(2, "big")
            # An all-zero mac2 (what a sender without our cookie puts there) cannot be valid (a MAC is zero
            # with probability 2^-128): skip the two BLAKE2s of the check (~45% of a flood message's cost).
            if cookie_allowed is None or msg[-MAC_SIZE:] == _NO_MAC2 or \
                    not self.checker.check_mac2(msg, source, now):  # type: ignore[union-attr]
                if cookie_allowed is not None and not cookie_allowed(addr):
                    counters["tx_cookie_reply_ratelimited"] += 1
                    return
                sender = int.from_bytes(msg[4:8], "little")
                replies.append((self.checker.create_reply(msg, sender, source, now), addr, port))  # type: ignore[union-attr]
                counters["tx_cookie_reply"] += 1
                return
            if not self.limiter.allow(addr, now):
                counters["rx_handshake_ratelimited"] += 1
                return
        if kind == MESSAGE_INITIATION:
            ident = identify_initiation(self.identity, msg, self.static_static.get)  # type: ignore[arg-type]
            if ident is None:
                counters["rx_initiation_rejected"] += 1
                return
            identified.append((self.generation, addr, port, *ident.as_tuple()))
        else:
            forwarded.append((kind, addr, port, msg))

    def process_batch(self, handed_total: int, entries: Sequence[Entry], now: float,
                      ) -> tuple[list[tuple[bytes, bytes, int]], list[tuple], list[Entry]]:
        """Returns (cookie replies as (datagram, addr, port), identified initiations as
        (generation, addr, port, *Identified.as_tuple()), forwarded responses/cookie replies as entries)."""
        replies: list[tuple[bytes, bytes, int]] = []
        identified: list[tuple] = []
        forwarded: list[Entry] = []
        counters = self.counters
        self._count_window(len(entries), now)
        identity = self.identity
        checker = self.checker
        blake2s = hashlib.blake2s
        compare = hmac.compare_digest
        out = (replies, identified, forwarded)
        cookie_limiter = self.cookie_limiter

        def cookie_allowed(addr: bytes) -> bool:
            return cookie_limiter.allow(addr, now)

        for entry in entries:
            kind, addr, port, msg = entry
            backlog = handed_total - self.processed
            self.processed += 1
            size = len(msg)
            if _SIZES.get(kind) != size:
                counters["rx_cookie_reply_bad_size" if kind == MESSAGE_COOKIE_REPLY else "rx_handshake_bad_size"] += 1
                continue
            if kind == MESSAGE_COOKIE_REPLY:
                forwarded.append(entry)
                continue
            if identity is None or checker is None:
                counters["rx_handshake_no_private_key"] += 1
                continue
            mac1_at = size - 2 * MAC_SIZE
            if not compare(blake2s(msg[:mac1_at], digest_size=MAC_SIZE, key=identity.mac1_key).digest(),
                           msg[mac1_at:mac1_at + MAC_SIZE]):
                counters["rx_bad_mac1"] += 1
                continue
            self._after_mac1(kind, addr, port, msg, now, self.under_load(backlog, now), cookie_allowed, out)
        return replies, identified, forwarded


# ---------------------------------------------------------------- codec


def encode_batch(handed_total: int, entries: list[Entry]) -> bytes:
    return marshal.dumps((MSG_BATCH, handed_total, entries))


def encode_config(generation: int, private_key: bytes | None, peer_keys: Iterable[bytes]) -> bytes:
    return marshal.dumps((MSG_CONFIG, generation, private_key, [bytes(k) for k in peer_keys]))


def encode_results(processed: int, identified: list[tuple], forwarded: list[Entry],
                   counters: dict[str, int] | None) -> bytes:
    return marshal.dumps((MSG_RESULTS, processed, identified, forwarded, counters))


def encode_socket(read: bool, kernel_fds: int = 0) -> bytes:
    """`kernel_fds`: how many descriptors after the socket's are the eBPF limiter's (flag map, counters map)."""
    return marshal.dumps((MSG_SOCKET, bool(read), int(kernel_fds)))


def decode(data: bytes) -> tuple:
    message = marshal.loads(data)
    if not isinstance(message, tuple) or not message or message[0] not in (MSG_BATCH, MSG_CONFIG, MSG_RESULTS,
                                                                           MSG_SOCKET):
        raise ValueError("not a handshake worker message")
    return message


def identified_from_tuple(values: Sequence) -> Identified:
    """The Identified part of one identified entry (after generation, addr, port)."""
    return Identified(*values[3:9])

